"""A deliberately hostile HTTP upstream on 127.0.0.1, for the attacks of issue 8.

Real servers misbehave in ways a well-behaved framework will not reproduce (a body dribbled a
byte at a time, stacked Content-Encoding, hundreds of made-up headers), so this one writes
raw HTTP/1.1 over a real socket. Each request is answered by ``script(method, path, headers)``,
which returns a ``Reply``; ``requests`` records what was asked. Used by tests and
benchmarks/hardening; loopback only, bounded by the caller's deadlines.
"""

from __future__ import annotations

import contextlib
import gzip
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc


@dataclass
class Reply:
    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes | Sequence[bytes] = b""  # a sequence: sent piece by piece
    pause: float = 0.0  # seconds between pieces (a drip)


Script = Callable[[str, str, dict[str, str]], Reply]


@dataclass
class Hostile:
    url: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


def gzip_bomb(inflated: int, layers: int = 2) -> bytes:
    """Zeros, gzipped ``layers`` times, made in 1 MiB steps (never ``inflated`` bytes at once)."""
    out = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    parts = [out.compress(chunk) for _ in range(inflated // len(chunk))]
    data = b"".join([*parts, out.flush()])
    for _ in range(layers - 1):
        data = gzip.compress(data, 9)
    return data


async def _handle(stream: anyio.abc.SocketStream, script: Script, seen: Hostile) -> None:
    buffer = b""
    with anyio.move_on_after(30):
        while b"\r\n\r\n" not in buffer and len(buffer) < 65536:
            buffer += await stream.receive()
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += await stream.receive()
        seen.requests.append((method, path, headers))
        reply = script(method, path, headers)
        pieces = [reply.body] if isinstance(reply.body, bytes) else list(reply.body)
        names = {k.lower() for k, _ in reply.headers}
        length = (
            [] if "content-length" in names else [("Content-Length", str(sum(map(len, pieces))))]
        )
        status = f"HTTP/1.1 {reply.status} X\r\n"
        fields = "".join(
            f"{k}: {v}\r\n" for k, v in [*reply.headers, *length, ("Connection", "close")]
        )
        await stream.send((status + fields + "\r\n").encode("latin-1"))
        for piece in pieces:
            if reply.pause:
                await anyio.sleep(reply.pause)
            await stream.send(piece)


@contextlib.asynccontextmanager
async def hostile_upstream(script: Script) -> AsyncIterator[Hostile]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - not Django
    seen = Hostile(f"http://127.0.0.1:{port}")

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError,
                                     anyio.EndOfStream, OSError, ValueError):  # fmt: skip
                await _handle(stream, script, seen)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield seen
        finally:
            tg.cancel_scope.cancel()
