"""``[probes.*]``: one settings model per probe kind, and the table that holds them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator

from exporter.config.base import FrozenMap, _d, _Model
from exporter.config.constants import PROBE_NAMES
from exporter.config.errors import _invalid, _quote
from exporter.config.providers import ProviderConfig
from exporter.durations import PositiveDuration, format_duration, parse_duration

_SIZE_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")


class ProbeConfig(_Model):
    """Settings every probe kind has. Subclasses change the defaults and add their own keys.

    ``timeout`` defaults to the class default, or to 80 % of the interval when that is
    shorter, so shortening only the interval (demos, tests) stays valid. An explicit timeout
    must be shorter than the interval.
    """

    enabled: bool = True
    interval: PositiveDuration = _d("5m")
    timeout: PositiveDuration = _d("2m")

    _TIMEOUT_SHARE: ClassVar[float] = 0.8

    @model_validator(mode="before")
    @classmethod
    def _default_timeout(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("timeout") is None and "interval" in data:
            try:
                interval = parse_duration(data["interval"])
            except ValueError:
                return data  # the interval's own error is reported
            default = cls.model_fields["timeout"].default
            data = {**data, "timeout": min(default, interval * cls._TIMEOUT_SHARE)}
        return data

    @model_validator(mode="after")
    def _check_timeout(self) -> ProbeConfig:
        if self.timeout >= self.interval:
            raise _invalid(
                "timeout", f"must be shorter than the interval ({format_duration(self.interval)})"
            )
        return self


# The default schedule (docs/configuration.md, "What probing costs"): the cheap basic probe is
# the heartbeat that notices caching breaking within 20 minutes; the probes that cost more and
# describe slowly changing properties run a few times a day. About 489 k prompt tokens a day
# for a model with a 1024-token minimum.


class BasicProbeConfig(ProbeConfig):
    """``[probes.basic]``: prime + repeat of one prompt."""

    interval: PositiveDuration = _d("10m")
    timeout: PositiveDuration = _d("2m")


class PromptSizesProbeConfig(ProbeConfig):
    """``[probes.prompt_sizes]``: basic at several prompt sizes."""

    interval: PositiveDuration = _d("12h")
    timeout: PositiveDuration = _d("10m")
    # size name (the `size` label) -> target prompt tokens
    sizes: FrozenMap[str, Annotated[int, Field(gt=0, le=1_000_000)]] = Field(
        default_factory=lambda: {"small": 1100, "medium": 2000, "large": 4000, "xlarge": 8000}
    )

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, value: Mapping[str, int]) -> Mapping[str, int]:
        if not value:
            raise ValueError("must name at least one size")
        for name in value:
            if not _SIZE_NAME.fullmatch(name):
                raise ValueError(
                    f"invalid size name {_quote(name)} (use lower-case letters, digits and _)"
                )
        return value


class PartialProbeConfig(ProbeConfig):
    """``[probes.partial]``: shared system prompt, different user messages."""

    interval: PositiveDuration = _d("2h")
    timeout: PositiveDuration = _d("5m")


class PersistenceProbeConfig(ProbeConfig):
    """``[probes.persistence]``: N identical requests in a row."""

    interval: PositiveDuration = _d("6h")
    timeout: PositiveDuration = _d("10m")
    requests: int = Field(default=10, ge=2, le=100)


class TtlProbeConfig(ProbeConfig):
    """``[probes.ttl]``: prime, wait, repeat for each delay."""

    interval: PositiveDuration = _d("6h")
    timeout: PositiveDuration = _d("15m")
    delays: tuple[PositiveDuration, ...] = (1.0, 5.0, 10.0, 30.0)

    @model_validator(mode="after")
    def _check_delays(self) -> TtlProbeConfig:
        if not self.delays:
            raise _invalid("delays", "must list at least one delay")
        for before, after in zip(self.delays, self.delays[1:], strict=False):
            if after <= before:
                raise _invalid(
                    "delays",
                    f"must be strictly increasing ({format_duration(after)} "
                    f"follows {format_duration(before)})",
                )
        # The probe sends every prime first and each repeat when its delay is up, so a run
        # takes about the longest delay (plus its requests), not the sum of the delays.
        longest = self.delays[-1]
        if longest >= self.timeout:
            raise _invalid(
                "delays",
                f"the longest delay ({format_duration(longest)}) does not fit in the probe "
                f"timeout ({format_duration(self.timeout)}); a run takes about the longest "
                "delay plus its requests",
            )
        return self


class ProbesConfig(_Model):
    """``[probes.*]``: one table per probe kind."""

    basic: BasicProbeConfig = Field(default_factory=BasicProbeConfig)
    prompt_sizes: PromptSizesProbeConfig = Field(default_factory=PromptSizesProbeConfig)
    partial: PartialProbeConfig = Field(default_factory=PartialProbeConfig)
    persistence: PersistenceProbeConfig = Field(default_factory=PersistenceProbeConfig)
    ttl: TtlProbeConfig = Field(default_factory=TtlProbeConfig)

    def get(self, name: str) -> ProbeConfig:
        """The settings of probe ``name`` (one of PROBE_NAMES). KeyError for other names."""
        if name not in PROBE_NAMES:
            raise KeyError(name)
        probe: ProbeConfig = getattr(self, name)
        return probe

    def enabled(self) -> tuple[str, ...]:
        """Names of the globally enabled probes, in PROBE_NAMES order."""
        return tuple(name for name in PROBE_NAMES if self.get(name).enabled)

    def enabled_for(self, provider: ProviderConfig) -> tuple[str, ...]:
        """Probes to run for ``provider``: its ``probes`` list (all if unset), minus any probe
        disabled globally (``enabled = false`` is a kill switch), in PROBE_NAMES order."""
        chosen = PROBE_NAMES if provider.probes is None else provider.probes
        return tuple(name for name in self.enabled() if name in chosen)
