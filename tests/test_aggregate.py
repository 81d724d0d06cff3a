"""Robust per-seed aggregation (coordinator/aggregate.py, PROTOCOL.md §8.2)."""

from __future__ import annotations

import math
import random
import struct

import pytest

from coordinator.aggregate import AggregationRule, RuleError, aggregate, aggregate_with_report
from protocol.messages import Update
from protocol.table import fl32

SEEDS = (11, 22)
LR = 1e-3
MEAN = AggregationRule(method="mean")
MEDIAN = AggregationRule(method="median")
TRIMMED = AggregationRule()


def update(client: str, pairs: tuple[tuple[int, float], ...], n: int = 200) -> Update:
    return Update(round=3, attempt=0, client_id=client, pairs=pairs, num_examples=n,
                  loss_before=2.0, loss_after=1.9, nonce=b"\0" * 16, signature=None)


def tampered(client: str, pairs: tuple[tuple[int, float], ...], n: int = 200) -> Update:
    """An update carrying values the message class refuses (non-finite): what a decoder
    bug would let through. Aggregation must survive it."""
    built = update(client, tuple((seed, 0.0) for seed, _ in pairs), n)
    object.__setattr__(built, "pairs", pairs)
    return built


def bits(coefficients: list[tuple[int, float]]) -> list[tuple[int, bytes]]:
    return [(seed, struct.pack("<d", value)) for seed, value in coefficients]


HONEST = (1.0, 1.1, 0.9, 1.05)
HONEST_MEAN = sum(HONEST) / len(HONEST)


def honest_and_one_attacker(attacker_examples: int = 200) -> list[Update]:
    """Four honest clients near g = 1 on both seeds, one that sends -100 x their mean."""
    updates = [update(f"honest-{i}", ((11, g), (22, -g))) for i, g in enumerate(HONEST)]
    attack = -100 * HONEST_MEAN
    updates.append(update("mallory", ((11, attack), (22, -attack)), n=attacker_examples))
    return updates


def test_default_rule_is_trimmed_mean_with_documented_parameters() -> None:
    assert TRIMMED == AggregationRule("trimmed_mean", 0.2, 1000.0, 10_000)


def test_plain_mean_is_the_example_weighted_mean_times_minus_lr() -> None:
    updates = [update("a", ((11, 1.0), (22, 3.0)), n=1), update("b", ((11, 4.0), (22, -3.0)), n=3)]
    assert aggregate(SEEDS, updates, LR, MEAN) == [(11, fl32(-LR * 13 / 4)), (22, fl32(-LR * -6 / 4))]
    assert aggregate(SEEDS, updates, LR, "mean") == aggregate(SEEDS, updates, LR, MEAN)
    assert [seed for seed, _ in aggregate((22, 11), updates, LR, MEAN)] == [22, 11]


def test_trimmed_mean_ignores_one_sign_flipped_client_out_of_five() -> None:
    updates = honest_and_one_attacker()
    (_, a11), (_, a22) = aggregate(SEEDS, updates, LR, TRIMMED)
    assert -a11 / LR == pytest.approx(HONEST_MEAN, abs=0.05)
    assert a22 / LR == pytest.approx(HONEST_MEAN, abs=0.05)
    # The plain mean is dragged to the attacker's sign.
    (_, m11), _ = aggregate(SEEDS, updates, LR, MEAN)
    assert -m11 / LR < -10


def test_trimmed_mean_ignores_the_attacker_whatever_examples_it_claims() -> None:
    (_, a11), _ = aggregate(SEEDS, honest_and_one_attacker(attacker_examples=10**9), LR, TRIMMED)
    assert -a11 / LR == pytest.approx(HONEST_MEAN, abs=0.05)


def test_trimmed_mean_cuts_by_count_and_weights_the_rest() -> None:
    # Five values, trim 0.2 -> one from each end; the three left keep their weights.
    values = [(1, 10.0), (2, 1.0), (3, -5.0), (4, 2.0), (5, 3.0)]
    assert TRIMMED.combine(values) == (2 * 1.0 + 4 * 2.0 + 5 * 3.0) / (2 + 4 + 5)


def test_median_ignores_one_sign_flipped_client_out_of_five() -> None:
    (_, a11), (_, a22) = aggregate(SEEDS, honest_and_one_attacker(attacker_examples=10**9), LR, MEDIAN)
    assert -a11 / LR == pytest.approx(HONEST_MEAN, abs=0.1)
    assert a22 / LR == pytest.approx(HONEST_MEAN, abs=0.1)


def test_median_is_unweighted_and_averages_the_middle_pair() -> None:
    assert MEDIAN.combine([(1, 3.0), (10_000, 100.0), (1, 1.0)]) == 3.0
    assert MEDIAN.combine([(1, 4.0), (1, 1.0), (1, 2.0), (1, 8.0)]) == 3.0


def test_non_finite_values_are_dropped_per_seed() -> None:
    nan, inf = math.nan, math.inf
    assert MEAN.combine([(1, nan), (1, 2.0), (3, -inf), (1, 4.0)]) == 3.0
    assert TRIMMED.combine([(1, inf), (1, nan), (1, -inf)]) == 0.0
    assert TRIMMED.combine([]) == 0.0
    updates = [tampered("a", ((11, nan), (22, 1.0))), tampered("b", ((11, inf), (22, 3.0))),
               update("c", ((11, 5.0), (22, 5.0)))]
    report = aggregate_with_report(SEEDS, updates, LR, TRIMMED)
    # Seed 11 keeps one finite value; seed 22 keeps three (trimmed mean of 1, 3, 5 = 3).
    assert report.coefficients == [(11, fl32(-LR * 5.0)), (22, fl32(-LR * 3.0))]
    assert (report.dropped, report.empty_seeds) == (2, 0)
    nothing = aggregate_with_report((11,), [tampered("a", ((11, nan),)), tampered("b", ((11, -inf),))], LR)
    assert nothing.coefficients == [(11, 0.0)]
    assert (nothing.dropped, nothing.empty_seeds) == (2, 1)


def test_values_are_clipped_before_combining() -> None:
    rule = AggregationRule(method="mean", clip=10.0)
    assert rule.combine([(1, 5000.0), (1, -1e300), (2, 4.0)]) == (10.0 - 10.0 + 8.0) / 4
    updates = [update("a", ((11, 5000.0), (22, 1.0))), update("b", ((11, 2.0), (22, -20.0)))]
    report = aggregate_with_report(SEEDS, updates, LR, rule)
    assert report.coefficients == [(11, fl32(-LR * 6.0)), (22, fl32(-LR * -4.5))]
    assert (report.clipped, report.dropped, report.capped) == (2, 0, 0)


def test_example_cap_limits_a_client_claiming_a_billion_examples() -> None:
    updates = [update(f"h{i}", ((11, 1.0),), n=200) for i in range(3)] + [update("big", ((11, 100.0),), n=10**9)]
    capped = aggregate_with_report((11,), updates, LR, AggregationRule(method="mean", max_examples=200))
    assert capped.coefficients == [(11, fl32(-LR * (3 * 1.0 + 100.0) / 4))]
    assert capped.capped == 1
    uncapped = aggregate((11,), updates, LR, AggregationRule(method="mean", max_examples=10**9))
    assert -uncapped[0][1] / LR > 99.9


@pytest.mark.parametrize("rule", [TRIMMED, MEDIAN], ids=lambda rule: rule.method)
def test_below_three_values_a_claimed_example_count_does_not_decide_the_seed(rule: AggregationRule) -> None:
    # The case: one client claims 10,000 examples and sends -1000, one honest
    # client with 200 examples sends 1. The example-weighted mean gave -980.4.
    assert rule.combine([(10_000, -1000.0), (200, 1.0)]) == (-1000.0 + 1.0) / 2
    # Values are clipped before the unweighted mean.
    assert AggregationRule(method=rule.method, clip=10.0).combine([(10**9, -5000.0), (1, 4.0)]) == (-10.0 + 4.0) / 2
    # Three updates, but one value is not finite: two left, so the unweighted mean again.
    assert rule.combine([(1, 1.0), (3, 4.0), (1, math.nan)]) == 2.5
    updates = [update("a", ((11, 1.0), (22, -7.0)), n=1), update("b", ((11, 4.0), (22, 2.5)), n=3)]
    assert aggregate(SEEDS, updates, LR, rule) == [(11, fl32(-LR * 2.5)), (22, fl32(-LR * -2.25))]


def test_the_plain_mean_stays_example_weighted_below_three_values() -> None:
    assert MEAN.combine([(10_000, -1000.0), (200, 1.0)]) == (10_000 * -1000.0 + 200 * 1.0) / 10_200


def test_the_report_says_when_the_robust_method_was_not_in_force() -> None:
    three = [update(name, ((11, g), (22, -g))) for name, g in (("a", 1.0), ("b", 2.0), ("c", 3.0))]
    full = aggregate_with_report(SEEDS, three, LR, TRIMMED)
    assert (full.values_min, full.robust) == (3, True)
    # One seed of one client is not finite: that seed had 2 values, so not robust.
    holed = three[:2] + [tampered("c", ((11, 3.0), (22, math.nan)))]
    thin = aggregate_with_report(SEEDS, holed, LR, MEDIAN)
    assert (thin.values_min, thin.robust) == (2, False)
    assert (aggregate_with_report(SEEDS, three[:2], LR, TRIMMED).values_min,
            aggregate_with_report(SEEDS, three[:2], LR, TRIMMED).robust) == (2, False)
    # The plain mean is never robust, however many values it has.
    assert aggregate_with_report(SEEDS, three, LR, MEAN).robust is False


def test_trim_count() -> None:
    assert [TRIMMED.trim_count(n) for n in (3, 4, 5, 9, 10, 15)] == [1, 1, 1, 1, 2, 3]
    assert AggregationRule(trim_fraction=0.0).trim_count(10) == 0
    wide = AggregationRule(trim_fraction=0.49)
    assert [wide.trim_count(n) for n in (3, 4, 5, 6)] == [1, 1, 2, 2]  # always keeps one value


def test_trimmed_mean_without_trimming_is_the_mean_bit_for_bit() -> None:
    rng = random.Random(7)
    values = [(rng.randint(1, 500), rng.uniform(-50, 50)) for _ in range(9)]
    assert AggregationRule(trim_fraction=0.0).combine(values) == MEAN.combine(values)


@pytest.mark.parametrize("rule", [TRIMMED, MEDIAN, MEAN], ids=lambda rule: rule.method)
def test_result_does_not_depend_on_the_order_of_updates(rule: AggregationRule) -> None:
    rng = random.Random(1)
    seeds = tuple(range(100, 120))
    updates = [update(f"c{i:02d}", tuple((s, rng.choice((1.5, -2.0)) if s % 3 == 0 else rng.uniform(-60, 60))
                                         for s in seeds), n=rng.randint(1, 20_000)) for i in range(7)]
    expected = bits(aggregate(seeds, updates, LR, rule))
    for _ in range(20):
        rng.shuffle(updates)
        assert bits(aggregate(seeds, updates, LR, rule)) == expected


@pytest.mark.parametrize(
    "parameters, name",
    [
        ({"method": "avg"}, "method"),
        ({"trim_fraction": 0.5}, "trim_fraction"),
        ({"trim_fraction": -0.1}, "trim_fraction"),
        ({"trim_fraction": math.nan}, "trim_fraction"),
        ({"trim_fraction": True}, "trim_fraction"),
        ({"clip": 0.0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"clip": math.inf}, "clip"),
        ({"clip": math.nan}, "clip"),
        ({"clip": 1e31}, "clip"),
        ({"max_examples": 0}, "max_examples"),
        ({"max_examples": 10**9 + 1}, "max_examples"),
        ({"max_examples": 1.5}, "max_examples"),
        ({"max_examples": True}, "max_examples"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(parameters: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}:") as raised:
        AggregationRule(**parameters)  # type: ignore[arg-type]
    assert isinstance(raised.value, RuleError) and raised.value.parameter == name


def test_int_parameters_become_floats() -> None:
    rule = AggregationRule(trim_fraction=0, clip=10)
    assert isinstance(rule.clip, float) and isinstance(rule.trim_fraction, float)
    assert isinstance(AggregationRule(method="median", clip=10).combine([(1, 50.0), (1, 60.0), (1, 0.0)]), float)


def test_aggregate_refuses_bad_input() -> None:
    good = [update("a", ((11, 1.0), (22, 1.0)))]
    with pytest.raises(ValueError, match="^method:"):
        aggregate(SEEDS, good, LR, "avg")
    with pytest.raises(ValueError, match="no updates"):
        aggregate(SEEDS, [], LR)
    with pytest.raises(ValueError, match="two updates from client 'a'"):
        aggregate(SEEDS, good * 2, LR)
    with pytest.raises(ValueError, match="values for seeds the round does not have"):
        aggregate((11, 33), good, LR)


def test_a_seed_is_combined_over_the_updates_that_carry_it() -> None:
    """Clients are handed prefixes of the round's seeds by mode (PROTOCOL.md §6.11): a
    seed only the long-prefix clients got is combined over their values alone."""
    seeds = (11, 22, 33)
    short = update("a", ((11, 4.0),))
    longs = [update("b", ((11, 1.0), (22, 2.0), (33, 6.0))), update("c", ((11, 7.0), (22, 3.0), (33, 6.0)))]
    report = aggregate_with_report(seeds, [short, *longs], LR, "trimmed_mean")
    assert report.coefficients == [(11, fl32(-LR * 4.0)), (22, fl32(-LR * 2.5)), (33, fl32(-LR * 6.0))]
    assert report.values_min == 2 and not report.robust  # seeds 22 and 33 had two values
