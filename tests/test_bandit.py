"""The per-client dropout-configuration bandit: learns, explores, follows shifts, persists."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence

import pytest

from coordinator.bandit import (
    Arm,
    BanditError,
    BanditStateError,
    DropoutBandit,
    NoArmFitsError,
    UnknownArmError,
    arms_within_budget,
    progress_reward,
)

MiB = 2**20


def arms(n: int) -> list[Arm]:
    return [Arm(f"arm{i}", (i + 1) * MiB) for i in range(n)]


def play(
    bandit: DropoutBandit,
    means: Callable[[int], Sequence[float]],
    rounds: range,
    *,
    sigma: float,
    noise: random.Random,
    transform: Callable[[float], float] = lambda x: x,
) -> tuple[list[int], list[float]]:
    """Runs rounds against Gaussian rewards; returns the chosen arm indices and per-round regret."""
    picks, regret = [], []
    for r in rounds:
        mu = means(r)
        index = bandit.arms.index(bandit.choose(r))
        bandit.report(bandit.arms[index].id, transform(mu[index] + noise.gauss(0.0, sigma)))
        picks.append(index)
        regret.append(max(mu) - mu[index])
    return picks, regret


STATIC = (0.2, 0.5, 0.8)


def test_it_finds_the_best_arm_and_regret_grows_sublinearly():
    bandit = DropoutBandit(arms(3), seed=1)
    picks, regret = play(bandit, lambda r: STATIC, range(200), sigma=0.2, noise=random.Random(11))
    assert sum(p == 2 for p in picks[150:200]) >= 0.8 * 50
    # Far below choosing at random, whose expected regret is 200 * mean(0.6, 0.3, 0) = 60.
    assert sum(regret) < 0.3 * 60

    # Sub-linear regret is a property of the stationary algorithm (discount = 1); with
    # discount < 1 the forgetting buys tracking at a steady exploration cost.
    stationary = DropoutBandit(arms(3), seed=1, discount=1.0)
    _, regret = play(stationary, lambda r: STATIC, range(200), sigma=0.2, noise=random.Random(11))
    first, second = sum(regret[:100]), sum(regret[100:])
    assert first > 0 and second < 0.8 * first  # linear regret would give a ratio near 1


def test_decisions_do_not_depend_on_the_reward_unit():
    # Progress per second in nats or in millinats, shifted or not: the same choices.
    runs = []
    for transform in (lambda x: x, lambda x: 1000.0 * x - 5.0):
        bandit = DropoutBandit(arms(3), seed=4)
        picks, _ = play(bandit, lambda r: STATIC, range(150), sigma=0.3, noise=random.Random(2), transform=transform)
        runs.append(picks)
    assert runs[0] == runs[1]
    assert len(set(runs[0][20:])) > 1  # the run explored, so the bonus's scale was exercised


def unlucky_first_draw(exploration: float) -> list[str]:
    """Arm "good" pays 1 but its first round paid -1 (a loss spike); "bad" pays 0.5."""
    bandit = DropoutBandit([Arm("good", 0), Arm("bad", 0)], seed=0, exploration=exploration)
    noise, picks = random.Random(5), []
    for r in range(300):
        arm = bandit.choose(r)
        if arm.id == "good":
            reward = -1.0 if "good" not in picks else 1.0 + noise.gauss(0.0, 0.2)
        else:
            reward = 0.5 + noise.gauss(0.0, 0.2)
        bandit.report(arm.id, reward)
        picks.append(arm.id)
    return picks


def test_without_exploration_it_locks_onto_a_worse_arm():
    greedy = unlucky_first_draw(exploration=0.0)
    assert greedy.count("good") == 1  # tried once (every arm is), then never again
    exploring = unlucky_first_draw(exploration=0.5)
    assert exploring[200:].count("good") >= 90


def test_every_arm_is_tried_first_even_without_exploration():
    bandit = DropoutBandit(arms(5), seed=3, exploration=0.0)
    first = []
    for r in range(5):
        arm = bandit.choose(r)
        first.append(arm.id)
        bandit.report(arm.id, 1.0 - 0.1 * r)  # the first arm tried is the best so far
    assert sorted(first) == sorted(a.id for a in arms(5))


def shift(r: int) -> tuple[float, float]:
    return (1.0, 0.5) if r < 100 else (0.2, 0.8)


def test_a_change_of_the_best_arm_is_followed_when_discounting():
    discounted, _ = play(DropoutBandit(arms(2), seed=0), shift, range(200), sigma=0.1, noise=random.Random(8))
    assert sum(p == 1 for p in discounted[150:200]) >= 0.8 * 50
    plain, _ = play(DropoutBandit(arms(2), seed=0, discount=1.0), shift, range(200), sigma=0.1,
                    noise=random.Random(8))
    # Undiscounted, the 100 stale rewards of arm 0 hold its mean up for many rounds.
    assert sum(p == 1 for p in discounted[100:200]) > sum(p == 1 for p in plain[100:200]) + 10


def test_state_round_trips_through_json_and_continues_identically():
    bandit = DropoutBandit(arms(4), seed=9, discount=0.9, exploration=0.7)
    play(bandit, lambda r: (0.1, 0.4, 0.3, 0.2), range(60), sigma=0.2, noise=random.Random(1))
    state = json.loads(json.dumps(bandit.to_dict(), allow_nan=False))
    restored = DropoutBandit.from_dict(state)
    assert restored.to_dict() == bandit.to_dict()
    assert restored.choose(60) == bandit.choose(60)
    runs = [play(b, lambda r: (0.1, 0.4, 0.3, 0.2), range(60, 160), sigma=0.2, noise=random.Random(2))[0]
            for b in (bandit, restored)]
    assert runs[0] == runs[1]
    assert restored.to_dict() == bandit.to_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("spread"), r"state: missing \['spread'\]"),
        (lambda s: s.update(extra=1), r"unknown \['extra'\]"),
        (lambda s: s["arms"][1].update(weight=float("nan")), r"state.arms\[1\].weight"),
        (lambda s: s["arms"][0].update(id=True), r"state.arms\[0\].id"),
        (lambda s: s.update(version=2), "state.version"),
        (lambda s: s.update(discount=1.5), "discount"),
    ],
)
def test_a_malformed_state_is_refused_naming_the_field(edit, message):
    state = DropoutBandit(arms(2), seed=0).to_dict()
    edit(state)
    with pytest.raises(BanditStateError, match=message):
        DropoutBandit.from_dict(state)


def test_non_finite_and_absurd_rewards_are_ignored_with_a_reason(caplog):
    bandit = DropoutBandit(arms(2), seed=0)
    bandit.report("arm0", 0.5)
    before = bandit.to_dict()
    with caplog.at_level(logging.WARNING, logger="coordinator.bandit"):
        for reward in (float("nan"), float("inf"), -float("inf"), 1e12):
            assert bandit.report("arm1", reward) is False
    assert bandit.to_dict() == before
    assert sum("not finite" in r.getMessage() for r in caplog.records) == 3
    assert sum("exceeds" in r.getMessage() for r in caplog.records) == 1
    assert bandit.choose(1).id == "arm1"  # still untried: the ignored rewards left no trace
    assert bandit.report("arm1", -0.25) is True  # negative progress is a real reward
    with pytest.raises(UnknownArmError):
        bandit.report("arm7", 1.0)
    with pytest.raises(BanditError, match="number"):
        bandit.report("arm0", None)


def test_choice_is_a_function_of_state_seed_and_round():
    a, b = DropoutBandit(arms(6), seed=5), DropoutBandit(arms(6), seed=5)
    assert [a.choose(r) for r in range(20)] == [b.choose(r) for r in range(20)]
    assert a.choose(3) == a.choose(3)  # choose changes nothing
    firsts = {DropoutBandit(arms(6), seed=s).choose(0).id for s in range(20)}
    assert len(firsts) > 1  # the seed drives the tie-break
    assert a.choose(0, eligible=["arm2", "arm4"]).id in {"arm2", "arm4"}
    with pytest.raises(UnknownArmError):
        a.choose(0, eligible=["nope"])
    with pytest.raises(BanditError, match="eligible"):
        a.choose(0, eligible=[])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arms": []}, "no dropout configuration"),
        ({"arms": [Arm("x", 0), Arm("x", 1)]}, "unique"),
        ({"discount": 0.0}, "discount"),
        ({"exploration": -1.0}, "exploration"),
        ({"exploration": math.inf}, "exploration"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_bad_construction_is_refused(kwargs, message):
    args = {"arms": arms(2), "seed": 0} | kwargs
    with pytest.raises(BanditError, match=message):
        DropoutBandit(args.pop("arms"), **args)


def test_arms_within_budget():
    candidates = [Arm("heavy", 8 * MiB), Arm("light", 2 * MiB), Arm("medium", 4 * MiB)]
    assert [a.id for a in arms_within_budget(candidates, 4 * MiB)] == ["light", "medium"]
    assert arms_within_budget(candidates, 8 * MiB) == tuple(candidates)
    with pytest.raises(NoArmFitsError, match="cheapest needs 2097152") as error:
        arms_within_budget(candidates, MiB)
    assert error.value.budget_bytes == MiB and error.value.cheapest_bytes == 2 * MiB
    with pytest.raises(BanditError, match="budget_bytes"):
        arms_within_budget(candidates, -1)
    with pytest.raises(BanditError, match="memory_bytes"):
        Arm("x", -5)


def test_progress_reward():
    assert progress_reward(2.5, 2.0, 10.0) == pytest.approx(0.05)
    assert progress_reward(2.0, 2.5, 10.0) < 0
    assert math.isnan(progress_reward(float("nan"), 2.0, 1.0))
    with pytest.raises(BanditError, match="seconds"):
        progress_reward(2.0, 1.0, 0.0)


def test_statistics_are_the_discounted_means_and_spread():
    gamma, noise = 0.9, random.Random(3)
    bandit = DropoutBandit(arms(3), seed=0, discount=gamma)
    history = [(f"arm{noise.randrange(3)}", noise.gauss(1.0, 0.5)) for _ in range(40)]
    for arm_id, reward in history:
        bandit.report(arm_id, reward)
    k = len(history)
    weights = [gamma ** (k - 1 - j) for j in range(k)]  # a reward's weight after later reports
    total = sum(weights)
    mean = sum(w * x for w, (_, x) in zip(weights, history)) / total
    spread = sum(w * (x - mean) ** 2 for w, (_, x) in zip(weights, history)) / total
    assert bandit.reward_scale == pytest.approx(math.sqrt(spread), rel=1e-12)
    for arm_id, (pulls, arm_mean) in bandit.estimates().items():
        own = [(w, x) for w, (a, x) in zip(weights, history) if a == arm_id]
        assert pulls == len(own)
        assert arm_mean == pytest.approx(sum(w * x for w, x in own) / sum(w for w, _ in own), rel=1e-12)


def test_the_score_is_the_mean_plus_a_bonus_for_the_less_tried_arm():
    def bandit(exploration: float) -> DropoutBandit:
        b = DropoutBandit(arms(2), seed=0, discount=1.0, exploration=exploration)
        for reward in (0.4, 0.6) * 10:  # arm0: 20 rewards, mean 0.5, sum 10
            b.report("arm0", reward)
        b.report("arm1", 0.45)  # arm1: 1 reward, a lower mean and a much lower sum
        return b

    assert bandit(0.0).choose(0).id == "arm0"  # greedy: the higher mean
    # sigma ~ 0.098 and n = 21: arm1's bonus 0.5 * sigma * sqrt(2 ln 21) ~ 0.12 beats arm0's
    # 0.5 * sigma * sqrt(2 ln 21 / 20) ~ 0.027 by more than the 0.05 gap in means.
    assert bandit(0.5).choose(0).id == "arm1"
    b = bandit(0.0)
    b.report("arm1", 0.75)  # mean 0.6 > 0.5 with a sum of 1.2 < 10: the mean decides
    assert b.choose(0).id == "arm1"
