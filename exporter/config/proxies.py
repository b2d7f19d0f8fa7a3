"""``[[proxies]]``: pass-through listeners that measure the user's own traffic (SPEC §13).

A client points its base URL at ``listen``; every request goes to ``upstream`` only, with the
client's own credentials, and only the usage of the answer is read. ``provider`` names the
labels the traffic series carry, so they line up with an active provider of that name.
Cross-section rules (unique names and addresses, the shared provider's type) are checked by
``check_proxies``, which the root model calls.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from exporter.config.base import FrozenMap, _d, _Model
from exporter.config.constants import PROVIDER_TYPES, ProviderType
from exporter.config.errors import _invalid, _quote
from exporter.config.providers import PriceConfig, ProviderConfig
from exporter.config.sections import ServerConfig, parse_listen
from exporter.durations import PositiveDuration
from exporter.results import ModelPrice

_MiB = 1024 * 1024
_PROXY_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
DEFAULT_PROXY_LISTEN = "127.0.0.1:9820"
# What the official SDKs use as their base URL, so a client swaps that URL for the listener's
# and nothing else (the Anthropic SDK appends /v1/messages itself; the OpenAI SDK, pointed
# at Venice, appends /chat/completions to .../api/v1).
DEFAULT_UPSTREAMS = {
    "venice": "https://api.venice.ai/api/v1",
    "anthropic": "https://api.anthropic.com",
}


class ProxyConfig(_Model):
    """``[[proxies]]``: one listener in front of one upstream API."""

    name: str
    type: ProviderType
    # Where clients connect (same syntax as ``server.listen``). Loopback by default: a proxy
    # that relays anyone's requests should be opened to the network on purpose.
    listen: str = DEFAULT_PROXY_LISTEN
    upstream: str
    # Labels of the traffic series; the name of an active provider to sit beside its probes.
    provider: str
    # Distinct model labels per provider; requests for further models count as "other".
    max_models: int = Field(default=30, ge=1, le=1000)
    # Recent prompt prefixes remembered per model (in memory, as keyed hashes).
    prefix_memory: int = Field(default=512, ge=1, le=100_000)
    # Minimum cacheable prompt; default: the shared provider's setting, else the API's.
    min_cacheable_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_request_bytes: int = Field(default=32 * _MiB, ge=1024)
    max_response_bytes: int = Field(default=256 * _MiB, ge=1024)
    max_concurrent: int = Field(default=1024, ge=1, le=100_000)
    connect_timeout: PositiveDuration = _d("10s")
    # Longest silence between two bytes from the upstream (a slow first token included).
    read_timeout: PositiveDuration = _d("10m")
    prices: FrozenMap[str, PriceConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """``upstream`` from the type where it has a well-known URL; ``provider`` = ``name``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        kind = data.get("type")
        if data.get("upstream") is None and kind in DEFAULT_UPSTREAMS:
            data["upstream"] = DEFAULT_UPSTREAMS[kind]
        elif data.get("upstream") is None and kind in PROVIDER_TYPES:
            raise _invalid(
                "upstream",
                f'required for type "{kind}" (the API base URL, e.g. https://api.openai.com/v1)',
            )
        if data.get("provider") is None and isinstance(data.get("name"), str):
            # An invalid name is reported once, under name, not again under provider.
            data["provider"] = data["name"] if _PROXY_NAME.fullmatch(data["name"]) else ""
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        try:
            return ProviderConfig._check_name(value)  # the same rule as provider names
        except ValueError as exc:
            raise ValueError(str(exc).replace("provider name", "proxy name")) from None

    @field_validator("provider")
    @classmethod
    def _check_provider(cls, value: str, info: ValidationInfo) -> str:
        if value == "" and "name" not in info.data:
            return value  # defaulted from an invalid name, which has its own error
        return ProviderConfig._check_name(value)

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str) -> str:
        return ProviderConfig._check_base_url(value)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("prices")
    @classmethod
    def _check_prices(cls, value: Mapping[str, PriceConfig]) -> Mapping[str, PriceConfig]:
        if any(not pattern.strip() for pattern in value):
            raise ValueError("model patterns must not be empty")
        return value

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]

    def price_for(self, model: str) -> ModelPrice | None:
        """This proxy's own price for ``model``: the first matching glob in document order."""
        for pattern, price in self.prices.items():
            if fnmatch.fnmatchcase(model, pattern):
                return price.to_model_price()
        return None


def check_proxies(
    proxies: Sequence[ProxyConfig], providers: Iterable[ProviderConfig], server: ServerConfig
) -> None:
    """The rules across sections; raises the config error of the first one broken."""
    types = {p.name: p.type for p in providers}
    names: set[str] = set()
    addresses = {_address(server.listen): "server.listen"}
    for index, proxy in enumerate(proxies):
        where = f"proxies[{index}]"
        if proxy.name in names:
            raise _invalid(f"{where}.name", f"duplicate proxy name {_quote(proxy.name)}")
        names.add(proxy.name)
        address = _address(proxy.listen)
        if address in addresses and address[1] != 0:
            raise _invalid(
                f"{where}.listen",
                f"address {_quote(proxy.listen)} is already used by {addresses[address]}",
            )
        addresses[address] = f"{where}.listen"
        shared = types.get(proxy.provider)
        if shared is not None and shared != proxy.type:
            raise _invalid(
                f"{where}.type",
                f"{_quote(proxy.type)} differs from the type of provider "
                f"{_quote(proxy.provider)} ({_quote(shared)}) whose labels it shares",
            )


def _address(listen: str) -> tuple[str, int]:
    return parse_listen(listen)


def summary_lines(proxies: Sequence[ProxyConfig]) -> list[str]:
    """What check-config prints about the proxies (no keys: a proxy holds none)."""
    return [
        f"proxy {p.name} ({p.type}): {p.listen} -> {p.upstream}, labels provider {p.provider}"
        for p in proxies
    ]
