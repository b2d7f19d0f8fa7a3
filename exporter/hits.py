"""What counts as a cache hit: the one rule behind every verdict, ratio and hit counter.

A response's ``cached_tokens`` is not evidence by itself. Servers with token-granular
prefix caching (llama.cpp, SGLang, LMCache) report the tokens that precede the run id (BOS,
the chat template's header) as cached on every request, cold ones included, and a busy
server that has evicted our prompt keeps reporting them. So a request is judged on the
cached tokens *beyond* that shared baseline:

* the **baseline** is learned from the run's cold requests: whatever a cold request
  reports cached cannot be this run's prompt (its run id is new), so it is what every
  prompt shares. It is bounded by ``SHARED_PREFIX_CAP``, so one genuinely polluted cold
  request cannot lift it over a real hit;
* a request is a **hit** when the cached tokens beyond the baseline cover at least
  ``HIT_SHARE`` of the run-specific part that could be cached (the whole prompt, or the
  shared prefix in the partial probe). Block granularity (OpenAI's 1024 + 128 n) loses at
  most one block, far less than half; the shared template alone is nothing;
* a **ratio** is run-specific cached ÷ run-specific cacheable tokens;
* **pollution** is a cold request whose cached tokens reach past the baseline.

Everything here is pure (plain numbers and read-only records in, numbers out, no I/O), so
the probes, a load test and a pass-through proxy can judge requests the same way.
docs/metrics.md ("What counts as a hit") gives the reasons and every formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Tokens that may precede the run id and be shared by every prompt: BOS plus a chat
# template's header (Llama 3's system header with its knowledge-cutoff and date lines is
# about 30 tokens; ChatML's is 3). Our run id is the first thing we send, so more than a
# few dozen shared tokens cannot come from the template: a cold request reporting more was
# served something of ours (or someone else's copy of it), which is pollution, not baseline.
SHARED_PREFIX_CAP = 64

# Share of the run-specific cacheable tokens a request must have served from cache to be a
# hit. Providers cache in blocks (OpenAI: 1024 then 128-token steps, DeepSeek 64, vLLM 16),
# so a real hit on a prompt just above the minimum covers ~89 % or more of it; half leaves
# room for coarser blocks while a partly evicted prompt that keeps only a block or two of
# its head (or the template alone) is a miss.
HIT_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class HitRule:
    """The rule for one run (or any group of requests that share a baseline).

    ``baseline`` is the number of cached tokens every prompt shares; they never count.
    """

    baseline: int = 0
    share: float = HIT_SHARE

    @classmethod
    def learn(
        cls,
        cold_cached: Iterable[int | None],
        *,
        cap: int = SHARED_PREFIX_CAP,
        fixed: int | None = None,
    ) -> HitRule:
        """The rule whose baseline is the most any cold request reported cached, capped.

        The largest (not the smallest) because each cold request can only under-report the
        shared part (a template not yet cached, a chunk evicted): whatever any of them
        reports up to the cap is shared. ``fixed`` replaces the learned baseline (and its
        cap) for a server known to share more, e.g. a gateway that injects a long system
        prompt before ours.
        """
        if fixed is not None:
            return cls(max(0, fixed))
        reported = [max(0, c) for c in cold_cached if c is not None]
        return cls(min(cap, max(reported, default=0)))

    def own_cached(self, cached: int | None) -> int | None:
        """Cached tokens beyond the baseline: the run's own prompt served from cache."""
        return None if cached is None else max(0, cached - self.baseline)

    def own_tokens(self, tokens: int | None) -> int:
        """The run-specific part of a prompt (or prefix) of ``tokens`` tokens."""
        return max(0, (tokens or 0) - self.baseline)

    def is_hit(self, cached: int | None, cacheable: int | None) -> bool | None:
        """Whether the run's own prompt was served from cache; None if not reported.

        ``cacheable`` is what could have been served: the prompt tokens, or in the partial
        probe the shared prefix.
        """
        own = self.own_cached(cached)
        if own is None:
            return None
        return own > 0 and own >= self.share * max(1, self.own_tokens(cacheable))

    def ratio(self, cached: int | None, cacheable: int | None) -> float | None:
        """own cached ÷ own cacheable tokens, in [0, 1]; None if not reported or empty."""
        own = self.own_cached(cached)
        room = self.own_tokens(cacheable)
        if own is None or room <= 0:
            return None
        return min(1.0, own / room)

    def polluted(self, cached: int | None) -> bool:
        """A cold request whose cached tokens reach into the run-specific part."""
        return cached is not None and cached > self.baseline


class Observed(Protocol):
    """One request as the rule sees it (``RequestRecord`` is one; so is any plain record)."""

    @property
    def cold(self) -> bool: ...
    @property
    def ok(self) -> bool: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def cached_tokens(self) -> int | None: ...


class Timed(Protocol):
    """A judged request with its time to first token."""

    @property
    def cold(self) -> bool: ...
    @property
    def ok(self) -> bool: ...
    @property
    def hit(self) -> bool | None: ...
    @property
    def ttft_seconds(self) -> float | None: ...


def rule_for(records: Iterable[Observed], *, fixed: int | None = None) -> HitRule:
    """The rule of a run, learned from its successful cold requests."""
    return HitRule.learn((r.cached_tokens for r in records if r.cold and r.ok), fixed=fixed)


def any_reported(records: Iterable[Observed]) -> bool:
    """Whether any successful request reported cache fields ("not reported" ≠ "0 cached")."""
    return any(r.cached_tokens is not None for r in records if r.ok)


def token_ratio(records: Sequence[Observed], rule: HitRule) -> float | None:
    """Σ own cached ÷ Σ own prompt tokens over successful requests; None if not reported."""
    done = [r for r in records if r.ok]
    room = sum(rule.own_tokens(r.prompt_tokens) for r in done)
    if room <= 0 or not any_reported(done):
        return None
    return min(1.0, sum(rule.own_cached(r.cached_tokens) or 0 for r in done) / room)


def polluted(records: Iterable[Observed], rule: HitRule) -> bool:
    return any(r.cold and r.ok and rule.polluted(r.cached_tokens) for r in records)


@dataclass(frozen=True, slots=True)
class TtftWitness:
    """Time to first token, cold against warm: the cache's user-visible benefit.

    A witness only, never the verdict: TTFT is noisy and some APIs do not stream. Each hit
    is compared with the cold request sent last before it (its own prime in every probe).
    """

    cold_seconds: float | None  # mean over successful cold requests
    warm_seconds: float | None  # mean over successful warm requests
    hit_seconds: float | None  # mean over the hits
    # Per request, in order: True for a hit no faster than the cold request before it,
    # False for a hit that was faster, None where there is nothing to compare.
    no_faster: tuple[bool | None, ...] = ()

    @property
    def slow_hits(self) -> int:
        return sum(1 for flag in self.no_faster if flag)


def ttft_witness(records: Sequence[Timed]) -> TtftWitness:
    cold: list[float] = []
    warm: list[float] = []
    hits: list[float] = []
    flags: list[bool | None] = []
    last_cold: float | None = None
    for r in records:
        seconds = r.ttft_seconds if r.ok else None
        flag: bool | None = None
        if seconds is not None and r.cold:
            cold.append(seconds)
            last_cold = seconds
        elif seconds is not None:
            warm.append(seconds)
            if r.hit:
                hits.append(seconds)
                flag = None if last_cold is None else seconds >= last_cold
        flags.append(flag)
    return TtftWitness(_mean(cold), _mean(warm), _mean(hits), tuple(flags))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
