"""TLS, basic auth and response headers from a web config file in exporter-toolkit's format.

Users run node_exporter and friends with ``--web.config.file``; this package reads the same
YAML so they can reuse it (docs/http.md lists the subset and every difference)::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
    http_server_config:
      headers:
        X-Content-Type-Options: nosniff
    basic_auth_users:
      prometheus: $2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi
    rate_limit:
      interval: 1s
      burst: 20

* ``load_web_config(path)`` validates everything, certificates included, and raises
  ``WebConfigError`` with one line naming the key.
* ``WebConfigSource`` holds the config in force and re-reads the file (and the certificate
  files it names) when they change, at most once per ``check_interval``. While the file is
  invalid it fails closed, as the toolkit does: requests get 500, TLS handshakes fail.
* ``WebConfigMiddleware`` (ASGI) applies headers, the rate limit and basic auth to every
  request; ``server_ssl_context`` gives uvicorn a context that builds each new connection
  from the config in force, so rotated certificates need no restart.

Python's ``ssl`` module cannot express everything Go's ``crypto/tls`` can. Where a setting
cannot be honoured exactly, it is rejected with a message saying so; nothing is silently
weakened.

Submodules: ``parse`` (the file, via ``fields`` and ``tls_parse``), ``models`` (values and
``WebConfigError``), ``tls_names`` (Go's TLS names → OpenSSL), ``tls`` (SSL contexts),
``auth`` (basic auth), ``source`` (reload on change), ``middleware`` (ASGI).
"""

from exporter.webconfig.auth import BasicAuthenticator
from exporter.webconfig.auth import parse_basic_auth as parse_basic_auth
from exporter.webconfig.middleware import WebConfigMiddleware
from exporter.webconfig.models import RateLimit, TLSServerConfig, WebConfig, WebConfigError
from exporter.webconfig.parse import ALLOWED_HEADERS, load_web_config
from exporter.webconfig.source import WebConfigSource
from exporter.webconfig.tls import _peer_has_allowed_san as _peer_has_allowed_san
from exporter.webconfig.tls import build_ssl_context, server_ssl_context
from exporter.webconfig.tls_names import CLIENT_AUTH_TYPES as CLIENT_AUTH_TYPES

# Not in __all__ (as before the split) but importable from here, as they were:
# parse_basic_auth and CLIENT_AUTH_TYPES are public; tests use _peer_has_allowed_san.

__all__ = [
    "ALLOWED_HEADERS",
    "BasicAuthenticator",
    "RateLimit",
    "TLSServerConfig",
    "WebConfig",
    "WebConfigError",
    "WebConfigMiddleware",
    "WebConfigSource",
    "build_ssl_context",
    "load_web_config",
    "server_ssl_context",
]
