"""Anthropic adapter: cache_control placement, exclusive input counts, stream events, headers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exporter.providers import AnthropicAdapter
from exporter.providers.anthropic import model_family
from exporter.providers.base import BadResponse, Prompt, UpstreamError, select_models
from exporter.results import ErrorType, ModelInfo
from tests.fixtures.providers.support import (
    KEY,
    body_of,
    check_completion_case,
    check_stream_case,
    completion_cases,
    run_stream,
    stream_cases,
)

PROMPT = Prompt(system="run 0c0ffee\nYou are terse.", user="Say OK.")


def anthropic(**kwargs: Any) -> AnthropicAdapter:
    kwargs.setdefault("api_key", KEY)
    return AnthropicAdapter(**kwargs)


@pytest.mark.parametrize("case", completion_cases("anthropic"))
def test_completion_fixture(case: str) -> None:
    check_completion_case(case, "anthropic")


@pytest.mark.parametrize("case", stream_cases("anthropic"))
def test_stream_fixture(case: str) -> None:
    check_stream_case(case, "anthropic")


# -- requests --------------------------------------------------------------------------------------


def test_messages_request_with_two_cache_breakpoints() -> None:
    request = anthropic(max_tokens=16).chat_request("claude-sonnet-4-5", PROMPT, stream=True)
    assert (request.method, request.url) == ("POST", "https://api.anthropic.com/v1/messages")
    assert request.json == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 16,
        "system": [
            {"type": "text", "text": PROMPT.system, "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Say OK.", "cache_control": {"type": "ephemeral"}}
                ],
            }
        ],
        "stream": True,
    }
    assert request.headers == {
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
        "x-api-key": KEY,
    }
    assert request.secret_headers == frozenset({"x-api-key"})


def test_key_never_in_repr_or_redacted_headers() -> None:
    a = anthropic(extra_headers={"anthropic-beta": "cache-diagnosis-2026-04-07"})
    request = a.chat_request("m", PROMPT, stream=False)
    assert request.json is not None
    assert request.json["stream"] is False
    assert KEY not in repr(a)
    redacted = request.redacted_headers()
    assert KEY not in repr(redacted)
    assert redacted["x-api-key"] == "<redacted>"
    assert redacted["anthropic-beta"] == "cache-diagnosis-2026-04-07"


def test_breakpoint_dicts_are_not_shared_between_requests() -> None:
    a = anthropic()
    first = a.chat_request("m", PROMPT, stream=True).json
    assert first is not None
    first["system"][0]["cache_control"]["ttl"] = "1h"
    second = a.chat_request("m", PROMPT, stream=True).json
    assert second is not None
    assert second["system"][0]["cache_control"] == {"type": "ephemeral"}


def test_no_key_sends_no_key_header() -> None:
    request = anthropic(api_key=None, base_url="http://127.0.0.1:9000/v1/").models_request()
    assert request.url == "http://127.0.0.1:9000/v1/models?limit=1000"
    assert request.headers == {"anthropic-version": "2023-06-01"}


def test_defaults() -> None:
    a = anthropic()
    assert AnthropicAdapter.key_env_vars == ("ANTHROPIC_API_KEY",)
    assert a.base_url == AnthropicAdapter.default_base_url == "https://api.anthropic.com/v1"
    assert AnthropicAdapter.reports_cache_fields is True
    assert a.balance_request() is None
    assert a.min_cacheable_tokens == 4096


# -- minimum cacheable length ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "minimum"),
    [
        ("claude-opus-5", 512),
        ("claude-sonnet-5", 1024),
        ("claude-opus-4-8", 1024),
        ("claude-opus-4-7", 4096),
        ("claude-opus-4-6", 4096),
        ("claude-opus-4-5-20251101", 4096),
        ("claude-opus-4-1-20250805", 1024),
        ("claude-opus-4-20250514", 1024),
        ("claude-sonnet-4-6", 2048),
        ("claude-sonnet-4-5-20250929", 1024),
        ("claude-sonnet-4-20250514", 1024),
        ("claude-haiku-4-5-20251001", 4096),
        ("claude-3-7-sonnet-20250219", 1024),
        ("claude-3-5-sonnet-20241022", 1024),
        ("claude-3-5-haiku-20241022", 2048),
        ("claude-3-haiku-20240307", 2048),
        ("claude-3-opus-20240229", 1024),
        ("claude-sonnet-4.5", 1024),
        ("claude-opus-5-1", 4096),  # not in the table: the safe default
        ("claude-next", 4096),
    ],
)
def test_min_cacheable_for(model: str, minimum: int) -> None:
    assert anthropic().min_cacheable_for(model) == minimum


def test_configured_minimum_applies_to_every_model() -> None:
    assert anthropic(min_cacheable_tokens=1500).min_cacheable_for("claude-opus-5") == 1500


def test_model_family_ignores_dates() -> None:
    assert model_family("claude-opus-4-20250514") == ("opus", 4, None)
    assert model_family("claude-3-5-sonnet-20241022") == ("sonnet", 3, 5)
    assert model_family("gpt-4.1") is None


# -- usage and bad inputs --------------------------------------------------------------------------


def message(**usage: Any) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "content": [], "usage": usage}


@pytest.mark.parametrize(
    ("body", "message_text"),
    [
        ({"id": "msg_1", "type": "message", "content": []}, "response has no usage"),
        (["message"], "response body is not a JSON object"),
        (message(output_tokens=1), "usage field input_tokens is missing"),
        (message(input_tokens=10), "usage field output_tokens is missing"),
        (
            message(input_tokens="ten", output_tokens=1),
            "usage field input_tokens is not an integer",
        ),
        (
            message(input_tokens=10, output_tokens=1, cache_read_input_tokens=-5),
            "usage field cache_read_input_tokens is negative: -5",
        ),
        (
            message(input_tokens=10, output_tokens=1, cache_creation_input_tokens=1e12),
            "usage field cache_creation_input_tokens is implausibly large",
        ),
        ({"usage": "10 in, 1 out"}, "usage is not a JSON object"),
    ],
)
def test_bad_bodies(body: Any, message_text: str) -> None:
    with pytest.raises(BadResponse, match=message_text):
        anthropic().parse_completion(body)


def test_error_body_is_an_upstream_error() -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(UpstreamError, match="Overloaded") as info:
        anthropic().parse_completion(body)
    assert info.value.error_type is ErrorType.API_ERROR


# -- streams ---------------------------------------------------------------------------------------


def feed(decoder: Any, kind: str, payload: dict[str, Any]) -> bool:
    return bool(decoder.feed(kind, json.dumps({"type": kind, **payload})))


def test_message_delta_overrides_cumulative_fields() -> None:
    decoder = anthropic().stream_decoder()
    start = {"input_tokens": 10, "cache_read_input_tokens": 0, "output_tokens": 1}
    feed(decoder, "message_start", {"message": {"id": "msg_9", "usage": start}})
    feed(decoder, "message_delta", {"usage": {"output_tokens": 5, "cache_read_input_tokens": 2000}})
    usage = decoder.finish().usage
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (2010, 2000, 5)


def test_event_name_is_used_when_data_has_no_type() -> None:
    decoder = anthropic().stream_decoder()
    with pytest.raises(UpstreamError) as info:
        decoder.feed(
            "error", json.dumps({"error": {"type": "rate_limit_error", "message": "slow"}})
        )
    assert info.value.error_type is ErrorType.RATE_LIMIT


@pytest.mark.parametrize(
    ("events", "message_text"),
    [
        ([("message_start", "not json")], "stream data is not JSON: not json"),
        ([("message_start", "[]")], "stream event is not a JSON object"),
        (
            [("message_start", '{"type": "message_start", "message": {}}')],
            "message_start carries no usage",
        ),
        (
            [("message_delta", '{"type": "message_delta", "usage": {"output_tokens": 3}}')],
            "stream ended without usage",
        ),
    ],
)
def test_bad_streams(events: list[tuple[str, str]], message_text: str) -> None:
    _, result = run_stream(anthropic().stream_decoder(), events)
    assert isinstance(result, BadResponse)
    assert str(result).startswith(message_text)


def test_ping_and_empty_data_are_not_output() -> None:
    decoder = anthropic().stream_decoder()
    assert decoder.feed("ping", '{"type": "ping"}') is False
    assert decoder.feed(None, "") is False


# -- headers, errors, models -----------------------------------------------------------------------


def test_meta_from_headers() -> None:
    meta = anthropic().parse_meta(
        {
            "request-id": "req_011CSHoEeqs5C35K2UUqR7Fy",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-tokens-remaining": "440000",
            "anthropic-ratelimit-input-tokens-remaining": "400000",
            "anthropic-ratelimit-output-tokens-remaining": "40000",
            "anthropic-ratelimit-requests-reset": "2025-08-21T10:00:00Z",
            "Retry-After": "7",
            "cf-ray": "abc-SJC",
        }
    )
    assert meta.request_id == "req_011CSHoEeqs5C35K2UUqR7Fy"
    assert meta.ratelimit_remaining == {
        "requests": 49.0,
        "tokens": 440000.0,
        "input_tokens": 400000.0,
        "output_tokens": 40000.0,
    }
    assert meta.retry_after == 7.0
    assert meta.balances == {}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (529, {"type": "error", "error": {"type": "overloaded_error"}}, ErrorType.API_ERROR),
        (429, {"type": "error", "error": {"type": "rate_limit_error"}}, ErrorType.RATE_LIMIT),
        (401, {"type": "error", "error": {"type": "authentication_error"}}, ErrorType.AUTH),
        (403, {"type": "error", "error": {"type": "permission_error"}}, ErrorType.AUTH),
        (402, {"type": "error", "error": {"type": "billing_error"}}, ErrorType.INSUFFICIENT_FUNDS),
        (
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "Your credit balance is too low to access the Anthropic API.",
                },
            },
            ErrorType.INSUFFICIENT_FUNDS,
        ),
        (400, {"type": "error", "error": {"type": "invalid_request_error"}}, ErrorType.API_ERROR),
        (500, None, ErrorType.API_ERROR),
    ],
)
def test_classify_error(status: int, body: Any, expected: ErrorType) -> None:
    assert anthropic().classify_error(status, body) is expected


def test_models() -> None:
    a = anthropic()
    request = a.models_request()
    assert (request.method, request.url) == (
        "GET",
        "https://api.anthropic.com/v1/models?limit=1000",
    )
    models = a.parse_models(body_of("anthropic/models.json"))
    assert models == [
        ModelInfo("claude-opus-4-5-20251101"),
        ModelInfo("claude-sonnet-4-5-20250929"),
        ModelInfo("claude-haiku-4-5-20251001"),
    ]
    assert select_models(
        [m.id for m in models], include=["claude-*-4-5-*"], exclude=["*haiku*"]
    ) == [
        "claude-opus-4-5-20251101",
        "claude-sonnet-4-5-20250929",
    ]


@pytest.mark.parametrize("body", [{"models": []}, [], None])
def test_malformed_models(body: Any) -> None:
    with pytest.raises(BadResponse, match="models response has no data list"):
        anthropic().parse_models(body)
