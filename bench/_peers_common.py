"""What every contender of ``bench/peers.py`` shares, so that they differ only in how
they train: the data split, the held-out and validation records, the model with its
LoRA scope, the batches, plain first-order steps, and the evaluation of a checkpoint.

* **Split.** edgefed-local's own: 3 clients x 200 records, a Dirichlet (alpha 0.5)
  non-IID split, 64 held-out records no one trains on (``split_records``, seed 0). The
  validation records, on which learning rates are picked, are 64 more records that are
  neither held out nor in any client's share.
* **Model.** SmolLM2-135M-Instruct with the federation's LoRA scope (r = 8 on q_proj and
  v_proj, the adapters initialised from seed 0): every LoRA contender starts from the
  same values, the ones a federation's clients build.
* **Checkpoints** are the trainable values (the space's flat float32 buffer), saved as
  ``.npy``; a federation's are rebuilt from its ledger (:func:`ledger_round_values`).
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CLIENTS = 3
HELDOUT = 64
VALIDATION = 64
PER_CLIENT = 200
SPLIT_SCHEME = "dirichlet"
ALPHA = 0.5
BATCH_SIZE = 4
MAX_SEQ_LEN = 96
EVAL_BATCH = 8


@dataclass(frozen=True)
class PeerSplit:
    clients: list[list[dict]]
    heldout: list[dict]
    validation: list[dict]

    def union(self) -> list[dict]:
        return [record for share in self.clients for record in share]


def shipped_records() -> list[dict]:
    from edge_client.local_federation import SHIPPED_DATA

    return [json.loads(line) for line in SHIPPED_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def _key(record: dict) -> tuple[str, str]:
    return record["instruction"], record["response"]


def peer_split() -> PeerSplit:
    """edgefed-local's split with ``--split dirichlet`` (the same call, the same seed), plus
    validation records drawn from what that split leaves unused."""
    from edge_client.splits import split_records

    records = shipped_records()
    split = split_records(records, clients=CLIENTS, heldout=HELDOUT, per_client=PER_CLIENT, scheme=SPLIT_SCHEME,
                          alpha=ALPHA, seed=0)
    used = {_key(r) for r in split.heldout} | {_key(r) for share in split.clients for r in share}
    unused = [r for r in records if _key(r) not in used]
    validation = random.Random(1).sample(unused, VALIDATION)
    return PeerSplit([list(share) for share in split.clients], list(split.heldout), validation)


def write_jsonl(records: Sequence[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@dataclass
class LoraModel:
    model: Any
    space: Any
    tokenizer: Any
    prompt_format: Any
    parameters: list[torch.nn.Parameter]


def load_lora_model(model_source: str = "smollm2-135m", *, cache_dir: str | None = None) -> LoraModel:
    """The base model with the federation's LoRA scope, gradients on for the adapters."""
    from edge_client.data import resolve_prompt_format
    from edge_client.engines.ferret import FerretEngine, trainable_parameters
    from edge_client.model import load_model, resolve_model
    from edge_client.scope import ScopeConfig

    model, tokenizer = load_model(resolve_model(model_source, cache_dir=Path(cache_dir) if cache_dir else None))
    model, space = FerretEngine.prepare(model, ScopeConfig(kind="lora"))
    model.eval()  # no dropout, as the federation's clients train
    return LoraModel(model, space, tokenizer, resolve_prompt_format("auto", tokenizer),
                     trainable_parameters(model, space))


def batch_stream(lora: LoraModel, records: Sequence[dict], name: str, *, batch_size: int = BATCH_SIZE,
                 max_seq_len: int = MAX_SEQ_LEN) -> Any:
    """Endless shuffled batches of ``records``, seeded by ``name`` as a client's are."""
    from edge_client.data import BatchStream, Record, tokenize

    examples = tokenize([Record(r["instruction"], r["response"], i + 1) for i, r in enumerate(records)],
                        lora.tokenizer, max_seq_len=max_seq_len, prompt_format=lora.prompt_format)
    return BatchStream(examples, batch_size, seed=zlib.crc32(name.encode()),
                       pad_token_id=lora.tokenizer.pad_token_id or 0)


def first_order_step(lora: LoraModel, optimizer: torch.optim.Optimizer, batch: Any) -> float:
    """One step on one batch: the mean response-token loss, backward, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    output = lora.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                        use_cache=False)
    loss = output.loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is not finite ({float(loss)}); the learning rate is too high")
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def get_values(lora: LoraModel) -> np.ndarray:
    return lora.space.flat.detach().cpu().numpy().copy()


def set_values(lora: LoraModel, values: np.ndarray) -> None:
    with torch.no_grad():
        lora.space.flat.copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))


def evaluate_records(model: Any, tokenizer: Any, prompt_format: Any, records: Sequence[dict], *,
                     generate: bool) -> dict[str, float | None]:
    """The project's evaluator on ``records``: loss, and Rouge-L and exact match when
    ``generate``."""
    from edge_client.evaluate import EvalRecord, evaluate

    held = [EvalRecord(r["instruction"], r["response"], r.get("family", "all")) for r in records]
    result = evaluate(model, tokenizer, held, max_seq_len=MAX_SEQ_LEN, batch_size=EVAL_BATCH, generate=generate,
                      prompt_format=prompt_format)
    return {"eval_loss": result.loss, "rouge_l": result.rouge_l if generate else None,
            "exact_match": result.exact_match if generate else None}


def ledger_round_values(ledger_path: Path, model_source: str, rounds: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """For each of ``rounds`` (ascending), ``(round, rebuilt)`` with ``rebuilt.model`` holding
    that round's model as the ledger defines it; the model is loaded once and each round
    is rebuilt from its rebase point, as a client catching up would."""
    from coordinator.ledger import Ledger
    from edge_client.sync import ModelSync, RoundCoefficients
    from exporter.replay import rebuild
    from protocol.table import table_digest

    rebuilt = rebuild(ledger_path, model_source, round_number=0, verify=False)
    start = rebuilt.space.flat.detach().clone()
    rebase_every = rebuilt.facts.rebase_every
    with Ledger(str(ledger_path)) as ledger:
        for target in rounds:
            base_round = target - target % rebase_every
            table = ledger.table_at(base_round) if base_round else []
            coefficients = [RoundCoefficients(entry.round, tuple(entry.coefficients))
                            for entry in ledger.rounds_between(base_round, target)]
            digest = ledger.get_round(target).table_digest if target else table_digest([])
            with torch.no_grad():
                rebuilt.space.flat.copy_(start)
            sync = ModelSync(rebuilt.space, rebase_every=rebase_every, copies_where="memory")
            sync.catch_up(base_round, table, coefficients, digest)
            reported = set(ledger.fingerprints(target).values()) if target else set()
            if target and rebuilt.space.fingerprint() not in reported:
                raise RuntimeError(f"round {target} of {ledger_path} rebuilt to a fingerprint no client reported")
            yield target, rebuilt


def peak_rss_bytes_of_children() -> int:
    """The largest peak resident memory of this process's waited-for children (Linux
    reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def peak_rss_bytes_of_self() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
