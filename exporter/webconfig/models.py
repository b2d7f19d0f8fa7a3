"""The web config's building blocks as pydantic models, with exporter-toolkit's names and rules."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Self

from pydantic import BaseModel, Field, PlainValidator, StrictStr, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from exporter.durations import Duration

log = logging.getLogger("exporter.webconfig")  # the package's one logger
# The only headers the toolkit lets a web config set, and the values of the enumerated ones.
ALLOWED_HEADERS: Final[Mapping[str, tuple[str, ...] | None]] = {
    "Content-Security-Policy": None,
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-Content-Type-Options": ("nosniff",),
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}
# $2a$/$2b$/$2y$ are the variants both Go's and Python's bcrypt verify; cost 04-31.
BCRYPT_HASH: Final = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


class WebConfigError(Exception):
    """The web config is invalid. ``str()`` is one line: file, key, problem."""

    def __init__(self, detail: str, path: Path | None = None) -> None:
        self.detail, self.path = detail, path
        super().__init__(f"web config file {path}: {detail}" if path else detail)


def invalid(message: str, *key: object) -> PydanticCustomError:
    """A validation error about the value validated or, given, its ``key``."""
    return PydanticCustomError("webconfig", "{message}", {"message": message, "key": key})


class Model(BaseModel):
    model_config = {"frozen": True}

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key in data:
            if key not in cls.model_fields:
                raise invalid(f"unknown key (expected one of {', '.join(cls.model_fields)})", key)
        # The toolkit's YAML: a key set to null or "" is a key left out.
        return {key: value for key, value in data.items() if value not in ("", None)}


def _file(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, str | Path):
        raise ValueError("must be a string")
    return Path((info.context or {}).get("base", "."), value)  # relative to the web config


Names = tuple[Annotated[StrictStr, Field(min_length=1)], ...]
Secret = Annotated[StrictStr | None, Field(repr=False)]
File = Annotated[Path | None, PlainValidator(_file)]


def _headers(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of header names to values")
    headers = {k: v for k, v in value.items() if v not in ("", None)}  # "Unset if blank"
    for name in value:
        if name not in ALLOWED_HEADERS:
            allowed = ", ".join(ALLOWED_HEADERS)
            raise ValueError(f'HTTP header "{name}" can not be configured (allowed: {allowed})')
    for name, text in headers.items():
        if not isinstance(text, str) or any(c in text for c in "\r\n\0"):
            raise invalid("must be a single line of text", name)
        if (choices := ALLOWED_HEADERS[name]) and text not in choices:
            raise invalid(f'invalid value "{text}" (expected one of {", ".join(choices)})', name)
    return MappingProxyType(headers)


def _users(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of user names to bcrypt hashes")
    for name, hashed in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"user name {name!r} must be a non-empty string (quote it)")
        if ":" in name:
            # Basic auth splits "user:password" at the first colon: this user could never log in.
            raise invalid('a user name cannot contain ":"', name)
        # Never echo the hash: it is a secret (it allows an offline attack on the password).
        if not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            hint = "generate one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'"
            raise invalid(f"not a bcrypt hash ({hint})", name)
    return MappingProxyType(dict(value))


def empty() -> Mapping[str, str]:
    return MappingProxyType({})


Users = Annotated[Mapping[str, str], PlainValidator(_users), Field(repr=False)]


class RateLimit(Model):
    """``rate_limit``: a token bucket of ``burst`` requests refilled one per ``interval``."""

    interval: Duration = 0.0  # 0 turns the limit off, as in the toolkit
    burst: Annotated[int, Field(ge=0, strict=True)] = 0

    @model_validator(mode="after")
    def _burst_with_interval(self) -> Self:
        if self.interval and self.burst < 1:
            # Go's limiter would then refuse every request; almost certainly not what is meant.
            raise invalid("must be at least 1 when interval is set", "burst")
        return self


class HTTPServerConfig(Model):
    http2: bool = Field(default=True, strict=True)  # accepted; uvicorn serves HTTP/1.1 only
    headers: Annotated[Mapping[str, str], PlainValidator(_headers)] = Field(default_factory=empty)
