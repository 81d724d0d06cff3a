"""The coordinator's page, its feed, /metrics and the read token, over real HTTP and
websockets on 127.0.0.1 (the page in a real browser: test_dashboard_browser.py)."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from coordinator.allowlist import Allowlist
from coordinator.config import ConfigError, FederationConfig
from edge_client.daemon import ClientConfig, EdgeClient
from protocol import codec
from protocol.messages import Challenge, DeviceProfile, Error, Fingerprint, Hello, Reject, Update, Welcome
from tests.harness import Tiny, client_status, coordinator, make_tiny, until, write_data

NO_MODEL = Tiny(Path("."), "cd" * 32)  # for tests whose clients never load a model
TOKEN = "read-token-0123456789abcdef"
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>'
DEVICE = DeviceProfile(device_type="cpu", device_name="test", accelerator_total_bytes=0, accelerator_free_bytes=0,
                       host_total_bytes=1 << 30, host_free_bytes=1 << 29, memory_budget_bytes=None)


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def aget(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(get, port, path, headers)


def metrics(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics body, by (name, labels), read with prometheus-client's parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


async def raw_hello(url: str, **fields: Any) -> tuple[Any, Any]:
    """Say a hello built from ``fields`` (raw msgpack: it may break the protocol's rules);
    returns the open connection and the reply."""
    ws = await connect(url, compression=None)
    challenge = codec.decode(await ws.recv())
    assert isinstance(challenge, Challenge)
    hello = {"type": "hello", "protocol_version": [2, 0], "client_id": "c1",
             "device": {"device_type": "cpu", "device_name": "test", "accelerator_total_bytes": 0,
                        "accelerator_free_bytes": 0, "host_total_bytes": 1 << 30, "host_free_bytes": 1 << 29,
                        "memory_budget_bytes": None},
             "mode": "observe", "model_hash": NO_MODEL.model_hash, "last_round": 0, "table_digest": None,
             "plan": None, "public_key": None, "signature": None}
    for key, value in fields.items():
        if key in hello["device"]:
            hello["device"][key] = value
        else:
            hello[key] = value
    await ws.send(msgpack.packb(hello))
    return ws, codec.decode(await ws.recv())


def start_clients(tmp_path: Path, tiny: Tiny, url: str) -> tuple[list[EdgeClient], EdgeClient, list[Any]]:
    """Two tiny-model training clients and an observer that reports a held-out loss of
    ``3 - round / 4`` each round (as edgefed-eval reports its own), running in this loop."""
    clients = [EdgeClient(ClientConfig(url=url, client_id=name, model=str(tiny.directory), device="cpu",
                                       data_path=str(write_data(tmp_path / f"{name}.jsonl", 12, i * 12)),
                                       copies="memory", cache_dir=str(tmp_path / "cache")))
               for i, name in enumerate(("alpha", "beta"))]
    observer = EdgeClient(ClientConfig(url=url, client_id="evaluator", data_path=None, model=str(tiny.directory),
                                       mode="observe", cache_dir=str(tmp_path / "cache")))
    observer.on_round = lambda round_number: 3.0 - round_number / 4
    for client in (*clients, observer):
        client.prepare()
    return clients, observer, [asyncio.create_task(client.run()) for client in (*clients, observer)]


def test_the_page_is_served_with_a_policy_that_runs_only_its_own_script(tmp_path):
    async def body() -> None:
        async with coordinator(tmp_path, NO_MODEL) as server:
            status, headers, page = await aget(server.port, "/")
            assert status == 200 and headers["Content-Type"].startswith("text/html")
            policy = headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe" not in policy
            assert b'src="dashboard.js"' in page and b"<script>" not in page  # no inline script to allow
            for asset, kind in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
                status, headers, content = await aget(server.port, asset)
                assert status == 200 and headers["Content-Type"].startswith(kind) and content
            # The page shares "/" with the clients: a websocket upgrade there is still a client's.
            ws, reply = await raw_hello(f"ws://127.0.0.1:{server.port}/", client_id="watcher")
            assert isinstance(reply, Welcome)
            await ws.close()

    asyncio.run(body())


def test_the_feed_pushes_a_snapshot_on_connect_and_on_every_change(tmp_path):
    async def body() -> None:
        async with coordinator(tmp_path, NO_MODEL) as server:
            async with connect(f"ws://127.0.0.1:{server.port}/live") as page:
                first = json.loads(await asyncio.wait_for(page.recv(), 5))
                assert first["round"] == 0 and first["clients"] == [] and first["history"] == []
                assert first["config"]["federation_id"] == server.config.federation_id
                assert "read_token" not in first["config"] and "pool_key" not in first["config"]
                assert first["ledger"]["head_round"] == 0 and len(first["ledger"]["table_digest"]) == 64
                ws, _ = await raw_hello(f"ws://127.0.0.1:{server.port}", client_id="watcher", plan="p")
                # A change is pushed at once, well within the heartbeat.
                pushed = json.loads(await asyncio.wait_for(page.recv(), 2))
                assert [c["client_id"] for c in pushed["clients"]] == ["watcher"]
                assert server.dashboard.viewers == 1
                await ws.close()
            await until(lambda: server.dashboard.viewers == 0, "the page's connection to end", 10)

    asyncio.run(body())


def test_a_read_token_guards_the_page_status_metrics_and_feed_but_not_the_clients(tmp_path):
    async def body() -> None:
        async with coordinator(tmp_path, NO_MODEL, read_token=TOKEN) as server:
            port = server.port
            for path in ("/", "/status", "/metrics"):
                status, headers, _ = await aget(port, path)
                assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
                assert (await aget(port, f"{path}?token=wrong-token-0123456789"))[0] == 401, path
                assert (await aget(port, f"{path}?token={TOKEN}"))[0] == 200, path
                assert (await aget(port, path, {"Authorization": f"Bearer {TOKEN}"}))[0] == 200, path
            assert (await aget(port, "/dashboard.js"))[0] == 200  # code, no data
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{port}/live")
            assert refused.value.response.status_code == 401
            async with connect(f"ws://127.0.0.1:{port}/live?token={TOKEN}") as page:
                assert json.loads(await asyncio.wait_for(page.recv(), 5))["round"] == 0
            ws, reply = await raw_hello(f"ws://127.0.0.1:{port}", client_id="watcher")  # no token: a client
            assert isinstance(reply, Welcome)
            await ws.close()

    asyncio.run(body())


def test_allow_list_mode_makes_up_a_read_token_when_none_is_configured(tmp_path):
    async def body() -> None:
        async with coordinator(tmp_path, NO_MODEL, allow=Allowlist()) as server:
            assert server.read_token is not None and len(server.read_token) >= 16
            assert server.page_url().endswith(f"/?token={server.read_token}")
            assert (await aget(server.port, "/status"))[0] == 401
            assert (await aget(server.port, f"/status?token={server.read_token}"))[0] == 200

    asyncio.run(body())
    with pytest.raises(ConfigError, match="read_token"):
        FederationConfig(model_hash=NO_MODEL.model_hash, read_token="short")


def test_the_feed_refuses_another_sites_page(tmp_path):
    async def body() -> None:
        async with coordinator(tmp_path, NO_MODEL) as server:
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{server.port}/live", origin="http://evil.example")
            assert refused.value.response.status_code == 403
            async with connect(f"ws://127.0.0.1:{server.port}/live",
                               origin=f"http://127.0.0.1:{server.port}") as page:  # its own page
                assert json.loads(await asyncio.wait_for(page.recv(), 5))["round"] == 0

    asyncio.run(body())


def test_a_client_id_carrying_markup_is_refused_and_never_shown(tmp_path):
    """Client ids are [A-Za-z0-9_.-] (PROTOCOL.md §3.2): markup in one is refused in the
    hello, so no page or /status ever holds it. Free-text fields do reach the page as
    they were sent: the page writes them as text (test_dashboard_browser.py)."""
    async def body() -> None:
        async with coordinator(tmp_path, NO_MODEL) as server:
            ws, reply = await raw_hello(f"ws://127.0.0.1:{server.port}", client_id=HOSTILE)
            assert isinstance(reply, (Reject, Error)), reply
            await ws.close()
            ws, reply = await raw_hello(f"ws://127.0.0.1:{server.port}", client_id="fine", plan=HOSTILE,
                                        device_name=HOSTILE)
            assert isinstance(reply, Welcome)
            status = json.loads((await aget(server.port, "/status"))[2])
            assert [c["client_id"] for c in status["clients"]] == ["fine"]
            assert status["clients"][0]["plan"] == HOSTILE  # JSON carries it; the page must escape it
            await ws.close()

    asyncio.run(body())


def test_metrics_parse_and_count_refusals_by_reason(tmp_path):
    async def body() -> None:
        async with coordinator(tmp_path, NO_MODEL) as server:
            ws, _ = await raw_hello(f"ws://127.0.0.1:{server.port}", client_id="eager", mode="mezo")
            for _ in range(2):  # no round is open
                await ws.send(codec.encode(Update(round=1, attempt=0, client_id="eager", pairs=((5, 1.0),),
                                                  num_examples=1, loss_before=2.0, loss_after=1.9,
                                                  nonce=os.urandom(16), signature=None)))
                error = codec.decode(await ws.recv())
                assert isinstance(error, Error) and error.code == "round_not_open"
            samples = metrics((await aget(server.port, "/metrics"))[2])
            assert samples[("edgefed_updates_refused_total", (("reason", "round_not_open"),))] == 2
            assert samples[("edgefed_clients_connected", (("kind", "training"),))] == 1
            assert samples[("edgefed_committed_round", ())] == 0
            assert samples[("edgefed_wire_bytes_total", (("direction", "in"),))] > 0
            assert client_status(server, "eager")["refusals"] == {"round_not_open": 2}
            await ws.close()

    asyncio.run(body())


def test_metrics_and_the_page_follow_real_rounds_and_an_evaluators_loss(tmp_path):
    """Two tiny-model clients train; an observer reports a held-out loss each round."""
    tiny = make_tiny(tmp_path / "tiny")

    async def body() -> None:
        # Unbounded rounds: a finished coordinator says goodbye and its sessions are gone.
        # commit_wait_s: after a commit the next round waits for every fingerprint.
        async with coordinator(tmp_path, tiny, rounds=0, min_clients=2, clients_per_round=2, quorum=2,
                               commit_wait_s=30) as server:
            url = f"ws://127.0.0.1:{server.port}"
            clients, observer, running = start_clients(tmp_path, tiny, url)
            snapshots: list[dict[str, Any]] = []

            def at_round_two() -> bool:  # everyone holds round 2 and the observer's loss for it is in
                if not (len(server.sessions) == 3 and all(s.round == 2 for s in server.sessions.values())
                        and 2 in server._eval_losses):
                    return False
                snapshots.append(server.snapshot())  # now, before round 3 moves anyone on
                return True

            await until(at_round_two, "round 2 held by everyone, with its eval loss")
            snapshot = snapshots[0]
            assert [entry["round"] for entry in snapshot["history"]] == [1, 2]
            assert [entry["eval_loss"] for entry in snapshot["history"]] == [2.75, 2.5]
            assert all(entry["wire_bytes_up"] > 0 and entry["loss_after"] is not None for entry in snapshot["history"])
            assert snapshot["ledger"]["table_digest"] == server.ledger.rounds_between(1, 2)[-1].table_digest
            assert {c["client_id"]: c["agrees"] for c in snapshot["clients"]} == {
                "alpha": True, "beta": True, "evaluator": True}
            samples = metrics((await aget(server.port, "/metrics"))[2])
            committed = samples[("edgefed_rounds_committed_total", ())]
            assert committed >= 2 and samples[("edgefed_updates_accepted_total", ())] >= 2 * committed
            assert samples[("edgefed_round_duration_seconds_count", ())] == committed
            assert samples[("edgefed_ledger_commit_seconds_count", ())] == committed
            assert samples[("edgefed_clients_connected", (("kind", "observer"),))] == 1
            assert samples[("edgefed_clients_connected", (("kind", "training"),))] == 2
            for client in (*clients, observer):
                client.stop()
            await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 60)

    asyncio.run(body())


def test_an_eval_loss_is_taken_from_observers_only(tmp_path):
    async def body() -> None:
        async with coordinator(tmp_path, NO_MODEL) as server:
            url = f"ws://127.0.0.1:{server.port}"
            trainer, _ = await raw_hello(url, client_id="trainer", mode="mezo")
            watcher, _ = await raw_hello(url, client_id="watcher", mode="observe")
            digest = "0" * 64
            for ws, loss in ((trainer, 9.0), (watcher, 1.25)):
                await ws.send(codec.encode(Fingerprint(round=0, fingerprint="a" * 64, table_digest=digest,
                                                       eval_loss=loss)))
            await until(lambda: 0 in server._eval_losses, "the observer's report", 10)
            assert server._eval_losses == {0: {"watcher": 1.25}}
            await trainer.close()
            await watcher.close()

    asyncio.run(body())
