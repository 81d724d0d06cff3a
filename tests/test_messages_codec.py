"""Round trips and every refusal path of the wire contract (protocol.messages/codec)."""

from __future__ import annotations

import dataclasses
import math
import pickle
import struct
from typing import Any

import msgpack
import pytest

from protocol import codec
from protocol.codec import check_version, decode, encode
from protocol.errors import (
    FrameTooLarge,
    InvalidMessage,
    InvalidState,
    LocalProtocolError,
    MalformedFrame,
    PeerProtocolError,
    ProtocolError,
    UnknownMessageType,
    VersionMismatch,
)
from protocol.limits import (
    MAX_BYTES_FIELD,
    MAX_FRAME_BYTES,
    MAX_NESTING_DEPTH,
    MAX_SEEDS_PER_ROUND,
    MAX_STRING_CHARS,
    PROTOCOL_VERSION,
    SUPPORTED_MAJOR_VERSIONS,
)
from protocol.messages import (
    omitted_defaults,
    MESSAGE_TYPES,
    Challenge,
    DeviceProfile,
    Error,
    FederationInfo,
    Fingerprint,
    Goodbye,
    Hello,
    PackedUpdate,
    Reject,
    RoundCommit,
    RoundEntry,
    RoundTask,
    ScopeSpec,
    SyncRequest,
    SyncResponse,
    Update,
    UpdateAck,
    Welcome,
)

DIGEST = "3b7f0c2e9d41a8f65e0b7c9d2a1f4e8b6c3d5a7f9e1b2c4d6a8f0e2b4c6d8a0f"
DIGEST2 = "0" * 63 + "1"
SEEDS = (8_120_394_821_733_005_117, 42, 0, 2**63 - 1)


def f32(x: float) -> float:
    """Nearest float32, as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


COEFFS = tuple((seed, f32(c)) for seed, c in zip(SEEDS, (-0.0123, 0.5, 1e-7, -3.25)))
TOTALS = tuple((seed, f32(c)) for seed, c in zip(SEEDS, (0.0417, 0.5, 2.5e-7, -3.0)))


def scope() -> ScopeSpec:
    return ScopeSpec(kind="lora", lora_rank=8, lora_alpha=16.0,
                     lora_targets=("q_proj", "v_proj"), lora_init_seed=1234)


def device() -> DeviceProfile:
    return DeviceProfile(device_type="cuda", device_name="NVIDIA GeForce RTX 4060 Laptop",
                         accelerator_total_bytes=8_585_216_000,
                         accelerator_free_bytes=7_012_000_000,
                         host_total_bytes=34_359_738_368, host_free_bytes=20_000_000_000,
                         memory_budget_bytes=None)


def federation() -> FederationInfo:
    return FederationInfo(
        federation_id="smollm2-alpaca.v1", model_name="HuggingFaceTB/SmolLM2-135M",
        model_hash=DIGEST, scope=scope(), seed_pool_size=0, rebase_every=50,
        perturbation="rademacher", aggregation="mean", learning_rate=1e-5, epsilon=1e-3,
        local_steps=4, batch_size=8, max_seq_len=256,
    )


def hello(**changes: Any) -> Hello:
    fields = dict(protocol_version=PROTOCOL_VERSION, client_id="laptop-7", device=device(),
                  mode="train", model_hash=DIGEST, last_round=12, table_digest=DIGEST2,
                  plan="mezo (zeroth-order), batch 8/8 x 256 tokens: estimated peak 1.03 GiB",
                  public_key=bytes(range(32)), signature=bytes(range(64)))
    fields.update(changes)
    return Hello(**fields)


def update(**changes: Any) -> Update:
    fields = dict(round=13, attempt=0, client_id="laptop-7",
                  pairs=((SEEDS[0], 0.83125), (SEEDS[1], -1.5e-3), (SEEDS[2], 12.0),
                         (SEEDS[3], -0.25)),
                  num_examples=32, loss_before=2.4512, loss_after=2.4498,
                  nonce=b"\x01" * 16, signature=None)
    fields.update(changes)
    return Update(**fields)


def sync_response() -> SyncResponse:
    return SyncResponse(
        target_round=52, base_round=50,
        table=((3, f32(0.1)), (42, -2.0), (10**18, f32(1e-3))),
        rounds=(RoundEntry(round=51, coefficients=COEFFS[:2]),
                RoundEntry(round=52, coefficients=COEFFS[2:])),
        table_digest=DIGEST,
    )


ALL_MESSAGES = [
    Challenge(protocol_version=(2, 0), server_nonce=bytes(range(32)),
              federation_id="smollm2-alpaca.v1", federation=federation()),
    Welcome(client_id="laptop-7", federation=federation(), last_committed_round=12),
    Reject(code="version", message="protocol 2.0 is not supported",
           supported_versions=((1, 0), (1, 1))),
    RoundTask(round=13, attempt=1, base_round=12, seeds=SEEDS, learning_rate=1e-5,
              epsilon=1e-3, batch_size=8, max_seq_len=256, scope="lora", deadline_s=120.0),
    UpdateAck(round=13, attempt=1, status="accepted"),
    RoundCommit(round=13, attempt=1, coefficients=COEFFS, totals=TOTALS,
                table_digest=DIGEST, num_updates=5),
    sync_response(),
    Error(code="invalid_field", message="update.pairs[3][1]: not finite",
          field="update.pairs[3][1]", round=13),
    hello(),
    update(),
    Fingerprint(round=13, fingerprint=DIGEST, table_digest=DIGEST2),
    SyncRequest(have_round=0),
    Goodbye(reason="user closed the app"),
    PackedUpdate(round=13, attempt=0, client_id="laptop-7", encoding="q8", scale=0.0125,
                 values=bytes([1, 255, 127, 0]), num_examples=32, loss_before=2.4512, loss_after=2.4498,
                 nonce=b"\x01" * 16, signature=bytes(range(64))),
]


def wire(msg: Any) -> dict[str, Any]:
    """The wire map of a valid message, as plain mutable Python values."""
    return msgpack.unpackb(encode(msg), raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def refuse(obj: Any, error: type[PeerProtocolError], text: str | None = None) -> Any:
    """Decode ``obj`` (packed unless already bytes); assert the exact error class and str."""
    data = obj if isinstance(obj, bytes) else pack(obj)
    with pytest.raises(PeerProtocolError) as info:
        decode(data)
    assert type(info.value) is error, repr(info.value)
    if text is not None:
        assert str(info.value) == text
    return info.value


# --------------------------------------------------------------------- round trips


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in ALL_MESSAGES} == set(MESSAGE_TYPES.values())
    assert set(MESSAGE_TYPES) == {cls.TYPE for cls in MESSAGE_TYPES.values()}


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: m.TYPE)
def test_round_trip(msg: Any) -> None:
    data = encode(msg)
    assert len(data) < 4096
    back = decode(data)
    assert type(back) is type(msg)
    assert back == msg
    assert encode(back) == data
    hash(back)  # frozen and fully tuple-valued, so hashable


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: m.TYPE)
def test_wire_layout(msg: Any) -> None:
    obj = wire(msg)
    # Fields added later (omitted_defaults) are left out while they hold their default.
    later = omitted_defaults(type(msg))
    names = [f.name for f in dataclasses.fields(msg) if not (f.name in later and getattr(msg, f.name) == later[f.name])]
    assert list(obj) == ["type", *names]
    assert obj["type"] == msg.TYPE


def test_nested_records_are_maps_without_type() -> None:
    obj = wire(ALL_MESSAGES[1])
    assert obj["federation"]["scope"]["kind"] == "lora"
    assert "type" not in obj["federation"] and "type" not in obj["federation"]["scope"]
    rounds = wire(sync_response())["rounds"]
    assert rounds[0] == {"round": 51, "coefficients": [list(p) for p in COEFFS[:2]]}


def test_floats_are_float64_and_bytes_are_bin() -> None:
    assert encode(Goodbye(reason="x")) == b"\x82\xa4type\xa7goodbye\xa6reason\xa1x"
    data = encode(update())
    assert b"\xcb" + struct.pack(">d", 0.83125) in data  # float64, never float32
    assert b"\xc4\x10" + b"\x01" * 16 in data  # nonce as bin 8 of 16 bytes


def test_optional_fields_are_present_as_nil() -> None:
    obj = wire(update())
    assert "signature" in obj and obj["signature"] is None
    assert decode(pack(obj)).signature is None
    del obj["signature"]
    refuse(obj, InvalidMessage, "update.signature: missing")


def test_local_values_are_normalised() -> None:
    msg = RoundTask(round=2, attempt=0, base_round=1, seeds=[5, 6], learning_rate=1,
                    epsilon=1, batch_size=1, max_seq_len=1, scope="full", deadline_s=3)
    assert msg.seeds == (5, 6)
    assert type(msg.learning_rate) is float and type(msg.deadline_s) is float
    upd = update(pairs=[[1, 2], [3, 4.5]], nonce=bytearray(16))
    assert upd.pairs == ((1, 2.0), (3, 4.5)) and type(upd.pairs[0][1]) is float
    assert type(upd.nonce) is bytes


def test_ints_are_accepted_for_floats_on_the_wire() -> None:
    obj = wire(update())
    obj["loss_before"] = 3
    obj["pairs"][0][1] = -7
    msg = decode(pack(obj))
    assert msg.loss_before == 3.0 and type(msg.loss_before) is float
    assert msg.pairs[0][1] == -7.0 and type(msg.pairs[0][1]) is float
    obj = wire(ALL_MESSAGES[5])
    obj["coefficients"][0][1] = 2
    assert decode(pack(obj)).coefficients[0][1] == 2.0


def test_float32_on_the_wire_is_accepted() -> None:
    obj = wire(ALL_MESSAGES[5])
    data = pack(obj).replace(b"\xcb" + struct.pack(">d", COEFFS[1][1]),
                             b"\xca" + struct.pack(">f", COEFFS[1][1]))
    assert decode(data) == ALL_MESSAGES[5]


def test_records_are_frozen() -> None:
    msg = update()
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.round = 14  # type: ignore[misc]
    assert not hasattr(msg, "__dict__")


# ----------------------------------------------------------- refusals: the frame


def test_unknown_type() -> None:
    exc = refuse({"type": "steal_weights", "x": 1}, UnknownMessageType,
                 "unknown message type 'steal_weights'")
    assert exc.type_name == "steal_weights"
    assert (exc.error_code, exc.close_code) == ("unknown_type", 1003)
    exc = refuse({"type": "z" * 500}, UnknownMessageType)
    assert len(exc.type_name) < 100


def test_type_missing_or_not_str() -> None:
    refuse({"reason": "x"}, InvalidMessage, "type: missing")
    refuse({"type": 7, "reason": "x"}, InvalidMessage, "type: expected str, got int")


def test_top_level_must_be_a_map() -> None:
    refuse([1, 2], MalformedFrame, "malformed frame: expected a map at the top level, got array")
    refuse(b"\xc0", MalformedFrame)


def test_text_frame_is_refused() -> None:
    with pytest.raises(MalformedFrame):
        decode('{"type": "goodbye"}')  # type: ignore[arg-type]


def test_not_msgpack() -> None:
    refuse(b"", MalformedFrame, "malformed frame: truncated")
    refuse(b"\xc1", MalformedFrame, "malformed frame: invalid msgpack byte 0xc1")
    refuse(encode(Goodbye(reason="bye"))[:-1], MalformedFrame, "malformed frame: truncated")


def test_invalid_utf8() -> None:
    data = pack({"type": "goodbye", "reason": "ab"}).replace(b"\xa2ab", b"\xa2\xff\xfe")
    exc = refuse(data, MalformedFrame)
    assert (exc.error_code, exc.close_code) == ("malformed", 1007)


def test_trailing_bytes() -> None:
    refuse(encode(Goodbye(reason="bye")) + b"\x00", MalformedFrame,
           "malformed frame: 1 trailing bytes")
    refuse(encode(Goodbye(reason="bye")) * 2, MalformedFrame)


def test_frame_too_large_is_refused_before_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the frame was looked at")

    monkeypatch.setattr(codec, "_scan", explode)
    monkeypatch.setattr(codec, "_unpack", explode)
    monkeypatch.setattr(codec.msgpack, "unpackb", explode)
    data = pack({"type": "goodbye", "reason": b"\x00" * (5 * 1024 * 1024)})
    exc = refuse(data, FrameTooLarge)
    assert (exc.size, exc.limit) == (len(data), MAX_FRAME_BYTES)
    assert str(exc) == f"frame of {len(data)} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes"
    assert (exc.error_code, exc.close_code) == ("frame_too_large", 1009)
    with pytest.raises(FrameTooLarge):
        decode(bytearray(data))
    with pytest.raises(FrameTooLarge):
        decode(encode(Goodbye(reason="x" * 100)), max_size=64)


def test_max_size_none_disables_the_length_check() -> None:
    msg = Goodbye(reason="x" * 100)
    assert decode(encode(msg), max_size=None) == msg
    assert decode(memoryview(encode(msg))) == msg


@pytest.mark.parametrize("ext", [
    msgpack.ExtType(5, b"x"),
    msgpack.ExtType(5, b""),
    msgpack.Timestamp(1_700_000_000),
])
def test_ext_types_are_refused(ext: Any) -> None:
    refuse({"type": "goodbye", "reason": ext}, MalformedFrame,
           "malformed frame: extension types are not allowed")


def test_ext_hook_is_a_second_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_scan", lambda data: None)
    for ext in (msgpack.ExtType(5, b""), msgpack.ExtType(5, b"abc")):
        refuse({"type": "goodbye", "reason": ext}, MalformedFrame)


def test_non_str_map_keys() -> None:
    refuse({"type": "goodbye", "reason": "x", 1: 2}, MalformedFrame)
    refuse({"type": "goodbye", b"reason": "x"}, MalformedFrame,
           "malformed frame: map key must be str, got bytes")
    obj = wire(ALL_MESSAGES[1])
    obj["federation"]["scope"][b"kind"] = "full"
    refuse(obj, MalformedFrame)


def test_duplicate_map_keys() -> None:
    data = (b"\x83" + pack("type") + pack("goodbye") + pack("reason") + pack("a")
            + pack("reason") + pack("b"))
    refuse(data, MalformedFrame, "malformed frame: duplicate map key")


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_too_deep() -> None:
    # The top-level map is level 1, so the field value may hold MAX_NESTING_DEPTH - 1.
    refuse({"type": "goodbye", "reason": nested(MAX_NESTING_DEPTH - 1)}, InvalidMessage,
           "goodbye.reason: expected str, got array")
    refuse({"type": "goodbye", "reason": nested(MAX_NESTING_DEPTH)}, MalformedFrame,
           f"malformed frame: nested deeper than {MAX_NESTING_DEPTH} levels")
    head = b"\x82" + pack("type") + pack("goodbye") + pack("reason")
    refuse(head + b"\x91" * 5000 + b"\x01", MalformedFrame)
    refuse(b"\x91" * 100_000 + b"\x00", MalformedFrame)


def test_declared_lengths_beyond_the_frame_are_refused_without_allocating() -> None:
    # Each level declares 65535 (array 16) or 2**32-1 (array 32) items in 3-5 bytes.
    refuse(b"\xdc\xff\xff" * 1000, MalformedFrame, "malformed frame: truncated")
    refuse(b"\xdd\xff\xff\xff\xff" * 10, MalformedFrame)
    refuse(b"\xdf\xff\xff\xff\xff", MalformedFrame)
    refuse(b"\xc6\xff\xff\xff\xff", MalformedFrame)
    refuse(b"\xdb\x00\x00\x10\x00" + b"a" * 10, MalformedFrame)


def test_oversize_containers_are_refused_by_the_scan() -> None:
    refuse({"type": "goodbye", "reason": "x", **{f"k{i}": i for i in range(40)}}, MalformedFrame)
    refuse({"type": "goodbye", "reason": [0] * 70_000}, MalformedFrame)
    refuse({"type": "goodbye", "reason": b"\x00" * (MAX_BYTES_FIELD + 1)}, MalformedFrame)
    refuse({"type": "goodbye", "reason": "é" * 1100}, MalformedFrame)


# ------------------------------------------------------ refusals: the schema


def test_missing_field() -> None:
    obj = wire(update())
    del obj["nonce"]
    exc = refuse(obj, InvalidMessage, "update.nonce: missing")
    assert (exc.path, exc.reason) == ("update.nonce", "missing")
    assert (exc.error_code, exc.close_code) == ("invalid_field", 1007)
    obj = wire(ALL_MESSAGES[1])
    del obj["federation"]["scope"]["kind"]
    refuse(obj, InvalidMessage, "welcome.federation.scope.kind: missing")


def test_extra_field() -> None:
    obj = wire(update())
    obj["bonus"] = 1
    refuse(obj, InvalidMessage, "update.bonus: unknown field")
    obj = wire(sync_response())
    obj["rounds"][1]["type"] = "round_entry"
    refuse(obj, InvalidMessage, "sync_response.rounds[1].type: unknown field")
    obj = wire(update())
    obj["a b\n" * 40] = 1
    exc = refuse(obj, InvalidMessage)
    assert exc.reason == "unknown field" and len(exc.path) < 100


@pytest.mark.parametrize("field, value, text", [
    ("round", "13", "update.round: expected int, got str"),
    ("round", True, "update.round: expected int, got bool"),
    ("round", 13.0, "update.round: expected int, got float"),
    ("round", None, "update.round: expected int, got nil"),
    ("round", 0, "update.round: 0 is out of range [1, 9007199254740991]"),
    ("round", 2**53, "update.round: 9007199254740992 is out of range [1, 9007199254740991]"),
    ("attempt", -1, "update.attempt: -1 is out of range [0, 9007199254740991]"),
    ("client_id", "", "update.client_id: must be 1 to 64 characters of [A-Za-z0-9_.-]"),
    ("client_id", "a/b", "update.client_id: must be 1 to 64 characters of [A-Za-z0-9_.-]"),
    ("client_id", "é", "update.client_id: must be 1 to 64 characters of [A-Za-z0-9_.-]"),
    ("client_id", "a" * 65, "update.client_id: must be 1 to 64 characters of [A-Za-z0-9_.-]"),
    ("pairs", [], "update.pairs: must not be empty"),
    ("pairs", {"1": 2.0}, "update.pairs: expected array, got map"),
    ("pairs", [[1, 2.0, 3]], "update.pairs[0]: expected [seed, number], got 3 items"),
    ("pairs", [5], "update.pairs[0]: expected [seed, number], got int"),
    ("pairs", [["1", 2.0]], "update.pairs[0][0]: expected int, got str"),
    ("pairs", [[True, 2.0]], "update.pairs[0][0]: expected int, got bool"),
    ("pairs", [[2**63, 2.0]],
     "update.pairs[0][0]: 9223372036854775808 is out of range [0, 2**63)"),
    ("pairs", [[-1, 2.0]], "update.pairs[0][0]: -1 is out of range [0, 2**63)"),
    ("pairs", [[1, True]], "update.pairs[0][1]: expected float, got bool"),
    ("pairs", [[1, "0.5"]], "update.pairs[0][1]: expected float, got str"),
    ("pairs", [[1, 0.5], [2, 0.5], [1, 0.25]], "update.pairs[2][0]: duplicate seed 1"),
    ("num_examples", 0, "update.num_examples: 0 is out of range [1, 1000000000]"),
    ("num_examples", 10**9 + 1, "update.num_examples: 1000000001 is out of range [1, 1000000000]"),
    ("loss_before", math.inf, "update.loss_before: not finite"),
    ("loss_after", -math.inf, "update.loss_after: not finite"),
    ("loss_after", False, "update.loss_after: expected float, got bool"),
    ("nonce", b"\x00" * 15, "update.nonce: expected 16 bytes, got 15"),
    ("nonce", "0" * 16, "update.nonce: expected bytes, got str"),
    ("signature", b"\x00" * 63, "update.signature: expected 64 bytes, got 63"),
])
def test_update_field_refusals(field: str, value: Any, text: str) -> None:
    obj = wire(update())
    obj[field] = value
    refuse(obj, InvalidMessage, text)
    # The same value built locally is our own misuse.
    with pytest.raises(LocalProtocolError) as info:
        update(**{field: value})
    assert not isinstance(info.value, PeerProtocolError)
    assert str(info.value) == text
    assert isinstance(info.value.__cause__, InvalidMessage)


def test_non_finite_pair_path() -> None:
    obj = wire(update())
    obj["pairs"][3][1] = math.nan
    exc = refuse(obj, InvalidMessage, "update.pairs[3][1]: not finite")
    assert (exc.path, exc.reason) == ("update.pairs[3][1]", "not finite")


def test_non_float32_coefficient() -> None:
    obj = wire(ALL_MESSAGES[5])
    obj["coefficients"][1][1] = 0.1
    refuse(obj, InvalidMessage,
           "round_commit.coefficients[1][1]: not exactly representable as float32")
    obj["coefficients"][1][1] = 1e39  # finite in float64, overflows float32
    refuse(obj, InvalidMessage,
           "round_commit.coefficients[1][1]: not exactly representable as float32")
    obj["coefficients"][1][1] = 2**24 + 1  # an int that float32 cannot hold
    refuse(obj, InvalidMessage,
           "round_commit.coefficients[1][1]: not exactly representable as float32")
    obj["coefficients"][1][1] = math.nan
    refuse(obj, InvalidMessage, "round_commit.coefficients[1][1]: not finite")


def test_oversize_list_is_refused_before_looking_at_elements() -> None:
    obj = wire(ALL_MESSAGES[3])
    obj["seeds"] = list(range(MAX_SEEDS_PER_ROUND + 1))
    refuse(obj, InvalidMessage, "round_task.seeds: too many items (4097 > 4096)")
    obj["seeds"] = ["not a seed"] * (MAX_SEEDS_PER_ROUND + 1)
    refuse(obj, InvalidMessage, "round_task.seeds: too many items (4097 > 4096)")
    obj = wire(update())
    obj["pairs"] = [None] * (MAX_SEEDS_PER_ROUND + 1)
    refuse(obj, InvalidMessage, "update.pairs: too many items (4097 > 4096)")
    obj = wire(sync_response())
    obj["rounds"] = [None] * 4097
    refuse(obj, InvalidMessage, "sync_response.rounds: too many items (4097 > 4096)")


def test_round_task_rules() -> None:
    obj = wire(ALL_MESSAGES[3])
    obj["seeds"] = [7, 9, 7]
    refuse(obj, InvalidMessage, "round_task.seeds[2]: duplicate seed 7")
    obj["seeds"] = []
    refuse(obj, InvalidMessage, "round_task.seeds: must not be empty")
    obj = wire(ALL_MESSAGES[3])
    obj["base_round"] = 13
    refuse(obj, InvalidMessage, "round_task.base_round: must be round - 1 (12)")
    obj = wire(ALL_MESSAGES[3])
    obj["scope"] = "adapter"
    refuse(obj, InvalidMessage, "round_task.scope: must be one of 'full', 'lora'")
    obj = wire(ALL_MESSAGES[3])
    obj["deadline_s"] = 0.0
    refuse(obj, InvalidMessage, "round_task.deadline_s: must be > 0")


def test_commit_coefficients_and_totals_must_match() -> None:
    obj = wire(ALL_MESSAGES[5])
    obj["totals"][1][0] = 77
    refuse(obj, InvalidMessage,
           "round_commit.totals[1][0]: seed 77 does not match coefficients[1] seed 42")
    obj = wire(ALL_MESSAGES[5])
    obj["totals"].pop()
    refuse(obj, InvalidMessage, "round_commit.totals: has 3 items, coefficients has 4")
    obj = wire(ALL_MESSAGES[5])
    obj["coefficients"][2][0] = SEEDS[0]
    refuse(obj, InvalidMessage, f"round_commit.coefficients[2][0]: duplicate seed {SEEDS[0]}")
    obj = wire(ALL_MESSAGES[5])
    obj["num_updates"] = 0
    refuse(obj, InvalidMessage,
           "round_commit.num_updates: 0 is out of range [1, 9007199254740991]")


def test_sync_response_rules() -> None:
    obj = wire(sync_response())
    obj["table"][0], obj["table"][1] = obj["table"][1], obj["table"][0]
    refuse(obj, InvalidMessage, "sync_response.table[1][0]: seeds not strictly ascending")
    obj = wire(sync_response())
    obj["table"][2][1] = 0.0
    refuse(obj, InvalidMessage, "sync_response.table[2][1]: must be nonzero")
    obj["table"][2][1] = -0.0
    refuse(obj, InvalidMessage, "sync_response.table[2][1]: must be nonzero")
    obj = wire(sync_response())
    obj["rounds"][1]["round"] = 53
    refuse(obj, InvalidMessage,
           "sync_response.rounds[1].round: expected round 52 (consecutive from base_round + 1)")
    obj = wire(sync_response())
    obj["rounds"].pop()
    refuse(obj, InvalidMessage,
           "sync_response.rounds: has 1 rounds, base_round..target_round needs 2")
    obj = wire(sync_response())
    obj["base_round"] = 53
    refuse(obj, InvalidMessage, "sync_response.base_round: must be <= target_round (52)")
    obj = wire(sync_response())
    obj["rounds"][1]["coefficients"][0][1] = 0.1
    refuse(obj, InvalidMessage,
           "sync_response.rounds[1].coefficients[0][1]: not exactly representable as float32")
    obj = wire(sync_response())
    obj["rounds"][0] = [51, []]
    refuse(obj, InvalidMessage, "sync_response.rounds[0]: expected map, got array")


def test_sync_response_without_rounds_or_table() -> None:
    snapshot = SyncResponse(target_round=50, base_round=50, table=((1, 1.0),), rounds=(),
                            table_digest=DIGEST)
    incremental = SyncResponse(target_round=51, base_round=50, table=(),
                               rounds=(RoundEntry(round=51, coefficients=()),),
                               table_digest=DIGEST)
    for msg in (snapshot, incremental):
        assert decode(encode(msg)) == msg


def test_nested_record_rules() -> None:
    obj = wire(ALL_MESSAGES[1])
    obj["federation"] = "smollm2"
    refuse(obj, InvalidMessage, "welcome.federation: expected map, got str")
    obj = wire(ALL_MESSAGES[1])
    obj["federation"]["scope"]["lora_rank"] = 0
    refuse(obj, InvalidMessage,
           "welcome.federation.scope.lora_rank: must be > 0 when kind is 'lora'")
    obj["federation"]["scope"]["kind"] = "full"
    assert decode(pack(obj)).federation.scope.lora_rank == 0
    obj = wire(ALL_MESSAGES[1])
    obj["federation"]["model_hash"] = DIGEST.upper()
    refuse(obj, InvalidMessage,
           "welcome.federation.model_hash: must be 64 lowercase hex characters")
    obj = wire(ALL_MESSAGES[1])
    obj["federation"]["seed_pool_size"] = -1
    refuse(obj, InvalidMessage,
           "welcome.federation.seed_pool_size: -1 is out of range [0, 65536]")
    obj = wire(ALL_MESSAGES[1])
    obj["federation"]["rebase_every"] = 4097
    refuse(obj, InvalidMessage,
           "welcome.federation.rebase_every: 4097 is out of range [1, 4096]")
    obj = wire(hello())
    obj["device"]["device_type"] = "tpu"
    refuse(obj, InvalidMessage, "hello.device.device_type: must be one of 'cpu', 'cuda', 'mps'")
    obj = wire(hello())
    obj["device"]["memory_budget_bytes"] = 4_000_000_000
    assert decode(pack(obj)).device.memory_budget_bytes == 4_000_000_000


def test_strings_are_bounded() -> None:
    obj = wire(Goodbye(reason="bye"))
    obj["reason"] = "x" * (MAX_STRING_CHARS + 1)
    refuse(obj, InvalidMessage, "goodbye.reason: too long (513 > 512 characters)")
    obj["reason"] = "日本" * (MAX_STRING_CHARS // 2)
    assert decode(pack(obj)).reason == obj["reason"]


def test_version_fields() -> None:
    obj = wire(ALL_MESSAGES[0])
    obj["protocol_version"] = [1]
    refuse(obj, InvalidMessage, "challenge.protocol_version: expected [major, minor], got 1 items")
    obj["protocol_version"] = [1, -1]
    refuse(obj, InvalidMessage, "challenge.protocol_version[1]: -1 is out of range [0, 65535]")
    obj = wire(ALL_MESSAGES[0])
    obj["server_nonce"] = b"\x00" * 8
    refuse(obj, InvalidMessage, "challenge.server_nonce: expected 16 to 64 bytes, got 8")


def test_hello_with_unsupported_major_is_refused_by_version_first() -> None:
    with pytest.raises(VersionMismatch) as info:
        decode(encode(hello(protocol_version=(3, 2))))
    exc = info.value
    assert (exc.theirs, exc.supported) == ((3, 2), SUPPORTED_MAJOR_VERSIONS)
    assert (exc.error_code, exc.close_code) == ("version", 1002)
    assert str(exc) == "protocol version 3.2 is not supported (supported major versions: 2)"
    check_version(PROTOCOL_VERSION)
    check_version((2, 9))  # another minor of the same major is fine
    with pytest.raises(VersionMismatch):
        check_version((1, 0))  # 1.x round tasks lack the settings map


def test_hello_optional_identity() -> None:
    msg = hello(table_digest=None, public_key=None, signature=None)
    assert decode(encode(msg)) == msg
    obj = wire(msg)
    obj["public_key"] = b"\x00" * 33
    refuse(obj, InvalidMessage, "hello.public_key: expected 32 bytes, got 33")


def test_reject_codes() -> None:
    obj = wire(ALL_MESSAGES[2])
    obj["code"] = "go_away"
    exc = refuse(obj, InvalidMessage)
    assert exc.path == "reject.code" and exc.reason.startswith("must be one of 'version'")


# ------------------------------------------------------------- local misuse


def test_building_an_invalid_message_is_local_misuse() -> None:
    with pytest.raises(LocalProtocolError) as info:
        RoundEntry(round=1, coefficients=((1, 0.1),))
    assert str(info.value) == "RoundEntry.coefficients[0][1]: not exactly representable as float32"
    assert info.value.__cause__.path == "RoundEntry.coefficients[0][1]"  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError, match="welcome.federation: expected FederationInfo"):
        Welcome(client_id="a", federation={"federation_id": "x"},  # type: ignore[arg-type]
                last_committed_round=0)
    with pytest.raises(TypeError):
        Goodbye("positional")  # type: ignore[misc]


def test_lone_surrogate_is_refused_locally() -> None:
    with pytest.raises(LocalProtocolError, match="goodbye.reason: not encodable as UTF-8"):
        Goodbye(reason="\ud800")


def test_encode_refuses_non_messages_and_oversize_frames() -> None:
    with pytest.raises(LocalProtocolError, match="not a protocol message"):
        encode(scope())  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="not a protocol message"):
        encode({"type": "goodbye", "reason": "x"})  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="exceeds the limit of 10 bytes"):
        encode(Goodbye(reason="bye bye bye"), max_size=10)


# ---------------------------------------------------------------- the errors


def test_error_tree() -> None:
    for cls in (LocalProtocolError, PeerProtocolError):
        assert issubclass(cls, ProtocolError)
    assert issubclass(InvalidState, LocalProtocolError)
    for cls in (FrameTooLarge, MalformedFrame, UnknownMessageType, InvalidMessage,
                VersionMismatch):
        assert issubclass(cls, PeerProtocolError)
        assert not issubclass(cls, LocalProtocolError)


def test_errors_keep_fields_and_pickle() -> None:
    errors: list[ProtocolError] = [
        LocalProtocolError("bad"),
        InvalidState("idle", "round_task"),
        FrameTooLarge(10, 5),
        MalformedFrame("trailing bytes"),
        UnknownMessageType("x"),
        InvalidMessage("update.pairs[3][1]", "not finite"),
        VersionMismatch((2, 0), (1,)),
    ]
    for exc in errors:
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert vars(back) == vars(exc)
    assert str(errors[1]) == "event round_task is not allowed in state idle"
    state_error = errors[1]
    assert isinstance(state_error, InvalidState)
    assert (state_error.state, state_error.event) == ("idle", "round_task")
    assert str(errors[5]) == "update.pairs[3][1]: not finite"


def test_decode_errors_fit_an_error_message() -> None:
    """The coordinator can always echo a decode error back in an ``error`` message."""
    obj = wire(update())
    obj["x" * 500] = 1
    for data in (pack(obj), pack({"type": "y" * 500}), b"\xc1"):
        with pytest.raises(PeerProtocolError) as info:
            decode(data)
        exc = info.value
        Error(code=exc.error_code, message=str(exc), field=getattr(exc, "path", None), round=None)
