"""The daemon's own sections: ``[server]``, ``[storage]``, ``[http]`` and ``[scheduler]``."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from exporter.config.base import _d, _Model
from exporter.config.errors import _invalid, _quote
from exporter.durations import Duration, PositiveDuration, format_duration

_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


class ServerConfig(_Model):
    """``[server]``: where /metrics and the JSON API listen."""

    listen: str = "127.0.0.1:9819"
    # Prometheus exporter-toolkit web config (TLS, basic auth, headers). None: plain HTTP.
    web_config_file: Path | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("web_config_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("web_config_file")
    @classmethod
    def _check_web_config(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file not found: {_quote(value)}")
        return value

    @property
    def host(self) -> str:
        """Address to bind: ``"0.0.0.0"`` for ``":port"``, IPv6 without brackets."""
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` → (host, port). ``[::1]:9819`` for IPv6, ``:9819`` for every interface."""
    problem = (
        f"invalid listen address {_quote(text)} "
        "(expected host:port, e.g. 127.0.0.1:9819, [::1]:9819 or :9819)"
    )
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(problem)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(problem) from None
        host = host[1:-1]
    elif host == "":
        host = "0.0.0.0"  # noqa: S104 - ":port" means every interface, as in Prometheus
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(problem)
    return host, int(port_text)


class StorageConfig(_Model):
    """``[storage]``: the SQLite history file."""

    path: Path = Path("data/prompt-cache-exporter.db")
    retention_days: int = Field(default=30, ge=1)


class HttpConfig(_Model):
    """``[http]``: how each upstream request is tried (see exporter.transport.RetryPolicy)."""

    timeout: PositiveDuration = _d("30s")
    attempts: int = Field(default=3, ge=1, le=10)
    backoff: Duration = _d("2s")
    backoff_max: Duration = _d("8s")
    max_retry_after: Duration = _d("60s")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _check_backoff(self) -> HttpConfig:
        if self.backoff_max < self.backoff:
            raise _invalid("backoff_max", f"must be >= backoff ({format_duration(self.backoff)})")
        return self


class SchedulerConfig(_Model):
    """``[scheduler]``: failure tracking, cooldown and housekeeping."""

    failure_warn_after: int = Field(default=3, ge=1)
    cooldown_after: int = Field(default=5, ge=1)
    cooldown: PositiveDuration = _d("15m")
    reset_after_successes: int = Field(default=2, ge=1)
    # The provider-wide breaker (exporter.outage): consecutive runs failing with connection
    # errors, timeouts or 5xx, covering every model, before the provider is paused; 0: off.
    outage_after: int = Field(default=3, ge=0)
    # While paused for an outage: one trial run (one model) per this interval.
    outage_retry: PositiveDuration = _d("5m")
    reliability_window: PositiveDuration = _d("24h")
    cleanup_interval: PositiveDuration = _d("24h")
    shutdown_grace: PositiveDuration = _d("10s")

    @model_validator(mode="after")
    def _check_cooldown(self) -> SchedulerConfig:
        if self.cooldown_after < self.failure_warn_after:
            raise _invalid(
                "cooldown_after", f"must be >= failure_warn_after ({self.failure_warn_after})"
            )
        # Beyond it, each model's own cooldown would open before the streak covers them all.
        if self.outage_after > self.cooldown_after:
            raise _invalid(
                "outage_after", f"must be <= cooldown_after ({self.cooldown_after}), or 0 (off)"
            )
        return self
