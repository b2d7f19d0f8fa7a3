"""Reading and validating a web config file: ``load_web_config``.

Strict YAML (duplicate and unknown keys are errors, as with Go's ``UnmarshalStrict``), then
every section checked; ``tls_server_config`` is delegated to ``tls_parse`` and its
certificates are loaded once to prove they work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import yaml

from exporter.durations import parse_duration
from exporter.webconfig.auth import BCRYPT_HASH
from exporter.webconfig.fields import as_bool, as_mapping, as_string
from exporter.webconfig.models import RateLimit, WebConfig, WebConfigError
from exporter.webconfig.tls import build_ssl_context
from exporter.webconfig.tls_parse import parse_tls

__all__ = ["ALLOWED_HEADERS", "load_web_config"]

# The only headers the toolkit lets a web config set, with the values it accepts where the
# header is an enumeration (None: any single-line value). Private there "to ensure
# consistency in the Prometheus ecosystem"; we keep the same list for the same reason.
ALLOWED_HEADERS: Final[Mapping[str, tuple[str, ...] | None]] = MappingProxyType(
    {
        "Content-Security-Policy": None,
        "X-Frame-Options": ("deny", "sameorigin"),
        "X-Content-Type-Options": ("nosniff",),
        "X-XSS-Protection": None,
        "Strict-Transport-Security": None,
    }
)

_TOP_KEYS: Final = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_HTTP_KEYS: Final = ("http2", "headers")
_RATE_KEYS: Final = ("interval", "burst")
_HASH_HINT: Final = "generate one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, as Go's yaml.UnmarshalStrict does."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        with contextlib.suppress(TypeError):  # unhashable keys fail later with a clearer error
            if key in seen:
                mark = key_node.start_mark
                raise WebConfigError(f'duplicate key "{key}" at line {mark.line + 1}')
            seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read and validate a web config file, loading its certificates to prove they work.

    Raises ``WebConfigError`` with one line naming the key and the problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WebConfigError(f"cannot read: {exc.strerror or exc}", path) from None
    except UnicodeDecodeError:
        raise WebConfigError("not UTF-8 text", path) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except WebConfigError as exc:
        raise WebConfigError(exc.detail, path) from None
    except yaml.YAMLError as exc:
        raise WebConfigError(_yaml_problem(exc), path) from None
    try:
        config = _parse(data, path)
        if config.tls is not None:
            build_ssl_context(config.tls)  # proves the certificates and key load
    except WebConfigError as exc:
        raise WebConfigError(exc.detail, path) from None
    return config


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {problem}"


def _parse(data: Any, path: Path) -> WebConfig:
    if data is None:  # an empty file: the toolkit's defaults (plain HTTP, no auth)
        return WebConfig(path=path)
    top = as_mapping(data, "", _TOP_KEYS)
    base = path.parent
    tls = parse_tls(top["tls_server_config"], base) if "tls_server_config" in top else None
    http2, headers = _parse_http(top.get("http_server_config"))
    users = _parse_users(top.get("basic_auth_users"))
    rate = _parse_rate_limit(top["rate_limit"]) if "rate_limit" in top else None
    return WebConfig(path=path, tls=tls, headers=headers, http2=http2, users=users, rate_limit=rate)


def _parse_http(value: Any) -> tuple[bool, Mapping[str, str]]:
    raw = as_mapping(value, "http_server_config", _HTTP_KEYS)
    http2 = as_bool(raw.get("http2"), "http_server_config.http2", True)
    headers_raw = raw.get("headers")
    if headers_raw is None:
        return http2, MappingProxyType({})
    where = "http_server_config.headers"
    if not isinstance(headers_raw, dict):
        raise WebConfigError(f"{where}: must be a mapping of header names to values")
    headers: dict[str, str] = {}
    for name, val in headers_raw.items():
        if name not in ALLOWED_HEADERS:
            raise WebConfigError(
                f'{where}: HTTP header "{name}" can not be configured '
                f"(allowed: {', '.join(ALLOWED_HEADERS)})"
            )
        text = as_string(val, f"{where}.{name}")
        if text is None:  # "Unset if blank"
            continue
        if any(c in text for c in "\r\n\0"):
            raise WebConfigError(f"{where}.{name}: must be a single line")
        allowed = ALLOWED_HEADERS[name]
        if allowed is not None and text not in allowed:
            raise WebConfigError(
                f'{where}.{name}: invalid value "{text}" (expected one of {", ".join(allowed)})'
            )
        headers[name] = text
    return http2, MappingProxyType(headers)


def _parse_users(value: Any) -> Mapping[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        raise WebConfigError("basic_auth_users: must be a mapping of user names to bcrypt hashes")
    users: dict[str, str] = {}
    for name, hashed in value.items():
        if not isinstance(name, str) or not name:
            raise WebConfigError(
                f"basic_auth_users: user name {name!r} must be a non-empty string (quote it)"
            )
        if ":" in name:
            # Basic auth splits "user:password" at the first colon: this user could never log in.
            raise WebConfigError(f'basic_auth_users.{name}: a user name cannot contain ":"')
        # Never echo the hash: it is a secret (it allows an offline attack on the password).
        if not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            raise WebConfigError(f"basic_auth_users.{name}: not a bcrypt hash ({_HASH_HINT})")
        users[name] = hashed
    return MappingProxyType(users)


def _parse_rate_limit(value: Any) -> RateLimit | None:
    raw = as_mapping(value, "rate_limit", _RATE_KEYS)
    interval_raw = raw.get("interval", 0)
    try:
        interval = parse_duration(interval_raw)
    except ValueError as exc:
        raise WebConfigError(f"rate_limit.interval: {exc}") from None
    burst = raw.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise WebConfigError("rate_limit.burst: must be a non-negative integer")
    if interval == 0:  # the toolkit's "0 disables the rate limiter"
        return None
    if burst < 1:
        # Go's limiter would then refuse every request; almost certainly not what is meant.
        raise WebConfigError("rate_limit.burst: must be at least 1 when interval is set")
    return RateLimit(interval=interval, burst=burst)
