"""The UI as code against the real thing: simulator → exporter → Prometheus (the project's
rule files, 1 s scrape and evaluation) → Alertmanager (the project's routing) → a webhook
receiver, all on 127.0.0.1.

Every PromQL expression of every dashboard panel and every rule is evaluated through
Prometheus' HTTP API; the caching-broken alert fires for a model whose cache breaks while we
watch, and Alertmanager delivers it. promtool, prometheus and alertmanager are required:
a missing binary fails the test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests import provisioning_lint as pl
from tests.exporter_process import ExporterProcess, config_text, wait_for
from tests.simulator_process import SimProcess, free_port, simulator

pytestmark = pytest.mark.slow

PROVIDER, MODEL, BROKEN = "sim", "sim-cache-ok", "sim-cache-broken"
JOB = "prompt-cache-exporter"
# Alerts whose `for` this test shortens (in a copy of alerts.yml; the expressions are the
# project's own) so that delivery happens in seconds rather than after 15 minutes.
FAST_FOR = "3s"


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{names[0]} is required (Debian packages prometheus / prometheus-alertmanager)")


@dataclass
class Webhook:
    """An Alertmanager webhook receiver: records every POST, by path."""

    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    url: str = ""

    def alerts(self, path: str) -> list[dict[str, Any]]:
        return [a for p, body in self.received if p == path for a in body.get("alerts", [])]


def _start_webhook() -> tuple[Webhook, ThreadingHTTPServer]:
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            hook.received.append((self.path, json.loads(self.rfile.read(length))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hook, server


@dataclass
class Stack:
    prometheus: str
    alertmanager: str
    exporter: ExporterProcess
    webhook: Webhook
    sim: SimProcess

    def query(self, expr: str) -> dict[str, Any]:
        response = httpx.get(self.prometheus + "/api/v1/query", params={"query": expr}, timeout=30)
        body: dict[str, Any] = response.json()
        return body

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = _binary("prometheus")
    alertmanager_bin = _binary("prometheus-alertmanager", "alertmanager")
    tmp = tmp_path_factory.mktemp("stack")
    hook, hook_server = _start_webhook()
    procs: list[subprocess.Popen[bytes]] = []

    # Alertmanager: the project's routes and inhibitions; receivers point at our webhook.
    am_config = yaml.safe_load(pl.ALERTMANAGER_CONFIG.read_text())
    am_config["route"]["group_wait"] = "1s"
    for receiver in am_config["receivers"]:
        for hook_config in receiver.get("webhook_configs", []):
            hook_config["url"] = re.sub(r"^http://[^/]+", hook.url, hook_config["url"])
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
    am_port = free_port()
    procs.append(
        _spawn(
            [
                alertmanager_bin,
                f"--config.file={tmp / 'alertmanager.yml'}",
                f"--storage.path={tmp / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            tmp / "alertmanager.log",
        )
    )
    alertmanager = f"http://127.0.0.1:{am_port}"

    # The simulator first serves sim-cache-broken with a working cache ...
    sim_port = free_port()
    healthy = tmp / "sim-healthy.toml"
    healthy.write_text(f'[[models]]\nname = "{BROKEN}"\ncache_mode = "ok"\n')
    sim_ctx = simulator("--config", str(healthy), port=sim_port)
    sim = sim_ctx.__enter__()

    db = tmp / "exporter.db"
    (tmp / "exporter.toml").write_text(config_text(sim_url=sim.base_url, db_path=db))
    exporter = ExporterProcess(tmp / "exporter.toml").start()
    exporter_port = exporter.url.rsplit(":", 1)[1]

    # Prometheus: the project's recording rules as they are; alerting rules with `for`
    # shortened; 1 s scrape and evaluation.
    alerts = pl.ALERTING_RULES.read_text()
    (tmp / "alerts.yml").write_text(re.sub(r"(?m)^(\s+for:\s*)\S+", rf"\g<1>{FAST_FOR}", alerts))
    prom_port = free_port()
    (tmp / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "evaluation_interval": "1s",
                    "scrape_timeout": "1s",
                },
                "rule_files": [str(pl.RECORDING_RULES), str(tmp / "alerts.yml")],
                "alerting": {
                    "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
                },
                "scrape_configs": [
                    {
                        "job_name": JOB,
                        "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                    },
                    {
                        "job_name": "prometheus",
                        "static_configs": [{"targets": [f"127.0.0.1:{prom_port}"]}],
                    },
                    {
                        "job_name": "alertmanager",
                        "static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}],
                    },
                ],
            }
        )
    )
    procs.append(
        _spawn(
            [
                prometheus_bin,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            tmp / "prometheus.log",
        )
    )
    prometheus = f"http://127.0.0.1:{prom_port}"
    try:
        assert wait_for(lambda: _ready(prometheus + "/-/ready"), 60), (
            tmp / "prometheus.log"
        ).read_text()
        assert wait_for(lambda: _ready(alertmanager + "/-/ready"), 60), (
            tmp / "alertmanager.log"
        ).read_text()
        stack = Stack(prometheus, alertmanager, exporter, hook, sim)
        # ... until Prometheus has seen it cache ...
        broken_works = f'llmcache_caching_works{{model="{BROKEN}",probe="basic"}}'
        assert wait_for(lambda: stack.value(broken_works) == 1, 90), exporter.log()[-3000:]
        # ... and enough of everything for every panel: all probes of the demo models.
        assert wait_for(
            lambda: stack.value(f'count(llmcache_ttl_hit{{provider="{PROVIDER}"}})') is not None, 90
        )
        time.sleep(3)
        # Then the provider "breaks" caching for that model: same port, default behaviour.
        sim_ctx.__exit__(None, None, None)
        sim_ctx = simulator(port=sim_port)
        stack.sim = sim_ctx.__enter__()
        yield stack
    finally:
        exporter.kill()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        sim_ctx.__exit__(None, None, None)
        hook_server.shutdown()


def test_caching_broken_alert_fires_and_is_delivered(stack: Stack) -> None:
    alert = f'ALERTS{{alertname="LLMCacheCachingBroken",model="{BROKEN}",probe="basic"}}'
    assert wait_for(lambda: stack.value(alert) is not None, 60), "alert never pending or firing"
    states = {r["metric"]["alertstate"] for r in stack.query(alert)["data"]["result"]}
    assert states <= {"pending", "firing"}

    def delivered() -> list[dict[str, Any]]:
        return [
            a
            for a in stack.webhook.alerts("/critical")
            if a["labels"].get("alertname") == "LLMCacheCachingBroken"
            and a["labels"].get("model") == BROKEN
        ]

    assert wait_for(lambda: bool(delivered()), 60), stack.webhook.received
    alert_body = delivered()[0]
    assert alert_body["status"] == "firing"
    assert alert_body["labels"]["severity"] == "critical"
    assert alert_body["labels"]["provider"] == PROVIDER
    assert alert_body["labels"]["job"] == JOB
    assert alert_body["annotations"]["runbook_url"].endswith("#llmcachecachingbroken")
    # The model that keeps working never raised it.
    assert not [
        a
        for a in stack.webhook.alerts("/critical")
        if a["labels"].get("alertname") == "LLMCacheCachingBroken"
        and a["labels"].get("model") == MODEL
    ]


def test_every_rule_expression_evaluates(stack: Stack) -> None:
    failures = []
    for path in (pl.RECORDING_RULES, pl.ALERTING_RULES):
        for group in pl.load_yaml(path)["groups"]:
            for rule in group["rules"]:
                body = stack.query(rule["expr"])
                if body.get("status") != "success":
                    failures.append((rule.get("record") or rule.get("alert"), body))
    assert not failures, failures


def test_recording_rules_produce_series(stack: Stack) -> None:
    # Every recording rule has data (the long-window group evaluates once a minute, so its
    # first results take up to a minute to appear). Ratios divide by "> 0" denominators and
    # need traffic in their window, which the stack has.
    records = [
        rule["record"]
        for group in pl.load_yaml(pl.RECORDING_RULES)["groups"]
        for rule in group["rules"]
    ]

    def empty() -> list[str]:
        return [r for r in records if stack.value(f"count({r})") is None]

    assert wait_for(lambda: not empty(), 90, interval=2.0), empty()


# Selections a user would make: All where the dashboard offers it, then one provider/model
# where each kind of panel has something to show (balances and budgets exist on venice-sim;
# failing probes on sim-error; firing alerts on sim-cache-broken).
SELECTIONS: tuple[tuple[str | None, str | None], ...] = (
    (None, None),
    (PROVIDER, MODEL),
    ("venice-sim", MODEL),
    (PROVIDER, "sim-error"),
    (PROVIDER, BROKEN),
)


def test_every_dashboard_panel_returns_data(stack: Stack) -> None:
    """Every query parses for every selection, and returns data for at least one of them."""
    results: dict[str, list[bool]] = {}
    errors = []
    for provider, model in SELECTIONS:
        queries = pl.substituted_queries(provider, model, job=JOB, rate_interval="1m", range_="5m")
        for query, expr in queries:
            body = stack.query(expr)
            if body.get("status") != "success":
                errors.append((query.describe(), expr, body.get("error")))
                continue
            results.setdefault(query.describe(), []).append(bool(body["data"]["result"]))
    assert not errors, errors
    assert len(results) > 40
    empty = sorted(name for name, outcomes in results.items() if not any(outcomes))
    assert not empty, empty


def test_evidence_tables_read_the_exporter_api(stack: Stack) -> None:
    urls = pl.substituted_json_api_urls(PROVIDER, MODEL, stack.exporter.url)
    assert urls
    for query, url in urls:
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, (query.describe(), response.text)
        runs = response.json()["runs"]
        assert runs, query.describe()
        assert all(r["model"] == MODEL for r in runs)


def test_every_metric_in_dashboards_and_rules_exists_in_a_real_scrape(stack: Stack) -> None:
    text = httpx.get(stack.exporter.url + "/metrics", timeout=10).text
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    recorded = {
        rule["record"]
        for group in pl.load_yaml(pl.RECORDING_RULES)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    exprs = [q.expr for q in pl.dashboard_queries()]
    exprs += [
        rule["expr"]
        for path in (pl.RECORDING_RULES, pl.ALERTING_RULES)
        for group in pl.load_yaml(path)["groups"]
        for rule in group["rules"]
    ]
    used = {name for expr in exprs for name in pl.metric_names_in(expr)}
    external = {
        n
        for n in used
        if n in {"up", "ALERTS", "ALERTS_FOR_STATE"}
        or n.startswith(("scrape_", "prometheus_", "alertmanager_"))
    }
    missing = sorted(used - exposed - recorded - external)
    assert not missing, missing
