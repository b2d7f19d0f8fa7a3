"""``check-config``: validate without running and print a summary that never shows key values."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, TextIO

from exporter.config.constants import PROBE_NAMES
from exporter.config.errors import ConfigError, _number
from exporter.config.fingerprint import config_fingerprint
from exporter.config.load import load_config
from exporter.config.providers import ProviderConfig
from exporter.config.proxies import summary_lines
from exporter.config.root import Config
from exporter.durations import format_duration


class ForecastLines(Protocol):
    """Lines that say what a configuration will cost (``exporter.forecast`` builds them; the
    configuration cannot, since the cost model depends on it)."""

    def provider(self, provider: ProviderConfig) -> list[str]: ...

    def total(self) -> list[str]: ...


def summarize(
    config: Config,
    env: Mapping[str, str] | None = None,
    forecast: ForecastLines | None = None,
) -> str:
    """A short human-readable summary (what check-config prints). Never shows key values."""
    environ: Mapping[str, str] = os.environ if env is None else env
    web = str(config.server.web_config_file) if config.server.web_config_file else "none"
    lines = [
        f"configuration OK (fingerprint {config_fingerprint(config)})",
        f"server: listen {config.server.listen}, web config {web}, log level {config.log_level}",
        f"storage: {config.storage.path} (retention {config.storage.retention_days} days)",
    ]
    probe_parts = []
    for name in PROBE_NAMES:
        probe = config.probes.get(name)
        if probe.enabled:
            probe_parts.append(
                f"{name} every {format_duration(probe.interval)} "
                f"(timeout {format_duration(probe.timeout)})"
            )
        else:
            probe_parts.append(f"{name} disabled")
    lines.append("probes: " + ", ".join(probe_parts))
    for provider in config.providers:
        if provider.api_key_env:
            state = "set" if provider.api_key(environ) else "not set"
            key = f"{provider.api_key_env} {state}"
        else:
            key = "none (api_key_env is empty)"
        if provider.models:
            models = f"{len(provider.models)} listed ({', '.join(provider.models[:5])}"
            models += ", …)" if len(provider.models) > 5 else ")"
        else:
            models = (
                f"discovered (include {', '.join(provider.include)}; "
                f"exclude {', '.join(provider.exclude) or 'none'}; max {provider.max_models})"
            )
        limits = provider.budget.limits()
        budget = (
            ", ".join(
                f"{_number(value)} {unit}/{window}" for (window, unit), value in limits.items()
            )
            or "no limit"
        )
        probes = ", ".join(config.probes.enabled_for(provider)) or "none"
        lines += [
            f"provider {provider.name} ({provider.type}): {provider.base_url}",
            f"  key: {key}",
            f"  models: {models}",
            f"  probes: {probes}",
            f"  budget: {budget}",
            f"  balance: pause below {_number(provider.balance_stop_threshold)} "
            f"{provider.balance_currency} (checked every "
            f"{format_duration(provider.balance_check_interval)})",
            f"  prices: {len(provider.prices)} pattern(s)",
        ]
        if forecast is not None:
            lines += forecast.provider(provider)
    if forecast is not None:
        lines += forecast.total()
    lines += summary_lines(config.proxies)
    return "\n".join(lines)


def check_config(
    path: str | Path | None,
    *,
    env: Mapping[str, str] | None = None,
    forecast: Callable[[Config], ForecastLines] | None = None,
) -> tuple[int, str]:
    """Validate without running: (0, summary) or (2, "error: <one line>"). ``forecast``
    (``exporter.forecast.ConfigForecast``) adds what the schedule will cost."""
    try:
        config = load_config(path, env=env)
    except ConfigError as exc:
        return 2, f"error: {exc}"
    return 0, summarize(config, env, forecast(config) if forecast is not None else None)


def check_config_command(
    path: str | Path | None,
    *,
    env: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    forecast: Callable[[Config], ForecastLines] | None = None,
) -> int:
    """``prompt-cache-exporter check-config``: print the summary (stdout) or the error
    (stderr) and return the exit status (0 valid, 2 invalid). Never raises ConfigError."""
    status, text = check_config(path, env=env, forecast=forecast)
    stream = (stdout or sys.stdout) if status == 0 else (stderr or sys.stderr)
    print(text, file=stream)
    return status
