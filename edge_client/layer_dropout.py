"""Stochastic transformer layer dropout: run a decoder-only model with some layers skipped.

DropPEFT (Wang et al., "Efficient Federated Fine-Tuning of Large Language Models with
Layer Dropout", arXiv 2503.10217) skips each transformer layer of a training step with
its own probability ("stochastic transformer layer dropout"). A skipped layer is the
identity on the residual stream, so nothing of it runs: it costs no compute, keeps no
activations for backward, and its parameters get no gradient on that step.

This module holds the three pure pieces a first-order engine needs:

* :func:`find_decoder_layers` finds the model's list of decoder layers, also through a
  peft wrapper;
* :func:`skip_layers` is a context manager that runs the model without given layers;
* :func:`sample_skipped` draws one step's skipped layers from per-layer probabilities,
  which :func:`layer_probabilities` derives from a (ratio, profile) configuration.

How skipping is made correct (transformers 5.x, checked on ``modeling_llama.py``): the
decoder's forward loops over ``self.layers[: self.config.num_hidden_layers]``, and some
families look up per-layer data by the loop's position (``config.layer_types[i]`` for
Qwen2/Gemma's sliding-window masks) or by the layer's own ``layer_idx`` (the KV cache).
So the layer list is swapped, for the block only, for one of the same length in which
each skipped layer is a parameter-free pass-through: every kept layer stays at its own
index, and no config list needs rewriting. The one index-keyed structure that cannot
survive holes is the KV cache (its length is read from layer 0), so the block runs with
``config.use_cache = False``; a caller who passes a cache explicitly gets
:class:`LayerDropoutError`. Training needs no cache.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "LayerDropoutError",
    "DecoderLayers",
    "PROFILES",
    "find_decoder_layers",
    "skip_layers",
    "sample_skipped",
    "layer_probabilities",
    "validate_probabilities",
]

PROFILES = ("uniform", "linear")
"""Per-layer shapes :func:`layer_probabilities` knows, see there."""

MAX_MIDDLE_PROBABILITY = 0.95
"""The highest drop probability :func:`layer_probabilities` gives a layer between kept ends."""

# Keyword names under which transformers passes a KV cache to a decoder layer (the
# current name, and the one 5.x deprecates).
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


class LayerDropoutError(ValueError):
    """Layer dropout cannot be applied: no recognisable layer list, a bad index or probability."""


@dataclass(frozen=True)
class DecoderLayers:
    """Where a model keeps its decoder layers.

    Attributes:
        model: the transformers model that owns the layers (a peft wrapper removed).
        parent: the module holding the layer list as an attribute.
        attribute: that attribute's name (``layers`` for Llama, ``h`` for GPT-2).
        path: dotted path of the list inside ``model``, e.g. ``model.layers``.
        layers: the list itself.
    """

    model: nn.Module
    parent: nn.Module
    attribute: str
    path: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)


class _SkippedLayer(nn.Module):
    """Stands in for a skipped decoder layer: returns the residual stream unchanged.

    It holds no parameters and no reference to the layer it replaces, so nothing of that
    layer runs or enters the autograd graph. Layers of transformers 5.x return the hidden
    states as a plain tensor, and so does this one.
    """

    def __init__(self, index: int, replaced: nn.Module) -> None:
        super().__init__()
        self.index = index
        # Older transformers releases (4.5x) read ``decoder_layer.attention_type`` in the
        # loop to pick a mask; keep answering it as the replaced layer would.
        if hasattr(replaced, "attention_type"):
            self.attention_type = replaced.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if any(kwargs.get(name) is not None for name in _CACHE_KWARGS):
            raise LayerDropoutError(
                f"layer {self.index} is skipped but a KV cache was passed; "
                "run with use_cache=False while layers are skipped"
            )
        return hidden_states

    def extra_repr(self) -> str:
        return f"index={self.index}"


class _SkippingLayerList(nn.ModuleList):
    """The layer list while :func:`skip_layers` is active (a marker type against nesting)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under any peft wrappers (``PeftModel.get_base_model()``)."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        getter = getattr(model, "get_base_model", None)
        if not callable(getter):
            break
        inner = getter()
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def find_decoder_layers(model: nn.Module) -> DecoderLayers:
    """Finds the decoder-layer list of a decoder-only transformers model.

    The list is the one ``nn.ModuleList`` whose length is ``config.num_hidden_layers``
    and whose entries are all of one class named in the model's ``_no_split_modules``
    (transformers' own name for "a decoder block"), so Llama (``model.layers``), GPT-2
    (``transformer.h``), OPT (``model.decoder.layers``) and the like are found without
    a table of paths.

    Args:
        model: a transformers model, or a peft wrapper around one.

    Returns:
        Where the layers live.

    Raises:
        LayerDropoutError: no config with ``num_hidden_layers``, no list or more than one
            list matches, or the model is already inside :func:`skip_layers`.
    """
    base = _unwrap(model)
    config = getattr(base, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
        raise LayerDropoutError(
            f"{type(base).__name__} has no config.num_hidden_layers; layer dropout needs a "
            "decoder-only transformers model"
        )
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    matches: list[tuple[str, nn.ModuleList]] = []
    for path, module in base.named_modules():
        if isinstance(module, _SkippingLayerList):
            raise LayerDropoutError(f"{path} is already being skipped; skip_layers does not nest")
        if not isinstance(module, nn.ModuleList) or len(module) != num_layers:
            continue
        kinds = {type(layer).__name__ for layer in module}
        if len(kinds) == 1 and (not block_names or kinds <= block_names):
            matches.append((path, module))
    if len(matches) != 1:
        found = ", ".join(path for path, _ in matches) or "none"
        raise LayerDropoutError(
            f"{type(base).__name__}: expected one list of {num_layers} decoder layers "
            f"({', '.join(sorted(block_names)) or 'any block class'}), found {found}"
        )
    path, layers = matches[0]
    parent_path, _, attribute = path.rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    return DecoderLayers(model=base, parent=parent, attribute=attribute, path=path, layers=layers)


def _check_indices(skipped: Collection[int], num_layers: int) -> frozenset[int]:
    indices = frozenset(skipped)
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers:
            raise LayerDropoutError(f"skipped layer {index!r} is not an index in [0, {num_layers})")
    return indices


@contextmanager
def skip_layers(model: nn.Module, skipped: Collection[int]) -> Iterator[tuple[int, ...]]:
    """Runs ``model`` without the layers ``skipped`` for the duration of the block.

    Inside the block each skipped layer is the identity on the residual stream: none of
    its modules run (no compute, no saved activations), so after backward its
    parameters' ``.grad`` stay ``None``. ``config.use_cache`` is ``False`` inside the
    block (see the module docstring). Everything is restored on exit, also when the
    block raises. Not thread-safe, and not reentrant: the model is changed in place.

    Hooks registered on a skipped layer do not fire, and ``output_hidden_states``
    reports one entry per *kept* layer.

    Args:
        model: a decoder-only transformers model, or a peft wrapper around one.
        skipped: indices of the layers to skip; may be empty (nothing changes) or all.

    Yields:
        The skipped indices, ascending.

    Raises:
        LayerDropoutError: no recognisable layer list, an index out of range, nesting, or
            (from the forward) an explicit KV cache while layers are skipped.
    """
    found = find_decoder_layers(model)
    indices = _check_indices(skipped, len(found))
    ordered = tuple(sorted(indices))
    if not indices:
        yield ordered
        return
    original = found.layers
    replacement = _SkippingLayerList(
        _SkippedLayer(i, layer) if i in indices else layer for i, layer in enumerate(original)
    )
    config = found.model.config
    has_use_cache = hasattr(config, "use_cache")
    previous_use_cache = getattr(config, "use_cache", None)
    setattr(found.parent, found.attribute, replacement)
    try:
        if has_use_cache:
            config.use_cache = False
        yield ordered
    finally:
        # Registered modules are replaced in place in ``_modules``, so the restored list
        # keeps its position and the state dict's order is unchanged.
        setattr(found.parent, found.attribute, original)
        if has_use_cache:
            config.use_cache = previous_use_cache


def validate_probabilities(drop_probabilities: Sequence[float]) -> tuple[float, ...]:
    """Checks per-layer drop probabilities: at least one, each finite and in ``[0, 1)``.

    1 is excluded because a layer that is never kept would never train, which is not
    dropout but removal; remove it from the scope instead.

    Returns:
        The probabilities as a tuple of floats.

    Raises:
        LayerDropoutError: naming the first bad entry.
    """
    if len(drop_probabilities) == 0:
        raise LayerDropoutError("drop_probabilities is empty; give one per decoder layer")
    values: list[float] = []
    for i, p in enumerate(drop_probabilities):
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise LayerDropoutError(f"drop_probabilities[{i}] = {p!r} is not a number")
        p = float(p)
        if not (math.isfinite(p) and 0.0 <= p < 1.0):
            raise LayerDropoutError(f"drop_probabilities[{i}] = {p!r} is not in [0, 1)")
        values.append(p)
    return tuple(values)


def sample_skipped(
    drop_probabilities: Sequence[float],
    generator: random.Random,
    *,
    min_kept: int = 1,
) -> tuple[int, ...]:
    """Draws one step's skipped layers: layer ``l`` is skipped with probability ``p_l``.

    Layers are drawn independently, and exactly one ``generator.random()`` is consumed
    per layer whatever the outcome, so a seeded generator gives the same sequence of
    skip sets on every client and after every resume.

    ``min_kept`` guards against a degenerate step (with every layer skipped the model is
    embedding -> head, and LoRA adapters get no gradient at all): when fewer layers are
    kept, the skipped layers with the lowest drop probability are put back (the
    shallower first on ties) until ``min_kept`` are kept. This biases skip rates down by
    at most P(fewer than ``min_kept`` kept), which is tiny for realistic depths; pass
    ``min_kept=0`` for the exact independent draw.

    Args:
        drop_probabilities: one probability in ``[0, 1)`` per decoder layer.
        generator: the source of randomness (a seeded ``random.Random``).
        min_kept: at least this many layers are kept, in ``[0, num_layers]``.

    Returns:
        The skipped layer indices, ascending.

    Raises:
        LayerDropoutError: a bad probability or ``min_kept``.
    """
    probabilities = validate_probabilities(drop_probabilities)
    num_layers = len(probabilities)
    if isinstance(min_kept, bool) or not isinstance(min_kept, int) or not 0 <= min_kept <= num_layers:
        raise LayerDropoutError(f"min_kept = {min_kept!r} is not in [0, {num_layers}]")
    skipped = [i for i, p in enumerate(probabilities) if generator.random() < p]
    shortfall = min_kept - (num_layers - len(skipped))
    if shortfall > 0:
        restore = sorted(skipped, key=lambda i: (probabilities[i], i))[:shortfall]
        skipped = [i for i in skipped if i not in restore]
    return tuple(skipped)


def layer_probabilities(ratio: float, num_layers: int, profile: str = "uniform", *, keep_first: int = 0,
                        keep_last: int = 0) -> tuple[float, ...]:
    """Turns a dropout configuration (overall ratio, per-layer profile) into probabilities.

    DropPEFT configures a device by how much of the model it drops and how the drops
    spread over depth; the expected number of skipped layers is ``ratio * num_layers``
    for every profile (the probabilities' mean is ``ratio``), so configurations with the
    same ratio cost about the same compute and differ only in where they drop.

    * ``uniform``: every layer ``ratio``.
    * ``linear``: the drop probability grows linearly with depth, so shallow layers,
      whose output every later layer builds on, are dropped least. It is the steepest
      linear ramp over depth ``t`` in ``[0, 1]`` that stays a probability with mean
      ``ratio``: from 0 to ``2 * ratio`` when ``ratio <= 1/2``, from ``2 * ratio - 1``
      to 1 above, read at each layer's midpoint ``t_l = (l + 1/2) / num_layers``.
      Midpoints keep the mean exact and every value below 1 (the last is
      ``1 - (1 - ratio) / num_layers`` at most).

    ``keep_first`` and ``keep_last`` layers at the ends are never dropped (probability 0)
    and the profile spreads the same expected number of drops, ``ratio * num_layers``,
    over the layers between them, each at most :data:`MAX_MIDDLE_PROBABILITY` (a ratio
    beyond what that allows drops fewer). Why keep the ends: on SmolLM2-135M, skipping
    layer 0, 1 or 29 alone raises a batch's loss from 2.62 to 12.7, 7.2 and 10.0, any
    other single layer to 3.9 at most, and first-order steps taken on networks without
    them wreck the full one (``bench/layer_sensitivity.py``, result in
    ``bench/results/layer_sensitivity.json``).

    Args:
        ratio: the mean drop probability, in ``[0, 1)``.
        num_layers: number of decoder layers, >= 1.
        profile: one of :data:`PROFILES`.
        keep_first, keep_last: layers at the start and the end never dropped (>= 0).

    Returns:
        One probability in ``[0, 1)`` per layer, shallowest first.

    Raises:
        LayerDropoutError: a bad ratio, layer count or profile.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (
        math.isfinite(ratio) and 0.0 <= ratio < 1.0
    ):
        raise LayerDropoutError(f"ratio = {ratio!r} is not in [0, 1)")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise LayerDropoutError(f"num_layers = {num_layers!r} is not an integer >= 1")
    ratio = float(ratio)
    for name, value in (("keep_first", keep_first), ("keep_last", keep_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LayerDropoutError(f"{name} = {value!r} is not an integer >= 0")
    if profile not in PROFILES:
        raise LayerDropoutError(f"profile = {profile!r} is not one of {', '.join(PROFILES)}")
    middle = num_layers - keep_first - keep_last
    if middle <= 0:
        return (0.0,) * num_layers
    if middle < num_layers:
        ratio = min(ratio * num_layers / middle, MAX_MIDDLE_PROBABILITY)
    if profile == "uniform":
        values = [ratio] * middle
    else:
        # f(t) = ratio + slope * (t - 1/2), slope as large as 0 <= f <= 1 allows.
        slope = 2.0 * min(ratio, 1.0 - ratio)
        values = [ratio + slope * ((l + 0.5) / middle - 0.5) for l in range(middle)]
        # Rounding can leave a value a hair outside [0, 1) at the ends; pull it in.
        values = [min(max(v, 0.0), math.nextafter(1.0, 0.0)) for v in values]
    return (0.0,) * keep_first + tuple(values) + (0.0,) * keep_last
