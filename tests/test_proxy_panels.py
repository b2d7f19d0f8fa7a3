"""The proposed traffic rows of docs/proxy-panels.md are valid: the JSON parses, every query is
valid PromQL once the Grafana variables are substituted (promtool), and uses only documented
metrics, recorded series and the dashboards' range windows."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests import provisioning_lint as pl

PANELS_DOC = pl.REPO / "docs" / "proxy-panels.md"
VALUES = {
    "datasource": "prometheus",
    "provider": "sim",
    "model": "sim-cache-ok",
    "__rate_interval": "1m",
    "__range": "1h",
}


def _proposed() -> dict[str, list[dict[str, Any]]]:
    match = re.search(r"```json\n(.*?)\n```", PANELS_DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert match, "docs/proxy-panels.md has no json block"
    data: dict[str, list[dict[str, Any]]] = json.loads(match.group(1))
    return data


def _queries() -> list[tuple[str, str]]:
    return [
        (f"{board}: {panel['title']}", target["expr"])
        for board, panels in _proposed().items()
        for panel in panels
        for target in panel.get("targets", [])
    ]


def test_the_rows_are_for_the_two_dashboards_with_unused_ids() -> None:
    proposed = _proposed()
    assert set(proposed) == {"overview", "model-detail"}
    existing = {name: {p["id"] for p in d["panels"]} for name, d in pl.dashboards().items()}
    for board, panels in proposed.items():
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids))
        # Ids free in the dashboard as it is now (the lead merges the row into it).
        assert not set(ids) & existing.get(f"{board}.json", set()), board
        assert panels[0]["type"] == "row"
        for panel in panels[1:]:
            assert panel["datasource"] == pl.PROMETHEUS_DATASOURCE, panel["title"]
            assert panel["description"], panel["title"]


def test_queries_use_documented_metrics_and_dashboard_windows() -> None:
    for where, expr in _queries():
        unknown = sorted(n for n in pl.metric_names_in(expr) if not pl.is_known_metric(n))
        assert not unknown, f"{where}: unknown metrics {unknown}"
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window in pl.DASHBOARD_RANGE_WINDOWS, f"{where}: window [{window}]"
        for metric, labels in pl.selectors_in(expr):
            allowed = pl.series_labels(metric)
            assert allowed is None or labels <= allowed, f"{where}: {metric} {labels}"


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (Debian package prometheus)"
    rules = [
        {"record": f"panel:query_{i}:check", "expr": pl.substitute_variables(expr, VALUES)}
        for i, (_, expr) in enumerate(_queries())
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
