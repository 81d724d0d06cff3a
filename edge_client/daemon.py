"""The edge client daemon: connect, sync, train, report, and keep going.

Life of a client::

    load the base model, hash it            (once)
    loop:                                   (reconnects with exponential backoff)
        connect -> challenge -> hello -> welcome (or reject: fatal)
        first welcome: apply the federation's scope, build the parameter space
        behind the ledger? -> sync_request -> sync_response -> replay
        messages: round_task -> train in a worker thread -> update
                  round_commit -> apply -> fingerprint
                  goodbye -> stop

Messages are handled one at a time. Training and model updates run in a worker thread,
so the event loop stays free: websockets keeps answering pings, and messages that arrive
meanwhile (say, the commit of a round whose deadline passed while we trained) wait in
the connection's buffer and are applied afterwards, from the round-start copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import secrets
import signal
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from edge_client.data import BatchStream, DataError, Example, Record, load_jsonl, resolve_prompt_format, tokenize
from edge_client.device import DEFAULT_HEADROOM, DeviceReport, detect_device
from edge_client.engines import (
    Engine,
    EngineRefused,
    EngineSettings,
    LocalUpdate,
    RoundPlan,
    engine_policy,
    get_engine,
)
from edge_client.events import ClientCallbacks, PlanEvent, RoundEndEvent, RoundStartEvent, StepEvent, SyncEvent
from edge_client.identity import ClientIdentity
from edge_client.model import base_weights_hash, load_model, resolve_model
from edge_client.replica import federation_scope, federation_task
from edge_client.scope import build_space
from edge_client.space import round_copy_directory, sweep_stale_copies
from edge_client.sync import ModelSync, RoundCoefficients, SyncError
from profiles.chooser import Choice, ModeUnavailable, NoModeFits, PolicyEntry, TrainingTask, choose, policy_entry
from profiles.estimator import ModelShape, lora_param_count
from protocol import codec, limits
from protocol.blocks import OUTER_BLOCK, block_seed_map
from protocol.errors import MalformedFrame, PeerProtocolError, VersionMismatch
from protocol.messages import (
    OBSERVER_MODE,
    Challenge,
    Error,
    FederationInfo,
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
from protocol.values import ENCODING_SETTING, ValueEncodingError, encoding_of, pack_values

__all__ = ["ClientConfig", "EdgeClient", "FatalClientError", "copies_location", "federation_scope",
           "plan_training"]


logger = logging.getLogger(__name__)


class FatalClientError(RuntimeError):
    """The coordinator refused this client for a reason retrying cannot fix."""


class _Stop(Exception):
    """Raised inside training when the daemon is asked to stop."""


class _Resync(Exception):
    """The client cannot use what the coordinator sent; reconnect and sync from scratch."""


@dataclass(frozen=True)
class ClientConfig:
    """Settings of one edge client.

    Attributes:
        url: the coordinator's websocket URL (ws://host:port).
        client_id: this client's name in the federation.
        data_path: JSONL file of instruction/response records (stays on the device);
            None for an observer.
        model: model source (builtin name, .gguf file or HF directory).
        mode: "auto" (the chooser picks the best mode that fits the memory budget,
            profiles/chooser.py), a training mode (engine name) to force, or "observe":
            follow the ledger without training (an evaluator), never given tasks.
        device: "auto", "cpu", "cuda", "cuda:1", "mps".
        memory_budget_bytes: a user-set memory budget (wins over the detected free
            memory), reported to the coordinator.
        memory_headroom: fraction of the budget kept free of the estimated peak.
        cache_dir: model conversion cache (None: the default).
        copies: where the base copy and round-start snapshot live ("auto": a file for CPU
            clients, host memory for accelerator clients; "memory"; "file").
        initial_backoff_s, max_backoff_s: reconnect delays (doubling, with jitter).
        instruction_field, response_field: JSONL field names.
        prompt_format: "plain", "chat" (the tokenizer's chat template) or "auto" (chat when
            the tokenizer has a template). Every client of a federation must use the same.
        on_bad_record: "skip" (report each bad line and go on) or "raise" (refuse the file).
        key_path: this client's Ed25519 private key file (``edgefed-keys new``); hellos
            and updates are signed with it. None: unsigned (open-mode coordinators only).
        ca_file: the federation's CA certificate (``ca.pem`` from ``edgefed-keys
            tls-init``) to verify a wss:// coordinator; None: the system's CAs.
        emulator: a FedBiOT emulator directory (``edgefed-emulator build``): the client
            loads it instead of the full model and trains the federation's adapter
            through it, in a mode that needs one (``fedbiot``, ``fedbiot_zo``); its manifest's base hash
            stands for the full model's. None: the full model (``model``).
        emulator_quantization: how the emulator's frozen part is held: "auto" (nf4 where
            bitsandbytes runs it, else int8), "nf4", "int8" or "none" (float32).
    """

    url: str
    client_id: str
    data_path: str | None
    model: str = "smollm2-135m"
    mode: str = "auto"
    device: str = "auto"
    memory_budget_bytes: int | None = None
    memory_headroom: float = DEFAULT_HEADROOM
    cache_dir: str | None = None
    copies: str = "auto"
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    instruction_field: str = "instruction"
    response_field: str = "response"
    prompt_format: str = "auto"
    on_bad_record: str = "skip"
    key_path: str | None = None
    ca_file: str | None = None
    emulator: str | None = None
    emulator_quantization: str = "auto"

    def __post_init__(self) -> None:
        if not self.url.startswith(("ws://", "wss://")):
            raise ValueError(f"url must start with ws:// or wss://, got {self.url!r}")
        if self.on_bad_record not in ("skip", "raise"):
            raise ValueError(f"on_bad_record must be skip or raise, got {self.on_bad_record!r}")
        if self.copies not in ("auto", "memory", "file"):
            raise ValueError(f"copies must be auto, memory or file, got {self.copies!r}")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes must be positive, got {self.memory_budget_bytes}")
        if not 0.0 <= self.memory_headroom <= 0.9:
            raise ValueError(f"memory_headroom must be between 0 and 0.9, got {self.memory_headroom}")


class EdgeClient:
    """One client daemon. Call :meth:`prepare` (slow: loads the model) then :meth:`run`.

    Args:
        config: the client's settings.
        records: the training records, instead of ``config.data_path`` (an app's own data,
            see :func:`edge_client.data.records_from`).
        model, tokenizer: a float32 causal LM and its tokenizer the app already holds,
            instead of loading ``config.model``. The client trains this object in place
            (it wraps it with the federation's adapters); its base weights must hash to
            the federation's ``model_hash``, checked when the coordinator announces it.
        callbacks: the app's event callbacks (:mod:`edge_client.events`: which thread, in
            which order).
    """

    def __init__(self, config: ClientConfig, *, records: Sequence[Record] | None = None, model: Any = None,
                 tokenizer: Any = None, callbacks: ClientCallbacks | None = None) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both a model and its tokenizer, or neither (then config.model is loaded)")
        self.config = config
        self._given_records = list(records) if records is not None else None
        self._given_model, self._given_tokenizer = model, tokenizer
        self.callbacks = callbacks or ClientCallbacks()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.observer = config.mode == OBSERVER_MODE
        if not self.observer and config.mode != "auto":
            forced = get_engine(config.mode)  # an unknown mode fails here, before anything loads
            if forced.needs_emulator and config.emulator is None:
                raise ValueError(f"mode {config.mode} trains through an emulator: give the client one "
                                 f"(edgefed-emulator build)")
            if not forced.needs_emulator and config.emulator is not None:
                raise ValueError(f"mode {config.mode} trains the full model; leave the emulator out, or let the "
                                 f"chooser decide (mode auto)")
        if self.observer and config.emulator is not None:
            raise ValueError("an observer follows the full model; it takes no emulator")
        # The engine class is chosen once the federation's task is known (the challenge).
        self.engine_cls: type[Engine] | None = None
        self.choice: Choice | None = None
        self.federation_task: TrainingTask | None = None  # what the choice was made for
        # Raises IdentityError (one line) for a missing, unreadable or too-open key file.
        self.identity = ClientIdentity.load(config.key_path) if config.key_path else None
        self._ssl = None
        if config.url.startswith("wss://"):
            try:
                self._ssl = ssl.create_default_context(cafile=config.ca_file)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(f"cannot use the CA file {config.ca_file}: {error}") from None
            self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        elif config.ca_file:
            raise ValueError("ca_file is for wss:// URLs; this one is plain ws://")
        self._challenge: Challenge | None = None  # of the current connection; updates are bound to it
        # A blocking hook called in a worker thread each time the model reaches a new
        # ledger round (after its fingerprint is sent), before the next message is read:
        # the evaluator scores that round's model here. Apps use callbacks.on_sync. An
        # observer's hook may return the held-out loss it measured: it is reported to the
        # coordinator in a second fingerprint (PROTOCOL.md §4.3), for its page.
        self.on_round: Callable[[int], float | None] | None = None
        self.stopping = False
        self.finished = False
        self.rounds_trained = 0
        self.rounds_since_connect = 0
        self._full_sync_pending = False
        self._last_hooked_round = -1
        self.federation: FederationInfo | None = None
        self.sync: ModelSync | None = None
        self.engine: Engine | None = None
        self._batches: BatchStream | None = None
        self._examples: list[Example] = []

    # -- setup ------------------------------------------------------------------------

    def prepare(self, records: Sequence[Record] | None = None) -> None:
        """Load the data and the base model, and hash the base weights.

        Args:
            records: the training records (instead of those given to the constructor or
                ``config.data_path``).
        """
        config = self.config
        if records is not None:
            self._given_records = list(records)
        self._records = []
        if not self.observer and self._given_records is not None:
            if not self._given_records:
                raise DataError("no training records were given")
            self._records = self._given_records
        elif not self.observer:
            if config.data_path is None:
                raise ValueError("a training client needs a data file")
            records, problems = load_jsonl(config.data_path, instruction_field=config.instruction_field,
                                           response_field=config.response_field,
                                           on_error=config.on_bad_record)  # type: ignore[arg-type]
            self._records = records
            if problems:
                logger.warning("%s: %d bad records skipped (first: %s)", config.data_path, len(problems),
                               problems[0])
        self.report: DeviceReport = detect_device(config.device, memory_budget_bytes=config.memory_budget_bytes,
                                                  headroom=config.memory_headroom)
        self.device, self.profile = self.report.torch_device, self.report.profile()
        logger.info("%s", self.report.describe())
        self._sweep_stale_copies()
        self.emulator_manifest: dict[str, Any] | None = None
        self.model = None
        if config.emulator is not None:
            # Which model to load waits for the plan: the full model if a mode fits the
            # budget with it, the emulator if only a mode that trains through it does (the challenge brings the
            # task). Until then the full model's shape and hash come from the manifest.
            self._read_emulator(config.emulator)
            return
        self._load_full_model()

    def _load_full_model(self) -> None:
        config = self.config
        started = time.perf_counter()
        if self._given_model is not None:
            self.model, self.tokenizer = _adopt_model(self._given_model, self._given_tokenizer, self.device)
        else:
            model_dir = resolve_model(config.model, cache_dir=Path(config.cache_dir) if config.cache_dir else None)
            self.model, self.tokenizer = load_model(model_dir, device=str(self.device))
        self.shape = ModelShape.from_hf_config(self.model.config.to_dict(),
                                               num_parameters=self.model.num_parameters())
        self.prompt_format = resolve_prompt_format(config.prompt_format, self.tokenizer)
        self.model_hash = base_weights_hash(self.model)
        logger.info("model %s loaded in %.1fs on %s (base hash %s)",
                    "(given by the app)" if self._given_model is not None else config.model,
                    time.perf_counter() - started, self.device, self.model_hash)

    def _read_emulator(self, path: str) -> None:
        """Read the emulator's manifest, config and tokenizer (no weights): the full
        model's shape for the plan, and its base hash for the challenge.

        Raises:
            EngineRefused: the emulator directory is refused (one line).
        """
        from transformers import AutoConfig, AutoTokenizer

        from edge_client.emulator import EmulatorLoadError, read_manifest
        from edge_client.engines.fedbiot import emulator_shape_config

        try:
            manifest = read_manifest(path)
            emulator_config = AutoConfig.from_pretrained(path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (EmulatorLoadError, OSError, ValueError) as error:
            raise EngineRefused(f"cannot use the emulator in {path!r}: {error}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.emulator_manifest = manifest
        self.shape = ModelShape.from_hf_config(emulator_shape_config(emulator_config.to_dict(), manifest))
        self.prompt_format = resolve_prompt_format(self.config.prompt_format, self.tokenizer)
        self.model_hash = manifest["base_model_hash"]

    def _load_planned_model_alone(self) -> None:
        # transformers' loading patches module-level state (empty-weight init, tying) and
        # is not thread-safe: clients sharing a process (an app, the tests) load in turn.
        with _MODEL_LOADING:
            self._load_planned_model()

    def _load_planned_model(self) -> None:
        """Load what the plan trains: the emulator (quantised as the budget and
        bitsandbytes allow) for a mode that trains through one, else the full model,
        which must be the emulator's base model.

        Raises:
            FatalClientError: the emulator or its quantisation is refused here, or the
                full model is not the emulator's base model (one line each).
        """
        from edge_client.engines.fedbiot import load_client_emulator, resolve_quantization

        assert self.choice is not None and self.emulator_manifest is not None
        path, manifest = self.config.emulator, self.emulator_manifest
        assert path is not None
        if not get_engine(self.choice.mode).needs_emulator:
            self._load_full_model()
            if self.model_hash != manifest["base_model_hash"]:
                raise FatalClientError(f"the full model {self.config.model!r} hashes to {self.model_hash[:16]}..., "
                                       f"but the emulator in {path!r} was built from "
                                       f"{manifest['base_model_hash'][:16]}...: give the client the emulator's "
                                       f"base model")
            return
        started = time.perf_counter()
        assert self.federation_task is not None
        int8_fits = emulator_int8_fits(self.shape, self.federation_task, self.report, self.choice, manifest,
                                       copies=self.config.copies)
        try:
            quantization, why = resolve_quantization(self.config.emulator_quantization, str(self.device),
                                                     int8_fits=int8_fits)
            self.model, self.tokenizer, manifest = load_client_emulator(path, quantization=quantization,
                                                                        device=str(self.device),
                                                                        expect_base_hash=manifest["base_model_hash"])
        except EngineRefused as error:
            raise FatalClientError(str(error)) from None
        self.emulator_manifest = manifest
        logger.info("emulator %s (%s; keeps layers %s of %d, adapter %s) loaded in %.1fs on %s; %s", path,
                    manifest["emulator_hash"][:16], manifest["kept_layers"], manifest["num_layers_full"],
                    manifest["adapter_layers"], time.perf_counter() - started, self.device, why)

    def _setup_federation(self, federation: FederationInfo) -> None:
        if self.federation is not None:
            if federation != self.federation:
                raise FatalClientError("the coordinator's federation settings changed between connections")
            return
        scope = federation_scope(federation)
        # The engine prepares the model it trains (gradients, adapters, dropped layers)
        # around the federation's space; an observer only needs the space.
        if self.engine_cls is not None:
            try:
                self.model, space = self.engine_cls.prepare(self.model, scope,
                                                            distribution=federation.perturbation)  # type: ignore[arg-type]
            except EngineRefused as error:
                raise FatalClientError(str(error)) from None
        else:
            self.model, space = build_space(self.model, scope, distribution=federation.perturbation)  # type: ignore[arg-type]
        if federation.block_seeds:  # PROTOCOL.md §5.5: these seeds' directions cover one block
            space.use_block_seeds(block_seed_map(federation.federation_id, space.blocks(), federation.block_seeds))
        where = copies_location(self.config.copies, self.report.kind, scope.kind)
        self.sync = ModelSync(space, rebase_every=federation.rebase_every, copies_where=where,
                              copies_dir=round_copy_directory(self.config.cache_dir),
                              copies_owner=self.config.client_id)
        if self.engine_cls is not None:
            assert self.choice is not None
            self.engine = self.engine_cls(self.model, space, self._settings_for(None))
            if hasattr(self.engine, "personal_path"):  # layers kept personal (PTLS) survive restarts
                self.engine.personal_path = (round_copy_directory(self.config.cache_dir).parent / "personal"
                                             / f"{federation.federation_id}.{self.config.client_id}.{self.engine_cls.name}.pt")
            self._examples = tokenize(self._records, self.tokenizer, max_seq_len=federation.max_seq_len,
                                      prompt_format=self.prompt_format)
            seed = zlib.crc32(self.config.client_id.encode())
            self._batches = BatchStream(self._examples, federation.batch_size, seed=seed,
                                        pad_token_id=self.tokenizer.pad_token_id or 0)
        self.federation = federation
        logger.info("federation %s: scope %s (%d trainable parameters), %d local examples",
                    federation.federation_id, scope.kind, space.numel, len(self._examples))

    def _announced_blocks(self, federation: FederationInfo) -> tuple[int, ...]:
        """For a block mode: the blocks this client's memory can train (PROTOCOL.md §5.5)."""
        if self.engine_cls is None or not self.engine_cls.needs_block_seeds:
            return ()
        assert self.choice is not None and self.federation_task is not None
        layers = list(federation.scope.lora_layers) or list(range(self.shape.layers))
        blocks = layers + ([OUTER_BLOCK] if federation.scope.kind == "full" else [])
        return self.engine_cls.announced_blocks(self.shape, self.federation_task, self.choice, blocks)

    def _settings_for(self, values: Mapping[str, object] | None) -> EngineSettings:
        """The engine's settings for a round task's ``settings`` map and our micro-batch."""
        assert self.engine_cls is not None and self.choice is not None and self.federation_task is not None
        settings = self.engine_cls.settings_cls.from_task(values, micro_batch=self.choice.batch,
                                                          mode=self.engine_cls.name)
        return self.engine_cls.fit_settings(settings, shape=self.shape, task=self.federation_task, choice=self.choice)

    def _sweep_stale_copies(self) -> None:
        """Remove the round-start copies that killed clients left in the cache (a live
        client's, including other clients sharing this cache, are never touched)."""
        removed = sweep_stale_copies(round_copy_directory(self.config.cache_dir))
        if removed:
            logger.info("removed %d stale round-start cop%s left by clients that are gone: %s", len(removed),
                        "y" if len(removed) == 1 else "ies", ", ".join(path.name for path in removed))

    def plan(self, federation: FederationInfo) -> Choice:
        """Choose the mode and batch for the federation's task (:func:`plan_training`).

        Raises:
            FatalClientError: nothing fits the memory budget, or the forced mode does not
                fit or is not available; the message names the estimate and the budget.
        """
        task = federation_task(federation)
        self.federation_task = task
        try:
            return plan_training(self.shape, task, self.report, copies=self.config.copies,
                                 rebase_every=federation.rebase_every, mode=self.config.mode,
                                 emulator=self.emulator_manifest, block_seeds=federation.block_seeds)
        except (NoModeFits, ModeUnavailable) as error:
            raise FatalClientError(str(error)) from None

    # -- running ----------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        """Connect and serve rounds until the coordinator says goodbye or we are stopped.

        Args:
            handle_signals: stop on SIGINT/SIGTERM (the command line's choice; an app that
                embeds the client keeps its own signal handling and calls :meth:`stop`).

        Raises:
            FatalClientError: the coordinator rejected this client.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, self.stop)
        try:
            await self._serve()
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError):
                        loop.remove_signal_handler(sig)

    async def _serve(self) -> None:
        backoff = self.config.initial_backoff_s
        while not self.stopping and not self.finished:
            try:
                # No permessage-deflate (PROTOCOL.md §2): no compressor state per
                # connection, no inflate on every frame, and what is counted is what crosses.
                async with connect(self.config.url, max_size=limits.MAX_FRAME_BYTES, open_timeout=20,
                                   ping_interval=20, ping_timeout=60, ssl=self._ssl,
                                   compression=None) as connection:
                    self._connection = connection
                    if self.stopping:  # stop() came while connecting, before there was a connection to close
                        await self._goodbye(connection)
                        break
                    try:
                        await self._session(connection)
                        reason = "connection closed"
                    except PeerProtocolError as error:
                        # The coordinator sent something we cannot read: say so, then retry.
                        logger.error("bad message from the coordinator: %s", error)
                        with contextlib.suppress(ConnectionClosed):
                            await self._send(connection, Error(code=error.error_code, message=str(error)[:500],
                                                               field=getattr(error, "path", None), round=None))
                            await connection.close(error.close_code, error.error_code)
                        reason = error.error_code
                    except _Resync as error:
                        reason = str(error)
                        with contextlib.suppress(ConnectionClosed):
                            await connection.close(1000, "resync")
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as error:
                reason = f"{type(error).__name__}: {error}" if isinstance(error, ssl.SSLError) else type(error).__name__
            except InvalidURI as error:
                raise FatalClientError(str(error)) from None
            if self.stopping or self.finished:
                break
            if self.rounds_since_connect:  # that connection worked: start over from a short delay
                backoff = self.config.initial_backoff_s
            delay = backoff * (0.5 + random.random())
            logger.info("connection to %s ended (%s); retrying in %.1fs", self.config.url, reason, delay)
            await self._sleep_unless_stopped(delay)
            backoff = min(backoff * 2, self.config.max_backoff_s)

    def stop(self) -> None:
        """Stop: say goodbye, close the connection, end :meth:`run` (after the current
        training step, if one is running). Safe to call from any thread."""
        logger.info("stopping")
        self.stopping = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            self._send_goodbye()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to close
                loop.call_soon_threadsafe(self._send_goodbye)

    def _send_goodbye(self) -> None:
        connection = getattr(self, "_connection", None)
        if connection is not None:
            task = asyncio.get_running_loop().create_task(self._goodbye(connection))
            self._pending = task  # a reference, so the task is not collected before it runs

    async def _goodbye(self, connection: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._send(connection, Goodbye(reason="client stopping"))
            await connection.close(1000, "client stopping")

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            await asyncio.sleep(min(0.2, end - time.monotonic()))

    async def _send(self, connection: ClientConnection, message: Message) -> None:
        """Send; a closed connection is not an error here: the receive loop still reads
        what the coordinator sent before closing (a goodbye, say), then ends."""
        frame = codec.encode(message)
        try:
            await connection.send(frame)
        except ConnectionClosed:
            logger.debug("connection closed; %s not sent", message.TYPE)

    async def _recv(self, connection: ClientConnection) -> Message:
        return _decode(await connection.recv())

    async def _session(self, connection: ClientConnection) -> None:
        self.rounds_since_connect = 0
        challenge = await self._recv(connection)
        if not isinstance(challenge, Challenge):
            raise FatalClientError(f"expected a challenge, got {challenge.TYPE}")
        try:
            codec.check_version(challenge.protocol_version)
        except VersionMismatch as error:
            raise FatalClientError(f"the coordinator speaks another protocol: {error}") from None
        if challenge.federation.model_hash != self.model_hash:
            if self.config.emulator is not None:
                message = (f"the emulator in {self.config.emulator!r} was built from base model "
                           f"{self.model_hash[:16]}..., but the federation {challenge.federation.federation_id!r} "
                           f"trains {challenge.federation.model_name!r} ({challenge.federation.model_hash[:16]}...): "
                           f"build an emulator of that model")
            else:
                message = (f"this model is not the federation's base model: its weights hash to "
                           f"{self.model_hash[:16]}..., the federation {challenge.federation.federation_id!r} trains "
                           f"{challenge.federation.model_name!r} ({challenge.federation.model_hash[:16]}...)")
            with contextlib.suppress(ConnectionClosed):
                await self._send(connection, Goodbye(reason=message[:limits.MAX_STRING_CHARS]))
            raise FatalClientError(message)
        if not self.observer and self.choice is None:
            try:
                self.choice = self.plan(challenge.federation)
            except FatalClientError as error:
                with contextlib.suppress(ConnectionClosed):
                    await self._send(connection, Goodbye(reason=str(error)[:limits.MAX_STRING_CHARS]))
                raise
            self.engine_cls = get_engine(self.choice.mode)
            logger.info("plan: %s", self.choice.explanation)
            if self.model is None:  # a client holding an emulator loads what the plan trains
                try:
                    await asyncio.to_thread(self._load_planned_model_alone)
                except FatalClientError as error:
                    with contextlib.suppress(ConnectionClosed):
                        await self._send(connection, Goodbye(reason=str(error)[:limits.MAX_STRING_CHARS]))
                    raise
            self.callbacks.emit("on_plan", PlanEvent(self.choice.mode, self.choice.batch, self.choice.explanation))
        sync = self.sync
        hello = Hello(
            protocol_version=limits.PROTOCOL_VERSION, client_id=self.config.client_id, device=self.profile,
            mode=OBSERVER_MODE if self.engine_cls is None else self.engine_cls.name, model_hash=self.model_hash,
            last_round=sync.round if sync is not None else 0,
            table_digest=sync.table_digest() if sync is not None else None,
            plan=self.choice.explanation if self.choice is not None else None, public_key=None, signature=None,
            blocks=self._announced_blocks(challenge.federation),
        )
        if self.identity is not None:
            hello = self.identity.sign_hello(challenge, hello)
        self._challenge = challenge
        await self._send(connection, hello)
        reply = await self._recv(connection)
        if isinstance(reply, Reject):
            raise FatalClientError(f"rejected by the coordinator ({reply.code}): {reply.message}")
        if not isinstance(reply, Welcome):
            raise FatalClientError(f"expected welcome, got {reply.TYPE}")
        await asyncio.to_thread(self._setup_federation, reply.federation)
        assert self.sync is not None
        if self.stopping:
            return
        if self.sync.drifted:
            await asyncio.to_thread(self.sync.discard_local_training)
        if self.sync.round != reply.last_committed_round:
            await self._send(connection, SyncRequest(have_round=self.sync.round))
        else:
            await self._report_fingerprint(connection, "current")
        async for frame in connection:
            if not await self._handle(connection, _decode(frame)):
                return

    async def _handle(self, connection: ClientConnection, message: Message) -> bool:
        """Act on one message; False ends the session."""
        assert self.sync is not None
        if isinstance(message, RoundTask):
            await self._train(connection, message)
        elif isinstance(message, RoundCommit):
            await self._apply_commit(connection, message)
        elif isinstance(message, SyncResponse):
            await self._apply_sync(connection, message)
        elif isinstance(message, UpdateAck):
            logger.debug("round %d update %s", message.round, message.status)
        elif isinstance(message, Error):
            logger.warning("coordinator error %s: %s%s", message.code, message.message,
                           f" ({message.field})" if message.field else "")
            if message.code == "fingerprint_mismatch":
                await self._request_full_sync(connection)
        elif isinstance(message, Goodbye):
            logger.info("coordinator said goodbye: %s", message.reason)
            self.finished = True
            return False
        else:
            logger.warning("ignoring unexpected %s", message.TYPE)
        return not self.stopping

    async def _train(self, connection: ClientConnection, task: RoundTask) -> None:
        assert self.sync is not None
        sync = self.sync
        if self.engine is None or self._batches is None:
            logger.warning("round %d: an observer was given a task; ignoring it", task.round)
            return
        if task.base_round != sync.round:
            logger.info("task for round %d but we hold round %d: syncing first", task.round, sync.round)
            await self._send(connection, SyncRequest(have_round=sync.round))
            return
        if sync.drifted:  # an earlier attempt at this round was abandoned or ended early
            await asyncio.to_thread(sync.discard_local_training)
        settings = dict(task.settings)
        try:  # the mode's settings for this round, from the coordinator's [modes] table
            encoding = encoding_of(settings)  # a wire setting, not the mode's
            settings.pop(ENCODING_SETTING, None)
            self.engine.update_settings(self._settings_for(settings))
        except EngineRefused as error:  # e.g. another emulator than the federation's: retrying cannot help
            logger.error("round %d: %s", task.round, error)
            with contextlib.suppress(ConnectionClosed):
                await self._send(connection, Goodbye(reason=str(error)[:limits.MAX_STRING_CHARS]))
            raise FatalClientError(str(error)) from None
        except Exception as error:  # SettingsError, or a mode's fit_settings that cannot fit them
            logger.error("round %d: the coordinator's settings for mode %s are unusable (%s); no update sent",
                         task.round, self.engine_cls.name if self.engine_cls else "-", error)
            return
        plan = RoundPlan(round=task.round, seeds=tuple(task.seeds), learning_rate=task.learning_rate,
                         epsilon=task.epsilon, batch_size=task.batch_size)
        sync.begin_local_training(task.base_round)
        mode = self.engine_cls.name if self.engine_cls is not None else "-"
        logger.info("round %d: training on %d seeds (%s)", task.round, len(task.seeds), mode)
        self.callbacks.emit("on_round_start", RoundStartEvent(task.round, mode, len(task.seeds),
                                                              _settings_dict(self.engine.settings)))
        loop = asyncio.get_running_loop()
        wants_steps = self.callbacks.on_step is not None

        def progress(done: int, total: int, loss: float) -> None:  # in the training thread
            if self.stopping:
                raise _Stop()
            logger.debug("round %d step %d/%d loss %.4f", task.round, done, total, loss)
            if wants_steps:  # to the loop thread, in order, before the round's end
                loop.call_soon_threadsafe(self.callbacks.emit, "on_step", StepEvent(task.round, done, total, loss))

        def failed(why: str) -> None:
            nan = float("nan")
            self.callbacks.emit("on_round_end", RoundEndEvent(task.round, False, nan, nan, 0.0, 0, why))

        try:
            result = await asyncio.to_thread(self.engine.train_round, plan, self._batches, progress)
        except _Stop:
            failed("stopped")
            return
        except Exception as error:  # out of memory, a non-finite loss, a bad batch: skip the round
            logger.error("round %d: local training failed (%s: %s); no update sent", task.round,
                         type(error).__name__, error)
            await asyncio.to_thread(sync.discard_local_training)
            failed(f"{type(error).__name__}: {error}")
            return
        await self._send(connection, self._make_update(task, result, encoding))
        self.rounds_trained += 1
        self.callbacks.emit("on_round_end", RoundEndEvent(task.round, True, result.loss_before, result.loss_after,
                                                          result.seconds, len(result.pairs)))
        logger.info("round %d: sent %d scalars in %.1fs (loss %.4f -> %.4f)", task.round, len(result.pairs),
                    result.seconds, result.loss_before, result.loss_after)

    def _make_update(self, task: RoundTask, result: LocalUpdate, encoding: str = "pairs") -> Update | PackedUpdate:
        """The update reporting ``result`` (:func:`build_update`), signed when this client has a key."""
        update = build_update(task, result, self.config.client_id, encoding)
        if self.identity is not None and self._challenge is not None:
            update = self.identity.sign_update(self._challenge, update)
        return update

    async def _apply_commit(self, connection: ClientConnection, commit: RoundCommit) -> None:
        assert self.sync is not None
        if commit.round <= self.sync.round:
            return
        if commit.round != self.sync.round + 1:
            await self._send(connection, SyncRequest(have_round=self.sync.round))
            return
        try:
            await asyncio.to_thread(self.sync.apply_commit, commit.round, commit.coefficients, commit.totals,
                                    commit.table_digest)
        except SyncError as error:
            logger.error("cannot apply round %d (%s); resyncing", commit.round, error)
            await self._request_full_sync(connection)
            return
        await self._report_fingerprint(connection, "commit")
        self.rounds_since_connect += 1

    async def _apply_sync(self, connection: ClientConnection, response: SyncResponse) -> None:
        assert self.sync is not None
        sync = self.sync
        if response.target_round <= sync.round and not sync.drifted and not self._full_sync_pending:
            return  # stale: we applied those commits meanwhile
        self._full_sync_pending = False
        rounds = [RoundCoefficients(entry.round, tuple(entry.coefficients)) for entry in response.rounds]
        started = time.perf_counter()
        try:
            if response.base_round == sync.round and response.base_round != 0 and not sync.is_rebase(response.base_round):
                if sync.drifted:
                    await asyncio.to_thread(sync.discard_local_training)
                for entry in rounds:
                    await asyncio.to_thread(sync.apply_commit, entry.round, entry.coefficients)
                if sync.table_digest() != response.table_digest:
                    raise SyncError("table digest differs after incremental sync")
            else:
                await asyncio.to_thread(sync.catch_up, response.base_round, response.table, rounds,
                                        response.table_digest)
        except SyncError as error:
            if response.base_round != 0:
                logger.error("sync failed (%s); requesting a full sync", error)
                await self._request_full_sync(connection)
                return
            raise _Resync(f"full sync failed: {error}") from error
        logger.info("caught up to round %d (from base round %d, %d table entries, %d rounds) in %.1fs",
                    sync.round, response.base_round, len(response.table), len(rounds), time.perf_counter() - started)
        await self._report_fingerprint(connection, "catch_up")

    async def _request_full_sync(self, connection: ClientConnection) -> None:
        self._full_sync_pending = True
        await self._send(connection, SyncRequest(have_round=0))

    async def _report_fingerprint(self, connection: ClientConnection, how: str) -> None:
        assert self.sync is not None
        fingerprint = await asyncio.to_thread(self.sync.space.fingerprint)
        await self._send(connection, Fingerprint(round=self.sync.round, fingerprint=fingerprint,
                                                 table_digest=self.sync.table_digest()))
        logger.info("round %d: fingerprint %s...", self.sync.round, fingerprint[:16])
        if self.sync.round != self._last_hooked_round:
            self._last_hooked_round = self.sync.round
            self.callbacks.emit("on_sync", SyncEvent(self.sync.round, fingerprint, how))
            if self.on_round is not None:
                held_out = await asyncio.to_thread(self.on_round, self.sync.round)
                if (held_out is not None and math.isfinite(held_out) and self.observer
                        and self.sync.round == self._last_hooked_round):
                    await self._send(connection, Fingerprint(round=self.sync.round, fingerprint=fingerprint,
                                                             table_digest=self.sync.table_digest(),
                                                             eval_loss=held_out))


def build_update(task: RoundTask, result: LocalUpdate, client_id: str, encoding: str = "pairs"
                 ) -> Update | PackedUpdate:
    """The unsigned update reporting ``result``: an ``update`` of (seed, value) pairs, or
    the ``packed_update`` the task's ``value_encoding`` asks for (PROTOCOL.md §4.3.1)."""
    # num_examples: what the scalars were computed from this round, not the dataset
    # size (PROTOCOL.md: the aggregation weight of the update).
    common = dict(round=task.round, attempt=task.attempt, client_id=client_id,
                  num_examples=result.num_examples, loss_before=result.loss_before,
                  loss_after=result.loss_after, nonce=secrets.token_bytes(16), signature=None)
    if encoding != "pairs":
        try:
            scale, packed = pack_values([value for _, value in result.pairs], encoding)
            return PackedUpdate(encoding=encoding, scale=scale, values=packed, **common)
        except ValueEncodingError as error:  # e.g. beyond float32: the pairs carry it
            logger.warning("round %d: cannot send the values as %s (%s); sending pairs", task.round,
                           encoding, error)
    return Update(pairs=result.pairs, **common)


def copies_location(copies: str, device_kind: str, scope_kind: str) -> str:
    """Where the base copy and the round-start snapshot live: "memory" or "file".

    ``copies`` is the user's setting; "auto" keeps them in a memory-mapped file for a CPU
    client training the whole model (each copy is as large as the model, and the page
    cache can evict a file), and in host memory otherwise.
    """
    if copies != "auto":
        return copies
    return "file" if device_kind == "cpu" and scope_kind == "full" else "memory"


def plan_training(shape: ModelShape, task: TrainingTask, report: DeviceReport, *, copies: str,
                  rebase_every: int, mode: str, emulator: Mapping[str, Any] | None = None,
                  block_seeds: int = 0) -> Choice:
    """The mode and micro-batch this client runs for ``task`` on the device of ``report``.

    The one decision behind both the daemon and ``edgefed-client --plan``, so the plan
    printed is the plan run: :func:`profiles.chooser.choose` over the step's estimate plus
    the round-start copies when they take memory from the training budget (host memory on
    a CPU or unified-memory device: one base copy, and a snapshot unless every round is a
    rebase).

    Args:
        shape: the model.
        task: the federation's task.
        report: the device and its budget.
        copies: the copies setting ("auto", "memory" or "file", see :func:`copies_location`).
        rebase_every: the federation's rebase interval.
        mode: "auto" or a mode to force.
        emulator: the manifest of the FedBiOT emulator the client holds besides the full
            model, or None: the modes that train through one are offered only then,
            ranked last (the chooser takes them when nothing else fits), their memory
            modelled with this emulator's share of kept layers.
        block_seeds: the federation's seeds per block (FederationInfo.block_seeds): the
            block modes are offered only where it has them (0: it does not schedule blocks).

    Raises:
        NoModeFits: nothing fits, or the forced mode does not.
        ModeUnavailable: the forced mode has no engine here.
    """
    extra: dict[str, int] = {}
    if copies_location(copies, report.kind, task.scope) == "memory" and report.kind in ("cpu", "mps"):
        trainable = shape.param_count if task.scope == "full" else lora_param_count(shape, task.lora_rank)
        copy_count = 1 + (rebase_every > 1)
        extra["round_copies"] = copy_count * trainable * 4  # float32
    forced = None if mode == "auto" else mode
    if forced is not None and get_engine(forced).needs_block_seeds and not block_seeds:
        raise ModeUnavailable(f"mode {forced!r} trains one block at a time with its block's seeds, and this "
                              f"federation does not offer cyclic block updates (its coordinator's config has no "
                              f"[modes.{forced}] table); run another mode")
    policy = [entry if not get_engine(entry.mode).needs_emulator else _emulator_entry(entry, emulator)
              for entry in engine_policy() if emulator is not None or not get_engine(entry.mode).needs_emulator
              if block_seeds or not get_engine(entry.mode).needs_block_seeds]
    return choose(shape, task, budget_bytes=report.budget_bytes, headroom=report.headroom,
                  policy=policy, forced=forced, budget_source=report.budget_source, extra=extra)


_MODEL_LOADING = threading.Lock()


def _emulator_entry(entry: PolicyEntry, manifest: Mapping[str, Any] | None, **options: Any) -> PolicyEntry:
    """A fedbiot-like policy row whose memory model keeps this emulator's share of layers."""
    assert manifest is not None
    keep_ratio = len(manifest["kept_layers"]) / int(manifest["num_layers_full"])
    return dataclasses.replace(entry, memory_options={**entry.memory_options, "keep_ratio": keep_ratio,
                                                      "adapter_layers": len(manifest["adapter_layers"]), **options})


def emulator_int8_fits(shape: ModelShape, task: TrainingTask, report: DeviceReport, choice: Choice,
                       manifest: Mapping[str, Any], *, copies: str) -> bool:
    """Whether the emulator's frozen part fits the budget in 8 bits at the plan's batch
    (the policy row models 4 bits, the smallest): 8 bits lose less of the base model."""
    entry = policy_entry(choice.mode, engine_policy())
    if entry is None:
        return False
    eight_bit = _emulator_entry(entry, manifest, base_bits=8)
    extra: dict[str, int] = {}
    if copies_location(copies, report.kind, task.scope) == "memory" and report.kind in ("cpu", "mps"):
        extra["round_copies"] = 2 * lora_param_count(shape, task.lora_rank) * 4
    try:
        fitted = choose(shape, task, budget_bytes=report.budget_bytes, headroom=report.headroom, policy=[eight_bit],
                        forced=choice.mode, budget_source=report.budget_source, extra=extra)
    except NoModeFits:
        return False
    return fitted.batch >= choice.batch


def _decode(frame: str | bytes) -> Message:
    if isinstance(frame, str):
        raise MalformedFrame("text frames are not part of the protocol")
    return codec.decode(frame)


def client_threads() -> None:
    """Leave one core to the event loop and the other processes of a local federation."""
    threads = os.environ.get("EDGEFED_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def _settings_dict(settings: object) -> dict[str, Any]:
    """A round's settings as a plain dict for :class:`RoundStartEvent`."""
    try:
        return asdict(settings)  # type: ignore[call-overload]
    except TypeError:
        return {}


def _adopt_model(model: Any, tokenizer: Any, device: torch.device) -> tuple[Any, Any]:
    """Check an app's model object and put it on the client's device.

    The base-weights hash (PROTOCOL.md §6.6) is of float32 weights, and the client trains
    and rebuilds in float32, so a half-precision model is refused here with what to do,
    rather than rejected later by the coordinator with a hash nobody can explain.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model must be a transformers causal LM (a torch.nn.Module with a config), "
                         f"got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError("model is already wrapped by peft; pass the base model (the client adds the "
                         "federation's adapters itself)")
    dtypes = {parameter.dtype for parameter in model.parameters()}
    if dtypes != {torch.float32}:
        found = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))
        raise ValueError(f"model must be float32 (its weights define the federation's base hash); it is {found}: "
                         f"load it with dtype=torch.float32")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("tokenizer must have an eos token (it ends every training example)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)  # the engine turns on what it trains
    return model.to(device), tokenizer
