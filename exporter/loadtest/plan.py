"""Planning a load test: its prompts, and what it will cost before anything is sent.

Every request starts with the run's own shared prefix (the run id first, so no other run
shares it) and ends with its own short suffix, so a warm request can be served the prefix
from cache but never a whole earlier prompt. The estimate is made from the prompts that
will be sent, so the cap is checked against the real plan, not a rule of thumb.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from exporter.prompts import DEFAULT_MARGIN, PromptFactory, count_units
from exporter.providers.base import Prompt
from exporter.results import ModelPrice

# A modest ceiling: about $0.08 at $0.15 per million input tokens, $1.50 at $3. -n 200 at
# the default prefix of an OpenAI-style model (about 1,150 tokens a request) is half of it.
DEFAULT_MAX_TOTAL_TOKENS = 500_000
MAX_REQUESTS = 10_000
MAX_CONCURRENCY = 256
MAX_PREFIX_TOKENS = 200_000
# Each request's own user message: short, so nearly all of the prompt is the shared prefix.
SUFFIX_TOKENS = 48
# Role and template tokens around the two messages (OpenAI's chat format adds 4 per message
# plus 3); the prompt text itself is estimated from its words.
CHAT_OVERHEAD_TOKENS = 16
# Room for those template tokens, so the shared prefix itself clears the minimum (as the
# partial probe does).
_TEMPLATE_SLACK = 16


class PlanError(ValueError):
    """A load test that cannot be planned as asked; the message is one line."""


@dataclass(frozen=True, slots=True)
class LoadOptions:
    requests: int
    concurrency: int
    duration: float | None = None  # seconds after which no new request starts
    shared_prefix: int | None = None  # tokens; None: just above the provider's minimum
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.requests <= MAX_REQUESTS:
            raise PlanError(f"-n: must be between 1 and {MAX_REQUESTS}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise PlanError(f"-c: must be between 1 and {MAX_CONCURRENCY}")
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise PlanError("--duration: must be positive")
        if self.shared_prefix is not None and not 1 <= self.shared_prefix <= MAX_PREFIX_TOKENS:
            raise PlanError(f"--shared-prefix: must be between 1 and {MAX_PREFIX_TOKENS}")
        if self.max_total_tokens < 1:
            raise PlanError("--max-total-tokens: must be at least 1")


@dataclass(frozen=True, slots=True)
class Estimate:
    """What the planned requests cost at most in tokens (and USD where a price is known)."""

    requests: int
    prompt_tokens: int
    completion_tokens: int  # max_tokens per request: the most a reply may take
    usd: float | None = None  # every prompt token at the uncached input price

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def priced(self, price: ModelPrice | None) -> Estimate:
        if price is None:
            return self
        usd = (self.prompt_tokens * price.input + self.completion_tokens * price.output) / 1e6
        return Estimate(self.requests, self.prompt_tokens, self.completion_tokens, usd)

    def refusal(self, cap: int) -> str | None:
        """The one-line reason not to start, or None when the plan fits under ``cap``."""
        if self.total_tokens <= cap:
            return None
        return (
            f"estimated {self.total_tokens:,} tokens ({self.prompt_tokens:,} prompt + "
            f"{self.completion_tokens:,} completion for {self.requests} requests) exceed "
            f"--max-total-tokens {cap:,}; not started (raise the cap or lower -n)"
        )


@dataclass(frozen=True, slots=True)
class LoadPlan:
    options: LoadOptions
    run_id: str
    calibration_key: str
    prefix_tokens: int  # the shared prefix aimed for
    min_cacheable_tokens: int
    max_tokens: int
    prompts: Sequence[Prompt]  # one per request, in sending order
    estimate: Estimate

    @property
    def below_minimum(self) -> bool:
        return self.prefix_tokens < self.min_cacheable_tokens


def default_prefix_tokens(min_cacheable_tokens: int) -> int:
    """Just above the provider's minimum, as the probes aim: cacheable, and cheap."""
    return math.ceil(max(1, min_cacheable_tokens) * DEFAULT_MARGIN) + _TEMPLATE_SLACK


def plan_load(
    options: LoadOptions,
    *,
    run_id: str,
    calibration_key: str,
    min_cacheable_tokens: int,
    max_tokens: int,
    prompts: PromptFactory,
) -> LoadPlan:
    prefix = options.shared_prefix or default_prefix_tokens(min_cacheable_tokens)
    built = prompts.partial_prompts(
        calibration_key,
        run_id=run_id,
        prefix_tokens=prefix,
        variants=options.requests,
        user_tokens=SUFFIX_TOKENS,
    )
    # The shared system prompt is one string: count it once, not once per request.
    ratio = prompts.calibrator.ratio(calibration_key)
    system_units = count_units(built[0].system)
    prompt_tokens = sum(
        math.ceil((system_units + count_units(p.user)) * ratio) + CHAT_OVERHEAD_TOKENS
        for p in built
    )
    estimate = Estimate(options.requests, prompt_tokens, options.requests * max_tokens)
    return LoadPlan(
        options=options,
        run_id=run_id,
        calibration_key=calibration_key,
        prefix_tokens=prefix,
        min_cacheable_tokens=min_cacheable_tokens,
        max_tokens=max_tokens,
        prompts=built,
        estimate=estimate,
    )
