"""ConfigError and the one-line messages it carries.

Every problem with the configuration reaches the user as ``<key path>: <problem>``. This module
turns pydantic's ValidationError into that form (naming the ``PCE_*`` variable a key came from,
never its value) and holds the helpers the models use to raise errors that format that way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from exporter.config.constants import ENV_PREFIX
from exporter.config.suggest import closest_key

_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Environment variables whose values are secrets wherever else they turn up.
_SECRET_VARIABLE = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
# A value shaped like an API key or token: long, no spaces or separators, letters and digits.
_KEY_SHAPED = re.compile(r"(?=.*[A-Za-z])(?=.*[0-9])[A-Za-z0-9_.+=-]{20,}")


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_ELIDED = '"…"'


class ConfigError(Exception):
    """The configuration cannot be used. ``str()`` is one line: ``<key path>: <problem>``.

    ``public`` is the same line without the values it quotes (only key paths and problems),
    for answers that leave the process, such as ``POST /-/reload``'s: whoever may trigger a
    reload need not see what the file holds.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever went into it

    @property
    def public(self) -> str:
        parts = []
        for part in str(self).split("; "):
            path, sep, problem = part.partition(": ")
            parts.append(path + sep + _QUOTED.sub(_ELIDED, problem) if sep else part)
        return "; ".join(parts)


def _quote(value: object) -> str:
    """A value as it appears in messages: double-quoted, escaped, bounded."""
    text = str(value)
    if len(text) > 80:
        text = text[:79] + "…"
    return json.dumps(text, ensure_ascii=False)


def _invalid(field: str, message: str) -> PydanticCustomError:
    """A validation error for ``field`` (a key path relative to the model being validated).

    Model validators see the whole model, so the failing key is carried in the context and
    joined onto the location when the error is formatted.
    """
    return PydanticCustomError("config", "{message}", {"message": message, "field": field})


def _number(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value.is_integer() else f"{value:g}"


_MAX_REPORTED = 3


def format_validation_error(
    exc: ValidationError,
    env_data: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    root: type[BaseModel] | None = None,
) -> str:
    """One line for a pydantic ValidationError: ``path: problem`` joined with ``"; "``.

    Where a key came from an environment variable the message says which one. A value taken
    from the environment is shown (``PCE_SERVER__LISTEN=127.0.0.1:99999`` is no secret) unless
    it may be one: anything under ``providers``, a value shaped like a key, or the value of a
    variable named like a secret; those read ``"***"``. With ``root`` (the model validated),
    an unknown key gets the closest known one as "did you mean".
    """
    env_strings = _masked_strings(env_data or {}, environ or {})
    parts: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        ctx = error.get("ctx") or {}
        field = ctx.get("field") if error["type"] == "config" else None
        path = _format_loc(loc)
        if field:
            path = f"{path}.{field}" if path else str(field)
        message = _message(error, loc)
        if error["type"] == "extra_forbidden" and root is not None and "(" not in message:
            suggestion = closest_key(root, loc)
            if suggestion:
                message += f" (did you mean {_quote(suggestion)}?)"
        for value in env_strings:
            message = message.replace(_quote(value), '"***"')
        variable = _env_variable(loc, field, environ or {})
        if variable:
            message += f" (from environment variable {variable})"
        part = f"{path}: {message}" if path else message
        if part not in parts:
            parts.append(part)
    if len(parts) > _MAX_REPORTED:
        parts = [*parts[:_MAX_REPORTED], f"and {len(parts) - _MAX_REPORTED} more problems"]
    return "; ".join(parts)


def _message(error: Mapping[str, Any], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "config":
        return str(ctx["message"])
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "extra_forbidden":
        if loc and loc[-1] in ("api_key", "key") and loc[0] == "providers":
            return (
                "unknown key (API keys are never read from the config file: set api_key_env "
                "to the name of the environment variable that holds the key)"
            )
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    simple = {
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "tuple_type": "must be a list",
        "dict_type": "must be a table",
        "mapping_type": "must be a table",
        "model_type": "must be a table",
        "model_attributes_type": "must be a table",
        "path_type": "must be a path",
    }
    if kind in simple:
        return simple[kind]
    bounds = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "<="),
    }
    if kind in bounds:
        key, symbol = bounds[kind]
        bound = ctx.get(key)
        return f"must be {symbol} {_number(bound) if isinstance(bound, float) else bound}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    return str(error["msg"])


def _format_loc(loc: Sequence[Any]) -> str:
    """("providers", 0, "prices", "gpt-*", "input") → providers[0].prices."gpt-*".input"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part)
        if text == "[key]":
            out += " (key)"
            continue
        key = text if _TOML_BARE_KEY.fullmatch(text) else _quote(text)
        out = f"{out}.{key}" if out else key
    return out


def _env_variable(loc: tuple[Any, ...], field: Any, environ: Mapping[str, str]) -> str | None:
    """The PCE_* variable that set the value at ``loc`` (longest matching prefix), if any."""
    names: list[str] = []
    for part in loc:
        if not isinstance(part, str):
            break
        names.append(part)
    if isinstance(field, str) and len(names) == len(loc):
        names.extend(p for p in re.split(r"[.\[]", field) if p and not p[0].isdigit())
    upper = {key.upper(): key for key in environ}
    for end in range(len(names), 0, -1):
        candidate = ENV_PREFIX + "__".join(names[:end]).upper()
        if candidate in upper:
            return upper[candidate]
    return None


def _masked_strings(env_data: Mapping[str, Any], environ: Mapping[str, str]) -> set[str]:
    """The strings from the environment that messages must not repeat."""
    secrets = {
        value.strip()
        for name, value in environ.items()
        if _SECRET_VARIABLE.search(name) and value.strip()
    }
    masked = _string_leaves(env_data.get("providers", ()))
    for key, value in env_data.items():
        if key == "providers":
            continue
        for text in _string_leaves(value):
            value_text = text.strip()
            if (
                value_text in secrets
                or any(len(secret) >= 8 and secret in value_text for secret in secrets)
                or _KEY_SHAPED.fullmatch(value_text)
            ):
                masked.add(text)
    return masked


def _string_leaves(data: Any) -> set[str]:
    if isinstance(data, str):
        return {data}
    if isinstance(data, Mapping):
        return {s for value in data.values() for s in _string_leaves(value)}
    if isinstance(data, list | tuple):
        return {s for value in data for s in _string_leaves(value)}
    return set()
