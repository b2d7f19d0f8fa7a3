"""prompt-cache-exporter: measure whether LLM providers cache prompts; expose it to Prometheus."""

import sys
from importlib.metadata import PackageNotFoundError, version

# httpx's package imports its command-line client (click, pygments, rich) whenever those
# happen to be installed, as in many environments: 0.5 MB resident with pygments alone,
# more with rich, for a client no exporter command runs. A None entry makes that import
# fail as if they were absent, which httpx handles (``httpx.main`` then says so).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

try:
    __version__ = version("prompt-cache-exporter")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
