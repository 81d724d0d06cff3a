"""Client identity: the signed bytes, key files, the allow-list, signature checks, replays, edgefed-keys."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import keys_cli, tls
from coordinator.allowlist import (
    OPEN_MODE_WARNING,
    REFUSAL_REASONS,
    AllowEntry,
    Allowlist,
    AllowlistError,
    IdentityRefused,
    ReplayGuard,
    add,
    decode_public_key,
    format_entry,
    load_allowlist,
    parse_allowlist,
    verify_hello,
    verify_update,
)
from edge_client.identity import ClientIdentity, IdentityError
from protocol.keyfile import MAX_KEY_FILE_BYTES, KeyFileError
from protocol.messages import Challenge, DeviceProfile, FederationInfo, Hello, PackedUpdate, ScopeSpec, Update
from protocol.signing import (
    HELLO_TAG,
    UPDATE_TAG,
    hello_signed_bytes,
    packed_update_body_bytes,
    update_body_bytes,
    update_body_hash,
    update_signed_bytes,
)

# ------------------------------------------------------------------ fixtures

SEED = bytes(range(32))  # the test vectors' Ed25519 private key (RFC 8032 seed)
PUBLIC_HEX = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"


def fixed_identity() -> ClientIdentity:
    return ClientIdentity(Ed25519PrivateKey.from_private_bytes(SEED))


def make_challenge(**changes: object) -> Challenge:
    federation_id = str(changes.get("federation_id", "demo"))
    fields: dict[str, object] = dict(protocol_version=(1, 0), server_nonce=bytes(range(0x40, 0x60)),
                                     federation_id=federation_id)
    if "federation" in {f.name for f in dataclasses.fields(Challenge)}:
        fields["federation"] = FederationInfo(
            federation_id=federation_id, model_name="smollm2-135m", model_hash="ab" * 32,
            scope=ScopeSpec(kind="full", lora_rank=0, lora_alpha=0.0, lora_targets=(), lora_init_seed=0),
            seed_pool_size=256, rebase_every=8, perturbation="rademacher", aggregation="mean",
            learning_rate=1e-6, epsilon=1e-3, local_steps=6, batch_size=4, max_seq_len=96)
    fields.update(changes)
    return Challenge(**fields)  # type: ignore[arg-type]


DEVICE = DeviceProfile(device_type="cpu", device_name="test cpü", accelerator_total_bytes=0,
                       accelerator_free_bytes=0, host_total_bytes=8 * 2**30, host_free_bytes=4 * 2**30,
                       memory_budget_bytes=2 * 2**30)


def make_hello(**changes: object) -> Hello:
    fields: dict[str, object] = dict(protocol_version=(1, 0), client_id="laptop-1", device=DEVICE, mode="mezo",
                                     model_hash="ab" * 32, last_round=7, table_digest="cd" * 32,
                                     public_key=None, signature=None)
    if "plan" in {f.name for f in dataclasses.fields(Hello)}:
        fields["plan"] = None
    fields.update(changes)
    return Hello(**fields)  # type: ignore[arg-type]


def make_update(**changes: object) -> Update:
    fields: dict[str, object] = dict(round=3, attempt=1, client_id="laptop-1",
                                     pairs=((12345, 0.5), (2**63 - 1, -1.25e-3)), num_examples=200,
                                     loss_before=2.75, loss_after=2.5, nonce=bytes(range(0xA0, 0xB0)),
                                     signature=None)
    fields.update(changes)
    return Update(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------- test vectors
# The same literals are in PROTOCOL.md §4.5.3.

HELLO_SIGNED_HEX = (
    "656467656665642d68656c6c6f2d763100000100000000000464656d6f00000020404142434445464748494a4b4c4d4e"
    "4f505152535455565758595a5b5c5d5e5f00010000000000086c6170746f702d31000000036370750000000974657374"
    "206370c3bc00000000000000000000000000000000000000020000000000000001000000000100000000800000000000"
    "00046d657a6f000000406162616261626162616261626162616261626162616261626162616261626162616261626162"
    "616261626162616261626162616261626162616261626162616200000000000000070100000040636463646364636463"
    "646364636463646364636463646364636463646364636463646364636463646364636463646364636463646364636463"
    "646364636463640003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
)
HELLO_SIGNATURE_HEX = (
    "eab546461168897545f6f393ac1106e399cba11fa570b051a207e3df7494070c"
    "c80d2619f2c00e5a125f4d4093a96bb5344bfffa75e7998c0f36625440612a08"
)
UPDATE_BODY_HEX = (
    "00000002" "0000000000003039" "3fe0000000000000" "7fffffffffffffff" "bf547ae147ae147b"
    "00000000000000c8" "4006000000000000" "4004000000000000"
)
UPDATE_BODY_SHA256_HEX = "97d13d510a80f53cbdf149c835ee510e418bd96cf161008e3861ff4251178332"
UPDATE_SIGNED_HEX = (
    "656467656665642d7570646174652d7631000000000464656d6f00000020404142434445464748494a4b4c4d4e4f50515253"
    "5455565758595a5b5c5d5e5f000000086c6170746f702d3100000000000000030000000000000001a0a1a2a3a4a5a6a7a8a9"
    "aaabacadaeaf97d13d510a80f53cbdf149c835ee510e418bd96cf161008e3861ff4251178332"
)
UPDATE_SIGNATURE_HEX = (
    "41a19e72b11d517d1d5ddb851951ff5a0eaa006e10354dd4e7bba363ab3985ad"
    "25b8c1bbd6d66b58855fc352f18e25ae58224fa003fe303cf90db16a5fbdd10f"
)

PACKED_BODY_HEX = (
    "00000002" "7138" "3f8999999999999a" "00000003" "01ff7f" "00000000000000c8" "4006000000000000" "4004000000000000"
)
PACKED_BODY_SHA256_HEX = "0d2a5036185b536fb2de80a1497581b162e99c80b70557d698c82734946529bd"
PACKED_SIGNED_HEX = (
    "656467656665642d7061636b65642d7570646174652d7631000000000464656d6f0000002040414243444546474849"
    "4a4b4c4d4e4f505152535455565758595a5b5c5d5e5f000000086c6170746f702d3100000000000000030000000000"
    "000001a0a1a2a3a4a5a6a7a8a9aaabacadaeaf0d2a5036185b536fb2de80a1497581b162e99c80b70557d698c82734"
    "946529bd"
)
PACKED_SIGNATURE_HEX = (
    "3d44cbf88d8767023dc5de6a4f754442ece04efd50ada5bedc177ab2df9944c5"
    "9a1b976a32a3ef0821818abe03def8a24ea39e7f0e16f5f04044877944438200"
)


def test_fixed_key_vector() -> None:
    assert fixed_identity().public_key_bytes.hex() == PUBLIC_HEX


def test_hello_signed_bytes_vector() -> None:
    hello = make_hello(public_key=bytes.fromhex(PUBLIC_HEX))
    assert hello_signed_bytes(make_challenge(), hello).hex() == HELLO_SIGNED_HEX
    signed = fixed_identity().sign_hello(make_challenge(), make_hello())
    assert signed.public_key == bytes.fromhex(PUBLIC_HEX)
    assert signed.signature is not None and signed.signature.hex() == HELLO_SIGNATURE_HEX


def test_update_signed_bytes_vector() -> None:
    update = make_update()
    assert update_body_bytes(update).hex() == UPDATE_BODY_HEX
    assert update_body_hash(update).hex() == UPDATE_BODY_SHA256_HEX
    assert update_signed_bytes(make_challenge(), update).hex() == UPDATE_SIGNED_HEX
    signed = fixed_identity().sign_update(make_challenge(), update)
    assert signed.signature is not None and signed.signature.hex() == UPDATE_SIGNATURE_HEX


def test_packed_update_signed_bytes_vector() -> None:
    update = PackedUpdate(round=3, attempt=1, client_id="laptop-1", encoding="q8", scale=0.0125,
                          values=bytes([0x01, 0xFF, 0x7F]), num_examples=200, loss_before=2.75, loss_after=2.5,
                          nonce=bytes(range(0xA0, 0xB0)), signature=None)
    assert packed_update_body_bytes(update).hex() == PACKED_BODY_HEX
    assert update_body_hash(update).hex() == PACKED_BODY_SHA256_HEX
    assert update_signed_bytes(make_challenge(), update).hex() == PACKED_SIGNED_HEX
    signed = fixed_identity().sign_update(make_challenge(), update)
    assert signed.signature is not None and signed.signature.hex() == PACKED_SIGNATURE_HEX
    assert update.decoded() == (0.0125, -0.0125, 1.5875000000000001)


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">I", len(data)) + data


def test_layouts_spelled_out() -> None:
    """The vectors, rebuilt piece by piece from the documented layout."""
    nonce = bytes(range(0x40, 0x60))
    hello = (b"edgefed-hello-v1\x00" + struct.pack(">HH", 1, 0) + _s("demo") + struct.pack(">I", 32) + nonce
             + struct.pack(">HH", 1, 0) + _s("laptop-1") + _s("cpu") + _s("test cpü")
             + struct.pack(">QQQQ", 0, 0, 8 * 2**30, 4 * 2**30) + b"\x01" + struct.pack(">Q", 2 * 2**30)
             + _s("mezo") + _s("ab" * 32) + struct.pack(">Q", 7) + b"\x01" + _s("cd" * 32) + b"\x00"
             + bytes.fromhex(PUBLIC_HEX))
    assert hello.hex() == HELLO_SIGNED_HEX
    body = (struct.pack(">I", 2) + struct.pack(">Qd", 12345, 0.5) + struct.pack(">Qd", 2**63 - 1, -1.25e-3)
            + struct.pack(">Qdd", 200, 2.75, 2.5))
    assert body.hex() == UPDATE_BODY_HEX
    update = (b"edgefed-update-v1\x00" + _s("demo") + struct.pack(">I", 32) + nonce + _s("laptop-1")
              + struct.pack(">QQ", 3, 1) + bytes(range(0xA0, 0xB0)) + hashlib.sha256(body).digest())
    assert update.hex() == UPDATE_SIGNED_HEX


def test_tags_are_distinct_and_prefix_free() -> None:
    assert HELLO_TAG.endswith(b"\x00") and UPDATE_TAG.endswith(b"\x00")
    assert not HELLO_TAG.startswith(UPDATE_TAG) and not UPDATE_TAG.startswith(HELLO_TAG)
    assert hello_signed_bytes(make_challenge(), make_hello(public_key=bytes(32))).startswith(HELLO_TAG)
    assert update_signed_bytes(make_challenge(), make_update()).startswith(UPDATE_TAG)


# ------------------------------------------------- every covered field matters

HELLO_COVERED = {"protocol_version", "client_id", "device", "mode", "model_hash", "last_round", "table_digest",
                 "plan", "public_key", "blocks"}
UPDATE_COVERED = {"round", "attempt", "client_id", "pairs", "num_examples", "loss_before", "loss_after", "nonce"}
CHALLENGE_COVERED = {"protocol_version", "server_nonce", "federation_id"}


def test_signed_fields_match_the_message_schemas() -> None:
    """A field added to a message must be added to its signed bytes (or excluded here on purpose)."""
    hello_fields = {f.name for f in dataclasses.fields(Hello)} - {"signature"}
    assert hello_fields <= HELLO_COVERED and HELLO_COVERED - hello_fields <= {"plan"}
    assert {f.name for f in dataclasses.fields(Update)} - {"signature"} == UPDATE_COVERED
    # challenge.federation is repeated (and so fixed) by the welcome; it is not signed.
    assert {f.name for f in dataclasses.fields(Challenge)} - {"federation"} == CHALLENGE_COVERED


HELLO_CHANGES: list[tuple[str, Any]] = [
    ("protocol_version", (1, 1)),
    ("client_id", "laptop-2"),
    ("device", dataclasses.replace(DEVICE, host_free_bytes=4 * 2**30 + 1)),
    ("device", dataclasses.replace(DEVICE, memory_budget_bytes=None)),
    ("device", dataclasses.replace(DEVICE, device_name="test cpu")),
    ("device", dataclasses.replace(DEVICE, device_type="cuda")),
    ("mode", "observe"),
    ("model_hash", "ac" * 32),
    ("last_round", 8),
    ("table_digest", None),
    ("table_digest", "ce" * 32),
    ("public_key", bytes(32)),
    ("blocks", (3, 4)),
]
if "plan" in {f.name for f in dataclasses.fields(Hello)}:
    HELLO_CHANGES.append(("plan", "mezo, batch 4"))


@pytest.mark.parametrize("name,value", HELLO_CHANGES, ids=[f"{n}={v!r}"[:40] for n, v in HELLO_CHANGES])
def test_changing_a_hello_field_changes_its_bytes(name: str, value: Any) -> None:
    base = make_hello(public_key=bytes.fromhex(PUBLIC_HEX))
    assert hello_signed_bytes(make_challenge(), base) != hello_signed_bytes(
        make_challenge(), dataclasses.replace(base, **{name: value}))


@pytest.mark.parametrize("name,value", [("protocol_version", (1, 1)), ("server_nonce", bytes(32)),
                                        ("server_nonce", bytes(range(0x40, 0x61))), ("federation_id", "other")])
def test_changing_the_challenge_changes_hello_and_update_bytes(name: str, value: Any) -> None:
    hello = make_hello(public_key=bytes(32))
    other = make_challenge(**{name: value})
    assert hello_signed_bytes(make_challenge(), hello) != hello_signed_bytes(other, hello)
    if name != "protocol_version":
        assert update_signed_bytes(make_challenge(), make_update()) != update_signed_bytes(other, make_update())


UPDATE_CHANGES: list[tuple[str, Any]] = [
    ("round", 4), ("attempt", 0), ("client_id", "laptop-2"), ("nonce", bytes(16)),
    ("pairs", ((12345, 0.5), (2**63 - 1, -1.2500000000000002e-3))),
    ("pairs", ((12346, 0.5), (2**63 - 1, -1.25e-3))),
    ("pairs", ((2**63 - 1, -1.25e-3), (12345, 0.5))),
    ("pairs", ((12345, 0.5),)),
    ("pairs", ((12345, -0.0), (2**63 - 1, -1.25e-3))),
    ("num_examples", 201), ("loss_before", 2.7500000000000004), ("loss_after", 2.25),
]


@pytest.mark.parametrize("name,value", UPDATE_CHANGES, ids=[f"{n}={v!r}"[:40] for n, v in UPDATE_CHANGES])
def test_changing_an_update_field_changes_its_bytes(name: str, value: Any) -> None:
    base = make_update()
    assert update_signed_bytes(make_challenge(), base) != update_signed_bytes(
        make_challenge(), dataclasses.replace(base, **{name: value}))


def test_signature_field_is_not_covered() -> None:
    update = make_update()
    assert update_signed_bytes(make_challenge(), update) == update_signed_bytes(
        make_challenge(), dataclasses.replace(update, signature=bytes(64)))


def test_length_prefixes_keep_boundaries() -> None:
    one = update_signed_bytes(make_challenge(federation_id="ab"), make_update(client_id="c"))
    two = update_signed_bytes(make_challenge(federation_id="a"), make_update(client_id="bc"))
    assert one != two


def test_hello_without_public_key_cannot_be_signed() -> None:
    with pytest.raises(ValueError, match="public_key"):
        hello_signed_bytes(make_challenge(), make_hello())


# ------------------------------------------------------- sign and verify


@pytest.fixture
def alice() -> ClientIdentity:
    return ClientIdentity.generate()


@pytest.fixture
def allowlist(alice: ClientIdentity) -> Allowlist:
    return parse_allowlist(alice.allowlist_line("laptop-1") + "\n", "allow.txt")


def test_hello_round_trip(alice: ClientIdentity, allowlist: Allowlist) -> None:
    challenge = make_challenge()
    hello = alice.sign_hello(challenge, make_hello())
    assert hello.public_key == alice.public_key_bytes and hello.signature is not None and len(hello.signature) == 64
    assert verify_hello(allowlist, challenge, hello) == "laptop-1"
    # signing again with the key already set is fine; Ed25519 is deterministic
    assert alice.sign_hello(challenge, hello) == hello


@contextlib.contextmanager
def refused(reason: str) -> Iterator[None]:
    """Expect IdentityRefused with this reason code."""
    assert reason in REFUSAL_REASONS
    with pytest.raises(IdentityRefused) as caught:
        yield
    assert caught.value.reason == reason, str(caught.value)


def test_hello_refusals(alice: ClientIdentity, allowlist: Allowlist) -> None:
    challenge = make_challenge()
    mallory = ClientIdentity.generate()
    with refused("missing_signature"):
        verify_hello(allowlist, challenge, make_hello())
    with refused("missing_signature"):
        verify_hello(allowlist, challenge, make_hello(public_key=alice.public_key_bytes))
    with refused("unknown_key"):
        verify_hello(allowlist, challenge, mallory.sign_hello(challenge, make_hello()))
    # mallory claims alice's key but cannot sign for it
    forged = make_hello(public_key=alice.public_key_bytes)
    forged = dataclasses.replace(forged, signature=mallory.sign(hello_signed_bytes(challenge, forged)))
    with refused("bad_signature"):
        verify_hello(allowlist, challenge, forged)
    good = alice.sign_hello(challenge, make_hello())
    # replayed on another connection (another nonce) or to another federation
    with refused("bad_signature"):
        verify_hello(allowlist, make_challenge(server_nonce=bytes(32)), good)
    with refused("bad_signature"):
        verify_hello(allowlist, make_challenge(federation_id="other"), good)
    # altered in transit
    for name, value in HELLO_CHANGES:
        if name in ("public_key", "client_id"):
            continue
        with refused("bad_signature"):
            verify_hello(allowlist, challenge, dataclasses.replace(good, **{name: value}))
    assert good.signature is not None
    with refused("bad_signature"):
        verify_hello(allowlist, challenge, dataclasses.replace(good, signature=bytes(64)))
    # a validly signed hello under another client id than the key's
    with refused("wrong_client_id"):
        verify_hello(allowlist, challenge, alice.sign_hello(challenge, make_hello(client_id="laptop-2")))


def test_sign_hello_refuses_a_foreign_public_key(alice: ClientIdentity) -> None:
    with pytest.raises(ValueError):
        alice.sign_hello(make_challenge(), make_hello(public_key=bytes(32)))


def test_update_round_trip(alice: ClientIdentity) -> None:
    challenge = make_challenge()
    update = alice.sign_update(challenge, make_update())
    verify_update(alice.public_key_bytes, challenge, update)
    allowlist = parse_allowlist(alice.allowlist_line("laptop-1"))
    verify_update(allowlist.verifier(alice.public_key_bytes), challenge, update)


@pytest.mark.parametrize("name,value", UPDATE_CHANGES, ids=[f"{n}={v!r}"[:40] for n, v in UPDATE_CHANGES])
def test_altered_update_is_refused(alice: ClientIdentity, name: str, value: Any) -> None:
    challenge = make_challenge()
    update = alice.sign_update(challenge, make_update())
    with refused("bad_signature"):
        verify_update(alice.public_key_bytes, challenge, dataclasses.replace(update, **{name: value}))


def test_update_refusals(alice: ClientIdentity) -> None:
    challenge = make_challenge()
    mallory = ClientIdentity.generate()
    with refused("missing_signature"):
        verify_update(alice.public_key_bytes, challenge, make_update())
    with refused("bad_signature"):  # signed by another key
        verify_update(alice.public_key_bytes, challenge, mallory.sign_update(challenge, make_update()))
    good = alice.sign_update(challenge, make_update())
    with refused("bad_signature"):  # taken to another connection
        verify_update(alice.public_key_bytes, make_challenge(server_nonce=bytes(32)), good)
    with refused("bad_signature"):  # or another federation
        verify_update(alice.public_key_bytes, make_challenge(federation_id="other"), good)
    assert good.signature is not None
    flipped = bytes([good.signature[0] ^ 1]) + good.signature[1:]
    with refused("bad_signature"):
        verify_update(alice.public_key_bytes, challenge, dataclasses.replace(good, signature=flipped))


# ----------------------------------------------------------- replay guard


def test_replay_of_the_same_client_and_nonce_is_refused() -> None:
    guard = ReplayGuard(committed_round=2)
    update = make_update(round=3)
    guard.check(update)
    with refused("replay"):
        guard.check(update)
    with refused("replay"):  # another attempt, same nonce
        guard.check(dataclasses.replace(update, attempt=2))
    guard.check(dataclasses.replace(update, client_id="laptop-2"))  # nonces are per client
    guard.check(dataclasses.replace(update, nonce=bytes(16)))
    guard.check(dataclasses.replace(update, round=2))  # and per round
    assert len(guard) == 4


def test_replay_guard_window_bounds_memory() -> None:
    guard = ReplayGuard(committed_round=0, window=2)
    for round_ in range(1, 6):
        guard.check(make_update(round=round_))
        guard.committed(round_)
    # committed 5: rounds 3..6 are remembered, older ones forgotten
    assert guard.latest_committed == 5 and len(guard) == 3
    with refused("replay"):
        guard.check(make_update(round=2))
    with refused("replay"):
        guard.check(make_update(round=4))
    with refused("out_of_window"):
        guard.check(make_update(round=7))
    guard.check(make_update(round=6))
    guard.committed(4)  # going backwards changes nothing
    assert guard.latest_committed == 5
    guard.committed(100)
    assert len(guard) == 0


def test_replay_guard_caps_nonces_per_client_and_round() -> None:
    guard = ReplayGuard(max_nonces_per_client=3)
    for index in range(3):
        guard.check(make_update(round=1, nonce=bytes([index]) * 16))
    with refused("too_many_updates"):
        guard.check(make_update(round=1, nonce=bytes([9]) * 16))
    guard.check(make_update(round=1, client_id="other", nonce=bytes([9]) * 16))
    with pytest.raises(ValueError):
        ReplayGuard(window=-1)


# -------------------------------------------------------------- allow-list


def key_b64(identity: ClientIdentity | None = None) -> str:
    return (identity or ClientIdentity.generate()).public_key_b64


def test_parse_allowlist() -> None:
    one, two = ClientIdentity.generate(), ClientIdentity.generate()
    text = (f"# the federation's clients\n\n   \n{one.public_key_b64} laptop-1\n"
            f"  {two.public_key_b64}\tphone_2.a   # Bob's phone\n  # indented comment\n")
    allowlist = parse_allowlist(text, "allow.txt")
    assert len(allowlist) == 2
    assert allowlist.entries == (AllowEntry(one.public_key_bytes, "laptop-1", 4),
                                 AllowEntry(two.public_key_bytes, "phone_2.a", 5))
    entry = allowlist.lookup(two.public_key_bytes)
    assert entry is not None and entry.name == "phone_2.a"
    assert allowlist.by_name("laptop-1") == allowlist.entries[0]
    assert one.public_key_bytes in allowlist and bytes(32) not in allowlist
    assert allowlist.lookup(bytes(32)) is None
    assert [entry.name for entry in allowlist] == ["laptop-1", "phone_2.a"]
    assert len(parse_allowlist("")) == 0


@pytest.mark.parametrize("line,message", [
    ("not-base64! alice", "allow.txt:3: not a 32-byte base64 Ed25519 key"),
    (base64.b64encode(bytes(31)).decode() + " alice", "allow.txt:3: not a 32-byte base64 Ed25519 key"),
    (base64.b64encode(bytes(33)).decode() + " alice", "allow.txt:3: not a 32-byte base64 Ed25519 key"),
    ("KEY", "allow.txt:3: expected '<base64 key> <name>', got 1 fields"),
    ("KEY alice bob", "allow.txt:3: expected '<base64 key> <name>', got 3 fields"),
    ("KEY al/ice", "allow.txt:3: name 'al/ice' must be 1 to 64 characters of [A-Za-z0-9_.-] (the client id)"),
    ("KEY " + "a" * 65, "allow.txt:3: name 'aaaa"),
])
def test_allowlist_errors_name_the_line(line: str, message: str) -> None:
    text = "# header\n\n" + line.replace("KEY", key_b64()) + "\n" + key_b64() + " zed\n"
    with pytest.raises(AllowlistError) as caught:
        parse_allowlist(text, "allow.txt")
    assert str(caught.value).startswith(message)


def test_allowlist_refuses_duplicates() -> None:
    key = key_b64()
    with pytest.raises(AllowlistError, match=r"^allow.txt:3: duplicate key \(already listed as 'alice' on line 1\)$"):
        parse_allowlist(f"{key} alice\n{key_b64()} bob\n{key} carol\n", "allow.txt")
    with pytest.raises(AllowlistError, match=r"^allow.txt:2: duplicate name 'alice' \(line 1\)$"):
        parse_allowlist(f"{key} alice\n{key_b64()} alice\n", "allow.txt")


def test_load_allowlist_errors(tmp_path: Path) -> None:
    with pytest.raises(AllowlistError, match="no such allow-list file"):
        load_allowlist(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(f"{key_b64()} alice\n".encode() + b"\xff\xfe bob\n")
    with pytest.raises(AllowlistError, match=r"bad.txt:2: not UTF-8 text$"):
        load_allowlist(bad)


def test_decode_public_key() -> None:
    identity = ClientIdentity.generate()
    assert decode_public_key(identity.public_key_b64) == identity.public_key_bytes
    for text in ("", "=" * 44, identity.public_key_b64[:-1], identity.public_key_b64 + "AAAA", "é" * 44):
        with pytest.raises(ValueError):
            decode_public_key(text)


def test_add_creates_appends_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    one, two, three = (ClientIdentity.generate() for _ in range(3))
    entry = add(path, one.public_key_b64, "alice")
    assert entry == AllowEntry(one.public_key_bytes, "alice", entry.line)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert load_allowlist(path).entries[0] == entry
    os.chmod(path, 0o640)
    add(path, two.public_key_bytes, "bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    # a file without a final newline
    path.write_text(path.read_text().rstrip("\n"))
    add(path, three.public_key_b64, "carol")
    assert [e.name for e in load_allowlist(path)] == ["alice", "bob", "carol"]
    assert path.read_text().endswith(f"{three.public_key_b64} carol\n")
    assert [p.name for p in tmp_path.iterdir()] == ["allow.txt"]  # no temporary left


def test_add_refuses_duplicates_and_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    alice = ClientIdentity.generate()
    add(path, alice.public_key_b64, "alice")
    before = path.read_bytes()
    with pytest.raises(AllowlistError, match="already listed as 'alice'"):
        add(path, alice.public_key_b64, "alice2")
    with pytest.raises(AllowlistError, match="name 'alice' is already used"):
        add(path, key_b64(), "alice")
    with pytest.raises(AllowlistError, match="not a 32-byte base64 Ed25519 key"):
        add(path, "AAAA", "bob")
    with pytest.raises(AllowlistError, match="not a 32-byte base64 Ed25519 key"):
        add(path, bytes(31), "bob")
    with pytest.raises(AllowlistError, match="must be 1 to 64 characters"):
        add(path, key_b64(), "bob smith")
    assert path.read_bytes() == before
    broken = tmp_path / "broken.txt"
    broken.write_text("garbage\n")
    with pytest.raises(AllowlistError, match="broken.txt:1:"):
        add(broken, key_b64(), "bob")
    assert broken.read_text() == "garbage\n"


def test_add_follows_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    link = tmp_path / "allow.txt"
    add(real, key_b64(), "alice")
    link.symlink_to(real)
    add(link, key_b64(), "bob")
    assert link.is_symlink() and [e.name for e in load_allowlist(real)] == ["alice", "bob"]


def test_format_entry_round_trips() -> None:
    identity = ClientIdentity.generate()
    line = format_entry(identity.public_key_bytes, "x")
    assert line == identity.allowlist_line("x")
    assert parse_allowlist(line).entries[0].public_key == identity.public_key_bytes


def test_open_mode_warning_is_loud() -> None:
    assert OPEN_MODE_WARNING.startswith("OPEN MODE") and "ANY client" in OPEN_MODE_WARNING


# ----------------------------------------------------------------- key files


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    old = os.umask(0)
    try:
        identity = ClientIdentity.create(path)
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = ClientIdentity.load(path)
    assert loaded.public_key_bytes == identity.public_key_bytes and loaded.path == path
    assert loaded.sign(b"x") == identity.sign(b"x")
    assert len(identity.public_key_bytes) == 32 and len(identity.sign(b"")) == 64
    assert base64.b64decode(identity.public_key_b64) == identity.public_key_bytes


def test_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    ClientIdentity.create(path)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="already exists; refusing to overwrite"):
        ClientIdentity.generate().save(path)
    assert path.read_bytes() == before


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_key_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "client.key"
    ClientIdentity.create(path)
    os.chmod(path, mode)
    with pytest.raises(IdentityError) as caught:
        ClientIdentity.load(path)
    assert str(caught.value) == (f"{path}: key file is accessible by group or others (mode {mode:04o}); "
                                 f"run: chmod 600 {path}")
    for private in (0o400, 0o600, 0o700):
        os.chmod(path, private)
        ClientIdentity.load(path)


def write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="no such key file"):
        ClientIdentity.load(tmp_path / "missing.key")
    with pytest.raises(IdentityError, match="not a PEM private key file"):
        ClientIdentity.load(write_private(tmp_path / "junk.key", b"hello\n"))
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(IdentityError, match="not an Ed25519 private key"):
        ClientIdentity.load(write_private(tmp_path / "ec.key", ec_key))
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(IdentityError, match="encrypted"):
        ClientIdentity.load(write_private(tmp_path / "enc.key", encrypted))
    with pytest.raises(IdentityError, match="not a regular file"):
        ClientIdentity.load(tmp_path)
    with pytest.raises(IdentityError, match="cannot create key file"):
        ClientIdentity.create(tmp_path / "no" / "such" / "dir.key")


# ----------------------------------------------------------------- edgefed-keys


def run_keys(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = keys_cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_keys_new_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "laptop-1.key"
    code, out, err = run_keys(capsys, "new", "--out", str(key))
    assert code == 0 and mode_of(key) == 0o600
    identity = ClientIdentity.load(key)  # the client reads what the command wrote
    assert out == f"{identity.public_key_b64} laptop-1\n"
    assert "keep it private" in err
    code, out, _ = run_keys(capsys, "show", str(key), "--name", "alice")
    assert (code, out) == (0, f"{identity.public_key_b64} alice\n")
    code, out, _ = run_keys(capsys, "show", str(key))
    assert (code, out) == (0, f"{identity.public_key_b64} laptop-1\n")
    # what show prints is an allow-list line, and a key made by the client loads in the command
    other = tmp_path / "other.key"
    ClientIdentity.create(other)
    code, out, _ = run_keys(capsys, "show", str(other))
    assert code == 0 and parse_allowlist(out).entries[0].public_key == ClientIdentity.load(other).public_key_bytes


def test_keys_new_and_show_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "client.key"
    assert run_keys(capsys, "new", "--out", str(key))[0] == 0
    before = key.read_bytes()
    code, out, err = run_keys(capsys, "new", "--out", str(key))
    assert (code, out) == (2, "") and err == f"edgefed-keys: {key}: already exists; refusing to overwrite\n"
    assert key.read_bytes() == before
    code, _, err = run_keys(capsys, "new", "--out", str(tmp_path / "x.key"), "--name", "no spaces")
    assert code == 2 and err.count("\n") == 1 and "--name" in err and not (tmp_path / "x.key").exists()
    os.chmod(key, 0o644)
    code, out, err = run_keys(capsys, "show", str(key))
    assert (code, out) == (2, "") and "chmod 600" in err and err.count("\n") == 1
    code, _, err = run_keys(capsys, "show", str(tmp_path / "missing.key"))
    assert code == 2 and "no such key file (create one with: edgefed-keys new --out" in err
    code, _, err = run_keys(capsys, "show", str(write_private(tmp_path / "junk.key", b"junk")))
    assert code == 2 and "not a PEM private key file" in err


# One bad key file, the same refusal wherever it is loaded: by the client
# (ClientIdentity.load), by edgefed-keys show, and by the coordinator's key-file reader
# (coordinator.tls.read_private_file, which sees only the file, not the key in it).


def command_error(stderr: str) -> str:
    """The message of edgefed-keys' one-line error, without its program name."""
    return stderr.removeprefix(f"{keys_cli.PROG}: ").removesuffix("\n")


def _group_readable(path: Path) -> Path:
    ClientIdentity.create(path)
    os.chmod(path, 0o640)
    return path


def _missing(path: Path) -> Path:
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _oversized(path: Path) -> Path:
    return write_private(path, b"-----BEGIN PRIVATE KEY-----\n" + b"A" * MAX_KEY_FILE_BYTES)


def _not_pem(path: Path) -> Path:
    return write_private(path, b"hello\n")


def _ecdsa(path: Path) -> Path:
    return write_private(path, ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.mark.parametrize("make,reader_sees_it,expected", [
    pytest.param(_group_readable, True, "key file is accessible by group or others (mode 0640); run: chmod 600 ",
                 id="group-readable", marks=pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")),
    pytest.param(_missing, True, "no such key file (create one with: edgefed-keys new --out ", id="missing"),
    pytest.param(_directory, True, "not a regular file", id="directory"),
    pytest.param(_oversized, True, f"not a key file (larger than {MAX_KEY_FILE_BYTES} bytes)", id="oversized"),
    pytest.param(_not_pem, False, "not a PEM private key file", id="malformed"),
    pytest.param(_ecdsa, False, "not an Ed25519 private key", id="ecdsa"),
])
def test_every_key_file_loader_refuses_alike(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any,
                                             reader_sees_it: bool, expected: str) -> None:
    path = make(tmp_path / "client.key")
    refusals: dict[str, BaseException] = {}
    with pytest.raises(Exception) as caught:
        ClientIdentity.load(path)
    refusals["client"] = caught.value
    if reader_sees_it:
        with pytest.raises(Exception) as caught:
            tls.read_private_file(path)
        refusals["coordinator reader"] = caught.value
    code, out, err = run_keys(capsys, "show", str(path))
    assert (code, out) == (2, "") and err.startswith(f"{keys_cli.PROG}: ") and err.count("\n") == 1
    texts = {site: str(error) for site, error in refusals.items()} | {"edgefed-keys show": command_error(err)}
    assert set(texts.values()) == {texts["client"]}, texts
    assert texts["client"].startswith(f"{path}: ") and expected in texts["client"]
    assert {type(error) for error in refusals.values()} == {KeyFileError}


def test_every_key_file_writer_refuses_to_overwrite_alike(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "client.key"
    ClientIdentity.create(path)
    before = path.read_bytes()
    refusals: list[BaseException] = []
    for write in (lambda: ClientIdentity.generate().save(path), lambda: tls.write_private_file(path, b"x")):
        with pytest.raises(Exception) as caught:
            write()
        refusals.append(caught.value)
    code, _, err = run_keys(capsys, "new", "--out", str(path))
    assert code == 2 and path.read_bytes() == before
    assert {type(error) for error in refusals} == {KeyFileError}
    texts = {str(error) for error in refusals} | {command_error(err)}
    assert texts == {f"{path}: already exists; refusing to overwrite"}


def test_keys_allow_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allow = tmp_path / "allow.txt"
    alice, bob = ClientIdentity.generate(), ClientIdentity.generate()
    code, _, err = run_keys(capsys, "allow", "--allowlist", str(allow), "--name", "alice", alice.public_key_b64)
    assert code == 0 and "added 'alice'" in err
    assert run_keys(capsys, "allow", "--allowlist", str(allow), "--name", "bob", bob.public_key_b64)[0] == 0
    code, out, err = run_keys(capsys, "list", "--allowlist", str(allow))
    assert code == 0 and out == f"{alice.public_key_b64} alice\n{bob.public_key_b64} bob\n" and "2 key(s)" in err
    allowlist = load_allowlist(allow)
    challenge = make_challenge()
    assert verify_hello(allowlist, challenge, bob.sign_hello(challenge, make_hello(client_id="bob"))) == "bob"


@pytest.mark.parametrize("argv,expected", [
    (["allow", "--allowlist", "{dir}/allow.txt", "--name", "carol", "AAAA"], "not a 32-byte base64 Ed25519 key"),
    (["allow", "--allowlist", "{dir}/allow.txt", "--name", "alice", "{new}"], "name 'alice' is already used"),
    (["allow", "--allowlist", "{dir}/allow.txt", "--name", "carol", "{alice}"], "already listed as 'alice'"),
    (["allow", "--allowlist", "{dir}/allow.txt", "--name", "c d", "{new}"], "must be 1 to 64 characters"),
    (["allow", "--allowlist", "{dir}/allow.txt", "{new}"], "the following arguments are required: --name"),
    (["list", "--allowlist", "{dir}/missing.txt"], "no such allow-list file"),
    (["list", "--allowlist", "{dir}/broken.txt"], "broken.txt:2: not a 32-byte base64 Ed25519 key"),
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["new"], "the following arguments are required: --out"),
    (["tls-init", "--dir", "{dir}/certs"], "the following arguments are required: --host"),
    (["tls-init", "--dir", "{dir}/certs", "--host", "no such host!"], "not an IP address or a DNS name"),
    (["tls-init", "--dir", "{dir}/certs", "--host", "h", "--days", "x"], "invalid int value: 'x'"),
    (["tls-init", "--dir", "{dir}/certs", "--host", "h", "--days", "0"], "days must be at least 1"),
])
def test_keys_errors_are_one_line_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               argv: list[str], expected: str) -> None:
    alice = ClientIdentity.generate()
    add(tmp_path / "allow.txt", alice.public_key_b64, "alice")
    (tmp_path / "broken.txt").write_text(f"{key_b64()} ok\nAAAA bad\n")
    before = (tmp_path / "allow.txt").read_bytes()
    values = {"dir": str(tmp_path), "alice": alice.public_key_b64, "new": key_b64()}
    code, out, err = run_keys(capsys, *[arg.format(**values) for arg in argv])
    assert code == 2 and out == ""
    assert err.startswith("edgefed-keys") and err.count("\n") == 1 and expected in err, err
    assert (tmp_path / "allow.txt").read_bytes() == before
    assert not (tmp_path / "certs").exists()


def test_keys_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_cli.main(["--help"]) == 0
    assert "tls-init" in capsys.readouterr().out


def test_keys_tls_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = tmp_path / "certs"
    code, out, _ = run_keys(capsys, "tls-init", "--dir", str(certs), "--host", "192.168.1.10",
                            "--host", "coordinator.lan")
    assert code == 0
    assert {p.name: mode_of(p) for p in certs.iterdir()} == {
        "ca.pem": 0o644, "ca.key": 0o600, "server.pem": 0o644, "server.key": 0o600}
    assert "copy it to every client" in out and "wss://192.168.1.10:8765" in out
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    code, out, err = run_keys(capsys, "tls-init", "--dir", str(certs), "--host", "192.168.1.10")
    assert code == 2 and "refusing to overwrite" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before
    assert run_keys(capsys, "tls-init", "--dir", str(certs), "--host", "::1", "--force")[0] == 0
    assert {p.name: p.read_bytes() for p in certs.iterdir()} != before


def test_signing_module_is_pure() -> None:
    """protocol/signing.py defines bytes only: stdlib hashing and packing, and the protocol package."""
    import ast

    source = Path(__file__).resolve().parents[1] / "protocol" / "signing.py"
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    assert modules <= {"__future__", "hashlib", "struct", "typing", "protocol"}, modules


def test_vectors_are_documented() -> None:
    """The literals above appear in PROTOCOL.md §4.5.3."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "PROTOCOL.md").read_text(encoding="utf-8")
    compact = "".join(text.split())
    for vector in (PUBLIC_HEX, HELLO_SIGNED_HEX, HELLO_SIGNATURE_HEX, UPDATE_BODY_HEX, UPDATE_BODY_SHA256_HEX,
                   UPDATE_SIGNED_HEX, UPDATE_SIGNATURE_HEX, PACKED_BODY_HEX, PACKED_BODY_SHA256_HEX,
                   PACKED_SIGNED_HEX, PACKED_SIGNATURE_HEX):
        assert vector in compact, vector[:32]
