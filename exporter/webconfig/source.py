"""Reading the web config file (``load_web_config``) and following its changes (the source)."""

from __future__ import annotations

import contextlib
import os
import ssl
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import Field, PrivateAttr, ValidationError
from pydantic_core import ErrorDetails

from exporter.webconfig.models import (
    HTTPServerConfig,
    Model,
    RateLimit,
    Users,
    WebConfigError,
    empty,
    log,
)
from exporter.webconfig.tls import RotatingSSLContext, TLSServerConfig


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, as Go's ``yaml.UnmarshalStrict`` does."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        keys: list[Any] = []
        for key_node, _ in node.value:
            if (key := self.construct_object(key_node, deep)) in keys:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f'duplicate key "{key}"', mark)
            keys.append(key)
        return super().construct_mapping(node, deep)


class WebConfig(Model):
    """A validated web config, as the file lays it out; ``WebConfig()``: plain HTTP, no auth."""

    tls_server_config: TLSServerConfig = Field(default_factory=TLSServerConfig)
    http_server_config: HTTPServerConfig = Field(default_factory=HTTPServerConfig)
    basic_auth_users: Users = Field(default_factory=empty)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    _path: Path | None = PrivateAttr(None)

    @property
    def path(self) -> Path | None:
        """The file it was read from (None: made in code)."""
        return self._path

    @property
    def files(self) -> tuple[Path, ...]:
        """The config file and every file it names (what a change check must stat)."""
        tls = self.tls_server_config
        return tuple(p for p in (self._path, tls.cert_file, tls.key_file, tls.client_ca_file) if p)


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """The validated file, its TLS context built; else ``WebConfigError``."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506
        config = WebConfig.model_validate(
            {} if data is None else data, context={"base": path.parent}
        )
    except OSError as exc:
        raise WebConfigError(f"cannot read: {exc.strerror or exc}", path) from None
    except UnicodeDecodeError:
        raise WebConfigError("not UTF-8 text", path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise WebConfigError(f"invalid YAML{where}: {problem}", path) from None
    except ValidationError as exc:
        raise WebConfigError("; ".join(dict.fromkeys(map(_describe, exc.errors()))), path) from None
    config._path = path
    return config


_YAML_WORDS: Final = {
    "model_type": "Input should be a mapping of keys",
    "tuple_type": "Input should be a list",
}


def _describe(error: ErrorDetails) -> str:
    """``key.path: problem`` for one pydantic error."""
    loc, kind, ctx = list(error["loc"]), error["type"], error.get("ctx") or {}
    # pydantic's words, in YAML's terms: its own name the model class or a Python tuple.
    message = _YAML_WORDS.get(kind, error["msg"])
    if kind == "webconfig":  # its message is ours already
        loc.extend(ctx["key"])
    elif kind == "value_error":
        message = str(ctx["error"])
    return f"{'.'.join(map(str, loc)) or 'top level'}: {message}"


class WebConfigSource:
    """The web config in force, re-read when its files change; ``WebConfigError`` while they do
    not validate (docs/http.md, "Changes without restart")."""

    def __init__(
        self,
        config: WebConfig,
        *,
        watch: bool = True,
        check_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config, self._interval, self._monotonic = config, check_interval, monotonic
        self._watch = watch and config.path is not None
        self._checked_at, self._signature = monotonic(), list(map(_stat, config.files))
        self._error: WebConfigError | None = None
        self.tls_enabled = config.tls_server_config.context is not None  # fixed at start
        self.generation = 0  # bumped on every successful reload

    def current(self) -> WebConfig:
        """The config in force (files checked at most once per interval)."""
        if self._watch and self._monotonic() - self._checked_at >= self._interval:
            self._checked_at = self._monotonic()
            # In the error state retry every interval: the fix may be a file we cannot know
            # to watch (a certificate the broken file names for the first time).
            if self._error is not None or list(map(_stat, self._config.files)) != self._signature:
                with contextlib.suppress(WebConfigError):
                    self.reload()
        if self._error is not None:
            raise self._error
        return self._config

    def reload(self) -> None:
        """Re-read the file now (the exporter's reload calls this); raises on error."""
        if (path := self._config.path) is None:
            return
        try:
            config = load_web_config(path)
            if (tls := config.tls_server_config.context is not None) != self.tls_enabled:
                change = "added" if tls else "removed"
                why = "restart the exporter to switch between HTTP and HTTPS"
                raise WebConfigError(f"tls_server_config: {change} while running; {why}", path)
        except WebConfigError as exc:
            if str(self._error) != str(exc):
                log.error("web config not applied, refusing requests until fixed: %s", exc)
            self._error = exc
            raise
        if self._error is not None:
            log.info("web config %s is valid again", path)
        self._config, self._error = config, None
        self._signature = list(map(_stat, config.files))
        self.generation += 1

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The context to serve with: None for plain HTTP, else one that follows the file."""
        if not self.tls_enabled:
            return None
        ctx = RotatingSSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.current = lambda: self.current().tls_server_config.context
        return ctx


def _stat(path: Path) -> tuple[int, int, int] | None:
    """What a change check compares: mtime, size and inode (None: missing)."""
    with contextlib.suppress(OSError):
        st = path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    return None
