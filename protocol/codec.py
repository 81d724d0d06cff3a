"""Encoding and decoding of protocol messages (sans I/O).

A frame is one msgpack map: ``{"type": TYPE, field: value, ...}`` with every declared
field present (optional ones as nil), nested records as maps without a ``"type"``,
bytes as bin, floats as float64.

:func:`decode` is the single entry point for everything a peer sends. It works in
stages, each bounding the cost of the next:

1. the frame length is checked against ``max_size`` before anything else;
2. a structural pre-scan walks the msgpack headers without building objects: it refuses
   extension types, nesting deeper than :data:`~protocol.limits.MAX_NESTING_DEPTH`,
   oversized strings, binaries and containers, truncation and trailing bytes, and any
   container that declares more items than there are bytes left. msgpack allocates a
   container's declared length up front, so without this a few hundred bytes could
   make it allocate hundreds of megabytes. It also adds up what the Python objects
   would cost and refuses a frame that would take more than
   :data:`DECODE_BYTES_PER_FRAME_BYTE` times its own length (plus
   :data:`DECODE_BASE_BYTES`): one byte can be a whole empty map (~80 bytes), so a
   4 MiB frame of them would otherwise build ~300 MB of objects;
3. msgpack builds the value with limits derived from :mod:`protocol.limits`, and a
   hook refuses non-str and duplicate map keys;
4. the schema declared in :mod:`protocol.messages` validates every field.

It raises only :class:`~protocol.errors.PeerProtocolError` subclasses.
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocol.errors import (
    FrameTooLarge,
    InvalidMessage,
    LocalProtocolError,
    MalformedFrame,
    UnknownMessageType,
    VersionMismatch,
)
from protocol.limits import (
    MAX_BYTES_FIELD,
    MAX_FRAME_BYTES,
    MAX_MAP_KEYS,
    MAX_NESTING_DEPTH,
    MAX_STRING_BYTES,
    MAX_TABLE_ENTRIES,
    MAX_VERSION_NUMBER,
    SUPPORTED_MAJOR_VERSIONS,
)
from protocol.messages import (
    MESSAGE_TYPES,
    Kind,
    ListKind,
    Message,
    OptionalKind,
    RecordKind,
    SettingsKind,
    field_kinds,
    omitted_defaults,
    wire_type_name,
)

__all__ = ["encode", "decode", "check_version"]

# The longest array any message has: a full sync table.
_MAX_ARRAY_ITEMS = MAX_TABLE_ENTRIES

# Peer-controlled names echoed into error messages are cut to this many characters, so
# that str() of any decode error fits in an error message's text field.
_ECHO_CHARS = 64

# What unpacking a frame may cost in memory: this many bytes of Python objects per byte
# of frame, plus a constant. Valid messages stay under it by the scan's conservative
# estimate (a full sync table ~7 per byte; the worst valid shape, a sync of 4,095
# rounds without coefficients, ~21); hostile frames of tiny maps, tuples or strings
# (up to ~80 per byte) are refused.
DECODE_BYTES_PER_FRAME_BYTE = 24
DECODE_BASE_BYTES = 64 * 1024


# ------------------------------------------------------------------------ encoding


def encode(msg: Message, *, max_size: int | None = MAX_FRAME_BYTES) -> bytes:
    """Serialise a message to one msgpack frame.

    Args:
        msg: the message; it was validated when it was built.
        max_size: refuse to produce a frame longer than this (the peer would refuse
            it); None for no limit.

    Returns:
        The frame.

    Raises:
        LocalProtocolError: ``msg`` is not a protocol message, cannot be serialised,
            or its frame would exceed ``max_size``.
    """
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TYPE", None)) is not cls:  # type: ignore[arg-type]
        raise LocalProtocolError(f"not a protocol message: {cls.__name__}")
    wire = {"type": msg.TYPE}
    wire.update(_record_to_wire(msg))
    try:
        frame: bytes = msgpack.packb(wire, use_bin_type=True, use_single_float=False)
    except (TypeError, ValueError, OverflowError) as exc:
        # Only reachable if a frozen message was tampered with after validation.
        raise LocalProtocolError(f"cannot encode {msg.TYPE}: {exc}") from exc
    if max_size is not None and len(frame) > max_size:
        raise LocalProtocolError(
            f"{msg.TYPE} frame of {len(frame)} bytes exceeds the limit of {max_size} bytes"
        )
    return frame


def _record_to_wire(record: Any) -> dict[str, Any]:
    """The fields of a record as a map, nested records as maps themselves."""
    defaults = omitted_defaults(type(record))
    return {
        name: _value_to_wire(kind, getattr(record, name))
        for name, kind in field_kinds(type(record))
        if not (name in defaults and getattr(record, name) == defaults[name])
    }


def _value_to_wire(kind: Kind, value: Any) -> Any:
    """One field's value in msgpack-able form (tuples pack as arrays as they are)."""
    if isinstance(kind, RecordKind):
        return _record_to_wire(value)
    if isinstance(kind, OptionalKind):
        return None if value is None else _value_to_wire(kind.inner, value)
    if isinstance(kind, ListKind) and _has_records(kind.item):
        return [_value_to_wire(kind.item, item) for item in value]
    if isinstance(kind, SettingsKind):
        return dict(value)
    return value


def _has_records(kind: Kind) -> bool:
    """Whether values of ``kind`` contain records that need converting to/from maps."""
    if isinstance(kind, RecordKind):
        return True
    if isinstance(kind, OptionalKind):
        return _has_records(kind.inner)
    if isinstance(kind, ListKind):
        return _has_records(kind.item)
    return False


# ------------------------------------------------------------------------ decoding


def decode(data: bytes, *, max_size: int | None = MAX_FRAME_BYTES) -> Message:
    """Parse and validate one frame received from the peer.

    A ``hello`` whose ``protocol_version`` names an unsupported major version raises
    :class:`VersionMismatch` before its other fields are checked: a client of another
    major version may send a differently shaped hello, and must still get a clear
    version refusal rather than a complaint about some field.

    Args:
        data: the frame (bytes, bytearray or memoryview).
        max_size: the longest frame accepted, checked before anything is unpacked;
            None for no limit.

    Returns:
        The message.

    Raises:
        FrameTooLarge: the frame is longer than ``max_size``.
        MalformedFrame: the frame is not exactly one acceptable msgpack map (including
            a text frame passed as str).
        UnknownMessageType: ``"type"`` names no known message.
        InvalidMessage: the message violates its schema (missing, unknown or invalid
            field).
    """
    if not isinstance(data, bytes):
        if not isinstance(data, (bytearray, memoryview)):
            raise MalformedFrame(f"expected a binary frame, got {type(data).__name__}")
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if max_size is not None and size > max_size:
            raise FrameTooLarge(size, max_size)
        data = bytes(data)
    if max_size is not None and len(data) > max_size:
        raise FrameTooLarge(len(data), max_size)
    _scan(data)
    obj = _unpack(data)
    if type(obj) is not dict:
        raise MalformedFrame(f"expected a map at the top level, got {wire_type_name(obj)}")
    if "type" not in obj:
        raise InvalidMessage("type", "missing")
    tag = obj["type"]
    if type(tag) is not str:
        raise InvalidMessage("type", f"expected str, got {wire_type_name(tag)}")
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        raise UnknownMessageType(_echo(tag))
    if tag == "hello":
        _check_hello_version(obj.get("protocol_version"))
    message: Message = _record_from_wire(cls, obj, tag, tagged=True)
    return message


def check_version(version: tuple[int, int]) -> None:
    """Refuse a protocol version whose major this implementation does not speak.

    Args:
        version: the peer's ``(major, minor)``, e.g. ``hello.protocol_version``.

    Raises:
        VersionMismatch: the major version is not in SUPPORTED_MAJOR_VERSIONS.
    """
    if version[0] not in SUPPORTED_MAJOR_VERSIONS:
        raise VersionMismatch((version[0], version[1]), SUPPORTED_MAJOR_VERSIONS)


def _check_hello_version(version: Any) -> None:
    """Raise VersionMismatch for a well-formed [major, minor] of an unsupported major."""
    if (
        type(version) in (list, tuple)
        and len(version) == 2
        and all(type(part) is int and 0 <= part <= MAX_VERSION_NUMBER for part in version)
    ):
        check_version((version[0], version[1]))


def _echo(text: str) -> str:
    """A peer-supplied string cut short enough to quote in an error."""
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "..."


def _record_from_wire(cls: type, mapping: dict[str, Any], path: str, *, tagged: bool) -> Any:
    """Build and validate a record (or, if ``tagged``, a message) from its wire map.

    Raises:
        InvalidMessage: a field is missing, unknown or invalid.
    """
    fields = field_kinds(cls)
    defaults = omitted_defaults(cls)
    values = {}
    present = 0
    for name, kind in fields:
        if name not in mapping:
            if name in defaults:  # a field added later, left out at its default
                values[name] = defaults[name]
                continue
            raise InvalidMessage(f"{path}.{name}", "missing")
        values[name] = _value_from_wire(kind, mapping[name], f"{path}.{name}")
        present += 1
    if len(mapping) != present + (1 if tagged else 0):
        known = cls._FIELD_NAMES  # type: ignore[attr-defined]
        for key in mapping:
            if key not in known and not (tagged and key == "type"):
                shown = key if key.isidentifier() and len(key) <= _ECHO_CHARS else repr(_echo(key))
                raise InvalidMessage(f"{path}.{shown}", "unknown field")
    return cls._from_fields(values, path)  # type: ignore[attr-defined]


def _value_from_wire(kind: Kind, value: Any, path: str) -> Any:
    """Turn nested maps into records; every other check is left to the schema."""
    if isinstance(kind, RecordKind):
        if type(value) is not dict:
            raise InvalidMessage(path, f"expected map, got {wire_type_name(value)}")
        return _record_from_wire(kind.record, value, path, tagged=False)
    if isinstance(kind, OptionalKind):
        return None if value is None else _value_from_wire(kind.inner, value, path)
    # Ill-typed or overlong arrays pass through unconverted: the schema check refuses
    # them with the proper message, and before looking at any element.
    if (isinstance(kind, ListKind) and _has_records(kind.item)
            and type(value) is tuple and len(value) <= kind.max_len):
        return tuple(
            _value_from_wire(kind.item, item, f"{path}[{index}]")
            for index, item in enumerate(value)
        )
    return value


# --------------------------------------------------------------- msgpack pre-scan

# What the first byte of a msgpack value says about it: (action, argument).
_SCALAR = 0  # argument: total length of the value in bytes
_STR = 1  # argument: width of the length prefix; 0 for fixstr (length in the byte)
_BIN = 2  # argument: width of the length prefix
_ARRAY = 3  # argument: width of the count prefix; 0 for fixarray
_MAP = 4  # argument: width of the count prefix; 0 for fixmap
_EXT = 5
_NEVER_USED = 6


# What each value's Python object costs, in bytes, counting the 8-byte reference its
# container holds (CPython 3.11, 64-bit; rounded up). Small ints (0..256), nil, booleans
# and empty tuples are shared singletons; map keys are interned, but counted as strs.
_COST_REF = 8
_COST_INT = 48
_COST_FLOAT = 32
_COST_STR = 88  # plus one byte per byte of UTF-8 (a str never takes more than that)
_COST_BIN = 48  # plus its length
_COST_ARRAY = 56  # the tuple; its items count themselves
_COST_EMPTY_MAP = 80
_COST_MAP = 200  # a dict, plus _COST_MAP_KEY per key
_COST_MAP_KEY = 24


def _build_header_table() -> tuple[tuple[int, int, int], ...]:
    """(action, argument, cost) for each first byte; the cost is the fixed part, the
    scan adds what depends on a length that follows the byte."""
    table: list[tuple[int, int, int]] = []
    for byte in range(256):
        if byte <= 0x7F or byte in (0xC0, 0xC2, 0xC3):
            entry = (_SCALAR, 1, _COST_REF)  # positive fixints, nil, false, true
        elif byte >= 0xE0:
            entry = (_SCALAR, 1, _COST_INT)  # negative fixints: -32..-6 are not shared
        elif byte <= 0x8F:
            keys = byte & 0x0F
            entry = (_MAP, 0, _COST_MAP + _COST_MAP_KEY * keys if keys else _COST_EMPTY_MAP)
        elif byte <= 0x9F:
            entry = (_ARRAY, 0, _COST_ARRAY if byte > 0x90 else _COST_REF)  # () is shared
        elif byte <= 0xBF:
            length = byte & 0x1F  # fixstr: the length is in the byte
            entry = (_SCALAR, 1 + length, _COST_STR + length)
        else:
            entry = {
                0xC1: (_NEVER_USED, 0, 0),
                0xC4: (_BIN, 1, _COST_BIN), 0xC5: (_BIN, 2, _COST_BIN), 0xC6: (_BIN, 4, _COST_BIN),
                0xC7: (_EXT, 0, 0), 0xC8: (_EXT, 0, 0), 0xC9: (_EXT, 0, 0),
                0xCA: (_SCALAR, 5, _COST_FLOAT), 0xCB: (_SCALAR, 9, _COST_FLOAT),
                0xCC: (_SCALAR, 2, _COST_INT), 0xCD: (_SCALAR, 3, _COST_INT),
                0xCE: (_SCALAR, 5, _COST_INT), 0xCF: (_SCALAR, 9, _COST_INT),
                0xD0: (_SCALAR, 2, _COST_INT), 0xD1: (_SCALAR, 3, _COST_INT),
                0xD2: (_SCALAR, 5, _COST_INT), 0xD3: (_SCALAR, 9, _COST_INT),
                0xD4: (_EXT, 0, 0), 0xD5: (_EXT, 0, 0), 0xD6: (_EXT, 0, 0), 0xD7: (_EXT, 0, 0),
                0xD8: (_EXT, 0, 0),
                0xD9: (_STR, 1, _COST_STR), 0xDA: (_STR, 2, _COST_STR), 0xDB: (_STR, 4, _COST_STR),
                0xDC: (_ARRAY, 2, _COST_ARRAY), 0xDD: (_ARRAY, 4, _COST_ARRAY),
                0xDE: (_MAP, 2, _COST_MAP), 0xDF: (_MAP, 4, _COST_MAP),
            }[byte]
        table.append(entry)
    return tuple(table)


_HEADERS = _build_header_table()


def _scan(data: bytes) -> int:
    """Check the structure of a frame without building any object.

    Returns:
        An upper estimate of the bytes of Python objects unpacking the frame builds.

    Raises:
        MalformedFrame: the frame is not exactly one msgpack value within the limits,
            or unpacking it would cost more memory than its length allows.
    """
    end = len(data)
    budget = DECODE_BASE_BYTES + DECODE_BYTES_PER_FRAME_BYTE * end
    cost = 0
    pos = 0
    remaining = 1  # values still expected at the current level (the frame holds one)
    enclosing: list[int] = []  # the same count for each enclosing level
    headers = _HEADERS
    while True:
        if remaining == 0:
            if not enclosing:
                break
            remaining = enclosing.pop()
            continue
        remaining -= 1
        if pos >= end:
            raise MalformedFrame("truncated")
        byte = data[pos]
        action, width, value_cost = headers[byte]
        cost += value_cost
        if action == _SCALAR:
            pos += width
            continue
        if action == _EXT:
            raise MalformedFrame("extension types are not allowed")
        if action == _NEVER_USED:
            raise MalformedFrame(f"invalid msgpack byte 0x{byte:02x}")
        if width:
            if pos + 1 + width > end:
                raise MalformedFrame("truncated")
            length = int.from_bytes(data[pos + 1:pos + 1 + width], "big")
        else:
            length = byte & 0x0F
        pos += 1 + width
        if action == _STR or action == _BIN:
            limit = MAX_STRING_BYTES if action == _STR else MAX_BYTES_FIELD
            if length > limit:
                kind = "str" if action == _STR else "bin"
                raise MalformedFrame(f"{kind} of {length} bytes exceeds {limit}")
            cost += length
            pos += length
            continue
        if action == _ARRAY:
            if length > _MAX_ARRAY_ITEMS:
                raise MalformedFrame(f"array of {length} items exceeds {_MAX_ARRAY_ITEMS}")
        else:
            if length > MAX_MAP_KEYS:
                raise MalformedFrame(f"map of {length} keys exceeds {MAX_MAP_KEYS}")
            if width:
                cost += _COST_MAP_KEY * length
            length *= 2
        if len(enclosing) >= MAX_NESTING_DEPTH:
            raise MalformedFrame(f"nested deeper than {MAX_NESTING_DEPTH} levels")
        # Every value takes at least one byte: a longer declaration is a lie.
        if length > end - pos:
            raise MalformedFrame("truncated")
        if cost > budget:
            raise _too_costly(budget)
        enclosing.append(remaining)
        remaining = length
    if pos > end:
        raise MalformedFrame("truncated")
    if pos < end:
        raise MalformedFrame(f"{end - pos} trailing bytes")
    if cost > budget:
        raise _too_costly(budget)
    return cost


def _too_costly(budget: int) -> MalformedFrame:
    return MalformedFrame(f"too many small values: decoding would take over {budget} bytes of memory "
                          f"({DECODE_BYTES_PER_FRAME_BYTE} per byte of frame)")


def _map_hook(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Build a map, refusing duplicate and non-str keys (msgpack allows both)."""
    # The key types first: a map or array key may not even be hashable.
    for key, _ in pairs:
        if type(key) is not str:
            raise MalformedFrame(f"map key must be str, got {wire_type_name(key)}")
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedFrame("duplicate map key")
    return result


def _refuse_ext(code: int, data: bytes) -> Any:
    """ext_hook: extension types carry nothing this protocol defines."""
    raise MalformedFrame("extension types are not allowed")


def _unpack(data: bytes) -> Any:
    """Unpack a pre-scanned frame with msgpack's own limits as a second line of defence.

    Raises:
        MalformedFrame: msgpack refused the frame (e.g. invalid UTF-8) or a hook did.
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=False,  # _map_hook refuses non-str keys, naming their type
            object_pairs_hook=_map_hook,
            ext_hook=_refuse_ext,
            max_str_len=MAX_STRING_BYTES,
            max_bin_len=MAX_BYTES_FIELD,
            max_array_len=_MAX_ARRAY_ITEMS,
            max_map_len=MAX_MAP_KEYS,
            max_ext_len=0,
        )
    except MalformedFrame:
        raise
    except msgpack.ExtraData:
        raise MalformedFrame("trailing bytes") from None
    except UnicodeDecodeError:
        raise MalformedFrame("invalid UTF-8 in a str") from None
    # msgpack signals bad input with ValueError subclasses (FormatError, StackError,
    # UnicodeDecodeError, ...) but documents that "other exceptions can be raised".
    except Exception as exc:
        raise MalformedFrame(f"not valid msgpack ({type(exc).__name__})") from None
