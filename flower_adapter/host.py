"""A ClientApp process's model copy: one :class:`~edge_client.replica.Replica` that follows
the ledger and trains in turn for every Flower node the process runs.

Why one copy per process, not one per node: Flower's simulation runs a node in whichever
worker process is free (a node seldom runs twice in a row in the same one), and bit-exact
replay makes every node's model at round r the same θ_r (PROTOCOL.md §6). So a process
keeps one replica at the ledger's head and, before each node trains, returns it to the
round-start weights (the replica does); what stays per node is its data stream and its
client id. Memory is one model (plus the replica's round-start copies) per process,
however many nodes it serves.

The copy is rebuilt when the run, model, device or mode changes. Reaching the round an
instruction names follows the reference client (``EdgeClient._apply_sync``): apply the
rounds after the one held when the response covers it, else rebuild from the table,
else ask (``sync_request``) for what is missing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

from edge_client.daemon import build_update, plan_training
from edge_client.data import BatchStream, DataError, load_jsonl, resolve_prompt_format
from edge_client.device import detect_device
from edge_client.engines import Engine, EngineRefused, UnknownModeError, get_engine
from edge_client.model import DEFAULT_MODEL, ModelLoadError, base_weights_hash, is_hub_id, load_model, resolve_model
from edge_client.replica import Replica, federation_task
from edge_client.sync import RoundCoefficients, SyncError
from profiles.chooser import ModeUnavailable, NoModeFits
from profiles.estimator import ModelShape
from protocol.messages import FederationInfo, Fingerprint, PackedUpdate, RoundTask, SyncRequest, SyncResponse, Update

__all__ = ["ClientAppError", "ModelHost", "NodeSetup", "check_model_source", "engine_for"]

logger = logging.getLogger(__name__)


class ClientAppError(RuntimeError):
    """This node cannot take part; the message says why in one line (Flower reports it to
    the strategy as the node's error)."""


@dataclass(frozen=True)
class NodeSetup:
    """What one node trains with (resolved from its node config and the run config).

    Attributes:
        model: the model source: a Hugging Face model directory, a ``.gguf`` file, a
            hub id or the builtin ``smollm2-135m``; its weights must hash to the
            federation's ``model_hash``.
        data: the node's JSONL file of instruction/response records (it stays here).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        memory_budget_bytes: a budget the chooser plans within (None: the free memory).
        prompt_format: ``auto``, ``plain`` or ``chat``.
        cache_dir: the model conversion cache (None: the default).
        stream_name: what the node's batch order is seeded with (its partition, so a
            simulation's batches do not depend on Flower's random node ids).
    """

    model: str
    data: Path
    device: str = "auto"
    memory_budget_bytes: int | None = None
    prompt_format: str = "auto"
    cache_dir: str | None = None
    stream_name: str = ""


def check_model_source(source: str) -> None:
    """Refuse, before anything loads, a model source that names nothing (the builtin
    name, an existing path or a hub id are accepted; loading checks the rest)."""
    if source != DEFAULT_MODEL and not Path(source).expanduser().exists() and not is_hub_id(source):
        raise ClientAppError(f"model not found: {source!r} is not a model directory, a .gguf file, a Hugging Face "
                             f"hub id or {DEFAULT_MODEL!r}")


def engine_for(mode: str) -> type[Engine]:
    """The engine of ``mode``, if the adapter can run it (not one that needs an emulator
    or the coordinator's block schedule)."""
    try:
        engine_cls = get_engine(mode)
    except UnknownModeError as error:
        raise ClientAppError(str(error)) from None
    if engine_cls.needs_emulator:
        raise ClientAppError(f"mode {mode!r} trains through a FedBiOT emulator, which the Flower adapter does not "
                             f"load; choose a mode that trains the model itself")
    if engine_cls.needs_block_seeds:
        raise ClientAppError(f"mode {mode!r} needs the coordinator's block schedule, which the Flower adapter does "
                             f"not drive; choose another mode")
    return engine_cls


class ModelHost:
    """The process's model copy. Use :meth:`replica_for`, :meth:`reach`, then
    :meth:`train` or :meth:`fingerprint`, all under :attr:`lock`.

    Attributes:
        holder: this copy's id in answers, so the strategy can tell copies apart.
        lock: held by the ClientApp for a whole message (a process may serve several
            nodes; one message at a time moves the copy).
    """

    def __init__(self) -> None:
        self.holder = uuid.uuid4().hex[:16]
        self.lock = threading.Lock()
        self.replica: Replica | None = None
        self.plan = ""
        self._key: Hashable = None
        self._prompt_format = "plain"
        self._streams: dict[tuple[str, Path], BatchStream] = {}

    # -- the copy ----------------------------------------------------------------------------

    def replica_for(self, run_id: int, setup: NodeSetup, federation: FederationInfo, mode: str) -> Replica:
        """The replica for this run's federation and mode, built (loaded, planned,
        prepared) the first time.

        Raises:
            ClientAppError: the model cannot be loaded or is not the federation's, the
                mode is unknown or unavailable, or nothing fits the memory budget.
        """
        key = (run_id, setup.model, setup.device, setup.memory_budget_bytes, setup.cache_dir, mode, federation)
        if self.replica is not None and self._key == key:
            return self.replica
        self.replica, self._key, self._streams = None, None, {}  # let the old copy go first
        engine_cls = engine_for(mode)
        check_model_source(setup.model)
        started = time.perf_counter()
        try:
            report = detect_device(setup.device, memory_budget_bytes=setup.memory_budget_bytes)
            path = resolve_model(setup.model, cache_dir=Path(setup.cache_dir) if setup.cache_dir else None)
            model, tokenizer = load_model(path, device=str(report.torch_device))
        except (ModelLoadError, ValueError) as error:
            raise ClientAppError(f"cannot load the model {setup.model!r}: {error}") from None
        model_hash = base_weights_hash(model)
        if model_hash != federation.model_hash:
            raise ClientAppError(f"the model {setup.model!r} is not the federation's: its weights hash to "
                                 f"{model_hash[:16]}..., the federation trains {federation.model_hash[:16]}...")
        shape = ModelShape.from_hf_config(model.config.to_dict(), num_parameters=model.num_parameters())
        try:
            choice = plan_training(shape, federation_task(federation), report, copies="memory",
                                   rebase_every=federation.rebase_every, mode=mode,
                                   block_seeds=federation.block_seeds)
            replica = Replica(model, tokenizer, federation, engine_cls, choice=choice, shape=shape,
                              copies_owner=f"flower-{os.getpid()}")
        except (NoModeFits, ModeUnavailable, EngineRefused) as error:
            raise ClientAppError(str(error)) from None
        self._prompt_format = resolve_prompt_format(setup.prompt_format, tokenizer)
        self.replica, self._key, self.plan = replica, key, choice.explanation
        logger.info("model copy %s: %s on %s in %.1fs; plan: %s", self.holder, setup.model, report.torch_device,
                    time.perf_counter() - started, choice.explanation)
        return replica

    # -- reaching the ledger's round ------------------------------------------------------------

    def reach(self, target_round: int, table_digest: str, sync: SyncResponse | None, *,
              resync: bool = False) -> SyncRequest | None:
        """Bring the copy to ``target_round`` (whose table digest is ``table_digest``);
        None when it holds it, else the ``sync_request`` for what it still lacks.

        ``resync`` rebuilds from the base weights and the table even when the copy
        believes it holds the round (its fingerprint differed from the majority's).

        Raises:
            ClientAppError: a full snapshot does not rebuild the round (the ledger's
                rows and this model disagree: nothing more can be asked for).
        """
        replica = self.replica
        assert replica is not None
        if not resync and replica.round == target_round and replica.table_digest() == table_digest:
            return None
        if sync is None:
            return SyncRequest(have_round=0 if resync or replica.round >= target_round else replica.round)
        rounds = [RoundCoefficients(entry.round, tuple(entry.coefficients)) for entry in sync.rounds]
        held = replica.round
        if not resync and sync.base_round <= held <= sync.target_round and (held > 0 or sync.base_round == 0):
            try:  # the copy holds a round the response covers: apply the ones after it
                for entry in rounds:
                    if entry.round > replica.round:
                        replica.apply_commit(entry.round, entry.coefficients)
                if replica.table_digest() == sync.table_digest:
                    return None
                logger.warning("model copy %s: table digest differs after applying rounds %d..%d; rebuilding",
                               self.holder, held + 1, sync.target_round)
            except SyncError as error:
                logger.warning("model copy %s: cannot apply the rounds after %d (%s); rebuilding", self.holder,
                               held, error)
        if sync.base_round == 0 or replica.sync.is_rebase(sync.base_round):
            try:  # a snapshot: rebuild from the base weights and the table (PROTOCOL.md §6.9)
                replica.catch_up(sync.base_round, sync.table, rounds, sync.table_digest)
                return None
            except SyncError as error:
                if sync.base_round == 0:
                    raise ClientAppError(f"the ledger's rounds do not rebuild round {sync.target_round} from this "
                                         f"model: {error}") from None
                logger.warning("model copy %s: rebuild from round %d failed (%s); asking for a full sync",
                               self.holder, sync.base_round, error)
                return SyncRequest(have_round=0)
        return SyncRequest(have_round=0 if replica.round != held else held)

    # -- what a node does with the copy -----------------------------------------------------------

    def train(self, task: RoundTask, client_id: str, setup: NodeSetup) -> tuple[Update | PackedUpdate, dict[str, float]]:
        """Train ``task`` with the node's own data from the round-start weights; its
        update (in the task's value encoding) and metrics for Flower.

        Raises:
            ClientAppError: the node's data cannot be read.
            Exception: whatever the engine raised (a non-finite loss...): the round fails
                for this node, as it does for the daemon, and the copy is back at the round.
        """
        replica = self.replica
        assert replica is not None
        stream = self._stream(setup, client_id)
        result, encoding = replica.train(round_number=task.round, base_round=task.base_round, seeds=task.seeds,
                                         learning_rate=task.learning_rate, epsilon=task.epsilon,
                                         batch_size=task.batch_size, settings=dict(task.settings), batches=stream)
        update = build_update(task, result, client_id, encoding)
        metrics = {"round": task.round, "num-examples": result.num_examples, "loss-before": result.loss_before,
                   "loss-after": result.loss_after, "train-seconds": result.seconds, "seeds": len(task.seeds)}
        return update, metrics

    def fingerprint(self) -> Fingerprint:
        """The copy's fingerprint report at the round it holds (PROTOCOL.md §6.5)."""
        replica = self.replica
        assert replica is not None
        return Fingerprint(round=replica.round, fingerprint=replica.fingerprint(), table_digest=replica.table_digest())

    def _stream(self, setup: NodeSetup, client_id: str) -> BatchStream:
        """The node's batch stream over its records; it continues across the rounds this
        process trains it."""
        replica = self.replica
        assert replica is not None
        key = (client_id, setup.data)
        if key not in self._streams:
            try:
                records, problems = load_jsonl(setup.data, on_error="skip")
            except DataError as error:
                raise ClientAppError(f"cannot read the data file {setup.data}: {error}") from None
            if problems:
                logger.warning("%s: %d bad records skipped (first: %s)", setup.data, len(problems), problems[0])
            self._streams[key] = replica.batches_for(setup.stream_name or client_id, records, self._prompt_format)
        return self._streams[key]
