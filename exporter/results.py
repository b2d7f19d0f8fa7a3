"""The values that flow from provider adapters through probes to the store and the metrics.

Everything here is plain data: immutable where it is shared, JSON-serialisable through
``to_dict``/``from_dict`` so the store, the JSON API and ``probe --json`` agree on one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from exporter.hits import TtftWitness, ttft_witness


class ErrorType(StrEnum):
    """Bounded set of failure causes; used as the ``error_type`` label, never free text."""

    RATE_LIMIT = "rate_limit"  # 429 (or an in-band rate-limit error) after the allowed attempts
    TIMEOUT = "timeout"  # connect/read timeout or probe deadline
    CONNECTION = "connection"  # refused, reset, DNS, TLS
    AUTH = "auth"  # 401/403: retrying cannot help
    INSUFFICIENT_FUNDS = "insufficient_funds"  # 402: balance or spend limit exhausted
    API_ERROR = "api_error"  # any other 4xx/5xx or in-band error event
    BAD_RESPONSE = "bad_response"  # unparseable, truncated, oversized or implausible answer
    BUDGET = "budget"  # not sent: the spend budget would have been exceeded
    INTERNAL = "internal"  # a bug in the exporter (logged with a traceback)


class Verdict(StrEnum):
    """What a probe concluded. ``caching_works`` is derived from it (see ``caching_works_for``)."""

    WORKS = "works"  # every warm request that should hit did
    FLAKY = "flaky"  # some warm requests hit, some did not (persistence, ttl at short delays)
    PARTIAL = "partial"  # prompt_sizes: some eligible sizes hit, others did not
    BROKEN = "broken"  # cache fields reported, warm requests never hit
    NOT_REPORTED = "not_reported"  # the API reports no cache fields: no verdict is possible
    BELOW_MINIMUM = "below_minimum"  # prompt smaller than the provider's cacheable minimum
    ERROR = "error"  # requests failed, so nothing could be concluded
    SKIPPED = "skipped"  # not run (budget, paused provider)


def caching_works_for(verdict: Verdict) -> bool | None:
    """True/False where the evidence decides; None where there is no verdict to give."""
    if verdict in (Verdict.WORKS, Verdict.FLAKY, Verdict.PARTIAL):
        return True
    if verdict is Verdict.BROKEN:
        return False
    return None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage normalised across APIs.

    ``prompt_tokens`` is always the whole prompt, cached reads and cache writes included
    (Anthropic's native ``input_tokens`` excludes them; its adapter adds them back).
    ``cached_tokens``/``cache_write_tokens`` are None when the response has no such field:
    "not reported" must never read as "0 cached".
    """

    prompt_tokens: int
    cached_tokens: int | None
    cache_write_tokens: int | None
    completion_tokens: int

    @property
    def cache_reported(self) -> bool:
        return self.cached_tokens is not None


@dataclass(frozen=True, slots=True)
class Completion:
    """One parsed chat completion (from a JSON body or assembled from a stream)."""

    usage: Usage
    text: str = ""
    # Cost the provider itself reported for this request, by currency (Venice: usd, diem).
    cost: dict[str, float] = field(default_factory=dict)
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What response headers tell us, whatever the status."""

    request_id: str | None = None
    # Account balance by currency, as the provider reports it (Venice: before the request).
    balances: dict[str, float] = field(default_factory=dict)
    # Remaining rate-limit allowance by resource ("requests", "tokens", ...).
    ratelimit_remaining: dict[str, float] = field(default_factory=dict)
    # Seconds to wait before retrying, from Retry-After / retry-after-ms.
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens. ``cache_read``/``cache_write`` None means "same as input"."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    price: ModelPrice | None = None
    # Whether the provider advertises prompt caching for this model (Venice: pricing.cache_input
    # present). None when the provider says nothing either way.
    caching_advertised: bool | None = None


@dataclass(slots=True)
class RequestRecord:
    """Evidence for one logical request of a probe (possibly several HTTP attempts)."""

    label: str
    cold: bool  # first request for its prompt prefix: a cache hit here is pollution
    started_at: float = 0.0  # wall clock
    status: int | None = None
    attempts: int = 0
    request_id: str | None = None
    streamed: bool = False
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    completion_tokens: int | None = None
    latency_seconds: float | None = None  # request sent to last byte
    ttfb_seconds: float | None = None  # request sent to response headers
    ttft_seconds: float | None = None  # request sent to first generated token (streaming)
    # The run's own prompt was served from cache (exporter.hits): cached tokens beyond the
    # shared baseline cover a real share of it. None if the response reported no cache fields.
    hit: bool | None = None
    # The shared baseline (cached tokens every prompt shares) this request was judged with.
    baseline_tokens: int | None = None
    error_type: ErrorType | None = None
    error: str | None = None  # one line, never contains secrets
    cost: dict[str, float] = field(default_factory=dict)
    # The W3C span id its traceparent carried (every attempt the same; exporter.tracecontext).
    # None in rows stored before requests carried one.
    span_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None

    @property
    def run_cached_tokens(self) -> int | None:
        """Cached tokens beyond the baseline: how much of the run's own prompt was cached.
        None if not reported, or judged before baselines were recorded (old stored rows)."""
        if self.cached_tokens is None or self.baseline_tokens is None:
            return None
        return max(0, self.cached_tokens - self.baseline_tokens)

    def to_dict(self) -> dict[str, Any]:
        # Shallow: every field is a scalar but ``cost``. dataclasses.asdict's recursive deep
        # copy made a 1 000-run /api/runs answer cost 0.3 s of CPU (benchmarks/api_load_ttft).
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["cost"] = dict(self.cost)
        data["error_type"] = self.error_type.value if self.error_type else None
        data["run_cached_tokens"] = self.run_cached_tokens  # derived; ignored by from_dict
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("error_type"):
            known["error_type"] = ErrorType(known["error_type"])
        return cls(**known)


@dataclass(slots=True)
class SizeOutcome:
    """prompt_sizes: the result at one prompt size."""

    target_tokens: int
    verdict: Verdict
    hit_ratio: float | None = None
    prompt_tokens: int | None = None


@dataclass(slots=True)
class ProbeResult:
    """What one probe run found. Probes return this; they never raise."""

    probe: str
    provider: str
    model: str
    run_id: str
    verdict: Verdict
    started_at: float
    finished_at: float
    duration_seconds: float = 0.0
    hit_ratio: float | None = None
    requests: list[RequestRecord] = field(default_factory=list)
    error_type: ErrorType | None = None
    error: str | None = None
    # A cold request's cached tokens reached past the shared baseline into the run's prompt.
    pollution: bool = False
    # Cached tokens every prompt shares (template, BOS), learned from the cold requests;
    # None when no response reported cache fields (and in rows stored before it existed).
    baseline_tokens: int | None = None
    # Probe-specific findings (empty where they do not apply).
    sizes: dict[str, SizeOutcome] = field(default_factory=dict)  # prompt_sizes
    ttl: dict[float, bool | None] = field(default_factory=dict)  # ttl: delay -> hit
    first_miss_index: int | None = None  # persistence: 1-based index of first missed repeat
    shared_prefix_tokens: int | None = None  # partial
    # The W3C trace id every request of the run carried (exporter.tracecontext); None for a
    # run skipped before it started, and in rows stored before runs carried one.
    trace_id: str | None = None

    @property
    def caching_works(self) -> bool | None:
        return caching_works_for(self.verdict)

    @property
    def success(self) -> bool:
        """The probe produced a verdict (as opposed to failing or being skipped)."""
        return self.verdict not in (Verdict.ERROR, Verdict.SKIPPED)

    @property
    def cache_reported(self) -> bool | None:
        reported = [r.cached_tokens is not None for r in self.requests if r.ok]
        if not reported:
            return None
        return any(reported)

    @property
    def run_cached_tokens(self) -> int | None:
        """Σ cached tokens beyond the baseline over the run's requests; None if not reported."""
        own = [r.run_cached_tokens for r in self.requests if r.run_cached_tokens is not None]
        return sum(own) if own else None

    @property
    def ttft(self) -> TtftWitness:
        """Cold against warm time to first token: shown beside the verdict, never deciding."""
        return ttft_witness(self.requests)

    @property
    def ttl_max_hit_delay(self) -> float | None:
        hits = [d for d, hit in self.ttl.items() if hit]
        return max(hits) if hits else (0.0 if self.ttl else None)

    def to_dict(self) -> dict[str, Any]:
        ttft = self.ttft
        return {
            "probe": self.probe,
            "provider": self.provider,
            "model": self.model,
            "run_id": self.run_id,
            "trace_id": self.trace_id,
            "verdict": self.verdict.value,
            "caching_works": self.caching_works,
            "hit_ratio": self.hit_ratio,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_seconds": self.duration_seconds,
            "error_type": self.error_type.value if self.error_type else None,
            "error": self.error,
            "pollution": self.pollution,
            "cache_reported": self.cache_reported,
            "baseline_tokens": self.baseline_tokens,
            "run_cached_tokens": self.run_cached_tokens,
            "ttft": _ttft_dict(ttft),
            "sizes": {
                name: {
                    "target_tokens": s.target_tokens,
                    "verdict": s.verdict.value,
                    "hit_ratio": s.hit_ratio,
                    "prompt_tokens": s.prompt_tokens,
                }
                for name, s in self.sizes.items()
            },
            # JSON object keys are strings; delays round-trip through float().
            "ttl": {_delay_key(d): hit for d, hit in self.ttl.items()},
            "ttl_max_hit_delay_seconds": self.ttl_max_hit_delay,
            "first_miss_index": self.first_miss_index,
            "shared_prefix_tokens": self.shared_prefix_tokens,
            "requests": [
                {**r.to_dict(), "ttft_no_faster": slow}
                for r, slow in zip(self.requests, ttft.no_faster, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        return cls(
            probe=data["probe"],
            provider=data["provider"],
            model=data["model"],
            run_id=data["run_id"],
            verdict=Verdict(data["verdict"]),
            started_at=float(data["started_at"]),
            finished_at=float(data["finished_at"]),
            duration_seconds=float(data.get("duration_seconds") or 0.0),
            hit_ratio=data.get("hit_ratio"),
            requests=[RequestRecord.from_dict(r) for r in data.get("requests", [])],
            error_type=ErrorType(data["error_type"]) if data.get("error_type") else None,
            error=data.get("error"),
            pollution=bool(data.get("pollution", False)),
            baseline_tokens=data.get("baseline_tokens"),
            sizes={
                name: SizeOutcome(
                    target_tokens=int(s["target_tokens"]),
                    verdict=Verdict(s["verdict"]),
                    hit_ratio=s.get("hit_ratio"),
                    prompt_tokens=s.get("prompt_tokens"),
                )
                for name, s in (data.get("sizes") or {}).items()
            },
            ttl={float(d): hit for d, hit in (data.get("ttl") or {}).items()},
            first_miss_index=data.get("first_miss_index"),
            shared_prefix_tokens=data.get("shared_prefix_tokens"),
            trace_id=data.get("trace_id"),
        )


def _ttft_dict(ttft: TtftWitness) -> dict[str, Any]:
    return {
        "cold_seconds": ttft.cold_seconds,
        "warm_seconds": ttft.warm_seconds,
        "hit_seconds": ttft.hit_seconds,
        "hits_no_faster": ttft.slow_hits,
    }


def _delay_key(delay: float) -> str:
    return str(int(delay)) if float(delay).is_integer() else repr(float(delay))
