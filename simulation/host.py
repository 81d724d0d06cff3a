"""One model copy playing many virtual clients against a real coordinator.

Each virtual client is a real websocket connection with its own id, device profile (its
simulated memory budget), plan, data and behaviour; the coordinator cannot tell it from
a device. What they share is one :class:`~edge_client.replica.Replica`: the model at the
ledger's head. A commit reaches every connection and is applied once; every connection
then reports the replica's fingerprint. A task is trained from the round-start weights
with that client's batches, one client at a time (the replica's lock), then held back by
the client's simulated latency, poisoned if the client is an attacker, and sent.

Clients come and go with the population's availability schedule (a client offline for a
round closes its connection; one that comes back connects again and is caught up by the
coordinator like any returning device).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from edge_client.adversary import poison
from edge_client.daemon import build_update, plan_training
from edge_client.data import DataError, records_from, resolve_prompt_format
from edge_client.device import DeviceReport, detect_device
from edge_client.engines import get_engine
from edge_client.model import base_weights_hash, load_model, resolve_model
from edge_client.replica import Replica, federation_task
from edge_client.sync import RoundCoefficients, SyncError
from profiles.chooser import Choice
from profiles.estimator import ModelShape
from profiles.procmem import ru_maxrss_kib
from protocol import codec, limits
from protocol.messages import (
    Challenge,
    Error,
    FederationInfo,
    Fingerprint,
    Goodbye,
    Hello,
    Reject,
    RoundCommit,
    RoundTask,
    SyncRequest,
    SyncResponse,
    Welcome,
)
from simulation.population import VirtualClient

__all__ = ["SimHost", "simulated_report"]

logger = logging.getLogger(__name__)

RECONNECT_S = 1.0  # a refused or dropped connection is retried after this
MAX_FAILED_CONNECTS = 30  # in a row, over all clients: the coordinator is gone


def simulated_report(device_name: str, budget_bytes: int) -> DeviceReport:
    """This machine's report with a simulated device's name and memory budget."""
    report = detect_device("cpu", memory_budget_bytes=budget_bytes)
    return dataclasses.replace(report, name=f"simulated {device_name}"[:200])


class SimHost:
    """Plays ``clients`` (all of one mode) against the coordinator at ``url``.

    Args:
        url: the coordinator (ws://).
        model: the model source every client holds (a builtin name or a directory).
        mode: the engine these clients train with (the chooser's pick for their budgets).
        clients: the virtual clients this host plays.
        cache_dir: the model cache.
        final_round: the federation's last round (0: unbounded). Once it is committed no
            client goes offline: the coordinator waits for the fingerprints of the last
            round's trainers before it says goodbye, and a real device would report too.
    """

    def __init__(self, *, url: str, model: str, mode: str, clients: Sequence[VirtualClient],
                 cache_dir: str | None = None, final_round: int = 0) -> None:
        self.final_round = final_round
        self.url, self.model_source, self.mode = url, model, mode
        self.engine_cls = get_engine(mode)
        self.clients = list(clients)
        self.cache_dir = cache_dir
        self.replica: Replica | None = None
        self._replica_ready = asyncio.Event()
        self._setup_lock = asyncio.Lock()
        self._apply_lock = asyncio.Lock()  # one commit or sync applied at a time
        self._round_moved = asyncio.Condition()
        self._fingerprints: dict[int, str] = {}
        self._sync_pending = False
        self._choices: dict[str, Choice] = {}
        self._unusable: set[str] = set()  # clients whose records give no training example
        self._training: set[asyncio.Task[None]] = set()
        self.finished = asyncio.Event()
        self.failed_connects = 0
        self.stats: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.train_seconds = 0.0

    # -- setup ------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model once (slow); call before :meth:`run`."""
        path = resolve_model(self.model_source, cache_dir=Path(self.cache_dir) if self.cache_dir else None)
        self.model, self.tokenizer = load_model(path)
        self.shape = ModelShape.from_hf_config(self.model.config.to_dict(), num_parameters=self.model.num_parameters())
        self.model_hash = base_weights_hash(self.model)
        self.prompt_format = resolve_prompt_format("auto", self.tokenizer)

    async def _replica_for(self, federation: FederationInfo) -> Replica:
        async with self._setup_lock:
            if self.replica is None:
                task = federation_task(federation)
                for client in self.clients:
                    report = simulated_report(client.device.name, client.device.budget_bytes)
                    self._choices[client.client_id] = plan_training(
                        self.shape, task, report, copies="memory", rebase_every=federation.rebase_every,
                        mode=self.mode)
                # One engine for all: fitted to the smallest micro-batch any of them can run.
                choice = min(self._choices.values(), key=lambda c: c.batch)
                self.replica = await asyncio.to_thread(
                    Replica, self.model, self.tokenizer, federation, self.engine_cls, choice=choice,
                    shape=self.shape, copies_owner=f"sim-host-{self.clients[0].index}")
                self._batches = {}
                for c in self.clients:
                    try:
                        self._batches[c.client_id] = self.replica.batches_for(
                            c.client_id, records_from(c.records, on_error="skip")[0], self.prompt_format)
                    except DataError as error:  # as a device whose data cannot train: it never joins
                        logger.warning("%s stays offline: %s", c.client_id, error)
                        self.stats["clients_without_usable_data"] += 1
                self._replica_ready.set()
            elif federation != self.replica.federation:
                raise RuntimeError("the coordinator's federation settings changed under the simulation")
            return self.replica

    # -- running ----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Play every client until the federation is complete (a goodbye) or the
        coordinator is gone; returns what this host did."""
        started = time.monotonic()
        sessions = [asyncio.create_task(self._client_life(client)) for client in self.clients]
        await self.finished.wait()
        for session in sessions:
            session.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        return {"mode": self.mode, "clients": len(self.clients), **self.stats, "refusals": dict(self.refusals),
                "train_seconds": round(self.train_seconds, 1), "seconds": round(time.monotonic() - started, 1),
                "peak_rss_bytes": ru_maxrss_kib() * 1024, "round": self.replica.round if self.replica else 0}

    def _ledger_round(self) -> int:
        return self.replica.round if self.replica is not None else 0

    async def _client_life(self, client: VirtualClient) -> None:
        """Connect while the schedule says online; wait for the next round otherwise."""
        while not self.finished.is_set() and client.client_id not in self._unusable:
            if not client.online(self._ledger_round()):
                await self._wait_round_past(self._ledger_round())
                continue
            try:
                await self._session(client)
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as error:
                self.failed_connects += 1
                if self.failed_connects >= MAX_FAILED_CONNECTS:
                    logger.error("the coordinator at %s is unreachable (%s); stopping", self.url, error)
                    self.finished.set()
                    return
                await asyncio.sleep(RECONNECT_S * random.random() * 2)

    async def _wait_round_past(self, round_number: int, timeout: float | None = None) -> None:
        async with self._round_moved:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._round_moved.wait_for(
                        lambda: self._ledger_round() > round_number or self.finished.is_set())

    async def _session(self, client: VirtualClient) -> None:
        async with connect(self.url, compression=None, max_size=limits.MAX_FRAME_BYTES, open_timeout=30,
                           ping_interval=20, ping_timeout=60) as connection:
            challenge = codec.decode(await connection.recv())
            if not isinstance(challenge, Challenge):
                raise ConnectionClosed(None, None)
            replica = await self._replica_for(challenge.federation)
            if client.client_id not in self._batches:
                self._unusable.add(client.client_id)
                return
            choice = self._choices[client.client_id]
            report = simulated_report(client.device.name, client.device.budget_bytes)
            await connection.send(codec.encode(Hello(
                protocol_version=limits.PROTOCOL_VERSION, client_id=client.client_id, device=report.profile(),
                mode=self.mode, model_hash=self.model_hash, last_round=replica.round,
                table_digest=replica.table_digest(), plan=f"simulated: {choice.explanation}"[:limits.MAX_STRING_CHARS],
                public_key=None, signature=None)))
            welcome = codec.decode(await connection.recv())
            if isinstance(welcome, Reject):
                logger.error("%s rejected (%s): %s", client.client_id, welcome.code, welcome.message)
                self.refusals[f"reject:{welcome.code}"] += 1
                await self._wait_round_past(self._ledger_round())  # do not hammer it
                return
            if not isinstance(welcome, Welcome):
                return
            self.failed_connects = 0
            self.stats["connects"] += 1
            if replica.round < welcome.last_committed_round:
                await self._request_sync(connection, replica.round)
            else:
                await self._report(connection)
            offline = asyncio.create_task(self._until_offline(client))
            reader = asyncio.create_task(self._read(connection, client))
            done, _ = await asyncio.wait({offline, reader}, return_when=asyncio.FIRST_COMPLETED)
            for task in (offline, reader):
                task.cancel()
            await asyncio.gather(offline, reader, return_exceptions=True)  # retrieved: nothing left dangling
            if offline in done and not self.finished.is_set():
                self.stats["went_offline"] += 1
            elif reader in done and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]

    async def _until_offline(self, client: VirtualClient) -> None:
        while True:
            current = self._ledger_round()
            await self._wait_round_past(current)
            if self.final_round and self._ledger_round() >= self.final_round:
                return await self.finished.wait()  # stays for the final fingerprints
            if self.finished.is_set() or not client.online(self._ledger_round()):
                return

    async def _read(self, connection: ClientConnection, client: VirtualClient) -> None:
        async for frame in connection:
            message = codec.decode(frame)  # type: ignore[arg-type]
            if isinstance(message, RoundTask):
                training = asyncio.create_task(self._train(connection, client, message))
                self._training.add(training)  # held: the loop keeps only weak references to tasks
                training.add_done_callback(self._training.discard)
            elif isinstance(message, RoundCommit):
                await self._on_commit(connection, message)
            elif isinstance(message, SyncResponse):
                await self._on_sync(connection, message)
            elif isinstance(message, Error):
                self.refusals[message.code] += 1
                if message.code == "fingerprint_mismatch":
                    await self._request_sync(connection, 0)
            elif isinstance(message, Goodbye):
                logger.info("the coordinator said goodbye: %s", message.reason)
                self.finished.set()
                async with self._round_moved:
                    self._round_moved.notify_all()
                return

    # -- the ledger -------------------------------------------------------------------------

    async def _moved(self) -> None:
        async with self._round_moved:
            self._round_moved.notify_all()

    async def _report(self, connection: ClientConnection) -> None:
        """Send the replica's fingerprint (computed once per round for all connections)."""
        assert self.replica is not None
        round_number = self.replica.round
        fingerprint = self._fingerprints.get(round_number)
        if fingerprint is None:
            fingerprint = await asyncio.to_thread(self.replica.fingerprint)
            self._fingerprints = {round_number: fingerprint}
        await connection.send(codec.encode(Fingerprint(round=round_number, fingerprint=fingerprint,
                                                       table_digest=self.replica.table_digest())))

    async def _request_sync(self, connection: ClientConnection, have_round: int) -> None:
        if self._sync_pending and have_round != 0:  # another connection asked already: wait for it
            await self._wait_round_past(have_round, timeout=60)
            await self._report(connection)
            return
        self._sync_pending = True
        await connection.send(codec.encode(SyncRequest(have_round=have_round)))

    async def _on_commit(self, connection: ClientConnection, commit: RoundCommit) -> None:
        assert self.replica is not None
        replica = self.replica
        async with self._apply_lock:
            if commit.round == replica.round + 1:
                try:
                    await asyncio.to_thread(replica.apply_commit, commit.round, commit.coefficients, commit.totals,
                                            commit.table_digest)
                except SyncError as error:
                    logger.error("cannot apply round %d (%s); resyncing", commit.round, error)
                    await self._request_sync(connection, 0)
                    return
                await self._moved()
        if commit.round > replica.round:
            await self._request_sync(connection, replica.round)
            return
        await self._report(connection)

    async def _on_sync(self, connection: ClientConnection, response: SyncResponse) -> None:
        assert self.replica is not None
        replica = self.replica
        async with self._apply_lock:
            if response.target_round > replica.round or (self._sync_pending and response.base_round == 0):
                rounds = [RoundCoefficients(e.round, tuple(e.coefficients)) for e in response.rounds]
                try:
                    if (response.base_round == replica.round and response.base_round != 0
                            and not replica.sync.is_rebase(response.base_round)):
                        for entry in rounds:
                            await asyncio.to_thread(replica.apply_commit, entry.round, entry.coefficients)
                    else:
                        await asyncio.to_thread(replica.catch_up, response.base_round, response.table, rounds,
                                                response.table_digest)
                except SyncError as error:
                    logger.error("sync failed (%s); asking for a full one", error)
                    self._sync_pending = False
                    await self._request_sync(connection, 0)
                    return
                self._sync_pending = False
                await self._moved()
        await self._report(connection)

    # -- training ---------------------------------------------------------------------------

    async def _train(self, connection: ClientConnection, client: VirtualClient, task: RoundTask) -> None:
        assert self.replica is not None
        replica = self.replica
        if replica.round < task.base_round:  # its commit is still on the way on another connection
            await self._wait_round_past(task.base_round - 1, timeout=60)
        if replica.round != task.base_round:
            return  # stale, or we are behind: the coordinator's deadline copes
        started = time.perf_counter()
        try:
            result, encoding = await asyncio.to_thread(
                replica.train, round_number=task.round, base_round=task.base_round, seeds=task.seeds,
                learning_rate=task.learning_rate, epsilon=task.epsilon, batch_size=task.batch_size,
                settings=dict(task.settings), batches=self._batches[client.client_id])
        except SyncError:
            return  # a commit overtook the task
        except Exception as error:  # a failed round: the device sends nothing, as the daemon does
            logger.error("%s round %d: training failed (%s: %s)", client.client_id, task.round,
                         type(error).__name__, error)
            self.stats["failed_rounds"] += 1
            return
        self.train_seconds += time.perf_counter() - started
        delay = client.latency_s(task.round)
        if delay:
            await asyncio.sleep(delay)
        if client.attacker:
            rng = random.Random(f"{client.settings.seed}:attack:{client.index}:{task.round}")
            result = dataclasses.replace(result, pairs=tuple(
                (seed, poison(value, client.settings.attack, client.settings.attack_scale, rng))
                for seed, value in result.pairs))
        with contextlib.suppress(ConnectionClosed):
            await connection.send(codec.encode(build_update(task, result, client.client_id, encoding)))
            self.stats["updates_sent"] += 1
            self.stats["attacks_sent" if client.attacker else "honest_updates_sent"] += 1
