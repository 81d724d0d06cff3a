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

The reverse direction, :func:`project_rademacher`, computes ``p = <delta, z(seed)>`` for
a local update ``delta`` (a first-order client sends these scalars instead of ``delta``).
A floating-point sum depends on the order it adds in, which differs between kernels
and devices, so the projection is made exact: ``delta`` is quantised to int64 fixed
point with one power-of-two scale and the signed integers are summed, which every
backend, chunking and device does to the same bits (see :func:`project_rademacher`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
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
    "project_rademacher",
    "projection_exponent",
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


def _apply_eager(flat: torch.Tensor, key: torch.Tensor, coef: torch.Tensor, first_word: int = 0) -> None:
    n_words = flat.numel() // WORD_BITS
    view = flat.view(n_words, WORD_BITS)
    signed_table = _byte_sign_table(flat.device) * coef  # exact: entries are +-coef
    # Byte k of a word holds bits 8k..8k+7. Extract bytes arithmetically rather than by
    # viewing memory, so the result does not depend on the host's endianness.
    byte_shifts = torch.arange(0, WORD_BITS, 8, dtype=torch.int64, device=flat.device)
    for start in range(0, n_words, EAGER_CHUNK_WORDS):
        count = min(EAGER_CHUNK_WORDS, n_words - start)
        words = _words_tensor(key, first_word + start, count, flat.device)  # (C,)
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
    flat: torch.Tensor, seed: int, coefficient: float, *, backend: Backend = "auto", first_word: int = 0
) -> Kernel:
    """In place: ``flat[i] <- fl32(flat[i] + fl32(coefficient) * z(seed)[i])``.

    Args:
        flat: the whole parameter space, float32, 1-D, contiguous, length a multiple of 64
            (padding elements beyond the real ``n`` are perturbed too and never read).
        seed: 0 <= seed < 2**63.
        coefficient: rounded to float32 first; the ledger's coefficients already are.
        backend: "compiled", "eager", or "auto" (compiled for large spaces; override with
            the environment variable EDGEFED_PERTURB_BACKEND).
        first_word: ``flat`` is a 64-aligned window of the space that starts at element
            ``64 * first_word``: its element ``i`` takes the sign of the space's element
            ``64 * first_word + i`` (a block's window, PROTOCOL.md §5.3). Always eager.

    Returns:
        the kernel that ran: "compiled", or "eager" (asked for, chosen by "auto" for a
        small space, a window, or the fallback where the compiled kernel cannot be built).

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
    if isinstance(first_word, bool) or not isinstance(first_word, int) or first_word < 0:
        raise PerturbationError(f"first_word must be an int >= 0, got {first_word!r}")
    chosen = _resolve_backend(backend, flat.numel())
    kernel: Kernel
    if chosen == "compiled" and not first_word and _apply_compiled(flat, key, coef):
        kernel = "compiled"
    else:
        with torch.no_grad():
            _apply_eager(flat, key, coef, first_word)
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


# ---------------------------------------------------------------------------
# Projection <delta, z(seed)>: exact, so every backend and device gives the same bits
# ---------------------------------------------------------------------------

# Every partial or total sum of quantised elements stays below 2**62 in magnitude, one
# bit short of int64's limit: no backend can overflow, whatever order it adds in.
PROJECTION_SUM_BITS = 62
# Seeds one compiled pass projects onto while it reads delta once: the read and the
# quantisation are shared, only the signs and the sums are per seed. Measured on a
# 2-core AVX2 CPU at n = 134.5M (bench/projection.py sweeps it), time per seed of a
# 32-seed call against one perturbation pass, by seeds per pass: 1: 1.35x, 4: 0.61x,
# 8: 0.51x, 16: 0.41x, 32: 0.40x. The
# unrolled kernel takes longer to compile the more seeds it holds (about 6 s for 8, 10 s
# for 16, 18 s for 32, once per process and space size): 16 is where the gain stops.
PROJECTION_SEEDS_PER_PASS = 16
_F32_MAX_EXP = 127  # 2**127 is the largest power of two a float32 holds
_F32_MIN_NORMAL_EXP = -126  # 2**-126 is the smallest normal one


def projection_exponent(n: int, max_abs: float) -> int:
    """The fixed-point exponent ``S`` of a projection: the largest integer with
    ``n * max_abs * 2**S < 2**62``, computed exactly (0 when ``max_abs`` is 0).

    With that ``S`` each ``|trunc(delta[i] * 2**S)| <= max_abs * 2**S``, so no sum of
    ``n`` of them, in any order, reaches ``2**62``.

    Args:
        n: number of elements summed (the padded length of the space), >= 1.
        max_abs: ``max |delta[i]|``, finite and >= 0 (a float32 value, exact in float64).

    Raises:
        PerturbationError: ``n`` < 1, or ``max_abs`` negative or not finite.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PerturbationError(f"n must be a positive int, got {n!r}")
    if not math.isfinite(max_abs) or max_abs < 0:
        raise PerturbationError(f"max_abs must be finite and >= 0, got {max_abs!r}")
    if max_abs == 0:
        return 0
    # max_abs = num / 2**d exactly, and n * num < 2**L with L its bit length, so
    # n * max_abs * 2**S < 2**(L - d + S): S = 62 + d - L is the largest that fits
    # (S + 1 fails because n * num >= 2**(L - 1)).
    num, den = float(max_abs).as_integer_ratio()
    return PROJECTION_SUM_BITS + (den.bit_length() - 1) - (n * num).bit_length()


def _scale_factors(exponent: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``2**exponent`` as two float32 factors ``(2**a, 2**b)``, each a float32 power of two.

    A tiny delta needs ``S`` > 127, past float32's range, so the scale is applied in two
    exact steps. Multiplying a float32 by a power of two only moves its exponent, so
    ``(delta * 2**a) * 2**b`` is exact whenever the result is normal; a result that is
    subnormal (only when ``S`` < 0) is below 1 and truncates to 0 either way.
    """
    first = min(exponent, _F32_MAX_EXP)
    second = exponent - first
    if first < _F32_MIN_NORMAL_EXP or second > _F32_MAX_EXP:
        # Unreachable for float32 input: S >= 62 - 128 - log2(n) > -126 for n < 2**60,
        # and S <= 62 + 149 (the smallest subnormal, n = 1), so second <= 84.
        raise PerturbationError(f"projection scale 2**{exponent} is out of range")
    return (torch.tensor(2.0**first, dtype=torch.float32, device=device),
            torch.tensor(2.0**second, dtype=torch.float32, device=device))


def _quantise(values: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """``trunc(values * 2**S)`` as int64: exact scaling (see :func:`_scale_factors`), then
    a float-to-integer conversion, which truncates toward zero."""
    return ((values * scale_a) * scale_b).to(torch.int64)


def _quantise_split(values: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """The same integers as :func:`_quantise`, through two float32 -> int32 conversions.

    x86 before AVX-512 has a vector float32 -> int32 conversion but none to int64, so the
    compiled kernel converts element by element there; splitting makes the one-seed
    pass about 15% faster on AVX2. With ``x = values * 2**S`` (exact, ``|x| < 2**62``)
    every step is exact: ``high = trunc(x / 2**31)`` is ``x`` with its bits below
    ``2**31`` cut off (at most 24 significant bits, so float32 holds ``high * 2**31``),
    ``x - high * 2**31`` is exactly the bits cut off, and both parts carry the sign of
    ``x``, so ``trunc(x) = high * 2**31 + trunc(x - high * 2**31)``.
    """
    scaled = (values * scale_a) * scale_b
    high = (scaled * 2.0**-31).to(torch.int32)  # trunc(x / 2**31), |high| < 2**31
    low = (scaled - high.to(torch.float32) * 2.0**31).to(torch.int32)  # |low| < 2**31
    return (high.to(torch.int64) << 31) + low.to(torch.int64)


def _project_fused(
    flat: torch.Tensor, keys: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor
) -> torch.Tensor:
    """One pass over delta for ``len(keys)`` seeds: quantise, words -> bits -> +-q -> sum.

    Written to be fused by torch.compile into one kernel with one int64 accumulator per
    seed; q and the signs are never stored. Returns the (K,) int64 sums.
    """
    n_words = flat.numel() // WORD_BITS
    q = _quantise_split(flat.view(n_words, WORD_BITS), scale_a, scale_b)  # (W, 64) int64
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=flat.device)
    sums = []
    for k in range(keys.numel()):  # unrolled when traced: K sums in one pass
        words = _words_tensor(keys[k], 0, n_words, flat.device)  # (W,)
        minus = -((words.unsqueeze(1) >> shifts) & 1)  # (W, 64): -1 where z = -1, else 0
        # Two's complement: (q ^ -1) - (-1) = ~q + 1 = -q, and (q ^ 0) - 0 = q.
        sums.append(((q ^ minus) - minus).sum())
    return torch.stack(sums)


_INT_SIGN_TABLE_CACHE: dict[torch.device, torch.Tensor] = {}


def _byte_int_sign_table(device: torch.device) -> torch.Tensor:
    """(256, 8) int64 table: row b holds z for the 8 bits of byte b, LSB first."""
    table = _INT_SIGN_TABLE_CACHE.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (1 - 2 * bits).to(device)
        _INT_SIGN_TABLE_CACHE[device] = table
    return table


def _project_eager(
    flat: torch.Tensor, keys: Sequence[int], scale_a: torch.Tensor, scale_b: torch.Tensor, first_word: int = 0
) -> list[int]:
    """Chunk by chunk: quantise the chunk once, then one signed integer sum per seed."""
    n_words = flat.numel() // WORD_BITS
    view = flat.view(n_words, WORD_BITS)
    table = _byte_int_sign_table(flat.device)
    byte_shifts = torch.arange(0, WORD_BITS, 8, dtype=torch.int64, device=flat.device)
    key_tensors = [torch.tensor(_signed64(key), dtype=torch.int64, device=flat.device) for key in keys]
    # Totals stay on the device (no sync per chunk); exact, since every partial sum < 2**62.
    totals = torch.zeros(len(keys), dtype=torch.int64, device=flat.device)
    # torch.dot on int64 is several times faster than a product and a sum on the CPU;
    # CUDA's dot is cuBLAS, floating point only.
    use_dot = flat.device.type == "cpu"
    for start in range(0, n_words, EAGER_CHUNK_WORDS):
        count = min(EAGER_CHUNK_WORDS, n_words - start)
        q = _quantise(view[start : start + count], scale_a, scale_b).view(-1)  # (C*64,)
        for k, key in enumerate(key_tensors):
            words = _words_tensor(key, first_word + start, count, flat.device)  # (C,)
            signs = table[(words.unsqueeze(1) >> byte_shifts) & 0xFF].view(-1)  # (C*64,)
            totals[k] += torch.dot(q, signs) if use_dot else (q * signs).sum()
    return [int(total) for total in totals.tolist()]


_projection_fn: Callable[..., torch.Tensor] | None = None
_projection_compile_failed = False
_projection_shapes: set[tuple[int, torch.device, int]] = set()


def _get_compiled_projection() -> Callable[..., torch.Tensor] | None:
    global _projection_fn, _projection_compile_failed
    with _compiled_lock:
        if _projection_fn is None and not _projection_compile_failed:
            try:
                _projection_fn = torch.compile(_project_fused, fullgraph=True, dynamic=False)
            except Exception as exc:  # no compiler backend on this platform
                logger.warning("torch.compile unavailable (%s); using the eager projection", exc)
                _projection_compile_failed = True
        return _projection_fn


def _project_compiled(
    flat: torch.Tensor, keys: Sequence[int], scale_a: torch.Tensor, scale_b: torch.Tensor
) -> list[int] | None:
    """Run the fused kernel over groups of seeds; None if this machine cannot compile it.

    Full groups have :data:`PROJECTION_SEEDS_PER_PASS` seeds and the last one the rest,
    so a given K compiles at most two kernels per space size. As in
    :func:`_apply_compiled`, a failure the first time a shape runs means no working
    compiler (the eager path takes over); a failure of a kernel that ran before is raised.
    """
    global _projection_compile_failed
    fn = _get_compiled_projection()
    if fn is None:
        return None
    sums = []
    for start in range(0, len(keys), PROJECTION_SEEDS_PER_PASS):
        group = keys[start : start + PROJECTION_SEEDS_PER_PASS]
        shape = (flat.numel(), flat.device, len(group))
        group_keys = torch.tensor([_signed64(key) for key in group], dtype=torch.int64, device=flat.device)
        try:
            with torch.no_grad():
                sums.append(fn(flat, group_keys, scale_a, scale_b))
        except Exception as exc:
            if shape in _projection_shapes:
                raise  # this kernel ran before: a real error, not a missing compiler
            with _compiled_lock:
                _projection_compile_failed = True
            logger.warning("compiling the projection kernel failed (%s: %s); using the eager path, "
                           "which gives the same bits more slowly", type(exc).__name__,
                           str(exc).splitlines()[0][:200] if str(exc) else "")
            return None
        _projection_shapes.add(shape)
    return [int(total) for total in torch.cat(sums).tolist()]


def project_rademacher(
    flat: torch.Tensor, seeds: Sequence[int], *, backend: Backend = "auto", first_word: int = 0
) -> tuple[list[float], Kernel]:
    """For each seed, ``p = <flat, z(seed)> = sum_i flat[i] * z(seed)[i]``, exactly rounded
    from a fixed-point sum, so every backend and device returns the same bits.

    With ``n = flat.numel()``, ``M = max |flat[i]|`` and ``S = projection_exponent(n, M)``
    (the largest integer with ``n * M * 2**S < 2**62``)::

        q[i] = trunc(flat[i] * 2**S)                 (int64; exact scaling, toward zero)
        p    = fl64(sum_i q[i] * z[i]) * 2**-S       (an exact int64 sum, rounded once)

    Integer addition is associative and no partial sum can overflow, so the compiled
    kernel, the eager chunks and any device agree bit for bit.

    Error: each ``q[i] * 2**-S`` is within ``2**-S`` of ``flat[i]``, so
    ``|p - <flat, z>| < n * 2**-S`` (plus the final float64 rounding of p), and since
    ``S`` is the largest exponent that fits, ``2**-S <= n * M * 2**-61``: the error is below
    ``n**2 * M * 2**-61``. That is ``9.2e-8 * M`` for a LoRA space of n = 460,800 and
    ``7.9e-3 * M`` for SmolLM2-135M's n = 134,515,008. A typical ``|p|`` is about
    ``sqrt(n) * rms(flat)`` (679 rms and 11,600 rms), so the worst case is a relative
    ``1.4e-10 * M / rms`` and ``6.8e-7 * M / rms``. The truncation errors take random
    signs under z, so the typical error is about ``sqrt(n / 3) * 2**-S``, far smaller
    still. ``flat`` all zero gives exactly 0.0.

    Args:
        flat: the update ``delta`` over the whole padded parameter space: float32, 1-D,
            contiguous, length a multiple of 64. **The caller must zero the padding
            elements** beyond the real ``n``: they are summed like the others.
        seeds: one or more seeds, each 0 <= seed < 2**63.
        backend: "compiled", "eager", or "auto" (compiled for large spaces; override
            with EDGEFED_PERTURB_BACKEND), chosen as for :func:`apply_rademacher`.
        first_word: ``flat`` is the window of the space starting at element
            ``64 * first_word`` (as in :func:`apply_rademacher`; always eager): the
            projection of an update that is zero outside the window.

    Returns:
        ``(p, kernel)``: one float per seed, in order, and the kernel that computed them
        ("compiled", or "eager" when asked for, chosen for a small space, or the
        fallback where the compiled kernel cannot be built). It is not recorded for
        :func:`last_kernel`, which reports the perturbation a step ran.

    Raises:
        PerturbationError: bad tensor layout or seed, no seeds, or a non-finite element.
    """
    _check_flat(flat)
    seeds = list(seeds)
    if not seeds:
        raise PerturbationError("project_rademacher needs at least one seed")
    keys = [seed_key(seed) for seed in seeds]  # validates every seed first
    with torch.no_grad():
        low, high = torch.aminmax(flat)  # one read of delta; NaN propagates
    max_abs = max(-float(low), float(high))
    if not math.isfinite(max_abs):
        raise PerturbationError("the update to project has a non-finite element")
    exponent = projection_exponent(flat.numel(), max_abs)
    scale_a, scale_b = _scale_factors(exponent, flat.device)
    kernel: Kernel = "eager"
    sums = None
    if isinstance(first_word, bool) or not isinstance(first_word, int) or first_word < 0:
        raise PerturbationError(f"first_word must be an int >= 0, got {first_word!r}")
    if not first_word and _resolve_backend(backend, flat.numel()) == "compiled":
        sums = _project_compiled(flat, keys, scale_a, scale_b)
        kernel = "compiled" if sums is not None else "eager"
    if sums is None:
        with torch.no_grad():
            sums = _project_eager(flat, keys, scale_a, scale_b, first_word)
    # float(int) rounds once to nearest even; ldexp by a power of two is then exact.
    return [math.ldexp(float(total), -exponent) for total in sums], kernel


def rademacher_tensor(seed: int, count: int, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """``z(seed)[:count]`` as a float32 tensor of +-1 (for tests and small spaces)."""
    flat = torch.zeros(padded_length(count), dtype=torch.float32, device=device)
    apply_rademacher(flat, seed, 1.0, backend="eager")
    return flat[:count]
