"""The client daemon against real coordinators (issue #15).

* The plan ``edgefed-client --plan`` prints is the plan the daemon runs, round-start
  copies included.
* An update's ``num_examples`` is what the engine's scalars were computed from this
  round, not the client's dataset size.
* The client offers no permessage-deflate, even to a server that would take it.
* A client SIGKILLed mid-run leaves no round-start copy in the cache once it restarts,
  and the copies of live processes are never removed.

The coordinator runs in this test's event loop (coordinator.server.Coordinator on
127.0.0.1:0); the daemon runs in it too, except where it has to be SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from edge_client import cli
from edge_client.daemon import ClientConfig, EdgeClient
from edge_client.engines import LocalUpdate
from profiles.chooser import TrainingTask, choose, estimate_mode, policy_entry
from profiles.estimator import ModelShape
from protocol.messages import PackedUpdate, RoundTask, Update

from harness import TIMEOUT_S, Tiny, client_status, coordinator, make_tiny, until, write_data  # noqa: E402, I001

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


# ----------------------------------------------------------------------- the plan


def test_the_plan_printed_is_the_plan_the_daemon_runs(tmp_path: Path, tiny: Tiny,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """On a CPU client that keeps its copies in memory, the base copy and the round-start
    snapshot count against the budget. At a budget where they cost the batch, --plan used
    to print the batch without them while the daemon ran a smaller one."""
    batch, seq_len, rebase_every = 4, 64, 3
    shape = ModelShape.from_hf_config(json.loads((tiny.directory / "config.json").read_text()))
    task = TrainingTask(scope="full", batch_size=batch, max_seq_len=seq_len)
    # Just enough for a batch of 2 and two float32 copies of the model.
    budget = estimate_mode(policy_entry("mezo"), shape, task, 2).total + 2 * shape.param_count * 4
    assert choose(shape, task, budget_bytes=budget, headroom=0.0, policy=[policy_entry("mezo")]).batch == batch  # without them

    def printed_plan(copies: str) -> str:
        assert cli.main(["--plan", "--model", str(tiny.directory), "--device", "cpu", "--memory-budget", str(budget),
                         "--memory-headroom", "0", "--batch", str(batch), "--seq-len", str(seq_len),
                         "--rebase-every", str(rebase_every), "--copies", copies]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: ")]
        assert len(lines) == 1, lines
        return lines[0].removeprefix("plan: ")

    in_memory, in_file = printed_plan("memory"), printed_plan("file")
    assert f"batch {batch}/{batch} " in in_file  # file copies cost no budget: the whole batch
    assert f"batch {batch}/{batch} " not in in_memory

    seen: dict[str, Any] = {}

    async def body() -> None:
        async with coordinator(tmp_path, tiny, batch_size=batch, max_seq_len=seq_len,
                               rebase_every=rebase_every) as server:
            client = EdgeClient(ClientConfig(
                url=f"ws://127.0.0.1:{server.port}", client_id="alpha",
                data_path=str(write_data(tmp_path / "alpha.jsonl", 20)), model=str(tiny.directory), device="cpu",
                copies="memory", memory_budget_bytes=budget, memory_headroom=0.0, cache_dir=str(tmp_path / "cache")))
            client.prepare()
            running = asyncio.create_task(client.run())
            await until(lambda: (client_status(server, "alpha") or {}).get("plan") is not None or running.done(),
                        "alpha's hello")
            seen["status_plan"] = (client_status(server, "alpha") or {}).get("plan")
            await asyncio.wait_for(running, TIMEOUT_S)  # the one round, then goodbye
            seen["choice"], seen["micro_batch"] = client.choice, client.engine.settings.micro_batch
            seen["rounds_trained"] = client.rounds_trained

    asyncio.run(body())
    assert seen["status_plan"] == in_memory  # what it told the coordinator
    assert seen["choice"].explanation == in_memory
    assert seen["micro_batch"] == seen["choice"].batch < batch  # and what it trained with
    assert seen["rounds_trained"] == 1


# ------------------------------------------------------------------ num_examples


class RecordingClient(EdgeClient):
    """Keeps each engine result the daemon turns into an update."""

    def __init__(self, config: ClientConfig) -> None:
        super().__init__(config)
        self.results: list[LocalUpdate] = []

    def _make_update(self, task: RoundTask, result: LocalUpdate, encoding: str = "pairs") -> Update | PackedUpdate:
        self.results.append(result)
        return super()._make_update(task, result, encoding)


def test_an_update_carries_the_examples_its_scalars_came_from_not_the_dataset_size(tmp_path: Path,
                                                                                 tiny: Tiny) -> None:
    local_steps, batch_size, records = 3, 2, 40
    client_holder: list[RecordingClient] = []

    async def body() -> None:
        async with coordinator(tmp_path, tiny, rounds=2, local_steps=local_steps,
                               batch_size=batch_size) as server:
            client = RecordingClient(ClientConfig(
                url=f"ws://127.0.0.1:{server.port}", client_id="alpha",
                data_path=str(write_data(tmp_path / "alpha.jsonl", records)), model=str(tiny.directory),
                device="cpu", copies="memory", memory_budget_bytes=4 << 30, cache_dir=str(tmp_path / "cache"),
                mode="mezo"))  # one batch per seed (ferret's count is its local steps x batch)
            client_holder.append(client)
            client.prepare()
            await asyncio.wait_for(client.run(), TIMEOUT_S)

    asyncio.run(body())
    client = client_holder[0]
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        stored = db.execute("SELECT round, client_id, num_examples FROM contributions ORDER BY round").fetchall()
    assert stored == [(r + 1, "alpha", result.num_examples) for r, result in enumerate(client.results)]
    assert len(stored) == 2
    # local steps x batch, the examples the round's scalars came from; not the 40 records
    assert {row[2] for row in stored} == {local_steps * batch_size}


def test_an_engine_count_outside_the_protocol_range_fails_the_round_not_the_codec() -> None:
    from edge_client.engines import EngineError

    for bad in (0, -1, 10**9 + 1, True, 2.0):
        with pytest.raises(EngineError, match="num_examples"):
            LocalUpdate(pairs=((1, 0.5),), num_examples=bad, loss_before=1.0, loss_after=1.0, seconds=0.1)


# --------------------------------------------------------------- no compression


def test_the_client_offers_no_compression_to_a_server_that_would_accept_it() -> None:
    async def body() -> tuple[list[str | None], list[str | None]]:
        offered: list[str | None] = []
        accepted: list[str | None] = []

        async def handler(connection: ServerConnection) -> None:
            offered.append(connection.request.headers.get("Sec-WebSocket-Extensions"))
            accepted.append(connection.response.headers.get("Sec-WebSocket-Extensions"))
            await connection.wait_closed()

        # websockets' default: permessage-deflate, accepted whenever a client offers it
        async with serve(handler, "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            async with connect(url):  # a default client: the server does negotiate deflate
                await until(lambda: len(accepted) == 1, "the control connection")
            client = EdgeClient(ClientConfig(url=url, client_id="alpha", data_path=None, mode="observe"))
            running = asyncio.create_task(client.run())
            await until(lambda: len(accepted) == 2, "the client's connection", 30)
            client.stop()
            await asyncio.wait_for(running, 30)
        return offered, accepted

    offered, accepted = asyncio.run(body())
    assert offered[0] is not None and "permessage-deflate" in accepted[0]
    assert offered[1] is None and accepted[1] is None


# ------------------------------------------------------------- round-start copies


def copy_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []


def mapped_copies(pid: int, directory: Path) -> list[str]:
    """The files under ``directory`` that process ``pid`` has mapped (Linux)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split(None, 5)[5] for line in maps.splitlines()
                   if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith(str(directory))})


@pytest.mark.integration
def test_a_sigkilled_client_leaves_no_round_start_copy_once_it_restarts(tmp_path: Path, tiny: Tiny) -> None:
    """A CPU full-scope client keeps its base copy and round-start snapshot in files under
    the cache. SIGKILLed, it never runs its cleanup; restarted, no file of the dead process
    is left in the cache, while another live process's copy is kept."""
    cache = tmp_path / "cache"
    copies = cache / "copies"
    data = write_data(tmp_path / "alpha.jsonl", 40)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "EDGEFED_THREADS": "1",
           "EDGEFED_PERTURB_BACKEND": "eager"}
    log = (tmp_path / "alpha.log").open("a")

    def start_client(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_client.cli", "--url", f"ws://127.0.0.1:{port}", "--client-id", "alpha",
             "--data", str(data), "--model", str(tiny.directory), "--device", "cpu", "--copies", "file",
             "--cache-dir", str(cache), "--memory-budget", "4GiB"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log_tail() -> str:
        return (tmp_path / "alpha.log").read_text()[-4000:]

    async def body() -> None:
        async with coordinator(tmp_path, tiny, rounds=0, rebase_every=3) as server:
            first = start_client(server.port)
            try:
                await until(lambda: ((client_status(server, "alpha") or {}).get("round") or 0) >= 1
                            or first.poll() is not None, "alpha's first round")
                assert first.poll() is None, log_tail()
                if Path("/proc").is_dir():  # the base copy and the snapshot: files in the cache, mapped
                    assert len(mapped_copies(first.pid, copies)) == 2, mapped_copies(first.pid, copies)
            finally:
                first.send_signal(signal.SIGKILL)
                first.wait(30)
            # Where a mapped file cannot be unlinked, the dead process's copies stay behind
            # under their names; the next client must remove those and nothing live.
            left_by_dead = copies / f"edgefed-copy.alpha.pid{first.pid}.snapshot.stale1.f32"
            held_by_live = copies / f"edgefed-copy.beta.pid{os.getpid()}.snapshot.live1.f32"
            copies.mkdir(parents=True, exist_ok=True)
            left_by_dead.write_bytes(bytes(64))
            held_by_live.write_bytes(bytes(64))
            killed_at = (client_status(server, "alpha") or {}).get("round") or 0
            second = start_client(server.port)
            try:
                await until(lambda: ((client_status(server, "alpha") or {}).get("round") or 0) > killed_at + 1
                            or second.poll() is not None, "the restarted alpha's rounds")
                assert second.poll() is None, log_tail()
                assert copy_files(copies) == [held_by_live.name], log_tail()
                assert "removed 1 stale round-start copy" in log_tail()
            finally:
                second.send_signal(signal.SIGTERM)
                second.wait(30)
        assert copy_files(copies) == [held_by_live.name]  # and a clean stop leaves nothing either

    asyncio.run(body())
