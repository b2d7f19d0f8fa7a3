"""Typed reads of YAML values, each failing with a one-line ``WebConfigError`` naming the key.

Shared by the top-level parser and the ``tls_server_config`` parser.
"""

from __future__ import annotations

from typing import Any

from exporter.webconfig.models import WebConfigError

__all__ = ["as_bool", "as_mapping", "as_string", "as_string_list"]


def as_mapping(value: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where or 'top level'}: must be a mapping of keys")
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            raise WebConfigError(f"{name}: unknown key (expected one of {', '.join(allowed)})")
    return value


def as_string(value: Any, where: str) -> str | None:
    """A string setting; ``""`` and null mean "not set", as in the toolkit."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WebConfigError(f"{where}: must be a string")
    return value


def as_string_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise WebConfigError(f"{where}: must be a list of non-empty strings")
    return tuple(value)


def as_bool(value: Any, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise WebConfigError(f"{where}: must be true or false")
    return value
