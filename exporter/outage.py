"""The provider-wide circuit breaker: an outage is the provider's, not each model's.

When every model of a provider fails in a row the way an outage fails (no connection, a
timeout, a 5xx), probing each model on its own schedule only piles up per-model failures
and cooldowns for one cause, and sends requests that cannot succeed. The breaker has the
shape of the per-model one (``recorder.ModelHealth``):

It applies to providers with two models or more: with one, an outage and a model problem
look the same, and the model's own breaker decides.

* **closed** (``open_until`` 0): every run counts. A run that failed like an outage joins
  the streak; any other finished run (a success, or a failure the provider *answered*: a
  4xx, a bad or in-band error) ends it. The streak opens the breaker once it is
  ``scheduler.outage_after`` runs long and has covered every model that can run (models in
  their own cooldown cannot, nor unpriced ones under a USD budget).
* **open** (``open_until`` in the future): nothing of the provider runs;
  ``llmcache_provider_paused{reason="outage"}`` is 1.
* **half-open** (``open_until`` past): one trial run of one model (each trial the next
  model in turn) decides. An outage failure opens it again for ``scheduler.outage_retry``;
  anything else closes it and every model resumes its schedule.

While it is open, outage failures (the trials', and those of runs still in flight when it
opened) do not count against the models: no per-model cooldown piles up meanwhile. The
state is in memory: after a restart a continuing outage opens it again after one streak.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.results import ErrorType, ProbeResult

# Failures a model-level problem does not cause: the provider did not answer at all.
_UNANSWERED = frozenset({ErrorType.CONNECTION, ErrorType.TIMEOUT})


def outage_failure(result: ProbeResult) -> bool:
    """The run failed the way an outage fails: connection error, timeout or 5xx."""
    if result.success or result.error_type is None:
        return False
    if result.error_type in _UNANSWERED:
        return True
    if result.error_type is not ErrorType.API_ERROR:
        return False
    failed = [r for r in result.requests if not r.ok and r.attempts]
    status = failed[-1].status if failed else None
    return status is not None and status >= 500


def says_nothing(result: ProbeResult) -> bool:
    """Neither an outage nor an answer: a bug of ours, or not sent (budget)."""
    return result.error_type in (ErrorType.INTERNAL, ErrorType.BUDGET)


@dataclass(frozen=True, slots=True)
class ProviderOutage:
    """One provider's breaker (see the module docstring)."""

    failures: int = 0  # consecutive runs that failed like an outage, provider-wide
    models: frozenset[str] = frozenset()  # the models among them
    open_until: float = 0.0

    @property
    def open(self) -> bool:
        """Open or half-open: the provider is paused until a trial run succeeds."""
        return self.open_until > 0.0

    def cooling(self, now: float) -> bool:
        return self.open_until > now

    def trial(self, now: float) -> bool:
        return 0.0 < self.open_until <= now
