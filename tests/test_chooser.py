"""The mode chooser (profiles/chooser.py): policy order, budget boundaries, refusals."""

from __future__ import annotations

import math

import pytest
from harness import SMOLLM2

from profiles.chooser import (
    POLICY,
    ModeUnavailable,
    NoModeFits,
    TrainingTask,
    choose,
    estimate_mode,
    policy_entry,
)

GIB = 1024**3

TASK = TrainingTask(scope="full", batch_size=8, max_seq_len=256)
MEZO = policy_entry("mezo")
FERRET = policy_entry("ferret")


def need(entry, batch, task=TASK, extra=None) -> int:
    return estimate_mode(entry, SMOLLM2, task, batch, extra).total


def test_policy_is_ordered_first_order_before_zeroth_order_before_emulator():
    modes = [entry.mode for entry in POLICY]
    assert modes.index("ferret") < modes.index("droppeft") < modes.index("fedcybgd") < modes.index("mezo")
    # A quantised emulator only after every full-precision base; its forward-only step last.
    assert modes[-2:] == ["fedbiot", "fedbiot_zo"]


def test_a_large_budget_gets_the_whole_batch():
    choice = choose(SMOLLM2, TASK, budget_bytes=20 * GIB, headroom=0.1, policy=[MEZO])
    assert (choice.mode, choice.batch) == ("mezo", 8)
    assert choice.estimate is not None and choice.estimate.total == need(MEZO, 8)
    assert "mezo" in choice.explanation and "batch 8/8" in choice.explanation


@pytest.mark.parametrize("batch", [1, 3, 5, 8])
def test_the_largest_batch_that_fits_exactly_at_the_boundary(batch):
    exact = need(MEZO, batch)
    at = choose(SMOLLM2, TASK, budget_bytes=exact, headroom=0.0, policy=[MEZO])
    assert at.batch == batch
    if batch > 1:
        below = choose(SMOLLM2, TASK, budget_bytes=exact - 1, headroom=0.0, policy=[MEZO])
        assert below.batch == batch - 1


def test_the_headroom_is_kept_free():
    exact = need(MEZO, 4)
    headroom = 0.25
    budget = math.ceil(exact / (1 - headroom)) + 8
    assert choose(SMOLLM2, TASK, budget_bytes=budget, headroom=headroom, policy=[MEZO]).batch == 4
    assert choose(SMOLLM2, TASK, budget_bytes=budget - 16, headroom=headroom, policy=[MEZO]).batch == 3


def test_extra_parts_count_against_the_budget():
    extra = {"round_copies": 100 * 1024**2}
    exact = need(MEZO, 8)
    plain = choose(SMOLLM2, TASK, budget_bytes=exact, headroom=0.0, policy=[MEZO])
    with_copies = choose(SMOLLM2, TASK, budget_bytes=exact + extra["round_copies"], headroom=0.0,
                         policy=[MEZO], extra=extra)
    assert plain.batch == with_copies.batch == 8
    assert with_copies.estimate.breakdown["round_copies"] == extra["round_copies"]
    squeezed = choose(SMOLLM2, TASK, budget_bytes=exact, headroom=0.0, policy=[MEZO], extra=extra)
    assert squeezed.batch < 8


def test_nothing_fits_names_the_smallest_budget_that_would():
    with pytest.raises(NoModeFits) as caught:
        choose(SMOLLM2, TASK, budget_bytes=300 * 1024**2, headroom=0.1, policy=[MEZO])
    error = caught.value
    assert "mezo needs" in str(error) and "smallest budget that would work" in str(error)
    assert f"{error.smallest_budget_bytes / GIB:.2f} GiB" in str(error)
    # That budget does work (at batch 1), and 0.01 GiB less does not.
    assert choose(SMOLLM2, TASK, budget_bytes=error.smallest_budget_bytes, headroom=0.1,
                  policy=[MEZO]).batch == 1
    with pytest.raises(NoModeFits):
        choose(SMOLLM2, TASK, budget_bytes=error.smallest_budget_bytes - GIB // 100, headroom=0.1,
               policy=[MEZO])


def test_the_policy_order_decides_between_modes_that_fit():
    available = [MEZO, FERRET]  # walked by rank, not in the order given
    roomy = choose(SMOLLM2, TASK, budget_bytes=64 * GIB, headroom=0.1, policy=available)
    assert roomy.mode == "ferret"
    # Enough for MeZO's whole batch, not for one first-order example: zeroth-order, and
    # the explanation says what the better mode would have needed.
    budget = need(MEZO, 8) + 1
    assert budget < need(FERRET, 1)
    tight = choose(SMOLLM2, TASK, budget_bytes=budget, headroom=0.0, policy=available)
    assert (tight.mode, tight.batch) == ("mezo", 8)
    assert "not ferret needs" in tight.explanation


def test_modes_without_an_engine_are_never_offered():
    choice = choose(SMOLLM2, TASK, budget_bytes=1024 * GIB, headroom=0.1, policy=[MEZO])
    assert choice.mode == "mezo"  # ferret would fit and ranks higher, but has no engine here


def test_a_forced_mode_that_fits_is_used_even_when_a_better_one_fits():
    choice = choose(SMOLLM2, TASK, budget_bytes=64 * GIB, headroom=0.1, policy=[FERRET, MEZO],
                    forced="mezo")
    assert choice.mode == "mezo" and "forced" in choice.explanation


def test_a_forced_mode_that_does_not_fit_is_refused_with_its_estimate_and_the_budget():
    with pytest.raises(NoModeFits) as caught:
        choose(SMOLLM2, TASK, budget_bytes=GIB, headroom=0.1, policy=[FERRET, MEZO], forced="ferret")
    text = str(caught.value)
    assert "forced mode ferret does not fit" in text
    assert f"{need(FERRET, 1) / GIB:.2f} GiB" in text and "0.90 GiB is usable" in text


def test_a_forced_mode_without_an_engine_is_refused():
    with pytest.raises(ModeUnavailable, match="not available"):
        choose(SMOLLM2, TASK, budget_bytes=GIB, headroom=0.1, policy=[MEZO], forced="ferret")


def test_lora_scope_needs_less_than_full():
    lora = TrainingTask(scope="lora", batch_size=8, max_seq_len=256, lora_rank=8)
    assert need(FERRET, 4, lora) < need(FERRET, 4)


@pytest.mark.parametrize("kwargs, name", [
    ({"scope": "full", "batch_size": 0, "max_seq_len": 8}, "batch_size"),
    ({"scope": "full", "batch_size": 2, "max_seq_len": -1}, "max_seq_len"),
])
def test_bad_tasks_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TrainingTask(**kwargs)


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="budget_bytes"):
        choose(SMOLLM2, TASK, budget_bytes=0, headroom=0.1, policy=[MEZO])
    with pytest.raises(ValueError, match="headroom"):
        choose(SMOLLM2, TASK, budget_bytes=GIB, headroom=1.0, policy=[MEZO])
