"""The exporter-toolkit web config: loading and its exact errors, basic auth, headers, rate
limit, TLS and mTLS over real loopback connections, and changes picked up without restart.

Certificates come from a throw-away PKI generated with the openssl binary (fixtures/webconfig).
"""

from __future__ import annotations

import base64
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from exporter.results import ProbeResult
from exporter.server import DependencyStatus, Readiness, create_app, serve
from exporter.webconfig import (
    BasicAuthenticator,
    WebConfig,
    WebConfigError,
    WebConfigSource,
    load_web_config,
    parse_basic_auth,
)
from tests.fixtures.webconfig.pki import Pki, make_pki


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "ca")


@pytest.fixture(scope="session")
def pki2(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, unrelated CA: its certificates must not pass as the first one's."""
    return make_pki(tmp_path_factory.mktemp("pki2"), "ca2")


def hash_password(password: str, cost: int = 4) -> str:
    # Cost 4 (the minimum) keeps the tests fast; the code path is the same as for cost 10.
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def watch(path: Path, **options: Any) -> WebConfigSource:
    return WebConfigSource(load_web_config(path), **options)


def read(path: Path) -> str:
    return path.read_text()


def rewrite(path: Path, text: str) -> None:
    """Replace a file so a change check sees it even within one mtime tick."""
    old = path.stat()
    path.write_text(text)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def tls_yaml(pki: Pki, extra: str = "") -> str:
    return (
        "tls_server_config:\n"
        f"  cert_file: {pki.server.cert}\n"
        f"  key_file: {pki.server.key}\n" + extra
    )


def make_app(source: WebConfigSource | WebConfig | None) -> Starlette:
    return create_app(
        registry=CollectorRegistry(),
        runs=_NoRuns(),
        readiness=lambda: Readiness.of(store=DependencyStatus(True)),
        reload=None,
        web_config=source,
        probe_names=("basic",),
        version="test",
    )


class _NoRuns:
    async def recent_runs(
        self,
        *,
        provider: str | None,
        model: str | None,
        probe: str | None,
        limit: int,
        trace_id: str | None = None,
    ) -> list[ProbeResult]:
        return []


@contextlib.asynccontextmanager
async def running(
    source: WebConfigSource | WebConfig | None,
) -> AsyncIterator[tuple[str, Starlette]]:
    app = make_app(source)
    async with serve(app, host="127.0.0.1", port=0, web_config=source) as address:
        yield address.url, app


async def get(url: str, path: str = "/healthz", *, verify: ssl.SSLContext | bool = True,
              headers: dict[str, str] | None = None) -> httpx.Response:  # fmt: skip
    """One request on a fresh connection (so TLS settings in force are what it meets)."""
    async with httpx.AsyncClient(verify=verify, timeout=10.0) as client:
        return await client.get(url + path, headers=headers)


# --- loading -----------------------------------------------------------------------------


def test_load_full_config(tmp_path: Path, pki: Pki) -> None:
    hashed = hash_password("s3cret")
    path = write(
        tmp_path / "web.yml",
        tls_yaml(
            pki,
            f"  client_auth_type: RequireAndVerifyClientCert\n"
            f"  client_ca_file: {pki.ca.cert}\n"
            "  client_allowed_sans: [client.example]\n"
            "  min_version: TLS13\n"
            "  curve_preferences: [X25519]\n",
        )
        + "http_server_config:\n"
        "  http2: false\n"
        "  headers:\n"
        "    X-Frame-Options: sameorigin\n"
        "    Strict-Transport-Security: max-age=31536000\n"
        '    X-XSS-Protection: ""\n'
        f"basic_auth_users:\n  alice: {hashed}\n"
        "rate_limit:\n  interval: 100ms\n  burst: 5\n",
    )
    config = load_web_config(path)
    assert config.path == path
    tls = config.tls_server_config
    assert tls.context is not None
    assert tls.client_auth_type == "RequireAndVerifyClientCert"
    assert tls.client_allowed_sans == ("client.example",)
    assert (tls.min_version, tls.max_version) == ("TLS13", "TLS13")
    assert config.files == (path, pki.server.cert, pki.server.key, pki.ca.cert)
    assert config.http_server_config.http2 is False
    # A blank value means "unset", as the toolkit documents.
    assert dict(config.http_server_config.headers) == {
        "X-Frame-Options": "sameorigin",
        "Strict-Transport-Security": "max-age=31536000",
    }
    assert dict(config.basic_auth_users) == {"alice": hashed}
    assert (config.rate_limit.interval, config.rate_limit.burst) == (0.1, 5)
    assert hashed not in repr(config)  # hashes are secrets


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, pki: Pki) -> None:
    conf_dir = tmp_path / "conf"
    (conf_dir / "tls").mkdir(parents=True)
    (conf_dir / "tls" / "s.crt").write_bytes(pki.server.cert.read_bytes())
    (conf_dir / "tls" / "s.key").write_bytes(pki.server.key.read_bytes())
    path = write(
        conf_dir / "web.yml", "tls_server_config:\n  cert_file: tls/s.crt\n  key_file: tls/s.key\n"
    )
    config = load_web_config(path)
    assert config.tls_server_config.context is not None
    assert config.tls_server_config.cert_file == conf_dir / "tls" / "s.crt"


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    for text in ("", "# nothing\n", "tls_server_config:\nhttp_server_config:\nbasic_auth_users:\n"):
        config = load_web_config(write(tmp_path / "web.yml", text))
        assert config.tls_server_config.context is None
        assert not config.basic_auth_users
        assert not config.http_server_config.headers
        assert config.http_server_config.http2 is True
        assert config.rate_limit.interval == 0  # off


def test_inline_cert_key_and_client_ca(tmp_path: Path, pki: Pki) -> None:
    def block(path: Path) -> str:
        return "|\n" + "".join(f"    {line}\n" for line in path.read_text().splitlines())

    text = (
        "tls_server_config:\n"
        f"  cert: {block(pki.server.cert)}"
        f"  key: {block(pki.server.key)}"
        f"  client_ca: {block(pki.ca.cert)}"
        "  client_auth_type: RequireAndVerifyClientCert\n"
    )
    config = load_web_config(write(tmp_path / "web.yml", text))
    assert config.tls_server_config.key is not None
    assert "PRIVATE KEY" not in repr(config)
    ctx = config.tls_server_config.context
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert not list(tmp_path.glob("pce-tls-*"))


def test_error_message_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "web.yml", "nope: 1\n")
    with pytest.raises(WebConfigError) as err:
        load_web_config(path)
    assert str(err.value) == (
        f"web config file {path}: nope: unknown key (expected one of tls_server_config, "
        "http_server_config, basic_auth_users, rate_limit)"
    )


TLS_KEYS = (
    "cert, key, client_ca, cert_file, key_file, client_auth_type, client_ca_file, "
    "client_allowed_sans, min_version, max_version, cipher_suites, prefer_server_cipher_suites, "
    "curve_preferences"
)
AUTH_TYPES = (
    "NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, "
    "RequireAndVerifyClientCert"
)
HASH = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"


# Each case: the YAML (with {cert} {key} {ca} {client_key} {dir} placeholders) and the message.
INVALID = [
    ("nope: 1\n", "nope: unknown key (expected one of tls_server_config, http_server_config, "
     "basic_auth_users, rate_limit)"),
    ("- a\n- b\n", "top level: Input should be a mapping of keys"),
    ("tls_server_config:\n  certfile: x\n",
     f"tls_server_config.certfile: unknown key (expected one of {TLS_KEYS})"),
    ("basic_auth_users:\n  a: " + HASH + "\nbasic_auth_users:\n  b: " + HASH + "\n",
     'invalid YAML at line 3, column 1: duplicate key "basic_auth_users"'),
    ("tls_server_config: [\n", "invalid YAML at line 2, column 1: expected the node content, "
     "but found '<stream end>'"),
    ("tls_server_config:\n  cert_file: 5\n  key_file: {key}\n",
     "tls_server_config.cert_file: must be a string"),
    ("tls_server_config:\n  cert_file: {cert}\n",
     "tls_server_config: missing one of key or key_file"),
    ("tls_server_config:\n  key_file: {key}\n",
     "tls_server_config: missing one of cert or cert_file"),
    ("tls_server_config:\n  client_auth_type: RequireAndVerifyClientCert\n",
     "tls_server_config: missing one of cert or cert_file"),
    ("tls_server_config:\n  cert: x\n  cert_file: {cert}\n  key_file: {key}\n",
     "tls_server_config: cert and cert_file are mutually exclusive"),
    ("tls_server_config:\n  cert_file: {dir}/missing.crt\n  key_file: {key}\n",
     'tls_server_config.cert_file: cannot read "{dir}/missing.crt": No such file or directory'),
    ("tls_server_config:\n  cert_file: {key}\n  key_file: {key}\n",
     "tls_server_config.cert_file: no PEM certificate found"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {cert}\n",
     "tls_server_config.key_file: no PEM private key found"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {client_key}\n",
     "tls_server_config: cert_file and key_file do not match"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_auth_type: Always\n",
     f'tls_server_config.client_auth_type: unknown value "Always" (expected one of {AUTH_TYPES})'),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAnyClientCert\n  client_ca_file: {ca}\n",
     "tls_server_config.client_auth_type: RequireAnyClientCert is not supported (Python's ssl "
     "module cannot require a client certificate without verifying it); use "
     "RequireAndVerifyClientCert with client_ca_file"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireClientCert\n",
     "tls_server_config.client_auth_type: RequireAnyClientCert is not supported (Python's ssl "
     "module cannot require a client certificate without verifying it); use "
     "RequireAndVerifyClientCert with client_ca_file"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {ca}\n",
     "tls_server_config: client_ca_file or client_ca is set but client_auth_type is NoClientCert"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n",
     "tls_server_config: client_auth_type RequireAndVerifyClientCert needs client_ca_file or "
     "client_ca"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: VerifyClientCertIfGiven\n",
     "tls_server_config: client_auth_type VerifyClientCertIfGiven needs client_ca_file or "
     "client_ca"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {key}\n",
     "tls_server_config.client_ca_file: no PEM certificate found"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {dir}/nope.crt\n",
     'tls_server_config.client_ca_file: cannot read "{dir}/nope.crt": No such file or directory'),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n  client_ca: |\n"
     "    -----BEGIN CERTIFICATE-----\n    AAAA\n    -----END CERTIFICATE-----\n",
     "tls_server_config.client_ca: cannot load the CA certificates: no start line: cadata does "
     "not contain a certificate"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {ca}\n"
     "  client_allowed_sans: [client.example]\n",
     "tls_server_config.client_allowed_sans: requires client_auth_type "
     "RequireAndVerifyClientCert"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca}\n"
     "  client_allowed_sans: client.example\n",
     "tls_server_config.client_allowed_sans: Input should be a list"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS14\n",
     "tls_server_config.min_version: Input should be 'TLS10', 'TLS11', 'TLS12' or 'TLS13'"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  max_version: 1.3\n",
     "tls_server_config.max_version: Input should be 'TLS10', 'TLS11', 'TLS12' or 'TLS13'"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS13\n"
     "  max_version: TLS12\n",
     "tls_server_config: min_version TLS13 is above max_version TLS12"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
     'tls_server_config.cipher_suites: unknown cipher "TLS_RSA_WITH_RC4_128_SHA"'),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
     "tls_server_config.cipher_suites: lists only TLS 1.3 suites, which are not configurable; "
     "list TLS 1.2 suites too or set min_version: TLS13"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  curve_preferences: [CurveP999]\n",
     'tls_server_config.curve_preferences: unknown curve "CurveP999"'),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  curve_preferences: [X25519, CurveP256]\n",
     "tls_server_config.curve_preferences: Python's ssl module can restrict key exchange to one "
     "curve only; list one curve or remove the key to use OpenSSL's defaults"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  prefer_server_cipher_suites: maybe\n",
     "tls_server_config.prefer_server_cipher_suites: Input should be a valid boolean"),
    ("http_server_config:\n  http2: 3\n",
     "http_server_config.http2: Input should be a valid boolean"),
    ("http_server_config:\n  gzip: true\n",
     "http_server_config.gzip: unknown key (expected one of http2, headers)"),
    ("http_server_config:\n  headers: [a]\n",
     "http_server_config.headers: must be a mapping of header names to values"),
    ("http_server_config:\n  headers:\n    Server: x\n",
     'http_server_config.headers: HTTP header "Server" can not be configured (allowed: '
     "Content-Security-Policy, X-Frame-Options, X-Content-Type-Options, X-XSS-Protection, "
     "Strict-Transport-Security)"),
    ("http_server_config:\n  headers:\n    x-frame-options: deny\n",
     'http_server_config.headers: HTTP header "x-frame-options" can not be configured '
     "(allowed: Content-Security-Policy, X-Frame-Options, X-Content-Type-Options, "
     "X-XSS-Protection, Strict-Transport-Security)"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: DENY\n",
     'http_server_config.headers.X-Frame-Options: invalid value "DENY" (expected one of deny, '
     "sameorigin)"),
    ("http_server_config:\n  headers:\n    X-Content-Type-Options: sniff\n",
     'http_server_config.headers.X-Content-Type-Options: invalid value "sniff" (expected one '
     "of nosniff)"),
    ('http_server_config:\n  headers:\n    Content-Security-Policy: "a\\r\\nSet-Cookie: x"\n',
     "http_server_config.headers.Content-Security-Policy: must be a single line of text"),
    ("basic_auth_users: [alice]\n",
     "basic_auth_users: must be a mapping of user names to bcrypt hashes"),
    ("basic_auth_users:\n  alice: plaintext\n",
     "basic_auth_users.alice: not a bcrypt hash (generate one with: htpasswd -nBC 10 \"\" | "
     "tr -d ':\\n')"),
    ("basic_auth_users:\n  alice: $2x$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi\n",
     "basic_auth_users.alice: not a bcrypt hash (generate one with: htpasswd -nBC 10 \"\" | "
     "tr -d ':\\n')"),
    ("basic_auth_users:\n  alice:\n",
     "basic_auth_users.alice: not a bcrypt hash (generate one with: htpasswd -nBC 10 \"\" | "
     "tr -d ':\\n')"),
    ("basic_auth_users:\n  123: " + HASH + "\n",
     "basic_auth_users: user name 123 must be a non-empty string (quote it)"),
    ('basic_auth_users:\n  "a:b": ' + HASH + "\n",
     'basic_auth_users.a:b: a user name cannot contain ":"'),
    ("rate_limit:\n  interval: soon\n  burst: 1\n",
     'rate_limit.interval: invalid duration "soon" (expected e.g. "500ms", "30s", "5m", '
     '"1h30m" or a number of seconds)'),
    ("rate_limit:\n  interval: 1s\n  burst: -1\n",
     "rate_limit.burst: Input should be greater than or equal to 0"),
    ("rate_limit:\n  interval: 1s\n  burst: 0\n",
     "rate_limit.burst: must be at least 1 when interval is set"),
    ("rate_limit:\n  every: 1s\n",
     "rate_limit.every: unknown key (expected one of interval, burst)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_config_is_one_clear_line(
    tmp_path: Path, pki: Pki, text: str, message: str
) -> None:
    values = {
        "cert": pki.server.cert,
        "key": pki.server.key,
        "ca": pki.ca.cert,
        "client_key": pki.client.key,
        "dir": tmp_path,
    }
    path = write(tmp_path / "web.yml", text.format(**values))
    with pytest.raises(WebConfigError) as err:
        load_web_config(path)
    assert err.value.detail == message.format(**values)
    assert err.value.path == path
    assert "\n" not in str(err.value)
    assert HASH not in str(err.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError) as err:
        load_web_config(tmp_path / "absent.yml")
    assert err.value.detail == "cannot read: No such file or directory"
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(WebConfigError) as err:
        load_web_config(binary)
    assert err.value.detail == "not UTF-8 text"


def test_accepted_toolkit_settings(tmp_path: Path, pki: Pki) -> None:
    """Settings we map rather than reject load and produce the documented context."""
    text = tls_yaml(
        pki,
        "  client_auth_type: RequestClientCert\n"
        "  min_version: TLS12\n"
        "  max_version: TLS12\n"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
        "  prefer_server_cipher_suites: false\n"
        "  curve_preferences: [CurveP256]\n",
    )
    ctx = load_web_config(write(tmp_path / "web.yml", text)).tls_server_config.context
    assert ctx is not None
    # RequestClientCert: Go asks and never checks, so not asking grants the same access.
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_2
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"]
    assert tls12 == ["ECDHE-ECDSA-AES128-GCM-SHA256"]


def test_parse_basic_auth() -> None:
    assert parse_basic_auth("Basic " + base64.b64encode(b"u:p:q").decode()) == (b"u", b"p:q")
    assert parse_basic_auth("basic " + base64.b64encode(b":").decode()) == (b"", b"")
    assert parse_basic_auth(None) is None
    assert parse_basic_auth("Bearer abc") is None
    assert parse_basic_auth("Basic") is None
    assert parse_basic_auth("Basic !!!") is None
    assert parse_basic_auth("Basic " + base64.b64encode(b"nocolon").decode()) is None
    assert parse_basic_auth("Basic \xff\xfe") is None


# --- basic auth, headers, rate limit over HTTP ----------------------------------------------


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    return write(
        tmp_path / "web.yml",
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        f"basic_auth_users:\n  alice: {hash_password('s3cret')}\n"
        f"  jöhn: {hash_password('pässwörd')}\n",
    )


@pytest.mark.anyio
async def test_basic_auth(auth_file: Path) -> None:
    source = watch(auth_file)
    async with running(source) as (url, _):
        good = await get(url, headers=basic("alice", "s3cret"))
        metrics = await get(url, "/metrics", headers=basic("alice", "s3cret"))
        utf8 = await get(url, headers=basic("jöhn", "pässwörd"))
        wrong = await get(url, headers=basic("alice", "S3cret"))
        unknown = await get(url, headers=basic("mallory", "s3cret"))
        missing = await get(url)
        malformed = [
            await get(url, headers={"Authorization": value})
            for value in (
                "Basic",
                "Basic not-base64!",
                "Bearer " + base64.b64encode(b"alice:s3cret").decode(),
                "Basic " + base64.b64encode(b"alice").decode(),
                "Basic " + base64.b64encode("jöhn:pässwörd".encode("latin-1")).decode(),
            )
        ]
        async with httpx.AsyncClient() as client:  # raw non-ASCII bytes in the header
            raw = await client.get(url + "/healthz", headers={b"Authorization": b"Basic \xc3\xa9"})
    assert good.status_code == 200
    assert metrics.status_code == 200
    assert utf8.status_code == 200
    refused = [wrong, unknown, missing, raw, *malformed]
    assert [r.status_code for r in refused] == [401] * len(refused)
    for response in refused:
        assert response.headers["www-authenticate"] == "Basic"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.text == "Unauthorized\n"
    assert good.headers["x-content-type-options"] == "nosniff"


@pytest.mark.anyio
async def test_every_endpoint_requires_auth(auth_file: Path) -> None:
    # The toolkit wraps the whole handler: health endpoints are no exception.
    async with running(watch(auth_file)) as (url, _):
        for path in ("/", "/metrics", "/healthz", "/readyz", "/api/runs", "/nope"):
            assert (await get(url, path)).status_code == 401, path


@pytest.mark.anyio
async def test_bcrypt_runs_once_per_credential(auth_file: Path) -> None:
    authenticator = BasicAuthenticator()
    source = watch(auth_file)
    app = create_app(
        registry=CollectorRegistry(),
        runs=_NoRuns(),
        readiness=lambda: Readiness.of(store=DependencyStatus(True)),
        reload=None,
        web_config=source,
        probe_names=("basic",),
        version="test",
        authenticator=authenticator,
    )
    assert app.state.authenticator is authenticator
    async with serve(app, host="127.0.0.1", port=0) as address:
        url = address.url
        for _ in range(3):
            assert (await get(url, headers=basic("alice", "s3cret"))).status_code == 200
        assert authenticator.verifications == 1
        # Failures are not cached: each costs a verification (an attacker gains no shortcut).
        for _ in range(2):
            assert (await get(url, headers=basic("alice", "nope"))).status_code == 401
        assert authenticator.verifications == 3
        # An unknown user is verified against a dummy hash: same cost as a wrong password.
        assert (await get(url, headers=basic("mallory", "s3cret"))).status_code == 401
        assert authenticator.verifications == 4
        # Missing or malformed credentials name no user: nothing to verify.
        assert (await get(url)).status_code == 401
        assert authenticator.verifications == 4
        assert (await get(url, headers=basic("alice", "s3cret"))).status_code == 200
        assert authenticator.verifications == 4


@pytest.mark.anyio
async def test_unknown_user_costs_like_the_configured_hashes() -> None:
    authenticator = BasicAuthenticator()
    users = {"alice": hash_password("x", cost=5)}
    assert not await authenticator.check(users, basic("bob", "x")["Authorization"])
    assert authenticator.verifications == 1
    # The dummy it verified against has the users' cost, not the toolkit's fixed 10.
    assert await authenticator.check(users, basic("alice", "x")["Authorization"])


@pytest.mark.anyio
async def test_overlong_password_is_refused_not_an_error(auth_file: Path) -> None:
    async with running(watch(auth_file)) as (url, _):
        response = await get(url, headers=basic("alice", "s3cret" + "x" * 100))
    assert response.status_code == 401


@pytest.mark.anyio
async def test_rate_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "web.yml", "rate_limit:\n  interval: 1h\n  burst: 2\n")
    async with running(watch(path)) as (url, _):
        statuses = [(await get(url)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


# --- TLS ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_tls(tmp_path: Path, pki: Pki) -> None:
    source = watch(write(tmp_path / "web.yml", tls_yaml(pki)))
    async with running(source) as (url, _):
        assert url.startswith("https://127.0.0.1:")
        response = await get(url, "/metrics", verify=pki.client_context())
        assert response.status_code == 200
        with pytest.raises(httpx.ConnectError):  # a client that does not trust our CA
            await get(url, verify=ssl.create_default_context())
        with pytest.raises(httpx.TransportError):  # plain HTTP to a TLS port
            await get(url.replace("https://", "http://"))


@pytest.mark.anyio
async def test_tls_version_limits(tmp_path: Path, pki: Pki) -> None:
    text = tls_yaml(pki, "  max_version: TLS12\n  curve_preferences: [CurveP384]\n")
    async with running(watch(write(tmp_path / "web.yml", text))) as (url, _):
        async with (
            httpx.AsyncClient(verify=pki.client_context()) as client,
            client.stream("GET", url + "/healthz") as response,
        ):
            stream = response.extensions["network_stream"]
            assert stream.get_extra_info("ssl_object").version() == "TLSv1.2"
        only13 = pki.client_context()
        only13.minimum_version = ssl.TLSVersion.TLSv1_3
        with pytest.raises(httpx.ConnectError):
            await get(url, verify=only13)


@pytest.mark.anyio
async def test_mtls_require_and_verify(tmp_path: Path, pki: Pki, pki2: Pki) -> None:
    text = tls_yaml(
        pki,
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca.cert}\n",
    )
    async with running(watch(write(tmp_path / "web.yml", text))) as (url, _):
        ok = await get(url, verify=pki.client_context(pki.client))
        assert ok.status_code == 200
        with pytest.raises(httpx.TransportError):  # no client certificate
            await get(url, verify=pki.client_context())
        foreign = pki.client_context()
        foreign.load_cert_chain(str(pki2.client.cert), str(pki2.client.key))
        with pytest.raises(httpx.TransportError):  # a certificate from another CA
            await get(url, verify=foreign)


@pytest.mark.anyio
async def test_mtls_verify_if_given(tmp_path: Path, pki: Pki, pki2: Pki) -> None:
    text = tls_yaml(
        pki, f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {pki.ca.cert}\n"
    )
    async with running(watch(write(tmp_path / "web.yml", text))) as (url, _):
        assert (await get(url, verify=pki.client_context())).status_code == 200
        assert (await get(url, verify=pki.client_context(pki.client))).status_code == 200
        foreign = pki.client_context()
        foreign.load_cert_chain(str(pki2.client.cert), str(pki2.client.key))
        with pytest.raises(httpx.TransportError):
            await get(url, verify=foreign)


@pytest.mark.anyio
async def test_mtls_client_allowed_sans(tmp_path: Path, pki: Pki) -> None:
    text = tls_yaml(
        pki,
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {pki.ca.cert}\n"
        "  client_allowed_sans: [ops@example.com]\n",
    )
    async with running(watch(write(tmp_path / "web.yml", text))) as (url, _):
        assert (await get(url, verify=pki.client_context(pki.client))).status_code == 200
        with pytest.raises(httpx.TransportError):  # valid certificate, SAN not listed
            await get(url, verify=pki.client_context(pki.other_client))


def test_ip_sans_compare_like_go() -> None:
    from exporter.webconfig.tls import _peer_has_allowed_san

    cert = {"subjectAltName": (("IP Address", "2001:DB8:0:0:0:0:0:1\n"), ("DNS", "a.example"))}
    assert _peer_has_allowed_san(cert, frozenset({"2001:db8::1"}))
    assert _peer_has_allowed_san(cert, frozenset({"a.example"}))
    assert not _peer_has_allowed_san(cert, frozenset({"b.example"}))
    assert not _peer_has_allowed_san({}, frozenset({"a.example"}))
    assert not _peer_has_allowed_san(None, frozenset({"a.example"}))


# --- changes without restart ----------------------------------------------------------------


@pytest.mark.anyio
async def test_credentials_and_headers_follow_the_file(auth_file: Path) -> None:
    source = watch(auth_file, check_interval=0)
    async with running(source) as (url, _):
        assert (await get(url, headers=basic("alice", "s3cret"))).status_code == 200
        rewrite(
            auth_file,
            "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
            f"basic_auth_users:\n  alice: {hash_password('n3w')}\n",
        )
        old = await get(url, headers=basic("alice", "s3cret"))
        new = await get(url, headers=basic("alice", "n3w"))
    assert old.status_code == 401  # the cached success of the old hash does not survive
    assert new.status_code == 200
    assert new.headers["x-frame-options"] == "deny"
    assert "x-content-type-options" not in new.headers
    assert source.generation == 1


@pytest.mark.anyio
async def test_an_invalid_edit_fails_closed_until_fixed(auth_file: Path) -> None:
    source = watch(auth_file, check_interval=0)
    good = read(auth_file)
    async with running(source) as (url, _):
        rewrite(auth_file, "basic_auth_users:\n  alice: plaintext\n")
        broken = await get(url, headers=basic("alice", "s3cret"))
        with pytest.raises(WebConfigError) as err:
            source.current()
        assert err.value.detail == (
            "basic_auth_users.alice: not a bcrypt hash "
            "(generate one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')"
        )
        rewrite(auth_file, good)
        fixed = await get(url, headers=basic("alice", "s3cret"))
    assert broken.status_code == 500
    assert broken.text == "Internal Server Error\n"
    assert "bcrypt" not in broken.text
    assert fixed.status_code == 200
    assert source.current().basic_auth_users


@pytest.mark.anyio
async def test_adding_tls_while_running_fails_closed(tmp_path: Path, pki: Pki) -> None:
    path = write(tmp_path / "web.yml", "")
    source = watch(path, check_interval=0)
    async with running(source) as (url, _):
        assert (await get(url)).status_code == 200
        rewrite(path, tls_yaml(pki))
        assert (await get(url)).status_code == 500
        with pytest.raises(WebConfigError) as err:
            source.reload()
    assert err.value.detail == (
        "tls_server_config: added while running; restart the exporter to switch between "
        "HTTP and HTTPS"
    )


@pytest.mark.anyio
async def test_rotated_certificate_is_served_to_new_connections(
    tmp_path: Path, pki: Pki, pki2: Pki
) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    path = write(
        tmp_path / "web.yml", f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    )
    source = watch(path, check_interval=0)
    async with running(source) as (url, _):
        assert (await get(url, verify=pki.client_context())).status_code == 200
        # Rotate: same paths, new certificate and key from the other CA; no restart.
        rewrite(cert, read(pki2.server.cert))
        rewrite(key, read(pki2.server.key))
        assert (await get(url, verify=pki2.client_context())).status_code == 200
        with pytest.raises(httpx.ConnectError):
            await get(url, verify=pki.client_context())
        # A broken rotation refuses handshakes rather than serving something stale.
        rewrite(key, "garbage")
        with pytest.raises(httpx.TransportError):
            await get(url, verify=pki2.client_context())
        rewrite(key, read(pki2.server.key))
        assert (await get(url, verify=pki2.client_context())).status_code == 200


@pytest.mark.anyio
async def test_client_ca_change_applies_to_new_connections(
    tmp_path: Path, pki: Pki, pki2: Pki
) -> None:
    ca = tmp_path / "clients.crt"
    ca.write_bytes(pki.ca.cert.read_bytes())
    text = tls_yaml(
        pki, f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca}\n"
    )
    source = watch(write(tmp_path / "web.yml", text), check_interval=0)
    async with running(source) as (url, _):
        assert (await get(url, verify=pki.client_context(pki.client))).status_code == 200
        rewrite(ca, read(pki2.ca.cert))  # revoke trust in the first CA
        with pytest.raises(httpx.TransportError):
            await get(url, verify=pki.client_context(pki.client))
        second = pki.client_context()
        second.load_cert_chain(str(pki2.client.cert), str(pki2.client.key))
        assert (await get(url, verify=second)).status_code == 200


def test_changes_are_checked_at_most_once_per_interval(auth_file: Path) -> None:
    now = [0.0]
    source = watch(auth_file, check_interval=1.0, monotonic=lambda: now[0])
    rewrite(auth_file, "basic_auth_users:\n")
    assert source.current().basic_auth_users  # not re-read yet
    now[0] = 0.5
    assert source.current().basic_auth_users
    now[0] = 1.0
    assert not source.current().basic_auth_users
    assert source.generation == 1


def test_a_fixed_config_is_never_reread(auth_file: Path) -> None:
    source = WebConfigSource(load_web_config(auth_file), watch=False, check_interval=0)
    rewrite(auth_file, "basic_auth_users:\n")
    assert source.current().basic_auth_users
