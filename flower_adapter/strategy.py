"""A Flower strategy that runs this project's rounds: seeds out, scalars back, a ledger.

:class:`SeedScalarStrategy` is a ``flwr.serverapp.strategy.Strategy`` (Flower's current,
message-based strategy API), so Flower's own loop (``Strategy.start``) drives it and
Flower's tooling shows its metrics. What it does each Flower round is what the
coordinator does for one attempt (``Coordinator._run_attempt``):

1. **configure_train**: draw the attempt's clients and seeds by the coordinator's rules
   (:mod:`flower_adapter.federation`) and send each chosen node a ``round_task``, with
   whatever its process needs to reach the ledger's last round first. No arrays: the
   message is a few hundred bytes.
2. **aggregate_train**: check each answer with the protocol's round machine
   (:class:`protocol.round.RoundMachine`: right round and attempt, assigned, exactly
   its seeds, finite), combine the scalars per seed with the federation's robust rule
   (:func:`coordinator.aggregate.aggregate_with_report`) and commit the round to the
   ledger; too few updates abandon the attempt (the next Flower round retries with new
   seeds, attempt + 1), as a deadline without quorum does at the coordinator.
3. **configure_evaluate**: send every connected node the new round (the coordinator's
   ``round_commit`` broadcast).
4. **aggregate_evaluate**: record each node's fingerprint of the round in the ledger and
   flag the nodes that disagree with the majority (PROTOCOL.md §6.10); a flagged node
   trains no more until it has rebuilt its model (it is told to) and agrees again.

**Catching up.** Flower's simulation runs a node in whichever worker process is free, and
a deployment may start a fresh ClientApp process per message, so the strategy cannot
know what a node's process holds. Each answer names the process-level model copy that
gave it and the round it holds; the strategy sends what the most lagging copy it heard
from lately needs (the coordinator's ``sync_response`` rule). A copy that still cannot
reach the round answers with a ``sync_request`` instead, and is sent exactly what it asks
for within the same Flower round (then, failing that, a full snapshot): the protocol's
own ``sync_request``/``sync_response`` exchange, over Flower messages.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, MetricRecordValues
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from coordinator.aggregate import ROBUST_METHODS, aggregate_with_report, log_report
from coordinator.config import FederationConfig
from coordinator.ledger import CommittedRound, Contribution, Ledger, LedgerError
from coordinator.rules import check_losses
from flower_adapter.federation import (
    bind_ledger,
    check_supported,
    draw_clients,
    draw_seeds,
    federation_info,
    sync_response,
)
from flower_adapter.wire import Answer, Instruction, WireError, array_count, message_bytes
from protocol.messages import PackedUpdate, RoundTask, SyncResponse, Update, Welcome
from protocol.round import RoundMachine, RoundState, UpdateRefused
from protocol.table import TableError, table_digest

__all__ = ["AbortedFederation", "RoundReport", "SeedScalarStrategy"]

logger = logging.getLogger(__name__)

SYNC_RETRIES = 2  # per message: first what the copy asked for, then a full snapshot
FAILED_ATTEMPTS_TO_ABORT = 2  # attempts in a row in which every answer was an error
HOLDER_MEMORY_ROUNDS = 2  # a model copy not heard from for this many Flower rounds is forgotten
NODE_WAIT_POLL_S = 0.2


class AbortedFederation(RuntimeError):
    """Every client failed the same way twice in a row (a bad model path, an unknown mode):
    more rounds cannot help; the message carries the clients' reasons."""


@dataclass
class RoundReport:
    """What the strategy saw of one ledger round (one per attempt).

    Attributes:
        round, attempt: the ledger round and the attempt at it.
        committed: whether the attempt was committed to the ledger.
        trainers: client ids whose updates were combined.
        coefficients: the committed (seed, coefficient) pairs.
        loss_before, loss_after: example-weighted means over the updates.
        values_min, robust: as the coordinator reports them (PROTOCOL.md §8.2).
        bytes_down, bytes_up: bytes of every Flower message of the round, train and
            evaluate, catch-up retries included, as Flower serialises them
            (:func:`flower_adapter.wire.message_bytes`).
        node_bytes: per client id, its messages' bytes both ways.
        messages_down: messages sent; arrays_down: arrays (tensors) in them, always 0.
        sync_retries: messages re-sent because a node's process could not reach the round.
        fingerprints: client id -> its fingerprint of this round, once reported.
        flagged: clients whose fingerprint of this round differs from the majority's.
        failures: one line per node that failed (error replies, refused answers).
    """

    round: int
    attempt: int
    committed: bool = False
    trainers: tuple[str, ...] = ()
    coefficients: tuple[tuple[int, float], ...] = ()
    loss_before: float | None = None
    loss_after: float | None = None
    values_min: int = 0
    robust: bool = False
    bytes_down: int = 0
    bytes_up: int = 0
    node_bytes: dict[str, int] = field(default_factory=dict)
    messages_down: int = 0
    arrays_down: int = 0
    sync_retries: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)
    flagged: tuple[str, ...] = ()
    failures: list[str] = field(default_factory=list)

    @property
    def bytes_per_client(self) -> float:
        """Mean bytes (both ways) per client messaged in the round."""
        return sum(self.node_bytes.values()) / len(self.node_bytes) if self.node_bytes else 0.0


@dataclass
class _Attempt:
    """The open attempt: its task, its round machine and who was asked."""

    task: RoundTask
    machine: RoundMachine
    nodes: dict[int, str]  # node id -> client id, the chosen ones
    report: RoundReport


class SeedScalarStrategy(Strategy):
    """Seed/scalar rounds over Flower, committed to this project's ledger.

    Args:
        config: the federation's settings (what ``edgefed-coordinator`` reads from its
            TOML file): scope, seed pool, rates, aggregation rule, clients per round,
            quorum, deadline. ``min_clients`` is how many Flower nodes must be connected
            before a round starts; ``deadline_s`` bounds each exchange of messages.
        ledger: an open ledger (the strategy binds it to the federation's identity, as
            the coordinator does; another federation's ledger is refused). It is used
            from the thread that calls the strategy, which must be the one that opened it.
        mode: the training mode every client runs (an engine name: ``"mezo"``,
            ``"ferret"``, ...); its ``[modes.<mode>]`` table gives the seeds per round and
            the settings sent with each task.

    Raises:
        UnsupportedSetting: a coordinator feature this adapter does not drive.
        LedgerError: the ledger belongs to another federation.
    """

    def __init__(self, config: FederationConfig, ledger: Ledger, *, mode: str = "mezo") -> None:
        check_supported(config, mode)
        self.config, self.ledger, self.mode = config, ledger, mode
        self.pool_key = bind_ledger(config, ledger)
        self.federation = federation_info(config)
        self.reports: list[RoundReport] = []
        self.flagged: set[str] = set()  # client ids whose last fingerprint differed from the majority's
        self._grid: Grid | None = None
        self._flower_round = 0
        self._open: _Attempt | None = None
        self._committed: RoundReport | None = None  # committed in this Flower round: evaluate sends it
        self._next_attempt: dict[int, int] = {}  # ledger round -> next attempt number (this process)
        self._failed_in_row = 0
        self._holders: dict[str, tuple[int, int]] = {}  # model copy -> (round it holds, Flower round heard)
        self._syncs: dict[int, SyncResponse] = {}  # have_round -> response, for the current head
        self._head: tuple[int, str] | None = None  # (last round, its table digest), cached
        self._evaluated: dict[int, str] = {}  # node -> client id, asked in the open evaluate step
        self._evaluating: RoundReport | None = None  # the round the open evaluate step reports on

    # -- Flower's Strategy interface ---------------------------------------------------------

    def summary(self) -> None:
        config = self.config
        logger.info("edgefed seed/scalar strategy: federation %s, mode %s (%d seeds a round), scope %s, "
                    "aggregation %s, %d clients a round (quorum %d), ledger %s at round %d", config.federation_id,
                    self.mode, config.seeds_for_mode(self.mode), config.scope, config.aggregation,
                    config.clients_per_round, config.commit_quorum, self.ledger.path, self.ledger.last_round())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The attempt's ``round_task`` for each chosen node. ``arrays`` (Flower's global
        model) is never sent: the clients rebuild the model from the ledger."""
        del arrays, config  # no weights travel; the settings come from the federation's config
        self._grid, self._flower_round, self._committed = grid, server_round, None
        nodes = self._connected_nodes(grid)
        last = self.ledger.last_round()
        round_number = last + 1
        attempt = self._next_attempt.get(round_number, 0)
        self._next_attempt[round_number] = attempt + 1
        report = RoundReport(round=round_number, attempt=attempt)
        self.reports.append(report)
        ready = sorted((self.client_id(node), node) for node in nodes if self.client_id(node) not in self.flagged)
        chosen = dict((node, cid) for cid, node in draw_clients(self.pool_key, round_number, attempt, ready,
                                                                 self.config.clients_per_round))
        if not chosen:
            report.failures.append("no client ready (every connected node is flagged)")
            logger.warning("round %d attempt %d: no client ready", round_number, attempt)
            self._open = None
            return []
        seeds = draw_seeds(self.pool_key, self.config.seed_pool_size, round_number, attempt,
                           self.config.seeds_for_mode(self.mode))
        task = RoundTask(round=round_number, attempt=attempt, base_round=last, seeds=tuple(seeds),
                         learning_rate=self.config.learning_rate, epsilon=self.config.epsilon,
                         batch_size=self.config.batch_size, max_seq_len=self.config.max_seq_len,
                         scope=self.config.scope, deadline_s=self.config.deadline_s,
                         settings=tuple(sorted(self.config.settings_for_mode(self.mode).items())))
        quorum = min(self.config.commit_quorum, len(chosen))
        machine = RoundMachine(round_number, attempt, seeds, chosen.values(), quorum)
        self._open = _Attempt(task=task, machine=machine, nodes=chosen, report=report)
        logger.info("round %d attempt %d: %d seeds to %s", round_number, attempt, len(seeds),
                    ", ".join(sorted(chosen.values())))
        return [self._instruction(node, MessageType.TRAIN, report, task=task) for node in chosen]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the updates, combine them per seed and commit the round. Returns no
        arrays (there is no global model to hand Flower), and the round's figures."""
        del server_round
        attempt = self._open
        if attempt is None:
            return None, None
        self._open = None
        report, machine = attempt.report, attempt.machine
        answers = self._complete(replies, MessageType.TRAIN, report, attempt.nodes, task=attempt.task)
        errors = 0
        for node, answer in answers.items():
            client_id = attempt.nodes[node]
            if isinstance(answer, str):
                errors += 1
                report.failures.append(f"{client_id}: {answer}")
                continue
            try:
                self._accept(machine, client_id, answer)
            except UpdateRefused as refusal:
                report.failures.append(f"{client_id}: update refused ({refusal.code}): {refusal.message}")
        for failure in report.failures:
            logger.warning("round %d attempt %d: %s", report.round, report.attempt, failure)
        if not machine.is_ready() and machine.deadline() is RoundState.ABANDONED:
            self._abandon(report, f"{len(machine.updates)} of {len(attempt.nodes)} updates, quorum {machine.quorum}",
                          all_failed=not machine.updates and errors == len(answers) and errors > 0)
            return None, self._train_metrics(report)
        self._failed_in_row = 0
        updates = [machine.updates[cid] for cid in sorted(machine.updates)]
        carried = {seed for update in updates for seed, _ in update.pairs}
        try:
            aggregated = aggregate_with_report([s for s in machine.seeds if s in carried], updates,
                                               self.config.learning_rate, self.config.aggregation_rule)
            record = self.ledger.commit_round(report.round, report.attempt, aggregated.coefficients, [
                Contribution(u.client_id, u.num_examples, u.loss_before, u.loss_after, tuple(u.pairs))
                for u in updates])
        except (TableError, LedgerError) as error:
            self._abandon(report, f"could not be committed: {error}", all_failed=False)
            return None, self._train_metrics(report)
        machine.committed()
        log_report(aggregated)
        self._on_commit(record)
        report.committed, report.trainers = True, tuple(u.client_id for u in updates)
        report.coefficients = record.coefficients
        report.loss_before, report.loss_after = record.loss_before, record.loss_after
        report.values_min, report.robust = aggregated.values_min, aggregated.robust
        self._committed = report
        logger.info("round %d committed: %d updates, loss %.4f -> %.4f", record.round, record.num_updates,
                    record.loss_before if record.loss_before is not None else float("nan"),
                    record.loss_after if record.loss_after is not None else float("nan"))
        if self.config.aggregation in ROBUST_METHODS and not aggregated.robust:
            logger.warning("round %d committed with only %d values for some seed; the robust method '%s' needs 3, "
                           "so this round used the clipped unweighted mean", record.round, aggregated.values_min,
                           self.config.aggregation)
        return None, self._train_metrics(report)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The round just committed, to every connected node (its ``round_commit``): each
        applies it and answers with its fingerprint. When no round committed, only the
        flagged nodes are asked (to rebuild the last round and report it again), so a
        federation whose rounds fail still repairs them."""
        del server_round, arrays, config
        nodes = sorted(grid.get_node_ids())
        report = self._committed
        if report is None:
            nodes = [node for node in nodes if self.client_id(node) in self.flagged]
            if not nodes:
                return []
            report = self._head_report()
        self._evaluating = report
        self._evaluated = {node: self.client_id(node) for node in nodes}
        return [self._instruction(node, MessageType.EVALUATE, report) for node in self._evaluated]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the fingerprints of the round and flag the nodes that disagree with the
        majority (``Coordinator._check_fingerprints``)."""
        del server_round
        report, self._evaluating, self._committed = self._evaluating, None, None
        if report is None:
            return None
        nodes, self._evaluated = self._evaluated, {}
        answers = self._complete(replies, MessageType.EVALUATE, report, nodes)
        answered: dict[str, str] = {}
        for node, answer in answers.items():
            client_id = nodes[node]
            if isinstance(answer, str):
                report.failures.append(f"{client_id}: {answer}")
                continue
            if answer.fingerprint is None or answer.fingerprint.round != report.round:
                report.failures.append(f"{client_id}: no fingerprint of round {report.round} in its answer")
                continue
            answered[client_id] = report.fingerprints[client_id] = answer.fingerprint.fingerprint
            try:
                self.ledger.record_fingerprint(report.round, client_id, answer.fingerprint.fingerprint)
            except LedgerError as error:
                logger.error("could not record %s's fingerprint of round %d: %s", client_id, report.round, error)
        self._check_fingerprints(report, answered)
        distinct = len(set(report.fingerprints.values()))
        logger.info("round %d: %d fingerprints, %d distinct", report.round, len(report.fingerprints), distinct)
        return MetricRecord({"round": report.round, "fingerprints": len(report.fingerprints),
                             "fingerprints-distinct": distinct, "flagged": len(report.flagged),
                             "bytes-down": report.bytes_down, "bytes-up": report.bytes_up})

    # -- nodes and messages --------------------------------------------------------------------

    @staticmethod
    def client_id(node_id: int) -> str:
        """The id a Flower node has in the ledger (its contributions, its fingerprints)."""
        return f"node-{node_id}"

    def _connected_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once ``min_clients`` are (waiting at most ``deadline_s``)."""
        deadline = time.monotonic() + self.config.deadline_s
        while len(nodes := sorted(grid.get_node_ids())) < self.config.min_clients and time.monotonic() < deadline:
            time.sleep(NODE_WAIT_POLL_S)
        if len(nodes) < self.config.min_clients:
            logger.warning("only %d of the %d clients needed are connected after %.0fs; going on with them",
                           len(nodes), self.config.min_clients, self.config.deadline_s)
        return nodes

    def _head_state(self) -> tuple[int, str]:
        """(last committed round, the digest of the table after it)."""
        if self._head is None:
            last = self.ledger.last_round()
            self._head = (last, self.ledger.get_round(last).table_digest if last else table_digest([]))
        return self._head

    def _on_commit(self, record: CommittedRound) -> None:
        self._head, self._syncs = (record.round, record.table_digest), {}

    def _sync_for(self, have_round: int) -> SyncResponse:
        if have_round not in self._syncs:
            self._syncs[have_round] = sync_response(self.ledger, self.config.rebase_every, have_round)
        return self._syncs[have_round]

    def _laggard_round(self) -> int:
        """The round of the most lagging model copy heard from lately: what a message
        must carry so that any of them can reach the head. 0 (a snapshot) when none is
        known: a fresh server on an old ledger knows nothing of the clients' copies."""
        recent = [held for held, heard in self._holders.values()
                  if heard > self._flower_round - HOLDER_MEMORY_ROUNDS]
        return min(recent) if recent else 0

    def _instruction(self, node: int, message_type: str, report: RoundReport, *, task: RoundTask | None = None,
                     have_round: int | None = None) -> Message:
        """The message for ``node``: the ledger's head, what its process may lack to
        reach it, and the task (train) or nothing more (evaluate)."""
        last, digest = self._head_state()
        client_id = self.client_id(node)
        resync = client_id in self.flagged
        have = 0 if resync else self._laggard_round() if have_round is None else have_round
        sync = self._sync_for(have) if have < last or resync else None
        instruction = Instruction(welcome=Welcome(client_id=client_id, federation=self.federation,
                                                  last_committed_round=last),
                                  table_digest=digest, mode=self.mode, sync=sync, resync=resync, task=task)
        message = Message(instruction.to_record(), dst_node_id=node, message_type=message_type)
        size = message_bytes(message)
        report.bytes_down += size
        report.node_bytes[client_id] = report.node_bytes.get(client_id, 0) + size
        report.messages_down += 1
        report.arrays_down += array_count(message.content)
        return message

    def _read(self, reply: Message, report: RoundReport) -> Answer | str:
        """A reply as an answer, or the one-line reason it is not one."""
        size = message_bytes(reply)
        client_id = self.client_id(reply.metadata.src_node_id)
        report.bytes_up += size
        report.node_bytes[client_id] = report.node_bytes.get(client_id, 0) + size
        if reply.has_error():
            return f"failed: {reply.error.reason}"
        try:
            answer = Answer.from_record(reply.content)
        except WireError as error:
            return str(error)
        self._holders[answer.holder] = (answer.held, self._flower_round)
        return answer

    def _complete(self, replies: Iterable[Message], message_type: str, report: RoundReport,
                  nodes: dict[int, str], *, task: RoundTask | None = None) -> dict[int, Answer | str]:
        """Every asked node's final answer: a node whose process could not reach the round
        asked for what it lacks; it is sent that (then, if need be, a full snapshot) and
        its new answer replaces the request."""
        answers: dict[int, Answer | str] = {}
        pending: dict[int, int] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in nodes:
                continue
            answer = self._read(reply, report)
            answers[node] = answer
            if isinstance(answer, Answer) and answer.sync_request is not None:
                pending[node] = answer.sync_request.have_round
        for retry in range(SYNC_RETRIES):
            if not pending:
                break
            assert self._grid is not None
            report.sync_retries += len(pending)
            logger.info("round %d: %d node(s) could not reach the round from what was sent; sending them what they "
                        "asked for", report.round, len(pending))
            messages = [self._instruction(node, message_type, report, task=task,
                                          have_round=have if retry == 0 else 0) for node, have in pending.items()]
            pending = {}
            for reply in self._grid.send_and_receive(messages, timeout=self.config.deadline_s):
                node = reply.metadata.src_node_id
                answer = self._read(reply, report)
                answers[node] = answer
                if isinstance(answer, Answer) and answer.sync_request is not None:
                    pending[node] = answer.sync_request.have_round
        for node in nodes:
            final = answers.get(node)
            if final is None:
                answers[node] = f"no answer within {self.config.deadline_s:g}s"
            elif isinstance(final, Answer) and final.sync_request is not None:
                answers[node] = (f"could not reach the ledger's round {self._head_state()[0]} even from a snapshot "
                                 f"(it holds round {final.sync_request.have_round})")
        return answers

    # -- updates and fingerprints ----------------------------------------------------------------

    @staticmethod
    def _accept(machine: RoundMachine, client_id: str, answer: Answer) -> None:
        """Pass an answer's update through the round machine (PROTOCOL.md §7.2's checks)."""
        received = answer.update
        if received is None:
            raise UpdateRefused("invalid_field", "the answer carries no update", round=machine.round)
        if received.client_id != client_id:
            raise UpdateRefused("wrong_client", f"the update names client {received.client_id!r}",
                                round=received.round, field=f"{received.TYPE}.client_id")
        check_losses(received)  # the coordinator's check 7 (PROTOCOL.md §7.2)
        update: Update = machine.unpack(received) if isinstance(received, PackedUpdate) else received
        machine.receive(update)

    def _abandon(self, report: RoundReport, why: str, *, all_failed: bool) -> None:
        logger.warning("round %d attempt %d abandoned: %s", report.round, report.attempt, why)
        report.failures.append(f"abandoned: {why}")
        self._failed_in_row = self._failed_in_row + 1 if all_failed else 0
        if self._failed_in_row >= FAILED_ATTEMPTS_TO_ABORT:
            reasons = Counter(f.split(": ", 1)[1] for f in report.failures if not f.startswith("abandoned"))
            raise AbortedFederation(f"every client failed {self._failed_in_row} attempts in a row; they said: "
                                    + "; ".join(reason for reason, _ in reasons.most_common(3)))

    def _check_fingerprints(self, report: RoundReport, answered: dict[str, str]) -> None:
        """Flag every client that just answered with a fingerprint other than the
        majority's, unflag the others. The majority is over every report the ledger holds
        for the round (each client's latest), as the coordinator counts it; with no
        majority (the two most frequent values equally often) nobody is flagged."""
        reported = self.ledger.fingerprints(report.round)
        if len(reported) < 2:
            return
        ranked = Counter(reported.values()).most_common(2)
        if len(ranked) == 2 and ranked[0][1] == ranked[1][1]:
            logger.warning("round %d: fingerprints split evenly %s; no majority, nobody flagged", report.round,
                           dict(Counter(reported.values())))
            self.flagged -= answered.keys()
            report.flagged = ()
            return
        majority = ranked[0][0]
        disagree = {client for client, value in answered.items() if value != majority}
        for client in sorted(disagree - self.flagged):
            logger.warning("%s: fingerprint of round %d disagrees with the majority; left out of rounds and told to "
                           "rebuild", client, report.round)
        self.flagged = (self.flagged - answered.keys()) | disagree
        report.flagged = tuple(sorted(client for client, value in reported.items() if value != majority))

    def _head_report(self) -> RoundReport:
        """The report of the ledger's last round (made when another process committed it)."""
        last = self.ledger.last_round()
        for report in reversed(self.reports):
            if report.round == last and report.committed:
                return report
        record = self.ledger.get_round(last)
        report = RoundReport(round=last, attempt=record.attempt, committed=True, coefficients=record.coefficients,
                             trainers=tuple(c.client_id for c in self.ledger.contributions(last)))
        self.reports.append(report)
        return report

    @staticmethod
    def _train_metrics(report: RoundReport) -> MetricRecord:
        metrics: dict[str, MetricRecordValues] = {
            "round": report.round, "attempt": report.attempt, "committed": int(report.committed),
            "updates": len(report.trainers), "values-min": report.values_min, "robust": int(report.robust),
            "bytes-down": report.bytes_down, "bytes-up": report.bytes_up, "sync-retries": report.sync_retries}
        if report.loss_before is not None and report.loss_after is not None:
            metrics.update({"loss-before": report.loss_before, "loss-after": report.loss_after})
        return MetricRecord(metrics)
