"""The five probes, dispatched by name. Every probe has the same signature and never raises."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import anyio

from exporter import tracecontext
from exporter.config import PROBE_NAMES
from exporter.probes import basic, partial, persistence, prompt_sizes, ttl
from exporter.probes.common import ProbeContext, ProbeFn, ProbeSettings, judge_run, new_result
from exporter.probes.cost import ProbeEstimate
from exporter.results import ErrorType, ProbeResult, Verdict

log = logging.getLogger(__name__)

_MODULES = {m.NAME: m for m in (basic, prompt_sizes, partial, persistence, ttl)}
# In the configuration's order; a name without a module (or a module without a name in the
# configuration) fails here, at import, rather than at the first run.
PROBES: dict[str, ProbeFn] = {name: _MODULES[name].run for name in PROBE_NAMES}
# Each probe's own cost estimate (exporter.probes.cost): pre-check, reservations, forecast.
PROBE_COSTS: dict[str, ProbeEstimate] = {name: _MODULES.pop(name).estimate for name in PROBE_NAMES}
if _MODULES:  # pragma: no cover - a programming error caught by every test run
    raise ImportError(f"probe modules missing from PROBE_NAMES: {sorted(_MODULES)}")

__all__ = ["PROBES", "PROBE_COSTS", "PROBE_NAMES", "ProbeContext", "ProbeSettings", "run_probe"]


async def run_probe(name: str, ctx: ProbeContext, *, deadline: float | None = None) -> ProbeResult:
    """Run probe ``name`` once under a fresh run id and trace, within ``deadline`` seconds.

    Returns a result whatever happens: a deadline becomes a ``timeout`` error and an
    unexpected exception an ``internal`` error, both with the evidence gathered so far.
    """
    run_ctx = replace(
        ctx, run_id=ctx.run_id_factory(), trace_id=tracecontext.new_trace_id(), records=[]
    )
    clock = run_ctx.clock
    started = clock.time()
    t0 = clock.monotonic()
    try:
        scope = anyio.fail_after(deadline) if deadline else contextlib.nullcontext()
        with scope:
            result = await PROBES[name](run_ctx)
    except TimeoutError:
        result = new_result(run_ctx, name, Verdict.ERROR)
        result.error_type = ErrorType.TIMEOUT
        result.error = f"probe deadline of {deadline:g}s exceeded"
        for record in run_ctx.records:
            if record.ok and record.prompt_tokens is None:
                # Cut off in flight: a failed request, counted as such.
                record.error_type = ErrorType.TIMEOUT
                record.error = "cancelled by the probe deadline"
                record.attempts = max(1, record.attempts)
    except Exception as exc:  # a probe never raises to the loop; the bug is logged
        log.exception("probe %s for %s/%s failed", name, ctx.provider, ctx.model)
        result = new_result(run_ctx, name, Verdict.ERROR)
        result.error_type = ErrorType.INTERNAL
        result.error = f"internal error: {type(exc).__name__}"
    result.started_at = started
    result.finished_at = clock.time()
    result.duration_seconds = clock.monotonic() - t0
    result.requests = run_ctx.records
    judge_run(result, run_ctx.settings)
    return result
