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
    Under the ``top_layers`` scope only the last k layers (their input gets no
    gradient) keep activations, counted as ``dropout`` / ``block`` count theirs.
``dropout``
    One DropPEFT-style step: ``adamw`` (LoRA adapters, or every parameter under the
    full scope) with a share ``drop_ratio`` p of the decoder layers skipped, so only
    ceil((1 - p) L) layers run and keep activations, and only their parameters get
    gradients; every layer's weights stay resident, and AdamW's moments exist for every
    trainable element (over many steps each layer has been kept at least once).
``block``
    One block of a cyclic block update (FedCyBGD / BAdam): AdamW on ``block_layers``
    consecutive decoder layers only (their weights; under the lora scope their
    adapters), gradients and moments for the block alone. Counted as the lowest block,
    the worst case: every layer above keeps what the gradient needs to pass through it
    (but no gradients for its frozen weights), and Hugging Face's loss builds the same
    logits as ``sgd``'s.
``emulator``
    One FedBiOT-style emulator step: round(``keep_ratio`` L) decoder layers kept (spread
    uniformly, the first and the last included; the others are gone), their projections
    quantised by bitsandbytes to ``base_bits`` 4 (nf4: half a byte per element plus a
    double-quantised absmax per 64) or 8 (int8 plus a float32 scale per row); the
    embedding, head and norms 16-bit; LoRA q_proj/v_proj adapters (float32) train with
    AdamW; activations 16-bit. 8-bit matmuls keep their 16-bit input for backward
    (4-bit ones and frozen ``nn.Linear`` do not), so at large batches the 8-bit
    emulator can need more than the 4-bit one by more than its weights save.

The first-order modes other than sgd / adamw over full / lora count their activations
layer by layer (``_layer_saved_bytes``): what autograd keeps for each kind of layer
(trained, LoRA, frozen with a gradient passing through, the lowest one that gets no
input gradient), counted with ``torch.autograd.graph.saved_tensors_hooks``, plus the
heap slack glibc keeps of the forward's temporaries (``HEAP_SLACK_PER_TOKEN_*``, the
part of sgd / adamw's per-layer count that autograd does not keep). Over a 16-bit base
the RMSNorms keep float32 up-casts and the HF loss up-casts the logits: both counted.

Only the three runtime-overhead constants below and the emulator's
``RUNTIME_BNB_BYTES`` (and ``RUNTIME_BNB_INT8_EXTRA_BYTES`` for its 8-bit layout) are fitted; every other term is counted op by op. The three were
fitted once, on this repository's CPU machine (2 cores, torch 2.13.0+cpu, transformers
5.23.0, glibc malloc, SDPA attention), as residuals of
``python -m profiles.profiler`` on SmolLM2-135M at batch 4 x 128 tokens, and validated
at 8 x 256 (``profiles/data/``; ``bench/memory_model.py`` re-checks them). Measured peaks
above the interpreter baseline (MiB), 4x128 / 8x256, first run: forward 684 / 1000,
mezo 737 / 1100, sgd 1839 / 5195, adamw 3029 / 6427 (estimates within 5.2% of all
eight); second run (bench/memory_model.py): forward 686 / 997, mezo 738 / 1021, sgd
1990 / 5280, adamw 3016 / 6563 (within 7.3%). The first-order peaks move by up to
150 MiB between identical runs (allocator fragmentation, thread timing), which bounds
how far any fitting can go.

With the layered modes (bench/memory_model.py, one run, all 22 rows within 8.0%),
measured / estimated MiB at 4x128 and 8x256: dropout p=0.5 over LoRA 1265 / 1255 and
3574 / 3286; block (layer 0) 1599 / 1543 and 4630 / 4371; emulator 4-bit 719 / 718 and
2367 / 2293, 8-bit 796 / 781 and 2583 / 2473; adamw over LoRA 1665 / 1744 and 5006 /
5235; over LoRA on a bfloat16 base, forward 421 / 421 and 722 / 728, mezo 424 / 421 and
717 / 728 (bitsandbytes 0.50.2, peft 0.21.2). The layered modes come out low by up to 8%
at 8x256: glibc's heap slack grows faster than the tokens there (mallinfo2 after a LoRA
forward: 169 MiB free in the heap at 4x128, 997 MiB at 8x256), while
HEAP_SLACK_PER_TOKEN_* grows with them. Not fitted further: adamw's count happens to
match at both settings, and dropout's peak at 4x128 moved by 60 MiB over three runs
(1266, 1288, 1326).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Estimate", "ModelShape", "MODES", "SCOPES", "dropout_kept_layers",
           "emulator_kept_layers", "estimate", "lora_param_count", "quantised_linear_bytes"]

MODES = ("forward", "mezo", "sgd", "adamw", "dropout", "block", "emulator")
SCOPES = ("full", "lora", "top_layers")
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
# The emulator's bitsandbytes runtime: residual of the 4-bit emulator at 4 x 128 (measured
# 717.9 and 717.1 MiB in two runs, counted terms 667.8 -> 50 MiB), not resolved
# further: first use of its CPU kernels, the dequantisation paths. The 8-bit emulator's
# residual was 47 MiB in one run and -10 in another (measured 778 / 721 MiB) at 4 x
# 128, but 100-120 MiB at 1 x 32 (its CPU int8 matmul has a fixed cost at small batches
# that this constant does not cover).
RUNTIME_BNB_BYTES = 50 * MIB
# edgefed's emulator layout (``adapter_layers``) over an 8-bit frozen part costs more than
# that: bench/emulator.py measured a residual of 118 MiB at 4 x 128 and 160 MiB at 4 x 256
# over the counted terms (one run each, medians of 1 and 3 processes; the 4-bit layout's
# were 18 and 18 above RUNTIME_BNB_BYTES, i.e. within it), so an 8-bit client of that
# layout adds this much: 120 MiB in all, the smaller residual (the larger batch is then
# estimated 3% under).
RUNTIME_BNB_INT8_EXTRA_BYTES = 70 * MIB
# Perturbation passes run on spaces of at least this many elements through the
# compiled kernel (protocol.perturb.COMPILE_MIN_ELEMENTS).
COMPILE_MIN_ELEMENTS = 1 << 22

# Activation elements that one decoder layer keeps for backward, per token, in units
# of H, kv and I (counted op by op for a Llama layer in fp32, SDPA attention; not
# fitted: 4x128 sgd came out within 0.3% and 8x256 within 2.7% as counted). Checked
# later with saved_tensors_hooks, autograd keeps 8 H + 2 kv + 4 I of these: q,
# rotate_half(q), k and rotate_half(k) are freed temporaries (RoPE's other factor needs
# no gradient), and the attention output's "contiguous copy" is SDPA's own output; the
# other 3 H + 2 kv stand for the heap slack (HEAP_SLACK_PER_TOKEN_* below). The values
# are kept, so sgd / adamw estimate what they did when calibrated:
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
# Heap slack per decoder layer that keeps activations, per token, in units of H and kv
# (used by dropout, block, emulator and top_layers; sgd/adamw's SAVED_PER_TOKEN_* above
# already contain it). Of adamw's 11 H + 4 kv + 4 I, autograd keeps 8 H + 2 kv + 4 I
# (counted with saved_tensors_hooks, see _layer_saved_bytes: q and rotate_half(q), k and
# rotate_half(k) are not kept, and the reshaped attention output is SDPA's own); the
# other 3 H + 2 kv is what glibc keeps of the forward's freed temporaries (RoPE products,
# projection outputs, the norms' float32 intermediates) between the kept tensors:
# mallinfo2() at the end of a LoRA forward (SmolLM2, 4 x 128) showed 169 MiB free inside
# the heap with 30 layers and 111 MiB with 15 (dropout), 3.9 MiB per layer, where
# (3 H + 2 kv) x 4 x N = 4.1 MiB. Not fitted again: the same remainder as adamw's count.
HEAP_SLACK_PER_TOKEN_H = 3.0
HEAP_SLACK_PER_TOKEN_KV = 2.0
# bitsandbytes 4-bit: elements per absmax block, and absmax values per block of the
# second (double) quantisation (bitsandbytes defaults, as QLoRA uses them).
BNB4_BLOCK = 64
BNB4_NESTED_BLOCK = 256


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


def dropout_kept_layers(layers: int, drop_ratio: float) -> int:
    """Decoder layers a stochastic-layer-dropout step runs: ceil((1 - p) L), at least 1.

    Raises:
        ValueError: ``layers`` < 1 or ``drop_ratio`` outside [0, 1).
    """
    layers = _positive_int("layers", layers)
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)) or not (
            0.0 <= drop_ratio < 1.0):
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio!r}")
    # round() first so that e.g. (1 - 0.7) * 10 = 3.0000000000000004 keeps 3 layers, not 4.
    return max(1, math.ceil(round((1.0 - drop_ratio) * layers, 9)))


def emulator_kept_layers(layers: int, keep_ratio: float) -> list[int]:
    """Indices of the decoder layers an emulator keeps: round(keep_ratio x L) of them (at
    least 1, and 2 when L >= 2), spread uniformly from the first to the last layer.

    Raises:
        ValueError: ``layers`` < 1 or ``keep_ratio`` outside (0, 1].
    """
    layers = _positive_int("layers", layers)
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not (
            0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    count = min(layers, max(min(2, layers), math.floor(keep_ratio * layers + 0.5)))
    if count == 1:
        return [0]
    return [math.floor(i * (layers - 1) / (count - 1) + 0.5) for i in range(count)]


def _layer_param_count(shape: ModelShape) -> int:
    """Parameters of one Llama decoder layer: the seven projections and two RMSNorms."""
    return _layer_linear_count(shape) + 2 * shape.hidden


def _layer_linear_count(shape: ModelShape) -> int:
    """Elements of one decoder layer's seven projection matrices."""
    return sum(rows * cols for rows, cols in _layer_linears(shape))


def _layer_linears(shape: ModelShape) -> tuple[tuple[int, int], ...]:
    """(out_features, in_features) of q, k, v, o, gate, up and down."""
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    return ((q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i))


def quantised_linear_bytes(rows: int, cols: int, bits: int) -> int:
    """Resident bytes of one bitsandbytes-quantised ``rows x cols`` weight.

    * 4-bit (``Linear4bit``, nf4, ``compress_statistics=True`` as in QLoRA): the packed
      weight (two elements a byte), one uint8 absmax per block of 64 elements
      (double-quantised), one float32 absmax per 256 of those, and the 256-entry float32
      code of that second quantisation;
    * 8-bit (``Linear8bitLt``, ``has_fp16_weights=False``): int8 elements and one float32
      scale per output row (SCB);
    * 16: unquantised bfloat16/float16.
    """
    elements = rows * cols
    if bits == 4:
        blocks = math.ceil(elements / BNB4_BLOCK)
        return (math.ceil(elements / 2) + blocks + FP32 * math.ceil(blocks / BNB4_NESTED_BLOCK)
                + FP32 * 256)
    if bits == 8:
        return elements + FP32 * rows
    if bits == 16:
        return 2 * elements
    raise ValueError(f"base_bits must be 4, 8 or 16, got {bits!r}")


def _layer_saved_bytes(shape: ModelShape, kind: str, *, act: int, bottom: bool,
                       lora_rank: int, int8_inputs: bool = False) -> float:
    """Bytes per token one decoder layer keeps for backward, plus its heap slack.

    ``kind``: "trained" (the layer's weights train, float32), "lora" (frozen weights,
    q_proj/v_proj adapters train) or "frozen" (nothing in the layer trains, but the
    gradient flows through it to a trained layer below). ``bottom``: no gradient flows
    into the layer's input (nothing below it trains), so its RMSNorm keeps nothing of
    it. ``act``: bytes of an activation element (the base's compute dtype).
    ``int8_inputs``: the projections are bitsandbytes 8-bit layers, which keep their
    input for backward. Counted with ``torch.autograd.graph.saved_tensors_hooks`` on
    SmolLM2 (unique storages per layer; every count below matched them exactly):

    * every kind: the layer input and the attention output + residual as the two
      RMSNorms keep them: float32 (over a 16-bit base: their float32 up-casts; the
      16-bit tensors themselves are not kept), 2 H x 4 (1 H x 4 at the bottom);
      SDPA's query and key after RoPE, value and output (flash path; rotate_half and
      the RoPE products of a frozen projection are not kept: their other factor, cos
      or sin, needs no gradient): 2 q + 2 kv; the MLP's gate, silu(gate) and up: 3 I;
    * "trained" adds what the weights' gradients need: both norms' normalised and
      weighted outputs, 4 H, and the input of down_proj, 1 I (the attention output
      o_proj needs is SDPA's own output: the CPU flash kernel writes it in (B, T,
      heads, head_dim) order, so the reshape before o_proj copies nothing);
    * "lora" adds the adapters' inputs (the weighted normalised input of q_proj and
      v_proj: one shared float32 tensor, 1 H x 4; over a 16-bit base peft casts it to
      float32 once per adapter, 2 H x 4) and lora_A's outputs (2 r x 4);
    * 8-bit projections keep their (16-bit) inputs: the normalised inputs of q/k/v (not
      at the bottom) and gate/up, and down_proj's, 2 H + I (o_proj's input is SDPA's
      output, kept anyway).

    To the saved tensors add the heap slack (see HEAP_SLACK_PER_TOKEN_*).
    """
    s = shape
    h, q, kv, i = s.hidden, s.q_dim, s.kv_dim, s.intermediate
    total = (1 if bottom else 2) * h * FP32 + (2 * q + 2 * kv + 3 * i) * act
    if kind == "trained":
        total += (4 * h + i) * act
    elif kind == "lora":
        adapters = 2  # q_proj and v_proj
        total += h * FP32 * (1 if act == FP32 else adapters) + adapters * lora_rank * FP32
    elif kind != "frozen":
        raise ValueError(f"unknown layer kind {kind!r}")
    if int8_inputs:
        total += ((1 if bottom else 2) * h + i) * act
    total += (HEAP_SLACK_PER_TOKEN_H * h + HEAP_SLACK_PER_TOKEN_KV * kv) * act
    return total


def _check_ratio(name: str, value: Any, low: float, high: float, *, low_open: bool,
                 high_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def estimate(shape: ModelShape, mode: str, *, batch: int, seq_len: int, scope: str = "full",
             base_dtype_bytes: int = 4, lora_rank: int = 8, chunk_tokens: int = 1024,
             label_fraction: float = 0.5, top_layers: int | None = None,
             drop_ratio: float = 0.5, block_layers: int = 1, keep_ratio: float = 0.5,
             base_bits: int = 4, adapter_layers: int | None = None, optimizer: str = "adamw",
             block_index: int | None = None) -> Estimate:
    """Estimates the peak memory of one step of ``mode``, in bytes, with a breakdown.

    Args:
        shape: the model.
        mode: one of :data:`MODES` (see the module docstring).
        batch, seq_len: the batch's rows and tokens per row (rows padded to seq_len).
        scope: "full" (every parameter trains; needs float32 weights), "lora"
            (q_proj/v_proj adapters of rank ``lora_rank`` train; the base is frozen) or
            "top_layers" (the last ``top_layers`` decoder layers and the final norm
            train in float32; needs float32 weights). ``dropout`` takes full or lora;
            ``block`` takes full (the block's weights train) or lora (the block's
            adapters train); ``emulator`` always trains LoRA adapters (its base is
            quantised), so full and lora mean the same there.
        base_dtype_bytes: bytes per element of the frozen base weights (4, 2 or 1).
            Not used by ``emulator``, whose unquantised parts are 16-bit.
        lora_rank: adapter rank (lora scope and emulator).
        chunk_tokens: rows of logits our chunked loss computes at once.
        label_fraction: share of each row that carries counted labels (the response).
        top_layers: k for the top_layers scope (1 <= k <= layers).
        drop_ratio: dropout's share p of decoder layers skipped in the step, [0, 1).
        block_layers: block's number of consecutive decoder layers trained (1..layers).
        keep_ratio: emulator's share of decoder layers kept, (0, 1].
        base_bits: emulator's bits per quantised base weight: 4 or 8 (16: the kept
            layers are not quantised, for comparison).
        adapter_layers: emulator only. None: the profiler's synthetic emulator (every
            kept layer quantised and adapted, the rest 16-bit). k: the emulator
            ``edgefed-emulator build`` writes and the fedbiot engine trains: its top k
            kept layers are the full model's adapter layers, unquantised like the
            embedding, norms and head (float32), and only they carry LoRA adapters, so
            only they keep activations for backward (no gradient goes below them).
        optimizer: emulator only: "adamw" (moments for the adapters), "sgd" (none; the
            fedbiot engine's default, ferret's round) or "zo" (with ``adapter_layers``:
            the fedbiot_zo engine's MeZO step, two forwards without autograd and the
            chunked loss over the same weights).
        block_index: block only: which block trains (one decoder layer, ``block_layers``
            1): layer ``i`` in ``[0, layers)``, or ``layers`` for the outer block (the
            embedding, final norm and head; full scope). Layers below the block run
            without keeping anything for backward; those above keep what the gradient
            needs to flow down. None: the lowest ``block_layers`` layers, the worst
            decoder block.

    Raises:
        ValueError: an unknown mode or scope, a non-positive batch / seq_len /
            chunk_tokens / lora_rank, a full or top_layers scope on non-float32 weights,
            a scope the mode does not take, top_layers or block_layers outside
            [1, layers], drop_ratio outside [0, 1), keep_ratio outside (0, 1], or
            base_bits other than 4, 8 or 16; each message names the argument.
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
    if scope in ("full", "top_layers") and base_dtype_bytes != 4 and mode != "emulator":
        raise ValueError(f"base_dtype_bytes must be 4 for the {scope} scope (trainable "
                         "parameters are float32)")
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction!r}")
    if scope == "top_layers":
        if top_layers is None:
            raise ValueError("top_layers must be given for scope='top_layers'")
        top_layers = _positive_int("top_layers", top_layers)
        if top_layers > shape.layers:
            raise ValueError(f"top_layers must be at most the model's {shape.layers} layers, "
                             f"got {top_layers}")
        if mode in ("dropout", "block", "emulator"):
            raise ValueError(f"scope must be 'full' or 'lora' for mode {mode!r}, got "
                             f"'top_layers'")
    elif top_layers is not None:
        raise ValueError(f"top_layers is only used with scope='top_layers' (scope is {scope!r})")
    drop_ratio = _check_ratio("drop_ratio", drop_ratio, 0.0, 1.0, low_open=False, high_open=True)
    keep_ratio = _check_ratio("keep_ratio", keep_ratio, 0.0, 1.0, low_open=True, high_open=False)
    block_layers = _positive_int("block_layers", block_layers)
    if block_layers > shape.layers:
        raise ValueError(f"block_layers must be at most the model's {shape.layers} layers, "
                         f"got {block_layers}")
    if isinstance(base_bits, bool) or base_bits not in (4, 8, 16):
        raise ValueError(f"base_bits must be 4 or 8 (or 16 for an unquantised emulator), "
                         f"got {base_bits!r}")
    if adapter_layers is not None:
        adapter_layers = _positive_int("adapter_layers", adapter_layers)
        if mode != "emulator":
            raise ValueError(f"adapter_layers is only used by mode 'emulator' (mode is {mode!r})")
    if optimizer not in ("adamw", "sgd", "zo"):
        raise ValueError(f"optimizer must be 'adamw', 'sgd' or 'zo', got {optimizer!r}")
    if block_index is not None:
        if mode != "block" or block_layers != 1:
            raise ValueError("block_index is only used by mode 'block' with block_layers 1")
        if isinstance(block_index, bool) or not isinstance(block_index, int) or not 0 <= block_index <= shape.layers:
            raise ValueError(f"block_index must be in [0, {shape.layers}] (layers, then the outer block), "
                             f"got {block_index!r}")
        if block_index == shape.layers and scope != "full":
            raise ValueError("the outer block (block_index == layers) trains only in the full scope")
    if optimizer == "zo" and (mode != "emulator" or adapter_layers is None):
        raise ValueError("optimizer 'zo' is the emulator's zeroth-order step: mode 'emulator' with adapter_layers")

    if mode in ("dropout", "block", "emulator") or scope == "top_layers" and mode in (
            "sgd", "adamw"):
        return _estimate_layered(shape, mode, batch=batch, seq_len=seq_len, scope=scope,
                                 base_dtype_bytes=base_dtype_bytes, lora_rank=lora_rank,
                                 top_layers=top_layers, drop_ratio=drop_ratio,
                                 block_layers=block_layers, keep_ratio=keep_ratio,
                                 base_bits=base_bits, adapter_layers=adapter_layers, optimizer=optimizer,
                                 chunk_tokens=chunk_tokens, label_fraction=label_fraction,
                                 block_index=block_index)

    s = shape
    n_tok = batch * seq_len  # N
    act = max(base_dtype_bytes, 2)  # activations come out in the weights' compute dtype
    # Counted label rows C: the response part of every row, less the last position
    # (its next token is outside the row).
    counted = batch * min(seq_len - 1, max(1, math.ceil(seq_len * label_fraction)))
    if scope == "full":
        trainable = s.param_count
    elif scope == "lora":
        trainable = lora_param_count(s, lora_rank)
    else:  # top_layers: forward / mezo over the last k layers (in place, like full)
        assert top_layers is not None
        trainable = top_layers * _layer_param_count(s) + s.hidden

    parts = dict.fromkeys(BREAKDOWN_KEYS, 0)
    # Frozen/base weights: every parameter once (tied embeddings counted once).
    parts["weights"] = s.param_count * base_dtype_bytes
    if scope == "lora":
        # fp32 adapters live beside the base weights (the base is not copied).
        parts["trainable_copy"] = trainable * FP32

    if mode in ("forward", "mezo"):
        parts["activations"], parts["logits_loss"] = _no_grad_forward_bytes(
            s, n_tok=n_tok, counted=counted, act=act, lora=scope == "lora", chunk_tokens=chunk_tokens)
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


def _no_grad_forward_bytes(s: ModelShape, *, n_tok: int, counted: int, act: int, lora: bool,
                           chunk_tokens: int) -> tuple[int, int]:
    """(activations, logits_loss) of a forward without autograd and our chunked loss."""
    # No autograd graph: only the residual stream and one layer's transients live.
    # Residual stream in and out of a layer plus the normalised input: 3 N H.
    stream = 3 * n_tok * s.hidden * act
    # The MLP's peak inside one layer: silu(gate), up and their product: 3 N I.
    mlp = 3 * n_tok * s.intermediate * act
    # Attention's peak: q, k, v, their RoPE copies and the output: 3 N q + 4 N kv.
    attn = (3 * n_tok * s.q_dim + 4 * n_tok * s.kv_dim) * act
    # A LoRA projection (peft's Linear.forward, no grad): the base output (q, in
    # the base dtype), the input cast to the adapters' float32 (H x 4, only over a
    # 16-bit base), lora_B's scaled output and its sum with the base output, both
    # float32 (type promotion), before the cast back: q x act + 2 q x 4 (+ H x 4).
    # Below the MLP's peak for Llama shapes (I >= H); counted for completeness.
    lora_proj = 0
    if lora:
        lora_proj = n_tok * (s.q_dim * act + 2 * s.q_dim * FP32 + (s.hidden * FP32 if act != FP32 else 0))
    activations = stream + max(mlp, attn, lora_proj)
    # Chunked head: the C counted hidden rows (C H) and one chunk of logits in
    # float32 (chunk x V x 4): the loss takes the chunk's log-softmax in place
    # (edge_client/loss.py). Over a 16-bit base the 16-bit chunk and its float32
    # copy briefly coexist (chunk x V x 2 more).
    rows = min(counted, chunk_tokens)
    logits_loss = counted * s.hidden * act + rows * s.vocab * (FP32 + (act if act != FP32 else 0))
    return activations, logits_loss


def _estimate_layered(shape: ModelShape, mode: str, *, batch: int, seq_len: int, scope: str,
                      base_dtype_bytes: int, lora_rank: int, top_layers: int | None,
                      drop_ratio: float, block_layers: int, keep_ratio: float,
                      base_bits: int, adapter_layers: int | None = None, optimizer: str = "adamw",
                      chunk_tokens: int = 1024, label_fraction: float = 0.5,
                      block_index: int | None = None) -> Estimate:
    """First-order steps whose layers differ: dropout, block, emulator, top_layers (and
    the emulator's zeroth-order step, which shares its weights).

    Hugging Face's loss and AdamW (SGD for ``sgd`` over top_layers) as in ``adamw``, but
    the activations are counted layer by layer with :func:`_layer_saved_bytes`: which
    layers run, which of them train, and whether a gradient reaches their input.
    """
    s = shape
    n_tok = batch * seq_len  # N
    lora_per_layer = lora_param_count(s, lora_rank) // s.layers
    parts = dict.fromkeys(BREAKDOWN_KEYS, 0)
    # (kind, bottom) of every decoder layer that runs in the step, lowest first.
    layers: list[tuple[str, bool]]
    head_trains = False  # the tied embedding / output head trains (full scopes)
    final_norm_trains = False
    int8_inputs = False
    if mode == "emulator" and adapter_layers is not None:
        # edgefed's emulator: float32 embedding (and untied head), norms and adapter
        # layers; the kept layers below the adapter quantised. Only the adapter layers
        # carry LoRA, so only they keep activations: nothing below them needs a gradient.
        act = FP32
        kept = max(len(emulator_kept_layers(s.layers, keep_ratio)), adapter_layers)
        adapter = min(adapter_layers, kept)
        quantised_layer = 2 * s.hidden * act + sum(quantised_linear_bytes(rows, cols, base_bits)
                                                   for rows, cols in _layer_linears(s))
        parts["weights"] = (s.vocab * s.hidden * (1 if s.tied_embeddings else 2) * act + s.hidden * act
                            + (kept - adapter) * quantised_layer + adapter * _layer_param_count(s) * act)
        resident = step = optimised = adapter * lora_per_layer
        if optimizer == "sgd":
            optimised = 0
        layers = [("lora", i == 0) for i in range(adapter)]
    elif mode == "emulator":
        # Unquantised 16-bit parts: the embedding (and an untied head), the kept layers'
        # RMSNorm weights and the final norm; the kept projections are quantised.
        act = 2
        kept = len(emulator_kept_layers(s.layers, keep_ratio))
        per_layer = 2 * s.hidden * act + sum(quantised_linear_bytes(rows, cols, base_bits)
                                            for rows, cols in _layer_linears(s))
        parts["weights"] = (s.vocab * s.hidden * (1 if s.tied_embeddings else 2) * act
                            + s.hidden * act + kept * per_layer)
        resident = step = optimised = kept * lora_per_layer  # adapters of the kept layers
        if optimizer == "sgd":
            optimised = 0
        layers = [("lora", i == 0) for i in range(kept)]
        int8_inputs = base_bits == 8
    else:
        act = max(base_dtype_bytes, 2)
        parts["weights"] = s.param_count * base_dtype_bytes  # every layer stays resident
        if mode == "dropout":
            kept = dropout_kept_layers(s.layers, drop_ratio)
            if scope == "lora":
                resident = optimised = s.layers * lora_per_layer
                step = kept * lora_per_layer  # only the kept layers' adapters get gradients
                layers = [("lora", i == 0) for i in range(kept)]
            else:
                resident = optimised = s.param_count
                step = s.param_count - (s.layers - kept) * _layer_param_count(s)
                layers = [("trained", False)] * kept
                head_trains = True
            # AdamW's moments: every layer has been kept in some earlier step, so in a
            # steady state every trainable element has them.
        elif mode == "block" and block_index == s.layers:
            # The outer block: the embedding (tied head) and final norm train; every layer
            # passes the gradient down to the embedding without gradients of its own.
            step = optimised = s.param_count - s.layers * _layer_param_count(s)
            resident = 0
            layers = [("frozen", False)] * s.layers
            head_trains = True
        elif mode == "block":
            kind = "trained" if scope == "full" else "lora"
            per = _layer_param_count(s) if scope == "full" else lora_per_layer
            step = optimised = block_layers * per  # BAdam: moments of the active block only
            resident = s.layers * lora_per_layer if scope == "lora" else 0
            # The worst block is the lowest: every layer above keeps what the gradient
            # needs to flow down through it, without gradients for its weights; the
            # block's gradients appear at the end of backward, after the others are freed.
            # A higher block (block_index) keeps nothing for the layers below it.
            above = s.layers - block_layers if block_index is None else s.layers - 1 - block_index
            layers = [(kind, i == 0) for i in range(block_layers)] + [("frozen", False)] * above
        else:  # sgd / adamw over the top_layers scope
            assert top_layers is not None
            step = optimised = top_layers * _layer_param_count(s) + s.hidden  # + final norm
            resident = 0  # trained in place (float32 base)
            layers = [("trained", i == 0) for i in range(top_layers)]
            final_norm_trains = True
            if mode == "sgd":
                optimised = 0
    if scope == "lora" or mode == "emulator":
        parts["trainable_copy"] = resident * FP32  # float32 adapters beside the base
    # edgefed's layout over an 8-bit frozen part: bitsandbytes' int8 path costs more (measured).
    int8_extra = RUNTIME_BNB_INT8_EXTRA_BYTES if (mode == "emulator" and adapter_layers is not None
                                                  and base_bits == 8) else 0
    if optimizer == "zo":
        # The emulator's zeroth-order step (fedbiot_zo): MeZO's two forwards without
        # autograd and the chunked loss, over the same weights (float32 activations).
        counted = batch * min(seq_len - 1, max(1, math.ceil(seq_len * label_fraction)))
        parts["activations"], parts["logits_loss"] = _no_grad_forward_bytes(
            s, n_tok=n_tok, counted=counted, act=act, lora=True, chunk_tokens=chunk_tokens)
        parts["overhead"] = RUNTIME_NOGRAD_BYTES + RUNTIME_BNB_BYTES + int8_extra
        return Estimate(mode, {k: int(v) for k, v in parts.items()})

    per_token = sum(_layer_saved_bytes(s, kind, act=act, bottom=bottom, lora_rank=lora_rank,
                                       int8_inputs=int8_inputs) for kind, bottom in layers)
    # The final RMSNorm: its input (float32, or its float32 up-cast); when it or the head
    # trains also its normalised and weighted outputs (3 H, as ``adamw``'s 3 N H).
    per_token += 3 * s.hidden * act if (head_trains or final_norm_trains) else s.hidden * FP32
    parts["activations"] = int(n_tok * per_token)
    # Hugging Face's loss at the start of backward: the logits the output holds (in the
    # base's dtype), log_softmax's float32 output, its gradient and the logits' float32
    # gradient (``.float()`` of 16-bit logits is a temporary of the forward).
    logits_held = n_tok * s.vocab * act
    parts["logits_loss"] = logits_held + int((HF_LOGITS_COPIES - 1) * n_tok * s.vocab * FP32)
    # Gradients alive at that point: only the head's weight gradient (V H x 4) when the
    # head trains; every layer's gradients appear later, as backward reaches the layer
    # and frees what it kept (for the LoRA scopes this differs from sgd / adamw, which
    # count the adapters' gradients here: a few MiB).
    early_grads = s.vocab * s.hidden * FP32 if head_trains else 0
    tied_extra = s.vocab * s.hidden * FP32 if (head_trains and s.tied_embeddings) else 0
    late = step * FP32 + tied_extra + logits_held
    early = early_grads + parts["activations"] + parts["logits_loss"]
    if late > early:
        parts["gradients"] = step * FP32 + tied_extra
        parts["activations"] = 0
        parts["logits_loss"] = logits_held
    else:
        parts["gradients"] = early_grads
    if mode != "sgd":
        parts["optimizer_state"] = 2 * optimised * FP32
    parts["overhead"] = RUNTIME_AUTOGRAD_BYTES
    if mode == "emulator":
        parts["overhead"] += RUNTIME_BNB_BYTES + int8_extra
    return Estimate(mode, {k: int(v) for k, v in parts.items()})
