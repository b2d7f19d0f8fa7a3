"""Provider adapters, one per API family, looked up by a provider's configured ``type``."""

from __future__ import annotations

from exporter.providers.anthropic import AnthropicAdapter
from exporter.providers.base import ProviderAdapter
from exporter.providers.openai import OpenAIAdapter
from exporter.providers.venice import VeniceAdapter

ADAPTERS: dict[str, type[ProviderAdapter]] = {
    cls.type_name: cls for cls in (OpenAIAdapter, VeniceAdapter, AnthropicAdapter)
}


def adapter_class(type_name: str) -> type[ProviderAdapter]:
    """The adapter class for a configured provider type; ValueError names the known types."""
    try:
        return ADAPTERS[type_name]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"unknown provider type {type_name!r} (known: {known})") from None


__all__ = ["ADAPTERS", "AnthropicAdapter", "OpenAIAdapter", "VeniceAdapter", "adapter_class"]
