"""The exporter as a real process against a simulator process (loopback only):

* cycle time: 50 models, every request 200 ms, basic probe (2 requests per model) at
  concurrency 1 and 4, against the ideal requests × latency ÷ concurrency (target <= 1.15 ×);
* resident memory of the exporter holding 500 models after every probe has run once for each,
  scraped every 15 s meanwhile as by Prometheus (target <= 60 MB, peak <= 70 MB), from
  /proc/<pid>/status, beside the same process before it knew any model (its floor).

Bounded: each phase waits at most --timeout seconds.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.procstatus import rss_mb
from tests.exporter_process import ExporterProcess, config_text, probes_toml, value, wait_for
from tests.simulator_process import simulator

BASIC_ONLY = probes_toml(basic="1h/5m")

ALL_PROBES = probes_toml(
    basic="1h/5m",
    prompt_sizes="1h/5m;sizes = { small = 1100, medium = 2000 }",
    partial="1h/5m",
    persistence="1h/5m;requests = 4",
    ttl='1h/5m;delays = ["100ms", "200ms"]',
)


def sim_models(path: Path, count: int, latency: float) -> Path:
    lines = ["default_models = false"]
    lines.extend(
        f'[[models]]\nname = "m{i:04d}"\nbase_latency = {latency}\n'
        "prefill_seconds_per_token = 0.0\noutput_token_seconds = 0.0\noutput_tokens = 1\n"
        for i in range(count)
    )
    path.write_text("\n".join(lines))
    return path


def provider(base_url: str, concurrency: int) -> str:
    return f"""
[[providers]]
name = "bench"
type = "openai"
base_url = "{base_url}"
api_key_env = "BENCH_KEY"
include = ["m*"]
max_models = 1000
concurrency = {concurrency}
isolation_delay = "0s"
max_tokens = 1
"""


def cycle(tmp: Path, concurrency: int, timeout: float) -> tuple[float, float]:
    models, latency = 50, 0.2
    sim_cfg = sim_models(tmp / f"sim-cycle-{concurrency}.toml", models, latency)
    with simulator("--config", str(sim_cfg), "--latency-scale", "1") as sim:
        base_url = sim.base_url
        cfg = tmp / f"cycle-{concurrency}.toml"
        cfg.write_text(
            config_text(
                sim_url=base_url,
                db_path=tmp / f"cycle-{concurrency}.db",
                providers=provider(base_url, concurrency),
                probes=BASIC_ONLY,
            )
        )
        exporter = ExporterProcess(cfg).start()
        try:
            done = wait_for(
                lambda: (
                    (
                        value(
                            exporter.scrape(),
                            "llmcache_scheduler_cycle_duration_seconds_count",
                            provider="bench",
                        )
                        or 0
                    )
                    >= 1
                ),
                timeout,
            )
            if not done:
                sys.exit(f"cycle at concurrency {concurrency} did not finish in {timeout}s")
            measured = value(
                exporter.scrape(), "llmcache_scheduler_cycle_duration_seconds_sum", provider="bench"
            )
        finally:
            exporter.kill()
    ideal = models * 2 * latency / concurrency
    assert measured is not None
    return measured, ideal


def _runs(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM probe_runs").fetchone()[0])
    except sqlite3.Error:
        return 0


def memory(tmp: Path, timeout: float) -> tuple[float, float, float, int]:
    models = 500
    sim_cfg = sim_models(tmp / "sim-memory.toml", models, 0.0)
    with simulator("--config", str(sim_cfg)) as sim:
        base_url = sim.base_url
        cfg = tmp / "memory.toml"
        cfg.write_text(
            config_text(
                sim_url=base_url,
                db_path=tmp / "memory.db",
                providers=provider(base_url, 16),
                probes=ALL_PROBES,
            )
        )
        exporter = ExporterProcess(cfg).start()
        assert exporter.proc is not None
        # Serving, before the models list is read: the interpreter and its libraries.
        floor, _ = rss_mb(exporter.proc.pid)
        try:
            # Prometheus scrapes every 15 s while the exporter probes all 500 models once.
            stop = threading.Event()

            def scraper() -> None:
                while not stop.wait(15.0):
                    exporter.scrape()

            thread = threading.Thread(target=scraper, daemon=True)
            thread.start()
            if not wait_for(lambda: _runs(tmp / "memory.db") >= models * 5, timeout, 1.0):
                sys.exit(f"500 models were not all probed within {timeout}s")
            stop.set()
            thread.join()
            for _ in range(3):  # then a few scrapes of the complete state
                series = len(exporter.scrape())
                time.sleep(1.0)
            rss, hwm = rss_mb(exporter.proc.pid)
        finally:
            exporter.kill()
    return rss, hwm, floor, series


def main(timeout: float, phases: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="pce-bench-") as directory:
        tmp = Path(directory)
        for concurrency in (1, 4) if "cycle" in phases else ():
            measured, ideal = cycle(tmp, concurrency, timeout)
            print(
                f"cycle, 50 models, 200 ms, concurrency {concurrency}: {measured:6.2f} s, "
                f"ideal {ideal:5.2f} s, ratio {measured / ideal:.3f} (target <= 1.15)"
            )
        if "memory" not in phases:
            return
        rss, hwm, floor, series = memory(tmp, timeout)
        print(
            f"memory, 500 models × 5 probes: RSS {rss:.1f} MB (peak {hwm:.1f} MB), "
            f"{series} series (target <= 60 MB, peak <= 70 MB); floor: {floor:.1f} MB "
            "serving before any model is known"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--phase",
        action="append",
        choices=["cycle", "memory"],
        help="run only this phase (repeatable; default: both)",
    )
    args = parser.parse_args()
    main(args.timeout, args.phase or ["cycle", "memory"])
