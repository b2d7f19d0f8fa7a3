"""Does heavy /api/runs traffic slow the exporter's own measurements? (issue 8: 34 → 138 ms)

The exporter runs as a real process against a simulator process (loopback only), probing one
model with the basic probe every second; its history holds 1 000 runs. The warm (cache-hit)
time to first token it measures is taken from its own histogram, first with no HTTP load, then
while 4 clients fetch /api/runs?limit=1000 back to back. The simulator answers in a fixed
30 ms, so any rise is the exporter's own delay. Bounded: each phase waits at most --timeout s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.exporter_load import provider, sim_models
from exporter.clock import SystemClock
from exporter.results import ProbeResult, RequestRecord, Verdict
from exporter.store import Store
from tests.exporter_process import ExporterProcess, config_text, probes_toml, value
from tests.simulator_process import simulator

CLIENTS = 4
HISTORY = 1000
LATENCY = 0.03


async def fill_history(db: Path) -> None:
    """1 000 stored runs of ten requests each, as /api/runs?limit=1000 would return them."""
    now = time.time() - HISTORY
    async with await Store.open(db, clock=SystemClock()) as store:
        for i in range(HISTORY):
            requests = [
                RequestRecord(
                    label=f"request {n}",
                    cold=n == 0,
                    prompt_tokens=1100,
                    cached_tokens=0 if n == 0 else 1024,
                    completion_tokens=1,
                    latency_seconds=0.05,
                    ttft_seconds=0.03,
                    hit=n > 0,
                )
                for n in range(10)
            ]
            await store.record_run(
                ProbeResult(
                    probe="persistence",
                    provider="bench",
                    model="m0000",
                    run_id=f"old-{i}",
                    verdict=Verdict.WORKS,
                    started_at=now + i,
                    finished_at=now + i + 1,
                    duration_seconds=1.0,
                    hit_ratio=0.9,
                    requests=requests,
                )
            )


def direct_ttft(client: httpx.Client, sim_url: str) -> float:
    """TTFT of one streamed request sent straight to the simulator: the machine's own floor
    (on a loaded 2-core machine the simulator slows down too, whatever the exporter does)."""
    body = {
        "model": "m0000",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 1,
    }
    started = time.monotonic()
    with client.stream("POST", sim_url + "/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                "content"
            ):
                return time.monotonic() - started
    raise RuntimeError("the simulator streamed no content")


def warm_ttft(
    exporter: ExporterProcess, sim_url: str, samples: int, timeout: float
) -> tuple[float, float, int]:
    """Mean warm TTFT (seconds) over the next ``samples`` hits the exporter measures, and the
    mean direct TTFT measured meanwhile."""

    def read() -> tuple[float, float]:
        scraped = exporter.scrape()
        # One model (m0000): the provider's TTFT histogram is that model's.
        labels = {"provider": "bench", "cache": "hit"}
        total = value(scraped, "llmcache_time_to_first_token_seconds_sum", **labels) or 0.0
        count = value(scraped, "llmcache_time_to_first_token_seconds_count", **labels) or 0.0
        return total, count

    start_sum, start_count = read()
    direct: list[float] = []
    client = httpx.Client(timeout=30)
    direct_ttft(client, sim_url)  # opens the connection
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        direct.append(direct_ttft(client, sim_url))
        time.sleep(0.5)
        total, count = read()
        if count - start_count >= samples:
            n = count - start_count
            return (total - start_sum) / n, sum(direct) / len(direct), int(n)
    sys.exit(f"fewer than {samples} warm requests within {timeout}s")


def load(url: str, seconds: float) -> subprocess.Popen[bytes]:
    """One client fetching /api/runs back to back: curl in a shell loop, its own process, so
    that the load costs the exporter, not this script's interpreter, and stops by itself."""
    script = (
        f"end=$((SECONDS + {int(seconds)})); while [ $SECONDS -lt $end ]; do "
        f'curl -sf -o /dev/null "{url}/api/runs?limit={HISTORY}" || exit 1; printf .; done'
    )
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE)


def main(samples: int, timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="pce-bench-") as directory:
        tmp = Path(directory)
        db = tmp / "api-load.db"
        asyncio.run(fill_history(db))
        sim_cfg = sim_models(tmp / "sim.toml", 1, LATENCY)
        with simulator("--config", str(sim_cfg), "--latency-scale", "1") as sim:
            cfg = tmp / "api-load.toml"
            cfg.write_text(
                config_text(
                    sim_url=sim.base_url,
                    db_path=db,
                    providers=provider(sim.base_url, 1),
                    probes=probes_toml(basic="1s/900ms"),
                )
            )
            exporter = ExporterProcess(cfg).start()
            try:
                quiet, quiet_floor, quiet_n = warm_ttft(exporter, sim.base_url, samples, timeout)
                clients = [load(exporter.url, timeout) for _ in range(CLIENTS)]
                started = time.monotonic()
                try:
                    loaded, loaded_floor, loaded_n = warm_ttft(
                        exporter, sim.base_url, samples, timeout
                    )
                finally:
                    for client in clients:
                        client.kill()
                elapsed = time.monotonic() - started
                answered = sum(len(c.communicate()[0]) for c in clients)  # a dot per answer
            finally:
                exporter.kill()
    print(
        f"warm TTFT, no HTTP load: {quiet * 1000:6.1f} ms (mean of {quiet_n}); the same "
        f"model asked directly: {quiet_floor * 1000:.1f} ms (simulator: {LATENCY * 1000:.0f} ms)"
    )
    print(
        f"warm TTFT, {CLIENTS} clients on /api/runs?limit={HISTORY}: {loaded * 1000:6.1f} ms "
        f"(mean of {loaded_n}); asked directly: {loaded_floor * 1000:.1f} ms; "
        f"{answered / elapsed:.1f} answers/s"
    )
    excess_quiet, excess_loaded = quiet - quiet_floor, loaded - loaded_floor
    # The direct figure is the floor: on a 2-core machine the simulator and this script slow
    # down under the load too. What must not grow is the exporter's share above it.
    print(
        f"exporter's own share (its TTFT less the direct one): {excess_quiet * 1000:.1f} ms "
        f"quiet, {excess_loaded * 1000:.1f} ms loaded (before the fix: 5.2 and 214.9 ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20, help="warm requests per phase")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    main(args.samples, args.timeout)
