"""The exact bytes a client signs: a fixed binary layout, not a re-encoding of msgpack.

An Ed25519 signature covers bytes, not messages, so both sides must build the same
bytes from the same message. msgpack cannot serve: several encodings of one value are
valid, and a peer in another language may pick another. These functions define the
*signed bytes* of a ``hello`` and of an ``update`` field by field, in a layout that any
language can reproduce (PROTOCOL.md §4.5.1 has the table, §4.5.3 the test vectors).
This module signs and verifies nothing itself: it is pure (hashlib and struct only),
so the protocol layer stays free of I/O (cryptography appears there only in
``keyfile.py``, to parse key files).

Building blocks, all integers big-endian:

============  ====================================================================
``u16``       2 bytes, unsigned
``u32``       4 bytes, unsigned
``u64``       8 bytes, unsigned
``f64``       8 bytes, IEEE-754 binary64 (the field's value as a float64; -0.0 and
              0.0 differ)
``str``       ``u32`` byte length, then the UTF-8 bytes
``bin``       ``u32`` byte length, then the bytes
``opt<T>``    ``0x00`` for nil, or ``0x01`` followed by ``T``
``raw[n]``    exactly ``n`` bytes (fixed-length fields: keys, nonces, hashes)
============  ====================================================================

Every signed byte string starts with a distinct NUL-terminated domain-separation tag
(:data:`HELLO_TAG`, :data:`UPDATE_TAG`), so a signature made for one purpose is never
valid for another, and every variable-length field carries its length, so no two
different messages share signed bytes.

Hello (:func:`hello_signed_bytes`): the tag, then the coordinator's challenge
(``protocol_version``, ``federation_id``, ``server_nonce``; not ``federation``, which
the welcome repeats), then every field of the hello except ``signature``. Signing the
server's fresh nonce proves possession of the key *now*, on this connection; signing
the federation id and the rest means the hello can be neither replayed elsewhere nor
altered.

Update (:func:`update_signed_bytes`): the tag, the challenge's ``federation_id`` and
``server_nonce`` (the update is bound to the federation and to the connection whose
hello was verified), ``client_id``, ``round``, ``attempt``, the update's 16-byte
``nonce`` and the SHA-256 of its body (:func:`update_body_bytes`: the pairs,
``num_examples``, ``loss_before``, ``loss_after``). So every field of the update except
``signature`` is covered.

Packed update (since 2.1): the same layout under its own tag,
:data:`PACKED_UPDATE_TAG`, with the SHA-256 of :func:`packed_update_body_bytes`
(``encoding``, ``scale``, the packed ``values`` as sent, ``num_examples``,
``loss_before``, ``loss_after``): the signature covers the bytes the coordinator
decodes, so no re-encoding of floats is needed to check it.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

from protocol.limits import NONCE_BYTES, PUBLIC_KEY_BYTES
from protocol.messages import Challenge, DeviceProfile, Hello, PackedUpdate, Update

__all__ = [
    "HELLO_TAG",
    "UPDATE_TAG",
    "PACKED_UPDATE_TAG",
    "hello_signed_bytes",
    "update_signed_bytes",
    "update_body_bytes",
    "update_body_hash",
    "packed_update_body_bytes",
]

HELLO_TAG: Final = b"edgefed-hello-v1\x00"
"""Domain-separation tag that starts the signed bytes of a hello (17 bytes)."""

UPDATE_TAG: Final = b"edgefed-update-v1\x00"
"""Domain-separation tag that starts the signed bytes of an update (18 bytes)."""

PACKED_UPDATE_TAG: Final = b"edgefed-packed-update-v1\x00"
"""Domain-separation tag that starts the signed bytes of a packed update (25 bytes)."""

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_PAIR = struct.Struct(">Qd")
_VERSION = struct.Struct(">HH")


def _u64(value: int) -> bytes:
    """``value`` as a big-endian unsigned 64-bit integer."""
    return _U64.pack(value)


def _bin(data: bytes) -> bytes:
    """``data`` prefixed with its length as u32."""
    return _U32.pack(len(data)) + data


def _str(text: str) -> bytes:
    """The UTF-8 bytes of ``text`` prefixed with their length as u32."""
    return _bin(text.encode("utf-8"))


def _opt_str(text: str | None) -> bytes:
    """``0x00`` for None, else ``0x01`` and the str."""
    return b"\x00" if text is None else b"\x01" + _str(text)


def _version(version: tuple[int, int]) -> bytes:
    """A ``(major, minor)`` protocol version as two u16."""
    return _VERSION.pack(version[0], version[1])


def _raw(data: bytes, size: int, what: str) -> bytes:
    """A fixed-length field, checked to be exactly ``size`` bytes.

    Raises:
        ValueError: ``data`` is not ``size`` bytes long.
    """
    if len(data) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(data)}")
    return bytes(data)


def _device(device: DeviceProfile) -> bytes:
    """A DeviceProfile: two str, four u64 and an opt<u64>, in declaration order."""
    parts = [
        _str(device.device_type),
        _str(device.device_name),
        _u64(device.accelerator_total_bytes),
        _u64(device.accelerator_free_bytes),
        _u64(device.host_total_bytes),
        _u64(device.host_free_bytes),
    ]
    if device.memory_budget_bytes is None:
        parts.append(b"\x00")
    else:
        parts.append(b"\x01" + _u64(device.memory_budget_bytes))
    return b"".join(parts)


def hello_signed_bytes(challenge: Challenge, hello: Hello) -> bytes:
    """The bytes a client signs to answer ``challenge`` with ``hello``.

    Layout (every field of the hello but ``signature``; ``hello.public_key`` must be
    set, since the key is what the signature is checked against)::

        raw[17]   HELLO_TAG                "edgefed-hello-v1" 0x00
        u16 u16   challenge.protocol_version
        str       challenge.federation_id
        bin       challenge.server_nonce
        u16 u16   hello.protocol_version
        str       hello.client_id
        str str   hello.device.device_type, hello.device.device_name
        u64 x4    hello.device.accelerator_total_bytes, accelerator_free_bytes,
                  host_total_bytes, host_free_bytes
        opt<u64>  hello.device.memory_budget_bytes
        str       hello.mode
        str       hello.model_hash
        u64       hello.last_round
        opt<str>  hello.table_digest
        opt<str>  hello.plan
        raw[32]   hello.public_key
        (only when hello.blocks is not empty:)
        u32 u16…  the number of blocks, then each block

    (A hello without blocks signs the bytes it signed before the field existed.)

    Args:
        challenge: the challenge the coordinator sent on this connection.
        hello: the hello answering it (its ``signature`` is ignored).

    Returns:
        The bytes to sign or verify.

    Raises:
        ValueError: ``hello.public_key`` is nil.
    """
    if hello.public_key is None:
        raise ValueError("a hello must carry its public_key to be signed")
    parts = [
        HELLO_TAG,
        _version(challenge.protocol_version),
        _str(challenge.federation_id),
        _bin(challenge.server_nonce),
        _version(hello.protocol_version),
        _str(hello.client_id),
        _device(hello.device),
        _str(hello.mode),
        _str(hello.model_hash),
        _u64(hello.last_round),
        _opt_str(hello.table_digest),
        _opt_str(hello.plan),
        _raw(hello.public_key, PUBLIC_KEY_BYTES, "hello.public_key"),
    ]
    if hello.blocks:
        parts.append(struct.pack(">I", len(hello.blocks)) + b"".join(struct.pack(">H", b) for b in hello.blocks))
    return b"".join(parts)


def update_body_bytes(update: Update) -> bytes:
    """The body of an update, the bytes whose SHA-256 the signed bytes hold.

    Layout::

        u32       number of pairs n
        n x (u64 seed, f64 value)   update.pairs, in order
        u64       update.num_examples
        f64       update.loss_before
        f64       update.loss_after

    Args:
        update: the update.

    Returns:
        The body bytes (12 + 16 n + 16 bytes).
    """
    pack_pair = _PAIR.pack
    return b"".join((
        _U32.pack(len(update.pairs)),
        b"".join(pack_pair(seed, value) for seed, value in update.pairs),
        _u64(update.num_examples),
        _F64.pack(update.loss_before),
        _F64.pack(update.loss_after),
    ))


def packed_update_body_bytes(update: PackedUpdate) -> bytes:
    """The body of a packed update, the bytes whose SHA-256 its signed bytes hold.

    Layout::

        str       update.encoding
        f64       update.scale
        bin       update.values            as sent
        u64       update.num_examples
        f64       update.loss_before
        f64       update.loss_after
    """
    return b"".join((
        _str(update.encoding),
        _F64.pack(update.scale),
        _bin(update.values),
        _u64(update.num_examples),
        _F64.pack(update.loss_before),
        _F64.pack(update.loss_after),
    ))


def update_body_hash(update: Update | PackedUpdate) -> bytes:
    """SHA-256 of the update's body (32 bytes): :func:`update_body_bytes`, or
    :func:`packed_update_body_bytes` for a packed update."""
    if isinstance(update, PackedUpdate):
        return hashlib.sha256(packed_update_body_bytes(update)).digest()
    return hashlib.sha256(update_body_bytes(update)).digest()


def update_signed_bytes(challenge: Challenge, update: Update | PackedUpdate) -> bytes:
    """The bytes a client signs to send ``update`` on the connection that got ``challenge``.

    Layout (every field of the update but ``signature``, bound to the federation and
    to the connection)::

        raw[18]   UPDATE_TAG               "edgefed-update-v1" 0x00
                  (a packed update: raw[25] PACKED_UPDATE_TAG,
                  "edgefed-packed-update-v1" 0x00)
        str       challenge.federation_id
        bin       challenge.server_nonce
        str       update.client_id
        u64       update.round
        u64       update.attempt
        raw[16]   update.nonce
        raw[32]   SHA-256(update_body_bytes(update))

    Args:
        challenge: the challenge of the connection the update is sent on (the one whose
            hello the coordinator verified).
        update: the update or packed update (its ``signature`` is ignored).

    Returns:
        The bytes to sign or verify.
    """
    parts = [
        PACKED_UPDATE_TAG if isinstance(update, PackedUpdate) else UPDATE_TAG,
        _str(challenge.federation_id),
        _bin(challenge.server_nonce),
        _str(update.client_id),
        _u64(update.round),
        _u64(update.attempt),
        _raw(update.nonce, NONCE_BYTES, "update.nonce"),
        update_body_hash(update),
    ]
    return b"".join(parts)
