#!/usr/bin/env bash
# The demo: the exporter probing the bundled SIMULATOR (a local stand-in that emulates prompt
# caching; it is NOT a real LLM provider and costs nothing). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin

sim_port=8089  # examples/demo.toml points here
echo "== starting the SIMULATOR on 127.0.0.1:${sim_port} (not a real provider) =="
"$bin/prompt-cache-exporter" simulate --host 127.0.0.1 --port "$sim_port" &
sim=$!
trap 'kill "$sim" 2>/dev/null || true; wait "$sim" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 100); do
    if "$bin/python" - "$sim_port" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1)
PY
    if ! kill -0 "$sim" 2>/dev/null; then echo "demo: the simulator failed to start" >&2; exit 1; fi
    sleep 0.1
done

cat <<MSG
== starting prompt-cache-exporter with examples/demo.toml ==
   metrics:   http://127.0.0.1:9819/metrics
   evidence:  http://127.0.0.1:9819/api/runs?model=sim-cache-ok&limit=5
   one-off:   $bin/prompt-cache-exporter probe --base-url http://127.0.0.1:${sim_port}/v1 --model sim-cache-ok --probe all
   Dashboards and alerts: docker-compose --profile demo up (see README).
MSG
"$bin/prompt-cache-exporter" run --config examples/demo.toml
