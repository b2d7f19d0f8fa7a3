"""Config: the whole configuration, one pydantic model over every section."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from exporter.config.constants import LOG_LEVELS
from exporter.config.errors import _invalid, _quote
from exporter.config.probes import ProbesConfig
from exporter.config.providers import ProviderConfig
from exporter.config.proxies import ProxyConfig, check_proxies
from exporter.config.sections import HttpConfig, SchedulerConfig, ServerConfig, StorageConfig


class Config(BaseModel):
    """The whole configuration. Build it with ``load_config``.

    Constructing it directly reads nothing from the process environment: ``load_config``
    merges the file and the ``PCE_*`` variables of an explicit environment mapping
    (``exporter.config.env``), so tests never pick up the caller's variables.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    server: ServerConfig = Field(default_factory=ServerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    providers: tuple[ProviderConfig, ...] = ()
    proxies: tuple[ProxyConfig, ...] = ()

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_log_level(cls, value: Any) -> Any:
        level = value.lower() if isinstance(value, str) else value
        level = "warning" if level == "warn" else level
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (got {_quote(value)})")
        return level

    @model_validator(mode="after")
    def _check_providers(self) -> Config:
        if not self.providers:
            raise _invalid(
                "providers", "no providers configured (add at least one [[providers]] table)"
            )
        seen: set[str] = set()
        for index, provider in enumerate(self.providers):
            if provider.name in seen:
                raise _invalid(
                    f"providers[{index}].name", f"duplicate provider name {_quote(provider.name)}"
                )
            seen.add(provider.name)
        check_proxies(self.proxies, self.providers, self.server)
        return self

    def provider(self, name: str) -> ProviderConfig:
        """The provider called ``name``. KeyError if there is none."""
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)
