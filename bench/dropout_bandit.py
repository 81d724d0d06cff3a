"""Layer dropout, a bandit against fixed ratios: python bench/dropout_bandit.py [--rounds N] [--target L]

Issue #16 §5 asks for "bandit vs fixed ratios in rounds to a target loss". On the
default model (SmolLM2-135M, LoRA r=8 on q_proj/v_proj) and the README's split (3
clients x 200 records, 64 held-out), every client runs ``droppeft`` (ferret's round
with stochastic layer dropout, PROTOCOL.md §8.1.3) in live ``edgefed-local``
federations that differ only in the dropout ratios the coordinator may hand out:

* ``bandit``: the coordinator's discounted-UCB bandit picks, per client and round, among
  0.1 and 0.25 (edgefed-local's default; 0.5 diverges on this model,
  bench/layer_sensitivity.py), rewarded by the client's training progress per second
  (coordinator/adaptive.py);
* ``fixed 0.1``, ``fixed 0.25``: one ratio for every client and round.

For each: the held-out eval loss after every round, the first round at or below the
target loss (``--target``, default 1.0, declared before the run), and the training
time to that round (from the coordinator's first task to that round's commit, from its
``/status``; the evaluator runs beside the clients in every run alike). Dropout trades
progress per step for time per step, so the time to target is the figure that
decides; rounds to target is what the issue names.

Saves everything to ``bench/results/dropout_bandit.json`` and prints, as its last line,
one JSON object with ``bandit_rounds_to_target``, ``fixed_rounds_to_target``,
``bandit_s_to_target``, ``fixed_s_to_target``, ``bandit_vs_best_fixed_s`` and
``bandit_pulls`` (per client, the discounted pulls of each ratio at the end).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_result  # noqa: E402
from bench.first_order import federation as live_federation  # noqa: E402

ARMS = (0.1, 0.25)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--target", type=float, default=1.0, help="held-out eval loss to reach")
    return parser.parse_args(argv)


def federation(label: str, ratios: tuple[float, ...], rounds: int) -> dict[str, Any]:
    """One live edgefed-local run of droppeft clients; per-round eval loss and commit times."""
    run = live_federation(label, ["--mode", "droppeft", "--budgets", "4GiB,4GiB,8GiB", "--loss-only",
                                  "--droppeft-ratios", ",".join(str(r) for r in ratios)], rounds)
    status = run["status"]
    return {"ratios": list(ratios), "summary": run["summary"],
            "losses": {row["round"]: row["eval_loss"] for row in run["rows"] if row.get("eval_loss") is not None},
            "committed_at": {entry["round"]: entry["committed_at"] for entry in status["rounds"]},
            "first_task_at": status.get("first_task_at"),
            "pulls": {client["client_id"]: client["adaptive"] for client in status.get("clients", [])
                      if client.get("adaptive")}}


def to_target(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """The first round whose eval loss is <= target, and the training seconds to its commit."""
    for round_number in sorted(r for r in run["losses"] if r > 0):
        if run["losses"][round_number] <= target:
            at = run["committed_at"].get(round_number)
            seconds = at - run["first_task_at"] if at is not None and run["first_task_at"] else None
            return round_number, seconds
    return None, None


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    runs = {"bandit": federation("bandit", ARMS, args.rounds)}
    for ratio in ARMS:
        runs[f"fixed {ratio}"] = federation(f"fixed-{ratio}", (ratio,), args.rounds)

    print(f"\n=== held-out eval loss per round (target {args.target})")
    names = list(runs)
    print(f"{'round':>5}  " + "  ".join(f"{name:>10}" for name in names))
    for r in range(args.rounds + 1):
        cells = [runs[name]["losses"].get(r) for name in names]
        print(f"{r:>5}  " + "  ".join(f"{'-' if c is None else f'{c:.4f}':>10}" for c in cells))
    reached = {name: to_target(run, args.target) for name, run in runs.items()}
    print(f"\n{'run':<12} {'rounds to target':>16} {'s to target':>12} {'training s (all rounds)':>24}")
    for name, (rounds_to, seconds_to) in reached.items():
        run = runs[name]
        total = max(run["committed_at"].values()) - run["first_task_at"] if run["committed_at"] else None
        print(f"{name:<12} {'-' if rounds_to is None else rounds_to:>16} "
              f"{'-' if seconds_to is None else f'{seconds_to:.0f}':>12} "
              f"{'-' if total is None else f'{total:.0f}':>24}")
    print("\nbandit: discounted pulls per ratio at the end, per client")
    for client, adaptive in runs["bandit"]["pulls"].items():
        print(f"  {client}: " + ", ".join(f"{v['value']}: {v['pulls']}" for v in adaptive["values"]))

    fixed_s = {str(ratio): reached[f"fixed {ratio}"][1] for ratio in ARMS}
    reached_fixed = [s for s in fixed_s.values() if s is not None]
    figures = {
        "target_eval_loss": args.target,
        "rounds": args.rounds,
        "bandit_rounds_to_target": reached["bandit"][0],
        "fixed_rounds_to_target": {str(ratio): reached[f"fixed {ratio}"][0] for ratio in ARMS},
        "bandit_s_to_target": reached["bandit"][1],
        "fixed_s_to_target": fixed_s,
        "bandit_vs_best_fixed_s": (reached["bandit"][1] / min(reached_fixed)
                                   if reached["bandit"][1] is not None and reached_fixed else None),
        "eval_loss_after": {name: run["summary"]["eval_loss_after"] for name, run in runs.items()},
        "bandit_pulls": {client: {str(v["value"]): v["pulls"] for v in adaptive["values"]}
                         for client, adaptive in runs["bandit"]["pulls"].items()},
    }
    path = write_result("dropout_bandit", figures, {"runs": runs})
    print(f"\nfull result: {path.relative_to(ROOT)}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
