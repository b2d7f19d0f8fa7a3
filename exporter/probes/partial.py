"""partial: one long system prompt, different user messages.

Later requests share only the system prefix with the prime, so their cached tokens should
be about the shared prefix. They are judged on the same basis as every probe (exporter.hits),
against the prefix rather than the whole prompt: ratio = run-specific cached ÷ run-specific
shared-prefix tokens (the shared baseline taken off both).
"""

from __future__ import annotations

from exporter.probes.common import (
    ProbeAborted,
    ProbeContext,
    any_reported,
    error_result,
    new_result,
    warm_verdict,
)
from exporter.probes.cost import CostInputs, ProbeCost
from exporter.prompts import PARTIAL_USER_TOKENS
from exporter.results import ProbeResult, RequestRecord, Verdict

NAME = "partial"
# Room for the chat template's tokens around the system message, so the shared prefix
# itself (not just the whole prompt) clears the minimum.
_TEMPLATE_SLACK = 16


async def run(ctx: ProbeContext) -> ProbeResult:
    key = ctx.calibration_key
    prompts = ctx.prompts.partial_prompts(
        key,
        run_id=ctx.run_id,
        prefix_tokens=ctx.target_tokens() + _TEMPLATE_SLACK,
        variants=1 + ctx.settings.partial_variants,
    )
    variants: list[RequestRecord] = []
    try:
        prime = await ctx.send(prompts[0], label="prime", cold=True)
        # Everything but the user message is shared; the user text is short, so the
        # calibrated estimate of its size is accurate to a few tokens.
        shared = max(0, (prime.prompt_tokens or 0) - ctx.prompts.user_tokens(key, prompts[0]))
        if shared < ctx.min_tokens:
            result = new_result(ctx, NAME, Verdict.BELOW_MINIMUM)
            result.shared_prefix_tokens = shared
            return result
        for i, prompt in enumerate(prompts[1:], start=1):
            variants.append(
                await ctx.send(prompt, label=f"variant {i}", cold=False, cacheable=shared)
            )
    except ProbeAborted as exc:
        return error_result(ctx, NAME, exc.record)
    reported = any_reported([prime, *variants])
    result = new_result(ctx, NAME, warm_verdict(variants, reported))
    result.shared_prefix_tokens = shared
    rule = ctx.hit_rule()
    ratios = [rule.ratio(r.cached_tokens or 0, shared) for r in variants] if reported else []
    known = [r for r in ratios if r is not None]
    if known:
        result.hit_ratio = sum(known) / len(known)
    return result


# -- cost (exporter.probes.cost) ----------------------------------------------------------------


def estimate(inputs: CostInputs) -> ProbeCost:
    """A prime and ``partial_variants`` variants sharing its system prompt."""
    prefix = inputs.target + _TEMPLATE_SLACK
    size = prefix + PARTIAL_USER_TOKENS
    variants = inputs.settings.partial_variants
    return ProbeCost((inputs.request(size), *(inputs.request(size, prefix),) * variants))
