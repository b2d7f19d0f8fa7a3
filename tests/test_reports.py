"""Reports from real runs: probe results from the simulator over HTTP, history from a real
SQLite file, and the commands that write them (`probe --format`, `history --format`)."""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import anyio
import pytest

from exporter import __version__, history_cli, reports
from exporter.cli import build_parser
from exporter.clock import FakeClock
from exporter.loadtest import cli as loadtest_cli
from exporter.reports.tabular import HISTORY_COLUMNS, LOAD_COLUMNS, PROBE_COLUMNS
from exporter.results import ErrorType, ProbeResult, Verdict
from exporter.simulator.config import SimConfig
from exporter.simulator.server import serve_simulator
from exporter.store import Store
from tests.conftest import open_rig

pytestmark = pytest.mark.anyio

SECRET = "sk-test-REPORTS-never-written-9d2e"
GENERATED = 1_700_000_000.0
HOSTILE_MODEL = '<img src="http://127.0.0.1:9/pwn" onerror="alert(1)">'
HOSTILE_ERROR = '</td></tr></table><script>fetch("http://127.0.0.1:9/x")</script>=cmd|"/c calc"'


class Dom(HTMLParser):
    """Every start tag with its attributes, text by element id, and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._stack: list[str] = []
        self.by_id: dict[str, list[str]] = {}
        self._ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        ident = attributes.get("id")
        if ident:
            self._ids.append(ident)
            self.by_id[ident] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for ident in self._ids:
            self.by_id[ident].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("table", "svg") and self._ids:
            self._ids.pop()

    def count(self, tag: str, cls: str | None = None) -> int:
        return sum(
            1
            for t, a in self.tags
            if t == tag and (cls is None or cls in (a.get("class") or "").split())
        )


def parse(document: str) -> Dom:
    dom = Dom()
    dom.feed(document)
    return dom


def assert_self_contained(dom: Dom) -> None:
    """Nothing that could load: no script, no frame or object, no URL but the empty icon."""
    for tag, attrs in dom.tags:
        assert tag not in ("script", "iframe", "object", "embed", "base", "form"), tag
        for name in ("src", "href", "srcset", "action", "data", "poster"):
            value = attrs.get(name)
            assert value is None or value == "data:,", (tag, name, value)
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    csp = [a["content"] for t, a in dom.tags if t == "meta" and a.get("http-equiv")]
    assert csp
    assert csp[0] is not None
    assert csp[0].startswith("default-src 'none'; style-src 'sha256-")


@pytest.fixture
async def probe_results() -> AsyncIterator[list[ProbeResult]]:
    """Real runs over HTTP on the fake clock: TTFTs are exact (cold prefill > warm)."""
    async with open_rig(SimConfig(latency_scale=1.0)) as rig:
        yield [
            await rig.probe("basic", "sim-cache-ok"),
            await rig.probe("persistence", "sim-cache-ok"),
            await rig.probe("basic", "sim-cache-broken"),
        ]


def _probe_report(results: list[ProbeResult], **changes: Any) -> reports.ProbeReport:
    report = reports.ProbeReport(
        info=reports.ReportInfo(generated_at=GENERATED),
        provider_type="openai",
        base_url="http://127.0.0.1:8089/v1",
        model="sim-cache-ok",
        exit_status=1,
        results=results,
        key_var="PCE_API_KEY",
    )
    return dataclasses.replace(report, **changes)


async def test_probe_html_has_verdicts_chart_evidence_version_and_time(
    probe_results: list[ProbeResult],
) -> None:
    document = reports.render_probe("html", _probe_report(probe_results))
    dom = parse(document)
    assert_self_contained(dom)
    verdicts = " ".join(dom.by_id["verdicts"])
    for probe, verdict in (("basic", "works"), ("persistence", "works"), ("basic", "broken")):
        assert probe in verdicts
        assert verdict in verdicts
    assert dom.count("span", "v-works") == 2
    assert dom.count("span", "v-broken") == 1
    # The chart: one cold and one warm bar per probe, each with its exact value.
    assert dom.count("svg") == 1
    assert dom.count("rect", "cold") == dom.count("rect", "warm") == 3
    cold = probe_results[0].ttft.cold_seconds
    assert cold is not None
    assert f"basic: cold {cold * 1000:.1f} ms" in document
    # One evidence table per run, one row per request.
    rows = sum(len(r.requests) for r in probe_results)
    assert dom.count("tr") == 1 + len(probe_results) + len(probe_results) + rows
    text = "".join(dom.text)
    assert f"exporter{__version__}" in text.replace(" ", "")
    assert "2023-11-14T22:13:20Z" in text  # the generation time, RFC 3339 UTC


async def test_probe_html_replays_run_as_attached(tmp_path: Path) -> None:
    """`probe --format html`: the curl command in the file replays the request for real, the
    key supplied by the shell; the key itself is nowhere in the file."""
    async with serve_simulator(SimConfig(latency_scale=0.0, api_key=SECRET)) as sim:
        report = tmp_path / "probe.html"
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        command = [sys.executable, "-m", "exporter", "probe", "--base-url", sim.base_url]
        command += ["--model", "sim-cache-ok", "--format", "html", "--output", str(report)]
        proc = await anyio.run_process(
            command,
            env={**env, "PCE_API_KEY": SECRET},
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == b""
        assert f"report written to {report}" in proc.stderr.decode()
        document = report.read_text(encoding="utf-8")
        assert SECRET not in document
        assert_self_contained(parse(document))
        start = document.index('<pre class="replay">') + len('<pre class="replay">')
        command = html.unescape(document[start : document.index("</pre>", start)])
        assert '-H "Authorization: Bearer $PCE_API_KEY"' in command
        assert shutil.which("curl"), "curl is needed to replay the evidence"
        replay = await anyio.run_process(
            ["bash", "-c", command], env={"PCE_API_KEY": SECRET, "PATH": os.environ["PATH"]}
        )
        # The replay carries the traceparent the prime was sent with: the provider finds it
        # under the run's trace, beside the original.
        sent = [e["traceparent"] for e in sim.state.log_entries(None, 10)]
    assert len(sent) == 3
    assert sent[2] == sent[0] != sent[1]
    assert f"traceparent: {sent[0]}" in command
    usage = [
        json.loads(line[6:])
        for line in replay.stdout.decode().splitlines()
        if line.startswith("data: {") and '"usage"' in line
    ]
    assert usage
    # Replaying the prime hits the cache the run filled.
    assert usage[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def _hostile_result(base: ProbeResult) -> ProbeResult:
    records = [dataclasses.replace(r, request_id='"><b>id</b>') for r in base.requests]
    records[-1] = dataclasses.replace(
        records[-1], error_type=ErrorType.API_ERROR, error=HOSTILE_ERROR
    )
    return dataclasses.replace(
        base,
        model=HOSTILE_MODEL,
        provider="<i>sim</i>",
        requests=records,
        verdict=Verdict.ERROR,
        error_type=ErrorType.API_ERROR,
        error=HOSTILE_ERROR,
    )


async def test_upstream_text_is_escaped_everywhere(probe_results: list[ProbeResult]) -> None:
    hostile = _hostile_result(probe_results[0])
    report = _probe_report([hostile], model=HOSTILE_MODEL)
    document = reports.render_probe("html", report)
    dom = parse(document)
    assert_self_contained(dom)
    assert dom.count("img") == dom.count("b") == dom.count("i") == 0
    text = "".join(dom.text)
    assert HOSTILE_MODEL in text
    assert HOSTILE_ERROR in text
    # CSV: a cell that a spreadsheet would run as a formula is quoted.
    rows = list(csv.DictReader(io.StringIO(reports.render_probe("csv", report))))
    assert rows[-1]["error"] == HOSTILE_ERROR  # starts with "<": left as it is
    formula = dataclasses.replace(
        hostile, requests=[dataclasses.replace(hostile.requests[0], error='=HYPERLINK("http://x")')]
    )
    rows = list(csv.DictReader(io.StringIO(reports.render_probe("csv", _probe_report([formula])))))
    assert rows[0]["error"] == '\'=HYPERLINK("http://x")'
    # History text: control characters from the store cannot drive the terminal.
    ansi = dataclasses.replace(hostile, model="sim\x1b[2J\x07")
    shown = reports.render_history(
        "text", reports.HistoryReport(reports.ReportInfo(GENERATED), [ansi])
    )
    assert "\x1b" not in shown
    assert "\x07" not in shown


async def test_probe_json_and_csv(probe_results: list[ProbeResult]) -> None:
    report = _probe_report(probe_results)
    payload = json.loads(reports.render_probe("json", report))
    assert payload["exporter_version"] == __version__
    assert payload["generated_at"] == "2023-11-14T22:13:20Z"
    assert [p["probe"] for p in payload["probes"]] == ["basic", "persistence", "basic"]
    assert payload["probes"] == [r.to_dict() for r in probe_results]
    rows = list(csv.DictReader(io.StringIO(reports.render_probe("csv", report))))
    assert list(rows[0]) == list(PROBE_COLUMNS)
    assert len(rows) == sum(len(r.requests) for r in probe_results)
    first = probe_results[0].requests[1]
    assert rows[1]["label"] == first.label
    assert rows[1]["cached_tokens"] == str(first.cached_tokens)
    assert rows[1]["hit"] == "True"
    # Every row names the run's trace and the request's own span.
    expected = [(r.trace_id, q.span_id) for r in probe_results for q in r.requests]
    assert [(row["trace_id"], row["span_id"]) for row in rows] == expected
    assert len({span for _, span in expected}) == len(expected)


def _untraced(result: ProbeResult) -> ProbeResult:
    """As stored before runs carried trace context."""
    requests = [dataclasses.replace(r, span_id=None) for r in result.requests]
    return dataclasses.replace(result, trace_id=None, requests=requests)


async def test_trace_and_span_ids_are_shown_where_evidence_carries_them(
    probe_results: list[ProbeResult],
) -> None:
    traced = probe_results[0]
    assert traced.trace_id is not None
    report = _probe_report([traced])
    document = reports.render_probe("html", report)
    assert traced.trace_id in document
    assert ">span id<" in document
    for record in traced.requests:
        assert record.span_id is not None
        assert record.span_id in document
    # Evidence stored without them shows no such column, and empty cells in CSV.
    old = _probe_report([_untraced(traced)])
    assert ">span id<" not in reports.render_probe("html", old)
    rows = list(csv.DictReader(io.StringIO(reports.render_probe("csv", old))))
    assert {(r["trace_id"], r["span_id"]) for r in rows} == {("", "")}


async def _history_db(tmp_path: Path, results: list[ProbeResult]) -> Path:
    db = tmp_path / "history.db"
    async with await Store.open(db, clock=FakeClock(GENERATED)) as store:
        for result in results:
            await store.record_run(result)
        assert await store.flush() == 0
    config = tmp_path / "config.toml"
    config.write_text(
        f'[storage]\npath = "{db}"\n\n[[providers]]\nname = "sim"\ntype = "openai"\n'
        'base_url = "http://127.0.0.1:1/v1"\n',
        encoding="utf-8",
    )
    return config


async def _history(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "exporter", "history", *args], check=False
    )


async def _history_in_process(*args: str) -> str:
    out = io.StringIO()
    assert await history_cli.run(build_parser().parse_args(["history", *args]), out=out) == 0
    return out.getvalue()


async def test_history_formats_from_a_real_store(
    tmp_path: Path, probe_results: list[ProbeResult]
) -> None:
    config = await _history_db(tmp_path, probe_results)
    out = tmp_path / "history.html"
    proc = await _history(
        "--config", str(config), "--model", "sim-cache-ok", "--format", "html", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr.decode()
    dom = parse(out.read_text(encoding="utf-8"))
    assert_self_contained(dom)
    verdicts = " ".join(dom.by_id["verdicts"])
    assert "persistence" in verdicts
    assert "broken" not in verdicts  # the model filter applies
    assert dom.count("rect", "cold") == dom.count("rect", "warm") == 2
    assert dom.count("details") == 2  # one evidence table per run
    text = "".join(dom.text)
    assert "sim-cache-ok" in text
    assert "at most 100" in text
    # CSV keeps its columns (plus the trace id); JSON keeps {"runs": [...]}.
    rows = list(csv.DictReader(io.StringIO(await _history_in_process("--config", str(config)))))
    assert list(rows[0]) == list(HISTORY_COLUMNS)
    assert [r["probe"] for r in rows] == ["basic", "persistence", "basic"][::-1]
    shown = await _history_in_process(
        "--config", str(config), "--format", "json", "--probe", "basic"
    )
    assert [r["model"] for r in json.loads(shown)["runs"]] == ["sim-cache-broken", "sim-cache-ok"]
    lines = (await _history_in_process("--config", str(config), "--format", "text")).splitlines()
    assert lines[0].split()[:5] == ["time", "provider", "model", "probe", "verdict"]
    assert len(lines) == 4


async def test_load_report_formats_from_a_real_run(tmp_path: Path) -> None:
    async with serve_simulator(SimConfig(latency_scale=0.05)) as sim:
        paths = {fmt: tmp_path / f"load.{fmt}" for fmt in ("json", "csv", "html", "text")}
        for fmt, path in paths.items():
            args = ["loadtest", "--base-url", sim.base_url, "--model", "sim-cache-ok"]
            args += ["-n", "12", "-c", "3", "--format", fmt, "-o", str(path)]
            err = io.StringIO()
            status = await loadtest_cli.run(
                build_parser().parse_args(args), env={}, err=err, handle_signals=False
            )
            assert status == 0, err.getvalue()
            assert err.getvalue().endswith(f"report written to {path}\n")
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text(encoding="utf-8"))))
    assert list(rows[0]) == list(LOAD_COLUMNS)
    assert [int(r["index"]) for r in rows] == list(range(1, 13))
    assert all(r["attempt_statuses"] == "200" for r in rows)
    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert report["kind"] == "loadtest"
    assert report["sent"] == 12
    dom = parse(paths["html"].read_text(encoding="utf-8"))
    assert_self_contained(dom)
    assert dom.count("rect", "cold") == dom.count("rect", "warm") == 5  # min p50 p95 p99 max
    assert "works" in " ".join(dom.by_id["verdicts"])
    assert dom.count("pre", "replay") == 2  # one cold and one warm request to replay
    text = paths["text"].read_text(encoding="utf-8")
    assert "caching under load: works  (warm hit ratio 0.9" in text
    assert "completed: 12 of 12 requests finished in " in text
    for title in ("latency (s)", "time to first token (s)", "output tokens/s per request"):
        assert f"\n{title}\n" in text
    # The terminal's replays read their bodies from files, one per distinct request.
    bodies = [line.split("@", 1)[1] for line in text.splitlines() if "--data-binary @" in line]
    assert len(bodies) == 2
    for body in bodies:
        assert json.loads(await anyio.Path(body).read_text(encoding="utf-8"))["stream"] is True


async def test_probe_format_options(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "exporter", "probe", "--base-url", "http://127.0.0.1:1/v1"]
    proc = await anyio.run_process(
        [*base, "--model", "m", "--json", "--format", "csv"], check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == (
        "error: --json and --format csv disagree (--json is --format json)"
    )
    proc = await anyio.run_process(
        [*base, "--model", "m", "--format", "html", "-o", str(tmp_path / "no" / "r.html")],
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("error: --output: no such directory: ")


def test_a_failed_write_falls_back_to_stdout(tmp_path: Path) -> None:
    target = tmp_path / "gone" / "report.html"
    target.parent.mkdir()
    checked = reports.check_output(str(target))
    target.parent.rmdir()  # removed between the check and the write
    out, err = io.StringIO(), io.StringIO()
    reports.write_report("<html>report</html>", checked, out, err)
    assert out.getvalue() == "<html>report</html>"
    assert err.getvalue().startswith(f"error: --output: cannot write {target}: ")
    # And a good path gets the whole file, nothing half-written beside it.
    good = tmp_path / "report.html"
    reports.write_report("whole", reports.check_output(str(good)), out, err)
    assert good.read_text(encoding="utf-8") == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
