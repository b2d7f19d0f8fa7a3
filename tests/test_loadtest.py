"""`prompt-cache-exporter loadtest` as a user runs it: a real process against the simulator
on 127.0.0.1, with the simulator's own counters as the independent witness."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from exporter.cli import build_parser
from exporter.loadtest import cli as loadtest_cli
from exporter.simulator.config import SimConfig
from exporter.simulator.models import DEFAULT_MODELS
from exporter.simulator.server import SimulatorHandle, serve_simulator
from exporter.tracecontext import traceparent

pytestmark = pytest.mark.anyio

SECRET = "sk-test-LOADTEST-never-printed-51b7"
RETRY_AFTER = 0.2


def _env(key: str | None = SECRET) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    if key is not None:
        env["PCE_API_KEY"] = key
    return env


async def _loadtest(*args: str, key: str | None = SECRET) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "exporter", "loadtest", *args], env=_env(key), check=False
    )


async def _json_run(
    sim: SimulatorHandle, model: str, *args: str, key: str | None = SECRET
) -> tuple[subprocess.CompletedProcess[bytes], dict[str, Any]]:
    """A run against ``sim`` with a JSON report (empty when nothing was printed)."""
    proc = await _loadtest(
        "--base-url", sim.base_url, "--model", model, *args, "--format", "json", key=key
    )
    return proc, (json.loads(proc.stdout) if proc.stdout else {})


def _models(**overrides: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        dataclasses.replace(m, **overrides[m.name]) if m.name in overrides else m
        for m in DEFAULT_MODELS
    )


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorHandle]:
    # Latency scaled down, not off: cold prefill still takes visibly longer than warm.
    config = SimConfig(
        models=_models(**{"sim-ratelimited": {"retry_after": RETRY_AFTER}}),
        latency_scale=0.2,
        api_key=SECRET,
    )
    async with serve_simulator(config) as handle:
        yield handle


def _model_stats(sim: SimulatorHandle, model: str) -> dict[str, Any]:
    stats: dict[str, Any] = sim.state.stats_snapshot()["models"].get(model, {})
    return stats


def _no_secret(proc: subprocess.CompletedProcess[bytes]) -> None:
    assert SECRET.encode() not in proc.stdout
    assert SECRET.encode() not in proc.stderr


@pytest.mark.parametrize(("model", "status"), [("sim-cache-ok", 0), ("sim-cache-broken", 1)])
async def test_two_hundred_requests_at_concurrency_eight(
    sim: SimulatorHandle, model: str, status: int
) -> None:
    """The issue's must-show: -n 200 -c 8; warm hit ratio > 0.9 where caching works and 0
    where it is broken, with p50/p95 of latency and TTFT for cold and warm."""
    proc, report = await _json_run(sim, model, "-n", "200", "-c", "8")
    assert proc.returncode == status, proc.stderr.decode()
    _no_secret(proc)
    assert report["stopped"] == "completed"
    assert report["sent"] == 200
    cold, warm = report["cold"], report["warm"]
    assert cold["requests"] + warm["requests"] == 200
    # The first wave (one request per worker) is cold: nothing had come back yet.
    assert 1 <= cold["requests"] <= 8
    for group in (cold, warm):
        assert group["ok"] == group["requests"]
        for stat in ("latency_seconds", "ttft_seconds"):
            summary = group[stat]
            assert summary["count"] == group["ok"]
            assert 0 < summary["min"] <= summary["p50"] <= summary["p95"] <= summary["max"]
    # The simulator's own counters: every request reached it once, and it billed what the
    # report counts.
    stats = _model_stats(sim, model)
    assert stats["requests"] == 200
    assert stats["responses"] == {"200": 200}
    assert report["statuses"] == {"200": 200}
    assert report["spend"]["prompt_tokens"] == stats["prompt_tokens"]
    assert report["spend"]["cached_tokens"] == stats["cached_tokens"]
    # W3C trace context: the simulator received the run's trace on every request, each with
    # the span id its evidence records.
    spans = [r["span_id"] for r in report["requests"]]
    received = [e["traceparent"] for e in sim.state.log_entries(model, 1000)]
    assert sorted(received) == sorted(traceparent(report["trace_id"], s) for s in spans)
    assert len(set(spans)) == 200
    if model == "sim-cache-ok":
        assert report["verdict"] == "works"
        assert report["hit_ratio"] > 0.9
        assert report["hit_share"] == 1.0
        assert warm["hits"] == warm["ok"]
        assert report["baseline_tokens"] == 0
    else:
        assert report["verdict"] == "broken"
        assert report["hit_ratio"] == 0
        assert warm["hits"] == 0
        assert stats["cached_tokens"] == 0


async def test_text_report_shows_cold_and_warm_percentiles(sim: SimulatorHandle) -> None:
    proc = await _loadtest(
        "--base-url", sim.base_url, "--model", "sim-cache-ok", "-n", "24", "-c", "4"
    )
    assert proc.returncode == 0, proc.stderr.decode()
    _no_secret(proc)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    # The estimate comes first, on stderr, before anything is sent.
    assert err.startswith("loadtest: 24 requests to sim-cache-ok at concurrency 4")
    assert "estimated" in err
    assert "caching under load: works" in out
    assert "completed: 24 of 24 requests finished" in out
    for title in ("latency (s)", "time to first token (s)"):
        block = out.split(f"\n{title}\n", 1)[1].splitlines()
        assert block[0].split() == ["n", "min", "p50", "p95", "p99", "max"]
        assert block[1].split()[0] == "cold"
        assert block[2].split()[0] == "warm"
    # The replays carry the key as a variable, never the key.
    assert '-H "Authorization: Bearer $PCE_API_KEY"' in out


async def test_rate_limited_429s_are_counted_and_honoured(sim: SimulatorHandle) -> None:
    """sim-ratelimited answers a (seeded) third of its chat requests 429 with Retry-After;
    every retry must come at least that long after the 429."""
    proc, report = await _json_run(sim, "sim-ratelimited", "-n", "8", "-c", "4")
    assert proc.returncode in (0, 3), proc.stderr.decode()
    stats = _model_stats(sim, "sim-ratelimited")
    limits = report["rate_limits"]
    # Counted: exactly the 429s the simulator sent.
    assert limits["responses"] == stats["responses"]["429"] > 0
    assert report["statuses"]["429"] == stats["responses"]["429"]
    assert report["statuses"]["200"] == stats["responses"]["200"]
    # Honoured: checked here from the attempt log, independently of the report's own count.
    gaps = []
    for request in report["requests"]:
        attempts = request["attempt_log"]
        for before, after in itertools.pairwise(attempts):
            if before["status"] == 429:
                assert before["retry_after"] == RETRY_AFTER
                gaps.append(after["sent_at"] - before["answered_at"])
    assert gaps
    assert len(gaps) == limits["retried"] == limits["honoured"]
    assert min(gaps) >= RETRY_AFTER - 0.005
    # A request whose every attempt got 429 failed as rate_limit; the others succeeded.
    failed = [r for r in report["requests"] if r["error_type"] == "rate_limit"]
    assert report["errors"].get("rate_limit", 0) == len(failed)
    assert all([a["status"] for a in r["attempt_log"]] == [429] * 3 for r in failed)
    assert stats["responses"]["200"] == 8 - len(failed)
    # Every attempt of a request carried its one span id.
    per_span = Counter(e["traceparent"] for e in sim.state.log_entries("sim-ratelimited", 100))
    expected = {
        traceparent(report["trace_id"], r["span_id"]): len(r["attempt_log"])
        for r in report["requests"]
    }
    assert per_span == expected


async def test_spend_cap_refuses_before_any_request(sim: SimulatorHandle) -> None:
    proc = await _loadtest(
        "--base-url", sim.base_url, "--model", "sim-cache-ok", "-n", "1000", "-c", "8"
    )
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert err.startswith("error: estimated ")
    assert "exceed --max-total-tokens 500,000; not started" in err
    assert len(err.splitlines()) == 1
    assert proc.stdout == b""
    assert sim.state.stats_snapshot()["totals"]["requests"] == 0
    assert sim.state.log_entries(None, 10) == []


async def test_the_cap_holds_during_the_run(sim: SimulatorHandle) -> None:
    """A run whose estimate just fits starts; reservations made before every attempt keep
    what the simulator bills within the cap (and stop the run when the next might not fit)."""
    args = ["--base-url", sim.base_url, "--model", "sim-cache-ok", "-n", "20", "-c", "4"]
    probe = await _loadtest(*args, "--max-total-tokens", "1")
    assert probe.returncode == 2
    assert sim.state.stats_snapshot()["totals"]["requests"] == 0
    estimate = int(
        probe.stderr.decode().split("estimated ", 1)[1].split(" ", 1)[0].replace(",", "")
    )
    proc = await _loadtest(*args, "--max-total-tokens", str(estimate), "--format", "json")
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    totals = sim.state.stats_snapshot()["totals"]
    billed = totals["prompt_tokens"] + totals["completion_tokens"]
    assert 0 < billed <= estimate
    assert report["spend"]["total_tokens"] == billed
    if report["stopped"] == "token_cap":
        assert report["errors"] == {"budget": 1}
        denied = report["requests"][-1]
        assert denied["error_type"] == "budget"
        assert denied["attempt_log"] == []  # never sent
        assert totals["requests"] == report["sent"] == len(report["requests"]) - 1
    else:
        assert report["stopped"] == "completed"
        assert totals["requests"] == 20


async def test_ctrl_c_stops_cleanly_and_reports_what_finished() -> None:
    slow = {"sim-cache-ok": {"output_tokens": 8, "output_token_seconds": 0.05}}
    config = SimConfig(models=_models(**slow), latency_scale=1.0, api_key=SECRET)
    command = [sys.executable, "-m", "exporter", "loadtest", "--model", "sim-cache-ok"]
    async with serve_simulator(config) as sim:
        command += ["--base-url", sim.base_url, "-n", "300", "-c", "2", "--format", "json"]
        async with await anyio.open_process(command, env=_env()) as process:
            with anyio.fail_after(30):
                # Another process's progress: nothing to wait on but its effect.
                while _model_stats(sim, "sim-cache-ok").get("requests", 0) < 6:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(20):
                assert process.stdout is not None
                assert process.stderr is not None
                out = b"".join([chunk async for chunk in process.stdout])
                err = b"".join([chunk async for chunk in process.stderr])
                status = await process.wait()
        served = _model_stats(sim, "sim-cache-ok")["requests"]
    assert status == 130, err.decode()
    assert b"Traceback" not in err
    assert b"interrupted: " in err
    report = json.loads(out)
    assert report["stopped"] == "interrupted"
    finished = [r for r in report["requests"] if not r["cancelled"]]
    assert len(finished) >= 4  # six had reached the simulator, two per worker at most in flight
    assert all(r["status"] == 200 for r in finished)
    assert report["cancelled"] <= 2  # at most one in flight per worker
    assert report["cold"]["ok"] + report["warm"]["ok"] == len(finished)
    assert len(finished) <= served < 300


async def test_duration_stops_starting_new_requests(sim: SimulatorHandle) -> None:
    args = ["-n", "5000", "-c", "2", "--duration", "300ms", "--max-total-tokens", "10000000"]
    proc, report = await _json_run(sim, "sim-cache-ok", *args)
    assert proc.returncode == 0, proc.stderr.decode()
    assert report["stopped"] == "duration"
    assert 2 <= report["sent"] < 5000
    assert report["sent"] == _model_stats(sim, "sim-cache-ok")["requests"]
    assert report["options"]["duration_seconds"] == 0.3


async def test_a_refused_key_stops_the_run_without_leaking_it(sim: SimulatorHandle) -> None:
    wrong = SECRET + "-wrong"
    proc, report = await _json_run(sim, "sim-cache-ok", "-n", "50", "-c", "2", key=wrong)
    assert proc.returncode == 3
    assert wrong.encode() not in proc.stdout + proc.stderr
    assert report["stopped"] == "auth"
    assert report["verdict"] == "error"
    assert report["errors"] == {"auth": report["sent"]}
    assert report["sent"] <= 2  # one per worker at most, then nothing more is sent


TARGET = ["--base-url", "http://127.0.0.1:1", "--model", "m"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "m", "-n", "1", "-c", "1"], "error: --base-url is required"),
        (["--base-url", "ftp://x", "--model", "m", "-n", "1", "-c", "1"], "error: --base-url: not"),
        ([*TARGET, "-n", "0", "-c", "1"], "error: -n: "),
        ([*TARGET, "-n", "1", "-c", "0"], "error: -c: "),
        ([*TARGET, "-n", "1", "-c", "1", "--duration", "x"], "error: --duration: "),
        ([*TARGET, "-n", "1", "-c", "1", "--shared-prefix", "0"], "error: --shared-prefix: "),
        (
            [*TARGET, "-n", "1", "-c", "1", "-o", "/nonexistent/r.html"],
            "error: --output: no such directory",
        ),
    ],
)
async def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    parsed = build_parser().parse_args(["loadtest", *args])
    assert await loadtest_cli.run(parsed, env=_env(), out=out, err=err) == 2
    assert err.getvalue().startswith(message), err.getvalue()
    assert len(err.getvalue().splitlines()) == 1
    assert out.getvalue() == ""


def test_the_daemon_never_loads_the_load_test() -> None:
    code = (
        "import sys, exporter.daemon, exporter.runtime, exporter.scheduler; "
        "print(sorted(m for m in sys.modules if m.startswith('exporter.loadtest')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    assert out.stdout.strip() == "[]"
