"""The seeded perturbation ``z(seed)``: a device-independent direction in parameter space.

PROTOCOL.md §5 is the normative text; this module is its reference implementation.

Every trainable parameter of a federation lives in one flat, ordered *parameter space*
of ``n`` float32 elements (PROTOCOL.md §5.1 fixes the order). A seed names a direction
``z`` in that space. ``z`` comes from a counter-based generator (SplitMix64's mixing
function applied to ``key + j * GAMMA``), never from a device RNG, so CPU, CUDA and MPS
and every torch version produce the same bits:

    key(seed)   = mix64(seed + GAMMA)                     (mod 2**64)
    word(seed,j)= mix64(key(seed) + j * GAMMA)            (mod 2**64), j = 0, 1, ...
    rademacher: z[i] = +1 if bit (i % 64) of word(seed, i // 64) is 0 else -1
                (bit 0 is the least significant bit)

Applying a coefficient ``a`` (a float32) means ``theta[i] <- fl32(theta[i] + a * z[i])``.
With ``z = +-1`` the product is exact, so this is a single IEEE rounding of ``theta ± a``:
every device that applies the same coefficients in the same order holds the same bits.

The optional Gaussian direction (Box-Muller over one word per element) uses ``log``,
``sqrt`` and ``cos``, whose last bit differs between math libraries: it is *not*
bit-exact across device types and a federation that uses it can only be checked to a
tolerance.

Two backends compute the same bits (tests check they agree): a fused kernel built with
``torch.compile`` (about the cost of one memory-bound pass, see ``bench/zo_step.py``)
and an eager fallback for machines without a working compiler (a 256-entry lookup table
expands bytes to signs, chunk by chunk, so its temporaries stay small). Asking for the
compiled kernel on a machine that cannot build it falls back to eager, so which kernel
ran is reported rather than assumed: :func:`apply_rademacher` returns it and
:func:`last_kernel` remembers it for callers that go through a wrapper
(``ParameterSpace.apply``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Literal

import torch

from protocol.seeds import (
    GAMMA,
    MIX_MUL_1,
    MIX_MUL_2,
    WORD_BITS,
    PerturbationError,
    mix64,
    rademacher_signs,
    seed_key,
    word,
)

__all__ = [
    "GAMMA",
    "WORD_BITS",
    "Backend",
    "Kernel",
    "PerturbationError",
    "apply_rademacher",
    "apply_gaussian",
    "last_kernel",
    "mix64",
    "padded_length",
    "rademacher_tensor",
    "rademacher_signs",
    "seed_key",
    "word",
]

logger = logging.getLogger(__name__)

# Below this many elements the eager path is faster than paying for compilation.
COMPILE_MIN_ELEMENTS = 1 << 22
# Words per eager chunk: 16K words = 1M elements = 4 MiB of float32 temporaries.
EAGER_CHUNK_WORDS = 1 << 14

Backend = Literal["auto", "compiled", "eager"]
# The kernel a call actually ran: "compiled" only when the torch.compile kernel ran.
Kernel = Literal["compiled", "eager"]


# ---------------------------------------------------------------------------
# Tensor implementation
# ---------------------------------------------------------------------------


def padded_length(n: int) -> int:
    """Smallest multiple of 64 that holds ``n`` elements (flat buffers are padded to it)."""
    return -(-n // WORD_BITS) * WORD_BITS


def _signed64(x: int) -> int:
    """Reinterpret an unsigned 64-bit value as a torch int64."""
    return x - (1 << 64) if x >= (1 << 63) else x


_GAMMA_S = _signed64(GAMMA)
_MUL1_S = _signed64(MIX_MUL_1)
_MUL2_S = _signed64(MIX_MUL_2)


def _mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    # torch has no logical right shift on int64: shift arithmetically, then mask off the
    # copies of the sign bit. Multiplication wraps modulo 2**64 as two's complement.
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MUL1_S
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MUL2_S
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _words_tensor(key: torch.Tensor, start: int, count: int, device: torch.device) -> torch.Tensor:
    j = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return _mix64_tensor(key + j * _GAMMA_S)


def _apply_fused(flat: torch.Tensor, key: torch.Tensor, coef: torch.Tensor) -> None:
    """One pass: words -> bits -> +-coef -> add. Written to be fused by torch.compile."""
    n_words = flat.numel() // WORD_BITS
    words = _words_tensor(key, 0, n_words, flat.device)  # (W,)
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=flat.device)
    bits = (words.unsqueeze(1) >> shifts) & 1  # (W, 64): bit i%64 of word i//64
    flat.view(n_words, WORD_BITS).add_(torch.where(bits.bool(), -coef, coef))


_SIGN_TABLE_CACHE: dict[torch.device, torch.Tensor] = {}


def _byte_sign_table(device: torch.device) -> torch.Tensor:
    """(256, 8) float32 table: row b holds z for the 8 bits of byte b, LSB first."""
    table = _SIGN_TABLE_CACHE.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (1 - 2 * bits).to(torch.float32).to(device)
        _SIGN_TABLE_CACHE[device] = table
    return table


def _apply_eager(flat: torch.Tensor, key: torch.Tensor, coef: torch.Tensor) -> None:
    n_words = flat.numel() // WORD_BITS
    view = flat.view(n_words, WORD_BITS)
    signed_table = _byte_sign_table(flat.device) * coef  # exact: entries are +-coef
    # Byte k of a word holds bits 8k..8k+7. Extract bytes arithmetically rather than by
    # viewing memory, so the result does not depend on the host's endianness.
    byte_shifts = torch.arange(0, WORD_BITS, 8, dtype=torch.int64, device=flat.device)
    for start in range(0, n_words, EAGER_CHUNK_WORDS):
        count = min(EAGER_CHUNK_WORDS, n_words - start)
        words = _words_tensor(key, start, count, flat.device)  # (C,)
        byte_values = (words.unsqueeze(1) >> byte_shifts) & 0xFF  # (C, 8)
        view[start : start + count].add_(signed_table[byte_values].view(count, WORD_BITS))


_compiled_lock = threading.Lock()
_compiled_fn: Callable[..., None] | None = None
_compile_failed = False
_compiled_shapes: set[tuple[int, torch.device]] = set()
# Written after every successful perturbation; a plain assignment, so a reader in another
# thread sees one whole value (the latest call's, whichever thread made it).
_last_kernel: Kernel | None = None


def last_kernel() -> Kernel | None:
    """The kernel the most recent perturbation in this process ran, or None before any.

    "compiled" means the ``torch.compile`` kernel itself ran; a compiled backend that
    could not be built reports "eager", because that is what computed the result.
    """
    return _last_kernel


def _get_compiled() -> Callable[..., None] | None:
    global _compiled_fn, _compile_failed
    with _compiled_lock:
        if _compiled_fn is None and not _compile_failed:
            try:
                _compiled_fn = torch.compile(_apply_fused, fullgraph=True, dynamic=False)
            except Exception as exc:  # no compiler backend on this platform
                logger.warning("torch.compile unavailable (%s); using the eager perturbation", exc)
                _compile_failed = True
        return _compiled_fn


def _resolve_backend(backend: Backend, numel: int) -> Backend:
    if backend == "auto":
        backend = os.environ.get("EDGEFED_PERTURB_BACKEND", "auto")  # type: ignore[assignment]
        if backend not in ("auto", "compiled", "eager"):
            raise PerturbationError(
                f"EDGEFED_PERTURB_BACKEND must be auto, compiled or eager, got {backend!r}"
            )
    if backend == "auto":
        return "compiled" if numel >= COMPILE_MIN_ELEMENTS else "eager"
    return backend


def _check_flat(flat: torch.Tensor) -> None:
    if flat.dtype != torch.float32:
        raise PerturbationError(f"parameter space must be float32, got {flat.dtype}")
    if flat.dim() != 1 or not flat.is_contiguous():
        raise PerturbationError("parameter space must be a contiguous 1-D tensor")
    if flat.numel() % WORD_BITS:
        raise PerturbationError(
            f"parameter space length {flat.numel()} is not padded to a multiple of {WORD_BITS}"
        )


def apply_rademacher(
    flat: torch.Tensor, seed: int, coefficient: float, *, backend: Backend = "auto"
) -> Kernel:
    """In place: ``flat[i] <- fl32(flat[i] + fl32(coefficient) * z(seed)[i])``.

    Args:
        flat: the whole parameter space, float32, 1-D, contiguous, length a multiple of 64
            (padding elements beyond the real ``n`` are perturbed too and never read).
        seed: 0 <= seed < 2**63.
        coefficient: rounded to float32 first; the ledger's coefficients already are.
        backend: "compiled", "eager", or "auto" (compiled for large spaces; override with
            the environment variable EDGEFED_PERTURB_BACKEND).

    Returns:
        the kernel that ran: "compiled", or "eager" (asked for, chosen by "auto" for a
        small space, or the fallback where the compiled kernel cannot be built).

    Raises:
        PerturbationError: bad seed, tensor layout or non-finite coefficient.
    """
    global _last_kernel
    _check_flat(flat)
    key_value = seed_key(seed)
    coef = torch.tensor(float(coefficient), dtype=torch.float32, device=flat.device)
    if not torch.isfinite(coef):
        raise PerturbationError(f"coefficient must be finite in float32, got {coefficient!r}")
    key = torch.tensor(_signed64(key_value), dtype=torch.int64, device=flat.device)
    chosen = _resolve_backend(backend, flat.numel())
    kernel: Kernel
    if chosen == "compiled" and _apply_compiled(flat, key, coef):
        kernel = "compiled"
    else:
        with torch.no_grad():
            _apply_eager(flat, key, coef)
        kernel = "eager"
    _last_kernel = kernel
    return kernel


def _apply_compiled(flat: torch.Tensor, key: torch.Tensor, coef: torch.Tensor) -> bool:
    """Run the fused kernel; False if this machine cannot compile it (use eager).

    ``torch.compile`` compiles lazily, on the first call for each tensor shape, so that is
    where a missing C++ compiler (or Triton on a GPU) shows. A failed compilation raises
    before the kernel runs, so ``flat`` is untouched and the eager path can take over.
    """
    global _compile_failed
    fn = _get_compiled()
    if fn is None:
        return False
    try:
        with torch.no_grad():
            fn(flat, key, coef)
    except Exception as exc:
        if (flat.numel(), flat.device) in _compiled_shapes:
            raise  # this kernel ran before: a real error, not a missing compiler
        with _compiled_lock:
            _compile_failed = True
        logger.warning("compiling the perturbation kernel failed (%s: %s); using the eager path, "
                       "which gives the same bits more slowly", type(exc).__name__, str(exc).splitlines()[0][:200])
        return False
    _compiled_shapes.add((flat.numel(), flat.device))
    return True


def apply_gaussian(flat: torch.Tensor, seed: int, coefficient: float) -> Kernel:
    """In place: ``flat += coefficient * g(seed)`` with a Box-Muller Gaussian direction.

    Element i uses its own word ``word(seed, i)``: u1 from its high 24 bits, u2 from its
    low 24 bits, ``g = sqrt(-2 ln((u1 + 0.5) / 2**24)) * cos(2 pi u2 / 2**24)`` in float32.
    Not bit-exact across device types (transcendental functions); see the module doc.
    Always the eager kernel (returned, and recorded for :func:`last_kernel`).
    """
    global _last_kernel
    _check_flat(flat)
    key = torch.tensor(_signed64(seed_key(seed)), dtype=torch.int64, device=flat.device)
    coef = float(coefficient)
    chunk = EAGER_CHUNK_WORDS * WORD_BITS
    with torch.no_grad():
        for start in range(0, flat.numel(), chunk):
            count = min(chunk, flat.numel() - start)
            words = _words_tensor(key, start, count, flat.device)
            high = ((words >> 40) & 0xFFFFFF).to(torch.float32)
            low = (words & 0xFFFFFF).to(torch.float32)
            radius = torch.sqrt(-2.0 * torch.log((high + 0.5) / 16777216.0))
            gauss = radius * torch.cos((2.0 * torch.pi / 16777216.0) * low)
            flat[start : start + count].add_(gauss, alpha=coef)
    _last_kernel = "eager"
    return "eager"


def rademacher_tensor(seed: int, count: int, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """``z(seed)[:count]`` as a float32 tensor of +-1 (for tests and small spaces)."""
    flat = torch.zeros(padded_length(count), dtype=torch.float32, device=device)
    apply_rademacher(flat, seed, 1.0, backend="eager")
    return flat[:count]
