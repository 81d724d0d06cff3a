"""Property tests: decode raises nothing but PeerProtocolError, and round trips hold."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.codec import decode, encode
from protocol.errors import MalformedFrame, PeerProtocolError
from protocol.limits import (
    MAX_EXAMPLES,
    MAX_ID_CHARS,
    MAX_NESTING_DEPTH,
    MAX_ROUND,
    MAX_SAFE_INT,
    MAX_SEED,
    MAX_STRING_CHARS,
)
from protocol.messages import (
    MESSAGE_TYPES,
    Challenge,
    DeviceProfile,
    Error,
    FederationInfo,
    Hello,
    RoundCommit,
    RoundEntry,
    RoundTask,
    ScopeSpec,
    SyncResponse,
    Update,
    Welcome,
    field_kinds,
)

FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROUND_TRIP = settings(max_examples=120, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])

DIGEST = "ab" * 32

# ----------------------------------------------------------------- strategies

seeds = st.integers(0, MAX_SEED)
f64s = st.floats(allow_nan=False, allow_infinity=False)
f32s = st.floats(width=32, allow_nan=False, allow_infinity=False)
ids = st.from_regex(r"[A-Za-z0-9_.\-]{1,%d}" % MAX_ID_CHARS, fullmatch=True)


def seed_pairs(values: st.SearchStrategy[float], *, min_size: int,
               max_size: int) -> st.SearchStrategy[tuple[tuple[int, float], ...]]:
    return st.lists(st.tuples(seeds, values), min_size=min_size, max_size=max_size,
                    unique_by=lambda pair: pair[0]).map(tuple)


updates = st.builds(
    Update,
    round=st.integers(1, MAX_ROUND),
    attempt=st.integers(0, MAX_SAFE_INT),
    client_id=ids,
    pairs=seed_pairs(f64s | st.integers(-(2**53), 2**53).map(float), min_size=1, max_size=40),
    num_examples=st.integers(1, MAX_EXAMPLES),
    loss_before=f64s,
    loss_after=f64s,
    nonce=st.binary(min_size=16, max_size=16),
    signature=st.none() | st.binary(min_size=64, max_size=64),
)


@st.composite
def sync_responses(draw: st.DrawFn) -> SyncResponse:
    base_round = draw(st.integers(0, MAX_ROUND - 8))
    count = draw(st.integers(0, 6))
    table = draw(seed_pairs(f32s.filter(lambda x: x != 0.0), min_size=0, max_size=60))
    rounds = tuple(
        RoundEntry(round=base_round + 1 + i,
                   coefficients=draw(seed_pairs(f32s, min_size=0, max_size=12)))
        for i in range(count)
    )
    return SyncResponse(target_round=base_round + count, base_round=base_round,
                        table=tuple(sorted(table)), rounds=rounds, table_digest=DIGEST)


scope = ScopeSpec(kind="full", lora_rank=0, lora_alpha=0.0, lora_targets=(), lora_init_seed=0)
federation = FederationInfo(
    federation_id="fed", model_name="m", model_hash=DIGEST, scope=scope,
    seed_pool_size=16, rebase_every=10, perturbation="gaussian", aggregation="mean",
    learning_rate=0.5, epsilon=0.25, local_steps=2, batch_size=4, max_seq_len=64)
SAMPLES: list[Any] = [
    Challenge(protocol_version=(2, 0), server_nonce=b"n" * 16, federation_id="fed", federation=federation),
    Welcome(client_id="c", last_committed_round=3, federation=federation),
    RoundTask(round=4, attempt=0, base_round=3, seeds=(1, 2, 3), learning_rate=0.5,
              epsilon=0.25, batch_size=4, max_seq_len=64, scope="full", deadline_s=30.0),
    RoundCommit(round=4, attempt=0, coefficients=((1, 0.5), (2, -0.25)),
                totals=((1, 1.5), (2, -0.25)), table_digest=DIGEST, num_updates=2),
    Hello(protocol_version=(2, 0), client_id="c", mode="train", model_hash=DIGEST,
          last_round=0, table_digest=None, plan="mezo, batch 4", public_key=None, signature=None,
          device=DeviceProfile(device_type="cpu", device_name="x", accelerator_total_bytes=0,
                               accelerator_free_bytes=0, host_total_bytes=8, host_free_bytes=4,
                               memory_budget_bytes=2)),
    SyncResponse(target_round=2, base_round=1, table=((5, 1.0),),
                 rounds=(RoundEntry(round=2, coefficients=((5, 0.5),)),), table_digest=DIGEST),
]
FRAMES = [encode(msg) for msg in SAMPLES]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.floats(width=32)
    | st.text(max_size=12)
    | st.binary(max_size=24)
)
FIELD_NAMES = sorted({"type", *(name for cls in MESSAGE_TYPES.values()
                                 for name, _ in field_kinds(cls))}
                     | {"kind", "round", "coefficients", "scope", "device", "federation"})
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(keys, children, max_size=6),
    max_leaves=25,
)
small_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=6,
)
# Maps that look like messages, so fuzzing reaches the schema checks.
message_like = st.builds(
    lambda tag, fields: {"type": tag, **fields},
    st.sampled_from(sorted(MESSAGE_TYPES)) | st.text(max_size=8),
    st.dictionaries(st.sampled_from(FIELD_NAMES), small_values, max_size=10),
)


def check_decode(data: bytes) -> Any:
    """Decode; only PeerProtocolError may escape, and it must fit an error message."""
    try:
        msg = decode(data)
    except PeerProtocolError as exc:
        Error(code=exc.error_code, message=str(exc), field=getattr(exc, "path", None),
              round=None)
        assert len(str(exc)) <= MAX_STRING_CHARS
        return None
    assert type(msg) in MESSAGE_TYPES.values()
    assert decode(encode(msg, max_size=None), max_size=None) == msg
    return msg


def mutate(obj: Any, data: st.DataObject) -> Any:
    """Replace, drop or add one entry somewhere inside a wire value."""
    if isinstance(obj, dict) and obj:
        key = data.draw(st.sampled_from(sorted(obj)))
        action = data.draw(st.sampled_from(["replace", "drop", "add", "recurse", "recurse"]))
        if action == "replace":
            obj[key] = data.draw(small_values)
        elif action == "drop":
            del obj[key]
        elif action == "add":
            obj[data.draw(keys)] = data.draw(small_values)
        else:
            obj[key] = mutate(obj[key], data)
    elif isinstance(obj, list) and obj:
        index = data.draw(st.integers(0, len(obj) - 1))
        if data.draw(st.booleans()):
            obj[index] = mutate(obj[index], data)
        else:
            obj[index] = data.draw(small_values)
    else:
        obj = data.draw(small_values)
    return obj


# ------------------------------------------------------------------ properties


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    check_decode(data)


@FUZZ
@given(st.sampled_from(FRAMES), st.data())
def test_corrupted_frames(frame: bytes, data: st.DataObject) -> None:
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        position = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if action == "flip" and buf:
            buf[position] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del buf[position:]
        elif action == "insert":
            buf[position:position] = data.draw(st.binary(min_size=1, max_size=9))
        elif buf:
            del buf[position]
    check_decode(bytes(buf))


@FUZZ
@given(values)
def test_arbitrary_msgpack_values(value: Any) -> None:
    check_decode(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(message_like)
def test_message_like_maps(value: dict[str, Any]) -> None:
    check_decode(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(st.sampled_from(FRAMES), st.data())
def test_mutated_valid_messages(frame: bytes, data: st.DataObject) -> None:
    obj = msgpack.unpackb(frame, raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        obj = mutate(obj, data)
    check_decode(msgpack.packb(obj, use_bin_type=True))


def depth(value: Any) -> int:
    """Container nesting depth: a scalar is 0, ``[1]`` is 1."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@FUZZ
@given(values)
def test_scan_agrees_with_msgpack(value: Any) -> None:
    """The pre-scan refuses a well-formed value within the size limits only for depth."""
    data = msgpack.packb(value, use_bin_type=True)
    try:
        codec._scan(data)
    except MalformedFrame as exc:
        assert depth(value) > MAX_NESTING_DEPTH, exc
    else:
        assert depth(value) <= MAX_NESTING_DEPTH


@ROUND_TRIP
@given(updates)
def test_update_round_trip(msg: Update) -> None:
    assert decode(encode(msg)) == msg


@ROUND_TRIP
@given(sync_responses())
def test_sync_response_round_trip(msg: SyncResponse) -> None:
    back = decode(encode(msg))
    assert back == msg
    assert encode(back) == encode(msg)
