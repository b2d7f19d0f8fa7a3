"""The simulated models: how each one caches, fails, throttles, costs and how fast it answers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Final

CACHE_MODES: Final = ("ok", "broken", "no_fields", "flaky", "evicting")

FAULTS: Final = (
    "error",  # HTTP 500 with a JSON error body
    "html",  # HTTP 502 with an HTML page, as a failing proxy answers
    "bad_json",  # 200 whose body (or stream event) is not valid JSON
    "missing_usage",  # 200 without any usage
    "cached_exceeds_prompt",  # cached_tokens larger than prompt_tokens
    "negative_tokens",  # negative usage figures
    "absurd_tokens",  # prompt_tokens of 1e12
    "truncated_stream",  # the stream ends before usage and [DONE]
    "huge_body",  # a 200 body of huge_body_bytes, streamed in chunks
    "stream_error",  # Venice-style in-band error event inside a 200
    "slow",  # waits slow_seconds before answering at all
)

# DIEM charged per USD of list price. Venice's /models publishes the same number in both
# currencies for current text models (1 DIEM buys $1 of compute per day).
DIEM_PER_USD: Final = 1.0

_MiB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SimModel:
    name: str
    # -- cache --
    min_cacheable_tokens: int = 1024
    granularity: int = 128
    ttl: float = 300.0
    capacity: int = 100_000  # cache entries (blocks) kept per model before LRU eviction
    cache_mode: str = "ok"
    flaky_hit_rate: float = 0.5
    report_cache_write: bool = False  # Venice: prompt_tokens_details.cache_creation_input_tokens
    # Tokens the server's chat template puts before every prompt (BOS, header). All prompts
    # share them, so a token-granular server (llama.cpp, SGLang) reports them as cached on
    # every request, cold ones included. Counted in prompt_tokens.
    template_tokens: int = 0
    # Times a prompt must be seen before its prefix is kept (DeepSeek persists prefixes
    # lazily: the first repeat usually misses). 1: kept at once.
    persist_after: int = 1
    # -- failures --
    fault: str | None = None
    slow_seconds: float = 45.0  # longer than the exporter's 30 s default request timeout
    huge_body_bytes: int = 50 * _MiB
    ratelimit_period: int = 0  # 0: off; n: only every n-th chat request is served
    # Share of chat requests answered 429, drawn from the model's seeded RNG: throttling
    # that comes and goes, as a busy provider's does.
    ratelimit_rate: float = 0.0
    retry_after: float = 1.0
    # -- latency (seconds; multiplied by the config's latency_scale) --
    base_latency: float = 0.05
    prefill_seconds_per_token: float = 0.0002  # per prompt token NOT read from the cache
    output_token_seconds: float = 0.01
    output_tokens: int = 5
    # -- prices, USD per million tokens; None: not offered (cache reads/writes at input) --
    price_input: float = 1.0
    price_output: float = 4.0
    price_cache_read: float | None = 0.1
    price_cache_write: float | None = None
    context_tokens: int = 128_000

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(f"model {self.name!r}: {problem}")

    def _problem(self) -> str | None:
        if not _is_text(self.name):
            return "name must be a non-empty string"
        if self.cache_mode not in CACHE_MODES:
            return f"cache_mode must be one of {', '.join(CACHE_MODES)}"
        if self.fault is not None and self.fault not in FAULTS:
            return f"fault must be one of {', '.join(FAULTS)}"
        if not _is_bool(self.report_cache_write):
            return "report_cache_write must be true or false"
        positive_ints = (
            "granularity",
            "capacity",
            "huge_body_bytes",
            "context_tokens",
            "persist_after",
        )
        for name in positive_ints:
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                return f"{name} must be a positive integer"
        for name in (
            "min_cacheable_tokens",
            "ratelimit_period",
            "output_tokens",
            "template_tokens",
        ):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                return f"{name} must be a non-negative integer"
        non_negative = (
            "slow_seconds",
            "retry_after",
            "base_latency",
            "prefill_seconds_per_token",
            "output_token_seconds",
            "price_input",
            "price_output",
            "price_cache_read",
            "price_cache_write",
        )
        for name in non_negative:
            value = getattr(self, name)
            if value is not None and not _is_non_negative(value):
                return f"{name} must be a non-negative number"
        if not _is_non_negative(self.ttl) or self.ttl <= 0:
            return "ttl must be a positive number"
        if not _is_non_negative(self.flaky_hit_rate) or self.flaky_hit_rate > 1:
            return "flaky_hit_rate must be between 0 and 1"
        if not _is_non_negative(self.ratelimit_rate) or self.ratelimit_rate > 1:
            return "ratelimit_rate must be between 0 and 1"
        return None

    @property
    def caches(self) -> bool:
        """Whether the model advertises caching (Venice: ``pricing.cache_input`` present)."""
        return self.price_cache_read is not None and self.cache_mode != "no_fields"

    def replace(self, **changes: Any) -> SimModel:
        return dataclasses.replace(self, **changes)


# The checks take ``object``: values arrive from TOML, whatever the annotations say.
def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_non_negative(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def model_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(SimModel))


DEFAULT_MODELS: Final[tuple[SimModel, ...]] = (
    SimModel("sim-cache-ok"),
    SimModel(
        "sim-cache-write",  # Venice/Claude-style: reports and charges cache writes
        report_cache_write=True,
        price_input=3.0,
        price_output=15.0,
        price_cache_read=0.3,
        price_cache_write=3.75,
    ),
    SimModel("sim-cache-broken", cache_mode="broken"),
    SimModel("sim-cache-short-ttl", ttl=3.0),
    SimModel("sim-cache-flaky", cache_mode="flaky", flaky_hit_rate=0.5),
    SimModel("sim-no-cache-fields", cache_mode="no_fields", price_cache_read=None),
    # llama.cpp-style: token-granular prefix caching (no minimum, one-token steps) behind an
    # 8-token chat template that every prompt shares, so cold requests report cached tokens.
    SimModel("sim-cache-template", min_cacheable_tokens=0, granularity=1, template_tokens=8),
    # The same server kept busy by other tenants: our prompt is evicted between requests and
    # only the shared template is ever served from cache.
    SimModel(
        "sim-cache-evicting",
        min_cacheable_tokens=0,
        granularity=1,
        template_tokens=8,
        cache_mode="evicting",
    ),
    # OpenAI's published numbers, pinned: nothing below 1024 tokens, then 128-token steps,
    # so a hit covers the prompt's whole blocks and never its tail.
    SimModel("sim-cache-blocks", min_cacheable_tokens=1024, granularity=128),
    SimModel("sim-error", fault="error"),
    # A third of its requests get 429: with 3 attempts a request fails about 1 time in 27,
    # so runs fail only sometimes (a 10-request persistence run about 1 in 3).
    SimModel("sim-ratelimited", ratelimit_rate=1 / 3, retry_after=1.0),
)


def _fault_model_name(fault: str) -> str:
    return "sim-fault-" + fault.replace("_", "-")


# One model per fault; "error" is covered by sim-error in the default listing.
FAULT_MODELS: Final[tuple[SimModel, ...]] = tuple(
    SimModel(_fault_model_name(fault), fault=fault) for fault in FAULTS if fault != "error"
)
