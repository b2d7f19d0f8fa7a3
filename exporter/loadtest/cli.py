"""``prompt-cache-exporter loadtest``: does caching hold under load?

Plans the run, prints what it will cost, refuses it when that exceeds the cap (before any
request), then drives it and writes the report. Ctrl-C (or SIGTERM) stops it: requests in
flight are cancelled and the report covers every request that finished. The key is read
from the environment as ``probe`` reads it and never printed. Only this command runs a
load test: the daemon never does.

Exit status (exporter.exits, as for the other commands): 0 caching held (every warm request
hit, or some did), 1 it did not, 2 usage error or refused by the cap, 3 no verdict (no cache
fields reported, or requests failed), 130 interrupted, 141 the reader of the output went
away. Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Mapping
from typing import TextIO

import anyio

from exporter import reports
from exporter.assembly import build_adapter
from exporter.cli_args import UsageError, add_target_arguments, duration_arg, resolve_target
from exporter.clock import Clock, SystemClock
from exporter.exits import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NO_VERDICT,
    EXIT_OK,
    EXIT_USAGE,
    reader_gone,
)
from exporter.loadtest.driver import AttemptLog, LoadDriver, make_target, open_client
from exporter.loadtest.plan import (
    DEFAULT_MAX_TOTAL_TOKENS,
    LoadOptions,
    LoadPlan,
    PlanError,
    plan_load,
)
from exporter.loadtest.result import LoadResult
from exporter.prompts import PromptFactory, new_run_id
from exporter.providers.base import BadResponse, HttpRequest, ProviderAdapter
from exporter.results import ModelPrice, RequestRecord
from exporter.transport import RetryPolicy, Transport, TransportError

# The models list is only read for a price; it must not hold up the run for long.
_PRICE_POLICY = RetryPolicy(attempts=1, timeout=10.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser, model_help="model id to load")
    parser.add_argument(
        "-n", "--requests", type=int, required=True, metavar="REQUESTS", help="requests to send"
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        type=int,
        required=True,
        metavar="CONCURRENCY",
        help="requests in flight at once",
    )
    parser.add_argument(
        "--duration", metavar="D", help="start no new request after this long, e.g. 2m"
    )
    parser.add_argument(
        "--shared-prefix",
        type=int,
        metavar="TOKENS",
        help="tokens of the prefix every request shares (default: just above the "
        "provider's minimum cacheable length)",
    )
    parser.add_argument(
        "--max-total-tokens",
        type=int,
        default=DEFAULT_MAX_TOTAL_TOKENS,
        metavar="N",
        help="refuse to start when the estimate exceeds this; never spend more "
        "(default: %(default)s)",
    )
    reports.add_format_arguments(parser)


def _options(args: argparse.Namespace) -> LoadOptions:
    duration = duration_arg("duration", args.duration) if args.duration else None
    return LoadOptions(
        requests=args.requests,
        concurrency=args.concurrency,
        duration=duration,
        shared_prefix=args.shared_prefix,
        max_total_tokens=args.max_total_tokens,
    )


async def _published_price(
    transport: Transport, adapter: ProviderAdapter, model: str
) -> ModelPrice | None:
    """The model's price from the provider's models list, where it publishes one."""
    try:
        body = await transport.get_json(adapter, adapter.models_request())
        infos = adapter.parse_models(body)
    except (TransportError, BadResponse):
        return None  # no price: the estimate says "not priced"
    return next((info.price for info in infos if info.id == model), None)


def _announce(plan: LoadPlan, model: str, err: TextIO) -> None:
    estimate, options = plan.estimate, plan.options
    usd = "not priced" if estimate.usd is None else f"at most ${estimate.usd:.4f}"
    print(
        f"loadtest: {options.requests} requests to {model} at concurrency "
        f"{options.concurrency}, shared prefix about {plan.prefix_tokens} tokens; estimated "
        f"{estimate.prompt_tokens:,} prompt + {estimate.completion_tokens:,} completion = "
        f"{estimate.total_tokens:,} tokens (cap {options.max_total_tokens:,}), {usd}",
        file=err,
    )
    if plan.below_minimum:
        print(
            f"warning: the shared prefix is below the provider's minimum cacheable length "
            f"({plan.min_cacheable_tokens} tokens): warm requests cannot hit",
            file=err,
        )


class _Replays:
    """The first cold and the first warm request, for the report's curl commands."""

    def __init__(self) -> None:
        self.sent: dict[bool, tuple[str, HttpRequest]] = {}

    def __call__(self, request: HttpRequest, record: RequestRecord) -> None:
        if record.cold not in self.sent:
            kind = "cold" if record.cold else "warm"
            self.sent[record.cold] = (f"{record.label} ({kind})", request)

    def ordered(self) -> list[tuple[str, HttpRequest]]:
        return [self.sent[cold] for cold in (True, False) if cold in self.sent]


def _replays(
    fmt: str, sent: list[tuple[str, HttpRequest]], key_var: str | None, env: Mapping[str, str]
) -> list[reports.Replay]:
    """Inline in the HTML file (it must stand alone); bodies in files for the terminal."""
    if fmt == "html":
        return reports.inline_replays(sent, key_var)
    if fmt == "text" and sent:
        return reports.file_replays(sent, key_var, reports.new_evidence_dir(env, "loadtest"))
    return []


async def _drive(driver: LoadDriver, *, handle_signals: bool) -> bool:
    """Run the load test; True if a signal stopped it."""
    interrupted = False
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def watch() -> None:
            nonlocal interrupted
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    interrupted = True
                    scope.cancel()
                    return

        if handle_signals:
            tg.start_soon(watch)
        with scope:
            await driver.run()
        tg.cancel_scope.cancel()
    return interrupted


def exit_status(result: LoadResult) -> int:
    if result.stopped == "interrupted":
        return EXIT_INTERRUPTED
    return {True: EXIT_OK, False: EXIT_FAILURE, None: EXIT_NO_VERDICT}[result.caching_works]


async def run(
    args: argparse.Namespace,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    clock: Clock | None = None,
    handle_signals: bool = True,
) -> int:
    env = os.environ if env is None else env
    out = out or sys.stdout
    err = err or sys.stderr
    clock = clock or SystemClock()
    try:
        options = _options(args)
        target = resolve_target(args, env)
        provider = target.provider(args.provider_type)
        output = reports.check_output(args.output)
    except (UsageError, PlanError, reports.OutputError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    adapter = build_adapter(provider, env)
    key_var = target.key_var
    prompts = PromptFactory()
    plan = plan_load(
        options,
        run_id=new_run_id(),
        # The probes' calibration key (ProbeContext.calibration_key): provider/model.
        calibration_key=f"{args.provider_type}/{args.model}",
        min_cacheable_tokens=adapter.min_cacheable_for(args.model),
        max_tokens=adapter.max_tokens,
        prompts=prompts,
    )
    refusal = plan.estimate.refusal(options.max_total_tokens)
    if refusal is not None:
        print(f"error: {refusal}", file=err)  # nothing has been sent
        return EXIT_USAGE
    if output is None and reader_gone(out):
        return EXIT_BROKEN_PIPE  # nobody would read the report: spend nothing on it
    if (warning := target.missing_key_warning()) is not None:
        print(warning, file=err)
    log = AttemptLog(clock)
    async with open_client(log, connections=options.concurrency) as client:
        price = await _published_price(
            Transport(client, policy=_PRICE_POLICY, clock=clock), adapter, args.model
        )
        plan = dataclasses.replace(plan, estimate=plan.estimate.priced(price))
        _announce(plan, args.model, err)
        replays = _Replays()
        driver = LoadDriver(
            plan=plan,
            target=make_target(adapter, args.provider_type, args.model, price),
            adapter=adapter,
            transport=Transport(client, policy=RetryPolicy(), clock=clock),
            prompts=prompts,
            clock=clock,
            log=log,
            on_request=replays,
        )
        interrupted = await _drive(driver, handle_signals=handle_signals)
    result = driver.result(interrupted=interrupted)
    if interrupted:
        print(
            f"interrupted: {result.sent - result.cancelled} of {options.requests} requests "
            "finished; the report covers them",
            file=err,
        )
    report = reports.LoadReport(
        info=reports.ReportInfo(generated_at=clock.time()),
        result=result,
        replays=_replays(args.format, replays.ordered(), key_var, env),
        key_var=key_var,
    )
    reports.write_report(reports.render_load(args.format, report), output, out, err)
    return exit_status(result)
