"""OpenAI-compatible chat completions: OpenAI, DeepSeek, OpenRouter, xAI, Moonshot, Gemini's
compatible endpoint, LiteLLM, and local llama.cpp / vLLM / SGLang / Ollama servers.

Where each field comes from (checked against the providers' own material; see also
research/providers.md §2, §4, §6, §8, §12, §13, §15, §16-18):

- ``usage.prompt_tokens`` includes cached tokens on every one of these APIs (OpenAI prompt
  caching guide, developers.openai.com/api/docs/guides/prompt-caching; DeepSeek documents
  prompt_tokens = prompt_cache_hit_tokens + prompt_cache_miss_tokens).
- Cached reads: DeepSeek ``usage.prompt_cache_hit_tokens`` (api-docs.deepseek.com, kv_cache
  guide; stigg.io notes DeepSeek leaves OpenAI's field at 0), else
  ``usage.prompt_tokens_details.cached_tokens`` (OpenAI, OpenRouter usage-accounting page,
  xAI, Groq, vLLM with --enable-prompt-tokens-details, llama.cpp), else the legacy Moonshot
  top-level ``usage.cached_tokens``, else llama.cpp ``timings.cache_n`` (tools/server/README).
- Cache writes: ``prompt_tokens_details.cache_write_tokens`` (OpenAI gpt-5.6+, OpenRouter
  usage-accounting example), ``...cache_creation_input_tokens`` (Venice prompt-caching guide),
  ``usage.cache_creation_input_tokens`` / ``...cache_creation_tokens`` (LiteLLM docs).
- Absent or null cache fields mean "not reported" (vLLM without the flag, Ollama's
  openai/openai.go Usage, Anthropic's OpenAI-compatible layer whose details are always empty).
- Streams: usage arrives in a final ``choices: []`` chunk when ``stream_options.include_usage``
  is set (openai-python chat_completion_stream_options_param.py); some servers put it on the
  last content chunk instead; OpenRouter and Venice send errors in-band after a 200.
- Cost: OpenRouter ``usage.cost`` in credits (= USD); Venice top-level ``cost: {usd, diem}``.
- Balance: DeepSeek ``GET /user/balance`` (``balance_infos[].total_balance``, decimal strings,
  api-docs.deepseek.com/api/get-user-balance); OpenRouter ``GET /api/v1/key``
  (``data.limit_remaining``, null when the key has no limit, openrouter.ai API reference).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from exporter.providers.base import (
    BadResponse,
    HttpRequest,
    Prompt,
    ProviderAdapter,
    StreamDecoder,
    UpstreamError,
    checked_usage,
    classify_status,
    extract_error_text,
    get_path,
    one_line,
    parse_number,
    token_count,
)
from exporter.results import Completion, ErrorType, ModelInfo, ModelPrice, ResponseMeta, Usage

MAX_TEXT_CHARS = 2000  # enough to eyeball an answer; probes only need the usage
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
_CREDENTIAL_HINTS = ("auth", "key", "token", "secret", "cookie", "signature")


@dataclass(frozen=True, slots=True)
class HostDefaults:
    """Per-host overrides of the class defaults (None: keep the class default)."""

    max_tokens_field: str | None = None
    prompt_cache_key: bool | None = None
    warmup_repeats: int | None = None
    balance: str | None = None  # which balance endpoint the host has
    prices: bool = False  # the models endpoint publishes per-token prices


# Keyed by host suffix. Why each entry:
# - api.openai.com: newer (reasoning) models reject ``max_tokens`` in favour of
#   ``max_completion_tokens``; ``prompt_cache_key`` is OpenAI's documented routing hint.
# - api.deepseek.com: a hit needs a *persisted* prefix unit (kv_cache guide: units persist at
#   request boundaries, or once a prefix shared by several requests is detected), so one extra
#   warm-up request is needed before a verdict; ``GET /user/balance``.
# - openrouter.ai: ``GET /api/v1/key`` reports the key's remaining limit; ``/models`` publishes
#   ``pricing.prompt`` / ``completion`` per token.
HOST_DEFAULTS: dict[str, HostDefaults] = {
    "api.openai.com": HostDefaults(max_tokens_field="max_completion_tokens", prompt_cache_key=True),
    "api.deepseek.com": HostDefaults(warmup_repeats=2, balance="deepseek"),
    "openrouter.ai": HostDefaults(balance="openrouter", prices=True),
}


# The conventional key variable of hosts that have one. Any other OpenAI-compatible base URL
# gets no key unless the configuration names a variable: sending OPENAI_API_KEY to a
# third-party or local server would hand it over.
HOST_KEY_ENV: dict[str, str] = {
    "api.openai.com": "OPENAI_API_KEY",
    "api.deepseek.com": "DEEPSEEK_API_KEY",
    "openrouter.ai": "OPENROUTER_API_KEY",
    "api.x.ai": "XAI_API_KEY",
    "generativelanguage.googleapis.com": "GEMINI_API_KEY",
    "api.groq.com": "GROQ_API_KEY",
}


def conventional_key_env(base_url: str) -> str | None:
    host = (urlsplit(base_url).hostname or "").lower()
    for suffix, variable in HOST_KEY_ENV.items():
        if host == suffix or host.endswith("." + suffix):
            return variable
    return None


def host_defaults(base_url: str) -> HostDefaults:
    host = (urlsplit(base_url).hostname or "").lower()
    for suffix, defaults in HOST_DEFAULTS.items():
        if host == suffix or host.endswith("." + suffix):
            return defaults
    return HostDefaults()


def secret_header_names(headers: Mapping[str, str], *always: str) -> frozenset[str]:
    """Header names (lower case) to redact: ours plus any extra header that looks like one."""
    names = {name.lower() for name in always}
    names.update(n.lower() for n in headers if any(h in n.lower() for h in _CREDENTIAL_HINTS))
    return frozenset(names)


def merge_headers(ours: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``extra`` plus ``ours``; ours win, compared case-insensitively."""
    taken = {k.lower() for k in ours}
    merged = {k: v for k, v in extra.items() if k.lower() not in taken}
    merged.update(ours)
    return merged


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def cache_key_for(prompt: Prompt) -> str:
    """Stable within a probe run (the run id is on the first line), distinct across runs."""
    first_line = prompt.system.split("\n", 1)[0]
    return "pce-" + hashlib.sha256(first_line.encode()).hexdigest()[:16]


def in_band_error_type(error: Any) -> ErrorType:
    """Error type of an in-band ``{"error": ...}`` object, from its code/status/type/message."""
    words: list[str] = []
    if isinstance(error, dict):
        for key in ("code", "status", "status_code"):
            value = error.get(key)
            number = parse_number(value)
            if number is not None and 400 <= number < 600:
                return classify_status(int(number))
        words = [str(error.get(k) or "") for k in ("code", "type", "message")]
    elif isinstance(error, str):
        words = [error]
    text = " ".join(words).lower().replace("-", "_")
    if "rate_limit" in text or "rate limit" in text or "too_many_requests" in text:
        return ErrorType.RATE_LIMIT
    if "insufficient_quota" in text or ("insufficient" in text and "balance" in text):
        return ErrorType.INSUFFICIENT_FUNDS
    return ErrorType.API_ERROR


def per_million(value: Any) -> float | None:
    """A per-token price (number or decimal string) as USD per million tokens."""
    number = parse_number(value)
    return None if number is None or number < 0 else round(number * 1_000_000, 9)


class OpenAIAdapter(ProviderAdapter):
    """Any endpoint speaking OpenAI's ``/chat/completions``."""

    type_name: ClassVar[str] = "openai"
    # No conventional key variable: the same adapter talks to many hosts, and sending
    # OPENAI_API_KEY to a third-party base URL would leak it. Configure the key explicitly.
    key_env_vars: ClassVar[tuple[str, ...]] = ()
    # None: there is no sensible default host, the base URL must be configured.
    default_base_url: ClassVar[str | None] = None
    default_max_tokens_field: ClassVar[str] = "max_tokens"
    default_prompt_cache_key: ClassVar[bool] = False

    @classmethod
    def key_env_for(cls, base_url: str) -> str | None:
        # Only a known host's own variable: never hand OPENAI_API_KEY to a third party.
        return conventional_key_env(base_url) or super().key_env_for(base_url)

    @classmethod
    def publishes_prices_at(cls, base_url: str) -> bool:
        return cls.publishes_prices or host_defaults(base_url).prices

    def __init__(
        self,
        *,
        base_url: str,
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
        hosted = host_defaults(base_url)
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            min_cacheable_tokens=min_cacheable_tokens,
            warmup_repeats=warmup_repeats if warmup_repeats is not None else hosted.warmup_repeats,
            stream=stream,
            max_tokens=max_tokens,
            extra_headers=extra_headers,
        )
        self.min_cacheable_override = min_cacheable_tokens
        field = max_tokens_field or hosted.max_tokens_field or self.default_max_tokens_field
        if field not in MAX_TOKENS_FIELDS:
            raise ValueError(f"max_tokens_field must be one of {MAX_TOKENS_FIELDS}, not {field!r}")
        self.max_tokens_field = field
        self.prompt_cache_key = next(
            v
            for v in (prompt_cache_key, hosted.prompt_cache_key, self.default_prompt_cache_key)
            if v is not None
        )
        self.extra_body: dict[str, Any] = copy.deepcopy(dict(extra_body or {}))
        self.balance_kind = hosted.balance

    # -- requests -------------------------------------------------------------------------

    def _headers(self, *, json_body: bool) -> dict[str, str]:
        ours = {"Content-Type": "application/json"} if json_body else {}
        if self._api_key:
            ours["Authorization"] = f"Bearer {self._api_key}"
        return merge_headers(ours, self.extra_headers)

    def _get(self, url: str) -> HttpRequest:
        headers = self._headers(json_body=False)
        return HttpRequest("GET", url, headers, None, secret_header_names(headers, "authorization"))

    def body_extras(self) -> dict[str, Any]:
        """Fields a subclass adds to every chat body (before ``extra_body`` is merged)."""
        return {}

    def chat_request(self, model: str, prompt: Prompt, *, stream: bool) -> HttpRequest:
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.user},
            ],
            self.max_tokens_field: self.max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.prompt_cache_key:
            body["prompt_cache_key"] = cache_key_for(prompt)
        body = _deep_merge(_deep_merge(body, self.body_extras()), self.extra_body)
        headers = self._headers(json_body=True)
        return HttpRequest(
            "POST",
            f"{self.base_url}/chat/completions",
            headers,
            body,
            secret_header_names(headers, "authorization"),
        )

    def models_request(self) -> HttpRequest:
        return self._get(f"{self.base_url}/models")

    def balance_request(self) -> HttpRequest | None:
        parts = urlsplit(self.base_url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if self.balance_kind == "deepseek":
            return self._get(f"{origin}/user/balance")
        if self.balance_kind == "openrouter":
            return self._get(f"{origin}/api/v1/key")
        return None

    # -- responses ------------------------------------------------------------------------

    def normalise_usage(self, usage: Any, timings: Any = None) -> Usage:
        if not isinstance(usage, dict):
            raise BadResponse("usage is not a JSON object")
        details = usage.get("prompt_tokens_details")
        if details is not None and not isinstance(details, dict):
            raise BadResponse("usage field prompt_tokens_details is not an object")
        prompt = required_count(usage.get("prompt_tokens"), "prompt_tokens")
        completion = required_count(usage.get("completion_tokens"), "completion_tokens")
        cached = _first_count(
            ("prompt_cache_hit_tokens", usage.get("prompt_cache_hit_tokens")),
            ("prompt_tokens_details.cached_tokens", get_path(details, "cached_tokens")),
            ("cached_tokens", usage.get("cached_tokens")),
            ("timings.cache_n", get_path(timings, "cache_n")),
        )
        if cached is None and self.reports_cache_fields:
            cached = 0  # the API always reports reads, so silence means none (see Venice)
        write = _first_count(
            ("prompt_tokens_details.cache_write_tokens", get_path(details, "cache_write_tokens")),
            (
                "prompt_tokens_details.cache_creation_input_tokens",
                get_path(details, "cache_creation_input_tokens"),
            ),
            ("cache_creation_input_tokens", usage.get("cache_creation_input_tokens")),
            (
                "prompt_tokens_details.cache_creation_tokens",
                get_path(details, "cache_creation_tokens"),
            ),
        )
        return checked_usage(prompt, cached, write, completion)

    def parse_completion(self, body: Any) -> Completion:
        if not isinstance(body, dict):
            raise BadResponse("response body is not a JSON object")
        if body.get("error"):
            raise UpstreamError(in_band_error_type(body["error"]), extract_error_text(body))
        if body.get("usage") is None:
            raise BadResponse("response has no usage")
        usage = self.normalise_usage(body["usage"], body.get("timings"))
        message = get_path(_first_choice(body), "message")
        text = _text_of(get_path(message, "content"))
        return Completion(
            usage, text[:MAX_TEXT_CHARS], _cost_of(body), _str_or_none(body.get("id"))
        )

    def stream_decoder(self) -> StreamDecoder:
        return OpenAIStreamDecoder(self)

    def parse_meta(self, headers: Mapping[str, str]) -> ResponseMeta:
        return super().parse_meta(lower_headers(headers))

    def classify_error(self, status: int, body: Any) -> ErrorType:
        if status == 429 and "insufficient_quota" in json.dumps(get_path(body, "error") or ""):
            return ErrorType.INSUFFICIENT_FUNDS  # OpenAI: billing exhausted, retrying cannot help
        if status == 529:
            return ErrorType.API_ERROR  # "overloaded" (Anthropic-style upstreams behind proxies)
        return classify_status(status)

    # -- models and balance ---------------------------------------------------------------

    def model_info(self, item: Any) -> ModelInfo | None:
        """One models-list entry; None skips it. OpenRouter ``pricing`` is USD per token."""
        if isinstance(item, str) and item:
            return ModelInfo(item)
        model_id = get_path(item, "id")
        if not isinstance(model_id, str) or not model_id:
            return None
        pricing = get_path(item, "pricing")
        if not isinstance(pricing, dict):
            return ModelInfo(model_id)
        read = per_million(pricing.get("input_cache_read"))
        price = None
        prompt_price, output_price = (per_million(pricing.get(k)) for k in ("prompt", "completion"))
        if prompt_price is not None and output_price is not None:
            write = per_million(pricing.get("input_cache_write"))
            price = ModelPrice(prompt_price, output_price, read, write)
        return ModelInfo(model_id, price, read is not None)

    def parse_models(self, body: Any) -> list[ModelInfo]:
        items = body if isinstance(body, list) else get_path(body, "data")
        if not isinstance(items, list):
            raise BadResponse("models response has no data list")
        return [info for info in map(self.model_info, items) if info is not None]

    def parse_balance(self, body: Any) -> dict[str, float]:
        if self.balance_kind == "deepseek":
            infos = get_path(body, "balance_infos")
            if not isinstance(infos, list):
                raise BadResponse("balance response has no balance_infos list")
            out: dict[str, float] = {}
            for info in infos:
                currency, amount = get_path(info, "currency"), get_path(info, "total_balance")
                number = parse_number(amount)
                if not isinstance(currency, str) or not currency or number is None:
                    raise BadResponse(f"unparsable balance entry: {one_line(repr(info), 80)}")
                out[currency.lower()] = number
            return out
        if self.balance_kind == "openrouter":
            data = get_path(body, "data")
            if not isinstance(data, dict):
                raise BadResponse("key response has no data object")
            remaining = data.get("limit_remaining")
            if remaining is None:
                return {}  # a key without a spending limit: nothing to report
            number = parse_number(remaining)
            if number is None:
                raise BadResponse(
                    f"limit_remaining is not a number: {one_line(repr(remaining), 40)}"
                )
            return {"usd": number}
        return {}


class OpenAIStreamDecoder(StreamDecoder):
    """``chat.completion.chunk`` events, then ``[DONE]``."""

    def __init__(self, adapter: OpenAIAdapter) -> None:
        self._adapter = adapter
        self._usage: Any = None
        self._timings: Any = None
        self._cost: dict[str, float] = {}
        self._id: str | None = None
        self._text: list[str] = []
        self._text_len = 0

    def feed(self, event: str | None, data: str) -> bool:
        payload = data.strip()
        if not payload or payload == "[DONE]":
            return False
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise BadResponse(f"stream data is not JSON: {one_line(payload, 60)}") from None
        if not isinstance(chunk, dict):
            raise BadResponse("stream chunk is not a JSON object")
        if chunk.get("error") or event == "error":
            raise UpstreamError(
                in_band_error_type(chunk.get("error")),
                extract_error_text(chunk),
            )
        self._id = self._id or _str_or_none(chunk.get("id"))
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]  # the last one wins (cumulative where repeated)
        if isinstance(chunk.get("timings"), dict):
            self._timings = chunk["timings"]
        self._cost.update(_cost_of(chunk))
        output = False
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            delta = get_path(choice, "delta")
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if isinstance(content, str) and content:
                output = True
                if self._text_len < MAX_TEXT_CHARS:
                    self._text.append(content)
                    self._text_len += len(content)
            # Reasoning models stream thoughts first; they are generated output too.
            if any(delta.get(k) for k in ("reasoning_content", "reasoning", "tool_calls")):
                output = True
        return output

    def finish(self) -> Completion:
        if self._usage is None:
            raise BadResponse("stream ended without usage")
        usage = self._adapter.normalise_usage(self._usage, self._timings)
        text = "".join(self._text)[:MAX_TEXT_CHARS]
        return Completion(usage, text, dict(self._cost), self._id)


# -- helpers ----------------------------------------------------------------------------------


def required_count(value: Any, name: str) -> int:
    """A usage figure that must be present (``token_count`` with ``required=True``)."""
    count = token_count(value, name)
    if count is None:  # unreachable: required counts raise instead
        raise BadResponse(f"usage field {name} is missing")
    return count


def _first_count(*candidates: tuple[str, Any]) -> int | None:
    """The first candidate that is present (not None), validated as a token count."""
    for name, value in candidates:
        if value is not None:
            return token_count(value, name, required=False)
    return None


def _cost_of(obj: dict[str, Any]) -> dict[str, float]:
    """Provider-reported cost: OpenRouter ``usage.cost`` (USD), Venice ``cost.{usd,diem}``."""
    out: dict[str, float] = {}
    router_cost = parse_number(get_path(obj, "usage", "cost"))
    if router_cost is not None and router_cost >= 0:
        out["usd"] = router_cost
    top = obj.get("cost")
    if isinstance(top, dict):
        for currency, amount in top.items():
            number = parse_number(amount)
            if number is not None and number >= 0:
                out[str(currency).lower()] = number
    return out


def _first_choice(body: dict[str, Any]) -> Any:
    choices = body.get("choices")
    return choices[0] if isinstance(choices, list) and choices else None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _str_or_none(value: Any) -> str | None:
    return one_line(value, 200) if isinstance(value, str) and value else None


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``; nested objects are merged, ``extra`` wins at the leaves."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
