"""TLS, basic auth and response headers from an exporter-toolkit web config (docs/http.md).
Modules import only those before them: models, tls, source, middleware."""

from exporter.webconfig.middleware import BasicAuthenticator, WebConfigMiddleware, parse_basic_auth
from exporter.webconfig.models import RateLimit, WebConfigError
from exporter.webconfig.source import WebConfig, WebConfigSource, load_web_config

__all__ = [
    "BasicAuthenticator",
    "RateLimit",
    "WebConfig",
    "WebConfigError",
    "WebConfigMiddleware",
    "WebConfigSource",
    "load_web_config",
    "parse_basic_auth",
]
