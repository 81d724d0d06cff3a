"""Combining the clients' per-seed scalars into the round's coefficients (PROTOCOL.md §8.2).

Every client of a round steps along the same seeds, so each seed has one projected
gradient ``g_{c,s}`` per client. For each seed the coordinator drops non-finite values,
clips the rest to ``[-clip, clip]``, caps each client's ``num_examples`` weight at
``max_examples`` and combines what is left with the rule's method:

* ``"trimmed_mean"`` (default): sort by value, cut ``k`` values from each end (by count,
  not by weight), example-weighted mean of the rest. A trimmed mean over shared-seed
  scalars tolerates a minority of Byzantine clients (CyBeR-0, arXiv 2406.14362).
* ``"median"``: the unweighted median of the values (one vote per client, so a client
  cannot buy the median with a large self-reported ``num_examples``).
* ``"mean"``: the example-weighted mean (FedAvg weighting, McMahan et al. 2017).

With fewer than three finite values for a seed the robust methods cannot trim or take a
meaningful median, so they fall back to the **unweighted** mean of the clipped values:
``num_examples`` is self-reported, and with two values a client claiming 10,000 examples
would otherwise decide the seed. A seed with no finite value combines to 0.0. The
report says how many values the thinnest seed had (``values_min``) and whether the
robust method was in force for every seed (``robust``). The coefficient
clients apply is ``a_s = fl32(-learning_rate * g_s)``. With personalised learning rates
(:mod:`coordinator.personal_lr`) each client's values are first multiplied by its rate
over the federation's, ``r_c = lr_c / lr``, so ``g_s`` combines ``r_c g_{c,s}``. All arithmetic is float64 in a
fixed order, so the result does not depend on the order the updates arrive in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from protocol import limits
from protocol.messages import Update
from protocol.table import fl32

__all__ = [
    "METHODS", "ROBUST_METHODS", "ROBUST_MIN_VALUES", "AggregationReport", "AggregationRule", "RuleError",
    "aggregate", "aggregate_with_report", "as_rule", "log_report",
]

logger = logging.getLogger(__name__)

METHODS: Final = ("trimmed_mean", "median", "mean")
# The methods that bound what a minority of clients can do, given enough values.
ROBUST_METHODS: Final = ("trimmed_mean", "median")
# Fewer finite values than this and the robust methods use the clipped unweighted mean instead.
ROBUST_MIN_VALUES: Final = 3
# The largest clip allowed: far beyond any real projected gradient, and small enough that
# no float64 sum of clipped values times capped weights can overflow.
MAX_CLIP: Final = 1e30


class RuleError(ValueError):
    """An :class:`AggregationRule` parameter is invalid.

    Attributes:
        parameter: the parameter's name (``method``, ``trim_fraction``, ``clip``, ``max_examples``).
        why: what it must be.
    """

    def __init__(self, parameter: str, why: str, value: object) -> None:
        super().__init__(f"{parameter}: {why} (got {value!r})")
        self.parameter = parameter
        self.why = why


@dataclass(frozen=True)
class AggregationRule:
    """How one seed's scalars are combined (PROTOCOL.md §8.2).

    Attributes:
        method: ``"trimmed_mean"``, ``"median"`` or ``"mean"``.
        trim_fraction: fraction of the values cut from *each* end by ``"trimmed_mean"``,
            in [0, 0.5); see :meth:`trim_count`.
        clip: bound on |projected gradient| (the clients' scalar, before the learning
            rate), in (0, 1e30]; values beyond it are set to ±clip. MeZO's scalars on
            SmolLM2-135M (full scope, epsilon 1e-3) measured up to about 160.
        max_examples: cap on an update's ``num_examples`` weight, in [1, 10**9].

    Raises:
        RuleError: a parameter out of range or of the wrong type (the message names it).
    """

    method: str = "trimmed_mean"
    trim_fraction: float = 0.2
    clip: float = 1000.0
    max_examples: int = 10_000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RuleError("method", "must be 'trimmed_mean', 'median' or 'mean'", self.method)
        if (isinstance(self.trim_fraction, bool) or not isinstance(self.trim_fraction, (int, float))
                or not 0 <= self.trim_fraction < 0.5):
            raise RuleError("trim_fraction", "must be a number in [0, 0.5)", self.trim_fraction)
        if (isinstance(self.clip, bool) or not isinstance(self.clip, (int, float))
                or not 0 < self.clip <= MAX_CLIP):
            raise RuleError("clip", f"must be a number in (0, {MAX_CLIP:g}]", self.clip)
        if (isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int)
                or not 1 <= self.max_examples <= limits.MAX_EXAMPLES):
            raise RuleError("max_examples", f"must be an integer in [1, {limits.MAX_EXAMPLES}]", self.max_examples)
        # An int bound would make clipped values ints; the arithmetic is defined in float64.
        object.__setattr__(self, "trim_fraction", float(self.trim_fraction))
        object.__setattr__(self, "clip", float(self.clip))

    def trim_count(self, count: int) -> int:
        """Values cut from each end when ``"trimmed_mean"`` combines ``count >= 3`` values:
        ``min(max(1, floor(trim_fraction * count)), (count - 1) // 2)``, or 0 when
        ``trim_fraction`` is 0. The product is one float64 multiplication."""
        if self.trim_fraction == 0:
            return 0
        return min(max(1, math.floor(self.trim_fraction * count)), (count - 1) // 2)

    def combine(self, values: Sequence[tuple[int, float]]) -> float:
        """One seed's combined projected gradient from its ``(num_examples, g)`` pairs.

        ``values`` are in client_id order, and every weight is >= 1: that order breaks
        ties between equal values and fixes the order of every sum. Non-finite values
        are dropped, the rest clipped to [-clip, clip], weights capped at
        ``max_examples``; no finite value left combines to 0.0. A robust method with
        fewer than ROBUST_MIN_VALUES values left takes their unweighted mean.
        """
        kept = [(min(weight, self.max_examples), min(max(value, -self.clip), self.clip))
                for weight, value in values if math.isfinite(value)]
        if not kept:
            return 0.0
        if self.method == "mean":
            return _weighted_mean(kept)
        if len(kept) < ROBUST_MIN_VALUES:
            # Nothing to trim and no majority: one vote per client, as the median gives,
            # so a self-reported num_examples cannot decide the seed.
            return _weighted_mean([(1, value) for _, value in kept])
        ranked = sorted(range(len(kept)), key=lambda index: (kept[index][1], index))
        if self.method == "median":
            middle = len(ranked) // 2
            if len(ranked) % 2:
                return kept[ranked[middle]][1]
            return (kept[ranked[middle - 1]][1] + kept[ranked[middle]][1]) / 2
        trim = self.trim_count(len(ranked))
        return _weighted_mean([kept[index] for index in sorted(ranked[trim:len(ranked) - trim])])


def _weighted_mean(values: Sequence[tuple[int, float]]) -> float:
    """``sum(w * v) / sum(w)``: float64, summed left to right from +0.0 (not ``sum()``,
    whose float algorithm changed in Python 3.12), the weights summed exactly."""
    numerator = 0.0
    denominator = 0
    for weight, value in values:
        numerator += weight * value
        denominator += weight
    return numerator / denominator


@dataclass(frozen=True)
class AggregationReport:
    """A round's coefficients and what the rule did to get them.

    Attributes:
        coefficients: ``[(seed, a_s)]`` in task order.
        dropped: non-finite values dropped, over all seeds.
        clipped: finite values with |g| > clip, set to ±clip, over all seeds.
        capped: updates whose ``num_examples`` exceeded ``max_examples``.
        empty_seeds: seeds with no finite value (combined to 0.0).
        values_min: the fewest finite values any seed was combined from.
        robust: the method is robust (``ROBUST_METHODS``) and every seed had at least
            ``ROBUST_MIN_VALUES`` finite values, so the method itself, not its fallback,
            combined every seed.
    """

    coefficients: list[tuple[int, float]]
    dropped: int
    clipped: int
    capped: int
    empty_seeds: int
    values_min: int
    robust: bool


def as_rule(rule: AggregationRule | str) -> AggregationRule:
    """``rule`` itself, or for a method name that method with default parameters.

    Raises:
        RuleError: an unknown method name.
    """
    return rule if isinstance(rule, AggregationRule) else AggregationRule(method=rule)


def aggregate_with_report(seeds: Sequence[int], updates: Sequence[Update], learning_rate: float,
                          rule: AggregationRule | str = AggregationRule(),
                          rate_scales: Mapping[str, float] | None = None) -> AggregationReport:
    """The round's (seed, coefficient) list in task order, with counts of what was
    dropped, clipped and capped. The updates may come in any order: they are combined
    in client_id order. ``rate_scales`` (client -> ``lr_c / lr``, 1 for a client not in
    it) multiplies each client's values before they are clipped and combined.

    Raises:
        ValueError: no updates, two updates from one client, or an update with a seed
            the round does not have.
        RuleError: an unknown method name.
        TableError: a coefficient that overflows float32.

    A seed's values are those of the updates that carry it: a client is handed a prefix
    of the round's seeds, as many as its mode takes, or (a block client) its block's.
    """
    rule = as_rule(rule)
    if not updates:
        raise ValueError("cannot aggregate a round with no updates")
    ordered = sorted(updates, key=lambda update: update.client_id)
    for first, second in zip(ordered, ordered[1:]):
        if first.client_id == second.client_id:
            raise ValueError(f"two updates from client {first.client_id!r}")
    scales = rate_scales or {}
    by_client = [(update.client_id, update.num_examples,
                  {seed: value * scales.get(update.client_id, 1.0) for seed, value in update.pairs}
                  if update.client_id in scales else dict(update.pairs))
                 for update in ordered]
    known = set(seeds)
    for client_id, _, pairs in by_client:
        if not pairs.keys() <= known:
            raise ValueError(f"the update from {client_id!r} has values for seeds the round does not have")
    coefficients: list[tuple[int, float]] = []
    dropped = clipped = empty_seeds = 0
    values_min = len(by_client)
    for seed in seeds:
        values: list[tuple[int, float]] = []
        for client_id, num_examples, pairs in by_client:
            if seed not in pairs:  # the client's mode was handed fewer seeds (PROTOCOL.md §6.11)
                continue
            values.append((num_examples, pairs[seed]))
        finite = [abs(value) for _, value in values if math.isfinite(value)]
        dropped += len(values) - len(finite)
        clipped += sum(1 for magnitude in finite if magnitude > rule.clip)
        empty_seeds += not finite
        values_min = min(values_min, len(finite))
        coefficients.append((seed, fl32(-learning_rate * rule.combine(values))))
    capped = sum(1 for update in updates if update.num_examples > rule.max_examples)
    robust = rule.method in ROBUST_METHODS and values_min >= ROBUST_MIN_VALUES
    return AggregationReport(coefficients, dropped, clipped, capped, empty_seeds, values_min, robust)


def aggregate(seeds: Sequence[int], updates: Sequence[Update], learning_rate: float,
              rule: AggregationRule | str = AggregationRule(),
              rate_scales: Mapping[str, float] | None = None) -> list[tuple[int, float]]:
    """The round's (seed, coefficient) list in task order (:func:`aggregate_with_report`'s
    coefficients); logs a line when values were dropped, clipped or capped.

    Raises:
        ValueError: no updates, two updates from one client, or an update missing a seed.
        RuleError: an unknown method name.
        TableError: a coefficient that overflows float32.
    """
    report = aggregate_with_report(seeds, updates, learning_rate, rule, rate_scales)
    log_report(report)
    return report.coefficients


def log_report(report: AggregationReport) -> None:
    """Log what the rule had to do to the values: a warning for non-finite values
    dropped, an info line for values clipped and weights capped."""
    if report.dropped or report.empty_seeds:
        logger.warning("aggregation dropped %d non-finite values; %d seeds had none left (coefficient 0)",
                       report.dropped, report.empty_seeds)
    if report.clipped or report.capped:
        logger.info("aggregation clipped %d values, capped the weight of %d updates",
                    report.clipped, report.capped)
