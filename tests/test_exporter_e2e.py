"""The exporter as a real process against the simulator: the whole metric catalogue, restore
after restart, SIGKILL crash safety of the budget and the history, and SQLite faults.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from exporter import tracecontext
from tests.exporter_process import (
    ExporterProcess,
    config_text,
    probes_toml,
    sim_provider,
    value,
    wait_for,
)
from tests.simulator_process import SimProcess, free_port, simulator

pytestmark = pytest.mark.slow

# SPEC §8: every family of the catalogue (as the text parser names them: counters without
# _total), plus the extras docs/metrics.md adds; a family whose series appear on first use
# is listed by its HELP and TYPE lines from start-up. llmcache_persistence_hit_ratio is
# llmcache_hit_ratio{probe="persistence"} (one home per figure, docs/metrics.md).
CATALOGUE = {
    "llmcache_caching_works",
    "llmcache_hit_ratio",
    "llmcache_ttl_hit",
    "llmcache_ttl_max_hit_delay_seconds",
    "llmcache_persistence_first_miss_index",
    "llmcache_last_time_to_first_token_seconds",
    "llmcache_provider_errors",
    "llmcache_probe_success",
    "llmcache_probe_last_run_timestamp_seconds",
    "llmcache_probe_interval_seconds",
    "llmcache_probe_runs",
    "llmcache_probe_duration_seconds",
    "llmcache_request_duration_seconds",
    "llmcache_time_to_first_token_seconds",
    "llmcache_prompt_tokens",
    "llmcache_cached_tokens",
    "llmcache_cache_write_tokens",
    "llmcache_completion_tokens",
    "llmcache_requests",
    "llmcache_warm_requests",
    "llmcache_warm_request_hits",
    "llmcache_cache_pollution",
    "llmcache_errors",
    "llmcache_spend_usd",
    "llmcache_savings_usd",
    "llmcache_balance",
    "llmcache_budget_limit",
    "llmcache_budget_used",
    "llmcache_budget_exhausted",
    "llmcache_budget_forecast",
    "llmcache_model_unpriced",
    "llmcache_reliability_score",
    "llmcache_consecutive_failures",
    "llmcache_model_cooldown",
    "llmcache_provider_paused",
    "llmcache_models",
    "llmcache_scheduler_cycle_duration_seconds",
    "llmcache_store_errors",
    "llmcache_cache_reporting_supported",
    "llmcache_ratelimit_remaining",
    "llmcache_price_info",
    "llmcache_config_last_reload_successful",
    "llmcache_config_last_reload_success_timestamp_seconds",
    "llmcache_exporter_build_info",
    "process_cpu_seconds",
    "process_resident_memory_bytes",
    "python_info",
}


@pytest.fixture
def sim() -> Iterator[SimProcess]:
    with simulator() as handle:
        yield handle


def start_exporter(tmp_path: Path, text: str, name: str = "config.toml") -> ExporterProcess:
    path = tmp_path / name
    path.write_text(text)
    return ExporterProcess(path).start()


def test_full_catalogue_with_values_that_match_each_model(sim: SimProcess, tmp_path: Path) -> None:
    exporter = start_exporter(
        tmp_path, config_text(sim_url=sim.base_url, db_path=tmp_path / "db.sqlite")
    )
    flaky = {"provider": "sim", "model": "sim-cache-flaky"}
    try:

        def ready() -> bool:
            s = exporter.scrape()
            return (
                value(s, "llmcache_model_cooldown", provider="sim", model="sim-error") == 1
                and value(
                    s,
                    "llmcache_ttl_hit",
                    provider="sim",
                    model="sim-cache-short-ttl",
                    delay_seconds="4",
                )
                is not None
                and value(s, "llmcache_hit_ratio", probe="persistence", size="", **flaky)
                is not None
                and value(
                    s,
                    "llmcache_caching_works",
                    provider="venice-sim",
                    model="sim-cache-ok",
                    probe="partial",
                )
                is not None
                and value(
                    s,
                    "llmcache_caching_works",
                    provider="sim",
                    model="sim-cache-evicting",
                    probe="persistence",
                )
                is not None
                # Under load a provider's basic run may come after its partial run.
                and all(
                    value(
                        s, "llmcache_caching_works", provider=p, model="sim-cache-ok", probe="basic"
                    )
                    is not None
                    for p in ("sim", "venice-sim")
                )
            )

        assert wait_for(ready, timeout=120), exporter.log()[-3000:]
        missing = CATALOGUE - exporter.families()
        assert not missing, missing
        s = exporter.scrape()

        def v(name: str, **labels: str) -> float | None:
            return value(s, name, **labels)

        for provider in ("sim", "venice-sim"):
            assert (
                v("llmcache_caching_works", provider=provider, model="sim-cache-ok", probe="basic")
                == 1
            )
        assert (
            v("llmcache_caching_works", provider="sim", model="sim-cache-broken", probe="basic")
            == 0
        )
        # Not reported is not "0 cached": no verdict, and the reporting gauge says why.
        assert (
            v("llmcache_caching_works", provider="sim", model="sim-no-cache-fields", probe="basic")
            is None
        )
        assert (
            v("llmcache_cache_reporting_supported", provider="sim", model="sim-no-cache-fields")
            == 0
        )
        assert v("llmcache_cache_reporting_supported", provider="sim", model="sim-cache-ok") == 1
        # sim-error: five failures, then cooldown.
        failures = v("llmcache_consecutive_failures", provider="sim", model="sim-error")
        assert failures is not None
        assert failures >= 5
        assert v("llmcache_probe_success", provider="sim", model="sim-error", probe="basic") == 0
        errors = v(
            "llmcache_errors_total", provider="sim", model="sim-error", error_type="api_error"
        )
        assert errors is not None
        assert errors >= 5
        assert (
            v(
                "llmcache_errors_total",
                provider="sim",
                model="sim-ratelimited",
                error_type="rate_limit",
            )
            or 0
        ) >= 1
        # TTL: the 3 s cache hits after 1 s, not after 4 s.
        assert (
            v("llmcache_ttl_hit", provider="sim", model="sim-cache-short-ttl", delay_seconds="1")
            == 1
        )
        assert (
            v("llmcache_ttl_hit", provider="sim", model="sim-cache-short-ttl", delay_seconds="4")
            == 0
        )
        assert (
            v("llmcache_ttl_max_hit_delay_seconds", provider="sim", model="sim-cache-short-ttl")
            == 1
        )
        ratio = v("llmcache_hit_ratio", probe="persistence", size="", **flaky)
        assert ratio is not None
        assert 0 <= ratio < 1
        # Tokens and money.
        cached = v("llmcache_cached_tokens_total", provider="sim", model="sim-cache-ok")
        prompt = v("llmcache_prompt_tokens_total", provider="sim", model="sim-cache-ok")
        assert cached
        assert prompt
        assert 0 < cached < prompt
        assert (v("llmcache_spend_usd_total", provider="sim", model="sim-cache-ok") or 0) > 0
        assert (v("llmcache_savings_usd_total", provider="sim", model="sim-cache-ok") or 0) > 0
        assert v("llmcache_cached_tokens_total", provider="sim", model="sim-cache-broken") == 0
        assert (
            v(
                "llmcache_price_info",
                provider="sim",
                model="sim-cache-ok",
                version=_price_version(s, "sim", "sim-cache-ok"),
                source="config",
            )
            == 1
        )
        assert _price_source(s, "venice-sim", "sim-cache-ok") == "provider"
        # Venice-style balance headers and the budget.
        assert v("llmcache_balance", provider="venice-sim", currency="usd") is not None
        assert (
            v("llmcache_budget_limit", provider="venice-sim", window="day", unit="tokens")
            == 5_000_000
        )
        assert (
            v("llmcache_budget_used", provider="venice-sim", window="day", unit="tokens") or 0
        ) > 0
        assert v("llmcache_budget_exhausted", provider="venice-sim") == 0
        assert v("llmcache_provider_paused", provider="sim", reason="balance") == 0
        assert v("llmcache_models", provider="sim") == 11
        # Servers that report the shared chat-template tokens as cached on every request:
        # judged on the run's own prompt, by every consumer (verdicts, SLO counters, the
        # cache label of the histograms, pollution).
        evicting = {"provider": "sim", "model": "sim-cache-evicting"}
        assert v("llmcache_caching_works", probe="basic", **evicting) == 0
        assert v("llmcache_caching_works", probe="persistence", **evicting) == 0
        for model in ("sim-cache-template", "sim-cache-blocks"):
            assert v("llmcache_caching_works", provider="sim", model=model, probe="basic") == 1
        assert (v("llmcache_warm_requests_total", **evicting) or 0) > 0
        assert v("llmcache_warm_request_hits_total", **evicting) == 0
        assert v("llmcache_hit_ratio", probe="persistence", size="", **evicting) == 0
        assert (v("llmcache_cached_tokens_total", **evicting) or 0) > 0  # the template, as billed
        # No polluted run: the counter has not appeared (it does with the first one).
        for model in ("sim-cache-evicting", "sim-cache-template"):
            assert v("llmcache_cache_pollution_total", provider="sim", model=model) is None
        # The model's own cold and warm TTFT, from its last basic run (streamed).
        cold = v("llmcache_last_time_to_first_token_seconds", request="cold", **evicting)
        warm = v("llmcache_last_time_to_first_token_seconds", request="warm", **evicting)
        assert cold is not None
        assert warm is not None
        # Per provider, every error type from start-up; the model's at its first error.
        assert (
            v("llmcache_provider_errors_total", provider="sim", error_type="api_error") or 0
        ) >= (errors)
        assert v("llmcache_provider_errors_total", provider="venice-sim", error_type="timeout") == 0
        assert v("llmcache_models", provider="venice-sim") == 2
        score = v("llmcache_reliability_score", provider="sim", model="sim-cache-ok")
        assert score is not None
        assert score > 90
        assert (v("llmcache_reliability_score", provider="sim", model="sim-error") or 0) == 0
        assert v("llmcache_config_last_reload_successful") == 1
        # OpenMetrics negotiation.
        response = httpx.get(
            exporter.url + "/metrics", headers={"Accept": "application/openmetrics-text"}
        )
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.rstrip().endswith("# EOF")
        assert exporter.terminate() == 0
        assert "stopped" in exporter.log()
    finally:
        exporter.kill()


def _price_labels(s: dict, provider: str, model: str) -> dict[str, str]:  # type: ignore[type-arg]
    for name, labels in s:
        d = dict(labels)
        if name == "llmcache_price_info" and d["provider"] == provider and d["model"] == model:
            return d
    raise AssertionError(f"no price info for {provider}/{model}")


def _price_version(s: dict, provider: str, model: str) -> str:  # type: ignore[type-arg]
    return _price_labels(s, provider, model)["version"]


def _price_source(s: dict, provider: str, model: str) -> str:  # type: ignore[type-arg]
    return _price_labels(s, provider, model)["source"]


BASIC_ONLY_SLOW = probes_toml(basic="1h/30s")


def test_restart_shows_restored_verdicts_before_any_new_probe(
    sim: SimProcess, tmp_path: Path
) -> None:
    db = tmp_path / "db.sqlite"
    providers = sim_provider(sim.base_url, 'include = ["sim-cache-ok", "sim-cache-broken"]')
    first = start_exporter(
        tmp_path,
        config_text(sim_url=sim.base_url, db_path=db, providers=providers, probes=BASIC_ONLY_SLOW),
    )
    try:
        # Both models, not just the one probed last: the snapshot below must be final.
        assert wait_for(
            lambda: all(
                value(
                    first.scrape(),
                    "llmcache_caching_works",
                    provider="sim",
                    model=model,
                    probe="basic",
                )
                is not None
                for model in ("sim-cache-ok", "sim-cache-broken")
            ),
            30,
        )
        before = first.scrape()
        assert first.terminate() == 0
    finally:
        first.kill()
    requests = sim.chat_requests()
    second = start_exporter(
        tmp_path,
        config_text(sim_url=sim.base_url, db_path=db, providers=providers, probes=BASIC_ONLY_SLOW),
        "second.toml",
    )
    try:
        restored = second.scrape()  # the very first scrape
        for model, works in (("sim-cache-ok", 1), ("sim-cache-broken", 0)):
            labels = {"provider": "sim", "model": model, "probe": "basic"}
            assert value(restored, "llmcache_caching_works", **labels) == works
            assert value(restored, "llmcache_probe_last_run_timestamp_seconds", **labels) == value(
                before, "llmcache_probe_last_run_timestamp_seconds", **labels
            )
            assert value(restored, "llmcache_hit_ratio", size="", **labels) == value(
                before, "llmcache_hit_ratio", size="", **labels
            )
        time.sleep(2)
        assert sim.chat_requests() == requests  # nothing was probed again: not due for 1 h
        assert second.terminate() == 0
    finally:
        second.kill()


def test_sigkill_never_overspends_and_loses_no_finished_run(
    sim: SimProcess, tmp_path: Path
) -> None:
    budget = 40_000
    db = tmp_path / "db.sqlite"
    providers = sim_provider(
        sim.base_url,
        'include = ["sim-cache-ok", "sim-cache-flaky", "sim-cache-broken"]',
        "concurrency = 3",
        f"[providers.budget]\ndaily_tokens = {budget}\nmonthly_tokens = {budget}",
    )
    probes = probes_toml(basic="1s/900ms", persistence="2s/1s;requests = 4")
    text = config_text(sim_url=sim.base_url, db_path=db, providers=providers, probes=probes)
    rng = random.Random(20261123)
    finished: set[str] = set()
    for iteration in range(20):
        exporter = start_exporter(tmp_path, text)
        time.sleep(rng.uniform(0.2, 1.5))
        exporter.kill()  # SIGKILL, whatever it was doing
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            now = {row[0] for row in conn.execute("SELECT run_id FROM probe_runs")}
        assert finished <= now, f"iteration {iteration}: finished runs lost"
        finished = now
        assert sim.billed_tokens() <= budget, f"iteration {iteration}: budget exceeded"
    # The budget was really reached: probes stopped for lack of room, not for lack of time.
    assert sim.billed_tokens() > budget * 0.6
    assert len(finished) > 10
    with sqlite3.connect(db) as conn:
        (reserved,) = conn.execute(
            "SELECT SUM(COALESCE(actual_tokens, reserved_tokens)) FROM budget_ledger"
        ).fetchone()
    assert sim.billed_tokens() <= reserved <= budget


def require_root(what: str) -> None:
    """CI runs as root, so there the test must run; a developer without root skips it."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} needs root, and CI runs as root")
    pytest.skip(f"{what} needs root (CI runs as root)")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs, so the test can fill it (disk full) and remount it read-only."""
    require_root("mounting a tmpfs")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _store_errors(exporter: ExporterProcess) -> float:
    s = exporter.scrape()
    return sum(v for (name, _), v in s.items() if name == "llmcache_store_errors_total")


def _runs(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM probe_runs").fetchone()[0])


ONE_MODEL_PROBES = probes_toml(basic="1s/900ms")


def _one_model_exporter(sim: SimProcess, db: Path) -> ExporterProcess:
    providers = sim_provider(sim.base_url, 'include = ["sim-cache-ok"]')
    # The config file goes beside the tmpfs, not on it: filling the disk must not touch it.
    return start_exporter(
        db.parent.parent if db.parent.name == "tmpfs" else db.parent,
        config_text(sim_url=sim.base_url, db_path=db, providers=providers, probes=ONE_MODEL_PROBES),
    )


def _wait_recovered(exporter: ExporterProcess, db: Path) -> None:
    runs = _runs(db)
    assert wait_for(lambda: _runs(db) > runs + 1, 30), exporter.log()[-2000:]
    ready = httpx.get(exporter.url + "/readyz").json()
    assert ready["checks"]["store"]["ok"], ready


def test_read_only_database_file_keeps_metrics_serving(sim: SimProcess, tmp_path: Path) -> None:
    require_root("setting the immutable attribute")
    db = tmp_path / "db.sqlite"
    exporter = _one_model_exporter(sim, db)
    files = [db, db.with_name(db.name + "-wal")]
    try:
        assert wait_for(lambda: _runs(db) >= 2, 30)
        errors = _store_errors(exporter)
        # Immutable: even root cannot write. (Not the -shm file: SQLite maps it, and a
        # write fault through a mapping is a SIGBUS, not an I/O error.)
        subprocess.run(["chattr", "+i", *map(str, files)], check=True)
        try:
            assert wait_for(lambda: _store_errors(exporter) > errors, 30)
            assert httpx.get(exporter.url + "/metrics").status_code == 200
            assert httpx.get(exporter.url + "/readyz").status_code == 503
        finally:
            subprocess.run(["chattr", "-i", *map(str, files)], check=True)
        _wait_recovered(exporter, db)
        assert exporter.terminate() == 0
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        subprocess.run(["chattr", "-i", *map(str, files)], check=False)
        exporter.kill()


def test_locked_and_full_database_keep_metrics_serving(sim: SimProcess, tmpfs: Path) -> None:
    db = tmpfs / "db.sqlite"
    exporter = _one_model_exporter(sim, db)
    try:
        assert wait_for(lambda: _runs(db) >= 2, 30)
        # 1. Locked: another connection holds the write lock past the busy timeout.
        errors = _store_errors(exporter)
        holder = sqlite3.connect(db, isolation_level=None, timeout=0)
        holder.execute("BEGIN EXCLUSIVE")
        assert wait_for(lambda: _store_errors(exporter) > errors, 30)
        assert httpx.get(exporter.url + "/metrics").status_code == 200
        holder.execute("ROLLBACK")
        holder.close()
        _wait_recovered(exporter, db)

        # 2. Disk full: fill the filesystem the database lives on.
        errors = _store_errors(exporter)
        filler = tmpfs / "filler"
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert wait_for(lambda: _store_errors(exporter) > errors, 30)
        assert httpx.get(exporter.url + "/metrics").status_code == 200
        assert httpx.get(exporter.url + "/readyz").status_code == 503
        filler.unlink()
        _wait_recovered(exporter, db)

        assert exporter.terminate() == 0
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert "could not be flushed" not in exporter.log()
    finally:
        exporter.kill()


def test_balances_persist_and_a_restart_with_the_upstream_down_stays_paused(
    tmp_path: Path,
) -> None:
    """SPEC §7: balances are stored and restored at start with the pause they imply, before
    any request (the upstream is down by then, so nothing new could be learnt)."""
    db = tmp_path / "db.sqlite"
    with simulator("--balance-diem", "0.0005", "--balance-usd", "0") as low:
        providers = f"""
[[providers]]
name = "ven"
type = "venice"
base_url = "{low.base_url}"
api_key_env = "SIM_API_KEY"
models = ["sim-cache-ok"]
isolation_delay = "0s"
balance_check_interval = "1h"
"""
        text = config_text(
            sim_url=low.base_url, db_path=db, providers=providers, probes=ONE_MODEL_PROBES
        )
        first = start_exporter(tmp_path, text)
        try:
            # The first responses report 0.0005 DIEM, below the 0.001 threshold: paused.
            assert wait_for(
                lambda: (
                    value(
                        first.scrape(), "llmcache_provider_paused", provider="ven", reason="balance"
                    )
                    == 1
                ),
                30,
            ), first.log()[-2000:]
            last = value(first.scrape(), "llmcache_balance", provider="ven", currency="diem")
            assert last is not None
            assert last < 0.001
            assert first.terminate() == 0
        finally:
            first.kill()
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute(
            "SELECT amount FROM balances WHERE provider = 'ven' AND currency = 'diem' "
            "ORDER BY at DESC, id DESC LIMIT 1"
        ).fetchone()
        runs_before = conn.execute("SELECT COUNT(*) FROM probe_runs").fetchone()[0]
    assert stored == last
    # The simulator is gone: restart against a dead upstream.
    second = start_exporter(tmp_path, text, "second.toml")
    try:
        s = second.scrape()  # the very first scrape
        assert value(s, "llmcache_balance", provider="ven", currency="diem") == last
        assert value(s, "llmcache_provider_paused", provider="ven", reason="balance") == 1
        time.sleep(3)  # several basic intervals: a paused provider is not probed
        assert (
            value(second.scrape(), "llmcache_provider_paused", provider="ven", reason="balance")
            == 1
        )
        assert second.terminate() == 0
    finally:
        second.kill()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM probe_runs").fetchone()[0] == runs_before
    assert "below the stop threshold" in second.log()


def test_every_request_carries_the_trace_of_its_run_in_api_runs(
    sim: SimProcess, tmp_path: Path
) -> None:
    """Issue 13: the simulator (a tracing gateway's stand-in on 127.0.0.1) logs the
    traceparent of every request the running exporter sent; each is valid W3C, its trace id
    is the one /api/runs shows for the run, its span id one of that run's requests, and
    /api/runs?trace_id= finds the run from the trace."""
    providers = sim_provider(
        sim.base_url, 'include = ["sim-cache-ok", "sim-cache-broken"]', "concurrency = 2"
    )
    probes = probes_toml(basic="1s/900ms", partial="2s/1500ms")
    exporter = start_exporter(
        tmp_path,
        config_text(
            sim_url=sim.base_url, db_path=tmp_path / "db.sqlite", providers=providers, probes=probes
        ),
    )

    def api_runs(**params: str) -> list[dict[str, Any]]:
        response = httpx.get(exporter.url + "/api/runs", params=params, timeout=10)
        response.raise_for_status()
        runs: list[dict[str, Any]] = response.json()["runs"]
        return runs

    try:
        assert wait_for(lambda: len(api_runs(limit="1000")) >= 8, 30), exporter.log()
        received = httpx.get(sim.url + "/sim/log", params={"limit": "10000"}, timeout=10).json()
        headers = [e["traceparent"] for e in received["entries"]]
        assert len(headers) >= 16
        parsed = [tracecontext.parse_traceparent(h or "") for h in headers]
        assert all(p is not None and p[2] == "01" for p in parsed), headers
        sent: dict[str, list[str]] = {}
        for p in parsed:
            assert p is not None
            sent.setdefault(p[0], []).append(p[1])
        # Runs still in flight when the log was read finish within their deadline; the bound
        # leaves room for a loaded machine, where they queue behind other tests' processes.
        assert wait_for(lambda: set(sent) <= {r["trace_id"] for r in api_runs(limit="1000")}, 30), (
            exporter.log()
        )
        runs = {r["trace_id"]: r for r in api_runs(limit="1000") if r["trace_id"] in sent}
        assert len(runs) == len(sent)  # one trace per run, none shared
        for trace_id, spans in sent.items():
            run = runs[trace_id]
            assert spans == [r["span_id"] for r in run["requests"]]
            assert [r["run_id"] for r in api_runs(trace_id=trace_id)] == [run["run_id"]]
        assert exporter.terminate() == 0
    finally:
        exporter.kill()


def test_an_outage_pauses_the_provider_and_it_resumes_when_the_upstream_is_back(
    tmp_path: Path,
) -> None:
    """Issue 13: the real exporter against a port nobody listens on (connection refused for
    every model): the provider is paused for the outage, with no model in cooldown; once the
    simulator starts on that port, a trial run succeeds and every model is probed again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    providers = sim_provider(url, 'models = ["sim-cache-ok", "sim-cache-broken"]')
    exporter = start_exporter(
        tmp_path,
        config_text(
            sim_url=url,
            db_path=tmp_path / "db.sqlite",
            providers=providers,
            probes=probes_toml(basic="1s/900ms"),
            extra='outage_retry = "2s"',
        ),
    )
    models = ("sim-cache-ok", "sim-cache-broken")

    def paused() -> float | None:
        return value(exporter.scrape(), "llmcache_provider_paused", provider="sim", reason="outage")

    def cooldowns(samples: dict[Any, float]) -> list[float | None]:
        return [value(samples, "llmcache_model_cooldown", provider="sim", model=m) for m in models]

    try:
        assert wait_for(lambda: paused() == 1, 20), exporter.log()
        samples = exporter.scrape()
        assert cooldowns(samples) == [0, 0]
        failures = [
            value(samples, "llmcache_consecutive_failures", provider="sim", model=m) for m in models
        ]
        assert sorted(failures) == [1, 2]  # the streak: m1, m2, m1; then the pause
        assert "provider outage: probing paused, one trial run every 2s" in exporter.log()
        time.sleep(3)  # a trial or two fail meanwhile: still paused, still no cooldown
        assert paused() == 1
        assert cooldowns(exporter.scrape()) == [0, 0]
        with simulator(port=port):
            assert wait_for(lambda: paused() == 0, 20), exporter.log()

            def verdicts() -> list[float | None]:
                s = exporter.scrape()
                return [
                    value(s, "llmcache_caching_works", provider="sim", model=m, probe="basic")
                    for m in models
                ]

            assert wait_for(lambda: verdicts() == [1, 0], 20), exporter.log()
            assert "outage over" in exporter.log()
            assert exporter.terminate() == 0
    finally:
        exporter.kill()
