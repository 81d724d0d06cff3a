"""``edgefed-local``: a whole federation on this machine, in one command.

Starts a coordinator and N client processes on 127.0.0.1, each client with its own
share of the data and its own memory budget, shows progress while the rounds run, and
prints a summary table at the end. Everything (ledger, client data, logs, metrics) goes
to a run directory.

Each round's line says "fingerprints agree: yes" only when every process it started (the
clients and the evaluator) reported a fingerprint for that round and all are equal;
otherwise it names who has not reported and which models differ. The byte figures are the
coordinator's: websocket frames counted at its sockets, per client connection and per
round (``/status``; PROTOCOL.md).
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_client.device import parse_bytes
from edge_client.model import DEFAULT_MODEL, ModelLoadError, base_weights_hash, load_model, resolve_model
from edge_client.splits import split_records, summarise, write_split
from protocol.messages import OBSERVER_MODE

__all__ = ["FingerprintVerdict", "RoundProgress", "coordinator_command", "judge_fingerprints", "main"]

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
    parser.add_argument("--budgets", default="0.75GiB,4GiB,8GiB",
                        help="comma-separated memory budgets, one per client (cycled); each client's chooser picks "
                             "the best mode that fits its budget (SmolLM2-135M over LoRA: first-order from about "
                             "0.9 GiB, MeZO below)")
    parser.add_argument("--mode", default="auto",
                        help="auto (each client's chooser decides) or a mode every client must run (mezo, ferret, "
                             "droppeft, fedcybgd, fedbiot, fedbiot_zo)")
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
    parser.add_argument("--scope", default="lora", choices=["full", "lora"])
    parser.add_argument("--local-steps", type=int, default=24,
                        help="seeds per round for MeZO clients (one zeroth-order step, two forwards, per seed)")
    parser.add_argument("--ferret-seeds", type=int, default=1024,
                        help="seeds per round for projected first-order (ferret) clients (one fused pass each)")
    parser.add_argument("--ferret-steps", type=int, default=4, help="first-order steps per round of a ferret client")
    parser.add_argument("--ferret-optimizer", default="sgd", choices=["sgd", "adamw"],
                        help="sgd keeps ferret's scalars on MeZO's scale (PROTOCOL.md 8.1.2)")
    parser.add_argument("--droppeft-ratios", type=_ratios, default=(0.1, 0.25),
                        help="layer-dropout ratios a droppeft client may get, comma-separated: the "
                             "coordinator's bandit picks among several per client; one value is fixed")
    parser.add_argument("--blocks", action="store_true",
                        help="offer cyclic block updates (FedCyBGD): the coordinator schedules blocks, and a client "
                             "whose chooser picks fedcybgd (where neither ferret nor droppeft fits) trains one decoder "
                             "layer a round; implied by --mode fedcybgd")
    parser.add_argument("--block-seeds", type=int, default=256,
                        help="seeds per round for a cyclic-block (fedcybgd) client, all of its block's; each "
                             "block has 2x this many (PROTOCOL.md 5.5)")
    parser.add_argument("--block-order", default="ascending", choices=["ascending", "descending", "random"],
                        help="the order the coordinator cycles the blocks (decoder layers) over fedcybgd clients")
    parser.add_argument("--value-encoding", default="q8", choices=["pairs", "f32", "q8"],
                        help="how ferret and droppeft clients send their scalars: q8 (one byte each, "
                             "linearly quantised), f32, or (seed, float64) pairs (PROTOCOL.md 4.3.1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=96)
    parser.add_argument("--learning-rate", type=float, default=2e-4,
                        help="the coordinator's learning rate: MeZO's step size; a ferret client's SGD rate is "
                             "this x ferret-seeds / ferret-steps")
    parser.add_argument("--epsilon", type=float, default=1e-3)
    parser.add_argument("--personalised-lr", default="off", choices=["off", "last_loss", "mean_loss", "update_size"],
                        help="FedMeZO's personalised client-wise learning rates, from each client's statistic "
                             "(PROTOCOL.md §8.2; default off: one rate)")
    parser.add_argument("--personalised-lr-spread", type=float, default=0.5,
                        help="personalised rates stay within --learning-rate x (1 +- this)")
    parser.add_argument("--seed-pool-size", type=int, default=16384)
    parser.add_argument("--rebase-every", type=int, default=4)
    parser.add_argument("--pool-key", type=int, default=1,
                        help="seed-pool key; fixed so that a run is reproducible (-1: random)")
    parser.add_argument("--aggregation", default="trimmed_mean", choices=["trimmed_mean", "median", "mean"],
                        help="how the coordinator combines the clients' scalars per seed (PROTOCOL.md 8.2)")
    parser.add_argument("--aggregation-clip", type=float, default=None,
                        help="bound on |projected gradient| before combining (default: the coordinator's, 1000; "
                             "1e30 turns clipping off)")
    parser.add_argument("--quorum", type=int, default=None,
                        help="updates a round needs to commit (default: the coordinator's; for trimmed_mean and "
                             "median max(3, a majority of --clients), at most --clients, so that the robust "
                             "method stays in force; for mean a majority)")
    parser.add_argument("--adversaries", type=int, default=0,
                        help="robustness experiments: the last N clients poison their updates "
                             "(edge_client/adversary.py)")
    parser.add_argument("--attack", default="sign_flip", choices=["sign_flip", "constant", "noise"])
    parser.add_argument("--attack-scale", type=float, default=100.0)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<timestamp>")
    parser.add_argument("--wall-budget", type=float, default=None, metavar="SECONDS",
                        help="stop after the first round committed this long after the first task was handed out "
                             "(training time; model loading excluded), once every process holds it")
    parser.add_argument("--no-evaluator", action="store_true",
                        help="keep the held-out split in the run directory but run no evaluator during training "
                             "(the clients get the CPU to themselves; evaluate the ledger's rounds afterwards)")
    parser.add_argument("--no-export", action="store_true",
                        help="do not export the final model into <run dir>/export (edgefed-export does it later)")
    parser.add_argument("--emulator", type=Path, default=None, metavar="DIR",
                        help="a FedBiOT emulator of --model (edgefed-emulator build), given to every client: a "
                             "client whose budget fits nothing else trains through it (mode fedbiot, or fedbiot_zo "
                             "when even its backward does not fit); the "
                             "federation's LoRA is then restricted to the emulator's adapter layers")
    parser.add_argument("--emulator-quantization", default="auto", choices=["auto", "nf4", "int8", "none"],
                        help="how emulator clients hold its frozen part (auto: 8 bits where the budget holds them)")
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

# -- fingerprint agreement ----------------------------------------------------------------


@dataclass(frozen=True)
class FingerprintVerdict:
    """Whether a federation's processes hold the same model after a round.

    ``agree`` is true only when every expected process reported a fingerprint for the
    round and all reported fingerprints are equal; ``detail`` says ``"yes"``, or which
    processes have not reported and which fingerprints differ.
    """

    agree: bool
    detail: str


def judge_fingerprints(processes: Iterable[str], reports: Mapping[str, str | None],
                       distinct_recorded: int | None = None) -> FingerprintVerdict:
    """Decide whether ``processes`` agree on their model after one round.

    Args:
        processes: the client ids that must have reported (every live process of the
            federation: the trainers and the evaluator).
        reports: client id -> the fingerprint it reported for the round (None or absent:
            none seen). Reports from other clients count too: a fingerprint that differs is
            a disagreement whoever sent it.
        distinct_recorded: how many distinct fingerprints the coordinator recorded for
            the round (``/status`` ``rounds[].fingerprints``), if known. More than one is a
            disagreement even if ``reports`` (sampled from ``/status`` polls) missed it.
    """
    reported = {client: value for client, value in reports.items() if value is not None}
    problems = []
    missing = sorted(set(processes) - set(reported))
    if missing:
        problems.append("no fingerprint from " + ", ".join(missing))
    holders: dict[str, list[str]] = {}
    for client, value in sorted(reported.items()):
        holders.setdefault(value, []).append(client)
    if len(holders) > 1:
        problems.append(" vs ".join(f"{value[:12]} ({', '.join(clients)})" for value, clients in
                                    sorted(holders.items(), key=lambda item: (-len(item[1]), item[0]))))
    elif distinct_recorded is not None and distinct_recorded > 1:
        problems.append(f"the coordinator recorded {distinct_recorded} distinct fingerprints")
    return FingerprintVerdict(agree=not problems, detail="yes" if not problems else "NO: " + "; ".join(problems))


class RoundProgress:
    """What ``/status`` polls showed: the committed rounds and, per round, the fingerprint
    each process reported for it.

    Each ``rounds[]`` entry carries the round's recorded reports (``fingerprint_reports``,
    from the ledger), so no report is missed between polls; each client's latest
    fingerprint is merged in too. A round is *settled* once every expected process has
    reported it or moved past it (a process never reports an earlier round after a later one).
    """

    def __init__(self, processes: Iterable[str]) -> None:
        self.processes = sorted(processes)
        self.rounds: dict[int, dict[str, Any]] = {}  # round number -> its /status rounds[] entry
        self.reports: dict[int, dict[str, str]] = {}  # round number -> client id -> fingerprint
        self.latest_reported: dict[str, int] = {}  # client id -> the latest round it reported
        self.printed_through = 0  # rounds up to this one have had their progress line

    def observe(self, status: Mapping[str, Any]) -> None:
        for entry in status["rounds"]:
            self.rounds[entry["round"]] = entry
            for client_id, fingerprint in (entry.get("fingerprint_reports") or {}).items():
                self._record(entry["round"], client_id, fingerprint)
        for client in status["clients"]:
            if client["fingerprint"] is None or client["round"] < 0:
                continue  # joined, has not reported yet
            self._record(client["round"], client["client_id"], client["fingerprint"])

    def _record(self, round_number: int, client_id: str, fingerprint: str) -> None:
        # The latest value wins: a client that resyncs replaces its report for the round.
        self.reports.setdefault(round_number, {})[client_id] = fingerprint
        self.latest_reported[client_id] = max(self.latest_reported.get(client_id, -1), round_number)

    def settled(self, round_number: int) -> bool:
        return all(self.latest_reported.get(p, -1) >= round_number for p in self.processes)

    def verdict(self, round_number: int) -> FingerprintVerdict:
        entry = self.rounds.get(round_number, {})
        return judge_fingerprints(self.processes, self.reports.get(round_number, {}), entry.get("fingerprints"))


# -- running the federation ---------------------------------------------------------------


def _ratios(text: str) -> tuple[float, ...]:
    """``--droppeft-ratios``: 1 to 16 distinct ratios in [0, 1)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not 1 <= len(values) <= 16 or len(set(values)) != len(values) or not all(0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected 1 to 16 distinct ratios in [0, 1), got {text!r}")
    return values


def needs_emulator(mode: str) -> bool:
    """Whether ``mode`` (a registered engine's name) trains through a FedBiOT emulator."""
    from edge_client.engines import get_engine

    return get_engine(mode).needs_emulator


def modes_config(args: argparse.Namespace) -> str:
    """The coordinator's ``[modes]`` tables for this run (TOML)."""
    first_order = (f"seeds = {args.ferret_seeds}\nlocal_steps = {args.ferret_steps}\n"
                   f"optimizer = \"{args.ferret_optimizer}\"\nvalue_encoding = \"{args.value_encoding}\"\n")
    # droppeft: ferret's round with layer dropout, its ratio tuned per client by a bandit
    ratios = args.droppeft_ratios
    dropout = (f"dropout_ratio = {ratios[0]}\n" if len(ratios) == 1 else
               f"adapt = \"dropout_ratio\"\nadapt_values = [{', '.join(str(r) for r in ratios)}]\n")
    tables = f"[modes.ferret]\n{first_order}\n[modes.droppeft]\n{first_order}{dropout}"
    if getattr(args, "blocks", False) or getattr(args, "mode", "auto") == "fedcybgd":
        # fedcybgd: ferret's round over one decoder layer at a time, with that layer's seeds
        block_steps = first_order.replace(f"seeds = {args.ferret_seeds}\n", "")
        tables += (f"\n[modes.fedcybgd]\nblocks = {args.model_layers}\nblock_order = \"{args.block_order}\"\n"
                   f"block_seeds = {2 * args.block_seeds}\nseeds = {args.block_seeds}\n{block_steps}")
    manifest = getattr(args, "emulator_manifest", None)
    if manifest is not None:
        # FedBiOT: every client trains the emulator's adapter layers (one space), and
        # emulator clients must hold this very emulator.
        layers = ", ".join(str(layer) for layer in manifest["adapter_layers"])
        pinned = f"emulator_hash = \"{manifest['emulator_hash']}\"\n"
        tables = (f"[training]\nlora_layers = [{layers}]\n\n{tables}\n[modes.fedbiot]\n{first_order}{pinned}"
                  f"\n[modes.fedbiot_zo]\n{pinned}")
    return tables


def coordinator_command(args: argparse.Namespace, model_hash: str, run_dir: Path, port_file: Path) -> list[str]:
    """The ``edgefed-coordinator`` command line for this run (its ``[modes]`` tables go to
    ``run_dir/modes.toml``)."""
    config = run_dir / "modes.toml"
    config.write_text(modes_config(args), encoding="utf-8")
    return [
        sys.executable, "-m", "coordinator.cli", "--config", str(config),
        "--model-hash", model_hash, "--model-name", str(args.model),
        "--ledger-path", str(run_dir / "ledger.db"), "--port", "0", "--port-file", str(port_file),
        "--rounds", str(args.rounds), "--scope", args.scope, "--local-steps", str(args.local_steps),
        "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
        "--learning-rate", str(args.learning_rate), "--epsilon", str(args.epsilon),
        "--personalised-lr", args.personalised_lr, "--personalised-lr-spread", str(args.personalised_lr_spread),
        "--seed-pool-size", str(args.seed_pool_size), "--rebase-every", str(args.rebase_every),
        *(["--pool-key", str(args.pool_key)] if args.pool_key >= 0 else []),
        "--aggregation", args.aggregation,
        *(["--aggregation-clip", str(args.aggregation_clip)] if args.aggregation_clip is not None else []),
        # No quorum unless asked for: the coordinator's default keeps a robust method in force.
        "--clients-per-round", str(args.clients), *(["--quorum", str(args.quorum)] if args.quorum is not None else []),
        "--min-clients", str(args.clients), "--deadline-s", "900", "--commit-wait-s", "30",
        "--status-file", str(run_dir / "status.json"),
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    if args.clients < 1:
        print("edgefed-local: --clients must be >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.adversaries <= args.clients:
        print("edgefed-local: --adversaries must be between 0 and --clients", file=sys.stderr)
        return 2
    if args.quorum is not None and not 1 <= args.quorum <= args.clients:
        print("edgefed-local: --quorum must be between 1 and --clients", file=sys.stderr)
        return 2
    try:
        budgets = [parse_bytes(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError as error:
        print(f"edgefed-local: --budgets: {error}", file=sys.stderr)
        return 2
    if args.wall_budget is not None and args.wall_budget < 0:
        print("edgefed-local: --wall-budget must be >= 0", file=sys.stderr)
        return 2
    if not args.data.exists():
        print(f"edgefed-local: data file not found: {args.data}", file=sys.stderr)
        return 2
    from edge_client.engines import available_engines, get_engine

    if args.mode not in ("auto", *available_engines()):
        print(f"edgefed-local: --mode must be auto or one of {', '.join(available_engines())}, got {args.mode!r}",
              file=sys.stderr)
        return 2
    if args.mode != "auto" and get_engine(args.mode).needs_emulator and args.emulator is None:
        print(f"edgefed-local: --mode {args.mode} trains through an emulator: give one with --emulator",
              file=sys.stderr)
        return 2
    run_dir = args.run_dir or ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")
    if (run_dir / "ledger.db").exists():
        # Its coordinator would resume that federation (its rounds, its settings), not
        # start the one this command describes.
        print(f"edgefed-local: --run-dir {run_dir} already holds a federation's ledger; give a new directory "
              f"(or continue that federation with edgefed-coordinator --ledger-path {run_dir / 'ledger.db'})",
              file=sys.stderr)
        return 2
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
    args.model_layers = int(model.config.num_hidden_layers)  # the block schedule's decoder layers
    del model
    args.emulator_manifest = None
    if args.emulator is not None:
        from edge_client.emulator import EmulatorLoadError, read_manifest

        try:
            args.emulator_manifest = read_manifest(args.emulator)
        except EmulatorLoadError as error:
            print(f"edgefed-local: --emulator: {error}", file=sys.stderr)
            return 2
        if args.emulator_manifest["base_model_hash"] != model_hash:
            print(f"edgefed-local: --emulator: {args.emulator} was built from another model than {args.model} "
                  f"(base hash {args.emulator_manifest['base_model_hash'][:16]}..., the model's "
                  f"{model_hash[:16]}...)", file=sys.stderr)
            return 2
        if args.scope != "lora":
            print("edgefed-local: --emulator trains LoRA adapters (--scope lora)", file=sys.stderr)
            return 2
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
    (run_dir / "status.json").unlink(missing_ok=True)  # a reused run directory's would pass for this run's
    processes: list[Process] = []
    evaluator: Process | None = None
    # Every process but the coordinator reports a fingerprint each round; its name is its client id.
    evaluating = heldout is not None and not args.no_evaluator
    progress = RoundProgress([f"client-{index}" for index in range(len(data_paths))]
                             + (["evaluator"] if evaluating else []))
    status: dict[str, Any] | None = None
    try:
        print(f"[2/4] starting the coordinator (logs in {run_dir})")
        processes.append(start("coordinator", coordinator_command(args, model_hash, run_dir, port_file), run_dir, env))
        coordinator = processes[0]
        if not wait_until(port_file.exists, 60, lambda: coordinator.popen.poll() is not None):
            print(coordinator.log_path.read_text()[-2000:], file=sys.stderr)
            return 1
        port = int(port_file.read_text())
        url = f"ws://127.0.0.1:{port}"
        if evaluating:
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
                "--memory-budget", str(budget), "--prompt-format", args.prompt_format, "--mode", args.mode,
                *(["--emulator", str(args.emulator), "--emulator-quantization", args.emulator_quantization]
                  if args.emulator is not None and (args.mode == "auto" or needs_emulator(args.mode))
                  else []),
            ], run_dir, env))
        print(f"[4/4] {args.clients} clients training {args.rounds} rounds; live page: http://127.0.0.1:{port}/ "
              f"(status: http://127.0.0.1:{port}/status, metrics: http://127.0.0.1:{port}/metrics)")
        status = follow(processes, port, args.rounds, metrics_path, progress, run_dir / "status.json",
                        wall_budget_s=args.wall_budget)
        if evaluator is not None and status is not None:
            print("  final evaluation ...")
            wait_until(lambda: evaluator.popen.poll() is not None, 900)
    except KeyboardInterrupt:
        print("interrupted; stopping the federation")
        return 130
    finally:
        stop_all(processes)
    wall = time.time() - started
    if status is None:
        print("edgefed-local: the federation did not finish; see the logs in", run_dir, file=sys.stderr)
        return 1
    budget_round = status.get("stopped_at_budget")
    if budget_round is not None:
        (run_dir / "status.json").write_text(json.dumps(status, indent=2))
    summary = report(status, read_metrics(metrics_path), wall, run_dir, progress)
    summary.update(wall_budget_s=args.wall_budget, stopped_at_budget=budget_round,
                   first_task_at=status.get("first_task_at"),
                   aggregation=args.aggregation, aggregation_clip=args.aggregation_clip, adversaries=args.adversaries,
                   attack=f"{args.attack} x{args.attack_scale:g}" if args.adversaries else None)
    exported = None
    done = bool(status.get("finished")) or budget_round is not None
    if done and not args.no_export:
        exported = export_final_model(run_dir, str(args.model), env)
    summary["export"] = None if exported is None else str(exported)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if done and not args.no_export and exported is None:
        return 1
    return 0 if done else 1


def export_final_model(run_dir: Path, model_source: str, env: dict[str, str]) -> Path | None:
    """Export the last round into ``run_dir/export`` with ``edgefed-export``, which prints
    how to load it; None when it failed (its message is on stderr).

    It runs as a child process, as a user would run it: the exporter is a tool above the
    client and the coordinator's ledger, which the client package does not import."""
    out = run_dir / "export"
    print(f"exporting the final model to {out}")
    result = subprocess.run([sys.executable, "-m", "exporter.cli", str(run_dir / "ledger.db"), "--out", str(out),
                             "--model", model_source, "--force"], env=env, check=False)
    if result.returncode != 0:
        print(f"edgefed-local: the export failed; the ledger is intact, retry with: "
              f"edgefed-export {run_dir / 'ledger.db'} --model {model_source}", file=sys.stderr)
        return None
    return out


# How often /status is polled: a round's fingerprints are visible there only until each
# process reports the next round, which for a tiny model can be a second later.
POLL_INTERVAL_S = 0.25


def budget_round(status: Mapping[str, Any], wall_budget_s: float) -> int | None:
    """The first committed round whose commit came ``wall_budget_s`` or more after the
    first task was handed out; None while there is none."""
    first_task = status.get("first_task_at")
    if first_task is None:
        return None
    return min((entry["round"] for entry in status["rounds"] if entry["committed_at"] - first_task >= wall_budget_s),
               default=None)


def follow(processes: list[Process], port: int, rounds: int, metrics_path: Path, progress: RoundProgress,
           final_status_path: Path, *, wall_budget_s: float | None = None) -> dict[str, Any] | None:
    """Print progress until the coordinator exits, or until the round that used up
    ``wall_budget_s`` is held by every process (its status then says
    ``stopped_at_budget``); return the final status (the one the coordinator wrote on
    exit, else the last one polled), or None if a process failed."""
    coordinator = processes[0]
    last_status: dict[str, Any] | None = None
    last_line = ""
    plans_shown: set[str] = set()
    interactive = sys.stdout.isatty()
    while coordinator.popen.poll() is None:
        for process in processes[1:]:
            code = process.popen.poll()
            if code not in (None, 0):
                print(f"\n{process.name} exited with {code}:\n{process.log_path.read_text()[-1500:]}", file=sys.stderr)
                return None
        status = fetch_status(port)
        if status is not None:
            last_status = status
            progress.observe(status)
            clear = len(last_line) if interactive else 0
            for client in status.get("clients", []):  # each client's one-line plan, once: its mode and why
                if client.get("plan") and client["client_id"] not in plans_shown:
                    plans_shown.add(client["client_id"])
                    print("\r" + " " * clear + "\r" if clear else "", end="")
                    print(f"  {client['client_id']} plan: {client['plan']}")
                    clear, last_line = 0, ""
            if print_round_lines(progress, rounds, read_metrics(metrics_path), clear=clear):
                last_line = ""
            stop_round = None if wall_budget_s is None else budget_round(status, wall_budget_s)
            if stop_round is not None and progress.settled(stop_round):
                print_round_lines(progress, rounds, read_metrics(metrics_path), final=True,
                                  clear=len(last_line) if interactive else 0)
                print(f"  stopped after round {stop_round}: the wall budget of {wall_budget_s:g}s is used")
                return {**status, "stopped_at_budget": stop_round}
            open_round = status.get("open_round")
            if open_round and interactive:
                line = (f"  round {open_round['round']:>3}/{rounds}  "
                        f"training: {len(open_round['received'])}/{len(open_round['assigned'])} updates in")
                print("\r" + line.ljust(len(last_line)), end="", flush=True)
                last_line = line
        time.sleep(POLL_INTERVAL_S)
    if final_status_path.exists():
        # Taken after the coordinator waited for the last round's fingerprints.
        last_status = json.loads(final_status_path.read_text())
        progress.observe(last_status)
    print_round_lines(progress, rounds, read_metrics(metrics_path), final=True,
                      clear=len(last_line) if interactive else 0)
    return last_status


def print_round_lines(progress: RoundProgress, rounds: int, evals: list[dict[str, Any]], *, final: bool = False,
                      clear: int = 0) -> bool:
    """Print one line per committed round whose fingerprints are settled (every round when
    ``final``), in order; return whether anything was printed."""
    evals_by_round = {entry["round"]: entry for entry in evals}
    printed = False
    for round_number in sorted(r for r in progress.rounds if r > progress.printed_through):
        entry = progress.rounds[round_number]
        if not (final or progress.settled(round_number)):
            break  # keep the lines in round order
        previous = progress.rounds.get(round_number - 1)
        took = f"{entry['committed_at'] - previous['committed_at']:5.0f}s" if previous else " " * 6
        line = (f"  round {round_number:>3}/{rounds}  {took}  updates {entry['num_updates']}  "
                f"probe loss {_loss(entry['loss_before'])} -> {_loss(entry['loss_after'])}  "
                f"fingerprints agree: {progress.verdict(round_number).detail}")
        if entry.get("robust") is False:
            line += f"  (not robust: {entry.get('values_min')} values for some seed)"
        before = evals_by_round.get(round_number - 1)
        if before is not None:
            line += f"  (eval loss before it: {before['eval_loss']:.4f})"
        print(("\r" if clear else "") + line.ljust(clear))
        progress.printed_through = round_number
        clear, printed = 0, True
    return printed


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def round_rows(progress: RoundProgress, evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per committed round: losses, the bytes measured on the wire that round, how
    robustly it was aggregated, and whether every process reported the same model."""
    eval_by_round = {e["round"]: e for e in evals}
    rows = []
    uplink_total: int | None = 0
    downlink_total: int | None = 0
    for round_number in sorted(progress.rounds):
        entry = progress.rounds[round_number]
        up, down = entry["wire_bytes_up"], entry["wire_bytes_down"]
        # A round committed before this coordinator process started has no measurement,
        # so from there on a running total is unknown.
        uplink_total = None if uplink_total is None or up is None else uplink_total + up
        downlink_total = None if downlink_total is None or down is None else downlink_total + down
        ev = eval_by_round.get(round_number, {})
        verdict = progress.verdict(round_number)
        rows.append({"round": round_number, "updates": entry["num_updates"],
                     "probe_loss_before": entry["loss_before"], "probe_loss_after": entry["loss_after"],
                     "eval_loss": ev.get("eval_loss"), "rouge_l": ev.get("rouge_l"),
                     "exact_match": ev.get("exact_match"),
                     "wire_bytes_up": up, "wire_bytes_down": down,
                     "uplink_bytes_total": uplink_total, "downlink_bytes_total": downlink_total,
                     "values_min": entry["values_min"], "robust": entry["robust"],
                     "fingerprints_agree": verdict.agree, "fingerprints": verdict.detail,
                     "committed_at": entry["committed_at"]})
    return rows


def wire_figures(status: Mapping[str, Any], rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Bytes per training client per round, as measured at the coordinator's sockets
    (websocket frames, handshake, pings and close frames included; TCP/IP not).

    ``bytes_per_client_round``: uplink only (client -> coordinator: its update, its
    fingerprint, pongs), summed over the rounds and divided by the updates they committed.
    ``wire_bytes_per_client_round``: both directions, the mean over the training clients
    of each one's ``wire_bytes_per_round``.
    """
    measured = [row for row in rows if row["wire_bytes_up"] is not None and row["updates"]]
    updates = sum(row["updates"] for row in measured)
    up = sum(row["wire_bytes_up"] for row in measured) / updates if updates else None
    per_client = [c["wire_bytes_per_round"] for c in status["clients"]
                  if c["mode"] != OBSERVER_MODE and c["wire_bytes_per_round"] is not None]
    both = sum(per_client) / len(per_client) if per_client else None
    return {"bytes_per_client_round": up, "wire_bytes_per_client_round": both}


def report(status: dict[str, Any], evals: list[dict[str, Any]], wall: float, run_dir: Path,
           progress: RoundProgress) -> dict[str, Any]:
    """Print the final tables, write metrics.jsonl and the plot; return the summary figures."""
    rows = round_rows(progress, evals)
    wire = wire_figures(status, rows)
    base = next((e for e in evals if e["round"] == 0), None)
    with (run_dir / "metrics.jsonl").open("w", encoding="utf-8") as out:
        if base is not None:
            out.write(json.dumps({"round": 0, "eval_loss": base["eval_loss"], "rouge_l": base["rouge_l"],
                                  "exact_match": base["exact_match"], "uplink_bytes_total": 0,
                                  "downlink_bytes_total": 0}) + "\n")
        for row in rows:
            out.write(json.dumps(row) + "\n")

    print()
    print("wire bytes: websocket frames measured at the coordinator's sockets, summed over the clients "
          "that trained the round")
    print(f"{'round':>5}  {'updates':>7}  {'probe loss':>17}  {'eval loss':>9}  {'up (B)':>8}  {'down (B)':>8}"
          f"  {'uplink total':>12}")
    if base is not None:
        print(f"{0:>5}  {'':>7}  {'':>17}  {base['eval_loss']:>9.4f}  {'':>8}  {'':>8}  {0:>12}")
    for row in rows:
        ev = f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-"
        print(f"{row['round']:>5}  {row['updates']:>7}  {_loss(row['probe_loss_before']):>7} -> "
              f"{_loss(row['probe_loss_after']):<7}  {ev:>9}  {_count(row['wire_bytes_up']):>8}  "
              f"{_count(row['wire_bytes_down']):>8}  {_count(row['uplink_bytes_total']):>12}")
    print()
    print(f"{'client':<10} {'mode':<8} {'device':<6} {'budget':>8} {'round':>5} {'wire B/round':>12} {'up (B)':>8} "
          f"{'down (B)':>9} {'fingerprint':<18}")
    for client in status["clients"]:
        budget = client["device"].get("memory_budget_bytes")
        per_round = client["wire_bytes_per_round"]
        print(f"{client['client_id']:<10} {client['mode']:<8} {client['device']['device_type']:<6} "
              f"{(budget or 0) / 2**30:>6.1f}Gi {client['round']:>5} "
              f"{'-' if per_round is None else f'{per_round:.0f}':>12} {client['wire_bytes_up']:>8} "
              f"{client['wire_bytes_down']:>9} {str(client['fingerprint'])[:16]:<18}")
    print("(wire B/round: up + down per round it trained; up, down: its whole connection, handshake included)")
    final_round = status["round"]
    verdict = judge_fingerprints(progress.processes, {c["client_id"]: c["fingerprint"] for c in status["clients"]
                                                      if c["round"] == final_round})
    decoded = [e for e in evals if e.get("rouge_l") is not None]
    before = decoded[0] if decoded else None
    after = decoded[-1] if len(decoded) > 1 else None
    aggregation = status.get("aggregation") or {}
    summary = {
        "rounds": final_round, "wall_s": round(wall, 1), **wire,
        "eval_loss_before": evals[0]["eval_loss"] if evals else None,
        "eval_loss_after": evals[-1]["eval_loss"] if evals else None,
        "rouge_l_before": before["rouge_l"] if before else None, "rouge_l_after": after["rouge_l"] if after else None,
        "exact_match_before": before["exact_match"] if before else None,
        "exact_match_after": after["exact_match"] if after else None,
        "heldout_examples": evals[0]["examples"] if evals else 0,
        "fingerprints_agree": verdict.agree, "fingerprints": verdict.detail,
        "quorum": aggregation.get("quorum"),
        "modes": {c["client_id"]: c["mode"] for c in status["clients"] if c["mode"] != OBSERVER_MODE},
        "rounds_not_robust": sum(1 for row in rows if row["robust"] is False),
    }
    print()
    if evals:
        print(f"held-out ({summary['heldout_examples']} records): eval loss {summary['eval_loss_before']:.4f} -> "
              f"{summary['eval_loss_after']:.4f}", end="")
        if before and after:
            print(f"; Rouge-L {before['rouge_l']:.4f} -> {after['rouge_l']:.4f}; "
                  f"exact match {before['exact_match']:.3f} -> {after['exact_match']:.3f}", end="")
        print()
    up, both = wire["bytes_per_client_round"], wire["wire_bytes_per_client_round"]
    print(f"rounds: {final_round}  wall time: {wall:.0f}s  wire bytes per client per round: "
          f"{'-' if up is None else f'{up:.0f}'} up, {'-' if both is None else f'{both:.0f}'} up+down  "
          f"all clients hold the same model: {verdict.detail}")
    plot = plot_metrics(run_dir / "metrics.jsonl", run_dir / "eval_loss.png")
    print(f"metrics.jsonl, {plot.name if plot else 'no plot'}, summary.json, the ledger and every log are in {run_dir}")
    return summary


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def plot_metrics(metrics: Path, out: Path) -> Path | None:
    """Eval loss against rounds and against uplink bytes, side by side (PNG)."""
    rows = [r for r in read_metrics(metrics) if r.get("eval_loss") is not None]
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    by_round.plot([r["round"] for r in rows], [r["eval_loss"] for r in rows], marker="o")
    by_round.set(xlabel="round", ylabel="held-out loss", title="Held-out loss by round")
    measured = [r for r in rows if r.get("uplink_bytes_total") is not None]
    by_bytes.plot([r["uplink_bytes_total"] / 1024 for r in measured], [r["eval_loss"] for r in measured],
                  marker="o", color="tab:orange")
    by_bytes.set(xlabel="uplink KiB on the wire, all clients", ylabel="held-out loss",
                 title="Held-out loss by bytes sent")
    for axis in (by_round, by_bytes):
        axis.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())
