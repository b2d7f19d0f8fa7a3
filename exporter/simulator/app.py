"""The simulator's HTTP application.

Every chat request goes through one pipeline, whatever the API family: auth, body size,
JSON, validation, model, rate limit, balance, fault, then cache, billing and the reply.
Each step that refuses the request answers in the family's error shape, is logged, and is
never billed.
"""

from __future__ import annotations

import hmac
import html
import json
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.clock import Clock, SystemClock
from exporter.simulator.anthropic_api import AnthropicApi
from exporter.simulator.api import ChatApi, Reply, RequestError, html_error_response
from exporter.simulator.config import SimConfig
from exporter.simulator.models import DIEM_PER_USD, SimModel
from exporter.simulator.openai_api import OpenAIApi
from exporter.simulator.state import LogEntry, Outcome, SimState

SIMULATOR_HEADER = ("x-simulator", "prompt-cache-exporter")
BANNER = "prompt-cache-exporter SIMULATOR — not a real LLM provider"

# Past the cap the body is read and dropped up to this much, so the client (which sends
# the whole body before it reads the answer) receives the 413 rather than a reset.
_DRAIN_LIMIT = 256 * 1024 * 1024
# A valid traceparent is 55 characters; anything longer is logged cut (it is for reading).
_TRACEPARENT_MAX = 128


class _SimulatorHeader:
    """Stamps every response, errors and 404s included, as coming from the simulator."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                name, value = SIMULATOR_HEADER
                message["headers"] = [*message.get("headers", []), (name.encode(), value.encode())]
            await send(message)

        await self.app(scope, receive, stamped)


class _DelayedResponse(Response):
    """Answers after ``delay`` (the ``slow`` fault), or not at all if the client leaves first."""

    def __init__(self, inner: Response, delay: float, clock: Clock) -> None:
        self.inner = inner
        self.delay = delay
        self.clock = clock
        self.status_code = inner.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self.clock.sleep(self.delay)
            tg.cancel_scope.cancel()
        if not gone:
            await self.inner(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > cap
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            too_large = True
        if too_large:
            chunks.clear()
            if size > _DRAIN_LIMIT:
                break
        else:
            chunks.append(chunk)
    if too_large:
        raise _TooLarge
    return b"".join(chunks)


def _authorized(request: Request, key: str) -> bool:
    offered = [request.headers.get("x-api-key", "")]
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(token.strip())
    return any(k and hmac.compare_digest(k.encode(), key.encode()) for k in offered)


class _ChatHandler:
    def __init__(self, state: SimState, api: ChatApi) -> None:
        self.state = state
        self.api = api

    async def endpoint(self, request: Request) -> Response:
        state, api = self.state, self.api
        seq = state.next_seq()
        request_id = f"req_sim_{seq:06d}"
        requests_left, tokens_left = state.ratelimit_remaining()
        headers = {
            **state.balance_headers(),
            "x-ratelimit-limit-requests": str(state.config.requests_per_minute),
            "x-ratelimit-remaining-requests": str(requests_left),
            "x-ratelimit-limit-tokens": str(state.config.tokens_per_minute),
            "x-ratelimit-remaining-tokens": str(tokens_left),
            "x-request-id": request_id,
        }
        if api.name == "anthropic":
            headers["request-id"] = request_id
        entry = LogEntry(
            seq=seq,
            model="-",
            api=api.name,
            status=0,
            stream=False,
            time=state.clock.time(),
            request_id=request_id,
            traceparent=_traceparent(request),
        )
        try:
            response = await self._handle(request, headers, entry)
        except ClientDisconnect:
            response = Response(status_code=499)  # never reaches the client; for the log
        entry.status = response.status_code
        state.record(entry)
        return response

    async def _handle(self, request: Request, headers: dict[str, str], entry: LogEntry) -> Response:
        state, api, config = self.state, self.api, self.state.config
        if config.api_key is not None and not _authorized(request, config.api_key):
            return api.error(401, "invalid or missing API key (simulator)", headers)
        try:
            raw = await _read_body(request, config.max_body_bytes)
        except _TooLarge:
            return api.error(
                413, f"request body larger than {config.max_body_bytes} bytes", headers
            )
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            return api.error(400, f"request body is not valid JSON: {exc}", headers)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            entry.model = body["model"]
        try:
            chat = api.parse(body)
        except RequestError as exc:
            return api.error(400, str(exc), headers, exc.param)
        entry.stream = chat.stream
        model = state.models.get(chat.model)
        if model is None:
            return api.error(
                404, f"model {chat.model!r} does not exist (simulator)", headers, "model"
            )
        entry.model_seq = n = state.next_model_seq(model)
        throttled = bool(model.ratelimit_period and n % model.ratelimit_period) or bool(
            model.ratelimit_rate and state.rngs[model.name].random() < model.ratelimit_rate
        )
        if throttled:
            retry = model.retry_after
            headers["retry-after"] = str(int(retry)) if float(retry).is_integer() else str(retry)
            return api.error(429, "rate limit exceeded (simulated)", headers)
        if state.exhausted:
            return api.error(402, "Insufficient balance", headers)
        entry.fault = model.fault
        if model.fault == "error":
            return api.error(500, "simulated inference failure (fault error)", headers)
        if model.fault == "html":
            return html_error_response(headers)

        prompt = chat.prompt
        outcome = state.serve(
            model,
            prompt,
            anthropic=api.name == "anthropic",
            breakpoints=chat.breakpoints,
            max_tokens=chat.max_tokens,
        )
        # Faulty answers are not billed: the provider did not deliver a usable completion.
        charge = state.charge(model, outcome) if model.fault in (None, "slow") else None
        entry.prompt_tokens = outcome.prompt_tokens
        entry.completion_tokens = outcome.completion_tokens
        entry.cached_tokens, entry.cache_write_tokens = _reported_cache(model, api, outcome)
        if charge is not None:
            entry.billed, entry.cost_usd, entry.cost_diem = True, charge.usd, charge.diem
        scale = config.latency_scale
        reply = Reply(
            model=model,
            seq=entry.seq,
            created=int(state.clock.time()),
            outcome=outcome,
            charge=charge,
            stream=chat.stream,
            include_usage=chat.include_usage,
            fault=model.fault,
            first_token_delay=scale
            * (model.base_latency + model.prefill_seconds_per_token * outcome.uncached_tokens),
            token_delay=scale * model.output_token_seconds,
            sleep=state.clock.sleep,
            headers=headers,
        )
        if not chat.stream:
            await state.clock.sleep(reply.total_delay)
        response = api.render(reply)
        if model.fault == "slow":
            return _DelayedResponse(response, model.slow_seconds, state.clock)
        return response


def _traceparent(request: Request) -> str | None:
    # As received (the log is for checking what clients send), cut to a sane length.
    value = request.headers.get("traceparent")
    return None if value is None else value[:_TRACEPARENT_MAX]


def _reported_cache(
    model: SimModel, api: ChatApi, outcome: Outcome
) -> tuple[int | None, int | None]:
    """The cache figures as the response reports them (None: the field is absent)."""
    if model.cache_mode == "no_fields":
        return None, None
    if api.name == "anthropic" or model.report_cache_write:
        return outcome.cached_tokens, outcome.cache_write_tokens
    return outcome.cached_tokens, None


# -- other endpoints --------------------------------------------------------------------------


def _pricing(model: SimModel) -> dict[str, Any]:
    def price(usd: float) -> dict[str, float]:
        return {"usd": usd, "diem": round(usd * DIEM_PER_USD, 10)}

    pricing = {"input": price(model.price_input), "output": price(model.price_output)}
    if model.caches and model.price_cache_read is not None:
        pricing["cache_input"] = price(model.price_cache_read)
    if model.price_cache_write is not None:
        pricing["cache_write"] = price(model.price_cache_write)
    return pricing


def _models_endpoint(state: SimState) -> Any:
    async def endpoint(request: Request) -> Response:
        created = int(state.clock.time())
        data = [
            {
                "id": m.name,
                "object": "model",
                "type": "text",
                "created": created,
                "owned_by": "simulator",
                "model_spec": {
                    "name": f"{m.name} (simulated)",
                    "availableContextTokens": m.context_tokens,
                    "pricing": _pricing(m),
                },
            }
            for m in state.config.models
        ]
        return JSONResponse({"object": "list", "type": "text", "data": data})

    return endpoint


def _landing(state: SimState) -> Any:
    async def endpoint(request: Request) -> Response:
        rows = "".join(
            f"<li><code>{html.escape(m.name)}</code>: cache {html.escape(m.cache_mode)}, "
            f"fault {html.escape(m.fault or 'none')}, min {m.min_cacheable_tokens} tokens, "
            f"TTL {m.ttl:g} s</li>"
            for m in state.config.models
        )
        page = (
            f"<!DOCTYPE html><html><head><title>{html.escape(BANNER)}</title></head><body>"
            f"<h1>{html.escape(BANNER)}</h1>"
            "<p>This is a local simulator that emulates a caching LLM chat-completion API for"
            " demos and tests. Its answers, token counts, prices and balances are made up.</p>"
            "<p>Endpoints: <code>POST /v1/chat/completions</code>, <code>POST /v1/messages"
            "</code>, <code>GET /v1/models</code>, <code>GET /sim/stats</code>, <code>GET"
            " /sim/log</code>, <code>POST /sim/reset</code>.</p>"
            f"<h2>Models</h2><ul>{rows}</ul></body></html>"
        )
        return HTMLResponse(page)

    return endpoint


def _stats(state: SimState) -> Any:
    async def endpoint(request: Request) -> Response:
        return JSONResponse(state.stats_snapshot())

    return endpoint


def _log(state: SimState) -> Any:
    async def endpoint(request: Request) -> Response:
        model = request.query_params.get("model") or None
        raw_limit = request.query_params.get("limit", "100")
        if not raw_limit.isdigit():
            return JSONResponse({"error": "limit must be a non-negative integer"}, 400)
        limit = min(int(raw_limit), state.config.log_size)
        return JSONResponse({"entries": state.log_entries(model, limit)})

    return endpoint


def _reset(state: SimState) -> Any:
    async def endpoint(request: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    return endpoint


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok (simulator)\n")


def create_app(config: SimConfig, clock: Clock | None = None) -> Starlette:
    """The simulator as an ASGI app. ``app.state.sim`` is its SimState."""
    state = SimState(config, clock or SystemClock())
    openai = _ChatHandler(state, OpenAIApi())
    anthropic = _ChatHandler(state, AnthropicApi())
    models = _models_endpoint(state)
    routes = [
        Route("/", _landing(state)),
        Route("/healthz", _healthz),
        Route("/sim/stats", _stats(state)),
        Route("/sim/log", _log(state)),
        Route("/sim/reset", _reset(state), methods=["POST"]),
    ]
    # /api/v1 too, so a Venice-style base URL works unchanged.
    for prefix in ("/v1", "/api/v1"):
        routes += [
            Route(f"{prefix}/chat/completions", openai.endpoint, methods=["POST"]),
            Route(f"{prefix}/messages", anthropic.endpoint, methods=["POST"]),
            Route(f"{prefix}/models", models),
        ]
    app = Starlette(routes=routes, middleware=[Middleware(_SimulatorHeader)])
    app.state.sim = state
    return app
