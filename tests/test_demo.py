"""`make demo` as a new user meets it: the real script, the real simulator and exporter, and
the Debian prometheus / prometheus-alertmanager binaries, on free loopback ports.

Prometheus and Alertmanager are required here (their absence fails the test); the demo
without them is exercised by hiding them from PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.simulator_process import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("SIM", "EXPORTER", "PROXY", "PROMETHEUS", "ALERTMANAGER", "WEBHOOK", "GRAFANA")


def _demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCE_")}
    env |= {f"PCE_DEMO_{name}_PORT": str(free_port()) for name in COMPONENTS}
    env["PCE_DEMO_DIR"] = str(tmp_path / "stack")
    env["PCE_STORAGE__PATH"] = str(tmp_path / "demo.db")  # not the repository's data/
    return env | extra


class Demo:
    """The demo running in its own session, as `make demo` runs in a terminal."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"demo exited {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.2)
        return self.text()

    def ctrl_c(self, timeout: float = 60) -> int:
        """SIGINT to the whole foreground group, as the terminal sends on Ctrl-C."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """After a failed test: SIGTERM, so the demo stops what it started (each child runs
        in its own session and would outlive a killed demo), SIGKILL only as a last resort."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def demo_runs(tmp_path: Path) -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        demo.stop()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _urls(text: str) -> list[str]:
    block = text.split("the demo is running", 1)[1].split("Failing on purpose", 1)[0]
    return re.findall(r"(http://127\.0\.0\.1:\d+/\S*)", block)


def test_busy_port_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    env = _demo_env(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env["PCE_DEMO_SIM_PORT"] = str(port)
        proc = subprocess.run(
            ["./scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 2
    assert proc.stdout == ""  # nothing was started
    assert proc.stderr.splitlines() == [
        f"demo: cannot start: 127.0.0.1:{port} (sim) already in use (another demo or exporter "
        "running?); stop it, or move the demo with PCE_DEMO_SIM_PORT"
    ]
    assert "Traceback" not in proc.stderr
    assert not _listening(int(env["PCE_DEMO_EXPORTER_PORT"]))


def test_demo_with_prometheus_and_alertmanager(tmp_path: Path, demo_runs: list[Demo]) -> None:
    for binary in ("prometheus", "prometheus-alertmanager"):
        assert shutil.which(binary), f"{binary} is required (Debian package of the same name)"
    env = _demo_env(tmp_path)
    demo = Demo(["./scripts/demo.sh"], env, tmp_path / "demo.log")
    demo_runs.append(demo)
    text = demo.wait_for("One model under the microscope")
    # It names the models that fail on purpose, and what each shows.
    failing = ("sim-error", "sim-ratelimited", "sim-cache-broken", "sim-cache-evicting")
    for model in (*failing, "sim-no-cache-fields"):
        assert re.search(rf"^\s+{model}\s+\S", text, re.MULTILINE), text
    assert "Grafana     not installed (grafana-server)" in text or "Grafana     http" in text
    urls = _urls(text)
    prometheus = f"http://127.0.0.1:{env['PCE_DEMO_PROMETHEUS_PORT']}"
    alertmanager = f"http://127.0.0.1:{env['PCE_DEMO_ALERTMANAGER_PORT']}"
    assert any(u.startswith(prometheus) and "alerts" in u for u in urls), urls
    assert any(u.startswith(prometheus) and "graph" in u for u in urls), urls
    assert any(u.startswith(alertmanager) for u in urls), urls
    proxy = f"http://127.0.0.1:{env['PCE_DEMO_PROXY_PORT']}"
    assert any(u.startswith(proxy) for u in urls), urls  # answered through to the simulator
    for url in urls:  # every printed URL answers
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, (url, response.status_code)
    rules = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    files = {Path(group["file"]).name for group in rules}
    # The project's own rule files, every one prometheus.yml loads.
    shipped = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())["rule_files"]
    assert files == {Path(name).name for name in shipped}

    def watchdog_delivered() -> bool:
        log = Path(env["PCE_DEMO_DIR"]) / "notifications.log"
        return log.exists() and "firing Watchdog" in log.read_text()

    def values(expr: str) -> list[float]:
        query = {"query": expr}
        result = httpx.get(prometheus + "/api/v1/query", params=query).json()["data"]["result"]
        return [float(r["value"][1]) for r in result]

    def exporter_up() -> bool:
        return values('up{job="prompt-cache-exporter"}') == [1.0]

    def sample_traffic_measured() -> bool:
        # Both demo applications' requests went through the proxy and were measured.
        expr = 'llmcache_traffic_requests_total{provider="sim", outcome="success"} > 0'
        return len(values(expr)) == 2

    # Prometheus scrapes the exporter, evaluates the rules and Alertmanager routes the
    # always-firing Watchdog to the heartbeat receiver: the whole alert path works; the
    # sample traffic reaches the proxy and is measured.
    deadline = time.monotonic() + 90
    while not (watchdog_delivered() and exporter_up() and sample_traffic_measured()):
        assert time.monotonic() < deadline, demo.text()
        time.sleep(1)

    assert demo.ctrl_c() == 0
    assert demo.text().rstrip().endswith("demo stopped")
    for name in ("SIM", "EXPORTER", "PROXY", "PROMETHEUS", "ALERTMANAGER", "WEBHOOK"):
        assert not _listening(int(env[f"PCE_DEMO_{name}_PORT"])), name


def test_demo_without_the_binaries_says_how_to_get_them(
    tmp_path: Path, demo_runs: list[Demo]
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = _demo_env(tmp_path, PATH=str(empty))  # no prometheus, alertmanager or grafana
    demo = Demo([sys.executable, "scripts/demo.py"], env, tmp_path / "demo.log")
    demo_runs.append(demo)
    text = demo.wait_for("One model under the microscope")
    assert "Prometheus  not installed: sudo apt-get install prometheus " in text
    assert "Grafana     not installed (grafana-server)" in text
    for url in _urls(text):
        assert httpx.get(url, timeout=10).status_code == 200, url
    assert demo.ctrl_c() == 0
    assert not _listening(int(env["PCE_DEMO_EXPORTER_PORT"]))
    assert not _listening(int(env["PCE_DEMO_PROXY_PORT"]))
