"""Simulator settings, and loading them from a TOML file.

The file may override any default model by name, add new ones, and switch on the fault
models; unknown keys are rejected with one line naming the key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.simulator.models import DEFAULT_MODELS, FAULT_MODELS, SimModel, model_fields

_MiB = 1024 * 1024


class SimConfigError(ValueError):
    """An invalid simulator configuration; the message is one line, fit to print as is."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    models: tuple[SimModel, ...] = DEFAULT_MODELS
    seed: int = 42
    api_key: str | None = dataclasses.field(default=None, repr=False)
    balance_usd: float = 100.0
    balance_diem: float = 10.0
    latency_scale: float = 1.0  # multiplies every model latency; 0 answers at once
    max_body_bytes: int = 8 * _MiB
    log_size: int = 10_000
    # Only feed the informational x-ratelimit-remaining-* headers (fixed one-minute windows);
    # throttling itself is per model (SimModel.ratelimit_period).
    requests_per_minute: int = 1_000
    tokens_per_minute: int = 10_000_000

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SimConfigError(f"duplicate model name: {duplicates[0]}")
        for name in ("balance_usd", "balance_diem", "latency_scale"):
            value = getattr(self, name)
            if not _number(value) or value < 0:
                raise SimConfigError(f"{name} must be a non-negative number")
        for name in ("max_body_bytes", "log_size", "requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if not _integer(value) or value < 1:
                raise SimConfigError(f"{name} must be a positive integer")
        if not _integer(self.seed):
            raise SimConfigError("seed must be an integer")
        if self.api_key is not None and not _text(self.api_key):
            raise SimConfigError("api_key must be a non-empty string")

    def model(self, name: str) -> SimModel | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    def with_fault_models(self) -> SimConfig:
        """This config plus every fault model it does not already define."""
        have = {m.name for m in self.models}
        extra = tuple(m for m in FAULT_MODELS if m.name not in have)
        return dataclasses.replace(self, models=self.models + extra)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TOP_LEVEL_KEYS = frozenset(
    {
        "seed",
        "api_key_env",
        "balance_usd",
        "balance_diem",
        "latency_scale",
        "max_body_bytes",
        "log_size",
        "requests_per_minute",
        "tokens_per_minute",
        "default_models",
        "with_fault_models",
        "models",
    }
)


def load_sim_config(path: str | Path) -> SimConfig:
    """Read a simulator TOML file. Raises SimConfigError with a one-line message."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SimConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SimConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return sim_config_from_mapping(data)
    except SimConfigError as exc:
        raise SimConfigError(f"{path}: {exc}") from None


def sim_config_from_mapping(data: Mapping[str, Any]) -> SimConfig:
    """Build a SimConfig from parsed TOML (or any mapping of the same shape)."""
    for key in data:
        if key not in _TOP_LEVEL_KEYS:
            raise SimConfigError(f"unknown key {key!r}")
    use_defaults = _flag(data, "default_models", True)
    with_faults = _flag(data, "with_fault_models", False)
    base = {m.name: m for m in (*DEFAULT_MODELS, *FAULT_MODELS)}
    models: dict[str, SimModel] = {m.name: m for m in DEFAULT_MODELS} if use_defaults else {}
    if with_faults:
        models.update({m.name: m for m in FAULT_MODELS if m.name not in models})

    tables = data.get("models", [])
    if not isinstance(tables, list):
        raise SimConfigError("models must be an array of tables ([[models]])")
    for index, table in enumerate(tables):
        model = _model_from_table(table, f"models[{index}]", models, base)
        models[model.name] = model

    settings: dict[str, Any] = {
        k: v
        for k, v in data.items()
        if k not in {"api_key_env", "default_models", "with_fault_models", "models"}
    }
    env_name = data.get("api_key_env")
    if env_name is not None:
        if not isinstance(env_name, str) or not env_name:
            raise SimConfigError("api_key_env must be the name of an environment variable")
        secret = os.environ.get(env_name)
        if not secret:
            raise SimConfigError(f"api_key_env: environment variable {env_name} is not set")
        settings["api_key"] = secret
    try:
        return SimConfig(models=tuple(models.values()), **settings)
    except (TypeError, ValueError) as exc:
        raise SimConfigError(str(exc)) from None


def _flag(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise SimConfigError(f"{key} must be true or false")
    return value


def _model_from_table(
    table: object,
    where: str,
    current: Mapping[str, SimModel],
    known: Mapping[str, SimModel],
) -> SimModel:
    if not isinstance(table, Mapping):
        raise SimConfigError(f"{where} must be a table")
    fields = set(model_fields())
    for key in table:
        if key not in fields:
            raise SimConfigError(f"{where}: unknown key {key!r}")
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise SimConfigError(f"{where}: name is required")
    changes = {k: v for k, v in table.items() if k != "name"}
    # TOML has no null: ``false`` is how a file says "no such price" (not offered).
    for key in ("price_cache_read", "price_cache_write"):
        if changes.get(key) is False:
            changes[key] = None
    try:
        # Overrides start from the model of that name (configured, or a built-in fault model).
        start = current.get(name) or known.get(name)
        return start.replace(**changes) if start else SimModel(name=name, **changes)
    except ValueError as exc:
        raise SimConfigError(f"{where}: {exc}") from None
