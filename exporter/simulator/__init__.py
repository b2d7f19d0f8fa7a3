"""A local HTTP upstream that emulates a caching LLM API, for demos and integration tests.

It is a SIMULATOR, never a real provider: it says so in a start-up banner, in an
``x-simulator`` header on every response, in ``owned_by: "simulator"`` model listings and
on its landing page. See docs/simulator.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy: `prompt-cache-exporter run` builds the `simulate` sub-parser but must not load the
# simulator's server code; the names below import their module on first use.
_EXPORTS = {
    "create_app": "exporter.simulator.app",
    "SimConfig": "exporter.simulator.config",
    "SimConfigError": "exporter.simulator.config",
    "load_sim_config": "exporter.simulator.config",
    "DEFAULT_MODELS": "exporter.simulator.models",
    "DIEM_PER_USD": "exporter.simulator.models",
    "FAULT_MODELS": "exporter.simulator.models",
    "SimModel": "exporter.simulator.models",
    "SimulatorHandle": "exporter.simulator.server",
    "serve_simulator": "exporter.simulator.server",
    "chat_token_count": "exporter.simulator.tokens",
    "chat_tokens": "exporter.simulator.tokens",
    "count_tokens": "exporter.simulator.tokens",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'exporter.simulator' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DEFAULT_MODELS",
    "DIEM_PER_USD",
    "FAULT_MODELS",
    "SimConfig",
    "SimConfigError",
    "SimModel",
    "SimulatorHandle",
    "chat_token_count",
    "chat_tokens",
    "count_tokens",
    "create_app",
    "load_sim_config",
    "serve_simulator",
]
