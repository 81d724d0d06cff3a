"""bitsandbytes quantisation for the FedBiOT emulator's frozen part.

A client too small for the full model loads the emulator (:mod:`edge_client.emulator`)
with the Linear layers of its frozen, compressed part quantised by bitsandbytes, through
transformers' own integration (:class:`transformers.BitsAndBytesConfig`), and keeps its
adapter layers, final norm and output head in float32:

* ``"nf4"``: ``Linear4bit`` with 4-bit NormalFloat weights, double-quantised absmax
  (QLoRA's defaults, which :func:`profiles.estimator.quantised_linear_bytes` counts)
  and float32 compute;
* ``"int8"``: ``Linear8bitLt`` with int8 weights and a float32 scale per output row
  (LLM.int8(), transformers' default outlier threshold).

:func:`quantization_support` says whether bitsandbytes can actually run a mode on a
device, by running a small quantised layer forward and backward and checking the numbers;
the chooser calls it so that it never offers a mode this machine cannot run.

bitsandbytes is imported lazily, only here: importing it can be slow, print long
diagnostics, or fail outright on a machine without a supported backend.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

__all__ = [
    "INT8_THRESHOLD",
    "QUANTIZATIONS",
    "QUANTIZATION_BITS",
    "bnb_config",
    "check_quantization",
    "is_quantized_linear",
    "model_bytes",
    "prepare_quantized",
    "quantization_support",
    "quantized_linears",
]

QUANTIZATIONS = ("nf4", "int8")
"""The quantisations a client can load the emulator's frozen part in."""

QUANTIZATION_BITS = {"nf4": 4, "int8": 8}
"""Weight bits of each quantisation (the memory model's ``base_bits``)."""

INT8_THRESHOLD = 6.0
"""LLM.int8()'s outlier threshold: transformers' default for ``load_in_8bit``. It only
matters in eval mode: on CPU, bitsandbytes' training-mode 8-bit matmul dequantises the
weight and ignores it."""

# Relative error (Frobenius norm of the difference over that of the float32 result) that
# the probe allows between a quantised layer and the float32 layer it was made from, for
# the output and for the gradient at the input. Measured on the probe's 64 x 64 layer
# (bitsandbytes 0.50.2, CPU): nf4 0.103 (output) / 0.089 (gradient), int8 0.009 / 0.006.
# A kernel that computes garbage or drops the gradient is off by about 1 or more.
_PROBE_TOLERANCE = {"nf4": 0.2, "int8": 0.05}
_PROBE_FEATURES = 64  # one bitsandbytes 4-bit block per row; 2 x 64 inputs

_quiet_logs_done = False


def check_quantization(quantization: str) -> str:
    """Returns ``quantization`` if it is one of :data:`QUANTIZATIONS`.

    Raises:
        ValueError: It is not.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None), got {quantization!r}"
        )
    return quantization


def bnb_config(quantization: str, skip_modules: list[str]) -> BitsAndBytesConfig:
    """transformers' quantisation config for ``quantization``, leaving ``skip_modules`` alone.

    ``skip_modules`` are module paths (``"model.layers.3"``, ``"lm_head"``) whose Linear
    layers stay unquantised; transformers adds no default skips when a list is given, so
    the output head must be in it.
    """
    check_quantization(quantization)
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=list(skip_modules),
        )
    return BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=INT8_THRESHOLD,
        llm_int8_skip_modules=list(skip_modules),
    )


def _bnb() -> Any:
    """Imports bitsandbytes with its irrelevant start-up noise silenced (see below)."""
    _quiet_bnb_logs()
    import bitsandbytes

    return bitsandbytes


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self._prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._prefixes)


def _quiet_bnb_logs() -> None:
    """Drops two bitsandbytes warnings that say nothing useful about how edgefed runs it.

    * On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch an optional
      ``kernels-community`` CPU kernel and warns when it cannot. That kernel only serves
      the repacked 4-bit inference path, which :func:`prepare_quantized` turns off.
    * In eval mode every 8-bit matmul warns that its float32 input is cast to float16 (a
      line per layer per forward). That cast is how LLM.int8() quantises its input.
    """
    global _quiet_logs_done
    if _quiet_logs_done:
        return
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessages(("Failed to load CPU gemm_4bit_forward",))
    )
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        _DropMessages(("MatMul8bitLt: inputs will be cast",))
    )
    _quiet_logs_done = True


def _quantized_types() -> tuple[type[nn.Module], ...]:
    bnb = _bnb()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit Linear layer."""
    return isinstance(module, _quantized_types())


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every bitsandbytes Linear layer under ``model``."""
    types = _quantized_types()
    for name, module in model.named_modules():
        if isinstance(module, types):
            yield name, module


def prepare_quantized(model: nn.Module) -> int:
    """Makes bitsandbytes' 4-bit layers under ``model`` safe to train through; returns
    how many quantised Linear layers there are.

    bitsandbytes (0.50.2) repacks a ``Linear4bit``'s weight, for good, into a layout for
    its fused CPU inference kernel the first time the layer runs in eval mode on an input
    that needs no gradient, on CPUs with AVX512-BF16. That kernel has no autograd
    formula: every later forward goes through it, and a backward through the layer then
    silently drops the gradient at its input (torch only warns). It also computes in
    bfloat16 whatever the compute dtype. Turning the repack off keeps every forward on
    the dequantise-and-matmul path, exact in float32 and differentiable; a ZO client's
    inference-only forwards pay a little speed for it.
    """
    bnb = _bnb()
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
        elif isinstance(module, bnb.nn.Linear8bitLt):
            count += 1
    return count


def _quant_state_tensors(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensors a bitsandbytes weight keeps beside its data (absmax, codes, scales).

    They are plain attributes, not parameters or buffers, so ``model.parameters()``
    does not see them; a memory count must.
    """
    state = getattr(param, "quant_state", None)
    while state is not None:
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None)
    for name in ("SCB", "CB"):
        value = getattr(param, name, None)
        if isinstance(value, torch.Tensor):
            yield value


def model_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters, buffers and bitsandbytes quantisation state.

    Each tensor is counted once however many modules share it (tied weights, codebooks
    bitsandbytes shares between layers, an int8 weight's ``CB`` that is its data).
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        size = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), size)
        if size and key not in seen:
            seen.add(key)
            total += size

    for param in model.parameters():
        add(param.data)
        for extra in _quant_state_tensors(param):
            add(extra)
    for buffer in model.buffers():
        add(buffer)
    return total


# --------------------------------------------------------------------------- support


def quantization_support(quantization: str = "nf4", device: str = "cpu") -> tuple[bool, str]:
    """Whether bitsandbytes can run ``quantization`` on ``device``, and a one-line reason.

    Runs a 64 x 64 quantised Linear layer, built and prepared as
    :func:`~edge_client.emulator.load_emulator` builds its layers, on a 2 x 64 input in
    the three ways a client uses it: an eval-mode forward without gradients (a
    zeroth-order client's forwards), then a forward and a backward to the input in eval
    mode and in training mode (a first-order client, and FedBiOT's adapter when
    something below it trains). Each result is checked against the float32 layer the
    quantised one was made from (outputs and the input's gradient within the
    quantisation error), so a backend that imports but computes garbage, or silently
    drops the gradient, counts as unsupported. Any exception counts as unsupported too.

    The answer is cached per ``(quantization, device)``; ``quantization_support.cache_clear()``
    forgets it.

    Args:
        quantization: ``"nf4"`` or ``"int8"``.
        device: A torch device string.

    Returns:
        ``(True, "bitsandbytes <version> runs nf4 on cpu")`` or ``(False, reason)``; the
        reason is one line.

    Raises:
        ValueError: ``quantization`` is not one of :data:`QUANTIZATIONS`.
    """
    check_quantization(quantization)
    try:
        device_name = str(torch.device(device))
    except (RuntimeError, TypeError, ValueError) as e:
        return False, f"bitsandbytes cannot run {quantization} on {device!r}: {_one_line(e)}"
    return _cached_support(quantization, device_name)


@functools.cache
def _cached_support(quantization: str, device: str) -> tuple[bool, str]:
    return _probe(quantization, device)


quantization_support.cache_clear = _cached_support.cache_clear  # type: ignore[attr-defined]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text


def _probe(quantization: str, device: str) -> tuple[bool, str]:
    """Runs the check :func:`quantization_support` describes (uncached)."""
    try:
        bnb = _bnb()
    except Exception as e:  # missing, or no usable native library
        return False, f"bitsandbytes cannot be imported ({_one_line(e)}), so no {quantization} emulator"
    version = getattr(bnb, "__version__", "?")
    where = f"bitsandbytes {version} cannot run {quantization} on {device}"
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return False, f"{where}: torch sees no CUDA device"
        failure = _exercise(bnb, quantization, dev)
    except Exception as e:  # any failure of the backend is a "no"
        return False, f"{where}: {_one_line(e)}"
    if failure is not None:
        return False, f"{where}: {failure}"
    return True, f"bitsandbytes {version} runs {quantization} on {device} (forward and backward)"


def _exercise(bnb: Any, quantization: str, device: torch.device) -> str | None:
    """Runs the probe's layer; returns what went wrong, or None."""
    n = _PROBE_FEATURES
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n, n, generator=generator) * 0.05
    x = torch.randn(2, n, generator=generator)
    grad_out = torch.randn(2, n, generator=generator)
    if quantization == "nf4":
        layer = bnb.nn.Linear4bit(n, n, bias=False, compute_dtype=torch.float32,
                                  compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(n, n, bias=False, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False,
                                         has_fp16_weights=False)
    layer = layer.to(device)  # moving to the device is what quantises
    prepare_quantized(layer)
    tolerance = _PROBE_TOLERANCE[quantization]
    expected_out = x @ weight.T
    expected_grad = grad_out @ weight

    def off(actual: torch.Tensor | None, expected: torch.Tensor) -> float:
        if actual is None:
            return float("inf")
        actual = actual.detach().float().cpu()
        if actual.shape != expected.shape or not torch.isfinite(actual).all():
            return float("inf")
        return float((actual - expected).norm() / expected.norm())

    layer.eval()
    with torch.no_grad():
        error = off(layer(x.to(device)), expected_out)
    if not error <= tolerance:
        return f"an eval-mode forward is off by {error:.3g} (relative; allowed {tolerance})"
    for training in (False, True):
        layer.train(training)
        inputs = x.to(device, copy=True).requires_grad_(True)
        out = layer(inputs)
        error = off(out, expected_out)
        mode = "a training-mode" if training else "an eval-mode"
        if not error <= tolerance:
            return f"{mode} forward with gradients is off by {error:.3g} (relative; allowed {tolerance})"
        (out * grad_out.to(device)).sum().backward()
        if inputs.grad is None:
            return f"{mode} backward gives the input no gradient"
        error = off(inputs.grad, expected_grad)
        if not error <= tolerance:
            return f"{mode} backward's input gradient is off by {error:.3g} (relative; allowed {tolerance})"
    return None
