"""Messages of the wire protocol, as self-validating frozen dataclasses.

Every message is a frozen, slotted, keyword-only dataclass with a ``TYPE`` tag; nested
records (:class:`ScopeSpec`, :class:`DeviceProfile`, :class:`FederationInfo`,
:class:`RoundEntry`) are dataclasses too but have no tag. Each field declares its wire
kind once, in its annotation::

    round: Annotated[int, ROUND_POSITIVE]

The kind validates and normalises the value (lists become tuples, ints in float fields
become floats). The same declaration drives both directions:

* Building a message here runs the checks in ``__post_init__``; a violation raises
  :class:`~protocol.errors.LocalProtocolError` (our own misuse), chained from an
  :class:`~protocol.errors.InvalidMessage` that carries the path and reason.
* :func:`protocol.codec.decode` runs the very same checks on what the peer sent and
  raises the :class:`~protocol.errors.InvalidMessage` itself (the peer's fault).

Paths name the offending value as ``"<type>.<field>[i][j]"``, e.g.
``"update.pairs[3][1]"``; records built on their own use their class name as the
first component (``"RoundEntry.coefficients[0][1]"``).
"""

import dataclasses
import math
import re
import struct
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar, Union

from protocol.errors import InvalidMessage, LocalProtocolError
from protocol.blocks import MAX_BLOCK_SEEDS
from protocol.limits import (
    MAX_EXAMPLES,
    MAX_ID_CHARS,
    MAX_LAYER_INDEX,
    MAX_LORA_LAYERS,
    MAX_LORA_RANK,
    MAX_LORA_TARGETS,
    MAX_ROUND,
    MAX_MODE_SETTINGS,
    MAX_SAFE_INT,
    MAX_SEED,
    MAX_SEEDS_PER_ROUND,
    MAX_SERVER_NONCE_BYTES,
    MAX_STRING_CHARS,
    MAX_SUPPORTED_VERSIONS,
    MAX_SYNC_ROUNDS,
    MAX_TABLE_ENTRIES,
    MAX_VERSION_NUMBER,
    MIN_SERVER_NONCE_BYTES,
    NONCE_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
)

__all__ = [
    "OBSERVER_MODE",
    # field kinds
    "Kind",
    "IntKind",
    "F64Kind",
    "F32Kind",
    "StrKind",
    "BytesKind",
    "OptionalKind",
    "ListKind",
    "TupleKind",
    "SeedPairsKind",
    "RecordKind",
    "SettingsKind",
    "field_kinds",
    "omitted_defaults",
    "wire_type_name",
    # records
    "ScopeSpec",
    "DeviceProfile",
    "FederationInfo",
    "RoundEntry",
    # coordinator -> client
    "Challenge",
    "Welcome",
    "Reject",
    "RoundTask",
    "UpdateAck",
    "RoundCommit",
    "SyncResponse",
    "Error",
    # client -> coordinator
    "Hello",
    "Update",
    "PackedUpdate",
    "VALUE_ENCODINGS",
    "Fingerprint",
    "SyncRequest",
    # both directions
    "Goodbye",
    # the union
    "Message",
    "MESSAGE_TYPES",
    "REJECT_CODES",
]

_T = TypeVar("_T")

_F32_STRUCT = struct.Struct("<f")


# --------------------------------------------------------------------------- kinds


class _Bad(Exception):
    """A value failed a kind's check (internal; always surfaced as InvalidMessage).

    ``suffix`` is the part of the path below the value that was checked, filled in as
    the exception travels up through containers, so paths are only formatted on error.
    """

    def __init__(self, reason: str, suffix: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.suffix = suffix

    def at(self, suffix: str) -> "_Bad":
        """Set the path suffix and return self, for ``raise _got(...).at("[3]")``."""
        self.suffix = suffix
        return self


_WIRE_NAMES: dict[type, str] = {
    type(None): "nil",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    bytes: "bytes",
    bytearray: "bytes",
    list: "array",
    tuple: "array",
    dict: "map",
}


def wire_type_name(value: object) -> str:
    """The msgpack name of a value's type (``"nil"``, ``"array"``, ``"map"``, ...)."""
    return _WIRE_NAMES.get(type(value), type(value).__name__)


def _got(expected: str, value: object) -> _Bad:
    """The error for a value of the wrong type, e.g. ``"expected int, got str"``."""
    return _Bad(f"expected {expected}, got {wire_type_name(value)}")


def _sequence(value: object, expected: str) -> Sequence[Any]:
    """``value`` if it is a list or tuple (not a str or bytes), else a type error."""
    if type(value) is tuple or type(value) is list or isinstance(value, (list, tuple)):
        return value  # type: ignore[return-value]
    raise _got(expected, value)


class Kind:
    """How one field is represented on the wire and which values it admits."""

    __slots__ = ()

    def coerce(self, value: Any) -> Any:
        """Validate ``value`` and return its normalised form.

        Raises:
            _Bad: the value is not admissible (internal; see :meth:`check`).
        """
        raise NotImplementedError

    def check(self, value: Any, path: str) -> Any:
        """Validate ``value`` found at ``path`` and return its normalised form.

        Raises:
            InvalidMessage: the value is not admissible.
        """
        try:
            return self.coerce(value)
        except _Bad as bad:
            raise InvalidMessage(path + bad.suffix, bad.reason) from None


class IntKind(Kind):
    """An integer in ``[lo, hi]``; bools are refused.

    Attributes:
        lo: smallest value allowed.
        hi: largest value allowed.
        bounds: how the range reads in error messages.
    """

    __slots__ = ("lo", "hi", "bounds")

    def __init__(self, lo: int, hi: int, *, bounds: str | None = None) -> None:
        self.lo = lo
        self.hi = hi
        self.bounds = bounds or f"[{lo}, {hi}]"

    def coerce(self, value: Any) -> int:
        if type(value) is not int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _got("int", value)
            value = int(value)
        if not self.lo <= value <= self.hi:
            raise _Bad(f"{value} is out of range {self.bounds}")
        return value


def _as_float(value: Any) -> float:
    """``value`` as a finite float; ints are converted, bools refused."""
    if type(value) is float:
        result = value
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _got("float", value)
    else:
        try:
            result = float(value)
        except OverflowError:
            raise _Bad("not finite") from None
    if not math.isfinite(result):
        raise _Bad("not finite")
    return result


class F64Kind(Kind):
    """A finite IEEE float64, optionally bounded below.

    Ints are accepted and converted (JavaScript encoders send 1.0 as 1).

    Attributes:
        gt: the value must be greater than this, if set.
        ge: the value must be at least this, if set.
    """

    __slots__ = ("gt", "ge")

    def __init__(self, *, gt: float | None = None, ge: float | None = None) -> None:
        self.gt = gt
        self.ge = ge

    def coerce(self, value: Any) -> float:
        result = _as_float(value)
        if self.gt is not None and not result > self.gt:
            raise _Bad(f"must be > {self.gt:g}")
        if self.ge is not None and not result >= self.ge:
            raise _Bad(f"must be >= {self.ge:g}")
        return result


class F32Kind(Kind):
    """A finite float exactly representable as IEEE float32 (carried as float64).

    Attributes:
        nonzero: zero (either sign) is refused.
    """

    __slots__ = ("nonzero",)

    def __init__(self, *, nonzero: bool = False) -> None:
        self.nonzero = nonzero

    def coerce(self, value: Any) -> float:
        result = _as_float(value)
        try:
            exact = _F32_STRUCT.unpack(_F32_STRUCT.pack(result))[0] == result
        except OverflowError:
            exact = False
        if not exact:
            raise _Bad("not exactly representable as float32")
        if self.nonzero and result == 0.0:
            raise _Bad("must be nonzero")
        return result


class StrKind(Kind):
    """A string of bounded length, optionally restricted to a pattern or a set of choices.

    Attributes:
        max_chars: longest length allowed, in characters.
        min_chars: shortest length allowed, in characters.
        pattern: regular expression the whole string must match, if set.
        rule: how the pattern reads in error messages.
        choices: the only values allowed, if set.
    """

    __slots__ = ("max_chars", "min_chars", "pattern", "rule", "choices")

    def __init__(
        self,
        max_chars: int = MAX_STRING_CHARS,
        *,
        min_chars: int = 0,
        pattern: str | None = None,
        rule: str = "",
        choices: tuple[str, ...] | None = None,
    ) -> None:
        self.max_chars = max_chars
        self.min_chars = min_chars
        self.pattern = re.compile(pattern, re.ASCII) if pattern is not None else None
        self.rule = rule
        self.choices = choices

    def coerce(self, value: Any) -> str:
        if type(value) is not str:
            if not isinstance(value, str):
                raise _got("str", value)
            value = str(value)
        if self.choices is not None:
            if value not in self.choices:
                allowed = ", ".join(repr(choice) for choice in self.choices)
                raise _Bad(f"must be one of {allowed}")
            return value
        if self.pattern is not None:
            if len(value) > self.max_chars or not self.pattern.fullmatch(value):
                raise _Bad(f"must be {self.rule}")
            return value
        if len(value) > self.max_chars:
            raise _Bad(f"too long ({len(value)} > {self.max_chars} characters)")
        if len(value) < self.min_chars:
            raise _Bad("must not be empty" if self.min_chars == 1 else
                       f"too short ({len(value)} < {self.min_chars} characters)")
        if not value.isascii():
            # A lone surrogate cannot be encoded as UTF-8, so msgpack would fail later.
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Bad("not encodable as UTF-8") from None
        return value


class BytesKind(Kind):
    """A byte string of bounded length (bytearray is accepted and copied to bytes).

    Attributes:
        min_len: shortest length allowed.
        max_len: longest length allowed.
    """

    __slots__ = ("min_len", "max_len")

    def __init__(self, min_len: int, max_len: int) -> None:
        self.min_len = min_len
        self.max_len = max_len

    def coerce(self, value: Any) -> bytes:
        if type(value) is not bytes:
            if not isinstance(value, (bytes, bytearray)):
                raise _got("bytes", value)
            value = bytes(value)
        if not self.min_len <= len(value) <= self.max_len:
            if self.min_len == self.max_len:
                raise _Bad(f"expected {self.max_len} bytes, got {len(value)}")
            raise _Bad(f"expected {self.min_len} to {self.max_len} bytes, got {len(value)}")
        return value


class OptionalKind(Kind):
    """``inner`` or nil; the field is always present on the wire.

    Attributes:
        inner: the kind of a non-nil value.
    """

    __slots__ = ("inner",)

    def __init__(self, inner: Kind) -> None:
        self.inner = inner

    def coerce(self, value: Any) -> Any:
        if value is None:
            return None
        return self.inner.coerce(value)


class ListKind(Kind):
    """An array of ``item`` values, carried as a tuple.

    The length is checked before any element is looked at.

    Attributes:
        item: the kind of each element.
        max_len: most elements allowed.
        min_len: fewest elements allowed.
        unique: name of the elements for the duplicate error (``"duplicate seed 7"``),
            or None when duplicates are allowed.
    """

    __slots__ = ("item", "max_len", "min_len", "unique")

    def __init__(self, item: Kind, max_len: int, *, min_len: int = 0,
                 unique: str | None = None) -> None:
        self.item = item
        self.max_len = max_len
        self.min_len = min_len
        self.unique = unique

    def coerce(self, value: Any) -> tuple[Any, ...]:
        items = _sequence(value, "array")
        _check_length(len(items), self.min_len, self.max_len)
        coerce = self.item.coerce
        result = []
        for index, item in enumerate(items):
            try:
                result.append(coerce(item))
            except _Bad as bad:
                bad.suffix = f"[{index}]{bad.suffix}"
                raise
        if self.unique is not None and len(set(result)) != len(result):
            seen: set[Any] = set()
            for index, item in enumerate(result):
                if item in seen:
                    raise _Bad(f"duplicate {self.unique} {item}", f"[{index}]")
                seen.add(item)
        return tuple(result)


def _check_length(length: int, min_len: int, max_len: int) -> None:
    """Refuse an array length outside ``[min_len, max_len]``."""
    if length > max_len:
        raise _Bad(f"too many items ({length} > {max_len})")
    if length < min_len:
        raise _Bad("must not be empty" if min_len == 1 else
                   f"too few items ({length} < {min_len})")


class TupleKind(Kind):
    """A fixed-length array whose elements have their own kinds, carried as a tuple.

    Attributes:
        items: the kind of each position.
        shape: how the array reads in error messages, e.g. ``"[major, minor]"``.
    """

    __slots__ = ("items", "shape")

    def __init__(self, *items: Kind, shape: str) -> None:
        self.items = items
        self.shape = shape

    def coerce(self, value: Any) -> tuple[Any, ...]:
        values = _sequence(value, self.shape)
        if len(values) != len(self.items):
            raise _Bad(f"expected {self.shape}, got {len(values)} items")
        result = []
        for index, (kind, item) in enumerate(zip(self.items, values)):
            try:
                result.append(kind.coerce(item))
            except _Bad as bad:
                bad.suffix = f"[{index}]{bad.suffix}"
                raise
        return tuple(result)


class SeedPairsKind(Kind):
    """An array of ``[seed, value]`` pairs with distinct seeds, carried as tuples.

    This is the hot path of large frames (sync tables), hence its own inlined loop
    rather than ``ListKind(TupleKind(...))``.

    Attributes:
        value: the kind of the second element of each pair.
        max_len: most pairs allowed.
        min_len: fewest pairs allowed.
    """

    __slots__ = ("value", "max_len", "min_len")

    def __init__(self, value: Kind, max_len: int, *, min_len: int = 0) -> None:
        self.value = value
        self.max_len = max_len
        self.min_len = min_len

    def coerce(self, value: Any) -> tuple[tuple[int, float], ...]:
        pairs = _sequence(value, "array")
        _check_length(len(pairs), self.min_len, self.max_len)
        coerce_value = self.value.coerce
        result = []
        seen: set[int] = set()
        for index, pair in enumerate(pairs):
            if (type(pair) is not tuple and type(pair) is not list
                    and not isinstance(pair, (list, tuple))):
                raise _got("[seed, number]", pair).at(f"[{index}]")
            if len(pair) != 2:
                raise _Bad(f"expected [seed, number], got {len(pair)} items", f"[{index}]")
            seed, number = pair
            try:
                if type(seed) is not int or not 0 <= seed <= MAX_SEED:
                    seed = SEED.coerce(seed)
            except _Bad as bad:
                bad.suffix = f"[{index}][0]"
                raise
            try:
                number = coerce_value(number)
            except _Bad as bad:
                bad.suffix = f"[{index}][1]"
                raise
            if seed in seen:
                raise _Bad(f"duplicate seed {seed}", f"[{index}][0]")
            seen.add(seed)
            result.append((seed, number))
        return tuple(result)


class SettingsKind(Kind):
    """A small map of named scalars: a training mode's settings (``round_task.settings``).

    On the wire a map ``{name: value}``; in a message a tuple of ``(name, value)`` pairs
    sorted by name, so the message stays immutable and compares by content. Names are
    1-32 characters of ``[a-z0-9_]`` starting with a letter; values are bool, int in
    ``[-(2**53 - 1), 2**53 - 1]``, finite float or str of at most 256 characters.

    Attributes:
        max_items: most entries allowed.
    """

    __slots__ = ("max_items",)
    _NAME = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)
    _TEXT = StrKind(256)

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items

    def coerce(self, value: Any) -> tuple[tuple[str, Any], ...]:
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, (list, tuple)):
            items = []
            for item in value:
                if not isinstance(item, (list, tuple)) or len(item) != 2:
                    raise _got("map", value)
                items.append((item[0], item[1]))
            if len({name for name, _ in items}) != len(items):
                raise _Bad("duplicate setting name")
        else:
            raise _got("map", value)
        if len(items) > self.max_items:
            raise _Bad(f"too many settings ({len(items)} > {self.max_items})")
        result = []
        for name, item in items:
            if not isinstance(name, str) or not self._NAME.fullmatch(name):
                raise _Bad(f"setting names must be 1 to 32 characters of [a-z0-9_] starting with a letter, "
                           f"got {name!r}"[:200])
            if isinstance(item, bool):
                result.append((name, item))
            elif isinstance(item, int):
                if not -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
                    raise _Bad(f"setting {name}: {item} is out of range [-(2**53 - 1), 2**53 - 1]")
                result.append((name, int(item)))
            elif isinstance(item, float):
                if not math.isfinite(item):
                    raise _Bad(f"setting {name}: not finite")
                result.append((name, float(item)))
            elif isinstance(item, str):
                try:
                    result.append((name, self._TEXT.coerce(item)))
                except _Bad as bad:
                    raise _Bad(f"setting {name}: {bad.reason}") from None
            else:
                raise _Bad(f"setting {name}: expected bool, int, float or str, got {wire_type_name(item)}")
        return tuple(sorted(result))


class RecordKind(Kind):
    """A nested record (one of the tagless dataclasses), carried as a map.

    Attributes:
        record: the record's class.
    """

    __slots__ = ("record",)

    def __init__(self, record: type) -> None:
        self.record = record

    def coerce(self, value: Any) -> Any:
        if not isinstance(value, self.record):
            raise _got(self.record.__name__, value)
        return value


# The kinds most fields use.
SEED = IntKind(0, MAX_SEED, bounds="[0, 2**63)")
ROUND = IntKind(0, MAX_ROUND)
ROUND_POSITIVE = IntKind(1, MAX_ROUND)
COUNT = IntKind(0, MAX_SAFE_INT)
POSITIVE = IntKind(1, MAX_SAFE_INT)
F64 = F64Kind()
F64_POSITIVE = F64Kind(gt=0.0)
TEXT = StrKind(MAX_STRING_CHARS)
IDENTIFIER = StrKind(MAX_ID_CHARS, pattern=r"[A-Za-z0-9_.\-]{1,%d}" % MAX_ID_CHARS,
                     rule=f"1 to {MAX_ID_CHARS} characters of [A-Za-z0-9_.-]")
HEX_DIGEST = StrKind(64, pattern=r"[0-9a-f]{64}", rule="64 lowercase hex characters")
VERSION = TupleKind(IntKind(0, MAX_VERSION_NUMBER), IntKind(0, MAX_VERSION_NUMBER),
                    shape="[major, minor]")
SCOPE_KIND = StrKind(choices=("full", "lora"))

SeedField = Annotated[int, SEED]
RoundField = Annotated[int, ROUND]
PositiveRoundField = Annotated[int, ROUND_POSITIVE]
CountField = Annotated[int, COUNT]
PositiveField = Annotated[int, POSITIVE]
F64Field = Annotated[float, F64]
PositiveF64Field = Annotated[float, F64_POSITIVE]
TextField = Annotated[str, TEXT]
IdField = Annotated[str, IDENTIFIER]
DigestField = Annotated[str, HEX_DIGEST]
VersionField = Annotated[tuple[int, int], VERSION]
F32PairsField = Annotated[
    tuple[tuple[int, float], ...], SeedPairsKind(F32Kind(), MAX_SEEDS_PER_ROUND)
]


# ------------------------------------------------------------------------- records


class _Record:
    """Base of every record and message: validation driven by the field kinds."""

    __slots__ = ()

    # Filled in by @_schema: (name, kind) of each field in declaration order.
    _FIELDS: ClassVar[tuple[tuple[str, Kind], ...]]
    _FIELD_NAMES: ClassVar[frozenset[str]]
    # First component of error paths: TYPE for messages, the class name for records.
    _LABEL: ClassVar[str]
    # Fields added after their record (see ScopeSpec.lora_layers): left out of the wire
    # map while they hold their default, and read as that default when absent, so peers
    # that predate them interoperate for as long as the field is not used.
    _OMITTED_WHEN_DEFAULT: ClassVar[frozenset[str]] = frozenset()
    _DEFAULTS: ClassVar[dict[str, Any]]

    def __post_init__(self) -> None:
        try:
            self._validate(self._LABEL)
        except InvalidMessage as exc:
            raise LocalProtocolError(str(exc)) from exc

    def _validate(self, path: str) -> None:
        """Check and normalise every field, then the cross-field rules.

        Args:
            path: path of this record in the message being checked.

        Raises:
            InvalidMessage: a field or a combination of fields is invalid.
        """
        for name, kind in self._FIELDS:
            object.__setattr__(self, name, kind.check(getattr(self, name), f"{path}.{name}"))
        self._check(path)

    def _check(self, path: str) -> None:
        """Cross-field rules; each record with some overrides this.

        Raises:
            InvalidMessage: the fields are inconsistent.
        """

    @classmethod
    def _from_fields(cls: type[_T], values: dict[str, Any], path: str) -> _T:
        """Build and validate a record from wire values, reporting errors at ``path``.

        Raises:
            InvalidMessage: a value is invalid (the peer's fault, hence not local).
        """
        record = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(record, name, value)
        record._validate(path)  # type: ignore[attr-defined]
        return record


_R = TypeVar("_R", bound=type[_Record])


def _schema(cls: _R) -> _R:
    """Class decorator: record the field kinds declared in a record dataclass's annotations.

    Applied on top of ``@dataclass(frozen=True, slots=True, kw_only=True)``.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = []
    omittable = cls.__dict__.get("_OMITTED_WHEN_DEFAULT", frozenset())
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in omittable:
            if field.default is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{field.name} may be omitted, so it needs a default")
            defaults[field.name] = field.default
        kinds = [m for m in getattr(hints[field.name], "__metadata__", ()) if isinstance(m, Kind)]
        if len(kinds) != 1:
            raise TypeError(f"{cls.__name__}.{field.name} must declare exactly one Kind")
        fields.append((field.name, kinds[0]))
    cls._FIELDS = tuple(fields)
    cls._FIELD_NAMES = frozenset(name for name, _ in fields)
    cls._DEFAULTS = defaults
    cls._LABEL = cls.__dict__.get("TYPE", cls.__name__)
    return cls


def field_kinds(cls: type) -> tuple[tuple[str, Kind], ...]:
    """The ``(name, kind)`` of each field of a record or message class, in wire order."""
    return cls._FIELDS  # type: ignore[attr-defined, no-any-return]


def omitted_defaults(cls: type) -> dict[str, Any]:
    """The fields of a record class that the wire map leaves out while they hold their
    default (read as that default when absent), with those defaults."""
    return cls._DEFAULTS  # type: ignore[attr-defined, no-any-return]


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class ScopeSpec(_Record):
    """Which parameters the federation trains.

    Attributes:
        kind: ``"full"`` (all trainable weights) or ``"lora"`` (adapters only).
        lora_rank: adapter rank; must be > 0 when kind is ``"lora"``.
        lora_alpha: adapter scaling numerator.
        lora_targets: names of the modules that get adapters.
        lora_init_seed: seed from which every client initialises the adapters identically.
        lora_layers: the decoder layers (indices in the full model) whose target modules
            get adapters, ascending; ``()`` (the default): every layer. Left out of the
            wire map when empty (PROTOCOL.md §4.1).
    """

    _OMITTED_WHEN_DEFAULT: ClassVar[frozenset[str]] = frozenset({"lora_layers"})

    kind: Annotated[str, SCOPE_KIND]
    lora_rank: Annotated[int, IntKind(0, MAX_LORA_RANK)]
    lora_alpha: Annotated[float, F64Kind(ge=0.0)]
    lora_targets: Annotated[
        tuple[str, ...], ListKind(StrKind(MAX_STRING_CHARS, min_chars=1), MAX_LORA_TARGETS)
    ]
    lora_init_seed: SeedField
    lora_layers: Annotated[tuple[int, ...], ListKind(IntKind(0, MAX_LAYER_INDEX), MAX_LORA_LAYERS,
                                                     unique="layer")] = ()

    def _check(self, path: str) -> None:
        if self.kind == "lora" and self.lora_rank == 0:
            raise InvalidMessage(f"{path}.lora_rank", "must be > 0 when kind is 'lora'")
        if self.lora_layers and self.kind != "lora":
            raise InvalidMessage(f"{path}.lora_layers", "must be empty when kind is not 'lora'")
        if list(self.lora_layers) != sorted(self.lora_layers):
            raise InvalidMessage(f"{path}.lora_layers", "must be in ascending order")


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile(_Record):
    """What the client runs on, as reported in its hello.

    Attributes:
        device_type: ``"cpu"``, ``"cuda"`` or ``"mps"``.
        device_name: human-readable device name.
        accelerator_total_bytes: accelerator memory in total (0 without one).
        accelerator_free_bytes: accelerator memory free now.
        host_total_bytes: host memory in total.
        host_free_bytes: host memory available now.
        memory_budget_bytes: the most memory the user lets training use, or None.
    """

    device_type: Annotated[str, StrKind(choices=("cpu", "cuda", "mps"))]
    device_name: TextField
    accelerator_total_bytes: CountField
    accelerator_free_bytes: CountField
    host_total_bytes: CountField
    host_free_bytes: CountField
    memory_budget_bytes: Annotated[int | None, OptionalKind(COUNT)]


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class FederationInfo(_Record):
    """The fixed parameters of a federation, sent to each client on welcome.

    Attributes:
        federation_id: identifier of the federation.
        model_name: name of the base model.
        model_hash: SHA-256 (hex) of the base model weights.
        scope: which parameters are trained.
        seed_pool_size: number of seeds rounds draw from (<= MAX_TABLE_ENTRIES; the
            reference coordinator requires >= 1).
        rebase_every: at every multiple of it the model is defined from the base weights
            and the seed table (PROTOCOL.md §6.3); at most MAX_SYNC_ROUNDS so that any
            sync fits one response.
        perturbation: ``"rademacher"`` or ``"gaussian"``.
        aggregation: how updates are combined, e.g. ``"mean"``.
        learning_rate: default learning rate.
        epsilon: default perturbation scale.
        local_steps: seeds per round.
        batch_size: default examples per forward pass.
        max_seq_len: default longest token sequence.
        block_seeds: seeds per block (PROTOCOL.md §5.5): with ``J > 0`` the first ``J``
            block seeds of every block have their directions restricted to the block
            (cyclic block updates, ``fedcybgd``); 0 (the default, left out of the wire
            map): every seed's direction covers the whole space.
    """

    _OMITTED_WHEN_DEFAULT: ClassVar[frozenset[str]] = frozenset({"block_seeds"})

    federation_id: IdField
    model_name: TextField
    model_hash: DigestField
    scope: Annotated[ScopeSpec, RecordKind(ScopeSpec)]
    seed_pool_size: Annotated[int, IntKind(0, MAX_TABLE_ENTRIES)]
    # A sync replays at most rebase_every - 1 rounds after the last rebase.
    rebase_every: Annotated[int, IntKind(1, MAX_SYNC_ROUNDS)]
    perturbation: Annotated[str, StrKind(choices=("rademacher", "gaussian"))]
    aggregation: TextField
    learning_rate: PositiveF64Field
    epsilon: PositiveF64Field
    local_steps: Annotated[int, IntKind(1, MAX_SEEDS_PER_ROUND)]
    batch_size: PositiveField
    max_seq_len: PositiveField
    block_seeds: Annotated[int, IntKind(0, MAX_BLOCK_SEEDS)] = 0


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundEntry(_Record):
    """One committed round in a sync response.

    Attributes:
        round: the round number (>= 1).
        coefficients: ``(seed, coefficient)`` pairs applied in that round, in task order.
    """

    round: PositiveRoundField
    coefficients: F32PairsField


# ------------------------------------------------------------------------ messages


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge(_Record):
    """Coordinator -> client, first frame: version, a nonce the hello signs, and the task.

    Attributes:
        protocol_version: the coordinator's ``(major, minor)``.
        server_nonce: 16 to 64 random bytes.
        federation_id: the federation this endpoint serves.
        federation: the federation's parameters, announced before the hello so that a
            client can choose its training mode and batch for this task (and say so in
            its hello) or decline; ``federation.federation_id == federation_id``.
    """

    TYPE: ClassVar[str] = "challenge"

    protocol_version: VersionField
    server_nonce: Annotated[bytes, BytesKind(MIN_SERVER_NONCE_BYTES, MAX_SERVER_NONCE_BYTES)]
    federation_id: IdField
    federation: Annotated[FederationInfo, RecordKind(FederationInfo)]

    def _check(self, path: str) -> None:
        if self.federation.federation_id != self.federation_id:
            raise InvalidMessage(f"{path}.federation.federation_id", "must equal federation_id")


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(_Record):
    """Coordinator -> client: the hello was accepted.

    Attributes:
        client_id: the client's id as registered.
        federation: the federation's parameters.
        last_committed_round: the latest committed round (0 before the first).
    """

    TYPE: ClassVar[str] = "welcome"

    client_id: IdField
    federation: Annotated[FederationInfo, RecordKind(FederationInfo)]
    last_committed_round: RoundField


REJECT_CODES = (
    "version",
    "model_mismatch",
    "not_allowed",
    "bad_hello",
    "duplicate_client",
    "server_full",
)


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class Reject(_Record):
    """Coordinator -> client: the hello was refused; the connection closes next.

    Attributes:
        code: one of :data:`REJECT_CODES`.
        message: human-readable explanation.
        supported_versions: ``(major, minor)`` versions the coordinator speaks.
    """

    TYPE: ClassVar[str] = "reject"

    code: Annotated[str, StrKind(choices=REJECT_CODES)]
    message: TextField
    supported_versions: Annotated[
        tuple[tuple[int, int], ...], ListKind(VERSION, MAX_SUPPORTED_VERSIONS)
    ]


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundTask(_Record):
    """Coordinator -> client: compute projected gradients for these seeds.

    Attributes:
        round: the round being computed (>= 1).
        attempt: retry counter of the round, from 0.
        base_round: the round the model must be at; always ``round - 1``.
        seeds: the round's seeds, distinct, in order.
        learning_rate: learning rate of the round.
        epsilon: perturbation scale of the round.
        batch_size: examples per forward pass.
        max_seq_len: longest token sequence.
        scope: ``"full"`` or ``"lora"``.
        deadline_s: seconds the client has to answer.
        settings: the client's training mode's settings for this round, ``(name,
            value)`` pairs sorted by name (a map on the wire; PROTOCOL.md §4.3).
    """

    TYPE: ClassVar[str] = "round_task"

    round: PositiveRoundField
    attempt: CountField
    base_round: RoundField
    seeds: Annotated[
        tuple[int, ...], ListKind(SEED, MAX_SEEDS_PER_ROUND, min_len=1, unique="seed")
    ]
    learning_rate: PositiveF64Field
    epsilon: PositiveF64Field
    batch_size: PositiveField
    max_seq_len: PositiveField
    scope: Annotated[str, SCOPE_KIND]
    deadline_s: PositiveF64Field
    settings: Annotated[tuple[tuple[str, Any], ...], SettingsKind(MAX_MODE_SETTINGS)] = ()

    def _check(self, path: str) -> None:
        if self.base_round != self.round - 1:
            raise InvalidMessage(f"{path}.base_round", f"must be round - 1 ({self.round - 1})")


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateAck(_Record):
    """Coordinator -> client: the update was received.

    Attributes:
        round: round of the update.
        attempt: attempt of the update.
        status: ``"accepted"``, or ``"duplicate"`` for a resend of an update the
            coordinator already holds for that attempt, also after the attempt
            committed or was abandoned, until the next attempt opens (PROTOCOL.md §7.2).
            It does not say whether the attempt committed; ``round_commit`` does.
    """

    TYPE: ClassVar[str] = "update_ack"

    round: RoundField
    attempt: CountField
    status: Annotated[str, StrKind(choices=("accepted", "duplicate"))]


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundCommit(_Record):
    """Coordinator -> clients: a round is committed.

    Attributes:
        round: the committed round (>= 1).
        attempt: the attempt that committed.
        coefficients: ``(seed, coefficient)`` applied this round, in task order.
        totals: ``(seed, new accumulated total)`` for the same seeds in the same order.
        table_digest: digest of the table after this round.
        num_updates: updates aggregated (>= 1).
    """

    TYPE: ClassVar[str] = "round_commit"

    round: PositiveRoundField
    attempt: CountField
    coefficients: F32PairsField
    totals: F32PairsField
    table_digest: DigestField
    num_updates: PositiveField

    def _check(self, path: str) -> None:
        if len(self.totals) != len(self.coefficients):
            raise InvalidMessage(
                f"{path}.totals",
                f"has {len(self.totals)} items, coefficients has {len(self.coefficients)}",
            )
        for index, ((seed, _), (total_seed, _)) in enumerate(
            zip(self.coefficients, self.totals)
        ):
            if seed != total_seed:
                raise InvalidMessage(
                    f"{path}.totals[{index}][0]",
                    f"seed {total_seed} does not match coefficients[{index}] seed {seed}",
                )


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class SyncResponse(_Record):
    """Coordinator -> client: bring a replica from ``base_round`` to ``target_round``.

    The table is the accumulated ``seed -> total`` at ``base_round`` (empty when the
    client's own table is the base); ``rounds`` are the rounds after it, consecutively
    from ``base_round + 1`` to ``target_round``.

    Attributes:
        target_round: the round the replica reaches.
        base_round: the round of ``table`` (<= target_round).
        table: ``(seed, total)`` in strictly ascending seed order, totals nonzero.
        rounds: one entry per round ``base_round + 1 .. target_round``.
        table_digest: digest of the table at ``target_round``.
    """

    TYPE: ClassVar[str] = "sync_response"

    target_round: RoundField
    base_round: RoundField
    table: Annotated[
        tuple[tuple[int, float], ...], SeedPairsKind(F32Kind(nonzero=True), MAX_TABLE_ENTRIES)
    ]
    rounds: Annotated[
        tuple[RoundEntry, ...], ListKind(RecordKind(RoundEntry), MAX_SYNC_ROUNDS)
    ]
    table_digest: DigestField

    def _check(self, path: str) -> None:
        if self.base_round > self.target_round:
            raise InvalidMessage(
                f"{path}.base_round", f"must be <= target_round ({self.target_round})"
            )
        previous = -1
        for index, (seed, _) in enumerate(self.table):
            if seed <= previous:
                raise InvalidMessage(f"{path}.table[{index}][0]", "seeds not strictly ascending")
            previous = seed
        expected_count = self.target_round - self.base_round
        for index, entry in enumerate(self.rounds):
            expected = self.base_round + 1 + index
            if entry.round != expected:
                raise InvalidMessage(
                    f"{path}.rounds[{index}].round",
                    f"expected round {expected} (consecutive from base_round + 1)",
                )
        if len(self.rounds) != expected_count:
            raise InvalidMessage(
                f"{path}.rounds",
                f"has {len(self.rounds)} rounds, base_round..target_round needs {expected_count}",
            )


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class Error(_Record):
    """Either direction in practice, sent by the coordinator: something went wrong.

    Attributes:
        code: machine-readable code, e.g. a PeerProtocolError's ``error_code``.
        message: human-readable explanation.
        field: path of the offending field, or None.
        round: round concerned, or None.
    """

    TYPE: ClassVar[str] = "error"

    code: TextField
    message: TextField
    field: Annotated[str | None, OptionalKind(TEXT)]
    round: Annotated[int | None, OptionalKind(ROUND)]


OBSERVER_MODE = "observe"
"""The ``hello.mode`` of a client that follows the ledger (an evaluator, say) but never
trains: the coordinator never assigns it a task."""


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(_Record):
    """Client -> coordinator, answering the challenge.

    Attributes:
        protocol_version: the client's ``(major, minor)``.
        client_id: the client's id.
        device: what the client runs on.
        mode: how the client takes part (e.g. ``"train"``).
        model_hash: SHA-256 (hex) of the client's base model weights.
        last_round: the round the client's replica is at (0 if fresh).
        table_digest: digest of the client's table, or None without a replica.
        plan: one readable line saying how the client will train and why (mode, batch,
            estimated peak against its memory budget), or None.
        public_key: the client's Ed25519 public key (32 bytes), or None.
        signature: Ed25519 signature over the challenge (64 bytes), or None.
        blocks: the blocks (PROTOCOL.md §5.5) a ``fedcybgd`` client's memory can train,
            ascending; ``()`` (the default, left out of the wire map): any block.
    """

    TYPE: ClassVar[str] = "hello"
    _OMITTED_WHEN_DEFAULT: ClassVar[frozenset[str]] = frozenset({"blocks"})

    protocol_version: VersionField
    client_id: IdField
    device: Annotated[DeviceProfile, RecordKind(DeviceProfile)]
    mode: TextField
    model_hash: DigestField
    last_round: RoundField
    table_digest: Annotated[str | None, OptionalKind(HEX_DIGEST)]
    plan: Annotated[str | None, OptionalKind(TEXT)]
    public_key: Annotated[
        bytes | None, OptionalKind(BytesKind(PUBLIC_KEY_BYTES, PUBLIC_KEY_BYTES))
    ]
    signature: Annotated[bytes | None, OptionalKind(BytesKind(SIGNATURE_BYTES, SIGNATURE_BYTES))]
    blocks: Annotated[tuple[int, ...], ListKind(IntKind(0, MAX_LAYER_INDEX), MAX_LORA_LAYERS + 1,
                                                unique="block")] = ()

    def _check(self, path: str) -> None:
        if list(self.blocks) != sorted(self.blocks):
            raise InvalidMessage(f"{path}.blocks", "must be in ascending order")


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class Update(_Record):
    """Client -> coordinator: projected gradients of a round.

    Attributes:
        round: the round (>= 1).
        attempt: the attempt of the task answered.
        client_id: the sender.
        pairs: ``(seed, projected gradient)``, distinct seeds.
        num_examples: how many training examples the scalars in ``pairs`` were computed
            from in this round (one batch per seed: seeds x batch size, the engine's
            ``LocalUpdate.num_examples``), not the size of the client's data set. It
            weighs the update in the ``"mean"`` aggregation and among the values
            ``"trimmed_mean"`` keeps (PROTOCOL.md §8.2).
        loss_before: mean loss before the local steps.
        loss_after: mean loss after the local steps.
        nonce: 16 random bytes, unique per update.
        signature: Ed25519 signature over the update (64 bytes), or None.
    """

    TYPE: ClassVar[str] = "update"

    round: PositiveRoundField
    attempt: CountField
    client_id: IdField
    pairs: Annotated[
        tuple[tuple[int, float], ...], SeedPairsKind(F64, MAX_SEEDS_PER_ROUND, min_len=1)
    ]
    num_examples: Annotated[int, IntKind(1, MAX_EXAMPLES)]
    loss_before: F64Field
    loss_after: F64Field
    nonce: Annotated[bytes, BytesKind(NONCE_BYTES, NONCE_BYTES)]
    signature: Annotated[bytes | None, OptionalKind(BytesKind(SIGNATURE_BYTES, SIGNATURE_BYTES))]


VALUE_ENCODINGS: dict[str, int] = {"f32": 4, "q8": 1}
"""The encodings of a ``packed_update``'s values and the bytes each value takes."""


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class PackedUpdate(_Record):
    """Client -> coordinator: an update whose seeds are implied by the task (since 2.1).

    Sent instead of ``update`` when the round task's settings ask for it (the reserved
    key ``value_encoding``, PROTOCOL.md §4.3). The values answer the client's seeds of
    the task in task order, so no seed travels: value ``k`` is ``scale × x_k``, with
    ``x_k`` the ``k``-th element of ``values`` read as a little-endian IEEE float32
    (``"f32"``) or a signed byte in [-127, 127] (``"q8"``). See :mod:`protocol.values`.

    Attributes:
        round: the round (>= 1).
        attempt: the attempt of the task answered.
        client_id: the sender.
        encoding: ``"f32"`` or ``"q8"``.
        scale: the factor every element is multiplied by (finite, > 0).
        values: the packed elements, one per seed of the task handed to this client.
        num_examples: as in ``update``.
        loss_before: as in ``update``.
        loss_after: as in ``update``.
        nonce: 16 random bytes, unique per update.
        signature: Ed25519 signature over the update (64 bytes), or None.
    """

    TYPE: ClassVar[str] = "packed_update"

    round: PositiveRoundField
    attempt: CountField
    client_id: IdField
    encoding: Annotated[str, StrKind(choices=tuple(VALUE_ENCODINGS))]
    scale: PositiveF64Field
    values: Annotated[bytes, BytesKind(1, 4 * MAX_SEEDS_PER_ROUND)]
    num_examples: Annotated[int, IntKind(1, MAX_EXAMPLES)]
    loss_before: F64Field
    loss_after: F64Field
    nonce: Annotated[bytes, BytesKind(NONCE_BYTES, NONCE_BYTES)]
    signature: Annotated[bytes | None, OptionalKind(BytesKind(SIGNATURE_BYTES, SIGNATURE_BYTES))]

    def _check(self, path: str) -> None:
        width = VALUE_ENCODINGS[self.encoding]
        if len(self.values) % width:
            raise InvalidMessage(f"{path}.values", f"{len(self.values)} bytes is not a whole number of "
                                 f"{width}-byte {self.encoding} values")
        if len(self.values) // width > MAX_SEEDS_PER_ROUND:
            raise InvalidMessage(f"{path}.values", f"more than {MAX_SEEDS_PER_ROUND} values")
        if self.encoding == "q8":
            at = self.values.find(b"\x80")  # -128 has no positive twin: the range is symmetric
            if at >= 0:
                raise InvalidMessage(f"{path}.values[{at}]", "q8 element -128 (0x80)")
        else:
            for index, (element,) in enumerate(struct.iter_unpack("<f", self.values)):
                if not math.isfinite(element * self.scale):
                    raise InvalidMessage(f"{path}.values[{index}]", "not finite once scaled")

    @property
    def count(self) -> int:
        """How many values (seeds) the update carries."""
        return len(self.values) // VALUE_ENCODINGS[self.encoding]

    def decoded(self) -> tuple[float, ...]:
        """The values: each element times ``scale``, one IEEE float64 multiplication
        (so every implementation decodes the same bits)."""
        if self.encoding == "q8":
            return tuple(self.scale * element for element in struct.unpack(f"<{len(self.values)}b", self.values))
        return tuple(self.scale * element for (element,) in struct.iter_unpack("<f", self.values))


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class Fingerprint(_Record):
    """Client -> coordinator: proof of the client's model state after a round.

    Attributes:
        round: the round the client is at.
        fingerprint: SHA-256 (hex) of the client's model state.
        table_digest: digest of the client's table.
        eval_loss: an observer's (e.g. an evaluator's) held-out loss of the round's model,
            for the coordinator's page; None (omitted on the wire) otherwise. Added after
            the message: peers that predate it never send it.
    """

    TYPE: ClassVar[str] = "fingerprint"
    _OMITTED_WHEN_DEFAULT: ClassVar[frozenset[str]] = frozenset({"eval_loss"})

    round: RoundField
    fingerprint: DigestField
    table_digest: DigestField
    eval_loss: Annotated[float | None, OptionalKind(F64)] = None


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRequest(_Record):
    """Client -> coordinator: send what I miss after ``have_round``.

    Attributes:
        have_round: the round the client's replica is at.
    """

    TYPE: ClassVar[str] = "sync_request"

    have_round: RoundField


@_schema
@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(_Record):
    """Either direction: orderly close.

    Attributes:
        reason: human-readable reason.
    """

    TYPE: ClassVar[str] = "goodbye"

    reason: TextField


Message = Union[
    Challenge,
    Welcome,
    Reject,
    RoundTask,
    UpdateAck,
    RoundCommit,
    SyncResponse,
    Error,
    Hello,
    Update,
    PackedUpdate,
    Fingerprint,
    SyncRequest,
    Goodbye,
]

MESSAGE_TYPES: dict[str, type] = {cls.TYPE: cls for cls in typing.get_args(Message)}
