"""What the pass-through proxy costs a client: added latency, throughput and streaming TTFT.

Processes on 127.0.0.1, each figure measured on the same requests sent directly and through
a proxy, in alternating rounds so that drift in the machine's load touches both alike:

- **the simulator** (``prompt-cache-exporter simulate`` at its realistic latency, about
  0.1 s per answer), the upstream of the issue's figures: throughput at concurrency 32
  through the proxy ÷ direct (target ≥ 0.9) and streaming time to first token through ÷
  direct (target ≤ 1.05);
- **a fixed-response upstream** (a raw ASGI app answering at once), so that latency and CPU
  are the proxy's own: added latency of sequential requests, p50 (≤ 1 ms) and p99 (≤ 5 ms),
  and the proxy's CPU time per request (from /proc) at concurrency 1 and 32;
- **the proxy** as the daemon runs it (``serve_proxy``: usage read, prefix hashed, every
  request recorded), one process per upstream.

The load generator is ``wrk`` (C, one thread: install it with ``apt-get install wrk``), so
that on a 2-core machine the client does not take the CPU the figures are about; TTFT is read
by a lean h11 client on one keep-alive connection. With ``--litellm PATH`` (a ``litellm``
binary in its own virtualenv) LiteLLM's proxy is measured in front of the same two upstreams
and printed beside ours. Bounded: every wrk run lasts ``--seconds``, TTFT takes ``--streams``
requests per round, each with a timeout, over ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import h11
import httpx

from tests.simulator_process import free_port

PATH = "/v1/chat/completions"
FAST_MODEL = "bench-model"  # the fixed-response upstream's
SIM_MODEL = "sim-cache-ok"  # the simulator's: caches a stable prefix, answers in ~0.1 s
SYSTEM = "You are a benchmark. " * 300  # ~1,500 tokens: long enough to be cached


def chat(model: str, **extra: Any) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
        "max_tokens": 8,
        **extra,
    }
    return json.dumps(body).encode()


FAST_BODY = chat(FAST_MODEL)
SIM_BODY = chat(SIM_MODEL)
SIM_STREAM = chat(SIM_MODEL, stream=True, stream_options={"include_usage": True})
# A model of the simulator's that streams 200 tokens back to back: what each SSE event costs.
LONG_MODEL = "bench-long-stream"
LONG_TOKENS = 200
SIM_MODELS = f"""
[[models]]
name = "{LONG_MODEL}"
output_tokens = {LONG_TOKENS}
output_token_seconds = 0.0005
"""
LONG_STREAM = chat(
    LONG_MODEL, max_tokens=LONG_TOKENS, stream=True, stream_options={"include_usage": True}
)
# Every target gets the same header; LiteLLM checks it (it refuses to start without a master
# key), the upstreams and our proxy pass it on or ignore it.
MASTER_KEY = "sk-bench-" + secrets.token_hex(24)
CONCURRENCY = 32
FIRST_TOKEN = re.compile(rb'"content":\s*"[^"]')  # the first chunk carries an empty one
TARGETS = {"p50": 1.0, "p99": 5.0, "throughput": 0.9, "ttft": 1.05}


# -- the fixed-response upstream --------------------------------------------------------------


USAGE = {
    "prompt_tokens": 1210,
    "completion_tokens": 1,
    "total_tokens": 1211,
    "prompt_tokens_details": {"cached_tokens": 1152},
}
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": FAST_MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": USAGE,
    }
).encode()


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request at once with the same completion."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(COMPLETION))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": COMPLETION})


def serve_upstream(port: int) -> None:
    from exporter.asgi import serve_asgi

    async def main() -> None:
        # serve_asgi, not uvicorn.run: its socket gets TCP_NODELAY (no 40 ms delayed ACKs).
        async with serve_asgi(upstream_app, host="127.0.0.1", port=port):
            await anyio.sleep_forever()

    anyio.run(main)


def serve_our_proxy(port: int, upstream: str) -> None:
    from exporter.config.proxies import ProxyConfig
    from exporter.proxy import TrafficState, serve_proxy

    async def main() -> None:
        proxy = ProxyConfig(
            name="bench", type="openai", listen=f"127.0.0.1:{port}", upstream=upstream
        )
        async with serve_proxy(proxy, state=TrafficState(), grace=1.0, trust_env=False):
            await anyio.sleep_forever()

    anyio.run(main)  # the daemon's event loop: anyio's default (asyncio)


# -- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    url: str
    pid: int | None = None  # whose CPU time is counted (None: not measured)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its waited-for children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def process(
    args: list[str], url: str, body: bytes, env: dict[str, str] | None = None
) -> Iterator[Target]:
    """A server process, once it answers ``body`` with 200 (at most 120 s)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ready = httpx.post(url + PATH, content=body, headers=headers(), timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"could not start {' '.join(args[:4])}")
            time.sleep(0.2)
        yield Target(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}


def me(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.proxy", *args]


def our_proxy(upstream: str, body: bytes) -> Any:
    port = free_port()
    args = me("proxy", "--port", str(port), "--upstream", upstream)
    return process(args, f"http://127.0.0.1:{port}", body)


@contextmanager
def litellm_proxy(binary: str, fast: str, sim: str) -> Iterator[Target]:
    """One LiteLLM process routing each model to its upstream, as it would be deployed."""
    port = free_port()

    def route(model: str, base: str) -> dict[str, Any]:
        params = {"model": f"openai/{model}", "api_base": base + "/v1", "api_key": "bench"}
        return {"model_name": model, "litellm_params": params}

    config = {
        "model_list": [route(FAST_MODEL, fast), route(SIM_MODEL, sim), route(LONG_MODEL, sim)],
        "litellm_settings": {"telemetry": False},
        "general_settings": {"master_key": MASTER_KEY},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "litellm.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
        args = [binary, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
        with process(args, f"http://127.0.0.1:{port}", FAST_BODY, env) as target:
            yield target


# -- load: wrk --------------------------------------------------------------------------------

# wrk's own summary, printed by its done() hook in exact figures (latencies in µs).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
wrk.body = [==[%(body)s]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    p50: float
    p99: float
    cpu: float | None  # CPU seconds per request of the measured process

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


WRK = ("wrk", "-t1", "--timeout", "10s")  # one thread: the generator needs less than a core


def wrk(
    target: Target, body: bytes, connections: int, seconds: int, *, warm_up: bool = False
) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT % {"key": MASTER_KEY, "body": body.decode()})
        script.flush()
        before = cpu_seconds(target.pid) if target.pid else 0.0
        done = subprocess.run(
            [*WRK, f"-c{connections}", f"-d{seconds}s", "-s", script.name, target.url + PATH],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
        cpu = cpu_seconds(target.pid) - before if target.pid else None
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    n, micros, broken, status, p50, p99 = (int(x) for x in line.split()[1:])
    if not warm_up and (broken or status or not n):
        raise SystemExit(f"{target.url}: {broken} socket errors, {status} non-2xx of {n}")
    per_request = cpu / n if cpu is not None and n else None
    return Load(n, micros / 1e6, p50 / 1e6, p99 / 1e6, per_request)


# -- TTFT: a lean client ------------------------------------------------------------------------


async def streams(url: str, body: bytes, n: int) -> list[tuple[float, int]]:
    """Time to the first generated token and the number of events of ``n`` streams, one
    after the other, on one keep-alive connection (h11 frames the HTTP; nothing else runs
    per chunk)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    conn = h11.Connection(h11.CLIENT)
    fields = [("Host", f"{host}:{port}"), ("Content-Length", str(len(body)))]
    fields += list(headers().items())
    out = []
    try:
        for _ in range(n):
            with anyio.fail_after(30):
                start = time.perf_counter()
                writer.write(
                    conn.send(h11.Request(method="POST", target=PATH, headers=fields))
                    + conn.send(h11.Data(data=body))
                    + conn.send(h11.EndOfMessage())
                )
                first = None
                events = 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                    elif isinstance(event, h11.Response) and event.status_code != 200:
                        raise SystemExit(f"{url}: HTTP {event.status_code}")
                    elif isinstance(event, h11.Data):
                        events += event.data.count(b"\n\n")
                        if first is None and FIRST_TOKEN.search(event.data):
                            first = time.perf_counter() - start
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
                if first is None:
                    raise SystemExit(f"{url}: no token streamed")
                out.append((first, events))
                conn.start_next_cycle()
    finally:
        writer.close()
    return out


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Figures:
    latency: list[Load] = field(default_factory=list)  # fixed upstream, sequential
    saturated: list[Load] = field(default_factory=list)  # fixed upstream, concurrency 32
    sim: list[Load] = field(default_factory=list)  # simulator, concurrency 32
    ttft: list[float] = field(default_factory=list)  # simulator, streamed
    event_cpu: list[float] = field(default_factory=list)  # CPU seconds per SSE event


def measure(
    pairs: dict[str, tuple[Target, Target]], seconds: int, rounds: int, count: int
) -> dict[str, Figures]:
    """``pairs``: name -> (in front of the fixed upstream, in front of the simulator)."""
    out = {name: Figures() for name in pairs}
    for fast, sim in pairs.values():  # warm-up: connections, imports, the simulator's cache
        wrk(fast, FAST_BODY, CONCURRENCY, 2, warm_up=True)
        wrk(sim, SIM_BODY, CONCURRENCY, 2, warm_up=True)
        asyncio.run(streams(sim.url, SIM_STREAM, 3))
    for _ in range(rounds):
        for name, (fast, sim) in pairs.items():
            figures = out[name]
            figures.latency.append(wrk(fast, FAST_BODY, 1, seconds))
            figures.saturated.append(wrk(fast, FAST_BODY, CONCURRENCY, seconds))
            figures.sim.append(wrk(sim, SIM_BODY, CONCURRENCY, seconds))
            figures.ttft += [t for t, _ in asyncio.run(streams(sim.url, SIM_STREAM, count))]
            if sim.pid is not None:
                before = cpu_seconds(sim.pid)
                events = sum(e for _, e in asyncio.run(streams(sim.url, LONG_STREAM, 5)))
                figures.event_cpu.append((cpu_seconds(sim.pid) - before) / events)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: dict[str, Figures]) -> None:
    direct = results["direct"]
    d50 = median([x.p50 for x in direct.latency])
    d99 = median([x.p99 for x in direct.latency])
    dfast = median([x.rate for x in direct.saturated])
    dsim = median([x.rate for x in direct.sim])
    dttft = median(direct.ttft)
    print(
        f"direct: latency p50 {d50 * 1e3:.3f} ms, p99 {d99 * 1e3:.3f} ms (fixed upstream, "
        f"1 connection); {dsim:.0f} req/s from the simulator at concurrency {CONCURRENCY}; "
        f"TTFT p50 {dttft * 1e3:.1f} ms; {dfast:.0f} req/s from the fixed upstream at "
        f"concurrency {CONCURRENCY} (CPU-bound)"
    )
    for name, f in results.items():
        if name == "direct":
            continue
        p50 = median([x.p50 for x in f.latency]) - d50
        p99 = median([x.p99 for x in f.latency]) - d99
        sim = median([x.rate for x in f.sim])
        ttft = median(f.ttft)
        fast = median([x.rate for x in f.saturated])
        cpu1 = median([x.cpu for x in f.latency if x.cpu is not None])
        cpu32 = median([x.cpu for x in f.saturated if x.cpu is not None])
        per_event = median(f.event_cpu)
        rows = [
            ("added latency p50", f"{p50 * 1e3:+.3f} ms", "<= 1 ms", p50 * 1e3 <= TARGETS["p50"]),
            ("added latency p99", f"{p99 * 1e3:+.3f} ms", "<= 5 ms", p99 * 1e3 <= TARGETS["p99"]),
            (
                f"throughput ratio, concurrency {CONCURRENCY}",
                f"{sim / dsim:.3f} ({sim:.0f} req/s)",
                ">= 0.9",
                sim / dsim >= TARGETS["throughput"],
            ),
            (
                "TTFT ratio",
                f"{ttft / dttft:.3f} (p50 {ttft * 1e3:.1f} ms)",
                "<= 1.05",
                ttft / dttft <= TARGETS["ttft"],
            ),
        ]
        print(f"{name}:")
        for label, value, target, ok in rows:
            print(f"  {label:34} {value:26} target {target:8} {verdict(ok)}")
        print(
            f"  {'CPU per request':34} {cpu1 * 1e3:.3f} ms sequential, {cpu32 * 1e3:.3f} ms at "
            f"concurrency {CONCURRENCY} ({fast:.0f} req/s from the fixed upstream, "
            f"{fast / dfast:.2f} of direct: CPU-bound, not a target)"
        )
        print(
            f"  {'CPU per streamed event':34} {per_event * 1e6:.0f} µs ({LONG_TOKENS}-token "
            "streams from the simulator: forwarded, framed, usage read)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    px = sub.add_parser("proxy")
    px.add_argument("--port", type=int, required=True)
    px.add_argument("--upstream", required=True)
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=30, help="TTFT requests per round")
    parser.add_argument("--litellm", help="path of a litellm binary (in its own virtualenv)")
    args = parser.parse_args()
    if args.role == "upstream":
        serve_upstream(args.port)
        return
    if args.role == "proxy":
        serve_our_proxy(args.port, args.upstream)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks.proxy needs wrk: apt-get install wrk")
    from tests.simulator_process import simulator

    load_start = os.getloadavg()
    up_port = free_port()
    fast_url = f"http://127.0.0.1:{up_port}"
    with ExitStack() as stack:
        fast = stack.enter_context(process(me("upstream", "--port", str(up_port)), fast_url, b"{}"))
        models = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".toml"))
        models.write(SIM_MODELS)
        models.flush()
        sim_process = stack.enter_context(
            simulator(
                "--latency-scale", "1", "--balance-usd", "1000000000", "--config", models.name
            )
        )
        sim = Target(sim_process.url)
        pairs = {
            "direct": (Target(fast.url), sim),
            "prompt-cache-exporter": (
                stack.enter_context(our_proxy(fast.url, FAST_BODY)),
                stack.enter_context(our_proxy(sim.url, SIM_BODY)),
            ),
        }
        if args.litellm:
            litellm = stack.enter_context(litellm_proxy(args.litellm, fast.url, sim.url))
            pairs["litellm"] = (litellm, litellm)
        results = measure(pairs, args.seconds, args.rounds, args.streams)
    load_end = os.getloadavg()
    print(
        f"{os.cpu_count()} cores; load average {load_start[0]:.2f} at the start, "
        f"{load_end[0]:.2f} at the end; {args.rounds} rounds of {args.seconds:g} s per wrk run "
        f"and {args.streams} streams per target; loopback"
    )
    report(results)


if __name__ == "__main__":
    main()
