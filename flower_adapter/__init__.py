"""Flower interop: seed/scalar training with this project's engines, inside a Flower app.

A team on Flower keeps its tooling (``flwr run``, the SuperLink, its simulation engine)
and gets this project's traffic and replay: a Flower ``ServerApp`` whose strategy hands
out seeds, combines the per-seed scalars robustly and commits every round to the same
SQLite ledger the coordinator keeps, and a ``ClientApp`` whose train step runs one of
this project's engines and answers one scalar per seed. No weights cross: every client
rebuilds the same model bit for bit from the ledger (PROTOCOL.md §6), and reports its
fingerprint so the strategy can check that they agree.

Modules, one side each (the server side never loads a model):

* :mod:`flower_adapter.wire`: the record layout both sides agree on (protocol messages,
  msgpack-encoded, in a Flower ``ConfigRecord``) and the byte count of a message.
* :mod:`flower_adapter.federation`: the coordinator's rules the strategy reuses (seed
  and client draws, the sync response, the ledger's identity).
* :mod:`flower_adapter.strategy`: the Flower ``Strategy``.
* :mod:`flower_adapter.server_app`: the ``ServerApp`` (``flower_adapter.server_app:app``).
* :mod:`flower_adapter.host`: a client process's model copy (:class:`edge_client.replica.Replica`).
* :mod:`flower_adapter.client_app`: the ``ClientApp`` (``flower_adapter.client_app:app``).

Nothing is imported here, so importing one side does not load the other (the server's
process never imports torch). Flower sends usage telemetry unless told not to; a
federation's own machinery must not phone home, so it is switched off before any module
of this package imports ``flwr`` (a user's explicit setting wins).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
