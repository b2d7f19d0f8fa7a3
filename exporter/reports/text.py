"""Plain text for the terminal: the probe's evidence table, the load test's summary, and
history as a table.

The probe's table is also its live output: ``exporter.probe_progress`` prints the same rows
and findings as each request and each probe completes, so the pieces are public here and
``probe_text`` is only their sequence. Text that came from an upstream or a database has
its control characters replaced, so a hostile error message cannot drive the terminal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from exporter.loadtest.result import ClassStats, LoadResult
from exporter.loadtest.stats import Summary
from exporter.reports.model import HistoryReport, LoadReport, ProbeReport, outcome, rfc3339
from exporter.results import ProbeResult, RequestRecord

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

STOP_TEXT = {
    "completed": "completed",
    "duration": "stopped at --duration",
    "interrupted": "interrupted",
    "token_cap": "stopped: the next request would have exceeded --max-total-tokens",
    "auth": "stopped: the key was refused (401/403)",
    "insufficient_funds": "stopped: the balance is exhausted (402)",
}


def clean(value: object) -> str:
    return _CONTROL.sub("\N{REPLACEMENT CHARACTER}", "-" if value is None else str(value))


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def counts(values: Mapping[str, int]) -> str:
    return ", ".join(f"{clean(k)} ×{v}" for k, v in values.items()) or "none"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


# -- probe --------------------------------------------------------------------------------


def probe_target(provider_type: str, base_url: str, model: str) -> str:
    return f"{provider_type} {clean(base_url)}  model {clean(model)}"


def probe_heading(probe: str) -> list[str]:
    """The lines above a probe's rows: its name and the table header."""
    return [
        f"\n== {probe} ==",
        f"  {'#':>2}  {'request':<22} {'status':>6} {'att':>3} {'prompt':>7} {'cached':>7} "
        f"{'own':>6} {'write':>6} {'compl':>5} {'latency':>8} {'ttft':>8} {'span':<16}  result",
    ]


def probe_row(index: int, record: RequestRecord, no_faster: bool | None) -> str:
    """One request of the evidence table; ``own`` is cached beyond the shared baseline.

    ``no_faster`` is the TTFT witness's flag for this request (``TtftWitness.no_faster``).
    """
    r = record
    return (
        f"  {index:>2}  {clean(r.label)[:22]:<22} {clean(r.status):>6} {r.attempts:>3} "
        f"{clean(r.prompt_tokens):>7} {clean(r.cached_tokens):>7} "
        f"{clean(r.run_cached_tokens):>6} {clean(r.cache_write_tokens):>6} "
        f"{clean(r.completion_tokens):>5} {_secs(r.latency_seconds):>8} "
        f"{_secs(r.ttft_seconds):>8} {clean(r.span_id or '-'):<16}  "
        f"{clean(outcome(r, no_faster))}"
    )


def probe_findings(result: ProbeResult) -> list[str]:
    """What a probe run found, below its rows: the verdict, then what only the whole run
    shows (the baseline, pollution, the TTFT witness, per-size and per-delay outcomes)."""
    works = {True: "yes", False: "no", None: "unknown"}[result.caching_works]
    lines = [
        f"{result.probe}: {result.verdict.value}  (caching works: {works}, hit ratio: "
        f"{ratio(result.hit_ratio)}, run {result.run_id}, {result.duration_seconds:.2f}s)"
    ]
    if result.trace_id:
        lines.append(f"  trace {result.trace_id}")
    if result.error:
        lines.append(f"  error ({result.error_type}): {clean(result.error)}")
    if result.baseline_tokens is not None:
        lines.append(
            f"  baseline: {result.baseline_tokens} cached tokens every prompt shares "
            "(template, BOS), not counted; own = cached beyond it"
        )
    if result.pollution:
        lines.append(
            "  cache pollution: a cold request's cached tokens reached past the baseline "
            "into the run's own prompt"
        )
    ttft = result.ttft
    if ttft.cold_seconds is not None or ttft.warm_seconds is not None:
        hits = "" if ttft.hit_seconds is None else f" (hits {_secs(ttft.hit_seconds)})"
        lines.append(
            f"  ttft: cold {_secs(ttft.cold_seconds)}, warm {_secs(ttft.warm_seconds)}{hits}"
        )
    if ttft.slow_hits:
        lines.append(
            f"  ttft: {ttft.slow_hits} hit(s) no faster than the cold request before them: "
            "the cached tokens did not save prefill time"
        )
    for name, size in result.sizes.items():
        lines.append(
            f"  size {clean(name)} ({size.target_tokens} tokens): {size.verdict.value}, "
            f"hit ratio {ratio(size.hit_ratio)}"
        )
    for delay, hit in sorted(result.ttl.items()):
        shown = "error" if hit is None else ("hit" if hit else "miss")
        lines.append(f"  after {delay:g}s: {shown}")
    if result.first_miss_index is not None:
        lines.append(f"  first miss at request {result.first_miss_index}")
    if result.shared_prefix_tokens is not None:
        lines.append(f"  shared prefix: about {result.shared_prefix_tokens} tokens")
    return lines


def probe_replay(report: ProbeReport) -> list[str]:
    """The curl commands, their bodies in ``report.evidence_dir``."""
    if not report.replays:
        return []
    key = f"; key from ${report.key_var}" if report.key_var else ""
    lines = [f"\nReplay (request bodies in {report.evidence_dir}{key}):"]
    for replay in report.replays:
        lines += [f"\n# {clean(replay.label)}", replay.command]
    return lines


def probe_text(report: ProbeReport) -> str:
    """The whole text report: what the live output shows, without its waits."""
    lines = [probe_target(report.provider_type, report.base_url, report.model)]
    for result in report.results:
        lines += probe_heading(result.probe)
        rows = zip(result.requests, result.ttft.no_faster, strict=True)
        lines += [probe_row(i, record, slow) for i, (record, slow) in enumerate(rows, 1)]
        lines += probe_findings(result)
    lines += probe_replay(report)
    return "\n".join(lines) + "\n"


# -- load test ----------------------------------------------------------------------------


def _summary_row(name: str, summary: Summary, fmt: str = "{:.3f}") -> str:
    cells = ["-" if v is None else fmt.format(v) for _, v in summary.items()]
    return f"  {name:<6} {summary.count:>6} " + " ".join(f"{c:>9}" for c in cells)


def _class_line(name: str, stats: ClassStats) -> str:
    return (
        f"  {name:<6} {stats.requests:>6} {stats.ok:>6} {stats.hits:>6} {ratio(stats.hit_ratio):>9}"
    )


def load_text(report: LoadReport) -> str:
    r: LoadResult = report.result
    target, options = r.target, r.options
    lines = [
        f"loadtest {clean(target.model)} at {clean(target.base_url)} ({target.provider_type}), "
        f"run {r.run_id}" + (f", trace {r.trace_id}" if r.trace_id else ""),
        f"{options.requests} requests at concurrency {options.concurrency}, shared prefix "
        f"{r.shared_prefix_tokens or r.prefix_tokens} tokens, max {target.max_tokens} output "
        f"tokens, {'streamed' if target.streamed else 'not streamed'}",
        f"{STOP_TEXT.get(r.stopped, r.stopped)}: {r.sent - r.cancelled} of {options.requests} "
        f"requests finished in {r.duration_seconds:.2f}s"
        + (f" ({r.cancelled} in flight cancelled)" if r.cancelled else ""),
        "",
        f"caching under load: {r.verdict.value}  (warm hit ratio {ratio(r.hit_ratio)}, warm "
        f"requests that hit {r.warm.hits}/{r.warm.ok}, cold requests that hit "
        f"{r.cold.hits}/{r.cold.ok})",
    ]
    if r.baseline_tokens is not None:
        lines.append(
            f"baseline: {r.baseline_tokens} cached tokens every prompt shares, not counted"
        )
    if r.cold.hits:
        lines.append(
            "cold hits: served from a prefix a concurrent request of this run had just sent "
            "(the upstream shares prefixes in flight)"
        )
    lines += [
        "",
        f"  {'':<6} {'sent':>6} {'ok':>6} {'hits':>6} {'hit ratio':>9}",
        _class_line("cold", r.cold),
        _class_line("warm", r.warm),
    ]
    header = f"  {'':<6} {'n':>6} " + " ".join(f"{n:>9}" for n, _ in r.cold.latency.items())
    for title, cold, warm, fmt in (
        ("latency (s)", r.cold.latency, r.warm.latency, "{:.3f}"),
        ("time to first token (s)", r.cold.ttft, r.warm.ttft, "{:.3f}"),
        (
            "output tokens/s per request",
            r.cold.output_tokens_per_second,
            r.warm.output_tokens_per_second,
            "{:.1f}",
        ),
    ):
        lines += [
            "",
            title,
            header,
            _summary_row("cold", cold, fmt),
            _summary_row("warm", warm, fmt),
        ]
    throughput = r.throughput
    rps, tps = throughput["requests_per_second"], throughput["output_tokens_per_second"]
    limits = r.rate_limits
    spend = r.spend
    usd = "not priced" if spend.usd is None else f"${spend.usd:.4f} at list price"
    saved = "" if spend.savings_usd is None else f", caching saved ${spend.savings_usd:.4f}"
    if spend.reported_cost:
        saved += "; the provider reported " + ", ".join(
            f"{amount:.6f} {clean(currency).upper()}"
            for currency, amount in spend.reported_cost.items()
        )
    cached = "-" if spend.cached_tokens is None else f"{spend.cached_tokens:,}"
    lines += [
        "",
        f"throughput: {'-' if rps is None else f'{rps:.1f}'} requests/s, "
        f"{'-' if tps is None else f'{tps:.1f}'} output tokens/s",
        f"HTTP statuses (every attempt): {counts(r.statuses)}",
        f"failed requests: {counts(r.errors)}",
        f"429s: {limits.responses} ({limits.retried} retried, {limits.honoured} of them after "
        f"the Retry-After asked for; {limits.waited_seconds:.2f}s waited)",
        f"tokens: {spend.prompt_tokens:,} prompt ({cached} cached), "
        f"{spend.completion_tokens:,} completion; spend {usd}{saved}",
        f"estimate was {r.estimate.total_tokens:,} tokens"
        + ("" if r.estimate.usd is None else f", at most ${r.estimate.usd:.4f}")
        + f"; cap {options.max_total_tokens:,}",
    ]
    if report.replays:
        key = f"; the key comes from ${report.key_var}" if report.key_var else ""
        lines.append(f"\nReplay{key}:")
        for replay in report.replays:
            lines += [f"\n# {clean(replay.label)}", replay.command]
    return "\n".join(lines) + "\n"


def history_text(report: HistoryReport) -> str:
    header = (
        f"{'time':<20} {'provider':<12} {'model':<24} {'probe':<12} {'verdict':<13} "
        f"{'hit ratio':>9} {'cold ttft':>9} {'warm ttft':>9}  error"
    )
    lines = [header]
    for run in report.runs:
        ttft = run.ttft
        error = f"{run.error_type}: {run.error}" if run.error_type else ""
        lines.append(
            f"{rfc3339(run.finished_at):<20} {clean(run.provider)[:12]:<12} "
            f"{clean(run.model)[:24]:<24} {clean(run.probe)[:12]:<12} "
            f"{run.verdict.value:<13} {ratio(run.hit_ratio):>9} "
            f"{seconds(ttft.cold_seconds):>9} {seconds(ttft.warm_seconds):>9}  "
            f"{clean(error)}" + (f" trace {run.trace_id}" if run.trace_id else "")
        )
    if not report.runs:
        lines.append("(no runs match)")
    return "\n".join(lines) + "\n"
