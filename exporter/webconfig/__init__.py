"""TLS, basic auth and response headers from a web config file in exporter-toolkit's format,
so users can reuse the ``--web.config.file`` of their node_exporter (docs/http.md lists the
subset and every difference).

Modules, each importing only those before it: ``models`` (the file's pydantic models and their
rules), ``tls`` (SSL contexts), ``source`` (``load_web_config`` and ``WebConfigSource``, which
follows the file and fails closed while it is invalid), ``auth`` (basic auth), ``middleware``
(the ASGI layer applying headers, the rate limit and basic auth).
"""

from exporter.webconfig.auth import BasicAuthenticator, parse_basic_auth
from exporter.webconfig.middleware import WebConfigMiddleware
from exporter.webconfig.models import (
    ALLOWED_HEADERS,
    CLIENT_AUTH_TYPES,
    RateLimit,
    TLSServerConfig,
    WebConfig,
    WebConfigError,
)
from exporter.webconfig.source import WebConfigSource, load_web_config, server_ssl_context
from exporter.webconfig.tls import _peer_has_allowed_san as _peer_has_allowed_san  # tests
from exporter.webconfig.tls import build_ssl_context

__all__ = [
    "ALLOWED_HEADERS",
    "CLIENT_AUTH_TYPES",
    "BasicAuthenticator",
    "RateLimit",
    "TLSServerConfig",
    "WebConfig",
    "WebConfigError",
    "WebConfigMiddleware",
    "WebConfigSource",
    "build_ssl_context",
    "load_web_config",
    "parse_basic_auth",
    "server_ssl_context",
]
