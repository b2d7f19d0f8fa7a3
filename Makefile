# The two commands of the README's quick start, and the pieces they are made of.
.PHONY: test demo lint typecheck pytest bootstrap bootstrap-system bench

VENV := .venv/bin

bootstrap:
	./scripts/bootstrap.sh

bootstrap-system:
	./scripts/bootstrap.sh --system

## make test: install everything (Python packages and the Debian packages with promtool,
## amtool, prometheus, alertmanager and docker-compose), then lint, type-check and test.
test: bootstrap-system
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/pytest -n 3 --dist loadfile --cov --cov-report=term --cov-fail-under=80

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

typecheck: bootstrap
	$(VENV)/mypy

pytest: bootstrap
	$(VENV)/pytest -n 3 --dist loadfile

## make demo: the exporter probing the bundled SIMULATOR (not a real LLM provider), with
## Prometheus, Alertmanager and Grafana where their binaries are installed (scripts/demo.py).
demo: bootstrap
	./scripts/demo.sh

## make bench: the figures of docs/benchmarks.md (a few minutes; loopback only).
bench: bootstrap
	$(VENV)/python -m benchmarks.probe_cost
	$(VENV)/python -m benchmarks.probe_overhead
	$(VENV)/python -m benchmarks.scrape
	$(VENV)/python -m benchmarks.exporter_load
	$(VENV)/python -m benchmarks.api_load_ttft
	$(VENV)/python -m benchmarks.proxy
