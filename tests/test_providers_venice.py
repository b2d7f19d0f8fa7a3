"""Venice adapter: Venice body extras, cache-field semantics, balance headers, models, balance."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from exporter.providers import VeniceAdapter
from exporter.providers.base import BadResponse, Prompt, select_models
from exporter.results import ErrorType, ModelInfo, ModelPrice
from tests.fixtures.providers.support import (
    KEY,
    body_of,
    check_completion_case,
    check_stream_case,
    completion_cases,
    stream_cases,
)

PROMPT = Prompt(system="run 5be1d2\nYou are terse.", user="Say OK.")


def venice(**kwargs: Any) -> VeniceAdapter:
    kwargs.setdefault("api_key", KEY)
    return VeniceAdapter(**kwargs)


@pytest.mark.parametrize("case", completion_cases("venice"))
def test_completion_fixture(case: str) -> None:
    check_completion_case(case, "venice")


@pytest.mark.parametrize("case", stream_cases("venice"))
def test_stream_fixture(case: str) -> None:
    check_stream_case(case, "venice")


def test_defaults() -> None:
    a = venice()
    assert a.base_url == VeniceAdapter.default_base_url == "https://api.venice.ai/api/v1"
    assert VeniceAdapter.key_env_vars == ("VENICE_API_KEY",)
    assert VeniceAdapter.reports_cache_fields is True
    assert a.warmup_repeats == 1
    assert a.balance_kind is None


def test_chat_body() -> None:
    request = venice().chat_request("zai-org-glm-5-1", PROMPT, stream=True)
    assert request.url == "https://api.venice.ai/api/v1/chat/completions"
    assert request.json == {
        "model": "zai-org-glm-5-1",
        "messages": [
            {"role": "system", "content": PROMPT.system},
            {"role": "user", "content": "Say OK."},
        ],
        "max_completion_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "prompt_cache_key": "pce-" + hashlib.sha256(b"run 5be1d2").hexdigest()[:16],
        "venice_parameters": {"include_venice_system_prompt": False},
    }
    assert request.headers == {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {KEY}",
    }
    assert KEY not in repr(request.redacted_headers())
    assert KEY not in repr(venice())


def test_extra_body_merges_into_venice_parameters() -> None:
    a = venice(
        extra_body={
            "venice_parameters": {"disable_thinking": True},
            "prompt_cache_retention": "24h",
        }
    )
    body = a.chat_request("m", PROMPT, stream=False).json
    assert body is not None
    assert body["venice_parameters"] == {
        "include_venice_system_prompt": False,
        "disable_thinking": True,
    }
    assert body["prompt_cache_retention"] == "24h"


def test_options_can_turn_off_cache_key_and_use_max_tokens() -> None:
    body = (
        venice(prompt_cache_key=False, max_tokens_field="max_tokens")
        .chat_request("m", PROMPT, stream=False)
        .json
    )
    assert body is not None
    assert "prompt_cache_key" not in body
    assert body["max_tokens"] == 8


def test_null_details_read_as_zero_but_writes_stay_unreported() -> None:
    usage = venice().normalise_usage({"prompt_tokens": 10, "completion_tokens": 1})
    assert (usage.cached_tokens, usage.cache_write_tokens) == (0, None)
    assert usage.cache_reported


def test_min_cacheable_for_claude() -> None:
    a = venice()
    assert a.min_cacheable_for("claude-opus-4-5") == 4096
    assert a.min_cacheable_for("Claude-Sonnet-4-6") == 4096
    assert a.min_cacheable_for("zai-org-glm-5-1") == 1024
    overridden = venice(min_cacheable_tokens=2048)
    assert overridden.min_cacheable_for("claude-opus-4-5") == 2048
    assert overridden.min_cacheable_for("qwen3-4b") == 2048


# -- headers ---------------------------------------------------------------------------------------


def test_balance_headers() -> None:
    meta = venice().parse_meta(
        {
            "CF-RAY": "9a1b2c3d4e5f-FRA",
            "x-venice-balance-usd": "12.3456",
            "x-venice-balance-diem": "0.9871",
            "x-ratelimit-remaining-requests": "49",
            "x-ratelimit-remaining-tokens": "749000",
            "x-ratelimit-remaining": "50",  # the error budget, not a request quota
            "retry-after": "30",
        }
    )
    assert meta.request_id == "9a1b2c3d4e5f-FRA"
    assert meta.balances == {"usd": 12.3456, "diem": 0.9871}
    assert meta.ratelimit_remaining == {"requests": 49.0, "tokens": 749000.0}
    assert meta.retry_after == 30.0


@pytest.mark.parametrize(
    ("headers", "balances"),
    [
        ({"x-venice-balance-usd": "n/a", "x-venice-balance-diem": "1"}, {"diem": 1.0}),
        ({"x-venice-balance-usd": "-1.48"}, {"usd": -1.48}),
        ({"x-venice-balance-usd": "", "x-venice-balance-diem": "NaN"}, {}),
        ({}, {}),
    ],
)
def test_unparsable_balance_headers_are_ignored(
    headers: dict[str, str], balances: dict[str, float]
) -> None:
    assert venice().parse_meta(headers).balances == balances


@pytest.mark.parametrize(
    ("status", "body", "expected_type", "message"),
    [
        (
            401,
            {"error": "Authentication failed"},
            ErrorType.AUTH,
            "HTTP 401: Authentication failed",
        ),
        (
            402,
            {"error": "Insufficient USD or Diem balance to complete request."},
            ErrorType.INSUFFICIENT_FUNDS,
            "HTTP 402: Insufficient USD or Diem balance to complete request.",
        ),
        (
            400,
            {
                "error": {
                    "message": "Your request exceeds the model's maximum context.",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
            },
            ErrorType.API_ERROR,
            "HTTP 400: Your request exceeds the model's maximum context.",
        ),
        (
            429,
            {"error": "The model is currently overloaded. Please try again later."},
            ErrorType.RATE_LIMIT,
            "HTTP 429: The model is currently overloaded. Please try again later.",
        ),
    ],
)
def test_error_bodies(status: int, body: Any, expected_type: ErrorType, message: str) -> None:
    a = venice()
    assert a.classify_error(status, body) is expected_type
    assert a.error_message(status, body) == message


# -- models and balance ----------------------------------------------------------------------------


def test_models_request_asks_for_text_models() -> None:
    request = venice().models_request()
    assert (request.method, request.url) == ("GET", "https://api.venice.ai/api/v1/models?type=text")
    assert request.redacted_headers() == {"Authorization": "<redacted>"}


def test_models_prices_and_caching_advertised() -> None:
    models = venice().parse_models(body_of("venice/models.json"))
    assert models == [
        ModelInfo("claude-opus-4-5", ModelPrice(6.0, 30.0, 0.6, 7.5), True),
        ModelInfo("grok-41-fast", ModelPrice(0.5, 1.25, 0.125, None), True),
        ModelInfo("venice-uncensored", ModelPrice(0.2, 0.9, None, None), False),
        ModelInfo("no-spec-model"),
    ]  # retired-model is offline and skipped
    assert select_models([m.id for m in models], exclude=["claude-*"], cap=2) == [
        "grok-41-fast",
        "no-spec-model",
    ]


def test_malformed_models_body() -> None:
    with pytest.raises(BadResponse, match="models response has no data list"):
        venice().parse_models({"error": "Invalid request parameters"})


def test_balance_request_and_parse() -> None:
    a = venice()
    request = a.balance_request()
    assert request is not None
    assert request.url == "https://api.venice.ai/api/v1/api_keys/rate_limits"
    assert a.parse_balance(body_of("venice/rate_limits.json")) == {"usd": 12.3456, "diem": 1.234}


@pytest.mark.parametrize("body", [{}, {"data": {"balances": None}}, [], "ok"])
def test_malformed_balance(body: Any) -> None:
    with pytest.raises(BadResponse, match=r"rate_limits response has no data\.balances object"):
        venice().parse_balance(body)
