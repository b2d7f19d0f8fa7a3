"""``WebConfigSource``: the config in force, re-read when the file or its certificates change.

Owns the fail-closed error state and the cached ``SSLContext`` for the current config.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from exporter.webconfig.models import WebConfig, WebConfigError
from exporter.webconfig.parse import load_web_config
from exporter.webconfig.tls import build_ssl_context

__all__ = ["WebConfigSource"]

log = logging.getLogger("exporter.webconfig")

_Signature = tuple[tuple[int, int, int] | None, ...]


class WebConfigSource:
    """The web config in force, re-read when its file or the files it names change.

    ``current()`` stats the files at most once per ``check_interval`` seconds. A changed file
    that no longer validates puts the source in an error state: ``current()`` and
    ``ssl_context()`` raise ``WebConfigError`` (requests get 500, handshakes fail) until the
    file is fixed. The toolkit fails closed the same way; serving the previous config instead
    would keep a revoked password working. Whether TLS is on is fixed at start-up (the socket
    is either TLS or not): a change that adds or removes ``tls_server_config`` is an error
    until reverted or the exporter restarts.
    """

    def __init__(
        self,
        config: WebConfig,
        *,
        watch: bool = True,
        check_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._watch = watch and config.path is not None
        self._interval = check_interval
        self._monotonic = monotonic
        self._tls_enabled = config.tls is not None
        self._error: WebConfigError | None = None
        self._signature = _signature(config.files)
        self._checked_at = monotonic()
        self._ssl: ssl.SSLContext | None = None
        self.generation = 0  # bumped on every successful reload (tests and logs use it)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        check_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> WebConfigSource:
        """Load ``path`` (raising ``WebConfigError``) and watch it."""
        return cls(load_web_config(path), check_interval=check_interval, monotonic=monotonic)

    @property
    def tls_enabled(self) -> bool:
        return self._tls_enabled

    @property
    def error(self) -> str | None:
        """Why the config is not usable right now, or None."""
        return str(self._error) if self._error else None

    def current(self) -> WebConfig:
        """The config in force; raises ``WebConfigError`` while the file is invalid."""
        if self._watch and self._monotonic() - self._checked_at >= self._interval:
            self._checked_at = self._monotonic()
            # In the error state retry every interval: the fix may be a file we cannot know
            # to watch (a certificate the broken file names for the first time).
            if self._error is not None or _signature(self._config.files) != self._signature:
                with contextlib.suppress(WebConfigError):
                    self.reload()
        if self._error is not None:
            raise self._error
        return self._config

    def reload(self) -> None:
        """Re-read the file now (the exporter's reload calls this); raises on error."""
        path = self._config.path
        if path is None:
            return
        try:
            config = load_web_config(path)
            if (config.tls is not None) != self._tls_enabled:
                state = "added" if config.tls is not None else "removed"
                raise WebConfigError(
                    f"tls_server_config: {state} while running; restart the exporter "
                    "to switch between HTTP and HTTPS",
                    path,
                )
        except WebConfigError as exc:
            if self._error is None or str(self._error) != str(exc):
                log.error("web config not applied, refusing requests until fixed: %s", exc)
            self._error = exc
            raise
        if self._error is not None:
            log.info("web config %s is valid again", path)
        self._config = config
        self._signature = _signature(config.files)
        self._error = None
        self._ssl = None
        self.generation += 1

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for the config in force (built once per change)."""
        config = self.current()
        if config.tls is None:
            raise WebConfigError("tls_server_config: TLS is not configured", config.path)
        if self._ssl is None:
            self._ssl = build_ssl_context(config.tls)
        return self._ssl


def _signature(paths: tuple[Path, ...]) -> _Signature:
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)
