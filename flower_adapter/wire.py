"""What a Flower message carries between the strategy and a ClientApp.

The payload is this project's own protocol messages (PROTOCOL.md §4), each encoded by
:mod:`protocol.codec` and carried as ``bytes`` in one Flower ``ConfigRecord``: a
``round_task``, a ``sync_response``, an ``update`` or ``packed_update``, a
``fingerprint``, a ``sync_request``. Reusing them rather than spelling seeds and scalars
out as Flower config scalars means both ends validate every field with the protocol's
own checks (distinct seeds, finite float32 coefficients, digests, value encodings), and
the bytes on the wire are the protocol's: 1,024 ferret scalars travel as one byte each
(``q8``) exactly as they do to the coordinator. No ``ArrayRecord`` is ever sent to a
client: the model never crosses.

Instruction (strategy -> ClientApp), the ``ConfigRecord`` under :data:`RECORD`:

=================  ==========================================================================
``welcome``        ``welcome``: the federation (scope, rebase interval, ...), the client id the
                   strategy knows this node by, and the ledger's last committed round L
``table-digest``   the digest of the seed table at L (PROTOCOL.md §6.4)
``mode``           the training mode (an engine name) the federation trains with
``sync``           optional ``sync_response``: what this node's process may lack to reach L
``resync``         optional, true: rebuild from the base weights and the table (the node's
                   fingerprint differed from the majority's: the coordinator's
                   ``fingerprint_mismatch``)
``task``           train messages: the ``round_task`` for round L + 1
=================  ==========================================================================

Answer (ClientApp -> strategy), the ``ConfigRecord`` under :data:`RECORD`, plus a
``MetricRecord`` under :data:`METRICS` for Flower's own tooling (``num-examples``,
losses, seconds):

=================  ==========================================================================
``holder``         an id of the process-level model copy that answered (several Flower nodes
                   may share one process, and one node may run in another process each round)
``held``           the round that copy holds now
``update``         train: the ``update`` or ``packed_update``
``fingerprint``    evaluate: the ``fingerprint`` of the copy at L
``sync-request``   instead of the above: the copy could not reach L from what was sent;
                   ``have_round`` is the round it holds (0: send a snapshot)
=================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import (
    Fingerprint,
    PackedUpdate,
    RoundTask,
    SyncRequest,
    SyncResponse,
    Update,
    Welcome,
)

__all__ = ["Answer", "Instruction", "METRICS", "RECORD", "WireError", "array_count", "message_bytes"]

RECORD = "edgefed"
METRICS = "metrics"

_T = TypeVar("_T")


class WireError(ValueError):
    """A Flower message does not carry what this adapter expects; the message says what."""


def _decode(config: ConfigRecord, key: str, expected: type[_T] | tuple[type, ...], *, where: str) -> Any:
    raw = config.get(key)
    if raw is None:
        return None
    if not isinstance(raw, bytes):
        raise WireError(f"{where}: '{key}' must be the bytes of a protocol message, got {type(raw).__name__}")
    try:
        message = codec.decode(raw)
    except ProtocolError as error:
        raise WireError(f"{where}: '{key}' is not a valid protocol message: {error}") from None
    if not isinstance(message, expected):
        raise WireError(f"{where}: '{key}' holds a {type(message).__name__}, not what it should")
    return message


def _config_of(record: RecordDict, where: str) -> ConfigRecord:
    config = record.config_records.get(RECORD)
    if config is None:
        raise WireError(f"{where}: the message has no '{RECORD}' config record; it was not sent by the edgefed "
                        f"Flower adapter")
    return config


@dataclass(frozen=True)
class Instruction:
    """What the strategy asks of one node: reach round L (``welcome.last_committed_round``),
    then train the task (train messages) or report the fingerprint (evaluate messages)."""

    welcome: Welcome
    table_digest: str
    mode: str
    sync: SyncResponse | None = None
    resync: bool = False
    task: RoundTask | None = None

    @property
    def target_round(self) -> int:
        return self.welcome.last_committed_round

    def to_record(self) -> RecordDict:
        config: dict[str, Any] = {"welcome": codec.encode(self.welcome), "table-digest": self.table_digest,
                                  "mode": self.mode}
        if self.sync is not None:
            config["sync"] = codec.encode(self.sync)
        if self.resync:
            config["resync"] = True
        if self.task is not None:
            config["task"] = codec.encode(self.task)
        return RecordDict({RECORD: ConfigRecord(config)})

    @classmethod
    def from_record(cls, record: RecordDict) -> Instruction:
        """Raises WireError when a field is missing or is not a valid protocol message."""
        where = "instruction"
        config = _config_of(record, where)
        welcome = _decode(config, "welcome", Welcome, where=where)
        digest, mode = config.get("table-digest"), config.get("mode")
        if welcome is None or not isinstance(digest, str) or not isinstance(mode, str):
            raise WireError(f"{where}: 'welcome', 'table-digest' and 'mode' are required")
        sync = _decode(config, "sync", SyncResponse, where=where)
        if sync is not None and sync.target_round != welcome.last_committed_round:
            raise WireError(f"{where}: the sync reaches round {sync.target_round}, the welcome says the ledger is "
                            f"at {welcome.last_committed_round}")
        task = _decode(config, "task", RoundTask, where=where)
        if task is not None and task.base_round != welcome.last_committed_round:
            raise WireError(f"{where}: the task is based on round {task.base_round}, the ledger is at "
                            f"{welcome.last_committed_round}")
        return cls(welcome=welcome, table_digest=digest, mode=mode, sync=sync,
                   resync=bool(config.get("resync", False)), task=task)


@dataclass(frozen=True)
class Answer:
    """A node's reply: exactly one of an update (train), a fingerprint (evaluate) or a
    sync request (it could not reach the instruction's round)."""

    holder: str
    held: int
    update: Update | PackedUpdate | None = None
    fingerprint: Fingerprint | None = None
    sync_request: SyncRequest | None = None
    metrics: dict[str, int | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = sum(item is not None for item in (self.update, self.fingerprint, self.sync_request))
        if given != 1:
            raise WireError(f"an answer carries exactly one of update, fingerprint, sync-request ({given} given)")

    def to_record(self) -> RecordDict:
        config: dict[str, Any] = {"holder": self.holder, "held": self.held}
        if self.update is not None:
            config["update"] = codec.encode(self.update)
        if self.fingerprint is not None:
            config["fingerprint"] = codec.encode(self.fingerprint)
        if self.sync_request is not None:
            config["sync-request"] = codec.encode(self.sync_request)
        content: dict[str, Any] = {RECORD: ConfigRecord(config)}
        if self.metrics:
            content[METRICS] = MetricRecord(dict(self.metrics))
        return RecordDict(content)

    @classmethod
    def from_record(cls, record: RecordDict) -> Answer:
        """Raises WireError when the reply is not a well-formed answer."""
        where = "answer"
        config = _config_of(record, where)
        holder, held = config.get("holder"), config.get("held")
        if not isinstance(holder, str) or isinstance(held, bool) or not isinstance(held, int) or held < 0:
            raise WireError(f"{where}: 'holder' (str) and 'held' (a round) are required")
        metrics = record.metric_records.get(METRICS)
        return cls(holder=holder, held=held,
                   update=_decode(config, "update", (Update, PackedUpdate), where=where),
                   fingerprint=_decode(config, "fingerprint", Fingerprint, where=where),
                   sync_request=_decode(config, "sync-request", SyncRequest, where=where),
                   metrics={key: value for key, value in (metrics or {}).items()
                            if isinstance(value, (int, float))})


def message_bytes(message: Message) -> int:
    """The bytes of ``message`` as Flower serialises it for transport: the message
    object (its metadata) and every record under it, each as its deflated object
    (protobuf body with Flower's object header), as the SuperLink stores and ships
    them. What gRPC adds around them is not counted."""
    total, pending = 0, [message]  # a tree of Flower's InflatableObjects
    while pending:
        obj = pending.pop()
        total += len(obj.deflate())
        pending += list((obj.children or {}).values())  # type: ignore[arg-type]
    return total


def array_count(record: RecordDict) -> int:
    """How many arrays (tensors) ``record`` carries: 0 for every message this adapter
    sends to a client."""
    return sum(len(arrays) for arrays in record.array_records.values())
