"""``prompt-cache-exporter probe``: run probes once against one model and show the evidence.

The "cache microscope": a table of every request (tokens, cached tokens, latency, time to
first token) and curl commands that replay them exactly. Request bodies are written to an
evidence directory; the commands read the key from an environment variable, so nothing
printed contains it.

Rows appear as each request completes and every wait says what it is for (exporter.
probe_progress); with ``--json`` that progress goes to stderr and stdout is one JSON object.

Exit status: 0 caching works, 1 it does not, 2 usage or configuration error, 3 no verdict
(the API reports no cache fields, or requests failed), 130 interrupted, 141 the reader of
the output went away.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from exporter.clock import SystemClock
from exporter.durations import parse_duration
from exporter.exits import EXIT_BROKEN_PIPE
from exporter.probe_progress import Progress, ProgressClock
from exporter.probes import PROBE_NAMES, ProbeContext, ProbeSettings, run_probe
from exporter.probes.common import DEFAULT_SIZES, DEFAULT_TTL_DELAYS
from exporter.prompts import PromptFactory
from exporter.providers import ADAPTERS, adapter_class
from exporter.providers.base import HttpRequest, ProviderAdapter
from exporter.providers.openai import conventional_key_env
from exporter.results import ProbeResult, RequestRecord
from exporter.transport import RetryPolicy, Transport

EXIT_WORKS, EXIT_BROKEN, EXIT_USAGE, EXIT_NO_VERDICT = 0, 1, 2, 3
GENERIC_KEY_VAR = "PCE_API_KEY"
# Default evidence directories live under the user's cache; older runs beyond this many are
# removed, so they do not pile up the way /tmp/pce-probe-* directories did.
KEEP_EVIDENCE_RUNS = 10
_EVIDENCE_RUN = re.compile(r"\d{8}-\d{6}-.+")


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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-stream", action="store_true", help="do not use streaming")
    parser.add_argument(
        "--ttl-delays",
        default=",".join(f"{d:g}s" for d in DEFAULT_TTL_DELAYS),
        help="comma-separated delays for the ttl probe (default: %(default)s)",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(f"{k}={v}" for k, v in DEFAULT_SIZES.items()),
        help="name=tokens pairs for the prompt_sizes probe (default: %(default)s)",
    )
    parser.add_argument("--persistence-requests", type=int, default=10)
    parser.add_argument("--min-cacheable-tokens", type=int, help="override the adapter default")
    parser.add_argument("--warmup-repeats", type=int, help="override the adapter default")
    parser.add_argument("--max-tokens", type=int, default=8, help="completion tokens per request")
    parser.add_argument("--timeout", default="30s", help="per-request timeout")
    parser.add_argument("--attempts", type=int, default=3, help="attempts per request")
    parser.add_argument("--backoff", default="2s", help="first retry wait (doubles)")
    parser.add_argument("--backoff-max", default="8s")
    parser.add_argument("--deadline", default="10m", help="deadline per probe")
    parser.add_argument("--seed", type=int, default=0, help="seed for the prompt filler")
    parser.add_argument(
        "--evidence-dir",
        help="where request bodies for the curl commands go (default: a new directory "
        "under $XDG_CACHE_HOME/prompt-cache-exporter/probe, or ~/.cache/..., keeping the "
        f"last {KEEP_EVIDENCE_RUNS} runs; with --json none are written unless this is given)",
    )


@dataclass(slots=True)
class _Evidence:
    """Request bodies on disk (identical bodies share a file) and the curl commands."""

    directory: Path | None
    key_var: str | None
    commands: list[tuple[str, str]] = field(default_factory=list)  # (label, command)
    _files: dict[str, Path] = field(default_factory=dict)

    def add(self, probe: str, request: HttpRequest, record: RequestRecord) -> None:
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
        first = "curl -sS" + (" -N" if request.json and request.json.get("stream") else "")
        lines = [f"{first} -X {request.method} {shlex.quote(request.url)}"]
        for name, value in request.headers.items():
            if name.lower() in request.secret_headers:
                # The key is never printed: the shell expands it from the environment.
                var = f"${self.key_var}" if self.key_var else "$API_KEY"
                shown = re.sub(r"\S+$", var, value)
                lines.append(f'-H "{name}: {shown}"')
            else:
                lines.append(f"-H {shlex.quote(f'{name}: {value}')}")
        lines.append(f"--data-binary @{shlex.quote(str(path))}")
        return " \\\n  ".join(lines)


def key_variables(adapter_cls: type[ProviderAdapter], base_url: str = "") -> tuple[str, ...]:
    """Where the key may come from: PCE_API_KEY, then the API's conventional variables (for
    OpenAI-compatible URLs, only a known host's own variable)."""
    by_host = conventional_key_env(base_url) if adapter_cls.type_name == "openai" else None
    return (GENERIC_KEY_VAR, *adapter_cls.key_env_vars, *filter(None, [by_host]))


def resolve_key(
    adapter_cls: type[ProviderAdapter], env: Mapping[str, str], base_url: str = ""
) -> tuple[str | None, str | None]:
    """(key, variable name) from the first of ``key_variables`` that is set."""
    for var in key_variables(adapter_cls, base_url):
        value = env.get(var)
        if value:
            return value, var
    return None, None


def _missing_key_warning(variables: tuple[str, ...]) -> str:
    if len(variables) == 1:
        return (
            f"warning: {variables[0]} is not set: requests go without an API key "
            "(right for local servers)"
        )
    return f"warning: none of {', '.join(variables)} is set: requests go without an API key"


def new_evidence_dir(env: Mapping[str, str]) -> Path:
    """A fresh directory for this run's request bodies, under the user's cache directory;
    runs beyond the last KEEP_EVIDENCE_RUNS are removed. A temp directory if there is none."""
    try:
        cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        home = cache / "prompt-cache-exporter" / "probe"
        home.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=home))
    except (OSError, RuntimeError):  # RuntimeError: no home directory to be found
        return Path(tempfile.mkdtemp(prefix="pce-probe-"))
    runs = sorted(p for p in home.iterdir() if p.is_dir() and _EVIDENCE_RUN.fullmatch(p.name))
    for old in runs[:-KEEP_EVIDENCE_RUNS]:
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


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
    key, key_var = resolve_key(cls, env, base_url)
    adapter = cls(
        base_url=base_url,
        api_key=key,
        min_cacheable_tokens=args.min_cacheable_tokens,
        warmup_repeats=args.warmup_repeats,
        stream=not args.no_stream,
        max_tokens=args.max_tokens,
    )
    settings = ProbeSettings(
        sizes=_parse_sizes(args.sizes),
        persistence_requests=max(2, args.persistence_requests),
        ttl_delays=_parse_delays(args.ttl_delays),
    )
    policy = RetryPolicy(
        attempts=args.attempts,
        backoff=_duration_arg("backoff", args.backoff),
        backoff_max=_duration_arg("backoff-max", args.backoff_max),
        timeout=_duration_arg("timeout", args.timeout),
    )
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
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    if plan.key_var is None:
        print(
            _missing_key_warning(key_variables(type(plan.adapter), plan.adapter.base_url)), file=err
        )
    evidence_dir: Path | None = None
    if args.evidence_dir:
        evidence_dir = Path(args.evidence_dir)
        evidence_dir.mkdir(parents=True, exist_ok=True)
    elif not args.json:
        evidence_dir = new_evidence_dir(env)
    evidence = _Evidence(evidence_dir, plan.key_var)
    clock = SystemClock()
    # Rows and waits go where the reader is: stdout, or stderr when stdout carries the JSON.
    progress = Progress(
        err if args.json else out,
        clock=clock,
        row=table_line,
        ttl_delays=plan.settings.ttl_delays,
    )
    progress.line(f"{plan.adapter.type_name} {plan.adapter.base_url}  model {args.model}")
    results: list[ProbeResult] = []
    with progress.scope:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            transport = Transport(
                client,
                policy=plan.policy,
                clock=ProgressClock(clock, progress, retries=True),
                on_meta=progress.saw_response,
            )
            for name in plan.probes:
                progress.start_probe(name)

                def on_request(
                    request: HttpRequest, record: RequestRecord, probe: str = name
                ) -> None:
                    evidence.add(probe, request, record)
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
                for line in _summary(result):
                    progress.line(line)
    if progress.closed:
        return EXIT_BROKEN_PIPE
    status = exit_status(results)
    if args.json:
        payload: dict[str, Any] = {
            "provider_type": args.provider_type,
            "base_url": plan.adapter.base_url,
            "model": args.model,
            "exit_status": status,
            "evidence_dir": str(evidence_dir) if evidence_dir else None,
            "probes": [r.to_dict() for r in results],
        }
        print(json.dumps(payload, indent=2), file=out)
    else:
        _print_replay(out, evidence)
    return status


def _fmt_tokens(value: int | None) -> str:
    return "-" if value is None else str(value)


def _fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _fmt_hit(record: RequestRecord) -> str:
    if not record.ok:
        return str(record.error_type)
    if record.hit is None:
        return "n/r"  # the API reported no cache fields
    return "hit" if record.hit else "miss"


def table_line(index: int | None, record: RequestRecord | None) -> str:
    """One line of the evidence table: the header when ``record`` is None, else its row.

    The only place the table's columns are defined, so a new column is one edit here.
    """
    if record is None:
        return (
            f"  {'#':>2}  {'request':<22} {'status':>6} {'att':>3} {'prompt':>7} {'cached':>7} "
            f"{'write':>6} {'compl':>5} {'latency':>8} {'ttft':>8}  result"
        )
    r = record
    return (
        f"  {index:>2}  {r.label[:22]:<22} {_fmt_tokens(r.status):>6} {r.attempts:>3} "
        f"{_fmt_tokens(r.prompt_tokens):>7} {_fmt_tokens(r.cached_tokens):>7} "
        f"{_fmt_tokens(r.cache_write_tokens):>6} {_fmt_tokens(r.completion_tokens):>5} "
        f"{_fmt_seconds(r.latency_seconds):>8} {_fmt_seconds(r.ttft_seconds):>8}  "
        f"{_fmt_hit(r)}"
    )


def _summary(result: ProbeResult) -> list[str]:
    """The verdict of one probe and what it found, printed below its rows."""
    works = {True: "yes", False: "no", None: "unknown"}[result.caching_works]
    ratio = "-" if result.hit_ratio is None else f"{result.hit_ratio:.3f}"
    lines = [
        f"{result.probe}: {result.verdict.value}  (caching works: {works}, hit ratio: "
        f"{ratio}, run {result.run_id}, {result.duration_seconds:.2f}s)"
    ]
    if result.error:
        lines.append(f"  error ({result.error_type}): {result.error}")
    if result.pollution:
        lines.append("  cache pollution: a cold request reported cached tokens")
    for name, size in result.sizes.items():
        size_ratio = "-" if size.hit_ratio is None else f"{size.hit_ratio:.3f}"
        lines.append(
            f"  size {name} ({size.target_tokens} tokens): {size.verdict.value}, "
            f"hit ratio {size_ratio}"
        )
    for delay, hit in sorted(result.ttl.items()):
        shown = "error" if hit is None else ("hit" if hit else "miss")
        lines.append(f"  after {delay:g}s: {shown}")
    if result.first_miss_index is not None:
        lines.append(f"  first miss at request {result.first_miss_index}")
    if result.shared_prefix_tokens is not None:
        lines.append(f"  shared prefix: about {result.shared_prefix_tokens} tokens")
    return lines


def _print_replay(out: TextIO, evidence: _Evidence) -> None:
    if evidence.commands:
        key = f"; key from ${evidence.key_var}" if evidence.key_var else ""
        print(f"\nReplay (request bodies in {evidence.directory}{key}):", file=out)
        for label, command in evidence.commands:
            print(f"\n# {label}\n{command}", file=out)
