"""An edgefed client embedded in an app: :class:`Client`.

The command line (``edgefed-client``) and this class run the same daemon
(:class:`edge_client.daemon.EdgeClient`); this one takes what an app already holds (its
records, its model and tokenizer), reports through callbacks (:mod:`edge_client.events`:
every callback runs on the client's event-loop thread, in order) and leaves signals to the
app unless asked.

Synchronous app::

    client = Client("ws://127.0.0.1:8765", "phone-1", records, on_round_end=print)
    client.start()          # returns at once; the client runs in its own thread
    ...
    client.stop()           # goodbye sent, socket closed, thread joined

asyncio app::

    await Client(url, "phone-1", "my.jsonl").run()   # until the federation ends
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from edge_client.daemon import ClientConfig, EdgeClient
from edge_client.data import records_from
from edge_client.device import DEFAULT_HEADROOM, parse_bytes
from edge_client.events import ClientCallbacks, PlanEvent, RoundEndEvent, RoundStartEvent, StepEvent, SyncEvent
from edge_client.model import DEFAULT_MODEL
from edgefed._background import BackgroundRunner

__all__ = ["Client", "DataSource"]

logger = logging.getLogger(__name__)

#: Training data: a JSONL file path, or records (any iterable of mappings or objects with
#: ``instruction`` and ``response``: a list of dicts, a ``datasets.Dataset``, a map-style
#: ``torch.utils.data.Dataset``).
DataSource = str | os.PathLike[str] | Iterable[Any]


class Client:
    """A federated fine-tuning client.

    Args:
        url: the coordinator, ``ws://host:port`` or ``wss://host:port``.
        client_id: this client's name in the federation.
        data: the training data (:data:`DataSource`); it never leaves the device. None
            only with ``mode="observe"`` (follow the model without training).
        model: a model source (``"smollm2-135m"``, a ``.gguf`` file, a Hugging Face
            directory), or a float32 causal LM the app already holds (then pass
            ``tokenizer`` too; the client trains that object in place). Either way its
            base weights must be the federation's (checked against the coordinator's hash).
        tokenizer: the tokenizer of an app's model object.
        mode: "auto" (the best mode the memory allows), a mode name to force, or "observe".
        device: "auto", "cpu", "cuda", "cuda:1", "mps".
        memory_budget: bytes, or a size such as ``"6GiB"``; None: the free memory.
        key_path, ca_file: this client's key file and the federation's CA (Security in
            the README).
        prompt_format: "auto", "plain" or "chat"; every client of a federation the same.
        instruction_field, response_field: the records' field names.
        cache_dir: the model conversion and round-copy cache (None: the default).
        on_plan, on_sync, on_round_start, on_step, on_round_end: callbacks, each given one
            event (:mod:`edge_client.events`), all on the client's event-loop thread.

    Raises:
        ValueError: a bad argument, said in one line (bad records are reported when the
            client starts: :class:`edge_client.data.DataError`).
    """

    def __init__(self, url: str, client_id: str, data: DataSource | None, *, model: str | Any = DEFAULT_MODEL,
                 tokenizer: Any = None, mode: str = "auto", device: str = "auto",
                 memory_budget: int | str | None = None, memory_headroom: float = DEFAULT_HEADROOM,
                 key_path: str | os.PathLike[str] | None = None, ca_file: str | os.PathLike[str] | None = None,
                 prompt_format: str = "auto", instruction_field: str = "instruction",
                 response_field: str = "response", cache_dir: str | os.PathLike[str] | None = None,
                 on_plan: Callable[[PlanEvent], None] | None = None,
                 on_sync: Callable[[SyncEvent], None] | None = None,
                 on_round_start: Callable[[RoundStartEvent], None] | None = None,
                 on_step: Callable[[StepEvent], None] | None = None,
                 on_round_end: Callable[[RoundEndEvent], None] | None = None) -> None:
        budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else memory_budget
        path = str(data) if isinstance(data, (str, os.PathLike)) else None
        if data is None and mode != "observe":
            raise ValueError("data is required to train (None only with mode='observe')")
        model_source = model if isinstance(model, (str, os.PathLike)) else None
        if model_source is None and tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer=...")
        if model_source is not None and tokenizer is not None:
            raise ValueError("tokenizer is for a model object; a model source brings its own")
        self.config = ClientConfig(
            url=url, client_id=client_id, data_path=path, model=str(model_source or DEFAULT_MODEL), mode=mode,
            device=device, memory_budget_bytes=budget, memory_headroom=memory_headroom,
            cache_dir=str(cache_dir) if cache_dir is not None else None, prompt_format=prompt_format,
            instruction_field=instruction_field, response_field=response_field,
            key_path=str(key_path) if key_path is not None else None,
            ca_file=str(ca_file) if ca_file is not None else None)
        # Records are read and checked when the client starts (in its thread), not here.
        self._data: Iterable[Any] | None = None if path is not None or data is None else data  # type: ignore[assignment]
        callbacks = ClientCallbacks(on_plan=on_plan, on_sync=on_sync, on_round_start=on_round_start, on_step=on_step,
                                    on_round_end=on_round_end)
        self._daemon = EdgeClient(self.config, model=None if model_source is not None else model,
                                  tokenizer=tokenizer, callbacks=callbacks)
        self._prepared = False
        self._runner = BackgroundRunner(f"edgefed-client-{client_id}", self.run)

    # -- state -------------------------------------------------------------------------

    @property
    def round(self) -> int:
        """The ledger round the client's model holds (0 before the first sync)."""
        sync = self._daemon.sync
        return sync.round if sync is not None else 0

    @property
    def rounds_trained(self) -> int:
        """Rounds this client sent an update for."""
        return self._daemon.rounds_trained

    @property
    def finished(self) -> bool:
        """True once the coordinator said goodbye (the federation ended)."""
        return self._daemon.finished

    @property
    def plan(self) -> str | None:
        """The plan's one-line explanation, once the federation's task is known."""
        choice = self._daemon.choice
        return choice.explanation if choice is not None else None

    @property
    def model(self) -> Any:
        """The model the client trains (None before it starts): the federation's current
        model between rounds."""
        return getattr(self._daemon, "model", None)

    # -- asyncio -----------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        """Load (in a worker thread), connect, and serve rounds until the federation ends
        or :meth:`stop` is called.

        Args:
            handle_signals: stop on SIGINT/SIGTERM (leave False in an app with its own).

        Raises:
            edge_client.daemon.FatalClientError: the coordinator refused this client, or
                nothing fits its memory; edge_client.data.DataError: no usable records;
                edge_client.model.ModelLoadError: the model cannot be loaded.
        """
        if not self._prepared:
            await asyncio.to_thread(self._prepare)
        if self._daemon.stopping:
            return
        await self._daemon.run(handle_signals=handle_signals)

    def _prepare(self) -> None:
        records = None
        if self._data is not None:
            records, _ = records_from(self._data, instruction_field=self.config.instruction_field,
                                      response_field=self.config.response_field)
        self._daemon.prepare(records=records)
        self._prepared = True

    # -- threads -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the client in a background thread (with its own event loop) and return at
        once; callbacks run on that thread. Errors are raised by :meth:`wait`."""
        self._runner.start("client")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the client's thread to end (the federation ended, or :meth:`stop`).

        Returns:
            True when it ended, False on timeout.

        Raises:
            whatever ended the client with an error (see :meth:`run`).
        """
        return self._runner.wait("client", timeout)

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop: say goodbye to the coordinator, close the connection, and (after
        :meth:`start`) join the client's thread; a training step in progress finishes
        first. Safe to call from any thread, and more than once."""
        self._daemon.stop()
        if not self._runner.join(timeout):
            logger.warning("client %s did not stop within %ss", self.config.client_id, timeout)

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
