"""Packing an update's scalars without their seeds (``packed_update``, PROTOCOL.md §4.4.1).

The round task already fixes which seeds a client answers and in which order, so an
update need not repeat them: a ``(uint64 seed, float64 value)`` pair costs about 19
bytes in msgpack, a packed value 4 (``"f32"``) or 1 (``"q8"``). For a projected
first-order client answering 1,024 seeds that is the difference between ~20 KB and
~1.2 KB a round.

``q8`` is symmetric linear quantisation with one scale per update: ``scale = max|v| /
127`` and ``x_k = round(v_k / scale)``. Its error, at most ``scale / 2`` per value, is
small beside the spread of the values themselves: a projected update's scalars are
dominated by the projection's own variance (PROTOCOL.md §8.1.2), which this adds to by
well under 1% (``tests/test_values.py`` bounds it). How a client rounds is its own
affair; only the decoding (:meth:`protocol.messages.PackedUpdate.decoded`) must be the
same everywhere, and it is one float64 multiplication.

Pure: struct and math only.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from protocol.messages import VALUE_ENCODINGS

__all__ = ["ENCODING_SETTING", "UPDATE_ENCODINGS", "PACKED_ENCODINGS", "ValueEncodingError", "pack_values",
           "encoding_of"]

ENCODING_SETTING = "value_encoding"
"""The reserved key of ``round_task.settings`` that says how the client sends its
values; it belongs to the wire, not to the mode, so the client takes it out before the
mode reads its settings."""

PACKED_ENCODINGS = tuple(VALUE_ENCODINGS)
"""The encodings of a ``packed_update``."""

UPDATE_ENCODINGS = ("pairs", *PACKED_ENCODINGS)
"""What ``value_encoding`` may name: ``"pairs"`` (an ``update``, the default) or a
packed encoding."""

_Q8_MAX = 127


class ValueEncodingError(ValueError):
    """The values cannot be packed in the encoding asked for (e.g. beyond float32's range)."""


def pack_values(values: Sequence[float], encoding: str) -> tuple[float, bytes]:
    """Pack ``values`` as a ``packed_update``'s ``(scale, values)``.

    Args:
        values: the scalars, one per seed of the task, in task order (finite).
        encoding: ``"f32"`` or ``"q8"``.

    Returns:
        ``(scale, packed)``: decoding gives ``scale × element`` for each element.

    Raises:
        ValueEncodingError: an unknown encoding, no values, a non-finite value, or a
            value float32 cannot hold.
    """
    if encoding not in VALUE_ENCODINGS:
        raise ValueEncodingError(f"unknown value encoding {encoding!r} (known: {', '.join(PACKED_ENCODINGS)})")
    if not values:
        raise ValueEncodingError("no values to pack")
    if not all(math.isfinite(value) for value in values):
        raise ValueEncodingError("a value is not finite")
    if encoding == "f32":
        try:
            packed = struct.pack(f"<{len(values)}f", *values)
        except OverflowError:
            raise ValueEncodingError("a value is beyond float32's range") from None
        return 1.0, packed
    largest = max(abs(value) for value in values)
    scale = largest / _Q8_MAX if largest > 0 else 1.0
    if not (scale > 0 and math.isfinite(scale)):  # a subnormal max: nothing q8 can say
        scale = 1.0
    elements = [max(-_Q8_MAX, min(_Q8_MAX, round(value / scale))) for value in values]
    return scale, struct.pack(f"<{len(elements)}b", *elements)


def encoding_of(settings: dict[str, object]) -> str:
    """The ``value_encoding`` a round task's settings ask for (``"pairs"`` when absent).

    Raises:
        ValueEncodingError: the key names no known encoding.
    """
    encoding = settings.get(ENCODING_SETTING, "pairs")
    if encoding not in UPDATE_ENCODINGS:
        raise ValueEncodingError(f"{ENCODING_SETTING} must be one of {', '.join(UPDATE_ENCODINGS)}, "
                                 f"got {encoding!r}")
    return str(encoding)
