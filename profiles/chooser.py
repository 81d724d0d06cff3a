"""Choosing the training mode and batch that fit a device: a documented policy, not ifs.

Pure arithmetic over :mod:`profiles.estimator` (no torch), so the client daemon, the
device catalogue (:mod:`profiles.devices`) and tests share one decision.

The policy
----------
:data:`POLICY` ranks the modes, best first, by how much progress one step buys:

1. ``ferret``   first-order (SGD) with shared-randomness projection: exact gradients;
2. ``droppeft`` first-order with stochastic layer dropout: exact gradients of a thinned
   network, less activation memory;
3. ``fedcybgd`` cyclic block updates: exact gradients, one block at a time;
4. ``mezo``     zeroth-order (MeZO / FedKSeed): two forwards per step, inference memory,
   many more steps to the same loss;
5. ``fedbiot``  a 4-bit, layer-dropped emulator with a trainable adapter: the smallest
   footprint, but it trains on an approximation of the model (full-precision bases come
   first);
6. ``fedbiot_zo`` the same emulator with MeZO's forward-only steps, for a device that
   holds the emulator's forward but not its backward.

Each engine declares its own row (``Engine.policy`` in ``edge_client/engines/``: rank,
kind, memory model), and the client passes the rows of the engines it has
(``edge_client.engines.engine_policy()``) to :func:`choose`: a mode is offered only when
this client has an engine for it, and adding a mode edits nothing here. :data:`POLICY`
is the product's plan, every mode with its row, built or not: the device table
(``edgefed-profiles --modes all``) reads it to show where planned modes would fit. For
the task the federation announced (scope, batch size, sequence length) :func:`choose`
walks the offered rows by rank and takes the first mode whose estimated peak, at some batch, fits the
usable memory (the budget less the headroom); within it, the largest batch from the
task's batch size down to 1 (the engine then processes the task's batch in
micro-batches of that size: the same examples, the same loss). If nothing fits it raises
:class:`NoModeFits`, naming the smallest budget that would work. A forced mode is
checked the same way and refused with its estimate and the budget, rather than running
out of memory later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from profiles.estimator import Estimate, ModelShape, estimate

__all__ = ["POLICY", "PolicyEntry", "TrainingTask", "Choice", "NoModeFits", "ModeUnavailable",
           "choose", "policy_entry", "estimate_mode", "gib"]

GIB = 1024**3


def gib(value: float) -> str:
    """Bytes as ``1.23 GiB``."""
    return f"{value / GIB:.2f} GiB"


@dataclass(frozen=True)
class PolicyEntry:
    """One mode of the policy.

    Attributes:
        mode: the engine's name (as sent in the hello).
        kind: what the mode does, in a few words.
        rank: its place in the policy, lower first: how much progress one step buys.
        memory_mode: the :func:`profiles.estimator.estimate` mode that models its peak.
        memory_options: extra keyword arguments of that estimate (e.g. a drop ratio).
        memory: a mode whose peak no estimator mode models gives its own function of
            (shape, task, batch) -> Estimate, built from the estimator's terms; it wins
            over ``memory_mode``.
    """

    mode: str
    kind: str
    rank: int
    memory_mode: str = "forward"
    memory_options: Mapping[str, Any] = field(default_factory=dict)
    memory: Callable[[ModelShape, "TrainingTask", int], Estimate] | None = field(default=None, compare=False)


POLICY: tuple[PolicyEntry, ...] = (
    PolicyEntry("ferret", "first-order, shared-randomness projection", 10, "sgd"),
    PolicyEntry("droppeft", "first-order, stochastic layer dropout", 20, "dropout", {"drop_ratio": 0.25}),
    PolicyEntry("fedcybgd", "cyclic block updates", 30, "block", {"block_layers": 1}),
    PolicyEntry("mezo", "zeroth-order", 40, "mezo"),
    PolicyEntry("fedbiot", "4-bit layer-dropped emulator + adapter", 50, "emulator",
                {"base_bits": 4, "adapter_layers": 2, "optimizer": "sgd"}),
    PolicyEntry("fedbiot_zo", "4-bit layer-dropped emulator + adapter, zeroth-order", 60, "emulator",
                {"base_bits": 4, "adapter_layers": 2, "optimizer": "zo"}),
)


def policy_entry(mode: str, policy: Sequence[PolicyEntry] = POLICY) -> PolicyEntry | None:
    """The row of ``mode`` in ``policy`` (default: the product's plan), or None."""
    return next((entry for entry in policy if entry.mode == mode), None)


@dataclass(frozen=True)
class TrainingTask:
    """What the federation asks of every client (from its announced parameters).

    Attributes:
        scope: "full" or "lora".
        batch_size: examples per step.
        max_seq_len: tokens per example at most (the estimate assumes full rows).
        lora_rank: adapter rank when the scope is "lora".
    """

    scope: str
    batch_size: int
    max_seq_len: int
    lora_rank: int = 8

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_seq_len", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Choice:
    """The chooser's decision.

    Attributes:
        mode: the engine to run.
        batch: examples per forward pass (a micro-batch of the task's batch).
        estimate: the estimated peak at that batch (with any extra parts), or None for a
            forced mode the policy has no memory model for.
        usable_bytes: what the estimate had to fit in.
        explanation: one readable line (also sent in the hello).
    """

    mode: str
    batch: int
    estimate: Estimate | None
    usable_bytes: int
    explanation: str


class NoModeFits(ValueError):
    """Nothing fits the budget (or a forced mode does not).

    Attributes:
        smallest_budget_bytes: the smallest budget (before headroom) that would work.
    """

    def __init__(self, message: str, smallest_budget_bytes: int) -> None:
        super().__init__(message)
        self.smallest_budget_bytes = smallest_budget_bytes


class ModeUnavailable(ValueError):
    """A forced mode this client has no engine for."""


def estimate_mode(entry: PolicyEntry, shape: ModelShape, task: TrainingTask, batch: int,
                  extra: Mapping[str, int] | None = None) -> Estimate:
    """The estimated peak of ``entry``'s mode at ``batch``, plus ``extra`` named parts."""
    if entry.memory is not None:
        est = entry.memory(shape, task, batch)
    else:
        est = estimate(shape, entry.memory_mode, batch=batch, seq_len=task.max_seq_len,
                       scope=task.scope, lora_rank=task.lora_rank, **dict(entry.memory_options))
    if extra:
        est = Estimate(est.mode, {**est.breakdown, **{k: int(v) for k, v in extra.items()}})
    return est


def _largest_batch(entry: PolicyEntry, shape: ModelShape, task: TrainingTask, usable: int,
                   extra: Mapping[str, int] | None) -> tuple[int, Estimate] | None:
    """The largest batch in [1, task.batch_size] whose estimate fits, by bisection
    (estimates grow with the batch)."""
    smallest = estimate_mode(entry, shape, task, 1, extra)
    if smallest.total > usable:
        return None
    low, best = 1, smallest
    high = task.batch_size
    while low < high:
        middle = (low + high + 1) // 2
        est = estimate_mode(entry, shape, task, middle, extra)
        if est.total <= usable:
            low, best = middle, est
        else:
            high = middle - 1
    return low, best


def _round_up_budget(need: int, headroom: float) -> int:
    """The budget (before headroom) that leaves ``need`` usable, rounded up to 0.01 GiB."""
    raw = need / (1.0 - headroom)
    step = GIB / 100
    return int(math.ceil(raw / step) * step)


def choose(shape: ModelShape, task: TrainingTask, *, budget_bytes: int, headroom: float,
           policy: Sequence[PolicyEntry], forced: str | None = None, budget_source: str = "budget",
           extra: Mapping[str, int] | None = None) -> Choice:
    """Pick the best-ranked mode of ``policy`` that fits, and the largest batch for it.

    Args:
        shape: the model.
        task: the federation's task.
        budget_bytes: memory training may use (detected or set by the user).
        headroom: fraction of the budget kept free (0 <= headroom < 1).
        policy: the rows of the modes this client has engines for (any order; walked by
            rank).
        forced: a mode the user insists on, or None to choose.
        budget_source: where the budget came from (for the explanation).
        extra: parts every mode pays on top of its step (e.g. the round-start copy).

    Raises:
        ModeUnavailable: ``forced`` is not in ``policy``.
        NoModeFits: no offered mode (or the forced one) fits even at batch 1.
    """
    if budget_bytes < 1:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    usable = int(budget_bytes * (1.0 - headroom))
    budget_text = f"{gib(usable)} usable = {gib(budget_bytes)} {budget_source} - {headroom:.0%} headroom"
    short_text = f"only {gib(usable)} is usable ({gib(budget_bytes)} {budget_source} - {headroom:.0%} headroom)"
    setting = f"x {task.max_seq_len} tokens"

    offered = sorted(policy, key=lambda entry: (entry.rank, entry.mode))
    if forced is not None:
        entry = policy_entry(forced, offered)
        if entry is None:
            raise ModeUnavailable(f"mode {forced!r} is not available in this client "
                                  f"(available: {', '.join(e.mode for e in offered) or 'none'})")
        found = _largest_batch(entry, shape, task, usable, extra)
        if found is None:
            need = estimate_mode(entry, shape, task, 1, extra).total
            raise NoModeFits(
                f"the forced mode {forced} does not fit: it needs an estimated {gib(need)} at batch 1 "
                f"{setting}, but {short_text}; it would need a budget of at least "
                f"{gib(_round_up_budget(need, headroom))}", _round_up_budget(need, headroom))
        batch, est = found
        return Choice(forced, batch, est, usable,
                      f"{forced} (forced; {entry.kind}), batch {batch}/{task.batch_size} {setting}: "
                      f"estimated peak {gib(est.total)} of {budget_text}")

    if not offered:
        raise ModeUnavailable("this client has no training mode")
    passed_over: list[str] = []
    needs: list[int] = []
    for entry in offered:
        found = _largest_batch(entry, shape, task, usable, extra)
        if found is None:
            need = estimate_mode(entry, shape, task, 1, extra).total
            needs.append(need)
            passed_over.append(f"{entry.mode} needs {gib(need)}")
            continue
        batch, est = found
        why = f"; not {', '.join(passed_over)}" if passed_over else ""
        return Choice(entry.mode, batch, est, usable,
                      f"{entry.mode} ({entry.kind}), batch {batch}/{task.batch_size} {setting}: "
                      f"estimated peak {gib(est.total)} of {budget_text}{why}")
    smallest = _round_up_budget(min(needs), headroom)
    raise NoModeFits(
        f"no training mode fits: {'; '.join(passed_over)} at batch 1 {setting}, but {short_text}. "
        f"The smallest budget that would work is {gib(smallest)}", smallest)
