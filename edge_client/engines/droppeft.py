"""First-order training with stochastic layer dropout (DropPEFT, Wang et al. 2025, arXiv 2503.10217).

A :class:`~edge_client.engines.ferret.FerretEngine` round (T local first-order steps,
the update projected onto the round's seeds, PROTOCOL.md §8.1.2) in which every step
skips each decoder layer ``l`` with its own probability ``p_l``: a skipped layer is the
identity on the residual stream, so it costs no compute, keeps no activations for
backward, and its parameters get no gradient that step (:mod:`edge_client.layer_dropout`).
The probabilities come from the round's settings: ``dropout_ratio`` (their mean) and
``dropout_profile`` (``"uniform"``, or ``"linear"``: rising with depth, shallow layers
dropped least). The coordinator may adapt ``dropout_ratio`` per client and round with a
bandit (``[modes.droppeft] adapt``, ``coordinator/bandit.py``), rewarding training
progress per second.

Each step's skipped layers are drawn from ``random.Random(f"droppeft:{round}:{step}")``,
so a round is reproducible; they do not reach the wire (the scalars are the projection
of the round's update, whatever was skipped on the way).

The scalars keep ferret's meaning and scale: the update of a thinned network is still an
update of the shared space, projected and rebuilt without bias.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass

from edge_client.data import Batch
from edge_client.engines.base import SettingsError
from edge_client.engines.ferret import FerretEngine, FerretSettings, optimizer_state_bytes
from edge_client.layer_dropout import PROFILES, find_decoder_layers, layer_probabilities, sample_skipped, skip_layers
from profiles.chooser import PolicyEntry, TrainingTask
from profiles.estimator import Estimate, ModelShape, estimate, lora_param_count

__all__ = ["DropPEFTSettings", "DropPEFTEngine", "dropout_memory"]

logger = logging.getLogger(__name__)

# The ratio the chooser's memory model assumes (the coordinator's bandit may go lower
# only where the client's budget allows, see coordinator/server.py). Not 0.5, the paper's
# usual: on SmolLM2-135M (30 narrow layers, each one needed) a federation at 0.5 improves
# for a few rounds and then diverges, clipped or not (bench/layer_sensitivity.py), while
# 0.25 with the ends kept and the gradient clipped holds (DropPEFTSettings).
PLANNED_RATIO = 0.25

# Clip each step's gradient to this L2 norm by default. A thinned network's gradient is
# 6 to 80 on SmolLM2-135M where the full network's is 3 to 4.5; unclipped, a few such
# steps at the SGD rate that puts the scalars on MeZO's scale (η K / T) throw the LoRA
# weights far enough that the full network's held-out loss jumps from ~1 to 13.
DEFAULT_MAX_GRAD_NORM = 5.0


@dataclass(frozen=True)
class DropPEFTSettings(FerretSettings):
    """Ferret's settings plus the dropout configuration.

    Attributes:
        dropout_ratio: the mean probability that a layer is skipped on a step, in [0, 1).
        dropout_profile: "uniform" (every layer the ratio) or "linear" (rising with depth).
        keep_first, keep_last: decoder layers at the start and the end never skipped; the
            ratio's drops are spread over the layers between (see
            :func:`edge_client.layer_dropout.layer_probabilities` for why: without them a
            step's network is too broken for its gradient to help the full one).
        max_grad_norm: (ferret's) clipping, on by default here (DEFAULT_MAX_GRAD_NORM).
    """

    max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM
    dropout_ratio: float = PLANNED_RATIO
    dropout_profile: str = "uniform"
    keep_first: int = 2
    keep_last: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout_ratio < 1.0:
            raise SettingsError(f"dropout_ratio must be in [0, 1), got {self.dropout_ratio}")
        if self.dropout_profile not in PROFILES:
            raise SettingsError(f"dropout_profile must be one of {', '.join(PROFILES)}, got {self.dropout_profile!r}")
        for name in ("keep_first", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettingsError(f"{name} must be an integer >= 0, got {value!r}")


def kept_layers_bound(layers: int, ratio: float) -> int:
    """Layers a step keeps, at most, on all but about 2% of steps: each layer is skipped
    independently, so the kept count is Binomial(L, 1 − p); mean plus two standard
    deviations, rounded up (SmolLM2's 30 layers at p = 0.5: 21, not 15)."""
    mean = (1.0 - ratio) * layers
    return min(layers, math.ceil(mean + 2.0 * math.sqrt(layers * ratio * (1.0 - ratio))))


def dropout_memory(shape: ModelShape, task: TrainingTask, batch: int, ratio: float = PLANNED_RATIO) -> Estimate:
    """The estimator's ``dropout`` step for the kept layers of a heavy step
    (:func:`kept_layers_bound`; the estimator itself counts the mean) without AdamW's
    moments (the default optimizer is SGD), plus the round-start copy of the trainable
    space."""
    effective = 1.0 - kept_layers_bound(shape.layers, ratio) / shape.layers
    step = estimate(shape, "dropout", batch=batch, seq_len=task.max_seq_len, scope=task.scope,
                    lora_rank=task.lora_rank, drop_ratio=effective)
    trainable = shape.param_count if task.scope == "full" else lora_param_count(shape, task.lora_rank)
    breakdown = {**step.breakdown, "round_start_delta": trainable * 4}
    breakdown.pop("optimizer_state", None)  # the default optimizer is SGD
    return Estimate(step.mode, breakdown)


class DropPEFTEngine(FerretEngine):
    """Ferret's round with each step's layers thinned by stochastic layer dropout."""

    name = "droppeft"
    settings_cls = DropPEFTSettings
    probe_before = True  # the first step's loss is a thinned network's
    policy = PolicyEntry("droppeft", "first-order, stochastic layer dropout", 20, "dropout",
                         {"drop_ratio": PLANNED_RATIO}, memory=dropout_memory)

    @classmethod
    def fit_settings(cls, settings, *, shape, task, choice):  # type: ignore[no-untyped-def, override]
        """Fit the asked ``dropout_ratio`` into the usable memory (the chooser checked the
        planned ratio; a coordinator's bandit may ask for less dropout): first by a
        smaller micro-batch (the same examples and loss, only slower, which the bandit's
        reward then sees), and only where even one row does not fit, by the smallest
        higher ratio (in steps of 0.05) that does."""
        if choice.estimate is None:
            return settings
        others = choice.estimate.total - dropout_memory(shape, task, choice.batch).total  # copies and the like
        others += optimizer_state_bytes(settings, shape, task)  # AdamW's moments, if asked for

        def fits(ratio: float, batch: int) -> bool:
            return dropout_memory(shape, task, batch, ratio).total + others <= choice.usable_bytes

        ratio, batch = settings.dropout_ratio, settings.micro_batch or task.batch_size
        while batch > 1 and not fits(ratio, batch):
            batch -= 1
        while ratio < 0.95 and not fits(ratio, batch):
            ratio = round(min(0.95, ratio + 0.05), 2)
        if (ratio, batch) != (settings.dropout_ratio, settings.micro_batch or task.batch_size):
            logger.info("dropout_ratio %.2f at micro-batch %s does not fit this client's memory; running %.2f at %d",
                        settings.dropout_ratio, settings.micro_batch, ratio, batch)
            return dataclasses.replace(settings, dropout_ratio=ratio, micro_batch=batch)
        return settings

    def __init__(self, model, space, settings: DropPEFTSettings | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, space, settings)
        self.num_layers = len(find_decoder_layers(model).layers)
        self._round = 0
        self._step = 0
        self.last_skipped: list[tuple[int, ...]] = []  # per step of the last round (tests, logs)

    def train_round(self, plan, data, progress=None):  # type: ignore[no-untyped-def]
        self._round, self._step = plan.round, 0
        self.last_skipped = []
        return super().train_round(plan, data, progress)

    def _loss_backward(self, batch: Batch) -> float:
        settings: DropPEFTSettings = self.settings  # type: ignore[assignment]
        probabilities = layer_probabilities(settings.dropout_ratio, self.num_layers, settings.dropout_profile,
                                            keep_first=settings.keep_first, keep_last=settings.keep_last)
        generator = random.Random(f"droppeft:{self._round}:{self._step}")
        skipped = sample_skipped(probabilities, generator)
        self._step += 1
        self.last_skipped.append(tuple(skipped))
        with skip_layers(self.model, skipped):
            return super()._loss_backward(batch)
