"""Settings: one TOML file plus ``PCE_*`` environment variables, validated into frozen models.

Loading::

    config = load_config("config.toml")            # file + os.environ
    config = load_config(path, env={"PCE_LOG_LEVEL": "debug"})   # explicit environment (tests)

Environment variables override the file: prefix ``PCE_``, ``__`` between nesting levels
(``PCE_SERVER__LISTEN=0.0.0.0:9819``, ``PCE_PROBES__BASIC__INTERVAL=1m``); list and table
values are JSON (``PCE_PROVIDERS='[...]'``). ``PCE_CONFIG_FILE`` names the file when no
path is given.

API keys are never part of the configuration: each provider names the environment variable
holding its key (``api_key_env``) and ``ProviderConfig.api_key(env)`` reads it when a request
is built. Error messages never quote the value of an environment variable.

Every model is frozen and rejects unknown keys; defaults live in the models' field
declarations and nowhere else. Any invalid input raises ``ConfigError`` whose text is one line:
``<key path>: <problem>`` (several problems are joined with ``"; "``). docs/configuration.md
documents every key.

This package re-exports the whole API; the modules hold one concern each:

- ``constants``: the ``PCE_`` prefix, provider types and their defaults, probe names
- ``base``: the frozen base model and field helpers every section uses
- ``sections``: ``[server]``, ``[storage]``, ``[http]``, ``[scheduler]``
- ``probes``: ``[probes.*]``
- ``providers``: ``[[providers]]`` with their budgets and prices
- ``root``: ``Config``, the whole configuration
- ``load``: ``load_config`` (file, environment overrides, validation)
- ``errors``: ``ConfigError`` and the one-line formatting of validation errors
- ``fingerprint``: stable hashes that label a configuration
- ``check``: ``check-config`` and its summary
"""

from __future__ import annotations

# ``X as X``: public in the former single module but never in __all__; still importable.
from exporter.config.base import FrozenMap as FrozenMap
from exporter.config.check import check_config, check_config_command, summarize
from exporter.config.constants import (
    DEFAULT_BASE_URLS,
    DEFAULT_KEY_ENV,
    ENV_CONFIG_FILE,
    ENV_PREFIX,
    PROBE_NAMES,
    PROVIDER_TYPES,
)
from exporter.config.constants import LOG_LEVELS as LOG_LEVELS
from exporter.config.constants import ProviderType as ProviderType
from exporter.config.errors import ConfigError, format_validation_error
from exporter.config.fingerprint import config_fingerprint
from exporter.config.load import load_config
from exporter.config.probes import BasicProbeConfig as BasicProbeConfig
from exporter.config.probes import PartialProbeConfig as PartialProbeConfig
from exporter.config.probes import PersistenceProbeConfig as PersistenceProbeConfig
from exporter.config.probes import ProbeConfig, ProbesConfig
from exporter.config.probes import PromptSizesProbeConfig as PromptSizesProbeConfig
from exporter.config.probes import TtlProbeConfig as TtlProbeConfig
from exporter.config.providers import BudgetConfig, PriceConfig, ProviderConfig
from exporter.config.root import Config
from exporter.config.sections import (
    HttpConfig,
    SchedulerConfig,
    ServerConfig,
    StorageConfig,
    parse_listen,
)

__all__ = [
    "DEFAULT_BASE_URLS",
    "DEFAULT_KEY_ENV",
    "ENV_CONFIG_FILE",
    "ENV_PREFIX",
    "PROBE_NAMES",
    "PROVIDER_TYPES",
    "BudgetConfig",
    "Config",
    "ConfigError",
    "HttpConfig",
    "PriceConfig",
    "ProbeConfig",
    "ProbesConfig",
    "ProviderConfig",
    "SchedulerConfig",
    "ServerConfig",
    "StorageConfig",
    "check_config",
    "check_config_command",
    "config_fingerprint",
    "format_validation_error",
    "load_config",
    "parse_listen",
    "summarize",
]
