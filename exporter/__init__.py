"""Taking the federated model home: rebuild a round from the ledger and write it out.

``edgefed-export`` (:mod:`exporter.cli`) and :func:`export_model` rebuild the model of a
committed round from the coordinator's ledger file, check it against the fingerprints
the clients reported, and write it as a Hugging Face directory, a peft adapter and a
GGUF file. This package reads the ledger (``coordinator.ledger``) and rebuilds with the
client's own code (``edge_client``); neither of those imports it.
"""

from exporter.export import FORMATS, ExportResult, export_model
from exporter.replay import ExportError

__all__ = ["FORMATS", "ExportError", "ExportResult", "export_model"]
