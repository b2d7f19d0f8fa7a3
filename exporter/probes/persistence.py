"""persistence: N identical requests in a row; does the cache keep hitting?

Reports the fraction of warm requests that hit (by the one rule of exporter.hits: their
own prompt served from cache, not just the shared template) and the first one that missed.
Requests inside the adapter's warm-up (DeepSeek persists prefixes lazily) are not held
against it.
"""

from __future__ import annotations

from exporter.probes.common import (
    ProbeAborted,
    ProbeContext,
    any_reported,
    error_result,
    is_hit,
    new_result,
    warm_verdict,
)
from exporter.probes.cost import CostInputs, ProbeCost
from exporter.results import ProbeResult, RequestRecord, Verdict

NAME = "persistence"


async def run(ctx: ProbeContext) -> ProbeResult:
    count = max(2, ctx.settings.persistence_requests)
    target = ctx.target_tokens()
    prompt = ctx.prompt(ctx.run_id, target)
    records: list[RequestRecord] = []
    try:
        first = await ctx.send(prompt, label="request 1", cold=True)
        if (first.prompt_tokens or 0) < ctx.min_tokens:
            # Calibrated now; start over cold under a new nonce.
            prompt = ctx.prompt(f"{ctx.run_id}-1", target)
            first = await ctx.send(prompt, label="request 1", cold=True)
            if (first.prompt_tokens or 0) < ctx.min_tokens:
                return new_result(ctx, NAME, Verdict.BELOW_MINIMUM)
        records.append(first)
        for i in range(2, count + 1):
            repeat = await ctx.send(prompt, label=f"request {i}", cold=False)
            records.append(repeat)
    except ProbeAborted as exc:
        return error_result(ctx, NAME, exc.record)
    skip = max(1, ctx.adapter.warmup_repeats)
    warm = records[skip:]
    result = new_result(ctx, NAME, warm_verdict(warm, any_reported(records)))
    if result.verdict is not Verdict.NOT_REPORTED and warm:
        hits = [is_hit(r) for r in warm]
        result.hit_ratio = sum(hits) / len(hits)
        misses = [skip + 1 + i for i, hit in enumerate(hits) if not hit]
        result.first_miss_index = misses[0] if misses else None
    return result


# -- cost (exporter.probes.cost) ----------------------------------------------------------------


def estimate(inputs: CostInputs) -> ProbeCost:
    """``requests`` identical requests at the target size, the first one cold."""
    count = max(2, inputs.settings.persistence_requests)
    size = inputs.target
    return ProbeCost((inputs.request(size), *(inputs.request(size, size),) * (count - 1)))
