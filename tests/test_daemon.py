"""The `run` command's lifecycle as an operator sees it: bad config, secrets, reload,
shutdown with requests in flight. A real exporter process against a real simulator."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest

from tests.exporter_process import (
    ExporterProcess,
    config_text,
    parse,
    probes_toml,
    value,
    wait_for,
)
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
        line = _one_line_exit_2(command, path)
        assert line.startswith("error: server.listen: invalid listen address")


def _one_line_exit_2(command: str, path: Path) -> str:
    """Run ``command`` on ``path``; it must exit 2 with exactly one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "exporter", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, (command, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_the_key_never_reaches_logs_metrics_api_or_database(
    sim: SimProcess, tmp_path: Path
) -> None:
    exporter = _start(_write(tmp_path, sim))
    try:
        assert exporter.wait_for_verdict("sim-cache-ok"), exporter.log()
        texts = [
            httpx.get(exporter.url + "/metrics").text,
            httpx.get(exporter.url + "/api/runs?limit=100", timeout=30).text,
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


def test_a_usd_budget_that_cannot_be_priced_is_refused_by_check_config_and_run() -> None:
    fixture = Path(__file__).parent / "fixtures" / "config" / "invalid-usd-budget-unpriced.toml"
    for command in ("check-config", "run"):
        assert _one_line_exit_2(command, fixture).startswith(
            "error: providers[0].budget.daily_usd: cannot be enforced without a price for model "
            '"sim-cache-broken": add [providers.prices."sim-cache-broken"]'
        )


def test_reload_errors_name_keys_not_values_and_restart_settings_say_so(
    sim: SimProcess, tmp_path: Path
) -> None:
    path = _write(tmp_path, sim)
    exporter = _start(path)
    try:
        good = path.read_text()
        path.write_text(good.replace('listen = "127.0.0.1:0"', 'listen = "bogus-host-4242"'))
        response = httpx.post(exporter.url + "/-/reload", timeout=30)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error.startswith('server.listen: invalid listen address "…"'), error
        assert "bogus-host-4242" not in response.text  # the value stays in the log only
        assert "bogus-host-4242" in exporter.log()
        # Settings read once at start are not ignored silently: the reload says so.
        web = tmp_path / "web.yml"
        web.write_text("basic_auth_users: {}\n")
        moved = good.replace(str(tmp_path / "db.sqlite"), str(tmp_path / "elsewhere.sqlite"))
        moved = moved.replace("[server]", f'[server]\nweb_config_file = "{web}"')
        path.write_text(moved)
        response = httpx.post(exporter.url + "/-/reload", timeout=30)
        assert response.status_code == 200, response.text
        warning = response.json()["warning"]
        assert "server.web_config_file, storage.path changed" in warning
        assert "after a restart" in warning
        assert "takes effect only after a restart" in exporter.log()
        # A file too large to be a configuration is refused before it is parsed.
        path.write_text(good + "# " + "x" * (2 * 1024 * 1024) + "\n")
        response = httpx.post(exporter.url + "/-/reload", timeout=30)
        assert response.status_code == 500
        assert "is larger than 1024 KiB" in response.json()["error"]
        assert exporter.terminate() == 0
    finally:
        exporter.kill()


RELOAD_SIM_MODELS = """
[[models]]
name = "sim-slow-b"
fault = "slow"
slow_seconds = 1.5
"""
STAY = """
[[providers]]
name = "stay"
type = "openai"
base_url = "{url}"
api_key_env = "SIM_API_KEY"
include = ["sim-cache-ok"]
isolation_delay = "0s"
"""
GONE = """
[[providers]]
name = "gone"
type = "openai"
base_url = "{url}"
api_key_env = "SIM_API_KEY"
include = ["sim-slow-b"]
isolation_delay = "{delay}"
max_tokens = {max_tokens}
[providers.budget]
daily_tokens = 30000
"""


def test_overlapping_reloads_then_removal_leave_no_orphan_spending(tmp_path: Path) -> None:
    """Issue 8 item 3: a change mid-probe, two more back to back, then a config without the
    provider: nothing more reaches the upstream for it, its series go, /readyz stops
    counting it, and the budget in force is never exceeded."""
    sim_config = tmp_path / "sim.toml"
    sim_config.write_text(RELOAD_SIM_MODELS)
    with simulator("--config", str(sim_config), "--latency-scale", "1") as sim:
        probes = probes_toml(basic="4s/3500ms")

        def write(*, gone: bool, delay: str = "0s", max_tokens: int = 8) -> None:
            providers = STAY + (
                GONE.format(url="{url}", delay=delay, max_tokens=max_tokens) if gone else ""
            )
            text = _write(tmp_path, sim, providers=providers, probes=probes).read_text()
            (tmp_path / "config.toml").write_text(
                text.replace("[scheduler]", '[scheduler]\nshutdown_grace = "2s"')
            )

        write(gone=True)
        exporter = _start(tmp_path / "config.toml")
        try:

            def gone_requests() -> int:
                return int(sim.stats()["models"].get("sim-slow-b", {}).get("requests", 0))

            assert wait_for(lambda: gone_requests() >= 1, 30), exporter.log()
            # A request of "gone" is now in flight (each takes 1.5 s): reload a change, then
            # two more back to back, then remove the provider.
            for delay, max_tokens in (("1s", 8), ("2s", 9), ("3s", 10)):
                write(gone=True, delay=delay, max_tokens=max_tokens)
                assert httpx.post(exporter.url + "/-/reload", timeout=30).status_code == 200
            write(gone=False)
            assert httpx.post(exporter.url + "/-/reload", timeout=30).status_code == 200
            removed_requests = gone_requests()
            removed_tokens = _billed(sim, "sim-slow-b")
            samples = exporter.scrape()
            assert not [k for k in samples if dict(k[1]).get("provider") == "gone"]
            ready = httpx.get(exporter.url + "/readyz").json()
            assert ready["checks"]["scheduler"]["detail"] == "1 provider workers", ready
            time.sleep(2.0 + 1.0)  # the grace, and a margin
            after_grace = _billed(sim, "sim-slow-b")
            time.sleep(10.0)  # more than two intervals of the removed provider
            assert gone_requests() == removed_requests  # nothing was sent after the removal
            assert _billed(sim, "sim-slow-b") == after_grace == removed_tokens
            assert value(exporter.scrape(), "llmcache_models", provider="stay") == 1
            assert exporter.terminate(timeout=10) == 0
        finally:
            exporter.kill()
        with sqlite3.connect(tmp_path / "db.sqlite") as conn:
            (reserved,) = conn.execute(
                "SELECT COALESCE(SUM(COALESCE(actual_tokens, reserved_tokens)), 0) "
                "FROM budget_ledger WHERE provider = 'gone'"
            ).fetchone()
        assert _billed(sim, "sim-slow-b") <= reserved <= 30000


def _billed(sim: SimProcess, model: str) -> int:
    stats = sim.stats()["models"].get(model, {})
    return int(stats.get("prompt_tokens", 0)) + int(stats.get("completion_tokens", 0))


def test_web_config_at_start_and_on_reload(sim: SimProcess, tmp_path: Path) -> None:
    # The web config machinery loads only for a configured file (exporter/daemon.py): its
    # errors still read as configuration errors, at start-up and on reload.
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  alice: not-a-hash\n")
    path = _write(tmp_path, sim)
    path.write_text(path.read_text().replace("[server]", f'[server]\nweb_config_file = "{web}"'))
    line = _one_line_exit_2("run", path)
    assert line.startswith(f"error: web config file {web}: basic_auth_users.alice:"), line
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    web.write_text(f"basic_auth_users:\n  alice: '{hashed}'\n")
    exporter = _start(path)
    try:
        assert httpx.get(exporter.url + "/metrics", timeout=30).status_code == 401
        auth = ("alice", "s3cret")
        assert httpx.get(exporter.url + "/metrics", auth=auth, timeout=30).status_code == 200
        web.write_text("basic_auth_users: [alice]\n")
        response = httpx.post(exporter.url + "/-/reload", auth=auth, timeout=30)
        assert response.status_code == 500, response.text
        assert response.json()["error"].startswith(f"web config file {web}: basic_auth_users")
        assert "configuration reload failed" in exporter.log()
        # Until the file is fixed the server refuses requests (docs/http.md), then serves again.
        assert httpx.get(exporter.url + "/metrics", auth=auth, timeout=30).status_code == 500
        web.write_text(f"basic_auth_users:\n  alice: '{hashed}'\n")

        def serving() -> bool:
            return httpx.get(exporter.url + "/metrics", auth=auth, timeout=30).status_code == 200

        assert wait_for(serving, 30)  # the file is checked once a second
        response = httpx.post(exporter.url + "/-/reload", auth=auth, timeout=30)
        assert response.status_code == 200, response.text
        metrics = httpx.get(exporter.url + "/metrics", auth=auth, timeout=30).text
        assert value(parse(metrics), "llmcache_config_last_reload_successful") == 1
        assert exporter.terminate() == 0
    finally:
        exporter.kill()
