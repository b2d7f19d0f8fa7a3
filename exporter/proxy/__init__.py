"""Pass-through proxies that measure the user's own traffic (SPEC §13, docs/proxy.md).

The modules, one concern each:

- ``forward``: the ASGI app that forwards a request to the one configured upstream
- ``usage``: reading the usage of an answer (JSON or event stream) with the adapters' parsers
- ``prefix``: keyed hashes of the cacheable prefix and the recent-prefix sets (prefix churn)
- ``hits``: whether a real request hit the cache (the shared rule, fixed baseline)
- ``traffic``: the in-memory totals the proxies record into
- ``collector``: the ``llmcache_traffic_*`` families
- ``listeners``: serving the configured proxies; ``serve_proxies`` is the daemon's hook
"""

from __future__ import annotations

from exporter.proxy.collector import TrafficCollector
from exporter.proxy.forward import ProxyApp, ProxyLimits
from exporter.proxy.listeners import ProxyHandle, ProxyListenError, serve_proxies, serve_proxy
from exporter.proxy.traffic import TrafficState

__all__ = [
    "ProxyApp",
    "ProxyHandle",
    "ProxyLimits",
    "ProxyListenError",
    "TrafficCollector",
    "TrafficState",
    "serve_proxies",
    "serve_proxy",
]
