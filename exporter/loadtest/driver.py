"""Driving a load test: a bounded number of requests at a bounded concurrency.

``concurrency`` workers take the next request index until ``-n`` requests have been sent,
``--duration`` has passed, the token cap denies a request, or the upstream refuses the key
or the balance (every further request would fail the same way). Each request goes through
the probes' own sending path (``ProbeContext.send``: the transport with its retries,
Retry-After and bounded bodies), reserving against the token cap before every attempt.

Every HTTP attempt's status and timing is logged by httpx event hooks on the run's client;
a context variable set by the worker ties the attempts to the request they belong to, so
429s are counted exactly and the wait before each retry can be checked against Retry-After.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from exporter.clock import Clock
from exporter.loadtest.plan import LoadPlan
from exporter.loadtest.result import Attempt, LoadRequest, LoadResult, LoadTarget, build_result
from exporter.probes.common import ProbeAborted, ProbeContext
from exporter.prompts import PromptFactory
from exporter.providers.base import HttpRequest, ProviderAdapter, retry_after_seconds
from exporter.results import Completion, ErrorType, ModelPrice, RequestRecord
from exporter.tracecontext import new_trace_id
from exporter.transport import Transport

# Failures after which no further request is sent: each would fail the same way.
_STOPPING_ERRORS = {
    ErrorType.BUDGET: "token_cap",
    ErrorType.AUTH: "auth",
    ErrorType.INSUFFICIENT_FUNDS: "insufficient_funds",
}

_current: ContextVar[list[Attempt] | None] = ContextVar("loadtest_attempts", default=None)


class AttemptLog:
    """httpx event hooks that log each attempt into the request being sent by this task."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.origin = clock.monotonic()

    def now(self) -> float:
        return self._clock.monotonic() - self.origin

    def hooks(self) -> dict[str, list[Any]]:
        return {"request": [self._on_request], "response": [self._on_response]}

    async def _on_request(self, request: httpx.Request) -> None:
        attempts = _current.get()
        if attempts is not None:
            attempts.append(Attempt(self.now()))

    async def _on_response(self, response: httpx.Response) -> None:
        attempts = _current.get()
        if attempts:
            attempt = attempts[-1]
            attempt.status = response.status_code
            attempt.answered_at = self.now()
            attempt.retry_after = retry_after_seconds(response.headers)


def open_client(log: AttemptLog, *, connections: int) -> httpx.AsyncClient:
    """The run's client: enough connections for every worker, nothing from the environment."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        follow_redirects=False, trust_env=False, limits=limits, event_hooks=log.hooks()
    )


@dataclass(slots=True)
class _Hold:
    tokens: int


@dataclass(slots=True)
class TokenCap:
    """The transport's spend guard for one run: reserved plus used never exceeds ``cap``.

    Each attempt reserves an upper bound of its cost; the reply's usage replaces it. An
    attempt refused before any work (a 429) costs nothing; one that may have been billed
    without reporting usage keeps its reservation.
    """

    cap: int
    used: int = 0
    reserved: int = 0
    denied: int = 0

    async def reserve(self, estimated_tokens: int) -> object | None:
        if self.used + self.reserved + estimated_tokens > self.cap:
            self.denied += 1
            return None
        self.reserved += estimated_tokens
        return _Hold(estimated_tokens)

    async def settle(self, handle: object, completion: Completion | None, *, billed: bool) -> None:
        assert isinstance(handle, _Hold)
        self.reserved -= handle.tokens
        if completion is not None:
            usage = completion.usage
            self.used += usage.prompt_tokens + usage.completion_tokens
        elif billed:
            self.used += handle.tokens


@dataclass(slots=True)
class LoadDriver:
    """One load test. ``run`` sends; ``result`` summarises whatever has been sent so far,
    so an interrupted run still reports every request that finished."""

    plan: LoadPlan
    target: LoadTarget
    adapter: ProviderAdapter
    transport: Transport
    prompts: PromptFactory
    clock: Clock
    log: AttemptLog
    # Called with every request sent and its evidence (the CLI keeps two for curl replays).
    on_request: Callable[[HttpRequest, RequestRecord], None] | None = None
    # The run is one W3C trace; each request is a span of it (exporter.tracecontext).
    trace_id: str = field(default_factory=new_trace_id)
    requests: list[LoadRequest] = field(default_factory=list, init=False)
    stopped: str | None = field(default=None, init=False)
    started_at: float = field(default=0.0, init=False)
    _t0: float | None = field(default=None, init=False)
    _t1: float | None = field(default=None, init=False)
    _next: int = field(default=0, init=False)
    _warm: bool = field(default=False, init=False)
    _guard: TokenCap | None = field(default=None, init=False)

    async def run(self) -> None:
        plan = self.plan
        self._guard = TokenCap(plan.options.max_total_tokens)
        self.started_at = self.clock.time()
        self._t0 = self.log.origin = self.clock.monotonic()
        deadline = math.inf if plan.options.duration is None else plan.options.duration
        workers = min(plan.options.concurrency, plan.options.requests)
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(workers):
                    tg.start_soon(self._worker, self._t0 + deadline)
        finally:
            self._t1 = self.clock.monotonic()
        if self.stopped is None:
            self.stopped = "completed"

    def result(self, *, interrupted: bool = False) -> LoadResult:
        if interrupted:
            self.stopped = "interrupted"
        for request in self.requests:
            self._measure(request)
        return build_result(
            target=self.target,
            options=self.plan.options,
            run_id=self.plan.run_id,
            trace_id=self.trace_id,
            estimate=self.plan.estimate,
            prefix_tokens=self.plan.prefix_tokens,
            started_at=self.started_at,
            duration_seconds=self._elapsed(),
            stopped=self.stopped or "interrupted",
            requests=self.requests,
        )

    def _elapsed(self) -> float:
        if self._t0 is None:
            return 0.0
        return (self.clock.monotonic() if self._t1 is None else self._t1) - self._t0

    async def _worker(self, deadline: float) -> None:
        total = self.plan.options.requests
        while self.stopped is None and self._next < total:
            if self.clock.monotonic() >= deadline:
                self.stopped = "duration"
                return
            index = self._next
            self._next += 1
            record = await self._send(index)
            if record.error_type in _STOPPING_ERRORS and self.stopped is None:
                self.stopped = _STOPPING_ERRORS[record.error_type]
            elif record.ok:
                self._warm = True

    async def _send(self, index: int) -> RequestRecord:
        ctx = ProbeContext(
            provider=self.target.provider_type,
            model=self.target.model,
            adapter=self.adapter,
            transport=self.transport,
            prompts=self.prompts,
            clock=self.clock,
            guard=self._guard,
            run_id=self.plan.run_id,
            trace_id=self.trace_id,
            on_request=self.on_request,
            # Its own record list: the run is judged as a whole once it is over.
            records=[],
        )
        entry = LoadRequest(
            index=index + 1,
            sent_at=self.log.now(),
            record=RequestRecord(label=f"request {index + 1}", cold=not self._warm),
        )
        self.requests.append(entry)
        token = _current.set(entry.attempts)
        finished = False
        try:
            entry.record = await ctx.send(
                self.plan.prompts[index], label=entry.record.label, cold=entry.record.cold
            )
            finished = True
        except ProbeAborted as exc:
            entry.record = exc.record
            finished = True
        finally:
            _current.reset(token)
            if not finished:
                entry.cancelled = True
                entry.record = ctx.records[0] if ctx.records else entry.record
        return entry.record

    def _measure(self, request: LoadRequest) -> None:
        """The request's shared prefix: its prompt less its own (short) user message."""
        record = request.record
        if request.cancelled or not record.ok or record.prompt_tokens is None:
            return
        prompt = self.plan.prompts[request.index - 1]
        suffix = self.prompts.user_tokens(self.plan.calibration_key, prompt)
        request.cacheable_tokens = max(0, record.prompt_tokens - suffix)


def make_target(
    adapter: ProviderAdapter, provider_type: str, model: str, price: ModelPrice | None
) -> LoadTarget:
    return LoadTarget(
        provider_type=provider_type,
        base_url=adapter.base_url,
        model=model,
        streamed=adapter.stream,
        max_tokens=adapter.max_tokens,
        price=price,
    )
