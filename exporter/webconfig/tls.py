"""``tls_server_config``: validating it builds its server ``SSLContext``, checked as the
toolkit's ``ConfigToTLSConfig`` checks it; a Go setting ``ssl`` cannot honour exactly is refused."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import ssl
import tempfile
from collections.abc import Callable
from typing import Any, Final, Literal, Self

from pydantic import Field, PrivateAttr, StrictStr, model_validator

from exporter.webconfig.models import File, Model, Names, Secret, WebConfigError, invalid, log

TLS_VERSIONS: Final = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's names and their verify modes. RequestClientCert: Go never checks the certificate.
CLIENT_AUTH: Final[dict[str, ssl.VerifyMode | None]] = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "RequireAnyClientCert": None,  # refused: see _server_context
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go's names and OpenSSL's. None: a TLS 1.3 suite, not configurable (in Go either): ignored.
CIPHERS: Final = {
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
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
CURVES: Final = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}

Version = Literal["TLS10", "TLS11", "TLS12", "TLS13"]  # Go names, keys of TLS_VERSIONS
# The toolkit's rule: TLS is on when one of these or client_auth_type is set, not otherwise.
SWITCHES: Final = {"cert", "key", "client_ca", "cert_file", "key_file", "client_ca_file"}


class TLSServerConfig(Model):
    """``tls_server_config``; ``context`` is the server context it builds (None: TLS off)."""

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
    _context: ssl.SSLContext | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _build(self) -> Self:
        if self.model_fields_set & (SWITCHES | {"client_auth_type"}):
            self._context = _server_context(self)
        return self

    @property
    def context(self) -> ssl.SSLContext | None:
        return self._context


def _server_context(tls: TLSServerConfig) -> ssl.SSLContext:
    ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    ctx.maximum_version = TLS_VERSIONS[tls.max_version]
    if ctx.minimum_version > ctx.maximum_version:
        raise invalid(f"min_version {tls.min_version} is above max_version {tls.max_version}")
    if not tls.prefer_server_cipher_suites:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # on by default
    _set_ciphers(ctx, tls)
    if len(tls.curve_preferences) > 1:
        problem = "Python's ssl module can restrict key exchange to one curve only; list one curve"
        raise invalid(f"{problem} or remove the key to use OpenSSL's defaults", "curve_preferences")
    for curve in tls.curve_preferences:
        if curve not in CURVES:
            raise invalid(f'unknown curve "{curve}"', "curve_preferences")
        ctx.set_ecdh_curve(CURVES[curve])
    _load_cert_chain(ctx, tls)
    auth = tls.client_auth_type
    auth = "RequireAnyClientCert" if auth == "RequireClientCert" else auth  # Go's alias
    if auth not in CLIENT_AUTH:
        expected = ", ".join(CLIENT_AUTH)
        raise invalid(f'unknown value "{auth}" (expected one of {expected})', "client_auth_type")
    if (mode := CLIENT_AUTH[auth]) is None:
        raise invalid(
            "RequireAnyClientCert is not supported (Python's ssl module cannot require a client "
            "certificate without verifying it); use RequireAndVerifyClientCert with client_ca_file",
            "client_auth_type",
        )
    has_ca = bool(tls.client_ca_file or tls.client_ca)
    if has_ca and auth == "NoClientCert":
        raise invalid("client_ca_file or client_ca is set but client_auth_type is NoClientCert")
    if mode != ssl.CERT_NONE:
        if not has_ca:
            raise invalid(f"client_auth_type {auth} needs client_ca_file or client_ca")
        ca_key, ca = _pem(tls, "client_ca", "certificate")
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
        except ssl.SSLError as exc:
            raise invalid(f"cannot load the CA certificates: {_ssl_problem(exc)}", ca_key) from None
    ctx.verify_mode = mode
    if tls.client_allowed_sans:
        if mode != ssl.CERT_REQUIRED:
            problem = "requires client_auth_type RequireAndVerifyClientCert"
            raise invalid(problem, "client_allowed_sans")
        ctx.allowed_sans = frozenset(tls.client_allowed_sans)
        ctx.sslobject_class = _SanCheckingSSLObject
    return ctx


def _set_ciphers(ctx: ssl.SSLContext, tls: TLSServerConfig) -> None:
    for name in tls.cipher_suites:
        if name not in CIPHERS:
            raise invalid(f'unknown cipher "{name}"', "cipher_suites")
    names = [CIPHERS[name] for name in tls.cipher_suites]
    if names and not any(names) and tls.min_version != "TLS13":
        # Go would then fail every TLS 1.2 handshake; say so rather than guess.
        problem = "lists only TLS 1.3 suites, which are not configurable; list TLS 1.2 suites"
        raise invalid(f"{problem} too or set min_version: TLS13", "cipher_suites")
    try:
        if any(names):
            ctx.set_ciphers(":".join(filter(None, names)))
    except ssl.SSLError:
        problem = "none of the listed suites is available in this OpenSSL"
        raise invalid(problem, "cipher_suites") from None


def _load_cert_chain(ctx: ssl.SSLContext, tls: TLSServerConfig) -> None:
    cert_key, cert = _pem(tls, "cert", "certificate")
    key_key, key = _pem(tls, "key", "private key")
    # load_cert_chain reads files only: the key and certificate just read (so a rotation
    # meanwhile cannot pair them wrongly) go through a private temporary file, deleted at once.
    with tempfile.NamedTemporaryFile(prefix="pce-tls-", suffix=".pem") as pem:
        pem.write(key + b"\n" + cert)
        pem.flush()
        try:
            ctx.load_cert_chain(pem.name)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise invalid(f"{cert_key} and {key_key} do not match") from None
            raise invalid(f"cannot load {cert_key} and {key_key}: {_ssl_problem(exc)}") from None


def _pem(tls: TLSServerConfig, name: str, what: str) -> tuple[str, bytes]:
    """The key it comes from (``name`` or ``name_file``) and the PEM it holds."""
    path, inline = getattr(tls, f"{name}_file"), getattr(tls, name)
    if path and inline:
        raise invalid(f"{name} and {name}_file are mutually exclusive")
    if not (path or inline):
        raise invalid(f"missing one of {name} or {name}_file")
    data = inline.encode() if inline else b""
    if path:
        name = f"{name}_file"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise invalid(f'cannot read "{path}": {exc.strerror or exc}', name) from None
    marker = b"-----BEGIN CERTIFICATE-----" if what == "certificate" else b"PRIVATE KEY-----"
    if marker not in data:
        raise invalid(f"no PEM {what} found", name)
    return name, data


def _ssl_problem(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the ``(_ssl.c:4020)`` source position."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", exc.strerror or str(exc))


class _ServerContext(ssl.SSLContext):
    allowed_sans: frozenset[str] = frozenset()


class _SanCheckingSSLObject(ssl.SSLObject):
    """Fails the handshake (asyncio then closes the connection) unless the client certificate
    has a SAN in ``client_allowed_sans``: Go's ``VerifyPeerCertificate``, which Python lacks."""

    def do_handshake(self) -> None:
        super().do_handshake()
        allowed: frozenset[str] = getattr(self.context, "allowed_sans", frozenset())
        if not _peer_has_allowed_san(self.getpeercert(), allowed):
            log.warning("web: TLS client rejected: no allowed SAN in its certificate")
            raise ssl.SSLError("client certificate has no SAN listed in client_allowed_sans")


def _peer_has_allowed_san(cert: Any, allowed: frozenset[str]) -> bool:
    sans = cert.get("subjectAltName", ()) if isinstance(cert, dict) else ()
    for kind, value in sans:
        text = str(value).strip()
        if kind == "IP Address":
            # Go compares ip.String(): compressed, lower-case IPv6. OpenSSL prints it long-hand.
            with contextlib.suppress(ValueError):
                text = str(ipaddress.ip_address(text))
        if kind in ("DNS", "IP Address", "email", "URI") and text in allowed:
            return True
    return False


class RotatingSSLContext(ssl.SSLContext):
    """Wraps each new connection (asyncio calls ``wrap_bio`` once per connection) with the
    context ``current()`` gives now: Go's ``GetConfigForClient`` (docs/http.md)."""

    current: Callable[[], ssl.SSLContext | None]

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        try:
            ctx = self.current()
        except WebConfigError:  # fail closed: with no certificate every handshake fails
            ctx = None
        return (ctx or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)).wrap_bio(*args, **kwargs)
