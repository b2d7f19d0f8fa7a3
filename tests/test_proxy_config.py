"""``[[proxies]]``: defaults, every field, and one fixture per invalid rule with its message."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.config import ConfigError, load_config
from exporter.config.check import summarize
from exporter.results import ModelPrice

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "proxies"

# One entry per tests/fixtures/proxies/invalid-<rule>.toml: the exact one-line message.
INVALID: dict[str, str] = {
    "duplicate-name": 'proxies[1].name: duplicate proxy name "sim"',
    "listen-taken": 'proxies[0].listen: address "127.0.0.1:9819" is already used by server.listen',
    "listen": (
        'proxies[0].listen: invalid listen address "localhost" '
        "(expected host:port, e.g. 127.0.0.1:9819, [::1]:9819 or :9819)"
    ),
    "upstream-missing": (
        'proxies[0].upstream: required for type "openai" '
        "(the API base URL, e.g. https://api.openai.com/v1)"
    ),
    "upstream-credentials": "proxies[0].upstream: must not contain credentials; use api_key_env",
    "upstream-query": "proxies[0].upstream: must not have a query string or fragment",
    "provider-type": (
        'proxies[0].type: "anthropic" differs from the type of provider "sim" ("openai") '
        "whose labels it shares"
    ),
    "name": (
        'proxies[0].name: invalid proxy name "Sim Proxy" (use lower-case letters, digits, '
        '"_" and "-", starting with a letter or digit, at most 64 characters)'
    ),
    "type": "proxies[0].type: must be one of 'openai', 'venice' or 'anthropic'",
    "max-request-bytes": "proxies[0].max_request_bytes: must be >= 1024",
    "read-timeout": "proxies[0].read_timeout: must be positive",
    # A proxy forwards each client's own key; it never holds one.
    "api-key": "proxies[0].api_key_env: unknown key",
    "price": 'proxies[0].prices."sim-*".input: must be >= 0',
}


def test_every_invalid_fixture_has_an_expected_message() -> None:
    on_disk = {p.name[len("invalid-") : -len(".toml")] for p in FIXTURES.glob("invalid-*.toml")}
    assert on_disk == set(INVALID)


@pytest.mark.parametrize("rule", sorted(INVALID))
def test_invalid_fixture_gives_exact_message(rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(FIXTURES / f"invalid-{rule}.toml", env={})
    assert str(caught.value) == INVALID[rule]


def test_defaults_and_every_field() -> None:
    config = load_config(FIXTURES / "valid-proxies.toml", env={})
    shared, claude = config.proxies
    assert shared.name == shared.provider == "sim"
    assert (shared.host, shared.port) == ("127.0.0.1", 9820)
    assert shared.upstream == "http://127.0.0.1:8089"
    assert (shared.max_models, shared.prefix_memory, shared.min_cacheable_tokens) == (30, 512, None)
    assert (shared.max_request_bytes, shared.max_response_bytes) == (32 << 20, 256 << 20)
    assert (shared.max_concurrent, shared.connect_timeout, shared.read_timeout) == (1024, 10, 600)
    assert shared.price_for("sim-cache-ok") is None  # its own table is empty
    assert claude.upstream == "https://api.anthropic.com"  # the Anthropic SDK's base URL
    assert claude.provider == "claude"
    assert (claude.max_models, claude.prefix_memory, claude.min_cacheable_tokens) == (10, 64, 1024)
    assert (claude.max_request_bytes, claude.max_response_bytes) == (1 << 20, 8 << 20)
    assert (claude.max_concurrent, claude.connect_timeout, claude.read_timeout) == (64, 2, 90)
    assert claude.price_for("claude-sonnet-4") == ModelPrice(3.0, 15.0, 0.3, 3.75)


def test_a_proxy_listens_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        (FIXTURES / "valid-proxies.toml")
        .read_text()
        .split("# Traffic only")[0]
        .replace('listen = "127.0.0.1:9820"\n', "")
    )
    (proxy,) = load_config(path, env={}).proxies
    assert proxy.listen == "127.0.0.1:9820"


def test_proxies_from_the_environment_as_json() -> None:
    env = {
        "PCE_PROXIES": '[{"name": "px", "type": "venice", "listen": "127.0.0.1:0"}]',
    }
    (proxy,) = load_config(FIXTURES / "valid-proxies.toml", env=env).proxies
    assert (proxy.name, proxy.upstream) == ("px", "https://api.venice.ai/api/v1")


def test_check_config_lists_the_proxies() -> None:
    config = load_config(FIXTURES / "valid-proxies.toml", env={})
    text = summarize(config, env={})
    assert (
        "proxy sim (openai): 127.0.0.1:9820 -> http://127.0.0.1:8089, labels provider sim" in text
    )
    assert "proxy claude (anthropic): 127.0.0.1:9821 -> https://api.anthropic.com," in text
