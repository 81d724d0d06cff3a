"""Combining the clients' per-seed scalars into the round's coefficients (PROTOCOL.md §8).

Every client of a round steps along the same seeds, so each seed has one projected
gradient per client. The default rule is the example-weighted mean (FedAvg weighting,
McMahan et al. 2017): ``g_s = sum_c n_c g_{c,s} / sum_c n_c``, and the coefficient that
clients apply is ``a_s = fl32(-learning_rate * g_s)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from protocol.messages import Update
from protocol.table import fl32

__all__ = ["AGGREGATORS", "aggregate"]

Aggregator = Callable[[Sequence[tuple[int, float]]], float]  # [(weight, scalar)] -> scalar


def weighted_mean(values: Sequence[tuple[int, float]]) -> float:
    total = sum(weight for weight, _ in values)
    return sum(weight * value for weight, value in values) / total


AGGREGATORS: dict[str, Aggregator] = {"mean": weighted_mean}


def aggregate(seeds: Sequence[int], updates: Sequence[Update], learning_rate: float,
              method: str = "mean") -> list[tuple[int, float]]:
    """The round's (seed, coefficient) list in task order.

    Raises:
        ValueError: no updates, an unknown method, or an update missing a seed.
    """
    if not updates:
        raise ValueError("cannot aggregate a round with no updates")
    try:
        combine = AGGREGATORS[method]
    except KeyError:
        raise ValueError(f"unknown aggregation {method!r}; known: {', '.join(AGGREGATORS)}") from None
    by_client = [dict(update.pairs) for update in updates]
    coefficients = []
    for seed in seeds:
        values = [(update.num_examples, pairs[seed]) for update, pairs in zip(updates, by_client)]
        coefficients.append((seed, fl32(-learning_rate * combine(values))))
    return coefficients
