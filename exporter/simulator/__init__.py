"""A local HTTP upstream that emulates a caching LLM API, for demos and integration tests.

It is a SIMULATOR, never a real provider: it says so in a start-up banner, in an
``x-simulator`` header on every response, in ``owned_by: "simulator"`` model listings and
on its landing page. See docs/simulator.md.
"""

from exporter.simulator.app import create_app
from exporter.simulator.config import SimConfig, SimConfigError, load_sim_config
from exporter.simulator.models import DEFAULT_MODELS, DIEM_PER_USD, FAULT_MODELS, SimModel
from exporter.simulator.server import SimulatorHandle, serve_simulator
from exporter.simulator.tokens import chat_token_count, chat_tokens, count_tokens

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
