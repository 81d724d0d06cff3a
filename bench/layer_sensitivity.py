"""How much each decoder layer matters, and what that does to layer dropout: python bench/layer_sensitivity.py

droppeft (PROTOCOL.md §8.1.3) trains on networks with layers skipped. On the default
model (SmolLM2-135M, 30 layers) this measures, with the shipped data (96 tokens, the
chat prompt format every client uses):

1. on one batch of 16 records: the loss of the full network, and with each single layer
   skipped;
2. one client training alone for 6 rounds of 4 SGD steps (edgefed-local's default rate,
   2e-4 x 1024 seeds / 4 steps, LoRA r=8 on q_proj/v_proj, batch 4, its update applied
   unprojected, as a lone client's would be up to the projection): the full network's
   loss on 64 held-out records after each round, for ferret (no dropout) and for droppeft
   at ratios 0.1, 0.25 and 0.5 with (a) no layer kept and no clipping (the engine's first
   defaults), (b) the first two and the last layer kept, no clipping, and (c) those ends
   kept and the gradient clipped to norm 5 (the engine's defaults now).

Writes bench/results/layer_sensitivity.json and prints, as its last line, one JSON object
with ``full_loss``, ``skip_one_loss`` (per layer), ``ferret_heldout`` (per round) and
``droppeft_heldout`` (``"<ratio> keep <first>/<last> clip <norm>"`` -> per round).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_result  # noqa: E402
from edge_client.data import BatchStream, load_jsonl, resolve_prompt_format, tokenize  # noqa: E402
from edge_client.engines import RoundPlan  # noqa: E402
from edge_client.engines.droppeft import DropPEFTEngine, DropPEFTSettings  # noqa: E402
from edge_client.engines.ferret import FerretEngine, FerretSettings  # noqa: E402
from edge_client.layer_dropout import skip_layers  # noqa: E402
from edge_client.loss import micro_batched_loss  # noqa: E402
from edge_client.model import load_model, resolve_model  # noqa: E402
from edge_client.scope import ScopeConfig  # noqa: E402

DATA = ROOT / "edge_client" / "datasets" / "instructions.jsonl"
COORDINATOR_LR = 2e-4
SEEDS_PER_ROUND = 1024
STEPS = 4
ROUNDS = 6
VARIANTS = [(ratio, first, last, clip) for ratio in (0.1, 0.25, 0.5)
            for first, last, clip in ((0, 0, None), (2, 1, None), (2, 1, 5.0))]


def examples(tokenizer):  # type: ignore[no-untyped-def]
    records, _ = load_jsonl(DATA)
    return tokenize(records[:264], tokenizer, max_seq_len=96, prompt_format=resolve_prompt_format("auto", tokenizer))


def trajectory(model_dir: Path, engine_cls, settings) -> list[float]:  # type: ignore[no-untyped-def]
    """Held-out loss of the full network before and after each of ROUNDS rounds."""
    model, tokenizer = load_model(model_dir)
    model, space = engine_cls.prepare(model, ScopeConfig(kind="lora"))
    data = examples(tokenizer)
    pad = tokenizer.pad_token_id or 0
    stream = BatchStream(data[:200], 4, seed=1, pad_token_id=pad)
    heldout = BatchStream(data[200:], 64, seed=2, pad_token_id=pad).next_batch()
    engine = engine_cls(model, space, settings)

    def heldout_loss() -> float:
        with torch.no_grad():
            value, _ = micro_batched_loss(model, heldout, micro_batch=16)
        return round(float(value), 4)

    losses = [heldout_loss()]
    for round_number in range(1, ROUNDS + 1):
        first_seed = (round_number - 1) * SEEDS_PER_ROUND + 1
        seeds = tuple(range(first_seed, first_seed + SEEDS_PER_ROUND))
        engine.train_round(RoundPlan(round_number, seeds, COORDINATOR_LR, 1e-3, 4), stream)
        losses.append(heldout_loss())
    return losses


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model_dir = resolve_model("smollm2-135m")
    model, tokenizer = load_model(model_dir)
    batch = BatchStream(examples(tokenizer)[:200], 16, seed=1, pad_token_id=tokenizer.pad_token_id or 0).next_batch()

    def loss_without(skipped: list[int]) -> float:
        with torch.no_grad(), skip_layers(model, skipped):
            value, _ = micro_batched_loss(model, batch, micro_batch=16)
        return float(value)

    full = loss_without([])
    layers = model.config.num_hidden_layers
    skip_one = [round(loss_without([layer]), 4) for layer in range(layers)]
    print(f"full network: loss {full:.3f}")
    print("layer  loss without it")
    for layer, value in enumerate(skip_one):
        print(f"{layer:>5}  {value:>8.3f}")
    del model

    print(f"\none client, {ROUNDS} rounds of {STEPS} steps: held-out loss of the full network after each round")
    ferret = trajectory(model_dir, FerretEngine, FerretSettings(local_steps=STEPS))
    print(f"{'ferret':<28} " + " ".join(f"{v:>6.3f}" for v in ferret), flush=True)
    droppeft: dict[str, list[float]] = {}
    for ratio, first, last, clip in VARIANTS:
        settings = DropPEFTSettings(local_steps=STEPS, dropout_ratio=ratio, keep_first=first, keep_last=last,
                                    max_grad_norm=clip)
        name = f"{ratio} keep {first}/{last} clip {clip if clip else 'none'}"
        droppeft[name] = trajectory(model_dir, DropPEFTEngine, settings)
        print(f"{'droppeft ' + name:<28} " + " ".join(f"{v:>6.3f}" for v in droppeft[name]), flush=True)
    figures = {"full_loss": round(full, 4), "skip_one_loss": skip_one, "ferret_heldout": ferret,
               "droppeft_heldout": droppeft}
    path = write_result("layer_sensitivity", figures, {
        "rounds": ROUNDS, "steps": STEPS, "coordinator_lr": COORDINATOR_LR, "seeds_per_round": SEEDS_PER_ROUND,
        "batch_rows": 4, "heldout_rows": 64, "sensitivity_batch_rows": 16, "max_seq_len": 96})
    print(f"\nwrote {path.relative_to(ROOT)}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
