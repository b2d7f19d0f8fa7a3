"""Reading the usage of real traffic with the probes' own adapter parsers.

The proxy forwards bytes untouched; a ``ResponseTap`` looks at a copy of them after each
chunk has gone to the client. A JSON answer is buffered (up to a cap) and parsed once it
ends; an event stream is framed event by event and fed to the adapter's stream decoder, which
also tells when the first generated token went by. Compressed answers (gzip, deflate) are
decoded for the tap only. Whatever goes wrong here ends the tap, never the response.

A stream asked for without ``stream_options.include_usage`` carries no usage on OpenAI-style
APIs. The proxy does not add the option: that would change the request and the events the
client receives. Such a request counts as ``no_usage`` ("usage not reported"), visible in
``llmcache_traffic_requests_total``; Venice and Anthropic always report usage in streams.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from typing import Any

from exporter.providers.base import BadResponse, ProviderAdapter, StreamDecoder, UpstreamError
from exporter.results import Completion

log = logging.getLogger(__name__)

# Outcomes of a chat request, the values of the ``outcome`` label.
SUCCESS = "success"  # the answer's usage was read
NO_USAGE = "no_usage"  # a good answer without usage (e.g. a stream without include_usage)
BAD_RESPONSE = "bad_response"  # usage promised but unreadable, malformed or implausible
UPSTREAM_ERROR = "upstream_error"  # an error status, or an error event inside a 200
PROXY_ERROR = "proxy_error"  # the proxy answered itself: upstream unreachable, limits
CLIENT_CLOSED = "client_closed"  # the client left before the answer ended
OUTCOMES = (SUCCESS, NO_USAGE, BAD_RESPONSE, UPSTREAM_ERROR, PROXY_ERROR, CLIENT_CLOSED)

# A JSON answer is held for parsing only up to this much (the stream itself is not capped).
MAX_TAPPED_JSON_BYTES = 16 * 1024 * 1024
# An event-stream line longer than this is not an LLM event; the tap gives up on it.
MAX_EVENT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the recorder needs from a request body (never the prompt itself)."""

    body: Any  # decoded JSON; dropped once the prefix is hashed
    model: str | None
    stream: bool
    usage_requested: bool  # whether a streamed answer will carry usage


def family_of(provider_type: str) -> str:
    """The API family: ``anthropic`` (Messages) or ``openai`` (chat completions)."""
    return "anthropic" if provider_type == "anthropic" else "openai"


def is_chat(provider_type: str, method: str, path: str) -> bool:
    """Whether a request is a chat completion whose usage the proxy reads."""
    if method != "POST":
        return False
    suffix = "/messages" if family_of(provider_type) == "anthropic" else "/chat/completions"
    return path.rstrip("/").endswith(suffix)


def read_chat_request(provider_type: str, raw: bytes) -> ChatRequest:
    """The request's model and stream flags; an unreadable body gives an empty record."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return ChatRequest(None, None, False, False)
    if not isinstance(body, dict):
        return ChatRequest(None, None, False, False)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    stream = body.get("stream") is True
    if provider_type == "openai":
        options = body.get("stream_options")
        requested = isinstance(options, dict) and options.get("include_usage") is True
    else:
        requested = True  # Anthropic's message_start/message_delta; Venice always sends it
    return ChatRequest(body, model, stream, requested)


@dataclass(frozen=True, slots=True)
class TapResult:
    outcome: str
    completion: Completion | None = None


class _Decompressor:
    """Content-Encoding undone for the tap, with the output bounded (no zip bombs)."""

    def __init__(self, encoding: str) -> None:
        wbits = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}.get(encoding)
        self._zlib = zlib.decompressobj(wbits if wbits is not None else zlib.MAX_WBITS)
        self._deflate = encoding == "deflate"
        self._first = True

    def feed(self, data: bytes, limit: int) -> bytes:
        if self._first and self._deflate and data[:1] and (data[0] & 0x0F) != 8:
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some servers send
        self._first = False
        out = self._zlib.decompress(data, limit + 1)
        if len(out) > limit or self._zlib.unconsumed_tail:
            raise BadResponse("decoded response exceeds the tap's cap")
        return out


class ResponseTap:
    """Follows one successful answer chunk by chunk and reads its usage at the end."""

    def __init__(
        self,
        adapter: ProviderAdapter,
        *,
        content_type: str,
        content_encoding: str,
        max_bytes: int,
    ) -> None:
        self._adapter = adapter
        self._stream = "text/event-stream" in content_type.lower()
        self._limit = min(max_bytes, MAX_TAPPED_JSON_BYTES)
        self._failed: str | None = None
        self.broken = False  # the tap itself failed (a bug), not the answer
        self._json: list[bytes] = []
        self._size = 0
        self._line = b""
        self._event: str | None = None
        self._data: list[str] = []
        self._pending = 0
        self._decoder: StreamDecoder | None = adapter.stream_decoder() if self._stream else None
        encoding = content_encoding.strip().lower()
        self._decompress: _Decompressor | None = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decompress = _Decompressor(encoding)
        elif encoding not in ("", "identity"):
            self._failed = BAD_RESPONSE  # br, zstd: no decoder at hand; the bytes still flow

    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk; True if it carried generated output. Never raises."""
        if self._failed is not None or not chunk:
            return False
        try:
            data = chunk
            if self._decompress is not None:
                data = self._decompress.feed(chunk, self._limit)
            if self._decoder is not None:
                return self._feed_events(self._decoder, data)
            self._size += len(data)
            if self._size > self._limit:
                raise BadResponse("response too large to read its usage")
            self._json.append(data)
        except UpstreamError:
            self._failed = UPSTREAM_ERROR
        except (BadResponse, zlib.error):
            self._failed = BAD_RESPONSE
        except Exception:
            # A parser bug must not reach the stream: the tap stops and the proxy counts it.
            log.exception("reading the usage of a proxied answer failed (the answer is unaffected)")
            self._failed = BAD_RESPONSE
            self.broken = True
        return False

    def finish(self, request: ChatRequest) -> TapResult:
        """The outcome once the whole answer to ``request`` went through. Never raises."""
        if self._failed is not None:
            return TapResult(self._failed)
        try:
            if self._decoder is not None:
                if self._line:
                    self._feed_events(self._decoder, b"\n\n")
                elif self._data:
                    self._feed_events(self._decoder, b"\n")
                return self._finish_stream(self._decoder, request)
            return self._finish_json(b"".join(self._json))
        except UpstreamError:
            return TapResult(UPSTREAM_ERROR)
        except BadResponse:
            return TapResult(BAD_RESPONSE)

    def _finish_stream(self, decoder: StreamDecoder, request: ChatRequest) -> TapResult:
        try:
            return TapResult(SUCCESS, decoder.finish())
        except BadResponse:
            if not request.usage_requested:
                return TapResult(NO_USAGE)
            raise

    def _finish_json(self, raw: bytes) -> TapResult:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return TapResult(BAD_RESPONSE)
        if isinstance(body, dict) and body.get("usage") is None and not _is_error(body):
            return TapResult(NO_USAGE)
        return TapResult(SUCCESS, self._adapter.parse_completion(body))

    def _feed_events(self, decoder: StreamDecoder, data: bytes) -> bool:
        """Frame server-sent events across chunk boundaries and feed complete ones."""
        output = False
        buffer = self._line + data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end].rstrip(b"\r").decode("utf-8", "replace")
            start = end + 1
            if not line:
                if self._data:
                    output = decoder.feed(self._event, "\n".join(self._data)) or output
                self._event, self._data, self._pending = None, [], 0
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    self._data.append(value)
                    self._pending += len(value)
                elif name == "event":
                    self._event = value
        self._line = buffer[start:]
        if len(self._line) > MAX_EVENT_BYTES or self._pending > MAX_EVENT_BYTES:
            raise BadResponse("event stream event too long")
        return output


def _is_error(body: dict[str, Any]) -> bool:
    """An in-band error object (OpenAI ``error``, Anthropic ``type: error``)."""
    return bool(body.get("error")) or body.get("type") == "error"
