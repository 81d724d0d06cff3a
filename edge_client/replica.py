"""One model copy that follows a federation's ledger and trains rounds for any number of
clients: what a simulation host (``edgefed-sim``) and the Flower adapter share.

Bit-exact replay makes one copy enough for many clients: every client's model at round
``r`` is the same θ_r (PROTOCOL.md §6), so a host keeps one replica at the ledger's head
and, before each client trains, returns it to the round-start weights (ModelSync's
canonical state) and then trains with that client's own data and settings. What stays
per client is its identity, its batches and whatever it sends; what is shared is the
weights, the seed table and the engine.

The daemon (:mod:`edge_client.daemon`) keeps its own copy of this logic for one client
with its reconnects, callbacks and emulator loading; this module is the lean part: no
connection, no events, a mode fixed at construction.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edge_client.data import BatchStream, Record, tokenize
from edge_client.engines import Engine, EngineSettings, LocalUpdate, RoundPlan
from edge_client.scope import ScopeConfig, build_space
from edge_client.sync import ModelSync, RoundCoefficients
from profiles.chooser import Choice, TrainingTask
from profiles.estimator import ModelShape
from protocol.blocks import block_seed_map
from protocol.messages import FederationInfo
from protocol.values import ENCODING_SETTING, encoding_of

__all__ = ["Replica", "federation_scope", "federation_task"]


def federation_scope(federation: FederationInfo) -> ScopeConfig:
    """The scope the federation announced (its welcome's ``scope``), as :mod:`edge_client.scope` builds it."""
    return ScopeConfig(kind=federation.scope.kind, lora_rank=federation.scope.lora_rank or 8,
                       lora_alpha=federation.scope.lora_alpha,
                       lora_targets=tuple(federation.scope.lora_targets) or ("q_proj", "v_proj"),
                       lora_init_seed=federation.scope.lora_init_seed,
                       lora_layers=tuple(federation.scope.lora_layers))


def federation_task(federation: FederationInfo) -> TrainingTask:
    """The training task the chooser plans for (the daemon's :meth:`EdgeClient.plan`)."""
    return TrainingTask(scope=federation.scope.kind, batch_size=federation.batch_size,
                        max_seq_len=federation.max_seq_len, lora_rank=federation.scope.lora_rank or 8)


class Replica:
    """A model at the ledger's head, trained in turn for the clients it hosts.

    Args:
        model, tokenizer: a float32 causal LM holding the base weights θ₀ (prepared in
            place: adapters, gradients, as the engine needs).
        federation: the federation's settings (its ``welcome``).
        engine_cls: the mode the hosted clients train; None for a replica that only follows.
        choice: the chooser's decision the engine's settings are fitted to (its micro-batch).
        shape: the model's shape, for the engine's settings.
        copies_owner: whose round copies these are (file names, when on disk).

    Training and applying commits must not overlap: one lock serialises them, so callers
    in several threads (an actor's asyncio loop handing work to threads) are safe.
    """

    def __init__(self, model: Any, tokenizer: Any, federation: FederationInfo, engine_cls: type[Engine] | None, *,
                 choice: Choice | None = None, shape: ModelShape | None = None,
                 copies_owner: str = "replica") -> None:
        scope = federation_scope(federation)
        if engine_cls is not None:
            model, space = engine_cls.prepare(model, scope, distribution=federation.perturbation)
        else:
            model, space = build_space(model, scope, distribution=federation.perturbation)
        if federation.block_seeds:  # PROTOCOL.md §5.5
            space.use_block_seeds(block_seed_map(federation.federation_id, space.blocks(), federation.block_seeds))
        self.model, self.tokenizer, self.federation = model, tokenizer, federation
        self.engine_cls, self.choice, self.shape = engine_cls, choice, shape
        self.task = federation_task(federation)
        self.sync = ModelSync(space, rebase_every=federation.rebase_every, copies_where="memory",
                              copies_owner=copies_owner)
        self.engine: Engine | None = None
        if engine_cls is not None:
            if choice is None or shape is None:
                raise ValueError("a training replica needs the chooser's choice and the model's shape")
            self.engine = engine_cls(model, space, self.settings_for(None))
        self.lock = threading.Lock()

    # -- the ledger ---------------------------------------------------------------------

    @property
    def round(self) -> int:
        return self.sync.round

    def fingerprint(self) -> str:
        """The fingerprint of θ at :attr:`round` (PROTOCOL.md §6.5)."""
        with self.lock:
            self.sync.discard_local_training()
            return self.sync.space.fingerprint()

    def table_digest(self) -> str:
        return self.sync.table_digest()

    def apply_commit(self, round_number: int, coefficients: Sequence[tuple[int, float]],
                     totals: Sequence[tuple[int, float]] | None = None, digest: str | None = None) -> bool:
        """Apply a committed round if it is the next one; False if it was applied already.

        Raises:
            SyncError: it is not the next round, or the totals or digest disagree.
        """
        with self.lock:
            if round_number <= self.sync.round:
                return False
            self.sync.apply_commit(round_number, coefficients, totals, digest)
            return True

    def catch_up(self, base_round: int, table: Iterable[tuple[int, float]], rounds: Sequence[RoundCoefficients],
                 digest: str) -> None:
        """Rebuild from a sync response (:meth:`ModelSync.catch_up`)."""
        with self.lock:
            self.sync.catch_up(base_round, table, rounds, digest)

    # -- training -----------------------------------------------------------------------

    def settings_for(self, values: Mapping[str, object] | None) -> EngineSettings:
        """The engine's settings for a round task's ``settings`` map and the chosen micro-batch."""
        assert self.engine_cls is not None and self.choice is not None and self.shape is not None
        settings = self.engine_cls.settings_cls.from_task(values, micro_batch=self.choice.batch,
                                                          mode=self.engine_cls.name)
        return self.engine_cls.fit_settings(settings, shape=self.shape, task=self.task, choice=self.choice)

    def batches_for(self, client_id: str, records: Sequence[Record], prompt_format: str) -> BatchStream:
        """A client's batch stream over its own records, seeded by its id as the daemon's is."""
        examples = tokenize(records, self.tokenizer, max_seq_len=self.federation.max_seq_len,
                            prompt_format=prompt_format)
        return BatchStream(examples, self.federation.batch_size, seed=zlib.crc32(client_id.encode()),
                           pad_token_id=self.tokenizer.pad_token_id or 0)

    def train(self, *, round_number: int, base_round: int, seeds: Sequence[int], learning_rate: float,
              epsilon: float, batch_size: int, settings: Mapping[str, object],
              batches: BatchStream) -> tuple[LocalUpdate, str]:
        """One client's round from the round-start weights: its update and the value
        encoding its task asked for.

        Raises:
            SyncError: the replica does not hold ``base_round``.
            EngineRefused, SettingsError: the task's settings are unusable.
            Exception: whatever the engine raised (the replica is back at the round start).
        """
        if self.engine is None:
            raise ValueError("this replica follows the ledger only; it has no engine to train with")
        values = dict(settings)
        encoding = encoding_of(values)
        values.pop(ENCODING_SETTING, None)
        plan = RoundPlan(round=round_number, seeds=tuple(seeds), learning_rate=learning_rate, epsilon=epsilon,
                         batch_size=batch_size)
        with self.lock:
            self.sync.discard_local_training()  # the previous client's training never counts here
            self.engine.update_settings(self.settings_for(values))
            self.sync.begin_local_training(base_round)
            try:
                return self.engine.train_round(plan, batches), encoding
            finally:
                self.sync.discard_local_training()
