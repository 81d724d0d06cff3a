"""``edgefed-local``: a whole federation on this machine, in one command.

Starts a coordinator and N client processes on 127.0.0.1, each client with its own
share of the data and its own memory budget, shows progress while the rounds run, and
prints a summary table at the end. Everything (ledger, client data, logs, metrics) goes
to a run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_client.device import parse_bytes
from edge_client.model import DEFAULT_MODEL, ModelLoadError, base_weights_hash, load_model, resolve_model
from edge_client.splits import split_records, summarise, write_split

__all__ = ["main"]

logger = logging.getLogger(__name__)

SHIPPED_DATA = Path(__file__).resolve().parent / "datasets" / "instructions.jsonl"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefed-local", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=3, help="number of client processes")
    parser.add_argument("--budgets", default="2GiB,4GiB,8GiB",
                        help="comma-separated memory budgets, one per client (cycled)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="builtin name, .gguf file, HF model directory or hub id (with internet)")
    parser.add_argument("--data", type=Path, default=SHIPPED_DATA, help="JSONL of instruction/response records")
    parser.add_argument("--split", choices=["iid", "dirichlet"], default="iid",
                        help="how records are dealt to clients (dirichlet: non-IID by task family)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skewed)")
    parser.add_argument("--records-per-client", type=int, default=200, help="cap on each client's records")
    parser.add_argument("--heldout", type=int, default=64, help="held-out evaluation records (0: no evaluation)")
    parser.add_argument("--generate-every", type=int, default=0,
                        help="also decode (Rouge-L, exact match) every N rounds; 0: before and after only")
    parser.add_argument("--loss-only", action="store_true", help="evaluate held-out loss only (no decoding)")
    parser.add_argument("--prompt-format", default="auto", choices=["auto", "plain", "chat"],
                        help="prompt layout for every client and the evaluator")
    parser.add_argument("--scope", default="full", choices=["full", "lora"])
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=96)
    parser.add_argument("--learning-rate", type=float, default=2e-6)
    parser.add_argument("--epsilon", type=float, default=1e-3)
    parser.add_argument("--seed-pool-size", type=int, default=256)
    parser.add_argument("--rebase-every", type=int, default=4)
    parser.add_argument("--pool-key", type=int, default=1,
                        help="seed-pool key; fixed so that a run is reproducible (-1: random)")
    parser.add_argument("--aggregation", default="trimmed_mean", choices=["trimmed_mean", "median", "mean"],
                        help="how the coordinator combines the clients' scalars per seed (PROTOCOL.md 8.2)")
    parser.add_argument("--aggregation-clip", type=float, default=None,
                        help="bound on |projected gradient| before combining (default: the coordinator's, 1000; "
                             "1e30 turns clipping off)")
    parser.add_argument("--adversaries", type=int, default=0,
                        help="robustness experiments: the last N clients poison their updates "
                             "(edge_client/adversary.py)")
    parser.add_argument("--attack", default="sign_flip", choices=["sign_flip", "constant", "noise"])
    parser.add_argument("--attack-scale", type=float, default=100.0)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<timestamp>")
    parser.add_argument("--threads-per-client", type=int, default=1)
    return parser


def prepare_data(args: argparse.Namespace, run_dir: Path) -> tuple[list[Path], Path | None]:
    """Split the records into client files and a held-out file no client trains on."""
    records = []
    for number, line in enumerate(args.data.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SystemExit(f"edgefed-local: {args.data}:{number}: not JSON ({error.msg})") from None
    split = split_records(records, clients=args.clients, heldout=args.heldout, per_client=args.records_per_client,
                          scheme=args.split, alpha=args.alpha, seed=0)
    summary = write_split(split, run_dir)
    print(summarise(split))
    paths = [Path(client["path"]) for client in summary["clients"]]
    heldout = Path(summary["heldout"]["path"]) if summary["heldout"]["records"] else None
    return paths, heldout


def start(name: str, command: list[str], run_dir: Path, env: dict[str, str]) -> Process:
    log_path = run_dir / f"{name}.log"
    handle = log_path.open("w")
    popen = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return Process(name, popen, log_path)


def fetch_status(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stop_all(processes: list[Process]) -> None:
    for process in processes:
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.popen.wait(15)
        except subprocess.TimeoutExpired:
            process.popen.kill()


def wait_until(predicate: Any, timeout: float, failed: Any = lambda: False) -> bool:
    deadline = time.time() + timeout
    while not predicate():
        if failed() or time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    if args.clients < 1:
        print("edgefed-local: --clients must be >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.adversaries <= args.clients:
        print("edgefed-local: --adversaries must be between 0 and --clients", file=sys.stderr)
        return 2
    try:
        budgets = [parse_bytes(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError as error:
        print(f"edgefed-local: --budgets: {error}", file=sys.stderr)
        return 2
    if not args.data.exists():
        print(f"edgefed-local: data file not found: {args.data}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    converting = str(args.model) == DEFAULT_MODEL or str(args.model).endswith(".gguf")
    print(f"[1/4] preparing the model {args.model}" + (" (the first run converts the GGUF, ~20 s)" if converting else ""))
    try:
        model_dir = resolve_model(args.model)
        model, _ = load_model(model_dir)
    except ModelLoadError as error:
        print(f"edgefed-local: {error}", file=sys.stderr)
        return 2
    model_hash = base_weights_hash(model)
    del model
    try:
        data_paths, heldout = prepare_data(args, run_dir)
    except ValueError as error:
        print(f"edgefed-local: {error}", file=sys.stderr)
        return 2

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "EDGEFED_THREADS": str(args.threads_per_client), "HF_HUB_OFFLINE": "1"}
    port_file = run_dir / "port"
    metrics_path = run_dir / "eval.jsonl"
    metrics_path.unlink(missing_ok=True)
    processes: list[Process] = []
    evaluator: Process | None = None
    try:
        print(f"[2/4] starting the coordinator (logs in {run_dir})")
        processes.append(start("coordinator", [
            sys.executable, "-m", "coordinator.cli", "--model-hash", model_hash, "--model-name", str(args.model),
            "--ledger-path", str(run_dir / "ledger.db"), "--port", "0", "--port-file", str(port_file),
            "--rounds", str(args.rounds), "--scope", args.scope, "--local-steps", str(args.local_steps),
            "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
            "--learning-rate", str(args.learning_rate), "--epsilon", str(args.epsilon),
            "--seed-pool-size", str(args.seed_pool_size), "--rebase-every", str(args.rebase_every),
            *(["--pool-key", str(args.pool_key)] if args.pool_key >= 0 else []),
            "--aggregation", args.aggregation,
            *(["--aggregation-clip", str(args.aggregation_clip)] if args.aggregation_clip is not None else []),
            "--clients-per-round", str(args.clients), "--quorum", str(max(1, (args.clients + 1) // 2)),
            "--min-clients", str(args.clients), "--deadline-s", "900", "--commit-wait-s", "30",
            "--status-file", str(run_dir / "status.json"),
        ], run_dir, env))
        coordinator = processes[0]
        if not wait_until(port_file.exists, 60, lambda: coordinator.popen.poll() is not None):
            print(coordinator.log_path.read_text()[-2000:], file=sys.stderr)
            return 1
        port = int(port_file.read_text())
        url = f"ws://127.0.0.1:{port}"
        if heldout is not None:
            print(f"[3/4] evaluating the base model on {args.heldout} held-out records")
            evaluator = start("evaluator", [
                sys.executable, "-m", "edge_client.evaluator", "--url", url, "--heldout", str(heldout),
                "--metrics", str(metrics_path), "--model", str(model_dir),
                "--generate-every", str(args.generate_every), "--prompt-format", args.prompt_format,
                *(["--loss-only"] if args.loss_only else []),
            ], run_dir, env)
            processes.append(evaluator)
            if not wait_until(lambda: bool(read_metrics(metrics_path)), 900, lambda: evaluator.popen.poll() is not None):
                print(evaluator.log_path.read_text()[-2000:], file=sys.stderr)
                return 1
            base = read_metrics(metrics_path)[0]
            decoded = "" if base["rouge_l"] is None else (
                f", Rouge-L {base['rouge_l']:.4f}, exact match {base['exact_match']:.3f}")
            print(f"  base model: eval loss {base['eval_loss']:.4f}{decoded}")
        for index, data_path in enumerate(data_paths):
            budget = budgets[index % len(budgets)]
            adversary = index >= args.clients - args.adversaries
            module = ["edge_client.adversary", "--attack", args.attack, "--attack-scale", str(args.attack_scale)] \
                if adversary else ["edge_client.cli"]
            processes.append(start(f"client-{index}", [
                sys.executable, "-m", *module, "--url", url,
                "--client-id", f"client-{index}", "--data", str(data_path), "--model", str(model_dir),
                "--memory-budget", str(budget), "--prompt-format", args.prompt_format,
            ], run_dir, env))
        print(f"[4/4] {args.clients} clients training {args.rounds} rounds; status: http://127.0.0.1:{port}/status")
        status = follow(processes, port, args.rounds, metrics_path)
        if evaluator is not None and status is not None:
            print("  final evaluation ...")
            wait_until(lambda: evaluator.popen.poll() is not None, 900)
    except KeyboardInterrupt:
        print("interrupted; stopping the federation")
        return 130
    finally:
        stop_all(processes)
    wall = time.time() - started
    final = run_dir / "status.json"
    if status is not None and final.exists():
        status = json.loads(final.read_text())
    if status is None:
        print("edgefed-local: the federation did not finish; see the logs in", run_dir, file=sys.stderr)
        return 1
    summary = report(status, read_metrics(metrics_path), wall, run_dir)
    summary.update(aggregation=args.aggregation, aggregation_clip=args.aggregation_clip, adversaries=args.adversaries,
                   attack=f"{args.attack} x{args.attack_scale:g}" if args.adversaries else None)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if status.get("finished") else 1


def follow(processes: list[Process], port: int, rounds: int, metrics_path: Path) -> dict[str, Any] | None:
    """Print progress until the coordinator exits; return its last status."""
    coordinator = processes[0]
    last_status: dict[str, Any] | None = None
    shown = 0
    last_line = ""
    interactive = sys.stdout.isatty()
    round_started = time.time()
    while coordinator.popen.poll() is None:
        for process in processes[1:]:
            code = process.popen.poll()
            if code not in (None, 0):
                print(f"\n{process.name} exited with {code}:\n{process.log_path.read_text()[-1500:]}", file=sys.stderr)
                return None
        status = fetch_status(port)
        if status is not None:
            last_status = status
            evals = {entry["round"]: entry for entry in read_metrics(metrics_path)}
            for entry in status["rounds"]:
                if entry["round"] > shown:
                    shown = entry["round"]
                    agree = "yes" if entry["fingerprints"] <= 1 else "NO"
                    line = (f"  round {entry['round']:>3}/{rounds}  {time.time() - round_started:5.0f}s  "
                            f"updates {entry['num_updates']}  probe loss {entry['loss_before']:.4f} -> "
                            f"{entry['loss_after']:.4f}  fingerprints agree: {agree}")
                    previous = evals.get(entry["round"] - 1)
                    if previous is not None:
                        line += f"  (eval loss before it: {previous['eval_loss']:.4f})"
                    print(("\r" if interactive else "") + line.ljust(len(last_line)))
                    last_line, round_started = "", time.time()
            open_round = status.get("open_round")
            if open_round and interactive:
                line = (f"  round {open_round['round']:>3}/{rounds}  {time.time() - round_started:5.0f}s  "
                        f"training: {len(open_round['received'])}/{len(open_round['assigned'])} updates in")
                print("\r" + line.ljust(len(last_line)), end="", flush=True)
                last_line = line
        time.sleep(1.0)
    return last_status


def report(status: dict[str, Any], evals: list[dict[str, Any]], wall: float, run_dir: Path) -> dict[str, Any]:
    """Print the final tables, write metrics.jsonl and the plot; return the summary figures."""
    clients = [c for c in status["clients"] if c["mode"] != "observe"]
    per_round_bytes = [c["bytes_per_round"] for c in clients if c.get("bytes_per_round")]
    bytes_per_client_round = sum(per_round_bytes) / len(per_round_bytes) if per_round_bytes else None
    eval_by_round = {e["round"]: e for e in evals}
    rows = []
    uplink = 0.0
    for entry in status["rounds"]:
        uplink += (bytes_per_client_round or 0) * entry["num_updates"]
        ev = eval_by_round.get(entry["round"], {})
        rows.append({"round": entry["round"], "updates": entry["num_updates"],
                     "probe_loss_before": entry["loss_before"], "probe_loss_after": entry["loss_after"],
                     "eval_loss": ev.get("eval_loss"), "rouge_l": ev.get("rouge_l"),
                     "exact_match": ev.get("exact_match"), "uplink_bytes_total": round(uplink),
                     "committed_at": entry["committed_at"]})
    base = eval_by_round.get(0)
    with (run_dir / "metrics.jsonl").open("w", encoding="utf-8") as out:
        if base is not None:
            out.write(json.dumps({"round": 0, "eval_loss": base["eval_loss"], "rouge_l": base["rouge_l"],
                                  "exact_match": base["exact_match"], "uplink_bytes_total": 0}) + "\n")
        for row in rows:
            out.write(json.dumps(row) + "\n")

    print()
    print(f"{'round':>5}  {'updates':>7}  {'probe loss':>17}  {'eval loss':>9}  {'uplink bytes':>12}")
    if base is not None:
        print(f"{0:>5}  {'':>7}  {'':>17}  {base['eval_loss']:>9.4f}  {0:>12}")
    for row in rows:
        ev = f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-"
        print(f"{row['round']:>5}  {row['updates']:>7}  {row['probe_loss_before']:>7.4f} -> {row['probe_loss_after']:<7.4f}"
              f"  {ev:>9}  {row['uplink_bytes_total']:>12}")
    print()
    print(f"{'client':<10} {'device':<6} {'budget':>8} {'round':>5} {'sent/round (B)':>14} {'fingerprint':<18}")
    for client in status["clients"]:
        budget = client["device"].get("memory_budget_bytes")
        per_round = client.get("bytes_per_round")
        print(f"{client['client_id']:<10} {client['device']['device_type']:<6} "
              f"{(budget or 0) / 2**30:>6.1f}Gi {client['round']:>5} "
              f"{'-' if per_round is None else f'{per_round:.0f}':>14} {str(client['fingerprint'])[:16]:<18}")
    fingerprints = {c["fingerprint"] for c in status["clients"]}
    decoded = [e for e in evals if e.get("rouge_l") is not None]
    before = decoded[0] if decoded else None
    after = decoded[-1] if len(decoded) > 1 else None
    summary = {
        "rounds": status["round"], "wall_s": round(wall, 1), "bytes_per_client_round": bytes_per_client_round,
        "eval_loss_before": evals[0]["eval_loss"] if evals else None,
        "eval_loss_after": evals[-1]["eval_loss"] if evals else None,
        "rouge_l_before": before["rouge_l"] if before else None, "rouge_l_after": after["rouge_l"] if after else None,
        "exact_match_before": before["exact_match"] if before else None,
        "exact_match_after": after["exact_match"] if after else None,
        "heldout_examples": evals[0]["examples"] if evals else 0,
        "fingerprints_agree": len(fingerprints) == 1,
    }
    print()
    if evals:
        print(f"held-out ({summary['heldout_examples']} records): eval loss {summary['eval_loss_before']:.4f} -> "
              f"{summary['eval_loss_after']:.4f}", end="")
        if before and after:
            print(f"; Rouge-L {before['rouge_l']:.4f} -> {after['rouge_l']:.4f}; "
                  f"exact match {before['exact_match']:.3f} -> {after['exact_match']:.3f}", end="")
        print()
    print(f"rounds: {status['round']}  wall time: {wall:.0f}s  bytes sent per client per round: "
          f"{bytes_per_client_round or 0:.0f}  all clients hold the same model: "
          f"{'yes' if summary['fingerprints_agree'] else 'NO'}")
    plot = plot_metrics(run_dir / "metrics.jsonl", run_dir / "eval_loss.png")
    print(f"metrics.jsonl, {plot.name if plot else 'no plot'}, summary.json, the ledger and every log are in {run_dir}")
    return summary


def plot_metrics(metrics: Path, out: Path) -> Path | None:
    """Eval loss against rounds and against uplink bytes, side by side (PNG)."""
    rows = [r for r in read_metrics(metrics) if r.get("eval_loss") is not None]
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    rounds = [r["round"] for r in rows]
    losses = [r["eval_loss"] for r in rows]
    by_round.plot(rounds, losses, marker="o")
    by_round.set(xlabel="round", ylabel="held-out loss", title="Held-out loss by round")
    by_bytes.plot([r["uplink_bytes_total"] / 1024 for r in rows], losses, marker="o", color="tab:orange")
    by_bytes.set(xlabel="uplink KiB, all clients", ylabel="held-out loss", title="Held-out loss by bytes sent")
    for axis in (by_round, by_bytes):
        axis.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())
