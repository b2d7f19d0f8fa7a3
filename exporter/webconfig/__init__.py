"""TLS, basic auth and response headers from a web config file in exporter-toolkit's format
(docs/http.md lists the subset and every difference).

Modules, each importing only those before it: ``models`` (the file's pydantic models),
``tls`` (SSL contexts), ``source`` (loading the file and following its changes),
``middleware`` (the ASGI layer: headers, rate limit, basic auth).
"""

from exporter.webconfig.middleware import BasicAuthenticator, WebConfigMiddleware, parse_basic_auth
from exporter.webconfig.models import RateLimit, TLSServerConfig, WebConfig, WebConfigError
from exporter.webconfig.source import WebConfigSource, load_web_config, server_ssl_context
from exporter.webconfig.tls import build_ssl_context

__all__ = [
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
