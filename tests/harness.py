"""Shared scaffolding for tests that run a real coordinator and real clients in one event
loop: a tiny random Llama on disk, client data files, and a coordinator on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.allowlist import Allowlist
from coordinator.config import FederationConfig
from coordinator.ledger import Ledger
from coordinator.server import Coordinator
from edge_client.model import base_weights_hash, load_model
from edge_client.tiny import make_tiny_llama
from profiles.estimator import ModelShape

# SmolLM2-135M-Instruct's shape (its config.json), for memory-model tests without the model.
SMOLLM2 = ModelShape.from_hf_config({
    "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "intermediate_size": 1536, "head_dim": 64, "tie_word_embeddings": True,
})

TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Tiny:
    """A tiny random Llama saved as a Hugging Face directory, and its base-weights hash."""

    directory: Path
    model_hash: str


def make_tiny(directory: Path) -> Tiny:
    path = make_tiny_llama(directory)
    model, _ = load_model(path)
    return Tiny(path, base_weights_hash(model))


def write_data(path: Path, count: int, offset: int = 0) -> Path:
    """``count`` small arithmetic instruction records (JSONL)."""
    with path.open("w") as out:
        for i in range(offset, offset + count):
            out.write(json.dumps({"instruction": f"What is {i % 17} plus {i % 13}?",
                                  "response": f"{i % 17 + i % 13}"}) + "\n")
    return path


async def until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def coordinator(tmp_path: Path, tiny: Tiny, *, allow: Allowlist | None = None,
                      **overrides: Any) -> AsyncIterator[Coordinator]:
    """A real coordinator (defaults: one client, every round needs its update; open mode
    unless ``allow`` is given)."""
    settings: dict[str, Any] = dict(
        model_hash=tiny.model_hash, port=0, ledger_path=str(tmp_path / "ledger.db"), rounds=1, min_clients=1,
        clients_per_round=1, quorum=1, deadline_s=60, pool_key=7, seed_pool_size=64, local_steps=3,
        batch_size=2, max_seq_len=64, learning_rate=1e-3, rebase_every=3)
    settings.update(overrides)
    config = FederationConfig(**settings)
    with Ledger(config.ledger_path) as ledger:
        server = Coordinator(config, ledger, allowlist=allow)
        task = asyncio.create_task(server.run())
        await until(lambda: server.port is not None or task.done(), "the coordinator to listen", 30)
        if task.done():
            task.result()
        try:
            yield server
        finally:
            server.stop()
            await asyncio.wait_for(task, 30)


def client_status(server: Coordinator, client_id: str) -> dict[str, Any] | None:
    return next((c for c in server.status()["clients"] if c["client_id"] == client_id), None)
