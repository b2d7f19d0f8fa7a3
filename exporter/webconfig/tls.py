"""Server ``SSLContext``s from a validated ``tls_server_config``."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

from exporter.webconfig.models import CURVES, TLS12_CIPHERS, TLSServerConfig, WebConfigError

log = logging.getLogger("exporter.webconfig")
_W = "tls_server_config"


def build_ssl_context(tls: TLSServerConfig) -> ssl.SSLContext:
    """A server SSLContext for ``tls``; raises ``WebConfigError`` if anything fails to load."""
    ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version, ctx.maximum_version = tls.min_version, tls.max_version
    if not tls.prefer_server_cipher_suites:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # on by default
    if tls12 := [TLS12_CIPHERS[name] for name in tls.cipher_suites if name in TLS12_CIPHERS]:
        try:
            ctx.set_ciphers(":".join(tls12))
        except ssl.SSLError:
            problem = "none of the listed suites is available in this OpenSSL"
            raise WebConfigError(f"{_W}.cipher_suites: {problem}") from None
    if tls.curve_preferences:
        ctx.set_ecdh_curve(CURVES[tls.curve_preferences[0]])
    cert_name, cert = _pem(tls, "cert", "certificate")
    key_name, key = _pem(tls, "key", "private key")
    # load_cert_chain reads files only. The key and certificate just read (inline, or from
    # their files: a rotation meanwhile cannot pair a new certificate with an old key) go
    # through one private (0600) temporary file, deleted at once.
    with tempfile.NamedTemporaryFile(prefix="pce-tls-", suffix=".pem") as pem:
        pem.write(key + b"\n" + cert)
        pem.flush()
        try:
            ctx.load_cert_chain(pem.name)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise WebConfigError(f"{_W}: {cert_name} and {key_name} do not match") from None
            problem = f"cannot load {cert_name} and {key_name}: {_ssl_problem(exc)}"
            raise WebConfigError(f"{_W}: {problem}") from None
    # RequestClientCert: Go asks for a certificate but never checks or uses it, so not asking
    # grants exactly the same access.
    ctx.verify_mode = ssl.CERT_NONE
    if tls.client_auth_type in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        ca_name, ca = _pem(tls, "client_ca", "certificate")
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
        except ssl.SSLError as exc:
            problem = f"cannot load the CA certificates: {_ssl_problem(exc)}"
            raise WebConfigError(f"{_W}.{ca_name}: {problem}") from None
        required = tls.client_auth_type == "RequireAndVerifyClientCert"
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    if tls.client_allowed_sans:
        ctx.allowed_sans = frozenset(tls.client_allowed_sans)
        ctx.sslobject_class = _SanCheckingSSLObject
    return ctx


def _pem(tls: TLSServerConfig, name: str, what: str) -> tuple[str, bytes]:
    """The key it comes from (``name`` or ``name_file``) and the PEM it holds."""
    path = getattr(tls, f"{name}_file")
    data = (getattr(tls, name) or "").encode()
    if path is not None:
        name = f"{name}_file"
        try:
            data = path.read_bytes()
        except OSError as exc:
            problem = f'cannot read "{path}": {exc.strerror or exc}'
            raise WebConfigError(f"{_W}.{name}: {problem}") from None
    marker = b"-----BEGIN CERTIFICATE-----" if what == "certificate" else b"PRIVATE KEY-----"
    if marker not in data:
        raise WebConfigError(f"{_W}.{name}: no PEM {what} found")
    return name, data


def _ssl_problem(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the ``(_ssl.c:4020)`` source position."""
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc.args[1] if len(exc.args) > 1 else exc))
    return text or str(exc.reason or "invalid data")


class _ServerContext(ssl.SSLContext):
    allowed_sans: frozenset[str] = frozenset()


class _SanCheckingSSLObject(ssl.SSLObject):
    """Fails the handshake unless the client certificate has a SAN in ``client_allowed_sans``.

    Go's toolkit does this in ``VerifyPeerCertificate``; Python has no such hook, but asyncio
    treats an SSLError from ``do_handshake`` as a failed handshake and closes the connection.
    """

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
    """Wraps each new connection with the context ``current()`` gives *now*.

    asyncio calls ``wrap_bio`` once per accepted connection: this is our version of Go's
    ``GetConfigForClient``, so certificates, CAs and versions follow the file without a restart.
    """

    current: Callable[[], ssl.SSLContext]

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        try:
            ctx = self.current()
        except WebConfigError:  # fail closed: with no certificate every handshake fails
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        return ctx.wrap_bio(*args, **kwargs)
