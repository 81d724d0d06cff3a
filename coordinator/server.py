"""The coordinator: an asyncio websockets server that runs rounds and keeps the ledger.

It never loads model weights. Per connection it speaks the handshake (challenge, hello,
welcome/reject) and then relays messages between the socket and the round driver; the
rules of a round live in :mod:`protocol.round`, the arithmetic in
:mod:`coordinator.aggregate`, storage in :mod:`coordinator.ledger`. A plain HTTP GET on
``/status`` of the same port returns the federation's state as JSON; ``/`` is a live page
of it, ``/metrics`` its Prometheus metrics (:mod:`coordinator.dashboard`,
:mod:`coordinator.metrics`).

Connections are metered and gated here too (:class:`MeteredConnection`,
:class:`ConnectionGate`): every byte each connection reads from and writes to its
transport is counted (websocket frames of both directions, the opening handshake
included; permessage-deflate is off, so these are the bytes on the socket, below TLS),
and accepted connections are capped per address and, while they have not said hello,
over all addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import ssl
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from coordinator.adaptive import AdaptiveSettings
from coordinator.aggregate import ROBUST_METHODS, ROBUST_MIN_VALUES, aggregate_with_report, log_report
from coordinator.allowlist import (
    OPEN_MODE_WARNING,
    Allowlist,
    IdentityRefused,
    ReplayGuard,
    verify_hello,
    verify_update,
)
from coordinator.config import BLOCK_MODE, FederationConfig
from coordinator.dashboard import LIVE_PATH, ChangeFeed, Dashboard
from coordinator.fingerprints import FingerprintBook
from coordinator.ledger import Contribution, Ledger, LedgerError
from coordinator.metrics import CoordinatorMetrics
from coordinator.personal_lr import ClientStatistics, personalised_rates
from coordinator.rules import bind_ledger, check_losses, draw_clients, draw_seeds, federation_info, sync_response
from protocol import codec, limits
from protocol.errors import PeerProtocolError, VersionMismatch
from protocol.messages import (
    OBSERVER_MODE,
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
from protocol.round import RoundMachine, RoundState, UpdateRefused
from protocol.blocks import block_seed, block_seed_map
from protocol.seeds import pool_seed
from protocol.table import TableError, table_digest

__all__ = ["ConnectionGate", "Coordinator", "MeteredConnection"]

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 30.0  # a client that does not say hello within this is dropped
SEND_TIMEOUT_S = 30.0  # a client whose connection does not take a message within this is dropped
# Connection limits (issue #10; PROTOCOL.md §2). Module constants so tests can shorten them;
# the connection caps are FederationConfig.max_connections_per_address and
# max_connections_in_handshake.
OPEN_TIMEOUT_S = 10.0  # the HTTP upgrade must be complete within this (a dribbled request is dropped)
PING_INTERVAL_S = 20.0  # keepalive ping period (PROTOCOL.md §2)
PING_TIMEOUT_S = 60.0  # a peer that leaves a ping unanswered this long is dropped
CLOSE_TIMEOUT_S = 10.0  # a close not completed within this aborts the TCP connection
MAX_QUEUED_FRAMES = 4  # received frames buffered per connection while its handler is busy (each <= 4 MiB)
FINAL_FINGERPRINT_WAIT_S = 120.0  # after the last round, how long to wait for fingerprints
ROUND_METERS_KEPT = 64  # per-round figures kept for /status (it shows the last 51 rounds)
PAGE_HISTORY_ROUNDS = 1000  # rounds the page's charts get (and eval losses kept)


@dataclass
class ClientSession:
    """What the coordinator knows about one connected client."""

    client_id: str
    connection: MeteredConnection
    device: DeviceProfile
    mode: str
    round: int  # the last round this client holds (reported by fingerprint or hello)
    plan: str | None = None  # the client's own account of its mode, batch and memory
    blocks: tuple[int, ...] = ()  # a block client's: the blocks its memory can train (empty: any)
    challenge: Challenge | None = None  # sent on this connection; signatures are bound to it
    public_key: bytes | None = None  # proved by the hello (allow-list mode): updates must verify with it
    connected_at: float = field(default_factory=time.time)
    busy_round: int | None = None  # round it is training, until its update arrives
    fingerprint: str | None = None
    flagged: bool = False
    flag_reason: str | None = None  # why it is flagged, for the page and /status
    refusals: Counter[str] = field(default_factory=Counter)  # its refused updates, by error code
    last_loss_before: float | None = None
    last_loss_after: float | None = None
    rounds_participated: int = 0  # updates accepted from it
    # The connection's byte counts at the last commit: what came after belongs to the next round.
    wire_mark_up: int = 0
    wire_mark_down: int = 0

    def take_wire_bytes(self) -> tuple[int, int]:
        """Bytes (received, sent) on this client's connection since the last call (or
        since it connected), and start counting afresh."""
        up, down = self.connection.wire_bytes_up, self.connection.wire_bytes_down
        taken = (up - self.wire_mark_up, down - self.wire_mark_down)
        self.wire_mark_up, self.wire_mark_down = up, down
        return taken


@dataclass(frozen=True)
class RoundMeter:
    """What this coordinator process measured about a round it committed.

    Attributes:
        wire_bytes_up, wire_bytes_down: bytes received from / sent to the clients that
            trained the round, on their connections, between the previous commit and this one.
        values_min: the fewest finite values any seed of the round was combined from.
        robust: the configured method is robust and every seed had enough values for it.
    """

    wire_bytes_up: int
    wire_bytes_down: int
    values_min: int
    robust: bool


class Coordinator:
    """Runs one federation.

    Args:
        config: the federation's settings.
        ledger: an open ledger; its identity meta is checked against ``config``.
    """

    def __init__(self, config: FederationConfig, ledger: Ledger, *, allowlist: Allowlist | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """Raises ValueError where the federation cannot be served (see _check_block_seeds).

        ``config.read_token`` guards the page, /status and /metrics; in allow-list mode
        without one a token is generated (:attr:`read_token`, logged at start): who takes
        part in a closed federation is not for anyone who can reach the port.
        """
        self.config = config
        self.ledger = ledger
        self.adaptive = AdaptiveSettings(config.modes, ledger)  # per-client tuned mode settings
        # FedMeZO's personalised rates read every client's recent contributions.
        self.statistics: ClientStatistics | None = None
        if config.personalised_lr != "off":
            self.statistics = ClientStatistics(config.personalised_lr)
            for committed in range(1, ledger.last_round() + 1):
                for contribution in ledger.contributions(committed):
                    self.statistics.observe(contribution.client_id, contribution.loss_after,
                                            [value for _, value in contribution.pairs])
        self.pool_key = bind_ledger(config, ledger)  # refuses another federation's ledger or pool key
        self.sessions: dict[str, ClientSession] = {}
        self.machine: RoundMachine | None = None
        self.metrics = CoordinatorMetrics(
            clients_connected=lambda: (sum(s.mode != OBSERVER_MODE for s in self.sessions.values()),
                                       sum(s.mode == OBSERVER_MODE for s in self.sessions.values())),
            clients_flagged=lambda: sum(s.flagged for s in self.sessions.values()),
            committed_round=self.ledger.last_round,
            dashboard_viewers=lambda: self.dashboard.viewers)
        self.gate = ConnectionGate(config.max_connections_per_address, config.max_connections_in_handshake,
                                   metrics=self.metrics)
        self.read_token = config.read_token
        if self.read_token is None and allowlist is not None:
            self.read_token = secrets.token_urlsafe(24)
        self.feed = ChangeFeed()
        self.dashboard = Dashboard(status=self.status, snapshot=self.snapshot, metrics=self.metrics.exposition,
                                   feed=self.feed, read_token=self.read_token)
        self._eval_losses: dict[int, dict[str, float]] = {}  # round -> observer -> its held-out loss
        # Recent rounds' fingerprint reports in memory (the ledger keeps them durably).
        self.fingerprint_book = FingerprintBook(ledger.fingerprints, keep=ROUND_METERS_KEPT)
        self._majorities: dict[int, str | None] = {}  # the majority each recent round's check last saw
        self._attempt_started: float | None = None  # monotonic time the open attempt's tasks went out
        self._round_meters: dict[int, RoundMeter] = {}  # rounds this process committed, the last few
        # client_id -> (wire bytes of the rounds it trained, rounds it trained), in this process
        self._client_wire: dict[str, tuple[int, int]] = {}
        self._assigned: dict[str, ClientSession] = {}
        self._blocks: dict[str, int] = {}  # the open attempt's block clients -> their blocks
        self._last_blocks: dict[str, int] = {}  # every block client's latest block (/status)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()  # any session / round change wakes the driver
        self._stopping = asyncio.Event()
        self._server: Server | None = None
        self.port: int | None = None
        self.started_at = time.time()
        self.first_task_at: float | None = None
        self.finished = False
        self.final_status: dict[str, Any] | None = None
        # None: open mode (any client, nothing authenticated), for local federations.
        self.allowlist = allowlist
        self.ssl_context = ssl_context
        self.replay_guard = ReplayGuard(committed_round=ledger.last_round())
        self.federation = federation_info(config)
        # Cyclic block updates (FedCyBGD): which block each block client trains.
        self.block_schedule = config.block_schedule()
        if self.block_schedule is not None:
            self._check_block_seeds()

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the configured rounds are committed (or :meth:`stop`)."""
        async with serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=limits.MAX_FRAME_BYTES,
            max_queue=MAX_QUEUED_FRAMES,
            ssl=self.ssl_context,
            open_timeout=OPEN_TIMEOUT_S,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
            close_timeout=CLOSE_TIMEOUT_S,
            # Off: frames carry float32 scalars and hashes, which barely compress, and
            # deflate would cost CPU on every frame (and make frame bytes differ from
            # socket bytes in /status).
            compression=None,
            create_connection=_connection_class(self.gate),
        ) as server:
            self._server = server
            self.port = next(iter(server.sockets)).getsockname()[1]
            logger.info("coordinator %s listening on %s://%s:%d (ledger %s, last round %d)",
                        self.config.federation_id, "wss" if self.ssl_context else "ws", self.config.host,
                        self.port, self.config.ledger_path, self.ledger.last_round())
            if self.allowlist is None:
                logger.warning(OPEN_MODE_WARNING)
            else:
                logger.info("allow-list mode: %d client keys", len(self.allowlist))
            logger.info("page: %s", self.page_url())
            if self.config.quorum_defeats_robustness:
                logger.warning("quorum %d is below %d: a round of aggregation '%s' that commits on fewer than %d "
                               "updates uses the clipped unweighted mean, which one client can move",
                               self.config.commit_quorum, ROBUST_MIN_VALUES, self.config.aggregation,
                               ROBUST_MIN_VALUES)
            driver = asyncio.create_task(self._drive_rounds())
            stop = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait({driver, stop}, return_when=asyncio.FIRST_COMPLETED)
            if driver in done:
                driver.result()  # re-raise a driver failure
            else:
                driver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await driver
            stop.cancel()
            self.final_status = self.status()
            await self._say_goodbye("federation complete" if self.finished else "coordinator stopping")

    def stop(self) -> None:
        self._stopping.set()

    def page_url(self, host: str | None = None) -> str:
        """The live page's address (with the read token, if reads need one)."""
        scheme = "https" if self.ssl_context else "http"
        host = host or self.config.host
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        token = f"?token={self.read_token}" if self.read_token else ""
        return f"{scheme}://{host}:{self.port}/{token}"

    async def _say_goodbye(self, reason: str) -> None:
        async def goodbye(session: ClientSession) -> None:
            await self._send_safely(session, Goodbye(reason=reason))
            await _close(session.connection, 1000, reason)

        await asyncio.gather(*(goodbye(s) for s in list(self.sessions.values())))

    # -- rounds -----------------------------------------------------------------------

    def _ready_clients(self) -> list[ClientSession]:
        """Clients that can take a task now: synced, idle, trusted, and training ones."""
        last = self.ledger.last_round()
        return [s for s in self.sessions.values()
                if s.round == last and s.busy_round is None and not s.flagged and s.mode != OBSERVER_MODE]

    async def _wait_for(self, predicate: Any, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            self._changed.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races with the event (stop() would then wait for the driver forever).
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return predicate()
        return True

    def _poke(self) -> None:
        self._changed.set()
        self.feed.bump()  # open pages refresh

    async def _drive_rounds(self) -> None:
        config = self.config
        while config.rounds == 0 or self.ledger.last_round() < config.rounds:
            await self._wait_for(lambda: len(self._ready_clients()) >= config.min_clients)
            round_number = self.ledger.last_round() + 1
            attempt = 0
            while True:
                await self._wait_for(lambda: len(self._ready_clients()) >= config.min_clients)
                committed = await self._run_attempt(round_number, attempt)
                if committed:
                    break
                attempt += 1
            if config.commit_wait_s:
                await self._wait_for(self._all_reported, config.commit_wait_s)
        self.finished = True
        logger.info("all %d rounds committed; waiting for fingerprints", config.rounds)
        await self._wait_for(self._all_reported, FINAL_FINGERPRINT_WAIT_S)
        self._log_fingerprint_agreement(self.ledger.last_round())

    def _all_reported(self) -> bool:
        last = self.ledger.last_round()
        if not all(s.round >= last for s in self.sessions.values()):
            return False
        if self.finished and last > 0:
            # Also the clients that trained the last round, connected or not yet: after a
            # restart on a finished ledger they may still be one commit short.
            expected = {c.client_id for c in self.ledger.contributions(last)}
            return all(cid in self.sessions and self.sessions[cid].round >= last for cid in expected)
        return True

    def _seeds_for(self, round_number: int, attempt: int, count: int) -> list[int]:
        return draw_seeds(self.pool_key, self.config.seed_pool_size, round_number, attempt, count)

    def _block_seeds_for(self, round_number: int, attempt: int, block: int, count: int) -> list[int]:
        """``count`` distinct seeds of ``block``'s (PROTOCOL.md §5.5), drawn for the attempt;
        clients given the same block in an attempt get the same seeds."""
        rng = random.Random(f"{self.pool_key}:{round_number}:{attempt}:block:{block}")
        indices = rng.sample(range(self.config.block_seeds), count)
        return [block_seed(self.config.federation_id, block, index) for index in indices]

    def _check_block_seeds(self) -> None:
        """Refuse to start where a pool seed is also a block seed (about n²/2⁶⁴: it would
        give that seed two directions)."""
        assert self.block_schedule is not None
        pool = {pool_seed(self.pool_key, index) for index in range(self.config.seed_pool_size)}
        blocks = block_seed_map(self.config.federation_id, self.block_schedule.blocks, self.config.block_seeds)
        if pool & blocks.keys():
            raise ValueError("a seed of the pool is also a block seed; choose another pool_key")

    def _rates_for(self, chosen: list[ClientSession]) -> dict[str, float]:
        """The chosen clients' personalised learning rates (empty when they are off)."""
        if self.statistics is None:
            return {}
        ids = [session.client_id for session in chosen]
        return personalised_rates(self.config.learning_rate, self.config.personalised_lr_spread, ids,
                                  self.statistics.values(ids))

    def _task_for(self, session: ClientSession, round_number: int, attempt: int, seeds: list[int],
                  learning_rate: float | None = None) -> RoundTask:
        """The client's task: the first ``seeds_for_mode`` seeds of the attempt, its
        learning rate (its personalised one, else the federation's) and its mode's
        settings (PROTOCOL.md §6.11)."""
        config = self.config
        block = self._blocks.get(session.client_id)
        return RoundTask(
            round=round_number, attempt=attempt, base_round=round_number - 1,
            seeds=tuple(seeds[:config.seeds_for_mode(session.mode)] if block is None else seeds),
            learning_rate=config.learning_rate if learning_rate is None else learning_rate,
            epsilon=config.epsilon, batch_size=config.batch_size,
            max_seq_len=config.max_seq_len, scope=config.scope, deadline_s=config.deadline_s,
            settings=tuple(sorted({**config.settings_for_mode(session.mode),
                                   **self.adaptive.assign(session.client_id, session.mode, round_number),
                                   **({} if block is None else {"block": block})}.items())),
        )

    async def _run_attempt(self, round_number: int, attempt: int) -> bool:
        config = self.config
        ready = sorted(self._ready_clients(), key=lambda s: s.client_id)
        chosen = draw_clients(self.pool_key, round_number, attempt, ready, config.clients_per_round)
        # As many seeds as the chosen clients' modes need; each client gets a prefix.
        # Block clients (FedCyBGD) get their block's own seeds, after the others.
        by_block = [s for s in chosen if s.mode == BLOCK_MODE and self.block_schedule is not None]
        whole = [s for s in chosen if s not in by_block]
        seeds = self._seeds_for(round_number, attempt, max(config.seeds_for_mode(s.mode) for s in whole)) \
            if whole else []
        self._blocks = ({} if self.block_schedule is None else
                        self.block_schedule.assign([(s.client_id, s.blocks) for s in by_block]))
        self._last_blocks.update(self._blocks)
        block_seeds: dict[int, list[int]] = {}
        for block in sorted(set(self._blocks.values())):
            block_seeds[block] = self._block_seeds_for(round_number, attempt, block, config.seeds_for_mode(BLOCK_MODE))
            seeds += block_seeds[block]
        rates = self._rates_for(chosen)
        tasks = {session.client_id: self._task_for(session, round_number, attempt,
                                                   block_seeds[self._blocks[session.client_id]]
                                                   if session.client_id in self._blocks else seeds,
                                                   rates.get(session.client_id))
                 for session in chosen}
        quorum = min(config.commit_quorum, len(chosen))
        machine = RoundMachine(round_number, attempt, seeds, [s.client_id for s in chosen], quorum,
                               client_seeds={cid: task.seeds for cid, task in tasks.items()})
        self.machine = machine
        if self.first_task_at is None:
            self.first_task_at = time.time()
        logger.info("round %d attempt %d: %d seeds to %s", round_number, attempt, len(seeds),
                    ", ".join(f"{s.client_id} ({s.mode}, {len(tasks[s.client_id].seeds)}"
                              + (f", block {self._blocks[s.client_id]}" if s.client_id in self._blocks else "")
                              + (f", lr {rates[s.client_id]:.3g})" if rates else ")") for s in chosen))
        for session in chosen:
            session.busy_round = round_number
        self._assigned = {session.client_id: session for session in chosen}
        self._attempt_started = time.monotonic()
        self._poke()  # the page shows the open round
        for session in chosen:  # in the background, as _broadcast does: a client that does not read holds up no one
            self._spawn(self._send_safely(session, tasks[session.client_id]))
        finished = await self._wait_for(lambda: machine.is_ready() or self._no_one_left_to_answer(machine),
                                        config.deadline_s)
        if not machine.is_ready():
            state = machine.deadline()
            if state is RoundState.ABANDONED:
                logger.warning("round %d attempt %d abandoned: %d of %d updates, quorum %d%s",
                               round_number, attempt, len(machine.updates), len(chosen), quorum,
                               "" if finished else " (deadline)")
                self.metrics.attempts_abandoned.labels(reason="quorum").inc()
                self._release(chosen)
                return False
        # A client flagged (fingerprint mismatch) after it got the task is left out.
        flagged = {cid for cid in machine.updates if (s := self.sessions.get(cid)) is not None and s.flagged}
        updates = [machine.updates[cid] for cid in sorted(machine.updates) if cid not in flagged]
        if flagged and len(updates) < quorum:
            logger.warning("round %d attempt %d abandoned: %d updates once flagged clients (%s) are left out, "
                           "quorum %d", round_number, attempt, len(updates), ", ".join(sorted(flagged)), quorum)
            self.metrics.attempts_abandoned.labels(reason="quorum").inc()
            self._release(chosen)
            return False
        # The seeds some received update carries: seeds only clients that did not answer
        # were handed would commit zeros that every client must still apply.
        carried = {seed for update in updates for seed, _ in update.pairs}
        answered = [seed for seed in machine.seeds if seed in carried]
        try:
            report = aggregate_with_report(answered, updates, config.learning_rate, config.aggregation_rule,
                                           rate_scales={cid: rate / config.learning_rate for cid, rate in rates.items()})
        except TableError as error:
            logger.error("round %d attempt %d: aggregation failed: %s", round_number, attempt, error)
            self.metrics.attempts_abandoned.labels(reason="aggregation").inc()
            self._release(chosen)
            return False
        log_report(report)
        contributions = [
            Contribution(u.client_id, u.num_examples, u.loss_before, u.loss_after, tuple(u.pairs),
                         learning_rate=rates.get(u.client_id))
            for u in updates
        ]
        try:
            commit_started = time.perf_counter()
            record = self.ledger.commit_round(round_number, attempt, report.coefficients, contributions)
            self.metrics.ledger_commit.observe(time.perf_counter() - commit_started)
            self.replay_guard.committed(round_number)
        except (LedgerError, TableError) as error:
            # Nothing was written: abandon this attempt, keep serving, retry with new seeds.
            logger.error("round %d attempt %d could not be committed: %s", round_number, attempt, error)
            self.metrics.attempts_abandoned.labels(reason="ledger").inc()
            self._release(chosen)
            return False
        machine.committed()
        self.metrics.rounds_committed.inc()
        if self._attempt_started is not None:
            self.metrics.round_duration.observe(time.monotonic() - self._attempt_started)
        if self.statistics is not None:
            for update in updates:
                self.statistics.observe(update.client_id, update.loss_after, [value for _, value in update.pairs])
        # Before the commit goes out: its frame, and all that follows, belongs to the next round.
        self._meter_round(round_number, {u.client_id for u in updates}, report.values_min, report.robust)
        self._release(chosen)
        logger.info("round %d committed: %d updates, loss %.4f -> %.4f", round_number, record.num_updates,
                    record.loss_before or float("nan"), record.loss_after or float("nan"))
        if config.aggregation in ROBUST_METHODS and not report.robust:
            logger.warning("round %d committed with only %d values for some seed; the robust method '%s' needs %d, "
                           "so this round used the clipped unweighted mean", round_number, report.values_min,
                           config.aggregation, ROBUST_MIN_VALUES)
        commit = RoundCommit(
            round=record.round, attempt=record.attempt, coefficients=record.coefficients, totals=record.totals,
            table_digest=record.table_digest, num_updates=record.num_updates,
        )
        await self._broadcast(list(self.sessions.values()), commit)
        self._poke()
        return True

    def _meter_round(self, round_number: int, trainers: set[str], values_min: int, robust: bool) -> None:
        """Close round ``round_number``'s byte count: the bytes on each trainer's
        connection(s) since the previous commit are this round's; every other
        connection starts counting for the next round too."""
        sessions = {id(s): s for s in (*self.sessions.values(), *self._assigned.values())}
        by_trainer: dict[str, int] = {}
        total_up = total_down = 0
        for session in sessions.values():
            up, down = session.take_wire_bytes()
            if session.client_id in trainers:  # a client that reconnected mid-round has two connections
                by_trainer[session.client_id] = by_trainer.get(session.client_id, 0) + up + down
                total_up += up
                total_down += down
        for client_id, round_bytes in by_trainer.items():
            so_far, rounds = self._client_wire.get(client_id, (0, 0))
            self._client_wire[client_id] = (so_far + round_bytes, rounds + 1)
        self._round_meters[round_number] = RoundMeter(total_up, total_down, values_min, robust)
        while len(self._round_meters) > ROUND_METERS_KEPT:
            del self._round_meters[min(self._round_meters)]

    def _no_one_left_to_answer(self, machine: RoundMachine) -> bool:
        """Every assigned client that has not answered has lost the connection it got the
        task on (a reconnected client never received this task): waiting longer is useless,
        so the deadline rule decides now (commit on quorum, else abandon)."""
        return all(self.sessions.get(cid) is not self._assigned.get(cid) or self._assigned[cid].flagged
                   for cid in machine.missing())

    def _release(self, chosen: list[ClientSession]) -> None:
        """The attempt ended (committed or abandoned): its clients are free again, and
        those whose update never came tell their adaptive settings so."""
        for session in chosen:
            session.busy_round = None
        if self.machine is not None:
            self.adaptive.attempt_ended(self.machine.round, [session.client_id for session in chosen])

    # -- fingerprints ---------------------------------------------------------------------

    def _check_fingerprints(self, round_number: int, client_id: str) -> None:
        """Flag the clients whose fingerprint of the round is not its majority's. Only the
        reporting client is looked at, unless the majority itself changed with its report
        (then everyone who reported for the round is): O(1) per report, not O(N)."""
        book = self.fingerprint_book
        reported = book.reports(round_number)
        if len(reported) < 2:
            return
        majority = book.majority(round_number)
        changed = self._majorities.get(round_number, "") != majority
        self._majorities[round_number] = majority
        while len(self._majorities) > ROUND_METERS_KEPT:
            del self._majorities[min(self._majorities)]
        if majority is None:
            if changed:
                logger.warning("round %d: fingerprints split evenly %s; no majority, nobody flagged",
                               round_number, dict(book.counts(round_number)))
            for cid in (reported if changed else (client_id,)):
                if cid in self.sessions:
                    self.sessions[cid].flagged = False
                    self.sessions[cid].flag_reason = None
            return
        for cid in (reported if changed else (client_id,)):
            session = self.sessions.get(cid)
            if session is None:
                continue
            disagrees = reported[cid] != majority
            if disagrees and not session.flagged:
                self.metrics.fingerprint_mismatches.inc()
                logger.warning("client %s: fingerprint of round %d disagrees with the majority; "
                               "left out of rounds and told to resync", cid, round_number)
                self._spawn(self._send_safely(session, Error(
                    code="fingerprint_mismatch", round=round_number, field="fingerprint.fingerprint",
                    message=f"your model after round {round_number} differs from the majority's; resync")))
            session.flagged = disagrees
            session.flag_reason = (f"its fingerprint of round {round_number} differs from the majority's"
                                   if disagrees else None)

    def _log_fingerprint_agreement(self, round_number: int) -> None:
        reported = self.fingerprint_book.reports(round_number)
        distinct = set(reported.values())
        logger.info("round %d: %d fingerprints, %d distinct", round_number, len(reported), len(distinct))

    # -- connections ------------------------------------------------------------------

    async def _send(self, connection: ServerConnection, message: Message) -> None:
        await connection.send(codec.encode(message))

    async def _send_safely(self, session: ClientSession, message: Message, frame: bytes | None = None) -> None:
        """Send (``frame``: ``message`` already encoded), never raising: a closed connection
        is logged; a client that does not take the message within SEND_TIMEOUT_S (it does
        not read) is disconnected."""
        try:
            frame = codec.encode(message) if frame is None else frame
            await asyncio.wait_for(session.connection.send(frame), SEND_TIMEOUT_S)
        except ConnectionClosed:
            logger.info("client %s: connection closed while sending %s", session.client_id, message.TYPE)
        except TimeoutError:
            logger.warning("client %s: not reading (%s not sent in %.1fs); disconnecting", session.client_id,
                           message.TYPE, SEND_TIMEOUT_S)
            self._spawn(_close(session.connection, 1008, "not reading"))

    async def _broadcast(self, sessions: list[ClientSession], message: Message) -> None:
        """Hand ``message`` to every session and return at once: each send finishes (or
        times out and drops its client) in the background, so a client that does not read
        never holds up the round driver, and through it everyone else. Sends to one
        connection still go out in the order they were started."""
        frame = codec.encode(message)
        for session in sessions:
            self._spawn(self._send_safely(session, message, frame))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)  # keep a reference until it finishes
        task.add_done_callback(self._tasks.discard)

    async def _refuse(self, connection: ServerConnection, error: PeerProtocolError) -> None:
        field_name = getattr(error, "path", None)
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await asyncio.wait_for(self._send(connection, Error(
                code=error.error_code, message=str(error)[:limits.MAX_STRING_CHARS], field=field_name, round=None)),
                SEND_TIMEOUT_S)
        await _close(connection, error.close_code, error.error_code)

    async def _receive(self, connection: ServerConnection, timeout: float | None = None) -> Message:
        frame = await asyncio.wait_for(connection.recv(), timeout)
        if isinstance(frame, str):
            raise _TextFrame()
        return codec.decode(frame)

    async def _handle(self, connection: MeteredConnection) -> None:
        if connection.request is not None and connection.request.path.split("?", 1)[0] == LIVE_PATH:
            self.gate.said_hello(connection)  # a page, let in by process_request: not a pending handshake
            await self.dashboard.serve_live(connection)
            return
        nonce = secrets.token_bytes(32)
        session: ClientSession | None = None
        try:
            challenge = Challenge(protocol_version=limits.PROTOCOL_VERSION, server_nonce=nonce,
                                  federation_id=self.config.federation_id, federation=self.federation)
            await self._send(connection, challenge)
            try:
                hello = await self._receive(connection, HANDSHAKE_TIMEOUT_S)
            except TimeoutError:
                await _close(connection, 1008, "no hello")
                return
            except VersionMismatch as error:
                await self._reject_version(connection, error)
                return
            session = await self._admit(connection, hello, challenge)
            if session is None:
                return
            while True:
                message = await self._receive(connection)
                await self._dispatch(session, message)
        except _TextFrame:
            await self._refuse(connection, _text_frame_error())
        except PeerProtocolError as error:
            logger.info("peer %s: %s", connection.remote_address, error)
            await self._refuse(connection, error)
        except ConnectionClosed:
            pass
        finally:
            if session is not None and self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
                logger.info("client %s disconnected", session.client_id)
                self._poke()

    async def _reject_version(self, connection: ServerConnection, error: VersionMismatch) -> None:
        await self._send(connection, Reject(code="version", message=str(error)[:limits.MAX_STRING_CHARS],
                                            supported_versions=(limits.PROTOCOL_VERSION,)))
        await connection.close(1002, "unsupported version")

    def _block_refusal(self, hello: Hello) -> str | None:
        """Why a block client cannot be served (None: it can): the federation offers no
        block mode, or the client can train none of the schedule's blocks."""
        if hello.mode != BLOCK_MODE:
            return None
        if self.block_schedule is None:
            return (f"this federation does not offer cyclic block updates (its config has no [modes.{BLOCK_MODE}] "
                    "table); run another mode")
        if hello.blocks and not set(hello.blocks) & set(self.block_schedule.blocks):
            return (f"the blocks this client can train ({', '.join(map(str, hello.blocks[:8]))}) are none of the "
                    f"federation's blocks")
        return None

    async def _admit(self, connection: MeteredConnection, hello: Message, challenge: Challenge
                     ) -> ClientSession | None:
        if isinstance(hello, Goodbye):  # e.g. the task does not fit the client's memory
            logger.info("peer %s declined to join: %s", connection.remote_address, hello.reason)
            await connection.close(1000, "goodbye")
            return None
        if not isinstance(hello, Hello):
            await self._send(connection, Reject(code="bad_hello", message=f"expected hello, got {hello.TYPE}",
                                                supported_versions=(limits.PROTOCOL_VERSION,)))
            await connection.close(1008, "expected hello")
            return None
        try:
            codec.check_version(hello.protocol_version)
        except VersionMismatch as error:
            await self._reject_version(connection, error)
            return None
        if hello.model_hash != self.config.model_hash:
            await self._send(connection, Reject(
                code="model_mismatch",
                message=f"base weights hash {hello.model_hash[:16]}... differs from the federation's "
                        f"{self.config.model_hash[:16]}... (model {self.config.model_name})",
                supported_versions=(limits.PROTOCOL_VERSION,)))
            await connection.close(1008, "model mismatch")
            return None
        if self.allowlist is not None:
            try:
                verify_hello(self.allowlist, challenge, hello)
            except IdentityRefused as refusal:
                logger.warning("peer %s refused as %r: %s", connection.remote_address, hello.client_id, refusal)
                await self._send(connection, Reject(code="not_allowed", message=str(refusal)[:limits.MAX_STRING_CHARS],
                                                    supported_versions=(limits.PROTOCOL_VERSION,)))
                await connection.close(1008, "not allowed")
                return None
        refusal = self._block_refusal(hello)
        if refusal is not None:
            await self._send(connection, Reject(code="bad_hello", message=refusal,
                                                supported_versions=(limits.PROTOCOL_VERSION,)))
            await connection.close(1008, "bad hello")
            return None
        previous = self.sessions.pop(hello.client_id, None)
        if previous is not None:
            logger.info("client %s reconnected; closing its previous connection", hello.client_id)
            # In the background: a half-open old link can take the whole close timeout.
            self._spawn(previous.connection.close(1000, "replaced by a new connection"))
        last = self.ledger.last_round()
        await self._send(connection, Welcome(client_id=hello.client_id, federation=self.federation,
                                             last_committed_round=last))
        # Not ready (round -1) until it reports a fingerprint: hello.last_round is only a claim.
        session = ClientSession(hello.client_id, connection, hello.device, hello.mode, round=-1, plan=hello.plan,
                                blocks=hello.blocks, challenge=challenge,
                                public_key=hello.public_key if self.allowlist is not None else None)
        self.sessions[hello.client_id] = session
        self.gate.said_hello(connection)  # no longer one an idle flood may push out
        try:
            self.ledger.record_client(hello.client_id, json.dumps(asdict(hello.device)), hello.mode)
        except LedgerError as error:  # e.g. a full disk: the registry row is informative, keep serving
            logger.error("client %s: could not record it in the ledger: %s", hello.client_id, error)
        logger.info("client %s joined (%s, mode %s, holds round %d of %d)%s", hello.client_id,
                    hello.device.device_type, hello.mode, hello.last_round, last,
                    f": {hello.plan}" if hello.plan else "")
        if self.ledger.last_round() != last:  # a round committed while we welcomed it
            await self._send_safely(session, self._sync_response(hello.last_round))
        self._poke()
        return session

    async def _dispatch(self, session: ClientSession, message: Message) -> None:
        if isinstance(message, (Update, PackedUpdate)):
            await self._on_update(session, message)
        elif isinstance(message, Fingerprint):
            self._on_fingerprint(session, message)
        elif isinstance(message, SyncRequest):
            await self._send_safely(session, self._sync_response(message.have_round))
        elif isinstance(message, Goodbye):
            logger.info("client %s said goodbye: %s", session.client_id, message.reason)
            await _close(session.connection, 1000, "goodbye")
        else:
            await self._send_safely(session, Error(code="unexpected", message=f"a client may not send {message.TYPE}",
                                                   field="type", round=None))

    async def _on_update(self, session: ClientSession, received: Update | PackedUpdate) -> None:
        machine = self.machine
        update = received
        try:
            if received.client_id != session.client_id:
                raise UpdateRefused("wrong_client", f"{received.TYPE}.client_id is not this connection's client",
                                    round=received.round, field=f"{received.TYPE}.client_id")
            self._authenticate(session, received)  # a packed update's signature covers the packed bytes
            if session.flagged:
                raise UpdateRefused("fingerprint_mismatch", "your model differs from the majority's; resync first",
                                    round=update.round, field="update.client_id")
            if machine is None:
                raise UpdateRefused("round_not_open", "no round is open", round=received.round,
                                    field=f"{received.TYPE}.round")
            check_losses(received)
            if isinstance(received, PackedUpdate):
                update = machine.unpack(received)  # the seeds it answers are the ones handed to it
            outcome = machine.receive(update)
        except UpdateRefused as refusal:
            self.metrics.updates_refused.labels(reason=refusal.code).inc()
            session.refusals[refusal.code] += 1
            self._poke()
            await self._send_safely(session, Error(code=refusal.code, message=refusal.message,
                                                   field=refusal.field, round=refusal.round))
            return
        if not outcome.duplicate:
            self.metrics.updates_accepted.inc()
            self.adaptive.update_received(session.client_id, update.round, update.loss_before, update.loss_after)
            session.rounds_participated += 1
            session.busy_round = None
            session.last_loss_before = update.loss_before
            session.last_loss_after = update.loss_after
        await self._send_safely(session, UpdateAck(round=update.round, attempt=update.attempt,
                                                   status="duplicate" if outcome.duplicate else "accepted"))
        self._poke()

    def _authenticate(self, session: ClientSession, update: Update | PackedUpdate) -> None:
        """In allow-list mode, the update must be signed by the key the hello proved, over
        this connection's challenge (so an altered, impersonated or replayed-elsewhere
        update fails), with a nonce not seen before (PROTOCOL.md §4.5.2).

        Raises:
            UpdateRefused: missing_signature, bad_signature, replay, out_of_window or
                too_many_updates.
        """
        if session.public_key is None or session.challenge is None:
            return
        try:
            verify_update(session.public_key, session.challenge, update)
            self.replay_guard.check(update)
        except IdentityRefused as refusal:
            logger.warning("client %s: update for round %d refused: %s", session.client_id, update.round, refusal)
            field = f"{update.TYPE}.signature" if refusal.reason.endswith("signature") else f"{update.TYPE}.nonce"
            raise UpdateRefused(refusal.reason, str(refusal), round=update.round, field=field) from None

    def _on_fingerprint(self, session: ClientSession, report: Fingerprint) -> None:
        if report.round > self.ledger.last_round():
            return
        try:
            self.ledger.record_fingerprint(report.round, session.client_id, report.fingerprint)
        except LedgerError as error:  # the in-memory check below still runs
            logger.error("client %s: could not record its round %d fingerprint: %s", session.client_id,
                         report.round, error)
        session.round = report.round
        session.fingerprint = report.fingerprint
        if report.eval_loss is not None and session.mode == OBSERVER_MODE:
            self._eval_losses.setdefault(report.round, {})[session.client_id] = report.eval_loss
            while len(self._eval_losses) > PAGE_HISTORY_ROUNDS:
                del self._eval_losses[min(self._eval_losses)]
        self.fingerprint_book.record(report.round, session.client_id, report.fingerprint)
        self._check_fingerprints(report.round, session.client_id)
        if report.round < self.ledger.last_round() and session.busy_round is None:
            # It missed a commit (it was welcomed or reconnected meanwhile): catch it up.
            self._spawn(self._send_safely(session, self._sync_response(report.round)))
        self._poke()

    def _sync_response(self, have_round: int) -> SyncResponse:
        return sync_response(self.ledger, self.config.rebase_every, have_round)

    # -- status ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        last = self.ledger.last_round()
        recent = self.ledger.rounds_between(max(0, last - 50), last)
        machine = self.machine
        return {
            "federation_id": self.config.federation_id,
            "model": self.config.model_name,
            "round": last,
            "rounds_total": self.config.rounds,
            "finished": self.finished,
            "uptime_s": round(time.time() - self.started_at, 1),
            # When this process handed out its first task (None before): with the rounds'
            # committed_at, how long the training took.
            "first_task_at": self.first_task_at,
            "open_round": None if machine is None or machine.state in (RoundState.COMMITTED, RoundState.ABANDONED)
            else {"round": machine.round, "attempt": machine.attempt, "assigned": sorted(machine.assigned),
                  "received": sorted(machine.updates), "quorum": machine.quorum,
                  "deadline_at": None if self._attempt_started is None
                  else round(time.time() + self.config.deadline_s - (time.monotonic() - self._attempt_started), 1)},
            "clients": [
                {"client_id": s.client_id, "mode": s.mode, "plan": s.plan, "device": asdict(s.device),
                 "round": s.round,
                 "busy_round": s.busy_round, "fingerprint": s.fingerprint,
                 "agrees": self._agrees(s), "flagged": s.flagged, "flag_reason": s.flag_reason,
                 "refusals": dict(sorted(s.refusals.items())),
                 "loss_before": s.last_loss_before, "loss_after": s.last_loss_after,
                 "rounds_participated": s.rounds_participated,
                 "adaptive": self.adaptive.status(s.client_id, s.mode),
                 # A block client's (FedCyBGD): the block of its latest task, and what its memory holds.
                 "block": self._last_blocks.get(s.client_id), "blocks_allowed": list(s.blocks) or None,
                 "wire_bytes_up": s.connection.wire_bytes_up, "wire_bytes_down": s.connection.wire_bytes_down,
                 "wire_bytes_per_round": self._wire_bytes_per_round(s.client_id)}
                for s in sorted(self.sessions.values(), key=lambda s: s.client_id)
            ],
            "rounds": [
                {"round": r.round, "attempt": r.attempt, "num_updates": r.num_updates,
                 "loss_before": r.loss_before, "loss_after": r.loss_after, "committed_at": r.committed_at,
                 "fingerprints": len(set(reports.values())), "fingerprint_reports": reports,
                 "eval_loss": self._eval_loss(r.round),
                 **self._round_meter_status(r.round)}
                for r in recent
                for reports in (dict(sorted(self.fingerprint_book.reports(r.round).items())),)
            ],
            "aggregation": {"method": self.config.aggregation, "robust_min_values": ROBUST_MIN_VALUES,
                            "quorum": self.config.commit_quorum},
        }

    def snapshot(self) -> dict[str, Any]:
        """What the live page shows: ``/status`` and the federation's settings, the
        per-round history of its charts, and the ledger's head. Nothing beyond /status
        about any client."""
        last = self.ledger.last_round()
        records = self.ledger.rounds_between(max(0, last - PAGE_HISTORY_ROUNDS), last)
        history = []
        for record in records:
            meter = self._round_meters.get(record.round)
            history.append({"round": record.round, "num_updates": record.num_updates,
                            "loss_before": record.loss_before, "loss_after": record.loss_after,
                            "eval_loss": self._eval_loss(record.round),
                            "wire_bytes_up": None if meter is None else meter.wire_bytes_up,
                            "wire_bytes_down": None if meter is None else meter.wire_bytes_down,
                            "committed_at": record.committed_at})
        head = records[-1] if records else None
        return {**self.status(), "config": self.config.public_settings(), "history": history,
                "ledger": {"head_round": last,
                           # Round 0's table is empty (PROTOCOL.md §6.4).
                           "table_digest": table_digest(()) if head is None else head.table_digest,
                           "committed_at": None if head is None else head.committed_at}}

    def _agrees(self, session: ClientSession) -> bool | None:
        """Whether the client's last fingerprint is its round's majority; None before it
        reported or while its round has no majority (one report, or an even split)."""
        if session.fingerprint is None or session.round < 0:
            return None
        majority = self.fingerprint_book.majority(session.round)
        if majority is None:
            return None if not session.flagged else False
        return session.fingerprint == majority

    def _eval_loss(self, round_number: int) -> float | None:
        """The held-out loss observers reported for the round (their mean); None if none."""
        losses = self._eval_losses.get(round_number)
        return sum(losses.values()) / len(losses) if losses else None

    def _wire_bytes_per_round(self, client_id: str) -> float | None:
        """Mean bytes (both directions) on the client's connection per round it trained in
        this process; None before its first."""
        total, rounds = self._client_wire.get(client_id, (0, 0))
        return total / rounds if rounds else None

    def _round_meter_status(self, round_number: int) -> dict[str, Any]:
        """A round's measured figures for /status; None for each where the round was
        committed before this process started."""
        meter = self._round_meters.get(round_number)
        if meter is None:
            return {"wire_bytes_up": None, "wire_bytes_down": None, "values_min": None, "robust": None}
        return {"wire_bytes_up": meter.wire_bytes_up, "wire_bytes_down": meter.wire_bytes_down,
                "values_min": meter.values_min, "robust": meter.robust}

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        return self.dashboard.respond(connection, request)


class _TextFrame(Exception):
    pass


def _text_frame_error() -> PeerProtocolError:
    from protocol.errors import MalformedFrame

    return MalformedFrame("text frames are not part of the protocol; send binary msgpack frames")


async def _close(connection: ServerConnection, code: int, reason: str) -> None:
    """Close; abort the TCP connection if that takes over CLOSE_TIMEOUT_S. websockets'
    close() first waits for the close frame to be written, which never happens while the
    peer does not read, and only then applies its own close timeout."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await connection.close(code, reason)
    except TimeoutError:
        connection.transport.abort()


class _CountingTransport:
    """The transport websockets writes through, counting the bytes it is handed (every
    frame of the connection and the handshake response); everything else is the wrapped
    transport's."""

    def __init__(self, transport: asyncio.Transport, connection: MeteredConnection) -> None:
        self._transport = transport
        self._connection = connection

    def write(self, data: bytes | bytearray | memoryview) -> None:
        size = memoryview(data).nbytes
        self._connection.wire_bytes_down += size
        if (metrics := self._connection.gate.metrics) is not None:
            metrics.bytes_out.inc(size)
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class MeteredConnection(ServerConnection):
    """A ServerConnection that counts the bytes it reads from its transport
    (``wire_bytes_up``) and writes to it (``wire_bytes_down``): the socket's bytes, or
    under TLS the bytes inside the TLS records. It also asks its
    :class:`ConnectionGate` to be let in as soon as it is accepted, before it costs a
    handshake. Subclassed per server by :func:`_connection_class` to bind the gate."""

    gate: ClassVar[ConnectionGate]
    wire_bytes_up: int = 0
    wire_bytes_down: int = 0
    gate_address: str | None = None  # the address the gate counts this connection under, while it does

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # websockets writes every byte through self.transport.write (Connection.send_data).
        super().connection_made(_CountingTransport(transport, self))  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        if not self.gate.admit(self, str(peer[0]) if isinstance(peer, tuple) else ""):
            transport.abort()

    def data_received(self, data: bytes) -> None:
        self.wire_bytes_up += len(data)
        if (metrics := self.gate.metrics) is not None:
            metrics.bytes_in.inc(len(data))
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.release(self)
        super().connection_lost(exc)


class ConnectionGate:
    """Which accepted TCP connections the coordinator keeps.

    * At most ``per_address`` open connections per peer IP address. At that cap the
      oldest connection of the address that has not said hello yet is dropped to make
      room; only when all of them have said hello is the new one refused. Many honest
      devices share one address behind a NAT: idle connections from one of them must not
      lock the others out.
    * At most ``in_handshake`` connections, over all addresses, that have not said hello
      yet: at that cap the oldest of them is dropped, so connections from many addresses
      (a rotated IPv6 prefix) cannot exhaust the process.

    Either way a client that says hello promptly gets in: an attacker must open a cap's
    worth of new connections while it answers its challenge to push it out.
    """

    def __init__(self, per_address: int, in_handshake: int, *, metrics: CoordinatorMetrics | None = None) -> None:
        self.per_address = per_address
        self.in_handshake = in_handshake
        self.metrics = metrics  # counts refusals and evictions, and the bytes of the connections it admits
        self._open_from: Counter[str] = Counter()
        # Connections that have not said hello, oldest first (dicts keep insertion order).
        self._waiting: dict[MeteredConnection, None] = {}
        self._waiting_from: dict[str, dict[MeteredConnection, None]] = {}
        self.evicted = 0  # connections dropped to make room, since the start
        self.refused = 0  # connections refused at accept, since the start

    def admit(self, connection: MeteredConnection, address: str) -> bool:
        """Count a connection just accepted from ``address``, dropping an older one that
        has not said hello where a cap is reached. False: refuse it (every connection of
        the address has said hello)."""
        if self._open_from[address] >= self.per_address:
            oldest = next(iter(self._waiting_from.get(address, ())), None)
            if oldest is None:
                self.refused += 1
                if self.metrics is not None:
                    self.metrics.connections_refused.labels(reason="address_cap").inc()
                logger.debug("refusing a connection from %s: its %d connections have all said hello",
                             address, self.per_address)
                return False
            self._evict(oldest, f"{address} is at its cap of {self.per_address} connections")
        elif self._open_from[address] == self.per_address - 1:
            logger.warning("%s holds %d connections, the most one address may; from now on its oldest "
                           "connection that has not said hello makes room for a new one", address, self.per_address)
        if len(self._waiting) >= self.in_handshake:
            self._evict(next(iter(self._waiting)), f"{self.in_handshake} connections have not said hello")
        elif len(self._waiting) == self.in_handshake - 1:
            logger.warning("%d connections have not said hello, the most allowed; from now on the oldest of them "
                           "makes room for a new one", self.in_handshake)
        self._open_from[address] += 1
        connection.gate_address = address
        self._waiting[connection] = None
        self._waiting_from.setdefault(address, {})[connection] = None
        return True

    def said_hello(self, connection: MeteredConnection) -> None:
        """The connection's client has been welcomed: it no longer counts as waiting and
        is never dropped to make room."""
        address = connection.gate_address
        if address is None:
            return
        self._waiting.pop(connection, None)
        waiting_here = self._waiting_from.get(address)
        if waiting_here is not None:
            waiting_here.pop(connection, None)
            if not waiting_here:
                del self._waiting_from[address]

    def release(self, connection: MeteredConnection) -> None:
        """Forget a connection (it closed, or was dropped); idempotent."""
        address = connection.gate_address
        if address is None:
            return
        self.said_hello(connection)
        self._open_from[address] -= 1
        if not self._open_from[address]:
            del self._open_from[address]
        connection.gate_address = None

    def open_from(self, address: str) -> int:
        """Connections counted for ``address`` now."""
        return self._open_from.get(address, 0)

    @property
    def waiting(self) -> int:
        """Connections that have not said hello, over all addresses."""
        return len(self._waiting)

    def _evict(self, connection: MeteredConnection, why: str) -> None:
        logger.debug("dropping the connection from %s that has waited longest for its hello: %s",
                     connection.gate_address, why)
        self.release(connection)  # now: its connection_lost comes later, from the event loop
        self.evicted += 1
        if self.metrics is not None:
            self.metrics.connections_refused.labels(reason="evicted").inc()
        connection.transport.abort()


def _connection_class(gate: ConnectionGate) -> type[MeteredConnection]:
    """A :class:`MeteredConnection` class bound to ``gate`` (serve() builds each
    connection from a class)."""

    class GatedConnection(MeteredConnection):
        pass

    GatedConnection.gate = gate
    return GatedConnection
