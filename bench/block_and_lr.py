"""Issue #20's comparisons: personalised client-wise learning rates (FedMeZO) against one
global rate, and cyclic block updates (FedCyBGD) against full first-order and zeroth-order.

    python bench/block_and_lr.py            # 2 federations of 16 rounds (about 25 minutes here)
    python bench/block_and_lr.py --quick    # 2 x 4 rounds
    python bench/block_and_lr.py --keep DIR          # keep the runs (DIR/runs.json: their commit)
    python bench/block_and_lr.py --lr-runs DIR       # reuse a kept pair of learning-rate runs

**Personalised learning rates.** Two ``edgefed-local`` federations on SmolLM2-135M-Instruct,
identical but for ``--personalised-lr``: 3 MeZO clients (FedMeZO's setting) on the
Dirichlet non-IID split of the shipped data (α 0.5, by task family), the same pool key,
split, seeds, learning rate and rounds; the evaluator scores the held-out loss after
every round. The target is half the global-rate run's gain over its rounds (the
convention of ``bench/peers.py``: ``start − 0.5 (start − global final)``), so that both
runs can reach it; each run's rounds to it are the first round at or below it (None:
never). Rounds to the global run's final loss are reported beside it. The
personalised run uses the statistic ``--statistic`` (default ``mean_loss``) with
FedMeZO's spread (rates within lr × [0.5, 1.5]).

**Cyclic block updates.** (a) Memory and time, each in a fresh child process (the
weights inside the peak, the interpreter and libraries outside it, as
``bench/emulator.py``): one local round of one first-order step (SGD, the engines'
default; the round-start copy, the backward pass, the step and the projection onto 8
seeds) of a ``fedcybgd`` client for each of several blocks against the same round of a
``ferret`` client, which trains the whole space, on the same batch with the same loss,
in both scopes: ``full`` (FedCyBGD's setting: a block is a decoder layer's weights; the
outer block is the embedding, final norm and tied head) and ``lora`` (the federation's
default: a block is a layer's adapters). (b) Three ``edgefed-local`` federations on the
Dirichlet split, identical but for the mode (every client a 4 GiB budget, so each runs
the whole batch), at equal scalars: every client sends the
same number of scalars per round (``--block-seeds``, ``--ferret-seeds``,
``--local-steps``), and the evaluator scores the held-out loss after every round.

The last line is one JSON object with ``personalised_rounds_vs_global`` (rounds to the
target with personalised rates over rounds with the global rate; None when the
personalised run never reaches it), ``block_peak_vs_full_fo`` (the largest block's peak
over the full first-order round's peak, full scope) and ``block_bytes_per_client_round``
(the block federation's task and update bytes per client and round). The full result,
with all curves, goes to ``bench/results/block_and_lr.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import environment, write_result  # noqa: E402

MODEL = "smollm2-135m"

FULL = {"rounds": 16, "block_rounds": 8, "scalars": 64, "repeats": 3, "memory_batch": 4, "memory_seq_len": 256}
QUICK = {"rounds": 4, "block_rounds": 2, "scalars": 16, "repeats": 1, "memory_batch": 4, "memory_seq_len": 128}
# (scope, kind) measured: the whole space's round, then blocks from the bottom (the
# worst decoder block: every layer above keeps what backward needs) to the top, and the
# outer block where the scope has one.
MEMORY_KINDS = (("full", "ferret"), ("full", "block:0"), ("full", "block:15"), ("full", "block:29"),
                ("full", "block:outer"), ("lora", "ferret"), ("lora", "block:0"), ("lora", "block:29"))
SPLIT = ["--clients", "3", "--split", "dirichlet", "--alpha", "0.5", "--loss-only", "--no-export", "--pool-key", "7"]
COMMON = ["--mode", "mezo", *SPLIT]


def federation(name: str, work: Path, rounds: int, *extra: str, common: list[str] = COMMON) -> dict[str, Any]:
    """One edgefed-local run; its summary.json plus the wall time."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "edge_client.local_federation", "--rounds", str(rounds), *common,
               "--run-dir", str(run_dir), *extra]
    print(f"  {name}: {' '.join(command[3:])}", flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"the {name} federation failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = summarised(run_dir, rounds)
    summary["bench_wall_s"] = time.time() - started
    print(f"    eval loss {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}, fingerprints agree: "
          f"{summary['fingerprints_agree']}, {summary['bench_wall_s']:.0f} s", flush=True)
    return summary


def summarised(run_dir: Path, rounds: int) -> dict[str, Any]:
    """A finished run's summary.json with its evaluator's per-round losses."""
    summary = json.loads((run_dir / "summary.json").read_text())
    entries = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    by_round = {entry["round"]: entry["eval_loss"] for entry in entries}
    if sorted(by_round) != list(range(rounds + 1)):
        raise SystemExit(f"the evaluator of {run_dir} scored rounds {sorted(by_round)}, not 0..{rounds}")
    summary["eval_loss_by_round"] = [by_round[index] for index in range(rounds + 1)]
    return summary


# -- cyclic block updates: memory -------------------------------------------------------


def measure_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak resident bytes of one local round of one first-order step, above the
    interpreter baseline, and its seconds (run in a child)."""
    import torch

    from edge_client.data import Batch
    from edge_client.engines import RoundPlan
    from edge_client.engines.fedcybgd import FedCyBGDEngine, FedCyBGDSettings
    from edge_client.engines.ferret import FerretEngine, FerretSettings
    from edge_client.model import load_model
    from edge_client.scope import ScopeConfig
    from profiles.procmem import hwm_reset, release_free_memory, status_kib
    from protocol.blocks import OUTER_BLOCK, block_seed, block_seed_map

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    scope_kind, kind, rows, seq_len = spec["scope"], spec["kind"], spec["batch"], spec["seq_len"]
    release_free_memory()
    baseline_kib = status_kib("VmRSS")
    model, tokenizer = load_model(spec["model_dir"])
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, tokenizer.vocab_size, (rows, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100  # the first half is prompt, as the profiler's batches
    batch = Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    seeds_per_round = 8

    class OneBatch:
        def next_batch(self) -> Batch:
            return batch

    if kind == "ferret":
        model, space = FerretEngine.prepare(model, ScopeConfig(kind=scope_kind))
        engine: Any = FerretEngine(model, space, FerretSettings(local_steps=1))
        seeds = tuple(range(1, seeds_per_round + 1))
    else:
        block = OUTER_BLOCK if kind == "block:outer" else int(kind.split(":")[1])
        model, space = FedCyBGDEngine.prepare(model, ScopeConfig(kind=scope_kind))
        space.use_block_seeds(block_seed_map("bench", [block], seeds_per_round))
        engine = FedCyBGDEngine(model, space, FedCyBGDSettings(local_steps=1, block=block))
        seeds = tuple(block_seed("bench", block, j) for j in range(seeds_per_round))
    plan = RoundPlan(round=1, seeds=seeds, learning_rate=1e-6, epsilon=1e-3, batch_size=rows)
    engine.train_round(plan, OneBatch())  # first use: kernels, thread pools
    release_free_memory()
    resident_kib = status_kib("VmRSS")
    if not hwm_reset():
        raise SystemExit("needs Linux's resettable high-water mark (/proc/self/clear_refs)")
    update = engine.train_round(plan, OneBatch())
    peak_kib = status_kib("VmHWM")
    return {"scope": scope_kind, "kind": kind, "peak_bytes": (peak_kib - baseline_kib) * 1024,
            "resident_before_round_bytes": (resident_kib - baseline_kib) * 1024, "round_s": update.seconds,
            "trained_elements": sum(p.numel() for p in engine._round_parameters(plan)) if kind != "ferret"
            else space.numel}


def measure(scope: str, kind: str, model_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    spec = {"scope": scope, "kind": kind, "model_dir": str(model_dir), "batch": settings["memory_batch"],
            "seq_len": settings["memory_seq_len"]}
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"the {scope} {kind} measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def block_memory_part(settings: dict[str, Any]) -> dict[str, Any]:
    """Every (scope, kind) measured ``repeats`` times: medians, spreads, and the memory
    model's estimate beside each."""
    from edge_client.engines.fedcybgd import block_memory
    from edge_client.engines.ferret import first_order_memory
    from edge_client.model import resolve_model
    from profiles.chooser import TrainingTask
    from profiles.estimator import ModelShape
    from protocol.blocks import OUTER_BLOCK

    model_dir = Path(resolve_model(MODEL))
    shape = ModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    rows: dict[str, Any] = {}
    print(f"\n=== cyclic block updates (a): one-step rounds, batch {settings['memory_batch']} x "
          f"{settings['memory_seq_len']} tokens, {settings['repeats']} runs each", flush=True)
    print(f"  {'scope':<5} {'what':<12} {'peak MiB':>9} {'spread MiB':>13} {'vs ferret':>9} {'estimate MiB':>12} "
          f"{'round s':>8} {'trained':>11}")
    for scope, kind in MEMORY_KINDS:
        runs = [measure(scope, kind, model_dir, settings) for _ in range(settings["repeats"])]
        peaks = sorted(run["peak_bytes"] for run in runs)
        seconds = sorted(run["round_s"] for run in runs)
        task = TrainingTask(scope=scope, batch_size=settings["memory_batch"], max_seq_len=settings["memory_seq_len"])
        if kind == "ferret":
            estimated = first_order_memory(shape, task, settings["memory_batch"]).total
        else:
            block = OUTER_BLOCK if kind == "block:outer" else int(kind.split(":")[1])
            estimated = block_memory(shape, task, settings["memory_batch"], block).total
        row = {"runs": runs, "median_peak_bytes": peaks[len(peaks) // 2], "spread_bytes": [peaks[0], peaks[-1]],
               "median_round_s": seconds[len(seconds) // 2], "spread_round_s": [seconds[0], seconds[-1]],
               "estimate_bytes": estimated, "trained_elements": runs[0]["trained_elements"]}
        rows[f"{scope}/{kind}"] = row
        versus = row["median_peak_bytes"] / rows[f"{scope}/ferret"]["median_peak_bytes"]
        print(f"  {scope:<5} {kind:<12} {row['median_peak_bytes'] / 2**20:>9.0f} "
              f"{peaks[0] / 2**20:>6.0f}-{peaks[-1] / 2**20:<6.0f} {versus:>9.2f} {estimated / 2**20:>12.0f} "
              f"{row['median_round_s']:>8.2f} {row['trained_elements']:>11,}", flush=True)
    print("  (peak: above the interpreter with torch and transformers imported; the weights inside it. A round:"
          " the round-start copy, one backward, one SGD step, the projection onto 8 seeds)")
    return rows


def block_federations(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The three modes at equal bytes: the same scalars per client and round."""
    scalars, rounds = str(settings["scalars"]), settings["block_rounds"]
    # Every client 4 GiB: each mode runs at the whole batch, so only the mode differs.
    split = ["--budgets", "4GiB", *SPLIT]
    print(f"\n=== cyclic block updates (b): {rounds} rounds, 3 clients of one mode each run, {scalars} scalars "
          "per client and round, Dirichlet α 0.5", flush=True)
    runs = {
        "fedcybgd": federation("block", work, rounds, "--block-seeds", scalars, common=["--mode", "fedcybgd", *split]),
        "ferret": federation("ferret", work, rounds, "--ferret-seeds", scalars, common=["--mode", "ferret", *split]),
        "mezo": federation("mezo", work, rounds, "--local-steps", scalars, common=["--mode", "mezo", *split]),
    }
    print(f"\n  {'round':>5} " + " ".join(f"{name:>10}" for name in runs))
    for index in range(rounds + 1):
        print(f"  {index:>5} " + " ".join(f"{run['eval_loss_by_round'][index]:>10.4f}" for run in runs.values()))
    print("  " + " ".join(f"{name}: {run['bytes_per_client_round']:.0f} B/client-round, {run['wall_s']:.0f} s"
                          for name, run in runs.items()))
    return runs


def rounds_to(curve: list[float], target: float) -> int | None:
    """The first round (curve[0] is round 0, before training) at or below ``target``."""
    return next((index for index, loss in enumerate(curve) if loss <= target), None)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds each")
    parser.add_argument("--statistic", default="mean_loss", choices=["last_loss", "mean_loss", "update_size"])
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs in this directory")
    parser.add_argument("--lr-runs", type=Path, default=None, metavar="DIR",
                        help="reuse the learning-rate federations a --keep DIR holds instead of running them "
                             "again (the result records the commit they ran at, from DIR/runs.json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure_child(json.loads(args.child))))
        return
    settings = dict(QUICK if args.quick else FULL)
    work = args.keep or Path(tempfile.mkdtemp(prefix="edgefed-block-lr-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    if args.lr_runs is not None:
        # The learning-rate runs measure rounds, not seconds, so a kept pair stays valid while
        # the block part is re-measured; runs.json says at which commit they ran.
        runs = json.loads((args.lr_runs / "runs.json").read_text())
        settings["rounds"], statistic, runs_commit = runs["settings"]["rounds"], runs["statistic"], runs["commit"]
        global_run = summarised(args.lr_runs / "global-lr", settings["rounds"])
        personal_run = summarised(args.lr_runs / "personalised-lr", settings["rounds"])
    else:
        statistic = args.statistic
        print(f"=== personalised learning rates: {settings['rounds']} rounds, 3 MeZO clients, Dirichlet α 0.5",
              flush=True)
        global_run = federation("global-lr", work, settings["rounds"])
        personal_run = federation("personalised-lr", work, settings["rounds"], "--personalised-lr", statistic)
        runs_commit = environment()["git"]["commit"]
        (work / "runs.json").write_text(json.dumps({"settings": settings, "statistic": statistic,
                                                    "commit": runs_commit}))
    curves = {"global": global_run["eval_loss_by_round"], "personalised": personal_run["eval_loss_by_round"]}
    if curves["global"][0] != curves["personalised"][0]:
        raise SystemExit("the two runs start from different held-out losses: not the same federation")
    start, final = curves["global"][0], curves["global"][-1]
    target = start - 0.5 * (start - final)
    rounds = {name: rounds_to(curve, target) for name, curve in curves.items()}
    rounds_final = {name: rounds_to(curve, final) for name, curve in curves.items()}
    print(f"\n  {'round':>5} {'global lr':>10} {'personalised':>13}")
    for index, (a, b) in enumerate(zip(curves["global"], curves["personalised"])):
        print(f"  {index:>5} {a:>10.4f} {b:>13.4f}")
    print(f"  target (half the global run's gain) {target:.4f}: rounds to it, global {rounds['global']}, "
          f"personalised {rounds['personalised']}; to the global run's final loss {final:.4f}: global "
          f"{rounds_final['global']}, personalised {rounds_final['personalised']}")
    memory = block_memory_part(settings)
    blocks = block_federations(work, settings)
    largest = max((row for key, row in memory.items() if key.startswith("full/block")),
                  key=lambda row: row["median_peak_bytes"])
    full_fo = memory["full/ferret"]["median_peak_bytes"]

    ratio = (round(rounds["personalised"] / rounds["global"], 3)
             if rounds["personalised"] is not None and rounds["global"] else None)
    result = {
        "personalised_rounds_vs_global": ratio,
        "rounds_to_target_global": rounds["global"],
        "rounds_to_target_personalised": rounds["personalised"],
        "target_eval_loss": round(target, 4),
        "rounds_to_global_final_personalised": rounds_final["personalised"],
        "final_eval_loss_global": round(curves["global"][-1], 4),
        "final_eval_loss_personalised": round(curves["personalised"][-1], 4),
        "statistic": statistic,
        "fingerprints_agree": bool(global_run["fingerprints_agree"] and personal_run["fingerprints_agree"]),
        "block_peak_vs_full_fo": round(largest["median_peak_bytes"] / full_fo, 3),
        "block_top_peak_vs_full_fo": round(memory["full/block:29"]["median_peak_bytes"] / full_fo, 3),
        "block_lora_peak_vs_full_fo": round(memory["lora/block:0"]["median_peak_bytes"]
                                            / memory["lora/ferret"]["median_peak_bytes"], 3),
        "block_bytes_per_client_round": round(blocks["fedcybgd"]["bytes_per_client_round"], 1),
        "ferret_bytes_per_client_round": round(blocks["ferret"]["bytes_per_client_round"], 1),
        "final_eval_loss_fedcybgd": round(blocks["fedcybgd"]["eval_loss_by_round"][-1], 4),
        "final_eval_loss_ferret": round(blocks["ferret"]["eval_loss_by_round"][-1], 4),
        "final_eval_loss_mezo": round(blocks["mezo"]["eval_loss_by_round"][-1], 4),
        "block_fingerprints_agree": all(run["fingerprints_agree"] for run in blocks.values()),
    }
    details = {"settings": settings, "common_arguments": COMMON, "curves": curves,
               "federations": {"global": global_run, "personalised": personal_run},
               "block_memory": memory, "block_federations": blocks,
               "bench_wall_s": time.time() - started, "runs_commit": runs_commit}
    path = write_result("block_and_lr-quick" if args.quick else "block_and_lr", result, details)
    print(f"\nfull result: {path.relative_to(ROOT)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
