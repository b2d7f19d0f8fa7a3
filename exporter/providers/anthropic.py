"""Anthropic's native Messages API.

Checked against anthropics/anthropic-sdk-python (src/anthropic/types/usage.py,
message_delta_usage.py) and the prompt-caching documentation as mirrored in research/providers.md
§3:

- ``usage.input_tokens`` counts only the uncached input after the last breakpoint; reads are
  ``cache_read_input_tokens`` and writes ``cache_creation_input_tokens``, so the whole prompt is
  input + reads + writes. The SDK types both cache fields as optional: when a request carries
  ``cache_control`` (ours always does) and nothing was read or written they may be absent or
  null, which for this API means 0 — it is the API that reports caching, never a server that
  cannot (``reports_cache_fields = True``).
- Caching is opt-in through ``cache_control`` markers (at most 4 per request). We place two:
  on the system block, so a later request with the same system prompt and a different user
  message reads the shared prefix (the ``partial`` probe), and on the user block, so an
  identical repeat reads everything.
- Streams: ``message_start`` carries the initial usage with the cache fields;
  ``message_delta.usage`` is cumulative ("The cumulative number of ..." in the SDK types) and
  overrides what it carries; ``content_block_delta`` brings ``text_delta`` / ``thinking_delta``;
  an ``error`` event (e.g. ``overloaded_error``) can arrive after a 200.
- Headers: ``request-id``; ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
  remaining``; ``retry-after`` on 429/529. There is no balance endpoint for API keys.
- ``GET /v1/models`` lists ``data[].id``, newest first, paginated (``limit`` defaults to 20 and
  ranges 1-1000, docs.anthropic.com/en/api/models-list), with no price and no caching flag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from exporter.providers.base import (
    RATELIMIT_RESOURCES,
    BadResponse,
    HttpRequest,
    Prompt,
    ProviderAdapter,
    StreamDecoder,
    UpstreamError,
    checked_usage,
    classify_status,
    extract_error_text,
    first_header,
    get_path,
    one_line,
    parse_number,
    retry_after_seconds,
    token_count,
)
from exporter.providers.openai import (
    MAX_TEXT_CHARS,
    lower_headers,
    merge_headers,
    required_count,
    secret_header_names,
)
from exporter.results import Completion, ErrorType, ModelInfo, ResponseMeta, Usage

DEFAULT_BASE_URL = "https://api.anthropic.com/v1"
ANTHROPIC_VERSION = "2023-06-01"

# Minimum cacheable prompt by (family, major, minor) — below it nothing is cached and no error
# is returned. Sources: Anthropic's prompt-caching docs as quoted in anthropic-sdk-python issue
# #1194, LiteLLM's prompt-caching page (2026-10-07), orq.ai's table. Where sources disagree the
# larger value wins, so a probe never judges a prompt that is too short to cache:
# Sonnet 4.6 (docs 1,024; #1194 and orq.ai observe 2,048), Opus 4.7 (2,048; Bedrock 4,096).
# Unknown models get DEFAULT_MIN_CACHEABLE_TOKENS.
MIN_CACHEABLE_TOKENS: dict[tuple[str, int, int | None], int] = {
    ("opus", 5, None): 512,
    ("fable", 5, None): 512,
    ("mythos", 5, None): 512,
    ("sonnet", 5, None): 1024,
    ("opus", 4, 8): 1024,
    ("opus", 4, 7): 4096,
    ("opus", 4, 6): 4096,
    ("opus", 4, 5): 4096,
    ("opus", 4, 1): 1024,
    ("opus", 4, None): 1024,
    ("sonnet", 4, 6): 2048,
    ("sonnet", 4, 5): 1024,
    ("sonnet", 4, None): 1024,
    ("haiku", 4, 5): 4096,
    ("opus", 3, None): 1024,
    ("sonnet", 3, 7): 1024,
    ("sonnet", 3, 5): 1024,
    ("haiku", 3, 5): 2048,
    ("haiku", 3, None): 2048,
}
DEFAULT_MIN_CACHEABLE_TOKENS = 4096
# "claude-3-5-haiku-20241022" (version first) and "claude-opus-4-5-20251101" (family first).
_VERSION_FIRST = re.compile(r"claude-(\d{1,2})(?:[-.](\d)(?!\d))?-(opus|sonnet|haiku)")
_FAMILY_FIRST = re.compile(r"(opus|sonnet|haiku|fable|mythos)-(\d{1,2})(?!\d)(?:[-.](\d)(?!\d))?")

_ERROR_TYPES = {
    "rate_limit_error": ErrorType.RATE_LIMIT,
    "authentication_error": ErrorType.AUTH,
    "permission_error": ErrorType.AUTH,
    "billing_error": ErrorType.INSUFFICIENT_FUNDS,
    "timeout_error": ErrorType.TIMEOUT,
}


def model_family(model: str) -> tuple[str, int, int | None] | None:
    name = model.lower()
    if match := _VERSION_FIRST.search(name):
        major, minor, family = match.groups()
        return family, int(major), int(minor) if minor else None
    if match := _FAMILY_FIRST.search(name):
        family, major, minor = match.groups()
        return family, int(major), int(minor) if minor else None
    return None


def error_type_of(error: Any) -> ErrorType:
    """Error type from Anthropic's ``{"type": "error", "error": {"type": ...}}``."""
    kind = get_path(error, "error", "type")
    return (
        _ERROR_TYPES.get(kind, ErrorType.API_ERROR)
        if isinstance(kind, str)
        else ErrorType.API_ERROR
    )


class AnthropicAdapter(ProviderAdapter):
    type_name: ClassVar[str] = "anthropic"
    key_env_vars: ClassVar[tuple[str, ...]] = ("ANTHROPIC_API_KEY",)
    default_base_url: ClassVar[str | None] = DEFAULT_BASE_URL
    reports_cache_fields: ClassVar[bool | None] = True
    default_min_cacheable_tokens: ClassVar[int] = DEFAULT_MIN_CACHEABLE_TOKENS

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
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            min_cacheable_tokens=min_cacheable_tokens,
            warmup_repeats=warmup_repeats,
            stream=stream,
            max_tokens=max_tokens,
            extra_headers=extra_headers,
        )
        self.min_cacheable_override = min_cacheable_tokens

    def min_cacheable_for(self, model: str) -> int:
        if self.min_cacheable_override is not None:
            return self.min_cacheable_override
        family = model_family(model)
        known = MIN_CACHEABLE_TOKENS.get(family) if family else None
        return known if known is not None else self.min_cacheable_tokens

    # -- requests -------------------------------------------------------------------------

    def _request(self, method: str, url: str, body: dict[str, Any] | None) -> HttpRequest:
        ours = {"anthropic-version": ANTHROPIC_VERSION}
        if body is not None:
            ours["content-type"] = "application/json"
        if self._api_key:
            ours["x-api-key"] = self._api_key
        headers = merge_headers(ours, self.extra_headers)
        return HttpRequest(method, url, headers, body, secret_header_names(headers, "x-api-key"))

    def chat_request(self, model: str, prompt: Prompt, *, stream: bool) -> HttpRequest:
        body = {
            "model": model,
            "max_tokens": self.max_tokens,
            "system": [
                {"type": "text", "text": prompt.system, "cache_control": {"type": "ephemeral"}}
            ],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "text",
                            "text": prompt.user,
                            "cache_control": {"type": "ephemeral"},
                        }
                    ],
                }
            ],
            "stream": stream,
        }
        return self._request("POST", f"{self.base_url}/messages", body)

    def models_request(self) -> HttpRequest:
        return self._request("GET", f"{self.base_url}/models?limit=1000", None)

    # -- responses ------------------------------------------------------------------------

    def parse_completion(self, body: Any) -> Completion:
        if not isinstance(body, dict):
            raise BadResponse("response body is not a JSON object")
        if body.get("type") == "error":
            raise UpstreamError(error_type_of(body), extract_error_text(body))
        if body.get("usage") is None:
            raise BadResponse("response has no usage")
        usage = normalise_usage(body["usage"])
        content = body.get("content")
        text = "".join(
            block["text"]
            for block in (content if isinstance(content, list) else [])
            if isinstance(block, dict) and isinstance(block.get("text"), str)
        )
        rid = body.get("id")
        return Completion(usage, text[:MAX_TEXT_CHARS], {}, rid if isinstance(rid, str) else None)

    def stream_decoder(self) -> StreamDecoder:
        return AnthropicStreamDecoder()

    def parse_models(self, body: Any) -> list[ModelInfo]:
        items = get_path(body, "data")
        if not isinstance(items, list):
            raise BadResponse("models response has no data list")
        return [
            ModelInfo(item["id"])
            for item in items
            if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]
        ]

    def parse_meta(self, headers: Mapping[str, str]) -> ResponseMeta:
        lowered = lower_headers(headers)
        remaining = {
            resource: number
            for resource in RATELIMIT_RESOURCES
            if (number := parse_number(
                lowered.get(f"anthropic-ratelimit-{resource.replace('_', '-')}-remaining")
            )) is not None and number >= 0
        }  # fmt: skip
        return ResponseMeta(
            request_id=first_header(lowered, "request-id", "x-request-id", "cf-ray"),
            ratelimit_remaining=remaining,
            retry_after=retry_after_seconds(lowered),
        )

    def classify_error(self, status: int, body: Any) -> ErrorType:
        if status == 529:
            return ErrorType.API_ERROR  # overloaded_error: retryable, not a rate limit
        kind = error_type_of(body)
        if (
            kind is ErrorType.INSUFFICIENT_FUNDS
            or "credit balance" in extract_error_text(body).lower()
        ):
            # billing_error, or the 400 "Your credit balance is too low ..." message.
            return ErrorType.INSUFFICIENT_FUNDS
        return classify_status(status)


def normalise_usage(usage: Any) -> Usage:
    """Native usage to the normalised record (prompt = input + cache reads + cache writes)."""
    if not isinstance(usage, dict):
        raise BadResponse("usage is not a JSON object")
    uncached = required_count(usage.get("input_tokens"), "input_tokens")
    output = required_count(usage.get("output_tokens"), "output_tokens")
    read = token_count(
        usage.get("cache_read_input_tokens"), "cache_read_input_tokens", required=False
    )
    write = token_count(
        usage.get("cache_creation_input_tokens"), "cache_creation_input_tokens", required=False
    )
    read, write = read or 0, write or 0  # absent/null: nothing read or written (see docstring)
    return checked_usage(uncached + read + write, read, write, output)


class AnthropicStreamDecoder(StreamDecoder):
    """message_start, content blocks, message_delta, message_stop (plus ping and error)."""

    _FIELDS = (
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    )

    def __init__(self) -> None:
        self._usage: dict[str, Any] | None = None
        self._id: str | None = None
        self._text: list[str] = []
        self._text_len = 0

    def feed(self, event: str | None, data: str) -> bool:
        payload = data.strip()
        if not payload:
            return False
        try:
            message = json.loads(payload)
        except ValueError:
            raise BadResponse(f"stream data is not JSON: {one_line(payload, 60)}") from None
        if not isinstance(message, dict):
            raise BadResponse("stream event is not a JSON object")
        kind = message.get("type") or event
        if kind == "error":
            raise UpstreamError(error_type_of(message), extract_error_text(message))
        if kind == "message_start":
            usage = get_path(message, "message", "usage")
            if not isinstance(usage, dict):
                raise BadResponse("message_start carries no usage")
            self._usage = dict(usage)
            rid = get_path(message, "message", "id")
            self._id = rid if isinstance(rid, str) else None
        elif kind == "message_delta":
            usage = message.get("usage")
            if isinstance(usage, dict) and self._usage is not None:
                # Cumulative figures: whatever the delta carries replaces the earlier value.
                self._usage.update({k: usage[k] for k in self._FIELDS if usage.get(k) is not None})
        elif kind == "content_block_delta":
            delta = message.get("delta")
            text = get_path(delta, "text")
            if isinstance(text, str) and text:
                if self._text_len < MAX_TEXT_CHARS:
                    self._text.append(text)
                    self._text_len += len(text)
                return True
            return any(get_path(delta, k) for k in ("thinking", "partial_json"))
        return False

    def finish(self) -> Completion:
        if self._usage is None:
            raise BadResponse("stream ended without usage")
        text = "".join(self._text)[:MAX_TEXT_CHARS]
        return Completion(normalise_usage(self._usage), text, {}, self._id)
