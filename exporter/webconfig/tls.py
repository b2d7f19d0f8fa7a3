"""Server ``SSLContext``s from a validated ``tls_server_config``."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from exporter.webconfig.models import CURVES, TLS12_CIPHERS, TLSServerConfig, WebConfigError

log = logging.getLogger("exporter.webconfig")
_W = "tls_server_config"


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
        if allowed and not _peer_has_allowed_san(self.getpeercert(), allowed):
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
    ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.min_version
    ctx.maximum_version = tls.max_version
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls12 := [TLS12_CIPHERS[n] for n in tls.cipher_suites if n in TLS12_CIPHERS]:
        try:
            ctx.set_ciphers(":".join(tls12))
        except ssl.SSLError:
            problem = "none of the listed suites is available in this OpenSSL"
            raise WebConfigError(f"{_W}.cipher_suites: {problem}") from None
    if tls.curve_preferences:
        ctx.set_ecdh_curve(CURVES[tls.curve_preferences[0]])
    _load_cert_chain(ctx, tls)
    # RequestClientCert: Go asks for a certificate but never checks or uses it, so not asking
    # grants exactly the same access.
    ctx.verify_mode = ssl.CERT_NONE
    if tls.client_auth_type in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        _load_client_ca(ctx, tls)
        required = tls.client_auth_type == "RequireAndVerifyClientCert"
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    if tls.client_allowed_sans:
        ctx.allowed_sans = frozenset(tls.client_allowed_sans)
        ctx.sslobject_class = _SanCheckingSSLObject
    return ctx


def _read(path: Path | None, inline: str | None, where: str) -> bytes:
    if path is None:
        return (inline or "").encode()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise WebConfigError(f'{where}: cannot read "{path}": {exc.strerror or exc}') from None


def _load_cert_chain(ctx: ssl.SSLContext, tls: TLSServerConfig) -> None:
    cert_key = "cert_file" if tls.cert_file else "cert"
    key_key = "key_file" if tls.key_file else "key"
    cert = _read(tls.cert_file, tls.cert, f"{_W}.{cert_key}")
    key = _read(tls.key_file, tls.key, f"{_W}.{key_key}")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise WebConfigError(f"{_W}.{cert_key}: no PEM certificate found")
    if b"PRIVATE KEY-----" not in key:
        raise WebConfigError(f"{_W}.{key_key}: no PEM private key found")
    # load_cert_chain reads files only: inline PEM, and what was just read from the files (so
    # that a rotation meanwhile cannot pair a new certificate with an old key), go through
    # private temporary files.
    with _private_file(cert) as cert_path, _private_file(key) as key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
                raise WebConfigError(f"{_W}: {cert_key} and {key_key} do not match") from None
            problem = f"cannot load {cert_key} and {key_key}: {_ssl_problem(exc)}"
            raise WebConfigError(f"{_W}: {problem}") from None


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
    where = f"{_W}.client_ca_file" if tls.client_ca_file else f"{_W}.client_ca"
    data = _read(tls.client_ca_file, tls.client_ca, where).decode("ascii", errors="replace")
    if "-----BEGIN CERTIFICATE-----" not in data:
        raise WebConfigError(f"{where}: no PEM certificate found")
    try:
        ctx.load_verify_locations(cadata=data)
    except ssl.SSLError as exc:
        problem = f"cannot load the CA certificates: {_ssl_problem(exc)}"
        raise WebConfigError(f"{where}: {problem}") from None


def _ssl_problem(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the ``(_ssl.c:4020)`` source position."""
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc.args[1] if len(exc.args) > 1 else exc))
    return text or str(getattr(exc, "reason", None) or "invalid data")


class RotatingSSLContext(ssl.SSLContext):
    """Wraps each new connection with the context ``current()`` gives *now*.

    asyncio calls ``wrap_bio`` once per accepted connection: this is our version of Go's
    ``GetConfigForClient``, so certificates, CAs and versions follow the file without a restart.
    """

    current: Callable[[], ssl.SSLContext]

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        try:
            ctx = self.current()
        except WebConfigError:  # fail closed: with no certificate every handshake fails
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        return ctx.wrap_bio(incoming, outgoing, server_side, server_hostname, session)
