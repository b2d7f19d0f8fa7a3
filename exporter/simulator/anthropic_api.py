"""``POST /v1/messages`` in Anthropic's native shape, with explicit ``cache_control`` caching.

Only prompt prefixes that end at a marker are cached; ``input_tokens`` counts what was
neither read from nor written to the cache, so the whole prompt is
input + cache_read + cache_creation.
"""

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
from exporter.simulator.tokens import ChatMessage, Segment, tokenize_messages

ABSURD_TOKENS = 10**12
MAX_BREAKPOINTS = 4  # Anthropic rejects more than four cache_control blocks

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

STREAM_ERROR = {
    "type": "error",
    "error": {"type": "overloaded_error", "message": "Overloaded (simulated in-band error)"},
}


def _cache_control(block: dict[str, Any], where: str) -> bool:
    marker = block.get("cache_control")
    if marker is None:
        return False
    if not isinstance(marker, dict) or marker.get("type") != "ephemeral":
        raise RequestError(
            f'{where}.cache_control must be {{"type": "ephemeral"}}', f"{where}.cache_control"
        )
    return True


def _segments(content: Any, where: str, *, system: bool = False) -> tuple[Segment, ...]:
    if isinstance(content, str):
        return (Segment(content),)
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or an array of content blocks", where)
    out: list[Segment] = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise RequestError(f"{at} must be an object with a type", at)
        if system and block["type"] != "text":
            raise RequestError(f"{at}.type must be text in system", at)
        text = block.get("text")
        if block["type"] == "text" and not isinstance(text, str):
            raise RequestError(f"{at}.text must be a string", at)
        # Non-text blocks (images, tool results) carry no tokens here but may hold a marker.
        out.append(Segment(text if isinstance(text, str) else "", _cache_control(block, at)))
    return tuple(out)


class AnthropicApi(ChatApi):
    name = "anthropic"

    def parse(self, body: Any) -> ChatRequest:
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError("model: field required", "model")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError("max_tokens: field required (a positive integer)", "max_tokens")
        messages: list[ChatMessage] = []
        system = body.get("system")
        if system is not None:
            messages.append(ChatMessage("system", _segments(system, "system", system=True)))
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise RequestError("messages: must be a non-empty array", "messages")
        for i, message in enumerate(raw):
            where = f"messages.{i}"
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise RequestError(f"{where}.role must be user or assistant", where)
            messages.append(
                ChatMessage(message["role"], _segments(message.get("content"), f"{where}.content"))
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be a boolean", "stream")
        prompt = tokenize_messages(messages)
        breakpoints = prompt.breakpoints
        if _cache_control(body, "request"):
            # Automatic caching: the breakpoint follows the end of the conversation.
            breakpoints = (*breakpoints, prompt.content_end)
        if len(breakpoints) > MAX_BREAKPOINTS:
            raise RequestError(
                f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {len(breakpoints)}."
            )
        return ChatRequest(
            model=model,
            prompt=prompt,
            stream=stream,
            max_tokens=max_tokens,
            breakpoints=breakpoints,
        )

    def error_body(self, status: int, message: str, param: str | None = None) -> Any:
        kind = _ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    # -- rendering ------------------------------------------------------------------------

    def usage(self, reply: Reply, *, output_tokens: int | None = None) -> dict[str, Any] | None:
        out = reply.outcome
        fault = reply.fault
        if fault == "missing_usage":
            return None
        output = out.completion_tokens if output_tokens is None else output_tokens
        if reply.model.cache_mode == "no_fields":
            input_tokens = out.prompt_tokens
        else:
            input_tokens = out.prompt_tokens - out.cached_tokens - out.cache_write_tokens
        if fault == "negative_tokens":
            input_tokens, output = -out.prompt_tokens, -1
        elif fault == "absurd_tokens":
            input_tokens = ABSURD_TOKENS
        usage: dict[str, Any] = {"input_tokens": input_tokens}
        if reply.model.cache_mode != "no_fields":
            usage["cache_creation_input_tokens"] = out.cache_write_tokens
            usage["cache_read_input_tokens"] = out.cached_tokens
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": out.cache_write_tokens,
                "ephemeral_1h_input_tokens": 0,
            }
        usage["output_tokens"] = output
        return usage

    def _message(self, reply: Reply, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": f"msg_sim_{reply.seq}",
            "type": "message",
            "role": "assistant",
            "model": reply.model.name,
            "content": content,
            "stop_reason": "end_turn" if content else None,
            "stop_sequence": None,
        }

    def body(self, reply: Reply) -> dict[str, Any]:
        body = self._message(reply, [{"type": "text", "text": reply.text}])
        usage = self.usage(reply)
        if usage is not None:
            body["usage"] = usage
        return body

    def render(self, reply: Reply) -> Response:
        fault, headers = reply.fault, reply.headers
        if reply.stream:
            if fault == "huge_body":
                return sse_response(huge_sse(self._delta, reply.model.huge_body_bytes), headers)
            return sse_response(self._events(reply), headers)
        if fault == "huge_body":
            return huge_json_response(
                self._message(reply, []), reply.model.huge_body_bytes, headers
            )
        if fault in ("bad_json", "truncated_stream"):
            return truncated_json_response(self.body(reply), headers)
        if fault == "stream_error":
            return json_response(STREAM_ERROR, 200, headers)
        return json_response(self.body(reply), 200, headers)

    @staticmethod
    def _event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {dumps(data)}\n\n"

    def _delta(self, text: str) -> str:
        return self._event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": text},
            },
        )

    async def _events(self, reply: Reply) -> AsyncIterator[str]:
        fault = reply.fault
        start = self._message(reply, [])
        usage = self.usage(reply, output_tokens=1)
        if usage is not None:
            start["usage"] = usage
        yield self._event("message_start", {"type": "message_start", "message": start})
        yield self._event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        yield self._event("ping", {"type": "ping"})
        await reply.sleep(reply.first_token_delay)
        if fault == "stream_error":
            yield self._event("error", STREAM_ERROR)
            return
        if fault == "bad_json":
            yield 'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{\n\n'
            return
        words = reply.words
        if fault == "truncated_stream":
            words = words[: max(1, len(words) // 2)]
        for i, word in enumerate(words):
            if i:
                await reply.sleep(reply.token_delay)
            yield self._delta(word)
        if fault == "truncated_stream":
            return  # no content_block_stop, message_delta or message_stop
        yield self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        }
        final = self.usage(reply)
        if final is not None:
            final.pop("cache_creation", None)
            delta["usage"] = final  # cumulative, as the real API sends it
        yield self._event("message_delta", delta)
        yield self._event("message_stop", {"type": "message_stop"})
