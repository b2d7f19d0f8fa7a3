"""``[[providers]]``: one upstream API, its key variable, budget and price table."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from exporter.config.base import FrozenMap, _d, _Model
from exporter.config.constants import (
    _DEFAULT_CURRENCY,
    DEFAULT_BASE_URLS,
    PROBE_NAMES,
    PROVIDER_TYPES,
    ProviderType,
)
from exporter.config.errors import _invalid, _quote
from exporter.config.fingerprint import _short_hash
from exporter.durations import Duration, PositiveDuration
from exporter.providers import adapter_class
from exporter.results import ModelPrice

_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
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
    # Not needed by default (the shared baseline is learned from each run's cold requests):
    # for a gateway known to put more than 64 tokens of its own before the run id.
    hit_threshold_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
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
            # Raised here, before the fields: without a type the keys whose defaults depend
            # on it would each report a bogus "required key is missing" too.
            problem = "required key is missing"
            if "type" in data:
                problem = f"unknown provider type {_quote(kind)}"
            raise _invalid("type", f"{problem} (expected one of: {', '.join(PROVIDER_TYPES)})")
        data = dict(data)
        if data.get("base_url") is None:
            if kind not in DEFAULT_BASE_URLS:
                raise _invalid(
                    "base_url",
                    f'required for type "{kind}" (the API base URL, e.g. https://api.openai.com/v1)',
                )
            data["base_url"] = DEFAULT_BASE_URLS[kind]
        if data.get("api_key_env") is None:
            # openai: only a known host gets a default key variable (see HOST_KEY_ENV).
            data["api_key_env"] = adapter_class(kind).key_env_for(str(data["base_url"])) or ""
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

    @model_validator(mode="after")
    def _check_usd_budget_priced(self) -> ProviderConfig:
        """A USD budget needs a price for every model probed: a request's upper bound in USD
        is what is reserved before it is sent. Prices come from the table here or from a
        provider that publishes them (Venice, OpenRouter); otherwise the budget cannot hold."""
        budget = self.budget
        which = "daily_usd" if budget.daily_usd else "monthly_usd" if budget.monthly_usd else ""
        if not which or adapter_class(self.type).publishes_prices_at(self.base_url):
            return self
        source = f"the {self.type} models endpoint at this base URL publishes no prices"
        for model in self.models:
            if self.price_for(model) is None:
                raise _invalid(
                    f"budget.{which}",
                    f"cannot be enforced without a price for model {_quote(model)}: add "
                    f"[providers.prices.{_quote(model)}] with input and output in USD per "
                    f"million tokens ({source})",
                )
        if not self.models and not self.prices:
            raise _invalid(
                f"budget.{which}",
                "cannot be enforced without prices: models are discovered and "
                f'{source}; add [providers.prices."*"] (or one pattern per model family)',
            )
        return self

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
