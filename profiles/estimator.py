"""An analytic, calibrated model of the peak memory of each training mode.

Pure arithmetic over a model's shape: no torch import, so a coordinator or a device
chooser can estimate without loading anything. All sizes are bytes.

Notation used in the comments: B batch, T sequence length, N = B*T tokens, H hidden
size, I MLP width, L layers, kv = key/value heads x head_dim, q = heads x head_dim,
V vocabulary, P parameter count, w bytes per base-weight element, a bytes per
activation element (the activations have the base weights' dtype), C counted label
rows (the response half of every row, see ``label_fraction``).

Modes:

``forward``
    One no-grad forward with :func:`edge_client.loss.causal_lm_loss`: the weights, the
    residual stream, the largest transient buffers of one layer (the MLP's), and the
    chunked output head (at most ``chunk_tokens`` rows of logits at a time).
``mezo``
    One :class:`edge_client.engines.mezo.MeZOEngine` step: two such forwards and three
    in-place perturbation passes over the flat parameter space; no gradients, no
    optimizer state, no copy of the weights (``ParameterSpace.adopt`` moves them). The
    compiled perturbation kernel's runtime is the only addition.
``sgd`` / ``adamw``
    ``model(**batch, labels=...).loss.backward(); optimizer.step(); zero_grad()`` on the
    trainable parameters with Hugging Face's standard loss: every layer keeps its
    intermediates for backward, and the loss builds full ``(B, T, V)`` float32 logits.

Only the three runtime-overhead constants below are fitted; every other term is counted
op by op. They were fitted once, on this repository's CPU machine (2 cores, torch
2.13.0+cpu, transformers 5.23.0, glibc malloc, SDPA attention), as residuals of
``python -m profiles.profiler`` on SmolLM2-135M at batch 4 x 128 tokens, and validated
at 8 x 256 (``profiles/data/``; ``bench/memory_model.py`` re-checks them). Measured peaks
above the interpreter baseline (MiB), 4x128 / 8x256, first run: forward 684 / 1000,
mezo 737 / 1100, sgd 1839 / 5195, adamw 3029 / 6427 (estimates within 5.2% of all
eight); second run (bench/memory_model.py): forward 686 / 997, mezo 738 / 1021, sgd
1990 / 5280, adamw 3016 / 6563 (within 7.3%). The first-order peaks move by up to
150 MiB between identical runs (allocator fragmentation, thread timing), which bounds
how far any fitting can go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Estimate", "ModelShape", "MODES", "SCOPES", "estimate"]

MODES = ("forward", "mezo", "sgd", "adamw")
SCOPES = ("full", "lora")
MIB = 1024 * 1024
FP32 = 4  # trainable parameters, their gradients and optimizer state are float32

# ---------------------------------------------------------------------------
# Calibration constants (see the module docstring for where they come from)
# ---------------------------------------------------------------------------

# Runtime overhead above the interpreter baseline that does not scale with the model:
# libtorch / oneDNN code pages and kernel workspaces touched for the first time by the
# operation, allocator arenas of the worker threads. Residual of the no-grad forward
# (SmolLM2-135M, 4 x 128: measured 684.3 MiB, analytic terms 622.1 MiB -> 62 MiB),
# rounded to 60. (On a 20M-parameter Llama the same residual is ~40 MiB: part of it
# scales with the matrices touched.)
RUNTIME_NOGRAD_BYTES = 60 * MIB
# The same for autograd (the backward engine and its thread, autograd kernels' code);
# residual of the SGD step at 4 x 128: 1839.3 - 1784.8 = 55 MiB, taken as 60 like the
# forward's.
RUNTIME_AUTOGRAD_BYTES = 60 * MIB
# The compiled (inductor) perturbation kernel: its generated module and the inductor /
# sympy imports it pulls in (compiled before the step, but above the interpreter
# baseline, and a ZO client pays it). mezo minus forward at 4 x 128: 737.4 - 684.3 =
# 53 MiB, rounded to 50 (at 8 x 256 it measured 100 MiB in one run and 24 MiB in
# another: allocator slack around the step's second forward, not modelled).
RUNTIME_COMPILED_PERTURB_BYTES = 50 * MIB
# Perturbation passes run on spaces of at least this many elements through the
# compiled kernel (protocol.perturb.COMPILE_MIN_ELEMENTS).
COMPILE_MIN_ELEMENTS = 1 << 22

# Activation elements that one decoder layer keeps for backward, per token, in units
# of H, kv and I (counted op by op for a Llama layer in fp32, SDPA attention; not
# fitted: 4x128 sgd came out within 0.3% and 8x256 within 2.7% as counted):
#   2 RMSNorms x (normalised x, weighted output)                          4 H
#   q, rotate_half(q), q after RoPE                                       3 H
#   attention output, its contiguous (B, T, q) copy, o_proj output/residual 3 H
#   MLP output + residual                                                  1 H
#   k, rotate_half(k), k after RoPE, v                                     4 kv
#   gate, silu(gate), up, silu(gate) * up                                  4 I
SAVED_PER_TOKEN_H = 11.0
SAVED_PER_TOKEN_KV = 4.0
SAVED_PER_TOKEN_I = 4.0
# Float32 (N, V) buffers alive at once at the peak of the Hugging Face loss backward:
# the logits (held by the model output), log_softmax's saved output, the gradient
# flowing into log_softmax and the gradient of the logits (counted, not fitted).
HF_LOGITS_COPIES = 4.0
# SDPA on CPU runs the fused flash kernel (no T x T scores kept) when the mask is a
# plain causal one; set to the number of (B, heads, T, T) buffers kept per layer when a
# padding mask forces the math path. Our profiles use full rows, so 0.
ATTN_SCORE_COPIES = 0.0


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that its memory depends on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied_embeddings: bool
    param_count: int
    head_dim: int = 0  # 0: hidden // heads

    def __post_init__(self) -> None:
        for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "intermediate",
                     "param_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], *, num_parameters: int | None = None
                       ) -> ModelShape:
        """Reads a Hugging Face ``config.json`` dict (Llama-style names).

        ``num_parameters`` (as ``model.num_parameters()`` counts it: tied weights once)
        defaults to the count implied by a Llama architecture.
        """
        try:
            vocab = int(config["vocab_size"])
            hidden = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
            intermediate = int(config["intermediate_size"])
        except KeyError as e:
            raise ValueError(f"config has no {e.args[0]!r}") from e
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        tied = bool(config.get("tie_word_embeddings", False))
        if num_parameters is None:
            q, kv = heads * head_dim, kv_heads * head_dim
            per_layer = (hidden * q + 2 * hidden * kv + q * hidden  # q, k, v, o projections
                         + 3 * hidden * intermediate  # gate, up, down
                         + 2 * hidden)  # two RMSNorm weights
            num_parameters = (vocab * hidden * (1 if tied else 2) + layers * per_layer
                              + hidden)  # final norm
        return cls(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                   intermediate=intermediate, tied_embeddings=tied,
                   param_count=int(num_parameters), head_dim=head_dim)


BREAKDOWN_KEYS = ("weights", "trainable_copy", "gradients", "optimizer_state", "activations",
                  "logits_loss", "overhead")


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one mode, and what they are made of (the parts sum to ``total``)."""

    mode: str
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def total_mib(self) -> float:
        return self.total / MIB


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def lora_param_count(shape: ModelShape, rank: int, targets: tuple[str, ...] = ("q_proj", "v_proj")
                     ) -> int:
    """Adapter elements: r x (in + out) per targeted projection per layer."""
    dims = {"q_proj": (shape.hidden, shape.q_dim), "k_proj": (shape.hidden, shape.kv_dim),
            "v_proj": (shape.hidden, shape.kv_dim), "o_proj": (shape.q_dim, shape.hidden),
            "gate_proj": (shape.hidden, shape.intermediate),
            "up_proj": (shape.hidden, shape.intermediate),
            "down_proj": (shape.intermediate, shape.hidden)}
    return shape.layers * sum(rank * sum(dims[t]) for t in targets)


def estimate(shape: ModelShape, mode: str, *, batch: int, seq_len: int, scope: str = "full",
             base_dtype_bytes: int = 4, lora_rank: int = 8, chunk_tokens: int = 1024,
             label_fraction: float = 0.5) -> Estimate:
    """Estimates the peak memory of one step of ``mode``, in bytes, with a breakdown.

    Args:
        shape: the model.
        mode: "forward", "mezo", "sgd" or "adamw".
        batch, seq_len: the batch's rows and tokens per row (rows padded to seq_len).
        scope: "full" (every parameter trains; needs float32 weights) or "lora"
            (q_proj/v_proj adapters of rank ``lora_rank`` train; the base is frozen).
        base_dtype_bytes: bytes per element of the frozen base weights (4, 2 or 1).
        chunk_tokens: rows of logits our chunked loss computes at once.
        label_fraction: share of each row that carries counted labels (the response).

    Raises:
        ValueError: an unknown mode or scope, a non-positive batch / seq_len /
            chunk_tokens / lora_rank, or a full scope on non-float32 weights.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    batch = _positive_int("batch", batch)
    seq_len = _positive_int("seq_len", seq_len)
    chunk_tokens = _positive_int("chunk_tokens", chunk_tokens)
    lora_rank = _positive_int("lora_rank", lora_rank)
    if base_dtype_bytes not in (1, 2, 4):
        raise ValueError(f"base_dtype_bytes must be 1, 2 or 4, got {base_dtype_bytes!r}")
    if scope == "full" and base_dtype_bytes != 4:
        raise ValueError("base_dtype_bytes must be 4 for the full scope (trainable "
                         "parameters are float32)")
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction!r}")

    s = shape
    n_tok = batch * seq_len  # N
    act = max(base_dtype_bytes, 2)  # activations come out in the weights' compute dtype
    # Counted label rows C: the response part of every row, less the last position
    # (its next token is outside the row).
    counted = batch * min(seq_len - 1, max(1, math.ceil(seq_len * label_fraction)))
    trainable = s.param_count if scope == "full" else lora_param_count(s, lora_rank)

    parts = dict.fromkeys(BREAKDOWN_KEYS, 0)
    # Frozen/base weights: every parameter once (tied embeddings counted once).
    parts["weights"] = s.param_count * base_dtype_bytes
    if scope == "lora":
        # fp32 adapters live beside the base weights (the base is not copied).
        parts["trainable_copy"] = trainable * FP32

    if mode in ("forward", "mezo"):
        # No autograd graph: only the residual stream and one layer's transients live.
        # Residual stream in and out of a layer plus the normalised input: 3 N H.
        stream = 3 * n_tok * s.hidden * act
        # The MLP's peak inside one layer: silu(gate), up and their product: 3 N I.
        mlp = 3 * n_tok * s.intermediate * act
        # Attention's peak: q, k, v, their RoPE copies and the output: 3 N q + 4 N kv.
        attn = (3 * n_tok * s.q_dim + 4 * n_tok * s.kv_dim) * act
        parts["activations"] = stream + max(mlp, attn)
        # Chunked head: the C counted hidden rows (C H), one chunk of logits in float32
        # and cross_entropy's log_softmax of it (2 x chunk x V x 4).
        rows = min(counted, chunk_tokens)
        parts["logits_loss"] = counted * s.hidden * act + 2 * rows * s.vocab * FP32
        parts["overhead"] = RUNTIME_NOGRAD_BYTES
        if mode == "mezo" and trainable >= COMPILE_MIN_ELEMENTS:
            parts["overhead"] += RUNTIME_COMPILED_PERTURB_BYTES
        return Estimate(mode, {k: int(v) for k, v in parts.items()})

    # First order. Intermediates every layer keeps for backward: per token
    # (11 H + 4 kv + 4 I) elements (see SAVED_PER_TOKEN_*), times L, plus the
    # embedding output and the final norm's two outputs (3 N H).
    per_token_layer = (SAVED_PER_TOKEN_H * s.hidden + SAVED_PER_TOKEN_KV * s.kv_dim
                       + SAVED_PER_TOKEN_I * s.intermediate)
    saved = n_tok * (s.layers * per_token_layer + 3 * s.hidden) * act
    # Attention scores kept on the math path: (B, heads, T, T) per copy per layer.
    saved += ATTN_SCORE_COPIES * s.layers * batch * s.heads * seq_len * seq_len * act
    parts["activations"] = int(saved)
    # Hugging Face loss: full (N, V) float32 logits, HF_LOGITS_COPIES of them at once.
    parts["logits_loss"] = int(HF_LOGITS_COPIES * n_tok * s.vocab * FP32)
    # Gradients alive at the start of backward (where activations and logits peak):
    # the output head's weight gradient (V H) is computed while the logits' gradients
    # still exist; trainable gradients under LoRA are negligible.
    head_grad = s.vocab * s.hidden * FP32 if scope == "full" else trainable * FP32
    # The other candidate peak: the end of backward, when every gradient exists (P x 4)
    # and the activations are gone, plus the tied embedding's second gradient (V H)
    # being accumulated and the logits the output still holds (N V).
    grads_all = trainable * FP32
    tied_extra = s.vocab * s.hidden * FP32 if (scope == "full" and s.tied_embeddings) else 0
    late = grads_all + tied_extra + n_tok * s.vocab * FP32
    early = head_grad + parts["activations"] + parts["logits_loss"]
    if late > early:
        parts["gradients"] = grads_all + tied_extra
        parts["activations"] = 0
        parts["logits_loss"] = n_tok * s.vocab * FP32
    else:
        parts["gradients"] = head_grad
    if mode == "adamw":
        # exp_avg and exp_avg_sq, float32, one of each per trainable element; they exist
        # from the first step on, so the second step's forward/backward carries them.
        parts["optimizer_state"] = 2 * trainable * FP32
    parts["overhead"] = RUNTIME_AUTOGRAD_BYTES
    return Estimate(mode, {k: int(v) for k, v in parts.items()})
