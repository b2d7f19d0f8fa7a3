"""What every probe shares: the context it runs in, sending one request, and verdict rules."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from exporter import hits, tracecontext
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
    # Not needed by default: the shared baseline (template tokens every prompt shares) is
    # learned from each run's cold requests, capped at hits.SHARED_PREFIX_CAP. Set it only for
    # a server known to share more than the cap before the run id (a gateway injecting a long
    # system prompt): cached tokens up to this many then never count, as hit or as pollution.
    hit_threshold_tokens: int | None = None


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
    # The run's W3C trace: every request carries it, each with its own span id. A fresh one
    # per run (``run_probe``); a load test sets one for all its requests.
    trace_id: str = field(default_factory=tracecontext.new_trace_id)
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

    def hit_rule(self) -> hits.HitRule:
        """The run's hit rule, its baseline learned from the cold requests sent so far."""
        return hits.rule_for(self.records, fixed=self.settings.hit_threshold_tokens)

    async def send(
        self, prompt: Prompt, *, label: str, cold: bool, cacheable: int | None = None
    ) -> RequestRecord:
        """Send one logical request and record its evidence. Raises ProbeAborted on failure.

        The response is judged by the run's hit rule; ``cacheable`` is the part of the prompt
        that could be served from cache (default: all of it; partial: the shared prefix).
        """
        span_id = tracecontext.new_span_id()
        request = self.adapter.chat_request(self.model, prompt, stream=self.adapter.stream)
        # Every attempt carries it (the transport resends this request); so does the replay.
        # Ours replaces any configured in extra_headers: one run, one trace.
        headers = {k: v for k, v in request.headers.items() if k.lower() != tracecontext.HEADER}
        headers[tracecontext.HEADER] = tracecontext.traceparent(self.trace_id, span_id)
        request = replace(request, headers=headers)
        record = RequestRecord(
            label=label, cold=cold, started_at=self.clock.time(), span_id=span_id
        )
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
                # A cold record joins the baseline before it is judged: what it reports up to
                # the cap is shared, never a hit (beyond the cap it was served from cache).
                rule = self.hit_rule()
                record.baseline_tokens = rule.baseline
                record.hit = rule.is_hit(usage.cached_tokens, cacheable or usage.prompt_tokens)
            self.prompts.observe(self.calibration_key, prompt, usage.prompt_tokens)
        if self.on_request is not None:
            self.on_request(request, record)
        if not record.ok:
            raise ProbeAborted(record)
        return record


any_reported = hits.any_reported


def is_hit(record: RequestRecord) -> bool:
    # Decided when the response arrived (ProbeContext.send). Within a run where some response
    # reported cache fields, a response without them is a miss (Venice omits
    # prompt_tokens_details when nothing was cached).
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


def token_hit_ratio(ctx: ProbeContext, records: Sequence[RequestRecord]) -> float | None:
    """Run-specific cached ÷ run-specific prompt tokens over ``records`` (see exporter.hits)."""
    return hits.token_ratio(records, ctx.hit_rule())


def judge_run(result: ProbeResult, settings: ProbeSettings) -> None:
    """The run-level findings of the hit rule: the baseline and pollution."""
    records = result.requests
    rule = hits.rule_for(records, fixed=settings.hit_threshold_tokens)
    result.baseline_tokens = rule.baseline if hits.any_reported(records) else None
    result.pollution = hits.polluted(records, rule)


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
        trace_id=ctx.trace_id,
    )


def error_result(ctx: ProbeContext, probe: str, record: RequestRecord) -> ProbeResult:
    verdict = Verdict.SKIPPED if record.error_type is ErrorType.BUDGET else Verdict.ERROR
    result = new_result(ctx, probe, verdict)
    result.error_type = record.error_type
    result.error = f"{record.label}: {record.error}" if record.error else record.label
    return result


ProbeFn = Callable[[ProbeContext], Awaitable[ProbeResult]]
