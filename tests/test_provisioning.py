"""The user interface as code: Prometheus rules, Alertmanager, Grafana, compose.

Everything here runs without the exporter. The real tools validate what they
own (promtool: config, rules and rule unit tests, and the PromQL of every
dashboard query; amtool: the Alertmanager config and its routes; a real
Alertmanager on loopback: the inhibition rules; docker-compose: the compose
file), and the helpers of tests/provisioning_lint.py check the conventions
between the files (metric contract, runbook, dashboards, data sources).

The binaries are required, as in CI: a missing one fails the test with the
package to install, it never skips.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import tomllib
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import provisioning_lint as pl

PACKAGES = {
    "promtool": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "amtool": "prometheus-alertmanager",
    "docker-compose": "docker-compose",
}
EXPECTED_DASHBOARDS = {
    "overview.json": "pce-overview",
    "model-detail.json": "pce-model-detail",
    "cost-budget.json": "pce-cost-budget",
    "exporter-health.json": "pce-exporter-health",
}
EXPECTED_SERVICES = {
    "exporter",
    "prometheus",
    "alertmanager",
    "grafana",
    "alert-webhook",
    "simulator",
}
SEVERITIES = {"critical", "warning", "info", "none"}
# Watchdog fires whatever the input: there is no non-firing case to test.
ALWAYS_FIRING = {"Watchdog"}
# Panel types that show no values of their own and so need no unit.
UNITLESS_PANEL_TYPES = {"row", "text", "dashlist", "alertlist", "news"}
# Panel types that show static content and run no query.
QUERYLESS_PANEL_TYPES = {"text"}


def require(*names: str) -> str:
    """Path of the first of `names` on PATH; fail (never skip) if none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    package = PACKAGES.get(names[0], names[0])
    pytest.fail(
        f"required binary {' or '.join(names)} not found on PATH; "
        f"install it (Debian package `{package}`) - these tests never skip",
        pytrace=False,
    )


def run(*args: str, cwd: Path = pl.REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{proc.stdout}\n{proc.stderr}"


# ============================================================== promtool / amtool


def test_prometheus_config_is_valid() -> None:
    # Also checks that the rule files it names exist and parse.
    assert_ok(run(require("promtool"), "check", "config", str(pl.PROMETHEUS_CONFIG)))


def test_rule_files_are_valid() -> None:
    assert_ok(run(require("promtool"), "check", "rules", *(str(p) for p in pl.RULE_FILES)))


def test_rule_unit_tests_pass() -> None:
    files = sorted(str(p) for p in pl.RULE_TESTS_DIR.glob("*.yml"))
    assert files, "no promtool test files in prometheus/tests/"
    assert_ok(run(require("promtool"), "test", "rules", *files, timeout=120))


def test_alertmanager_config_is_valid() -> None:
    assert_ok(run(require("amtool"), "check-config", str(pl.ALERTMANAGER_CONFIG)))


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ({"alertname": "LLMCacheCachingBroken", "severity": "critical"}, "critical"),
        ({"alertname": "LLMCacheBalanceLow", "severity": "warning"}, "warning"),
        ({"alertname": "LLMCacheCachingNeverWorked", "severity": "warning"}, "warning"),
        ({"alertname": "LLMCacheProbeErrorBudgetBurn", "severity": "warning"}, "warning"),
        ({"alertname": "LLMCacheCachePollution", "severity": "info"}, "null"),
        ({"alertname": "Watchdog", "severity": "none"}, "heartbeat"),
        # Without a severity an alert still reaches a human.
        ({"alertname": "SomethingElse"}, "warning"),
    ],
)
def test_alertmanager_routes_by_severity(labels: dict[str, str], receiver: str) -> None:
    args = [f"{k}={v}" for k, v in labels.items()]
    assert_ok(
        run(
            require("amtool"),
            "config",
            "routes",
            "test",
            f"--config.file={pl.ALERTMANAGER_CONFIG}",
            f"--verify.receivers={receiver}",
            *args,
        )
    )


def test_every_severity_of_the_rules_is_routed() -> None:
    routed = set()
    for route in pl.load_yaml(pl.ALERTMANAGER_CONFIG)["route"]["routes"]:
        for matcher in route.get("matchers", []):
            m = re.fullmatch(r'severity=~?"([^"]+)"', matcher)
            if m:
                routed |= set(m.group(1).split("|"))
    used = {r["labels"]["severity"] for r in pl.alerting_rules()}
    assert used <= routed, f"severities without a route: {used - routed}"


# ============================================================ Alertmanager, live


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real Alertmanager with prometheus/alertmanager.yml, on loopback."""
    binary = require("prometheus-alertmanager", "alertmanager")
    port = _free_port()
    data = tmp_path_factory.mktemp("alertmanager")
    # Logs go to a file: a pipe nobody reads could fill up and block the process.
    log_path = data / "alertmanager.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={pl.ALERTMANAGER_CONFIG}",
            f"--storage.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with _http(url + "/-/ready", timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"alertmanager exited:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("alertmanager did not become ready within 20 s")
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def _http(request: str | urllib.request.Request, timeout: float = 5) -> Any:
    """urlopen for the loopback Alertmanager this module starts (always http://127.0.0.1)."""
    # S310 audits URLs that could be file: or custom schemes; ours are built above.
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310


def _post_alerts(url: str, alerts: list[dict[str, str]]) -> None:
    now = datetime.now(UTC)
    body = [
        {
            "labels": labels,
            "annotations": {},
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(hours=1)).isoformat(),
        }
        for labels in alerts
    ]
    request = urllib.request.Request(  # noqa: S310 - loopback http URL built by this module
        url + "/api/v2/alerts",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with _http(request) as response:
        assert response.status == 200


def _inhibited(url: str, job: str) -> dict[str, bool]:
    """alertname+labels key -> whether Alertmanager reports it inhibited."""
    with _http(url + "/api/v2/alerts") as response:
        alerts = json.load(response)
    return {
        _key(a["labels"]): bool(a["status"]["inhibitedBy"])
        for a in alerts
        if a["labels"].get("job", "").startswith(job)
    }


def _key(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def _alert(name: str, job: str, severity: str, **labels: str) -> dict[str, str]:
    return {
        "alertname": name,
        "job": job,
        "severity": severity,
        "instance": "exporter:9819",
        **labels,
    }


# Per scenario: source alerts, alerts they must inhibit, alerts they must not.
# Every scenario uses its own `job`, so they cannot inhibit each other.
INHIBITION_SCENARIOS = {
    "exporter-down": (
        [_alert("LLMCacheExporterDown", "j1", "critical")],
        [
            _alert(
                "LLMCacheCachingBroken",
                "j1",
                "critical",
                provider="venice",
                model="m",
                probe="basic",
            ),
            _alert("LLMCacheBalanceLow", "j1", "warning", provider="venice", currency="usd"),
        ],
        [
            _alert(
                "LLMCacheCachingBroken",
                "j1-other",
                "critical",
                provider="venice",
                model="m",
                probe="basic",
            )
        ],
    ),
    "fast-burn-over-slow-burn": (
        [
            _alert(
                "LLMCacheWarmHitRateBudgetBurn",
                "j2",
                "warning",
                provider="venice",
                model="m",
                long="1h",
                short="5m",
            )
        ],
        [
            _alert(
                "LLMCacheWarmHitRateBudgetBurn",
                "j2",
                "warning",
                provider="venice",
                model="m",
                long=long,
                short=short,
            )
            for long, short in (("1d", "2h"), ("3d", "6h"))
        ],
        [
            # Another model, and another fast pair, are not redundant.
            _alert(
                "LLMCacheWarmHitRateBudgetBurn",
                "j2",
                "warning",
                provider="venice",
                model="m2",
                long="1d",
                short="2h",
            ),
            _alert(
                "LLMCacheWarmHitRateBudgetBurn",
                "j2",
                "warning",
                provider="venice",
                model="m",
                long="6h",
                short="30m",
            ),
        ],
    ),
    "caching-broken-over-hit-ratio": (
        [
            _alert(
                "LLMCacheCachingBroken",
                "j3",
                "critical",
                provider="venice",
                model="m",
                probe="basic",
            )
        ],
        [
            _alert("LLMCacheHitRatioDropped", "j3", "warning", provider="venice", model="m"),
            _alert(
                "LLMCacheWarmHitRateBudgetBurn",
                "j3",
                "warning",
                provider="venice",
                model="m",
                long="3d",
                short="6h",
            ),
        ],
        [_alert("LLMCacheHitRatioDropped", "j3", "warning", provider="venice", model="m2")],
    ),
    "cooldown-over-everything-else-about-a-failing-model": (
        [_alert("LLMCacheModelCooldown", "j4", "warning", provider="venice", model="m")],
        [
            _alert("LLMCacheProbeFailuresRepeated", "j4", "warning", provider="venice", model="m"),
            _alert("LLMCacheRequestErrorsHigh", "j4", "warning", provider="venice", model="m"),
            _alert(
                "LLMCacheProbeErrorBudgetBurn",
                "j4",
                "warning",
                provider="venice",
                model="m",
                long="1h",
                short="5m",
            ),
            _alert(
                "LLMCacheProbesStale", "j4", "warning", provider="venice", model="m", probe="ttl"
            ),
        ],
        [
            _alert("LLMCacheProbeFailuresRepeated", "j4", "warning", provider="venice", model="m2"),
            # A broken cache is not explained by failures.
            _alert(
                "LLMCacheCachingBroken",
                "j4",
                "critical",
                provider="venice",
                model="m",
                probe="basic",
            ),
        ],
    ),
    "repeated-failures-over-error-ratios": (
        [_alert("LLMCacheProbeFailuresRepeated", "j7", "warning", provider="venice", model="m")],
        [
            _alert("LLMCacheRequestErrorsHigh", "j7", "warning", provider="venice", model="m"),
            _alert(
                "LLMCacheProbeErrorBudgetBurn",
                "j7",
                "warning",
                provider="venice",
                model="m",
                long="6h",
                short="30m",
            ),
        ],
        [_alert("LLMCacheRequestErrorsHigh", "j7", "warning", provider="venice", model="m2")],
    ),
    "outage-over-the-failures-of-the-providers-models": (
        [_alert("LLMCacheProviderOutage", "j8", "warning", provider="venice", reason="outage")],
        [
            _alert("LLMCacheProbeFailuresRepeated", "j8", "warning", provider="venice", model="m"),
            _alert("LLMCacheModelCooldown", "j8", "warning", provider="venice", model="m2"),
            _alert("LLMCacheRequestErrorsHigh", "j8", "warning", provider="venice", model="m3"),
            _alert(
                "LLMCacheProbeErrorBudgetBurn",
                "j8",
                "warning",
                provider="venice",
                model="m",
                long="1h",
                short="5m",
            ),
            _alert(
                "LLMCacheProbesStale", "j8", "warning", provider="venice", model="m2", probe="ttl"
            ),
        ],
        [
            # Another provider's failing model is its own problem.
            _alert("LLMCacheModelCooldown", "j8", "warning", provider="openai", model="m"),
            _alert("LLMCacheProbeFailuresRepeated", "j8", "warning", provider="openai", model="m2"),
            # Not a failure alert: the balance says something the outage does not.
            _alert("LLMCacheBalanceLow", "j8", "warning", provider="venice", currency="usd"),
            _alert(
                "LLMCacheCachingBroken",
                "j8",
                "critical",
                provider="venice",
                model="m",
                probe="basic",
            ),
        ],
    ),
    "budget-exhausted-over-nearly-and-pause": (
        [_alert("LLMCacheBudgetExhausted", "j5", "warning", provider="venice")],
        [
            _alert(
                "LLMCacheBudgetNearlyExhausted",
                "j5",
                "warning",
                provider="venice",
                window="day",
                unit="tokens",
            ),
            _alert("LLMCacheProviderPaused", "j5", "warning", provider="venice", reason="budget"),
        ],
        [
            _alert("LLMCacheProviderPaused", "j5", "warning", provider="venice", reason="balance"),
            _alert(
                "LLMCacheBudgetNearlyExhausted",
                "j5",
                "warning",
                provider="openai",
                window="day",
                unit="tokens",
            ),
        ],
    ),
    "paused-for-balance-over-balance-alerts": (
        [_alert("LLMCacheProviderPaused", "j6", "warning", provider="venice", reason="balance")],
        [
            _alert("LLMCacheBalanceLow", "j6", "warning", provider="venice", currency="diem"),
            _alert("LLMCacheBalanceRunwayLow", "j6", "warning", provider="venice", currency="usd"),
        ],
        [_alert("LLMCacheBalanceLow", "j6", "warning", provider="openai", currency="usd")],
    ),
}


@pytest.mark.parametrize("scenario", sorted(INHIBITION_SCENARIOS))
def test_alertmanager_inhibition(alertmanager: str, scenario: str) -> None:
    sources, inhibited, not_inhibited = INHIBITION_SCENARIOS[scenario]
    job = sources[0]["job"]
    _post_alerts(alertmanager, sources + inhibited + not_inhibited)
    expected = {_key(a): True for a in inhibited} | {_key(a): False for a in not_inhibited}
    expected |= {_key(a): False for a in sources}
    # The inhibitor learns about new source alerts asynchronously: poll briefly.
    deadline = time.monotonic() + 10
    while True:
        got = _inhibited(alertmanager, job)
        if all(got.get(k) == v for k, v in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    wrong = {k: got.get(k) for k, v in expected.items() if got.get(k) != v}
    assert not wrong, f"inhibited state differs from expected {expected}: {wrong}"


# ===================================================================== compose


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    """`docker-compose config` with the demo profile, parsed (paths resolved)."""
    binary = require("docker-compose")
    proc = run(binary, "-f", str(pl.COMPOSE_FILE), "--profile", "demo", "config")
    assert_ok(proc)
    return dict(yaml.safe_load(proc.stdout))


@pytest.mark.parametrize("profile", [None, "demo"])
def test_compose_file_is_valid(profile: str | None) -> None:
    args = (
        ["-f", str(pl.COMPOSE_FILE)]
        + (["--profile", profile] if profile else [])
        + ["config", "-q"]
    )
    assert_ok(run(require("docker-compose"), *args))


def test_compose_services_and_profiles(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert set(services) == EXPECTED_SERVICES
    assert services["simulator"].get("profiles") == ["demo"]
    assert [name for name, s in services.items() if s.get("profiles") and name != "simulator"] == []
    assert services["simulator"]["command"] == ["simulate", "--host", "0.0.0.0", "--port", "8089"]
    assert services["simulator"]["image"] == services["exporter"]["image"]


def test_compose_services_have_healthchecks(compose_config: dict[str, Any]) -> None:
    missing = [
        name
        for name, s in compose_config["services"].items()
        if not s.get("healthcheck", {}).get("test")
    ]
    assert not missing, f"services without a healthcheck: {missing}"


def test_compose_images_are_pinned(compose_config: dict[str, Any]) -> None:
    for name, service in compose_config["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert re.search(r":v?\d+\.\d+\.\d+[\w.-]*$", image), (
            f"{name}: image {image} is not pinned to a version"
        )


def test_grafana_starts_without_internet_access(compose_config: dict[str, Any]) -> None:
    # A synchronous plugin install that cannot reach grafana.com stops Grafana; an
    # asynchronous one (or the background updater) fails or replaces bundled plugins.
    grafana = compose_config["services"]["grafana"]
    env = grafana["environment"]
    downloads = {"GF_INSTALL_PLUGINS", "GF_PLUGINS_PREINSTALL", "GF_PLUGINS_PREINSTALL_SYNC"}
    assert not downloads & set(env), sorted(downloads & set(env))
    assert env["GF_PLUGINS_PREINSTALL_DISABLED"] == "true"
    assert env["GF_PLUGINS_PUBLIC_KEY_RETRIEVAL_DISABLED"] == "true"
    # Plugins come from files in grafana/plugins/ (docs/dashboards.md).
    assert Path(_binds(grafana)["/var/lib/grafana/plugins"]) == pl.REPO / "grafana" / "plugins"


def _binds(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path of the bind mounts (named volumes excluded)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("/"):
            out[target] = source
    return out


def test_compose_bind_mounts_exist(compose_config: dict[str, Any]) -> None:
    for name, service in compose_config["services"].items():
        for target, source in _binds(service).items():
            assert Path(source).exists(), f"{name}: {source} (mounted at {target}) does not exist"


def test_compose_wiring_matches_the_configs(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    exporter = _binds(services["exporter"])
    assert Path(exporter["/etc/prompt-cache-exporter/config.toml"]) == pl.COMPOSE_EXPORTER_CONFIG
    assert any(
        v.startswith("exporter-data:/var/lib/prompt-cache-exporter")
        for v in services["exporter"]["volumes"]
    )
    assert any(p.startswith("127.0.0.1:9819:9819") for p in services["exporter"]["ports"])
    # The proxy of examples/compose.toml, on the host's loopback only.
    assert any(p.startswith("127.0.0.1:9820:9820") for p in services["exporter"]["ports"])

    prometheus = _binds(services["prometheus"])
    assert Path(prometheus["/etc/prometheus/prometheus.yml"]) == pl.PROMETHEUS_CONFIG
    assert Path(prometheus["/etc/prometheus/rules"]) == pl.RECORDING_RULES.parent
    assert (
        Path(_binds(services["alertmanager"])["/etc/alertmanager/alertmanager.yml"])
        == pl.ALERTMANAGER_CONFIG
    )

    grafana = _binds(services["grafana"])
    provider_path = pl.load_yaml(pl.DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    assert Path(grafana[provider_path]) == pl.DASHBOARDS_DIR
    assert Path(grafana["/etc/grafana/provisioning/datasources"]) == pl.DATASOURCES.parent
    assert Path(grafana["/etc/grafana/provisioning/dashboards"]) == pl.DASHBOARD_PROVIDERS.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider_path}/overview.json"


def test_dockerfile() -> None:
    text = (pl.REPO / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+$", text, flags=re.M)
    assert "pip install --no-cache-dir" in text
    assert re.search(r"^USER (?!root)\S+", text, flags=re.M)
    assert "EXPOSE 9819" in text
    assert re.search(r"^HEALTHCHECK .*\n?.*urllib\.request.*/healthz", text, flags=re.M)
    assert 'ENTRYPOINT ["prompt-cache-exporter"]' in text
    ignore = (pl.REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert {"*", "!pyproject.toml", "!README.md", "!exporter/"} <= set(ignore)


def test_compose_exporter_config() -> None:
    config = tomllib.loads(pl.COMPOSE_EXPORTER_CONFIG.read_text(encoding="utf-8"))
    assert config["server"]["listen"] == "0.0.0.0:9819"
    assert config["storage"]["path"].startswith("/var/lib/prompt-cache-exporter/")
    (provider,) = config["providers"]
    assert provider["base_url"] == "http://simulator:8089/v1"
    # The simulator speaks Venice's dialect: only the venice type reads its balance
    # headers and published prices, which the balance and price panels need.
    assert provider["type"] == "venice"
    assert provider["include"] == ["sim-*"]
    assert set(config["probes"]) == {"basic", "prompt_sizes", "partial", "persistence", "ttl"}
    # Its proxy forwards to the same simulator under the same provider label, and listens
    # where docker-compose.yml publishes it.
    (proxy,) = config["proxies"]
    assert (proxy["upstream"], proxy["provider"]) == (provider["base_url"], provider["name"])
    assert proxy["type"] == provider["type"]
    assert proxy["listen"] == "0.0.0.0:9820"


def test_compose_exporter_config_is_accepted_by_the_exporter() -> None:
    # The exporter's own loader: unknown keys, types and cross-field rules.
    from exporter.config import load_config

    config = load_config(pl.COMPOSE_EXPORTER_CONFIG, env={})
    assert config.server.port == 9819


# ================================================================ Prometheus config


def test_prometheus_scrapes_the_exporter_and_alerts_to_alertmanager() -> None:
    config = pl.load_yaml(pl.PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"prompt-cache-exporter", "prometheus", "alertmanager"} <= set(jobs)
    targets = [t for sc in jobs["prompt-cache-exporter"]["static_configs"] for t in sc["targets"]]
    assert targets == ["exporter:9819"]
    am = [
        t
        for a in config["alerting"]["alertmanagers"]
        for sc in a["static_configs"]
        for t in sc["targets"]
    ]
    assert am == ["alertmanager:9093"]
    assert config["rule_files"] == [
        "rules/links.yml",
        "rules/recording.yml",
        "rules/alerts.yml",
        "rules/traffic.yml",
    ]
    # The exporter-down alert selects the job by this name.
    down = next(r for r in pl.alerting_rules() if r["alert"] == "LLMCacheExporterDown")
    assert 'up{job="prompt-cache-exporter"}' in down["expr"]


def test_grafana_time_interval_equals_scrape_interval() -> None:
    scrape = pl.load_yaml(pl.PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    prometheus = next(
        d for d in pl.load_yaml(pl.DATASOURCES)["datasources"] if d["type"] == "prometheus"
    )
    assert prometheus["jsonData"]["timeInterval"] == scrape


def test_grafana_datasources() -> None:
    sources = {d["uid"]: d for d in pl.load_yaml(pl.DATASOURCES)["datasources"]}
    assert sources["prometheus"]["type"] == "prometheus"
    assert sources["prometheus"]["jsonData"]["httpMethod"] == "POST"
    assert sources["alertmanager"]["type"] == "alertmanager"
    assert sources["alertmanager"]["jsonData"]["implementation"] == "prometheus"
    api = sources[pl.JSON_API_DATASOURCE_UID]
    assert api["type"] == "yesoreyeram-infinity-datasource"
    assert api["jsonData"]["allowedHosts"] == [api["url"]]


def test_grafana_dashboard_provider() -> None:
    (provider,) = pl.load_yaml(pl.DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False
    assert provider["folder"]


# ============================================================================ rules


def test_alerts_follow_mixin_conventions() -> None:
    for rule in pl.alerting_rules():
        name = rule["alert"]
        assert name in ALWAYS_FIRING or re.fullmatch(r"LLMCache(?:[A-Z][a-z0-9]+)+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{name}: no {key}"
        # Link bases come from links.yml, the one setting (docs/runbook.md).
        assert annotations["runbook_url"] == f"{pl.RUNBOOK_LINK}#{name.lower()}", name
        if name not in ALWAYS_FIRING:
            assert "{{" in annotations["description"], f"{name}: description is not templated"
            assert "dashboard_url" in annotations, f"{name}: no dashboard_url"


def test_watchdog_exists() -> None:
    (watchdog,) = [r for r in pl.alerting_rules() if r["alert"] == "Watchdog"]
    assert watchdog["expr"].strip() == "vector(1)"
    assert watchdog["labels"]["severity"] == "none"


def test_dashboard_urls_point_at_existing_dashboards() -> None:
    uids = {d["uid"] for d in pl.dashboards().values()}
    for rule in pl.alerting_rules():
        url = rule["annotations"].get("dashboard_url")
        if url:
            m = re.match(re.escape(pl.GRAFANA_LINK) + r"/d/([\w-]+)", url)
            assert m, f"{rule['alert']}: {url} does not start with the Grafana base of links.yml"
            assert m.group(1) in uids, f"{rule['alert']}: {url}"
            # Variables in the link are URL-encoded (model ids contain `/`, `:`).
            for value in re.findall(r"var-\w+=([^&]*)", url):
                assert "| urlquery" in value, f"{rule['alert']}: {value} is not URL-encoded"


def test_the_links_setting_is_one_series_with_every_base() -> None:
    (links,) = pl.recording_rules()[:1]
    assert links["record"] == pl.LINKS_SERIES
    assert links["expr"].strip() == "vector(1)"
    assert set(links["labels"]) == {"grafana_url", "runbook_url", "exporter_url"}
    for label, url in links["labels"].items():
        assert re.fullmatch(r"https?://[^\s/]+(/\S*)?", url), (label, url)
        assert not url.endswith("/"), f"{label}: no trailing slash (paths are appended)"


def test_pages_are_only_for_what_needs_acting_on_now() -> None:
    # Critical means "wake someone": the exporter is down, or caching broke on a model
    # that used to cache. Everything else is a ticket (warning) or context (info).
    critical = {r["alert"] for r in pl.alerting_rules() if r["labels"]["severity"] == "critical"}
    assert critical == {"LLMCacheExporterDown", "LLMCacheCachingBroken"}


def test_rule_test_files_order_every_group_they_load() -> None:
    # promtool evaluates the groups of a test in the listed order; a group left out
    # would be evaluated in an arbitrary place and could see stale recorded values.
    for path in sorted(pl.RULE_TESTS_DIR.glob("*.yml")):
        spec = pl.load_yaml(path)
        loaded = [
            group["name"]
            for rule_file in spec["rule_files"]
            for group in pl.rule_groups(path.parent / rule_file)
        ]
        assert spec["group_eval_order"] == loaded, path.name


def test_every_runbook_url_has_a_runbook_section() -> None:
    sections = pl.runbook_sections()
    for rule in pl.alerting_rules():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in sections, f"{rule['alert']}: docs/runbook.md has no heading for #{anchor}"
        text = sections[anchor].lower()
        for part in ("meaning", "threshold", "what to do"):
            assert part in text, f"runbook section #{anchor} does not say its {part}"


def test_every_alert_has_a_firing_and_a_non_firing_test() -> None:
    cases = pl.alert_test_cases()
    fires = {c.alertname for c in cases if c.fires}
    quiet = {c.alertname for c in cases if not c.fires}
    alerts = {r["alert"] for r in pl.alerting_rules()}
    assert alerts - fires == set(), "alerts without a promtool test where they fire"
    assert alerts - ALWAYS_FIRING - quiet == set(), (
        "alerts without a promtool test where they do not fire"
    )
    assert {c.alertname for c in cases} <= alerts, "tests for alerts that do not exist"


def test_every_burn_rate_window_pair_fires_in_a_test() -> None:
    fired: set[tuple[str, str]] = set()
    for path in sorted(pl.RULE_TESTS_DIR.glob("*.yml")):
        for group in pl.load_yaml(path).get("tests", []):
            for case in group.get("alert_rule_test", []) or []:
                for alert in case.get("exp_alerts") or []:
                    long = alert.get("exp_labels", {}).get("long")
                    if long:
                        fired.add((case["alertname"], long))
    for rule in pl.alerting_rules():
        if "long" in rule["labels"]:
            assert (rule["alert"], rule["labels"]["long"]) in fired, (rule["alert"], rule["labels"])


def test_recording_rules_are_named_and_tested() -> None:
    tested = " ".join(pl.promql_test_exprs())
    names = [r["record"] for r in pl.recording_rules()]
    for name in names:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), (
            f"{name} is not level:metric:operations"
        )
        assert re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", tested), (
            f"{name} has no promql_expr_test"
        )
    # A name may repeat only with distinguishing static labels (the quantiles).
    duplicates = [n for n, c in Counter(names).items() if c > 1]
    for name in duplicates:
        labels = [
            tuple(sorted(r.get("labels", {}).items()))
            for r in pl.recording_rules()
            if r["record"] == name
        ]
        assert len(set(labels)) == len(labels), name


def test_ratios_are_never_averaged() -> None:
    for name, expr in pl.rule_exprs():
        assert not re.search(r"\bavg(_over_time)?\s*(by|without|\()", expr), (
            f"{name} averages: {expr}"
        )
        assert "llmcache_hit_ratio" not in pl.metric_names_in(expr) or name.startswith(
            "LLMCache"
        ), name


@pytest.mark.parametrize(("name", "expr"), pl.rule_exprs(), ids=[n for n, _ in pl.rule_exprs()])
def test_rules_use_only_documented_metrics_and_labels(name: str, expr: str) -> None:
    _check_metrics_and_labels(expr, name)


def _check_metrics_and_labels(expr: str, where: str) -> None:
    unknown = sorted(n for n in pl.metric_names_in(expr) if not pl.is_known_metric(n))
    assert not unknown, f"{where}: metrics not in docs/metrics.md nor recording rules: {unknown}"
    for metric, labels in pl.selectors_in(expr):
        allowed = pl.series_labels(metric)
        if allowed is None:
            continue
        assert labels <= allowed, f"{where}: {metric} has no label(s) {sorted(labels - allowed)}"


# ======================================================================= dashboards


def test_dashboards_are_the_expected_ones() -> None:
    dashboards = pl.dashboards()  # raises on invalid JSON
    assert {name: d["uid"] for name, d in dashboards.items()} == EXPECTED_DASHBOARDS
    titles = [d["title"] for d in dashboards.values()]
    assert len(set(titles)) == len(titles)


@pytest.fixture(params=sorted(EXPECTED_DASHBOARDS))
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return pl.dashboards()[request.param]


def test_dashboard_top_level(dashboard: dict[str, Any]) -> None:
    assert dashboard["id"] is None
    assert 8 <= len(dashboard["uid"]) <= 40
    assert "prompt-cache-exporter" in dashboard["tags"]
    assert dashboard["schemaVersion"] == 39
    assert dashboard.get("description")
    (link,) = [link for link in dashboard["links"] if link["type"] == "dashboards"]
    assert link["tags"] == ["prompt-cache-exporter"]
    assert link["includeVars"] is True
    assert link["keepTime"] is True


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = pl.dashboard_variables(dashboard)
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name in ("provider", "model") if "model" in variables else ("provider",):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == pl.PROMETHEUS_DATASOURCE
        assert pl.label_values_selector(var["query"]) is not None, var["query"]
        if var.get("includeAll"):
            assert var["allValue"] == ".*"
            assert var["multi"] is True
    if "job" in variables:
        # No custom All value: All is then the jobs the query found (the exporter's),
        # not `.*`, which would match the Prometheus and Alertmanager targets as well.
        assert variables["job"].get("allValue") is None
        assert "llmcache_" in variables["job"]["query"]
    assert "provider" in variables
    if dashboard["uid"] != "pce-exporter-health":
        assert "model" in variables
    # `model` depends on the selected provider.
    if "model" in variables:
        assert "$provider" in variables["model"]["query"]


def test_dashboard_panels(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in pl.iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    for panel in pl.iter_panels(dashboard):
        where = f"{dashboard['title']} / panel {panel['id']}"
        assert panel.get("title", "").strip(), f"{where}: no title"
        if panel["type"] == "row":
            continue
        assert panel.get("description", "").strip(), f"{where} ({panel['title']}): no description"
        if panel["type"] not in UNITLESS_PANEL_TYPES:
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
            assert unit, f"{where} ({panel['title']}): no unit"
        if panel["type"] in QUERYLESS_PANEL_TYPES:
            assert not panel.get("targets"), f"{where}: a {panel['type']} panel runs no query"
            continue
        ds = panel.get("datasource")
        assert ds == pl.PROMETHEUS_DATASOURCE or ds.get("uid") == pl.JSON_API_DATASOURCE_UID, (
            f"{where} ({panel['title']}): data source {ds} is neither "
            "${datasource} nor the JSON API"
        )
        assert panel.get("targets"), f"{where} ({panel['title']}): no query"
        for target in panel["targets"]:
            assert target.get("datasource", ds) == ds, (
                f"{where}: target data source differs from the panel's"
            )


def test_dashboard_links_percent_encode_what_they_carry(dashboard: dict[str, Any]) -> None:
    # Model ids contain `/` and `:` (org/model, model:tag): a raw value breaks the link.
    urls = re.findall(r'"url": "([^"]*)"', json.dumps(dashboard))
    assert urls or dashboard["uid"] == "pce-exporter-health"
    for url in urls:
        for ref in re.findall(r"\$\{([^}]+)\}", url):
            name = ref.split(":")[0]
            if name.startswith("__data.fields.") or name in {"provider", "model"}:
                assert ref.endswith(":percentencode"), f"{dashboard['title']}: {url}"


def test_dashboards_are_read_only(dashboard: dict[str, Any]) -> None:
    assert dashboard["editable"] is False


def test_dashboard_layout(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0, f"{panel['title']} is outside the grid"
        assert g["x"] + g["w"] <= 24, f"{panel['title']} is outside the grid"
        for y in range(g["y"], g["y"] + g["h"]):
            for x in range(g["x"], g["x"] + g["w"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


TRAFFIC_RATIO = "provider_model:llmcache_traffic_cached_tokens_per_prompt_tokens:ratio_rate1h"
TRAFFIC_CHURN = "provider_model:llmcache_traffic_prefix_changes_per_prefix_requests:ratio_rate1h"


@pytest.mark.parametrize("name", ["overview.json", "model-detail.json"])
def test_real_traffic_row_puts_the_traffic_beside_the_probe_verdict(name: str) -> None:
    """Provider or prompt? (docs/proxy.md): one row of traffic panels, one of which shows
    the real hit ratio and the basic probe's verdict together; the 1 h ratios come from the
    recording rules of traffic.yml, and every panel below the row reads traffic."""
    dashboard = pl.dashboards()[name]
    (row,) = [p for p in dashboard["panels"] if p["type"] == "row" and "Real traffic" in p["title"]]
    below = {p["id"] for p in dashboard["panels"] if p["gridPos"]["y"] > row["gridPos"]["y"]}
    assert below, f"{name}: the traffic row has no panels"
    names: dict[int, set[str]] = {}
    for query in pl.dashboard_queries():
        if query.dashboard_uid == dashboard["uid"] and query.panel_id in below:
            names.setdefault(query.panel_id, set()).update(pl.metric_names_in(query.expr))
    traffic = {r.get("record") for g in pl.rule_groups(pl.TRAFFIC_RULES) for r in g["rules"]}
    for panel_id, used in names.items():
        assert any(n.startswith("llmcache_traffic_") or n in traffic for n in used), panel_id
    assert any(
        TRAFFIC_RATIO in used and "llmcache_caching_works" in used for used in names.values()
    ), f"{name}: no panel shows the real hit ratio beside the probe verdict"
    everything = set().union(*names.values())
    churn = {TRAFFIC_CHURN, "provider_model_part:llmcache_traffic_prefix_changes:rate1h"}
    assert churn & everything, f"{name}: no prefix churn"
    assert "llmcache_traffic_savings_usd_total" in everything, f"{name}: no real savings"


def test_dashboard_datasource_uids_are_provisioned() -> None:
    provisioned = {d["uid"] for d in pl.load_yaml(pl.DATASOURCES)["datasources"]}
    for query in (
        pl.dashboard_queries(include_json_api=True)
        + pl.annotation_queries()
        + pl.variable_queries()
    ):
        uid = query.datasource_uid
        assert uid == "${datasource}" or uid in provisioned, (
            f"{query.describe()}: unknown data source {uid}"
        )


DASHBOARD_PROMQL = pl.dashboard_queries() + pl.annotation_queries()


@pytest.mark.parametrize("query", DASHBOARD_PROMQL, ids=[q.describe() for q in DASHBOARD_PROMQL])
def test_dashboard_query(query: pl.PanelQuery) -> None:
    assert query.expr.strip(), f"{query.describe()}: empty query"
    for window in pl.range_windows_in(query.expr):
        assert window in pl.DASHBOARD_RANGE_WINDOWS, (
            f"{query.describe()}: range [{window}]: use $__rate_interval (or $__range "
            "for a total over the time range), or a recording rule for a fixed window"
        )
    _check_metrics_and_labels(query.expr, query.describe())


def test_dashboard_queries_use_only_defined_variables() -> None:
    by_uid = {d["uid"]: d for d in pl.dashboards().values()}
    queries = (
        pl.dashboard_queries(include_json_api=True)
        + pl.annotation_queries()
        + pl.variable_queries()
    )
    for query in queries:
        defined = set(pl.dashboard_variables(by_uid[query.dashboard_uid])) | pl.GRAFANA_BUILTINS
        undefined = pl.variables_in(query.expr) - defined
        assert not undefined, f"{query.describe()}: undefined variables {undefined}"


def test_variable_queries_use_documented_metrics() -> None:
    for query in pl.variable_queries():
        selector = pl.label_values_selector(query.expr)
        assert selector is not None, query.describe()
        _check_metrics_and_labels(selector, query.describe())


def test_json_api_queries() -> None:
    queries = pl.json_api_queries()
    assert queries, "the Model detail dashboard has no evidence table"
    for query in queries:
        assert query.dashboard_uid == "pce-model-detail"
        assert query.expr.startswith("/api/runs?"), query.expr
        assert "${provider:percentencode}" in query.expr
        assert "${model:percentencode}" in query.expr
    urls = [
        u
        for _, u in pl.substituted_json_api_urls(
            "my provider", "org/model", "http://127.0.0.1:9819/"
        )
    ]
    assert (
        "http://127.0.0.1:9819/api/runs?provider=my%20provider&model=org%2Fmodel&limit=50" in urls
    )


def test_dashboard_promql_parses_once_substituted(tmp_path: Path) -> None:
    """Every query, variables substituted as Grafana would, is valid PromQL (promtool parses it)."""
    queries = pl.substituted_queries(provider="sim", model="sim-cache-ok")
    covered = {q for q, _ in queries}
    assert covered >= set(DASHBOARD_PROMQL), "some dashboard queries could not be substituted"
    variables = [(q, pl.label_values_selector(q.expr) or "") for q in pl.variable_queries()]
    by_uid = {d["uid"]: d for d in pl.dashboards().values()}
    variables = [
        (
            q,
            pl.substitute_variables(
                sel, pl.variable_values(by_uid[q.dashboard_uid], provider="sim", model="m")
            ),
        )
        for q, sel in variables
    ]
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": expr}
        for i, (_, expr) in enumerate(queries + variables)
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8"
    )
    proc = run(require("promtool"), "check", "rules", str(path))
    if proc.returncode != 0:
        index = {
            f"dashboard:query_{i}:check": q.describe()
            for i, (q, _) in enumerate(queries + variables)
        }
        message = re.sub(
            r"dashboard:query_\d+:check",
            lambda m: index.get(m.group(0), m.group(0)),
            proc.stdout + proc.stderr,
        )
        pytest.fail(f"invalid PromQL in dashboards:\n{message}", pytrace=False)


def test_substitution_helpers() -> None:
    values = {"provider": "a|b", "model": "x/y", "__rate_interval": "1m"}
    text = (
        'rate(m{provider=~"$provider", model="${model}"}[$__rate_interval]) ${model:percentencode}'
    )
    assert (
        pl.substitute_variables(text, values) == 'rate(m{provider=~"a|b", model="x/y"}[1m]) x%2Fy'
    )
    with pytest.raises(KeyError):
        pl.substitute_variables("$undefined", values)
    expr = (
        'sum by (job) (rate(llmcache_requests_total{outcome="failure"}[5m]))'
        " / on (job) group_left () up offset 1h"
    )
    assert pl.metric_names_in(expr) == {"llmcache_requests_total", "up"}
    assert pl.selectors_in('x{a="}", b=~"$c"} + y') == [("x", frozenset({"a", "b"}))]
