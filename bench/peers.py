"""Side by side with the alternatives: python bench/peers.py [--quick] [--tune] [--seeds N]

Every contender trains SmolLM2-135M-Instruct on the same data split (edgefed-local's
Dirichlet alpha 0.5 split: 3 clients x 200 records), is scored by the project's
evaluator on the same 64 held-out records, and runs in this one process tree on this
machine, one contender at a time:

* ``centralized``: first-order LoRA (r = 8, q_proj/v_proj, AdamW) on the union of the
  clients' records, both cores: the upper bound (bench/_peers_central.py).
* ``flower-fedavg``: Flower's own FedAvg over its gRPC transport (the real ``flwr``
  package, ``pip install .[peers]``), 3 client processes each running the same 4 local SGD
  steps on the same LoRA as this project's first-order clients, the adapters sent
  whole each way (bench/_peers_flower.py).
* this project, each a live ``edgefed-local`` run (a coordinator and 3 client processes
  over websockets): ``zo-full`` (MeZO over all 134.5M weights), ``zo-lora`` (MeZO over the
  LoRA adapters), ``ferret`` (projected first-order), ``droppeft`` (the same with layer
  dropout) and ``mixed`` (the chooser's pick at budgets 0.75/4/8 GiB: one MeZO client
  and two ferret clients).

**Protocols** (EdgeFlowerTune, arXiv 2605.08636). Each contender trains for the largest
wall budget; its checkpoints (a federation's: every round, rebuilt from its ledger; the
others': their saved adapters) are evaluated afterwards, so evaluation takes no time
from training. *Quality under budget*: the held-out loss of the last checkpoint within
each wall-clock budget (training time: first task to commit, model loading excluded)
and within each byte budget (uplink + downlink per client, measured at the sockets;
the centralized row's bytes are its records uploaded once). *Cost to target*: the
training time, bytes per client and peak client memory to the first checkpoint at or
below a held-out loss of ``base - 0.5 x`` the centralized run's gain.

**Tuning.** ``--tune`` gives every contender the same budget: 3 learning rates, one short
run each, scored on 64 validation records that are neither held out nor trained on; the
picks are saved to bench/results/peers_tuning.json and used by later runs (without that
file each contender runs its default, and the table says so).

**Catch-up.** A client returning after N = 10, 100, 1,000 rounds: this project's bounded
table rebuild (FedKSeed's per-seed folding of the history, made bit-exact) against
replaying every missed round's history unfolded (bench/_peers_replay.py).

Writes bench/results/peers.json (peers-quick.json with --quick) and the plot, prints the
tables and, as its last line, one JSON object with ``centralized_gain``,
``best_fed_gain_ratio``, ``flower_fedavg_gain_ratio``, ``best_fed_bytes_vs_flower``,
``best_fed_time_to_target_vs_flower`` and ``replay_vs_table_bytes_n1000``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._peers_common import CLIENTS, peer_split, write_jsonl  # noqa: E402
from bench._results import RESULTS_DIR, environment, write_result  # noqa: E402

MODEL = "smollm2-135m"
TARGET_FRACTION = 0.5


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "central" | "flower" | "edgefed"
    description: str
    grid: tuple[float, ...]  # the learning rates --tune tries
    default_lr: float
    args: tuple[str, ...] = field(default=())  # edgefed-local's, for kind "edgefed"


CONTENDERS = (
    Contender("centralized", "central", "first-order LoRA, AdamW, all records on one machine",
              (1e-4, 3e-4, 1e-3), 3e-4),
    Contender("flower-fedavg", "flower", "Flower FedAvg-LoRA, 4 local SGD steps, adapters sent whole",
              (0.025, 0.05, 0.1), 0.05),
    Contender("zo-full", "edgefed", "MeZO, all weights, 24 seeds a round", (1e-6, 2e-6, 4e-6), 2e-6,
              ("--mode", "mezo", "--scope", "full", "--budgets", "8GiB")),
    Contender("zo-lora", "edgefed", "MeZO on the LoRA adapters, 24 seeds a round", (1e-4, 2e-4, 4e-4), 2e-4,
              ("--mode", "mezo", "--scope", "lora", "--budgets", "8GiB")),
    # The ferret grid's local SGD rates (eta x 1024 seeds / 4 steps) are Flower's grid.
    Contender("ferret", "edgefed", "projected first-order, 4 SGD steps, 1,024 q8 scalars up", (1e-4, 2e-4, 4e-4),
              2e-4, ("--mode", "ferret", "--scope", "lora", "--budgets", "8GiB")),
    Contender("droppeft", "edgefed", "ferret with layer dropout (bandit over 0.1/0.25)", (1e-4, 2e-4, 4e-4), 2e-4,
              ("--mode", "droppeft", "--scope", "lora", "--budgets", "8GiB")),
    Contender("mixed", "edgefed", "the chooser's pick at 0.75/4/8 GiB: 1 MeZO + 2 ferret", (1e-4, 2e-4, 4e-4), 2e-4,
              ("--scope", "lora", "--budgets", "0.75GiB,4GiB,8GiB")),
)
FEDERATED = ("zo-full", "zo-lora", "ferret", "droppeft", "mixed")
QUICK_CONTENDERS = ("centralized", "flower-fedavg", "ferret")  # the bound, the peer, the best mode so far

# The full run's budgets fit the hour on this CPU: each contender costs its largest
# budget plus about 2 minutes (loading, stopping, scoring up to ``checkpoints`` checkpoints,
# generating at the last), so 7 x (4 + 2) minutes and the catch-up's 5; 2, 5 and 10
# minutes would take 2 hours a seed (pass --wall-budgets 120,300,600 for that).
# --quick keeps under 10 minutes by scoring fewer checkpoints and running only the
# catch-up's short history replays (the rest derived, and labelled so).
FULL = {"wall_budgets_s": (60, 120, 240), "byte_budgets": (10_000, 1_000_000, 100_000_000), "tune_s": 60,
        "checkpoints": 40, "catch_up": {"repeats": 3}}
QUICK = {"wall_budgets_s": (30, 60), "byte_budgets": (10_000, 1_000_000, 100_000_000), "tune_s": 30,
         "checkpoints": 8, "catch_up": {"repeats": 1, "history_run_upto": 10, "history_run_limit_s": 0.0}}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer contenders and budgets (under 10 minutes)")
    parser.add_argument("--tune", action="store_true",
                        help="pick each contender's learning rate on the validation records first")
    parser.add_argument("--seeds", type=int, default=1, help="repeat every run with this many seeds")
    parser.add_argument("--contenders", default=None, help="comma-separated subset (default: all, or --quick's)")
    parser.add_argument("--wall-budgets", default=None, help="seconds, comma-separated (default: 60,120,240)")
    parser.add_argument("--no-generate", action="store_true", help="loss only (no Rouge-L / exact match)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs' files in this directory")
    parser.add_argument("--resummarise", type=Path, default=None,
                        help="recompute the tables of a result file from its saved runs (no training)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.wall_budgets:
        settings["wall_budgets_s"] = tuple(float(b) for b in args.wall_budgets.split(","))
    args.settings = settings
    names = args.contenders.split(",") if args.contenders else (QUICK_CONTENDERS if args.quick else
                                                               [c.name for c in CONTENDERS])
    known = {c.name: c for c in CONTENDERS}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(known)}")
    args.chosen = [known[n] for n in names]
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    return args


# -- running one contender (in a child process, so its memory and threads are its own) ----


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one contender for ``spec['budget_s']``; return its checkpoints (``points``:
    train_s, bytes per client, and a checkpoint: an .npy path or a ledger round)."""
    contender = next(c for c in CONTENDERS if c.name == spec["name"])
    out = Path(spec["out"])
    split = peer_split()
    if contender.kind == "central":
        from bench._peers_central import run_centralized

        result = run_centralized(out, split.union(), learning_rate=spec["lr"], wall_budget_s=spec["budget_s"],
                                 seed=spec["seed"], model_source=MODEL)
        upload = result["data_upload_bytes_total"] / CLIENTS
        points = [{"train_s": p["train_s"], "bytes_per_client": upload, "npy": p["checkpoint"]}
                  for p in result["points"]]
        return {"points": points, "peak_client_rss_bytes": result["peak_rss_bytes"], "detail": result}
    if contender.kind == "flower":
        from bench._peers_flower import run_flower_fedavg

        result = run_flower_fedavg(out, split.clients, learning_rate=spec["lr"], wall_budget_s=spec["budget_s"],
                                   max_rounds=10_000, model_source=MODEL, seed=spec["seed"])
        points = [{"train_s": 0.0, "bytes_per_client": 0.0, "npy": result["initial_checkpoint"]}]
        points += [{"train_s": r["train_s"], "bytes_per_client": r["up_bytes_per_client"] + r["down_bytes_per_client"],
                    "npy": r["checkpoint"]} for r in result["rounds"]]
        return {"points": points, "peak_client_rss_bytes": result["peak_client_rss_bytes"], "detail": result}
    return run_edgefed(contender, spec, split)


def run_edgefed(contender: Contender, spec: dict[str, Any], split: Any) -> dict[str, Any]:
    from bench._peers_common import peak_rss_bytes_of_children

    run_dir = Path(spec["out"]) / "run"
    command = [sys.executable, "-m", "edge_client.local_federation", "--model", MODEL, "--clients", str(CLIENTS),
               "--split", "dirichlet", "--alpha", "0.5", "--records-per-client", "200", "--heldout", "64",
               "--no-evaluator", "--no-export", "--rounds", "10000", "--wall-budget", str(spec["budget_s"]),
               "--learning-rate", str(spec["lr"]), "--pool-key", str(spec["seed"] + 1), "--run-dir", str(run_dir),
               *contender.args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:  # loading, the budget, the round that crosses it, and stopping: 15 minutes is ample
        completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=spec["budget_s"] + 900)
    except subprocess.TimeoutExpired as error:
        raise SystemExit(f"edgefed-local ({contender.name}) did not stop within {error.timeout:.0f} s") from None
    (Path(spec["out"]) / "edgefed-local.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise SystemExit(f"edgefed-local ({contender.name}) failed ({completed.returncode}):\n"
                         f"{completed.stdout[-2000:]}{completed.stderr[-2000:]}")
    # The federation's clients trained on exactly the records the other contenders got.
    for index, share in enumerate(split.clients):
        theirs = [json.loads(line) for line in (run_dir / f"client-{index}.jsonl").read_text().splitlines()]
        if [(r["instruction"], r["response"]) for r in theirs] != [(r["instruction"], r["response"]) for r in share]:
            raise SystemExit(f"edgefed-local's client-{index} split differs from the benchmark's")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first_task = summary["first_task_at"]
    points = [{"train_s": 0.0, "bytes_per_client": 0.0, "ledger": str(run_dir / "ledger.db"), "round": 0}]
    total = 0.0
    for row in rows:
        if row.get("wire_bytes_up") is None or not row.get("updates"):
            continue
        total += (row["wire_bytes_up"] + row["wire_bytes_down"]) / row["updates"]
        points.append({"train_s": row["committed_at"] - first_task, "bytes_per_client": total,
                       "ledger": str(run_dir / "ledger.db"), "round": row["round"]})
    return {"points": points, "peak_client_rss_bytes": peak_rss_bytes_of_children(),
            "detail": {"summary": summary, "modes": summary.get("modes")}}


def train(contender: Contender, lr: float, budget_s: float, seed: int, work: Path) -> dict[str, Any]:
    out = work / f"{contender.name}-lr{lr:g}-seed{seed}-{int(budget_s)}s"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"name": contender.name, "lr": lr, "budget_s": budget_s, "seed": seed, "out": str(out)}
    print(f"  training {contender.name} (lr {lr:g}, seed {seed}, {budget_s:g} s) ...", flush=True)
    started = time.time()
    completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                               cwd=ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{contender.name} failed:\n{completed.stdout[-3000:]}{completed.stderr[-3000:]}")
    result = json.loads((out / "child.json").read_text())
    result["wall_s"] = time.time() - started
    return result


# -- evaluating checkpoints ---------------------------------------------------------------


class Evaluator:
    """Scores checkpoints with the project's evaluator; loads each model once."""

    def __init__(self) -> None:
        self._lora: Any = None

    def _lora_model(self) -> Any:
        if self._lora is None:
            from bench._peers_common import load_lora_model

            self._lora = load_lora_model(MODEL)
        return self._lora

    def score(self, points: list[dict[str, Any]], records: list[dict], generate_at: set[int]) -> list[dict]:
        """Each point's metrics on ``records`` (index-aligned); Rouge-L and exact match only
        at the indices in ``generate_at``."""
        from bench._peers_common import evaluate_records, ledger_round_values, set_values

        scored: list[dict] = [{} for _ in points]
        npy = [(i, p) for i, p in enumerate(points) if "npy" in p]
        if npy:
            import numpy as np

            lora = self._lora_model()
            for index, point in npy:
                set_values(lora, np.load(point["npy"]))
                scored[index] = evaluate_records(lora.model, lora.tokenizer, lora.prompt_format, records,
                                                 generate=index in generate_at)
        ledger = [(i, p) for i, p in enumerate(points) if "ledger" in p]
        if ledger:
            from edge_client.data import resolve_prompt_format

            by_round = {p["round"]: i for i, p in ledger}
            for round_number, rebuilt in ledger_round_values(Path(ledger[0][1]["ledger"]), MODEL, sorted(by_round)):
                index = by_round[round_number]
                prompt_format = resolve_prompt_format("auto", rebuilt.tokenizer)
                scored[index] = evaluate_records(rebuilt.model, rebuilt.tokenizer, prompt_format, records,
                                                 generate=index in generate_at)
        return scored


def thin(points: list[dict[str, Any]], keep: set[int], limit: int = 40) -> list[int]:
    """The indices to evaluate: every one when few, else an even spread plus ``keep``."""
    if len(points) <= limit:
        return list(range(len(points)))
    step = (len(points) - 1) / (limit - 1)
    return sorted({round(i * step) for i in range(limit)} | keep)


def last_within(points: list[dict[str, Any]], key: str, budget: float) -> int | None:
    inside = [i for i, p in enumerate(points) if p[key] <= budget]
    return inside[-1] if inside else None


# -- main ---------------------------------------------------------------------------------


def tune(args: argparse.Namespace, work: Path, evaluator: Evaluator, validation: list[dict]) -> dict[str, Any]:
    budget = args.settings["tune_s"]
    print(f"\n=== tuning: {budget:g} s runs, scored on {len(validation)} validation records", flush=True)
    tried: dict[str, Any] = {}
    for contender in args.chosen:
        runs = []
        for lr in contender.grid:
            result = train(contender, lr, budget, 0, work / "tune")
            final = result["points"][-1]
            loss = evaluator.score([final], validation, set())[0]["eval_loss"]
            runs.append({"lr": lr, "validation_loss": loss, "train_s": final["train_s"]})
            print(f"    lr {lr:g}: validation loss {loss:.4f}", flush=True)
            shutil.rmtree(work / "tune", ignore_errors=True)
        finite = [r for r in runs if r["validation_loss"] is not None and math.isfinite(r["validation_loss"])]
        best = min(finite, key=lambda r: r["validation_loss"]) if finite else None
        tried[contender.name] = {"runs": runs, "picked": best["lr"] if best else contender.default_lr}
    return {"budget_s": budget, "contenders": tried}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.resummarise is not None:
        resummarise(args.resummarise)
        return
    if args.child is not None:
        spec = json.loads(args.child)
        result = run_child(spec)
        (Path(spec["out"]) / "child.json").write_text(json.dumps(result))
        return

    split = peer_split()
    settings = args.settings
    wall_budgets = settings["wall_budgets_s"]
    byte_budgets = settings["byte_budgets"]
    generate = not args.no_generate
    work = args.keep or Path(tempfile.mkdtemp(prefix="edgefed-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(split.heldout, work / "heldout.jsonl")
    evaluator = Evaluator()
    tuning_path = RESULTS_DIR / "peers_tuning.json"
    if args.tune:
        tuning = tune(args, work, evaluator, split.validation)
        write_result("peers_tuning", {c: t["picked"] for c, t in tuning["contenders"].items()}, tuning)
    picked: dict[str, float] = {}
    tuned_by = {}
    if tuning_path.exists():
        document = json.loads(tuning_path.read_text())
        picked, tuned_by = document["result"], {"file": str(tuning_path.relative_to(ROOT)),
                                                "budget_s": document["details"].get("budget_s")}
    started = time.time()

    # The base model (the adapters' start, which every contender shares) is scored once.
    from bench._peers_common import evaluate_records

    lora = evaluator._lora_model()
    base = evaluate_records(lora.model, lora.tokenizer, lora.prompt_format, split.heldout, generate=generate)
    print(f"base model: eval loss {base['eval_loss']:.4f}" + (
        f", Rouge-L {base['rouge_l']:.4f}, exact match {base['exact_match']:.3f}" if generate else ""), flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for contender in args.chosen:
        lr = picked.get(contender.name, contender.default_lr)
        runs[contender.name] = []
        for seed in range(args.seeds):
            result = train(contender, lr, max(wall_budgets), seed, work / "runs")
            points = result["points"]
            keep = {i for b in wall_budgets if (i := last_within(points, "train_s", b)) is not None}
            keep |= {i for b in byte_budgets if (i := last_within(points, "bytes_per_client", b)) is not None}
            indices = thin(points, keep, limit=settings["checkpoints"])
            final = max(i for i in keep if points[i]["train_s"] <= max(wall_budgets))
            scores = evaluator.score([points[i] for i in indices], split.heldout,
                                     {indices.index(final)} if generate else set())
            for index, score in zip(indices, scores):
                points[index].update(score)
            evaluated = [p for p in points if "eval_loss" in p]
            print(f"    {len(points) - 1} checkpoints, {len(evaluated)} evaluated; eval loss "
                  f"{evaluated[0]['eval_loss']:.4f} -> {points[final]['eval_loss']:.4f} at {points[final]['train_s']:.0f} s",
                  flush=True)
            runs[contender.name].append({"lr": lr, "seed": seed, "points": points, "final_index": final,
                                         "peak_client_rss_bytes": result["peak_client_rss_bytes"],
                                         "detail": result["detail"], "wall_s": result["wall_s"]})

    report = summarise(runs, base, wall_budgets, byte_budgets)
    from bench._peers_replay import catch_up_comparison

    print("\n=== catch-up: a client returning after N rounds (ferret's 1,024 seeds a round, pool 16,384, "
          "rebase every 4)", flush=True)
    replay = catch_up_comparison(**settings["catch_up"])
    report["result"]["replay_vs_table_bytes_n1000"] = replay["replay_vs_table_bytes_n1000"]
    print_replay(replay)
    plot_path = RESULTS_DIR / ("peers-quick.png" if args.quick else "peers.png")
    plot(runs, plot_path, environment()["git"]["commit"])
    details = {"settings": {**settings, "seeds": args.seeds, "contenders": [c.name for c in args.chosen],
                            "target_fraction": TARGET_FRACTION, "generate": generate}, "base": base,
               "contenders": {c.name: {"kind": c.kind, "description": c.description, "grid": c.grid,
                                       "default_lr": c.default_lr, "lr": picked.get(c.name, c.default_lr),
                                       "tuned": c.name in picked, "edgefed_local_args": c.args}
                              for c in args.chosen},
               "tuning": tuned_by or None, "tables": report["tables"], "runs": runs, "catch_up": replay,
               "plot": str(plot_path.relative_to(ROOT)), "bench_wall_s": time.time() - started}
    path = write_result("peers-quick" if args.quick else "peers", report["result"], details)
    print(f"\nfull result: {path.relative_to(ROOT)}; plot: {plot_path.relative_to(ROOT)}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report["result"]))


# -- tables -------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if len(values) > 1 else None


def loss_within(run: dict[str, Any], key: str, budget: float, *, max_train_s: float | None = None) -> float | None:
    """The held-out loss of the run's last evaluated checkpoint within ``budget`` (and within
    ``max_train_s`` of training, when given); None when only the start fits (not one round
    or checkpoint's worth)."""
    inside = [p for p in run["points"][1:] if p[key] <= budget and p.get("eval_loss") is not None
              and (max_train_s is None or p["train_s"] <= max_train_s)]
    return inside[-1]["eval_loss"] if inside else None


def first_at_target(run: dict[str, Any], target: float) -> dict[str, Any] | None:
    return next((p for p in run["points"] if p.get("eval_loss") is not None and p["eval_loss"] <= target), None)


def resummarise(path: Path) -> None:
    """Recompute a result file's tables and figures from the runs it saved (no training)."""
    try:
        document = json.loads(path.read_text())
        document["details"]["runs"], document["details"]["catch_up"]  # noqa: B018 - what it needs
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"peers.py: --resummarise {path}: not a bench/peers.py result file ({error})") from None
    details = document["details"]
    settings = details["settings"]
    report = summarise(details["runs"], details["base"], tuple(settings["wall_budgets_s"]),
                       tuple(settings["byte_budgets"]))
    report["result"]["replay_vs_table_bytes_n1000"] = details["catch_up"]["replay_vs_table_bytes_n1000"]
    print("\n=== catch-up: a client returning after N rounds")
    print_replay(details["catch_up"])
    measured = details.get("resummarised_from") or document["environment"]  # the training run's
    plot(details["runs"], ROOT / details["plot"], measured["git"]["commit"])
    details["tables"] = report["tables"]
    details["resummarised_from"] = measured
    write_result(document["benchmark"], report["result"], details)
    print(json.dumps(report["result"]))


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def summarise(runs: dict[str, list[dict[str, Any]]], base: dict[str, Any], wall_budgets: tuple[float, ...],
              byte_budgets: tuple[float, ...]) -> dict[str, Any]:
    base_loss = base["eval_loss"]
    largest = max(wall_budgets)
    tables: dict[str, Any] = {"quality_by_time": {}, "quality_by_bytes": {}, "cost_to_target": {}}
    finals: dict[str, float | None] = {}
    print(f"\n=== quality under a wall-clock budget (held-out loss; base {base_loss:.4f}; median of "
          f"{len(next(iter(runs.values())))} seed(s), [min, max] when more)")
    print(f"{'contender':<14} {'lr':>8} " + " ".join(f"{f'{b:g} s':>18}" for b in wall_budgets)
          + f" {'Rouge-L':>8} {'EM':>6}")
    for name, seeds in runs.items():
        cells = []
        row: dict[str, Any] = {}
        for budget in wall_budgets:
            values = [v for run in seeds if (v := loss_within(run, "train_s", budget)) is not None]
            row[f"{budget:g}"] = {"median": _median(values), "spread": _spread(values), "n": len(values)}
            spread = _spread(values)
            cells.append(f"{_fmt(_median(values))}" + (f" [{spread[0]:.3f},{spread[1]:.3f}]" if spread else ""))
        rouge = [run["points"][run["final_index"]].get("rouge_l") for run in seeds]
        exact = [run["points"][run["final_index"]].get("exact_match") for run in seeds]
        rouge_m = _median([r for r in rouge if r is not None])
        exact_m = _median([e for e in exact if e is not None])
        row.update(rouge_l=rouge_m, exact_match=exact_m, lr=seeds[0]["lr"])
        tables["quality_by_time"][name] = row
        finals[name] = row[f"{largest:g}"]["median"]
        print(f"{name:<14} {seeds[0]['lr']:>8g} " + " ".join(f"{c:>18}" for c in cells)
              + f" {_fmt(rouge_m):>8} {_fmt(exact_m, '.3f'):>6}")

    print(f"\n=== quality under a byte budget per client (uplink + downlink; held-out loss within the "
          f"{largest:g} s runs; '-': not one round fits)")
    print(f"{'contender':<14} " + " ".join(f"{_fmt_bytes(b):>10}" for b in byte_budgets)
          + f" {'bytes/round':>12}")
    for name, seeds in runs.items():
        row = {}
        cells = []
        for budget in byte_budgets:
            values = [v for run in seeds
                      if (v := loss_within(run, "bytes_per_client", budget, max_train_s=largest)) is not None]
            row[f"{budget:g}"] = {"median": _median(values), "spread": _spread(values), "n": len(values)}
            cells.append(_fmt(_median(values)))
        per_round = [(run["points"][-1]["bytes_per_client"] - run["points"][1]["bytes_per_client"])
                     / (len(run["points"]) - 2) for run in seeds if len(run["points"]) > 2]
        row["bytes_per_client_round"] = _median(per_round) if name != "centralized" else None
        tables["quality_by_bytes"][name] = row
        print(f"{name:<14} " + " ".join(f"{c:>10}" for c in cells)
              + f" {_fmt_bytes(row['bytes_per_client_round']) if name != 'centralized' else 'data once':>12}")

    centralized = finals.get("centralized")
    centralized_gain = None if centralized is None else base_loss - centralized
    target = None if centralized_gain is None else base_loss - TARGET_FRACTION * centralized_gain
    if target is not None:
        print(f"\n=== cost to target: held-out loss <= {target:.4f} (base minus {TARGET_FRACTION:g} x the "
              f"centralized gain {centralized_gain:.4f})")
        print(f"{'contender':<14} {'reached':>8} {'train time':>11} {'bytes/client':>13} {'peak client RSS':>16}")
        for name, seeds in runs.items():
            hits = [(hit, run) for run in seeds if (hit := first_at_target(run, target)) is not None]
            seconds = _median([hit["train_s"] for hit, _ in hits])
            sent = _median([hit["bytes_per_client"] for hit, _ in hits])
            rss = _median([run["peak_client_rss_bytes"] for run in seeds])
            tables["cost_to_target"][name] = {"reached": f"{len(hits)}/{len(seeds)}", "train_s": seconds,
                                              "train_s_spread": _spread([h["train_s"] for h, _ in hits]),
                                              "bytes_per_client": sent, "peak_client_rss_bytes": rss}
            print(f"{name:<14} {len(hits)}/{len(seeds):<6} {_fmt(seconds, '.0f') + ' s':>11} {_fmt_bytes(sent):>13} "
                  f"{_fmt_bytes(rss):>16}")
    fed = {name: value for name, value in finals.items() if name in FEDERATED and value is not None}
    best = min(fed, key=lambda n: fed[n]) if fed else None
    flower = finals.get("flower-fedavg")
    cost = tables["cost_to_target"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    best_cost, flower_cost = cost.get(best or "", {}), cost.get("flower-fedavg", {})
    result = {
        "centralized_gain": centralized_gain,
        "best_fed_mode": best,
        "best_fed_gain_ratio": ratio(None if best is None else base_loss - fed[best], centralized_gain),
        "flower_fedavg_gain_ratio": ratio(None if flower is None else base_loss - flower, centralized_gain),
        "best_fed_bytes_vs_flower": ratio(best_cost.get("bytes_per_client"), flower_cost.get("bytes_per_client")),
        "best_fed_time_to_target_vs_flower": ratio(best_cost.get("train_s"), flower_cost.get("train_s")),
        "replay_vs_table_bytes_n1000": None,
        "base_eval_loss": base_loss, "target_eval_loss": target, "wall_budget_s": largest,
        "eval_loss_at_largest_budget": finals,
    }
    return {"result": result, "tables": tables}


def print_replay(replay: dict[str, Any]) -> None:
    print(f"{'N':>6} {'method':<16} {'directions':>11} {'bytes':>12} {'seconds':>9}  how")
    for row in replay["rows"]:
        print(f"{row['n']:>6} {row['method']:<16} {row.get('directions', 0):>11,} {_fmt_bytes(row['bytes']):>12} "
              f"{row['seconds']:>9.2f}  {row['how']}")


def plot(runs: dict[str, list[dict[str, Any]]], path: Path, commit: str | None) -> None:
    """Held-out loss against training time and against bytes per client, every contender
    on the same axes (seed 0's run); the PNG names the commit the runs were measured at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, seeds in runs.items():
        points = [p for p in seeds[0]["points"] if p.get("eval_loss") is not None]
        style = "--" if name in ("centralized", "flower-fedavg") else "-"
        by_time.plot([p["train_s"] for p in points], [p["eval_loss"] for p in points], style, marker=".", label=name)
        shown = [p for p in points if p["bytes_per_client"] > 0]
        by_bytes.plot([p["bytes_per_client"] for p in shown], [p["eval_loss"] for p in shown], style, marker=".",
                      label=name)
    by_time.set(xlabel="training time (s, this 2-core CPU)", ylabel="held-out loss", title="loss against time")
    by_bytes.set(xlabel="bytes per client, up + down (log)", ylabel="held-out loss", xscale="log",
                 title="loss against bytes (centralized: its records uploaded once)")
    for axes in (by_time, by_bytes):
        axes.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, metadata={
        "Software": "bench/peers.py", "Source": f"git commit {commit}",
        # JSON, as every result file records its commit: {"commit": ..., "result": ...}
        "Comment": json.dumps({"commit": commit, "result": path.with_suffix(".json").name})})
    plt.close(figure)


if __name__ == "__main__":
    main(sys.argv[1:])
