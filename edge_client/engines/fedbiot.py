"""FedBiOT (Wu et al. 2024, arXiv 2406.17706): train the full model's adapter through a
compressed, quantised emulator, on the seed wire.

A client too small for the full model holds the emulator built by ``edgefed-emulator
build`` (:mod:`edge_client.emulator`): the full model's last ``k`` decoder layers (the
adapter layers) intact, the layers below them thinned and aligned by distillation, the
frozen part quantised by bitsandbytes. The federation's scope for such runs is LoRA on
the adapter layers only (``[training] lora_layers``, PROTOCOL.md §5.1): the emulator
client builds that scope on its own layers, named by the full model's layer indices
(:func:`edge_client.scope.build_space` with the emulator's layer map), so its space is
bit for bit the full-model clients' space: same names, order, shapes and initial values,
and the same fingerprints after every commit.

Its round is ferret's (PROTOCOL.md §8.1.2: T first-order steps, the update projected
onto the round's seeds, the same scalar on the same scale), run through the emulator,
optionally with FedBiOT's proximal term ``λ‖adapter − adapter at round start‖²``
(``proximal``, default 0) added to each step's loss. The updates go on the same
seed/scalar wire into the same ledger as every other client's.

The client names its emulator directory (``ClientConfig.emulator``); the federation may
pin the emulator (``[modes.fedbiot] emulator_hash``): a client holding another emulator,
or one built from another base model, is refused with one line saying which.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edge_client.engines.base import EngineError, EngineRefused, SettingsError
from edge_client.engines.ferret import FerretEngine, FerretSettings, trainable_parameters
from edge_client.scope import ScopeConfig, ScopeError, build_space
from edge_client.space import Distribution, ParameterSpace
from profiles.chooser import PolicyEntry

__all__ = ["FedBiOTSettings", "FedBiOTEngine", "EmulatorTraining", "check_emulator_settings",
           "EMULATOR_QUANTIZATIONS", "resolve_quantization", "load_client_emulator", "emulator_layer_map",
           "emulator_shape_config"]

logger = logging.getLogger(__name__)

EMULATOR_QUANTIZATIONS = ("auto", "nf4", "int8", "none")
"""A client's choice of how its emulator's frozen part is held: ``auto`` (nf4, the policy
row's memory model, where bitsandbytes runs it here, else int8), ``nf4``, ``int8`` or
``none`` (float32 as stored)."""

# The attribute load_client_emulator leaves on the loaded model: its manifest.
_MANIFEST_ATTRIBUTE = "edgefed_emulator_manifest"


@dataclass(frozen=True)
class FedBiOTSettings(FerretSettings):
    """Ferret's settings plus FedBiOT's (``[modes.fedbiot]`` on the coordinator).

    Attributes:
        proximal: λ of the proximal term ``λ‖adapter − adapter at round start‖²`` added to
            each local step's loss (FedBiOT's local objective); 0: none.
        emulator_hash: the federation's emulator (its manifest's ``emulator_hash``); a
            client holding another one is refused. None: any emulator of the base model.
    """

    proximal: float = 0.0
    emulator_hash: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_emulator_settings(self.proximal, self.emulator_hash)


def resolve_quantization(setting: str, device: str, *, int8_fits: bool = False) -> tuple[str | None, str]:
    """The quantisation to load the emulator in, and one line why.

    Args:
        setting: the client's choice (:data:`EMULATOR_QUANTIZATIONS`).
        device: where the emulator runs.
        int8_fits: the memory model holds the 8-bit emulator within the budget at the
            plan's batch; ``auto`` then prefers int8 (it loses less of the base model),
            else nf4 (the smallest).

    Returns:
        ``("nf4" | "int8" | None, reason)``; None with ``setting == "none"`` means float32.

    Raises:
        EngineRefused: bitsandbytes cannot run the asked quantisation (or, for ``auto``,
            either) on ``device``: the fedbiot mode is not offered, and the line says why.
    """
    from edge_client.quantize import quantization_support

    if setting not in EMULATOR_QUANTIZATIONS:
        raise SettingsError(f"emulator quantization must be one of {', '.join(EMULATOR_QUANTIZATIONS)}, "
                            f"got {setting!r}")
    if setting == "none":
        return None, "emulator held in float32 (no quantisation asked for)"
    if setting == "auto":
        candidates: tuple[str, ...] = ("int8", "nf4") if int8_fits else ("nf4", "int8")
    else:
        candidates = (setting,)
    reasons = []
    for quantization in candidates:
        supported, reason = quantization_support(quantization, device)
        if supported:
            budget = ""
            if setting == "auto":
                budget = (" (8 bits fit the memory budget)" if int8_fits else
                          " (8 bits would not fit the memory budget)" if quantization == "nf4" else
                          " (4 bits cannot run here; 8 bits may exceed the memory budget)")
            return quantization, reason + budget
        reasons.append(reason)
    raise EngineRefused(f"fedbiot is not offered on this device: {'; '.join(reasons)}")


def load_client_emulator(path: str | Path, *, quantization: str | None, device: str = "cpu",
                         expect_base_hash: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Load an emulator for training (:func:`edge_client.emulator.load_emulator`, with its
    checks) and remember its manifest on the model, where :meth:`FedBiOTEngine.prepare`
    reads the layer map. Raises :class:`EngineRefused` (one line) for any refusal."""
    from edge_client.emulator import EmulatorLoadError, load_emulator

    try:
        model, tokenizer, manifest = load_emulator(path, expect_base_hash=expect_base_hash, device=device,
                                                   quantization=quantization)
    except EmulatorLoadError as error:
        raise EngineRefused(str(error)) from None
    setattr(model, _MANIFEST_ATTRIBUTE, manifest)
    return model, tokenizer, manifest


def emulator_layer_map(manifest: dict[str, Any]) -> dict[int, int]:
    """``{emulator layer index: full-model layer index}``: the emulator's layer ``i`` is the
    full model's ``kept_layers[i]``."""
    return dict(enumerate(int(layer) for layer in manifest["kept_layers"]))


def emulator_shape_config(config: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """The full model's config as the memory model needs it (the emulator's, with the full
    model's layer count: the estimator's ``emulator`` mode thins it itself)."""
    return {**config, "num_hidden_layers": int(manifest["num_layers_full"])}


class EmulatorTraining:
    """What every mode that trains through an emulator shares (mixed in before its
    engine base): the federation's lora scope built on the emulator's adapter layers, and
    the refusal of an emulator other than the federation's. The engine's settings carry
    ``emulator_hash``."""

    needs_emulator = True
    # Whether the space's parameters take gradients (first-order) or not (zeroth-order).
    space_takes_gradients = True

    @classmethod
    def prepare(cls, model: torch.nn.Module, scope: ScopeConfig, *,
                distribution: Distribution = "rademacher") -> tuple[torch.nn.Module, ParameterSpace]:
        """The federation's lora scope on the emulator's adapter layers, named by the full
        model's layer indices; gradients on for exactly the space (first-order modes) or
        for nothing (zeroth-order).

        Raises:
            EngineRefused: the model is not an emulator loaded by
                :func:`load_client_emulator`, the scope is not a lora scope restricted to
                the emulator's adapter layers, or it cannot be built on it.
        """
        manifest = getattr(model, _MANIFEST_ATTRIBUTE, None)
        if manifest is None:
            raise EngineRefused(f"{getattr(cls, 'name', 'this mode')} trains through an emulator: give the client "
                                "one (edgefed-emulator build, then the client's emulator setting)")
        adapter = [int(layer) for layer in manifest["adapter_layers"]]
        if scope.kind != "lora" or not scope.lora_layers:
            raise EngineRefused(f"{getattr(cls, 'name', 'this mode')} trains LoRA on the emulator's adapter layers "
                                f"{adapter}; the federation's scope must be lora restricted to them (lora_layers), "
                                f"not {'lora on every layer' if scope.kind == 'lora' else scope.kind}")
        outside = [layer for layer in scope.lora_layers if layer not in adapter]
        if outside:
            raise EngineRefused(f"the federation adapts layers {list(scope.lora_layers)}, but {outside} are not among "
                                f"this emulator's adapter layers {adapter} (the layers it keeps as in the full model)")
        try:
            model, space = build_space(model, scope, distribution=distribution, layer_map=emulator_layer_map(manifest))
        except ScopeError as error:
            raise EngineRefused(f"cannot build the federation's scope on the emulator: {error}") from None
        setattr(model, _MANIFEST_ATTRIBUTE, manifest)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if cls.space_takes_gradients:
            for parameter in trainable_parameters(model, space):
                parameter.requires_grad_(True)
        return model, space

    # The dtype of the proximal term's round-start copy of the space.
    round_start_dtype = torch.float32

    def _remember_emulator(self, model: torch.nn.Module, settings: Any) -> None:
        self.manifest: dict[str, Any] | None = getattr(model, _MANIFEST_ATTRIBUTE, None)
        self._round_start: torch.Tensor | None = None
        self._check_emulator(settings)

    def update_settings(self, settings: Any) -> None:
        self._check_emulator(settings)
        super().update_settings(settings)  # type: ignore[misc]

    def train_round(self, plan: Any, data: Any, progress: Any = None) -> Any:
        """The engine's round, holding the space's round start for the proximal term."""
        space: ParameterSpace = self.space  # type: ignore[attr-defined]
        proximal = self.settings.proximal  # type: ignore[attr-defined]
        self._round_start = space.flat.detach().to(self.round_start_dtype, copy=True) if proximal > 0 else None
        try:
            return super().train_round(plan, data, progress)  # type: ignore[misc]
        finally:
            self._round_start = None

    def _check_emulator(self, settings: Any) -> None:
        if settings.emulator_hash is None or self.manifest is None:
            return
        held = self.manifest["emulator_hash"]
        if held != settings.emulator_hash:
            raise EngineRefused(f"this client's emulator is {held[:16]}..., but the federation trains through "
                                f"emulator {settings.emulator_hash[:16]}...: fetch the federation's emulator "
                                f"(or rebuild it with edgefed-emulator build) and restart")


def check_emulator_settings(proximal: float, emulator_hash: str | None) -> None:
    """Raise :class:`SettingsError` unless ``proximal`` is finite and >= 0 and
    ``emulator_hash`` is None or 64 lowercase hex characters."""
    if not (math.isfinite(proximal) and proximal >= 0):
        raise SettingsError(f"proximal must be a finite number >= 0, got {proximal}")
    if emulator_hash is not None and (len(emulator_hash) != 64 or
                                      any(c not in "0123456789abcdef" for c in emulator_hash)):
        raise SettingsError(f"emulator_hash must be 64 lowercase hex characters, got {emulator_hash!r}")


class FedBiOTEngine(EmulatorTraining, FerretEngine):
    """Ferret's round on the emulator's adapter, with an optional proximal term."""

    name = "fedbiot"
    settings_cls = FedBiOTSettings
    # The memory model: the estimator's emulator step in edgefed's layout (float32 adapter layers
    # and unquantised parts, a 4-bit frozen part below, SGD: ferret's default optimizer).
    policy = PolicyEntry("fedbiot", "quantised layer-dropped emulator + adapter, first-order", 50, "emulator",
                         {"base_bits": 4, "adapter_layers": 2, "optimizer": "sgd"})

    def __init__(self, model: torch.nn.Module, space: ParameterSpace, settings: FedBiOTSettings | None = None) -> None:
        super().__init__(model, space, settings)
        self._remember_emulator(model, self.settings)

    def _loss_backward(self, batch):  # type: ignore[no-untyped-def]
        """Ferret's data loss and gradient, plus the proximal term's gradient
        ``2λ(θ − θ_start)`` (the returned loss is the data loss)."""
        loss = super()._loss_backward(batch)
        start = self._round_start
        if start is not None:
            settings: FedBiOTSettings = self.settings  # type: ignore[assignment]
            with torch.no_grad():
                pull = (self.space.flat.detach() - start).mul_(2.0 * settings.proximal)
                base = self.space.flat.data_ptr()
                for parameter in self.parameters:
                    offset = (parameter.data_ptr() - base) // parameter.element_size()
                    part = pull[offset:offset + parameter.numel()].view_as(parameter)
                    if parameter.grad is None:
                        parameter.grad = part.clone()
                    else:
                        parameter.grad.add_(part)
            if not bool(torch.isfinite(pull).all()):
                raise EngineError("the proximal term is not finite; lower the local learning rate")
        return loss
