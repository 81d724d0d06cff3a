"""The accumulated seed table and its digest (PROTOCOL.md §6).

The coordinator folds each committed round's coefficients into a table
``seed -> total`` with float32 arithmetic; clients rebuild the model from it at rebase
rounds and compare digests to prove they hold the same table. Both sides use these
functions, so the arithmetic and the byte layout are defined once.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping

__all__ = ["TableError", "fl32", "is_float32", "accumulate", "table_digest", "sorted_entries"]

_F32 = struct.Struct("<f")
_ENTRY = struct.Struct("<Qf")


class TableError(ValueError):
    """A coefficient or total is not a finite float32."""


def fl32(value: float) -> float:
    """Round a Python float to the nearest float32 (ties to even), as a Python float.

    Raises:
        TableError: the value is not finite or overflows float32.
    """
    if not math.isfinite(value):
        raise TableError(f"value is not finite: {value!r}")
    try:
        rounded = _F32.unpack(_F32.pack(value))[0]
    except OverflowError:
        raise TableError(f"value overflows float32: {value!r}") from None
    return rounded


def is_float32(value: float) -> bool:
    """Whether ``value`` is finite and exactly representable as a float32."""
    try:
        return fl32(value) == value
    except TableError:
        return False


def accumulate(total: float, coefficient: float) -> float:
    """The new total of a seed: ``fl32(total + coefficient)``.

    Both operands are float32 values; their sum is computed in float64 and rounded once
    to float32. (For float32 operands the float64 sum is exact unless their exponents
    differ by more than 29, and even then the result is fixed by IEEE 754, so every
    implementation that follows this rule agrees.)
    """
    return fl32(float(total) + float(coefficient))


def sorted_entries(table: Mapping[int, float]) -> list[tuple[int, float]]:
    """Table entries in canonical order: ascending seed, zero totals left out."""
    return [(seed, total) for seed, total in sorted(table.items()) if total != 0.0]


def table_digest(entries: Iterable[tuple[int, float]]) -> str:
    """SHA-256 (hex) of a table in canonical order.

    Layout: for each entry, in strictly ascending seed order, the seed as an 8-byte
    little-endian unsigned integer followed by the total as a 4-byte little-endian IEEE
    float32, concatenated with no header or padding. The empty table's digest is the
    SHA-256 of no bytes.

    The input must already be canonical (see :func:`sorted_entries`): it is refused
    rather than normalised, so two parties cannot silently hash different things.

    Raises:
        TableError: a seed out of range or out of order, or a total that is zero or not
            a finite float32.
    """
    digest = hashlib.sha256()
    previous = -1
    for seed, total in entries:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise TableError(f"seed {seed!r} is not an int in [0, 2**63)")
        if seed <= previous:
            raise TableError(f"seeds must be strictly ascending; {seed} follows {previous}")
        if total == 0.0 or not is_float32(total):
            raise TableError(f"total {total!r} of seed {seed} must be a nonzero, finite float32")
        digest.update(_ENTRY.pack(seed, total))
        previous = seed
    return digest.hexdigest()
