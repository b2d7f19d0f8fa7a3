"""Whether one request of real traffic was served from cache.

The probes' rule (SPEC §3, "What counts as a hit") judges cached tokens *beyond* the baseline
every prompt shares (BOS and a chat template's header, which token-granular servers report
as cached on every request), learned from the cold request of a run. Real traffic has no cold
request to learn it from, so traffic uses the rule's fixed cap on that baseline instead: the
first ``TRAFFIC_BASELINE`` cached tokens never count, and a request is a hit when the cached
tokens beyond them cover at least ``HIT_SHARE`` of the rest of its prompt. On the prompts the
cache matters for (thousands of tokens) the baseline is noise; on a short prompt it keeps a
cached template header from reading as a hit.

This is the one place traffic applies the rule. The shared rule (``exporter.hits``) is being
written as its own module; once it is on main this function becomes one line:
``return HitRule(SHARED_PREFIX_CAP).is_hit(usage.cached_tokens, usage.prompt_tokens)``.
"""

from __future__ import annotations

from exporter.results import Usage

# The shared rule's cap on the baseline (exporter.hits.SHARED_PREFIX_CAP) and its share
# (exporter.hits.HIT_SHARE), until that module is importable from here.
TRAFFIC_BASELINE = 64
HIT_SHARE = 0.5


def traffic_hit(usage: Usage) -> bool | None:
    """True/False by the shared rule with a fixed baseline; None if cache is not reported."""
    cached = usage.cached_tokens
    if cached is None:
        return None
    own = max(0, cached - TRAFFIC_BASELINE)
    room = max(1, usage.prompt_tokens - TRAFFIC_BASELINE)
    return own > 0 and own >= HIT_SHARE * room
