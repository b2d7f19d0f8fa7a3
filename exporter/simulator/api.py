"""What the OpenAI-style and Anthropic-style endpoints have in common.

An API family parses its request body into a ChatRequest and renders a Reply (the served
completion: usage, cost, latency plan, fault) into a response. Everything else, from auth
to billing, is the same pipeline in app.py.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response, StreamingResponse

from exporter.simulator.models import SimModel
from exporter.simulator.state import Charge, Outcome
from exporter.simulator.tokens import TokenizedPrompt

_WORDS = ("Simulated", "reply", "from", "the", "prompt", "cache", "simulator")

SSE_HEADERS = {"cache-control": "no-cache"}

_HUGE_CHUNK = 64 * 1024


class RequestError(Exception):
    """The request is malformed; the message says which field and why, in one line."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    prompt: TokenizedPrompt
    stream: bool
    include_usage: bool = False
    max_tokens: int | None = None
    # Anthropic only: where cache_control markers end (explicit and automatic).
    breakpoints: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """A served completion, ready to render."""

    model: SimModel
    seq: int
    created: int
    outcome: Outcome
    charge: Charge | None
    stream: bool
    include_usage: bool
    fault: str | None
    first_token_delay: float  # before the first content token (prefill)
    token_delay: float  # between content tokens
    sleep: Callable[[float], Awaitable[None]]
    headers: dict[str, str]

    @property
    def words(self) -> list[str]:
        """One word per completion token; each word is exactly one simulator token."""
        n = self.outcome.completion_tokens
        return [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(n)]

    @property
    def text(self) -> str:
        return "".join(self.words)

    @property
    def total_delay(self) -> float:
        return self.first_token_delay + self.token_delay * max(0, len(self.words) - 1)

    @property
    def cost(self) -> dict[str, float] | None:
        if self.charge is None:
            return None
        return {"usd": round(self.charge.usd, 10), "diem": round(self.charge.diem, 10)}


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(body: Any, status: int, headers: dict[str, str]) -> Response:
    return Response(dumps(body), status_code=status, headers=headers, media_type="application/json")


def html_error_response(headers: dict[str, str]) -> Response:
    page = (
        "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
        "<h1>502 Bad Gateway</h1><p>prompt-cache-exporter simulator: simulated upstream"
        " failure (fault html).</p></body></html>"
    )
    return Response(page, status_code=502, headers=headers, media_type="text/html")


def truncated_json_response(body: Any, headers: dict[str, str]) -> Response:
    """A 200 whose JSON body stops halfway, as when a proxy cuts the connection."""
    text = dumps(body)
    return Response(text[: len(text) // 2], headers=headers, media_type="application/json")


def huge_json_response(prefix: dict[str, Any], size: int, headers: dict[str, str]) -> Response:
    """A syntactically valid JSON object of about ``size`` bytes, generated chunk by chunk
    so the simulator never holds it in memory."""
    head = dumps(prefix)[:-1] + ',"padding":"'

    async def body() -> AsyncIterator[bytes]:
        yield head.encode()
        remaining = max(0, size - len(head) - 2)
        chunk = b"x" * _HUGE_CHUNK
        while remaining > 0:
            yield chunk[: min(remaining, _HUGE_CHUNK)]
            remaining -= _HUGE_CHUNK
        yield b'"}'

    return StreamingResponse(body(), headers=headers, media_type="application/json")


def sse_response(events: AsyncIterator[str], headers: dict[str, str]) -> Response:
    return StreamingResponse(
        events, headers={**headers, **SSE_HEADERS}, media_type="text/event-stream"
    )


async def huge_sse(event: Callable[[str], str], size: int) -> AsyncIterator[str]:
    """Events carrying 64 KiB of content each, until about ``size`` bytes have been sent."""
    filler = "x" * _HUGE_CHUNK
    sent = 0
    while sent < size:
        text = event(filler)
        sent += len(text)
        yield text


class ChatApi(ABC):
    name: str  # "openai" | "anthropic", as recorded in the request log

    @abstractmethod
    def parse(self, body: Any) -> ChatRequest:
        """Validate a decoded request body. Raises RequestError."""

    @abstractmethod
    def error_body(self, status: int, message: str, param: str | None = None) -> Any:
        """The error body this API family sends with ``status``."""

    @abstractmethod
    def render(self, reply: Reply) -> Response:
        """The response for a served completion, fault included (except error, html, slow)."""

    def error(
        self, status: int, message: str, headers: dict[str, str], param: str | None = None
    ) -> Response:
        return json_response(self.error_body(status, message, param), status, headers)
