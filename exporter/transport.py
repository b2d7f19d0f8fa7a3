"""Sending adapter-built requests: retries, backoff, Retry-After, bounded bodies, SSE, timing.

One logical request may take several attempts. Every attempt is reserved against the spend
guard before it is sent and settled after, so a budget holds even when an upstream bills
an attempt that then timed out. Nothing here raises to the caller: the outcome, including
the error category, comes back as an ``Exchange``.

What an upstream sends is untrusted (docs/http.md, "Hostile upstreams"):

* every attempt has ONE deadline, ``timeout``, from connect to the last byte (httpx's own
  timeouts are per read, so a server dripping a byte a second would never trip them);
* bodies are inflated here, never by httpx, in steps bounded by what the cap still allows,
  so the cap counts inflated bytes and a 2 KB gzip bomb costs no memory; stacked encodings
  (``gzip, gzip``) and unknown ones are refused;
* the API key is removed from header values and whole bodies (or SSE lines) before anything
  parses or truncates them, and every string kept (errors, ids) is scrubbed again for any
  piece of the key (``providers.base.scrub``).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import anyio
import httpx

from exporter.clock import Clock
from exporter.config import HttpConfig
from exporter.providers.base import (
    BadResponse,
    HttpRequest,
    ProviderAdapter,
    UpstreamError,
    one_line,
)
from exporter.results import Completion, ErrorType, ResponseMeta

log = logging.getLogger(__name__)

# Error bodies are only read for their message; a few KiB is plenty.
MAX_ERROR_BODY_BYTES = 64 * 1024
# What we ask for and can inflate with bounded memory; anything else is refused.
ACCEPT_ENCODING = "gzip, deflate"
# Statuses worth another attempt: throttling, transient upstream trouble, overload (529 is
# Anthropic's "overloaded").
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})
RETRYABLE_ERRORS = frozenset(
    {ErrorType.RATE_LIMIT, ErrorType.TIMEOUT, ErrorType.CONNECTION, ErrorType.API_ERROR}
)


_HTTP = HttpConfig()  # the defaults live in the configuration model

# Why the transport waits before a retry: the server's Retry-After, or our own backoff.
WaitReason = Literal["retry_after", "backoff"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try. Defaults are ``[http]``'s (SPEC: 30 s, 3 attempts, 2/4/8 s backoff)."""

    attempts: int = _HTTP.attempts
    backoff: float = _HTTP.backoff
    backoff_max: float = _HTTP.backoff_max
    # A Retry-After longer than this is not waited for: the request fails as rate_limit.
    max_retry_after: float = _HTTP.max_retry_after
    timeout: float = _HTTP.timeout
    max_body_bytes: int = _HTTP.max_body_bytes

    def backoff_for(self, retry_number: int) -> float:
        """Wait before retry ``retry_number`` (1-based): backoff, 2×, 4×, ... capped."""
        return float(min(self.backoff * (2 ** (retry_number - 1)), self.backoff_max))


class SpendGuard(Protocol):
    """Reserve-before-send. ``reserve`` returns a handle, or None when the spend is denied."""

    async def reserve(self, estimated_tokens: int) -> object | None: ...

    async def settle(self, handle: object, completion: Completion | None, *, billed: bool) -> None:
        """Replace the reservation with what was billed.

        ``completion`` carries what the upstream reported (usage, and the cost where it says);
        without it, ``billed`` says whether the upstream may have charged the attempt anyway
        (then the reservation stays as spent).
        """
        ...


@dataclass(slots=True)
class Exchange:
    """The outcome of one logical request."""

    completion: Completion | None = None
    meta: ResponseMeta = field(default_factory=ResponseMeta)
    status: int | None = None
    attempts: int = 0
    streamed: bool = False
    latency: float | None = None
    ttfb: float | None = None
    ttft: float | None = None
    error_type: ErrorType | None = None
    error: str | None = None
    # Waits taken between attempts, for evidence and tests.
    waits: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error_type is None and self.completion is not None


@dataclass(frozen=True, slots=True)
class JsonReply:
    """A non-completion request's answer (models, balance) and what its headers said."""

    body: Any
    meta: ResponseMeta = field(default_factory=ResponseMeta)


class TransportError(Exception):
    """A non-completion request (models, balance) failed. ``meta`` is what the last response's
    headers said (a 402 may still report the balance)."""

    def __init__(
        self,
        error_type: ErrorType,
        message: str,
        status: int | None = None,
        meta: ResponseMeta | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status = status
        self.meta = meta or ResponseMeta()


@dataclass(slots=True)
class _Attempt:
    completion: Completion | None = None
    meta: ResponseMeta = field(default_factory=ResponseMeta)
    status: int | None = None
    latency: float | None = None
    ttfb: float | None = None
    ttft: float | None = None
    error_type: ErrorType | None = None
    error: str | None = None
    # Whether the upstream may have billed this attempt although we saw no usage.
    maybe_billed: bool = False


class Transport:
    """Sends requests for one provider through a shared httpx client."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        policy: RetryPolicy | None = None,
        clock: Clock,
        throttle: Callable[[], Awaitable[None]] | None = None,
        on_wait: Callable[[float, WaitReason], None] | None = None,
    ) -> None:
        self.client = client
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self._throttle = throttle
        # Told of each wait before a chat request's retry, just before the clock sleeps it:
        # live output says what it waits for (the probe command's progress).
        self._on_wait = on_wait

    async def complete(
        self,
        adapter: ProviderAdapter,
        request: HttpRequest,
        *,
        stream: bool,
        estimated_tokens: int = 0,
        guard: SpendGuard | None = None,
    ) -> Exchange:
        """Send a chat request with retries. Never raises (except cancellation)."""
        policy = self.policy
        result = Exchange(streamed=stream)
        for attempt_no in range(1, policy.attempts + 1):
            handle: object | None = None
            if guard is not None:
                handle = await guard.reserve(estimated_tokens)
                if handle is None:
                    result.error_type = ErrorType.BUDGET
                    result.error = "not sent: the spend budget would be exceeded"
                    return result
            if self._throttle is not None:
                await self._throttle()
            result.attempts = attempt_no
            attempt = await self._attempt(adapter, request, stream=stream)
            if guard is not None and handle is not None:
                await guard.settle(handle, attempt.completion, billed=attempt.maybe_billed)
            self._copy(attempt, result)
            if attempt.error_type is None:
                return result
            if attempt_no >= policy.attempts or attempt.error_type not in RETRYABLE_ERRORS:
                return result
            # An HTTP error status decides on its own; in-band errors and timeouts inside a 200
            # stream are retried like their category.
            status = attempt.status
            if status is not None and status >= 400 and status not in RETRYABLE_STATUSES:
                return result
            planned = self._wait_before_retry(attempt, attempt_no)
            if planned is None:
                result.error = f"{result.error} (Retry-After exceeds {policy.max_retry_after:g}s)"
                return result
            wait, reason = planned
            result.waits.append(wait)
            log.debug("retrying %s in %.1fs after %s", request.url, wait, attempt.error_type)
            if self._on_wait is not None:
                self._on_wait(wait, reason)
            await self.clock.sleep(wait)
        return result

    async def get_json(self, adapter: ProviderAdapter, request: HttpRequest) -> JsonReply:
        """A small GET (models, balance) with the same retries; raises TransportError."""
        last: TransportError | None = None
        for attempt_no in range(1, self.policy.attempts + 1):
            try:
                return await self._get_json_once(adapter, request)
            except TransportError as exc:
                last = exc
                retryable = exc.error_type in RETRYABLE_ERRORS and (
                    exc.status is None or exc.status in RETRYABLE_STATUSES
                )
                if not retryable or attempt_no >= self.policy.attempts:
                    raise
                await self.clock.sleep(self.policy.backoff_for(attempt_no))
        raise last or TransportError(ErrorType.API_ERROR, "no attempt made")  # pragma: no cover

    # -- internals -----------------------------------------------------------------------

    def _wait_before_retry(
        self, attempt: _Attempt, attempt_no: int
    ) -> tuple[float, WaitReason] | None:
        retry_after = attempt.meta.retry_after
        if retry_after is not None and attempt.error_type is ErrorType.RATE_LIMIT:
            if retry_after > self.policy.max_retry_after:
                return None
            return retry_after, "retry_after"
        return self.policy.backoff_for(attempt_no), "backoff"

    @staticmethod
    def _copy(attempt: _Attempt, result: Exchange) -> None:
        result.completion = attempt.completion
        result.meta = attempt.meta
        result.status = attempt.status
        result.latency = attempt.latency
        result.ttfb = attempt.ttfb
        result.ttft = attempt.ttft
        result.error_type = attempt.error_type
        result.error = attempt.error

    async def _attempt(
        self, adapter: ProviderAdapter, request: HttpRequest, *, stream: bool
    ) -> _Attempt:
        out = _Attempt()
        clock = self.clock
        start = clock.monotonic()
        limit = self.policy.max_body_bytes
        try:
            with anyio.fail_after(self.policy.timeout):
                async with self._stream(request) as response:
                    out.ttfb = clock.monotonic() - start
                    out.status = response.status_code
                    out.meta = self._parse_meta(adapter, response)
                    if response.status_code >= 400:
                        body = await _read_error_body(adapter, response)
                        out.error_type = adapter.classify_error(response.status_code, body)
                        out.error = adapter.error_message(response.status_code, body)
                        return self._scrubbed(adapter, out)
                    out.maybe_billed = True
                    content_type = response.headers.get("content-type", "")
                    if stream and "text/event-stream" in content_type:
                        await self._read_stream(adapter, response, out, start)
                    else:
                        # Some servers ignore stream=true and answer with plain JSON; accept it.
                        raw = adapter.redact_bytes(await _read_capped(response, limit))
                        out.completion = adapter.parse_completion(_decode_json(raw))
                    out.latency = clock.monotonic() - start
        except BadResponse as exc:
            out.error_type = ErrorType.BAD_RESPONSE
            out.error = one_line(str(exc))
        except UpstreamError as exc:
            out.error_type = exc.error_type
            out.error = one_line(f"in-band error: {exc}")
        except (TimeoutError, httpx.TimeoutException) as exc:
            out.error_type = ErrorType.TIMEOUT
            why = "deadline" if isinstance(exc, TimeoutError) else type(exc).__name__
            out.error = f"timed out after {self.policy.timeout:g}s ({why})"
            # A timeout after connecting may come after the upstream accepted (and billed) it.
            out.maybe_billed = not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
        except httpx.ConnectError as exc:
            out.error_type = ErrorType.CONNECTION
            out.error = one_line(f"connection failed: {exc}")
        except httpx.HTTPError as exc:
            # Reset mid-body, protocol errors: the request reached the upstream.
            out.error_type = ErrorType.CONNECTION
            out.error = one_line(f"{type(exc).__name__}: {exc}")
            out.maybe_billed = True
        if out.completion is not None and out.error_type is not None:
            out.completion = None
        return self._scrubbed(adapter, out)

    @staticmethod
    def _scrubbed(adapter: ProviderAdapter, out: _Attempt) -> _Attempt:
        """Every string an attempt keeps, once more without any piece of the key."""
        if out.error is not None:
            out.error = adapter.redact(out.error)
        if out.meta.request_id is not None:
            out.meta = replace(out.meta, request_id=adapter.redact(out.meta.request_id))
        c = out.completion
        if c is not None and (c.response_id or c.text):
            rid = adapter.redact(c.response_id) if c.response_id else c.response_id
            out.completion = replace(c, response_id=rid, text=adapter.redact(c.text))
        return out

    def _stream(self, request: HttpRequest) -> Any:
        # Ask only for encodings _inflated can bound; the caller's headers win otherwise.
        headers = {"accept-encoding": ACCEPT_ENCODING, **request.headers}
        return self.client.stream(
            request.method,
            request.url,
            headers=headers,
            json=request.json,
            timeout=self.policy.timeout,
        )

    def _parse_meta(self, adapter: ProviderAdapter, response: httpx.Response) -> ResponseMeta:
        # Header values without the key before any adapter reads (or truncates) them.
        headers = httpx.Headers([(k, adapter.redact(v)) for k, v in response.headers.multi_items()])
        return adapter.parse_meta(headers)

    async def _read_stream(
        self, adapter: ProviderAdapter, response: httpx.Response, out: _Attempt, start: float
    ) -> None:
        decoder = adapter.stream_decoder()
        events = iter_sse(response, self.policy.max_body_bytes, redact=adapter.redact_bytes)
        async for event, data in events:
            if decoder.feed(event, data) and out.ttft is None:
                out.ttft = self.clock.monotonic() - start
        out.completion = decoder.finish()

    async def _get_json_once(self, adapter: ProviderAdapter, request: HttpRequest) -> JsonReply:
        meta = ResponseMeta()
        try:
            with anyio.fail_after(self.policy.timeout):
                async with self._stream(request) as response:
                    meta = self._parse_meta(adapter, response)
                    if response.status_code >= 400:
                        body = await _read_error_body(adapter, response)
                        raise TransportError(
                            adapter.classify_error(response.status_code, body),
                            adapter.redact(adapter.error_message(response.status_code, body)),
                            response.status_code,
                            meta,
                        )
                    raw = await _read_capped(response, self.policy.max_body_bytes)
                    return JsonReply(_decode_json(adapter.redact_bytes(raw)), meta)
        except BadResponse as exc:
            raise TransportError(
                ErrorType.BAD_RESPONSE, adapter.redact(str(exc)), meta=meta
            ) from None
        except (TimeoutError, httpx.TimeoutException):
            log.warning(
                "%s: gave up after %gs (one deadline from connect to last byte)",
                adapter.redact(request.url.split("?")[0]),
                self.policy.timeout,
            )
            raise TransportError(
                ErrorType.TIMEOUT, f"timed out after {self.policy.timeout:g}s", meta=meta
            ) from None
        except httpx.HTTPError as exc:
            raise TransportError(
                ErrorType.CONNECTION,
                adapter.redact(one_line(f"{type(exc).__name__}: {exc}")),
                meta=meta,
            ) from None


def _inflater(response: httpx.Response) -> Any:
    """A zlib decompressor for the response's Content-Encoding, None for identity.

    One coding only: a stack (``gzip, gzip``) multiplies the ratio and buys nothing a real
    server needs. Unknown codings (``br``, ``zstd``: not asked for) are refused too.
    """
    codings = [
        c.strip().lower()
        for c in response.headers.get_list("content-encoding", split_commas=True)
        if c.strip() and c.strip().lower() != "identity"
    ]
    if len(codings) > 1:
        raise BadResponse(f"stacked content encodings are not accepted: {', '.join(codings)}")
    if not codings:
        return None
    if codings[0] not in ("gzip", "x-gzip", "deflate"):
        raise BadResponse(f"unsupported content encoding: {one_line(codings[0], 40)}")
    return zlib.decompressobj(zlib.MAX_WBITS | 32)  # 32: gzip or zlib header, detected


async def _inflated(response: httpx.Response, limit: int) -> AsyncIterator[bytes]:
    """The body as meant (inflated), in pieces: each inflation step may produce at most what
    the cap still allows plus one byte, and BadResponse comes as soon as the total passes it."""
    inflater = _inflater(response)
    total = wire = 0
    async for raw in response.aiter_raw():
        wire += len(raw)
        if wire > limit:
            raise BadResponse(f"response body exceeds the {limit}-byte cap")
        data = raw
        while data:
            if inflater is None:
                piece, data = data, b""
            else:
                try:
                    piece = inflater.decompress(data, limit - total + 1)
                except zlib.error as exc:
                    raise BadResponse(f"response body does not inflate: {exc}") from None
                data = inflater.unconsumed_tail
            total += len(piece)
            if total > limit:
                raise BadResponse(f"response body exceeds the {limit}-byte cap (inflated)")
            if piece:
                yield piece


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """The body, refusing (not truncating) anything larger than ``limit``: memory stays bounded."""
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadResponse(f"response body of {int(declared)} bytes exceeds the {limit}-byte cap")
    return b"".join([chunk async for chunk in _inflated(response, limit)])


async def _read_error_body(adapter: ProviderAdapter, response: httpx.Response) -> Any:
    """An error body for its message: JSON if it parses, else a one-line text excerpt.
    The key is removed before either is made (an excerpt could cut it in half)."""
    try:
        raw = adapter.redact_bytes(await _read_capped(response, MAX_ERROR_BODY_BYTES))
    except (BadResponse, httpx.HTTPError):
        return None
    try:
        return _redacted_json(adapter, json.loads(raw))
    except ValueError:
        text = raw.decode("utf-8", "replace")
        if "<html" in text[:500].lower():
            return "HTML error page"
        return one_line(adapter.redact(text), 200) or None


def _redacted_json(adapter: ProviderAdapter, value: Any) -> Any:
    # JSON escapes (\u0073k-…) can spell the key in a way no byte replacement sees.
    if isinstance(value, str):
        return adapter.redact(value)
    if isinstance(value, dict):
        return {adapter.redact(str(k)): _redacted_json(adapter, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted_json(adapter, v) for v in value]
    return value


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        head = raw[:200].decode("utf-8", "replace").strip()
        if head.lower().startswith(("<!doctype", "<html")):
            raise BadResponse("expected JSON, got an HTML page") from None
        if not head:
            raise BadResponse("empty response body") from None
        raise BadResponse(f"response is not valid JSON: {one_line(head, 60)!r}") from None


async def iter_sse(
    response: httpx.Response, limit: int, *, redact: Callable[[bytes], bytes] | None = None
) -> AsyncIterator[tuple[str | None, str]]:
    """Server-sent events as (event name, data), the whole stream capped at ``limit``
    inflated bytes; ``redact`` cleans each whole line before it is decoded.

    httpx's ``aiter_lines`` would buffer an unterminated line without bound; this keeps
    every buffer under the cap. Comment lines (``: keep-alive``) are dropped.
    """
    buffer = b""
    event: str | None = None
    data_lines: list[str] = []
    clean = redact or (lambda line: line)
    async for chunk in _inflated(response, limit):
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            raw_line, buffer = buffer[:newline], buffer[newline + 1 :]
            line = clean(raw_line.rstrip(b"\r")).decode("utf-8", "replace")
            if not line:
                if data_lines:
                    yield event, "\n".join(data_lines)
                event, data_lines = None, []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data_lines.append(value)
            elif name == "event":
                event = value
    tail = clean(buffer.rstrip(b"\r")).decode("utf-8", "replace")
    if tail.startswith("data:"):
        data_lines.append(tail[5:].removeprefix(" "))
    if data_lines:
        yield event, "\n".join(data_lines)
