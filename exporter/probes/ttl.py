"""ttl: prime, wait d, repeat, for every d in the delay schedule.

Each delay has its own nonce so one delay's repeat cannot refresh another's entry. All
primes go first and each repeat fires when its delay is up, so the probe takes about the
longest delay rather than the sum of all of them. The delay is measured from the end of
the prime, when the upstream has the prefix.
"""

from __future__ import annotations

from exporter.probes.common import (
    ProbeAborted,
    ProbeContext,
    any_reported,
    error_result,
    is_hit,
    new_result,
)
from exporter.probes.cost import CostInputs, ProbeCost
from exporter.providers.base import Prompt
from exporter.results import ProbeResult, RequestRecord, Verdict

NAME = "ttl"


async def run(ctx: ProbeContext) -> ProbeResult:
    delays = sorted(set(ctx.settings.ttl_delays))
    target = ctx.target_tokens()
    primed: list[tuple[float, Prompt, float]] = []
    records: list[RequestRecord] = []
    ttl: dict[float, bool | None] = {}
    try:
        for delay in delays:
            prompt = ctx.prompt(f"{ctx.run_id}-ttl{delay:g}", target)
            prime = await ctx.send(prompt, label=f"prime for {delay:g}s", cold=True)
            if (prime.prompt_tokens or 0) < ctx.min_tokens:
                return new_result(ctx, NAME, Verdict.BELOW_MINIMUM)
            records.append(prime)
            primed.append((delay, prompt, ctx.clock.monotonic()))
        for delay, prompt, primed_at in sorted(primed, key=lambda p: p[2] + p[0]):
            wait = primed_at + delay - ctx.clock.monotonic()
            if wait > 0:
                await ctx.clock.sleep(wait)
            repeat = await ctx.send(prompt, label=f"repeat after {delay:g}s", cold=False)
            records.append(repeat)
            ttl[delay] = is_hit(repeat)
    except ProbeAborted as exc:
        result = error_result(ctx, NAME, exc.record)
        result.ttl = ttl
        return result
    result = new_result(ctx, NAME, _verdict([bool(ttl[d]) for d in delays], any_reported(records)))
    result.ttl = ttl
    if result.verdict is not Verdict.NOT_REPORTED:
        result.hit_ratio = sum(1 for d in delays if ttl[d]) / len(delays)
    return result


def _verdict(hits: list[bool], reported: bool) -> Verdict:
    """Hits for a prefix of the (increasing) delays is a working cache with that TTL."""
    if not reported:
        return Verdict.NOT_REPORTED
    if not any(hits):
        return Verdict.BROKEN
    first_miss = hits.index(False) if False in hits else len(hits)
    return Verdict.WORKS if not any(hits[first_miss:]) else Verdict.FLAKY


# -- cost (exporter.probes.cost) ----------------------------------------------------------------


def estimate(inputs: CostInputs) -> ProbeCost:
    """A prime and a repeat per delay, at the target size."""
    size = inputs.target
    pair = (inputs.request(size), inputs.request(size, size))
    return ProbeCost(pair * len(set(inputs.settings.ttl_delays)))
