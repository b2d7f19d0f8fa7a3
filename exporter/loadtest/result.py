"""What a load test found: per-request evidence, and its summary for cold and warm requests.

A request is **cold** when it was sent before any earlier request of the run had come back
successfully: nothing the run sent can have been cached by a completed request yet. Every
later request is **warm**. (A server that shares a prefix still being computed for a
concurrent request may serve a cold request from cache; those are counted as cold hits,
not pollution: the run id is new, so what they share can only be the run's own.)

Hits are judged once the run is over, by the probes' rule (exporter.hits): the shared
baseline is learned from the cold requests, and a request hits when its cached tokens
beyond the baseline cover a real share of its shared prefix. Only cold requests that report
no more than ``hits.SHARED_PREFIX_CAP`` cached tokens teach the baseline: a cold hit beyond
the cap is the run's own prefix, and would otherwise lift the baseline to the cap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from exporter import hits
from exporter.loadtest.plan import Estimate, LoadOptions
from exporter.loadtest.stats import Summary, summarize
from exporter.pricing import request_cost, resolve_price
from exporter.probes.common import warm_verdict
from exporter.results import ModelPrice, RequestRecord, Verdict, caching_works_for

# A retry that came this much earlier than Retry-After asked still counts as honouring it:
# timers may fire a little early.
RETRY_AFTER_TOLERANCE = 0.005
STOP_REASONS = (
    "completed",
    "duration",
    "interrupted",
    "token_cap",
    "auth",
    "insufficient_funds",
)


@dataclass(slots=True)
class Attempt:
    """One HTTP attempt of a request, as the client saw it (seconds from the run's start)."""

    sent_at: float
    status: int | None = None  # None: no response (connection error, timeout)
    answered_at: float | None = None
    retry_after: float | None = None  # what a response asked for, in seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent_at": self.sent_at,
            "status": self.status,
            "answered_at": self.answered_at,
            "retry_after": self.retry_after,
        }


@dataclass(slots=True)
class LoadRequest:
    """One logical request of the load test and every attempt it took."""

    index: int  # 1-based, in sending order
    sent_at: float  # seconds from the run's start
    record: RequestRecord
    attempts: list[Attempt] = field(default_factory=list)
    cancelled: bool = False  # cut off by Ctrl-C: no outcome, left out of the statistics
    cacheable_tokens: int | None = None  # its shared prefix, as measured from its reply

    @property
    def done(self) -> bool:
        return not self.cancelled


@dataclass(frozen=True, slots=True)
class ClassStats:
    """Cold or warm requests: counts and order statistics."""

    requests: int
    ok: int
    hits: int
    latency: Summary
    ttft: Summary
    output_tokens_per_second: Summary  # per request: completion tokens ÷ its latency
    hit_ratio: float | None  # Σ own cached ÷ Σ own shared-prefix tokens (exporter.hits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "hits": self.hits,
            "hit_ratio": self.hit_ratio,
            "latency_seconds": self.latency.to_dict(),
            "ttft_seconds": self.ttft.to_dict(),
            "output_tokens_per_second": self.output_tokens_per_second.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class RateLimits:
    """429 responses, and whether the retry after each waited as long as it was told."""

    responses: int = 0
    retried: int = 0
    honoured: int = 0
    waited_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "responses": self.responses,
            "retried": self.retried,
            "honoured": self.honoured,
            "waited_seconds": self.waited_seconds,
        }


@dataclass(frozen=True, slots=True)
class Spend:
    prompt_tokens: int
    cached_tokens: int | None
    completion_tokens: int
    usd: float | None  # at the model's price; None: not priced
    savings_usd: float | None
    # What the provider itself reported charging, by currency (Venice: usd, diem).
    reported_cost: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "usd": self.usd,
            "savings_usd": self.savings_usd,
            "reported_cost": dict(self.reported_cost),
        }


@dataclass(frozen=True, slots=True)
class LoadTarget:
    provider_type: str
    base_url: str
    model: str
    streamed: bool
    max_tokens: int
    price: ModelPrice | None = None


@dataclass(frozen=True, slots=True)
class LoadResult:
    target: LoadTarget
    options: LoadOptions
    run_id: str
    estimate: Estimate
    started_at: float  # wall clock
    duration_seconds: float
    stopped: str  # one of STOP_REASONS
    prefix_tokens: int  # aimed for
    requests: Sequence[LoadRequest]
    cold: ClassStats
    warm: ClassStats
    verdict: Verdict
    baseline_tokens: int | None
    shared_prefix_tokens: int | None  # measured from the first successful reply
    statuses: dict[str, int]  # every HTTP attempt's status ("none": no response)
    errors: dict[str, int]  # requests that failed, by error type
    rate_limits: RateLimits
    spend: Spend
    trace_id: str | None = None  # the run's W3C trace (every request a span of it)

    @property
    def caching_works(self) -> bool | None:
        return caching_works_for(self.verdict)

    @property
    def hit_ratio(self) -> float | None:
        return self.warm.hit_ratio

    @property
    def hit_share(self) -> float | None:
        """Warm requests served the prefix from cache ÷ successful warm requests."""
        return self.warm.hits / self.warm.ok if self.warm.ok else None

    @property
    def sent(self) -> int:
        """Requests that reached the wire (one the token cap denied never did)."""
        return sum(1 for r in self.requests if r.attempts)

    @property
    def cancelled(self) -> int:
        return sum(1 for r in self.requests if r.cancelled)

    @property
    def throughput(self) -> dict[str, float | None]:
        seconds = self.duration_seconds
        ok = self.cold.ok + self.warm.ok
        if seconds <= 0:
            return {"requests_per_second": None, "output_tokens_per_second": None}
        return {
            "requests_per_second": ok / seconds,
            "output_tokens_per_second": self.spend.completion_tokens / seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        options = self.options
        return {
            "provider_type": self.target.provider_type,
            "base_url": self.target.base_url,
            "model": self.target.model,
            "run_id": self.run_id,
            "trace_id": self.trace_id,
            "options": {
                "requests": options.requests,
                "concurrency": options.concurrency,
                "duration_seconds": options.duration,
                "shared_prefix_tokens": self.prefix_tokens,
                "max_total_tokens": options.max_total_tokens,
                "max_tokens": self.target.max_tokens,
                "stream": self.target.streamed,
            },
            "estimate": {
                "prompt_tokens": self.estimate.prompt_tokens,
                "completion_tokens": self.estimate.completion_tokens,
                "total_tokens": self.estimate.total_tokens,
                "usd": self.estimate.usd,
            },
            "started_at": self.started_at,
            "duration_seconds": self.duration_seconds,
            "stopped": self.stopped,
            "sent": self.sent,
            "cancelled": self.cancelled,
            "verdict": self.verdict.value,
            "caching_works": self.caching_works,
            "hit_ratio": self.hit_ratio,
            "hit_share": self.hit_share,
            "cold_hits": self.cold.hits,
            "baseline_tokens": self.baseline_tokens,
            "shared_prefix_tokens": self.shared_prefix_tokens,
            "cold": self.cold.to_dict(),
            "warm": self.warm.to_dict(),
            "throughput": self.throughput,
            "statuses": dict(self.statuses),
            "errors": dict(self.errors),
            "rate_limits": self.rate_limits.to_dict(),
            "spend": self.spend.to_dict(),
            "requests": [request_dict(r) for r in self.requests],
        }


def request_dict(request: LoadRequest) -> dict[str, Any]:
    return {
        "index": request.index,
        "sent_at": request.sent_at,
        "cancelled": request.cancelled,
        "cacheable_tokens": request.cacheable_tokens,
        **request.record.to_dict(),
        "attempt_log": [a.to_dict() for a in request.attempts],
    }


def judge(requests: Sequence[LoadRequest]) -> hits.HitRule | None:
    """Judge every finished request by the run's rule; None if no reply had cache fields."""
    records = [r.record for r in requests if r.done]
    if not hits.any_reported(records):
        return None
    template_only = [r for r in records if (r.cached_tokens or 0) <= hits.SHARED_PREFIX_CAP]
    rule = hits.rule_for(template_only or records)
    for request in requests:
        record = request.record
        if request.cancelled or not record.ok or record.prompt_tokens is None:
            continue
        # As in the probes: once any reply reported cache fields, one without them is a miss.
        record.baseline_tokens = rule.baseline if record.cached_tokens is not None else None
        record.hit = bool(rule.is_hit(record.cached_tokens, request.cacheable_tokens))
    return rule


def class_stats(requests: Sequence[LoadRequest], rule: hits.HitRule | None) -> ClassStats:
    done = [r for r in requests if r.done and r.attempts]  # sent, and not cut off
    ok = [r for r in done if r.record.ok and r.record.prompt_tokens is not None]
    records = [r.record for r in ok]
    ratio = None
    if rule is not None:
        room = sum(rule.own_tokens(r.cacheable_tokens) for r in ok)
        own = sum(rule.own_cached(r.record.cached_tokens) or 0 for r in ok)
        ratio = min(1.0, own / room) if room > 0 else None
    return ClassStats(
        requests=len(done),
        ok=len(ok),
        hits=sum(1 for r in records if r.hit),
        latency=summarize(r.latency_seconds for r in records),
        ttft=summarize(r.ttft_seconds for r in records),
        output_tokens_per_second=summarize(_output_rate(r) for r in records),
        hit_ratio=ratio,
    )


def _output_rate(record: RequestRecord) -> float | None:
    if not record.completion_tokens or not record.latency_seconds:
        return None
    return record.completion_tokens / record.latency_seconds


def rate_limits(requests: Sequence[LoadRequest]) -> RateLimits:
    responses = retried = honoured = 0
    waited = 0.0
    for request in requests:
        attempts = request.attempts
        for i, attempt in enumerate(attempts):
            if attempt.status != 429:
                continue
            responses += 1
            if i + 1 >= len(attempts) or attempt.answered_at is None:
                continue  # the last attempt: the request failed as rate_limit
            retried += 1
            gap = attempts[i + 1].sent_at - attempt.answered_at
            waited += max(0.0, gap)
            if gap + RETRY_AFTER_TOLERANCE >= (attempt.retry_after or 0.0):
                honoured += 1
    return RateLimits(responses, retried, honoured, waited)


def spend(requests: Sequence[LoadRequest], price: ModelPrice | None) -> Spend:
    records = [r.record for r in requests if r.record.ok and r.record.prompt_tokens is not None]
    usd: float | None = None
    savings: float | None = None
    if price is not None:
        info = resolve_price(None, price)
        costs = [request_cost(info, r) for r in records]
        usd = sum(c[0] for c in costs)
        savings = sum(c[1] for c in costs)
    reported: Counter[str] = Counter()
    for record in records:
        reported.update(record.cost)
    cached = [r.cached_tokens for r in records if r.cached_tokens is not None]
    return Spend(
        prompt_tokens=sum(r.prompt_tokens or 0 for r in records),
        cached_tokens=sum(cached) if cached else None,
        completion_tokens=sum(r.completion_tokens or 0 for r in records),
        usd=usd,
        savings_usd=savings,
        reported_cost=dict(sorted(reported.items())),
    )


def build_result(
    *,
    target: LoadTarget,
    options: LoadOptions,
    run_id: str,
    estimate: Estimate,
    prefix_tokens: int,
    started_at: float,
    duration_seconds: float,
    stopped: str,
    requests: Sequence[LoadRequest],
    trace_id: str | None = None,
) -> LoadResult:
    rule = judge(requests)
    cold = [r for r in requests if r.record.cold]
    warm = [r for r in requests if not r.record.cold]
    warm_ok = [r.record for r in warm if r.done and r.record.ok]
    answered = any(r.done and r.record.ok for r in requests)
    statuses = Counter(
        "none" if a.status is None else str(a.status) for r in requests for a in r.attempts
    )
    errors = Counter(
        str(r.record.error_type) for r in requests if r.done and r.record.error_type is not None
    )
    measured = next(
        (r.cacheable_tokens for r in requests if r.done and r.cacheable_tokens is not None), None
    )
    return LoadResult(
        target=target,
        options=options,
        run_id=run_id,
        estimate=estimate,
        started_at=started_at,
        duration_seconds=duration_seconds,
        stopped=stopped,
        prefix_tokens=prefix_tokens,
        requests=tuple(requests),
        cold=class_stats(cold, rule),
        warm=class_stats(warm, rule),
        verdict=warm_verdict(warm_ok, rule is not None) if answered else Verdict.ERROR,
        baseline_tokens=None if rule is None else rule.baseline,
        shared_prefix_tokens=measured,
        statuses=dict(sorted(statuses.items())),
        errors=dict(sorted(errors.items())),
        rate_limits=rate_limits(requests),
        spend=spend(requests, target.price),
        trace_id=trace_id,
    )
