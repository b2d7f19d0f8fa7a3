"""Shared fixtures: a real simulator on 127.0.0.1 and the pieces a probe runs with."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest

from exporter.clock import FakeClock
from exporter.probes import ProbeContext, ProbeSettings, run_probe
from exporter.prompts import PromptFactory
from exporter.providers import adapter_class
from exporter.results import ProbeResult
from exporter.simulator.config import SimConfig
from exporter.simulator.models import SimModel
from exporter.simulator.server import SimulatorHandle, serve_simulator
from exporter.transport import RetryPolicy, Transport

# Tiny backoffs: retries are exercised for real, without waiting seconds.
FAST_RETRIES = RetryPolicy(attempts=3, backoff=0.01, backoff_max=0.04, timeout=10.0)


@pytest.fixture(autouse=True)
def _user_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """probe and loadtest keep request bodies under the user's cache directory: a test's
    (and its child processes') go to a temporary one instead."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def anyio_backend() -> str:
    # aiosqlite and uvicorn are asyncio-only.
    return "asyncio"


@dataclass
class SimRig:
    """A simulator sharing a FakeClock with the probes: TTL waits are exact and instant."""

    sim: SimulatorHandle
    clock: FakeClock
    client: httpx.AsyncClient

    def context(
        self,
        model: str,
        *,
        provider_type: str = "openai",
        settings: ProbeSettings | None = None,
        policy: RetryPolicy = FAST_RETRIES,
        api_key: str | None = None,
        stream: bool = True,
        **adapter_options: object,
    ) -> ProbeContext:
        base_url = self.sim.base_url
        adapter = adapter_class(provider_type)(
            base_url=base_url, api_key=api_key, stream=stream, **adapter_options
        )
        return ProbeContext(
            provider="sim",
            model=model,
            adapter=adapter,
            transport=Transport(self.client, policy=policy, clock=self.clock),
            prompts=PromptFactory(seed=1),
            clock=self.clock,
            settings=settings or ProbeSettings(ttl_delays=(1.0, 5.0, 10.0, 30.0)),
        )

    async def probe(self, name: str, model: str, **kwargs: object) -> ProbeResult:
        return await run_probe(name, self.context(model, **kwargs))  # type: ignore[arg-type]


# Throttles deterministically (the default sim-ratelimited throttles a seeded third of its
# requests): chat requests 1-3 of every 4 get 429 with Retry-After: 1.
EVERY_4TH = SimModel("sim-every-4th", ratelimit_period=4, retry_after=1.0)


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_scale=0.0)


@contextlib.asynccontextmanager
async def open_rig(config: SimConfig) -> AsyncIterator[SimRig]:
    """A simulator with ``config`` on 127.0.0.1 and a client, sharing a fresh FakeClock."""
    clock = FakeClock()
    async with (
        serve_simulator(config, clock=clock) as sim,
        httpx.AsyncClient(trust_env=False) as client,
    ):
        yield SimRig(sim, clock, client)


@pytest.fixture
async def rig(sim_config: SimConfig) -> AsyncIterator[SimRig]:
    async with open_rig(sim_config) as rig:
        yield rig


RigFactory = Callable[[SimConfig], SimRig]
