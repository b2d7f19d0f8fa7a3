"""The `run` command's lifecycle as an operator sees it: bad config, secrets, reload,
shutdown with requests in flight. A real exporter process against a real simulator."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.exporter_process import ExporterProcess, config_text, probes_toml, value, wait_for
from tests.simulator_process import SimProcess, simulator

pytestmark = pytest.mark.slow

SECRET = "sk-daemon-secret-9f8e7d6c5b4a"

ONE_PROVIDER = """
[[providers]]
name = "sim"
type = "openai"
base_url = "{url}"
api_key_env = "SIM_API_KEY"
include = ["sim-cache-ok"]
isolation_delay = "0s"
"""
BASIC_FAST = probes_toml(basic="1s/900ms")


@pytest.fixture
def sim() -> Iterator[SimProcess]:
    # The simulator demands the key, so a wrong or missing one would show.
    with simulator("--api-key-env", "SIM_KEY_FOR_TEST") as handle:
        yield handle


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_KEY_FOR_TEST", SECRET)
    monkeypatch.setenv("SIM_API_KEY", SECRET)


def _write(
    tmp_path: Path,
    sim: SimProcess,
    providers: str = ONE_PROVIDER,
    probes: str = BASIC_FAST,
    name: str = "config.toml",
) -> Path:
    path = tmp_path / name
    path.write_text(
        config_text(
            sim_url=sim.base_url,
            db_path=tmp_path / "db.sqlite",
            providers=providers.format(url=sim.base_url),
            probes=probes,
        )
    )
    return path


def _start(path: Path) -> ExporterProcess:
    exporter = ExporterProcess(path)
    # ExporterProcess drops PCE_* only; the key variables come from the environment.
    return exporter.start()


def test_invalid_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\nlisten = "nowhere"\n[[providers]]\nname = "x"\ntype = "openai"\n'
        'base_url = "http://127.0.0.1:1/v1"\napi_key_env = "X"\n'
    )
    for command in ("run", "check-config"):
        proc = subprocess.run(
            [sys.executable, "-m", "exporter", command, "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.strip().startswith("error: server.listen: invalid listen address")
        assert len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr


def test_the_key_never_reaches_logs_metrics_api_or_database(
    sim: SimProcess, tmp_path: Path
) -> None:
    exporter = _start(_write(tmp_path, sim))
    try:
        assert wait_for(
            lambda: (
                value(
                    exporter.scrape(),
                    "llmcache_caching_works",
                    provider="sim",
                    model="sim-cache-ok",
                    probe="basic",
                )
                == 1
            ),
            30,
        ), exporter.log()
        texts = [
            httpx.get(exporter.url + "/metrics").text,
            httpx.get(exporter.url + "/api/runs?limit=100").text,
            httpx.get(exporter.url + "/readyz").text,
            httpx.get(exporter.url + "/").text,
        ]
        assert exporter.terminate() == 0
        texts.append(exporter.log())
    finally:
        exporter.kill()
    for text in texts:
        assert SECRET not in text
    for path in tmp_path.glob("db.sqlite*"):
        assert SECRET.encode() not in path.read_bytes(), path


def test_reload_by_http_and_sighup(sim: SimProcess, tmp_path: Path) -> None:
    path = _write(tmp_path, sim)
    exporter = _start(path)
    try:
        assert wait_for(
            lambda: value(exporter.scrape(), "llmcache_models", provider="sim") == 1, 30
        )
        # A second provider appears after POST /-/reload.
        second = ONE_PROVIDER + ONE_PROVIDER.replace('name = "sim"', 'name = "sim2"')
        _write(tmp_path, sim, providers=second)
        response = httpx.post(exporter.url + "/-/reload", timeout=30)
        assert response.status_code == 200, response.text
        assert wait_for(
            lambda: value(exporter.scrape(), "llmcache_models", provider="sim2") == 1, 30
        )
        # A broken file is refused, the running configuration stays, the gauge says so.
        path.write_text(path.read_text() + "\nnonsense = [\n")
        response = httpx.post(exporter.url + "/-/reload", timeout=30)
        assert response.status_code == 500
        assert "invalid TOML" in response.json()["error"]
        samples = exporter.scrape()
        assert value(samples, "llmcache_config_last_reload_successful") == 0
        assert value(samples, "llmcache_models", provider="sim2") == 1
        # SIGHUP with the file fixed (back to one provider) applies it.
        _write(tmp_path, sim)
        assert exporter.proc is not None
        exporter.proc.send_signal(signal.SIGHUP)
        assert wait_for(
            lambda: value(exporter.scrape(), "llmcache_config_last_reload_successful") == 1, 30
        )
        assert wait_for(
            lambda: value(exporter.scrape(), "llmcache_models", provider="sim2") is None, 30
        )
        assert exporter.terminate() == 0
    finally:
        exporter.kill()


def test_sigterm_with_a_request_in_flight_exits_0_within_the_grace(tmp_path: Path) -> None:
    sim_config = tmp_path / "slow.toml"
    sim_config.write_text('[[models]]\nname = "sim-slow"\nfault = "slow"\nslow_seconds = 60\n')
    with simulator("--config", str(sim_config), "--latency-scale", "1") as slow_sim:
        providers = ONE_PROVIDER.replace('include = ["sim-cache-ok"]', 'include = ["sim-slow"]')
        probes = probes_toml(basic="2m/1m")
        path = _write(tmp_path, slow_sim, providers=providers, probes=probes)
        path.write_text(
            path.read_text().replace("[scheduler]", '[scheduler]\nshutdown_grace = "2s"')
        )
        exporter = _start(path)
        try:
            assert wait_for(
                lambda: (
                    slow_sim.stats()["totals"]["requests"] >= 0
                    and "sim-slow" in slow_sim.stats()["models"]
                ),
                30,
            )
            time.sleep(0.5)  # the probe's first request is now waiting on the slow upstream
            # The SPEC's bound: stopped within 10 s (TimeoutExpired otherwise).
            assert exporter.terminate(timeout=10) == 0
        finally:
            exporter.kill()
    log = exporter.log()
    assert "probes still running after 2s: cancelling them" in log
    assert "stopped" in log
