"""`prompt-cache-exporter probe` as a user runs it: a real process against the simulator."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from exporter import probe_cli
from exporter.simulator.config import SimConfig
from exporter.simulator.models import SimModel
from exporter.simulator.server import serve_simulator
from tests.conftest import open_rig

pytestmark = pytest.mark.anyio

SECRET = "sk-test-DO-NOT-LEAK-4f1c2a9e77"


async def _cli(
    *args: str, env_key: str | None = SECRET, log_level: str = "debug"
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    if env_key is not None:
        env["PCE_API_KEY"] = env_key
    return await anyio.run_process(
        [sys.executable, "-m", "exporter", "--log-level", log_level, "probe", *args],
        env=env,
        check=False,
    )


@pytest.fixture
async def sim_url() -> object:
    async with serve_simulator(SimConfig(latency_scale=0.0, api_key=SECRET)) as sim:
        yield sim.base_url


FAST = ["--backoff", "10ms", "--backoff-max", "20ms", "--ttl-delays", "100ms,200ms"]


@pytest.mark.parametrize(
    ("model", "status", "works"),
    [
        ("sim-cache-ok", 0, True),
        ("sim-cache-broken", 1, False),
        ("sim-no-cache-fields", 3, None),
        ("sim-error", 3, None),
    ],
)
async def test_json_output_and_exit_status(
    sim_url: str, tmp_path: Path, model: str, status: int, works: bool | None
) -> None:
    proc = await _cli(
        "--base-url",
        sim_url,
        "--model",
        model,
        "--probe",
        "all",
        "--json",
        *FAST,
        "--evidence-dir",
        str(tmp_path),
    )
    assert proc.returncode == status, proc.stderr.decode()
    payload = json.loads(proc.stdout)
    assert payload["exit_status"] == status
    assert [p["probe"] for p in payload["probes"]] == [
        "basic",
        "prompt_sizes",
        "partial",
        "persistence",
        "ttl",
    ]
    for probe in payload["probes"]:
        assert probe["caching_works"] is works
        assert probe["hit_ratio"] is None or 0 <= probe["hit_ratio"] <= 1
        for request in probe["requests"]:
            assert "prompt_tokens" in request
            assert "cached_tokens" in request
    _assert_no_secret(proc, tmp_path)


@pytest.mark.parametrize(
    ("model", "status", "works", "baseline"),
    # Token-granular: after the first run, a cold request also shares the system message's
    # three markers and "Run" with earlier prompts (12 tokens, still the baseline).
    [("sim-cache-evicting", 1, False, {8}), ("sim-cache-template", 0, True, {8, 12})],
)
async def test_json_verdicts_on_servers_that_cache_the_chat_template(
    sim_url: str, model: str, status: int, works: bool, baseline: set[int]
) -> None:
    """The issue's must-show: a busy server that reports only the shared template tokens is
    not a working cache; a server that reports them as well as the prompt is."""
    for probe in ("basic", "persistence"):
        proc = await _cli("--base-url", sim_url, "--model", model, "--probe", probe, "--json")
        assert proc.returncode == status, proc.stderr.decode()
        (result,) = json.loads(proc.stdout)["probes"]
        assert result["caching_works"] is works
        assert result["pollution"] is False
        assert result["baseline_tokens"] in baseline
        if works:
            assert result["hit_ratio"] > 0.9
        else:
            assert result["hit_ratio"] < 0.5
            assert result["run_cached_tokens"] == 0
        cold = [r for r in result["requests"] if r["cold"]]
        assert [r["cached_tokens"] for r in cold] == [result["baseline_tokens"]]
        assert all(r["hit"] is works for r in result["requests"] if not r["cold"])
        assert set(result["ttft"]) == {
            "cold_seconds",
            "warm_seconds",
            "hit_seconds",
            "hits_no_faster",
        }


async def test_text_report_and_replayable_curl(sim_url: str, tmp_path: Path) -> None:
    proc = await _cli(
        "--base-url", sim_url, "--model", "sim-cache-ok", *FAST, "--evidence-dir", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "basic: works" in out
    assert re.search(r"\b2\s+repeat\s+200\s+1\s+\d+\s+\d+", out)
    assert "baseline: 0 cached tokens every prompt shares" in out
    # The run's trace, each request's span in its row, and the replay sends that traceparent.
    trace = re.search(r"\n  trace ([0-9a-f]{32})\n", out)
    assert trace
    spans = re.findall(r"\b[12]\s+(?:prime|repeat)\s.*\s([0-9a-f]{16})\s+(?:hit|miss)", out)
    assert len(set(spans)) == 2
    for span in spans:
        assert f"-H 'traceparent: 00-{trace.group(1)}-{span}-01'" in out
    assert re.search(r"ttft: cold \d+\.\d{3}s, warm \d+\.\d{3}s \(hits \d+\.\d{3}s\)", out)
    assert '-H "Authorization: Bearer $PCE_API_KEY"' in out
    _assert_no_secret(proc, tmp_path)
    # The printed command replays the request for real (the shell supplies the key).
    command = out.split("# basic: repeat\n", 1)[1].strip()
    curl = shutil.which("curl")
    assert curl, "curl is needed to replay the evidence"
    replay = await anyio.run_process(
        ["bash", "-c", command], env={"PCE_API_KEY": SECRET, "PATH": os.environ["PATH"]}
    )
    usage = [
        json.loads(line[6:])
        for line in replay.stdout.decode().splitlines()
        if line.startswith("data: {") and '"usage"' in line
    ]
    assert usage
    assert usage[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_wrong_key_is_an_auth_error_without_leaking(sim_url: str, tmp_path: Path) -> None:
    proc = await _cli(
        "--base-url",
        sim_url,
        "--model",
        "sim-cache-ok",
        "--json",
        "--evidence-dir",
        str(tmp_path),
        env_key=SECRET + "-wrong",
    )
    assert proc.returncode == 3
    payload = json.loads(proc.stdout)
    assert payload["probes"][0]["error_type"] == "auth"
    _assert_no_secret(proc, tmp_path, SECRET + "-wrong")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "m"], "error: --base-url is required for --provider-type openai"),
        (["--base-url", "ftp://x", "--model", "m"], "error: --base-url: not an http(s) URL"),
        (
            ["--base-url", "http://127.0.0.1:1", "--model", "m", "--ttl-delays", "soon"],
            "error: --ttl-delays: invalid duration",
        ),
        (
            ["--base-url", "http://127.0.0.1:1", "--model", "m", "--sizes", "small=-1"],
            "error: --sizes: expected name=tokens pairs",
        ),
        (
            ["--base-url", "http://127.0.0.1:1", "--model", "m", "--attempts", "0"],
            "error: --attempts: must be at least 1",
        ),
    ],
)
async def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    proc = await _cli(*args, log_level="warning")
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert err.startswith(message), err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def _assert_no_secret(
    proc: subprocess.CompletedProcess[bytes], evidence: Path, secret: str = SECRET
) -> None:
    assert secret.encode() not in proc.stdout
    assert secret.encode() not in proc.stderr
    for path in evidence.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


async def test_evidence_table_shows_the_baseline_and_the_ttft_witness() -> None:
    """The table's own column and notes, from real runs on the fake clock (exact TTFTs)."""
    flat = SimModel("sim-flat-ttft", prefill_seconds_per_token=0.0, output_token_seconds=0.0)
    template = SimModel(
        "sim-cache-template",
        min_cacheable_tokens=0,
        granularity=1,
        template_tokens=8,
        output_token_seconds=0.0,
    )
    async with open_rig(SimConfig(models=(flat, template), latency_scale=1.0)) as rig:
        results = [await rig.probe("basic", "sim-cache-template")]
        results.append(await rig.probe("basic", "sim-flat-ttft"))
    adapter = rig.context("sim-cache-template").adapter
    out = io.StringIO()
    probe_cli._print_report(out, adapter, "m", results, probe_cli._Evidence(None, None))
    text = out.getvalue()
    first, second = text.split("\nbasic: ")[1:]
    assert "baseline: 8 cached tokens every prompt shares" in first
    repeat = results[0].requests[1]
    assert repeat.run_cached_tokens is not None
    assert re.search(rf"repeat .* {repeat.cached_tokens}\s+{repeat.run_cached_tokens}\s", first)
    assert "no faster" not in first
    # A "hit" that saved no prefill time: shown, and the verdict still says works.
    assert second.startswith("works")
    assert "1 hit(s) no faster than the cold request before them" in second
    assert re.search(r"repeat .* hit, no faster than cold", second)
