"""``POST /v1/chat/completions`` in the OpenAI shape, with Venice's extras (cost, cache writes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response

from exporter.simulator.api import (
    ChatApi,
    ChatRequest,
    Reply,
    RequestError,
    dumps,
    huge_json_response,
    huge_sse,
    json_response,
    sse_response,
    truncated_json_response,
)
from exporter.simulator.tokens import ChatMessage, Segment, content_text, tokenize_messages

ABSURD_TOKENS = 10**12

_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "inference_failed"),
}

STREAM_ERROR = {
    "error": {
        "message": "Model is overloaded, please retry (simulated in-band error)",
        "type": "server_error",
        "code": "model_overloaded",
        "retry_after": 30,
    }
}


def _optional_positive_int(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(f"{name} must be a positive integer", name)
        return value
    return None


def _messages(raw: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty array", "messages")
    out: list[ChatMessage] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", where)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(f"{where}.role must be a non-empty string", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise RequestError(
                        f"{where}.content[{j}] must be an object with a type",
                        f"{where}.content",
                    )
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise RequestError(
                        f"{where}.content[{j}].text must be a string", f"{where}.content"
                    )
        elif content is not None and not isinstance(content, str):
            raise RequestError(
                f"{where}.content must be a string or an array of content parts",
                f"{where}.content",
            )
        out.append(ChatMessage(role, (Segment(content_text(content)),)))
    return out


class OpenAIApi(ChatApi):
    name = "openai"

    def parse(self, body: Any) -> ChatRequest:
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError("model is required (a string)", "model")
        messages = _messages(body.get("messages"))
        max_tokens = _optional_positive_int(body, "max_completion_tokens", "max_tokens")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise RequestError("stream must be a boolean", "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise RequestError("stream_options must be an object", "stream_options")
        include_usage = bool(options and options.get("include_usage") is True)
        # venice_parameters, prompt_cache_key and sampling options are accepted and ignored.
        return ChatRequest(
            model=model,
            prompt=tokenize_messages(messages),
            stream=stream,
            include_usage=include_usage,
            max_tokens=max_tokens,
        )

    def error_body(self, status: int, message: str, param: str | None = None) -> Any:
        if status == 402:
            return {"error": message}  # Venice's StandardError shape
        kind, code = _ERROR_TYPES.get(status, ("server_error", "error"))
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    # -- rendering ------------------------------------------------------------------------

    def usage(self, reply: Reply) -> dict[str, Any] | None:
        out = reply.outcome
        fault = reply.fault
        if fault == "missing_usage":
            return None
        prompt, completion = out.prompt_tokens, out.completion_tokens
        if fault == "negative_tokens":
            prompt, completion = -prompt, -1
        elif fault == "absurd_tokens":
            prompt = ABSURD_TOKENS
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if reply.model.cache_mode != "no_fields":
            cached = out.cached_tokens
            if fault == "cached_exceeds_prompt":
                cached = out.prompt_tokens + reply.model.granularity
            details: dict[str, Any] = {"cached_tokens": cached}
            if reply.model.report_cache_write:
                details["cache_creation_input_tokens"] = out.cache_write_tokens
            usage["prompt_tokens_details"] = details
        return usage

    def _base(self, reply: Reply, kind: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-sim-{reply.seq}",
            "object": kind,
            "created": reply.created,
            "model": reply.model.name,
        }

    def body(self, reply: Reply) -> dict[str, Any]:
        body = self._base(reply, "chat.completion")
        body["choices"] = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": "stop",
            }
        ]
        usage = self.usage(reply)
        if usage is not None:
            body["usage"] = usage
        if reply.cost is not None:
            body["cost"] = reply.cost
        return body

    def render(self, reply: Reply) -> Response:
        fault, headers = reply.fault, reply.headers
        if reply.stream:
            if fault == "huge_body":
                return sse_response(
                    huge_sse(
                        lambda s: self._chunk(reply, {"content": s}), reply.model.huge_body_bytes
                    ),
                    headers,
                )
            return sse_response(self._events(reply), headers)
        if fault == "huge_body":
            return huge_json_response(
                self._base(reply, "chat.completion"), reply.model.huge_body_bytes, headers
            )
        if fault in ("bad_json", "truncated_stream"):
            return truncated_json_response(self.body(reply), headers)
        if fault == "stream_error":
            return json_response(STREAM_ERROR, 200, headers)
        return json_response(self.body(reply), 200, headers)

    def _chunk(self, reply: Reply, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = self._base(reply, "chat.completion.chunk")
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        if reply.include_usage:
            chunk["usage"] = None  # as OpenAI: null on every chunk but the last
        return f"data: {dumps(chunk)}\n\n"

    async def _events(self, reply: Reply) -> AsyncIterator[str]:
        fault = reply.fault
        yield self._chunk(reply, {"role": "assistant", "content": ""})
        await reply.sleep(reply.first_token_delay)
        if fault == "stream_error":
            yield f"data: {dumps(STREAM_ERROR)}\n\n"
            yield "data: [DONE]\n\n"
            return
        if fault == "bad_json":
            # An event whose JSON stops mid-string.
            yield f'data: {{"id":"chatcmpl-sim-{reply.seq}","choices":[{{"delta":{{"cont\n\n'
            yield "data: [DONE]\n\n"
            return
        words = reply.words
        if fault == "truncated_stream":
            words = words[: max(1, len(words) // 2)]
        for i, word in enumerate(words):
            if i:
                await reply.sleep(reply.token_delay)
            yield self._chunk(reply, {"content": word})
        if fault == "truncated_stream":
            return  # no finish chunk, no usage, no [DONE]: the connection just ends
        yield self._chunk(reply, {}, "stop")
        usage = self.usage(reply)
        if reply.include_usage and usage is not None:
            last = self._base(reply, "chat.completion.chunk")
            last["choices"] = []
            last["usage"] = usage
            if reply.cost is not None:
                last["cost"] = reply.cost
            yield f"data: {dumps(last)}\n\n"
        yield "data: [DONE]\n\n"
