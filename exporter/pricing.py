"""What probes cost and what caching saved, from the price table in force.

Prices are USD per million tokens. The table comes from the configuration (which wins) or
from the provider's models endpoint where it publishes prices (Venice, OpenRouter). Cost is
computed per request from the tokens the provider reported:

    spend   = (uncached × input + cached × cache_read + written × cache_write
               + completion × output) / 1e6
    savings = cached × (input − cache_read) / 1e6

where uncached = prompt − cached − written. Where the provider reports what it charged
(Venice ``cost: {usd, diem}``, OpenRouter ``usage.cost``), that figure is the spend: it is what
was billed, so the budget ledger is settled with it too. Venice splits a charge between USD
and DIEM, and one DIEM buys one USD of list-price compute, so its charge in USD is
``usd + diem``. Savings always come from the price table (none without a price).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from exporter.results import ModelPrice, RequestRecord, Usage

PRICE_SOURCES = ("config", "provider", "none")
# USD of list-price compute one DIEM pays for (Venice: "1 DIEM = $1 of compute per day").
USD_PER_DIEM: Final = 1.0


@dataclass(frozen=True, slots=True)
class PriceInfo:
    price: ModelPrice | None
    source: str  # config | provider | none
    version: str  # short hash of the price, so a change is visible in llmcache_price_info


def price_version(price: ModelPrice | None) -> str:
    if price is None:
        return "none"
    text = json.dumps(
        [price.input, price.output, price.cache_read, price.cache_write], separators=(",", ":")
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def resolve_price(configured: ModelPrice | None, published: ModelPrice | None) -> PriceInfo:
    if configured is not None:
        return PriceInfo(configured, "config", price_version(configured))
    if published is not None:
        return PriceInfo(published, "provider", price_version(published))
    return PriceInfo(None, "none", "none")


def cost_of(price: ModelPrice, usage: Usage) -> tuple[float, float]:
    """(spend, savings) in USD of one request's reported usage."""
    cached = usage.cached_tokens or 0
    written = usage.cache_write_tokens or 0
    uncached = max(0, usage.prompt_tokens - cached - written)
    read_price = price.input if price.cache_read is None else price.cache_read
    write_price = price.input if price.cache_write is None else price.cache_write
    spend = (
        uncached * price.input
        + cached * read_price
        + written * write_price
        + usage.completion_tokens * price.output
    ) / 1e6
    savings = cached * (price.input - read_price) / 1e6
    return spend, savings


def reported_usd(cost: Mapping[str, float]) -> float | None:
    """What the provider says it charged, in USD; None when it reported no charge."""
    if "usd" not in cost and "diem" not in cost:
        return None
    return float(cost.get("usd", 0.0)) + float(cost.get("diem", 0.0)) * USD_PER_DIEM


def charged_usd(price: ModelPrice | None, usage: Usage, cost: Mapping[str, float]) -> float:
    """One request's spend: the provider's own figure, else the price table's, else 0."""
    reported = reported_usd(cost)
    if reported is not None:
        return reported
    return cost_of(price, usage)[0] if price is not None else 0.0


def request_cost(info: PriceInfo, record: RequestRecord) -> tuple[float, float]:
    """(spend, savings) in USD for one request's evidence (0, 0 if it was not answered)."""
    if not record.ok or not record.attempts:
        return 0.0, 0.0
    usage = Usage(
        record.prompt_tokens or 0,
        record.cached_tokens,
        record.cache_write_tokens,
        record.completion_tokens or 0,
    )
    savings = cost_of(info.price, usage)[1] if info.price is not None else 0.0
    return charged_usd(info.price, usage, record.cost), savings


def reservation_usd(price: ModelPrice | None, prompt_tokens: int, completion_tokens: int) -> float:
    """An upper bound of what a request with at most these token counts can cost: prompt
    tokens at the dearest prompt rate (input, cache read or cache write), completions at the
    output rate."""
    if price is None:
        return 0.0
    prompt_rate = max(price.input, price.cache_read or 0.0, price.cache_write or 0.0)
    return (prompt_tokens * prompt_rate + completion_tokens * price.output) / 1e6
