"""Parameter scopes: which parameters a federation trains, and their canonical names.

PROTOCOL.md §5.1 defines the canonical name of each trainable parameter, because the
order of the parameter space (ascending name) must be the same on every client:

* ``full``: every parameter of the causal LM under its Hugging Face state-dict name
  (tied weights once, under the first name ``named_parameters()`` yields).
* ``lora``: only LoRA adapter matrices, named as the wrapped model's parameter with
  peft's ``base_model.model.`` prefix and the ``.default`` adapter name removed, e.g.
  ``model.layers.0.self_attn.q_proj.lora_A.weight``. Adapters start from a seed-defined
  value (below), not from torch's RNG, so every client starts bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from edge_client.space import Distribution, ParameterSpace
from protocol.perturb import Backend, rademacher_tensor
from protocol.table import fl32

__all__ = ["ScopeError", "ScopeConfig", "build_space"]

_PEFT_PREFIX = "base_model.model."
_ADAPTER = ".default"


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
    """

    kind: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = field(default=("q_proj", "v_proj"))
    lora_init_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("full", "lora"):
            raise ValueError(f"scope.kind must be 'full' or 'lora', got {self.kind!r}")
        if self.kind == "lora":
            if self.lora_rank <= 0:
                raise ValueError(f"scope.lora_rank must be > 0, got {self.lora_rank}")
            if not self.lora_targets:
                raise ValueError("scope.lora_targets must name at least one module")


def _canonical_lora_name(name: str) -> str:
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name.replace(_ADAPTER + ".", ".")


def build_space(
    model: torch.nn.Module,
    scope: ScopeConfig,
    *,
    distribution: Distribution = "rademacher",
    backend: Backend = "auto",
) -> tuple[torch.nn.Module, ParameterSpace]:
    """Apply the scope to a loaded model and return (model, its parameter space).

    For ``lora`` the returned model is the peft-wrapped one. Parameters outside the
    scope are frozen (``requires_grad=False``; zeroth-order training needs no autograd
    anyway, but first-order engines rely on it).

    Raises:
        ScopeError: the scope matches nothing, or the full scope meets a non-float32 model.
    """
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
    config = LoraConfig(
        r=scope.lora_rank,
        lora_alpha=scope.lora_alpha,
        target_modules=list(scope.lora_targets),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,  # overwritten below with the seed-defined value
    )
    wrapped = get_peft_model(model, config)
    named = []
    for name, param in wrapped.named_parameters():
        if "lora_" in name:
            named.append((_canonical_lora_name(name), param))
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
