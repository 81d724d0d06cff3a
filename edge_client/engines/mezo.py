"""Zeroth-order engine: MeZO steps (Malladi et al., 2023, arXiv 2305.17333, Algorithm 1).

One step on seed ``s`` with batch ``B`` (ε = epsilon, η = learning rate):

    theta += ε z(s)              L+ = L(theta; B)
    theta -= 2ε z(s)             L- = L(theta; B)
    g = (L+ - L-) / (2ε)         the projected gradient: the scalar sent to the coordinator
    theta += (ε - η g) z(s)      restore and update in one pass (Algorithm 1 uses two)

Every pass is in place on the flat parameter space; there is no autograd graph, no
optimizer state and no copy of the weights, so the step's peak memory is that of a
forward pass with the same loss: the three passes allocate nothing that stays
(``bench/zo_step.py`` measures each part of a step). What the step does add is fixed
per process, not per step: building the compiled perturbation kernel leaves
torch.compile's compiler code and the kernel resident (about 52 MiB on CPU with torch
2.13; nothing with the eager kernel, ``EDGEFED_PERTURB_BACKEND=eager``, which is
slower). ``z`` is the protocol's device-independent direction, not torch's RNG.
The seeds come from the coordinator: all clients of a round step along the same
directions, which is what lets the coordinator aggregate per seed (FedKSeed, arXiv
2312.06353, §3; CyBeR-0 for robust per-seed aggregation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

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
from edge_client.space import ParameterSpace
from profiles.chooser import PolicyEntry

__all__ = ["MeZOSettings", "MeZOEngine"]

LossFn = Callable[[torch.nn.Module, Any], float]


@dataclass(frozen=True)
class MeZOSettings(EngineSettings):
    """Settings of the zeroth-order engine.

    Attributes:
        chunk_tokens: rows of the output projection computed at once by the loss; bounds
            the logits buffer to chunk_tokens x vocabulary floats.
        probe_losses: measure the loss of the round's first batch before and after the
            local steps (two extra forward passes) for the update's loss_before/after.
        micro_batch: (inherited) rows per forward pass.
    """

    chunk_tokens: int = 1024
    probe_losses: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_tokens < 1:
            raise SettingsError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


def _default_loss(chunk_tokens: int, micro_batch: int | None) -> LossFn:
    from edge_client.loss import causal_lm_loss, micro_batched_loss

    def loss(model: torch.nn.Module, batch: Any) -> float:
        if micro_batch is None:
            value, _ = causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)
        else:
            value, _ = micro_batched_loss(model, batch, micro_batch=micro_batch, chunk_tokens=chunk_tokens)
        return value

    return loss


class MeZOEngine(Engine):
    """Zeroth-order SPSA steps on the coordinator's seeds."""

    name = "mezo"
    settings_cls = MeZOSettings
    policy = PolicyEntry("mezo", "zeroth-order", 40, "mezo")

    def __init__(self, model: torch.nn.Module, space: ParameterSpace, settings: MeZOSettings | None = None,
                 *, loss_fn: LossFn | None = None) -> None:
        super().__init__(model, space, settings)
        self._custom_loss = loss_fn
        self.loss_fn = loss_fn if loss_fn is not None else _default_loss(self.settings.chunk_tokens,
                                                                          self.settings.micro_batch)

    def update_settings(self, settings: MeZOSettings) -> None:  # type: ignore[override]
        super().update_settings(settings)
        if self._custom_loss is None:
            self.loss_fn = _default_loss(self.settings.chunk_tokens, self.settings.micro_batch)

    def _loss(self, batch: Any) -> float:
        value = float(self.loss_fn(self.model, batch))
        if not math.isfinite(value):
            raise EngineError(f"the loss is not finite ({value}); lower the learning rate or epsilon")
        return value

    def _objective(self, batch: Any) -> float:
        """What a step differentiates: the loss here; a mode that adds a term to it (a
        proximal pull) overrides this, and the probes still report the loss alone."""
        return self._loss(batch)

    @torch.no_grad()
    def step(self, seed: int, batch: Any, learning_rate: float, epsilon: float) -> tuple[float, float, float]:
        """One MeZO step in place. Returns (projected gradient, L+, L-)."""
        space = self.space
        space.apply(seed, epsilon)
        loss_plus = self._objective(batch)
        space.apply(seed, -2.0 * epsilon)
        loss_minus = self._objective(batch)
        grad = (loss_plus - loss_minus) / (2.0 * epsilon)
        space.apply(seed, epsilon - learning_rate * grad)
        return grad, loss_plus, loss_minus

    def train_round(self, plan: RoundPlan, data: BatchSource, progress: ProgressFn | None = None) -> LocalUpdate:
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()  # no dropout: L+ and L- must see the same function
        try:
            pairs = []
            probe: Any = None
            loss_before = math.nan
            steps = len(plan.seeds)
            for index, seed in enumerate(plan.seeds):
                batch = data.next_batch()
                if index == 0 and self.settings.probe_losses:
                    probe = batch
                    loss_before = self._loss(probe)
                grad, loss_plus, loss_minus = self.step(seed, batch, plan.learning_rate, plan.epsilon)
                pairs.append((seed, grad))
                if index == 0 and not self.settings.probe_losses:
                    loss_before = 0.5 * (loss_plus + loss_minus)
                if progress is not None:
                    progress(index + 1, steps, 0.5 * (loss_plus + loss_minus))
            if self.settings.probe_losses:
                loss_after = self._loss(probe)
            else:
                loss_after = 0.5 * (loss_plus + loss_minus)
        finally:
            self.model.train(was_training)
        return LocalUpdate(
            pairs=tuple(pairs),
            num_examples=steps * plan.batch_size,
            loss_before=loss_before,
            loss_after=loss_after,
            seconds=time.perf_counter() - started,
        )
