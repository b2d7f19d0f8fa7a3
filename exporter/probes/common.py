"""What every probe shares: the context it runs in, sending one request, and verdict rules."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from exporter.clock import Clock
from exporter.config import ProbesConfig
from exporter.prompts import DEFAULT_MARGIN, PromptFactory, new_run_id
from exporter.providers.base import HttpRequest, Prompt, ProviderAdapter
from exporter.results import ErrorType, ProbeResult, RequestRecord, ResponseMeta, Verdict
from exporter.transport import SpendGuard, Transport

# The defaults live in the configuration models; these are views for callers without a config.
_DEFAULTS = ProbesConfig()
DEFAULT_SIZES: dict[str, int] = dict(_DEFAULTS.prompt_sizes.sizes)
DEFAULT_TTL_DELAYS: tuple[float, ...] = tuple(_DEFAULTS.ttl.delays)


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    persistence_requests: int = _DEFAULTS.persistence.requests
    ttl_delays: tuple[float, ...] = DEFAULT_TTL_DELAYS
    partial_variants: int = 2
    # Prompt size relative to the provider minimum for basic/persistence/ttl/partial.
    margin: float = DEFAULT_MARGIN
    # A response counts as a hit when it reports more cached tokens than this. 0 per the SPEC;
    # raise it for servers that cache a chat-template prefix shorter than the run id
    # (llama.cpp reports a few cached tokens on every request).
    hit_threshold_tokens: int = 0


class ProbeAborted(Exception):
    """A request failed; the probe stops and reports what it has."""

    def __init__(self, record: RequestRecord) -> None:
        super().__init__(record.error or "request failed")
        self.record = record


@dataclass(slots=True)
class ProbeContext:
    """Everything a probe needs for one (provider, model). Probes only talk through this."""

    provider: str
    model: str
    adapter: ProviderAdapter
    transport: Transport
    prompts: PromptFactory
    clock: Clock
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    guard: SpendGuard | None = None
    run_id_factory: Callable[[], str] = new_run_id
    # Set per run by ``run_probe``; starts every prompt of the run.
    run_id: str = ""
    # Called with every request sent and its record (the CLI keeps bodies for curl commands).
    on_request: Callable[[HttpRequest, RequestRecord], None] | None = None
    # Filled while the probe runs, so evidence survives a deadline or a failure.
    records: list[RequestRecord] = field(default_factory=list)
    # What every response's headers said (balances, rate limits), in order; kept by the caller
    # (``run_probe`` does not replace this list), which hands it to the recorder.
    responses: list[ResponseMeta] = field(default_factory=list)

    @property
    def calibration_key(self) -> str:
        return f"{self.provider}/{self.model}"

    @property
    def min_tokens(self) -> int:
        return self.adapter.min_cacheable_for(self.model)

    def target_tokens(self, minimum: int | None = None) -> int:
        return math.ceil((minimum or self.min_tokens) * self.settings.margin)

    def prompt(self, run_id: str, target_tokens: int) -> Prompt:
        return self.prompts.prompt(self.calibration_key, run_id=run_id, target_tokens=target_tokens)

    def estimated_cost_tokens(self, prompt: Prompt) -> int:
        return (
            self.prompts.upper_bound_tokens(self.calibration_key, prompt) + self.adapter.max_tokens
        )

    async def send(self, prompt: Prompt, *, label: str, cold: bool) -> RequestRecord:
        """Send one logical request and record its evidence. Raises ProbeAborted on failure."""
        request = self.adapter.chat_request(self.model, prompt, stream=self.adapter.stream)
        record = RequestRecord(label=label, cold=cold, started_at=self.clock.time())
        self.records.append(record)
        exchange = await self.transport.complete(
            self.adapter,
            request,
            stream=self.adapter.stream,
            estimated_tokens=self.estimated_cost_tokens(prompt),
            guard=self.guard,
        )
        if exchange.status is not None:
            self.responses.append(exchange.meta)
        record.status = exchange.status
        record.attempts = exchange.attempts
        record.streamed = exchange.streamed
        record.request_id = exchange.meta.request_id
        record.latency_seconds = exchange.latency
        record.ttfb_seconds = exchange.ttfb
        record.ttft_seconds = exchange.ttft
        record.error_type = exchange.error_type
        record.error = exchange.error
        if exchange.completion is not None and exchange.error_type is None:
            usage = exchange.completion.usage
            record.prompt_tokens = usage.prompt_tokens
            record.cached_tokens = usage.cached_tokens
            record.cache_write_tokens = usage.cache_write_tokens
            record.completion_tokens = usage.completion_tokens
            record.cost = dict(exchange.completion.cost)
            if usage.cached_tokens is not None:
                record.hit = usage.cached_tokens > self.settings.hit_threshold_tokens
            self.prompts.observe(self.calibration_key, prompt, usage.prompt_tokens)
        if self.on_request is not None:
            self.on_request(request, record)
        if not record.ok:
            raise ProbeAborted(record)
        return record


def any_reported(records: Sequence[RequestRecord]) -> bool:
    return any(r.cached_tokens is not None for r in records if r.ok)


def is_hit(record: RequestRecord) -> bool:
    # Within a run where some response reported cache fields, a response without them is a
    # miss (Venice omits prompt_tokens_details when nothing was cached).
    return bool(record.hit)


def warm_verdict(warm: Sequence[RequestRecord], reported: bool) -> Verdict:
    """WORKS if every warm request hit, BROKEN if none did, FLAKY in between."""
    if not reported:
        return Verdict.NOT_REPORTED
    if not warm:
        return Verdict.ERROR
    hits = sum(1 for r in warm if is_hit(r))
    if hits == len(warm):
        return Verdict.WORKS
    if hits == 0:
        return Verdict.BROKEN
    return Verdict.FLAKY


def token_hit_ratio(records: Sequence[RequestRecord]) -> float | None:
    """cached / prompt tokens over warm requests that reported both."""
    prompt = sum(r.prompt_tokens or 0 for r in records if r.ok)
    if prompt <= 0 or not any_reported(records):
        return None
    cached = sum(r.cached_tokens or 0 for r in records if r.ok)
    return min(1.0, cached / prompt)


def polluted(records: Sequence[RequestRecord], threshold: int) -> bool:
    return any(r.cold and r.ok and (r.cached_tokens or 0) > threshold for r in records)


def new_result(ctx: ProbeContext, probe: str, verdict: Verdict = Verdict.ERROR) -> ProbeResult:
    """A result carrying the run's evidence; ``run_probe`` fills in the timing."""
    now = ctx.clock.time()
    return ProbeResult(
        probe=probe,
        provider=ctx.provider,
        model=ctx.model,
        run_id=ctx.run_id,
        verdict=verdict,
        started_at=now,
        finished_at=now,
        requests=ctx.records,
        pollution=polluted(ctx.records, ctx.settings.hit_threshold_tokens),
    )


def error_result(ctx: ProbeContext, probe: str, record: RequestRecord) -> ProbeResult:
    verdict = Verdict.SKIPPED if record.error_type is ErrorType.BUDGET else Verdict.ERROR
    result = new_result(ctx, probe, verdict)
    result.error_type = record.error_type
    result.error = f"{record.label}: {record.error}" if record.error else record.label
    return result


ProbeFn = Callable[[ProbeContext], Awaitable[ProbeResult]]
