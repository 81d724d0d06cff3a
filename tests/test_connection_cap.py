"""Connection caps that idle connections cannot turn against honest clients (issue #15, item 23).

Many devices can share one address behind a NAT, so an address whose cap is full of
connections that never said hello must still let a fresh client in: the coordinator drops
the oldest silent connection to make room. Across all addresses, the connections that
have not said hello are capped too, so an attacker rotating through addresses (an IPv6
prefix) cannot exhaust the process; at that cap too the oldest silent one makes room.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage

from coordinator.config import FederationConfig
from coordinator.ledger import Ledger
from coordinator.server import Coordinator
from protocol import codec
from protocol.messages import (
    Challenge,
    DeviceProfile,
    Fingerprint,
    Hello,
    RoundCommit,
    RoundTask,
    Update,
    UpdateAck,
    Welcome,
)

HASH = "cd" * 32
DEVICE = DeviceProfile(device_type="cpu", device_name="test", accelerator_total_bytes=0, accelerator_free_bytes=0,
                       host_total_bytes=1 << 30, host_free_bytes=1 << 29, memory_budget_bytes=None)
TIMEOUT_S = 5.0


@contextlib.asynccontextmanager
async def coordinator(tmp_path: Path, **overrides: Any) -> AsyncIterator[Coordinator]:
    """A coordinator on 127.0.0.1 that runs a round as soon as one client is ready."""
    settings: dict[str, Any] = dict(model_hash=HASH, port=0, ledger_path=str(tmp_path / "ledger.db"), rounds=0,
                                    min_clients=1, clients_per_round=1, pool_key=3, seed_pool_size=64,
                                    local_steps=3, deadline_s=30)
    config = FederationConfig(**{**settings, **overrides})
    with Ledger(config.ledger_path) as ledger:
        server = Coordinator(config, ledger)
        runner = asyncio.create_task(server.run())
        while server.port is None:
            assert not runner.done(), runner
            await asyncio.sleep(0.01)
        try:
            yield server
        finally:
            server.stop()
            await asyncio.wait_for(runner, 30)


class Idle:
    """A websocket upgraded from ``source`` that reads its challenge and then says nothing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str) -> Idle:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
        assert response.startswith(b"HTTP/1.1 101"), response
        head = await asyncio.wait_for(reader.readexactly(2), TIMEOUT_S)  # the challenge frame
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        assert isinstance(codec.decode(await reader.readexactly(length)), Challenge)
        return cls(reader, writer)

    async def dropped(self, timeout: float = 0.3) -> bool:
        """The coordinator closed or reset it (it sends nothing else to an idle connection)."""
        try:
            return await asyncio.wait_for(self.reader.read(1), timeout) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


async def fill(port: int, sources: list[str], count: int) -> list[Idle]:
    """``count`` idle connections, from ``sources`` in turn, opened one after another."""
    return [await Idle.open(port, sources[index % len(sources)]) for index in range(count)]


async def which_dropped(idle: list[Idle]) -> list[bool]:
    return list(await asyncio.gather(*(connection.dropped() for connection in idle)))


async def hello_and_one_round(port: int, client_id: str, source: str) -> int:
    """A fresh client from ``source`` says hello and trains a round; the round it trained."""
    async with connect(f"ws://127.0.0.1:{port}", local_addr=(source, 0), open_timeout=TIMEOUT_S,
                       compression=None) as ws:
        async def recv() -> Any:
            return codec.decode(await asyncio.wait_for(ws.recv(), TIMEOUT_S))

        assert isinstance(await recv(), Challenge)
        await ws.send(codec.encode(Hello(protocol_version=(2, 0), client_id=client_id, device=DEVICE, mode="mezo",
                                         model_hash=HASH, last_round=0, table_digest=None, plan=None,
                                         public_key=None, signature=None)))
        welcome = await recv()
        assert isinstance(welcome, Welcome), welcome
        await ws.send(codec.encode(Fingerprint(round=welcome.last_committed_round, fingerprint="11" * 32,
                                               table_digest="00" * 32)))
        task = await recv()
        assert isinstance(task, RoundTask), task
        await ws.send(codec.encode(Update(round=task.round, attempt=task.attempt, client_id=client_id,
                                          pairs=tuple((seed, 0.5) for seed in task.seeds), num_examples=4,
                                          loss_before=2.0, loss_after=1.9, nonce=os.urandom(16), signature=None)))
        assert isinstance(await recv(), UpdateAck)
        commit = await recv()
        assert isinstance(commit, RoundCommit) and commit.round == task.round
        return commit.round


def test_a_fresh_client_gets_in_and_trains_where_its_address_is_full_of_idle_connections(tmp_path: Path) -> None:
    cap = 6

    async def body() -> None:
        async with coordinator(tmp_path, max_connections_per_address=cap) as server:
            assert server.port is not None
            idle = await fill(server.port, ["127.0.0.1"], cap)
            try:
                assert server.gate.open_from("127.0.0.1") == cap
                assert await hello_and_one_round(server.port, "behind-the-nat", "127.0.0.1") == 1
                assert server.ledger.last_round() == 1
                # The connection that had waited longest for its hello made room; the rest stay.
                assert await which_dropped(idle) == [True] + [False] * (cap - 1)
            finally:
                for connection in idle:
                    connection.close()

    asyncio.run(body())


def test_an_address_whose_connections_all_said_hello_is_refused_a_new_one(tmp_path: Path) -> None:
    """Only connections that have not said hello make room: welcomed clients are never
    dropped for a newcomer."""

    async def body() -> None:
        async with coordinator(tmp_path, max_connections_per_address=2, min_clients=100) as server:
            url = f"ws://127.0.0.1:{server.port}"
            clients = []
            for name in ("one", "two"):
                ws = await connect(url, compression=None, open_timeout=TIMEOUT_S)
                await ws.recv()
                await ws.send(codec.encode(Hello(protocol_version=(2, 0), client_id=name, device=DEVICE,
                                                 mode="mezo", model_hash=HASH, last_round=0, table_digest=None,
                                                 plan=None, public_key=None, signature=None)))
                assert isinstance(codec.decode(await ws.recv()), Welcome)
                clients.append(ws)
            try:
                with pytest.raises((OSError, InvalidMessage)):  # reset at accept: no upgrade
                    async with connect(url, compression=None, open_timeout=TIMEOUT_S) as ws:
                        await asyncio.wait_for(ws.recv(), TIMEOUT_S)
                assert set(server.sessions) == {"one", "two"}
            finally:
                for ws in clients:
                    await ws.close()

    asyncio.run(body())


def test_connections_waiting_for_their_hello_are_capped_across_addresses(tmp_path: Path) -> None:
    """Idle connections from many addresses, each under its own cap: the coordinator holds
    at most max_connections_in_handshake of them, dropping the oldest, and a fresh client
    from yet another address still says hello and trains."""
    cap, sources = 5, [f"127.0.9.{i}" for i in range(1, 5)]

    async def body() -> None:
        async with coordinator(tmp_path, max_connections_in_handshake=cap) as server:
            assert server.port is not None
            idle = await fill(server.port, sources, 2 * cap)
            try:
                assert server.gate.waiting == cap
                assert await which_dropped(idle) == [True] * cap + [False] * cap
                assert await hello_and_one_round(server.port, "fresh", "127.0.10.1") == 1
                # Its hello took it out of the waiting; it pushed out one more idle connection.
                assert server.gate.waiting == cap - 1
                assert (await which_dropped(idle)).count(False) == cap - 1
            finally:
                for connection in idle:
                    connection.close()

    asyncio.run(body())
