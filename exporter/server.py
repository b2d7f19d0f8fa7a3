"""The exporter's HTTP side: /metrics, health, readiness, the evidence API and reload.

``create_app`` builds the Starlette app from injected parts (registry, a source of past runs,
readiness and reload callables, the web config), so tests run it against fakes on a real
loopback socket. ``serve`` runs it on our own socket, with TLS from the web config.

Endpoints (docs/http.md has the details and the /api/runs schema):

=================  =========  ==============================================================
path               methods    answer
=================  =========  ==============================================================
``/``              GET HEAD   HTML landing page with links
``/metrics``       GET HEAD   Prometheus text or OpenMetrics (Accept), gzip (Accept-Encoding)
``/healthz``       GET HEAD   200 ``ok``: the process serves
``/readyz``        GET HEAD   200/503 JSON, one entry per dependency
``/api/runs``      GET HEAD   recent probe runs as JSON, filtered, newest first
``/-/reload``      POST PUT   reload the configuration; 200/500 JSON (404 if not enabled)
=================  =========  ==============================================================
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlencode

import anyio
import anyio.to_thread
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from exporter import tracecontext
from exporter.asgi import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    BoundAddress,
    serve_asgi,
)
from exporter.exposition import Exposition
from exporter.negotiation import MetricsResponder
from exporter.results import ProbeResult

if TYPE_CHECKING:
    import ssl

    from exporter.webconfig import BasicAuthenticator, WebConfig, WebConfigSource

__all__ = [
    "MAX_RELOAD_BODY",
    "DependencyStatus",
    "Readiness",
    "RunsSource",
    "create_app",
    "run_to_json",
    "serve",
]

log = logging.getLogger("exporter.server")

EXPORTER_NAME: Final = "prompt-cache-exporter"
DEFAULT_RUNS_LIMIT: Final = 50
MAX_RUNS_LIMIT: Final = 1000
MAX_RELOAD_BODY: Final = 4096  # bytes; the body of /-/reload is read and ignored
_RUNS_PARAMS: Final = ("provider", "model", "probe", "trace_id", "limit")
_NAME_VALUE: Final = re.compile(r"[A-Za-z0-9._:/@+-]{1,200}")
_NAME_RULE: Final = "must be 1 to 200 characters of A-Z a-z 0-9 . _ : / @ + -"
_SAFE_PARAM_NAME: Final = re.compile(r"[A-Za-z0-9_.\[\]-]{1,40}")
_ANY_METHOD: Final = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
# One /metrics answer at a time: concurrent scrapes (an HA Prometheus pair) share the prepared
# bytes, and a change is rendered once, not once per scraper.
_RENDER_THREADS: Final = 1
_CACHED_BYTES: Final = 8 << 20  # /api/runs answers kept (1 000 runs are a few MB)


class RunsSource(Protocol):
    """Where /api/runs reads history from: ``exporter.store.Store``, or a test's fake."""

    async def recent_runs(
        self,
        *,
        provider: str | None,
        model: str | None,
        probe: str | None,
        limit: int,
        trace_id: str | None = None,
    ) -> list[ProbeResult]: ...


@dataclass(frozen=True, slots=True)
class DependencyStatus:
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Readiness:
    """What /readyz reports: ready overall, and the state of each dependency."""

    ready: bool
    checks: Mapping[str, DependencyStatus] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, **checks: DependencyStatus) -> Readiness:
        """Ready when there is at least one check and every check is ok."""
        return cls(
            ready=bool(checks) and all(c.ok for c in checks.values()),
            checks=MappingProxyType(dict(checks)),
        )


class _BadRequest(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _RunsQuery:
    provider: str | None
    model: str | None
    probe: str | None
    limit: int
    trace_id: str | None = None


def create_app(
    *,
    registry: CollectorRegistry,
    runs: RunsSource,
    readiness: Callable[[], Readiness],
    reload: Callable[[], Awaitable[tuple[bool, str]]] | None,
    web_config: WebConfigSource | WebConfig | None,
    probe_names: Sequence[str],
    version: str,
    authenticator: BasicAuthenticator | None = None,
    exposition: Exposition | None = None,
) -> Starlette:
    """The exporter's ASGI app. Nothing here reaches a provider: it reads state and history.

    /metrics serves ``exposition`` (the prepared ``llmcache_`` families) followed by
    ``registry`` rendered live; without an exposition, ``registry`` alone, rendered per scrape.

    ``reload`` None leaves /-/reload unregistered (404). A plain ``WebConfig`` is applied as
    is; a ``WebConfigSource`` follows its file. ``app.state.authenticator`` is the basic-auth
    checker (tests count its bcrypt verifications), None without a web config.
    """
    probes = tuple(probe_names)
    responder = MetricsResponder(registry, exposition)
    render_limiter = anyio.CapacityLimiter(_RENDER_THREADS)
    # One /api/runs answer at a time: its CPU (decoding and encoding up to a thousand runs) is
    # kept to one worker thread, however many clients ask, so probes' timings stay honest.
    runs_limiter = anyio.CapacityLimiter(1)
    # Answers by query, for as long as the history has not changed (``Store.history_version``;
    # a source without it is never cached): Grafana's panels and a flood alike then cost one
    # read and one encoding per change, not one per request.
    answers: collections.OrderedDict[tuple[_RunsQuery, int], bytes] = collections.OrderedDict()

    async def metrics(request: Request) -> Response:
        if (refused := _only(request, "GET", "HEAD")) is not None:
            return refused
        accept = request.headers.get("accept", "")
        encoding = request.headers.get("accept-encoding", "")
        names = request.query_params.getlist("name[]")
        try:
            # In a worker thread: the live collectors read /proc, a change since the last
            # render is applied first, and probes on the event loop are timing requests.
            answer = await anyio.to_thread.run_sync(
                responder.answer, accept, encoding, names, limiter=render_limiter
            )
        except Exception:
            log.exception("rendering /metrics failed")
            return PlainTextResponse("error rendering metrics\n", status_code=500)
        headers = {"Content-Type": answer.content_type, "Vary": "Accept, Accept-Encoding"}
        if answer.gzip:
            headers["Content-Encoding"] = "gzip"
        return _PartsResponse(answer.parts, headers)

    async def healthz(request: Request) -> Response:
        if (refused := _only(request, "GET", "HEAD")) is not None:
            return refused
        return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})

    async def readyz(request: Request) -> Response:
        if (refused := _only(request, "GET", "HEAD")) is not None:
            return refused
        try:
            state = readiness()
        except Exception:
            log.exception("readiness check failed")
            body = {"status": "not ready", "checks": {}, "error": "readiness check failed"}
            return _json(body, 503)
        checks = {name: {"ok": c.ok, "detail": c.detail} for name, c in state.checks.items()}
        body = {"status": "ready" if state.ready else "not ready", "checks": checks}
        return _json(body, 200 if state.ready else 503)

    async def api_runs(request: Request) -> Response:
        if (refused := _only(request, "GET", "HEAD")) is not None:
            return refused
        try:
            query = _parse_runs_query(request.query_params.multi_items(), probes)
        except _BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        async with runs_limiter:
            version = getattr(runs, "history_version", None)
            key = (query, version) if isinstance(version, int) else None
            if key is not None and key in answers:
                answers.move_to_end(key)
                return _json_response(answers[key], 200)
            try:
                results = await runs.recent_runs(
                    provider=query.provider,
                    model=query.model,
                    probe=query.probe,
                    limit=query.limit,
                    trace_id=query.trace_id,
                )
            except Exception:
                log.exception("/api/runs: reading the history failed")
                return _json({"error": "history store unavailable"}, 503)
            chosen = results[: query.limit]

            def encode() -> bytes:
                return _json_bytes({"runs": [run_to_json(r) for r in chosen]})

            body = await anyio.to_thread.run_sync(encode)
            if key is not None and getattr(runs, "history_version", None) == version:
                answers[key] = body
                while sum(map(len, answers.values())) > _CACHED_BYTES:
                    answers.popitem(last=False)
            return _json_response(body, 200)

    async def landing(request: Request) -> Response:
        if (refused := _only(request, "GET", "HEAD")) is not None:
            return refused

        def render() -> str:
            # The targets come from the collector (in memory, no I/O), off the event loop
            # like a scrape, since a large registry takes a while to collect.
            return _landing_page(version, reload is not None, registry, probes)

        return HTMLResponse(await anyio.to_thread.run_sync(render, limiter=render_limiter))

    # Every route takes every method so the endpoint answers 405 itself, with a stable Allow.
    routes = [
        Route("/", landing, methods=_ANY_METHOD),
        Route("/metrics", metrics, methods=_ANY_METHOD),
        Route("/healthz", healthz, methods=_ANY_METHOD),
        Route("/readyz", readyz, methods=_ANY_METHOD),
        Route("/api/runs", api_runs, methods=_ANY_METHOD),
    ]
    if reload is not None:
        routes.append(Route("/-/reload", _reload_endpoint(reload), methods=_ANY_METHOD))

    middleware = []
    if web_config is not None:
        layer, authenticator = _web_config_layer(web_config, authenticator)
        middleware.append(layer)
    # After authentication: an anonymous client learns nothing, not even the body rule.
    middleware.append(Middleware(_BodyGuard))
    app = Starlette(routes=routes, middleware=middleware)
    # "/metrics/" is a 404, not a redirect: one spelling per endpoint, no open redirects.
    app.router.redirect_slashes = False
    app.state.authenticator = authenticator
    return app


# The web config machinery (its pydantic models, yaml, bcrypt: 1.5 MB resident) is imported
# by the two functions below, which run only when a web config is given: most exporters
# serve plain HTTP without one and never load it.


def _web_config_layer(
    web_config: WebConfigSource | WebConfig, authenticator: BasicAuthenticator | None
) -> tuple[Middleware, BasicAuthenticator]:
    """The middleware applying ``web_config`` (headers, basic auth), and its checker."""
    from exporter.webconfig import BasicAuthenticator, WebConfigMiddleware, WebConfigSource

    auth = authenticator or BasicAuthenticator()
    source = (
        web_config
        if isinstance(web_config, WebConfigSource)
        else WebConfigSource(web_config, watch=False)
    )
    return Middleware(WebConfigMiddleware, source=source, authenticator=auth), auth


def _web_config_tls(web_config: WebConfigSource | WebConfig) -> tuple[ssl.SSLContext | None, bool]:
    """The server's TLS context from ``web_config`` (None: plain HTTP), and whether it
    has basic-auth users."""
    from exporter.webconfig import WebConfigSource

    if isinstance(web_config, WebConfigSource):
        ssl_context = web_config.server_ssl_context()
        config = web_config.current()
    else:
        config = web_config
        ssl_context = config.tls_server_config.context
    if ssl_context and config.http_server_config.http2:
        # uvicorn's h11 server speaks HTTP/1.1 only; ALPN offers nothing else, clients cope.
        log.debug("web config asks for HTTP/2; serving HTTP/1.1 (http2 is not supported)")
    return ssl_context, bool(config.basic_auth_users)


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    web_config: WebConfigSource | WebConfig | None = None,
    graceful_timeout: float = 5.0,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
) -> AsyncIterator[BoundAddress]:
    """Serve ``app`` until the context exits; yields the bound address (port 0 works).

    With TLS in ``web_config``: a ``WebConfigSource`` gives every new connection the
    certificates in force (rotation without restart); a plain ``WebConfig`` is loaded once.
    """
    ssl_context, users = (None, False) if web_config is None else _web_config_tls(web_config)
    async with serve_asgi(
        app,
        host=host,
        port=port,
        ssl_context=ssl_context,
        graceful_timeout=graceful_timeout,
        max_connections=max_connections,
        header_timeout=header_timeout,
    ) as address:
        log.info(
            "listening on %s (TLS %s, basic auth %s)",
            address.url,
            "on" if ssl_context else "off",
            "on" if users else "off",
        )
        yield address


def _reload_endpoint(
    reload: Callable[[], Awaitable[tuple[bool, str]]],
) -> Callable[[Request], Awaitable[Response]]:
    lock = anyio.Lock()  # two reloads at once would race on the same configuration

    async def endpoint(request: Request) -> Response:
        if (refused := _only(request, "POST", "PUT")) is not None:
            return refused
        if not await _drain(request, MAX_RELOAD_BODY):
            return _json({"status": "error", "error": "request body too large"}, 413)
        async with lock:
            try:
                ok, message = await reload()
            except Exception:
                log.exception("reload failed")
                ok, message = False, "reload failed with an internal error (see the log)"
        if ok:
            # A message beside "ok" says what the reload could not apply (restart needed).
            extra = {"warning": _one_line(message)} if message and message != "ok" else {}
            return _json({"status": "ok", **extra}, 200)
        return _json({"status": "error", "error": _one_line(message)}, 500)

    return endpoint


# --- /api/runs ----------------------------------------------------------------------------


def _parse_runs_query(items: Sequence[tuple[str, str]], probes: Sequence[str]) -> _RunsQuery:
    values: dict[str, str] = {}
    for name, value in items:
        if name not in _RUNS_PARAMS:
            shown = f' "{name}"' if _SAFE_PARAM_NAME.fullmatch(name) else ""
            raise _BadRequest(
                f"unknown query parameter{shown} (allowed: {', '.join(_RUNS_PARAMS)})"
            )
        if name in values:
            raise _BadRequest(f"{name}: given more than once")
        values[name] = value
    # Empty values mean "no filter": Grafana sends "provider=" for an "All" variable.
    provider = values.get("provider") or None
    model = values.get("model") or None
    probe = values.get("probe") or None
    for key, text in (("provider", provider), ("model", model)):
        if text is not None and not _NAME_VALUE.fullmatch(text):
            raise _BadRequest(f"{key}: {_NAME_RULE}")
    if probe is not None and probe not in probes:
        raise _BadRequest(f"probe: must be one of {', '.join(probes)}")
    # A trace id as tracing UIs show it; hex in either case (we record it in lower case).
    trace_id = (values.get("trace_id") or "").lower() or None
    if trace_id is not None and not tracecontext.TRACE_ID_PATTERN.fullmatch(trace_id):
        raise _BadRequest("trace_id: must be 32 hexadecimal digits (a W3C trace id)")
    limit = DEFAULT_RUNS_LIMIT
    if values.get("limit"):
        text = values["limit"]
        # Digits only: int() would also take " 5", "+5", "5_0" and "٥"; and at most 4 of
        # them: int() of 4,301 digits raises (CPython's int_max_str_digits).
        digits = text.isascii() and text.isdigit() and len(text) <= 4
        if not digits or not 1 <= int(text) <= MAX_RUNS_LIMIT:
            raise _BadRequest(f"limit: must be an integer from 1 to {MAX_RUNS_LIMIT}")
        limit = int(text)
    return _RunsQuery(provider=provider, model=model, probe=probe, limit=limit, trace_id=trace_id)


_REQUEST_FIELDS: Final = (
    "label",
    "cold",
    "status",
    "attempts",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "latency_seconds",
    "ttft_seconds",
    "hit",
    "baseline_tokens",
    "run_cached_tokens",
    "ttft_no_faster",
    "error_type",
    "error",
    "span_id",
)


def run_to_json(result: ProbeResult) -> dict[str, Any]:
    """One run as /api/runs shows it: ``ProbeResult.to_dict()`` plus the evidence table's
    derived columns (``time``, token sums, mean cold/warm TTFT)."""
    full = result.to_dict()
    requests = result.requests
    ttft = full["ttft"]
    return {
        "run_id": result.run_id,
        "trace_id": result.trace_id,
        "provider": result.provider,
        "model": result.model,
        "probe": result.probe,
        "verdict": full["verdict"],
        "caching_works": result.caching_works,
        "hit_ratio": result.hit_ratio,
        "time": _rfc3339(result.finished_at),
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "duration_seconds": result.duration_seconds,
        "error_type": full["error_type"],
        "error": result.error,
        "pollution": result.pollution,
        "cache_reported": result.cache_reported,
        "baseline_tokens": result.baseline_tokens,
        "prompt_tokens": _sum(r.prompt_tokens for r in requests),
        # None when no request reported cache fields: "not reported" is not "0 cached".
        "cached_tokens": _sum(r.cached_tokens for r in requests),
        "run_cached_tokens": full["run_cached_tokens"],
        "request_count": len(requests),
        "cold_ttft_seconds": ttft["cold_seconds"],
        "warm_ttft_seconds": ttft["warm_seconds"],
        "hit_ttft_seconds": ttft["hit_seconds"],
        "hits_no_faster": ttft["hits_no_faster"],
        "requests": [{name: r[name] for name in _REQUEST_FIELDS} for r in full["requests"]],
        "sizes": full["sizes"],
        "ttl": full["ttl"],
        "first_miss_index": result.first_miss_index,
        "shared_prefix_tokens": result.shared_prefix_tokens,
    }


def _sum(values: Any) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _rfc3339(epoch: float) -> str:
    # Whole seconds: the evidence table shows a time, the epoch fields keep the precision.
    return datetime.fromtimestamp(math.floor(epoch), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- helpers --------------------------------------------------------------------------------


def _only(request: Request, *methods: str) -> Response | None:
    if request.method in methods:
        return None
    return PlainTextResponse(
        "Method Not Allowed\n", status_code=405, headers={"Allow": ", ".join(methods)}
    )


def _json(body: Any, status: int) -> Response:
    return _json_response(_json_bytes(body), status)


def _json_bytes(body: Any) -> bytes:
    # allow_nan=False after replacing non-finite floats: NaN is not JSON and Grafana rejects it.
    text = json.dumps(_finite(body), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def _json_response(body: bytes, status: int) -> Response:
    return Response(
        body,
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


async def _drain(request: Request, limit: int) -> bool:
    """Read and discard the body; False as soon as it exceeds ``limit`` bytes."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return False
    return True


class _PartsResponse(Response):
    """A body of several prepared byte strings, sent one after the other without joining
    them into a copy (the prepared exposition is megabytes; the live part is small)."""

    def __init__(self, parts: Sequence[bytes], headers: Mapping[str, str]) -> None:
        self._parts = [p for p in parts if p]
        length = sum(len(p) for p in self._parts)
        super().__init__(None, headers={**headers, "Content-Length": str(length)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        last = len(self._parts) - 1
        for i, part in enumerate(self._parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
        if not self._parts:
            await send({"type": "http.response.body", "body": b""})


class _BodyGuard:
    """Refuses request bodies (413) except a small one on /-/reload.

    Nothing here reads a body, so a client sending one is either confused or probing; saying
    so beats silently leaving megabytes unread on the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _body_allowed(scope):
            body = b'{"error":"request body not accepted"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _body_allowed(scope: Scope) -> bool:
    length: int | None = None
    chunked = False
    for key, value in scope.get("headers", []):
        name = bytes(key).lower()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return False
        elif name == b"transfer-encoding":
            chunked = True
    if scope.get("path") == "/-/reload":
        return length is None or length <= MAX_RELOAD_BODY  # chunked: capped while read
    return not chunked and not length


_LANDING_FAMILIES: Final = {
    "llmcache_probe_success": "success",
    "llmcache_probe_last_run_timestamp_seconds": "last_run",
    "llmcache_caching_works": "works",
}


def _probe_states(
    registry: CollectorRegistry,
) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """(provider, model) -> probe -> {"success", "last_run", "works"}, from one collect."""
    targets: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for family in registry.collect():
        key = _LANDING_FAMILIES.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            labels = sample.labels
            if {"provider", "model", "probe"} <= labels.keys():
                target = targets.setdefault((labels["provider"], labels["model"]), {})
                target.setdefault(labels["probe"], {})[key] = sample.value
    return targets


def _probe_cell(state: Mapping[str, float]) -> str:
    if not state.get("last_run"):
        return "not run yet"
    if not state.get("success"):
        return "failed"
    works = state.get("works")
    if works is None:
        return "no verdict"  # e.g. the API reports no cache fields
    return "caching works" if works else "caching broken"


def _targets_section(registry: CollectorRegistry, probe_names: Sequence[str]) -> str:
    try:
        targets = _probe_states(registry)
    except Exception:
        log.exception("landing page: collecting the probe states failed")
        return "<p>The probe states are unavailable (see the exporter's log).</p>"
    if not targets:
        return (
            "<p>Nothing probed yet: models are discovered from each configured provider at "
            "start, then probed on their intervals.</p>"
        )
    header = "".join(f"<th>{escape(p)}</th>" for p in probe_names)
    rows = []
    for (provider, model), probes in sorted(targets.items()):
        query = urlencode({"provider": provider, "model": model, "limit": 10})
        cells = "".join(
            f"<td>{escape(_probe_cell(probes[p]))}</td>" if p in probes else "<td>-</td>"
            for p in probe_names
        )
        rows.append(
            f"<tr><td>{escape(provider)}</td><td>{escape(model)}</td>{cells}"
            f'<td><a href="{escape("api/runs?" + query)}">runs</a></td></tr>'
        )
    return (
        f"<h2>What is probed ({len(targets)} models)</h2>\n"
        "<p>The last run of each probe, as /metrics reports it.</p>\n"
        f"<table>\n<tr><th>provider</th><th>model</th>{header}<th>evidence</th></tr>\n"
        + "\n".join(rows)
        + "\n</table>"
    )


def _landing_page(
    version: str, reload_enabled: bool, registry: CollectorRegistry, probe_names: Sequence[str]
) -> str:
    # Relative links, so the page works behind a reverse proxy that adds a path prefix.
    # No inline script or style: a strict Content-Security-Policy from the web config holds.
    links = [
        ("metrics", "Metrics", "Prometheus exposition: scrape this"),
        ("healthz", "Health", "liveness"),
        ("readyz", "Readiness", "store and scheduler state, JSON"),
        ("api/runs", "Runs", "recent probe runs with every request's evidence, JSON"),
    ]
    items = "\n".join(
        f'<li><a href="{href}">{escape(title)}</a> ({escape(note)})</li>'
        for href, title, note in links
    )
    reload_note = (
        "<p>Configuration reload: <code>POST -/reload</code> (or SIGHUP).</p>"
        if reload_enabled
        else ""
    )
    targets = _targets_section(registry, probe_names)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{EXPORTER_NAME}</title>\n</head>\n<body>\n"
        f"<h1>{EXPORTER_NAME}</h1>\n"
        "<p>A Prometheus exporter that probes LLM chat-completion APIs on its own schedule "
        "and measures whether prompt caching works: hit ratios, prompt sizes, shared "
        "prefixes, persistence and TTL, with tokens, spend and budget. Every value comes "
        "from the last probe run; a scrape never calls a provider.</p>\n"
        "<p>Point Prometheus at <code>/metrics</code>; the project's alerting rules and "
        "Grafana dashboards (prometheus/ and grafana/ in the repository) read it.</p>\n"
        f"<ul>\n{items}\n</ul>\n{reload_note}\n{targets}\n"
        f"<p>Version {escape(version)}</p>\n</body>\n</html>\n"
    )
