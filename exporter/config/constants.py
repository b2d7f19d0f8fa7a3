"""Names and fixed tables the configuration is built around.

They sit apart from the models because loading (the ``PCE_`` prefix), error messages (which
variable set a key) and check-config (probe order) need them as much as the models do.

Facts about an API (where it lives, which variable conventionally holds its key) belong to
its adapter in ``exporter.providers``; the tables here are read-only views of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

from exporter.providers import ADAPTERS

ENV_PREFIX = "PCE_"
ENV_CONFIG_FILE = "PCE_CONFIG_FILE"

ProviderType = Literal["openai", "venice", "anthropic"]
PROVIDER_TYPES: tuple[str, ...] = tuple(ADAPTERS)
#: Base URL used when a provider of this type sets none (``openai`` has none: it must be set).
DEFAULT_BASE_URLS: Mapping[str, str] = MappingProxyType(
    {name: cls.default_base_url for name, cls in ADAPTERS.items() if cls.default_base_url}
)
#: Environment variable holding the API key when a provider sets no ``api_key_env``. The
#: ``openai`` type has none of its own: only a known host's variable (see the adapter).
DEFAULT_KEY_ENV: Mapping[str, str] = MappingProxyType(
    {name: cls.key_env_vars[0] for name, cls in ADAPTERS.items() if cls.key_env_vars}
)
_DEFAULT_CURRENCY: Mapping[str, str] = MappingProxyType({"venice": "diem"})

#: Probe kinds, in the order they are documented and reported. ``exporter.probes`` dispatches
#: on exactly these names (it reads them from here).
PROBE_NAMES: tuple[str, ...] = ("basic", "prompt_sizes", "partial", "persistence", "ttl")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
