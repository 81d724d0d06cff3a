"""The engine interface: one training mode per module, all speaking seeds and scalars.

An engine turns a round task (the coordinator's seeds and hyper-parameters) and the
client's local data into one scalar per seed. Every mode the product supports produces
its update in the same form, so the coordinator, the ledger and the sync path never
change when a mode is added: a new mode is a new module that subclasses :class:`Engine`
and registers itself in ``edge_client/engines/__init__.py`` with one call.

Subclasses must set:
    name: the mode's wire name (sent in the hello, shown in the status). The mode
        chooser offers a registered engine when :data:`profiles.chooser.POLICY` has a
        row of that name (its rank and memory model).
    config_cls: a dataclass of the mode's own settings, with defaults, accepting a
        ``micro_batch`` keyword (rows per forward pass, chosen to fit the memory budget;
        None: the whole batch).
and override:
    train_round(task, data, progress): run the round's local steps and return a
        :class:`LocalUpdate` whose ``num_examples`` counts the examples its scalars were
        computed from this round. :mod:`edge_client.engines.mezo` is the reference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from edge_client.space import ParameterSpace
from protocol.limits import MAX_EXAMPLES

__all__ = ["Engine", "EngineError", "LocalUpdate", "RoundPlan", "BatchSource", "ProgressFn"]


class EngineError(RuntimeError):
    """Local training failed in a way the round cannot use (e.g. a non-finite loss)."""


@dataclass(frozen=True)
class RoundPlan:
    """What an engine needs from a round task."""

    round: int
    seeds: tuple[int, ...]
    learning_rate: float
    epsilon: float
    batch_size: int


@dataclass(frozen=True)
class LocalUpdate:
    """An engine's result: one scalar per seed, in the task's seed order.

    Attributes:
        pairs: ``(seed, projected gradient)`` in the task's seed order.
        num_examples: the number of training examples the scalars were computed from in
            this round (for MeZO: local steps x batch size), not the size of the client's
            dataset. The daemon sends it as the update's ``num_examples`` (PROTOCOL.md),
            the weight the ``"mean"`` aggregation gives the update.
        loss_before: mean loss before the local steps.
        loss_after: mean loss after the local steps.
        seconds: wall time of the round's local training.
    """

    pairs: tuple[tuple[int, float], ...]
    num_examples: int
    loss_before: float
    loss_after: float
    seconds: float

    def __post_init__(self) -> None:
        # Refused here, an engine's bad count is a failed round (the daemon logs it and
        # sends nothing), not an update the codec cannot encode.
        count = self.num_examples
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_EXAMPLES:
            raise EngineError(f"num_examples must be an int in [1, {MAX_EXAMPLES}], got {count!r}")


class BatchSource(Protocol):
    def next_batch(self) -> Any: ...


ProgressFn = Callable[[int, int, float], None]  # (step done, steps total, last loss)


class Engine(ABC):
    """Base class of training modes. See the module docstring for what to override."""

    name: ClassVar[str]
    config_cls: ClassVar[type]

    def __init__(self, model: torch.nn.Module, space: ParameterSpace, config: Any | None = None) -> None:
        self.model = model
        self.space = space
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")

    @abstractmethod
    def train_round(self, plan: RoundPlan, data: BatchSource, progress: ProgressFn | None = None) -> LocalUpdate:
        """Run the round's local steps on ``data``, mutating the space in place."""
