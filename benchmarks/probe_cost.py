"""Cost efficiency of the basic probe: prompt tokens it spends per run, relative to the
provider's minimum cacheable prompt length. The floor is 2 × (a prime and a repeat, each at
least the minimum); the target is at most 2.2 ×.

Runs against the simulator (in process, loopback) with models whose minimum is 1024, 2048
and 4096 tokens. The first run of a model is uncalibrated (the prompt generator has not yet
seen the provider's token counts); later runs use the calibration. Bounded: --runs per model.
"""

from __future__ import annotations

import argparse

import anyio
import httpx

from exporter.clock import FakeClock
from exporter.probes import ProbeContext, run_probe
from exporter.prompts import PromptFactory
from exporter.providers.openai import OpenAIAdapter
from exporter.simulator.config import SimConfig
from exporter.simulator.models import SimModel
from exporter.simulator.server import serve_simulator
from exporter.transport import Transport

MINIMUMS = (1024, 2048, 4096)


async def main(runs: int) -> None:
    models = tuple(SimModel(f"min-{m}", min_cacheable_tokens=m) for m in MINIMUMS)
    clock = FakeClock()
    worst = 0.0
    print(f"{'minimum':>8} {'run':>4} {'prompt tokens':>14} {'× minimum':>10}  verdict")
    async with (
        serve_simulator(SimConfig(models=models, latency_scale=0), clock=clock) as sim,
        httpx.AsyncClient(trust_env=False) as client,
    ):
        for minimum in MINIMUMS:
            adapter = OpenAIAdapter(
                base_url=sim.base_url, api_key=None, min_cacheable_tokens=minimum
            )
            prompts = PromptFactory(seed=7)
            for run in range(1, runs + 1):
                ctx = ProbeContext(
                    provider="sim",
                    model=f"min-{minimum}",
                    adapter=adapter,
                    transport=Transport(client, clock=clock),
                    prompts=prompts,
                    clock=clock,
                )
                result = await run_probe("basic", ctx)
                spent = sum(r.prompt_tokens or 0 for r in result.requests)
                ratio = spent / minimum
                worst = max(worst, ratio)
                print(f"{minimum:>8} {run:>4} {spent:>14} {ratio:>10.3f}  {result.verdict.value}")
    print(f"worst ratio: {worst:.3f} (floor 2.0, target <= 2.2)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    anyio.run(main, parser.parse_args().runs)
