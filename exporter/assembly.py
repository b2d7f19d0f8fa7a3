"""Configuration to working parts: one place that turns config models into an adapter, a retry
policy and probe settings. The daemon's runtime and the ``probe`` command both build with it,
so a provider is assembled the same way whichever of them runs it."""

from __future__ import annotations

from collections.abc import Mapping

from exporter.config import HttpConfig, ProbesConfig, ProviderConfig
from exporter.probes.common import ProbeSettings
from exporter.providers import adapter_class
from exporter.providers.base import ProviderAdapter
from exporter.transport import RetryPolicy


def build_adapter(
    provider: ProviderConfig, env: Mapping[str, str] | None = None
) -> ProviderAdapter:
    """The adapter for ``provider``, with the key read from the variable it names."""
    return adapter_class(provider.type)(
        base_url=provider.base_url,
        api_key=provider.api_key(env),
        min_cacheable_tokens=provider.min_cacheable_tokens,
        warmup_repeats=provider.warmup_repeats,
        stream=provider.stream,
        max_tokens=provider.max_tokens,
        extra_headers=dict(provider.headers),
    )


def retry_policy(http: HttpConfig) -> RetryPolicy:
    return RetryPolicy(
        attempts=http.attempts,
        backoff=http.backoff,
        backoff_max=http.backoff_max,
        max_retry_after=http.max_retry_after,
        timeout=http.timeout,
        max_body_bytes=http.max_body_bytes,
    )


def probe_settings(probes: ProbesConfig, provider: ProviderConfig | None = None) -> ProbeSettings:
    return ProbeSettings(
        sizes=dict(probes.prompt_sizes.sizes),
        persistence_requests=probes.persistence.requests,
        ttl_delays=tuple(probes.ttl.delays),
        hit_threshold_tokens=provider.hit_threshold_tokens if provider else None,
    )
