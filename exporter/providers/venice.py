"""Venice.ai: OpenAI-compatible chat completions with Venice extras.

Checked against Venice's own material (veniceai/api-docs: swagger.yaml, data/static-models.json,
guides/features/prompt-caching.mdx; veniceai/skills: venice-chat, venice-errors SKILL.md):

- Usage: ``usage.prompt_tokens`` is inclusive; reads in ``prompt_tokens_details.cached_tokens``,
  writes in ``prompt_tokens_details.cache_creation_input_tokens`` (prompt-caching guide,
  "Response Fields"). The swagger example sends ``prompt_tokens_details: null`` when nothing was
  cached, and the chat skill says the details appear "when the provider reports them". Venice
  itself always answers with this shape, so for Venice a missing/null read count is 0, not
  "not reported" (``reports_cache_fields = True``); a missing write count stays None, because
  most upstreams have no write figure at all.
- Every response carries ``cost: {usd, diem}`` (omitted when it cannot be computed); streams
  always end with a ``choices: []`` chunk carrying usage and cost, whatever ``include_usage``
  says; upstream failures after the headers arrive in-band as ``data: {"error": {...}}``
  followed by ``[DONE]`` (venice-chat "Streaming", venice-errors "Streaming errors").
- ``venice_parameters.include_venice_system_prompt`` defaults to true, which prepends Venice's
  own system prompt: probes send false so the cached prefix is entirely ours.
- ``max_tokens`` is deprecated in favour of ``max_completion_tokens`` (venice-chat gotchas).
- ``prompt_cache_key`` is a routing hint the guide recommends for every non-Claude model.
- Balance headers ``x-venice-balance-usd`` / ``x-venice-balance-diem``: strings, the balance
  before the request (api-spec "Response Headers Reference"); ``GET /api_keys/rate_limits``
  returns ``data.balances.{USD,DIEM}`` for inference keys.
- ``/models?type=text``: ``model_spec.pricing.{input,output,cache_input,cache_write}.{usd,diem}``
  per million tokens; ``cache_input`` is "only present for models that support context caching"
  (swagger), the only caching signal Venice publishes.
- Minimum cacheable prompt: ~1,024 tokens, ~4,000 for Claude (guide, "Troubleshooting").
- Error bodies: ``{"error": "<message>"}`` or OpenAI-style ``{"error": {"message": ...}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

from exporter.providers.base import BadResponse, HttpRequest, get_path, parse_number
from exporter.providers.openai import OpenAIAdapter, lower_headers
from exporter.results import ModelInfo, ModelPrice, ResponseMeta

DEFAULT_BASE_URL = "https://api.venice.ai/api/v1"
# Venice's guide: Claude caches from ~4,000 tokens; 4,096 clears it with margin.
CLAUDE_MIN_CACHEABLE_TOKENS = 4096


class VeniceAdapter(OpenAIAdapter):
    type_name: ClassVar[str] = "venice"
    key_env_vars: ClassVar[tuple[str, ...]] = ("VENICE_API_KEY",)
    default_base_url: ClassVar[str | None] = DEFAULT_BASE_URL
    publishes_prices: ClassVar[bool] = True  # /models: model_spec.pricing
    reports_cache_fields: ClassVar[bool | None] = True
    default_max_tokens_field: ClassVar[str] = "max_completion_tokens"
    default_prompt_cache_key: ClassVar[bool] = True

    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None,
        min_cacheable_tokens: int | None = None,
        warmup_repeats: int | None = None,
        stream: bool = True,
        max_tokens: int = 8,
        extra_headers: Mapping[str, str] | None = None,
        max_tokens_field: str | None = None,
        prompt_cache_key: bool | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            min_cacheable_tokens=min_cacheable_tokens,
            warmup_repeats=warmup_repeats,
            stream=stream,
            max_tokens=max_tokens,
            extra_headers=extra_headers,
            max_tokens_field=max_tokens_field,
            prompt_cache_key=prompt_cache_key,
            extra_body=extra_body,
        )

    def body_extras(self) -> dict[str, Any]:
        return {"venice_parameters": {"include_venice_system_prompt": False}}

    def min_cacheable_for(self, model: str) -> int:
        if self.min_cacheable_override is None and "claude" in model.lower():
            return CLAUDE_MIN_CACHEABLE_TOKENS
        return self.min_cacheable_tokens

    def models_request(self) -> HttpRequest:
        return self._get(f"{self.base_url}/models?type=text")

    def balance_request(self) -> HttpRequest | None:
        return self._get(f"{self.base_url}/api_keys/rate_limits")

    def parse_meta(self, headers: Mapping[str, str]) -> ResponseMeta:
        lowered = lower_headers(headers)
        balances: dict[str, float] = {}
        for currency in ("usd", "diem"):
            # Strings "to avoid precision loss"; anything unparsable is ignored, not fatal.
            number = parse_number(lowered.get(f"x-venice-balance-{currency}"))
            if number is not None:
                balances[currency] = number
        return replace(super().parse_meta(lowered), balances=balances)

    def model_info(self, item: Any) -> ModelInfo | None:
        info = super().model_info(item)
        spec = get_path(item, "model_spec")
        if info is None or get_path(spec, "offline") is True:
            return None  # an offline model cannot be probed
        pricing = get_path(spec, "pricing")
        if not isinstance(pricing, dict):
            return info
        rates = {
            key: _usd(pricing.get(key)) for key in ("input", "output", "cache_input", "cache_write")
        }
        price = None
        if rates["input"] is not None and rates["output"] is not None:
            price = ModelPrice(
                rates["input"], rates["output"], rates["cache_input"], rates["cache_write"]
            )
        return ModelInfo(info.id, price, rates["cache_input"] is not None)

    def parse_balance(self, body: Any) -> dict[str, float]:
        balances = get_path(body, "data", "balances")
        if not isinstance(balances, dict):
            raise BadResponse("rate_limits response has no data.balances object")
        out: dict[str, float] = {}
        for currency, amount in balances.items():
            number = parse_number(amount)
            if number is not None:  # null: no balance in that currency
                out[str(currency).lower()] = number
        return out


def _usd(rate: Any) -> float | None:
    number = parse_number(get_path(rate, "usd"))
    return number if number is not None and number >= 0 else None
