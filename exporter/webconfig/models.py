"""The values a web config file becomes, and the one error type every problem is reported as.

Kept apart so parsing, TLS, the source and the middleware can share them without importing
each other.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

__all__ = ["RateLimit", "TLSServerConfig", "WebConfig", "WebConfigError"]


class WebConfigError(Exception):
    """The web config is invalid. ``str()`` is one line: file, key, problem."""

    def __init__(self, detail: str, path: str | os.PathLike[str] | None = None) -> None:
        self.detail = detail
        self.path = None if path is None else Path(path)
        super().__init__(f"web config file {self.path}: {detail}" if self.path else detail)


@dataclass(frozen=True, slots=True)
class TLSServerConfig:
    """``tls_server_config``, paths resolved against the web config file's directory."""

    cert_file: Path | None = None
    key_file: Path | None = None
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)  # a secret: never printed
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    client_ca: str | None = field(default=None, repr=False)
    client_allowed_sans: tuple[str, ...] = ()
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    cipher_suites: tuple[str, ...] = ()  # Go names, as written
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()  # Go names, as written

    @property
    def files(self) -> tuple[Path, ...]:
        """Files whose change must rebuild the TLS context."""
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``rate_limit``: a token bucket of ``burst`` requests refilled one per ``interval``."""

    interval: float
    burst: int


@dataclass(frozen=True, slots=True)
class WebConfig:
    """A validated web config. ``WebConfig()`` is "no file": plain HTTP, no auth."""

    path: Path | None = None
    tls: TLSServerConfig | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    http2: bool = True  # accepted for compatibility; uvicorn serves HTTP/1.1 only
    users: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    rate_limit: RateLimit | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """The config file and every file it names (what a change check must stat)."""
        own = (self.path,) if self.path else ()
        return own + (self.tls.files if self.tls else ())
