"""``prompt-cache-exporter probe``: run probes once against one model and show the evidence.

The "cache microscope": a table of every request (tokens, cached tokens, latency, time to
first token) and curl commands that replay them exactly. Request bodies are written to an
evidence directory; the commands read the key from an environment variable, so nothing
printed contains it.

Rows appear as each request completes and every wait says what it is for (exporter.
probe_progress). The live table is the text report when it goes to stdout; with another
format (``--json``, ``--format json|csv|html``) or ``--output FILE`` the progress goes to
stderr and the report, rendered by exporter.reports, is the only thing on stdout or in
the file.

Exit status: 0 caching works, 1 it does not, 2 usage or configuration error, 3 no verdict
(the API reports no cache fields, or requests failed), 130 interrupted, 141 the reader of
the output went away.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx
from pydantic import ValidationError

from exporter import reports
from exporter.assembly import build_adapter, retry_policy
from exporter.cli_args import (
    Target,
    UsageError,
    add_target_arguments,
    duration_arg,
    resolve_target,
)
from exporter.clock import SystemClock
from exporter.config import HttpConfig, ProbesConfig, ProviderConfig, format_validation_error
from exporter.durations import format_duration, parse_duration
from exporter.exits import EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_NO_VERDICT, EXIT_OK, EXIT_USAGE
from exporter.probe_progress import Progress, ProgressClock
from exporter.probes import PROBE_NAMES, ProbeContext, ProbeSettings, run_probe
from exporter.prompts import PromptFactory
from exporter.providers.base import HttpRequest, ProviderAdapter
from exporter.reports import text as text_report
from exporter.results import ProbeResult, RequestRecord
from exporter.transport import RetryPolicy, Transport

# Defaults come from the configuration models, so `probe` and `run` behave alike.
_HTTP = HttpConfig()
_PROBES = ProbesConfig()
_PROVIDER_FIELDS = ProviderConfig.model_fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser, model_help="model id to probe")
    parser.add_argument(
        "--probe",
        default="basic",
        choices=[*PROBE_NAMES, "all"],
        help="which probe to run (default: basic)",
    )
    parser.add_argument("--json", action="store_true", help="the same as --format json")
    reports.add_format_arguments(parser, default=None)
    parser.add_argument("--no-stream", action="store_true", help="do not use streaming")
    parser.add_argument(
        "--ttl-delays",
        default=",".join(format_duration(d) for d in _PROBES.ttl.delays),
        help="comma-separated delays for the ttl probe (default: %(default)s)",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(f"{k}={v}" for k, v in _PROBES.prompt_sizes.sizes.items()),
        help="name=tokens pairs for the prompt_sizes probe (default: %(default)s)",
    )
    parser.add_argument("--persistence-requests", type=int, default=_PROBES.persistence.requests)
    parser.add_argument("--min-cacheable-tokens", type=int, help="override the adapter default")
    parser.add_argument(
        "--hit-threshold-tokens",
        type=int,
        help="fix the shared baseline instead of learning it (a gateway with a long prefix)",
    )
    parser.add_argument("--warmup-repeats", type=int, help="override the adapter default")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=_PROVIDER_FIELDS["max_tokens"].default,
        help="completion tokens per request",
    )
    parser.add_argument(
        "--timeout", default=format_duration(_HTTP.timeout), help="per-request timeout"
    )
    parser.add_argument("--attempts", type=int, default=_HTTP.attempts, help="attempts per request")
    parser.add_argument(
        "--backoff", default=format_duration(_HTTP.backoff), help="first retry wait (doubles)"
    )
    parser.add_argument("--backoff-max", default=format_duration(_HTTP.backoff_max))
    parser.add_argument("--deadline", default="10m", help="deadline per probe")
    parser.add_argument("--seed", type=int, default=0, help="seed for the prompt filler")
    parser.add_argument(
        "--evidence-dir",
        help="where request bodies for the curl commands go (default: for the text report, a "
        "new directory under $XDG_CACHE_HOME/prompt-cache-exporter/probe, or ~/.cache/..., "
        f"keeping the last {reports.KEEP_EVIDENCE_RUNS} runs; other formats write none unless "
        "this is given)",
    )


def _parse_sizes(text: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) <= 0:
            raise UsageError(f"--sizes: expected name=tokens pairs, got {part!r}")
        sizes[name.strip()] = int(value)
    if not sizes:
        raise UsageError("--sizes: no sizes given")
    return sizes


def _parse_delays(text: str) -> tuple[float, ...]:
    try:
        delays = tuple(parse_duration(p.strip()) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise UsageError(f"--ttl-delays: {exc}") from None
    if not delays or any(d <= 0 for d in delays):
        raise UsageError("--ttl-delays: expected positive durations such as 1s,5s,10s")
    return delays


@dataclass(frozen=True, slots=True)
class _Plan:
    target: Target
    adapter: ProviderAdapter
    probes: list[str]
    settings: ProbeSettings
    policy: RetryPolicy
    deadline: float


def _plan(args: argparse.Namespace, env: Mapping[str, str]) -> _Plan:
    target = resolve_target(args, env)
    for name in ("attempts", "persistence_requests", "max_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be at least 1")
    if args.hit_threshold_tokens is not None and args.hit_threshold_tokens < 1:
        raise UsageError("--hit-threshold-tokens: must be at least 1")
    settings = ProbeSettings(
        sizes=_parse_sizes(args.sizes),
        persistence_requests=max(2, args.persistence_requests),
        ttl_delays=_parse_delays(args.ttl_delays),
        hit_threshold_tokens=args.hit_threshold_tokens,
    )
    # The same models (and so the same rules and defaults) as a configured provider.
    provider = target.provider(
        args.provider_type,
        min_cacheable_tokens=args.min_cacheable_tokens,
        warmup_repeats=args.warmup_repeats,
        stream=not args.no_stream,
        max_tokens=args.max_tokens,
    )
    try:
        http = HttpConfig(
            attempts=args.attempts,
            backoff=duration_arg("backoff", args.backoff),
            backoff_max=duration_arg("backoff-max", args.backoff_max),
            timeout=duration_arg("timeout", args.timeout),
        )
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc)) from None
    adapter = build_adapter(provider, env)
    policy = retry_policy(http)
    probes = list(PROBE_NAMES) if args.probe == "all" else [args.probe]
    deadline = duration_arg("deadline", args.deadline)
    return _Plan(target, adapter, probes, settings, policy, deadline)


def exit_status(results: list[ProbeResult]) -> int:
    verdicts = [r.caching_works for r in results]
    if any(v is False for v in verdicts):
        return EXIT_FAILURE
    if any(v is True for v in verdicts):
        return EXIT_OK
    return EXIT_NO_VERDICT


async def run(
    args: argparse.Namespace,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    env = os.environ if env is None else env
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        plan = _plan(args, env)
        fmt = _format(args)
        output = reports.check_output(args.output)
    except ValueError as exc:  # UsageError, OutputError, a bad number
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    key_var = plan.target.key_var
    if (warning := plan.target.missing_key_warning()) is not None:
        print(warning, file=err)
    evidence_dir: Path | None = None
    if args.evidence_dir:
        evidence_dir = Path(args.evidence_dir)
        evidence_dir.mkdir(parents=True, exist_ok=True)
    elif fmt == "text":
        evidence_dir = reports.new_evidence_dir(env, "probe")
    clock = SystemClock()
    # The live table is the report when it goes to stdout; otherwise stdout (or the file)
    # carries the report alone and the progress goes to stderr.
    live = fmt == "text" and output is None
    progress = Progress(out if live else err, clock=clock, ttl_delays=plan.settings.ttl_delays)
    progress.line(text_report.probe_target(args.provider_type, plan.adapter.base_url, args.model))
    results: list[ProbeResult] = []
    sent: list[tuple[str, HttpRequest]] = []
    with progress.scope:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            transport = Transport(
                client,
                policy=plan.policy,
                clock=ProgressClock(clock, progress, retries=True),
                on_wait=progress.retry_planned,
            )
            for name in plan.probes:
                progress.start_probe(name)

                def on_request(
                    request: HttpRequest, record: RequestRecord, probe: str = name
                ) -> None:
                    sent.append((f"{probe}: {record.label}", request))
                    progress.request_done(record)

                ctx = ProbeContext(
                    provider=args.provider_type,
                    model=args.model,
                    adapter=plan.adapter,
                    transport=transport,
                    prompts=PromptFactory(seed=args.seed),
                    clock=ProgressClock(clock, progress, retries=False),
                    settings=plan.settings,
                    on_request=on_request,
                )
                result = await run_probe(name, ctx, deadline=plan.deadline)
                results.append(result)
                progress.probe_done(result)
    if progress.closed:
        return EXIT_BROKEN_PIPE
    status = exit_status(results)
    # Bodies in files for the terminal; inline in the other formats, which must stand alone.
    on_disk = reports.file_replays(sent, key_var, evidence_dir) if evidence_dir else []
    report = reports.ProbeReport(
        info=reports.ReportInfo(generated_at=clock.time()),
        provider_type=args.provider_type,
        base_url=plan.adapter.base_url,
        model=args.model,
        exit_status=status,
        results=results,
        replays=on_disk if fmt == "text" else reports.inline_replays(sent, key_var),
        evidence_dir=str(evidence_dir) if evidence_dir else None,
        key_var=key_var,
    )
    if live:  # the rows are out already; a closed pipe now ends in run_command's 141
        for line in text_report.probe_replay(report):
            print(line, file=out)
        return status
    reports.write_report(reports.render_probe(fmt, report), output, out, err)
    return status


def _format(args: argparse.Namespace) -> str:
    """--json is an alias of --format json; text is the default."""
    if args.json and args.format not in (None, "json"):
        raise UsageError(f"--json and --format {args.format} disagree (--json is --format json)")
    return "json" if args.json else (args.format or "text")
