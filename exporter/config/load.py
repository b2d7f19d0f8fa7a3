"""load_config: read the TOML file, apply ``PCE_*`` environment overrides, validate.

File and environment problems (missing file, bad TOML, bad JSON in a variable) become one-line
ConfigErrors here; model problems are formatted by exporter.config.errors.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from exporter.config.constants import ENV_CONFIG_FILE, ENV_PREFIX
from exporter.config.errors import ConfigError, format_validation_error
from exporter.config.root import Config

# Far above any real configuration (200 models, price tables, comments), far below what would
# keep the event loop busy parsing: a larger file is refused before it is read.
MAX_CONFIG_BYTES = 1024 * 1024


def load_config(path: str | Path | None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or ``$PCE_CONFIG_FILE`` when None), apply ``PCE_*`` overrides from ``env``
    (default: os.environ) and validate. Raises ConfigError with a one-line message."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None or str(path) == "":
        path = environ.get(ENV_CONFIG_FILE) or None
        if path is None:
            raise ConfigError(f"no config file given: use --config FILE or set {ENV_CONFIG_FILE}")
    file_data = _read_toml(Path(path))
    env_data = _env_overrides(environ)
    merged = _deep_merge(file_data, env_data)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, env_data, environ, Config)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
            "it cannot be a configuration"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: invalid TOML: not valid UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_error(path, str(exc))) from None


def _toml_error(path: Path, message: str) -> str:
    """tomllib's "msg (at line L, column C)" as "path:L:C: invalid TOML: msg"."""
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if match:
        return f"{path}:{match[2]}:{match[3]}: invalid TOML: {match[1]}"
    match = re.fullmatch(r"(.*) \(at end of document\)", message, re.DOTALL)
    if match:
        return f"{path}: invalid TOML: {match[1]} at the end of the file"
    return f"{path}: invalid TOML: {' '.join(message.split())}"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    # pydantic-settings (1 MB resident for the life of the process) reads the overrides; an
    # environment without any has nothing for it to read, and most exporters have none.
    if not any(_is_override(name) for name in environ):
        return {}
    from exporter.config.env import env_overrides

    return env_overrides(environ)


def _is_override(name: str) -> bool:
    upper = name.upper()
    return upper.startswith(ENV_PREFIX) and upper != ENV_CONFIG_FILE


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
