"""The coordinator over real websockets on 127.0.0.1: handshake, refusals, status."""

import asyncio
import json
import urllib.request

import msgpack
import pytest
from websockets.asyncio.client import connect

from coordinator.config import FederationConfig
from coordinator.ledger import Ledger
from coordinator.server import Coordinator
from protocol import codec
from protocol.messages import Challenge, DeviceProfile, Error, Hello, Reject, SyncRequest, SyncResponse, Welcome

HASH = "cd" * 32
DEVICE = DeviceProfile(device_type="cpu", device_name="test", accelerator_total_bytes=0, accelerator_free_bytes=0,
                       host_total_bytes=1 << 30, host_free_bytes=1 << 29, memory_budget_bytes=None)


def hello(client_id="c1", version=(2, 0), model_hash=HASH):
    return Hello(protocol_version=version, client_id=client_id, device=DEVICE, mode="mezo", model_hash=model_hash,
                 last_round=0, table_digest=None, plan=None, public_key=None, signature=None)


async def with_coordinator(tmp_path, body, **overrides):
    config = FederationConfig(model_hash=HASH, port=0, ledger_path=str(tmp_path / "l.db"), rounds=1,
                              min_clients=5, **overrides)
    with Ledger(config.ledger_path) as ledger:
        coordinator = Coordinator(config, ledger)
        task = asyncio.create_task(coordinator.run())
        while coordinator.port is None:
            await asyncio.sleep(0.01)
        try:
            await body(coordinator, f"ws://127.0.0.1:{coordinator.port}")
        finally:
            coordinator.stop()
            await task


async def handshake(url, message):
    async with connect(url) as ws:
        challenge = codec.decode(await ws.recv())
        assert isinstance(challenge, Challenge) and len(challenge.server_nonce) >= 16
        await ws.send(codec.encode(message) if not isinstance(message, bytes) else message)
        reply = codec.decode(await ws.recv())
        await ws.wait_closed()
        return reply, ws.close_code


def test_welcome_then_sync_of_an_empty_ledger(tmp_path):
    async def body(coordinator, url):
        async with connect(url) as ws:
            codec.decode(await ws.recv())
            await ws.send(codec.encode(hello()))
            welcome = codec.decode(await ws.recv())
            assert isinstance(welcome, Welcome)
            assert welcome.federation.model_hash == HASH and welcome.last_committed_round == 0
            await ws.send(codec.encode(SyncRequest(have_round=0)))
            sync = codec.decode(await ws.recv())
            assert isinstance(sync, SyncResponse) and sync.target_round == 0 and sync.table == ()
            status = await asyncio.to_thread(
                lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{coordinator.port}/status").read()))
            assert status["round"] == 0 and [c["client_id"] for c in status["clients"]] == ["c1"]

    asyncio.run(with_coordinator(tmp_path, body))


@pytest.mark.parametrize(
    "message, code, close",
    [
        (hello(version=(3, 0)), "version", 1002),
        (hello(model_hash="ef" * 32), "model_mismatch", 1008),
    ],
)
def test_hello_refusals_are_explicit_rejects(tmp_path, message, code, close):
    async def body(coordinator, url):
        reply, close_code = await handshake(url, message)
        assert isinstance(reply, Reject) and reply.code == code
        assert close_code == close

    asyncio.run(with_coordinator(tmp_path, body))


@pytest.mark.parametrize(
    "frame, code, close",
    [
        (b"\xc1garbage", "malformed", 1007),
        (msgpack.packb({"type": "hello", "client_id": 3}), "invalid_field", 1007),
        (msgpack.packb({"type": "launch_missiles"}), "unknown_type", 1003),
        (msgpack.packb({"type": "hello"}) + b"\x00", "malformed", 1007),
    ],
)
def test_bad_frames_get_an_error_naming_the_problem_then_close(tmp_path, frame, code, close):
    async def body(coordinator, url):
        reply, close_code = await handshake(url, frame)
        assert isinstance(reply, Error) and reply.code == code, reply
        assert close_code == close
        assert coordinator.ledger.last_round() == 0

    asyncio.run(with_coordinator(tmp_path, body))


def test_invalid_field_error_names_the_field(tmp_path):
    bad = codec.encode(hello())
    fields = msgpack.unpackb(bad)
    fields["last_round"] = -1
    async def body(coordinator, url):
        reply, _ = await handshake(url, msgpack.packb(fields))
        assert isinstance(reply, Error) and reply.field is not None and "last_round" in reply.field

    asyncio.run(with_coordinator(tmp_path, body))


def test_a_fingerprint_outlier_is_flagged_left_out_and_told_to_resync(tmp_path):
    from protocol.messages import Fingerprint

    async def body(coordinator, url):
        sockets = {}
        for name in ("a", "b", "c"):
            ws = await connect(url).__aenter__()
            codec.decode(await ws.recv())
            await ws.send(codec.encode(hello(name)))
            assert isinstance(codec.decode(await ws.recv()), Welcome)
            sockets[name] = ws
        digest = "00" * 32
        for name, value in (("a", "11" * 32), ("b", "11" * 32), ("c", "22" * 32)):
            await sockets[name].send(codec.encode(Fingerprint(round=0, fingerprint=value, table_digest=digest)))
        told = codec.decode(await asyncio.wait_for(sockets["c"].recv(), 5))
        assert isinstance(told, Error) and told.code == "fingerprint_mismatch" and told.round == 0
        flagged = {s.client_id: s.flagged for s in coordinator.sessions.values()}
        assert flagged == {"a": False, "b": False, "c": True}
        assert [s.client_id for s in coordinator._ready_clients()] == ["a", "b"]
        await sockets["c"].send(codec.encode(Fingerprint(round=0, fingerprint="11" * 32, table_digest=digest)))
        await asyncio.sleep(0.2)
        assert not coordinator.sessions["c"].flagged  # a matching report clears the flag
        for ws in sockets.values():
            await ws.close()

    asyncio.run(with_coordinator(tmp_path, body))


def test_a_future_major_version_with_a_different_hello_still_gets_a_version_reject(tmp_path):
    future_hello = msgpack.packb({"type": "hello", "protocol_version": [3, 1], "identity": {"key": b"x"}})

    async def body(coordinator, url):
        reply, close_code = await handshake(url, future_hello)
        assert isinstance(reply, Reject) and reply.code == "version"
        assert reply.supported_versions == ((2, 1),)
        assert close_code == 1002

    asyncio.run(with_coordinator(tmp_path, body))


@pytest.mark.parametrize("modes, blocks, why", [
    ({}, (), "does not offer cyclic block updates"),
    ({"fedcybgd": {"blocks": 4, "seeds": 2}}, (7, 9), "none of the federation's blocks"),
])
def test_a_block_client_the_federation_cannot_serve_is_refused_in_its_hello(tmp_path, modes, blocks, why):
    import dataclasses

    async def body(coordinator, url):
        message = dataclasses.replace(hello(), mode="fedcybgd", blocks=blocks)
        reply, close_code = await handshake(url, message)
        assert isinstance(reply, Reject) and reply.code == "bad_hello" and why in reply.message
        assert close_code == 1008
        async with connect(url) as ws:  # one block it holds is enough
            codec.decode(await ws.recv())
            await ws.send(codec.encode(dataclasses.replace(message, client_id="c2", blocks=(3, 7))))
            served = codec.decode(await ws.recv())
        assert isinstance(served, Welcome) == bool(modes)

    asyncio.run(with_coordinator(tmp_path, body, scope="lora", seed_pool_size=64, local_steps=2, modes=modes))
