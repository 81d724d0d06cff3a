"""edgefed: federated fine-tuning of LLMs on the devices people own.

The public API for apps (the README's "Embedding" section shows it whole)::

    from edgefed import Client, Coordinator, export_model

- :class:`Client`: a client embedded in an app (data from a path or any records, a model
  source or the app's own model and tokenizer, callbacks, ``start()``/``stop()`` or
  ``await run()``);
- :class:`Coordinator`: host a federation from an app, with the TOML file's config;
- :func:`export_model`: write a round's model from a ledger as HF, peft adapter and GGUF;
- the events the callbacks get, and the errors the client raises.

Everything else (``edge_client``, ``coordinator``, ``protocol``, ``profiles``,
``exporter``) is the implementation; the command-line tools are built on the same code.
"""

from coordinator.config import ConfigError, FederationConfig
from edge_client.daemon import FatalClientError
from edge_client.data import DataError
from edge_client.events import PlanEvent, RoundEndEvent, RoundStartEvent, StepEvent, SyncEvent
from edge_client.model import ModelLoadError, base_weights_hash
from edgefed.client import Client, DataSource
from edgefed.hosting import Coordinator
from exporter.export import ExportResult, export_model
from exporter.replay import ExportError

__all__ = [
    "Client",
    "ConfigError",
    "Coordinator",
    "DataError",
    "DataSource",
    "ExportError",
    "ExportResult",
    "FatalClientError",
    "FederationConfig",
    "ModelLoadError",
    "PlanEvent",
    "RoundEndEvent",
    "RoundStartEvent",
    "StepEvent",
    "SyncEvent",
    "base_weights_hash",
    "export_model",
]
