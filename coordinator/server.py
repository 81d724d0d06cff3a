"""The coordinator: an asyncio websockets server that runs rounds and keeps the ledger.

It never loads model weights. Per connection it speaks the handshake (challenge, hello,
welcome/reject) and then relays messages between the socket and the round driver; the
rules of a round live in :mod:`protocol.round`, the arithmetic in
:mod:`coordinator.aggregate`, storage in :mod:`coordinator.ledger`. A plain HTTP GET on
``/status`` of the same port returns the federation's state as JSON.
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
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from coordinator.aggregate import aggregate
from coordinator.allowlist import (
    OPEN_MODE_WARNING,
    Allowlist,
    IdentityRefused,
    ReplayGuard,
    verify_hello,
    verify_update,
)
from coordinator.config import FederationConfig
from coordinator.ledger import Contribution, Ledger, LedgerError
from protocol import codec, limits
from protocol.errors import PeerProtocolError, VersionMismatch
from protocol.messages import (
    OBSERVER_MODE,
    Challenge,
    DeviceProfile,
    Error,
    FederationInfo,
    Fingerprint,
    Goodbye,
    Hello,
    Message,
    Reject,
    RoundCommit,
    RoundEntry,
    RoundTask,
    ScopeSpec,
    SyncRequest,
    SyncResponse,
    Update,
    UpdateAck,
    Welcome,
)
from protocol.round import RoundMachine, RoundState, UpdateRefused
from protocol.seeds import pool_seed
from protocol.table import TableError, table_digest

__all__ = ["Coordinator"]

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 30.0  # a client that does not say hello within this is dropped
SEND_TIMEOUT_S = 30.0  # a client whose connection does not take a message within this is dropped
# Connection limits (issue #10; PROTOCOL.md §2). Module constants so tests can shorten them;
# the per-address connection cap is FederationConfig.max_connections_per_address.
OPEN_TIMEOUT_S = 10.0  # the HTTP upgrade must be complete within this (a dribbled request is dropped)
PING_INTERVAL_S = 20.0  # keepalive ping period (PROTOCOL.md §2)
PING_TIMEOUT_S = 60.0  # a peer that leaves a ping unanswered this long is dropped
CLOSE_TIMEOUT_S = 10.0  # a close not completed within this aborts the TCP connection
MAX_QUEUED_FRAMES = 4  # received frames buffered per connection while its handler is busy (each <= 4 MiB)
MAX_ABS_LOSS = 1e30  # a reported loss beyond this is refused: summing such losses overflows the round's mean
FINAL_FINGERPRINT_WAIT_S = 120.0  # after the last round, how long to wait for fingerprints


@dataclass
class ClientSession:
    """What the coordinator knows about one connected client."""

    client_id: str
    connection: ServerConnection
    device: DeviceProfile
    mode: str
    round: int  # the last round this client holds (reported by fingerprint or hello)
    plan: str | None = None  # the client's own account of its mode, batch and memory
    challenge: Challenge | None = None  # sent on this connection; signatures are bound to it
    public_key: bytes | None = None  # proved by the hello (allow-list mode): updates must verify with it
    connected_at: float = field(default_factory=time.time)
    busy_round: int | None = None  # round it is training, until its update arrives
    fingerprint: str | None = None
    flagged: bool = False
    last_loss_before: float | None = None
    last_loss_after: float | None = None
    bytes_received: int = 0  # every frame this client sent since it connected, framing included
    round_bytes: dict[int, int] = field(default_factory=dict)  # update + fingerprint frames per round
    rounds_participated: int = 0  # updates accepted from it
    trained_rounds: set[int] = field(default_factory=set)


class Coordinator:
    """Runs one federation.

    Args:
        config: the federation's settings.
        ledger: an open ledger; its identity meta is checked against ``config``.
    """

    def __init__(self, config: FederationConfig, ledger: Ledger, *, allowlist: Allowlist | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.ledger = ledger
        for key, value in config.identity().items():
            ledger.set_meta_once(key, value)
        if config.pool_key is not None:
            ledger.set_meta_once("pool_key", str(config.pool_key))  # refuses a different stored key
        elif ledger.get_meta("pool_key") is None:
            ledger.set_meta_once("pool_key", str(secrets.randbits(63)))
        stored_pool_key = ledger.get_meta("pool_key")
        self.pool_key = int(stored_pool_key or 0)
        self.sessions: dict[str, ClientSession] = {}
        self.machine: RoundMachine | None = None
        self._assigned: dict[str, ClientSession] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()  # any session / round change wakes the driver
        self._stopping = asyncio.Event()
        self._server: Server | None = None
        self.port: int | None = None
        self.started_at = time.time()
        self.finished = False
        self.final_status: dict[str, Any] | None = None
        # None: open mode (any client, nothing authenticated), for local federations.
        self.allowlist = allowlist
        self.ssl_context = ssl_context
        self.replay_guard = ReplayGuard(committed_round=ledger.last_round())
        self.federation = FederationInfo(
            federation_id=config.federation_id,
            model_name=config.model_name,
            model_hash=config.model_hash,
            scope=ScopeSpec(
                kind=config.scope,
                lora_rank=config.lora_rank if config.scope == "lora" else 0,
                lora_alpha=config.lora_alpha,
                lora_targets=tuple(config.lora_targets) if config.scope == "lora" else (),
                lora_init_seed=config.lora_init_seed,
            ),
            seed_pool_size=config.seed_pool_size,
            rebase_every=config.rebase_every,
            perturbation=config.perturbation,
            aggregation=config.aggregation,
            learning_rate=config.learning_rate,
            epsilon=config.epsilon,
            local_steps=config.local_steps,
            batch_size=config.batch_size,
            max_seq_len=config.max_seq_len,
        )

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
            create_connection=_connection_class(self.config.max_connections_per_address),
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

    def _seeds_for(self, round_number: int, attempt: int) -> list[int]:
        rng = random.Random(f"{self.pool_key}:{round_number}:{attempt}")
        steps = self.config.local_steps
        indices = rng.sample(range(self.config.seed_pool_size), steps)
        return [pool_seed(self.pool_key, index) for index in indices]

    async def _run_attempt(self, round_number: int, attempt: int) -> bool:
        config = self.config
        ready = sorted(self._ready_clients(), key=lambda s: s.client_id)
        rng = random.Random(f"clients:{self.pool_key}:{round_number}:{attempt}")
        chosen = rng.sample(ready, min(config.clients_per_round, len(ready)))
        seeds = self._seeds_for(round_number, attempt)
        quorum = min(config.quorum, len(chosen))
        machine = RoundMachine(round_number, attempt, seeds, [s.client_id for s in chosen], quorum)
        self.machine = machine
        task = RoundTask(
            round=round_number, attempt=attempt, base_round=round_number - 1, seeds=tuple(seeds),
            learning_rate=config.learning_rate, epsilon=config.epsilon, batch_size=config.batch_size,
            max_seq_len=config.max_seq_len, scope=config.scope, deadline_s=config.deadline_s,
        )
        logger.info("round %d attempt %d: %d seeds to %s", round_number, attempt, len(seeds),
                    ", ".join(s.client_id for s in chosen))
        for session in chosen:
            session.busy_round = round_number
        self._assigned = {session.client_id: session for session in chosen}
        await self._broadcast(chosen, task)
        finished = await self._wait_for(lambda: machine.is_ready() or self._no_one_left_to_answer(machine),
                                        config.deadline_s)
        if not machine.is_ready():
            state = machine.deadline()
            if state is RoundState.ABANDONED:
                logger.warning("round %d attempt %d abandoned: %d of %d updates, quorum %d%s",
                               round_number, attempt, len(machine.updates), len(chosen), quorum,
                               "" if finished else " (deadline)")
                self._release(chosen)
                return False
        # A client flagged (fingerprint mismatch) after it got the task is left out.
        flagged = {cid for cid in machine.updates if (s := self.sessions.get(cid)) is not None and s.flagged}
        updates = [machine.updates[cid] for cid in sorted(machine.updates) if cid not in flagged]
        if flagged and len(updates) < quorum:
            logger.warning("round %d attempt %d abandoned: %d updates once flagged clients (%s) are left out, "
                           "quorum %d", round_number, attempt, len(updates), ", ".join(sorted(flagged)), quorum)
            self._release(chosen)
            return False
        try:
            coefficients = aggregate(machine.seeds, updates, config.learning_rate, config.aggregation_rule)
        except TableError as error:
            logger.error("round %d attempt %d: aggregation failed: %s", round_number, attempt, error)
            self._release(chosen)
            return False
        contributions = [
            Contribution(u.client_id, u.num_examples, u.loss_before, u.loss_after, tuple(u.pairs)) for u in updates
        ]
        try:
            record = self.ledger.commit_round(round_number, attempt, coefficients, contributions)
            self.replay_guard.committed(round_number)
        except (LedgerError, TableError) as error:
            # Nothing was written: abandon this attempt, keep serving, retry with new seeds.
            logger.error("round %d attempt %d could not be committed: %s", round_number, attempt, error)
            self._release(chosen)
            return False
        machine.committed()
        self._release(chosen)
        logger.info("round %d committed: %d updates, loss %.4f -> %.4f", round_number, record.num_updates,
                    record.loss_before or float("nan"), record.loss_after or float("nan"))
        commit = RoundCommit(
            round=record.round, attempt=record.attempt, coefficients=record.coefficients, totals=record.totals,
            table_digest=record.table_digest, num_updates=record.num_updates,
        )
        await self._broadcast(list(self.sessions.values()), commit)
        self._poke()
        return True

    def _no_one_left_to_answer(self, machine: RoundMachine) -> bool:
        """Every assigned client that has not answered has lost the connection it got the
        task on (a reconnected client never received this task): waiting longer is useless,
        so the deadline rule decides now (commit on quorum, else abandon)."""
        return all(self.sessions.get(cid) is not self._assigned.get(cid) or self._assigned[cid].flagged
                   for cid in machine.missing())

    def _release(self, chosen: list[ClientSession]) -> None:
        for session in chosen:
            session.busy_round = None

    # -- fingerprints ---------------------------------------------------------------------

    def _check_fingerprints(self, round_number: int) -> None:
        reported = self.ledger.fingerprints(round_number)
        if len(reported) < 2:
            return
        ranked = Counter(reported.values()).most_common(2)
        if len(ranked) == 2 and ranked[0][1] == ranked[1][1]:
            logger.warning("round %d: fingerprints split evenly %s; no majority, nobody flagged",
                           round_number, dict(Counter(reported.values())))
            for client_id in reported:
                if client_id in self.sessions:
                    self.sessions[client_id].flagged = False
            return
        majority = ranked[0][0]
        for client_id, value in reported.items():
            session = self.sessions.get(client_id)
            if session is None:
                continue
            disagrees = value != majority
            if disagrees and not session.flagged:
                logger.warning("client %s: fingerprint of round %d disagrees with the majority; "
                               "left out of rounds and told to resync", client_id, round_number)
                self._spawn(self._send_safely(session, Error(
                    code="fingerprint_mismatch", round=round_number, field="fingerprint.fingerprint",
                    message=f"your model after round {round_number} differs from the majority's; resync")))
            session.flagged = disagrees

    def _log_fingerprint_agreement(self, round_number: int) -> None:
        reported = self.ledger.fingerprints(round_number)
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

    async def _receive(self, connection: ServerConnection, timeout: float | None = None,
                       session: ClientSession | None = None) -> Message:
        frame = await asyncio.wait_for(connection.recv(), timeout)
        if isinstance(frame, str):
            raise _TextFrame()
        message = codec.decode(frame)
        if session is not None:
            size = len(frame) + websocket_frame_overhead(len(frame), masked=True)
            session.bytes_received += size
            if isinstance(message, (Update, Fingerprint)):
                session.round_bytes[message.round] = session.round_bytes.get(message.round, 0) + size
        return message

    async def _handle(self, connection: ServerConnection) -> None:
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
                message = await self._receive(connection, session=session)
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

    async def _admit(self, connection: ServerConnection, hello: Message, challenge: Challenge
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
                                challenge=challenge,
                                public_key=hello.public_key if self.allowlist is not None else None)
        self.sessions[hello.client_id] = session
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
        if isinstance(message, Update):
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

    async def _on_update(self, session: ClientSession, update: Update) -> None:
        machine = self.machine
        try:
            if update.client_id != session.client_id:
                raise UpdateRefused("wrong_client", "update.client_id is not this connection's client",
                                    round=update.round, field="update.client_id")
            self._authenticate(session, update)
            if session.flagged:
                raise UpdateRefused("fingerprint_mismatch", "your model differs from the majority's; resync first",
                                    round=update.round, field="update.client_id")
            if machine is None:
                raise UpdateRefused("round_not_open", "no round is open", round=update.round, field="update.round")
            for name in ("loss_before", "loss_after"):
                if abs(getattr(update, name)) > MAX_ABS_LOSS:
                    raise UpdateRefused("invalid_field", f"|{name}| exceeds {MAX_ABS_LOSS:g}", round=update.round,
                                        field=f"update.{name}")
            outcome = machine.receive(update)
        except UpdateRefused as refusal:
            await self._send_safely(session, Error(code=refusal.code, message=refusal.message,
                                                   field=refusal.field, round=refusal.round))
            return
        if not outcome.duplicate:
            session.rounds_participated += 1
            session.trained_rounds.add(update.round)
            session.busy_round = None
            session.last_loss_before = update.loss_before
            session.last_loss_after = update.loss_after
        await self._send_safely(session, UpdateAck(round=update.round, attempt=update.attempt,
                                                   status="duplicate" if outcome.duplicate else "accepted"))
        self._poke()

    def _authenticate(self, session: ClientSession, update: Update) -> None:
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
            field = "update.signature" if refusal.reason.endswith("signature") else "update.nonce"
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
        self._check_fingerprints(report.round)
        if report.round < self.ledger.last_round() and session.busy_round is None:
            # It missed a commit (it was welcomed or reconnected meanwhile): catch it up.
            self._spawn(self._send_safely(session, self._sync_response(report.round)))
        self._poke()

    def _sync_response(self, have_round: int) -> SyncResponse:
        target = self.ledger.last_round()
        rebase = target - target % self.config.rebase_every
        base = have_round if rebase <= have_round <= target else rebase
        rounds = self.ledger.rounds_between(base, target)
        # The client rebuilds from the table only at a rebase round (or the base weights);
        # from its own non-rebase round it applies the rounds on top of what it holds.
        table = tuple(self.ledger.table_at(base)) if base % self.config.rebase_every == 0 else ()
        return SyncResponse(
            target_round=target,
            base_round=base,
            table=table,
            rounds=tuple(RoundEntry(round=r.round, coefficients=r.coefficients) for r in rounds),
            table_digest=rounds[-1].table_digest if rounds else table_digest(self.ledger.table_at(target)),
        )

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
            "open_round": None if machine is None or machine.state in (RoundState.COMMITTED, RoundState.ABANDONED)
            else {"round": machine.round, "attempt": machine.attempt, "assigned": sorted(machine.assigned),
                  "received": sorted(machine.updates)},
            "clients": [
                {"client_id": s.client_id, "mode": s.mode, "plan": s.plan, "device": asdict(s.device),
                 "round": s.round,
                 "busy_round": s.busy_round, "fingerprint": s.fingerprint, "flagged": s.flagged,
                 "loss_before": s.last_loss_before, "loss_after": s.last_loss_after,
                 "bytes_received": s.bytes_received, "rounds_participated": s.rounds_participated,
                 "bytes_per_round": _mean_round_bytes(s)}
                for s in sorted(self.sessions.values(), key=lambda s: s.client_id)
            ],
            "rounds": [
                {"round": r.round, "attempt": r.attempt, "num_updates": r.num_updates,
                 "loss_before": r.loss_before, "loss_after": r.loss_after, "committed_at": r.committed_at,
                 "fingerprints": len(set(self.ledger.fingerprints(r.round).values()))}
                for r in recent
            ],
        }

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] not in ("/status", "/status/"):
            return None  # a websocket upgrade (or a 426 from websockets for other plain GETs)
        body = json.dumps(self.status(), indent=2).encode()
        headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                           ("Connection", "close")])
        return Response(HTTPStatus.OK.value, HTTPStatus.OK.phrase, headers, body)


def websocket_frame_overhead(payload: int, *, masked: bool) -> int:
    """Bytes a websocket frame adds to its payload (RFC 6455 §5.2): 2-byte header, a 2- or
    8-byte extended length beyond 125 or 65535 bytes, and a 4-byte mask on client frames."""
    extended = 0 if payload < 126 else 2 if payload < 65536 else 8
    return 2 + extended + (4 if masked else 0)


def _mean_round_bytes(session: ClientSession) -> float | None:
    """Mean bytes a client sent per round it trained (its update and its fingerprint)."""
    trained = [session.round_bytes.get(r, 0) for r in session.trained_rounds]
    return sum(trained) / len(trained) if trained else None


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


def _connection_class(per_address: int) -> type[ServerConnection]:
    """A ServerConnection that counts the open TCP connections of each peer address and
    aborts one over ``per_address`` as soon as it is accepted, before it costs a handshake:
    a flood of idle or dribbling connections from one host holds at most that many."""
    open_from: Counter[str] = Counter()

    class CappedConnection(ServerConnection):
        counted: str | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, tuple) else ""
            if open_from[address] >= per_address:
                logger.debug("refusing a connection from %s: it holds %d already", address, per_address)
                transport.abort()
                return
            open_from[address] += 1
            self.counted = address
            if open_from[address] == per_address:
                logger.warning("%s holds %d connections, the most one address may; refusing more",
                               address, per_address)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.counted is not None:
                open_from[self.counted] -= 1
                if not open_from[self.counted]:
                    del open_from[self.counted]
                self.counted = None
            super().connection_lost(exc)

    return CappedConnection
