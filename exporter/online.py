"""Rebuilding the model from a running coordinator instead of its ledger file.

Whoever runs the export may not hold the coordinator's ledger file (it lives on the
coordinator's machine). They can still rebuild the model the way every client does: join
as an observer (``mode = "observe"``: never given tasks), sync the ledger rows the
coordinator serves to any client (PROTOCOL.md §5, ``sync_request``), replay them, and
check the result against the fingerprints the training clients reported for that round,
which ``GET /status`` lists. The observer's own report is left out of the check.

Only the latest committed round can be exported this way (a sync brings a client to the
coordinator's round); older rounds need the ledger file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_client.daemon import ClientConfig, EdgeClient, FatalClientError
from edge_client.events import ClientCallbacks, SyncEvent
from edge_client.model import ModelLoadError
from edge_client.scope import ScopeConfig
from exporter.replay import ExportError, LedgerFacts, Rebuilt, check_fingerprint

__all__ = ["is_coordinator_url", "rebuild_online", "status_url"]

logger = logging.getLogger(__name__)

EXPORTER_CLIENT_ID = "edgefed-export"


def is_coordinator_url(source: str | os.PathLike[str]) -> bool:
    return isinstance(source, str) and source.startswith(("ws://", "wss://"))


def status_url(url: str) -> str:
    """The coordinator's ``/status`` address for its websocket URL."""
    scheme, rest = url.split("://", 1)
    return f"{'https' if scheme == 'wss' else 'http'}://{rest.rstrip('/')}/status"


def fetch_status(url: str, ca_file: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """GET the coordinator's ``/status`` JSON."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("wss://") else None
    try:
        with urllib.request.urlopen(status_url(url), timeout=timeout, context=context) as response:
            document: dict[str, Any] = json.loads(response.read())
            return document
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ExportError(f"cannot read {status_url(url)}: {error}") from None


def rebuild_online(url: str, model_source: str, *, round_number: int | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, key_path: str | None = None,
                   ca_file: str | None = None, client_id: str = EXPORTER_CLIENT_ID, verify: bool = True,
                   timeout_s: float = 900.0, progress: Callable[[str, int, int], None] | None = None) -> Rebuilt:
    """Rebuild the coordinator's latest committed round as an observer client.

    Args:
        url: the coordinator (``ws://`` or ``wss://``).
        model_source: the federation's base model.
        round_number: must be the latest committed round, or None.
        cache_dir: the model conversion cache.
        key_path, ca_file: as for a client (a coordinator with an allow-list needs the key).
        client_id: the observer's id in the federation.
        verify: refuse unless the training clients' most reported fingerprint is the rebuilt one.
        timeout_s: give up syncing after this long.
        progress: ``progress("replay", done, total)``: 0/1 when joining, 1/1 once synced.

    Raises:
        ExportError: the coordinator cannot be reached or refuses, the round is not its
            latest, the model is not the federation's, or the fingerprint check fails.
    """
    status = fetch_status(url, ca_file)
    latest = int(status.get("round", 0))
    if round_number is not None and round_number != latest:
        raise ExportError(f"a coordinator serves its latest round ({latest}) only; export round {round_number} "
                          f"from its ledger file")
    config = ClientConfig(url=url, client_id=client_id, data_path=None, model=model_source, mode="observe",
                          cache_dir=str(cache_dir) if cache_dir is not None else None, copies="memory",
                          key_path=key_path, ca_file=ca_file)
    reached: list[SyncEvent] = []
    client: EdgeClient

    def on_sync(event: SyncEvent) -> None:
        if event.round >= latest and not reached:
            reached.append(event)
            client.stop()  # on the client's loop thread: say goodbye and end run()

    client = EdgeClient(config, callbacks=ClientCallbacks(on_sync=on_sync))
    if progress is not None:
        progress("replay", 0, 1)
    try:
        client.prepare()
        asyncio.run(asyncio.wait_for(client.run(), timeout_s))
    except (FatalClientError, ModelLoadError, ValueError) as error:
        message = str(error)
        if "not the federation's base model" in message:
            message += "; pass the model the clients were given (--model)"
        raise ExportError(message) from None
    except TimeoutError:
        raise ExportError(f"the coordinator at {url} did not bring the model to round {latest} within "
                          f"{timeout_s:.0f}s") from None
    if not reached or client.sync is None or client.federation is None:
        raise ExportError(f"the coordinator at {url} ended the connection before the model reached round {latest}")
    if progress is not None:
        progress("replay", 1, 1)
    event = reached[0]
    federation = client.federation
    reports = _reports(fetch_status(url, ca_file), event.round, exclude=client_id)
    facts = LedgerFacts(
        source=url, federation_id=federation.federation_id, model_hash=federation.model_hash,
        scope=ScopeConfig(kind=federation.scope.kind, lora_rank=federation.scope.lora_rank or 8,
                          lora_alpha=federation.scope.lora_alpha,
                          lora_targets=tuple(federation.scope.lora_targets) or ("q_proj", "v_proj"),
                          lora_init_seed=federation.scope.lora_init_seed,
                          lora_layers=tuple(federation.scope.lora_layers)),
        perturbation=federation.perturbation, rebase_every=federation.rebase_every, last_round=event.round,
        block_seeds=federation.block_seeds)
    rebuilt = Rebuilt(model=client.model, tokenizer=client.tokenizer, space=client.sync.space, facts=facts,
                      round=event.round, fingerprint=event.fingerprint, reported=reports,
                      model_dir=Path(model_source) if os.path.exists(model_source) else model_source)
    if verify:
        check_fingerprint(rebuilt)
    return rebuilt


def _reports(status: dict[str, Any], round_number: int, *, exclude: str) -> dict[str, str]:
    """The fingerprints the clients (not the exporter itself) reported for a round."""
    for entry in status.get("rounds", []):
        if entry.get("round") == round_number:
            return {client: value for client, value in (entry.get("fingerprint_reports") or {}).items()
                    if client != exclude}
    return {}
