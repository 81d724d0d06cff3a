"""Projected first-order engine (Ferret, Shu et al. 2024, arXiv 2409.06277), on the seed wire.

One round, with the client's seeds ``s_1 … s_K`` (the task's), the coordinator's
learning rate ``η`` and this mode's settings (``T = local_steps``):

    θ_start = θ                                          (the round-start space)
    T first-order steps on local batches (SGD or AdamW; the optimizer is created for the
        round and dropped after it: no state crosses rounds or the wire)
    Δ = θ − θ_start                                      (the local update)
    p_k = <Δ, z(s_k)>                                    (protocol.perturb.project_rademacher)
    scalar_k = −p_k / (η K)                              (what is sent)

The coordinator commits ``a_k = −η · agg_k(scalar)`` (PROTOCOL.md §8.2), so a lone client
makes the model move by ``Δ̂ = (1/K) Σ_k <Δ, z_k> z_k``: since ``E[z zᵀ] = I`` for the
protocol's Rademacher directions, ``E[Δ̂] = Δ`` (unbiased), with
``E‖Δ̂ − Δ‖² = (d − 1)/K · ‖Δ‖²`` over a space of ``d`` elements (PROTOCOL.md §8.1
derives both). Ferret's public code instead draws clipped-normal bases whose variance
shrinks its reconstruction to about a third of the update and makes it up with a server
learning rate of 10; nothing here needs such a factor.

Why ``−p_k / (η K)``: every mode's scalar must estimate the same quantity on the same
scale, so a mixed federation's per-seed robust aggregation compares like with like
(otherwise the trimmed mean would cut the better clients as outliers). A MeZO client's
scalar is the directional derivative ``<∇L, z_k>`` of its local loss, and its round moves
the model by ``−η Σ_k <∇L, z_k> z_k``, about ``−η K ∇L`` in expectation. With SGD at the
default local learning rate ``η K / T`` for ``T`` steps, ``Δ ≈ −η K ḡ`` (``ḡ`` the mean
gradient along the local trajectory), so ``−Δ / (η K) ≈ ḡ`` and ``scalar_k ≈ <ḡ, z_k>``:
the same quantity, from exact gradients over ``T`` batches. With AdamW (or an explicit
``local_lr``) the scalars still reconstruct ``Δ`` without bias, but their scale is the
optimizer's, not the gradient's: use that in federations whose clients all run it.

The projection is a fused, exact pass per seed (no materialised ``z``), so ``K`` can be
large: the reconstruction error shrinks as ``1/√K`` (``bench/first_order.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edge_client.data import IGNORE_INDEX, Batch
from edge_client.engines.base import (
    BatchSource,
    Engine,
    EngineError,
    EngineSettings,
    LocalUpdate,
    ProgressFn,
    RoundPlan,
    SettingsError,
)
from edge_client.scope import ScopeConfig
from edge_client.space import Distribution, ParameterSpace
from profiles.chooser import PolicyEntry, TrainingTask
from profiles.estimator import Estimate, ModelShape, estimate, lora_param_count
from protocol.perturb import project_rademacher

__all__ = ["FerretSettings", "FerretEngine", "trainable_parameters", "first_order_memory", "optimizer_state_bytes",
           "projected_scalars"]

logger = logging.getLogger(__name__)

# A decoder layer's number in a canonical parameter name (Llama: model.layers.<i>.…).
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# Local steps a round may ask for: num_examples (steps x batch) must stay in the
# protocol's range, and a round is meant to take minutes, not days.
MAX_LOCAL_STEPS = 4096


@dataclass(frozen=True)
class FerretSettings(EngineSettings):
    """Settings of the projected first-order engine (``[modes.ferret]`` on the coordinator).

    Attributes:
        local_steps: T, first-order steps per round.
        optimizer: "sgd" (the default: its scalars are on MeZO's scale, so it mixes with
            zeroth-order clients) or "adamw".
        local_lr: the local learning rate; None (the default): ``η K / T`` for SGD (see
            the module docstring), and 3e-4 for AdamW.
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: clip each step's gradient to this L2 norm; None: no clipping.
        personal_layers: personalised transformer layer sharing (PTLS, DropPEFT §4): the
            trainable parameters of the last this many decoder layers stay this client's
            own. Its update of them is kept (and saved across restarts) instead of
            projected, it trains on its own values of them, and it sends the projection
            of the rest of its update only. 0: nothing personal.
        micro_batch: (inherited) rows per forward/backward; the gradient of the whole
            batch is accumulated over micro-batches.
    """

    local_steps: int = 4
    optimizer: str = "sgd"
    local_lr: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    personal_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.local_steps <= MAX_LOCAL_STEPS:
            raise SettingsError(f"local_steps must be between 1 and {MAX_LOCAL_STEPS}, got {self.local_steps}")
        if self.optimizer not in ("sgd", "adamw"):
            raise SettingsError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.local_lr is not None and not (math.isfinite(self.local_lr) and self.local_lr > 0):
            raise SettingsError(f"local_lr must be a finite number > 0, got {self.local_lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SettingsError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise SettingsError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.personal_layers < 0:
            raise SettingsError(f"personal_layers must be >= 0, got {self.personal_layers}")

    def learning_rate(self, coordinator_lr: float, seeds: int) -> float:
        """The local learning rate for a round of ``seeds`` seeds at the coordinator's η."""
        if self.local_lr is not None:
            return self.local_lr
        if self.optimizer == "adamw":
            return 3e-4
        return coordinator_lr * seeds / self.local_steps


def first_order_memory(shape: ModelShape, task: TrainingTask, batch: int) -> Estimate:
    """The estimator's ``sgd`` step plus the round-start copy of the trainable space (Δ
    is taken against it)."""
    step = estimate(shape, "sgd", batch=batch, seq_len=task.max_seq_len, scope=task.scope,
                    lora_rank=task.lora_rank)
    trainable = shape.param_count if task.scope == "full" else lora_param_count(shape, task.lora_rank)
    return Estimate(step.mode, {**step.breakdown, "round_start_delta": trainable * 4})


def optimizer_state_bytes(settings: FerretSettings, shape: ModelShape, task: TrainingTask) -> int:
    """Memory the local optimizer keeps beyond SGD's (the policy's memory model counts
    SGD, which holds no state): AdamW's two float32 moments per trainable value."""
    if settings.optimizer != "adamw":
        return 0
    trainable = shape.param_count if task.scope == "full" else lora_param_count(shape, task.lora_rank)
    return 2 * 4 * trainable


def projected_scalars(delta: torch.Tensor, seeds: tuple[int, ...], learning_rate: float) -> list[float]:
    """The scalars that make the coordinator's rule (``a_k = −η · scalar_k``) rebuild
    ``delta`` without bias: ``scalar_k = −<Δ, z(s_k)> / (η K)`` (PROTOCOL.md §8.1).

    Args:
        delta: the update over the whole padded space (padding zero), float32.
        seeds: the client's seeds, in task order.
        learning_rate: the coordinator's η.
    """
    projections, _ = project_rademacher(delta, seeds)
    scale = -1.0 / (learning_rate * len(seeds))
    return [p * scale for p in projections]


def trainable_parameters(model: torch.nn.Module, space: ParameterSpace) -> list[torch.nn.Parameter]:
    """The model's parameters whose storage is the space's flat buffer (each once)."""
    storage = space.flat.untyped_storage().data_ptr()
    seen: set[int] = set()
    found = []
    for parameter in model.parameters():
        if parameter.untyped_storage().data_ptr() == storage and id(parameter) not in seen:
            seen.add(id(parameter))
            found.append(parameter)
    return found


def _micro_batches(batch: Batch, size: int | None) -> Iterator[Batch]:
    rows = batch.input_ids.shape[0]
    step = rows if size is None else size
    for start in range(0, rows, step):
        yield Batch(input_ids=batch.input_ids[start:start + step],
                    attention_mask=batch.attention_mask[start:start + step],
                    labels=batch.labels[start:start + step])


def _counted(labels: torch.Tensor) -> int:
    """Labels a causal-LM loss counts: positions 1… that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class FerretEngine(Engine):
    """T local first-order steps, projected onto the round's seeds."""

    name = "ferret"
    settings_cls = FerretSettings
    # Whether loss_before needs its own forward pass (the first step's loss is the full
    # network's here, not under layer dropout).
    probe_before = False
    policy = PolicyEntry("ferret", "first-order, projected onto the round's seeds", 10, "sgd",
                         memory=first_order_memory)

    @classmethod
    def fit_settings(cls, settings, *, shape, task, choice):  # type: ignore[no-untyped-def, override]
        """The chooser planned an SGD step; a coordinator asking for AdamW adds its two
        moments. Fit them by a smaller micro-batch first (the same examples and loss, only
        slower); where even one row does not fit, run SGD, the nearest optimizer that does
        (and say so): the round is still answered, on MeZO's scale (PROTOCOL.md §8.1.2)."""
        extra = optimizer_state_bytes(settings, shape, task)
        if not extra or choice.estimate is None:
            return settings
        others = choice.estimate.total - first_order_memory(shape, task, choice.batch).total

        def fits(batch: int) -> bool:
            return first_order_memory(shape, task, batch).total + others + extra <= choice.usable_bytes

        batch = settings.micro_batch or task.batch_size
        while batch > 1 and not fits(batch):
            batch -= 1
        if fits(batch):
            if batch != (settings.micro_batch or task.batch_size):
                logger.info("optimizer adamw (%.2f GiB of moments) fits this client's memory at micro-batch %d",
                            extra / 2**30, batch)
                return dataclasses.replace(settings, micro_batch=batch)
            return settings
        logger.warning("optimizer adamw needs %.2f GiB more for its moments than this client's memory holds even "
                       "at micro-batch 1; running sgd", extra / 2**30)
        return dataclasses.replace(settings, optimizer="sgd", local_lr=None)

    @classmethod
    def prepare(cls, model: torch.nn.Module, scope: ScopeConfig, *,
                distribution: Distribution = "rademacher") -> tuple[torch.nn.Module, ParameterSpace]:
        """The federation's space, with gradients on for exactly its parameters."""
        model, space = super().prepare(model, scope, distribution=distribution)
        for parameter in trainable_parameters(model, space):
            parameter.requires_grad_(True)
        return model, space

    def __init__(self, model: torch.nn.Module, space: ParameterSpace, settings: FerretSettings | None = None) -> None:
        super().__init__(model, space, settings)
        if space.distribution != "rademacher":
            raise EngineError("the projected first-order engine needs Rademacher directions "
                              "(the Gaussian ones are not bit-exact)")
        self.parameters = trainable_parameters(model, space)
        if not self.parameters:
            raise EngineError("no model parameter lives in the parameter space")
        # Where this client's personal layers are kept across restarts (the daemon sets it;
        # None: in memory only), and their values once trained.
        self.personal_path: Path | None = None
        self._personal: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (layers, indices, values)

    def _device(self) -> torch.device:
        return self.space.flat.device

    def _loss_backward(self, batch: Batch) -> float:
        """The batch's mean token loss; its gradient accumulated into ``.grad``."""
        total = _counted(batch.labels)
        if total == 0:
            raise EngineError("the batch has no response tokens to compute a loss on")
        device = self._device()
        summed = 0.0
        for part in _micro_batches(batch, self.settings.micro_batch):
            count = _counted(part.labels)
            if count == 0:
                continue
            output = self.model(input_ids=part.input_ids.to(device), attention_mask=part.attention_mask.to(device),
                                labels=part.labels.to(device), use_cache=False)
            loss = output.loss
            (loss * (count / total)).backward()
            summed += float(loss.detach()) * count
            del output, loss
        mean = summed / total
        if not math.isfinite(mean):
            raise EngineError(f"the loss is not finite ({mean}); lower the local learning rate")
        return mean

    @torch.no_grad()
    def _probe(self, batch: Batch) -> float:
        from edge_client.loss import micro_batched_loss

        size = self.settings.micro_batch or batch.input_ids.shape[0]
        value, _ = micro_batched_loss(self.model, batch, micro_batch=size)
        return float(value)

    def personal_indices(self, layers: int) -> torch.Tensor:
        """Positions in the flat space of the last ``layers`` decoder layers' parameters
        (canonical names ``….layers.<i>.…``, PROTOCOL.md §5.1)."""
        numbers = [int(match.group(1)) for entry in self.space.entries
                   if (match := _LAYER_NAME.search(entry.name)) is not None]
        if layers and not numbers:
            raise EngineError("personal_layers is set but no parameter of the space belongs to a numbered layer")
        first = max(numbers, default=-1) + 1 - layers
        parts = [torch.arange(entry.offset, entry.offset + entry.numel) for entry in self.space.entries
                 if (match := _LAYER_NAME.search(entry.name)) is not None and int(match.group(1)) >= first]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def _personal_values(self, layers: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(indices, this client's values there or None before it trained them)."""
        if self._personal is not None and self._personal[0] == layers:
            return self._personal[1], self._personal[2]
        indices = self.personal_indices(layers)
        values = None
        if self.personal_path is not None and self.personal_path.exists():
            try:
                saved = torch.load(self.personal_path, weights_only=True)
                if int(saved["layers"]) == layers and torch.equal(saved["indices"], indices):
                    values = saved["values"].to(self.space.flat.device)
                else:
                    logger.warning("%s holds other personal layers; starting them from the shared model",
                                   self.personal_path)
            except (OSError, RuntimeError, KeyError, ValueError) as error:
                logger.warning("cannot read personal layers from %s (%s); starting them from the shared model",
                               self.personal_path, error)
        self._personal = (layers, indices, values) if values is not None else None
        return indices, values

    def _keep_personal(self, layers: int, indices: torch.Tensor, values: torch.Tensor) -> None:
        self._personal = (layers, indices, values)
        if self.personal_path is not None:
            self.personal_path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.personal_path.with_suffix(".partial")
            torch.save({"layers": layers, "indices": indices, "values": values.cpu()}, partial)
            partial.replace(self.personal_path)  # a crash never leaves half a file

    def _optimizer(self, lr: float, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        settings: FerretSettings = self.settings  # type: ignore[assignment]
        if settings.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=lr, weight_decay=settings.weight_decay)
        return torch.optim.SGD(parameters, lr=lr)

    # -- what a round trains and sends (a mode that trains part of the space overrides these)

    def _round_parameters(self, plan: RoundPlan) -> list[torch.nn.Parameter]:
        """The parameters this round's steps train (and clip, and give to the optimizer)."""
        return self.parameters

    def _round_start_copy(self) -> Any:
        """What the update is later taken against: a copy of the whole space, padding
        included, so Δ's padding is 0."""
        return self.space.flat.detach().clone()

    def _update_scalars(self, start: Any, plan: RoundPlan, personal: torch.Tensor | None) -> list[float]:
        """Δ = θ − θ_start, checked, less the personal layers, projected onto the seeds."""
        settings: FerretSettings = self.settings  # type: ignore[assignment]
        with torch.no_grad():
            delta = start.neg_().add_(self.space.flat)  # θ − θ_start, in the copy's memory
        if not bool(torch.isfinite(delta).all()):
            raise EngineError("the local update is not finite; lower the local learning rate")
        if personal is not None:  # kept here, not shared
            self._keep_personal(settings.personal_layers, personal, self.space.flat.detach()[personal].clone())
            delta[personal] = 0.0
        return projected_scalars(delta, plan.seeds, plan.learning_rate)

    def train_round(self, plan: RoundPlan, data: BatchSource, progress: ProgressFn | None = None) -> LocalUpdate:
        started = time.perf_counter()
        settings: FerretSettings = self.settings  # type: ignore[assignment]
        seeds = len(plan.seeds)
        lr = settings.learning_rate(plan.learning_rate, seeds)
        was_training = self.model.training
        self.model.eval()  # no dropout: the same function every client's scalars measure
        personal = None
        if settings.personal_layers:
            indices, values = self._personal_values(settings.personal_layers)
            personal = indices
            if values is not None:  # train on this client's own layers (the round-start copy restores the shared)
                with torch.no_grad():
                    self.space.flat[indices] = values
        trained = self._round_parameters(plan)
        start = self._round_start_copy()
        optimizer = self._optimizer(lr, trained)
        first: Any = None
        loss_before = math.nan
        try:
            for step in range(settings.local_steps):
                batch = data.next_batch()
                if step == 0:
                    first = batch
                    # The full network's loss: a step's own loss may be a thinned network's
                    # (droppeft), and loss_after is always the full one's.
                    loss_before = self._probe(batch) if self.probe_before else math.nan
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss_backward(batch)
                if step == 0 and not self.probe_before:
                    loss_before = loss
                if settings.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trained, settings.max_grad_norm)
                optimizer.step()
                if progress is not None:
                    progress(step + 1, settings.local_steps, loss)
            optimizer.zero_grad(set_to_none=True)
            del optimizer  # its state (AdamW's moments) is the round's only
            loss_after = self._probe(first)
            scalars = self._update_scalars(start, plan, personal)
        finally:
            for parameter in self.parameters:  # also when a step failed or the round was stopped
                parameter.grad = None
            self.model.train(was_training)
        pairs = tuple(zip(plan.seeds, scalars))
        return LocalUpdate(pairs=pairs, num_examples=settings.local_steps * plan.batch_size,
                           loss_before=loss_before, loss_after=loss_after, seconds=time.perf_counter() - started)
