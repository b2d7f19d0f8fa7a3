"""What one /metrics request gets: the format and encoding it negotiated, the prepared
``llmcache_`` part and the live collectors after it.

Negotiation is prometheus-client's (``choose_encoder``, ``gzip_accepted``), so the content
types are exactly the library's. The prepared bytes serve the text format and OpenMetrics
with the ``underscores`` and ``allow-utf-8`` escapings (the same bytes: every name here is a
legacy name); the rare ``dots`` and ``values`` escapings rename the metrics, so they are
rendered fresh, as is everything when no exposition is given (tests of the HTTP side).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter.exposition import GZIP_LEVEL, Exposition, Format, gzip_parts

_OPENMETRICS: Final = "application/openmetrics-text"
# Escapings under which our (legacy) names render unchanged.
_PREPARED_ESCAPINGS: Final = frozenset({"underscores", "allow-utf-8"})


@dataclass(frozen=True, slots=True)
class Answer:
    parts: list[bytes]
    content_type: str
    gzip: bool

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)


class _Chain(Collector):
    """Several collectors as one, in order (the fresh render of the whole registry)."""

    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


class MetricsResponder:
    """``registry`` holds what is rendered live on every scrape (process, platform and GC
    metrics, proxy traffic); ``exposition`` the prepared ``llmcache_`` families."""

    def __init__(self, registry: CollectorRegistry, exposition: Exposition | None) -> None:
        self._registry = registry
        self._exposition = exposition

    def answer(self, accept: str, accept_encoding: str, names: Sequence[str]) -> Answer:
        """Runs in a worker thread (the live collectors read /proc)."""
        encoder, content_type = choose_encoder(accept)
        use_gzip = gzip_accepted(accept_encoding)
        live_source = self._registry.restricted_registry(names) if names else self._registry
        exposition = self._exposition
        if exposition is None or _escaping(content_type) not in _PREPARED_ESCAPINGS:
            source: Collector = live_source
            if exposition is not None:
                fresh = CollectorRegistry(support_collectors_without_names=True)
                fresh.register(exposition.collector())
                source = _Chain(fresh.restricted_registry(names) if names else fresh, live_source)
            body = encoder(source)
            return _plain_or_gzip([body], content_type, use_gzip)
        fmt: Format = "openmetrics" if content_type.startswith(_OPENMETRICS) else "text"
        live = encoder(live_source)  # OpenMetrics: ends with "# EOF", as the whole must
        if names:
            return _plain_or_gzip([exposition.filtered(fmt, names), live], content_type, use_gzip)
        prepared = exposition.prepared(fmt, gzip=use_gzip)
        if use_gzip:
            return Answer(gzip_parts(prepared, live), content_type, True)
        assert prepared.body is not None
        return Answer([prepared.body, live], content_type, False)


def _plain_or_gzip(parts: list[bytes], content_type: str, use_gzip: bool) -> Answer:
    if not use_gzip:
        return Answer(parts, content_type, False)
    return Answer([gzip.compress(b"".join(parts), GZIP_LEVEL)], content_type, True)


def _escaping(content_type: str) -> str:
    for token in content_type.split(";"):
        key, _, value = token.strip().partition("=")
        if key == "escaping":
            return value
    return "underscores"
