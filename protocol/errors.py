"""Exceptions of the wire protocol.

Every error the protocol package raises derives from :class:`ProtocolError` (except
:class:`protocol.keyfile.KeyFileError`, which is about local key files, not the wire),
split by who is to blame::

    ProtocolError(Exception)
    ├── LocalProtocolError        our own misuse (building or encoding an invalid message)
    │   └── InvalidState          an event is not allowed in the current state
    └── PeerProtocolError         the peer sent something invalid
        ├── FrameTooLarge         frame longer than the limit          close 1009
        ├── MalformedFrame        not one well-formed msgpack value    close 1007
        ├── UnknownMessageType    "type" names no known message        close 1003
        ├── InvalidMessage        schema violation at a field path     close 1007
        └── VersionMismatch       unsupported protocol major version   close 1002

A :class:`PeerProtocolError` carries ``error_code`` (the ``code`` of the ``error``
message sent back to the peer) and ``close_code`` (the websocket close code to use if
the connection is dropped). Each exception keeps its fields as attributes and builds
``str()`` from them; the fields are also passed to ``Exception.__init__`` so the
exceptions pickle.
"""

from __future__ import annotations

__all__ = [
    "ProtocolError",
    "LocalProtocolError",
    "InvalidState",
    "PeerProtocolError",
    "FrameTooLarge",
    "MalformedFrame",
    "UnknownMessageType",
    "InvalidMessage",
    "VersionMismatch",
]


class ProtocolError(Exception):
    """Base class of every error raised by the protocol package."""


class LocalProtocolError(ProtocolError):
    """This side misused the protocol, e.g. built a message with an invalid field.

    Attributes:
        message: what went wrong.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidState(LocalProtocolError):
    """An event is not allowed in the current state of a protocol state machine.

    Attributes:
        state: the current state.
        event: the event that was refused.
    """

    def __init__(self, state: object, event: object) -> None:
        ProtocolError.__init__(self, state, event)
        self.state = state
        self.event = event
        self.message = f"event {event} is not allowed in state {state}"


class PeerProtocolError(ProtocolError):
    """The peer sent something that violates the protocol.

    Attributes:
        error_code: the ``code`` to send back in an ``error`` message.
        close_code: the websocket close code to use when closing because of it.
    """

    error_code: str = "protocol_error"
    close_code: int = 1002


class FrameTooLarge(PeerProtocolError):
    """A frame is longer than the limit; it was refused before unpacking.

    Attributes:
        size: length of the frame in bytes.
        limit: the largest length allowed.
    """

    error_code = "frame_too_large"
    close_code = 1009

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size, limit)
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return f"frame of {self.size} bytes exceeds the limit of {self.limit} bytes"


class MalformedFrame(PeerProtocolError):
    """A frame is not exactly one acceptable msgpack value.

    Covers bytes that are not msgpack, truncated values, trailing bytes, extension
    types, map keys that are not strings, duplicate map keys, nesting that is too deep
    and containers longer than the unpacker's limits.

    Attributes:
        reason: what is wrong with the frame.
    """

    error_code = "malformed"
    close_code = 1007

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"malformed frame: {self.reason}"


class UnknownMessageType(PeerProtocolError):
    """The frame's ``"type"`` names no message of this protocol.

    Attributes:
        type_name: the type tag received (possibly shortened).
    """

    error_code = "unknown_type"
    close_code = 1003

    def __init__(self, type_name: str) -> None:
        super().__init__(type_name)
        self.type_name = type_name

    def __str__(self) -> str:
        return f"unknown message type {self.type_name!r}"


class InvalidMessage(PeerProtocolError):
    """A message violates its schema.

    Attributes:
        path: where, as ``"<type>.<field>[i][j]"``, e.g. ``"update.pairs[3][1]"``.
        reason: what is wrong there, e.g. ``"not finite"``.
    """

    error_code = "invalid_field"
    close_code = 1007

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class VersionMismatch(PeerProtocolError):
    """The peer speaks a protocol major version this side does not support.

    Attributes:
        theirs: the peer's ``(major, minor)`` version.
        supported: the major versions this side supports.
    """

    error_code = "version"
    close_code = 1002

    def __init__(self, theirs: tuple[int, int], supported: tuple[int, ...]) -> None:
        super().__init__(theirs, supported)
        self.theirs = theirs
        self.supported = supported

    def __str__(self) -> str:
        majors = ", ".join(str(major) for major in self.supported)
        return (
            f"protocol version {self.theirs[0]}.{self.theirs[1]} is not supported "
            f"(supported major versions: {majors})"
        )
