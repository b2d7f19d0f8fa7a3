"""prompt_sizes: the basic probe at several prompt sizes (about 1.1k, 2k, 4k, 8k tokens).

Sizes below the model's cacheable minimum are reported as ``below_minimum`` without being
sent: they cannot hit, and a miss there is not a failure.
"""

from __future__ import annotations

from exporter.probes.basic import prime_and_repeat, prime_and_repeat_cost
from exporter.probes.common import ProbeAborted, ProbeContext, error_result, new_result
from exporter.probes.cost import CostInputs, ProbeCost
from exporter.results import ProbeResult, SizeOutcome, Verdict

NAME = "prompt_sizes"


async def run(ctx: ProbeContext) -> ProbeResult:
    sizes: dict[str, SizeOutcome] = {}
    minimum = ctx.min_tokens
    for name, target in sorted(ctx.settings.sizes.items(), key=lambda item: item[1]):
        if target < minimum:
            sizes[name] = SizeOutcome(target, Verdict.BELOW_MINIMUM)
            continue
        try:
            # Each size gets its own nonce: sizes must not read each other's prefixes.
            outcome = await prime_and_repeat(ctx, f"{ctx.run_id}-{name}", target, label=name)
        except ProbeAborted as exc:
            result = error_result(ctx, NAME, exc.record)
            result.sizes = sizes
            return result
        sizes[name] = SizeOutcome(target, outcome.verdict, outcome.hit_ratio, outcome.prompt_tokens)
    result = new_result(ctx, NAME, _overall(list(sizes.values())))
    ratios = [s.hit_ratio for s in sizes.values() if s.hit_ratio is not None]
    result.hit_ratio = sum(ratios) / len(ratios) if ratios else None
    result.sizes = sizes
    return result


def _overall(outcomes: list[SizeOutcome]) -> Verdict:
    decided = [o.verdict for o in outcomes if o.verdict in (Verdict.WORKS, Verdict.BROKEN)]
    if not decided:
        eligible = [o for o in outcomes if o.verdict is not Verdict.BELOW_MINIMUM]
        return Verdict.NOT_REPORTED if eligible else Verdict.BELOW_MINIMUM
    works = decided.count(Verdict.WORKS)
    if works == len(decided):
        return Verdict.WORKS
    return Verdict.BROKEN if works == 0 else Verdict.PARTIAL


# -- cost (exporter.probes.cost) ----------------------------------------------------------------


def estimate(inputs: CostInputs) -> ProbeCost:
    """basic's prime and repeats at every size the model can cache (smaller ones are not sent)."""
    sizes = sorted(s for s in inputs.settings.sizes.values() if s >= inputs.minimum)
    return ProbeCost(tuple(r for size in sizes for r in prime_and_repeat_cost(inputs, size)))
