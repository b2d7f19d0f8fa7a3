"""``prompt-cache-exporter probe``: run probes once against one model and show the evidence.

The "cache microscope": a table of every request (tokens, cached tokens, latency, time to
first token) and curl commands that replay them exactly. Request bodies are written to an
evidence directory; the commands read the key from an environment variable, so nothing
printed contains it.

Exit status: 0 caching works, 1 it does not, 2 usage or configuration error, 3 no verdict
(the API reports no cache fields, or requests failed).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx
from pydantic import ValidationError

from exporter import reports
from exporter.assembly import build_adapter, retry_policy
from exporter.clock import SystemClock
from exporter.config import HttpConfig, ProbesConfig, ProviderConfig, format_validation_error
from exporter.durations import format_duration, parse_duration
from exporter.probes import PROBE_NAMES, ProbeContext, ProbeSettings, run_probe
from exporter.prompts import PromptFactory
from exporter.providers import ADAPTERS, adapter_class
from exporter.providers.base import HttpRequest, ProviderAdapter
from exporter.results import ProbeResult, RequestRecord
from exporter.transport import RetryPolicy, Transport

EXIT_WORKS, EXIT_BROKEN, EXIT_USAGE, EXIT_NO_VERDICT = 0, 1, 2, 3
GENERIC_KEY_VAR = "PCE_API_KEY"


# Defaults come from the configuration models, so `probe` and `run` behave alike.
_HTTP = HttpConfig()
_PROBES = ProbesConfig()
_PROVIDER_FIELDS = ProviderConfig.model_fields


class UsageError(Exception):
    """Bad command-line input: one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", help="API base URL, e.g. https://api.venice.ai/api/v1")
    parser.add_argument("--model", required=True, help="model id to probe")
    parser.add_argument(
        "--provider-type", default="openai", choices=sorted(ADAPTERS), help="API family"
    )
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
        help="where request bodies for the curl commands go (default: a new temp dir for "
        "the text report; other formats write none unless this is given)",
    )


@dataclass(slots=True)
class _Evidence:
    """Request bodies on disk (identical bodies share a file) and the curl commands."""

    directory: Path | None
    key_var: str | None
    commands: list[tuple[str, str]] = field(default_factory=list)  # (label, command)
    _files: dict[str, Path] = field(default_factory=dict)
    sent: list[tuple[str, HttpRequest]] = field(default_factory=list)  # for the HTML report

    def add(self, probe: str, request: HttpRequest, record: RequestRecord) -> None:
        self.sent.append((f"{probe}: {record.label}", request))
        if self.directory is None:
            return
        body = json.dumps(request.json, indent=1, ensure_ascii=False)
        digest = hashlib.sha256(body.encode()).hexdigest()
        path = self._files.get(digest)
        if path is None:
            slug = re.sub(r"[^a-z0-9]+", "-", f"{probe} {record.label}".lower()).strip("-")
            path = self.directory / f"{len(self._files) + 1:02d}-{slug}.json"
            path.write_text(body, encoding="utf-8")
            self._files[digest] = path
        self.commands.append((f"{probe}: {record.label}", self._curl(request, path)))

    def _curl(self, request: HttpRequest, path: Path) -> str:
        return reports.curl_command(request, self.key_var, body_file=path)


def resolve_key(
    adapter_cls: type[ProviderAdapter], env: Mapping[str, str], base_url: str = ""
) -> tuple[str | None, str | None]:
    """(key, variable name) from PCE_API_KEY or the API's conventional variables (for
    OpenAI-compatible URLs, only a known host's own variable)."""
    for var in filter(None, (GENERIC_KEY_VAR, adapter_cls.key_env_for(base_url))):
        value = env.get(var)
        if value:
            return value, var
    return None, None


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


def _duration_arg(name: str, text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--{name}: {exc}") from None
    if value <= 0:
        raise UsageError(f"--{name}: must be positive")
    return value


@dataclass(frozen=True, slots=True)
class _Plan:
    adapter: ProviderAdapter
    probes: list[str]
    settings: ProbeSettings
    policy: RetryPolicy
    deadline: float
    key_var: str | None


def _plan(args: argparse.Namespace, env: Mapping[str, str]) -> _Plan:
    cls = adapter_class(args.provider_type)
    base_url = args.base_url or cls.default_base_url
    if not base_url:
        raise UsageError("--base-url is required for --provider-type openai")
    if not re.match(r"^https?://[^\s/]+", base_url):
        raise UsageError(f"--base-url: not an http(s) URL: {base_url!r}")
    for name in ("attempts", "persistence_requests", "max_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be at least 1")
    _key, key_var = resolve_key(cls, env, base_url)
    settings = ProbeSettings(
        sizes=_parse_sizes(args.sizes),
        persistence_requests=max(2, args.persistence_requests),
        ttl_delays=_parse_delays(args.ttl_delays),
    )
    try:
        # The same models (and so the same rules and defaults) as a configured provider.
        provider = ProviderConfig.model_validate(
            {
                "name": "probe",
                "type": args.provider_type,
                "base_url": base_url,
                "api_key_env": key_var or "",
                "min_cacheable_tokens": args.min_cacheable_tokens,
                "warmup_repeats": args.warmup_repeats,
                "stream": not args.no_stream,
                "max_tokens": args.max_tokens,
            }
        )
        http = HttpConfig(
            attempts=args.attempts,
            backoff=_duration_arg("backoff", args.backoff),
            backoff_max=_duration_arg("backoff-max", args.backoff_max),
            timeout=_duration_arg("timeout", args.timeout),
        )
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc)) from None
    adapter = build_adapter(provider, env)
    policy = retry_policy(http)
    probes = list(PROBE_NAMES) if args.probe == "all" else [args.probe]
    deadline = _duration_arg("deadline", args.deadline)
    return _Plan(adapter, probes, settings, policy, deadline, key_var)


def exit_status(results: list[ProbeResult]) -> int:
    verdicts = [r.caching_works for r in results]
    if any(v is False for v in verdicts):
        return EXIT_BROKEN
    if any(v is True for v in verdicts):
        return EXIT_WORKS
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
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    evidence_dir: Path | None = None
    if args.evidence_dir:
        evidence_dir = Path(args.evidence_dir)
        evidence_dir.mkdir(parents=True, exist_ok=True)
    elif fmt == "text":
        evidence_dir = Path(tempfile.mkdtemp(prefix="pce-probe-"))
    evidence = _Evidence(evidence_dir, plan.key_var)
    clock = SystemClock()
    results: list[ProbeResult] = []
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        transport = Transport(client, policy=plan.policy, clock=clock)
        for name in plan.probes:
            ctx = ProbeContext(
                provider=args.provider_type,
                model=args.model,
                adapter=plan.adapter,
                transport=transport,
                prompts=PromptFactory(seed=args.seed),
                clock=clock,
                settings=plan.settings,
                on_request=functools.partial(evidence.add, name),
            )
            results.append(await run_probe(name, ctx, deadline=plan.deadline))
    status = exit_status(results)
    if fmt == "text":
        buffer = io.StringIO()
        _print_report(buffer, plan.adapter, args.model, results, evidence)
        text = buffer.getvalue()
    else:
        report = reports.ProbeReport(
            info=reports.ReportInfo(generated_at=clock.time()),
            provider_type=args.provider_type,
            base_url=plan.adapter.base_url,
            model=args.model,
            exit_status=status,
            results=results,
            replays=reports.inline_replays(evidence.sent, plan.key_var),
            evidence_dir=str(evidence_dir) if evidence_dir else None,
            key_var=plan.key_var,
        )
        text = reports.render_probe(fmt, report)
    reports.write_report(text, output, out, err)
    return status


def _format(args: argparse.Namespace) -> str:
    """--json is an alias of --format json; text is the default."""
    if args.json and args.format not in (None, "json"):
        raise UsageError(f"--json and --format {args.format} disagree (--json is --format json)")
    return "json" if args.json else (args.format or "text")


def _fmt_tokens(value: int | None) -> str:
    return "-" if value is None else str(value)


def _fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _fmt_hit(record: RequestRecord, no_faster: bool | None = None) -> str:
    if not record.ok:
        return str(record.error_type)
    if record.hit is None:
        return "n/r"  # the API reported no cache fields
    if record.hit and no_faster:
        return "hit, no faster than cold"
    return "hit" if record.hit else "miss"


def _print_report(
    out: TextIO,
    adapter: ProviderAdapter,
    model: str,
    results: list[ProbeResult],
    evidence: _Evidence,
) -> None:
    print(f"{adapter.type_name} {adapter.base_url}  model {model}", file=out)
    header = (
        f"  {'#':>2}  {'request':<22} {'status':>6} {'att':>3} {'prompt':>7} {'cached':>7} "
        f"{'own':>6} {'write':>6} {'compl':>5} {'latency':>8} {'ttft':>8} {'span':<16}  result"
    )
    for result in results:
        works = {True: "yes", False: "no", None: "unknown"}[result.caching_works]
        ratio = "-" if result.hit_ratio is None else f"{result.hit_ratio:.3f}"
        print(
            f"\n{result.probe}: {result.verdict.value}  (caching works: {works}, hit ratio: "
            f"{ratio}, run {result.run_id}, {result.duration_seconds:.2f}s)"
            + (f"\n  trace {result.trace_id}" if result.trace_id else ""),
            file=out,
        )
        if result.error:
            print(f"  error ({result.error_type}): {result.error}", file=out)
        if result.baseline_tokens is not None:
            print(
                f"  baseline: {result.baseline_tokens} cached tokens every prompt shares "
                "(template, BOS), not counted; own = cached beyond it",
                file=out,
            )
        if result.pollution:
            print(
                "  cache pollution: a cold request's cached tokens reached past the baseline "
                "into the run's own prompt",
                file=out,
            )
        ttft = result.ttft
        if ttft.cold_seconds is not None or ttft.warm_seconds is not None:
            hits = "" if ttft.hit_seconds is None else f" (hits {_fmt_seconds(ttft.hit_seconds)})"
            print(
                f"  ttft: cold {_fmt_seconds(ttft.cold_seconds)}, warm "
                f"{_fmt_seconds(ttft.warm_seconds)}{hits}",
                file=out,
            )
        if ttft.slow_hits:
            print(
                f"  ttft: {ttft.slow_hits} hit(s) no faster than the cold request before them: "
                "the cached tokens did not save prefill time",
                file=out,
            )
        for name, size in result.sizes.items():
            size_ratio = "-" if size.hit_ratio is None else f"{size.hit_ratio:.3f}"
            print(
                f"  size {name} ({size.target_tokens} tokens): {size.verdict.value}, "
                f"hit ratio {size_ratio}",
                file=out,
            )
        for delay, hit in sorted(result.ttl.items()):
            shown = "error" if hit is None else ("hit" if hit else "miss")
            print(f"  after {delay:g}s: {shown}", file=out)
        if result.first_miss_index is not None:
            print(f"  first miss at request {result.first_miss_index}", file=out)
        if result.shared_prefix_tokens is not None:
            print(f"  shared prefix: about {result.shared_prefix_tokens} tokens", file=out)
        print(header, file=out)
        for i, (r, slow) in enumerate(zip(result.requests, ttft.no_faster, strict=True), 1):
            print(
                f"  {i:>2}  {r.label[:22]:<22} {_fmt_tokens(r.status):>6} {r.attempts:>3} "
                f"{_fmt_tokens(r.prompt_tokens):>7} {_fmt_tokens(r.cached_tokens):>7} "
                f"{_fmt_tokens(r.run_cached_tokens):>6} "
                f"{_fmt_tokens(r.cache_write_tokens):>6} {_fmt_tokens(r.completion_tokens):>5} "
                f"{_fmt_seconds(r.latency_seconds):>8} {_fmt_seconds(r.ttft_seconds):>8} "
                f"{r.span_id or '-':<16}  "
                f"{_fmt_hit(r, slow)}",
                file=out,
            )
    if evidence.commands:
        key = f"; key from ${evidence.key_var}" if evidence.key_var else ""
        print(f"\nReplay (request bodies in {evidence.directory}{key}):", file=out)
        for label, command in evidence.commands:
            print(f"\n# {label}\n{command}", file=out)
