"""`prompt-cache-exporter probe` as a user runs it: a real process against the simulator."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from exporter import reports
from exporter.clock import SystemClock
from exporter.probe_progress import Progress
from exporter.reports import text as text_report
from exporter.simulator.config import SimConfig
from exporter.simulator.models import SimModel
from exporter.simulator.server import serve_simulator
from tests.conftest import open_rig
from tests.simulator_process import SimProcess, simulator
from tests.stream_lines import Lines

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


async def test_a_fixed_baseline_overrides_the_learned_one(sim_url: str) -> None:
    """``--hit-threshold-tokens`` (a provider's ``hit_threshold_tokens``) declares the shared
    part: set above the whole prompt, no cached token is the run's own, so no hit."""
    common = ["--base-url", sim_url, "--model", "sim-cache-template", "--probe", "basic", "--json"]
    proc = await _cli(*common, "--hit-threshold-tokens", "1000000")
    assert proc.returncode == 1, proc.stderr.decode()
    (result,) = json.loads(proc.stdout)["probes"]
    assert result["baseline_tokens"] == 1_000_000
    assert result["caching_works"] is False
    assert result["pollution"] is False
    warm = [r for r in result["requests"] if not r["cold"]]
    assert warm
    assert all(r["cached_tokens"] > 0 and r["hit"] is False for r in warm)


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
        (
            ["--base-url", "http://127.0.0.1:1", "--model", "m", "--hit-threshold-tokens", "0"],
            "error: --hit-threshold-tokens: must be at least 1",
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


# -- live progress ----------------------------------------------------------------------------


def _rows(lines: list[str]) -> list[str]:
    """The request labels of the evidence rows among ``lines``, in order."""
    return [
        re.split(r"\s{2,}", line.strip(), maxsplit=2)[1]
        for line in lines
        if re.match(r"\s+\d+\s{2}\S", line)
    ]


def _probe_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.Popen(
        [sys.executable, "-m", "exporter", "probe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**base, "PCE_API_KEY": "sk-sim", **(env or {})},
    )


@pytest.fixture
def sim_process() -> Iterator[SimProcess]:
    with simulator() as handle:
        yield handle


def test_ttl_rows_show_while_the_probe_still_waits(sim_process: SimProcess, tmp_path: Path) -> None:
    proc = _probe_process(
        "--base-url", sim_process.base_url, "--model", "sim-cache-ok", "--probe", "ttl",
        "--ttl-delays", "1s,8s", "--evidence-dir", str(tmp_path),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        out = Lines(proc.stdout)
        early = list(out.until("waiting"))
        # Both primes and the 1 s repeat are on screen, the 8 s repeat is not sent yet, and
        # the line says what the probe waits for and how long.
        assert proc.poll() is None
        assert _rows(early) == ["prime for 1s", "prime for 8s", "repeat after 1s"]
        waiting = early[-1].strip()
        assert re.fullmatch(
            r"waiting \d\.\ds for the repeat after 8s \(ttl: is its prime still cached\?\)",
            waiting,
        ), waiting
        lines = out.rest()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _rows(lines) == ["prime for 1s", "prime for 8s", "repeat after 1s", "repeat after 8s"]
    text = "".join(lines)
    assert "ttl: works" in text
    assert "after 8s: hit" in text


def test_json_progress_goes_to_stderr(sim_process: SimProcess) -> None:
    proc = _probe_process(
        "--base-url", sim_process.base_url, "--model", "sim-cache-ok", "--probe", "ttl",
        "--ttl-delays", "100ms,2s", "--json",
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    payload = json.loads(out)  # stdout is the one JSON object, nothing else
    assert [p["probe"] for p in payload["probes"]] == ["ttl"]
    lines = err.splitlines()
    assert _rows(lines) == [
        "prime for 0.1s",
        "prime for 2s",
        "repeat after 0.1s",
        "repeat after 2s",
    ]
    assert any(re.fullmatch(r"\s+waiting 1\.\ds for the repeat after 2s .*", ln) for ln in lines)
    assert any(line.startswith("ttl: works") for line in lines)


def test_waits_count_down_on_a_terminal(sim_process: SimProcess, tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    base = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "probe", "--base-url", sim_process.base_url,
         "--model", "sim-cache-ok", "--probe", "ttl", "--ttl-delays", "2500ms",
         "--evidence-dir", str(tmp_path)],
        stdout=follower, stderr=subprocess.DEVNULL, env={**base, "PCE_API_KEY": "sk-sim"},
    )  # fmt: skip
    os.close(follower)
    screen = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        assert proc.wait(30) == 0
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = screen.decode()
    counts = re.findall(r"\r\x1b\[K  waiting (\d)s for the repeat after 2.5s", text)
    assert counts == ["3", "2", "1"], text
    # The countdown is erased before the next row, so the table stays clean.
    assert "\r\x1b[K   2  repeat after 2.5s" in text.replace("\r\n", "\n")


def test_retry_waits_say_why(sim_process: SimProcess, tmp_path: Path) -> None:
    # sim-error fails every request (500): our own backoff before each retry.
    proc = _probe_process(
        "--base-url", sim_process.base_url, "--model", "sim-error", "--attempts", "2",
        "--backoff", "1s", "--backoff-max", "1s", "--json",
    )  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert "  waiting 1.0s for backoff, then retrying the failed request" in err.splitlines()
    # A 429 with Retry-After: the server's wait, not ours (backoff would be 10 ms here).
    sim_toml = tmp_path / "sim.toml"
    sim_toml.write_text('[[models]]\nname = "sim-every-2nd"\nratelimit_period = 2\n')
    with simulator("--config", str(sim_toml)) as limited:
        proc = _probe_process(
            "--base-url", limited.base_url, "--model", "sim-every-2nd", "--json",
            "--backoff", "10ms", "--backoff-max", "20ms",
        )  # fmt: skip
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    waits = [line for line in err.splitlines() if "waiting" in line]
    assert (
        waits == ["  waiting 1.0s for the server's Retry-After (rate limited), then retrying"] * 2
    )
    assert json.loads(out)["probes"][0]["verdict"] == "works"


def test_missing_key_is_one_warning_line() -> None:
    base = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    cases = {
        ("--provider-type", "openai"): "warning: PCE_API_KEY is not set: requests go without an "
        "API key (right for local servers)",
        ("--provider-type", "venice"): "warning: none of PCE_API_KEY, VENICE_API_KEY is set: "
        "requests go without an API key",
    }
    for option, expected in cases.items():
        proc = subprocess.run(
            [sys.executable, "-m", "exporter", "probe", *option, "--base-url",
             "http://127.0.0.1:9/v1", "--model", "m", "--attempts", "1", "--json"],
            capture_output=True, text=True, env=base, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 3  # nothing listens on port 9: no verdict
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
        assert warnings == [expected]


def test_help_names_openai_key_only_for_its_host() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "exporter", "probe", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "OPENAI_API_KEY for api.openai.com" in text
    assert "other hosts get no key unless PCE_API_KEY is set" in text
    assert "(OPENAI_API_KEY, VENICE_API_KEY" not in text


def test_default_evidence_dirs_keep_the_last_ten_runs(
    sim_process: SimProcess, tmp_path: Path
) -> None:
    home = tmp_path / "prompt-cache-exporter" / "probe"
    old = [home / f"20200101-0000{i:02d}-x" for i in range(12)]
    for path in old:
        path.mkdir(parents=True)
        (path / "01-basic-prime.json").write_text("{}")
    unrelated = home / "keep-me"
    unrelated.mkdir()
    proc = _probe_process(
        "--base-url", sim_process.base_url, "--model", "sim-cache-ok",
        env={"XDG_CACHE_HOME": str(tmp_path)},
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    match = re.search(r"request bodies in (\S+);", out)
    assert match, out
    current = Path(match[1])
    assert current.parent == home
    assert sorted(current.glob("*.json"))
    runs = sorted(p for p in home.iterdir() if p != unrelated)
    assert len(runs) == 10
    assert runs[-1] == current
    assert runs[:-1] == old[-9:]  # the oldest went first
    assert unrelated.is_dir()  # only directories named like runs are removed


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
    report = reports.ProbeReport(
        info=reports.ReportInfo(generated_at=0.0),
        provider_type="openai",
        base_url=adapter.base_url,
        model="m",
        exit_status=0,
        results=results,
    )
    text = reports.render_probe("text", report)
    first, second = text.split("\n== basic ==\n")[1:]
    assert "baseline: 8 cached tokens every prompt shares" in first
    repeat = results[0].requests[1]
    assert repeat.run_cached_tokens is not None
    assert re.search(rf"repeat .* {repeat.cached_tokens}\s+{repeat.run_cached_tokens}\s", first)
    assert "no faster" not in first
    # A "hit" that saved no prefill time: shown, and the verdict still says works.
    assert "\nbasic: works" in second
    assert "1 hit(s) no faster than the cold request before them" in second
    assert re.search(r"repeat .* hit, no faster than cold", second)
    # Live, the same rows (own column and TTFT flag included) and findings appear as each
    # request and each probe completes.
    live = io.StringIO()
    progress = Progress(live, clock=SystemClock())
    progress.line(text_report.probe_target("openai", adapter.base_url, "m"))
    for result in results:
        progress.start_probe(result.probe)
        for record in result.requests:
            progress.request_done(record)
        progress.probe_done(result)
    assert live.getvalue() == text
