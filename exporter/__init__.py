"""prompt-cache-exporter: measure whether LLM providers cache prompts; expose it to Prometheus."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prompt-cache-exporter")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
