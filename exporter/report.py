"""What one probe run hands to the recorder: the probe's result plus everything the run saw.

The run (``exporter.runtime.run_job``) builds one ``RunReport`` and nothing else writes state:
the recorder applies the report to the in-memory state and the store. The report is frozen;
the ``ProbeResult`` inside it is final once the run has returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from exporter.pricing import PriceInfo, request_cost, resolve_price
from exporter.results import ProbeResult, ResponseMeta


@dataclass(frozen=True, slots=True)
class RequestCost:
    spend_usd: float = 0.0
    savings_usd: float = 0.0


def _frozen(values: Mapping[str, float] | None = None) -> Mapping[str, float]:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True, slots=True)
class ResponseFacts:
    """What response headers told us across a run or a request: the latest value of each."""

    balances: Mapping[str, float] = field(default_factory=_frozen)
    ratelimit: Mapping[str, float] = field(default_factory=_frozen)

    @classmethod
    def of(cls, metas: Iterable[ResponseMeta]) -> ResponseFacts:
        balances: dict[str, float] = {}
        ratelimit: dict[str, float] = {}
        for meta in metas:
            balances.update(meta.balances)
            ratelimit.update(meta.ratelimit_remaining)
        return cls(_frozen(balances), _frozen(ratelimit))


@dataclass(frozen=True, slots=True)
class RunReport:
    result: ProbeResult
    price: PriceInfo = field(default_factory=lambda: resolve_price(None, None))
    costs: tuple[RequestCost, ...] = ()  # one per result.requests entry
    facts: ResponseFacts = field(default_factory=ResponseFacts)
    # Whether the run reached the provider (a run skipped before sending did not).
    sent: bool = True

    @classmethod
    def of(
        cls,
        result: ProbeResult,
        price: PriceInfo,
        metas: Iterable[ResponseMeta] = (),
        *,
        sent: bool = True,
    ) -> RunReport:
        """The report of a finished run: costs from the price table in force (or the
        provider's own figure), response facts merged in order."""
        costs = tuple(RequestCost(*request_cost(price, r)) for r in result.requests)
        return cls(result, price, costs, ResponseFacts.of(metas), sent)

    @property
    def spend_usd(self) -> float:
        return sum(c.spend_usd for c in self.costs)

    @property
    def savings_usd(self) -> float:
        return sum(c.savings_usd for c in self.costs)
