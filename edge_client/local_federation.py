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
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_client.device import parse_bytes
from edge_client.model import DEFAULT_MODEL, base_weights_hash, load_model, resolve_model

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
    parser.add_argument("--model", default=DEFAULT_MODEL, help="builtin name, .gguf file or HF model directory")
    parser.add_argument("--data", type=Path, default=SHIPPED_DATA, help="JSONL of instruction/response records")
    parser.add_argument("--records-per-client", type=int, default=200,
                        help="records each client gets (IID split of --data)")
    parser.add_argument("--scope", default="full", choices=["full", "lora"])
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=96)
    parser.add_argument("--learning-rate", type=float, default=2e-6)
    parser.add_argument("--epsilon", type=float, default=1e-3)
    parser.add_argument("--seed-pool-size", type=int, default=256)
    parser.add_argument("--rebase-every", type=int, default=4)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<timestamp>")
    parser.add_argument("--threads-per-client", type=int, default=1)
    return parser


def split_data(source: Path, clients: int, per_client: int, run_dir: Path) -> list[Path]:
    """IID split: shuffle the records with a fixed seed and deal them out."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
    if len(lines) < clients:
        raise SystemExit(f"edgefed-local: {source} has {len(lines)} records, fewer than {clients} clients")
    per_client = min(per_client, len(lines) // clients)
    paths = []
    for index in range(clients):
        path = run_dir / f"client-{index}.jsonl"
        path.write_text("\n".join(lines[index * per_client : (index + 1) * per_client]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


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


def stop_all(processes: list[Process]) -> None:
    for process in processes:
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.popen.wait(15)
        except subprocess.TimeoutExpired:
            process.popen.kill()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    if args.clients < 1:
        print("edgefed-local: --clients must be >= 1", file=sys.stderr)
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
    print(f"[1/3] preparing the model {args.model}" + (" (the first run converts the GGUF, ~20 s)" if converting else ""))
    model_dir = resolve_model(args.model)
    model, _ = load_model(model_dir)
    model_hash = base_weights_hash(model)
    del model
    data_paths = split_data(args.data, args.clients, args.records_per_client, run_dir)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "EDGEFED_THREADS": str(args.threads_per_client), "HF_HUB_OFFLINE": "1"}
    port_file = run_dir / "port"
    processes: list[Process] = []
    try:
        print(f"[2/3] starting the coordinator and {args.clients} clients (logs in {run_dir})")
        processes.append(start("coordinator", [
            sys.executable, "-m", "coordinator.cli", "--model-hash", model_hash, "--model-name", str(args.model),
            "--ledger-path", str(run_dir / "ledger.db"), "--port", "0", "--port-file", str(port_file),
            "--rounds", str(args.rounds), "--scope", args.scope, "--local-steps", str(args.local_steps),
            "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
            "--learning-rate", str(args.learning_rate), "--epsilon", str(args.epsilon),
            "--seed-pool-size", str(args.seed_pool_size), "--rebase-every", str(args.rebase_every),
            "--clients-per-round", str(args.clients), "--quorum", str(max(1, (args.clients + 1) // 2)),
            "--min-clients", str(args.clients), "--deadline-s", "900", "--commit-wait-s", "30",
            "--status-file", str(run_dir / "status.json"),
        ], run_dir, env))
        deadline = time.time() + 60
        while not port_file.exists():
            if processes[0].popen.poll() is not None or time.time() > deadline:
                print(processes[0].log_path.read_text()[-2000:], file=sys.stderr)
                return 1
            time.sleep(0.1)
        port = int(port_file.read_text())
        for index, data_path in enumerate(data_paths):
            budget = budgets[index % len(budgets)]
            processes.append(start(f"client-{index}", [
                sys.executable, "-m", "edge_client.cli", "--url", f"ws://127.0.0.1:{port}",
                "--client-id", f"client-{index}", "--data", str(data_path), "--model", str(model_dir),
                "--memory-budget", str(budget),
            ], run_dir, env))
        print(f"[3/3] training {args.rounds} rounds; status: http://127.0.0.1:{port}/status")
        status = follow(processes, port, args.rounds)
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
    report(status, wall, run_dir)
    return 0 if status.get("finished") else 1


def follow(processes: list[Process], port: int, rounds: int) -> dict[str, Any] | None:
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
            for entry in status["rounds"]:
                if entry["round"] > shown:
                    shown = entry["round"]
                    agree = "yes" if entry["fingerprints"] <= 1 else "NO"
                    line = (f"  round {entry['round']:>3}/{rounds}  {time.time() - round_started:5.0f}s  "
                            f"updates {entry['num_updates']}  probe loss {entry['loss_before']:.4f} -> "
                            f"{entry['loss_after']:.4f}  fingerprints agree: {agree}")
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


def report(status: dict[str, Any], wall: float, run_dir: Path) -> None:
    rounds = status["rounds"]
    print()
    print("probe loss: each round's first local batch, before and after the round's local steps")
    print(f"{'round':>5}  {'updates':>7}  {'loss before':>11}  {'loss after':>10}")
    for entry in rounds:
        print(f"{entry['round']:>5}  {entry['num_updates']:>7}  {entry['loss_before']:>11.4f}  {entry['loss_after']:>10.4f}")
    print()
    print(f"{'client':<10} {'device':<6} {'budget':>8} {'round':>5} {'sent/round (B)':>14} {'fingerprint':<18}")
    for client in status["clients"]:
        budget = client["device"].get("memory_budget_bytes")
        per_round = client.get("bytes_received", 0) / max(1, client.get("rounds_participated", 0) or 1)
        print(f"{client['client_id']:<10} {client['device']['device_type']:<6} "
              f"{(budget or 0) / 2**30:>6.1f}Gi {client['round']:>5} {per_round:>14.0f} {str(client['fingerprint'])[:16]:<18}")
    fingerprints = {c["fingerprint"] for c in status["clients"]}
    print()
    print(f"rounds: {status['round']}  wall time: {wall:.0f}s  "
          f"all clients hold the same model: {'yes' if len(fingerprints) == 1 else 'NO'}")
    print(f"ledger, logs and status.json in {run_dir}")


if __name__ == "__main__":
    sys.exit(main())
