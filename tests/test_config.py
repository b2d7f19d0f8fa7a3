"""Configuration: loading, defaults, environment overrides, and one fixture per invalid rule."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydantic import ValidationError

from exporter.assembly import probe_settings
from exporter.config import (
    PROBE_NAMES,
    Config,
    ConfigError,
    ProviderConfig,
    check_config,
    check_config_command,
    config_fingerprint,
    load_config,
)
from exporter.durations import format_duration, parse_duration
from exporter.results import ModelPrice

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "config"
MINIMAL = FIXTURES / "valid-minimal.toml"
FULL = FIXTURES / "valid-full.toml"
KEY = "sk-test-THIS-MUST-NEVER-BE-PRINTED-4242"

# One entry per tests/fixtures/config/invalid-<rule>.toml: the exact one-line message.
# "{path}" stands for the fixture's path as passed to load_config.
INVALID: dict[str, str] = {
    "unknown-key-top": "colour: unknown key",
    "unknown-key-nested": 'http.timeuot: unknown key (did you mean "timeout"?)',
    "api-key-in-file": (
        "providers[0].api_key: unknown key (API keys are never read from the config file: "
        "set api_key_env to the name of the environment variable that holds the key)"
    ),
    "duration": (
        'probes.basic.interval: invalid duration "5 minutes" '
        '(expected e.g. "500ms", "30s", "5m", "1h30m" or a number of seconds)'
    ),
    "zero-duration": "scheduler.cooldown: must be positive",
    "negative-duration": "http.timeout: must not be negative",
    "retention": "storage.retention_days: must be >= 1",
    "attempts": "http.attempts: must be <= 10",
    "backoff-max": "http.backoff_max: must be >= backoff (10s)",
    "probe-timeout": "probes.basic.timeout: must be shorter than the interval (5m)",
    "ttl-not-increasing": "probes.ttl.delays: must be strictly increasing (5s follows 10s)",
    "ttl-too-long": (
        "probes.ttl.delays: the longest delay (1m) does not fit in the probe timeout (1m); "
        "a run takes about the longest delay plus its requests"
    ),
    "persistence-requests": "probes.persistence.requests: must be >= 2",
    "prompt-size": "probes.prompt_sizes.sizes.small: must be > 0",
    "duplicate-provider": 'providers[1].name: duplicate provider name "sim"',
    "provider-name": (
        'providers[0].name: invalid provider name "Sim One" (use lower-case letters, digits, '
        '"_" and "-", starting with a letter or digit, at most 64 characters)'
    ),
    "provider-type": (
        'providers[0].type: unknown provider type "gemini" '
        "(expected one of: openai, venice, anthropic)"
    ),
    "provider-type-missing": (
        "providers[0].type: required key is missing (expected one of: openai, venice, anthropic)"
    ),
    "base-url": "providers[0].base_url: must be an http:// or https:// URL with a host",
    "base-url-missing": (
        'providers[0].base_url: required for type "openai" '
        "(the API base URL, e.g. https://api.openai.com/v1)"
    ),
    "base-url-credentials": "providers[0].base_url: must not contain credentials; use api_key_env",
    "api-key-env": (
        "providers[0].api_key_env: must be the name of an environment variable (upper-case "
        "letters, digits and _, such as VENICE_API_KEY), not the key itself"
    ),
    "cooldown-after": "scheduler.cooldown_after: must be >= failure_warn_after (5)",
    "outage-after": "scheduler.outage_after: must be <= cooldown_after (5), or 0 (off)",
    "max-models": "providers[0].max_models: must be <= 1000",
    "concurrency": "providers[0].concurrency: must be >= 1",
    "max-tokens-type": "providers[0].max_tokens: must be an integer",
    "provider-probe": (
        'providers[0].probes: unknown probe "latency" '
        "(expected one of: basic, prompt_sizes, partial, persistence, ttl)"
    ),
    "secret-header": (
        'providers[0].headers: header "Authorization" looks like a credential; keys come only '
        "from the environment variable named by api_key_env"
    ),
    "header-value": 'providers[0].headers: value of header "X-Title" contains a line break',
    "listen": (
        'server.listen: invalid listen address "localhost" '
        "(expected host:port, e.g. 127.0.0.1:9819, [::1]:9819 or :9819)"
    ),
    "web-config-file": (
        'server.web_config_file: file not found: "/nonexistent/prompt-cache-exporter/'
        'web-config.yml"'
    ),
    "price": 'providers[0].prices."sim-cache-*".input: must be >= 0',
    "price-missing": 'providers[0].prices."sim-*".output: required key is missing',
    "log-level": 'log_level: must be one of debug, info, warning, error (got "verbose")',
    "toml": "{path}:3:8: invalid TOML: Expected '=' after a key in a key/value pair",
    "no-providers": "providers: no providers configured (add at least one [[providers]] table)",
    "currency": (
        'providers[0].balance_currency: invalid currency "US Dollar" '
        "(lower-case letters, e.g. usd or diem)"
    ),
    "budget": "providers[0].budget.daily_tokens: must be >= 0",
    "usd-budget-unpriced": (
        "providers[0].budget.daily_usd: cannot be enforced without a price for model "
        '"sim-cache-broken": add [providers.prices."sim-cache-broken"] with input and output '
        "in USD per million tokens (the openai models endpoint at this base URL publishes no "
        "prices)"
    ),
    "usd-budget-discovered": (
        "providers[0].budget.monthly_usd: cannot be enforced without prices: models are "
        "discovered and the anthropic models endpoint at this base URL publishes no prices; "
        'add [providers.prices."*"] (or one pattern per model family)'
    ),
}


def test_every_invalid_fixture_has_an_expected_message():
    on_disk = {p.name[len("invalid-") : -len(".toml")] for p in FIXTURES.glob("invalid-*.toml")}
    assert on_disk == set(INVALID)


@pytest.mark.parametrize("rule", sorted(INVALID))
def test_invalid_fixture_gives_exact_message(rule: str):
    path = FIXTURES / f"invalid-{rule}.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    message = str(caught.value)
    assert message == INVALID[rule].format(path=path)
    assert "\n" not in message


def test_secret_looking_values_in_the_file_are_not_echoed():
    for rule in ("api-key-in-file", "base-url-credentials", "api-key-env", "secret-header"):
        with pytest.raises(ConfigError) as caught:
            load_config(FIXTURES / f"invalid-{rule}.toml", env={})
        for secret in ("sk-do-not-put-keys-here", "hunter2", "vk-0123456789abcdef", "Bearer"):
            assert secret not in str(caught.value)


def test_file_not_found(tmp_path: Path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"^config file not found: .*nope\.toml$"):
        load_config(missing, env={})


def test_path_from_pce_config_file_and_missing_path():
    config = load_config(None, env={"PCE_CONFIG_FILE": str(MINIMAL)})
    assert config.providers[0].name == "venice"
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={})
    assert str(caught.value) == ("no config file given: use --config FILE or set PCE_CONFIG_FILE")


def test_invalid_utf8(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'log_level = "info"\nname = "\xff"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"{path}:2: invalid TOML: not valid UTF-8"


def test_several_problems_are_joined_on_one_line(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(
        "[http]\nattempts = 0\n[storage]\nretention_days = 0\n"
        '[[providers]]\nname = "v"\ntype = "venice"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == (
        "storage.retention_days: must be >= 1; http.attempts: must be >= 1"
    )


# -- valid files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [ROOT / "examples" / "demo.toml", ROOT / "examples" / "venice.toml", FULL, MINIMAL],
    ids=lambda p: p.name,
)
def test_valid_files_load(path: Path):
    config = load_config(path, env={})
    assert config.providers
    code, text = check_config(path, env={})
    assert code == 0, text


def test_demo_targets_the_simulator():
    config = load_config(ROOT / "examples" / "demo.toml", env={})
    (sim,) = config.providers
    assert sim.base_url == "http://127.0.0.1:8089/v1"
    assert sim.type == "venice"  # the simulator answers like Venice (balances, prices)
    assert config.probes.basic.interval <= 60


def test_defaults():
    config = load_config(MINIMAL, env={})
    assert config.log_level == "info"
    assert config.server.listen == "127.0.0.1:9819"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9819)
    assert config.server.web_config_file is None
    assert config.storage.path == Path("data/prompt-cache-exporter.db")
    assert config.storage.retention_days == 30
    http = config.http
    assert (http.timeout, http.attempts, http.backoff, http.backoff_max) == (30, 3, 2, 8)
    assert (http.max_retry_after, http.max_body_bytes) == (60, 4 * 1024 * 1024)
    s = config.scheduler
    assert (s.failure_warn_after, s.cooldown_after, s.reset_after_successes) == (3, 5, 2)
    assert (s.cooldown, s.reliability_window, s.cleanup_interval) == (900, 86400, 86400)
    assert s.shutdown_grace == 10
    assert (s.outage_after, s.outage_retry) == (3, 300)
    intervals = {name: config.probes.get(name).interval for name in PROBE_NAMES}
    # The cheap default schedule (docs/configuration.md "What probing costs").
    assert intervals == {
        "basic": 600,
        "prompt_sizes": 12 * 3600,
        "partial": 2 * 3600,
        "persistence": 6 * 3600,
        "ttl": 6 * 3600,
    }
    assert config.probes.basic.timeout == 120
    assert dict(config.probes.prompt_sizes.sizes) == {
        "small": 1100,
        "medium": 2000,
        "large": 4000,
        "xlarge": 8000,
    }
    assert config.probes.persistence.requests == 10
    assert config.probes.ttl.delays == (1.0, 5.0, 10.0, 30.0)

    (venice,) = config.providers
    assert venice.base_url == "https://api.venice.ai/api/v1"
    assert venice.api_key_env == "VENICE_API_KEY"
    assert venice.balance_currency == "diem"
    assert venice.balance_stop_threshold == 0.001
    assert venice.balance_check_interval == 600
    assert (venice.models, venice.include, venice.exclude) == ((), ("*",), ())
    assert (venice.max_models, venice.concurrency, venice.isolation_delay) == (200, 1, 5)
    assert (venice.rate_limit, venice.max_tokens, venice.stream) == (0, 8, True)
    assert venice.min_cacheable_tokens is None
    assert venice.warmup_repeats is None
    assert venice.probes is None
    assert dict(venice.headers) == {}
    assert dict(venice.prices) == {}
    assert venice.budget.limits() == {}
    assert config.probes.enabled_for(venice) == PROBE_NAMES


def test_type_defaults(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[[providers]]\nname = "a"\ntype = "anthropic"\n'
        '[[providers]]\nname = "o"\ntype = "openai"\nbase_url = "https://api.openai.com/v1"\n'
    )
    anthropic, openai = load_config(path, env={}).providers
    assert anthropic.base_url == "https://api.anthropic.com/v1"
    assert anthropic.api_key_env == "ANTHROPIC_API_KEY"
    assert anthropic.balance_currency == "usd"
    assert openai.api_key_env == "OPENAI_API_KEY"


def test_full_fixture_values():
    config = load_config(FULL, env={})
    assert config.log_level == "debug"
    assert (config.server.host, config.server.port) == ("::1", 19819)
    assert config.http.backoff == 0.5
    assert config.http.max_body_bytes == 1_048_576
    assert config.probes.basic.timeout == 90
    assert list(config.probes.prompt_sizes.sizes) == ["tiny", "small", "huge"]
    assert config.probes.ttl.delays == (1.0, 30.0, 120.0, 300.0, 900.0)
    sim = config.provider("sim")
    assert sim.base_url == "http://127.0.0.1:8089/v1"  # trailing slash dropped
    assert sim.models == ("sim-cache-ok", "sim-cache-broken")
    assert sim.rate_limit == 120
    assert sim.min_cacheable_tokens == 512
    # The runtime's probe settings carry the provider's fixed baseline; others learn theirs.
    assert probe_settings(config.probes, sim).hit_threshold_tokens == 96
    assert probe_settings(config.probes).hit_threshold_tokens is None
    assert dict(sim.headers) == {
        "HTTP-Referer": "https://example.com",
        "X-Title": "prompt-cache-exporter",
    }
    assert sim.budget.limits() == {
        ("day", "tokens"): 2_000_000,
        ("month", "tokens"): 30_000_000,
        ("day", "usd"): 1.5,
        ("month", "usd"): 20,
    }
    # partial is disabled globally, so a provider listing it does not get it.
    assert config.probes.enabled() == ("basic", "prompt_sizes", "persistence", "ttl")
    assert config.probes.enabled_for(sim) == ("basic", "ttl")
    assert config.provider("claude").api_key({"ANTHROPIC_API_KEY": KEY}) is None
    with pytest.raises(KeyError):
        config.provider("nope")


def test_price_for_first_match_in_document_order():
    sim = load_config(FULL, env={}).provider("sim")
    assert sim.price_for("sim-cache-ok") == ModelPrice(3.0, 15.0, 0.3, 3.75)
    assert sim.price_for("sim-cache-broken") == ModelPrice(1.0, 2.0, None, None)
    assert sim.price_for("other") is None
    assert len(sim.price_table_version) == 12


def test_config_is_immutable():
    config = load_config(FULL, env={})
    with pytest.raises(ValidationError):
        config.log_level = "error"
    with pytest.raises(ValidationError):
        config.providers[0].name = "x"
    with pytest.raises(TypeError):
        config.providers[0].headers["X-New"] = "1"  # type: ignore[index]
    with pytest.raises(TypeError):
        config.probes.prompt_sizes.sizes["x"] = 1  # type: ignore[index]


def test_constructing_config_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PCE_LOG_LEVEL", "error")
    config = Config(providers=(ProviderConfig.model_validate({"name": "v", "type": "venice"}),))
    assert config.log_level == "info"


# -- environment -------------------------------------------------------------------------------


def test_env_overrides_the_file():
    env = {
        "PCE_LOG_LEVEL": "DEBUG",
        "PCE_SERVER__LISTEN": "0.0.0.0:0",
        "pce_storage__path": "/tmp/x.db",
        "PCE_PROBES__BASIC__INTERVAL": "3m",
        "PCE_PROBES__TTL__DELAYS": '["1s", "2s"]',
        "PCE_HTTP__ATTEMPTS": "5",
        "PCE_PROBES__PARTIAL__ENABLED": "false",
    }
    config = load_config(FULL, env=env)
    assert config.log_level == "debug"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 0)
    assert config.storage.path == Path("/tmp/x.db")
    assert config.storage.retention_days == 14  # rest of the table still from the file
    assert config.http.attempts == 5
    assert config.probes.ttl.delays == (1.0, 2.0)
    assert (config.probes.basic.interval, config.probes.basic.timeout) == (180, 90)
    assert config.probes.enabled_for(config.provider("sim")) == ("basic", "ttl")
    overrides = {"PCE_PROBES__BASIC__INTERVAL": "1m", "PCE_PROBES__BASIC__TIMEOUT": "90s"}
    with pytest.raises(ConfigError) as caught:
        load_config(MINIMAL, env=overrides)
    assert str(caught.value) == (
        "probes.basic.timeout: must be shorter than the interval (1m) "
        "(from environment variable PCE_PROBES__BASIC__TIMEOUT)"
    )


def test_shorter_interval_shortens_the_default_timeout():
    config = load_config(MINIMAL, env={"PCE_PROBES__BASIC__INTERVAL": "30s"})
    assert config.probes.basic.timeout == 24  # 80 % of the interval, below the 2m default
    config = load_config(MINIMAL, env={"PCE_PROBES__TTL__INTERVAL": "1h"})
    assert config.probes.ttl.timeout == 900  # default kept when it fits


def test_env_providers_as_json():
    env = {"PCE_PROVIDERS": '[{"name": "local", "type": "openai", "base_url": "http://x:1/v1"}]'}
    config = load_config(MINIMAL, env=env)
    assert [p.name for p in config.providers] == ["local"]


def test_env_values_are_shown_unless_they_may_be_secrets():
    # A listen address, a log level or a duration is no secret: the message shows it.
    shown = {
        "PCE_SERVER__LISTEN": (
            "127.0.0.1:99999",
            'server.listen: invalid listen address "127.0.0.1:99999" (expected host:port, '
            "e.g. 127.0.0.1:9819, [::1]:9819 or :9819) "
            "(from environment variable PCE_SERVER__LISTEN)",
        ),
        "PCE_LOG_LEVEL": (
            "verbose",
            'log_level: must be one of debug, info, warning, error (got "verbose") '
            "(from environment variable PCE_LOG_LEVEL)",
        ),
        "PCE_PROBES__BASIC__INTERVAL": (
            "5 minutes",
            'probes.basic.interval: invalid duration "5 minutes" (expected e.g. "500ms", '
            '"30s", "5m", "1h30m" or a number of seconds) '
            "(from environment variable PCE_PROBES__BASIC__INTERVAL)",
        ),
        "PCE_SERVER__NOPE": (
            "1",
            "server.nope: unknown key (from environment variable PCE_SERVER__NOPE)",
        ),
    }
    for name, (value, expected) in shown.items():
        with pytest.raises(ConfigError) as caught:
            load_config(MINIMAL, env={name: value})
        assert str(caught.value) == expected


def test_env_values_that_may_be_secrets_stay_masked():
    listen = (
        'server.listen: invalid listen address "***" (expected host:port, e.g. '
        "127.0.0.1:9819, [::1]:9819 or :9819) (from environment variable PCE_SERVER__LISTEN)"
    )
    cases = [
        # Shaped like a key, wherever it was pasted.
        ({"PCE_SERVER__LISTEN": KEY}, listen),
        # The value of a variable named like a secret, even when it looks harmless.
        ({"PCE_SERVER__LISTEN": "hunter22", "SIM_API_KEY": "hunter22"}, listen),
        ({"PCE_SERVER__LISTEN": "hunter22:99999", "MY_TOKEN": "hunter22"}, listen),
        # Provider tables carry URLs and headers: nothing from them is repeated.
        (
            {"PCE_PROVIDERS": '[{"name": "a", "type": "openai", "base_url": "x://y"}]'},
            "providers[0].base_url: must be an http:// or https:// URL with a host "
            "(from environment variable PCE_PROVIDERS)",
        ),
        (
            {"PCE_PROVIDERS": '[{"name": "a", "type": "venice", "probes": ["p-1"]}]'},
            'providers[0].probes: unknown probe "***" (expected one of: basic, prompt_sizes, '
            "partial, persistence, ttl) (from environment variable PCE_PROVIDERS)",
        ),
        (
            {"PCE_PROVIDERS": "[not json"},
            "providers: invalid JSON in environment variable PCE_PROVIDERS "
            "(list and table values must be JSON)",
        ),
    ]
    for env, expected in cases:
        with pytest.raises(ConfigError) as caught:
            load_config(MINIMAL, env=env)
        assert str(caught.value) == expected
        assert KEY not in str(caught.value)
        assert "hunter22" not in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[servr]\nlisten = ":1"\n', 'servr: unknown key (did you mean "server"?)'),
        (
            "[providers.budget]\ndaly_tokens = 1\n",
            'providers[0].budget.daly_tokens: unknown key (did you mean "daily_tokens"?)',
        ),
        (
            '[providers.prices."m-*"]\ninput = 1\noutput = 1\ncache_reed = 1\n',
            'providers[0].prices."m-*".cache_reed: unknown key (did you mean "cache_read"?)',
        ),
        (
            '[probes.ttl]\ndelay = ["1s"]\n',
            'probes.ttl.delay: unknown key (did you mean "delays"?)',
        ),
        ('colour = "red"\n', "colour: unknown key"),
    ],
)
def test_unknown_keys_suggest_the_closest_known_key(tmp_path: Path, toml: str, expected: str):
    provider = '[[providers]]\nname = "sim"\ntype = "openai"\nbase_url = "http://127.0.0.1:1/v1"\n'
    path = tmp_path / "config.toml"
    # Provider sub-tables must follow their [[providers]] header.
    text = provider + toml if toml.startswith("[providers.") else toml + provider
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == expected


def test_ttl_delays_need_only_the_longest_to_fit_the_timeout(tmp_path: Path):
    # 1m + 5m + 10m = 16m: more than the 15m timeout, yet a run takes about 10m.
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL.read_text() + '\n[probes.ttl]\ndelays = ["1m", "5m", "10m"]\n')
    config = load_config(path, env={})
    assert config.probes.ttl.delays == (60.0, 300.0, 600.0)
    assert config.probes.ttl.timeout == 900.0


def test_api_key_read_from_named_variable():
    sim = load_config(FULL, env={}).provider("sim")
    assert sim.api_key({"SIM_API_KEY": KEY}) == KEY
    assert sim.api_key({"SIM_API_KEY": "  "}) is None
    assert sim.api_key({}) is None
    assert KEY not in repr(sim)
    assert KEY not in sim.model_dump_json()


def test_web_config_file_must_exist(tmp_path: Path):
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users: {}\n")
    config = load_config(MINIMAL, env={"PCE_SERVER__WEB_CONFIG_FILE": str(web)})
    assert config.server.web_config_file == web


# -- check-config -------------------------------------------------------------------------------


def test_check_config_success_never_prints_the_key():
    env = {"SIM_API_KEY": KEY, "VENICE_API_KEY": KEY}
    out, err = io.StringIO(), io.StringIO()
    status = check_config_command(FULL, env=env, stdout=out, stderr=err)
    assert status == 0
    assert err.getvalue() == ""
    text = out.getvalue()
    assert KEY not in text
    assert "provider sim (openai): http://127.0.0.1:8089/v1" in text
    assert "  key: SIM_API_KEY set" in text
    assert "  key: VENICE_API_KEY set" in text
    assert "  key: none (api_key_env is empty)" in text
    assert "basic every 2m (timeout 1m30s)" in text
    assert "partial disabled" in text
    assert "  probes: basic, ttl" in text
    assert "1.5 usd/day" in text


def test_check_config_reports_unset_key():
    status, text = check_config(MINIMAL, env={})
    assert status == 0
    assert "  key: VENICE_API_KEY not set" in text


def test_check_config_error_goes_to_stderr_with_status_2():
    out, err = io.StringIO(), io.StringIO()
    path = FIXTURES / "invalid-duplicate-provider.toml"
    status = check_config_command(path, env={"SIM_API_KEY": KEY}, stdout=out, stderr=err)
    assert status == 2
    assert out.getvalue() == ""
    assert err.getvalue() == 'error: providers[1].name: duplicate provider name "sim"\n'
    assert check_config(FIXTURES / "missing.toml", env={})[0] == 2


def test_fingerprint_is_stable_and_sensitive():
    a = load_config(FULL, env={})
    b = load_config(FULL, env={})
    c = load_config(FULL, env={"PCE_HTTP__ATTEMPTS": "2"})
    assert config_fingerprint(a) == config_fingerprint(b)
    assert config_fingerprint(a) != config_fingerprint(c)
    assert len(config_fingerprint(a)) == 12


# -- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5),
        ("5m", 300),
        ("1h", 3600),
        ("1d", 86400),
        ("1w", 7 * 86400),
        ("1h30m", 5400),
        ("1m30s500ms", 90.5),
        ("1.5h", 5400),
        ("30", 30),
        (" 2s ", 2),
        (30, 30),
        (0.25, 0.25),
        ("0s", 0),
    ],
)
def test_parse_duration(text: str | float, seconds: float):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "5 minutes", "5M", "1m1h", "1s1s", "ms", "1.h", "inf", "nan", "1e3", "5x"]
)
def test_parse_duration_rejects(text: str):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_duration_rejects_negative_and_bool():
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration("-5s")
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(-1)
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(True)
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(float("inf"))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (5, "5s"),
        (300, "5m"),
        (5400, "1h30m"),
        (86400, "1d"),
        (90061.5, "1d1h1m1s500ms"),
        (-60, "-1m"),
    ],
)
def test_format_duration(seconds: float, text: str):
    assert format_duration(seconds) == text
    if seconds >= 0:
        assert parse_duration(text) == seconds


def test_unparseable_nested_env_variable_is_named():
    env = {"PCE_PROBES__BASIC__INTERVAL": "1m", "PCE_PROBES__TTL__DELAYS": "1s, 5s"}
    with pytest.raises(ConfigError) as caught:
        load_config(MINIMAL, env=env)
    assert str(caught.value) == (
        "probes: invalid JSON in environment variable PCE_PROBES__TTL__DELAYS "
        "(list and table values must be JSON)"
    )


def test_probe_names_match_the_probe_table():
    from exporter.probes import PROBE_NAMES as DISPATCHED

    assert PROBE_NAMES == DISPATCHED


@pytest.mark.parametrize(
    ("base_url", "variable"),
    [
        ("https://api.openai.com/v1", "OPENAI_API_KEY"),
        ("https://api.deepseek.com", "DEEPSEEK_API_KEY"),
        ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
        # A third-party or local server gets no key unless the config names a variable:
        # OPENAI_API_KEY must never be sent to it.
        ("http://127.0.0.1:8080/v1", ""),
        ("https://llm.example.com/v1", ""),
    ],
)
def test_openai_key_variable_defaults_by_host(tmp_path: Path, base_url: str, variable: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[[providers]]\nname = "p"\ntype = "openai"\nbase_url = "{base_url}"\n')
    provider = load_config(path, env={}).providers[0]
    assert provider.api_key_env == variable
    assert provider.api_key({"OPENAI_API_KEY": "sk-x"}) == (
        "sk-x" if variable.startswith("OPENAI") else None
    )


def test_the_documented_check_config_output_is_what_it_prints():
    # docs/configuration.md shows check-config on examples/demo.toml; a changed default,
    # example or summary line must change the page too (its fingerprint went stale before).
    docs = (ROOT / "docs" / "configuration.md").read_text()
    command = "$ prompt-cache-exporter check-config --config examples/demo.toml\n"
    shown = docs.split(command, 1)[1].split("$ echo $?", 1)[0]
    from exporter.forecast import ConfigForecast

    status, text = check_config(ROOT / "examples" / "demo.toml", env={}, forecast=ConfigForecast)
    assert status == 0
    assert shown == text + "\n"


def test_a_config_file_over_the_size_cap_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.write_text("x = '" + "a" * (1024 * 1024) + "'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert (
        str(info.value)
        == f"config file {path} is larger than 1024 KiB; it cannot be a configuration"
    )


def test_the_public_form_of_an_error_keeps_keys_and_drops_values(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\nlisten = "secret-ish-host"\n[[providers]]\nname = "x"\ntype = "openai"\n'
        'base_url = "http://127.0.0.1:1/v1"\napi_key_env = "X"\n'
        '[providers.prices."sim-*"]\ninput = -1\noutput = 1\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "secret-ish-host" in str(info.value)
    assert info.value.public == (
        'server.listen: invalid listen address "…" (expected host:port, e.g. 127.0.0.1:9819, '
        '[::1]:9819 or :9819); providers[0].prices."sim-*".input: must be >= 0'
    )


FORECAST_CONFIG = """
[probes.prompt_sizes]
enabled = false
[[providers]]
name = "listed"
type = "openai"
base_url = "http://127.0.0.1:8089/v1"
api_key_env = ""
models = ["a", "b"]
[providers.budget]
daily_tokens = 100000
[providers.prices."*"]
input = 1.0
output = 4.0
cache_read = 0.1
[[providers]]
name = "found"
type = "venice"
api_key_env = ""
max_models = 3
"""


def test_check_config_prints_the_forecast(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from exporter.cli import check_config as cli_check_config

    path = tmp_path / "forecast.toml"
    path.write_text(FORECAST_CONFIG)
    assert cli_check_config(str(path)) == 0
    lines = capsys.readouterr().out.splitlines()
    forecast = [line for line in lines if "forecast" in line]
    # Per model and day (1024-token minimum × 1.05 = 1076-token prompts, max_tokens 8):
    # tokens: basic 144 × 2 × 1076 + partial 12 × 3 × 1140 + persistence 4 × 10 × 1076
    #   + ttl 4 × 8 × 1076 = 428 400;
    # µ$ (cold at $1, cached at $0.1, completions at $4 per M): basic 144 × 1247.6 + partial
    #   12 × 1550.4 + persistence 4 × 2364.4 + ttl 16 × 1247.6 = 227 678.4, × 2 models.
    assert forecast == [
        "  forecast: 856800 prompt tokens/day, $0.4554/day for 2 models",
        "  forecast exceeds the daily token budget (100000): probing pauses when the budget "
        "runs out",
        "  forecast: 428400 prompt tokens/day per model (models are discovered: at most 3 "
        "models, 1285200 prompt tokens/day; a model with a larger cacheable minimum costs "
        "more)",
        "forecast total: 2142000 prompt tokens/day (discovered providers counted at max_models)",
    ]
