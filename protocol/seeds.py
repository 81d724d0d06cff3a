"""Seeds and their 64-bit word streams: the pure-integer half of PROTOCOL.md §5.

This module is the executable specification of the generator (no torch: the
coordinator uses it to derive seed pools); :mod:`protocol.perturb` is the fast tensor
implementation of the same definition.
"""

from __future__ import annotations

__all__ = [
    "GAMMA", "MAX_SEED", "PerturbationError", "mix64", "seed_key", "word",
    "rademacher_signs", "pool_seed",
]

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: the odd integer nearest 2**64 / golden ratio
MIX_MUL_1 = 0xBF58476D1CE4E5B9  # SplitMix64 (Steele, Lea, Flood 2014; Vigna's constants)
MIX_MUL_2 = 0x94D049BB133111EB
MAX_SEED = (1 << 63) - 1
WORD_BITS = 64


class PerturbationError(ValueError):
    """A perturbation was asked for with an invalid seed, tensor or coefficient."""


def mix64(x: int) -> int:
    """SplitMix64's output function on a 64-bit unsigned integer."""
    z = x & MASK64
    z = ((z ^ (z >> 30)) * MIX_MUL_1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_MUL_2) & MASK64
    return z ^ (z >> 31)


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PerturbationError(f"seed must be an int in [0, 2**63), got {seed!r}")


def seed_key(seed: int) -> int:
    """The 64-bit key of a seed: ``mix64(seed + GAMMA)``."""
    check_seed(seed)
    return mix64(seed + GAMMA)


def word(seed: int, index: int) -> int:
    """Word ``index`` of a seed's stream: ``mix64(key(seed) + index * GAMMA)``."""
    return mix64(seed_key(seed) + index * GAMMA)


def rademacher_signs(seed: int, count: int, start: int = 0) -> list[int]:
    """The signs ``z[start:start+count]`` as Python ints (+1/-1), computed bit by bit."""
    key = seed_key(seed)
    signs = []
    for i in range(start, start + count):
        w = mix64(key + (i // WORD_BITS) * GAMMA)
        signs.append(-1 if (w >> (i % WORD_BITS)) & 1 else 1)
    return signs


def pool_seed(pool_key: int, index: int) -> int:
    """Seed ``index`` of a seed pool: the top 63 bits of ``word(pool_key, index)``.

    The pool is the coordinator's business (clients receive explicit seeds), but a
    fixed derivation lets anyone recompute a federation's pool from its key.
    """
    return word(pool_key, index) >> 1
