"""Measures the peak memory of each training mode and compares it with the estimate.

Run it anywhere edgefed is importable (it needs only the installed package)::

    python -m profiles.profiler --model smollm2-135m --batch 4 --seq-len 128 \\
        --modes forward,mezo,sgd,adamw --out profiles/data/cpu-smollm2-b4-t128.json

For every mode a fresh child process (``python -m profiles.profiler --child MODE ...``)
imports torch and transformers, records the interpreter baseline (resident memory after
the imports, before anything is loaded), loads the model, builds a synthetic batch
(random token ids; the first half of every row is prompt, labelled -100, the second
half response), prepares the mode (parameter space, optimizer, compiled kernels), frees
what loading left behind, resets the high-water mark, runs the operation twice and
reports the peak:

* CPU: ``VmHWM`` (reset through ``/proc/self/clear_refs`` right before the operation)
  minus the interpreter baseline, i.e. the weights are inside the measured peak, as
  they are inside the estimate;
* CUDA: ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) after
  ``reset_peak_memory_stats``; nothing is allocated on the device before loading, so
  the baseline is zero. (Written, not tested here: this machine has no GPU.)

The parent compares each peak with :func:`profiles.estimator.estimate`, writes a JSON
profile and prints a table. The last line on stdout is the profile as one JSON object.

Modes: ``forward`` (our chunked loss under no_grad), ``mezo`` (one MeZOEngine.step on
the full-parameter space), ``sgd`` and ``adamw`` (``model(**batch, labels=...).loss``
backward + optimizer step + ``zero_grad(set_to_none=True)`` on every parameter), and
the same first-order step with AdamW for:

* ``block``: one block of a cyclic block update (FedCyBGD / BAdam): ``requires_grad``
  only on the parameters of the lowest ``--block-layers`` decoder layers (layer 0 is the
  worst case: every layer above keeps activations for backward) and AdamW on them;
* ``dropout``: DropPEFT-style stochastic layer dropout: peft LoRA on q_proj/v_proj (or
  ``--scope full``), and for each step ``model.model.layers`` is replaced by a
  ``torch.nn.ModuleList`` of ceil((1 - p) L) layers drawn at random (p =
  ``--drop-ratio``, 0.5), restored afterwards. The skipped layers stay resident: every
  weight is read once before the baseline (they are memory-mapped from the safetensors
  file, and a layer no step has run would otherwise not be resident yet);
* ``emulator``: FedBiOT-style emulator: the model loads in bfloat16, half the decoder
  layers are dropped (``--keep-ratio`` 0.5, uniformly, keeping the first and the last;
  the dropped ones are freed), every ``nn.Linear`` of the kept layers becomes a
  bitsandbytes ``Linear4bit`` (nf4, double-quantised absmax, bfloat16 compute) or, with
  ``--base-bits 8``, a ``Linear8bitLt`` (int8 weights, per-row scales, no outlier
  threshold), and peft LoRA q_proj/v_proj adapters (float32) train. Needs
  ``bitsandbytes`` (CPU kernels since 0.45); without it the child exits with status 3
  and :func:`profile` reports the mode as estimated, not measured. The model runs in
  training mode here: in eval mode bitsandbytes repacks 4-bit weights for its CPU
  inference kernel on the first no-grad call, which is not what a training step pays.

Variants (``--scope``, ``--base-dtype``, ``--top-layers``, ``--base-bits``, or per mode
in ``--modes`` as ``MODE:TOKEN+TOKEN``, see :func:`parse_mode_spec`): ``lora`` trains
peft LoRA adapters (q_proj and v_proj, rank ``--lora-rank`` 8, float32) on a frozen
base, for forward, mezo, sgd, adamw and dropout; ``bf16`` loads that base in bfloat16;
``top4`` trains the last 4 decoder layers and the final norm (sgd, adamw); ``8bit``
the emulator's 8-bit base. E.g. ``--modes adamw:lora,forward:lora+bf16,emulator:8bit``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The directory holding the ``profiles`` package (the repository root, or site-packages
# in an installed copy). A child runs there so that ``python -m profiles.profiler``
# imports this very copy of the code, not whatever the caller's directory holds.
IMPORT_ROOT = Path(__file__).resolve().parent.parent
MODES = ("forward", "mezo", "sgd", "adamw", "block", "dropout", "emulator")
FIRST_ORDER = ("sgd", "adamw", "block", "dropout", "emulator")
SCOPED_MODES = ("forward", "mezo", "sgd", "adamw", "dropout")  # the modes --scope applies to
BASE_DTYPES = ("float32", "bfloat16")
MIB = 1024 * 1024
SEED = 1234567
EPSILON = 1e-3
LEARNING_RATE = 1e-6
LORA_TARGETS = ("q_proj", "v_proj")
LORA_ALPHA = 16.0
# Exit status of a child whose mode cannot run here (a missing optional package).
EXIT_UNAVAILABLE = 3
# Exit status of a child that cannot load the model it was given (a bad --model).
EXIT_BAD_MODEL = 4

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _log(message: str) -> None:
    print(f"[profiler] {message}", file=sys.stderr, flush=True)


class ModeUnavailable(RuntimeError):
    """A mode cannot be measured on this machine (e.g. bitsandbytes is missing)."""


class BadModelSource(ValueError):
    """The model to profile cannot be found or loaded (the message says why, in a line)."""


@dataclass(frozen=True)
class ModeOptions:
    """The knobs of the modes beyond batch and sequence length.

    Attributes:
        scope: "full" or "lora" for the modes of :data:`SCOPED_MODES`, or
            "top_layers" for sgd and adamw (None: the mode's default, lora for dropout,
            full for the others); block and emulator fix their own.
        top_layers: k of the top_layers scope (the last k decoder layers and the final
            norm train in float32).
        base_dtype: "float32" or "bfloat16" (lora scope only): the dtype the base loads
            in; the adapters stay float32.
        lora_rank: rank of the q_proj / v_proj adapters.
        drop_ratio: dropout's share p of decoder layers skipped per step.
        block_layers: block's number of consecutive trained layers (from layer 0).
        keep_ratio: emulator's share of decoder layers kept.
        base_bits: emulator's quantisation of the kept layers' linear weights (4 or 8).
    """

    scope: str | None = None
    top_layers: int = 2
    base_dtype: str = "float32"
    lora_rank: int = 8
    drop_ratio: float = 0.5
    block_layers: int = 1
    keep_ratio: float = 0.5
    base_bits: int = 4

    def scope_for(self, mode: str) -> str:
        """The scope ``mode`` runs with (what the estimate is asked for)."""
        if mode == "block":
            return "full"
        if mode == "emulator":
            return "lora"
        if mode in SCOPED_MODES and self.scope is not None:
            return self.scope
        return "lora" if mode == "dropout" else "full"

    def dtype_for(self, mode: str) -> str:
        """The dtype the base weights load in for ``mode``."""
        if mode == "emulator":
            return "bfloat16"
        return self.base_dtype if self.scope_for(mode) == "lora" else "float32"

    def check(self, mode: str) -> None:
        """Raises ValueError for a combination the child cannot run."""
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base dtype must be one of {', '.join(BASE_DTYPES)}, "
                             f"got {self.base_dtype!r}")
        if (self.base_dtype != "float32" and mode != "emulator"
                and self.scope_for(mode) != "lora"):
            raise ValueError(f"{mode}: a {self.base_dtype} base needs the lora scope (the "
                             "full scope trains float32 weights)")
        if self.base_bits not in (4, 8):
            raise ValueError(f"base bits must be 4 or 8, got {self.base_bits!r}")
        if self.scope_for(mode) == "top_layers" and mode not in ("sgd", "adamw"):
            raise ValueError(f"the top_layers scope is measured for sgd and adamw only, "
                             f"not {mode}")
        if self.top_layers < 1:
            raise ValueError(f"top layers must be >= 1, got {self.top_layers}")

    def estimate_kwargs(self, mode: str) -> dict[str, Any]:
        """The :func:`profiles.estimator.estimate` keyword arguments matching ``mode``."""
        kwargs: dict[str, Any] = {"scope": self.scope_for(mode), "lora_rank": self.lora_rank}
        if kwargs["scope"] == "top_layers":
            kwargs["top_layers"] = self.top_layers
        if mode != "emulator" and self.dtype_for(mode) == "bfloat16":
            kwargs["base_dtype_bytes"] = 2
        if mode == "dropout":
            kwargs["drop_ratio"] = self.drop_ratio
        elif mode == "block":
            kwargs["block_layers"] = self.block_layers
        elif mode == "emulator":
            kwargs.update(keep_ratio=self.keep_ratio, base_bits=self.base_bits)
        return kwargs

    def label(self, mode: str) -> str:
        """A short name of the variant, e.g. ``adamw/lora``, ``dropout/p0.5``."""
        parts = [mode]
        scope = self.scope_for(mode)
        if scope == "top_layers":
            parts.append(f"top{self.top_layers}")
        elif mode in SCOPED_MODES and scope != ("lora" if mode == "dropout" else "full"):
            parts.append(scope)
        if mode == "dropout":
            parts.insert(1, f"p{self.drop_ratio:g}")
        elif mode == "block":
            parts.append(f"{self.block_layers}")
        elif mode == "emulator":
            parts.append(f"{self.base_bits}bit")
        if mode != "emulator" and self.dtype_for(mode) == "bfloat16":
            parts.append("bf16")
        return "/".join(parts)


# ---------------------------------------------------------------------------
# Child: one mode in a fresh process
# ---------------------------------------------------------------------------


def _decoder(model: Any) -> Any:
    """The module holding ``layers`` (LlamaModel), through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise SystemExit(f"{type(base).__name__} has no model.layers; block, dropout and "
                         "emulator need a Llama-style decoder")
    return inner


def _apply_lora(model: Any, rank: int) -> Any:
    """peft LoRA on q_proj / v_proj (float32 adapters; the base stays frozen)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS),
                        lora_dropout=0.0, bias="none")
    wrapped = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.float32)
    return wrapped


def _quantise_linears(module: Any, bits: int) -> None:
    """Replaces every ``nn.Linear`` under ``module`` by a bitsandbytes 4- or 8-bit one."""
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ModeUnavailable(f"the emulator needs bitsandbytes ({e})") from e
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            weight = child.weight.data
            if bits == 4:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4",
                                          compress_statistics=True)
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False,
                                            has_fp16_weights=False, threshold=0.0)
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False,
                                                 has_fp16_weights=False)
            if child.bias is not None:
                raise SystemExit("the emulator child expects bias-free linear layers")
            setattr(parent, name, layer.to(weight.device))  # .to() quantises
            del child, weight


def _first_order_op(model: Any, batch: Any, optimizer: Any,
                    before: Callable[[int], None] | None = None,
                    after: Callable[[], None] | None = None) -> Callable[[], float]:
    """``loss.backward(); optimizer.step(); zero_grad(set_to_none=True)`` as one op."""
    calls = [0]

    def op() -> float:
        if before is not None:
            before(calls[0])
        calls[0] += 1
        try:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        labels=batch.labels)
            loss = out.loss
            loss.backward()
            value = float(loss.detach())
            del out, loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            if after is not None:
                after()
        return value
    return op


def _child(mode: str, source: str, batch_size: int, seq_len: int, device: str, ops: int,
           chunk_tokens: int, options: ModeOptions) -> dict[str, Any]:
    # Imports first, then the baseline: the interpreter with torch, transformers and our
    # modules loaded is what a client process costs before it holds a model.
    import torch
    import transformers  # noqa: F401

    from edge_client.data import Batch
    from edge_client.engines.mezo import MeZOSettings, MeZOEngine
    from edge_client.loss import causal_lm_loss
    from edge_client.model import load_model, resolve_model
    from edge_client.scope import ScopeConfig, build_space
    from profiles import procmem
    from profiles.estimator import dropout_kept_layers, emulator_kept_layers

    scope = options.scope_for(mode)
    if scope == "lora" or mode == "emulator":
        import peft  # noqa: F401  # a LoRA client imports it before it loads anything
    if mode == "emulator":
        try:
            import bitsandbytes  # noqa: F401
        except (ImportError, RuntimeError, OSError) as e:  # missing, or no usable backend
            raise ModeUnavailable(f"the emulator needs bitsandbytes ({e})") from e

    cuda = device.startswith("cuda")
    procmem.release_free_memory()
    interp_rss_kib = procmem.status_kib("VmRSS")

    dtype = torch.bfloat16 if options.dtype_for(mode) == "bfloat16" else torch.float32
    model, _ = load_model(resolve_model(source), device=device, dtype=dtype)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100  # the prompt half is not counted
    batch = Batch(input_ids=input_ids.to(device),
                  attention_mask=torch.ones_like(input_ids).to(device),
                  labels=labels.to(device))
    extra: dict[str, Any] = {}

    if mode == "forward":
        if scope == "lora":
            model = _apply_lora(model, options.lora_rank)

        def op() -> float:
            return causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)[0]
    elif mode == "mezo":
        model, space = build_space(model, ScopeConfig(kind=scope, lora_rank=options.lora_rank))
        engine = MeZOEngine(model, space, MeZOSettings(chunk_tokens=chunk_tokens))
        space.apply(SEED, 0.0)  # compiles the perturbation kernel once, before the baseline

        def op() -> float:
            _, plus, minus = engine.step(SEED, batch, LEARNING_RATE, EPSILON)
            return 0.5 * (plus + minus)
    elif mode in FIRST_ORDER:
        before: Callable[[int], None] | None = None
        after: Callable[[], None] | None = None
        if mode == "emulator":
            decoder = _decoder(model)
            layers = decoder.layers
            kept = emulator_kept_layers(len(layers), options.keep_ratio)
            decoder.layers = torch.nn.ModuleList([layers[i] for i in kept])
            del layers  # the dropped layers are freed (release_free_memory below)
            _quantise_linears(decoder.layers, options.base_bits)
            extra["kept_layers"] = kept
            model.train()  # see the module docstring (no inference repacking)
        if scope == "lora" and mode != "block":
            model = _apply_lora(model, options.lora_rank)
        elif mode == "block":
            model.requires_grad_(False)
            for layer in _decoder(model).layers[: options.block_layers]:
                layer.requires_grad_(True)
        elif scope == "top_layers":
            model.requires_grad_(False)
            decoder = _decoder(model)
            for layer in decoder.layers[-options.top_layers:]:
                layer.requires_grad_(True)
            decoder.norm.requires_grad_(True)
        else:
            model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        extra["trainable_parameters"] = sum(p.numel() for p in params)
        if mode == "sgd":
            optimizer: Any = torch.optim.SGD(params, lr=LEARNING_RATE)
        else:
            optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
        if mode == "dropout":
            decoder = _decoder(model)
            all_layers = decoder.layers
            count = dropout_kept_layers(len(all_layers), options.drop_ratio)
            extra["kept_layers"] = []
            # The weights are memory-mapped from the safetensors file and become
            # resident when first read. Read every one now, so that the skipped layers
            # are resident as after any number of steps (the estimate counts them).
            with torch.no_grad():
                for param in model.parameters():
                    param.sum()

            def drop_layers(call: int) -> None:
                # DropPEFT draws the kept layers anew for every step.
                kept = sorted(random.Random(SEED + call).sample(range(len(all_layers)), count))
                extra["kept_layers"].append(kept)
                decoder.layers = torch.nn.ModuleList([all_layers[i] for i in kept])

            def restore_layers() -> None:
                decoder.layers = all_layers

            before, after = drop_layers, restore_layers
        op = _first_order_op(model, batch, optimizer, before, after)
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    procmem.release_free_memory()
    loaded_rss_kib = procmem.status_kib("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        loaded_device = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    reset = procmem.hwm_reset()
    seconds, losses = [], []
    for _ in range(ops):
        start = time.perf_counter()
        losses.append(op())
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak_hwm_kib = procmem.status_kib("VmHWM") if reset else None
    if peak_hwm_kib is None:
        peak_hwm_kib = procmem.ru_maxrss_kib()
    result = {
        "mode": mode,
        "options": asdict(options),
        "scope": scope,
        "hwm_reset": reset,
        "interp_rss_kib": interp_rss_kib,
        "loaded_rss_kib": loaded_rss_kib,
        "peak_hwm_kib": peak_hwm_kib,
        "host_peak_bytes": (peak_hwm_kib - interp_rss_kib) * 1024,
        "loaded_bytes": (loaded_rss_kib - interp_rss_kib) * 1024,
        "op_seconds": seconds,
        "losses": losses,
        "config": config.to_dict(),
        # The full model's count (before any layer was dropped): what the estimate's
        # ModelShape describes.
        "num_parameters": _original_parameter_count(config, model, mode),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        **extra,
    }
    if cuda:
        result["device_peak_allocated"] = torch.cuda.max_memory_allocated()
        result["device_peak_reserved"] = torch.cuda.max_memory_reserved()
        result["device_loaded_allocated"] = loaded_device
        result["device_name"] = torch.cuda.get_device_name()
        result["measured_bytes"] = result["device_peak_allocated"]
    else:
        result["measured_bytes"] = result["host_peak_bytes"]
    return result


def _original_parameter_count(config: Any, model: Any, mode: str) -> int | None:
    """``model.num_parameters()`` of the unmodified model (tied weights once).

    For the emulator (layers dropped, weights packed) it is not countable from the
    modules any more: None, and the estimate's shape uses the Llama count implied by the
    config. LoRA adapters are not counted (the estimate adds them itself).
    """
    if mode == "emulator":
        return None
    seen: set[int] = set()
    total = 0
    for name, param in model.named_parameters():
        if "lora_" in name or id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def run_child(mode: str, source: str, batch_size: int, seq_len: int, *, device: str = "cpu",
              ops: int = 2, chunk_tokens: int = 1024, options: ModeOptions | None = None
              ) -> dict[str, Any]:
    """Runs one mode in a fresh interpreter and returns its measurement dict.

    Raises:
        ModeUnavailable: the mode cannot run on this machine (a missing package).
        BadModelSource: the child cannot load ``source``.
        RuntimeError: the child failed for another reason (its stderr is echoed).
    """
    options = options or ModeOptions()
    if Path(source).exists():  # a model directory relative to the caller, not to the child
        source = str(Path(source).resolve())
    command = [sys.executable, "-m", "profiles.profiler", "--child", mode, "--model", source,
               "--batch", str(batch_size), "--seq-len", str(seq_len), "--device", device,
               "--ops", str(ops), "--chunk-tokens", str(chunk_tokens),
               "--lora-rank", str(options.lora_rank), "--drop-ratio", str(options.drop_ratio),
               "--block-layers", str(options.block_layers),
               "--keep-ratio", str(options.keep_ratio), "--base-bits", str(options.base_bits),
               "--base-dtype", options.base_dtype, "--top-layers", str(options.top_layers)]
    if options.scope is not None:
        command += ["--scope", options.scope]
    done = subprocess.run(command, capture_output=True, text=True, cwd=IMPORT_ROOT)
    if done.returncode == EXIT_UNAVAILABLE:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise ModeUnavailable(lines[-1] if lines else f"{mode} cannot run here")
    if done.returncode == EXIT_BAD_MODEL:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise BadModelSource(lines[-1] if lines else f"cannot load the model {source!r}")
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"the {mode} child failed with exit status {done.returncode}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


def parse_mode_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A mode with optional variant tokens: ``MODE[:TOKEN[+TOKEN...]]``.

    Tokens: ``full`` / ``lora`` (the scope, for :data:`SCOPED_MODES`), ``topK`` (the
    top_layers scope with k = K, for sgd and adamw), ``bf16`` /
    ``fp32`` (the base dtype, lora scope), ``4bit`` / ``8bit`` (the emulator's base).
    ``"adamw:lora"`` -> ("adamw", {"scope": "lora"}); ``"forward:lora+bf16"`` ->
    ("forward", {"scope": "lora", "base_dtype": "bfloat16"}).

    Raises:
        ValueError: an unknown mode or token, or a token the mode does not take.
    """
    mode, _, rest = spec.strip().partition(":")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    overrides: dict[str, Any] = {}
    for token in filter(None, rest.split("+")):
        if token in ("full", "lora"):
            if mode not in SCOPED_MODES:
                raise ValueError(f"a scope applies only to {', '.join(SCOPED_MODES)}; "
                                 f"got {spec!r}")
            overrides["scope"] = token
        elif token.startswith("top") and token[3:].isdigit() and int(token[3:]) >= 1:
            if mode not in ("sgd", "adamw"):
                raise ValueError(f"the top_layers scope is measured for sgd and adamw only; "
                                 f"got {spec!r}")
            overrides.update(scope="top_layers", top_layers=int(token[3:]))
        elif token in ("bf16", "fp32"):
            overrides["base_dtype"] = "bfloat16" if token == "bf16" else "float32"
        elif token in ("4bit", "8bit"):
            if mode != "emulator":
                raise ValueError(f"4bit / 8bit applies only to the emulator; got {spec!r}")
            overrides["base_bits"] = int(token[0])
        else:
            raise ValueError(f"unknown variant {token!r} in {spec!r} (full, lora, topK, "
                             "bf16, fp32, 4bit, 8bit)")
    return mode, overrides


def profile(source: str, batch_size: int, seq_len: int, modes: list[str], *,
            device: str = "cpu", ops: int = 2, chunk_tokens: int = 1024,
            options: ModeOptions | None = None) -> dict[str, Any]:
    """Measures every mode in its own child and pairs it with the estimate.

    ``modes`` are names, optionally with variant tokens (``"adamw:lora"``, see
    :func:`parse_mode_spec`) that override ``options`` for that entry. A mode
    that cannot run here (:class:`ModeUnavailable`) is listed under ``"unmeasured"``
    with its estimate and the reason, not in ``"profiles"``.
    """
    from profiles.estimator import ModelShape, estimate

    base_options = options or ModeOptions()
    entries: list[dict[str, Any]] = []
    unmeasured: list[dict[str, Any]] = []
    versions: dict[str, Any] = {}
    shape: ModelShape | None = None
    for spec in modes:
        mode, overrides = parse_mode_spec(spec)
        mode_options = ModeOptions(**{**asdict(base_options), **overrides})
        mode_options.check(mode)
        label = mode_options.label(mode)
        kwargs = mode_options.estimate_kwargs(mode)
        _log(f"{label}: batch {batch_size} x {seq_len} in a fresh child ...")
        try:
            child = run_child(mode, source, batch_size, seq_len, device=device, ops=ops,
                              chunk_tokens=chunk_tokens, options=mode_options)
        except ModeUnavailable as e:
            _log(f"{label}: not measured here: {e}")
            unmeasured.append({"mode": mode, "label": label, "batch": batch_size,
                               "seq_len": seq_len, "reason": str(e), "estimate_kwargs": kwargs})
            continue
        shape = ModelShape.from_hf_config(child["config"], num_parameters=child["num_parameters"])
        est = estimate(shape, mode, batch=batch_size, seq_len=seq_len,
                       chunk_tokens=chunk_tokens, **kwargs)
        measured = child["measured_bytes"]
        versions = {"torch": child["torch"], "transformers": child["transformers"],
                    "threads": child["threads"]}
        entries.append({
            "mode": mode,
            "label": label,
            "estimate_kwargs": kwargs,
            "batch": batch_size,
            "seq_len": seq_len,
            "measured_bytes": measured,
            "estimated_bytes": est.total,
            "rel_error": (est.total - measured) / measured,
            "breakdown": est.breakdown,
            "loaded_bytes": child["loaded_bytes"],
            "step_seconds": min(child["op_seconds"]),
            "op_seconds": child["op_seconds"],
            "hwm_reset": child["hwm_reset"],
            **({k: child[k] for k in ("device_peak_allocated", "device_peak_reserved",
                                      "trainable_parameters", "kept_layers") if k in child}),
        })
    if shape is not None:
        for item in unmeasured:
            est = estimate(shape, item["mode"], batch=batch_size, seq_len=seq_len,
                           chunk_tokens=chunk_tokens, **item["estimate_kwargs"])
            item["estimated_bytes"] = est.total
            item["breakdown"] = est.breakdown
    return {
        "device": {"kind": device, "platform": platform.platform(),
                   "machine": platform.machine(), "cpus": os.cpu_count(),
                   "measure": "cuda max_memory_allocated" if device.startswith("cuda")
                   else "VmHWM above interpreter baseline"},
        **versions,
        "python": platform.python_version(),
        "model": source,
        "profiles": entries,
        "unmeasured": unmeasured,
    }


def format_table(entries: list[dict[str, Any]], unmeasured: list[dict[str, Any]] | None = None
                 ) -> str:
    """One row per entry: mode (variant), setting, estimated and measured MiB, error.

    ``unmeasured`` rows (modes that could not run here) show their estimate and
    "estimated, not measured".
    """
    rows = [f"{'mode':<18}{'setting':>9}{'estimated MiB':>15}{'measured MiB':>14}"
            f"{'error %':>9}{'step s':>9}"]
    for e in entries:
        rows.append(f"{e.get('label', e['mode']):<18}"
                    f"{str(e['batch']) + 'x' + str(e['seq_len']):>9}"
                    f"{e['estimated_bytes'] / MIB:>15.1f}{e['measured_bytes'] / MIB:>14.1f}"
                    f"{100 * e['rel_error']:>+9.1f}{e['step_seconds']:>9.2f}")
    for e in unmeasured or []:
        estimated = (f"{e['estimated_bytes'] / MIB:>15.1f}" if "estimated_bytes" in e
                     else f"{'-':>15}")
        rows.append(f"{e.get('label', e['mode']):<18}"
                    f"{str(e['batch']) + 'x' + str(e['seq_len']):>9}{estimated}"
                    f"  estimated, not measured ({e['reason']})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes, each optionally with variants "
                             "MODE:TOKEN+TOKEN (full, lora, topK, bf16, fp32, 4bit, 8bit; "
                             "e.g. adamw:lora, forward:lora+bf16); default every mode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ops", type=int, default=2, help="operations per child (default 2)")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--scope", choices=("full", "lora", "top_layers"), default=None,
                        help="what forward / mezo / sgd / adamw / dropout train (default: "
                             "lora for dropout, full for the others)")
    parser.add_argument("--top-layers", type=int, default=2,
                        help="k of --scope top_layers (default 2)")
    parser.add_argument("--base-dtype", choices=BASE_DTYPES, default="float32",
                        help="dtype of the frozen base under the lora scope (default float32)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--drop-ratio", type=float, default=0.5,
                        help="dropout: share of decoder layers skipped per step (default 0.5)")
    parser.add_argument("--block-layers", type=int, default=1,
                        help="block: consecutive decoder layers trained (default 1)")
    parser.add_argument("--keep-ratio", type=float, default=0.5,
                        help="emulator: share of decoder layers kept (default 0.5)")
    parser.add_argument("--base-bits", type=int, choices=(4, 8), default=4,
                        help="emulator: bits of the kept layers' linear weights (default 4)")
    parser.add_argument("--out", type=Path, help="where to write the JSON profile")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq_len < 4 or args.ops < 1:
        parser.error("--batch and --ops must be >= 1 and --seq-len >= 4")
    if args.lora_rank < 1 or args.block_layers < 1:
        parser.error("--lora-rank and --block-layers must be >= 1")
    if not 0.0 <= args.drop_ratio < 1.0:
        parser.error(f"--drop-ratio must be in [0, 1), got {args.drop_ratio}")
    if not 0.0 < args.keep_ratio <= 1.0:
        parser.error(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    options = ModeOptions(scope=args.scope, top_layers=args.top_layers,
                          base_dtype=args.base_dtype, lora_rank=args.lora_rank,
                          drop_ratio=args.drop_ratio, block_layers=args.block_layers,
                          keep_ratio=args.keep_ratio, base_bits=args.base_bits)

    source = args.model
    if Path(source).exists():
        source = str(Path(source).resolve())
    if args.child:
        from edge_client.model import ModelLoadError

        try:
            options.check(args.child)
            result = _child(args.child, source, args.batch, args.seq_len, args.device, args.ops,
                            args.chunk_tokens, options)
        except ModeUnavailable as e:
            print(str(e), file=sys.stderr, flush=True)
            return EXIT_UNAVAILABLE
        except ModelLoadError as e:  # the user's input, not a fault: one line, no traceback
            print(str(e), file=sys.stderr, flush=True)
            return EXIT_BAD_MODEL
        print(json.dumps(result), flush=True)
        return 0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        parser.error(f"--modes must name some of {', '.join(MODES)}; got {args.modes!r}")
    for spec in modes:
        try:
            mode, overrides = parse_mode_spec(spec)
            ModeOptions(**{**asdict(options), **overrides}).check(mode)
        except ValueError as e:
            parser.error(f"--modes: {e}")
    try:
        result = profile(source, args.batch, args.seq_len, modes, device=args.device,
                         ops=args.ops, chunk_tokens=args.chunk_tokens, options=options)
    except BadModelSource as e:
        print(f"profiler: error: --model: {e}", file=sys.stderr)
        return 2
    print(format_table(result["profiles"], result["unmeasured"]), file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        _log(f"wrote {args.out}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
