"""Settings: one TOML file plus ``PCE_*`` environment variables, validated into frozen models.

Loading::

    config = load_config("config.toml")            # file + os.environ
    config = load_config(path, env={"PCE_LOG_LEVEL": "debug"})   # explicit environment (tests)

Environment variables override the file: prefix ``PCE_``, ``__`` between nesting levels
(``PCE_SERVER__LISTEN=0.0.0.0:9819``, ``PCE_PROBES__BASIC__INTERVAL=1m``); list and table
values are JSON (``PCE_PROVIDERS='[...]'``). ``PCE_CONFIG_FILE`` names the file when no
path is given.

API keys are never part of the configuration: each provider names the environment variable
holding its key (``api_key_env``) and ``ProviderConfig.api_key(env)`` reads it when a request
is built. Error messages never quote the value of an environment variable.

Every model is frozen and rejects unknown keys; defaults live in the field declarations
below and nowhere else. Any invalid input raises ``ConfigError`` whose text is one line:
``<key path>: <problem>`` (several problems are joined with ``"; "``). docs/configuration.md
documents every key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, TextIO, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from exporter.durations import Duration, PositiveDuration, format_duration, parse_duration
from exporter.providers.openai import conventional_key_env
from exporter.results import ModelPrice

__all__ = [
    "DEFAULT_BASE_URLS",
    "DEFAULT_KEY_ENV",
    "ENV_CONFIG_FILE",
    "ENV_PREFIX",
    "PROBE_NAMES",
    "PROVIDER_TYPES",
    "BudgetConfig",
    "Config",
    "ConfigError",
    "HttpConfig",
    "PriceConfig",
    "ProbeConfig",
    "ProbesConfig",
    "ProviderConfig",
    "SchedulerConfig",
    "ServerConfig",
    "StorageConfig",
    "check_config",
    "check_config_command",
    "config_fingerprint",
    "format_validation_error",
    "load_config",
    "parse_listen",
    "summarize",
]

ENV_PREFIX = "PCE_"
ENV_CONFIG_FILE = "PCE_CONFIG_FILE"

ProviderType = Literal["openai", "venice", "anthropic"]
PROVIDER_TYPES: tuple[str, ...] = ("openai", "venice", "anthropic")
#: Base URL used when a provider of this type sets none (``openai`` has none: it must be set).
DEFAULT_BASE_URLS: Mapping[str, str] = MappingProxyType(
    {
        "venice": "https://api.venice.ai/api/v1",
        "anthropic": "https://api.anthropic.com/v1",
    }
)
#: Environment variable holding the API key when a provider sets no ``api_key_env``.
DEFAULT_KEY_ENV: Mapping[str, str] = MappingProxyType(
    {
        "openai": "OPENAI_API_KEY",
        "venice": "VENICE_API_KEY",
        "anthropic": "ANTHROPIC_API_KEY",
    }
)
_DEFAULT_CURRENCY: Mapping[str, str] = MappingProxyType({"venice": "diem"})

#: Probe kinds, in the order they are documented and reported.
PROBE_NAMES: tuple[str, ...] = ("basic", "prompt_sizes", "partial", "persistence", "ttl")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")

_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SIZE_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_CURRENCY = re.compile(r"[a-z]{2,10}")
# Header names that carry credentials. Keys belong in the environment, never in the file.
_SECRET_HEADER_WORDS = (
    "authorization",
    "api-key",
    "api_key",
    "apikey",
    "secret",
    "token",
    "password",
    "cookie",
    "x-auth",
)
_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """The configuration cannot be used. ``str()`` is one line: ``<key path>: <problem>``."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever went into it


# -- helpers for the models ---------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")

#: A read-only mapping (``MappingProxyType``) that keeps document order and dumps as a dict.
FrozenMap = Annotated[
    Mapping[K, V],
    AfterValidator(lambda value: MappingProxyType(dict(value))),
    PlainSerializer(dict),
]


def _quote(value: object) -> str:
    """A value as it appears in messages: double-quoted, escaped, bounded."""
    text = str(value)
    if len(text) > 80:
        text = text[:79] + "…"
    return json.dumps(text, ensure_ascii=False)


def _invalid(field: str, message: str) -> PydanticCustomError:
    """A validation error for ``field`` (a key path relative to the model being validated).

    Model validators see the whole model, so the failing key is carried in the context and
    joined onto the location when the error is formatted.
    """
    return PydanticCustomError("config", "{message}", {"message": message, "field": field})


def _d(text: str) -> float:
    return parse_duration(text)


class _Model(BaseModel):
    """Base of every config section: immutable, unknown keys rejected, defaults validated."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# -- sections -----------------------------------------------------------------------------------


class ServerConfig(_Model):
    """``[server]``: where /metrics and the JSON API listen."""

    listen: str = "127.0.0.1:9819"
    # Prometheus exporter-toolkit web config (TLS, basic auth, headers). None: plain HTTP.
    web_config_file: Path | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("web_config_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("web_config_file")
    @classmethod
    def _check_web_config(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file not found: {_quote(value)}")
        return value

    @property
    def host(self) -> str:
        """Address to bind: ``"0.0.0.0"`` for ``":port"``, IPv6 without brackets."""
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` → (host, port). ``[::1]:9819`` for IPv6, ``:9819`` for every interface."""
    problem = (
        f"invalid listen address {_quote(text)} "
        "(expected host:port, e.g. 127.0.0.1:9819, [::1]:9819 or :9819)"
    )
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(problem)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(problem) from None
        host = host[1:-1]
    elif host == "":
        host = "0.0.0.0"  # noqa: S104 - ":port" means every interface, as in Prometheus
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(problem)
    return host, int(port_text)


class StorageConfig(_Model):
    """``[storage]``: the SQLite history file."""

    path: Path = Path("data/prompt-cache-exporter.db")
    retention_days: int = Field(default=30, ge=1)


class HttpConfig(_Model):
    """``[http]``: how each upstream request is tried (see exporter.transport.RetryPolicy)."""

    timeout: PositiveDuration = _d("30s")
    attempts: int = Field(default=3, ge=1, le=10)
    backoff: Duration = _d("2s")
    backoff_max: Duration = _d("8s")
    max_retry_after: Duration = _d("60s")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _check_backoff(self) -> HttpConfig:
        if self.backoff_max < self.backoff:
            raise _invalid("backoff_max", f"must be >= backoff ({format_duration(self.backoff)})")
        return self


class SchedulerConfig(_Model):
    """``[scheduler]``: failure tracking, cooldown and housekeeping."""

    failure_warn_after: int = Field(default=3, ge=1)
    cooldown_after: int = Field(default=5, ge=1)
    cooldown: PositiveDuration = _d("15m")
    reset_after_successes: int = Field(default=2, ge=1)
    reliability_window: PositiveDuration = _d("24h")
    cleanup_interval: PositiveDuration = _d("24h")
    shutdown_grace: PositiveDuration = _d("10s")

    @model_validator(mode="after")
    def _check_cooldown(self) -> SchedulerConfig:
        if self.cooldown_after < self.failure_warn_after:
            raise _invalid(
                "cooldown_after", f"must be >= failure_warn_after ({self.failure_warn_after})"
            )
        return self


class ProbeConfig(_Model):
    """Settings every probe kind has. Subclasses change the defaults and add their own keys.

    ``timeout`` defaults to the class default, or to 80 % of the interval when that is
    shorter, so shortening only the interval (demos, tests) stays valid. An explicit timeout
    must be shorter than the interval.
    """

    enabled: bool = True
    interval: PositiveDuration = _d("5m")
    timeout: PositiveDuration = _d("2m")

    _TIMEOUT_SHARE: ClassVar[float] = 0.8

    @model_validator(mode="before")
    @classmethod
    def _default_timeout(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("timeout") is None and "interval" in data:
            try:
                interval = parse_duration(data["interval"])
            except ValueError:
                return data  # the interval's own error is reported
            default = cls.model_fields["timeout"].default
            data = {**data, "timeout": min(default, interval * cls._TIMEOUT_SHARE)}
        return data

    @model_validator(mode="after")
    def _check_timeout(self) -> ProbeConfig:
        if self.timeout >= self.interval:
            raise _invalid(
                "timeout", f"must be shorter than the interval ({format_duration(self.interval)})"
            )
        return self


class BasicProbeConfig(ProbeConfig):
    """``[probes.basic]``: prime + repeat of one prompt."""

    interval: PositiveDuration = _d("5m")
    timeout: PositiveDuration = _d("2m")


class PromptSizesProbeConfig(ProbeConfig):
    """``[probes.prompt_sizes]``: basic at several prompt sizes."""

    interval: PositiveDuration = _d("1h")
    timeout: PositiveDuration = _d("10m")
    # size name (the `size` label) -> target prompt tokens
    sizes: FrozenMap[str, Annotated[int, Field(gt=0, le=1_000_000)]] = Field(
        default_factory=lambda: {"small": 1100, "medium": 2000, "large": 4000, "xlarge": 8000}
    )

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, value: Mapping[str, int]) -> Mapping[str, int]:
        if not value:
            raise ValueError("must name at least one size")
        for name in value:
            if not _SIZE_NAME.fullmatch(name):
                raise ValueError(
                    f"invalid size name {_quote(name)} (use lower-case letters, digits and _)"
                )
        return value


class PartialProbeConfig(ProbeConfig):
    """``[probes.partial]``: shared system prompt, different user messages."""

    interval: PositiveDuration = _d("30m")
    timeout: PositiveDuration = _d("5m")


class PersistenceProbeConfig(ProbeConfig):
    """``[probes.persistence]``: N identical requests in a row."""

    interval: PositiveDuration = _d("1h")
    timeout: PositiveDuration = _d("10m")
    requests: int = Field(default=10, ge=2, le=100)


class TtlProbeConfig(ProbeConfig):
    """``[probes.ttl]``: prime, wait, repeat for each delay."""

    interval: PositiveDuration = _d("6h")
    timeout: PositiveDuration = _d("15m")
    delays: tuple[PositiveDuration, ...] = (1.0, 5.0, 10.0, 30.0)

    @model_validator(mode="after")
    def _check_delays(self) -> TtlProbeConfig:
        if not self.delays:
            raise _invalid("delays", "must list at least one delay")
        for before, after in zip(self.delays, self.delays[1:], strict=False):
            if after <= before:
                raise _invalid(
                    "delays",
                    f"must be strictly increasing ({format_duration(after)} "
                    f"follows {format_duration(before)})",
                )
        total = sum(self.delays)
        if total >= self.timeout:
            raise _invalid(
                "delays",
                f"the delays add up to {format_duration(total)}, which does not fit in the "
                f"probe timeout ({format_duration(self.timeout)})",
            )
        return self


class ProbesConfig(_Model):
    """``[probes.*]``: one table per probe kind."""

    basic: BasicProbeConfig = Field(default_factory=BasicProbeConfig)
    prompt_sizes: PromptSizesProbeConfig = Field(default_factory=PromptSizesProbeConfig)
    partial: PartialProbeConfig = Field(default_factory=PartialProbeConfig)
    persistence: PersistenceProbeConfig = Field(default_factory=PersistenceProbeConfig)
    ttl: TtlProbeConfig = Field(default_factory=TtlProbeConfig)

    def get(self, name: str) -> ProbeConfig:
        """The settings of probe ``name`` (one of PROBE_NAMES). KeyError for other names."""
        if name not in PROBE_NAMES:
            raise KeyError(name)
        probe: ProbeConfig = getattr(self, name)
        return probe

    def enabled(self) -> tuple[str, ...]:
        """Names of the globally enabled probes, in PROBE_NAMES order."""
        return tuple(name for name in PROBE_NAMES if self.get(name).enabled)

    def enabled_for(self, provider: ProviderConfig) -> tuple[str, ...]:
        """Probes to run for ``provider``: its ``probes`` list (all if unset), minus any probe
        disabled globally (``enabled = false`` is a kill switch), in PROBE_NAMES order."""
        chosen = PROBE_NAMES if provider.probes is None else provider.probes
        return tuple(name for name in self.enabled() if name in chosen)


class BudgetConfig(_Model):
    """``[providers.budget]``: spend limits per window. 0 means no limit."""

    daily_tokens: int = Field(default=0, ge=0)
    monthly_tokens: int = Field(default=0, ge=0)
    daily_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    monthly_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    def limits(self) -> dict[tuple[str, str], float]:
        """The limits in force, keyed by (window, unit) as the metrics label them:
        window ``day``/``month``, unit ``tokens``/``usd``. Windows without a limit are absent."""
        all_limits = {
            ("day", "tokens"): float(self.daily_tokens),
            ("month", "tokens"): float(self.monthly_tokens),
            ("day", "usd"): self.daily_usd,
            ("month", "usd"): self.monthly_usd,
        }
        return {key: value for key, value in all_limits.items() if value > 0}


class PriceConfig(_Model):
    """``[providers.prices."<glob>"]``: USD per million tokens."""

    input: float = Field(ge=0, allow_inf_nan=False)
    output: float = Field(ge=0, allow_inf_nan=False)
    cache_read: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cache_write: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    def to_model_price(self) -> ModelPrice:
        return ModelPrice(
            input=self.input,
            output=self.output,
            cache_read=self.cache_read,
            cache_write=self.cache_write,
        )


class ProviderConfig(_Model):
    """``[[providers]]``: one upstream API and what to probe on it."""

    name: str
    type: ProviderType
    base_url: str
    # Name of the environment variable holding the API key; "" means never send a key.
    api_key_env: str
    models: tuple[str, ...] = ()
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    max_models: int = Field(default=200, ge=1, le=1000)
    concurrency: int = Field(default=1, ge=1, le=32)
    isolation_delay: Duration = _d("5s")
    rate_limit: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    min_cacheable_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    warmup_repeats: int | None = Field(default=None, ge=1, le=20)
    stream: bool = True
    max_tokens: int = Field(default=8, ge=1, le=4096)
    probes: tuple[str, ...] | None = None
    balance_stop_threshold: float = Field(default=0.001, ge=0, allow_inf_nan=False)
    balance_currency: str
    balance_check_interval: PositiveDuration = _d("10m")
    headers: FrozenMap[str, str] = Field(default_factory=dict)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    prices: FrozenMap[str, PriceConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _type_defaults(cls, data: Any) -> Any:
        """Fill the defaults that depend on ``type`` (base URL, key variable, currency)."""
        if not isinstance(data, dict):
            return data
        kind = data.get("type")
        if kind not in PROVIDER_TYPES:
            if "type" in data:
                raise _invalid(
                    "type",
                    f"unknown provider type {_quote(kind)} "
                    f"(expected one of: {', '.join(PROVIDER_TYPES)})",
                )
            return data
        data = dict(data)
        if data.get("base_url") is None:
            if kind not in DEFAULT_BASE_URLS:
                raise _invalid(
                    "base_url",
                    f'required for type "{kind}" (the API base URL, e.g. https://api.openai.com/v1)',
                )
            data["base_url"] = DEFAULT_BASE_URLS[kind]
        if data.get("api_key_env") is None:
            if kind == "openai":
                # Only a known host gets a default key variable (see HOST_KEY_ENV).
                data["api_key_env"] = conventional_key_env(str(data["base_url"])) or ""
            else:
                data["api_key_env"] = DEFAULT_KEY_ENV[kind]
        if data.get("balance_currency") is None:
            data["balance_currency"] = _DEFAULT_CURRENCY.get(kind, "usd")
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _PROVIDER_NAME.fullmatch(value) or len(value) > 64:
            raise ValueError(
                f"invalid provider name {_quote(value)} (use lower-case letters, digits, "
                '"_" and "-", starting with a letter or digit, at most 64 characters)'
            )
        return value

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        # The URL is never quoted back: it might carry credentials.
        try:
            parts = urlsplit(value)
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if not port_ok or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not contain credentials; use api_key_env")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _check_key_env(cls, value: str) -> str:
        # Never quoted back: someone may have pasted the key itself here.
        if value and (not _ENV_NAME.fullmatch(value) or len(value) > 64):
            raise ValueError(
                "must be the name of an environment variable (upper-case letters, digits "
                "and _, such as VENICE_API_KEY), not the key itself"
            )
        return value

    @field_validator("models", "include", "exclude")
    @classmethod
    def _check_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not item.strip() for item in value):
            raise ValueError("must not contain empty names")
        return value

    @field_validator("probes")
    @classmethod
    def _check_probes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        for name in value:
            if name not in PROBE_NAMES:
                raise ValueError(
                    f"unknown probe {_quote(name)} (expected one of: {', '.join(PROBE_NAMES)})"
                )
        return tuple(dict.fromkeys(value))

    @field_validator("balance_currency")
    @classmethod
    def _check_currency(cls, value: str) -> str:
        if not _CURRENCY.fullmatch(value):
            raise ValueError(
                f"invalid currency {_quote(value)} (lower-case letters, e.g. usd or diem)"
            )
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: Mapping[str, str]) -> Mapping[str, str]:
        # Header values are never quoted back: they may be sensitive.
        for name, header_value in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"invalid header name {_quote(name)}")
            lower = name.lower()
            if any(word in lower for word in _SECRET_HEADER_WORDS):
                raise ValueError(
                    f"header {_quote(name)} looks like a credential; keys come only from the "
                    "environment variable named by api_key_env"
                )
            if any(ch in header_value for ch in "\r\n\0"):
                raise ValueError(f"value of header {_quote(name)} contains a line break")
        return value

    @field_validator("prices")
    @classmethod
    def _check_prices(cls, value: Mapping[str, PriceConfig]) -> Mapping[str, PriceConfig]:
        if any(not pattern.strip() for pattern in value):
            raise ValueError("model patterns must not be empty")
        return value

    # -- use ------------------------------------------------------------------------------------

    def api_key(self, env: Mapping[str, str] | None = None) -> str | None:
        """The API key from the variable named by ``api_key_env`` (``env`` defaults to
        os.environ); None when no variable is configured, or it is unset or blank.
        The value is never logged or stored by this module."""
        if not self.api_key_env:
            return None
        source = os.environ if env is None else env
        key = source.get(self.api_key_env, "").strip()
        return key or None

    def price_for(self, model: str) -> ModelPrice | None:
        """The configured price of ``model``: the first matching glob in document order."""
        for pattern, price in self.prices.items():
            if fnmatch.fnmatchcase(model, pattern):
                return price.to_model_price()
        return None

    @property
    def price_table_version(self) -> str:
        """Short stable hash of this provider's configured price table (for llmcache_price_info)."""
        table = [[pattern, price.model_dump()] for pattern, price in self.prices.items()]
        return _short_hash(json.dumps(table, sort_keys=True))


class Config(BaseSettings):
    """The whole configuration. Build it with ``load_config``.

    It is a pydantic-settings model (prefix ``PCE_``, delimiter ``__``), but constructing it
    directly reads nothing from the process environment: ``load_config`` merges the file and
    an explicit environment mapping, so tests never pick up the caller's variables.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    server: ServerConfig = Field(default_factory=ServerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    providers: tuple[ProviderConfig, ...] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_log_level(cls, value: Any) -> Any:
        level = value.lower() if isinstance(value, str) else value
        level = "warning" if level == "warn" else level
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (got {_quote(value)})")
        return level

    @model_validator(mode="after")
    def _check_providers(self) -> Config:
        if not self.providers:
            raise _invalid(
                "providers", "no providers configured (add at least one [[providers]] table)"
            )
        seen: set[str] = set()
        for index, provider in enumerate(self.providers):
            if provider.name in seen:
                raise _invalid(
                    f"providers[{index}].name", f"duplicate provider name {_quote(provider.name)}"
                )
            seen.add(provider.name)
        return self

    def provider(self, name: str) -> ProviderConfig:
        """The provider called ``name``. KeyError if there is none."""
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)


# -- loading ------------------------------------------------------------------------------------


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Config)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def load_config(path: str | Path | None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or ``$PCE_CONFIG_FILE`` when None), apply ``PCE_*`` overrides from ``env``
    (default: os.environ) and validate. Raises ConfigError with a one-line message."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None or str(path) == "":
        path = environ.get(ENV_CONFIG_FILE) or None
        if path is None:
            raise ConfigError(f"no config file given: use --config FILE or set {ENV_CONFIG_FILE}")
    file_data = _read_toml(Path(path))
    env_data = _env_overrides(environ)
    merged = _deep_merge(file_data, env_data)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, env_data, environ)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: invalid TOML: not valid UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_error(path, str(exc))) from None


def _toml_error(path: Path, message: str) -> str:
    """tomllib's "msg (at line L, column C)" as "path:L:C: invalid TOML: msg"."""
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if match:
        return f"{path}:{match[2]}:{match[3]}: invalid TOML: {match[1]}"
    match = re.fullmatch(r"(.*) \(at end of document\)", message, re.DOTALL)
    if match:
        return f"{path}: invalid TOML: {match[1]} at the end of the file"
    return f"{path}: invalid TOML: {' '.join(message.split())}"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        return _MappingEnvSource(environ)()
    except SettingsError as exc:
        # The value itself is never shown; only which variable could not be parsed.
        match = re.search(r'field "([^"]+)"', str(exc))
        field = match[1] if match else "?"
        prefix = f"{ENV_PREFIX}{field}".upper()
        culprit = f"{prefix} or {prefix}__*"
        for name in sorted(environ):
            upper = name.upper()
            if upper != prefix and not upper.startswith(prefix + "__"):
                continue
            try:
                _MappingEnvSource({name: environ[name]})()
            except SettingsError:
                culprit = name
                break
        raise ConfigError(
            f"{field}: invalid JSON in environment variable {culprit} "
            "(list and table values must be JSON)"
        ) from None


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# -- error messages -----------------------------------------------------------------------------

_MAX_REPORTED = 3


def format_validation_error(
    exc: ValidationError,
    env_data: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """One line for a pydantic ValidationError: ``path: problem`` joined with ``"; "``.

    Where a key came from an environment variable the message says which one, and any string
    taken from the environment is replaced by ``"***"`` (values of variables never appear).
    """
    env_strings = _string_leaves(env_data or {})
    parts: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        ctx = error.get("ctx") or {}
        field = ctx.get("field") if error["type"] == "config" else None
        path = _format_loc(loc)
        if field:
            path = f"{path}.{field}" if path else str(field)
        message = _message(error, loc)
        for value in env_strings:
            message = message.replace(_quote(value), '"***"')
        variable = _env_variable(loc, field, environ or {})
        if variable:
            message += f" (from environment variable {variable})"
        part = f"{path}: {message}" if path else message
        if part not in parts:
            parts.append(part)
    if len(parts) > _MAX_REPORTED:
        parts = [*parts[:_MAX_REPORTED], f"and {len(parts) - _MAX_REPORTED} more problems"]
    return "; ".join(parts)


def _message(error: Mapping[str, Any], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "config":
        return str(ctx["message"])
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "extra_forbidden":
        if loc and loc[-1] in ("api_key", "key") and loc[0] == "providers":
            return (
                "unknown key (API keys are never read from the config file: set api_key_env "
                "to the name of the environment variable that holds the key)"
            )
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    simple = {
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "tuple_type": "must be a list",
        "dict_type": "must be a table",
        "mapping_type": "must be a table",
        "model_type": "must be a table",
        "model_attributes_type": "must be a table",
        "path_type": "must be a path",
    }
    if kind in simple:
        return simple[kind]
    bounds = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "<="),
    }
    if kind in bounds:
        key, symbol = bounds[kind]
        bound = ctx.get(key)
        return f"must be {symbol} {_number(bound) if isinstance(bound, float) else bound}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    return str(error["msg"])


def _format_loc(loc: Sequence[Any]) -> str:
    """("providers", 0, "prices", "gpt-*", "input") → providers[0].prices."gpt-*".input"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part)
        if text == "[key]":
            out += " (key)"
            continue
        key = text if _TOML_BARE_KEY.fullmatch(text) else _quote(text)
        out = f"{out}.{key}" if out else key
    return out


def _env_variable(loc: tuple[Any, ...], field: Any, environ: Mapping[str, str]) -> str | None:
    """The PCE_* variable that set the value at ``loc`` (longest matching prefix), if any."""
    names: list[str] = []
    for part in loc:
        if not isinstance(part, str):
            break
        names.append(part)
    if isinstance(field, str) and len(names) == len(loc):
        names.extend(p for p in re.split(r"[.\[]", field) if p and not p[0].isdigit())
    upper = {key.upper(): key for key in environ}
    for end in range(len(names), 0, -1):
        candidate = ENV_PREFIX + "__".join(names[:end]).upper()
        if candidate in upper:
            return upper[candidate]
    return None


def _string_leaves(data: Any) -> set[str]:
    if isinstance(data, str):
        return {data}
    if isinstance(data, Mapping):
        return {s for value in data.values() for s in _string_leaves(value)}
    if isinstance(data, list | tuple):
        return {s for value in data for s in _string_leaves(value)}
    return set()


# -- fingerprint and check-config ---------------------------------------------------------------


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def config_fingerprint(config: BaseModel) -> str:
    """A short stable hash (12 hex digits) of a config model's canonical JSON form.

    Equal configurations give equal fingerprints across processes, so it can label the
    configuration (or, for a ProviderConfig, that provider's settings) in metrics and logs.
    It hashes names of key variables, never their values.
    """
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return _short_hash(canonical)


def summarize(config: Config, env: Mapping[str, str] | None = None) -> str:
    """A short human-readable summary (what check-config prints). Never shows key values."""
    environ: Mapping[str, str] = os.environ if env is None else env
    web = str(config.server.web_config_file) if config.server.web_config_file else "none"
    lines = [
        f"configuration OK (fingerprint {config_fingerprint(config)})",
        f"server: listen {config.server.listen}, web config {web}, log level {config.log_level}",
        f"storage: {config.storage.path} (retention {config.storage.retention_days} days)",
    ]
    probe_parts = []
    for name in PROBE_NAMES:
        probe = config.probes.get(name)
        if probe.enabled:
            probe_parts.append(
                f"{name} every {format_duration(probe.interval)} "
                f"(timeout {format_duration(probe.timeout)})"
            )
        else:
            probe_parts.append(f"{name} disabled")
    lines.append("probes: " + ", ".join(probe_parts))
    for provider in config.providers:
        if provider.api_key_env:
            state = "set" if provider.api_key(environ) else "not set"
            key = f"{provider.api_key_env} {state}"
        else:
            key = "none (api_key_env is empty)"
        if provider.models:
            models = f"{len(provider.models)} listed ({', '.join(provider.models[:5])}"
            models += ", …)" if len(provider.models) > 5 else ")"
        else:
            models = (
                f"discovered (include {', '.join(provider.include)}; "
                f"exclude {', '.join(provider.exclude) or 'none'}; max {provider.max_models})"
            )
        limits = provider.budget.limits()
        budget = (
            ", ".join(
                f"{_number(value)} {unit}/{window}" for (window, unit), value in limits.items()
            )
            or "no limit"
        )
        probes = ", ".join(config.probes.enabled_for(provider)) or "none"
        lines += [
            f"provider {provider.name} ({provider.type}): {provider.base_url}",
            f"  key: {key}",
            f"  models: {models}",
            f"  probes: {probes}",
            f"  budget: {budget}",
            f"  balance: pause below {_number(provider.balance_stop_threshold)} "
            f"{provider.balance_currency} (checked every "
            f"{format_duration(provider.balance_check_interval)})",
            f"  prices: {len(provider.prices)} pattern(s)",
        ]
    return "\n".join(lines)


def _number(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value.is_integer() else f"{value:g}"


def check_config(
    path: str | Path | None, *, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Validate without running: (0, summary) or (2, "error: <one line>")."""
    try:
        config = load_config(path, env=env)
    except ConfigError as exc:
        return 2, f"error: {exc}"
    return 0, summarize(config, env)


def check_config_command(
    path: str | Path | None,
    *,
    env: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``prompt-cache-exporter check-config``: print the summary (stdout) or the error
    (stderr) and return the exit status (0 valid, 2 invalid). Never raises ConfigError."""
    status, text = check_config(path, env=env)
    stream = (stdout or sys.stdout) if status == 0 else (stderr or sys.stderr)
    print(text, file=stream)
    return status
