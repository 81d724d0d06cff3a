"""Which mode common devices would run, for common model sizes: a planning table.

Run from anywhere once installed::

    edgefed-profiles                       # full-parameter task, batch 8 x 256 tokens
    edgefed-profiles --scope lora --batch 4 --seq-len 512
    edgefed-profiles --modes all           # also the modes whose engines are not built yet (marked *)
    edgefed-profiles --json profiles/data/device-estimates.json

Every cell is the chooser's decision (:func:`profiles.chooser.choose`, the same call the
client daemon makes) for that device's budget: the mode and the largest batch that fit,
or the memory the cheapest mode would need. The figures are **estimated** by
:mod:`profiles.estimator`; the only measured profiles are the ones under
``profiles/data/`` (SmolLM2-135M on this repository's CPU machine, within 7.3% of the
estimates), and a cell says "measured" only where such a profile backs it.

Budgets are what training could use on a device that runs nothing else:

* a discrete GPU: its memory less ~0.6 GiB for the CUDA context and driver;
* Apple unified memory: Metal's recommended working set, about two thirds of RAM
  on 8 GiB machines and three quarters on 16 GiB ones;
* Jetson Orin (8 GiB shared between CPU and GPU): 8 GiB less ~2 GiB for the OS.

and the chooser keeps its default 10% headroom on top.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Collection, Sequence
from typing import Any

from profiles.chooser import POLICY, Choice, ModeUnavailable, NoModeFits, PolicyEntry, TrainingTask, choose
from profiles.estimator import ModelShape

__all__ = ["DEVICES", "MODELS", "DeviceSpec", "plan_table", "main"]

GIB = 1024**3
DEFAULT_HEADROOM = 0.10
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
MEASURED_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class DeviceSpec:
    """A device people own and the memory training could use on it."""

    name: str
    memory_bytes: int
    budget_bytes: int
    note: str


def _gpu(name: str, gib_total: int) -> DeviceSpec:
    total = gib_total * GIB
    return DeviceSpec(name, total, total - CUDA_CONTEXT_BYTES, "GPU memory - CUDA context")


DEVICES: tuple[DeviceSpec, ...] = (
    _gpu("GPU 4 GiB (GTX 1650)", 4),
    _gpu("GPU 6 GiB (RTX 2060)", 6),
    _gpu("GPU 8 GiB (RTX 4060)", 8),
    _gpu("GPU 12 GiB (RTX 3060)", 12),
    _gpu("GPU 16 GiB (RTX 4080)", 16),
    _gpu("GPU 24 GiB (RTX 4090)", 24),
    DeviceSpec("Apple M-series 8 GiB", 8 * GIB, int(8 * GIB * 2 / 3), "Metal working set ~2/3 of RAM"),
    DeviceSpec("Apple M-series 16 GiB", 16 * GIB, int(16 * GIB * 3 / 4), "Metal working set ~3/4 of RAM"),
    DeviceSpec("Jetson Orin 8 GiB", 8 * GIB, 6 * GIB, "shared memory - ~2 GiB for the OS"),
)

# Public configurations (config.json values) of a few common sizes.
MODELS: dict[str, dict[str, Any]] = {
    "SmolLM2-135M": {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                     "head_dim": 64, "tie_word_embeddings": True},
    "Qwen2.5-0.5B": {"vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                     "tie_word_embeddings": True},
    "Llama-3.2-1B": {"vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192,
                     "head_dim": 64, "tie_word_embeddings": True},
    "Llama-3.2-3B": {"vocab_size": 128256, "hidden_size": 3072, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "intermediate_size": 8192,
                     "head_dim": 128, "tie_word_embeddings": True},
    "Llama-2-7B": {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
                   "tie_word_embeddings": False},
}


def _measured_models() -> set[str]:
    """Model names with a measured profile under profiles/data (CPU, this repository)."""
    names = set()
    for path in MEASURED_DIR.glob("*.json"):
        try:
            model = json.loads(path.read_text(encoding="utf-8")).get("model", "")
        except (OSError, ValueError, AttributeError):
            continue
        if model == "smollm2-135m":
            names.add("SmolLM2-135M")
    return names


def merged_policy(built: Sequence[PolicyEntry]) -> list[PolicyEntry]:
    """The built engines' rows, then the plan's rows (:data:`POLICY`) of modes not built."""
    names = {entry.mode for entry in built}
    return sorted([*built, *(entry for entry in POLICY if entry.mode not in names)],
                  key=lambda entry: (entry.rank, entry.mode))


def plan_cell(shape: ModelShape, task: TrainingTask, device: DeviceSpec, policy: Sequence[PolicyEntry],
              headroom: float = DEFAULT_HEADROOM, built: Collection[str] = ()) -> dict[str, Any]:
    """The chooser's decision for one device and model, as a table cell; a mode with no
    engine in ``built`` is marked ``*`` (planned)."""
    try:
        choice: Choice = choose(shape, task, budget_bytes=device.budget_bytes, headroom=headroom,
                                policy=policy, budget_source="budget")
    except NoModeFits as error:
        return {"mode": None, "batch": 0, "needs_bytes": error.smallest_budget_bytes,
                "text": f"- (needs {error.smallest_budget_bytes / GIB:.1f} GiB)"}
    except ModeUnavailable:
        return {"mode": None, "batch": 0, "needs_bytes": None, "text": "- (no mode)"}
    assert choice.estimate is not None
    state = "built" if choice.mode in built else "planned"
    mark = "" if state == "built" else "*"
    return {"mode": choice.mode, "state": state, "batch": choice.batch, "peak_bytes": choice.estimate.total,
            "text": f"{choice.mode}{mark} b{choice.batch} ({choice.estimate.total / GIB:.1f})"}


def plan_table(task: TrainingTask, policy: Sequence[PolicyEntry], headroom: float = DEFAULT_HEADROOM,
               built: Collection[str] = ()) -> list[dict[str, Any]]:
    """One row per device: its budget and the cell of every model."""
    shapes = {name: ModelShape.from_hf_config(config) for name, config in MODELS.items()}
    rows = []
    for device in DEVICES:
        cells = {name: plan_cell(shape, task, device, policy, headroom, built) for name, shape in shapes.items()}
        rows.append({"device": device.name, "memory_bytes": device.memory_bytes,
                     "budget_bytes": device.budget_bytes, "note": device.note, "models": cells})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    names = list(MODELS)
    width = max(len(name) for name in names) + 2
    cell_width = max(width, max(len(c["text"]) for r in rows for c in r["models"].values()) + 2)
    header = f"{'device':<24}{'budget':>9}  " + "".join(f"{n:<{cell_width}}" for n in names)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['device']:<24}{row['budget_bytes'] / GIB:>8.1f}G  "
                     + "".join(f"{row['models'][n]['text']:<{cell_width}}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, built: Sequence[PolicyEntry] = ()) -> int:
    """The ``edgefed-profiles`` command. ``built`` is the rows of the engines this client
    has; the installed command (:mod:`edge_client.profiles_cli`) passes the engine
    registry's, since this torch-free package cannot import the engines."""
    parser = argparse.ArgumentParser(
        prog="edgefed-profiles",
        description="Which training mode and batch common devices would run, per model size (estimated).")
    parser.add_argument("--scope", default="full", choices=["full", "lora"])
    parser.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example (default 256)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--modes", default="implemented", choices=["implemented", "all"],
                        help="implemented: the modes this client has engines for (default); "
                             "all: every mode of the policy, built or not")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM)
    parser.add_argument("--json", type=Path, help="also write the table as JSON to this file")
    args = parser.parse_args(argv)
    try:
        task = TrainingTask(scope=args.scope, batch_size=args.batch, max_seq_len=args.seq_len,
                            lora_rank=args.lora_rank)
        if not 0.0 <= args.headroom < 1.0:
            raise ValueError(f"--headroom must be in [0, 1), got {args.headroom}")
    except ValueError as error:
        print(f"edgefed-profiles: {error}", file=sys.stderr)
        return 2
    built_names = {entry.mode for entry in built}
    policy = merged_policy(built) if args.modes == "all" else sorted(built, key=lambda e: (e.rank, e.mode))
    rows = plan_table(task, policy, args.headroom, built_names)
    measured = _measured_models()
    print(f"task: {args.scope} scope, batch {args.batch} x {args.seq_len} tokens; modes: "
          f"{', '.join(e.mode + ('' if e.mode in built_names else '*') for e in policy) or 'none'} "
          f"(policy order; * planned, no engine yet); headroom {args.headroom:.0%}")
    print("cell: mode, largest batch that fits, estimated peak in GiB; '-': nothing fits, "
          "with the budget the cheapest mode would need")
    print(format_table(rows))
    print("All figures are ESTIMATED by profiles/estimator.py (float32 weights). Measured profiles "
          f"back: {', '.join(sorted(measured)) or 'none'} (CPU, profiles/data/); GPU figures are "
          "not measured.")
    if args.json is not None:
        payload = {"task": {"scope": args.scope, "batch": args.batch, "seq_len": args.seq_len,
                            "lora_rank": args.lora_rank},
                   "modes": {e.mode: ("built" if e.mode in built_names else "planned") for e in policy},
                   "headroom": args.headroom, "estimated": True, "measured_models": sorted(measured),
                   "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
