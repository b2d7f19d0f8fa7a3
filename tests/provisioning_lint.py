"""Read and check the provisioning files: rules, dashboards, the metric contract.

Used by tests/test_provisioning.py (static checks) and meant to be imported by the
end-to-end test that scrapes a live exporter with a real Prometheus:

    from tests.provisioning_lint import substituted_queries, rule_exprs

    for query, promql in substituted_queries(provider="sim", model="sim-cache-ok"):
        ...  # GET /api/v1/query?query=<promql>; expect status "success"

PromQL is not parsed here with a real parser: the helpers tokenise just enough to
find metric names, label matchers and range windows (string literals, label
blocks, grouping clauses and durations are stripped first). Syntax itself is
checked by promtool (see test_provisioning.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
LINKS_RULES = PROMETHEUS_DIR / "rules" / "links.yml"
RECORDING_RULES = PROMETHEUS_DIR / "rules" / "recording.yml"
ALERTING_RULES = PROMETHEUS_DIR / "rules" / "alerts.yml"
# Recording rules and alerts on proxied traffic, in one file (docs/proxy.md).
TRAFFIC_RULES = PROMETHEUS_DIR / "rules" / "traffic.yml"
# Every rule file Prometheus loads, in the order of prometheus.yml.
RULE_FILES = (LINKS_RULES, RECORDING_RULES, ALERTING_RULES, TRAFFIC_RULES)
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
ALERTMANAGER_CONFIG = PROMETHEUS_DIR / "alertmanager.yml"
DASHBOARDS_DIR = REPO / "grafana" / "dashboards"
DATASOURCES = REPO / "grafana" / "provisioning" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDERS = REPO / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
METRICS_DOC = REPO / "docs" / "metrics.md"
RUNBOOK = REPO / "docs" / "runbook.md"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_EXPORTER_CONFIG = REPO / "examples" / "compose.toml"

# The series of links.yml that carries the link bases, and how annotations read them.
LINKS_SERIES = "llmcache:links:info"


def link_base(label: str) -> str:
    """The annotation template that expands to one link base of links.yml."""
    first = f'{{{{ . | first | label "{label}" }}}}'
    return f'{{{{ with query "{LINKS_SERIES}" }}}}{first}{{{{ end }}}}'


RUNBOOK_LINK = link_base("runbook_url")
GRAFANA_LINK = link_base("grafana_url")
PROMETHEUS_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
JSON_API_DATASOURCE_UID = "pce-exporter-api"

# Grafana's built-in variables that may appear in queries.
GRAFANA_BUILTINS = frozenset(
    {
        "__rate_interval",
        "__interval",
        "__interval_ms",
        "__range",
        "__range_s",
        "__range_ms",
        "__from",
        "__to",
        "__dashboard",
        "__org",
        "__user",
        "__all",
    }
)
# Range windows a dashboard query may use. `$__rate_interval` follows the scrape
# interval and the panel resolution; `$__range` is the dashboard time range, for
# "total over the selected range" stats. Anything else (e.g. `[1h]`) belongs in a
# recording rule.
DASHBOARD_RANGE_WINDOWS = frozenset(
    {"$__rate_interval", "${__rate_interval}", "$__range", "${__range}"}
)

# What "All" stands for where a variable has no custom All value (Grafana then joins
# the values it found): the exporter job of docker-compose.yml.
ALL_VALUES = {"job": "prompt-cache-exporter"}

# Series that are not in docs/metrics.md but may be used: Prometheus' own, and
# the process/platform collectors of prometheus-client.
EXTERNAL_METRIC_PATTERNS = (
    re.compile(r"^up$"),
    re.compile(r"^ALERTS(_FOR_STATE)?$"),
    re.compile(r"^scrape_[a-z_]+$"),
    re.compile(r"^process_[a-z_]+$"),
    re.compile(r"^python_[a-z_]+$"),
    # Prometheus' and Alertmanager's own metrics, for the alerting-pipeline alerts.
    re.compile(r"^prometheus_[a-z_]+$"),
    re.compile(r"^alertmanager_[a-z_]+$"),
)
TARGET_LABELS = frozenset({"job", "instance"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "inf",
        "nan",
        "atan2",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_COMMENT = re.compile(r"#[^\n]*")
_SELECTOR = re.compile(r"(?<![\w:.])(?P<name>[a-zA-Z_:][\w:]*)?\s*\{(?P<body>[^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[([^\]]*)\]")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?")
_VARIABLE = re.compile(r"\$\{(\w+)(?::([\w]+))?\}|\$(\w+)|\[\[(\w+)\]\]")


# --------------------------------------------------------------------------- files


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@cache
def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON file, by file name (raises on invalid JSON)."""
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARDS_DIR.glob("*.json"))
    }


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


# ---------------------------------------------------------------- dashboard queries


@dataclass(frozen=True)
class PanelQuery:
    """One query of one dashboard panel (or annotation, or variable)."""

    dashboard_uid: str
    dashboard_title: str
    panel_id: int | None
    panel_title: str
    ref_id: str
    datasource_uid: str
    # PromQL for Prometheus targets; the request URL for JSON API targets.
    expr: str

    def describe(self) -> str:
        return f"{self.dashboard_title} / {self.panel_title} [{self.ref_id}]"


def _target_datasource_uid(panel: Mapping[str, Any], target: Mapping[str, Any]) -> str:
    ds = target.get("datasource") or panel.get("datasource") or {}
    return str(ds.get("uid", ""))


def dashboard_queries(*, include_json_api: bool = False) -> list[PanelQuery]:
    """Every PromQL expression of every panel, with its dashboard and panel title.

    With include_json_api, the JSON API (Infinity) targets are included too, with
    their URL as `expr`.
    """
    out: list[PanelQuery] = []
    for dash in dashboards().values():
        for panel in iter_panels(dash):
            for target in panel.get("targets", []):
                uid = _target_datasource_uid(panel, target)
                if uid == JSON_API_DATASOURCE_UID:
                    if not include_json_api:
                        continue
                    expr = str(target.get("url", ""))
                else:
                    expr = str(target.get("expr", ""))
                out.append(
                    PanelQuery(
                        dash["uid"],
                        dash["title"],
                        panel.get("id"),
                        panel.get("title", ""),
                        target.get("refId", ""),
                        uid,
                        expr,
                    )
                )
    return out


def json_api_queries() -> list[PanelQuery]:
    """The JSON API targets (Infinity), `expr` holding the request URL path."""
    return [
        q
        for q in dashboard_queries(include_json_api=True)
        if q.datasource_uid == JSON_API_DATASOURCE_UID
    ]


def annotation_queries() -> list[PanelQuery]:
    out: list[PanelQuery] = []
    for dash in dashboards().values():
        for ann in dash.get("annotations", {}).get("list", []):
            if ann.get("expr"):
                uid = str((ann.get("datasource") or {}).get("uid", ""))
                out.append(
                    PanelQuery(
                        dash["uid"],
                        dash["title"],
                        None,
                        ann["name"],
                        "annotation",
                        uid,
                        ann["expr"],
                    )
                )
    return out


def variable_queries() -> list[PanelQuery]:
    """The `label_values(...)` queries of the query variables."""
    out: list[PanelQuery] = []
    for dash in dashboards().values():
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var.get("query")
            if isinstance(query, Mapping):
                query = query.get("query", "")
            uid = str((var.get("datasource") or {}).get("uid", ""))
            out.append(
                PanelQuery(
                    dash["uid"], dash["title"], None, f"${var['name']}", "variable", uid, str(query)
                )
            )
    return out


def variables_in(text: str) -> set[str]:
    """Names of the Grafana variables referenced in text ($x, ${x}, ${x:fmt}, [[x]])."""
    return {m.group(1) or m.group(3) or m.group(4) for m in _VARIABLE.finditer(text)}


def substitute_variables(text: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables the way Grafana would for the given values.

    `values` maps a variable name (without `$`) to the text to insert. Format
    suffixes are honoured for `percentencode` and `regex`; an unknown variable
    raises KeyError, so a query that refers to an undefined variable is caught.
    """
    from urllib.parse import quote

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3) or m.group(4)
        fmt = m.group(2)
        if name not in values:
            raise KeyError(f"undefined Grafana variable ${name}")
        value = values[name]
        if fmt == "percentencode":
            return quote(value, safe="")
        if fmt == "regex":
            return re.escape(value)
        return value

    return _VARIABLE.sub(repl, text)


def variable_values(
    dashboard: Mapping[str, Any],
    *,
    provider: str | None = None,
    model: str | None = None,
    job: str | None = None,
    rate_interval: str = "1m",
    range_: str = "1h",
    interval: str = "15s",
) -> dict[str, str]:
    """Values for every variable of a dashboard, as Grafana would substitute them.

    A variable left as None becomes its "All" value when the dashboard's variable has
    an All option: `allValue` (`.*` for provider and model), or, without one, the
    values Grafana would find, which for `job` is the compose job
    (`prompt-cache-exporter`). Text boxes and custom variables take their current
    value; the link variables (`label_values(llmcache:links:info, ...)`) the value of
    links.yml. Any other variable left as None raises ValueError (single-valued
    variables, such as provider and model on the Model detail dashboard, need a real
    value).
    """
    chosen = {"provider": provider, "model": model, "job": job}
    links = link_bases()
    values = {
        "datasource": "prometheus",
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__interval_ms": str(_duration_seconds(interval) * 1000),
        "__range": range_,
        "__range_s": str(_duration_seconds(range_)),
        "__range_ms": str(_duration_seconds(range_) * 1000),
    }
    for name, var in dashboard_variables(dashboard).items():
        if name == "datasource":
            continue
        value = chosen.get(name)
        if value is None and var.get("type") in ("textbox", "custom", "constant"):
            value = str(var.get("current", {}).get("value") or var.get("query", ""))
        if value is None:
            m = re.fullmatch(
                rf"label_values\({re.escape(LINKS_SERIES)},\s*(\w+)\)", str(var.get("query"))
            )
            if m:
                value = links[m.group(1)]
        if value is None:
            if not var.get("includeAll"):
                raise ValueError(
                    f"{dashboard['uid']}: variable ${name} has no All option; pass a value"
                )
            value = var.get("allValue") or ALL_VALUES.get(name, ".*")
        values[name] = value
    return values


def substituted_queries(
    provider: str | None = None,
    model: str | None = None,
    *,
    job: str | None = None,
    rate_interval: str = "1m",
    range_: str = "1h",
) -> list[tuple[PanelQuery, str]]:
    """Every dashboard PromQL query with Grafana variables substituted.

    Multi-valued variables use regex matchers (`provider=~"$provider"`), so a
    value (or `.*` for All) is inserted as is; pass a regex-escaped value if it
    contains regex metacharacters. The Model detail dashboard has single-valued
    provider and model variables with exact matchers: pass both to include it
    (without them it is skipped).
    """
    out: list[tuple[PanelQuery, str]] = []
    by_uid = {d["uid"]: d for d in dashboards().values()}
    for query in dashboard_queries() + annotation_queries():
        dash = by_uid[query.dashboard_uid]
        try:
            values = variable_values(
                dash,
                provider=provider,
                model=model,
                job=job,
                rate_interval=rate_interval,
                range_=range_,
            )
        except ValueError:
            continue
        out.append((query, substitute_variables(query.expr, values)))
    return out


def substituted_json_api_urls(
    provider: str, model: str, base_url: str
) -> list[tuple[PanelQuery, str]]:
    """The JSON API requests of the evidence tables, as full URLs against base_url."""
    values = {"provider": provider, "model": model}
    return [
        (q, base_url.rstrip("/") + substitute_variables(q.expr, values)) for q in json_api_queries()
    ]


def _duration_seconds(text: str) -> int:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text):
        total += int(number) * units[unit]
    return int(total)


# --------------------------------------------------------------------------- PromQL


def _strip(expr: str) -> str:
    """Replace string literals with "" and drop comments."""
    return _COMMENT.sub("", _STRING.sub('""', expr))


def selectors_in(expr: str) -> list[tuple[str, frozenset[str]]]:
    """(metric name, label names matched) for every `name{...}` selector."""
    out = []
    for m in _SELECTOR.finditer(_strip(expr)):
        name = m.group("name")
        if not name or name.lower() in _PROMQL_KEYWORDS:
            continue
        out.append((name, frozenset(_MATCHER_LABEL.findall(m.group("body")))))
    return out


def range_windows_in(expr: str) -> list[str]:
    """The contents of every `[...]` (range selectors and subqueries)."""
    return [w.strip() for w in _RANGE.findall(_strip(expr))]


def _metric_identifiers(expr: str) -> list[str]:
    text = _strip(expr)
    text = _SELECTOR.sub(lambda m: (m.group("name") or "") + " ", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = re.sub(r"\boffset\s+-?[\w$]+", " ", text)
    names = []
    for m in _IDENTIFIER.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.append(name)
    return names


def metric_names_in(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression reads."""
    return set(_metric_identifiers(expr))


def label_values_selector(query: str) -> str | None:
    """The series selector of a `label_values(selector, label)` variable query."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, flags=re.S)
    return m.group(1) if m else None


# ------------------------------------------------------------------ metric contract


@dataclass(frozen=True)
class MetricDoc:
    name: str
    type: str
    labels: frozenset[str]


@cache
def documented_metrics() -> dict[str, MetricDoc]:
    """The metric tables of docs/metrics.md: name -> type and labels."""
    out: dict[str, MetricDoc] = {}
    row = re.compile(r"^\|\s*`(llmcache_\w+)`\s*\|\s*([^|]*)\|\s*([^|]*)\|")
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        m = row.match(line)
        if not m:
            continue
        name, mtype, labels = m.group(1), m.group(2).strip(), m.group(3)
        names = frozenset(label.strip() for label in labels.split(",") if label.strip())
        out[name] = MetricDoc(name, mtype.split()[0] if mtype else "", names)
    return out


def _documented_base(name: str) -> MetricDoc | None:
    docs = documented_metrics()
    if name in docs:
        return docs[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and docs.get(base) and docs[base].type == "histogram":
            return docs[base]
    return None


def is_external_metric(name: str) -> bool:
    return any(p.match(name) for p in EXTERNAL_METRIC_PATTERNS)


def is_known_metric(name: str) -> bool:
    return (
        _documented_base(name) is not None
        or name in recording_rule_labels()
        or is_external_metric(name)
    )


def series_labels(name: str) -> frozenset[str] | None:
    """The labels a series of this name can carry, or None if unknown (external)."""
    doc = _documented_base(name)
    if doc is not None:
        extra = {"le"} if name.endswith("_bucket") else set()
        return doc.labels | TARGET_LABELS | extra
    return recording_rule_labels().get(name)


# --------------------------------------------------------------------------- rules


def rule_groups(path: Path) -> list[dict[str, Any]]:
    return list(load_yaml(path)["groups"])


def link_bases() -> dict[str, str]:
    """The labels of the links series in links.yml: grafana_url, runbook_url, exporter_url."""
    (rule,) = [
        r for g in rule_groups(LINKS_RULES) for r in g["rules"] if r["record"] == LINKS_SERIES
    ]
    return dict(rule["labels"])


def recording_rules() -> list[dict[str, Any]]:
    """The recording rules of links.yml, recording.yml and traffic.yml."""
    return [
        rule
        for path in (LINKS_RULES, RECORDING_RULES, TRAFFIC_RULES)
        for group in rule_groups(path)
        for rule in group["rules"]
        if "record" in rule
    ]


def alerting_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in (ALERTING_RULES, TRAFFIC_RULES)
        for group in rule_groups(path)
        for rule in group["rules"]
        if "alert" in rule
    ]


def rule_exprs() -> list[tuple[str, str]]:
    """(record or alert name, expr) of every rule, recording rules first."""
    return [(r["record"], r["expr"]) for r in recording_rules()] + [
        (r["alert"], r["expr"]) for r in alerting_rules()
    ]


@cache
def recording_rule_labels() -> dict[str, frozenset[str]]:
    """The labels each recording rule's series carry.

    An aggregation `by (...)` sets them (histogram_quantile drops `le`); without
    one, a rule keeps the labels of the first series it reads. Static `labels:`
    are added.
    """
    out: dict[str, frozenset[str]] = {}
    by = re.compile(r"\b(?:sum|max|min|avg|count)\s+by\s*\(([^)]*)\)")
    for rule in recording_rules():
        expr = _strip(rule["expr"])
        m = by.search(expr)
        if m:
            labels = {label.strip() for label in m.group(1).split(",") if label.strip()}
            if "histogram_quantile" in expr:
                labels.discard("le")
        else:
            names = _metric_identifiers(expr)
            # A constant (`vector(1)`, the links series) carries its static labels only.
            known = out.get(names[0]) if names else frozenset()
            if known is None:
                doc = _documented_base(names[0])
                known = (doc.labels | TARGET_LABELS) if doc else frozenset()
            labels = set(known)
        out[rule["record"]] = frozenset(labels | set(rule.get("labels", {})))
    return out


# ---------------------------------------------------------------- rule unit tests


@dataclass(frozen=True)
class AlertTestCase:
    file: str
    group: str
    eval_time: str
    alertname: str
    fires: bool


def alert_test_cases() -> list[AlertTestCase]:
    out: list[AlertTestCase] = []
    for path in sorted(RULE_TESTS_DIR.glob("*.yml")):
        for group in load_yaml(path).get("tests", []):
            out.extend(
                AlertTestCase(
                    path.name,
                    group.get("name", ""),
                    str(case["eval_time"]),
                    case["alertname"],
                    bool(case.get("exp_alerts")),
                )
                for case in group.get("alert_rule_test", []) or []
            )
    return out


def promql_test_exprs() -> list[str]:
    out = []
    for path in sorted(RULE_TESTS_DIR.glob("*.yml")):
        for group in load_yaml(path).get("tests", []):
            out += [case["expr"] for case in group.get("promql_expr_test", []) or []]
    return out


# -------------------------------------------------------------------------- runbook


def github_anchor(heading: str) -> str:
    """The anchor GitHub generates for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """Runbook text by heading anchor, each section up to the next heading."""
    sections: dict[str, str] = {}
    current: str | None = None
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            current = github_anchor(m.group(1))
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections
