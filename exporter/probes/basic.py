"""basic: prime an identical prompt just above the cacheable minimum, then repeat it.

Caching works when the repeat's own prompt was served from cache (exporter.hits: cached
tokens beyond the shared baseline the prime reported). Adapters that persist prefixes
lazily (DeepSeek) get up to ``warmup_repeats`` repeats before the verdict is "broken".
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.probes.common import (
    ProbeAborted,
    ProbeContext,
    any_reported,
    error_result,
    is_hit,
    new_result,
    token_hit_ratio,
)
from exporter.probes.cost import CostInputs, ProbeCost, RequestEstimate
from exporter.results import ProbeResult, RequestRecord, Verdict

NAME = "basic"


@dataclass(slots=True)
class PrimeRepeat:
    verdict: Verdict
    hit_ratio: float | None
    prompt_tokens: int | None


async def prime_and_repeat(
    ctx: ProbeContext, nonce: str, target_tokens: int, label: str = ""
) -> PrimeRepeat:
    """Prime a fresh prompt and repeat it. Raises ProbeAborted if a request fails."""
    minimum = ctx.min_tokens
    prefix = f"{label} " if label else ""
    prime: RequestRecord | None = None
    prompt = ctx.prompt(nonce, target_tokens)
    for attempt in range(2):
        if attempt:
            # The first prime taught the calibrator the real size; rebuild under a new nonce
            # so the retry is cold too.
            prompt = ctx.prompt(f"{nonce}-{attempt}", target_tokens)
        prime = await ctx.send(prompt, label=f"{prefix}prime", cold=True)
        if (prime.prompt_tokens or 0) >= minimum:
            break
    assert prime is not None
    if (prime.prompt_tokens or 0) < minimum:
        return PrimeRepeat(Verdict.BELOW_MINIMUM, None, prime.prompt_tokens)
    repeats: list[RequestRecord] = []
    for i in range(max(1, ctx.adapter.warmup_repeats)):
        suffix = "" if i == 0 else f" {i + 1}"
        repeat = await ctx.send(prompt, label=f"{prefix}repeat{suffix}", cold=False)
        repeats.append(repeat)
        if is_hit(repeat):
            break
    last = repeats[-1]
    if not any_reported([prime, *repeats]):
        return PrimeRepeat(Verdict.NOT_REPORTED, None, prime.prompt_tokens)
    verdict = Verdict.WORKS if is_hit(last) else Verdict.BROKEN
    return PrimeRepeat(verdict, token_hit_ratio(ctx, [last]), prime.prompt_tokens)


async def run(ctx: ProbeContext) -> ProbeResult:
    try:
        outcome = await prime_and_repeat(ctx, ctx.run_id, ctx.target_tokens())
    except ProbeAborted as exc:
        return error_result(ctx, NAME, exc.record)
    result = new_result(ctx, NAME, outcome.verdict)
    result.hit_ratio = outcome.hit_ratio
    return result


# -- cost (exporter.probes.cost) ----------------------------------------------------------------


def estimate(inputs: CostInputs) -> ProbeCost:
    """A prime and up to ``warmup_repeats`` repeats of one prompt at the target size."""
    return ProbeCost(prime_and_repeat_cost(inputs, inputs.target))


def prime_and_repeat_cost(inputs: CostInputs, size: int) -> tuple[RequestEstimate, ...]:
    repeats = max(1, inputs.warmup_repeats)
    return (inputs.request(size), *(inputs.request(size, size) for _ in range(repeats)))
