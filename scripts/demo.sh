#!/usr/bin/env bash
# The demo: the exporter probing the bundled SIMULATOR (a local stand-in that emulates prompt
# caching; it is NOT a real LLM provider and costs nothing), plus Prometheus, Alertmanager and
# Grafana when their binaries are installed. Ctrl-C stops everything. See scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/demo.py "$@"
