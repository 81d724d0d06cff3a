"""The bytes /status reports are the bytes on the socket (issue #15, item 7).

Clients here are websockets written by hand over plain TCP sockets, so each counts
exactly what it writes to and reads from its socket, and knows where each frame starts.
The coordinator's figures must equal theirs: per client (both directions) and per round,
where round r owns the bytes between the coordinator's commit of round r-1 and its
commit of round r (the commit frame of r-1 and the fingerprint that answers it included).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coordinator import server as server_module
from coordinator.config import FederationConfig
from coordinator.ledger import Ledger
from coordinator.server import Coordinator
from protocol import codec
from protocol.messages import (
    Challenge,
    DeviceProfile,
    Fingerprint,
    Hello,
    Message,
    RoundCommit,
    RoundTask,
    Update,
    UpdateAck,
    Welcome,
)

HASH = "cd" * 32
FINGERPRINT = "11" * 32
DIGEST = "00" * 32
DEVICE = DeviceProfile(device_type="cpu", device_name="test", accelerator_total_bytes=0, accelerator_free_bytes=0,
                       host_total_bytes=1 << 30, host_free_bytes=1 << 29, memory_budget_bytes=None)
TIMEOUT_S = 10.0


@dataclass
class RawClient:
    """A protocol client on a hand-written websocket that counts its socket's bytes."""

    client_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: int = 0
    received: int = 0
    # round -> (bytes received before that round's commit frame began, bytes sent by then)
    at_commit: dict[int, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    async def connect(cls, port: int, client_id: str) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(client_id, reader, writer)
        key = base64.b64encode(os.urandom(16)).decode()
        client._write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
        client.received += len(response)
        assert response.startswith(b"HTTP/1.1 101"), response
        assert b"permessage-deflate" not in response.lower(), "the coordinator accepted compression"
        return client

    def _write(self, data: bytes) -> None:
        self.sent += len(data)
        self.writer.write(data)

    async def _read(self, count: int) -> bytes:
        data = await asyncio.wait_for(self.reader.readexactly(count), TIMEOUT_S)
        self.received += len(data)
        return data

    def send_frame(self, payload: bytes, opcode: int = 0x2) -> None:
        mask = os.urandom(4)
        head = bytes([0x80 | opcode])
        if len(payload) < 126:
            head += bytes([0x80 | len(payload)])
        elif len(payload) < 65536:
            head += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + len(payload).to_bytes(8, "big")
        self._write(head + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload)))

    def send(self, message: Message) -> None:
        self.send_frame(codec.encode(message))

    async def recv(self) -> Message:
        """The next message; pings are answered on the way. A commit's position in the
        byte streams is noted before its frame is read."""
        while True:
            received_before, sent_before = self.received, self.sent
            first, second = await self._read(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(await self._read(2), "big")
            elif length == 127:
                length = int.from_bytes(await self._read(8), "big")
            payload = await self._read(length)
            opcode = first & 0x0F
            if opcode == 0x9:
                self.send_frame(payload, opcode=0xA)
                continue
            assert opcode == 0x2, f"{self.client_id}: unexpected opcode {opcode}"
            message = codec.decode(payload)
            if isinstance(message, RoundCommit):
                self.at_commit[message.round] = (received_before, sent_before)
            return message

    async def expect(self, kind: type[Message]) -> Any:
        message = await self.recv()
        assert isinstance(message, kind), f"{self.client_id}: expected {kind.__name__}, got {message}"
        return message

    def round_bytes(self, round_number: int) -> tuple[int, int]:
        """(sent, received) on this socket that belong to ``round_number``."""
        received_end, sent_end = self.at_commit[round_number]
        received_start, sent_start = self.at_commit.get(round_number - 1, (0, 0))
        return sent_end - sent_start, received_end - received_start

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def hello(client_id: str) -> Hello:
    return Hello(protocol_version=(2, 0), client_id=client_id, device=DEVICE, mode="mezo", model_hash=HASH,
                 last_round=0, table_digest=None, plan="mezo, batch 4: fits", public_key=None, signature=None)


async def join(port: int, client_id: str) -> RawClient:
    client = await RawClient.connect(port, client_id)
    await client.expect(Challenge)
    client.send(hello(client_id))
    welcome = await client.expect(Welcome)
    client.send(Fingerprint(round=welcome.last_committed_round, fingerprint=FINGERPRINT, table_digest=DIGEST))
    return client


async def train(client: RawClient, round_number: int, gradient: float) -> None:
    """Take the round's task, send an update, read the ack and the commit, report the fingerprint."""
    task = await client.expect(RoundTask)
    assert task.round == round_number
    client.send(Update(round=round_number, attempt=task.attempt, client_id=client.client_id,
                       pairs=tuple((seed, gradient * (index + 1)) for index, seed in enumerate(task.seeds)),
                       num_examples=8, loss_before=2.0, loss_after=1.9, nonce=os.urandom(16), signature=None))
    assert (await client.expect(UpdateAck)).status == "accepted"
    assert (await client.expect(RoundCommit)).round == round_number
    client.send(Fingerprint(round=round_number, fingerprint=FINGERPRINT, table_digest=DIGEST))


def get_status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        status: dict[str, Any] = json.loads(response.read())
    return status


async def run_federation(tmp_path: Path, names: list[str], rounds: int, **overrides: Any
                         ) -> tuple[list[RawClient], dict[str, Any], Coordinator]:
    """Clients ``names`` train ``rounds`` rounds; returns them, the coordinator's /status
    once all is quiet, and the coordinator (stopped)."""
    settings: dict[str, Any] = dict(model_hash=HASH, port=0, ledger_path=str(tmp_path / "ledger.db"),
                                    rounds=rounds + 1, min_clients=len(names), clients_per_round=len(names),
                                    pool_key=7, seed_pool_size=64, local_steps=5, deadline_s=30)
    config = FederationConfig(**{**settings, **overrides})
    with Ledger(config.ledger_path) as ledger:
        coordinator = Coordinator(config, ledger)
        runner = asyncio.create_task(coordinator.run())
        while coordinator.port is None:
            await asyncio.sleep(0.01)
        port = coordinator.port
        clients = [await join(port, name) for name in names]
        try:
            for round_number in range(1, rounds + 1):
                await asyncio.gather(*(train(c, round_number, 0.5 + i) for i, c in enumerate(clients)))
            # The next round's task is the last frame; once every client has read it and
            # the coordinator has every fingerprint, nothing more moves on these sockets.
            for client in clients:
                assert (await client.expect(RoundTask)).round == rounds + 1
            status = await asyncio.to_thread(get_status, port)
        finally:
            for client in clients:
                await client.close()
            coordinator.stop()
            await runner
    return clients, status, coordinator


def test_status_counts_the_bytes_each_client_put_on_and_took_off_its_socket_per_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "PING_INTERVAL_S", 3600.0)  # no keepalive traffic in the counts
    names, rounds = ["a", "b", "c"], 3
    clients, status, _ = asyncio.run(run_federation(tmp_path, names, rounds))

    by_id = {c["client_id"]: c for c in status["clients"]}
    for client in clients:
        entry = by_id[client.client_id]
        assert (entry["wire_bytes_up"], entry["wire_bytes_down"]) == (client.sent, client.received)
        per_round = [sum(client.round_bytes(r)) for r in range(1, rounds + 1)]
        assert entry["wire_bytes_per_round"] == pytest.approx(sum(per_round) / rounds)
        assert "bytes_received" not in entry and "bytes_per_round" not in entry
    measured = {entry["round"]: entry for entry in status["rounds"]}
    for round_number in range(1, rounds + 1):
        up = sum(client.round_bytes(round_number)[0] for client in clients)
        down = sum(client.round_bytes(round_number)[1] for client in clients)
        assert (measured[round_number]["wire_bytes_up"], measured[round_number]["wire_bytes_down"]) == (up, down)
        assert (measured[round_number]["values_min"], measured[round_number]["robust"]) == (3, True)
    # Round 1 carries the handshakes.
    assert measured[1]["wire_bytes_up"] > measured[2]["wire_bytes_up"]
    assert status["aggregation"] == {"method": "trimmed_mean", "robust_min_values": 3, "quorum": 3}


def test_a_round_committed_on_two_updates_under_a_robust_method_is_flagged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two clients connected, three asked for per round: each round commits on two
    values per seed, so the trimmed mean fell back; /status and the log say so."""
    with caplog.at_level(logging.WARNING, logger="coordinator.server"):
        _, status, coordinator = asyncio.run(run_federation(tmp_path, ["a", "b"], 2, clients_per_round=3))
    flags = [(entry["round"], entry["values_min"], entry["robust"]) for entry in status["rounds"]]
    assert flags[-2:] == [(1, 2, False), (2, 2, False)]
    warned = [r.getMessage() for r in caplog.records if "committed with only" in r.getMessage()]
    assert warned == [f"round {r} committed with only 2 values for some seed; the robust method 'trimmed_mean' "
                      "needs 3, so this round used the clipped unweighted mean" for r in (1, 2)]
    # A coordinator started later on the same ledger did not see those rounds: unknown.
    with Ledger(coordinator.config.ledger_path) as ledger:
        restarted = Coordinator(coordinator.config, ledger).status()
    assert {(e["wire_bytes_up"], e["wire_bytes_down"], e["values_min"], e["robust"])
            for e in restarted["rounds"] if e["round"] >= 1} == {(None, None, None, None)}


def test_the_plain_mean_is_never_flagged_as_robust(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="coordinator.server"):
        _, status, _ = asyncio.run(run_federation(tmp_path, ["a", "b", "c"], 1, aggregation="mean"))
    assert [(e["values_min"], e["robust"]) for e in status["rounds"] if e["round"] == 1] == [(3, False)]
    assert not any("committed with only" in r.getMessage() for r in caplog.records)
    assert status["aggregation"] == {"method": "mean", "robust_min_values": 3, "quorum": 2}
