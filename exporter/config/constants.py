"""Names and fixed tables the configuration is built around.

They sit apart from the models because loading (the ``PCE_`` prefix), error messages (which
variable set a key) and check-config (probe order) need them as much as the models do.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

ENV_PREFIX = "PCE_"
ENV_CONFIG_FILE = "PCE_CONFIG_FILE"

ProviderType = Literal["openai", "venice", "anthropic"]
PROVIDER_TYPES: tuple[str, ...] = ("openai", "venice", "anthropic")
#: Base URL used when a provider of this type sets none (``openai`` has none: it must be set).
DEFAULT_BASE_URLS: Mapping[str, str] = MappingProxyType(
    {
        "venice": "https://api.venice.ai/api/v1",
        "anthropic": "https://api.anthropic.com/v1",
    }
)
#: Environment variable holding the API key when a provider sets no ``api_key_env``.
DEFAULT_KEY_ENV: Mapping[str, str] = MappingProxyType(
    {
        "openai": "OPENAI_API_KEY",
        "venice": "VENICE_API_KEY",
        "anthropic": "ANTHROPIC_API_KEY",
    }
)
_DEFAULT_CURRENCY: Mapping[str, str] = MappingProxyType({"venice": "diem"})

#: Probe kinds, in the order they are documented and reported.
PROBE_NAMES: tuple[str, ...] = ("basic", "prompt_sizes", "partial", "persistence", "ttl")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
