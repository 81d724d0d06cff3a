"""Faults: nothing committed is ever lost (issue #10).

* The coordinator process is SIGKILLed again and again during a run of three real client
  processes (tiny model): right as a round commits, at its next ledger write, at a random
  moment, while the clients reconnect. After every kill and every restart the ledger
  holds every committed round row for row, ``PRAGMA integrity_check`` says ok, the
  clients come back by themselves, and the run ends with every fingerprint equal.
* SQLite fails a commit (SQLITE_FULL: ``max_page_count`` lowered on the coordinator's own
  connection; or an I/O error halfway through the transaction): the round is not
  acknowledged, nothing is written, the coordinator keeps serving, and the round commits
  once space returns.
* A client SIGKILLed mid-round, or one that stops answering: the round closes on quorum
  (at once when the connection drops, else at the deadline) or is retried; nothing waits
  forever and the next rounds go on with the others.
* A client whose fingerprint disagrees with the majority gets no task and is not
  aggregated until it matches (tests/test_coordinator_server.py covers the flag itself).

The shared machinery (processes, ledger snapshots, the kill loop) is bench/_chaos_cases.py,
which bench/chaos.py runs with 20 kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from bench._chaos_cases import (
    TinyFederation,
    TinySettings,
    integrity_check,
    kill_campaign,
    lost_rounds,
    read_snapshot,
)
from coordinator.config import FederationConfig
from coordinator.ledger import Ledger
from coordinator.server import Coordinator
from protocol import codec
from protocol.messages import (
    Challenge,
    DeviceProfile,
    Error,
    Fingerprint,
    Hello,
    Message,
    RoundCommit,
    RoundTask,
    SyncRequest,
    SyncResponse,
    Update,
    UpdateAck,
    Welcome,
)

HASH = "cd" * 32
MAJORITY = "11" * 32
OUTLIER = "22" * 32
DIGEST = "00" * 32  # fingerprint.table_digest is not checked by the coordinator
DEVICE = DeviceProfile(device_type="cpu", device_name="test", accelerator_total_bytes=0, accelerator_free_bytes=0,
                       host_total_bytes=1 << 30, host_free_bytes=1 << 29, memory_budget_bytes=None)
TIMEOUT_S = 10.0  # the longest any single expected reply may take
SEED = int(os.environ.get("EDGEFED_CHAOS_SEED", "10"))  # the kill delays; printed on failure


# --------------------------------------------------------------- in-process federation


async def poll(predicate: Callable[[], bool], timeout: float = TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


class Fed:
    """A real Coordinator on 127.0.0.1:0 in this event loop, with its ledger."""

    def __init__(self, coordinator: Coordinator, task: asyncio.Task[None]) -> None:
        self.coordinator = coordinator
        self.task = task

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.coordinator.port}"

    @property
    def ledger_path(self) -> Path:
        return Path(self.coordinator.config.ledger_path)

    async def assert_serving(self) -> None:
        """Still up: the coordinator task runs and a fresh client gets its challenge within 1 s."""
        assert not self.task.done(), self.task
        started = time.monotonic()
        async with connect(self.url, open_timeout=1) as ws:
            assert isinstance(codec.decode(await asyncio.wait_for(ws.recv(), 1)), Challenge)
        assert time.monotonic() - started < 1.0


@contextlib.asynccontextmanager
async def federation(tmp_path: Path, **overrides: Any) -> AsyncIterator[Fed]:
    settings: dict[str, Any] = dict(model_hash=HASH, port=0, ledger_path=str(tmp_path / "ledger.db"), rounds=0,
                                    min_clients=3, clients_per_round=3, quorum=2, deadline_s=30, pool_key=12345,
                                    seed_pool_size=64, local_steps=3, learning_rate=1e-3)
    settings.update(overrides)
    config = FederationConfig(**settings)
    with Ledger(config.ledger_path) as ledger:
        coordinator = Coordinator(config, ledger)
        task = asyncio.create_task(coordinator.run())
        await poll(lambda: coordinator.port is not None or task.done(), what="the coordinator to listen")
        if task.done():
            task.result()
        try:
            yield Fed(coordinator, task)
        finally:
            coordinator.stop()
            await asyncio.wait_for(task, 30)


class Peer:
    """A fake client over a real websocket: codec.encode / decode, nothing else."""

    def __init__(self, ws: ClientConnection, client_id: str) -> None:
        self.ws = ws
        self.client_id = client_id
        self.seen: list[Message] = []  # everything received, in order

    @classmethod
    async def join(cls, fed: Fed, client_id: str, fingerprint: str | None = MAJORITY) -> Peer:
        """Connect and say hello; with a ``fingerprint`` report it for the welcome's round."""
        peer = cls(await connect(fed.url, open_timeout=TIMEOUT_S), client_id)
        assert isinstance(await peer.recv(), Challenge)
        await peer.send(Hello(protocol_version=(2, 0), client_id=client_id, device=DEVICE, mode="mezo",
                              model_hash=HASH, last_round=0, table_digest=None, plan=None, public_key=None,
                              signature=None))
        welcome = await peer.recv()
        assert isinstance(welcome, Welcome), welcome
        if fingerprint is not None:
            await peer.report(welcome.last_committed_round, fingerprint)
            await poll(lambda: getattr(fed.coordinator.sessions.get(client_id), "round", -1)
                       >= welcome.last_committed_round, what=f"{client_id}'s fingerprint to be in")
        return peer

    async def send(self, message: Message) -> None:
        await self.ws.send(codec.encode(message))

    async def recv(self, timeout: float = TIMEOUT_S) -> Message:
        message = codec.decode(await asyncio.wait_for(self.ws.recv(), timeout))
        self.seen.append(message)
        return message

    async def expect(self, kind: type[Message], *, skip: tuple[type[Message], ...] = (),
                     timeout: float = TIMEOUT_S) -> Any:
        """The next message of ``kind``, passing over ``skip`` kinds only."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(message, kind):
                return message
            assert isinstance(message, skip), f"{self.client_id}: expected {kind.__name__}, got {message}"

    async def report(self, round_number: int, fingerprint: str = MAJORITY) -> None:
        await self.send(Fingerprint(round=round_number, fingerprint=fingerprint, table_digest=DIGEST))

    async def answer(self, task: RoundTask, gradient: float = 0.5) -> None:
        """An update for ``task`` and its acknowledgement."""
        await self.send(Update(round=task.round, attempt=task.attempt, client_id=self.client_id,
                               pairs=tuple((seed, gradient / (i + 1)) for i, seed in enumerate(task.seeds)),
                               num_examples=10, loss_before=2.0, loss_after=1.9, nonce=os.urandom(16),
                               signature=None))
        ack = await self.expect(UpdateAck)
        assert (ack.round, ack.attempt, ack.status) == (task.round, task.attempt, "accepted"), ack


def run(body: Callable[[], Any]) -> None:
    asyncio.run(body())


def table_counts(path: Path) -> dict[str, int]:
    tables = ("rounds", "coefficients", "contributions", "seed_totals", "fingerprints", "clients", "meta")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in tables}


# ------------------------------------------------------------------- SIGKILL, in a row


@pytest.mark.integration
def test_sigkills_at_random_points_lose_no_committed_round(tmp_path: Path) -> None:
    """Five SIGKILLs in a row: right as a round commits, at the next ledger write, at a
    random moment, while the clients reconnect, and at a commit again."""
    kills = 5
    settings = TinySettings(rounds=6 * kills + 10)
    with TinyFederation(tmp_path, settings) as fed:
        fed.start()
        report = kill_campaign(fed, kills, random.Random(SEED))
    context = f"seed {SEED}: " + "; ".join(
        f"#{k.index} {k.mode} at round {k.round_seen} (ledger {k.round_after}, applied {k.applied}), "
        f"lost {k.lost}, integrity {k.integrity_after_kill}/{k.integrity_after_restart}" for k in report.kills)
    assert [k.mode for k in report.kills] == ["commit", "write", "random", "reconnect", "commit"], context
    assert all(k.ok for k in report.kills), context
    assert report.rounds_lost == 0 and report.final_lost == [], context
    assert all(k.round_after >= max(k.round_seen, k.applied) for k in report.kills), context
    assert report.final_round == settings.rounds and report.final_integrity == "ok", context
    # every client came back by itself (never restarted), reported the last round, and
    # every round's fingerprints agree
    assert set(report.final_fingerprints) == set(settings.clients), report.final_fingerprints
    assert report.fingerprints_agree and report.disagreeing_rounds == [], report
    assert fed.coordinator_starts == kills + 1


@pytest.mark.integration
def test_a_kill_right_as_the_last_round_commits_still_brings_every_client_to_it(tmp_path: Path) -> None:
    settings = TinySettings(rounds=3)
    with TinyFederation(tmp_path, settings) as fed:
        fed.start()
        fed.wait_for_round(settings.rounds, 120, poll_s=0.0005)
        fed.kill_coordinator()  # right as the last round commits: most clients have not applied it
        fed.start_coordinator()
        deadline = time.monotonic() + 15  # reconnecting and syncing takes ~1 s
        while min(fed.applied_rounds().values()) < settings.rounds:
            assert time.monotonic() < deadline, (f"clients never got the last round: {fed.applied_rounds()}; "
                                                 f"coordinator exit code {fed.coordinator.poll()}")
            time.sleep(0.1)
        fed.wait_for_finish(60)


# --------------------------------------------------------------- a commit SQLite refuses


class _FailingConnection:
    """The ledger's sqlite3 connection, except that inserting the round's contributions
    raises SQLite's disk I/O error: by then the round's row, its coefficients and the new
    seed totals are already written inside the transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        if sql.startswith("INSERT INTO contributions"):
            assert self._conn.in_transaction  # the round's first rows are in, uncommitted
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.executemany(sql, rows)


def _break_ledger(ledger: Ledger, failure: str, statements: list[str]) -> Callable[[], None]:
    """Make the next commits fail; record the statements run on the connection meanwhile;
    return what gives the space back."""
    conn = ledger._conn  # the coordinator's own connection: max_page_count is per connection
    assert conn is not None
    conn.set_trace_callback(lambda sql: statements.append(sql.split("(")[0].strip()))
    if failure == "io_error":
        ledger._conn = _FailingConnection(conn)  # type: ignore[assignment]

        def restore_io() -> None:
            conn.set_trace_callback(None)
            ledger._conn = conn
        return restore_io
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0  # no free page to reuse
    # "disk_full": not one page more (SQLite fails among the coefficient rows);
    # "disk_full_later": a few more pages (it fails later, among the seed totals).
    limit = pages + (0 if failure == "disk_full" else 8)
    assert conn.execute(f"PRAGMA max_page_count = {limit}").fetchone()[0] == limit

    def restore_space() -> None:
        conn.set_trace_callback(None)
        assert conn.execute("PRAGMA max_page_count = 4294967294").fetchone()[0] > limit
    return restore_space


@pytest.mark.parametrize("failure", ["disk_full", "disk_full_later", "io_error"])
def test_a_commit_that_sqlite_refuses_is_not_acknowledged_and_completes_once_space_returns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: str) -> None:
    """Three fake clients answer round 1 twice while the ledger cannot grow: each time no
    round_commit is sent (the next message is the next attempt's task), nothing is
    written, the file passes integrity_check and a fresh client is served. With space
    back, the third attempt commits and every client gets its round_commit."""
    caplog.set_level(logging.INFO, logger="coordinator.server")

    async def body() -> None:
        # 256 seeds: the round's rows need several new pages (contributions overflow a page)
        async with federation(tmp_path, rounds=1, quorum=3, local_steps=256, seed_pool_size=1024) as fed:
            peers = [await Peer.join(fed, name) for name in ("a", "b", "c")]
            tasks = [await peer.expect(RoundTask) for peer in peers]
            assert {(t.round, t.attempt) for t in tasks} == {(1, 0)}
            before_rows = table_counts(fed.ledger_path)
            before = read_snapshot(fed.ledger_path)
            statements: list[str] = []
            restore = _break_ledger(fed.coordinator.ledger, failure, statements)

            for attempt in (0, 1):
                for peer in peers:
                    await peer.answer(tasks[0])
                # not acknowledged: the next thing each client hears is the retry's task
                tasks = [await peer.expect(RoundTask) for peer in peers]
                assert {(t.round, t.attempt) for t in tasks} == {(1, attempt + 1)}
                assert not any(isinstance(m, RoundCommit) for peer in peers for m in peer.seen)
                assert table_counts(fed.ledger_path) == before_rows  # nothing written
                assert integrity_check(fed.ledger_path) == "ok"
                assert fed.coordinator.ledger.last_round() == 0
                await fed.assert_serving()
            failed = [r.getMessage() for r in caplog.records if "could not be committed" in r.getMessage()]
            assert len(failed) == 2, caplog.text
            expected = "disk I/O error" if failure == "io_error" else "database or disk is full"
            assert all(expected in message for message in failed), failed
            # each failure came halfway through the transaction, after rows were inserted
            assert statements.count("BEGIN IMMEDIATE") == 2 and statements.count("INSERT INTO rounds") == 2
            if failure == "disk_full_later":
                assert statements.count("INSERT INTO coefficients") == 2 * 256
                assert "INSERT INTO seed_totals" in statements
            if failure == "io_error":
                assert statements.count("INSERT INTO seed_totals") == 2 * 256

            restore()
            for peer in peers:
                await peer.answer(tasks[0])
            commits = [await peer.expect(RoundCommit) for peer in peers]
            assert {(c.round, c.attempt, c.num_updates) for c in commits} == {(1, 2, 3)}
            after = read_snapshot(fed.ledger_path)
            assert lost_rounds(before, after) == [] and after.last_round == 1
            assert after.rounds[0][1] == 2  # the attempt that committed
            assert len(after.coefficients) == 256 and len(after.contributions) == 3
            assert integrity_check(fed.ledger_path) == "ok"
            for peer in peers:
                await peer.ws.close()

    run(body)


# ----------------------------------------------------------- clients that die or hang


def test_a_client_that_stops_answering_costs_one_deadline_per_attempt(tmp_path: Path) -> None:
    """b takes its task and then says nothing, its connection open (a frozen process).
    Attempt 0 (a and b) misses its quorum: abandoned at the deadline and retried with new
    seeds. Attempt 1 (a, b and c) commits at the deadline on the quorum of a and c. Round 2
    goes to a and c only (b never reported round 1) and commits as soon as both answer."""
    deadline_s = 1.0

    async def body() -> None:
        async with federation(tmp_path, rounds=2, min_clients=2, clients_per_round=3, quorum=2,
                              deadline_s=deadline_s) as fed:
            a, b = await Peer.join(fed, "a"), await Peer.join(fed, "b")
            first = await a.expect(RoundTask)
            opened = time.monotonic()
            assert (first.round, first.attempt) == (1, 0) and (await b.expect(RoundTask)).seeds == first.seeds
            c = await Peer.join(fed, "c")  # ready, but round 1 attempt 0 is already out
            await a.answer(first)

            retry = await a.expect(RoundTask, timeout=deadline_s + 5)
            waited = time.monotonic() - opened
            assert deadline_s - 0.05 <= waited < deadline_s + 1.5, waited  # the deadline, not forever
            assert (retry.round, retry.attempt) == (1, 1) and retry.seeds != first.seeds
            assert fed.coordinator.ledger.last_round() == 0
            assert (await c.expect(RoundTask)).seeds == retry.seeds
            await a.answer(retry)
            await c.answer(retry)  # b got the retry too, and says nothing again
            commit = await a.expect(RoundCommit, timeout=deadline_s + 5)
            waited = time.monotonic() - opened
            assert 2 * deadline_s - 0.1 <= waited < 2 * deadline_s + 3, waited
            assert (commit.round, commit.attempt, commit.num_updates) == (1, 1, 2)

            await a.report(1)
            await c.report(1)
            tasks = [await peer.expect(RoundTask, skip=(RoundCommit,)) for peer in (a, c)]
            assert {(t.round, t.attempt) for t in tasks} == {(2, 0)}
            started = time.monotonic()
            for peer, task in zip((a, c), tasks):
                await peer.answer(task)
            assert (await a.expect(RoundCommit)).round == 2
            assert time.monotonic() - started < deadline_s  # everyone assigned answered: no wait
            ledger = fed.coordinator.ledger
            assert [[x.client_id for x in ledger.contributions(r)] for r in (1, 2)] == [["a", "c"], ["a", "c"]]
            assert not any(isinstance(m, (UpdateAck, Error)) for m in b.seen)
            await fed.assert_serving()
            for peer in (a, b, c):
                await peer.ws.close()

    run(body)


@pytest.mark.integration
def test_a_client_sigkilled_mid_round_does_not_stall_the_federation(tmp_path: Path) -> None:
    """Three client processes; gamma is SIGKILLed while it trains. Its connection drops, so
    the round closes on the quorum of alpha and beta at once (well before the deadline),
    and the remaining rounds run with the two of them to the end."""
    settings = TinySettings(rounds=6, min_clients=2, quorum=2, clients_per_round=3, deadline_s=20.0,
                            commit_wait_s=2.0, local_steps=48)
    with TinyFederation(tmp_path, settings) as fed:
        fed.start()
        fed.wait_for_round(1, 120)
        deadline = time.monotonic() + 60
        while True:  # catch gamma busy with a task: freeze it, make sure its update is not in, kill it
            assert time.monotonic() < deadline, "gamma never seen training"
            open_round = fed.status()["open_round"]
            if not (open_round and "gamma" in open_round["assigned"] and "gamma" not in open_round["received"]):
                time.sleep(0.01)
                continue
            fed.signal_client("gamma", signal.SIGSTOP)
            time.sleep(0.3)  # an update already on the wire would have arrived by now
            again = fed.status()["open_round"]
            if again and again["round"] == open_round["round"] and "gamma" not in again["received"]:
                break
            fed.signal_client("gamma", signal.SIGCONT)  # too late for this round: try the next one
        victim_round = open_round["round"]
        fed.signal_client("gamma", signal.SIGKILL)
        killed = time.monotonic()
        fed.wait_for_round(victim_round, settings.deadline_s + 10, alive=["alpha", "beta"])
        closed_after = time.monotonic() - killed
        assert closed_after < settings.deadline_s / 2, closed_after  # closed on the drop, not the deadline
        fed.wait_for_round(settings.rounds, 120, alive=["alpha", "beta"])
        del fed.clients["gamma"]  # it is gone for good; the others must finish
        fed.wait_for_finish(150)

    snapshot = read_snapshot(fed.ledger)
    contributors = {r: {c[2] for c in snapshot.contributions if c[0] == r} for r in range(1, settings.rounds + 1)}
    assert "gamma" not in contributors[victim_round] and len(contributors[victim_round]) == 2, contributors
    assert all(contributors[r] == {"alpha", "beta"} for r in range(victim_round + 1, settings.rounds + 1))
    with contextlib.closing(sqlite3.connect(f"file:{fed.ledger}?mode=ro", uri=True)) as db:
        final = dict(db.execute("SELECT client_id, fingerprint FROM fingerprints WHERE round = ?",
                                (settings.rounds,)))
    assert set(final) == {"alpha", "beta"} and len(set(final.values())) == 1, final
    assert integrity_check(fed.ledger) == "ok"


# ------------------------------------------------------------ fingerprint disagreement


def test_a_flagged_client_gets_no_task_and_is_not_aggregated_until_it_matches(tmp_path: Path) -> None:
    """d's fingerprint differs from a's, b's and c's: it is told to resync, gets no task for
    round 1, its update is refused, and round 1 is aggregated from a, b and c only. Once
    it reports the majority's fingerprint it is given the next task and aggregated."""

    async def body() -> None:
        async with federation(tmp_path, rounds=2, min_clients=3, clients_per_round=4, quorum=3) as fed:
            coordinator = fed.coordinator
            a, b = await Peer.join(fed, "a"), await Peer.join(fed, "b")
            d = await Peer.join(fed, "d", fingerprint=OUTLIER)
            told = await d.expect(Error)
            assert (told.code, told.round, told.field) == ("fingerprint_mismatch", 0, "fingerprint.fingerprint")
            assert coordinator.sessions["d"].flagged
            assert coordinator.machine is None  # a and b are ready, d does not count: no round yet
            c = await Peer.join(fed, "c")
            tasks = {peer.client_id: await peer.expect(RoundTask) for peer in (a, b, c)}
            machine = coordinator.machine
            assert machine is not None and sorted(machine.assigned) == ["a", "b", "c"]

            # d is left out: no task, and an update of its own is refused
            await d.send(Update(round=1, attempt=0, client_id="d", pairs=tuple((s, 9.0) for s in tasks["a"].seeds),
                                num_examples=10, loss_before=2.0, loss_after=1.9, nonce=os.urandom(16),
                                signature=None))
            refused = await d.expect(Error)
            assert refused.round == 1 and refused.code in ("not_assigned", "fingerprint_mismatch"), refused
            await d.send(SyncRequest(have_round=0))  # the resync it was told to do
            assert isinstance(await d.expect(SyncResponse), SyncResponse)
            for peer in (a, b, c):
                await peer.answer(tasks[peer.client_id])
            for peer in (a, b, c, d):
                assert (await peer.expect(RoundCommit)).round == 1
            assert not any(isinstance(m, RoundTask) for m in d.seen)
            assert [x.client_id for x in coordinator.ledger.contributions(1)] == ["a", "b", "c"]
            assert coordinator.status()["clients"][3]["flagged"] is True

            # d now holds what the majority holds: it is back in the rounds
            await d.report(1)
            await a.report(1)
            await poll(lambda: not coordinator.sessions["d"].flagged, what="d's flag to clear")
            await b.report(1)
            task = await d.expect(RoundTask)
            assert task.round == 2 and "d" in coordinator.machine.assigned
            for peer in (a, b, d):
                await peer.answer(await peer.expect(RoundTask) if peer is not d else task)
            await c.report(1)
            assert (await a.expect(RoundCommit, skip=(RoundTask,))).round == 2
            assert "d" in [x.client_id for x in coordinator.ledger.contributions(2)]
            for peer in (a, b, c, d):
                await peer.ws.close()

    run(body)


def test_a_client_flagged_after_it_got_its_task_is_not_aggregated(tmp_path: Path) -> None:
    """a and d report different fingerprints for round 0: a tie, nobody is flagged, and
    with min_clients=2 round 1 goes to a and d. Then b reports a's fingerprint: d is in
    the minority and flagged. d still answers its task (a diverged client does not know
    its model is wrong); round 1 must not be aggregated from d's update."""

    async def body() -> None:
        async with federation(tmp_path, rounds=1, min_clients=2, clients_per_round=3, quorum=2,
                              deadline_s=2.0) as fed:
            coordinator = fed.coordinator
            a = await Peer.join(fed, "a")
            d = await Peer.join(fed, "d", fingerprint=OUTLIER)
            tasks = {peer.client_id: await peer.expect(RoundTask) for peer in (a, d)}
            b = await Peer.join(fed, "b")
            told = await d.expect(Error)
            assert told.code == "fingerprint_mismatch" and coordinator.sessions["d"].flagged
            await a.answer(tasks["a"])
            await d.send(Update(round=1, attempt=0, client_id="d", pairs=tuple((s, 9.0) for s in tasks["d"].seeds),
                                num_examples=10, loss_before=2.0, loss_after=1.9, nonce=os.urandom(16),
                                signature=None))
            # play until round 1 commits: a and b answer any retry, d answers whatever it gets
            peers = {"a": a, "b": b, "d": d}

            async def follow(peer: Peer) -> RoundCommit:
                while True:
                    message = await peer.recv(timeout=20)
                    if isinstance(message, RoundCommit):
                        return message
                    if isinstance(message, RoundTask):
                        await peer.send(Update(round=message.round, attempt=message.attempt,
                                               client_id=peer.client_id,
                                               pairs=tuple((s, 9.0 if peer is d else 0.5) for s in message.seeds),
                                               num_examples=10, loss_before=2.0, loss_after=1.9,
                                               nonce=os.urandom(16), signature=None))

            commits = await asyncio.gather(*(follow(peer) for peer in peers.values()))
            assert {c.round for c in commits} == {1}
            contributors = [x.client_id for x in coordinator.ledger.contributions(1)]
            assert "d" not in contributors, contributors
            for peer in peers.values():
                await peer.ws.close()

    run(body)
