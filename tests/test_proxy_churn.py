"""Prefix churn: a changing system prompt reads as churn ≈ 1 and fires the "prompts changed"
alert in promtool; a stable prefix reads as churn ≈ 0 and its requests hit.

The hashing itself is checked on plain request bodies: what counts as the prefix, which part
is blamed, what does not count as a change (moved cache_control markers, later messages).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from exporter.proxy.prefix import CHARS_PER_TOKEN, PrefixHasher, PrefixTracker, RecentDigests
from tests.provisioning_lint import LINKS_RULES, TRAFFIC_RULES, link_bases
from tests.proxy_rig import ProxyRig, proxy_rig

REPO = Path(__file__).resolve().parent.parent
MIN = 1024 * CHARS_PER_TOKEN
LONG = "Follow the style guide exactly. " * 200  # ~6,400 characters: past the minimum
TOOLS = [
    {"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "write", "parameters": {"type": "object"}}},
]


def _openai_body(system: str, user: str = "hi", tools: Any = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        **extra,
    }
    if tools is not None:
        body["tools"] = tools
    return body


def _observe(
    tracker: PrefixTracker, hasher: PrefixHasher, body: Any, family: str = "openai"
) -> Any:
    digests = hasher.digests(family, body, MIN)
    assert digests is not None
    return tracker.observe(digests)


# -- hashing ------------------------------------------------------------------------------------


def test_a_stable_prefix_is_new_once_then_known() -> None:
    hasher, tracker = PrefixHasher(), PrefixTracker(16)
    parts = [_observe(tracker, hasher, _openai_body(LONG, f"question {i}")) for i in range(5)]
    # Different user messages after a long system prompt do not change the prefix.
    assert parts == ["system", None, None, None, None]


def test_the_part_that_changed_is_named() -> None:
    hasher, tracker = PrefixHasher(), PrefixTracker(16)
    assert _observe(tracker, hasher, _openai_body(LONG, tools=TOOLS)) == "tools"
    assert _observe(tracker, hasher, _openai_body(LONG, tools=TOOLS)) is None
    # The same tools in another order are other tools, as the provider renders them.
    assert _observe(tracker, hasher, _openai_body(LONG, tools=TOOLS[::-1])) == "tools"
    assert _observe(tracker, hasher, _openai_body(LONG + " v2", tools=TOOLS)) == "system"
    # A short system prompt: the first block runs into the messages.
    short = "Be brief."
    assert _observe(tracker, hasher, _openai_body(short, "x" * MIN)) == "system"
    assert _observe(tracker, hasher, _openai_body(short, "y" * MIN)) == "messages"


def test_only_the_first_cacheable_block_of_messages_counts() -> None:
    hasher, tracker = PrefixHasher(), PrefixTracker(16)
    head = "z" * MIN
    assert _observe(tracker, hasher, _openai_body("s", head + " first turn")) == "system"
    assert _observe(tracker, hasher, _openai_body("s", head + " another tail")) is None


def test_anthropic_markers_that_move_between_turns_change_nothing() -> None:
    hasher, tracker = PrefixHasher(), PrefixTracker(16)
    marker = {"type": "ephemeral"}

    def body(turns: int) -> dict[str, Any]:
        messages = [
            {"role": "user", "content": [{"type": "text", "text": f"turn {i}"}]}
            for i in range(turns)
        ]
        messages[-1]["content"][0]["cache_control"] = marker  # on the latest turn
        return {
            "model": "claude",
            "system": [{"type": "text", "text": LONG, "cache_control": marker}],
            "messages": messages,
        }

    assert _observe(tracker, hasher, body(1), "anthropic") == "system"
    assert _observe(tracker, hasher, body(2), "anthropic") is None
    assert _observe(tracker, hasher, body(3), "anthropic") is None


def test_a_prompt_below_the_minimum_is_not_hashed() -> None:
    hasher = PrefixHasher()
    assert hasher.digests("openai", _openai_body("short", "tiny"), MIN) is None
    assert hasher.digests("openai", {"model": "m"}, MIN) is None
    assert hasher.digests("openai", ["not", "a", "body"], MIN) is None


def test_digests_are_keyed_per_process_and_recent_sets_are_bounded() -> None:
    body = _openai_body(LONG)
    one, two = PrefixHasher(), PrefixHasher()
    assert one.digests("openai", body, MIN) != two.digests("openai", body, MIN)
    recent = RecentDigests(3)
    for digest in (b"a", b"b", b"c", b"a", b"d"):  # "b" is the least recently seen
        recent.check_in(digest)
    assert len(recent) == 3
    assert recent.check_in(b"a")
    assert not recent.check_in(b"b")  # evicted, so new again


# -- through the proxy --------------------------------------------------------------------------


async def _run(rig: ProxyRig, *, churning: bool, requests: int) -> list[Any]:
    http = httpx.AsyncClient(trust_env=False)
    client = openai.AsyncOpenAI(
        base_url=rig.url + "/v1", api_key="sk-churn", max_retries=0, http_client=http
    )
    usages = []
    async with client:
        for i in range(requests):
            # The classic mistake: a timestamp at the top of the system prompt.
            system = (f"Current time: 2026-12-01T10:{i:02d}:00Z\n" if churning else "") + LONG
            completion = await client.chat.completions.create(
                model="sim-cache-ok",
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"q{i}"},
                ],
                max_tokens=5,
            )
            usages.append(completion.usage)
    await rig.idle()
    return usages


def _figures(rig: ProxyRig) -> dict[str, float]:
    labels = {"provider": "sim", "model": "sim-cache-ok"}

    def get(name: str, **more: str) -> float:
        value = rig.sample(name, **labels, **more)
        assert value is not None, name
        return value

    changes = sum(
        get("llmcache_traffic_prefix_changes_total", part=p)
        for p in ("tools", "system", "messages")
    )
    return {
        "prompt": get("llmcache_traffic_prompt_tokens_total"),
        "cached": get("llmcache_traffic_cached_tokens_total"),
        "hashed": get("llmcache_traffic_prefix_requests_total"),
        "changes": changes,
        "system_changes": get("llmcache_traffic_prefix_changes_total", part="system"),
        "hits": get("llmcache_traffic_cache_requests_total", cache="hit"),
    }


@pytest.mark.anyio
async def test_a_churning_system_prompt_gives_churn_1_and_no_hits() -> None:
    async with proxy_rig() as rig:
        usages = await _run(rig, churning=True, requests=20)
    figures = _figures(rig)
    assert figures["hashed"] == 20
    assert figures["changes"] / figures["hashed"] == 1.0
    assert figures["system_changes"] == 20
    assert figures["hits"] == 0
    assert all(u.prompt_tokens_details.cached_tokens == 0 for u in usages)


@pytest.mark.anyio
async def test_a_stable_prefix_gives_churn_near_0_and_hits_follow() -> None:
    async with proxy_rig() as rig:
        usages = await _run(rig, churning=False, requests=20)
    figures = _figures(rig)
    assert figures["hashed"] == 20
    assert figures["changes"] == 1  # the first request ever, and no other
    assert figures["changes"] / figures["hashed"] == 0.05
    assert figures["hits"] == 19
    assert [u.prompt_tokens_details.cached_tokens > 0 for u in usages] == [False] + [True] * 19


# -- the alert, from the figures measured above ------------------------------------------------


def _alert_test(figures: dict[str, float], *, fires: bool) -> dict[str, Any]:
    """A promtool test whose input is an hour of the measured traffic, one measured request
    per minute (per-request averages of the counters), with the basic probe saying works."""
    per = {k: figures[k] / figures["hashed"] for k in ("prompt", "cached", "changes")}
    labels = 'job="pce",provider="sim",model="sim-cache-ok"'

    def series(name: str, step: float, extra: str = "") -> dict[str, str]:
        return {"series": f"{name}{{{labels}{extra}}}", "values": f"0+{step:g}x90"}

    case: dict[str, Any] = {"eval_time": "45m", "alertname": "LLMCacheTrafficPromptsChanged"}
    case["exp_alerts"] = []
    if fires:
        rule = next(
            r
            for g in yaml.safe_load(TRAFFIC_RULES.read_text())["groups"]
            for r in g["rules"]
            if r.get("alert") == "LLMCacheTrafficPromptsChanged"
        )
        links = link_bases()
        url = f"{links['grafana_url']}/d/pce-model-detail?var-provider=sim&var-model=sim-cache-ok"
        case["exp_alerts"] = [
            {
                "exp_labels": {
                    "severity": "warning",
                    "job": "pce",
                    "provider": "sim",
                    "model": "sim-cache-ok",
                },
                "exp_annotations": {
                    "summary": rule["annotations"]["summary"],
                    "description": (
                        "Only 0% of the prompt tokens of real requests to sim-cache-ok on sim "
                        "were read from the cache over the last hour, while the basic probe "
                        "says caching works. 100% of the requests came with a cacheable "
                        "prefix not seen recently (llmcache_traffic_prefix_changes_total by "
                        "part tells whether tools, system prompt or messages changed)."
                    ),
                    "runbook_url": f"{links['runbook_url']}#llmcachetrafficpromptschanged",
                    "dashboard_url": url,
                },
            }
        ]
    return {
        "rule_files": [str(LINKS_RULES), str(TRAFFIC_RULES)],
        "evaluation_interval": "1m",
        "group_eval_order": [
            "llmcache-links.rules",
            "llmcache-traffic.rules",
            "llmcache-traffic.alerts",
        ],
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("llmcache_traffic_prompt_tokens_total", per["prompt"]),
                    series("llmcache_traffic_cached_tokens_total", per["cached"]),
                    series("llmcache_traffic_prefix_requests_total", 1),
                    series(
                        "llmcache_traffic_prefix_changes_total", per["changes"], ',part="system"'
                    ),
                    {
                        "series": f'llmcache_caching_works{{{labels},probe="basic"}}',
                        "values": "1+0x90",
                    },
                ],
                "alert_rule_test": [case],
            }
        ],
    }


def _promtool(test: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (Debian package prometheus)"
    path = tmp_path / "measured_test.yml"
    path.write_text(yaml.safe_dump(test), encoding="utf-8")
    return subprocess.run(
        [promtool, "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.anyio
async def test_the_prompts_changed_alert_fires_on_measured_churn_and_not_on_a_stable_prefix(
    tmp_path: Path,
) -> None:
    async with proxy_rig() as rig:
        await _run(rig, churning=True, requests=10)
    churning = _figures(rig)
    assert churning["cached"] == 0  # what the expected description says: 0 %, and 100 %
    assert churning["changes"] == churning["hashed"]
    async with proxy_rig() as rig:
        await _run(rig, churning=False, requests=10)
    stable = _figures(rig)

    fired = _promtool(_alert_test(churning, fires=True), tmp_path)
    assert fired.returncode == 0, fired.stdout + fired.stderr
    quiet = _promtool(_alert_test(stable, fires=False), tmp_path)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    # And the other way round fails, so the two runs above are not vacuous.
    wrong = _promtool(_alert_test(stable, fires=True), tmp_path)
    assert wrong.returncode != 0
    assert "LLMCacheTrafficPromptsChanged" in wrong.stdout + wrong.stderr
