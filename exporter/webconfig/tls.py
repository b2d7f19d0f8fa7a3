"""Building server ``SSLContext``s from a validated ``tls_server_config``.

``build_ssl_context`` loads certificates, keys and client CAs and enforces
``client_allowed_sans`` after the handshake; ``server_ssl_context`` gives uvicorn a context
that takes each new connection from the config in force, so rotated files need no restart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.webconfig.models import TLSServerConfig, WebConfigError
from exporter.webconfig.tls_names import CURVES, TLS12_CIPHERS

if TYPE_CHECKING:
    from exporter.webconfig.source import WebConfigSource

__all__ = ["build_ssl_context", "server_ssl_context"]

log = logging.getLogger("exporter.webconfig")


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
    tls12 = [TLS12_CIPHERS[n] for n in tls.cipher_suites if n in TLS12_CIPHERS]
    if tls12:
        try:
            ctx.set_ciphers(":".join(tls12))
        except ssl.SSLError:
            raise WebConfigError(
                f"{w}.cipher_suites: none of the listed suites is available in this OpenSSL"
            ) from None
    if tls.curve_preferences:
        ctx.set_ecdh_curve(CURVES[tls.curve_preferences[0]])
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
