"""Scheduling under trouble, as a user sees it: the exporter as a real process against a
simulator process (loopback only), figures from the simulator's own counters and /api/runs.

* slow model: three fast models and one whose every request takes 3 s, concurrency 2,
  basic, partial and persistence every 5 s: how often do the fast models' basic runs start?
  (target: every ~5 s, the interval; a cycle-based scheduler waits for the slow model.)
* reload orphans: a provider's request in flight, three reloads that change it back to back,
  then a reload without it: how many requests and tokens reach the upstream for it after
  the removal (target: 0 after the grace).

Uses only the command line and HTTP, so it measures any checkout: run it from the checkout's
root (``python -m benchmarks.scheduling``). Bounded: each phase runs for a fixed time.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.exporter_process import ExporterProcess, config_text, probes_toml, sim_provider, wait_for
from tests.simulator_process import SimProcess, simulator

FAST = ("sim-cache-ok", "sim-cache-broken", "sim-cache-flaky")


def slow_model(tmp: Path, seconds: float) -> dict[str, tuple[float, int]]:
    sim_cfg = tmp / "sim-slow.toml"
    sim_cfg.write_text('[[models]]\nname = "sim-slow"\nfault = "slow"\nslow_seconds = 3\n')
    with simulator("--config", str(sim_cfg)) as sim:
        models = ", ".join(f'"{m}"' for m in (*FAST, "sim-slow"))
        providers = sim_provider(
            sim.base_url, f"include = [{models}]", "concurrency = 2", isolation_delay="200ms"
        )
        probes = probes_toml(basic="5s/4s", partial="5s/4s", persistence="5s/4s;requests = 3")
        cfg = tmp / "slow.toml"
        cfg.write_text(
            config_text(
                sim_url=sim.base_url, db_path=tmp / "slow.db", providers=providers, probes=probes
            )
        )
        exporter = ExporterProcess(cfg).start()
        try:
            time.sleep(seconds)
            runs = httpx.get(
                exporter.url + "/api/runs", params={"probe": "basic", "limit": "1000"}, timeout=30
            ).json()["runs"]
        finally:
            exporter.kill()
    out: dict[str, tuple[float, int]] = {}
    for model in (*FAST, "sim-slow"):
        starts = sorted(r["started_at"] for r in runs if r["model"] == model)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        out[model] = (statistics.mean(gaps) if gaps else float("nan"), len(starts))
    return out


def _requests(sim: SimProcess, model: str) -> tuple[int, int]:
    stats = sim.stats()["models"].get(model, {})
    tokens = int(stats.get("prompt_tokens", 0)) + int(stats.get("completion_tokens", 0))
    return int(stats.get("requests", 0)), tokens


def reload_orphans(tmp: Path, seconds: float) -> tuple[int, int, int, int]:
    sim_cfg = tmp / "sim-orphan.toml"
    sim_cfg.write_text('[[models]]\nname = "sim-slow-b"\nfault = "slow"\nslow_seconds = 1.5\n')
    with simulator("--config", str(sim_cfg)) as sim:
        path = tmp / "orphan.toml"

        def write(gone: bool, delay: str = "0s", max_tokens: int = 8) -> None:
            providers = f"""
[[providers]]
name = "stay"
type = "openai"
base_url = "{sim.base_url}"
api_key_env = "SIM_API_KEY"
include = ["sim-cache-ok"]
isolation_delay = "0s"
"""
            if gone:
                providers += f"""
[[providers]]
name = "gone"
type = "openai"
base_url = "{sim.base_url}"
api_key_env = "SIM_API_KEY"
include = ["sim-slow-b"]
isolation_delay = "{delay}"
max_tokens = {max_tokens}
[providers.budget]
daily_tokens = 30000
"""
            text = config_text(
                sim_url=sim.base_url,
                db_path=tmp / "orphan.db",
                providers=providers,
                probes=probes_toml(basic="4s/3500ms"),
            )
            path.write_text(text.replace("[scheduler]", '[scheduler]\nshutdown_grace = "2s"'))

        write(True)
        exporter = ExporterProcess(path).start()
        try:
            if not wait_for(lambda: _requests(sim, "sim-slow-b")[0] >= 1, 30):
                raise SystemExit("the provider to remove never sent a request")
            for delay, max_tokens in (("1s", 8), ("2s", 9), ("3s", 10)):
                write(True, delay, max_tokens)
                httpx.post(exporter.url + "/-/reload", timeout=30)
            write(False)
            httpx.post(exporter.url + "/-/reload", timeout=30)
            at_removal = _requests(sim, "sim-slow-b")
            time.sleep(3.0)  # the grace and a margin
            after_grace = _requests(sim, "sim-slow-b")
            time.sleep(seconds)
            end = _requests(sim, "sim-slow-b")
        finally:
            exporter.kill()
    return (
        end[0] - at_removal[0],
        end[1] - at_removal[1],
        end[0] - after_grace[0],
        end[1] - after_grace[1],
    )


def main(seconds: float, phases: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="pce-bench-") as directory:
        tmp = Path(directory)
        if "slow" in phases:
            figures = slow_model(tmp, seconds)
            for model, (gap, count) in figures.items():
                print(
                    f"slow model, {model:17}: basic every {gap:5.1f} s on average "
                    f"({count} runs in {seconds:.0f} s; interval 5 s)"
                )
        if "orphans" in phases:
            requests, tokens, late_requests, late_tokens = reload_orphans(tmp, seconds)
            print(
                f"reload orphans: after the removal {requests} requests / {tokens} tokens "
                f"reached the upstream for the removed provider; after its 2 s grace "
                f"{late_requests} / {late_tokens} (over {seconds:.0f} s; target 0)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--phase", action="append", choices=["slow", "orphans"])
    args = parser.parse_args()
    main(args.seconds, args.phase or ["slow", "orphans"])
