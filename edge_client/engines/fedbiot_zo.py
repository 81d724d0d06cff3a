"""FedBiOT with zeroth-order steps: MeZO's round through the emulator, for the clients
whose budget holds the emulator's forward but not its backward.

FedBiOT (Wu et al. 2024, arXiv 2406.17706) trains the full model's adapter through a
compressed, quantised emulator (:mod:`edge_client.engines.fedbiot`, first-order). Its
backward keeps the adapter layers' activations and Hugging Face's float32 logits; a
MeZO step (:mod:`edge_client.engines.mezo`, Malladi et al. 2023) needs only two forwards
with the chunked loss, so on a device too small for that backward the same emulator can
still contribute. The scope, layer naming and emulator checks are the fedbiot mode's
(:class:`~edge_client.engines.fedbiot.EmulatorTraining`); the round and its scalars are
MeZO's (PROTOCOL.md §8.1.1), so they aggregate with every other client's per seed.

FedBiOT's proximal term ``λ‖θ − θ_start‖²`` (``proximal``, default 0) joins the
objective both perturbed points are scored on: its central difference is exact (the term
is quadratic), so each scalar becomes ``g + 2λ⟨θ − θ_start, z⟩``, the directional
derivative of the proximal objective, as a first-order client's projected gradient is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from edge_client.engines.base import EngineError
from edge_client.engines.fedbiot import EmulatorTraining, check_emulator_settings
from edge_client.engines.mezo import MeZOEngine, MeZOSettings
from edge_client.space import ParameterSpace
from profiles.chooser import PolicyEntry

__all__ = ["FedBiOTZOSettings", "FedBiOTZOEngine"]


@dataclass(frozen=True)
class FedBiOTZOSettings(MeZOSettings):
    """MeZO's settings plus FedBiOT's (``[modes.fedbiot_zo]`` on the coordinator).

    Attributes:
        proximal: λ of the proximal term ``λ‖adapter − adapter at round start‖²`` added to
            the objective of every step; 0: none.
        emulator_hash: the federation's emulator; a client holding another is refused.
    """

    proximal: float = 0.0
    emulator_hash: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_emulator_settings(self.proximal, self.emulator_hash)


class FedBiOTZOEngine(EmulatorTraining, MeZOEngine):
    """MeZO's round on the emulator's adapter, with an optional proximal term."""

    name = "fedbiot_zo"
    settings_cls = FedBiOTZOSettings
    # Forward-only memory: the emulator's weights in edgefed's layout and MeZO's
    # no-grad forward with the chunked loss; ranked after the first-order fedbiot.
    policy = PolicyEntry("fedbiot_zo", "quantised layer-dropped emulator + adapter, zeroth-order", 60, "emulator",
                         {"base_bits": 4, "adapter_layers": 2, "optimizer": "zo"})
    space_takes_gradients = False
    # The adapter is small (LoRA on 2-4 layers): a float64 round start costs little and
    # keeps the difference of the two perturbed points' proximal terms exact to float32.
    round_start_dtype = torch.float64

    def __init__(self, model: torch.nn.Module, space: ParameterSpace, settings: FedBiOTZOSettings | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model, space, settings, **kwargs)
        self._remember_emulator(model, self.settings)

    def _objective(self, batch: Any) -> float:
        value = self._loss(batch)
        start = self._round_start
        if start is not None:
            settings: FedBiOTZOSettings = self.settings  # type: ignore[assignment]
            pull = settings.proximal * float((self.space.flat.detach().double() - start).square().sum())
            if not math.isfinite(pull):
                raise EngineError("the proximal term is not finite; lower the learning rate")
            value += pull
        return value
