"""``make demo``: the exporter probing the bundled SIMULATOR, plus whatever of Prometheus,
Alertmanager and Grafana is installed, all on 127.0.0.1. Ctrl-C stops everything it started.

The simulator is NOT a real LLM provider: it emulates prompt caching, including models that
fail on purpose, so every panel and alert has something to show and nothing costs money.

Prometheus and Alertmanager run from their Debian binaries (packages ``prometheus`` and
``prometheus-alertmanager``) with the project's own rule files and routes; Grafana runs from
a ``grafana-server`` binary with the project's provisioning. The configurations they get are
the committed files with only the container host names replaced by loopback addresses, so
the demo shows the rules and routes that ship. Missing binaries are skipped with a line
saying how to get them.

The exporter's pass-through proxy (the ``[[proxies]]`` listener of examples/demo.toml) gets a
small, bounded stream of sample traffic from two made-up applications (scripts/demo_traffic.py),
so the dashboards' traffic rows and the "prompts changed" alert have data.

Every port is checked before anything starts. Ports can be moved with environment
variables (``PCE_DEMO_SIM_PORT``, ``PCE_DEMO_EXPORTER_PORT``, ``PCE_DEMO_PROXY_PORT``,
``PCE_DEMO_PROMETHEUS_PORT``,
``PCE_DEMO_ALERTMANAGER_PORT``, ``PCE_DEMO_WEBHOOK_PORT``, ``PCE_DEMO_GRAFANA_PORT``); the
working files go to ``PCE_DEMO_DIR`` (default ``data/demo-stack``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import demo_traffic  # scripts/, beside this file

from exporter.simulator.models import DEFAULT_MODELS

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
DEMO_CONFIG = ROOT / "examples" / "demo.toml"
# The addresses examples/demo.toml uses; a moved port gets a derived copy of the file.
DEMO_SIM_ADDRESS, DEMO_EXPORTER_ADDRESS = "127.0.0.1:8089", "127.0.0.1:9819"
DEMO_PROXY_ADDRESS = "127.0.0.1:9820"
HOST = "127.0.0.1"
START_SECONDS = 60.0  # each component must answer its health check within this
STOP_SECONDS = 20.0  # each component gets this long to stop before it is killed

# What the simulated models show; the ones that fail on purpose say so.
FAILING_ON_PURPOSE = {
    "sim-error": "HTTP 500 on every request: failed runs, cooldown, failure alerts",
    "sim-ratelimited": "429 on a third of requests: retries, Retry-After, sometimes a failed run",
    "sim-cache-broken": 'answers, but never serves from cache: verdict "broken"',
    "sim-cache-evicting": 'a busy server: only the shared template is ever cached: "broken"',
    "sim-no-cache-fields": 'reports no cache fields at all: "not reported", no verdict',
}
INSTALL_PROM = (
    "sudo apt-get install prometheus prometheus-alertmanager (Debian/Ubuntu), or the whole "
    "stack with: docker-compose --profile demo up --build"
)
INSTALL_GRAFANA = (
    "install Grafana (grafana.com/docs/grafana/latest/setup-grafana/installation/debian), or "
    "use: docker-compose --profile demo up --build"
)


def say(text: str = "") -> None:
    print(text, flush=True)


def fail(text: str, status: int = 1) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)
    raise SystemExit(status)


@dataclass
class Ports:
    sim: int
    exporter: int
    proxy: int
    prometheus: int
    alertmanager: int
    webhook: int
    grafana: int

    @classmethod
    def from_env(cls) -> Ports:
        def port(name: str, default: int) -> int:
            text = os.environ.get(f"PCE_DEMO_{name}_PORT", str(default))
            if not text.isdigit() or not 0 < int(text) < 65536:
                fail(f"PCE_DEMO_{name}_PORT: not a port number: {text!r}", 2)
            return int(text)

        return cls(
            sim=port("SIM", 8089),
            exporter=port("EXPORTER", 9819),
            proxy=port("PROXY", 9820),
            prometheus=port("PROMETHEUS", 9090),
            alertmanager=port("ALERTMANAGER", 9093),
            webhook=port("WEBHOOK", 9097),
            grafana=port("GRAFANA", 3000),
        )


@dataclass
class Binaries:
    prometheus: str | None = field(default_factory=lambda: shutil.which("prometheus"))
    alertmanager: str | None = field(
        default_factory=lambda: (
            shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        )
    )
    grafana: str | None = field(default_factory=lambda: shutil.which("grafana-server"))


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: a port in TIME_WAIT is free, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def check_ports(wanted: dict[str, int]) -> None:
    """One line naming every busy port, before anything starts."""
    seen: dict[int, str] = {}
    for name, port in wanted.items():
        if port in seen:
            fail(f"{name} and {seen[port]} would both use port {port}", 2)
        seen[port] = name
    busy = [name for name, port in wanted.items() if not port_free(port)]
    if busy:
        where = " and ".join(f"{HOST}:{wanted[name]} ({name})" for name in busy)
        variables = ", ".join(f"PCE_DEMO_{name.upper()}_PORT" for name in busy)
        fail(
            f"cannot start: {where} already in use (another demo or exporter running?); "
            f"stop it, or move the demo with {variables}",
            2,
        )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer of its own, not a 200


_DIRECT = urllib.request.build_opener(_NoRedirects)


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 itself (redirects do not count)."""
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback URLs
        return json.loads(response.read())


class Stack:
    """The processes the demo started; ``stop`` ends them all, newest first."""

    def __init__(self, directory: Path, stopping: threading.Event) -> None:
        self.directory = directory
        self.stopping = stopping
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.webhook: ThreadingHTTPServer | None = None
        self.threads: list[threading.Thread] = []

    def start(
        self,
        name: str,
        args: list[str],
        *,
        health: str,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        out = log.open("wb") if log else None
        # Its own process group: Ctrl-C reaches only the demo, which stops each child once
        # (a second signal could cut a graceful shutdown short).
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env=env,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        deadline = time.monotonic() + START_SECONDS
        while not answers(health):
            if self.stopping.is_set():
                raise SystemExit(0)  # Ctrl-C while starting
            if proc.poll() is not None:
                where = f"; its log: {log}" if log else ""
                fail(f"{name} exited with status {proc.returncode} at start{where}")
            if time.monotonic() > deadline:
                fail(f"{name} did not answer {health} within {START_SECONDS:.0f}s")
            time.sleep(0.1)

    def exited(self) -> tuple[str, int] | None:
        for name, proc in self.procs:
            status = proc.poll()
            if status is not None:
                return name, status
        return None

    def stop(self) -> None:
        # The sample traffic first: it talks to the exporter.
        self.stopping.set()
        for thread in self.threads:
            thread.join(demo_traffic.TIMEOUT_SECONDS + STOP_SECONDS)
        # Newest first, one at a time: the exporter finishes its runs while the simulator
        # still answers, so the last evidence it records is not a shutdown artefact.
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                say(f"demo: {name} did not stop within {STOP_SECONDS:.0f}s: killing it")
                proc.kill()
                proc.wait()
        if self.webhook is not None:
            self.webhook.shutdown()
            self.webhook.server_close()


def start_webhook(stack: Stack, port: int) -> None:
    """The receiver Alertmanager's routes deliver to: one line per notified alert."""
    log = (stack.directory / "notifications.log").open("a", encoding="utf-8")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.end_headers()
            try:
                alerts = json.loads(body).get("alerts", [])
            except ValueError:
                alerts = []
            receiver = self.path.strip("/")
            for alert in alerts:
                labels = alert.get("labels", {})
                target = "/".join(filter(None, (labels.get("provider"), labels.get("model"))))
                line = (
                    f"{time.strftime('%H:%M:%S')} [alertmanager -> {receiver}] "
                    f"{alert.get('status')} {labels.get('alertname')} {target or '-'}: "
                    f"{alert.get('annotations', {}).get('summary', '')}"
                )
                with lock:
                    log.write(line + "\n")
                    log.flush()
                if receiver != "heartbeat":  # Watchdog every few minutes is noise here
                    say(line)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((HOST, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stack.webhook = server


def write_alertmanager_config(stack: Stack, ports: Ports) -> Path:
    text = (ROOT / "prometheus" / "alertmanager.yml").read_text(encoding="utf-8")
    text = text.replace("http://alert-webhook:5001", f"http://{HOST}:{ports.webhook}")
    path = stack.directory / "alertmanager.yml"
    path.write_text(text, encoding="utf-8")
    return path


def write_prometheus_config(stack: Stack, ports: Ports) -> Path:
    text = (ROOT / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    rules = ROOT / "prometheus" / "rules"
    for old, new in (
        ("exporter:9819", f"{HOST}:{ports.exporter}"),
        ("alertmanager:9093", f"{HOST}:{ports.alertmanager}"),
        ("localhost:9090", f"{HOST}:{ports.prometheus}"),
        # Rule files are relative to the config file, which now lives in the demo directory.
        ("- rules/", f"- {rules}/"),
    ):
        text = text.replace(old, new)
    path = stack.directory / "prometheus.yml"
    path.write_text(text, encoding="utf-8")
    return path


def write_grafana_provisioning(stack: Stack, ports: Ports) -> Path:
    target = stack.directory / "grafana" / "provisioning"
    for kind in ("datasources", "dashboards"):
        (target / kind).mkdir(parents=True, exist_ok=True)
    sources = (ROOT / "grafana/provisioning/datasources/datasources.yml").read_text("utf-8")
    for old, new in (
        ("http://prometheus:9090", f"http://{HOST}:{ports.prometheus}"),
        ("http://alertmanager:9093", f"http://{HOST}:{ports.alertmanager}"),
        ("http://exporter:9819", f"http://{HOST}:{ports.exporter}"),
    ):
        sources = sources.replace(old, new)
    (target / "datasources" / "datasources.yml").write_text(sources, encoding="utf-8")
    boards = (ROOT / "grafana/provisioning/dashboards/dashboards.yml").read_text("utf-8")
    boards = boards.replace(
        "/etc/grafana/dashboards/prompt-cache-exporter", str(ROOT / "grafana" / "dashboards")
    )
    (target / "dashboards" / "dashboards.yml").write_text(boards, encoding="utf-8")
    return target


def exporter_config(stack: Stack, ports: Ports) -> Path:
    """examples/demo.toml, or a copy pointing at moved simulator/exporter/proxy ports."""
    moved = {
        DEMO_SIM_ADDRESS: f"{HOST}:{ports.sim}",
        DEMO_EXPORTER_ADDRESS: f"{HOST}:{ports.exporter}",
        DEMO_PROXY_ADDRESS: f"{HOST}:{ports.proxy}",
    }
    if all(old == new for old, new in moved.items()):
        return DEMO_CONFIG
    text = DEMO_CONFIG.read_text(encoding="utf-8")
    for old, new in moved.items():
        text = text.replace(old, new)
    path = stack.directory / "demo.toml"
    path.write_text(text, encoding="utf-8")
    return path


def ui_page(prometheus: str, page: str) -> str:
    """The URL of a Prometheus UI page. Debian's build ships only the classic UI, under
    /classic/; upstream binaries serve /alerts and /graph (v3 redirects /graph to /query)."""
    for path in (f"/{page}", f"/classic/{page}"):
        if answers(prometheus + path):
            return prometheus + path
    return prometheus + f"/{page}"


def rules_loaded(prometheus: str) -> tuple[int, int]:
    """(alerting, recording) rules Prometheus has loaded."""
    groups = get_json(prometheus + "/api/v1/rules")["data"]["groups"]
    kinds = [rule["type"] for group in groups for rule in group["rules"]]
    return kinds.count("alerting"), kinds.count("recording")


def run(stack: Stack, ports: Ports, binaries: Binaries) -> None:
    cli = str(BIN / "prompt-cache-exporter")
    wanted = {"sim": ports.sim, "exporter": ports.exporter, "proxy": ports.proxy}
    if binaries.prometheus:
        wanted["prometheus"] = ports.prometheus
    if binaries.alertmanager:
        wanted |= {"alertmanager": ports.alertmanager, "webhook": ports.webhook}
    if binaries.grafana:
        wanted["grafana"] = ports.grafana
    check_ports(wanted)

    sim_url = f"http://{HOST}:{ports.sim}"
    say(f"== starting the SIMULATOR on {HOST}:{ports.sim} (not a real provider) ==")
    stack.start(
        "simulator",
        [cli, "simulate", "--host", HOST, "--port", str(ports.sim)],
        health=sim_url + "/healthz",
    )
    exporter_url = f"http://{HOST}:{ports.exporter}"
    config = exporter_config(stack, ports)
    shown = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    say(f"== starting prompt-cache-exporter with {shown} ==")
    stack.start(
        "exporter",
        [cli, "run", "--config", str(config)],
        health=exporter_url + "/healthz",
    )
    proxy_url = f"http://{HOST}:{ports.proxy}"
    traffic = threading.Thread(
        target=demo_traffic.run,
        args=(proxy_url, stack.stopping),
        kwargs={"report": say},
        name="sample-traffic",
        daemon=True,
    )
    traffic.start()
    stack.threads.append(traffic)

    alertmanager_url = prometheus_url = grafana_url = None
    if binaries.alertmanager:
        start_webhook(stack, ports.webhook)
        alertmanager_url = f"http://{HOST}:{ports.alertmanager}"
        stack.start(
            "alertmanager",
            [
                binaries.alertmanager,
                f"--config.file={write_alertmanager_config(stack, ports)}",
                f"--storage.path={stack.directory / 'alertmanager'}",
                f"--web.listen-address={HOST}:{ports.alertmanager}",
                f"--web.external-url={alertmanager_url}/",
                "--cluster.listen-address=",  # one instance: no gossip port
            ],
            health=alertmanager_url + "/-/ready",
            log=stack.directory / "alertmanager.log",
        )
    if binaries.prometheus:
        prometheus_url = f"http://{HOST}:{ports.prometheus}"
        stack.start(
            "prometheus",
            [
                binaries.prometheus,
                f"--config.file={write_prometheus_config(stack, ports)}",
                f"--storage.tsdb.path={stack.directory / 'prometheus'}",
                f"--web.listen-address={HOST}:{ports.prometheus}",
                f"--web.external-url={prometheus_url}/",
                "--web.enable-lifecycle",
            ],
            health=prometheus_url + "/-/ready",
            log=stack.directory / "prometheus.log",
        )
    if binaries.grafana:
        grafana_url = f"http://{HOST}:{ports.grafana}"
        home = os.environ.get("GRAFANA_HOME", "/usr/share/grafana")
        env = {
            **os.environ,
            "GF_PATHS_PROVISIONING": str(write_grafana_provisioning(stack, ports)),
            "GF_PATHS_DATA": str(stack.directory / "grafana" / "data"),
            "GF_PATHS_LOGS": str(stack.directory / "grafana" / "logs"),
            "GF_SERVER_HTTP_ADDR": HOST,
            "GF_SERVER_HTTP_PORT": str(ports.grafana),
            "GF_SERVER_ROOT_URL": grafana_url + "/",
            "GF_AUTH_ANONYMOUS_ENABLED": "true",
            "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
            "GF_USERS_ALLOW_SIGN_UP": "false",
            "GF_ANALYTICS_REPORTING_ENABLED": "false",
            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": str(
                ROOT / "grafana" / "dashboards" / "overview.json"
            ),
        }
        stack.start(
            "grafana",
            [binaries.grafana, f"--homepath={home}"],
            health=grafana_url + "/api/health",
            log=stack.directory / "grafana.log",
            env=env,
        )

    summary(ports, exporter_url, prometheus_url, alertmanager_url, grafana_url, binaries)


def summary(
    ports: Ports,
    exporter: str,
    prometheus: str | None,
    alertmanager: str | None,
    grafana: str | None,
    binaries: Binaries,
) -> None:
    sim_base = f"http://{HOST}:{ports.sim}/v1"
    apps = ", ".join(f"{app.name} ({app.model})" for app in demo_traffic.APPS)
    lines = [
        "",
        "== the demo is running; Ctrl-C stops everything it started ==",
        f"   simulator   {sim_base}/models  (a SIMULATOR, not a real provider; costs nothing)",
        f"   exporter    {exporter}/  (what is probed, and links)",
        f"               {exporter}/metrics",
        f"               {exporter}/api/runs?model=sim-cache-ok&limit=5  (evidence)",
        f"   proxy       http://{HOST}:{ports.proxy}  (pass-through to the simulator: point an "
        "OpenAI client's base URL here)",
        f"               http://{HOST}:{ports.proxy}/models  (forwarded to the simulator)",
        "               sample traffic through it, a request every "
        f"{demo_traffic.INTERVAL_SECONDS:.0f}s: {apps}",
    ]
    if prometheus:
        alerting, recording = rules_loaded(prometheus)
        graph = urllib.parse.urlencode(
            {"g0.expr": "llmcache_caching_works", "g0.tab": "0", "g0.range_input": "15m"}
        )
        lines += [
            f"   Prometheus  {ui_page(prometheus, 'alerts')}  ({alerting} alerting and "
            f"{recording} recording rules of prometheus/rules/)",
            f"               {ui_page(prometheus, 'graph')}?{graph}",
        ]
    else:
        lines.append(f"   Prometheus  not installed: {INSTALL_PROM}")
    if alertmanager:
        lines.append(
            f"   Alertmanager {alertmanager}/#/alerts  (routes of prometheus/alertmanager.yml; "
            "notifications are printed here)"
        )
    elif binaries.prometheus:
        lines.append(f"   Alertmanager not installed: {INSTALL_PROM}")
    if grafana:
        lines.append(f"   Grafana     {grafana}/  (the four dashboards of grafana/dashboards/)")
    else:
        lines.append(f"   Grafana     not installed (grafana-server): {INSTALL_GRAFANA}")
    lines += ["", "   Failing on purpose, so the alerts and error panels have something to show:"]
    lines += [f"     {model:<20} {what}" for model, what in FAILING_ON_PURPOSE.items()]
    others = ", ".join(m.name for m in DEFAULT_MODELS if m.name not in FAILING_ON_PURPOSE)
    lines += textwrap.wrap(
        f"The others cache as their names say: {others}.",
        width=92,
        initial_indent="   ",
        subsequent_indent="     ",
    )
    lines += [
        "",
        "   One model under the microscope:",
        f"     {BIN.relative_to(ROOT)}/prompt-cache-exporter probe --base-url {sim_base} "
        "--model sim-cache-short-ttl --probe ttl",
        "",
    ]
    for line in lines:
        say(line)


def main() -> int:
    ports = Ports.from_env()
    directory = Path(os.environ.get("PCE_DEMO_DIR") or ROOT / "data" / "demo-stack")
    if not (BIN / "prompt-cache-exporter").exists():
        fail(f"{BIN / 'prompt-cache-exporter'} not found: run `make bootstrap` (or `make demo`)")
    # A fresh directory each time: Prometheus data of an earlier demo would show old alerts.
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    stopping = threading.Event()
    stack = Stack(directory, stopping)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        previous[stop_signal] = signal.signal(stop_signal, on_signal)
    status = 0
    try:
        try:
            run(stack, ports, Binaries())
        except SystemExit as exc:
            return int(exc.code or 0)
        while not stopping.wait(0.5):
            ended = stack.exited()
            if ended:
                name, code = ended
                say(f"demo: {name} exited with status {code}; stopping the rest")
                status = 1
                break
    finally:
        if stack.procs:
            say("== stopping the demo ==")
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stack.procs:
        say("demo stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
