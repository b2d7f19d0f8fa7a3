"""Isolated, size-calibrated probe prompts.

Every prompt starts with the run id, so a run never shares a cache prefix with another run
(the first request of a run is always cold). The filler is plain lower-case English made of
common words, because those are about one token each in every BPE vocabulary we know of;
the remaining error is calibrated away with the prompt-token counts the provider reports.
Text is a pure function of (seed, run id, sizes), so a run can be reproduced exactly.
"""

from __future__ import annotations

import math
import random
import re
import secrets
from dataclasses import dataclass

from exporter.providers.base import Prompt

# Word-ish units: our provider-independent proxy for tokens (the simulator counts the same).
_UNIT = re.compile(r"\w+|[^\w\s]")

_WORDS = (  # noqa: SIM905 - a long word list reads better as prose than as 300 literals
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy process music market sense nation plan college interest "
    "death experience effect use class control care field development role effort rate heart "
    "drug show leader light voice wife police mind price report decision son view "
    "relationship town road arm difference value building action model season society tax "
    "director position player record paper space ground form event official matter center "
    "couple site project activity star table need court oil situation cost industry figure "
    "street image phone data picture practice piece land product doctor wall patient worker "
    "news test movie north love support technology step baby computer type attention film "
    "tree source organization hair window evidence population site truth stage sea garden "
    "river bridge train station clock paper letter table chair window bread apple lake "
    "forest mountain valley island summer winter spring autumn morning evening river stone "
    "simple quiet bright early late small large green blue red yellow warm cold fresh clean "
    "open close begin keep hold bring write read walk talk build carry follow learn teach "
    "grow move live stay play run help start turn show hear watch find give tell call try "
    "ask need feel leave put mean become seem think know want look make take come see go get"
).split()

# What a basic probe aims for relative to the cacheable minimum: enough headroom that a
# calibrated prompt clears the minimum, little enough that the probe stays cheap
# (prime + repeat ≈ 2.1 × the minimum in prompt tokens).
DEFAULT_MARGIN = 1.05
# Size of each partial-probe user message (they differ, the system prompt before them is shared).
PARTIAL_USER_TOKENS = 48
_SENTENCE_WORDS = (8, 16)


def count_units(text: str) -> int:
    return len(_UNIT.findall(text))


def new_run_id() -> str:
    return secrets.token_hex(8)


@dataclass(slots=True)
class _Calibration:
    ratio: float
    observations: int = 0


class Calibrator:
    """Reported tokens per text unit, learned per (provider, model) from real responses."""

    def __init__(self, initial_ratio: float = 1.0) -> None:
        self._initial = initial_ratio
        self._by_key: dict[str, _Calibration] = {}

    def ratio(self, key: str) -> float:
        cal = self._by_key.get(key)
        return cal.ratio if cal else self._initial

    def calibrated(self, key: str) -> bool:
        cal = self._by_key.get(key)
        return cal is not None and cal.observations > 0

    def observe(self, key: str, units: int, reported_tokens: int) -> None:
        if units <= 0 or reported_tokens <= 0:
            return
        measured = reported_tokens / units
        cal = self._by_key.get(key)
        if cal is None or cal.observations == 0:
            self._by_key[key] = _Calibration(measured, 1)
        else:
            # Recent evidence wins but one odd response cannot swing the estimate entirely.
            cal.ratio = 0.5 * cal.ratio + 0.5 * measured
            cal.observations += 1


class PromptFactory:
    """Builds probe prompts of a target size for a (provider, model) calibration key."""

    def __init__(self, *, seed: int = 0, calibrator: Calibrator | None = None) -> None:
        self.seed = seed
        self.calibrator = calibrator or Calibrator()
        # Every request of a probe re-sends the same few prompts; counting a prompt's units
        # is a regex over kilobytes, so it is done once per prompt (str hashes are cached).
        self._units: dict[Prompt, int] = {}

    # -- sizes -----------------------------------------------------------------------------

    def units(self, prompt: Prompt) -> int:
        units = self._units.get(prompt)
        if units is None:
            if len(self._units) >= 64:
                self._units.clear()
            units = self._units[prompt] = count_units(prompt.system) + count_units(prompt.user)
        return units

    def estimate_tokens(self, key: str, prompt: Prompt) -> int:
        return math.ceil(self.units(prompt) * self.calibrator.ratio(key))

    def upper_bound_tokens(self, key: str, prompt: Prompt) -> int:
        """A deliberately high estimate, for spend reservations that must not be exceeded."""
        return self._upper_bound(key, self.units(prompt))

    def upper_bound_for(self, key: str, target_tokens: int) -> int:
        """The same bound for a prompt not built yet, aimed at ``target_tokens`` (what a
        probe's cost estimate lists): the scheduler's budget pre-check."""
        return self._upper_bound(key, self._units_for(key, target_tokens))

    def _upper_bound(self, key: str, units: int) -> int:
        if self.calibrator.calibrated(key):
            return math.ceil(math.ceil(units * self.calibrator.ratio(key)) * 1.15) + 32
        # Uncalibrated: no BPE vocabulary spends more than ~2 tokens per common word here.
        return math.ceil(units * 2.0) + 64

    def observe(self, key: str, prompt: Prompt, reported_prompt_tokens: int) -> None:
        self.calibrator.observe(key, self.units(prompt), reported_prompt_tokens)

    # -- prompts ---------------------------------------------------------------------------

    def prompt(self, key: str, *, run_id: str, target_tokens: int) -> Prompt:
        """An identical-repeat prompt of about ``target_tokens`` prompt tokens."""
        user = "Reply with the single word OK."
        total_units = self._units_for(key, target_tokens)
        header = self._header(run_id)
        filler_units = max(0, total_units - count_units(header) - count_units(user))
        rng = random.Random(f"{self.seed}:{run_id}:{target_tokens}")
        return Prompt(system=header + _filler(rng, filler_units), user=user)

    def partial_prompts(
        self,
        key: str,
        *,
        run_id: str,
        prefix_tokens: int,
        variants: int,
        user_tokens: int = PARTIAL_USER_TOKENS,
    ) -> list[Prompt]:
        """Prompts sharing one long system prompt, each with a different user message.

        The user messages have equal length so every request has the same prompt size.
        """
        header = self._header(run_id)
        prefix_units = max(0, self._units_for(key, prefix_tokens) - count_units(header))
        system = header + _filler(random.Random(f"{self.seed}:{run_id}:prefix"), prefix_units)
        user_units = max(8, self._units_for(key, user_tokens))
        out: list[Prompt] = []
        for i in range(variants):
            lead = f"Question {i + 1}: "
            rng = random.Random(f"{self.seed}:{run_id}:user:{i}")
            body = _filler(rng, max(2, user_units - count_units(lead)))
            out.append(Prompt(system=system, user=lead + body + " Reply with one word."))
        return out

    def user_tokens(self, key: str, prompt: Prompt) -> int:
        return math.ceil(count_units(prompt.user) * self.calibrator.ratio(key))

    # -- internals -------------------------------------------------------------------------

    def _units_for(self, key: str, tokens: int) -> int:
        return max(1, round(tokens / self.calibrator.ratio(key)))

    @staticmethod
    def _header(run_id: str) -> str:
        # The run id comes first: nothing before it may be shared with any other run.
        return f"Run {run_id}. You are a cache probe; the text below is filler. "


def _filler(rng: random.Random, units: int) -> str:
    """Sentences of common words totalling exactly ``units`` units (each period is a unit)."""
    sentences: list[str] = []
    remaining = units
    lo, hi = _SENTENCE_WORDS
    while remaining > 0:
        if remaining <= hi + 1:
            words = remaining - 1
            if words <= 0:
                sentences.append(rng.choice(_WORDS))
                break
        else:
            words = rng.randint(lo, hi)
            # Never leave a remainder too small for a sentence of its own.
            if remaining - (words + 1) < 2:
                words = remaining - 3
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(words)) + ".")
        remaining -= words + 1
    return " ".join(sentences)
