"""The UI as code against the real thing, with the demo configuration: the simulator →
the exporter running examples/demo.toml, with the demo's sample traffic through its proxy
(scripts/demo_traffic.py) → Prometheus (the project's rule files, 1 s scrape and
evaluation) → Alertmanager (the project's routes and inhibitions) → a webhook receiver,
all on 127.0.0.1.

Every PromQL expression of every dashboard panel and every rule is evaluated through
Prometheus' HTTP API, and every panel query returns data for the demo (or is on the list of
docs/dashboards.md). Halfway through, the simulator stops caching for sim-cache-write, a
model that cached reliably until then, and the webhook must receive exactly the expected
alerts by severity: the page for that model, warnings for the models that never cached, the
flaky one, the one that keeps failing, the throttled one, the sample application whose
prompts change on every request, the heartbeat, and nothing else. promtool, prometheus and
alertmanager are required: a missing binary fails the test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
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
from tests.exporter_process import ExporterProcess, wait_for
from tests.simulator_process import SimProcess, free_port, simulator

pytestmark = pytest.mark.slow

DEMO_CONFIG = pl.REPO / "examples" / "demo.toml"
DEMO_TRAFFIC = pl.REPO / "scripts" / "demo_traffic.py"
# The demo application whose system prompt starts with the current time (its prefix is new
# on every request) sends its requests to this model, which caches for the probes.
CHURNING = "sim-cache-blocks"
PROVIDER, MODEL = "sim", "sim-cache-ok"
# The model the simulator breaks halfway through; it sits in the second round of the first
# probe cycle, so its whole first cycle (every probe) has hit by the time it breaks.
BREAKS = "sim-cache-write"
JOB = "prompt-cache-exporter"
# The demo probes 10x as often as the defaults the alerts are sized for (basic every 30 s,
# not 5 min), so every `for` is divided by 10: an alert needs as many bad verdicts in a row
# as in production, and the alerts keep their order (a model's cooldown alert fires before
# the failures it inhibits are notified).
FOR_SCALE = 10
# The traffic alerts' `for` is not tied to the probe intervals: 30 min of "prompts changed"
# become 1 min here, still 6 requests in a row of the churning sample application (one
# every 10 s at this test's pace). Scaled by 10 like the probes', that alert would arrive
# last, about 90 s after the others, and lengthen the run by as much.
TRAFFIC_FOR_SCALE = 30
# Alertmanager waits this long before the first notification of a group (30 s in
# prometheus/alertmanager.yml): long enough for the alert that inhibits it to arrive.
GROUP_WAIT = "15s"

# What the webhook must receive over the run, by receiver path: (path, alertname, model).
EXPECTED_ALERTS = {
    # The only page: caching stopped on a model that cached reliably.
    ("/critical", "LLMCacheCachingBroken", BREAKS),
    # Never cached, although priced for caching: a warning, not a page.
    ("/warning", "LLMCacheCachingNeverWorked", "sim-cache-broken"),
    # Only the shared chat-template tokens are ever cached (a busy server evicting ours).
    ("/warning", "LLMCacheCachingNeverWorked", "sim-cache-evicting"),
    # Hits about half the time: the hit-rate objective burns.
    ("/warning", "LLMCacheWarmHitRateBudgetBurn", "sim-cache-flaky"),
    # Every run fails: one alert, which inhibits the other failure alerts.
    ("/warning", "LLMCacheModelCooldown", "sim-error"),
    # A third of its requests get 429 (the simulator's seeded draws): with retries, some of
    # its runs fail and the error budget burns.
    ("/warning", "LLMCacheProbeErrorBudgetBurn", "sim-ratelimited"),
    # The sample application whose system prompt starts with the time: its requests never
    # hit, their prefix is new every time, and the probes say the model caches.
    ("/warning", "LLMCacheTrafficPromptsChanged", CHURNING),
    ("/heartbeat", "Watchdog", "-"),
}
# Alerts that may arrive too, and are right when they do. The seeded draws go to
# sim-ratelimited's requests in arrival order, and that order depends on timing (a ttl run's
# requests are concurrent, retries wait for Retry-After): usually two successes reset the
# failure count before it reaches 3, but three failed runs in a row do happen.
MAY_FIRE = {("/warning", "LLMCacheProbeFailuresRepeated", "sim-ratelimited")}
# Alerts that must fire in Prometheus for the failing models but reach nobody: the
# cooldown alert of the same model inhibits them.
INHIBITED = ("LLMCacheProbeFailuresRepeated", "LLMCacheProbeErrorBudgetBurn")
# Their flapping was the complaint: they must not resolve during the run.
NEVER_RESOLVED = {"LLMCacheModelCooldown", "LLMCacheCachingBroken", "LLMCacheCachingNeverWorked"}


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
    started: float = field(default_factory=time.monotonic)
    # (path, alertname, model) -> seconds after the stack started when it first arrived.
    first_seen: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def record(self, path: str, body: dict[str, Any]) -> None:
        self.received.append((path, body))
        for a in body.get("alerts", []):
            if a["status"] == "firing":
                key = (path, a["labels"].get("alertname", ""), a["labels"].get("model", "-"))
                self.first_seen.setdefault(key, round(time.monotonic() - self.started))

    def alerts(self) -> list[tuple[str, dict[str, Any]]]:
        return [(p, a) for p, body in list(self.received) for a in body.get("alerts", [])]

    def firing(self) -> set[tuple[str, str, str]]:
        return {
            (path, a["labels"].get("alertname", ""), a["labels"].get("model", "-"))
            for path, a in self.alerts()
            if a["status"] == "firing"
        }


def _start_webhook() -> tuple[Webhook, ThreadingHTTPServer]:
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            hook.record(self.path, json.loads(self.rfile.read(length)))
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

    client: httpx.Client

    def query(self, expr: str) -> dict[str, Any]:
        response = self.client.get(self.prometheus + "/api/v1/query", params={"query": expr})
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


def _substitute(text: str, pattern: str, replacement: str) -> str:
    """Replace the one line matching pattern; fail if examples/demo.toml no longer has it."""
    out, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, f"examples/demo.toml: expected one line matching {pattern!r}"
    return out


def demo_config(*, sim_url: str, db_path: Path, proxy_port: int) -> str:
    """examples/demo.toml as it is, but on free ports, a temporary database and the
    simulator of this test."""
    text = DEMO_CONFIG.read_text(encoding="utf-8")
    text = _substitute(text, r'^listen = "127\.0\.0\.1:9819"', 'listen = "127.0.0.1:0"')
    text = _substitute(text, r'^path = "data/demo\.db"', f'path = "{db_path}"')
    sim = r'^base_url = "http://127\.0\.0\.1:8089/v1"'
    text = _substitute(text, sim, f'base_url = "{sim_url}"')
    proxy = r'^listen = "127\.0\.0\.1:9820"'
    text = _substitute(text, proxy, f'listen = "127.0.0.1:{proxy_port}"')
    upstream = r'^upstream = "http://127\.0\.0\.1:8089/v1"'
    return _substitute(text, upstream, f'upstream = "{sim_url}"')


def _scaled(duration: str, scale: int) -> str:
    seconds = int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]
    return f"{max(1, seconds // scale)}s"


def scaled_alerts(path: Path, scale: int = FOR_SCALE) -> str:
    """A rule file with every `for` divided by ``scale``; nothing else changed."""
    text = path.read_text(encoding="utf-8")
    return re.sub(
        r"(?m)^(\s+for:\s*)(\d+[smh])\s*$",
        lambda m: m.group(1) + _scaled(m.group(2), scale),
        text,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = _binary("prometheus")
    alertmanager_bin = _binary("prometheus-alertmanager", "alertmanager")
    tmp = tmp_path_factory.mktemp("stack")
    hook, hook_server = _start_webhook()
    procs: list[subprocess.Popen[bytes]] = []

    # Alertmanager: the project's routes and inhibitions; receivers point at our webhook,
    # groups are flushed sooner (a run lasts minutes, not hours).
    am_config = yaml.safe_load(pl.ALERTMANAGER_CONFIG.read_text())
    am_config["route"]["group_wait"] = GROUP_WAIT
    am_config["route"]["group_interval"] = "10s"
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

    # The simulator with its default models, as `make demo` starts it.
    sim_port = free_port()
    sim_ctx = simulator(port=sim_port)
    sim = sim_ctx.__enter__()

    proxy_port = free_port()
    config = demo_config(sim_url=sim.base_url, db_path=tmp / "demo.db", proxy_port=proxy_port)
    (tmp / "exporter.toml").write_text(config)
    exporter = ExporterProcess(tmp / "exporter.toml").start()
    exporter_port = exporter.url.rsplit(":", 1)[1]
    # The demo's sample traffic through the demo's proxy, as `make demo` sends it, at twice
    # its pace (each 1-minute rate window of the panels has requests of both applications).
    traffic = _spawn(
        [
            sys.executable,
            str(DEMO_TRAFFIC),
            f"--proxy=http://127.0.0.1:{proxy_port}",
            "--interval=5",
            "--max-requests=200",
        ],
        tmp / "traffic.log",
    )
    procs.append(traffic)

    # Prometheus: the project's link and recording rules as they are, the alerting rules
    # (alerts.yml, and those of traffic.yml beside its recording rules) with `for` scaled;
    # 1 s scrape and evaluation.
    (tmp / "alerts.yml").write_text(scaled_alerts(pl.ALERTING_RULES))
    (tmp / "traffic.yml").write_text(scaled_alerts(pl.TRAFFIC_RULES, TRAFFIC_FOR_SCALE))
    prom_port = free_port()
    (tmp / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "evaluation_interval": "1s",
                    "scrape_timeout": "1s",
                },
                "rule_files": [
                    str(pl.LINKS_RULES),
                    str(pl.RECORDING_RULES),
                    str(tmp / "alerts.yml"),
                    str(tmp / "traffic.yml"),
                ],
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
    client = httpx.Client(timeout=30)
    try:
        assert wait_for(lambda: _ready(prometheus + "/-/ready"), 60), (
            tmp / "prometheus.log"
        ).read_text()
        assert wait_for(lambda: _ready(alertmanager + "/-/ready"), 60), (
            tmp / "alertmanager.log"
        ).read_text()
        stack = Stack(prometheus, alertmanager, exporter, hook, sim, client)
        # The first probe cycle of the model that will break: every probe ran and hit,
        # and Prometheus has recorded that it works ...
        done = f'llmcache_probe_last_run_timestamp_seconds{{model="{BREAKS}",probe="ttl"}} > 0'
        worked = (
            "provider_model_probe:llmcache_caching_last_worked:timestamp_seconds"
            f'{{model="{BREAKS}",probe="basic"}}'
        )
        assert wait_for(lambda: stack.value(done) is not None, 120), exporter.log()[-3000:]
        assert wait_for(lambda: stack.value(worked) is not None, 30)
        # ... then the provider stops caching for it. Same port, same models and the
        # balances the account has now; only sim-cache-write no longer reads its cache.
        balances = sim.stats()["balances"]
        broken = tmp / "sim-broken.toml"
        broken.write_text(
            f"balance_usd = {balances['usd']}\nbalance_diem = {balances['diem']}\n"
            f'[[models]]\nname = "{BREAKS}"\ncache_mode = "broken"\n'
        )
        sim_ctx.__exit__(None, None, None)
        sim_ctx = simulator("--config", str(broken), port=sim_port)
        stack.sim = sim_ctx.__enter__()
        # Every probe of every model has run once: the first probe cycle is complete.
        ran = f'count(llmcache_probe_last_run_timestamp_seconds{{provider="{PROVIDER}"}} > 0)'
        runs = f'count(llmcache_probe_last_run_timestamp_seconds{{provider="{PROVIDER}"}})'
        assert wait_for(lambda: stack.value(ran) == stack.value(runs), 120)
        yield stack
    finally:
        exporter.kill()
        client.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        sim_ctx.__exit__(None, None, None)
        hook_server.shutdown()


def test_every_rule_expression_evaluates(stack: Stack) -> None:
    failures = []
    for path in pl.RULE_FILES:
        for group in pl.load_yaml(path)["groups"]:
            for rule in group["rules"]:
                body = stack.query(rule["expr"])
                if body.get("status") != "success":
                    failures.append((rule.get("record") or rule.get("alert"), body))
    assert not failures, failures


def test_recording_rules_produce_series(stack: Stack) -> None:
    # Every recording rule has data (the long-window group evaluates once a minute, so its
    # first results take up to a minute to appear). Ratios divide by "> 0" denominators and
    # need traffic in their window, which the demo has (the probes', and the sample
    # traffic through the proxy for traffic.yml); the streak rules need a model without
    # hits (sim-cache-broken).
    records = [r["record"] for r in pl.recording_rules()]

    def empty() -> list[str]:
        return [r for r in records if stack.value(f"count({r})") is None]

    assert wait_for(lambda: not empty(), 90, interval=2.0), empty()


# Selections a user would make: All where the dashboard offers it, then one provider/model
# where each kind of panel has something to show (failures and alerts on sim-error, a
# broken cache on sim-cache-write, no hit ever on sim-cache-broken).
SELECTIONS: tuple[tuple[str | None, str | None], ...] = (
    (None, None),
    (PROVIDER, MODEL),
    (PROVIDER, "sim-error"),
    (PROVIDER, BREAKS),
    (PROVIDER, "sim-cache-broken"),
)


def documented_empty_panels() -> set[str]:
    """The "dashboard / panel" column of docs/dashboards.md, "Panels without data in the demo"."""
    text = (pl.REPO / "docs" / "dashboards.md").read_text(encoding="utf-8")
    section = text.split("## Panels without data in the demo", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| ([^|]+ / [^|]+?) \|", section, flags=re.M)) - {"dashboard / panel"}


def test_every_dashboard_panel_returns_data(stack: Stack) -> None:
    """Every query parses for every selection, and returns data for at least one of them,
    unless docs/dashboards.md lists its panel as empty in the demo, with the reason."""
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
    assert len(results) > 80
    empty = {name for name, outcomes in results.items() if not any(outcomes)}
    documented = documented_empty_panels()
    panels = {re.sub(r"^Prompt cache / | \[\w+\]$", "", name) for name in empty}
    assert panels == documented, (
        f"empty, not documented: {sorted(panels - documented)}; "
        f"documented, not empty: {sorted(documented - panels)}"
    )


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
    # Series created on first use (docs/metrics.md) have their family's TYPE line from
    # start-up: a name there is exposed, a misspelt one is not.
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
            exposed.update(name + suffix for suffix in suffixes)
    recorded = {rule["record"] for rule in pl.recording_rules()}
    exprs = [q.expr for q in pl.dashboard_queries()]
    exprs += [expr for _, expr in pl.rule_exprs()]
    used = {name for expr in exprs for name in pl.metric_names_in(expr)}
    # Prometheus' and Alertmanager's own metrics (the pipeline alerts and panels) come
    # from their scrapes: they must exist there, under these names, in these versions.
    own = {n for n in used if n.startswith(("prometheus_", "alertmanager_"))}
    absent = sorted(n for n in own if stack.value(f"count({n})") is None)
    assert not absent, absent
    missing = sorted(used - exposed - recorded - own - {"up", "ALERTS", "ALERTS_FOR_STATE"})
    missing = [n for n in missing if not n.startswith("scrape_")]
    assert not missing, missing


def test_alertmanager_receives_exactly_the_expected_alerts(stack: Stack) -> None:
    hook = stack.webhook
    assert wait_for(lambda: hook.firing() >= EXPECTED_ALERTS, 300, interval=1.0), (
        f"missing: {sorted(EXPECTED_ALERTS - hook.firing())}; got: {sorted(hook.firing())}"
    )
    # Anything else would have arrived by now: the last expected alert came after every
    # other pending one had passed its `for` and the group wait.
    time.sleep(10)
    # When each arrived, in seconds after the stack started (shown with `pytest -s`).
    for key, seconds in sorted(hook.first_seen.items(), key=lambda kv: kv[1]):
        print(f"{seconds:4d}s  {' '.join(key)}")
    assert hook.firing() - MAY_FIRE == EXPECTED_ALERTS, sorted(hook.firing() ^ EXPECTED_ALERTS)

    page = next(a for p, a in hook.alerts() if p == "/critical")
    assert page["labels"]["severity"] == "critical"
    assert (page["labels"]["provider"], page["labels"]["job"]) == (PROVIDER, JOB)
    assert page["annotations"]["runbook_url"] == (
        pl.link_bases()["runbook_url"] + "#llmcachecachingbroken"
    )
    assert page["annotations"]["dashboard_url"].startswith(
        pl.link_bases()["grafana_url"] + "/d/pce-model-detail?var-provider=sim&var-model="
    )
    flapped = sorted(
        (a["labels"]["alertname"], a["labels"].get("model"))
        for _, a in hook.alerts()
        if a["status"] == "resolved" and a["labels"]["alertname"] in NEVER_RESOLVED
    )
    assert not flapped, flapped
    # The failing models' other alerts fire in Prometheus, and reach nobody.
    for name in INHIBITED:
        firing = f'ALERTS{{alertname="{name}",model="sim-error",alertstate="firing"}}'
        assert stack.value(firing) is not None, name
