"""The ``PCE_*`` overrides of an environment mapping, read by pydantic-settings' environment
source (prefix ``PCE_``, nested keys joined by ``__``, lists and tables as JSON).

Imported by ``load_config`` only when the environment holds such a variable: the library
stays resident once loaded (1 MB), and most exporters are configured by their file alone."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic_settings import EnvSettingsSource
from pydantic_settings.exceptions import SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from exporter.config.constants import ENV_PREFIX
from exporter.config.errors import ConfigError
from exporter.config.root import Config


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(
            Config,  # type: ignore[arg-type]  # a plain model: only its fields are read
            case_sensitive=False,
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
        )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        return _MappingEnvSource(environ)()
    except SettingsError as exc:
        # The value itself is never shown; only which variable could not be parsed.
        match = re.search(r'field "([^"]+)"', str(exc))
        field = match[1] if match else "?"
        prefix = f"{ENV_PREFIX}{field}".upper()
        culprit = f"{prefix} or {prefix}__*"
        for name in sorted(environ):
            upper = name.upper()
            if upper != prefix and not upper.startswith(prefix + "__"):
                continue
            try:
                _MappingEnvSource({name: environ[name]})()
            except SettingsError:
                culprit = name
                break
        raise ConfigError(
            f"{field}: invalid JSON in environment variable {culprit} "
            "(list and table values must be JSON)"
        ) from None
