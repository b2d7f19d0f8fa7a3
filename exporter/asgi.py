"""Run an ASGI app inside our own event loop, on a socket we bind, with no signal handling.

uvicorn's ``Server.serve()`` installs process signal handlers and calls ``sys.exit`` on
start-up failure; neither belongs in a library component. We bind the socket ourselves
(so port 0 works and the bound address is known before serving), turn lifespan off and
own shutdown through ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# Connections held open at once; beyond it the oldest idle one is closed to make room, so a
# flood of idle sockets cannot starve scrapes of file descriptors (or of a slot).
DEFAULT_MAX_CONNECTIONS = 256
# A connection must deliver a complete request head this soon after it opens or after its
# previous response; otherwise it is closed (slowloris, and sockets that never send at all).
DEFAULT_HEADER_TIMEOUT = 10.0
# Identical log records repeated within this window are summarised instead of printed.
LOG_REPEAT_WINDOW = 60.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The application owns SIGTERM/SIGINT/SIGHUP; uvicorn must not take them over.
        yield


class _Guard:
    """The connections of one server, oldest first, for the limit and the header timeout."""

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max(1, max_connections)
        self.header_timeout = header_timeout
        self.open: dict[_Guarded, None] = {}  # insertion order = age
        self.evicted = 0


# uvicorn's HTTP/1.1 protocols: h11 (pure Python, the default) or httptools (llhttp, in C:
# about a third less CPU per request, for servers where that counts, the proxies).
Parser = Literal["h11", "httptools"]


def _guarded_protocol(guard: _Guard, parser: Parser = "h11") -> type[asyncio.Protocol]:
    base = _guarded_httptools() if parser == "httptools" else _GuardedH11

    class Guarded(base):  # type: ignore[valid-type,misc]
        pass

    Guarded.guard = guard
    return Guarded


class _Guarded(asyncio.Protocol):
    """A connection limit and a request-head deadline, mixed in before one of uvicorn's
    protocols (both keep the request being served in ``cycle``)."""

    guard: _Guard
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _waiting_cycle: object = None
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        if len(guard.open) >= guard.max_connections:
            idle = next((c for c in guard.open if not c._busy()), None)
            if idle is None:  # every slot is serving a request: this one waits for none
                transport.close()
                return
            guard.evicted += 1
            idle._close()
        guard.open[self] = None
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._await_request()

    def _busy(self) -> bool:
        cycle: Any = self.cycle  # None before the first request head (uvicorn types it as set)
        return cycle is not None and not cycle.response_complete

    def _await_request(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._waiting_cycle = self.cycle
        self._timer = self.loop.call_later(self.guard.header_timeout, self._check_request)

    def _check_request(self) -> None:
        # No new request head arrived since we started waiting, and none is being served.
        if self.cycle is self._waiting_cycle and not self._busy():
            self._close()

    def _close(self) -> None:
        self.guard.open.pop(self, None)
        if not self.transport.is_closing():
            self.transport.close()


class _GuardedH11(_Guarded, H11Protocol):
    pass


@functools.cache
def _guarded_httptools() -> type[_Guarded]:
    # Imported by the servers that choose httptools (the proxies), so the exporter's own h11
    # server does not hold it (0.3 MB resident).
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _GuardedHttpTools(_Guarded, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            # httptools keeps only the path of an absolute-form target ("GET http://host/x"):
            # give the app the target itself as raw_path, as h11 does, so it can refuse it.
            if not self.url.startswith(b"/") and "raw_path" in self.scope:
                self.scope["raw_path"] = self.url.partition(b"?")[0]

    return _GuardedHttpTools


class RepeatFilter(logging.Filter):
    """Lets the first of identical records (same logger, level and message template) through
    per window; the next one after the window says how many were suppressed."""

    def __init__(self, window: float = LOG_REPEAT_WINDOW) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        first, suppressed = self._seen.get(key, (0.0, 0))
        if record.created - first < self.window:
            self._seen[key] = (first, suppressed + 1)
            return False
        if len(self._seen) > 1000:  # bounded: forget the oldest half
            for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                del self._seen[old]
        self._seen[key] = (record.created, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} identical messages suppressed)"
        return True


_REPEAT_FILTER = RepeatFilter()


def limit_repeated_logs(*names: str) -> None:
    """Rate-limit identical records of these loggers (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if _REPEAT_FILTER not in logger.filters:
            logger.addFilter(_REPEAT_FILTER)


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
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    date_header: bool = True,
    parser: Parser = "h11",
) -> AsyncIterator[BoundAddress]:
    """Serve ``app`` until the context exits; yields the address actually bound.

    ``date_header=False`` leaves the Date header to the app (a proxy passes the upstream's)."""
    # An accept loop out of descriptors, a client resetting mid-request: the same line
    # thousands of times a second would fill the disk, so each is printed once a minute.
    limit_repeated_logs("asyncio", "uvicorn.error", "exporter.server", "exporter.webconfig")
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
        http=_guarded_protocol(_Guard(max_connections, header_timeout), parser),
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
