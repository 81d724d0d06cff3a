"""Issue #20's comparisons: personalised client-wise learning rates (FedMeZO) against one
global rate; cyclic block updates (FedCyBGD) are not built yet.

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

The last line is one JSON object with ``personalised_rounds_vs_global`` (rounds to the
target with personalised rates over rounds with the global rate; None when the
personalised run never reaches it) and the block keys ``block_peak_vs_full_fo`` and
``block_bytes_per_client_round``, None until the block mode exists. The full result, with
both curves, goes to ``bench/results/block_and_lr.json``.
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

FULL = {"rounds": 16}
QUICK = {"rounds": 4}
COMMON = ["--mode", "mezo", "--clients", "3", "--split", "dirichlet", "--alpha", "0.5", "--loss-only",
          "--no-export", "--pool-key", "7"]


def federation(name: str, work: Path, rounds: int, *extra: str) -> dict[str, Any]:
    """One edgefed-local run; its summary.json plus the wall time."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "edge_client.local_federation", "--rounds", str(rounds), *COMMON,
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
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    work = args.keep or Path(tempfile.mkdtemp(prefix="edgefed-block-lr-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    if args.lr_runs is not None:
        # The learning-rate runs measure rounds, not seconds, so a kept pair stays valid while
        # the block part is re-measured; runs.json says at which commit they ran.
        runs = json.loads((args.lr_runs / "runs.json").read_text())
        settings, statistic, runs_commit = runs["settings"], runs["statistic"], runs["commit"]
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
    print("\n=== cyclic block updates: not built yet (issue #20)")

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
        "block_peak_vs_full_fo": None,
        "block_bytes_per_client_round": None,
    }
    details = {"settings": settings, "common_arguments": COMMON, "curves": curves,
               "federations": {"global": global_run, "personalised": personal_run},
               "bench_wall_s": time.time() - started, "runs_commit": runs_commit}
    path = write_result("block_and_lr-quick" if args.quick else "block_and_lr", result, details)
    print(f"\nfull result: {path.relative_to(ROOT)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
