"""What probes cost and what caching saved, from the price table in force.

Prices are USD per million tokens. The table comes from the configuration (which wins) or
from the provider's models endpoint where it publishes prices (Venice, OpenRouter). Cost is
computed per request from the tokens the provider reported:

    spend   = (uncached × input + cached × cache_read + written × cache_write
               + completion × output) / 1e6
    savings = cached × (input − cache_read) / 1e6

where uncached = prompt − cached − written. A model without any price falls back to the
cost the provider reported itself (Venice's ``cost.usd``), with no savings figure.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from exporter.results import ModelPrice, RequestRecord, Usage

PRICE_SOURCES = ("config", "provider", "none")


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


def request_cost(info: PriceInfo, record: RequestRecord) -> tuple[float, float]:
    """(spend, savings) in USD for one successful request's evidence."""
    if info.price is None:
        return float(record.cost.get("usd", 0.0)), 0.0
    usage = Usage(
        record.prompt_tokens or 0,
        record.cached_tokens,
        record.cache_write_tokens,
        record.completion_tokens or 0,
    )
    return cost_of(info.price, usage)


def max_price_per_token(price: ModelPrice | None) -> float:
    """The dearest USD per token of a model: a spend reservation's upper bound per token."""
    if price is None:
        return 0.0
    rates = [price.input, price.output, price.cache_read or 0.0, price.cache_write or 0.0]
    return max(rates) / 1e6
