"""The engine interface: a training mode is one module, and every mode speaks seeds and scalars.

An engine turns a round task (the coordinator's seeds and hyper-parameters) and the
client's local data into one scalar per seed. Every mode produces its update in that one
form, so the coordinator, the ledger and the sync path never change when a mode is
added. A new mode is one new module in ``edge_client/engines/`` holding a subclass of
:class:`Engine` that declares, in one place:

``name``
    its wire name (sent in the hello, shown in ``/status``);
``settings_cls``
    a dataclass of its settings, a subclass of :class:`EngineSettings`, filled by
    :meth:`EngineSettings.from_task` from the federation's parameters, the round task's
    ``settings`` map (PROTOCOL.md §4.3) and the chooser's micro-batch;
``policy``
    its row of the chooser's policy (:class:`profiles.chooser.PolicyEntry`: its rank,
    a few words on what it does, and its memory model as terms of
    :mod:`profiles.estimator`), plain data, so ``profiles/`` stays torch-free;
``prepare``
    (optional) how it turns the loaded base model into the model it trains and the
    federation's parameter space: gradients on or off, adapters, dropped or quantised
    layers. The default builds the federation's scope and freezes everything
    (zeroth-order modes need no autograd);
``train_round``
    the round's local work, returning a :class:`LocalUpdate`.

Defining the subclass registers it (``__init_subclass__``, as peft maps a ``PeftType``
to its tuner); :func:`edge_client.engines.registry.load_engines` imports every module of
this package, so registration is discovered, never hand-listed. A subclass that sets no
``name`` (an intermediate base class) is not registered.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from edge_client.scope import ScopeConfig, build_space
from edge_client.space import Distribution, ParameterSpace
from profiles.chooser import Choice, PolicyEntry, TrainingTask
from profiles.estimator import ModelShape
from protocol.limits import MAX_EXAMPLES

__all__ = ["Engine", "EngineError", "EngineRefused", "EngineSettings", "LocalUpdate", "RoundPlan", "BatchSource", "ProgressFn",
           "SettingsError"]


class EngineError(RuntimeError):
    """Local training failed in a way the round cannot use (e.g. a non-finite loss)."""


class SettingsError(ValueError):
    """A mode setting (from the round task or the user) has the wrong name, type or value."""


class EngineRefused(SettingsError):
    """This client cannot serve the federation in this mode at all (say, it holds another
    FedBiOT emulator than the federation's): the daemon leaves with this one line rather
    than skipping rounds."""


@dataclass(frozen=True)
class EngineSettings:
    """Base of every mode's settings. Subclasses add fields, each with a default.

    Attributes:
        micro_batch: rows per forward pass, chosen by the chooser to fit the memory
            budget; the task's batch is processed in slices of this many rows with the
            same loss. None: the whole batch at once.
    """

    micro_batch: int | None = None

    def __post_init__(self) -> None:
        if self.micro_batch is not None and self.micro_batch < 1:
            raise SettingsError(f"micro_batch must be >= 1, got {self.micro_batch}")

    @classmethod
    def from_task(cls, values: Mapping[str, Any] | None = None, *, micro_batch: int | None = None,
                  mode: str = "") -> EngineSettings:
        """Settings from a round task's ``settings`` map plus the chooser's micro-batch.

        Keys the mode does not define are refused (a typo must not silently fall back to
        a default), as are values of the wrong type; ints are accepted for float fields.

        Raises:
            SettingsError: an unknown key, a wrong type or an out-of-range value.
        """
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        chosen: dict[str, Any] = {}
        for key, value in (values or {}).items():
            if key == "micro_batch" or key not in fields:
                known = ", ".join(sorted(k for k in fields if k != "micro_batch")) or "none"
                raise SettingsError(f"{mode or cls.__name__}: unknown setting {key!r} (known: {known})")
            chosen[key] = _coerce(key, value, hints[key], mode or cls.__name__)
        try:
            return cls(**chosen, micro_batch=micro_batch)
        except (TypeError, ValueError) as error:
            raise SettingsError(f"{mode or cls.__name__}: {error}") from None


def _coerce(key: str, value: Any, hint: Any, owner: str) -> Any:
    """``value`` checked against a field's type (bool, int, float, str, or Optional of one)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                break
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(kind, "__name__", str(kind)) for kind in allowed)
    raise SettingsError(f"{owner}: setting {key!r} must be {names}, got {value!r}")


@dataclass(frozen=True)
class RoundPlan:
    """What an engine needs from a round task.

    Attributes:
        round: the round being computed.
        seeds: this client's seeds, in task order (one scalar each).
        learning_rate: η, the coordinator's learning rate: a seed's committed coefficient
            is ``−η ×`` the aggregated scalar (PROTOCOL.md §8.2).
        epsilon: the perturbation scale of zeroth-order modes.
        batch_size: examples per step.
    """

    round: int
    seeds: tuple[int, ...]
    learning_rate: float
    epsilon: float
    batch_size: int


@dataclass(frozen=True)
class LocalUpdate:
    """An engine's result: one scalar per seed, in the task's seed order.

    Attributes:
        pairs: ``(seed, scalar)`` in the task's seed order; each scalar estimates the
            quantity PROTOCOL.md §8.1 defines for every mode (the directional
            derivative of the client's loss along the seed's direction).
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
    """Base class of training modes. See the module docstring for what to declare."""

    name: ClassVar[str]
    settings_cls: ClassVar[type[EngineSettings]] = EngineSettings
    policy: ClassVar[PolicyEntry]
    # A mode that trains through a FedBiOT emulator (the client must hold one) rather than
    # the full model; the chooser offers it to emulator clients only, and only it.
    needs_emulator: ClassVar[bool] = False
    # A mode that trains one block at a time with the block's own seeds (PROTOCOL.md §5.5):
    # the chooser offers it only in federations that schedule blocks (block_seeds > 0).
    needs_block_seeds: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete mode; intermediate bases set no name
            from edge_client.engines.registry import register_engine

            register_engine(cls)

    def __init__(self, model: torch.nn.Module, space: ParameterSpace, settings: EngineSettings | None = None) -> None:
        self.model = model
        self.space = space
        self.settings = settings if settings is not None else self.settings_cls()
        if not isinstance(self.settings, self.settings_cls):
            raise TypeError(f"{type(self).__name__} needs {self.settings_cls.__name__}, "
                            f"got {type(settings).__name__}")

    @classmethod
    def prepare(cls, model: torch.nn.Module, scope: ScopeConfig, *,
                distribution: Distribution = "rademacher") -> tuple[torch.nn.Module, ParameterSpace]:
        """The model this mode trains and the federation's parameter space on it.

        Every mode of a federation must produce the same space (same names, order and
        initial values, PROTOCOL.md §5.1, §6.7): what a mode may change is what lies
        outside it (gradients, dropped or quantised frozen layers). The default builds
        the scope and leaves nothing requiring gradients.
        """
        model, space = build_space(model, scope, distribution=distribution)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model, space

    @classmethod
    def fit_settings(cls, settings: EngineSettings, *, shape: ModelShape, task: TrainingTask,
                     choice: Choice) -> EngineSettings:
        """``settings`` bounded by what this client's memory allows (the chooser's
        ``choice`` for ``task``); by default unchanged. A mode whose settings move its
        memory (a dropout ratio) overrides this, so a coordinator's value that would not
        fit is run at the nearest one that does."""
        return settings

    @classmethod
    def announced_blocks(cls, shape: ModelShape, task: TrainingTask, choice: Choice,
                         blocks: list[int]) -> tuple[int, ...]:
        """A block mode's hello ``blocks``: which of ``blocks`` this client's memory can
        train (() for any); other modes announce none."""
        return ()

    def update_settings(self, settings: EngineSettings) -> None:
        """Take the settings of a new round task (they may change from round to round)."""
        if not isinstance(settings, self.settings_cls):
            raise TypeError(f"{type(self).__name__} needs {self.settings_cls.__name__}")
        self.settings = settings

    @abstractmethod
    def train_round(self, plan: RoundPlan, data: BatchSource, progress: ProgressFn | None = None) -> LocalUpdate:
        """Run the round's local steps on ``data``, mutating the space in place."""
