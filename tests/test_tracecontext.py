"""W3C trace context: the ids we generate, and what the simulator (standing in for a tracing
gateway on 127.0.0.1) receives from real probe runs: every request a valid ``traceparent``,
one trace per run, one span per logical request (its retries share it), all recorded with
the evidence and kept through a real SQLite round trip."""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from exporter import tracecontext
from exporter.probes import PROBE_NAMES
from exporter.results import ProbeResult
from exporter.server import run_to_json
from exporter.simulator.config import SimConfig
from exporter.store import Store
from exporter.transport import RetryPolicy
from tests.conftest import EVERY_4TH, SimRig

pytestmark = pytest.mark.anyio

# The header's grammar from the W3C recommendation (version 00), written out independently
# of the module under test.
W3C = re.compile(r"^00-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})$")


def test_generated_ids_are_random_lowercase_hex_and_valid() -> None:
    traces = [tracecontext.new_trace_id() for _ in range(2000)]
    spans = [tracecontext.new_span_id() for _ in range(2000)]
    assert len(set(traces)) == len(set(spans)) == 2000
    for trace_id, span_id in zip(traces, spans, strict=True):
        header = tracecontext.traceparent(trace_id, span_id)
        match = W3C.fullmatch(header)
        assert match, header
        assert match.groups() == (trace_id, span_id, "01")  # sampled
        assert tracecontext.parse_traceparent(header) == (trace_id, span_id, "01")
    # Random, not a counter or a clock: every hex digit shows up in every position.
    for position in range(32):
        assert len({t[position] for t in traces}) == 16


def test_an_all_zero_draw_still_gives_a_valid_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracecontext.secrets, "token_bytes", lambda n: bytes(n))
    trace_id, span_id = tracecontext.new_trace_id(), tracecontext.new_span_id()
    assert (len(trace_id), len(span_id)) == (32, 16)
    assert W3C.fullmatch(tracecontext.traceparent(trace_id, span_id))


@pytest.mark.parametrize(
    "header",
    [
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # all-zero span id
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # another version
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "",
    ],
)
def test_invalid_headers_do_not_parse(header: str) -> None:
    assert tracecontext.parse_traceparent(header) is None


def _received(rig: SimRig) -> list[dict[str, Any]]:
    return rig.sim.state.log_entries(None, rig.sim.state.config.log_size)


def _span_ids(result: ProbeResult) -> list[str]:
    spans = [r.span_id for r in result.requests]
    assert all(spans), spans
    return [s for s in spans if s]


async def test_every_probe_request_carries_its_run_trace_and_its_own_span(rig: SimRig) -> None:
    results = [await rig.probe(name, "sim-cache-ok") for name in PROBE_NAMES]
    received = _received(rig)
    assert len(received) == sum(len(r.requests) for r in results) > len(PROBE_NAMES)
    headers = [e["traceparent"] for e in received]
    assert all(W3C.fullmatch(h or "") for h in headers), headers
    parsed = [tracecontext.parse_traceparent(h or "") for h in headers]
    # One trace per run, and no two runs share one.
    assert len({r.trace_id for r in results}) == len(results)
    by_trace: dict[str, list[str]] = {}
    for p in parsed:
        assert p is not None
        by_trace.setdefault(p[0], []).append(p[1])
    for result in results:
        assert result.trace_id is not None
        # The spans the upstream saw, in order, are the spans the evidence recorded.
        assert by_trace[result.trace_id] == _span_ids(result)
    every_span = [p[1] for p in parsed if p is not None]
    assert len(set(every_span)) == len(every_span)


@pytest.mark.parametrize("sim_config", [SimConfig(latency_scale=0.0, models=(EVERY_4TH,))])
async def test_retries_carry_the_span_of_their_request(rig: SimRig) -> None:
    """sim-every-4th answers 429 to three chat requests in four: the prime takes four
    attempts, all with one span id, the one its evidence records."""
    policy = RetryPolicy(attempts=4, backoff=0.01, backoff_max=0.04, timeout=10.0)
    result = await rig.probe("basic", "sim-every-4th", policy=policy)
    prime = result.requests[0]
    assert prime.ok
    assert prime.attempts == 4
    received = _received(rig)
    statuses = [(e["status"], e["traceparent"]) for e in received]
    first_span = tracecontext.traceparent(result.trace_id or "", prime.span_id or "")
    assert statuses[:4] == [(429, first_span)] * 3 + [(200, first_span)]
    spans = Counter(tracecontext.parse_traceparent(t or "") for _, t in statuses)
    assert sum(spans.values()) == sum(r.attempts for r in result.requests)
    assert {s[1] for s in spans if s} == set(_span_ids(result))


async def test_trace_and_spans_survive_the_store_and_show_in_the_api(
    rig: SimRig, tmp_path: Path
) -> None:
    result = await rig.probe("basic", "sim-cache-ok")
    other = await rig.probe("basic", "sim-cache-ok")
    db = tmp_path / "runs.db"
    async with await Store.open(db, clock=rig.clock) as store:
        for run in (result, other):
            await store.record_run(run)
        assert result.trace_id is not None
        (found,) = await store.recent_runs(trace_id=result.trace_id)
        assert found == result
        assert await store.recent_runs(trace_id=tracecontext.new_trace_id()) == []
    api = run_to_json(found)
    assert api["trace_id"] == result.trace_id
    assert [r["span_id"] for r in api["requests"]] == _span_ids(result)
    with sqlite3.connect(db) as conn:
        # The lookup is one index seek, not a scan of every run's JSON.
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT details FROM probe_runs WHERE 1 AND trace_id = ? "
            "ORDER BY finished_at DESC, id DESC LIMIT 5",
            (result.trace_id,),
        ).fetchall()
        assert any("probe_runs_trace" in str(row[-1]) for row in plan), plan
        # Rows stored before runs carried trace context still load, with None.
        for row_id, details in conn.execute("SELECT id, details FROM probe_runs").fetchall():
            old = json.loads(details)
            del old["trace_id"]
            for request in old["requests"]:
                del request["span_id"]
            conn.execute(
                "UPDATE probe_runs SET details = ?, trace_id = NULL WHERE id = ?",
                (json.dumps(old), row_id),
            )
    async with await Store.open(db, clock=rig.clock) as store:
        legacy = await store.recent_runs()
    assert sorted(r.run_id for r in legacy) == sorted((result.run_id, other.run_id))
    assert [r.trace_id for r in legacy] == [None, None]
    assert {r.span_id for run in legacy for r in run.requests} == {None}
    assert run_to_json(legacy[0])["trace_id"] is None
