"""Packed updates (protocol 2.1): values without their seeds, as f32 or q8.

The seeds a client answers are fixed by its task, so a ``packed_update`` carries only
the values; the coordinator pairs them with the seeds it handed out. These tests pin the
packing error, the message's validation, the pairing, and the signature over the
packed bytes.
"""

from __future__ import annotations

import dataclasses
import math
import random
import struct

import msgpack
import pytest
from test_identity import make_challenge

from coordinator.allowlist import IdentityRefused, verify_update
from edge_client.identity import ClientIdentity
from protocol import codec
from protocol.errors import InvalidMessage, LocalProtocolError
from protocol.messages import PackedUpdate, Update
from protocol.round import RoundMachine, UpdateRefused
from protocol.signing import update_signed_bytes
from protocol.values import ValueEncodingError, encoding_of, pack_values


def packed(values: bytes = bytes([1, 2, 3]), *, encoding: str = "q8", scale: float = 0.5, client: str = "a",
           round: int = 1, attempt: int = 0) -> PackedUpdate:
    return PackedUpdate(round=round, attempt=attempt, client_id=client, encoding=encoding, scale=scale,
                        values=values, num_examples=8, loss_before=2.0, loss_after=1.5, nonce=bytes(16),
                        signature=None)


def gaussian(count: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(0.0, 3.0) for _ in range(count)]


# ------------------------------------------------------------------ packing


def test_q8_is_off_by_at_most_half_a_step_and_keeps_the_largest_value() -> None:
    values = gaussian(1024)
    scale, data = pack_values(values, "q8")
    decoded = packed(data, scale=scale).decoded()
    assert len(data) == len(values) == len(decoded)
    assert max(abs(d - v) for d, v in zip(decoded, values)) <= scale / 2 * (1 + 1e-12)
    largest = max(range(len(values)), key=lambda i: abs(values[i]))
    assert decoded[largest] == pytest.approx(values[largest], rel=1e-12)
    # Against the values' own spread the error is ~1% (max|v| / (254 rms) bounds it).
    error = math.sqrt(sum((d - v) ** 2 for d, v in zip(decoded, values)))
    assert error / math.sqrt(sum(v * v for v in values)) < max(map(abs, values)) / (254 * 3.0 * 0.9)


def test_f32_keeps_each_value_to_float32_precision() -> None:
    values = gaussian(100, seed=1)
    scale, data = pack_values(values, "f32")
    assert scale == 1.0 and len(data) == 400
    decoded = packed(data, encoding="f32", scale=scale).decoded()
    assert decoded == tuple(struct.unpack("<f", struct.pack("<f", v))[0] for v in values)
    assert decoded != tuple(values)  # float32, not float64: the test can tell them apart


def test_all_zero_values_pack_to_zeros() -> None:
    scale, data = pack_values([0.0] * 5, "q8")
    assert packed(data, scale=scale).decoded() == (0.0,) * 5


@pytest.mark.parametrize("values,encoding,needle", [
    ([], "q8", "no values"),
    ([1.0, math.nan], "q8", "not finite"),
    ([1e39], "f32", "float32"),
    ([1.0], "f16", "unknown value encoding"),
])
def test_what_cannot_be_packed_is_refused_by_name(values: list[float], encoding: str, needle: str) -> None:
    with pytest.raises(ValueEncodingError, match=needle):
        pack_values(values, encoding)


def test_a_task_asks_for_pairs_unless_it_names_an_encoding() -> None:
    assert encoding_of({}) == "pairs" and encoding_of({"value_encoding": "q8", "lr": 1}) == "q8"
    with pytest.raises(ValueEncodingError, match="pairs, f32, q8"):
        encoding_of({"value_encoding": "bf16"})


# ------------------------------------------------------------------ the message


def test_a_packed_update_round_trips_through_the_codec_in_a_fraction_of_the_pairs_bytes() -> None:
    values = gaussian(1024, seed=2)
    scale, data = pack_values(values, "q8")
    message = packed(data, scale=scale)
    assert codec.decode(codec.encode(message)) == message
    pairs = Update(round=1, attempt=0, client_id="a", pairs=tuple((2**62 + i, v) for i, v in enumerate(values)),
                   num_examples=8, loss_before=2.0, loss_after=1.5, nonce=bytes(16), signature=None)
    assert len(codec.encode(message)) < len(codec.encode(pairs)) / 12


@pytest.mark.parametrize("fields,where", [
    (dict(values=bytes([1, 0x80])), "values[1]"),  # -128: q8 is symmetric
    (dict(encoding="f32", values=bytes(6)), "values"),  # not whole float32s
    (dict(encoding="f32", values=struct.pack("<f", math.inf)), "values[0]"),
    (dict(encoding="f32", scale=1e300, values=struct.pack("<f", 1e30)), "values[0]"),  # overflows once scaled
    (dict(scale=0.0), "scale"),
    (dict(values=b""), "values"),
    (dict(encoding="f16"), "encoding"),
])
def test_an_invalid_packed_update_is_refused_at_its_field(fields: dict, where: str) -> None:
    base = dict(round=1, attempt=0, client_id="a", encoding="q8", scale=0.5, values=bytes([1]),
                num_examples=8, loss_before=2.0, loss_after=1.5, nonce=bytes(16), signature=None)
    wire = codec.encode(packed())
    with pytest.raises(LocalProtocolError, match=where.replace("[", r"\[").replace("]", r"\]")):
        PackedUpdate(**{**base, **fields})
    # The same values arriving from a peer are refused with the field's path.
    mapping = msgpack.unpackb(wire)
    mapping.update(fields)
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(msgpack.packb(mapping, use_bin_type=True))
    assert caught.value.path == f"packed_update.{where}"


# ------------------------------------------------------------------ pairing with the task's seeds


def test_the_values_pair_with_the_seeds_handed_to_the_sender_in_task_order() -> None:
    machine = RoundMachine(3, 1, [11, 22, 33, 44], ["zo", "fo"], quorum=2, client_seeds={"zo": [11, 22]})
    scale, data = pack_values([1.0, -2.0, 0.5, 4.0], "q8")
    update = machine.unpack(packed(data, scale=scale, client="fo", round=3, attempt=1))
    assert [seed for seed, _ in update.pairs] == [11, 22, 33, 44]
    assert [value for _, value in update.pairs] == pytest.approx([1.0, -2.0, 0.5, 4.0], abs=scale / 2)
    assert machine.receive(update).duplicate is False
    scale, data = pack_values([3.0, 1.0], "f32")
    short = machine.unpack(packed(data, encoding="f32", scale=scale, client="zo", round=3, attempt=1))
    assert short.pairs == ((11, 3.0), (22, 1.0))


@pytest.mark.parametrize("message,code", [
    (packed(bytes(3), client="fo", round=3, attempt=1), "wrong_seeds"),  # 3 values for 4 seeds
    (packed(bytes(5), client="fo", round=3, attempt=1), "wrong_seeds"),
    (packed(bytes(4), client="x", round=3, attempt=1), "not_assigned"),
    (packed(bytes(4), client="fo", round=3, attempt=0), "stale_round"),
    (packed(bytes(4), client="fo", round=4, attempt=0), "round_not_open"),
])
def test_a_packed_update_that_does_not_fit_the_round_is_refused(message: PackedUpdate, code: str) -> None:
    machine = RoundMachine(3, 1, [11, 22, 33, 44], ["zo", "fo"], quorum=2, client_seeds={"zo": [11, 22]})
    with pytest.raises(UpdateRefused) as caught:
        machine.unpack(message)
    assert caught.value.code == code


# ------------------------------------------------------------------ signatures


def test_the_signature_covers_the_packed_bytes_and_is_not_an_update_signature() -> None:
    identity = ClientIdentity.generate()
    signed = identity.sign_update(make_challenge(), packed(client="a"))
    verify_update(identity.public_key_bytes, make_challenge(), signed)
    for altered in (packed(bytes([1, 2, 4])), packed(scale=0.25), packed(encoding="f32", values=bytes(4), scale=0.5)):
        with pytest.raises(IdentityRefused, match="signature"):
            verify_update(identity.public_key_bytes, make_challenge(),
                          dataclasses.replace(altered, signature=signed.signature))
    as_pairs = Update(round=1, attempt=0, client_id="a", pairs=((5, 0.5), (6, 1.0), (7, 1.5)), num_examples=8,
                      loss_before=2.0, loss_after=1.5, nonce=bytes(16), signature=None)
    assert update_signed_bytes(make_challenge(), as_pairs)[:18] != update_signed_bytes(make_challenge(), signed)[:18]
