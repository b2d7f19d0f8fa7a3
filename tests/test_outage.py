"""What counts as an outage failure, judged on real runs over HTTP on 127.0.0.1: the
simulator's 500s and a port nobody listens on are the provider's trouble; a 429, a refused
key, an unknown model and a working cache are answers. (The breaker's timing is tested on
the virtual clock in tests/test_scheduler.py.)"""

from __future__ import annotations

import pytest

from exporter.outage import outage_failure, says_nothing
from exporter.probes import run_probe
from exporter.results import ErrorType, ProbeResult, Verdict
from exporter.simulator.config import SimConfig
from exporter.simulator.models import DEFAULT_MODELS
from exporter.transport import RetryPolicy
from tests.conftest import EVERY_4TH, SimRig, open_rig
from tests.hostile_upstream import Reply, hostile_upstream
from tests.simulator_process import free_port

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("model", "error_type", "outage"),
    [
        ("sim-error", ErrorType.API_ERROR, True),  # 500 after every attempt
        ("sim-every-4th", ErrorType.RATE_LIMIT, False),  # 429: the provider answers
        ("no-such-model", ErrorType.API_ERROR, False),  # 404
        ("sim-cache-ok", None, False),
    ],
)
@pytest.mark.parametrize(
    "sim_config", [SimConfig(latency_scale=0.0, models=(*DEFAULT_MODELS, EVERY_4TH))]
)
async def test_runs_against_the_simulator(
    rig: SimRig, model: str, error_type: ErrorType | None, outage: bool
) -> None:
    result = await rig.probe("basic", model)
    assert result.error_type is error_type, result.error
    assert outage_failure(result) is outage
    assert not says_nothing(result)


async def test_a_refused_key_is_an_answer() -> None:
    async with open_rig(SimConfig(latency_scale=0.0, api_key="sk-right")) as rig:
        result = await rig.probe("basic", "sim-cache-ok", api_key="sk-wrong")
    assert result.error_type is ErrorType.AUTH
    assert not outage_failure(result)


async def test_nobody_listening_is_an_outage(rig: SimRig) -> None:
    ctx = rig.context("sim-cache-ok")
    ctx.adapter.base_url = f"http://127.0.0.1:{free_port()}/v1"
    result = await run_probe("basic", ctx)
    assert result.error_type is ErrorType.CONNECTION
    assert result.requests[0].status is None
    assert outage_failure(result)


async def test_an_upstream_that_stalls_is_an_outage(rig: SimRig) -> None:
    """Headers, then a body dripped slower than the request's one deadline: a timeout."""
    drip = Reply(body=[b"{"] * 50, pause=0.05)
    async with hostile_upstream(lambda method, path, headers: drip) as upstream:
        ctx = rig.context("sim-cache-ok", policy=RetryPolicy(attempts=1, timeout=0.2))
        ctx.adapter.base_url = upstream.url + "/v1"
        result = await run_probe("basic", ctx)
    assert upstream.requests
    assert result.error_type is ErrorType.TIMEOUT
    assert outage_failure(result)


def test_a_skipped_run_and_a_bug_say_nothing() -> None:
    def result(verdict: Verdict, error_type: ErrorType) -> ProbeResult:
        return ProbeResult("basic", "p", "m", "r", verdict, 0.0, 0.0, error_type=error_type)

    for skipped in (
        result(Verdict.SKIPPED, ErrorType.BUDGET),
        result(Verdict.ERROR, ErrorType.INTERNAL),
    ):
        assert says_nothing(skipped)
        assert not outage_failure(skipped)
