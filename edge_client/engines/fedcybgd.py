"""Cyclic block updates (FedCyBGD, Wang et al. 2024, arXiv 2406.11187), on the seed wire.

FedCyBGD trains a large model on small devices by having each client update one block
(here, as in its code, one decoder layer) while everything else stays frozen: gradients
and optimizer state exist for that block only, and no gradient flows below it, so the
higher the block the less a step keeps for backward. The coordinator cycles the blocks
over its clients (``coordinator/blocks.py``) and names each client's block in its round
task (``settings["block"]``).

A round is ferret's (:mod:`edge_client.engines.ferret`: T first-order steps, the update
Δ projected onto the round's seeds, ``scalar_k = −<Δ, z_k> / (η K)``) with two changes:

* only the block's parameters train: its steps' optimizer, clipping and round-start copy
  cover the block, and the rest of the model is bit-for-bit what it was (it has no
  gradient, so no step moves it);
* the seeds are the block's own (PROTOCOL.md §5.5): their directions ``z_b`` are zero
  outside the block, so the coordinator's commit rebuilds
  ``Δ̂ = (1/K) Σ_k <Δ, z_b,k> z_b,k``, unbiased for Δ (which lives in the block) with
  error ``(d_b − 1)/K · ‖Δ‖²`` where a whole-space projection has ``(d − 1)/K``: on
  SmolLM2's LoRA space, 30 times less for the same K and bytes.

FedCyBGD's other saving, a compressed download, is built in: every client receives only
seeds and scalars, whatever the mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from edge_client.engines.base import EngineError, RoundPlan, SettingsError
from edge_client.engines.ferret import FerretEngine, FerretSettings, trainable_parameters
from edge_client.scope import ScopeConfig
from edge_client.space import Distribution, ParameterSpace
from profiles.chooser import Choice, PolicyEntry, TrainingTask
from profiles.estimator import Estimate, ModelShape, _layer_param_count, estimate, lora_param_count
from protocol.blocks import OUTER_BLOCK, block_of
from protocol.perturb import padded_length, project_rademacher

__all__ = ["FedCyBGDSettings", "FedCyBGDEngine", "block_memory", "trainable_blocks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedCyBGDSettings(FerretSettings):
    """Ferret's settings plus the block the coordinator assigned for the round.

    Attributes:
        block: the block to train (PROTOCOL.md §5.5: a decoder layer's number, or 65535
            for the outer block); the coordinator sets it in every round task.
    """

    block: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block is not None and not 0 <= self.block <= OUTER_BLOCK:
            raise SettingsError(f"block must be a block number in [0, {OUTER_BLOCK}], got {self.block}")
        if self.personal_layers:
            raise SettingsError("personal_layers does not combine with cyclic block updates")


def _estimator_block(shape: ModelShape, block: int) -> int:
    """The estimator's block_index of a block number (the outer block is ``layers``)."""
    return shape.layers if block == OUTER_BLOCK else min(block, shape.layers - 1)


def block_memory(shape: ModelShape, task: TrainingTask, batch: int, block: int | None = None) -> Estimate:
    """One block's step (the estimator's ``block`` mode for that block) without AdamW's
    moments (the default optimizer is SGD), plus the round-start copy of the block.
    ``block`` None: the top decoder layer, the smallest block, which is what the chooser
    checks (a client that fits it serves the federation; :func:`trainable_blocks` says
    which others it fits)."""
    index = shape.layers - 1 if block is None else _estimator_block(shape, block)
    step = estimate(shape, "block", batch=batch, seq_len=task.max_seq_len, scope=task.scope,
                    lora_rank=task.lora_rank, block_index=index)
    if index == shape.layers:
        trained = shape.param_count - shape.layers * _layer_param_count(shape)
    elif task.scope == "full":
        trained = _layer_param_count(shape)
    else:
        trained = lora_param_count(shape, task.lora_rank) // shape.layers
    breakdown = {**step.breakdown, "round_start_delta": trained * 4}
    breakdown.pop("optimizer_state", None)  # the default optimizer is SGD
    return Estimate(step.mode, breakdown)


def trainable_blocks(shape: ModelShape, task: TrainingTask, choice: Choice, blocks: list[int]) -> tuple[int, ...]:
    """The ones of ``blocks`` whose step fits the memory the chooser planned with, at its
    micro-batch (what a block client announces in its hello)."""
    if choice.estimate is None:
        return tuple(blocks)
    others = choice.estimate.total - block_memory(shape, task, choice.batch).total  # copies and the like
    return tuple(block for block in blocks
                 if block_memory(shape, task, choice.batch, block).total + others <= choice.usable_bytes)


class FedCyBGDEngine(FerretEngine):
    """Ferret's round over one block of the space, with that block's seeds."""

    name = "fedcybgd"
    settings_cls = FedCyBGDSettings
    needs_block_seeds = True
    policy = PolicyEntry("fedcybgd", "first-order, one block (decoder layer) at a time, cyclic", 30, "block",
                         {"block_layers": 1}, memory=block_memory)

    @classmethod
    def announced_blocks(cls, shape: ModelShape, task: TrainingTask, choice: Choice,
                         blocks: list[int]) -> tuple[int, ...]:
        """The blocks to list in the hello: those that fit, or () when all do (any)."""
        fitting = trainable_blocks(shape, task, choice, blocks)
        return () if list(fitting) == sorted(blocks) else fitting

    @classmethod
    def prepare(cls, model: torch.nn.Module, scope: ScopeConfig, *,
                distribution: Distribution = "rademacher") -> tuple[torch.nn.Module, ParameterSpace]:
        """The federation's space with nothing requiring gradients: each round turns on
        its block's."""
        model, space = super().prepare(model, scope, distribution=distribution)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model, space

    def __init__(self, model: torch.nn.Module, space: ParameterSpace,
                 settings: FedCyBGDSettings | None = None) -> None:
        super().__init__(model, space, settings)
        # Each parameter's block, by where its storage lies in the space.
        base = space.flat.data_ptr()
        by_offset = {entry.offset: entry for entry in space.entries}
        self._blocks_of: list[tuple[torch.nn.Parameter, int]] = []
        for parameter in trainable_parameters(model, space):
            entry = by_offset.get((parameter.data_ptr() - base) // space.flat.element_size())
            if entry is None:
                raise EngineError("a trainable parameter does not start at an entry of the space")
            self._blocks_of.append((parameter, block_of(entry.name)))
        self._ranges: tuple[tuple[int, int], ...] = ()

    def train_round(self, plan, data, progress=None):  # type: ignore[no-untyped-def]
        try:
            return super().train_round(plan, data, progress)
        finally:  # no gradients between rounds, also after a failed one
            for parameter, _ in self._blocks_of:
                parameter.requires_grad_(False)

    def _round_parameters(self, plan: RoundPlan) -> list[torch.nn.Parameter]:
        settings: FedCyBGDSettings = self.settings  # type: ignore[assignment]
        block = settings.block
        if block is None:
            raise EngineError("the round task names no block; cyclic block updates need the coordinator's "
                              "[modes.fedcybgd] schedule")
        trained = [parameter for parameter, of in self._blocks_of if of == block]
        if not trained:
            raise EngineError(f"block {block} holds no parameter of this federation's space "
                              f"(its blocks: {', '.join(map(str, self.space.blocks()))})")
        ranges = self.space.block_ranges(block)
        unrestricted = [seed for seed in plan.seeds if self.space.block_seed_ranges(seed) != ranges]
        if unrestricted:
            raise EngineError(f"seed {unrestricted[0]} of the task is not a seed of block {block} (PROTOCOL.md §5.5)")
        for parameter, of in self._blocks_of:
            parameter.requires_grad_(of == block)
        self._ranges = ranges
        return trained

    def _round_start_copy(self) -> Any:
        return [self.space.flat[low:high].detach().clone() for low, high in self._ranges]

    def _update_scalars(self, start: Any, plan: RoundPlan, personal: torch.Tensor | None) -> list[float]:
        """The projection of the block's Δ onto the block's directions, range by range:
        each range's Δ in its 64-aligned window of the space (zero beside it), projected
        with the signs of that place (``first_word``)."""
        flat = self.space.flat.detach()
        totals = [0.0] * len(plan.seeds)
        for (low, high), before in zip(self._ranges, start):
            first = low // 64
            window = torch.zeros(padded_length(high) - first * 64, dtype=torch.float32, device=flat.device)
            window[low - first * 64:high - first * 64] = flat[low:high] - before
            if not bool(torch.isfinite(window).all()):
                raise EngineError("the local update is not finite; lower the local learning rate")
            projections, _ = project_rademacher(window, plan.seeds, first_word=first)
            totals = [total + value for total, value in zip(totals, projections)]
        scale = -1.0 / (plan.learning_rate * len(plan.seeds))
        return [total * scale for total in totals]
