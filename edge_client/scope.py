"""Parameter scopes: which parameters a federation trains, and their canonical names.

PROTOCOL.md §5.1 defines the canonical name of each trainable parameter, because the
order of the parameter space (ascending name) must be the same on every client:

* ``full``: every parameter of the causal LM under its Hugging Face state-dict name
  (tied weights once, under the first name ``named_parameters()`` yields).
* ``lora``: only LoRA adapter matrices, named as the wrapped model's parameter with
  peft's ``base_model.model.`` prefix and the ``.default`` adapter name removed, e.g.
  ``model.layers.0.self_attn.q_proj.lora_A.weight``. Adapters start from a seed-defined
  value (below), not from torch's RNG, so every client starts bit-identical.

A ``lora`` scope may be restricted to some decoder layers (``lora_layers``, indices in the
full model), e.g. FedBiOT's adapter, the last few layers. A model whose decoder layers
are numbered otherwise than the full model's (the FedBiOT emulator keeps a subset of
them) builds the same space by giving :func:`build_space` a ``layer_map`` from its own
layer indices to the full model's: its adapters are named, ordered and initialised as
the full model's, so every client holds the same space bit for bit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from edge_client.space import Distribution, ParameterSpace
from protocol.perturb import Backend, rademacher_tensor
from protocol.table import fl32

__all__ = ["ScopeError", "ScopeConfig", "build_space"]

_PEFT_PREFIX = "base_model.model."
_ADAPTER = ".default"
# A decoder layer's number in a parameter name (Llama: model.layers.<i>.…).
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


class ScopeError(ValueError):
    """The requested scope cannot be built on this model."""


@dataclass(frozen=True)
class ScopeConfig:
    """Which parameters train.

    Attributes:
        kind: "full" (every parameter) or "lora" (adapters only; the base is frozen).
        lora_rank: LoRA rank r (lora only).
        lora_alpha: LoRA scaling numerator; the adapter output is scaled by alpha / r.
        lora_targets: module names to adapt (lora only).
        lora_init_seed: seed of the adapters' initial value (lora only).
        lora_layers: the decoder layers, as full-model indices, whose target modules get
            adapters (lora only); () (the default): every layer.
    """

    kind: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = field(default=("q_proj", "v_proj"))
    lora_init_seed: int = 0
    lora_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("full", "lora"):
            raise ValueError(f"scope.kind must be 'full' or 'lora', got {self.kind!r}")
        if self.kind == "lora":
            if self.lora_rank <= 0:
                raise ValueError(f"scope.lora_rank must be > 0, got {self.lora_rank}")
            if not self.lora_targets:
                raise ValueError("scope.lora_targets must name at least one module")
        if self.lora_layers:
            if self.kind != "lora":
                raise ValueError("scope.lora_layers restricts a lora scope; the full scope has no layers to pick")
            if list(self.lora_layers) != sorted(set(self.lora_layers)) or min(self.lora_layers) < 0:
                raise ValueError(f"scope.lora_layers must be distinct ascending indices >= 0, got {self.lora_layers}")


def _canonical_lora_name(name: str, layer_map: Mapping[int, int] | None = None) -> str:
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    name = name.replace(_ADAPTER + ".", ".")
    if layer_map is not None:
        match = _LAYER.search(name)
        if match is None or int(match.group(2)) not in layer_map:
            raise ScopeError(f"adapter {name!r} is on no decoder layer the layer map names")
        start, end = match.span(2)
        name = f"{name[:start]}{layer_map[int(match.group(2))]}{name[end:]}"
    return name


def _decoder_layer_count(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if isinstance(count, int) and count > 0:
        return count
    numbers = {int(m.group(2)) for name, _ in model.named_modules() if (m := _LAYER.search(name + "."))}
    return max(numbers) + 1 if numbers else 0


def build_space(
    model: torch.nn.Module,
    scope: ScopeConfig,
    *,
    distribution: Distribution = "rademacher",
    backend: Backend = "auto",
    layer_map: Mapping[int, int] | None = None,
) -> tuple[torch.nn.Module, ParameterSpace]:
    """Apply the scope to a loaded model and return (model, its parameter space).

    For ``lora`` the returned model is the peft-wrapped one. Parameters outside the
    scope are frozen (``requires_grad=False``; zeroth-order training needs no autograd
    anyway, but first-order engines rely on it).

    Args:
        layer_map: for a model whose decoder layers are a renumbered subset of the full
            model's (the FedBiOT emulator): ``{layer index in model: index in the full
            model}``. Adapters go on the model's layers that map into
            ``scope.lora_layers`` (which must then be given, and all be mapped), and are
            named (and so ordered and initialised) by their full-model index. None: the
            model is the full model.

    Raises:
        ScopeError: the scope matches nothing, names layers the model lacks, or the full
            scope meets a non-float32 model or a layer map.
    """
    if layer_map is not None and scope.kind != "lora":
        raise ScopeError("a model holding only some of the full model's layers can train a lora scope only")
    if scope.kind == "full":
        named = list(model.named_parameters())
        for name, param in named:
            if param.dtype != torch.float32:
                raise ScopeError(
                    f"full-parameter scope needs a float32 model, but {name} is {param.dtype}; "
                    "load the model in float32 or choose the lora scope"
                )
        space = ParameterSpace.adopt(named, distribution=distribution, backend=backend)
        return model, space

    from peft import LoraConfig, get_peft_model  # heavy import only for this scope

    available = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in scope.lora_targets if t not in available]
    if missing:
        raise ScopeError(f"LoRA target modules {missing} not found in the model")
    layers_to_transform: list[int] | None = None
    if layer_map is not None:
        if not scope.lora_layers:
            raise ScopeError("this model holds only some of the full model's layers (full-model layers "
                             f"{sorted(layer_map.values())}), but the federation's lora scope adapts every layer; "
                             "the federation must restrict it to the adapter layers (lora_layers)")
        if len(set(layer_map.values())) != len(layer_map):
            raise ScopeError(f"the layer map {dict(layer_map)} sends two layers to one")
        inverse = {full: own for own, full in layer_map.items()}
        absent = [layer for layer in scope.lora_layers if layer not in inverse]
        if absent:
            raise ScopeError(f"the federation adapts full-model layers {list(scope.lora_layers)}, but this model "
                             f"holds only {sorted(inverse)}: {absent} are missing")
        layers_to_transform = [inverse[layer] for layer in scope.lora_layers]
    elif scope.lora_layers:
        count = _decoder_layer_count(model)
        beyond = [layer for layer in scope.lora_layers if layer >= count]
        if beyond:
            raise ScopeError(f"the lora scope adapts layers {beyond}, but the model has {count} decoder layers")
        layers_to_transform = list(scope.lora_layers)
    config = LoraConfig(
        r=scope.lora_rank,
        lora_alpha=scope.lora_alpha,
        target_modules=list(scope.lora_targets),
        layers_to_transform=sorted(layers_to_transform) if layers_to_transform is not None else None,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,  # overwritten below with the seed-defined value
    )
    wrapped = get_peft_model(model, config)
    named = []
    for name, param in wrapped.named_parameters():
        if "lora_" in name:
            named.append((_canonical_lora_name(name, layer_map), param))
    if not named:
        raise ScopeError("the lora scope put no adapter on this model")
    with torch.no_grad():
        for _, param in named:
            param.data = param.data.to(torch.float32)
    space = ParameterSpace.adopt(named, distribution=distribution, backend=backend)
    initialise_lora(space, scope.lora_init_seed)
    return wrapped, space


def initialise_lora(space: ParameterSpace, seed: int) -> None:
    """Seed-defined LoRA start: ``A = z(seed) * fl32(1/sqrt(in_features))``, ``B = 0``.

    ``z`` is the Rademacher direction of ``seed`` over the whole LoRA space (so A's
    elements take the signs at their own positions); B = 0 makes the adapted model equal
    the base model at round 0, as in the LoRA paper.
    """
    signs = rademacher_tensor(seed, space.numel)
    values = torch.zeros(space.numel, dtype=torch.float32)
    for entry in space.entries:
        if ".lora_A." in entry.name:
            in_features = entry.shape[-1]
            scale = fl32(1.0 / math.sqrt(in_features))
            segment = slice(entry.offset, entry.offset + entry.numel)
            values[segment] = signs[segment] * scale
        elif ".lora_B." not in entry.name:
            raise ScopeError(f"unexpected parameter {entry.name!r} in a LoRA scope")
    space.load(values)
