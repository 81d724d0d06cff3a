"""The Flower ClientApp: one of this project's engines behind Flower's train and evaluate.

``flower_adapter.client_app:app`` is what ``flwr run`` loads (``[tool.flwr.app.components]
clientapp``). Each message from :class:`flower_adapter.strategy.SeedScalarStrategy` names
the ledger's last round L and brings what the process's model copy may lack to reach it;
the app reaches it (:class:`flower_adapter.host.ModelHost`), then

* **train**: trains the ``round_task`` with the node's own data, from θ_L, and answers the
  engine's update: one scalar per seed (an ``update``, or a ``packed_update`` when the
  mode's ``value_encoding`` asks for it), plus Flower metrics (``num-examples``, losses);
* **evaluate**: answers its ``fingerprint`` of θ_L (the coordinator's ``round_commit`` /
  ``fingerprint`` exchange).

When the copy cannot reach L from what was sent it answers a ``sync_request`` instead, and
the strategy sends it what it asked for.

A node's settings come, first found first, from the app's own :class:`ClientSettings`
(what :func:`make_client_app` was given: a Python program or a test), the node config
(``flower-supernode --node-config "data='/data/mine.jsonl'"``), then the run config
(``[tool.flwr.app.config]`` in the Flower app's pyproject.toml, ``flwr run --run-config``):

================== ===================================================================
``model``          the model source (a model directory, a ``.gguf`` file, a hub id or
                   ``smollm2-135m``); required
``data``           the node's JSONL file; ``{partition}`` is replaced by the node's
                   ``partition-id`` (simulation: one file per virtual node); required
``device``         ``auto`` (default), ``cpu``, ``cuda``, ``cuda:N``, ``mps``
``memory-budget-gib`` the memory the chooser plans within (default: the free memory)
``prompt-format``  ``auto`` (default), ``plain``, ``chat``
``cache-dir``      the model conversion cache
================== ===================================================================
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_adapter.host import ClientAppError, ModelHost, NodeSetup, check_model_source
from flower_adapter.wire import Answer, Instruction

__all__ = ["ClientSettings", "app", "make_client_app", "node_setup", "process_host"]

PARTITION_KEY = "partition-id"  # what Flower's simulation puts in each node's config

_HOST: ModelHost | None = None
_HOST_LOCK = threading.Lock()


def process_host() -> ModelHost:
    """This process's model copy, shared by every node the process runs."""
    global _HOST
    with _HOST_LOCK:
        if _HOST is None:
            _HOST = ModelHost()
        return _HOST


@dataclass(frozen=True)
class ClientSettings:
    """Settings given to the app in code; any left None is read from the node and run
    configs. ``data`` may also be one file per partition id (a simulation's nodes).

    Raises:
        ClientAppError: a model or data file that does not exist (checked here, so a
            mistyped path fails before Flower starts, in one line).
    """

    model: str | None = None
    data: str | Sequence[str] | None = None
    device: str | None = None
    memory_budget_gib: float | None = None
    prompt_format: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.model is not None:
            check_model_source(self.model)
        if isinstance(self.data, str):
            if "{partition}" not in self.data:
                _existing_data(self.data)
        elif self.data is not None:
            if not self.data:
                raise ClientAppError("data: give at least one data file")
            for path in self.data:
                _existing_data(path)
        if self.memory_budget_gib is not None and not self.memory_budget_gib > 0:
            raise ClientAppError(f"memory_budget_gib must be positive, got {self.memory_budget_gib}")


def _existing_data(path: str) -> Path:
    data = Path(path).expanduser()
    if not data.is_file():
        raise ClientAppError(f"data file not found: {str(data)!r} (a JSONL file of instruction/response records)")
    return data


def _first(key: str, given: Any, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Any:
    if given is not None:
        return given
    if key in node_config:
        return node_config[key]
    return run_config.get(key)


def node_setup(settings: ClientSettings | None, node_config: Mapping[str, Any],
               run_config: Mapping[str, Any]) -> NodeSetup:
    """This node's setup from the app's settings, its node config and the run config.

    Raises:
        ClientAppError: no model or no data file is named, or the file does not exist.
    """
    given = settings or ClientSettings()
    partition = node_config.get(PARTITION_KEY)
    model = _first("model", given.model, node_config, run_config)
    if not isinstance(model, str) or not model:
        raise ClientAppError("no model: set 'model' in the run config (a model directory, a .gguf file or "
                             "'smollm2-135m')")
    check_model_source(model)
    data = _first("data", given.data, node_config, run_config)
    if data is None or data == "":
        raise ClientAppError("no data file for this node: set 'data' in its node config (flower-supernode "
                             "--node-config \"data='/path/mine.jsonl'\") or in the run config, where "
                             "'{partition}' stands for the node's partition id")
    if not isinstance(data, str):
        if not isinstance(partition, int) or not 0 <= partition < len(data):
            raise ClientAppError(f"data: {len(data)} files are given, one per partition, but this node's partition "
                                 f"is {partition!r}")
        data = data[partition]
    elif "{partition}" in data:
        if partition is None:
            raise ClientAppError(f"data {data!r} names a file per partition, but this node has no "
                                 f"'{PARTITION_KEY}' in its node config")
        data = data.replace("{partition}", str(partition))
    budget = _first("memory-budget-gib", given.memory_budget_gib, node_config, run_config)
    return NodeSetup(
        model=model, data=_existing_data(data),
        device=str(_first("device", given.device, node_config, run_config) or "auto"),
        memory_budget_bytes=None if budget is None else int(float(budget) * 2**30),
        prompt_format=str(_first("prompt-format", given.prompt_format, node_config, run_config) or "auto"),
        cache_dir=_first("cache-dir", given.cache_dir, node_config, run_config) or None,
        stream_name=f"partition-{partition}" if partition is not None else "")


def answer(message: Message, context: Context, settings: ClientSettings | None, host: ModelHost | None,
           *, train: bool) -> Message:
    """The node's reply to one instruction (see the module docstring).

    Raises:
        ClientAppError, WireError: what this node cannot do, in one line; Flower sends the
            strategy an error reply carrying it.
    """
    instruction = Instruction.from_record(message.content)
    if train and instruction.task is None:
        raise ClientAppError("a train message without a round task")
    setup = node_setup(settings, context.node_config, context.run_config)
    host = host or process_host()
    client_id = instruction.welcome.client_id
    with host.lock:
        replica = host.replica_for(message.metadata.run_id, setup, instruction.welcome.federation, instruction.mode)
        request = host.reach(instruction.target_round, instruction.table_digest, instruction.sync,
                             resync=instruction.resync)
        if request is not None:
            reply = Answer(holder=host.holder, held=replica.round, sync_request=request)
        elif train:
            assert instruction.task is not None
            update, metrics = host.train(instruction.task, client_id, setup)
            reply = Answer(holder=host.holder, held=replica.round, update=update, metrics=metrics)
        else:
            reply = Answer(holder=host.holder, held=replica.round, fingerprint=host.fingerprint())
    return Message(reply.to_record(), reply_to=message)


def make_client_app(settings: ClientSettings | None = None, *, host: ModelHost | None = None) -> ClientApp:
    """A ClientApp answering :class:`~flower_adapter.strategy.SeedScalarStrategy`.

    Args:
        settings: settings that win over the node and run configs (see the module
            docstring); None reads everything from them.
        host: the model copy to use; None: the process's (:func:`process_host`). Give
            each app its own to run several simulated devices in one process.
    """
    client = ClientApp()

    @client.train()
    def train(message: Message, context: Context) -> Message:
        return answer(message, context, settings, host, train=True)

    @client.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return answer(message, context, settings, host, train=False)

    return client


app = make_client_app()
