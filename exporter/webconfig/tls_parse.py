"""Validation of ``tls_server_config``: the toolkit's rules, plus what Python's ssl cannot do.

Where a Go setting cannot be honoured exactly it is rejected here with a message saying so,
rather than silently weakened when the context is built.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Final

from exporter.webconfig.fields import as_bool, as_mapping, as_string, as_string_list
from exporter.webconfig.models import TLSServerConfig, WebConfigError
from exporter.webconfig.tls_names import (
    CLIENT_AUTH_TYPES,
    CURVES,
    TLS12_CIPHERS,
    TLS13_CIPHERS,
    TLS_VERSIONS,
    version_name,
)

__all__ = ["parse_tls"]

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


def parse_tls(value: Any, base: Path) -> TLSServerConfig | None:
    raw = as_mapping(value, "tls_server_config", _TLS_KEYS)
    w = "tls_server_config"

    def file(key: str) -> Path | None:
        name = as_string(raw.get(key), f"{w}.{key}")
        return base / name if name else None  # relative to the web config, as the toolkit

    cert_file, key_file, ca_file = file("cert_file"), file("key_file"), file("client_ca_file")
    cert = as_string(raw.get("cert"), f"{w}.cert")
    key = as_string(raw.get("key"), f"{w}.key")
    client_ca = as_string(raw.get("client_ca"), f"{w}.client_ca")
    auth = as_string(raw.get("client_auth_type"), f"{w}.client_auth_type")
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
    sans = as_string_list(raw.get("client_allowed_sans"), f"{w}.client_allowed_sans")
    if sans and auth != "RequireAndVerifyClientCert":
        raise WebConfigError(
            f"{w}.client_allowed_sans: requires client_auth_type RequireAndVerifyClientCert"
        )

    min_version = _tls_version(raw.get("min_version"), f"{w}.min_version", "TLS12")
    max_version = _tls_version(raw.get("max_version"), f"{w}.max_version", "TLS13")
    if min_version > max_version:
        raise WebConfigError(
            f"{w}: min_version {version_name(min_version)} is above "
            f"max_version {version_name(max_version)}"
        )
    ciphers = as_string_list(raw.get("cipher_suites"), f"{w}.cipher_suites")
    for name in ciphers:
        if name not in TLS12_CIPHERS and name not in TLS13_CIPHERS:
            raise WebConfigError(f'{w}.cipher_suites: unknown cipher "{name}"')
    if (
        ciphers
        and not any(n in TLS12_CIPHERS for n in ciphers)
        and min_version < ssl.TLSVersion.TLSv1_3
    ):
        # Go would then fail every TLS 1.2 handshake; say so rather than guess.
        raise WebConfigError(
            f"{w}.cipher_suites: lists only TLS 1.3 suites, which are not configurable; "
            "list TLS 1.2 suites too or set min_version: TLS13"
        )
    curves = as_string_list(raw.get("curve_preferences"), f"{w}.curve_preferences")
    for name in curves:
        if name not in CURVES:
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
        prefer_server_cipher_suites=as_bool(
            raw.get("prefer_server_cipher_suites"), f"{w}.prefer_server_cipher_suites", True
        ),
        curve_preferences=curves,
    )


def _tls_version(value: Any, where: str, default: str) -> ssl.TLSVersion:
    name = as_string(value, where) or default
    if name not in TLS_VERSIONS:
        raise WebConfigError(
            f'{where}: unknown TLS version "{name}" (expected one of {", ".join(TLS_VERSIONS)})'
        )
    return TLS_VERSIONS[name]
