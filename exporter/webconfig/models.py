"""The web config file as pydantic models, with exporter-toolkit's names and rules."""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, Self

from pydantic import BaseModel, Field, PlainValidator, StrictStr, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from exporter.durations import Duration

TLS_VERSIONS: Final = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
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


def invalid(message: str, key: object) -> PydanticCustomError:
    """A validation error about ``key``, below the value validated."""
    return PydanticCustomError("webconfig", "{message}", {"message": message, "key": key})


class _Model(BaseModel):
    model_config = {"frozen": True}  # unknown keys: refused by _known_keys

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
Version = Literal["TLS10", "TLS11", "TLS12", "TLS13"]  # Go names, keys of TLS_VERSIONS


class TLSServerConfig(_Model):
    """``tls_server_config``; ``tls.build_ssl_context`` checks the values together."""

    cert: Secret = None
    key: Secret = None
    client_ca: Secret = None
    cert_file: File = None
    key_file: File = None
    client_auth_type: StrictStr = "NoClientCert"  # Go names, as written
    client_ca_file: File = None
    client_allowed_sans: Names = ()
    min_version: Version = "TLS12"
    max_version: Version = "TLS13"
    cipher_suites: Names = ()  # Go names, as written
    prefer_server_cipher_suites: bool = Field(default=True, strict=True)
    curve_preferences: Names = ()  # Go names, as written

    @property
    def enabled(self) -> bool:
        """The toolkit's rule: TLS is on when one of these is set; the rest alone does nothing."""
        switches = {"cert", "key", "client_ca", "cert_file", "key_file", "client_ca_file"}
        return bool(self.model_fields_set & (switches | {"client_auth_type"}))

    @property
    def files(self) -> tuple[Path, ...]:
        """Files whose change must rebuild the TLS context."""
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


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


Headers = Annotated[Mapping[str, str], PlainValidator(_headers)]
Users = Annotated[Mapping[str, str], PlainValidator(_users), Field(repr=False)]


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


class RateLimit(_Model):
    """``rate_limit``: a token bucket of ``burst`` requests refilled one per ``interval``."""

    interval: Duration = 0.0  # 0 turns the limit off, as in the toolkit
    burst: Annotated[int, Field(ge=0, strict=True)] = 0

    @model_validator(mode="after")
    def _burst_with_interval(self) -> Self:
        if self.interval and self.burst < 1:
            # Go's limiter would then refuse every request; almost certainly not what is meant.
            raise invalid("must be at least 1 when interval is set", "burst")
        return self


class HTTPServerConfig(_Model):
    http2: bool = Field(default=True, strict=True)
    headers: Headers = Field(default_factory=_empty)


class WebConfigFile(_Model):
    """The file's layout, read as the ``WebConfig`` that ``value()`` returns."""

    tls_server_config: TLSServerConfig = Field(default_factory=TLSServerConfig)
    http_server_config: HTTPServerConfig = Field(default_factory=HTTPServerConfig)
    basic_auth_users: Users = Field(default_factory=_empty)
    rate_limit: RateLimit = Field(default_factory=RateLimit)

    def value(self, path: Path) -> WebConfig:
        tls, http, limit = self.tls_server_config, self.http_server_config, self.rate_limit
        return WebConfig.model_construct(  # the parts are validated already
            path=path,
            tls=tls if tls.enabled else None,
            headers=http.headers,
            http2=http.http2,
            users=self.basic_auth_users,
            rate_limit=limit if limit.interval else None,
        )


class WebConfig(_Model):
    """A validated web config. ``WebConfig()`` is "no file": plain HTTP, no auth."""

    path: Path | None = None
    tls: TLSServerConfig | None = None
    headers: Headers = Field(default_factory=_empty)
    http2: bool = Field(default=True, strict=True)  # accepted; uvicorn serves HTTP/1.1 only
    users: Users = Field(default_factory=_empty)
    rate_limit: RateLimit | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """The config file and every file it names (what a change check must stat)."""
        return ((self.path,) if self.path else ()) + (self.tls.files if self.tls else ())
