"""The upper bound of ``bench/peers.py``: first-order LoRA trained centrally on the union of
the clients' records, as if they had all been uploaded to one machine.

Same model, LoRA scope and initial adapters as the federation, same batch size and
sequence length; AdamW (what one would pick when not federating; its rate is tuned like
every contender's). It uses both cores (a central trainer has the whole machine), its
training time excludes loading and the checkpoints, and it saves the adapters every
``checkpoint_every`` steps for the offline evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._peers_common import (
    BATCH_SIZE,
    batch_stream,
    first_order_step,
    get_values,
    load_lora_model,
    peak_rss_bytes_of_self,
)

# 12 steps: the examples a 3-client federation round of 4 local steps each trains on.
CHECKPOINT_EVERY = 12


def run_centralized(out_dir: Path, records: list[dict], *, learning_rate: float, wall_budget_s: float,
                    max_steps: int = 100_000, seed: int = 0, threads: int = 2, model_source: str = "smollm2-135m",
                    checkpoint_every: int = CHECKPOINT_EVERY) -> dict[str, Any]:
    """Train until ``wall_budget_s`` of training time or ``max_steps`` (a checkpoint every
    ``checkpoint_every`` steps and at the stop); return the checkpoints with their training times, and write them to
    ``out_dir/central.json``."""
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = load_lora_model(model_source)
    stream = batch_stream(lora, records, f"central-{seed}")
    optimizer = torch.optim.AdamW(lora.parameters, lr=learning_rate, weight_decay=0.0)
    points: list[dict[str, Any]] = []
    np.save(out_dir / "step-000000.npy", get_values(lora))
    points.append({"step": 0, "train_s": 0.0, "checkpoint": str(out_dir / "step-000000.npy"), "loss": None})
    training = 0.0
    losses: list[float] = []
    step = 0
    while step < max_steps and training < wall_budget_s:
        started = time.perf_counter()
        losses.append(first_order_step(lora, optimizer, stream.next_batch()))
        step += 1
        training += time.perf_counter() - started
        if step % checkpoint_every == 0 or training >= wall_budget_s or step == max_steps:
            path = out_dir / f"step-{step:06d}.npy"
            np.save(path, get_values(lora))
            points.append({"step": step, "train_s": training, "checkpoint": str(path),
                           "loss": float(np.mean(losses[-checkpoint_every:]))})
    data_bytes = sum(len(json.dumps(r).encode()) + 1 for r in records)
    result = {"contender": "centralized-lora", "learning_rate": learning_rate, "optimizer": "adamw",
              "batch_size": BATCH_SIZE, "threads": threads, "points": points, "steps": step,
              "examples": step * BATCH_SIZE, "peak_rss_bytes": peak_rss_bytes_of_self(),
              # Centralizing moves the data instead of models: each client uploads its
              # records once (as JSON lines), the mean over clients.
              "data_upload_bytes_total": data_bytes,
              "stopped_by": "budget" if training >= wall_budget_s else "max_steps"}
    (out_dir / "central.json").write_text(json.dumps(result, indent=2))
    return result
