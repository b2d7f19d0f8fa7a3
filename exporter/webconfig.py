"""TLS, basic auth and response headers from a web config file in exporter-toolkit's format.

Users run node_exporter and friends with ``--web.config.file``; this module reads the same
YAML so they can reuse it (docs/http.md lists the subset and every difference)::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
    http_server_config:
      headers:
        X-Content-Type-Options: nosniff
    basic_auth_users:
      prometheus: $2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi
    rate_limit:
      interval: 1s
      burst: 20

* ``load_web_config(path)`` validates everything, certificates included, and raises
  ``WebConfigError`` with one line naming the key.
* ``WebConfigSource`` holds the config in force and re-reads the file (and the certificate
  files it names) when they change, at most once per ``check_interval``. While the file is
  invalid it fails closed, as the toolkit does: requests get 500, TLS handshakes fail.
* ``WebConfigMiddleware`` (ASGI) applies headers, the rate limit and basic auth to every
  request; ``server_ssl_context`` gives uvicorn a context that builds each new connection
  from the config in force, so rotated certificates need no restart.

Python's ``ssl`` module cannot express everything Go's ``crypto/tls`` can. Where a setting
cannot be honoured exactly, it is rejected with a message saying so; nothing is silently
weakened.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import anyio
import anyio.to_thread
import bcrypt
import yaml
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.durations import parse_duration

__all__ = [
    "ALLOWED_HEADERS",
    "BasicAuthenticator",
    "RateLimit",
    "TLSServerConfig",
    "WebConfig",
    "WebConfigError",
    "WebConfigMiddleware",
    "WebConfigSource",
    "build_ssl_context",
    "load_web_config",
    "server_ssl_context",
]

log = logging.getLogger("exporter.webconfig")

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
_TLS_KEYS: Final = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)
_HTTP_KEYS: Final = ("http2", "headers")
_RATE_KEYS: Final = ("interval", "burst")

_TLS_VERSIONS: Final[Mapping[str, ssl.TLSVersion]] = MappingProxyType(
    {
        "TLS10": ssl.TLSVersion.TLSv1,
        "TLS11": ssl.TLSVersion.TLSv1_1,
        "TLS12": ssl.TLSVersion.TLSv1_2,
        "TLS13": ssl.TLSVersion.TLSv1_3,
    }
)

CLIENT_AUTH_TYPES: Final = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)

# Go's tls.CipherSuites() names (the ones the toolkit accepts) for TLS 1.0-1.2, mapped to the
# OpenSSL names ``SSLContext.set_ciphers`` takes. Go's insecure suites (RC4, 3DES, CBC-SHA256)
# are unknown to the toolkit and so are unknown here.
_TLS12_CIPHERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
        "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
        "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
        "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    }
)
# TLS 1.3 suites are not configurable in Go either: listing them is accepted and has no effect.
_TLS13_CIPHERS: Final = frozenset(
    {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
)

# Go curve names the toolkit accepts, mapped to OpenSSL group names.
_CURVES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "CurveP256": "prime256v1",
        "CurveP384": "secp384r1",
        "CurveP521": "secp521r1",
        "X25519": "X25519",
    }
)

# $2a$/$2b$/$2y$ are the variants both Go's and Python's bcrypt verify; cost 04-31.
_BCRYPT_HASH: Final = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_HASH_HINT: Final = "generate one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'"

# Verified against when the user name is unknown, so an unknown user costs as much as a wrong
# password (no user enumeration by timing). The toolkit's own: bcrypt("fakepassword"), cost 10.
_DUMMY_HASH_COST_10: Final = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"

_INTERNAL_ERROR: Final = b"Internal Server Error"


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


# --- loading ------------------------------------------------------------------------------


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
    top = _mapping(data, "", _TOP_KEYS)
    base = path.parent
    tls = _parse_tls(top["tls_server_config"], base) if "tls_server_config" in top else None
    http2, headers = _parse_http(top.get("http_server_config"))
    users = _parse_users(top.get("basic_auth_users"))
    rate = _parse_rate_limit(top["rate_limit"]) if "rate_limit" in top else None
    return WebConfig(path=path, tls=tls, headers=headers, http2=http2, users=users, rate_limit=rate)


def _mapping(value: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where or 'top level'}: must be a mapping of keys")
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            raise WebConfigError(f"{name}: unknown key (expected one of {', '.join(allowed)})")
    return value


def _string(value: Any, where: str) -> str | None:
    """A string setting; ``""`` and null mean "not set", as in the toolkit."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WebConfigError(f"{where}: must be a string")
    return value


def _string_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise WebConfigError(f"{where}: must be a list of non-empty strings")
    return tuple(value)


def _bool(value: Any, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise WebConfigError(f"{where}: must be true or false")
    return value


def _parse_tls(value: Any, base: Path) -> TLSServerConfig | None:
    raw = _mapping(value, "tls_server_config", _TLS_KEYS)
    w = "tls_server_config"

    def file(key: str) -> Path | None:
        name = _string(raw.get(key), f"{w}.{key}")
        return base / name if name else None  # relative to the web config, as the toolkit

    cert_file, key_file, ca_file = file("cert_file"), file("key_file"), file("client_ca_file")
    cert = _string(raw.get("cert"), f"{w}.cert")
    key = _string(raw.get("key"), f"{w}.key")
    client_ca = _string(raw.get("client_ca"), f"{w}.client_ca")
    auth = _string(raw.get("client_auth_type"), f"{w}.client_auth_type")
    if not any((cert_file, key_file, ca_file, cert, key, client_ca, auth)):
        # The toolkit's rule: TLS is on when any of these is set; the rest alone does nothing.
        return None

    for inline, path_key in (
        ("cert", "cert_file"),
        ("key", "key_file"),
        ("client_ca", "client_ca_file"),
    ):
        if raw.get(inline) and raw.get(path_key):
            raise WebConfigError(f"{w}: {inline} and {path_key} are mutually exclusive")
    if not (cert or cert_file):
        raise WebConfigError(f"{w}: missing one of cert or cert_file")
    if not (key or key_file):
        raise WebConfigError(f"{w}: missing one of key or key_file")

    auth = auth or "NoClientCert"
    if auth == "RequireClientCert":  # the toolkit's backwards-compatible alias
        auth = "RequireAnyClientCert"
    if auth not in CLIENT_AUTH_TYPES:
        raise WebConfigError(
            f'{w}.client_auth_type: unknown value "{auth}" '
            f"(expected one of {', '.join(CLIENT_AUTH_TYPES)})"
        )
    if auth == "RequireAnyClientCert":
        raise WebConfigError(
            f"{w}.client_auth_type: RequireAnyClientCert is not supported (Python's ssl module "
            "cannot require a client certificate without verifying it); "
            "use RequireAndVerifyClientCert with client_ca_file"
        )
    has_ca = bool(ca_file or client_ca)
    if has_ca and auth == "NoClientCert":
        raise WebConfigError(
            f"{w}: client_ca_file or client_ca is set but client_auth_type is NoClientCert"
        )
    if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and not has_ca:
        raise WebConfigError(f"{w}: client_auth_type {auth} needs client_ca_file or client_ca")
    sans = _string_list(raw.get("client_allowed_sans"), f"{w}.client_allowed_sans")
    if sans and auth != "RequireAndVerifyClientCert":
        raise WebConfigError(
            f"{w}.client_allowed_sans: requires client_auth_type RequireAndVerifyClientCert"
        )

    min_version = _tls_version(raw.get("min_version"), f"{w}.min_version", "TLS12")
    max_version = _tls_version(raw.get("max_version"), f"{w}.max_version", "TLS13")
    if min_version > max_version:
        raise WebConfigError(
            f"{w}: min_version {_version_name(min_version)} is above "
            f"max_version {_version_name(max_version)}"
        )
    ciphers = _string_list(raw.get("cipher_suites"), f"{w}.cipher_suites")
    for name in ciphers:
        if name not in _TLS12_CIPHERS and name not in _TLS13_CIPHERS:
            raise WebConfigError(f'{w}.cipher_suites: unknown cipher "{name}"')
    if (
        ciphers
        and not any(n in _TLS12_CIPHERS for n in ciphers)
        and min_version < ssl.TLSVersion.TLSv1_3
    ):
        # Go would then fail every TLS 1.2 handshake; say so rather than guess.
        raise WebConfigError(
            f"{w}.cipher_suites: lists only TLS 1.3 suites, which are not configurable; "
            "list TLS 1.2 suites too or set min_version: TLS13"
        )
    curves = _string_list(raw.get("curve_preferences"), f"{w}.curve_preferences")
    for name in curves:
        if name not in _CURVES:
            raise WebConfigError(f'{w}.curve_preferences: unknown curve "{name}"')
    if len(curves) > 1:
        raise WebConfigError(
            f"{w}.curve_preferences: Python's ssl module can restrict key exchange to one "
            "curve only; list one curve or remove the key to use OpenSSL's defaults"
        )
    return TLSServerConfig(
        cert_file=cert_file,
        key_file=key_file,
        cert=cert,
        key=key,
        client_auth_type=auth,
        client_ca_file=ca_file,
        client_ca=client_ca,
        client_allowed_sans=sans,
        min_version=min_version,
        max_version=max_version,
        cipher_suites=ciphers,
        prefer_server_cipher_suites=_bool(
            raw.get("prefer_server_cipher_suites"), f"{w}.prefer_server_cipher_suites", True
        ),
        curve_preferences=curves,
    )


def _tls_version(value: Any, where: str, default: str) -> ssl.TLSVersion:
    name = _string(value, where) or default
    if name not in _TLS_VERSIONS:
        raise WebConfigError(
            f'{where}: unknown TLS version "{name}" (expected one of {", ".join(_TLS_VERSIONS)})'
        )
    return _TLS_VERSIONS[name]


def _version_name(version: ssl.TLSVersion) -> str:
    return next(name for name, v in _TLS_VERSIONS.items() if v == version)


def _parse_http(value: Any) -> tuple[bool, Mapping[str, str]]:
    raw = _mapping(value, "http_server_config", _HTTP_KEYS)
    http2 = _bool(raw.get("http2"), "http_server_config.http2", True)
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
        text = _string(val, f"{where}.{name}")
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
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            raise WebConfigError(f"basic_auth_users.{name}: not a bcrypt hash ({_HASH_HINT})")
        users[name] = hashed
    return MappingProxyType(users)


def _parse_rate_limit(value: Any) -> RateLimit | None:
    raw = _mapping(value, "rate_limit", _RATE_KEYS)
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


# --- TLS ----------------------------------------------------------------------------------


class _ServerContext(ssl.SSLContext):
    """A server context that remembers the client SANs it must enforce after the handshake."""

    allowed_sans: frozenset[str] = frozenset()


class _SanCheckingSSLObject(ssl.SSLObject):
    """Ends the handshake with an error unless the client certificate has an allowed SAN.

    Go's toolkit does this in ``VerifyPeerCertificate``; Python's ssl module has no such hook,
    but asyncio calls ``do_handshake`` on this object and treats an SSLError as a failed
    handshake, so the connection is closed before any request is read.
    """

    def do_handshake(self) -> None:
        super().do_handshake()
        ctx = self.context
        if (
            isinstance(ctx, _ServerContext)
            and ctx.allowed_sans
            and not _peer_has_allowed_san(self.getpeercert(), ctx.allowed_sans)
        ):
            log.warning("web: TLS client rejected: no allowed SAN in its certificate")
            raise ssl.SSLError("client certificate has no SAN listed in client_allowed_sans")


def _peer_has_allowed_san(cert: Any, allowed: frozenset[str]) -> bool:
    if not isinstance(cert, dict):
        return False
    for kind, value in cert.get("subjectAltName", ()):
        text = str(value).strip()
        if kind == "IP Address":
            # Go compares ip.String(): compressed, lower-case IPv6. OpenSSL prints it long-hand.
            with contextlib.suppress(ValueError):
                text = str(ipaddress.ip_address(text))
        if kind in ("DNS", "IP Address", "email", "URI") and text in allowed:
            return True
    return False


def build_ssl_context(tls: TLSServerConfig) -> ssl.SSLContext:
    """A server SSLContext for ``tls``; raises ``WebConfigError`` if anything fails to load."""
    w = "tls_server_config"
    ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.min_version
    ctx.maximum_version = tls.max_version
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = [_TLS12_CIPHERS[n] for n in tls.cipher_suites if n in _TLS12_CIPHERS]
    if tls12:
        try:
            ctx.set_ciphers(":".join(tls12))
        except ssl.SSLError:
            raise WebConfigError(
                f"{w}.cipher_suites: none of the listed suites is available in this OpenSSL"
            ) from None
    if tls.curve_preferences:
        ctx.set_ecdh_curve(_CURVES[tls.curve_preferences[0]])
    _load_cert_chain(ctx, tls)
    if tls.client_auth_type in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        _load_client_ca(ctx, tls)
        ctx.verify_mode = (
            ssl.CERT_REQUIRED
            if tls.client_auth_type == "RequireAndVerifyClientCert"
            else ssl.CERT_OPTIONAL
        )
    else:
        # NoClientCert, and RequestClientCert: Go asks for a certificate there but never checks
        # or uses it, so not asking grants exactly the same access.
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_allowed_sans:
        ctx.allowed_sans = frozenset(tls.client_allowed_sans)
        ctx.sslobject_class = _SanCheckingSSLObject
    return ctx


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise WebConfigError(f'{where}: cannot read "{path}": {exc.strerror or exc}') from None


def _load_cert_chain(ctx: ssl.SSLContext, tls: TLSServerConfig) -> None:
    w = "tls_server_config"
    cert = _read(tls.cert_file, f"{w}.cert_file") if tls.cert_file else (tls.cert or "").encode()
    key = _read(tls.key_file, f"{w}.key_file") if tls.key_file else (tls.key or "").encode()
    cert_key = "cert_file" if tls.cert_file else "cert"
    key_key = "key_file" if tls.key_file else "key"
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise WebConfigError(f"{w}.{cert_key}: no PEM certificate found")
    if b"PRIVATE KEY-----" not in key:
        raise WebConfigError(f"{w}.{key_key}: no PEM private key found")
    # load_cert_chain only reads files. Inline PEM goes through a private temporary file
    # (mode 0600, removed at once); files are loaded from what we just read so a rotation
    # between the check and the load cannot pair a new certificate with an old key.
    with _private_file(cert) as cert_path, _private_file(key) as key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
                raise WebConfigError(f"{w}: {cert_key} and {key_key} do not match") from None
            raise WebConfigError(
                f"{w}: cannot load {cert_key} and {key_key}: {_ssl_problem(exc)}"
            ) from None


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    fd, name = tempfile.mkstemp(prefix="pce-tls-", suffix=".pem")  # created 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        yield name
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _load_client_ca(ctx: ssl.SSLContext, tls: TLSServerConfig) -> None:
    where = (
        "tls_server_config.client_ca_file" if tls.client_ca_file else "tls_server_config.client_ca"
    )
    if tls.client_ca_file:
        data = _read(tls.client_ca_file, where).decode("ascii", errors="replace")
    else:
        data = tls.client_ca or ""
    if "-----BEGIN CERTIFICATE-----" not in data:
        raise WebConfigError(f"{where}: no PEM certificate found")
    try:
        ctx.load_verify_locations(cadata=data)
    except ssl.SSLError as exc:
        raise WebConfigError(
            f"{where}: cannot load the CA certificates: {_ssl_problem(exc)}"
        ) from None


def _ssl_problem(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the ``(_ssl.c:4020)`` source position."""
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc.args[1] if len(exc.args) > 1 else exc))
    return text or str(getattr(exc, "reason", None) or "invalid data")


def _refusing_context() -> ssl.SSLContext:
    """A server context with no certificate: every handshake with it fails (fail closed)."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


class _RotatingSSLContext(ssl.SSLContext):
    """Hands each new connection an SSLObject from the context in force *now*.

    asyncio calls ``wrap_bio`` once per accepted connection; delegating it is our version of
    Go's ``GetConfigForClient``: certificates, CAs, versions and client-auth mode all follow
    the file without a restart. Connections already open keep their session.
    """

    source: WebConfigSource

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        try:
            ctx = self.source.ssl_context()
        except WebConfigError:
            ctx = _refusing_context()  # already logged by the source
        return ctx.wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def server_ssl_context(source: WebConfigSource) -> ssl.SSLContext | None:
    """The context to serve with: None for plain HTTP, else one that follows ``source``."""
    if not source.tls_enabled:
        return None
    source.ssl_context()  # fail at start-up, not at the first connection
    ctx = _RotatingSSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.source = source
    return ctx


# --- the config in force, re-read on change -------------------------------------------------

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


# --- basic auth -------------------------------------------------------------------------------


class BasicAuthenticator:
    """Checks ``Authorization: Basic`` against bcrypt hashes, cheaply after the first time.

    * User names are compared with ``hmac.compare_digest`` against every configured user.
    * An unknown user is verified against a dummy hash of the same cost, so the answer takes
      as long as for a known user with a wrong password.
    * Successful checks are cached by (user, hash, sha256(password)), bounded, so bcrypt's
      cost is paid once per credential, as in the toolkit. Failures are not cached: a cache
      of wrong passwords would be unbounded attacker-controlled memory.
    * bcrypt runs in a worker thread, one at a time (the toolkit serialises it too), so it
      neither blocks the event loop nor lets a flood of bad passwords take every core.
    """

    def __init__(self, *, cache_size: int = 256) -> None:
        self._cache: collections.OrderedDict[tuple[bytes, str, bytes], None] = (
            collections.OrderedDict()
        )
        self._cache_size = cache_size
        self._limiter = anyio.CapacityLimiter(1)
        self._dummy: dict[int, bytes] = {10: _DUMMY_HASH_COST_10}
        self.verifications = 0  # bcrypt computations so far (tests assert on the cache)

    async def check(self, users: Mapping[str, str], authorization: str | None) -> bool:
        credentials = parse_basic_auth(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed: str | None = None
        for name, candidate in users.items():  # no early exit: time does not depend on rank
            if hmac.compare_digest(name.encode("utf-8"), user):
                hashed = candidate
        key = (user, hashed or "", hashlib.sha256(password).digest())
        if hashed is not None and key in self._cache:
            self._cache.move_to_end(key)
            return True
        target = hashed.encode("ascii") if hashed else await self._dummy_hash(users)
        ok = await anyio.to_thread.run_sync(_checkpw, password, target, limiter=self._limiter)
        self.verifications += 1
        if not (ok and hashed is not None):
            return False
        self._cache[key] = None
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True

    async def _dummy_hash(self, users: Mapping[str, str]) -> bytes:
        # Match the most expensive configured cost so "unknown user" is never the fast answer.
        costs = [int(m.group(1)) for h in users.values() if (m := _BCRYPT_HASH.fullmatch(h))]
        cost = max(costs, default=10)
        if cost not in self._dummy:
            self._dummy[cost] = await anyio.to_thread.run_sync(
                _hash_dummy, cost, limiter=self._limiter
            )
        return self._dummy[cost]


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # bcrypt 5 refuses passwords over 72 bytes; Go's fails them too
        return False


def _hash_dummy(cost: int) -> bytes:
    return bcrypt.hashpw(b"not a password of anyone", bcrypt.gensalt(cost))


def parse_basic_auth(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) as bytes from an ``Authorization`` value, or None if not Basic."""
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


# --- ASGI middleware ------------------------------------------------------------------------


class _TokenBucket:
    def __init__(self, limit: RateLimit, monotonic: Callable[[], float]) -> None:
        self.limit = limit
        self._monotonic = monotonic
        self._tokens = float(limit.burst)
        self._at = monotonic()

    def allow(self) -> bool:
        now = self._monotonic()
        refill = (now - self._at) / self.limit.interval  # interval > 0: zero disables the limit
        self._tokens = min(float(self.limit.burst), self._tokens + refill)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WebConfigMiddleware:
    """Applies the web config in force to every HTTP request, before any endpoint runs.

    Order, as in the toolkit: a config that does not load → 500; rate limit → 429; then the
    configured headers go on every response (401s included) and basic auth is required on
    every path (the toolkit wraps the whole mux; /healthz is no exception).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        source: WebConfigSource,
        authenticator: BasicAuthenticator | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.source = source
        self.authenticator = authenticator or BasicAuthenticator()
        self._monotonic = monotonic
        self._bucket: _TokenBucket | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            config = self.source.current()
        except WebConfigError:
            # Detail is logged by the source; the client learns nothing about the file.
            await _plain(send, 500, _INTERNAL_ERROR, ())
            return
        if not self._allow(config.rate_limit):
            await _plain(send, 429, b"Too Many Requests", ())
            return
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in config.headers.items()]
        if config.users:
            authorization = _header(scope, b"authorization")
            if not await self.authenticator.check(config.users, authorization):
                await _plain(send, 401, b"Unauthorized", [*extra, (b"www-authenticate", b"Basic")])
                return
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k for k, _ in extra}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*kept, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _allow(self, limit: RateLimit | None) -> bool:
        if limit is None:
            self._bucket = None
            return True
        if self._bucket is None or self._bucket.limit != limit:
            self._bucket = _TokenBucket(limit, self._monotonic)
        return self._bucket.allow()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            # latin-1 maps every byte; non-ASCII then fails base64 decoding, as it should.
            return bytes(value).decode("latin-1")
    return None


async def _plain(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body) + 1).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body + b"\n"})
