"""The FedBiOT emulator: a layer-dropped, distillation-aligned stand-in for the full model.

FedBiOT (Wu et al., "FedBiOT: LLM Local Fine-tuning in Federated Learning without Full
Model", arXiv 2406.17706) splits a decoder-only LM into two parts:

* the **adapter**: the last ``k`` decoder layers (plus the final norm and output head),
  kept intact; clients fine-tune it and it plugs back into the full model;
* the **emulator**: everything below the adapter, compressed by dropping decoder layers,
  and aligned to the full model by the server so that the adapter sees, at its input,
  hidden states close to the ones the full model would give it.

This module holds the first slice of that work, run once by whoever hosts a federation
(never inside the coordinator, which never loads a model):

* :func:`plan_emulator` decides which layers the emulator keeps;
* :func:`build_emulator` builds the emulator as a real Hugging Face model of the full
  model's class, aligns its compressed part by distillation on public records (FedBiOT's
  server step) and writes it atomically as a safetensors directory plus
  ``emulator.json``;
* :func:`load_emulator` loads it back, checking the manifest and the weights' hash,
  either as stored (float32) or, for a client short of memory, with its frozen part
  quantised by bitsandbytes (nf4 or int8, :mod:`edge_client.quantize`) and its adapter
  layers, final norm and output head float32 and exactly as stored;
* :func:`public_records` is the default public data: a slice of the shipped dataset
  that ``edgefed-local`` (with its defaults) neither hands to a client nor evaluates on.

The alignment loss (see :func:`build_emulator`) is the sum of an L2 term on the
layer-normalised hidden states entering the adapter and a KL term between the full
model's and the emulator's next-token distributions; the emulator's embeddings, adapter
layers, final norm and output head stay frozen, so only the kept compressed layers move.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from edge_client.data import (
    Batch,
    DataError,
    Example,
    PromptFormat,
    Record,
    collate,
    prompt_ids,
    records_from,
    resolve_prompt_format,
)
from edge_client.layer_dropout import LayerDropoutError, find_decoder_layers
from edge_client.model import ModelLoadError, base_weights_hash, load_model, resolve_model
from edge_client.quantize import (
    QUANTIZATIONS,
    bnb_config,
    prepare_quantized,
    quantization_support,
    quantized_linears,
)
from edge_client.splits import split_records

__all__ = [
    "DEFAULT_ADAPTER_LAYERS",
    "DEFAULT_DROP_RATIO",
    "DEFAULT_EVAL_RECORDS",
    "EMULATOR_FORMAT",
    "MANIFEST_FILE",
    "PUBLIC_SPLIT",
    "QUANTIZATIONS",
    "SHIPPED_DATA",
    "EmulatorError",
    "EmulatorLoadError",
    "EmulatorPlan",
    "alignment_loss",
    "build_emulator",
    "load_emulator",
    "plan_emulator",
    "public_records",
    "quantization_support",
    "read_manifest",
    "stored_weights_hash",
]

logger = logging.getLogger(__name__)

EMULATOR_FORMAT = 1
"""Version of the emulator directory layout and of ``emulator.json``."""

MANIFEST_FILE = "emulator.json"
"""The manifest's file name inside an emulator directory."""

DEFAULT_ADAPTER_LAYERS = 2
"""Decoder layers at the top kept intact as the adapter (FedBiOT's configs use 2 to 4)."""

DEFAULT_DROP_RATIO = 0.5
"""Share of the compressed range's layers that the emulator drops."""

DEFAULT_EVAL_RECORDS = 16
"""Records held aside from the alignment data to measure the loss before and after."""

SHIPPED_DATA = Path(__file__).resolve().parent / "datasets" / "instructions.jsonl"
"""The dataset shipped with edgefed (the same file ``edgefed-local`` splits)."""

PUBLIC_SPLIT: dict[str, Any] = {
    "clients": 3,
    "heldout": 64,
    "per_client": 200,
    "scheme": "iid",
    "alpha": 0.5,
    "seed": 0,
}
"""The :func:`~edge_client.splits.split_records` arguments ``edgefed-local`` uses by
default (``--clients``, ``--heldout``, ``--records-per-client``, ``--split``,
``--alpha``; its seed is fixed at 0). :func:`public_records` takes the records this split
leaves unused; a test checks these values against ``edgefed-local``'s parser."""

# Keys of the manifest that load_emulator relies on, with the JSON types they must have.
_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "base_model_hash": str,
    "emulator_hash": str,
    "kept_layers": list,
    "adapter_layers": list,
    "emulator_adapter_layers": list,
    "drop_ratio": (int, float),
    "num_layers_full": int,
    "alignment_loss_before": (int, float),
    "alignment_loss_after": (int, float),
}

# Config attributes that hold one entry per decoder layer and must follow the kept
# layers (Qwen2/Gemma sliding-window layer kinds; SmolLM3's NoPE layers).
_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")

ProgressFn = Callable[[int, int, float], None]
StageFn = Callable[[str], None]


class EmulatorError(ValueError):
    """An emulator cannot be planned or built from the given arguments."""


class EmulatorLoadError(ModelLoadError):
    """An emulator directory is missing, malformed, tampered with or for another model."""


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class EmulatorPlan:
    """Which of the full model's decoder layers the emulator keeps.

    Attributes:
        num_layers: The full model's decoder layer count ``L``.
        kept_layers: Original indices of every layer the emulator keeps, ascending: the
            kept part of the compressed range, then the adapter layers.
        adapter_layers: Original indices of the adapter layers (the last ``k``).
    """

    num_layers: int
    kept_layers: tuple[int, ...]
    adapter_layers: tuple[int, ...]

    @property
    def compressed_range(self) -> tuple[int, ...]:
        """Original indices of the layers below the adapter (``0 .. L-k-1``)."""
        return tuple(range(self.num_layers - len(self.adapter_layers)))

    @property
    def compressed_kept(self) -> tuple[int, ...]:
        """Original indices of the kept layers below the adapter (the trained part)."""
        return self.kept_layers[: len(self.kept_layers) - len(self.adapter_layers)]

    @property
    def dropped_layers(self) -> tuple[int, ...]:
        """Original indices of the layers the emulator leaves out."""
        kept = set(self.kept_layers)
        return tuple(i for i in range(self.num_layers) if i not in kept)

    @property
    def emulator_adapter_layers(self) -> tuple[int, ...]:
        """Indices of the adapter layers inside the emulator (its last ``k`` layers)."""
        n = len(self.kept_layers)
        return tuple(range(n - len(self.adapter_layers), n))


def plan_emulator(
    num_layers: int,
    *,
    adapter_layers: int = DEFAULT_ADAPTER_LAYERS,
    drop_ratio: float = DEFAULT_DROP_RATIO,
) -> EmulatorPlan:
    """Plans the emulator's layers: the adapter intact, the rest uniformly thinned.

    The compressed range is layers ``0 .. n-1`` with ``n = num_layers - adapter_layers``.
    ``d = round(drop_ratio * n)`` of them are dropped (halves round up, so the plan does
    not depend on Python's round-half-to-even), always keeping the first and the last
    layer of the range: the first turns embeddings into the residual stream every later
    layer expects, and the last is what feeds the adapter. The ``m = n - d`` kept layers
    are spread evenly over the range, at ``round(i * (n-1) / (m-1))`` for
    ``i = 0 .. m-1``. The plan is a pure function of its arguments.

    Args:
        num_layers: The full model's decoder layer count, at least 2.
        adapter_layers: ``k``, the last decoder layers kept intact as the adapter; in
            ``[1, num_layers - 1]`` so that something is left to compress.
        drop_ratio: ``r`` in ``[0, 1)``.

    Returns:
        The plan.

    Raises:
        EmulatorError: An argument is out of range, or ``r`` asks to drop more than the
            ``n - 2`` layers between the range's first and last.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise EmulatorError(f"the model must have at least 2 decoder layers, got {num_layers!r}")
    _check_drop_ratio(drop_ratio)
    if (
        isinstance(adapter_layers, bool)
        or not isinstance(adapter_layers, int)
        or not 1 <= adapter_layers <= num_layers - 1
    ):
        raise EmulatorError(
            f"adapter layers must be an integer in [1, {num_layers - 1}] for a model of "
            f"{num_layers} decoder layers (at least one layer must stay below the adapter), "
            f"got {adapter_layers!r}"
        )

    n = num_layers - adapter_layers
    drop = math.floor(drop_ratio * n + 0.5)
    max_drop = max(0, n - 2)
    if drop > max_drop:
        raise EmulatorError(
            f"drop ratio {drop_ratio} drops {drop} of the {n} layers below the adapter, but at "
            f"most {max_drop} can go (the first and last of that range are always kept); "
            f"use a ratio below {(max_drop + 0.5) / n:.3g} or fewer adapter layers"
        )
    keep = n - drop
    if keep == 1:
        compressed = [0]
    else:
        # Exact half-up rounding of i * (n-1) / (keep-1) in integers; consecutive values
        # are at least 1 apart before rounding, so the indices are distinct.
        compressed = [(2 * i * (n - 1) + (keep - 1)) // (2 * (keep - 1)) for i in range(keep)]
    adapter = tuple(range(n, num_layers))
    return EmulatorPlan(
        num_layers=num_layers, kept_layers=(*compressed, *adapter), adapter_layers=adapter
    )


def _check_drop_ratio(drop_ratio: Any) -> None:
    if (
        isinstance(drop_ratio, bool)
        or not isinstance(drop_ratio, (int, float))
        or not math.isfinite(drop_ratio)
        or not 0.0 <= drop_ratio < 1.0
    ):
        raise EmulatorError(f"drop ratio must be a number in [0, 1), got {drop_ratio!r}")


# --------------------------------------------------------------------------- data


def public_records(path: str | os.PathLike[str] = SHIPPED_DATA) -> list[Record]:
    """The public alignment records: those ``edgefed-local``'s default split leaves unused.

    ``edgefed-local`` splits the shipped dataset with :data:`PUBLIC_SPLIT` (64 held-out
    evaluation records, then 3 clients of 200 records each, IID, seed 0); the remaining
    records (1,528 of the shipped 2,192) are what no client trains on and the evaluator
    never scores. They are returned in file order. The held-out set depends only on the
    records, its size and the seed, so these records never overlap it; they are disjoint
    from the clients' shares only for a federation run with those defaults (more clients
    or a larger ``--records-per-client`` deal clients records from this pool).

    Args:
        path: A JSONL file of ``{"family", "instruction", "response"}`` objects.

    Returns:
        The records (their ``line`` is the 1-based line in ``path``).

    Raises:
        DataError: The file cannot be read or parsed, or leaves no public record.
    """
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the public data {str(path)!r}: {e}") from e
    objects: list[dict[str, Any]] = []
    lines: dict[int, int] = {}  # id(object) -> line, to keep line numbers through the split
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        objects.append(obj)
        lines[id(obj)] = number
    try:
        split = split_records(objects, **PUBLIC_SPLIT)
    except ValueError as e:
        raise DataError(f"cannot split {str(path)!r} as edgefed-local does: {e}") from e
    if not split.unused:
        raise DataError(
            f"{str(path)!r} leaves no public records: edgefed-local's default split uses all of them"
        )
    unused = sorted(split.unused, key=lambda obj: lines[id(obj)])
    records, _ = records_from(unused)
    # records_from numbers records by position; give them back their file lines.
    return [
        Record(instruction=r.instruction, response=r.response, line=lines[id(unused[r.line - 1])])
        for r in records
    ]


def _distill_examples(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    prompt_format: PromptFormat,
) -> list[Example]:
    """Token ids of prompt + response + eos per record, cut to ``max_seq_len``.

    The same ids :func:`~edge_client.data.tokenize` gives clients, but a record whose
    prompt alone fills ``max_seq_len`` is kept rather than dropped: distillation matches
    the two models on every real token, so a prompt is as useful as a response. Labels
    are unused here and simply mirror the ids.
    """
    eos_id = tokenizer.eos_token_id
    examples: list[Example] = []
    for record in records:
        ids = prompt_ids(record.instruction, tokenizer, prompt_format)
        ids += list(tokenizer(record.response, add_special_tokens=False)["input_ids"])
        if eos_id is not None:
            ids.append(eos_id)
        ids = ids[:max_seq_len]
        examples.append(Example(input_ids=ids, labels=list(ids)))
    return examples


def _records_digest(records: Sequence[Record]) -> str:
    """SHA-256 over the records' text, so a manifest pins exactly which data aligned it."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.instruction, record.response]).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------- model surgery


def _make_emulator(full: PreTrainedModel, plan: EmulatorPlan) -> PreTrainedModel:
    """A new model of ``full``'s class holding only the planned layers, copied from ``full``.

    Built from a config whose ``num_hidden_layers`` is the kept count (and whose per-layer
    lists follow the kept layers), so it saves and loads as an ordinary Hugging Face model
    and nothing at run time needs to know layers were dropped. The state dict is renamed
    layer by layer and loaded strictly: a missing or unexpected tensor is an error, never a
    silently random weight.
    """
    layers = find_decoder_layers(full)
    config = copy.deepcopy(full.config)
    config.num_hidden_layers = len(plan.kept_layers)
    for name in _PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == plan.num_layers:
            setattr(config, name, [values[i] for i in plan.kept_layers])

    # The random init is thrown away (every tensor is overwritten below); fork the RNG so
    # building an emulator does not move the caller's torch random state.
    model_class: type[PreTrainedModel] = type(full)
    with torch.random.fork_rng(devices=[]):
        emulator = model_class(config)
    emulator.to(dtype=next(full.parameters()).dtype)

    prefix = layers.path + "."
    new_index = {old: new for new, old in enumerate(plan.kept_layers)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in full.state_dict().items():
        if key.startswith(prefix):
            index_text, _, rest = key[len(prefix) :].partition(".")
            old = int(index_text)
            if old not in new_index:
                continue
            key = f"{prefix}{new_index[old]}.{rest}"
        state[key] = tensor.detach().clone()
    emulator.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        emulator.tie_weights()
    emulator.eval()
    emulator.requires_grad_(False)
    return emulator


# --------------------------------------------------------------------------- alignment loss


class _BoundaryCapture:
    """Records the hidden states entering one decoder layer (the adapter's first).

    A forward pre-hook rather than ``output_hidden_states``: what a model returns there
    (e.g. whether the last entry is normalised) varies between transformers releases,
    whereas a layer's input is unambiguous.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.hidden: torch.Tensor | None = None
        self._handle = layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.hidden = args[0] if args else kwargs["hidden_states"]

    def take(self) -> torch.Tensor:
        if self.hidden is None:
            raise EmulatorError("the adapter's first layer did not run; cannot align")
        hidden, self.hidden = self.hidden, None
        return hidden

    def remove(self) -> None:
        self._handle.remove()


def _head_logits(model: PreTrainedModel, rows: torch.Tensor) -> torch.Tensor:
    """The output head on selected final hidden rows, with the config's logit transforms.

    Mirrors :func:`edge_client.loss.causal_lm_loss`: the head is applied to the counted
    rows only, so no ``(B, T, vocab)`` tensor of padding logits is built.
    """
    logits = model.get_output_embeddings()(rows).float()
    config = model.config
    if (scale := getattr(config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (scaling := getattr(config, "logits_scaling", None)) is not None:
        logits = logits / scaling
    if (softcap := getattr(config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _boundary_and_logits(
    model: PreTrainedModel, capture: _BoundaryCapture, batch: Batch, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``model`` on ``batch``; returns (boundary rows, logits rows) at ``mask``."""
    outputs = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    final = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    boundary = capture.take()[mask]
    return boundary, _head_logits(model, final[mask])


def alignment_loss(
    teacher: tuple[torch.Tensor, torch.Tensor],
    student: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedBiOT's alignment terms from (boundary rows, logits rows) of both models.

    Args:
        teacher: The full model's hidden states entering the adapter and its logits,
            one row per counted token (``(N, H)`` and ``(N, V)``).
        student: The emulator's, same rows.

    Returns:
        ``(l2, kl)``: the mean squared error between the two boundary states after a
        parameter-free layer norm over the hidden dimension (normalising makes the term
        insensitive to the residual stream's scale, which grows with depth and differs
        between the full model and a thinned one), and ``KL(full || emulator)`` of the
        next-token distributions, averaged over the rows.
    """
    t_hidden, t_logits = teacher
    s_hidden, s_logits = student
    width = t_hidden.shape[-1]
    l2 = F.mse_loss(
        F.layer_norm(s_hidden.float(), (width,)), F.layer_norm(t_hidden.float(), (width,))
    )
    kl = F.kl_div(
        torch.log_softmax(s_logits, dim=-1),
        torch.log_softmax(t_logits, dim=-1),
        log_target=True,
        reduction="sum",
    ) / max(1, s_logits.shape[0])
    return l2, kl


class _Aligner:
    """The full model and the emulator side by side, with their boundary hooks."""

    def __init__(self, full: PreTrainedModel, emulator: PreTrainedModel, plan: EmulatorPlan):
        self.full = full
        self.emulator = emulator
        first_adapter = plan.adapter_layers[0]
        self._full_capture = _BoundaryCapture(find_decoder_layers(full).layers[first_adapter])
        self._emu_capture = _BoundaryCapture(
            find_decoder_layers(emulator).layers[plan.emulator_adapter_layers[0]]
        )

    def terms(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(l2, kl, tokens)`` on ``batch``; differentiable through the emulator."""
        mask = batch.attention_mask.bool()
        with torch.no_grad():
            teacher = _boundary_and_logits(self.full, self._full_capture, batch, mask)
        student = _boundary_and_logits(self.emulator, self._emu_capture, batch, mask)
        l2, kl = alignment_loss(teacher, student)
        return l2, kl, int(mask.sum())

    def evaluate(self, batches: Sequence[Batch]) -> float:
        """Token-weighted mean of ``l2 + kl`` over fixed batches, without gradients."""
        total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                l2, kl, n = self.terms(batch)
                total += float(l2 + kl) * n
                tokens += n
        return total / max(1, tokens)

    def close(self) -> None:
        self._full_capture.remove()
        self._emu_capture.remove()


# --------------------------------------------------------------------------- build


def _check_positive_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EmulatorError(f"{name} must be an integer >= {minimum}, got {value!r}")


def build_emulator(
    model_source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    adapter_layers: int = DEFAULT_ADAPTER_LAYERS,
    drop_ratio: float = DEFAULT_DROP_RATIO,
    records: Sequence[Record] | None = None,
    steps: int = 200,
    learning_rate: float = 1e-4,
    batch_size: int = 4,
    max_seq_len: int = 96,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    eval_records: int = DEFAULT_EVAL_RECORDS,
    prompt_format: str = "auto",
    records_source: str | None = None,
    stage: StageFn | None = None,
    adapter: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Builds, aligns and writes a FedBiOT emulator of a model.

    Steps:

    1. Resolve and load the full model in float32 with the project's loaders
       (:func:`~edge_client.model.resolve_model`, :func:`~edge_client.model.load_model`);
       nothing is downloaded for a local source.
    2. Plan the layers (:func:`plan_emulator`) and build the emulator, a model of the same
       class with the kept layers, the embeddings, final norm and output head copied
       (tied embeddings stay tied).
    3. Align, as FedBiOT's server step: ``eval_records`` records (a seeded choice) are
       held aside and the rest tokenised (prompt, response and eos, cut to
       ``max_seq_len``; no record is dropped) into a seeded batch order; each of ``steps``
       AdamW steps (no weight decay, gradients clipped to norm 1) lowers
       ``L2(LN(h_full), LN(h_emulator)) + KL(p_full || p_emulator)``, where ``h`` is the
       hidden state entering the adapter's first layer and ``p`` the next-token
       distribution, over every real (attention-masked) token, prompt and response alike.
       Only the kept layers below the adapter are trained; embeddings, adapter layers,
       final norm and output head are frozen. Both models run in eval mode (no dropout),
       so the result depends only on the arguments.
    4. Measure the same loss on the held-aside batches before and after alignment.
    5. Write ``out_dir`` atomically: the model (safetensors), the tokenizer and
       ``emulator.json`` go into a temporary directory next to it, are fsynced, and the
       directory is renamed into place. If anything fails, no ``out_dir`` (and no
       temporary directory) is left; an existing ``out_dir`` is replaced only with
       ``overwrite=True``, and stays as it was if the build fails.

    Args:
        model_source: Anything :func:`~edge_client.model.resolve_model` accepts.
        out_dir: The emulator directory to write.
        adapter_layers: See :func:`plan_emulator`.
        drop_ratio: See :func:`plan_emulator`.
        records: Public alignment records; default :func:`public_records`.
        steps: Alignment steps (0 writes the unaligned emulator).
        learning_rate: AdamW learning rate.
        batch_size: Records per alignment step (and per evaluation batch).
        max_seq_len: Tokens per record (longer ones are cut on the right).
        seed: Seeds the held-aside choice, the batch order and torch.
        cache_dir: GGUF conversion cache, as for :func:`~edge_client.model.resolve_model`.
        progress: Called as ``progress(step, steps, loss)`` after each step (1-based).
        overwrite: Replace an existing ``out_dir``.
        eval_records: How many records to hold aside for the before/after measurement.
        prompt_format: ``"auto"``, ``"plain"`` or ``"chat"`` (see
            :func:`~edge_client.data.resolve_prompt_format`); "auto" matches what clients
            of the same model train on.
        records_source: A label for the records in the manifest (e.g. a path).
        stage: Called with a one-line description as each phase starts.
        adapter: Re-align against the federation's current adapter (FedBiOT's bi-level
            loop): a peft adapter directory, as ``edgefed-export`` writes it
            (``<out>/adapter``), whose LoRA sits on the emulator's adapter layers only.
            The teacher is then the full model with the adapter merged, and the student
            the emulator carrying the same adapter on its adapter layers, so the
            compressed layers learn to feed the adapted layers what the adapted full
            model feeds them. The adapter is not written into the emulator: its adapter
            layers stay the base model's, as every client's space starts from them. The
            manifest names the adapter (``aligned_to_adapter``: path and sha256).

    Returns:
        The manifest written to ``emulator.json`` (see the module docs for its fields).

    Raises:
        EmulatorError: Bad arguments, an existing ``out_dir`` without ``overwrite``, or a
            model whose decoder layers cannot be found.
        ModelLoadError: The model source cannot be resolved or loaded.
        DataError: The records are unusable (too few, or all truncated away).
        OSError: Writing ``out_dir`` failed.
    """
    started = time.perf_counter()
    say = stage or (lambda message: logger.info("%s", message))
    out = Path(out_dir).expanduser()
    _check_out_dir(out, overwrite)
    # Everything that does not depend on the model is checked before it is loaded, so a
    # typo costs no minutes of loading.
    _check_drop_ratio(drop_ratio)
    _check_positive_int("adapter layers", adapter_layers, 1)
    _check_positive_int("steps", steps, 0)
    _check_positive_int("batch size", batch_size, 1)
    _check_positive_int("max sequence length", max_seq_len, 2)
    _check_positive_int("evaluation records", eval_records, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EmulatorError(f"seed must be an integer, got {seed!r}")
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float))
        or not math.isfinite(learning_rate)
        or learning_rate <= 0
    ):
        raise EmulatorError(f"learning rate must be a finite number > 0, got {learning_rate!r}")
    if records is None:
        records = public_records()
        records_source = records_source or f"{SHIPPED_DATA.name}: edgefed-local's unused (public) records"
    records = list(records)
    if len(records) <= eval_records:
        raise DataError(
            f"{len(records)} record(s) are too few: {eval_records} are held aside to measure the "
            f"alignment, and at least one more must remain to train on"
        )

    say(f"loading the full model from {model_source}")
    full, tokenizer = load_model(resolve_model(model_source, cache_dir=cache_dir), dtype=torch.float32)
    base_hash = base_weights_hash(full)
    try:
        num_layers = len(find_decoder_layers(full).layers)
    except LayerDropoutError as e:
        raise EmulatorError(f"cannot build an emulator of this model: {e}") from e
    plan = plan_emulator(num_layers, adapter_layers=adapter_layers, drop_ratio=drop_ratio)
    fmt = resolve_prompt_format(prompt_format, tokenizer)

    # Hold aside a seeded choice of records for the before/after measurement; the order
    # of the rest (and so the batches) is the BatchStream-like seeded shuffle below.
    rng = random.Random(seed)
    held = set(rng.sample(range(len(records)), eval_records))
    eval_set = [records[i] for i in sorted(held)]
    train_set = [r for i, r in enumerate(records) if i not in held]
    eval_examples = _distill_examples(eval_set, tokenizer, max_seq_len=max_seq_len, prompt_format=fmt)
    train_examples = _distill_examples(train_set, tokenizer, max_seq_len=max_seq_len, prompt_format=fmt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eval_batches = [
        collate(eval_examples[i : i + batch_size], pad_token_id=pad_id)
        for i in range(0, len(eval_examples), batch_size)
    ]

    say(
        f"building the emulator: {len(plan.kept_layers)} of {num_layers} layers "
        f"(kept {list(plan.compressed_kept)} + adapter {list(plan.adapter_layers)})"
    )
    emulator = _make_emulator(full, plan)
    adapter_info: dict[str, str] | None = None
    base_adapter_state: dict[str, torch.Tensor] | None = None
    if adapter is not None:
        say(f"plugging the adapter {adapter} into both models (re-alignment)")
        full, adapter_info = _merge_adapter(full, adapter, plan)
        base_adapter_state = _adapter_layers_state(emulator, plan)
        merged = _adapter_layers_state(full, plan, own_indices=False)
        _load_adapter_layers_state(emulator, plan, merged)
    aligner = _Aligner(full, emulator, plan)
    try:
        before = aligner.evaluate(eval_batches)
        say(f"aligning for {steps} steps on {len(train_examples)} public records (loss before: {before:.4f})")
        _align(aligner, plan, train_examples, steps=steps, learning_rate=learning_rate,
               batch_size=batch_size, seed=seed, pad_id=pad_id, progress=progress)
        after = aligner.evaluate(eval_batches)
    finally:
        aligner.close()
    if base_adapter_state is not None:  # the clients' space starts from the base layers
        _load_adapter_layers_state(emulator, plan, base_adapter_state)
    emulator.eval()
    emulator.requires_grad_(False)

    manifest: dict[str, Any] = {
        "format": EMULATOR_FORMAT,
        "base_model_hash": base_hash,
        "emulator_hash": base_weights_hash(emulator),
        "kept_layers": list(plan.kept_layers),
        "adapter_layers": list(plan.adapter_layers),
        "emulator_adapter_layers": list(plan.emulator_adapter_layers),
        "drop_ratio": float(drop_ratio),
        "num_layers_full": num_layers,
        "alignment_loss_before": before,
        "alignment_loss_after": after,
        "steps": steps,
        "learning_rate": float(learning_rate),
        "batch_size": batch_size,
        "max_seq_len": max_seq_len,
        "prompt_format": fmt,
        "seed": seed,
        "records": {
            "source": records_source,
            "count": len(records),
            "train": len(train_set),
            "eval": len(eval_set),
            "sha256": _records_digest(records),
        },
        "model_class": type(full).__name__,
        "aligned_to_adapter": adapter_info,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    say(f"writing {out}")
    _write_atomically(out, emulator, tokenizer, manifest, overwrite=overwrite)
    return manifest


def _merge_adapter(
    full: PreTrainedModel, adapter: str | os.PathLike[str], plan: EmulatorPlan
) -> tuple[PreTrainedModel, dict[str, str]]:
    """``full`` with the peft adapter in ``adapter`` merged into its weights, and the
    adapter's path and digest (for the manifest).

    Raises:
        EmulatorError: The directory is no peft LoRA adapter, or it adapts layers that
            are not the emulator's adapter layers (the emulator could not carry it).
    """
    from peft import PeftConfig, PeftModel

    directory = Path(adapter).expanduser()
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise EmulatorError(f"{str(directory)!r} is not a peft adapter directory: {e}") from e
    if getattr(config, "peft_type", None) != "LORA":
        raise EmulatorError(f"{str(directory)!r} holds a {config.peft_type} adapter; re-alignment takes LoRA")
    layers = config.layers_to_transform
    layers = [layers] if isinstance(layers, int) else layers
    if layers is None or not set(layers) <= set(plan.adapter_layers):
        raise EmulatorError(
            f"the adapter in {str(directory)!r} adapts "
            f"{'every layer' if layers is None else f'layers {sorted(layers)}'}, but the emulator keeps "
            f"layers {list(plan.adapter_layers)} as its adapter: only a federation whose lora scope is "
            f"restricted to them (lora_layers) trains an adapter it can carry"
        )
    try:
        merged = PeftModel.from_pretrained(full, str(directory)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise EmulatorError(f"cannot plug the adapter in {str(directory)!r} into the model: {e}") from e
    merged.eval()
    merged.requires_grad_(False)
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return merged, {"path": str(directory), "sha256": digest.hexdigest()}


def _adapter_layers_state(
    model: PreTrainedModel, plan: EmulatorPlan, *, own_indices: bool = True
) -> dict[str, torch.Tensor]:
    """Copies of the adapter layers' tensors, keyed by position in ``plan.adapter_layers``
    and name within the layer; ``own_indices``: ``model`` is the emulator (else the full
    model)."""
    layers = find_decoder_layers(model).layers
    indices = plan.emulator_adapter_layers if own_indices else plan.adapter_layers
    return {
        f"{position}.{name}": tensor.detach().clone()
        for position, index in enumerate(indices)
        for name, tensor in layers[index].state_dict().items()
    }


def _load_adapter_layers_state(
    emulator: PreTrainedModel, plan: EmulatorPlan, state: dict[str, torch.Tensor]
) -> None:
    layers = find_decoder_layers(emulator).layers
    for position, index in enumerate(plan.emulator_adapter_layers):
        prefix = f"{position}."
        part = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        layers[index].load_state_dict(part, strict=True)


def _align(
    aligner: _Aligner,
    plan: EmulatorPlan,
    examples: Sequence[Example],
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    progress: ProgressFn | None,
) -> None:
    """Runs the distillation steps on the emulator's kept compressed layers."""
    if steps == 0:
        return
    emulator = aligner.emulator
    layers = find_decoder_layers(emulator).layers
    trained = [p for i in range(len(plan.compressed_kept)) for p in layers[i].parameters()]
    for param in trained:
        param.requires_grad_(True)
    # Weight decay would pull copied pretrained weights towards zero, which is not part
    # of matching the full model; clipping keeps the first steps on a badly thinned model
    # from overshooting.
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    order_rng = random.Random(seed)
    order: list[int] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(1, steps + 1):
            chosen: list[Example] = []
            while len(chosen) < batch_size:
                if not order:
                    order = list(range(len(examples)))
                    order_rng.shuffle(order)
                chosen.append(examples[order.pop()])
            batch = collate(chosen, pad_token_id=pad_id)
            l2, kl, _ = aligner.terms(batch)
            loss = l2 + kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            if progress is not None:
                progress(step, steps, loss.detach().item())
    for param in trained:
        param.requires_grad_(False)
        param.grad = None


# --------------------------------------------------------------------------- writing


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise EmulatorError(f"{str(out)!r} already exists; pass overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise EmulatorError(f"{str(out)!r} exists and is not a directory; not replacing it")
    if not out.parent.is_dir():
        raise EmulatorError(f"the parent directory of {str(out)!r} does not exist")


def _fsync_tree(directory: Path) -> None:
    """Flushes every file under ``directory`` and the directory entries themselves."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    for path in [*sorted(p for p in directory.rglob("*") if p.is_dir()), directory]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(
    out: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    manifest: dict[str, Any],
    *,
    overwrite: bool,
) -> None:
    """Writes the emulator into a sibling temporary directory, then renames it to ``out``.

    The temporary directory is on the same filesystem as ``out``, so the rename is atomic:
    readers see either no ``out`` (or the old one) or the complete new one. The manifest
    is written last, so even the temporary directory never looks complete before it is.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; an emulator is not secret
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        _fsync_tree(tmp)
        if out.exists():
            if not overwrite:  # appeared while we were building
                raise EmulatorError(f"{str(out)!r} appeared during the build; not replacing it")
            # Move the old one aside first: a directory cannot be renamed over a non-empty one.
            old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
            os.rename(out, old / out.name)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:  # put the previous emulator back
                os.rename(old / out.name, out)
            raise
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- loading


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and checks an emulator directory's ``emulator.json`` (no weights are loaded).

    Raises:
        EmulatorLoadError: The directory or manifest is missing or unreadable, its format
            is unknown, or a field :func:`load_emulator` relies on is missing or mistyped.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise EmulatorLoadError(f"emulator directory {str(directory)!r} does not exist")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise EmulatorLoadError(
            f"{str(directory)!r} is not an emulator: {MANIFEST_FILE} is missing "
            f"(build one with `edgefed-emulator build`)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmulatorLoadError(f"cannot read {str(manifest_path)!r}: {e}") from e
    if not isinstance(manifest, dict):
        raise EmulatorLoadError(f"{str(manifest_path)!r} does not hold a JSON object")
    fmt = manifest.get("format")
    if fmt != EMULATOR_FORMAT or isinstance(fmt, bool):
        raise EmulatorLoadError(
            f"{str(manifest_path)!r} has format {fmt!r}; this edgefed reads format "
            f"{EMULATOR_FORMAT} (rebuild the emulator or upgrade edgefed)"
        )
    for key, kind in _MANIFEST_TYPES.items():
        value = manifest.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, kind):
            raise EmulatorLoadError(f"{str(manifest_path)!r}: field {key!r} is missing or malformed")
    return manifest


def load_emulator(
    path: str | os.PathLike[str],
    *,
    expect_base_hash: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Loads an emulator written by :func:`build_emulator`, checking what it is.

    Checks, in order: the manifest (:func:`read_manifest`); that it was built from the
    expected full model, if ``expect_base_hash`` is given (before any weight is read);
    that the weights load (:func:`~edge_client.model.load_model`) and have as many
    decoder layers as the manifest keeps; and that their
    :func:`~edge_client.model.base_weights_hash` equals the manifest's ``emulator_hash``,
    so a tampered or half-replaced weight file is refused. The hash is taken on the
    weights as stored, so it is only checked when ``dtype`` is float32 (the stored dtype).

    With ``quantization`` (``"nf4"`` or ``"int8"``, see :mod:`edge_client.quantize`),
    the Linear layers of the frozen part (every decoder layer below the adapter) are
    quantised by bitsandbytes through transformers' ``BitsAndBytesConfig``, while the
    adapter layers (the manifest's ``emulator_adapter_layers``) and the output head stay
    ``nn.Linear`` in float32; embeddings and norms stay float32 as transformers leaves
    them. Then, before the (quantising) load: :func:`quantization_support` must say
    bitsandbytes runs that mode on ``device``, and the stored weights' hash
    (:func:`stored_weights_hash`, read from the safetensors files without building the
    float32 model) must equal ``emulator_hash``. After it: every frozen decoder layer
    holds bitsandbytes layers, no adapter layer does, and every parameter left
    unquantised (adapter, head, norms, embeddings) is exactly the stored float32 tensor.

    Args:
        path: The emulator directory.
        expect_base_hash: The full model's base-weights hash a federation uses.
        dtype: Parameter dtype to load in; must be float32 with ``quantization`` (the
            adapter trains in float32, and the quantised layers compute in it).
        device: Torch device to place the model on.
        quantization: None (load as stored), ``"nf4"`` or ``"int8"``.

    Returns:
        ``(model, tokenizer, manifest)``; the model is frozen and in eval mode.

    Raises:
        EmulatorLoadError: Any check fails, ``quantization`` is unknown, or bitsandbytes
            cannot run it on ``device``; the message is one line naming the cause.
    """
    manifest = read_manifest(path)
    directory = Path(path).expanduser()
    if expect_base_hash is not None and manifest["base_model_hash"] != expect_base_hash:
        raise EmulatorLoadError(
            f"the emulator in {str(directory)!r} was built from base model "
            f"{manifest['base_model_hash']}, but this federation's base model is "
            f"{expect_base_hash}; build an emulator of that model"
        )
    if quantization is not None:
        return _load_quantized(directory, manifest, quantization=quantization, dtype=dtype,
                               device=device)
    try:
        model, tokenizer = load_model(directory, dtype=dtype, device=device)
    except ModelLoadError as e:
        raise EmulatorLoadError(f"cannot load the emulator's weights: {e}") from e
    try:
        layer_count = len(find_decoder_layers(model).layers)
    except LayerDropoutError as e:
        raise EmulatorLoadError(f"the emulator in {str(directory)!r} has no decoder layers: {e}") from e
    if layer_count != len(manifest["kept_layers"]):
        raise EmulatorLoadError(
            f"the emulator in {str(directory)!r} has {layer_count} decoder layers but its "
            f"manifest keeps {len(manifest['kept_layers'])}"
        )
    if dtype == torch.float32:
        _check_emulator_hash(directory, manifest, base_weights_hash(model))
    return model, tokenizer, manifest


def _check_emulator_hash(directory: Path, manifest: dict[str, Any], actual: str) -> None:
    if actual != manifest["emulator_hash"]:
        raise EmulatorLoadError(
            f"the emulator's weights in {str(directory)!r} hash to {actual}, but its "
            f"manifest says {manifest['emulator_hash']}: the weight files were changed "
            f"after the build; rebuild it or restore the original files"
        )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _load_quantized(
    directory: Path,
    manifest: dict[str, Any],
    *,
    quantization: str,
    dtype: torch.dtype,
    device: str,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """:func:`load_emulator` with the frozen part quantised (its checks are described there)."""
    if quantization not in QUANTIZATIONS:
        raise EmulatorLoadError(
            f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)} or none"
        )
    if dtype != torch.float32:
        raise EmulatorLoadError(
            f"a quantised emulator keeps its adapter in float32; load it with dtype "
            f"torch.float32, not {dtype}"
        )
    supported, reason = quantization_support(quantization, device)
    if not supported:
        raise EmulatorLoadError(f"cannot load the emulator quantised to {quantization}: {reason}")

    # The module paths to leave unquantised, and the parameter names to hash, come from
    # a skeleton of the model on the meta device: no memory, no weights read.
    skeleton = _meta_skeleton(directory)
    try:
        skeleton_layers = find_decoder_layers(skeleton)
    except LayerDropoutError as e:
        raise EmulatorLoadError(f"the emulator in {str(directory)!r} has no decoder layers: {e}") from e
    layer_count = len(skeleton_layers.layers)
    if layer_count != len(manifest["kept_layers"]):
        raise EmulatorLoadError(
            f"the emulator in {str(directory)!r} has {layer_count} decoder layers but its "
            f"manifest keeps {len(manifest['kept_layers'])}"
        )
    adapter = _adapter_indices(directory, manifest, layer_count)
    head_path = _module_path(skeleton, skeleton.get_output_embeddings())
    skip = [f"{skeleton_layers.path}.{i}" for i in adapter]
    if head_path is not None:
        skip.append(head_path)
    names = [name for name, _ in skeleton.named_parameters()]
    del skeleton

    # Refuse changed weight files before paying for the quantising load.
    _check_emulator_hash(directory, manifest, stored_weights_hash(directory, names))

    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            quantization_config=bnb_config(quantization, skip),
            dtype=torch.float32,
            device_map={"": device},
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers, accelerate and bitsandbytes raise all kinds
        raise EmulatorLoadError(
            f"cannot load the emulator in {str(directory)!r} quantised to {quantization}: "
            f"{_one_line(e)}"
        ) from e
    prepare_quantized(model)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:  # as load_model does
        if tokenizer.eos_token is None:
            raise EmulatorLoadError(
                f"the tokenizer in {str(directory)!r} has neither a pad nor an eos token; "
                f"set pad_token in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token

    _check_quantized_layout(directory, model, adapter, quantization)
    _leave_the_weight_file(model)
    return model, tokenizer, manifest


def _leave_the_weight_file(model: PreTrainedModel) -> None:
    """Copies the unquantised tensors out of the safetensors file's memory map.

    transformers loads float32 tensors zero-copy from the mapped file, and reading the
    frozen layers to quantise them touched the rest of it: the whole float32 file stayed
    resident (on SmolLM2-135M's emulator 341 MiB of file pages beside 159 MiB of
    parameters). With every tensor in the process's own memory the map is released and
    only what the client holds stays resident.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype.is_floating_point and tensor.dtype != torch.uint8:
                tensor.data = tensor.data.clone()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the clones above gave the head its own copy of the embedding


def _meta_skeleton(directory: Path) -> PreTrainedModel:
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # unknown architecture, unreadable config
        raise EmulatorLoadError(
            f"cannot read the emulator's model config in {str(directory)!r}: {_one_line(e)}"
        ) from e


def _adapter_indices(directory: Path, manifest: dict[str, Any], layer_count: int) -> list[int]:
    """The manifest's adapter layers, checked: the emulator's last ``len(adapter_layers)``."""
    adapter = manifest["emulator_adapter_layers"]
    expected = list(range(layer_count - len(manifest["adapter_layers"]), layer_count))
    if adapter != expected or not adapter or len(adapter) >= layer_count:
        raise EmulatorLoadError(
            f"{str(directory / MANIFEST_FILE)!r}: emulator_adapter_layers {adapter!r} are not "
            f"the last {len(manifest['adapter_layers'])} of its {layer_count} layers"
        )
    return adapter


def _module_path(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def _check_quantized_layout(
    directory: Path, model: PreTrainedModel, adapter: Sequence[int], quantization: str
) -> None:
    """Frozen layers quantised, adapter and head float32 and exactly as stored."""
    layers = find_decoder_layers(model)
    quantised_weights = set()
    for path, _ in quantized_linears(model):
        quantised_weights.add(f"{path}.weight")
    prefix = layers.path + "."
    for index in range(len(layers.layers)):
        inside = [p for p in quantised_weights if p.startswith(f"{prefix}{index}.")]
        if index in adapter and inside:
            raise EmulatorLoadError(
                f"adapter layer {index} of the emulator in {str(directory)!r} was quantised"
            )
        if index not in adapter and not inside:
            raise EmulatorLoadError(
                f"frozen layer {index} of the emulator in {str(directory)!r} holds no "
                f"{quantization} layer after a quantised load"
            )
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32:
        raise EmulatorLoadError(
            f"the output head of the emulator in {str(directory)!r} is "
            f"{type(head).__name__} in {getattr(getattr(head, 'weight', None), 'dtype', None)}, "
            f"not a float32 nn.Linear"
        )
    kept = [(name, param) for name, param in model.named_parameters()
            if name not in quantised_weights]
    with _StoredTensors(directory) as stored:
        for name, param in kept:
            tensor = stored.get(name)
            if (param.dtype != torch.float32 or tensor.dtype != torch.float32
                    or not torch.equal(param.detach().cpu(), tensor)):
                raise EmulatorLoadError(
                    f"{name} of the emulator in {str(directory)!r} is not the stored float32 "
                    f"tensor after a quantised load"
                )


class _StoredTensors:
    """Read access to an emulator directory's safetensors files (one, or sharded)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        index = directory / "model.safetensors.index.json"
        single = "model.safetensors"
        if not index.is_file() and not (directory / single).is_file():
            raise EmulatorLoadError(f"{str(directory)!r} holds no {single}")
        self._file_of: dict[str, str]
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self._file_of = {str(k): str(v) for k, v in weight_map.items()}
            else:
                with safe_open(directory / single, framework="pt") as f:
                    self._file_of = {key: single for key in f.keys()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise EmulatorLoadError(
                f"cannot read the emulator's weight files in {str(directory)!r}: {_one_line(e)}"
            ) from e

    def __enter__(self) -> _StoredTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _handle(self, name: str) -> Any:
        file = self._file_of.get(name)
        if file is None:
            raise EmulatorLoadError(
                f"the emulator's weight files in {str(self._directory)!r} have no tensor "
                f"{name!r}: the weight files were changed after the build"
            )
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(
                    safe_open(self._directory / file, framework="pt"))
            except (OSError, ValueError) as e:
                raise EmulatorLoadError(
                    f"cannot read {str(self._directory / file)!r}: {_one_line(e)}"
                ) from e
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def chunks(self, name: str, max_bytes: int) -> tuple[torch.dtype, tuple[int, ...], Iterable[torch.Tensor]]:
        """A tensor's dtype, shape and its row-major content in chunks of whole rows."""
        view = self._handle(name).get_slice(name)
        shape = tuple(int(d) for d in view.get_shape())
        if len(shape) == 0:
            tensor = self.get(name)
            return tensor.dtype, shape, [tensor]
        first = view[0:1] if shape[0] else self.get(name)
        row_bytes = max(1, first.numel() * first.element_size())
        rows = max(1, max_bytes // row_bytes)
        return first.dtype, shape, (view[start : start + rows] for start in range(0, shape[0], rows))


_STORED_HASH_CHUNK_BYTES = 16 * 1024 * 1024


def stored_weights_hash(path: str | os.PathLike[str], names: Iterable[str]) -> str:
    """:func:`~edge_client.model.base_weights_hash` of the stored tensors called ``names``.

    Reads the emulator's safetensors files tensor by tensor, in chunks of at most 16 MiB,
    and feeds the digest exactly what ``base_weights_hash`` feeds it for a model whose
    ``named_parameters()`` are ``names`` with those values: so it equals the manifest's
    ``emulator_hash`` for an untouched emulator when ``names`` are its model's parameter
    names (transformers saves a parameter under its own name; a tied head is saved once,
    under the name ``named_parameters`` lists it by), without building the float32 model.

    Raises:
        EmulatorLoadError: A weight file is missing or unreadable, or lacks one of ``names``.
    """
    # The per-tensor byte feeding is base_weights_hash's own helper, so the two cannot drift.
    from edge_client.model import _hash_tensor_bytes

    directory = Path(path).expanduser()
    digest = hashlib.sha256()
    with _StoredTensors(directory) as stored, torch.no_grad():
        for name in sorted(names):
            dtype, shape, chunks = stored.chunks(name, _STORED_HASH_CHUNK_BYTES)
            dims = ",".join(str(d) for d in shape)
            dtype_name = str(dtype).removeprefix("torch.")
            digest.update(f"{name}\x00{dtype_name}\x00{dims}\x00".encode("utf-8"))
            for chunk in chunks:
                _hash_tensor_bytes(digest, chunk.contiguous())
    return digest.hexdigest()
