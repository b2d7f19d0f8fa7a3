"""Prompt generation: isolation by run id, exact sizes, determinism, calibration."""

from __future__ import annotations

import pytest

from exporter.prompts import Calibrator, PromptFactory, count_units, new_run_id


def test_run_id_comes_first_and_runs_share_no_prefix() -> None:
    factory = PromptFactory(seed=3)
    a = factory.prompt("k", run_id="aaaa1111", target_tokens=1100)
    b = factory.prompt("k", run_id="bbbb2222", target_tokens=1100)
    assert a.system.startswith("Run aaaa1111.")
    assert b.system.startswith("Run bbbb2222.")
    # The first differing character is inside the run id: nothing before it is shared.
    common = next(i for i, (x, y) in enumerate(zip(a.system, b.system, strict=False)) if x != y)
    assert common == len("Run ")


@pytest.mark.parametrize("target", [1, 30, 1024, 1075, 2000, 8000])
def test_uncalibrated_size_is_exact_in_units(target: int) -> None:
    factory = PromptFactory(seed=1)
    prompt = factory.prompt("k", run_id="r1", target_tokens=target)
    header_and_user = count_units("Run r1. You are a cache probe; the text below is filler. ")
    header_and_user += count_units(prompt.user)
    assert factory.units(prompt) == max(target, header_and_user)


def test_same_seed_and_run_id_give_the_same_text() -> None:
    one = PromptFactory(seed=7).prompt("k", run_id="r", target_tokens=2000)
    two = PromptFactory(seed=7).prompt("k", run_id="r", target_tokens=2000)
    other_seed = PromptFactory(seed=8).prompt("k", run_id="r", target_tokens=2000)
    assert one == two
    assert one != other_seed


def test_calibration_converges_on_the_reported_size() -> None:
    # A provider whose tokenizer spends 1.3 tokens per unit plus 11 tokens of chat template.
    def reported(units: int) -> int:
        return round(units * 1.3) + 11

    factory = PromptFactory(seed=1)
    target = 4000
    sizes = []
    for i in range(4):
        prompt = factory.prompt("p/m", run_id=f"r{i}", target_tokens=target)
        tokens = reported(factory.units(prompt))
        factory.observe("p/m", prompt, tokens)
        sizes.append(tokens)
    assert sizes[0] == reported(target)  # uncalibrated: 30 % over
    assert abs(sizes[-1] - target) / target < 0.01
    # Calibration is per key: another model starts from scratch.
    assert not factory.calibrator.calibrated("p/other")


def test_upper_bound_covers_a_two_tokens_per_word_vocabulary_before_calibration() -> None:
    factory = PromptFactory()
    prompt = factory.prompt("k", run_id="r", target_tokens=1000)
    assert factory.upper_bound_tokens("k", prompt) >= 2 * factory.units(prompt)
    factory.observe("k", prompt, factory.units(prompt))
    calibrated = factory.upper_bound_tokens("k", prompt)
    assert factory.units(prompt) < calibrated < 1.2 * factory.units(prompt) + 40


def test_partial_prompts_share_the_system_prompt_only() -> None:
    factory = PromptFactory(seed=2)
    prompts = factory.partial_prompts("k", run_id="rr", prefix_tokens=1300, variants=3)
    assert len({p.system for p in prompts}) == 1
    assert len({p.user for p in prompts}) == 3
    assert len({count_units(p.user) for p in prompts}) == 1
    assert count_units(prompts[0].system) == 1300


def test_calibrator_ignores_empty_observations() -> None:
    cal = Calibrator(initial_ratio=1.0)
    cal.observe("k", 0, 100)
    cal.observe("k", 100, 0)
    assert not cal.calibrated("k")
    assert cal.ratio("k") == 1.0


def test_run_ids_are_unique() -> None:
    assert len({new_run_id() for _ in range(200)}) == 200
