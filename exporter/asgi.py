"""Run an ASGI app inside our own event loop, on a socket we bind, with no signal handling.

uvicorn's ``Server.serve()`` installs process signal handlers and calls ``sys.exit`` on
start-up failure; neither belongs in a library component. We bind the socket ourselves
(so port 0 works and the bound address is known before serving), turn lifespan off and
own shutdown through ``close()``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The application owns SIGTERM/SIGINT/SIGHUP; uvicorn must not take them over.
        yield


@dataclass(frozen=True, slots=True)
class BoundAddress:
    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets created with it, and
    # accepted connections inherit the protocol; without it every response waits ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@contextlib.asynccontextmanager
async def serve_asgi(
    app: Any,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    access_log: bool = False,
    graceful_timeout: float = 5.0,
    date_header: bool = True,
) -> AsyncIterator[BoundAddress]:
    """Serve ``app`` until the context exits; yields the address actually bound.

    ``date_header=False`` leaves the Date header to the app (a proxy passes the upstream's)."""
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=access_log,
        log_level=logging.WARNING,
        timeout_graceful_shutdown=int(graceful_timeout) or 1,
        # Our handlers set their own headers; the Server header advertises nothing useful.
        server_header=False,
        date_header=date_header,
    )
    if ssl_context is not None:
        # uvicorn builds its own context from file names; we supply ours directly.
        config.load()
        config.ssl = ssl_context
    server = _EmbeddedServer(config)
    scheme = "https" if ssl_context is not None else "http"
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server._serve, [sock])
            while not server.started:
                if server.should_exit:
                    raise RuntimeError(f"server on {host}:{port} failed to start")
                await anyio.sleep(0.01)
            try:
                yield BoundAddress(str(bound_host), int(bound_port), scheme)
            finally:
                server.should_exit = True
    finally:
        sock.close()
