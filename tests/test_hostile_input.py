"""Hostile input and connection abuse against a real coordinator (issue #10).

Every case runs an in-process Coordinator on 127.0.0.1 (port 0) and talks to it over
real sockets: a websockets client where the attack is in the message, a raw asyncio
stream where it is in the websocket framing or the HTTP upgrade itself. After each case
the coordinator is still serving (a fresh client gets its challenge within 1 s) and the
ledger holds no row that the hostile input wrote.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import resource
import socket
import sqlite3
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect

from coordinator import server as server_module
from coordinator.config import FederationConfig
from coordinator.ledger import Ledger
from coordinator.server import Coordinator
from protocol import codec, limits
from protocol.messages import (
    Challenge,
    DeviceProfile,
    Error,
    Fingerprint,
    Goodbye,
    Hello,
    Message,
    PackedUpdate,
    Reject,
    RoundCommit,
    RoundTask,
    SyncRequest,
    SyncResponse,
    Update,
    UpdateAck,
    Welcome,
)
from protocol.values import pack_values

HASH = "cd" * 32
FINGERPRINT = "11" * 32
DIGEST = "00" * 32  # fingerprint.table_digest is not checked by the coordinator
DEVICE = DeviceProfile(device_type="cpu", device_name="test", accelerator_total_bytes=0, accelerator_free_bytes=0,
                       host_total_bytes=1 << 30, host_free_bytes=1 << 29, memory_budget_bytes=None)
LEDGER_TABLES = ("meta", "rounds", "coefficients", "contributions", "seed_totals", "fingerprints", "clients")
TIMEOUT_S = 5.0  # the longest any single expected reply may take


# ----------------------------------------------------------------------------- helpers


def hello(client_id: str = "c1", *, version: tuple[int, int] = (2, 0), mode: str = "mezo") -> Hello:
    return Hello(protocol_version=version, client_id=client_id, device=DEVICE, mode=mode, model_hash=HASH,
                 last_round=0, table_digest=None, plan="mezo, batch 4: fits", public_key=None, signature=None)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def wire(message: Message) -> dict[str, Any]:
    """A message as the plain map it is on the wire, to tamper with."""
    obj: dict[str, Any] = msgpack.unpackb(codec.encode(message), raw=False)
    return obj


def update(client_id: str, round_number: int, seeds: tuple[int, ...], *, attempt: int = 0, gradient: float = 0.5,
           loss_before: float = 2.0, loss_after: float = 1.9, num_examples: int = 10) -> Update:
    return Update(round=round_number, attempt=attempt, client_id=client_id,
                  pairs=tuple((seed, gradient * (index + 1)) for index, seed in enumerate(seeds)),
                  num_examples=num_examples, loss_before=loss_before, loss_after=loss_after, nonce=b"n" * 16,
                  signature=None)


def ledger_rows(path: str) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in LEDGER_TABLES}


async def poll(predicate: Callable[[], bool], timeout: float = TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Federation:
    coordinator: Coordinator
    task: asyncio.Task[None]

    @property
    def port(self) -> int:
        assert self.coordinator.port is not None
        return self.coordinator.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def rows(self) -> dict[str, int]:
        return ledger_rows(self.coordinator.config.ledger_path)

    async def leave(self, *peers: Peer) -> None:
        """Close the peers and wait until the coordinator has let them go (stopping it
        while their disconnections are still being handled races in Python 3.11's
        asyncio.wait_for, which can swallow the driver's cancellation)."""
        for peer in peers:
            with contextlib.suppress(Exception):
                await peer.ws.close()
        await poll(lambda: not any(peer.client_id in self.coordinator.sessions for peer in peers),
                   what="the peers to be gone")

    async def assert_serving(self, local_host: str | None = None) -> None:
        """The coordinator runs and a fresh client gets its challenge within 1 s (no hello:
        the probe itself writes nothing to the ledger)."""
        assert not self.task.done(), self.task
        kwargs: dict[str, Any] = {} if local_host is None else {"local_addr": (local_host, 0)}
        start = time.monotonic()
        async with connect(self.url, open_timeout=1, **kwargs) as ws:
            challenge = codec.decode(await asyncio.wait_for(ws.recv(), 1))
        assert isinstance(challenge, Challenge)
        assert time.monotonic() - start < 1.0


@contextlib.asynccontextmanager
async def federation(tmp_path: Path, **overrides: Any) -> AsyncIterator[Federation]:
    """A coordinator on 127.0.0.1; by default no round ever opens (min_clients=100)."""
    settings: dict[str, Any] = dict(model_hash=HASH, port=0, ledger_path=str(tmp_path / "ledger.db"), rounds=0,
                                    min_clients=100, pool_key=12345, seed_pool_size=64, local_steps=3)
    settings.update(overrides)
    config = FederationConfig(**settings)
    with Ledger(config.ledger_path) as ledger:
        coordinator = Coordinator(config, ledger)
        task = asyncio.create_task(coordinator.run())
        await poll(lambda: coordinator.port is not None or task.done(), what="the coordinator to listen")
        if task.done():
            task.result()
        try:
            yield Federation(coordinator, task)
        finally:
            coordinator.stop()
            await asyncio.wait_for(task, 30)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


class Peer:
    """A fake client speaking the protocol with codec.encode / decode over websockets."""

    def __init__(self, ws: ClientConnection, client_id: str) -> None:
        self.ws = ws
        self.client_id = client_id

    @classmethod
    async def join(cls, fed: Federation, client_id: str, **connect_args: Any) -> Peer:
        """Connect, say hello, and report the fingerprint that makes the client ready
        (eligible for a task), as the daemon does when it is in sync."""
        ws = await connect(fed.url, open_timeout=TIMEOUT_S, **connect_args)
        peer = cls(ws, client_id)
        assert isinstance(await peer.recv(), Challenge)
        await peer.send(hello(client_id))
        welcome = await peer.recv()
        assert isinstance(welcome, Welcome), welcome
        await peer.send(Fingerprint(round=welcome.last_committed_round, fingerprint=FINGERPRINT, table_digest=DIGEST))
        await poll(lambda: getattr(fed.coordinator.sessions.get(client_id), "round", -1) >= 0,
                   what=f"{client_id} to be ready")
        return peer

    async def send(self, message: Message | bytes | str) -> None:
        await self.ws.send(codec.encode(message) if isinstance(message, Message) else message)

    async def recv(self, timeout: float = TIMEOUT_S) -> Message:
        return codec.decode(await asyncio.wait_for(self.ws.recv(), timeout))

    async def expect(self, kind: type[Message], *, skip: tuple[type[Message], ...] = (RoundTask, RoundCommit),
                     timeout: float = TIMEOUT_S) -> Any:
        """The next message of ``kind``, passing over round traffic (``skip``) only."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(message, kind):
                return message
            assert isinstance(message, skip), f"{self.client_id}: expected {kind.__name__}, got {message}"

    async def closed(self, timeout: float = TIMEOUT_S) -> tuple[int | None, str | None]:
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.ws.close_code, self.ws.close_reason

    async def still_open(self) -> None:
        """The connection still works: a sync request is answered."""
        await self.send(SyncRequest(have_round=0))
        assert isinstance(await self.expect(SyncResponse), SyncResponse)


# ------------------------------------------------------ raw websocket framing (RFC 6455)


async def raw_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket opened by hand, so the test can write any frame header it likes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
    assert response.startswith(b"HTTP/1.1 101"), response
    return reader, writer


def client_frame(payload: bytes, *, opcode: int = 0x2, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame; ``length`` overrides the payload length the header declares."""
    declared = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if declared < 126:
        head += bytes([0x80 | declared])
    elif declared < 65536:
        head += bytes([0x80 | 126]) + declared.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + declared.to_bytes(8, "big")
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return head + mask + masked


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    first, second = await asyncio.wait_for(reader.readexactly(2), TIMEOUT_S)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, await reader.readexactly(length)


async def read_close_code(reader: asyncio.StreamReader) -> int:
    """Skip data frames up to the close frame; its status code."""
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")
        assert opcode in (0x1, 0x2, 0x9), opcode  # an Error message would be 0x2 (binary)


class Traced:
    """tracemalloc peak over a block, relative to what was allocated before it."""

    def __enter__(self) -> Traced:
        tracemalloc.start()
        self.base = tracemalloc.get_traced_memory()[0]
        self.peak = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = tracemalloc.get_traced_memory()[1] - self.base
        tracemalloc.stop()


# ------------------------------------------------------------------------ bad frames

GOODBYE = codec.encode(Goodbye(reason="bye"))
HEAD = b"\x82" + pack("type") + pack("goodbye") + pack("reason")  # a goodbye whose reason follows


def _hello_with_int_key_in_device() -> bytes:
    obj = wire(hello())
    obj["device"][1] = 2
    return pack(obj)


# (name, frame, error code, close code, what the error message says)
BAD_FRAMES: list[tuple[str, bytes | str, str, int, str]] = [
    ("garbage", bytes(range(256)), "malformed", 1007, "255 trailing bytes"),
    ("http in a frame", b"GET / HTTP/1.1\r\n\r\n", "malformed", 1007, "17 trailing bytes"),
    ("reserved byte 0xc1", b"\xc1", "malformed", 1007, "invalid msgpack byte 0xc1"),
    ("empty frame", b"", "malformed", 1007, "truncated"),
    ("truncated", GOODBYE[:-2], "malformed", 1007, "truncated"),
    ("truncated float", HEAD + b"\xcb\x00\x00", "malformed", 1007, "truncated"),
    ("trailing byte", GOODBYE + b"\x00", "malformed", 1007, "1 trailing bytes"),
    ("two messages in a frame", GOODBYE * 2, "malformed", 1007, "trailing bytes"),
    ("int map key", pack({"type": "goodbye", "reason": "x", 1: 2}), "malformed", 1007, "map key must be str, got int"),
    ("nil map key", b"\x81\xc0\x01", "malformed", 1007, "map key must be str, got nil"),
    ("array map key", b"\x81\x92\x01\x02\x01", "malformed", 1007, "map key must be str, got array"),
    ("map as map key", b"\x81\x81\xa1a\x01\x01", "malformed", 1007, "map key must be str, got map"),
    ("bin map key", pack({b"type": "goodbye"}), "malformed", 1007, "map key must be str, got bytes"),
    ("int key in a nested record", _hello_with_int_key_in_device(), "malformed", 1007,
     "map key must be str, got int"),
    ("duplicate map key", b"\x82" + pack("type") + pack("goodbye") + pack("type") + pack("goodbye"), "malformed",
     1007, "duplicate map key"),
    ("nested 9 levels", HEAD + b"\x91" * 8 + b"\x00", "malformed", 1007, "nested deeper than 8 levels"),
    ("nested 100,000 levels", b"\x91" * 100_000 + b"\x00", "malformed", 1007, "nested deeper than 8 levels"),
    ("fixext", HEAD + b"\xd4\x01\x00", "malformed", 1007, "extension types are not allowed"),
    ("ext8", HEAD + b"\xc7\x03\x05abc", "malformed", 1007, "extension types are not allowed"),
    ("timestamp ext", pack({"type": "goodbye", "reason": msgpack.Timestamp(0)}), "malformed", 1007,
     "extension types are not allowed"),
    ("ext32 claiming 2 GiB", HEAD + b"\xc9\x7f\xff\xff\xff\x05", "malformed", 1007,
     "extension types are not allowed"),
    ("str32 claiming 2 GiB", HEAD + b"\xdb\x7f\xff\xff\xff", "malformed", 1007, "str of 2147483647 bytes exceeds"),
    ("bin32 claiming 4 GiB", HEAD + b"\xc6\xff\xff\xff\xff", "malformed", 1007, "bin of 4294967295 bytes exceeds"),
    ("array32 claiming 2**32-1 items", HEAD + b"\xdd\xff\xff\xff\xff", "malformed", 1007,
     "array of 4294967295 items exceeds"),
    ("map32 claiming 2**32-1 keys", HEAD + b"\xdf\xff\xff\xff\xff", "malformed", 1007,
     "map of 4294967295 keys exceeds"),
    ("array16 claiming 65535 items, no body", HEAD + b"\xdc\xff\xff", "malformed", 1007, "truncated"),
    ("str16 claiming 2047 bytes, no body", HEAD + b"\xda\x07\xff", "malformed", 1007, "truncated"),
    ("nested arrays claiming 65535 items each", b"\xdc\xff\xff" * 1000, "malformed", 1007, "truncated"),
    ("invalid utf-8", HEAD + b"\xa2\xff\xfe", "malformed", 1007, "invalid UTF-8"),
    ("top level not a map", pack([1, 2, 3]), "malformed", 1007, "expected a map at the top level, got array"),
    ("65,536 empty maps", HEAD + b"\xdd\x00\x01\x00\x00" + b"\x80" * 65536, "malformed", 1007,
     "too many small values"),
    ("text frame", '{"type": "hello"}', "malformed", 1007, "text frames are not part of the protocol"),
    ("unknown type", pack({"type": "launch_missiles"}), "unknown_type", 1003, "launch_missiles"),
    ("type missing", pack({"reason": "x"}), "invalid_field", 1007, "type: missing"),
    ("type not a str", pack({"type": 7}), "invalid_field", 1007, "type: expected str, got int"),
]


async def _refused(peer: Peer, frame: bytes | str, code: str, close: int, text: str,
                   timeout: float = TIMEOUT_S) -> Error:
    await peer.send(frame)
    reply = await peer.expect(Error, skip=(), timeout=timeout)
    assert (reply.code, reply.round) == (code, None), reply
    assert text in reply.message, reply
    assert (reply.field is None) == (code != "invalid_field"), reply
    assert await peer.closed() == (close, code)
    return reply


@pytest.mark.parametrize("phase", ["handshake", "session"])
@pytest.mark.parametrize("name, frame, code, close, text", BAD_FRAMES, ids=[case[0] for case in BAD_FRAMES])
def test_bad_frames_get_an_error_naming_the_problem_then_the_fitting_close(
        tmp_path: Path, phase: str, name: str, frame: bytes | str, code: str, close: int, text: str) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            if phase == "handshake":  # in place of the hello
                peer = Peer(await connect(fed.url), "hostile")
                assert isinstance(await peer.recv(), Challenge)
            else:
                peer = await Peer.join(fed, "hostile")
            before = fed.rows()
            await _refused(peer, frame, code, close, text)
            await poll(lambda: "hostile" not in fed.coordinator.sessions, what="the session to go")
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


# (name, claim) — frames of at most a few dozen bytes whose headers claim gigabytes
CLAIMS = [
    ("str32 2 GiB", HEAD + b"\xdb\x7f\xff\xff\xff"),
    ("bin32 4 GiB", HEAD + b"\xc6\xff\xff\xff\xff"),
    ("array32 4G items", HEAD + b"\xdd\xff\xff\xff\xff"),
    ("map32 4G keys", HEAD + b"\xdf\xff\xff\xff\xff"),
    ("ext32 2 GiB", HEAD + b"\xc9\x7f\xff\xff\xff\x05"),
    ("array16 x3 nested", HEAD + b"\xdc\xff\xff" * 3),
]


@pytest.mark.parametrize("name, frame", CLAIMS, ids=[case[0] for case in CLAIMS])
def test_length_claims_of_gigabytes_allocate_nothing(tmp_path: Path, name: str, frame: bytes) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            peer = await Peer.join(fed, "hostile")
            before = fed.rows()
            assert len(frame) <= 32
            with Traced() as traced:
                await _refused(peer, frame, "malformed", 1007, "")
            # Client and coordinator together, for the whole exchange and close.
            assert traced.peak < 2 * 2**20, f"{traced.peak} bytes allocated"
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def test_a_frame_of_tiny_containers_costs_a_bounded_multiple_of_its_size(tmp_path: Path) -> None:
    """1 MiB of empty maps would unpack into ~80 MiB of dicts; it is refused by the scan."""
    count = 2**20 // 65537
    frame = HEAD + bytes([0x90 | count]) + (b"\xdd\x00\x01\x00\x00" + b"\x80" * 65536) * count

    async def body() -> None:
        async with federation(tmp_path) as fed:
            peer = await Peer.join(fed, "hostile")
            before = fed.rows()
            with Traced() as traced:
                # Under tracemalloc the scan runs several times slower (3-4 s on a quiet
                # 2-core machine): this test bounds memory, so time is given generously.
                await _refused(peer, frame, "malformed", 1007, "too many small values", timeout=30)
            assert fed.rows() == before
            # The frame itself is held by the client and the server's buffers (a few
            # copies of 1 MiB); unpacking it would have added ~80 MiB.
            assert traced.peak < 8 * 2**20, f"{traced.peak} bytes allocated"
            await fed.assert_serving()

    run(body)


# ----------------------------------------------------------------- oversize frames


def test_a_header_claiming_2_pib_is_closed_1009_without_reading_a_body(tmp_path: Path) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            before = fed.rows()
            reader, writer = await raw_open(fed.port)
            opcode, challenge = await read_frame(reader)
            assert opcode == 0x2 and isinstance(codec.decode(challenge), Challenge)
            with Traced() as traced:
                writer.write(client_frame(b"\x81\xa4type", length=2**51))  # 11 bytes of a 2 PiB frame
                await writer.drain()
                assert await read_close_code(reader) == 1009  # no error message before it
            assert traced.peak < 2 * 2**20, f"{traced.peak} bytes allocated"
            writer.close()
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def test_a_frame_one_byte_over_the_limit_is_closed_1009(tmp_path: Path) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            peer = await Peer.join(fed, "big")
            before = fed.rows()
            with contextlib.suppress(Exception):  # the coordinator may close while we still send
                await peer.send(b"\x00" * (limits.MAX_FRAME_BYTES + 1))
            assert (await peer.closed())[0] == 1009
            await poll(lambda: "big" not in fed.coordinator.sessions, what="the session to go")
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def test_a_frame_of_exactly_the_limit_is_decoded_not_cut(tmp_path: Path) -> None:
    frame = GOODBYE + b"\x00" * (limits.MAX_FRAME_BYTES - len(GOODBYE))

    async def body() -> None:
        async with federation(tmp_path) as fed:
            peer = await Peer.join(fed, "big")
            before = fed.rows()
            await _refused(peer, frame, "malformed", 1007, "trailing bytes")
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def test_fragments_adding_up_past_the_limit_are_closed_1009(tmp_path: Path) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            before = fed.rows()
            reader, writer = await raw_open(fed.port)
            await read_frame(reader)  # challenge
            chunk = b"\x00" * 2**20
            writer.write(client_frame(chunk, fin=False))
            for _ in range(4):  # 5 MiB in all, no fragment over 1 MiB
                writer.write(client_frame(chunk, opcode=0x0, fin=False))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            assert await read_close_code(reader) == 1009
            writer.close()
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def test_deflate_is_not_negotiated_and_a_compressed_frame_is_closed_1002(tmp_path: Path) -> None:
    """The coordinator serves without permessage-deflate: a client offering it gets no
    extension, and a frame flagged as compressed (RSV1), such as a deflate bomb, is a
    protocol error, closed 1002 without being inflated."""

    async def body() -> None:
        async with federation(tmp_path) as fed:
            peer = await Peer.join(fed, "offers-deflate", compression="deflate")
            assert peer.ws.protocol.extensions == []
            await peer.still_open()
            await fed.leave(peer)
            before = fed.rows()
            reader, writer = await raw_open(fed.port)
            assert isinstance(codec.decode((await read_frame(reader))[1]), Challenge)
            bomb = zlib.compressobj(wbits=-15)
            deflated = bomb.compress(b"\x00" * (5 * 2**20)) + bomb.flush(zlib.Z_SYNC_FLUSH)
            frame = client_frame(deflated[:-4])  # permessage-deflate drops the 00 00 ff ff tail
            writer.write(bytes([frame[0] | 0x40]) + frame[1:])  # RSV1: "this frame is compressed"
            assert await read_close_code(reader) == 1002
            writer.close()
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


# ------------------------------------------------------- wrong types and ranges


def _update_wire(**changes: Any) -> bytes:
    obj = wire(update("hostile", 1, (5, 6)))
    for key, value in changes.items():
        if value is KeyError:
            del obj[key]
        else:
            obj[key] = value
    return pack(obj)


NAN, INF = float("nan"), float("inf")

# (name, frame, the error's field)
FIELD_CASES: list[tuple[str, bytes, str]] = [
    ("seed as a string", _update_wire(pairs=[["5", 0.5]]), "update.pairs[0][0]"),
    ("coefficient as a list", _update_wire(pairs=[[5, [0.5]]]), "update.pairs[0][1]"),
    ("coefficient as a map", _update_wire(pairs=[[5, {"x": 1}]]), "update.pairs[0][1]"),
    ("coefficient as bytes", _update_wire(pairs=[[5, b"\x00" * 8]]), "update.pairs[0][1]"),
    ("bool for a seed", _update_wire(pairs=[[True, 0.5]]), "update.pairs[0][0]"),
    ("bool for a coefficient", _update_wire(pairs=[[5, False]]), "update.pairs[0][1]"),
    ("bool for the round", _update_wire(round=True), "update.round"),
    ("bool for num_examples", _update_wire(num_examples=True), "update.num_examples"),
    ("float for the round", _update_wire(round=1.0), "update.round"),
    ("float for a seed", _update_wire(pairs=[[5.0, 0.5]]), "update.pairs[0][0]"),
    ("seed 2**63", _update_wire(pairs=[[2**63, 0.5]]), "update.pairs[0][0]"),
    ("seed 2**64-1", _update_wire(pairs=[[5, 0.5], [2**64 - 1, 0.5]]), "update.pairs[1][0]"),
    ("seed -1", _update_wire(pairs=[[-1, 0.5]]), "update.pairs[0][0]"),
    ("seed -2**63", _update_wire(pairs=[[-(2**63), 0.5]]), "update.pairs[0][0]"),
    ("a seed twice in one update", _update_wire(pairs=[[5, 0.5], [6, 0.5], [5, 0.5]]), "update.pairs[2][0]"),
    ("a pair of one", _update_wire(pairs=[[5]]), "update.pairs[0]"),
    ("a pair of three", _update_wire(pairs=[[5, 0.5, 1]]), "update.pairs[0]"),
    ("no pairs", _update_wire(pairs=[]), "update.pairs"),
    ("4,097 pairs", _update_wire(pairs=[[seed, 0.5] for seed in range(4097)]), "update.pairs"),
    ("num_examples 0", _update_wire(num_examples=0), "update.num_examples"),
    ("num_examples -1", _update_wire(num_examples=-1), "update.num_examples"),
    ("num_examples 10**9+1", _update_wire(num_examples=10**9 + 1), "update.num_examples"),
    ("num_examples 2**64-1", _update_wire(num_examples=2**64 - 1), "update.num_examples"),
    ("num_examples 1e9 as a float", _update_wire(num_examples=1e9), "update.num_examples"),
    ("NaN coefficient", _update_wire(pairs=[[5, NAN]]), "update.pairs[0][1]"),
    ("+inf coefficient", _update_wire(pairs=[[5, 0.5], [6, INF]]), "update.pairs[1][1]"),
    ("-inf coefficient", _update_wire(pairs=[[5, -INF]]), "update.pairs[0][1]"),
    ("NaN loss_before", _update_wire(loss_before=NAN), "update.loss_before"),
    ("+inf loss_after", _update_wire(loss_after=INF), "update.loss_after"),
    ("-inf loss_before", _update_wire(loss_before=-INF), "update.loss_before"),
    ("round 0", _update_wire(round=0), "update.round"),
    ("round 2**53", _update_wire(round=2**53), "update.round"),
    ("attempt -1", _update_wire(attempt=-1), "update.attempt"),
    ("client_id of 65 characters", _update_wire(client_id="a" * 65), "update.client_id"),
    ("client_id with a slash", _update_wire(client_id="../etc"), "update.client_id"),
    ("nonce nil", _update_wire(nonce=None), "update.nonce"),
    ("nonce as a str", _update_wire(nonce="n" * 16), "update.nonce"),
    ("nonce of 15 bytes", _update_wire(nonce=b"n" * 15), "update.nonce"),
    ("missing field", _update_wire(loss_after=KeyError), "update.loss_after"),
    ("unknown field", _update_wire(bonus=1), "update.bonus"),
    ("fingerprint not hex", pack({"type": "fingerprint", "round": 0, "fingerprint": "XYZ", "table_digest": DIGEST}),
     "fingerprint.fingerprint"),
    ("fingerprint round negative", pack({"type": "fingerprint", "round": -1, "fingerprint": FINGERPRINT,
                                         "table_digest": DIGEST}), "fingerprint.round"),
    ("have_round as a string", pack({"type": "sync_request", "have_round": "3"}), "sync_request.have_round"),
    ("have_round 2**53", pack({"type": "sync_request", "have_round": 2**53}), "sync_request.have_round"),
    ("goodbye reason of 513 characters", pack({"type": "goodbye", "reason": "x" * 513}), "goodbye.reason"),
]


@pytest.mark.parametrize("name, frame, path", FIELD_CASES, ids=[case[0] for case in FIELD_CASES])
def test_wrong_types_and_ranges_are_refused_naming_the_field(
        tmp_path: Path, name: str, frame: bytes, path: str) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            peer = await Peer.join(fed, "hostile")
            before = fed.rows()
            reply = await _refused(peer, frame, "invalid_field", 1007, path)
            assert reply.field == path
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def _hello_wire(path: tuple[str, ...], value: Any) -> bytes:
    obj = wire(hello("newcomer"))
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return pack(obj)


HELLO_CASES: list[tuple[str, bytes, str]] = [
    ("negative memory", _hello_wire(("device", "host_total_bytes"), -1), "hello.device.host_total_bytes"),
    ("unknown device type", _hello_wire(("device", "device_type"), "tpu"), "hello.device.device_type"),
    ("device as a list", _hello_wire(("device",), [1, 2]), "hello.device"),
    ("bool last_round", _hello_wire(("last_round",), True), "hello.last_round"),
    ("empty client_id", _hello_wire(("client_id",), ""), "hello.client_id"),
    ("uppercase model hash", _hello_wire(("model_hash",), HASH.upper()), "hello.model_hash"),
    ("plan of 513 characters", _hello_wire(("plan",), "p" * 513), "hello.plan"),
    ("public key of 31 bytes", _hello_wire(("public_key",), b"k" * 31), "hello.public_key"),
    ("version of one number", _hello_wire(("protocol_version",), [1]), "hello.protocol_version"),
    ("version as strings", _hello_wire(("protocol_version",), ["1", "0"]), "hello.protocol_version[0]"),
    ("version minor 65536", _hello_wire(("protocol_version",), [1, 65536]), "hello.protocol_version[1]"),
    ("version of bools", _hello_wire(("protocol_version",), [True, False]), "hello.protocol_version[0]"),
]


@pytest.mark.parametrize("name, frame, path", HELLO_CASES, ids=[case[0] for case in HELLO_CASES])
def test_a_malformed_hello_is_refused_naming_the_field(tmp_path: Path, name: str, frame: bytes, path: str) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            before = fed.rows()
            peer = Peer(await connect(fed.url), "newcomer")
            assert isinstance(await peer.recv(), Challenge)
            reply = await _refused(peer, frame, "invalid_field", 1007, path)
            assert reply.field == path
            assert fed.rows() == before and fed.coordinator.sessions == {}
            await fed.assert_serving()

    run(body)


# ------------------------------------------------------------ versions and types


@pytest.mark.parametrize("version", [(0, 9), (1, 0), (3, 0), (65535, 65535)])
def test_an_unknown_major_version_is_rejected_then_closed_1002(tmp_path: Path, version: tuple[int, int]) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            before = fed.rows()
            peer = Peer(await connect(fed.url), "future")
            assert isinstance(await peer.recv(), Challenge)
            await peer.send(hello("future", version=version))
            reply = await peer.recv()
            assert isinstance(reply, Reject) and reply.code == "version" and reply.supported_versions == ((2, 1),)
            assert f"{version[0]}.{version[1]}" in reply.message
            assert (await peer.closed())[0] == 1002
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def test_an_unknown_minor_version_is_welcomed(tmp_path: Path) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            peer = Peer(await connect(fed.url), "newer")
            assert isinstance(await peer.recv(), Challenge)
            await peer.send(hello("newer", version=(2, 65535)))
            assert isinstance(await peer.recv(), Welcome)
            await peer.ws.close()

    run(body)


def test_a_first_frame_that_is_not_a_hello_is_rejected(tmp_path: Path) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            before = fed.rows()
            peer = Peer(await connect(fed.url), "rude")
            assert isinstance(await peer.recv(), Challenge)
            await peer.send(update("rude", 1, (5, 6)))
            reply = await peer.recv()
            assert isinstance(reply, Reject) and reply.code == "bad_hello"
            assert await peer.closed() == (1008, "expected hello")
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def test_coordinator_only_types_get_unexpected_and_the_connection_stays_open(tmp_path: Path) -> None:
    async def body() -> None:
        async with federation(tmp_path) as fed:
            peer = await Peer.join(fed, "confused")
            before = fed.rows()
            for message in (
                hello("confused"),
                Welcome(client_id="confused", federation=fed.coordinator.federation, last_committed_round=0),
                Error(code="malformed", message="you first", field=None, round=None),
                UpdateAck(round=1, attempt=0, status="accepted"),
                RoundCommit(round=1, attempt=0, coefficients=(), totals=(), table_digest=DIGEST, num_updates=1),
            ):
                await peer.send(message)
                reply = await peer.expect(Error, skip=())
                assert (reply.code, reply.field) == ("unexpected", "type") and message.TYPE in reply.message
            await peer.still_open()
            assert fed.rows() == before
            await peer.ws.close()

    run(body)


# ----------------------------------------------------------------- update refusals


def test_updates_outside_the_open_round_are_refused_and_resends_are_idempotent(tmp_path: Path) -> None:
    """One round played with three fake clients, two of them assigned, and every kind of
    misdirected update thrown at it. Only the two good updates reach the ledger."""
    learning_rate, clip = 1e-3, 1000.0

    async def body() -> None:
        async with federation(tmp_path, min_clients=3, clients_per_round=2, quorum=2, deadline_s=30,
                              learning_rate=learning_rate, aggregation_clip=clip) as fed:
            coordinator = fed.coordinator
            peers = {"a": await Peer.join(fed, "a")}

            async def refused(peer: Peer, message: Update | bytes, code: str, field: str | None,
                              round_number: int) -> None:
                await peer.send(message)
                reply = await peer.expect(Error)
                assert (reply.code, reply.field, reply.round) == (code, field, round_number), reply

            # No round is open yet.
            await refused(peers["a"], update("a", 1, (5, 6, 7)), "round_not_open", "update.round", 1)
            peers["b"] = await Peer.join(fed, "b")
            peers["c"] = await Peer.join(fed, "c")
            await poll(lambda: coordinator.machine is not None, what="round 1 to open")
            machine = coordinator.machine
            assert machine is not None
            x, y = (peers[cid] for cid in sorted(machine.assigned))
            (z,) = (peer for cid, peer in peers.items() if cid not in machine.assigned)
            task = await x.expect(RoundTask)
            assert (await y.expect(RoundTask)).seeds == task.seeds
            seeds = task.seeds
            foreign = next(seed for seed in range(1000) if seed not in seeds)

            await refused(x, update(x.client_id, 2, seeds), "round_not_open", "update.round", 2)
            await refused(x, update(x.client_id, 1, seeds, attempt=1), "round_not_open", "update.round", 1)
            await refused(x, update(y.client_id, 1, seeds), "wrong_client", "update.client_id", 1)
            await refused(x, update(x.client_id, 1, seeds[:-1] + (foreign,)), "wrong_seeds", "update.pairs", 1)
            await refused(x, update(x.client_id, 1, seeds[::-1]), "wrong_seeds", "update.pairs", 1)
            await refused(x, update(x.client_id, 1, seeds[:-1]), "wrong_seeds", "update.pairs", 1)
            # Finite but absurd losses: two of them would overflow the round's loss mean.
            await refused(x, update(x.client_id, 1, seeds, loss_before=1e308), "invalid_field", "update.loss_before", 1)
            await refused(y, update(y.client_id, 1, seeds, loss_after=-1e300), "invalid_field", "update.loss_after", 1)
            await refused(z, update(z.client_id, 1, seeds), "not_assigned", "update.client_id", 1)

            # A huge (finite) gradient is taken, then clipped by the aggregation rule.
            good_x = update(x.client_id, 1, seeds, gradient=1e308 / 3)
            await x.send(good_x)
            assert (await x.expect(UpdateAck)).status == "accepted"
            for _ in range(2):  # the same update again: the same acknowledgement, nothing counted twice
                await x.send(good_x)
                assert (await x.expect(UpdateAck)).status == "duplicate"
            await refused(x, update(x.client_id, 1, seeds, gradient=0.25), "conflicting_update", None, 1)

            good_y = update(y.client_id, 1, seeds, gradient=0.25)
            await y.send(good_y)
            assert (await y.expect(UpdateAck)).status == "accepted"
            commits = [await peer.expect(RoundCommit) for peer in peers.values()]
            assert {commit.round for commit in commits} == {1}
            bound = learning_rate * clip * (1 + 1e-6)
            assert all(abs(coefficient) <= bound for _, coefficient in commits[0].coefficients)

            # Round 1 is committed: a newcomer's update is late, a resend is still a duplicate.
            await refused(z, update(z.client_id, 1, seeds), "round_closed", None, 1)
            await x.send(good_x)
            assert (await x.expect(UpdateAck)).status == "duplicate"

            ledger = coordinator.ledger
            assert ledger.last_round() == 1
            contributions = {c.client_id: c for c in ledger.contributions(1)}
            assert sorted(contributions) == sorted([x.client_id, y.client_id])
            for good in (good_x, good_y):
                stored = contributions[good.client_id]
                assert (stored.pairs, stored.loss_before, stored.loss_after, stored.num_examples) == (
                    good.pairs, good.loss_before, good.loss_after, good.num_examples)
            assert fed.rows()["rounds"] == 1 and fed.rows()["contributions"] == 2

            # Once round 2 is open, round 1 updates are stale.
            for peer in peers.values():
                await peer.send(Fingerprint(round=1, fingerprint=FINGERPRINT, table_digest=DIGEST))
            await poll(lambda: coordinator.machine is not None and coordinator.machine.round == 2,
                       what="round 2 to open")
            await refused(x, update(x.client_id, 1, seeds), "stale_round", "update.round", 1)
            for peer in peers.values():
                await peer.still_open()
            assert fed.rows()["contributions"] == 2
            await fed.assert_serving()
            await fed.leave(*peers.values())

    run(body)


def test_a_packed_update_is_paired_with_the_senders_seeds_or_refused_at_its_field(tmp_path: Path) -> None:
    """Protocol 2.1's packed update on a live coordinator: the wrong number of values,
    or another client's id, is refused at a ``packed_update.`` field; a good one is
    acknowledged (a resend as a duplicate) and reaches the ledger as the task's seeds
    paired with its decoded values."""

    async def body() -> None:
        async with federation(tmp_path, min_clients=2, clients_per_round=2, quorum=2, deadline_s=30) as fed:
            coordinator = fed.coordinator
            peers = [await Peer.join(fed, name) for name in ("a", "b")]
            tasks = [await peer.expect(RoundTask) for peer in peers]
            x, y = peers
            seeds = tasks[1].seeds
            scale, values = pack_values([0.5 * (i + 1) for i in range(len(seeds))], "q8")

            def packed(client_id: str, data: bytes) -> PackedUpdate:
                return PackedUpdate(round=1, attempt=0, client_id=client_id, encoding="q8", scale=scale,
                                    values=data, num_examples=10, loss_before=2.0, loss_after=1.9,
                                    nonce=b"p" * 16, signature=None)

            for message, code, field in (
                    (packed("b", values[:-1]), "wrong_seeds", "packed_update.values"),
                    (packed("b", values + b"\x01"), "wrong_seeds", "packed_update.values"),
                    (packed("a", values), "wrong_client", "packed_update.client_id")):
                await y.send(message)
                reply = await y.expect(Error)
                assert (reply.code, reply.field, reply.round) == (code, field, 1), reply
            good = packed("b", values)
            await y.send(good)
            assert (await y.expect(UpdateAck)).status == "accepted"
            await y.send(good)
            assert (await y.expect(UpdateAck)).status == "duplicate"
            await x.send(update("a", 1, tasks[0].seeds))
            assert (await x.expect(UpdateAck)).status == "accepted"
            await x.expect(RoundCommit)
            stored = {c.client_id: c for c in coordinator.ledger.contributions(1)}["b"]
            assert stored.pairs == tuple(zip(seeds, good.decoded()))
            await fed.leave(*peers)

    run(body)


# --------------------------------------------------------------- connection abuse


def test_an_upgrade_dribbled_one_byte_at_a_time_is_dropped_at_the_open_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    open_timeout, every = 2.0, 1.0  # a byte a second: the ~160-byte request would take minutes
    monkeypatch.setattr(server_module, "OPEN_TIMEOUT_S", open_timeout)

    async def body() -> None:
        async with federation(tmp_path) as fed:
            before = fed.rows()
            reader, writer = await asyncio.open_connection("127.0.0.1", fed.port)
            request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{fed.port}\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n").encode()
            start = time.monotonic()
            dropped = asyncio.ensure_future(reader.read(1))
            sent = 0
            while not dropped.done() and time.monotonic() - start < open_timeout + 3:
                with contextlib.suppress(ConnectionError):
                    writer.write(request[sent:sent + 1])
                    await writer.drain()
                sent += 1
                await asyncio.wait({dropped}, timeout=every)
            elapsed = time.monotonic() - start
            assert dropped.done(), "still connected"
            with contextlib.suppress(ConnectionError):
                assert dropped.result() == b""
            assert open_timeout - 0.1 <= elapsed <= open_timeout + every + 0.5, elapsed
            assert sent < len(request)
            writer.close()
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def test_a_client_that_never_says_hello_is_closed_1008(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "HANDSHAKE_TIMEOUT_S", 0.3)

    async def body() -> None:
        async with federation(tmp_path) as fed:
            before = fed.rows()
            peer = Peer(await connect(fed.url), "mute")
            assert isinstance(await peer.recv(), Challenge)
            assert await peer.closed() == (1008, "no hello")
            assert fed.rows() == before
            await fed.assert_serving()

    run(body)


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


async def _open_idle_connections(port: int, count: int, *, upgrade: bool) -> list[socket.socket]:
    """``count`` TCP connections to the coordinator that never read; with ``upgrade``
    each sends a websocket upgrade request (and gets its challenge, unread), else nothing."""
    loop = asyncio.get_running_loop()
    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    sockets: list[socket.socket] = []

    async def one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sockets.append(sock)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        if upgrade:
            with contextlib.suppress(ConnectionError):
                await loop.sock_sendall(sock, request)

    for start in range(0, count, 100):  # in batches, so the accept queue keeps up
        await asyncio.gather(*(one() for _ in range(min(100, count - start))))
        await asyncio.sleep(0)
    return sockets


def _dropped(sock: socket.socket) -> bool:
    """The coordinator reset or closed it (pending data, such as a challenge, is drained)."""
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize("kind", ["tcp", "websocket"])
@pytest.mark.parametrize("cap", ["default", "above"])
def test_5000_idle_connections_are_capped_or_held_and_a_legitimate_client_still_gets_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: str, kind: str) -> None:
    """5,000 connections from 127.0.0.1 that never read: bare TCP, or upgraded to a
    websocket that never says hello. With the default caps the coordinator keeps
    max_connections_per_address (config) of them, dropping the oldest as newer ones come;
    with both caps (per address, in handshake) above 5,000 it holds them all. Either way
    a fresh client gets its challenge within 1 s (from 127.0.0.2 while 127.0.0.1 is at
    its cap)."""
    limit = _raise_fd_limit()
    count = min(5000, (limit - 256) // 2)  # each connection is two descriptors in this process
    assert count >= 1000, f"file descriptor limit {limit} is too low for this test"
    defaults = FederationConfig(model_hash=HASH)
    per_address = count + 100 if cap == "above" else defaults.max_connections_per_address
    in_handshake = count + 100 if cap == "above" else defaults.max_connections_in_handshake
    expected_held = min(count, per_address, in_handshake)
    assert expected_held < count or cap == "above"

    async def body() -> None:
        async with federation(tmp_path, max_connections_per_address=per_address,
                              max_connections_in_handshake=in_handshake) as fed:
            before = _open_descriptors()
            sockets = await _open_idle_connections(fed.port, count, upgrade=kind == "websocket")
            try:
                # What the coordinator holds is one descriptor per connection it accepted.
                await poll(lambda: _open_descriptors() - before == count + expected_held, timeout=20,
                           what=f"the coordinator to hold {expected_held} connections")
                await poll(lambda: sum(not _dropped(s) for s in sockets) == expected_held, timeout=5,
                           what="the connections over the cap to be reset")
                if kind == "websocket":  # all of those held were upgraded and sent their challenge
                    server = fed.coordinator._server
                    assert server is not None
                    await poll(lambda: len(server.connections) == expected_held, timeout=20,
                               what=f"{expected_held} open websockets")
                await fed.assert_serving(local_host="127.0.0.2" if cap == "default" else None)
                assert fed.rows()["clients"] == 0
            finally:
                for sock in sockets:
                    sock.close()
            # Once they are gone, 127.0.0.1 may connect again.
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                try:
                    await fed.assert_serving()
                    break
                except (OSError, TimeoutError, AssertionError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)

    run(body)


def test_a_dead_peer_is_dropped_by_pings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "PING_INTERVAL_S", 0.2)
    monkeypatch.setattr(server_module, "PING_TIMEOUT_S", 0.3)
    monkeypatch.setattr(server_module, "CLOSE_TIMEOUT_S", 0.3)

    async def body() -> None:
        async with federation(tmp_path) as fed:
            dead = await Peer.join(fed, "dead")
            alive = await Peer.join(fed, "alive")
            dead.ws.transport.pause_reading()  # it reads nothing more: pings go unanswered
            start = time.monotonic()
            await poll(lambda: "dead" not in fed.coordinator.sessions, timeout=3, what="the dead peer to go")
            assert time.monotonic() - start < 0.2 + 0.3 + 0.3 + 1.0
            assert "alive" in fed.coordinator.sessions  # it answers pings
            await alive.still_open()
            await fed.assert_serving()
            dead.ws.transport.abort()
            await alive.ws.close()

    run(body)


async def _small_window_socket(port: int) -> socket.socket:
    """A connected socket with a tiny receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


def _slow_link(fed: Federation, client_id: str) -> None:
    """Shrink the coordinator's kernel send buffer towards ``client_id`` (as on a slow
    link): once that client stops reading, the coordinator's writes back up after a few
    KiB instead of the ~4 MiB loopback allows."""
    transport = fed.coordinator.sessions[client_id].connection.transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def _join_on_a_small_window(fed: Federation, client_id: str) -> Peer:
    sock = await _small_window_socket(fed.port)
    peer = Peer(await connect(fed.url, sock=sock, compression=None, open_timeout=TIMEOUT_S), client_id)
    assert isinstance(await peer.recv(), Challenge)
    await peer.send(hello(client_id))
    assert isinstance(await peer.recv(), Welcome)
    _slow_link(fed, client_id)
    return peer


def test_a_client_that_never_reads_is_dropped_without_stalling_the_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients a, b, c train round 1 (4,096 seeds: a ~160 KB commit); c stops reading
    before the commit. a, b and a fourth client d get the commit and round 2's task at
    once, not after the send timeout, and c is dropped."""
    send_timeout = 2.0
    monkeypatch.setattr(server_module, "SEND_TIMEOUT_S", send_timeout)
    monkeypatch.setattr(server_module, "CLOSE_TIMEOUT_S", 0.5)

    async def body() -> None:
        async with federation(tmp_path, min_clients=3, clients_per_round=3, quorum=2, deadline_s=30,
                              seed_pool_size=8192, local_steps=4096, rebase_every=1) as fed:
            a = await Peer.join(fed, "a")
            b = await Peer.join(fed, "b")
            c = await _join_on_a_small_window(fed, "c")
            await c.send(Fingerprint(round=0, fingerprint=FINGERPRINT, table_digest=DIGEST))
            seeds = [(await peer.expect(RoundTask, timeout=10)).seeds for peer in (a, b, c)][0]
            assert len(seeds) == 4096
            d = await Peer.join(fed, "d")  # ready for round 2
            await c.send(update("c", 1, seeds))
            assert (await c.expect(UpdateAck)).status == "accepted"
            c.ws.transport.pause_reading()
            for peer in (a, b):
                await peer.send(update(peer.client_id, 1, seeds))
                assert (await peer.expect(UpdateAck)).status == "accepted"
            for peer in (a, b, d):
                assert (await peer.expect(RoundCommit, skip=())).round == 1
            committed = time.monotonic()
            for peer in (a, b, d):
                await peer.send(Fingerprint(round=1, fingerprint=FINGERPRINT, table_digest=DIGEST))
            for peer in (a, b, d):
                task = await peer.expect(RoundTask, skip=(), timeout=send_timeout + 3)
                assert task.round == 2
            assert time.monotonic() - committed < send_timeout / 2, "round 2 waited for the client that does not read"
            await poll(lambda: "c" not in fed.coordinator.sessions, timeout=send_timeout + 3,
                       what="the client that does not read to be dropped")
            assert time.monotonic() - committed < send_timeout + 0.5 + 1.0
            assert fed.rows()["contributions"] == 3  # its update was good; only its reading was not
            await fed.assert_serving()
            c.ws.transport.abort()
            await fed.leave(a, b, d)

    run(body)


def test_a_client_that_asks_without_reading_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends sync requests and reads none of the answers: its handler times
    out on the send and drops it (before, the handler and the keepalive ping both waited
    on the full buffer forever, so the connection was never closed)."""
    monkeypatch.setattr(server_module, "SEND_TIMEOUT_S", 0.5)
    monkeypatch.setattr(server_module, "CLOSE_TIMEOUT_S", 0.5)

    async def body() -> None:
        async with federation(tmp_path) as fed:
            other = await Peer.join(fed, "other")
            greedy = await _join_on_a_small_window(fed, "greedy")
            greedy.ws.transport.pause_reading()
            request = codec.encode(SyncRequest(have_round=0))
            start = time.monotonic()
            with contextlib.suppress(Exception):
                for _ in range(2000):  # ~200 KB of answers
                    await greedy.ws.send(request)
            await poll(lambda: "greedy" not in fed.coordinator.sessions, timeout=5,
                       what="the client that does not read to be dropped")
            assert time.monotonic() - start < 0.5 + 0.5 + 2.0
            await other.still_open()
            await fed.assert_serving()
            greedy.ws.transport.abort()
            await fed.leave(other)

    run(body)
