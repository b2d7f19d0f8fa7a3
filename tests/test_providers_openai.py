"""OpenAI-compatible adapter: requests, usage normalisation, streams, models, balance."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import pytest

from exporter.providers import (
    ADAPTERS,
    AnthropicAdapter,
    OpenAIAdapter,
    VeniceAdapter,
    adapter_class,
)
from exporter.providers.base import BadResponse, Prompt, UpstreamError, select_models
from exporter.providers.openai import MAX_TEXT_CHARS, in_band_error_type
from exporter.results import ErrorType, ModelInfo, ModelPrice
from tests.fixtures.providers.support import (
    KEY,
    body_of,
    check_completion_case,
    check_stream_case,
    completion_cases,
    read_sse,
    run_stream,
    stream_cases,
)

PROMPT = Prompt(system="run 7f3a9c\nYou are terse.\n" + "lorem " * 10, user="Say OK.")


def adapter(base_url: str = "https://llm.example.com/v1", **kwargs: Any) -> OpenAIAdapter:
    kwargs.setdefault("api_key", KEY)
    return OpenAIAdapter(base_url=base_url, **kwargs)


def usage_body(**usage: Any) -> dict[str, Any]:
    return {"id": "x", "choices": [], "usage": usage}


# -- registry -------------------------------------------------------------------------------------


def test_registry_maps_type_names_to_classes() -> None:
    assert dict(ADAPTERS) == {
        "openai": OpenAIAdapter,
        "venice": VeniceAdapter,
        "anthropic": AnthropicAdapter,
    }
    assert adapter_class("venice") is VeniceAdapter


def test_unknown_type_names_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown provider type 'gemini' \(known: anthropic, openai, venice\)"
    ):
        adapter_class("gemini")


# -- fixtures: documented response shapes ---------------------------------------------------------


@pytest.mark.parametrize("case", completion_cases("openai"))
def test_completion_fixture(case: str) -> None:
    check_completion_case(case, "openai")


@pytest.mark.parametrize("case", stream_cases("openai"))
def test_stream_fixture(case: str) -> None:
    check_stream_case(case, "openai")


def test_stream_fixture_with_keepalive_comments_has_the_same_events_as_without() -> None:
    _, events = read_sse("openai/stream_deepseek_keepalive.sse")
    assert [e for e, _ in events] == [None] * 5
    assert events[-1] == (None, "[DONE]")


# -- request building -----------------------------------------------------------------------------


def test_generic_host_body_and_headers() -> None:
    request = adapter().chat_request("m1", PROMPT, stream=True)
    assert request.method == "POST"
    assert request.url == "https://llm.example.com/v1/chat/completions"
    assert request.json == {
        "model": "m1",
        "messages": [
            {"role": "system", "content": PROMPT.system},
            {"role": "user", "content": "Say OK."},
        ],
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert request.headers == {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    assert request.secret_headers == frozenset({"authorization"})


def test_non_streaming_body_has_no_stream_options() -> None:
    body = adapter().chat_request("m1", PROMPT, stream=False).json
    assert body is not None
    assert body["stream"] is False
    assert "stream_options" not in body


def test_openai_host_uses_max_completion_tokens_and_a_prompt_cache_key() -> None:
    request = adapter("https://api.openai.com/v1/", max_tokens=16).chat_request(
        "gpt-5.6", PROMPT, stream=True
    )
    assert request.url == "https://api.openai.com/v1/chat/completions"
    body = request.json
    assert body is not None
    assert body["max_completion_tokens"] == 16
    assert "max_tokens" not in body
    expected = "pce-" + hashlib.sha256(b"run 7f3a9c").hexdigest()[:16]
    assert body["prompt_cache_key"] == expected


def test_prompt_cache_key_is_stable_within_a_run_and_differs_across_runs() -> None:
    a = adapter(prompt_cache_key=True)
    same_run = Prompt(system="run 7f3a9c\nanother body", user="other user")
    other_run = Prompt(system="run 000001\nYou are terse.", user="Say OK.")
    key = a.chat_request("m", PROMPT, stream=False).json["prompt_cache_key"]  # type: ignore[index]
    assert a.chat_request("m", same_run, stream=False).json["prompt_cache_key"] == key  # type: ignore[index]
    assert a.chat_request("m", other_run, stream=False).json["prompt_cache_key"] != key  # type: ignore[index]


def test_explicit_options_beat_host_defaults() -> None:
    a = adapter("https://api.openai.com/v1", max_tokens_field="max_tokens", prompt_cache_key=False)
    body = a.chat_request("m", PROMPT, stream=False).json
    assert body is not None
    assert body["max_tokens"] == 8
    assert "prompt_cache_key" not in body


def test_invalid_max_tokens_field_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_tokens_field must be one of"):
        adapter(max_tokens_field="max_output_tokens")


def test_extra_body_is_deep_merged_and_not_shared() -> None:
    extra = {"temperature": 0, "stream_options": {"continuous_usage_stats": True}}
    a = adapter(extra_body=extra)
    extra["temperature"] = 1  # mutating the caller's dict must not change the adapter
    body = a.chat_request("m", PROMPT, stream=True).json
    assert body is not None
    assert body["temperature"] == 0
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    body["stream_options"]["include_usage"] = False
    again = a.chat_request("m", PROMPT, stream=True).json
    assert again is not None
    assert again["stream_options"]["include_usage"] is True


def test_no_key_sends_no_authorization_header() -> None:
    request = adapter("http://127.0.0.1:8080/v1", api_key=None).chat_request(
        "m", PROMPT, stream=True
    )
    assert "Authorization" not in request.headers
    assert adapter("http://127.0.0.1:8080/v1", api_key=None).models_request().headers == {}


def test_key_never_in_repr_or_redacted_headers() -> None:
    a = adapter(extra_headers={"X-Litellm-Api-Key": "proxy-secret", "X-Title": "pce"})
    request = a.chat_request("m", PROMPT, stream=True)
    assert KEY not in repr(a)
    assert KEY not in repr(request.redacted_headers())
    redacted = request.redacted_headers()
    assert redacted["Authorization"] == "<redacted>"
    assert redacted["X-Litellm-Api-Key"] == "<redacted>"
    assert redacted["X-Title"] == "pce"


def test_extra_headers_cannot_replace_our_authorization() -> None:
    a = adapter(extra_headers={"authorization": "Bearer other", "HTTP-Referer": "https://x"})
    headers = a.chat_request("m", PROMPT, stream=True).headers
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert "authorization" not in headers
    assert headers["HTTP-Referer"] == "https://x"


def test_no_default_base_url_or_key_variable() -> None:
    assert OpenAIAdapter.default_base_url is None
    assert OpenAIAdapter.key_env_vars == ()


def test_host_defaults_for_warmup_repeats() -> None:
    assert adapter("https://api.deepseek.com").warmup_repeats == 2
    assert adapter("https://api.openai.com/v1").warmup_repeats == 1
    assert adapter("https://api.deepseek.com", warmup_repeats=4).warmup_repeats == 4
    assert adapter().min_cacheable_for("anything") == 1024
    assert adapter(min_cacheable_tokens=2048).min_cacheable_for("anything") == 2048


# -- usage normalisation and bad inputs -----------------------------------------------------------


def test_deepseek_hit_count_wins_over_details() -> None:
    body = usage_body(
        prompt_tokens=2048,
        completion_tokens=1,
        prompt_cache_hit_tokens=1920,
        prompt_tokens_details={"cached_tokens": 0},
    )
    assert adapter().parse_completion(body).usage.cached_tokens == 1920


def test_details_win_over_legacy_and_timings() -> None:
    body = usage_body(
        prompt_tokens=2048,
        completion_tokens=1,
        cached_tokens=5,
        prompt_tokens_details={"cached_tokens": 1024},
    )
    body["timings"] = {"cache_n": 7}
    assert adapter().parse_completion(body).usage.cached_tokens == 1024


def test_digit_strings_and_integral_floats_are_accepted() -> None:
    usage = (
        adapter().parse_completion(usage_body(prompt_tokens="1300", completion_tokens=8.0)).usage
    )
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (1300, 8, None)


def test_text_is_capped() -> None:
    body = usage_body(prompt_tokens=10, completion_tokens=1)
    body["choices"] = [{"message": {"content": "x" * (MAX_TEXT_CHARS + 50)}}]
    assert len(adapter().parse_completion(body).text) == MAX_TEXT_CHARS


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"id": "x", "choices": []}, "response has no usage"),
        ({"id": "x", "usage": None}, "response has no usage"),
        ([1, 2], "response body is not a JSON object"),
        ("OK", "response body is not a JSON object"),
        (None, "response body is not a JSON object"),
        (usage_body(completion_tokens=1), "usage field prompt_tokens is missing"),
        (usage_body(prompt_tokens=10), "usage field completion_tokens is missing"),
        ({"usage": [10, 1]}, "usage is not a JSON object"),
        (
            usage_body(prompt_tokens="ten", completion_tokens=1),
            "usage field prompt_tokens is not an integer",
        ),
        (
            usage_body(prompt_tokens=12.5, completion_tokens=1),
            "usage field prompt_tokens is not an integer",
        ),
        (
            usage_body(prompt_tokens=True, completion_tokens=1),
            "usage field prompt_tokens is not an integer",
        ),
        (
            usage_body(prompt_tokens=-1, completion_tokens=1),
            "usage field prompt_tokens is negative: -1",
        ),
        (usage_body(prompt_tokens=1e12, completion_tokens=1), "prompt_tokens is implausibly large"),
        (
            usage_body(
                prompt_tokens=100, completion_tokens=1, prompt_tokens_details={"cached_tokens": 101}
            ),
            "cached tokens (101) exceed prompt tokens (100)",
        ),
        (
            usage_body(prompt_tokens=100, completion_tokens=1, prompt_cache_hit_tokens="lots"),
            "usage field prompt_cache_hit_tokens is not an integer",
        ),
        (
            usage_body(
                prompt_tokens=100, completion_tokens=1, prompt_tokens_details={"cached_tokens": -3}
            ),
            "usage field prompt_tokens_details.cached_tokens is negative",
        ),
        (
            usage_body(
                prompt_tokens=100,
                completion_tokens=1,
                prompt_tokens_details={"cache_write_tokens": 200},
            ),
            "cache-write tokens (200) exceed prompt tokens (100)",
        ),
        (
            usage_body(
                prompt_tokens=100,
                completion_tokens=1,
                prompt_tokens_details={"cached_tokens": 60, "cache_write_tokens": 60},
            ),
            "cached (60) plus cache-write (60) tokens exceed prompt (100)",
        ),
        (
            usage_body(prompt_tokens=100, completion_tokens=1, prompt_tokens_details="none"),
            "usage field prompt_tokens_details is not an object",
        ),
    ],
)
def test_bad_completion_bodies(body: Any, message: str) -> None:
    with pytest.raises(BadResponse, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        adapter().parse_completion(body)
    assert "\n" not in str(info.value)


def test_error_body_with_status_200_is_an_upstream_error() -> None:
    body = {"error": {"code": 502, "message": "Provider returned error"}}
    with pytest.raises(UpstreamError, match="Provider returned error") as info:
        adapter().parse_completion(body)
    assert info.value.error_type is ErrorType.API_ERROR


# -- streams --------------------------------------------------------------------------------------


def test_done_and_empty_data_are_not_output() -> None:
    decoder = adapter().stream_decoder()
    assert decoder.feed(None, "[DONE]") is False
    assert decoder.feed(None, "   ") is False


@pytest.mark.parametrize(
    ("data", "message"),
    [("[1, 2]", "stream chunk is not a JSON object"), ("{oops", "stream data is not JSON: {oops")],
)
def test_malformed_chunks(data: str, message: str) -> None:
    with pytest.raises(BadResponse, match=message):
        adapter().stream_decoder().feed(None, data)


def test_usage_that_is_not_an_object_fails_at_finish() -> None:
    decoder = adapter().stream_decoder()
    decoder.feed(None, json.dumps({"choices": [], "usage": "12"}))
    with pytest.raises(BadResponse, match="usage is not a JSON object"):
        decoder.finish()


def test_stream_validates_usage_like_a_body() -> None:
    events = [
        (None, json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": -1}}))
    ]
    _, result = run_stream(adapter().stream_decoder(), events)
    assert isinstance(result, BadResponse)
    assert str(result) == "usage field completion_tokens is negative: -1"


def test_stream_text_is_capped() -> None:
    decoder = adapter().stream_decoder()
    chunk = {"choices": [{"delta": {"content": "y" * 1500}}]}
    for _ in range(3):
        assert decoder.feed(None, json.dumps(chunk)) is True
    decoder.feed(
        None, json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
    )
    assert len(decoder.finish().text) == MAX_TEXT_CHARS


def test_error_event_name_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="overloaded"):
        adapter().stream_decoder().feed("error", json.dumps({"message": "overloaded"}))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"code": 429, "message": "slow down"}, ErrorType.RATE_LIMIT),
        ({"code": "429"}, ErrorType.RATE_LIMIT),
        ({"code": "rate_limit_exceeded", "type": "tokens"}, ErrorType.RATE_LIMIT),
        ({"type": "server_error", "code": "model_overloaded"}, ErrorType.API_ERROR),
        ({"code": 401, "message": "bad key"}, ErrorType.AUTH),
        ({"code": 402, "message": "Insufficient credits"}, ErrorType.INSUFFICIENT_FUNDS),
        ({"code": "insufficient_quota"}, ErrorType.INSUFFICIENT_FUNDS),
        ("Rate limit exceeded", ErrorType.RATE_LIMIT),
        ("Insufficient USD or Diem balance to complete request.", ErrorType.INSUFFICIENT_FUNDS),
        ("something broke", ErrorType.API_ERROR),
        (None, ErrorType.API_ERROR),
    ],
)
def test_in_band_error_types(error: Any, expected: ErrorType) -> None:
    assert in_band_error_type(error) is expected


# -- response headers and errors ------------------------------------------------------------------


def test_meta_from_headers() -> None:
    meta = adapter().parse_meta(
        httpx.Headers(
            {
                "X-Request-Id": "req_123",
                "x-ratelimit-remaining-requests": "499",
                "x-ratelimit-remaining-tokens": "149984",
                "x-ratelimit-reset-requests": "120ms",
                "retry-after-ms": "1500",
                "retry-after": "2",
            }
        )
    )
    assert meta.request_id == "req_123"
    assert meta.ratelimit_remaining == {"requests": 499.0, "tokens": 149984.0}
    assert meta.retry_after == 1.5
    assert meta.balances == {}


def test_meta_falls_back_to_cf_ray_and_is_case_insensitive_for_plain_dicts() -> None:
    meta = adapter().parse_meta({"CF-RAY": "8f0e-SJC", "Retry-After": "30"})
    assert meta.request_id == "8f0e-SJC"
    assert meta.retry_after == 30.0


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            429,
            {"error": {"type": "insufficient_quota", "code": "insufficient_quota"}},
            ErrorType.INSUFFICIENT_FUNDS,
        ),
        (429, {"error": {"code": "rate_limit_exceeded"}}, ErrorType.RATE_LIMIT),
        (429, None, ErrorType.RATE_LIMIT),
        (401, {"error": {"code": "invalid_api_key"}}, ErrorType.AUTH),
        (402, {"error": "Insufficient credits"}, ErrorType.INSUFFICIENT_FUNDS),
        (408, None, ErrorType.TIMEOUT),
        (529, {"error": {"type": "overloaded_error"}}, ErrorType.API_ERROR),
        (503, "Service Unavailable", ErrorType.API_ERROR),
    ],
)
def test_classify_error(status: int, body: Any, expected: ErrorType) -> None:
    assert adapter().classify_error(status, body) is expected


def test_error_message_is_one_line() -> None:
    body = {"error": {"message": "Incorrect API key\nprovided", "type": "invalid_request_error"}}
    assert adapter().error_message(401, body) == "HTTP 401: Incorrect API key provided"


# -- models ---------------------------------------------------------------------------------------


def test_models_request() -> None:
    request = adapter().models_request()
    assert (request.method, request.url, request.json) == (
        "GET",
        "https://llm.example.com/v1/models",
        None,
    )
    assert request.headers == {"Authorization": f"Bearer {KEY}"}
    assert request.secret_headers == frozenset({"authorization"})


def test_openai_models_skip_entries_without_id() -> None:
    models = adapter().parse_models(body_of("openai/models_openai.json"))
    assert [m.id for m in models] == ["gpt-4.1-mini", "gpt-5.6", "text-embedding-3-small"]
    assert all(m.price is None and m.caching_advertised is None for m in models)


def test_openrouter_pricing_per_million() -> None:
    models = {m.id: m for m in adapter().parse_models(body_of("openai/models_openrouter.json"))}
    assert models["anthropic/claude-sonnet-4.5"] == ModelInfo(
        "anthropic/claude-sonnet-4.5", ModelPrice(3.0, 15.0, 0.3, 3.75), True
    )
    assert models["deepseek/deepseek-chat"] == ModelInfo(
        "deepseek/deepseek-chat", ModelPrice(0.27, 1.1, 0.07, None), True
    )
    assert models["meta-llama/llama-3.3-70b-instruct"].caching_advertised is False
    assert models["openrouter/auto"] == ModelInfo("openrouter/auto", None, False)


def test_bare_list_models_body() -> None:
    models = adapter().parse_models(body_of("openai/models_bare_list.json"))
    assert [m.id for m in models] == ["local-model", "other-model"]


@pytest.mark.parametrize("body", [{"object": "list"}, {"data": "gpt-4"}, "gpt-4", None, 3])
def test_malformed_models_body(body: Any) -> None:
    with pytest.raises(BadResponse, match="models response has no data list"):
        adapter().parse_models(body)


def test_select_models_include_exclude_cap() -> None:
    ids = [m.id for m in adapter().parse_models(body_of("openai/models_openrouter.json"))]
    assert select_models(ids, include=["anthropic/*", "deepseek/*"]) == [
        "anthropic/claude-sonnet-4.5",
        "deepseek/deepseek-chat",
    ]
    assert select_models(ids, exclude=["openrouter/*", "meta-llama/*"], cap=1) == [
        "anthropic/claude-sonnet-4.5"
    ]
    assert len(select_models(ids)) == 4


# -- balance --------------------------------------------------------------------------------------


def test_deepseek_balance() -> None:
    a = adapter("https://api.deepseek.com/v1")
    request = a.balance_request()
    assert request is not None
    assert (request.method, request.url) == ("GET", "https://api.deepseek.com/user/balance")
    assert request.redacted_headers() == {"Authorization": "<redacted>"}
    assert a.parse_balance(body_of("openai/balance_deepseek.json")) == {"cny": 110.0, "usd": 5.25}


def test_openrouter_balance() -> None:
    a = adapter("https://openrouter.ai/api/v1")
    request = a.balance_request()
    assert request is not None
    assert request.url == "https://openrouter.ai/api/v1/key"
    assert a.parse_balance(body_of("openai/balance_openrouter.json")) == {"usd": 74.5}
    assert a.parse_balance(body_of("openai/balance_openrouter_unlimited.json")) == {}


def test_no_balance_for_other_hosts() -> None:
    assert adapter().balance_request() is None
    assert adapter("https://api.openai.com/v1").balance_request() is None
    assert adapter().parse_balance({"anything": 1}) == {}


@pytest.mark.parametrize(
    ("base_url", "body", "message"),
    [
        (
            "https://api.deepseek.com",
            {"is_available": True},
            "balance response has no balance_infos list",
        ),
        (
            "https://api.deepseek.com",
            {"balance_infos": [{"currency": "USD", "total_balance": "n/a"}]},
            "unparsable balance entry",
        ),
        ("https://openrouter.ai/api/v1", [], "key response has no data object"),
        (
            "https://openrouter.ai/api/v1",
            {"data": {"limit_remaining": "lots"}},
            "limit_remaining is not a number",
        ),
    ],
)
def test_malformed_balance(base_url: str, body: Any, message: str) -> None:
    with pytest.raises(BadResponse, match=message):
        adapter(base_url).parse_balance(body)
