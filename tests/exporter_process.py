"""Run the real exporter (`python -m exporter run`) as a child process, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import PROBE_NAMES

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def probes_toml(**probes: str) -> str:
    """[probes.*] tables: the named probes enabled with "interval/timeout" (plus any extra
    lines after a ';'), every other probe disabled. ``basic="1s/900ms"``."""
    out = []
    for name in PROBE_NAMES:
        spec = probes.get(name)
        if spec is None:
            out.append(f"[probes.{name}]\nenabled = false")
            continue
        timing, _, extra = spec.partition(";")
        interval, timeout = timing.split("/")
        lines = [f"[probes.{name}]", f'interval = "{interval}"', f'timeout = "{timeout}"']
        lines += [line.strip() for line in extra.split(";") if line.strip()]
        out.append("\n".join(lines))
    return "\n".join(out) + "\n"


def sim_provider(base_url: str, *lines: str, isolation_delay: str = "0s") -> str:
    """One [[providers]] table "sim" (OpenAI-style, key from SIM_API_KEY, no isolation
    delay unless given) plus ``lines`` (its model selection and any other setting)."""
    head = f'[[providers]]\nname = "sim"\ntype = "openai"\nbase_url = "{base_url}"\n'
    key = f'api_key_env = "SIM_API_KEY"\nisolation_delay = "{isolation_delay}"\n'
    return head + key + "\n".join(lines) + "\n"


def config_text(
    *,
    sim_url: str,
    db_path: Path,
    listen: str = "127.0.0.1:0",
    providers: str | None = None,
    probes: str | None = None,
    extra: str = "",
) -> str:
    probes = (
        probes
        or """
[probes.basic]
interval = "2s"
timeout = "1s"
[probes.prompt_sizes]
interval = "30s"
timeout = "20s"
sizes = { small = 1100, medium = 2000 }
[probes.partial]
interval = "10s"
timeout = "5s"
[probes.persistence]
interval = "15s"
timeout = "10s"
requests = 4
[probes.ttl]
interval = "30s"
timeout = "20s"
delays = ["1s", "4s"]
"""
    )
    providers = (
        providers
        or f"""
[[providers]]
name = "sim"
type = "openai"
base_url = "{sim_url}"
api_key_env = "SIM_API_KEY"
include = ["sim-*"]
concurrency = 4
isolation_delay = "0s"
[providers.prices."sim-*"]
input = 1.0
output = 4.0
cache_read = 0.1

[[providers]]
name = "venice-sim"
type = "venice"
base_url = "{sim_url}"
api_key_env = "SIM_API_KEY"
include = ["sim-cache-ok", "sim-cache-write"]
concurrency = 2
isolation_delay = "0s"
[providers.budget]
daily_tokens = 5000000
"""
    )
    return f"""
log_level = "info"
[server]
listen = "{listen}"
[storage]
path = "{db_path}"
[http]
timeout = "5s"
backoff = "10ms"
backoff_max = "20ms"
max_retry_after = "500ms"  # sim-ratelimited says 1 s: fail fast, as rate_limit
[scheduler]
cooldown = "10m"
{extra}
{probes}
{providers}
"""


@dataclass
class ExporterProcess:
    config_path: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    log_path: Path = field(default_factory=lambda: Path("/dev/null"))

    def start(self, timeout: float = 30.0) -> ExporterProcess:
        self.log_path = self.config_path.with_suffix(f".{time.monotonic_ns()}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PCE_")}
        # The child keeps its own descriptor; ours is closed at once (no leak per start).
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "exporter", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = re.search(r"serving on (http://\S+)", text)
            if match:
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError("exporter did not start:\n" + self.log_path.read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def scrape(self, accept: str | None = None) -> Samples:
        headers = {"Accept": accept} if accept else {}
        response = httpx.get(self.url + "/metrics", headers=headers, timeout=10)
        response.raise_for_status()
        return parse(response.text)

    def wait_for_verdict(self, model: str, works: float = 1, timeout: float = 30) -> bool:
        """Whether the basic probe of ``model`` (provider "sim") shows ``caching_works ==
        works`` within ``timeout`` seconds."""
        labels = {"provider": "sim", "model": model, "probe": "basic"}
        return wait_for(
            lambda: value(self.scrape(), "llmcache_caching_works", **labels) == works, timeout
        )

    def families(self) -> set[str]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {f.name for f in text_string_to_metric_families(text)}


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_for(predicate: object, timeout: float, interval: float = 0.25) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
