"""What a probe run costs: the one cost model behind the budget pre-check, the per-request
reservations and the forecast.

Every probe module ends with ``estimate(inputs) -> ProbeCost``: the requests one run sends
(upper bound on their number), each with the prompt size it is built to and the completion
tokens it may return. From that one list:

* the **forecast** (check-config and ``llmcache_forecast_daily``) sums the prompt sizes: what
  the schedule is expected to bill, because prompts are calibrated to their target size;
* the **pre-check** before a run sums each request's reservation bound, the same bound the
  transport reserves per request (``PromptFactory.upper_bound_tokens``), so a run the budget
  cannot finish is not started.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from exporter.pricing import reservation_usd
from exporter.probes.common import ProbeSettings
from exporter.results import ModelPrice


@dataclass(frozen=True, slots=True)
class CostInputs:
    """What one run's cost depends on, for one provider and model."""

    minimum: int  # the model's minimum cacheable prompt (tokens)
    warmup_repeats: int
    max_tokens: int
    settings: ProbeSettings

    @property
    def target(self) -> int:
        """The prompt size of basic, persistence, ttl and partial's shared prefix."""
        return math.ceil(self.minimum * self.settings.margin)

    def request(self, prompt_tokens: int, cached_tokens: int = 0) -> RequestEstimate:
        return RequestEstimate(prompt_tokens, self.max_tokens, cached_tokens)


@dataclass(frozen=True, slots=True)
class RequestEstimate:
    prompt_tokens: int  # what the prompt is built to
    completion_tokens: int  # max_tokens: the most the request can return
    cached_tokens: int = 0  # expected cache reads when caching works (for the USD forecast)


@dataclass(frozen=True, slots=True)
class ProbeCost:
    requests: tuple[RequestEstimate, ...]

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.requests)

    def upper_bound_tokens(self, bound: Callable[[int], int]) -> int:
        """Tokens to have room for before starting: ``bound`` maps a prompt size to its
        reservation (the transport's own per-request bound), completion added."""
        return sum(bound(r.prompt_tokens) + r.completion_tokens for r in self.requests)

    def upper_bound_usd(self, bound: Callable[[int], int], price: ModelPrice | None) -> float:
        """USD to have room for, each request priced exactly as its reservation is."""
        return sum(
            reservation_usd(price, bound(r.prompt_tokens), r.completion_tokens)
            for r in self.requests
        )

    def expected_usd(self, price: ModelPrice) -> float:
        """What a run is expected to cost when caching works: cold prompt tokens at the
        cache-write rate where there is one (they are written), cached ones at the read rate."""
        read = price.input if price.cache_read is None else price.cache_read
        write = price.input if price.cache_write is None else price.cache_write
        total = 0.0
        for r in self.requests:
            uncached = r.prompt_tokens - r.cached_tokens
            total += (
                uncached * (write if r.cached_tokens == 0 else price.input)
                + r.cached_tokens * read
                + r.completion_tokens * price.output
            )
        return total / 1e6


ProbeEstimate = Callable[[CostInputs], ProbeCost]
