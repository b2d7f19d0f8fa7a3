"""The daemon-level secret sweep of issue 8: a marker API key, upstreams that echo it in every
fault mode, and every place the exporter writes text: 0 occurrences of the key or of any 6+
character piece of it.

A real exporter process probes (1) the simulator's fault models through a proxy that puts the
key into every answer (headers, ids, error messages, HTML pages, streamed events), over the
OpenAI and the Anthropic API, and (2) a raw-socket hostile upstream answering each provider with
one way of echoing it (401 bodies with the key across the truncation boundary, a usage field,
streamed deltas, a gzip body, a redirect, a 429). The ``probe`` and ``history`` CLIs run with
the key too. Then the log, /metrics, /api/runs, ``history`` CSV and JSON, ``probe`` text and
JSON with its curl commands and evidence files, and the SQLite file with its -wal and -shm
(read while the exporter runs and again after it stopped) are searched. Loopback only;
bounded in time (each wait has a deadline) and count (a fixed list of models and CLI runs).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import secrets
import string
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from starlette.types import Receive, Scope, Send

from exporter.asgi import serve_asgi
from tests.exporter_process import ExporterProcess, config_text, probes_toml, wait_for
from tests.hostile_upstream import Hostile, Reply, hostile_upstream
from tests.simulator_process import simulator

# Letters only: no JSON escaping can split it, and a 6-letter piece of it will not turn up in
# run ids, trace ids or hashes by chance (52^6 possibilities).
KEY = "pce" + "".join(secrets.choice(string.ascii_letters) for _ in range(29))
PIECES = {KEY[i : i + 6] for i in range(len(KEY) - 5)}
SIM_MODELS = [
    "sim-cache-ok",
    "sim-error",
    "sim-ratelimited",
    *(
        f"sim-fault-{fault}"
        for fault in (
            "html",
            "bad_json",
            "missing_usage",
            "cached_exceeds_prompt",
            "negative_tokens",
            "absurd_tokens",
            "truncated_stream",
            "huge_body",
            "stream_error",
            "slow",
        )
    ),
]
HOSTILE_WAYS = [
    "h-401",
    "h-401-edge",
    "h-500-edge",
    "h-usage",
    "h-sse",
    "h-html",
    "h-gzip",
    "h-redirect",
    "h-429",
]


# --- an upstream that echoes the key: the simulator behind a proxy --------------------------


class EchoProxy:
    """Forwards to the simulator and writes the key into every answer it passes back."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.echoed: list[str] = []  # the paths answered, each with the key in it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        url = (
            self.upstream
            + scope["path"]
            + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
        )
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"content-length")]
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                answer = await client.request(scope["method"], url, headers=headers, content=body)
            status, content = answer.status_code, answer.content
            kind = answer.headers.get("content-type", "application/json")
        except httpx.TimeoutException:  # the simulator's "slow" fault
            status, content, kind = (
                504,
                b'{"error":{"message":"upstream timeout"}}',
                "application/json",
            )
        key = KEY.encode()
        for anchor, echoed in (
            (b"chatcmpl-sim-", b"chatcmpl-" + key + b"-"),
            (b"msg_sim_", b"msg_" + key + b"_"),
            (b'"message":"', b'"message":"' + key + b" "),
            (b'"message": "', b'"message": "' + key + b" "),
            (b"<body>", b"<body>" + key),
        ):
            content = content.replace(anchor, echoed)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", kind.encode()),
                    (b"content-length", str(len(content)).encode()),
                    (b"x-request-id", key),
                    (b"request-id", key),
                    (b"x-upstream-authorization", b"Bearer " + key),
                    (b"x-ratelimit-remaining-requests", b"9"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})
        self.echoed.append(scope["path"])


# --- an upstream that echoes the key: raw HTTP, one way per provider ------------------------


def _completion(model: str, **usage_extra: object) -> bytes:
    usage = {"prompt_tokens": 1200, "completion_tokens": 1, **usage_extra}
    return json.dumps(
        {"id": KEY, "model": model, "choices": [{"message": {"content": KEY}}], "usage": usage}
    ).encode()


def hostile_script(method: str, path: str, headers: dict[str, str]) -> Reply:
    """``/v1/<way>/...``: each provider of the config is one way of echoing the key."""
    way = path.split("/")[2] if path.count("/") >= 3 else ""
    if way in _REPLIES and path.endswith("/chat/completions"):
        return _REPLIES[way]()
    return Reply(404, [("x-request-id", KEY)], f'{{"error": "no route, key {KEY}"}}'.encode())


def _sse() -> Reply:
    events = [
        {"id": KEY, "choices": [{"delta": {"content": KEY}}]},
        {
            "id": KEY,
            "choices": [],
            "usage": {
                "prompt_tokens": 1200,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        },
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return Reply(
        200,
        [("content-type", "text/event-stream"), ("x-request-id", KEY)],
        body + b"data: [DONE]\n\n",
    )


_REPLIES = {
    "h-401": lambda: Reply(
        401,
        [("x-request-id", KEY)],
        f'{{"error": {{"message": "Incorrect API key provided: {KEY}"}}}}'.encode(),
    ),
    # The key across the 200-character cut of an error text, where a prefix of it would stay.
    "h-401-edge": lambda: Reply(401, [], (("x" * 190) + KEY + ("y" * 50)).encode()),
    "h-500-edge": lambda: Reply(
        500,
        [("content-type", "application/json")],
        json.dumps({"error": {"message": "z" * 185 + KEY}}).encode(),
    ),
    "h-usage": lambda: Reply(
        200,
        [("content-type", "application/json"), ("x-request-id", KEY)],
        _completion("h-usage", prompt_tokens_details={"cached_tokens": 0, "note": KEY}),
    ),
    "h-sse": _sse,
    "h-html": lambda: Reply(
        500,
        [("content-type", "text/html")],
        f"<html><body>key {KEY} rejected</body></html>".encode(),
    ),
    "h-gzip": lambda: Reply(
        400,
        [("content-encoding", "gzip")],
        gzip.compress(f'{{"error": {{"message": "{KEY}"}}}}'.encode()),
    ),
    "h-redirect": lambda: Reply(302, [("location", f"http://127.0.0.1:9/?key={KEY}")], b""),
    "h-429": lambda: Reply(
        429, [("retry-after", "0"), ("x-request-id", KEY)], f"slow down, {KEY}".encode()
    ),
}


# --- the sweep -------------------------------------------------------------------------------


def providers(proxy: str, hostile: str) -> str:
    sims = ", ".join(f'"{m}"' for m in SIM_MODELS)
    hostiles = "".join(
        f"""
[[providers]]
name = "{way}"
type = "openai"
base_url = "{hostile}/v1/{way}"
api_key_env = "SWEEP_KEY"
models = ["m"]
isolation_delay = "0s"
"""
        for way in HOSTILE_WAYS
    )
    return f"""
[[providers]]
name = "echo-openai"
type = "openai"
base_url = "{proxy}/v1"
api_key_env = "SWEEP_KEY"
models = [{sims}]
concurrency = 8
isolation_delay = "0s"

[[providers]]
name = "echo-anthropic"
type = "anthropic"
base_url = "{proxy}/v1"
api_key_env = "SWEEP_KEY"
models = ["sim-cache-ok", "sim-error", "sim-fault-stream_error", "sim-fault-bad_json"]
concurrency = 4
isolation_delay = "0s"

{hostiles}"""


@dataclass
class Upstreams:
    proxy_url: str
    proxy: EchoProxy
    hostile: Hostile


@contextlib.contextmanager
def upstreams(sim_url: str) -> Iterator[Upstreams]:
    """The echoing proxy and the hostile upstream, served from a thread of this process."""

    @contextlib.asynccontextmanager
    async def both() -> AsyncIterator[Upstreams]:
        proxy = EchoProxy(sim_url)
        async with (
            serve_asgi(proxy, host="127.0.0.1", port=0) as address,
            hostile_upstream(hostile_script) as hostile,
        ):
            yield Upstreams(address.url, proxy, hostile)

    portal: BlockingPortal
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(both()) as up:
        yield up


def leaks(name: str, data: bytes) -> list[str]:
    return [f"{name}: {piece!r}" for piece in sorted(PIECES) if piece.encode() in data]


def cli(*args: str, timeout: float = 60) -> bytes:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCE_")}
    env["PCE_API_KEY"] = KEY
    done = subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        env=env,
        timeout=timeout,
        capture_output=True,
        check=False,
    )
    return done.stdout + done.stderr


def database_files(db: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(db.parent.glob(db.name + "*"))]


RUNS = {"limit": 1000}


def test_the_key_appears_nowhere(tmp_path: Path) -> None:
    db = tmp_path / "data" / "sweep.db"
    found: list[str] = []
    assert leaks("self-check", b"a cut " + KEY[5:12].encode() + b" of the key")  # it can see
    with simulator("--with-fault-models") as sim, upstreams(sim.url) as up:
        proxy, hostile = up.proxy_url, up.hostile.url
        cfg = tmp_path / "sweep.toml"
        cfg.write_text(
            config_text(
                sim_url=sim.base_url,
                db_path=db,
                providers=providers(proxy, hostile),
                probes=probes_toml(basic="2s/1500ms"),
            )
        )
        os.environ["SWEEP_KEY"] = KEY
        try:
            exporter = ExporterProcess(cfg).start()
        finally:
            del os.environ["SWEEP_KEY"]
        try:
            every = len(SIM_MODELS) + 4 + len(HOSTILE_WAYS)

            def probed() -> bool:
                # /api/runs reads behind the store's writes: slow on a loaded machine.
                runs = httpx.get(exporter.url + "/api/runs", params=RUNS, timeout=30).json()
                return len({(r["provider"], r["model"]) for r in runs["runs"]}) >= every

            assert wait_for(probed, 60, 0.5), "not every model was probed within 60 s"
            found += leaks("/metrics", httpx.get(exporter.url + "/metrics").content)
            found += leaks(
                "/api/runs", httpx.get(exporter.url + "/api/runs", params=RUNS, timeout=30).content
            )
            for name, data in database_files(db):  # while running: the WAL holds the runs
                found += leaks(f"{name} (running)", data)
            # Text (with its curl commands) for a working and a failing model, JSON for a
            # stream that fails in-band; evidence files in every case.
            for model, extra in (
                ("sim-cache-ok", ()),
                ("sim-error", ()),
                ("sim-fault-stream_error", ("--json",)),
            ):
                evidence = tmp_path / f"evidence-{model}"
                output = cli(
                    "probe", "--base-url", f"{proxy}/v1", "--model", model, "--provider-type",
                    "openai", "--deadline", "20s", "--evidence-dir", str(evidence), *extra,
                )  # fmt: skip
                assert b"curl" in output or extra, output  # the replay commands are printed
                found += leaks(f"probe {model} {extra}", output)
                for path in evidence.rglob("*"):
                    found += (
                        leaks(f"evidence {path.name}", path.read_bytes()) if path.is_file() else []
                    )
            output = cli(
                "probe",
                "--base-url",
                f"{hostile}/v1/h-401-edge",
                "--model",
                "m",
                "--provider-type",
                "openai",
                "--json",
                "--attempts",
                "1",
            )
            found += leaks("probe h-401-edge --json", output)
            for fmt in ("csv", "json"):
                output = cli("history", "--config", str(cfg), "--format", fmt)
                assert b"sim-fault-html" in output  # the history is really there
                found += leaks(f"history --format {fmt}", output)
        finally:
            exporter.terminate()
            found += leaks("exporter log", exporter.log_path.read_bytes())
        # The key really went everywhere: every way of the hostile upstream was asked, and the
        # proxy answered chat requests of both APIs with it.
        asked = {path.split("/")[2] for _, path, _ in up.hostile.requests}
        assert asked >= set(HOSTILE_WAYS)
        assert up.proxy.echoed.count("/v1/chat/completions") >= len(SIM_MODELS)
        assert "/v1/messages" in up.proxy.echoed
    for name, data in database_files(db):
        found += leaks(f"{name} (stopped)", data)
    assert found == []
