"""Serve the simulator on a real socket, in the caller's event loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette

from exporter.asgi import BoundAddress, serve_asgi
from exporter.clock import Clock
from exporter.simulator.app import create_app
from exporter.simulator.config import SimConfig
from exporter.simulator.state import SimState


@dataclass(frozen=True, slots=True)
class SimulatorHandle:
    address: BoundAddress
    app: Starlette
    state: SimState  # direct access to stats, log, caches and balances for in-process tests

    @property
    def url(self) -> str:
        """The root URL, e.g. ``http://127.0.0.1:8089``."""
        return self.address.url

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, e.g. ``http://127.0.0.1:8089/v1``."""
        return self.address.url + "/v1"


@contextlib.asynccontextmanager
async def serve_simulator(
    config: SimConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Clock | None = None,
) -> AsyncIterator[SimulatorHandle]:
    """Run the simulator until the context exits; port 0 picks a free port."""
    app = create_app(config, clock)
    # Open streams (a slow fault, a huge body) must not hold up shutdown for long.
    async with serve_asgi(app, host=host, port=port, graceful_timeout=1.0) as address:
        yield SimulatorHandle(address, app, app.state.sim)
