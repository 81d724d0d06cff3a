"""``edgefed-sim``: thousands of virtual clients on Ray against the real coordinator.

    edgefed-sim --clients 1000 --availability 0.05 --rounds 5          # this machine
    ray start --head                                                   # a cluster:
    ray start --address HEAD:6379                                      #   on each other node
    edgefed-sim --clients 10000 --address HEAD:6379 --actors 16        # from the head

It starts a coordinator (``edgefed-coordinator``, real websockets; or joins one given
with ``--url``), an evaluator (``edgefed-eval``, an observer scoring the held-out
records each round) and ``--actors`` Ray actors. Each actor holds ONE model copy and
plays its share of the virtual clients (:class:`simulation.host.SimHost`): the number of
model copies is bounded by the actors, never by the clients. Each client's simulated
memory budget drives the chooser, and actors are given clients of one mode each (a mode
prepares the model its own way), so there is at least one actor per mode the population
needs. Progress (rounds, online clients, refusals, eval loss) is read from the
coordinator's ``/status`` as it runs; its page (``/``) shows the same live.

The population (data split, device classes, availability and churn, stragglers,
attackers) is fixed by ``--seed``: the same seed gives the same clients, schedule,
latencies and attackers, and the coordinator's seed draws follow its pool key, which is
derived from it too. Which online clients the coordinator picks depends on who is ready
when a round opens, i.e. on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from websockets.exceptions import InvalidHandshake

from edge_client.daemon import plan_training
from edge_client.data import DataError
from edge_client.local_federation import SHIPPED_DATA, build_parser as local_parser, coordinator_command
from edge_client.model import ModelLoadError, resolve_model
from edge_client.replica import federation_task
from profiles.chooser import ModeUnavailable, NoModeFits
from profiles.estimator import ModelShape
from protocol import codec
from protocol.messages import Challenge, FederationInfo
from simulation.population import PopulationError, PopulationSettings, VirtualClient, build_population, parse_device_mix

__all__ = ["main"]

logger = logging.getLogger("edgefed-sim")
BIN = Path(sys.executable).parent
STATUS_EVERY_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefed-sim", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    population = parser.add_argument_group("population")
    population.add_argument("--clients", type=int, default=1000, help="virtual clients (default 1000)")
    population.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the non-IID split")
    population.add_argument("--device-mix", default="0.75GiB:0.5,4GiB:0.5",
                            help="device classes and shares: memory sizes or device-table names "
                                 "(edgefed-profiles), e.g. '0.75GiB:0.3,Jetson Orin 8 GiB:0.7'")
    population.add_argument("--availability", type=float, default=0.05, help="share of clients online per round")
    population.add_argument("--churn", type=float, default=0.2, help="chance an online client leaves at a round")
    population.add_argument("--latency-median-s", type=float, default=0.0, help="stragglers: median extra delay")
    population.add_argument("--latency-sigma", type=float, default=0.5, help="stragglers: lognormal sigma")
    population.add_argument("--attackers", type=float, default=0.0, help="share of poisoning clients")
    population.add_argument("--attack", default="sign_flip", help="sign_flip or scale (edge_client/adversary.py)")
    population.add_argument("--attack-scale", type=float, default=1.0)
    population.add_argument("--seed", type=int, default=0, help="the population's and the seed pool's seed")
    federation = parser.add_argument_group("federation")
    federation.add_argument("--model", default="smollm2-135m")
    federation.add_argument("--data", type=Path, default=SHIPPED_DATA, help="JSONL records (with a family field for the split)")
    federation.add_argument("--heldout", type=int, default=64, help="records no client holds (the evaluator's)")
    federation.add_argument("--rounds", type=int, default=5)
    federation.add_argument("--clients-per-round", type=int, default=10)
    federation.add_argument("--quorum", type=int, default=None)
    federation.add_argument("--min-clients", type=int, default=None,
                            help="ready clients a round waits for (default: --clients-per-round)")
    federation.add_argument("--deadline-s", type=float, default=300.0)
    federation.add_argument("--scope", default="lora", choices=("lora", "full"))
    federation.add_argument("--url", default=None, help="join this coordinator instead of starting one")
    federation.add_argument("--no-eval", action="store_true", help="run no evaluator")
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--address", default=None, help="a Ray cluster (ray start); default: a local Ray")
    ray_group.add_argument("--actors", type=int, default=None, help="model copies (default: the CPUs, >= modes)")
    ray_group.add_argument("--cpus-per-actor", type=float, default=1.0)
    ray_group.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--run-dir", type=Path, default=None, help="logs, ledger and summary (default runs/sim-<time>)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--log-level", default="INFO")
    return parser


def fetch_status(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSONL file's objects, as the split reads them (their ``family`` field included).

    Raises:
        DataError: a line is not a JSON object (the message names it).
    """
    records = []
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise DataError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            records.append(record)
    return records


def read_federation(url: str) -> FederationInfo:
    """The federation's settings, from the challenge of a connection that then leaves."""
    from websockets.sync.client import connect

    with connect(url, compression=None, open_timeout=30) as connection:
        challenge = codec.decode(connection.recv(timeout=30))  # type: ignore[arg-type]
    if not isinstance(challenge, Challenge):
        raise RuntimeError(f"{url} did not open with a challenge")
    return challenge.federation


def assign_modes(clients: list[VirtualClient], shape: ModelShape, federation: FederationInfo
                 ) -> tuple[dict[str, list[VirtualClient]], list[str]]:
    """Each client's mode, as its chooser would pick it for its simulated budget; and the
    clients whose budget holds no mode (they never join, as such a device would not)."""
    from simulation.host import simulated_report

    by_mode: dict[str, list[VirtualClient]] = defaultdict(list)
    unfit: list[str] = []
    decided: dict[int, str | None] = {}
    for client in clients:
        budget = client.device.budget_bytes
        if budget not in decided:
            try:
                decided[budget] = plan_training(shape, federation_task(federation),
                                                simulated_report(client.device.name, budget), copies="memory",
                                                rebase_every=federation.rebase_every, mode="auto",
                                                block_seeds=federation.block_seeds).mode
            except (NoModeFits, ModeUnavailable):
                decided[budget] = None
        mode = decided[budget]
        if mode is None:
            unfit.append(client.client_id)
        else:
            by_mode[mode].append(client)
    return dict(by_mode), unfit


def share_actors(by_mode: dict[str, list[VirtualClient]], actors: int) -> list[tuple[str, list[VirtualClient]]]:
    """One actor per mode at least; the rest by client count; clients dealt round-robin."""
    modes = sorted(by_mode, key=lambda m: -len(by_mode[m]))
    counts = {mode: 1 for mode in modes}
    for _ in range(max(0, actors - len(modes))):
        mode = max(modes, key=lambda m: len(by_mode[m]) / counts[m])
        counts[mode] += 1
    return [(mode, by_mode[mode][i::counts[mode]]) for mode in modes for i in range(counts[mode])]


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("edge_client.splits").setLevel(logging.ERROR)  # one line per client that got a record moved
    run_dir = args.run_dir or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import ray
    except ImportError:
        print("edgefed-sim: Ray is not installed (pip install -e '.[sim]')", file=sys.stderr)
        return 2
    try:
        settings = PopulationSettings(
            clients=args.clients, alpha=args.alpha, device_mix=parse_device_mix(args.device_mix),
            availability=args.availability, churn=args.churn, latency_median_s=args.latency_median_s,
            latency_sigma=args.latency_sigma, attackers=args.attackers, attack=args.attack,
            attack_scale=args.attack_scale, heldout=args.heldout, seed=args.seed)
        records = read_records(args.data)
        clients, heldout = build_population(records, settings)
        model_dir = resolve_model(args.model, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    except (PopulationError, DataError, ModelLoadError, OSError) as error:
        print(f"edgefed-sim: {error}", file=sys.stderr)
        return 2
    heldout_path = run_dir / "heldout.jsonl"
    heldout_path.write_text("".join(json.dumps(r) + "\n" for r in heldout))
    print(f"[1/4] population: {len(clients)} clients (Dirichlet alpha {args.alpha}), "
          f"{sum(c.attacker for c in clients)} attackers, devices "
          + ", ".join(f"{d.name} {d.share:.0%}" for d in settings.device_mix)
          + f"; ~{args.availability:.0%} online per round, churn {args.churn}")

    processes: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    url = args.url
    coordinator = None
    try:
        if url is None:
            model_hash = subprocess.run([str(BIN / "edgefed-client"), "--print-model-hash", "--model", str(model_dir)],
                                        capture_output=True, text=True, check=True).stdout.split()[-1]
            local = local_parser().parse_args(["--model", args.model, "--rounds", str(args.rounds), "--scope",
                                               args.scope, "--clients", str(args.clients_per_round),
                                               "--pool-key", str(args.seed)]
                                              + (["--quorum", str(args.quorum)] if args.quorum else []))
            port_file = run_dir / "port"
            command = coordinator_command(local, model_hash, run_dir, port_file) + [
                "--min-clients", str(args.min_clients or args.clients_per_round),
                "--deadline-s", str(args.deadline_s), "--commit-wait-s", "10",
                # every virtual client connects from this machine's address
                "--max-connections-per-address", str(args.clients + 64)]
            coordinator = subprocess.Popen(command, stdout=(run_dir / "coordinator.log").open("wb"),
                                           stderr=subprocess.STDOUT, env=env)
            processes.append(coordinator)
            deadline = time.monotonic() + 60
            while not port_file.exists() and coordinator.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if not port_file.exists():
                print(f"edgefed-sim: the coordinator did not start; see {run_dir / 'coordinator.log'}", file=sys.stderr)
                return 2
            url = f"ws://127.0.0.1:{port_file.read_text()}"
        status_url = url.replace("ws://", "http://").replace("wss://", "https://").rstrip("/") + "/status"
        try:
            federation = read_federation(url)
        except (OSError, TimeoutError, RuntimeError, InvalidHandshake) as error:
            print(f"edgefed-sim: cannot reach the coordinator at {url}: {error}", file=sys.stderr)
            return 2
        from transformers import AutoConfig

        shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir).to_dict())
        by_mode, unfit = assign_modes(clients, shape, federation)
        if not by_mode:
            print("edgefed-sim: no client's budget holds any mode; give the device mix larger budgets", file=sys.stderr)
            return 2
        actors_wanted = args.actors or max(1, int((os.cpu_count() or 1) // args.cpus_per_actor))
        plan = share_actors(by_mode, actors_wanted)
        print(f"[2/4] coordinator {url} (page {status_url[:-len('status')]}); modes by budget: "
              + ", ".join(f"{mode} {len(group)}" for mode, group in by_mode.items())
              + (f", {len(unfit)} fit no mode and stay away" if unfit else "")
              + f"; {len(plan)} actors (model copies)")
        if not args.no_eval:
            processes.append(subprocess.Popen(
                [str(BIN / "edgefed-eval"), "--url", url, "--client-id", "evaluator", "--model", str(model_dir),
                 "--heldout", str(heldout_path), "--loss-only", "--metrics", str(run_dir / "eval.jsonl")],
                stdout=(run_dir / "evaluator.log").open("wb"), stderr=subprocess.STDOUT, env=env))
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False,
                 **({} if args.address else {"num_cpus": max(os.cpu_count() or 1, len(plan) * args.cpus_per_actor)}))
        from simulation.ray_host import HostActor

        actors = [HostActor.options(num_cpus=args.cpus_per_actor, num_gpus=args.gpus_per_actor).remote(
                      url=url, model=str(model_dir), mode=mode, clients=group, cache_dir=args.cache_dir,
                      final_round=args.rounds if args.url is None else 0, threads=max(1, int(args.cpus_per_actor)))
                  for mode, group in plan]
        started = time.monotonic()
        pending = [actor.run.remote() for actor in actors]
        print(f"[3/4] running; every {STATUS_EVERY_S:.0f} s what the coordinator sees:")
        coordinator_mb = 0.0
        last_line = ""
        results: list[Any] = []
        while pending:
            done, pending = ray.wait(pending, timeout=STATUS_EVERY_S)
            results += ray.get(done)
            if coordinator is not None:
                coordinator_mb = max(coordinator_mb, _vm_hwm_mb(coordinator.pid) or 0.0)
            status = fetch_status(status_url)
            if status is None:
                continue
            online = sum(1 for c in status["clients"] if c["mode"] != "observe")
            refusals = sum(sum(c["refusals"].values()) for c in status["clients"])
            evals = [r["eval_loss"] for r in status["rounds"] if r.get("eval_loss") is not None]
            line = (f"  round {status['round']}/{status['rounds_total'] or '-'}  online {online:5d}  "
                    f"refusals {refusals}  eval loss {evals[-1]:.4f}" if evals else
                    f"  round {status['round']}/{status['rounds_total'] or '-'}  online {online:5d}  "
                    f"refusals {refusals}")
            if line != last_line:
                print(f"{line}  ({time.monotonic() - started:.0f} s)", flush=True)
                last_line = line
        elapsed = time.monotonic() - started
        for process in processes[1:] + processes[:1]:
            try:
                process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                process.terminate()
        final = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else \
            fetch_status(status_url)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - shutting down what may never have started
            pass
    summary = summarise(args, clients, plan, results, final, run_dir, elapsed, coordinator_mb, unfit)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("[4/4] done:")
    for key, value in summary.items():
        if key != "actors":
            print(f"  {key:28s} {value}")
    print(json.dumps({key: summary[key] for key in ("virtual_clients", "model_copies", "peak_rss_mb",
                                                    "rounds_per_hour", "eval_loss_before", "eval_loss_after",
                                                    "fingerprints_agree", "coordinator_rss_mb")}))
    return 0


def summarise(args: argparse.Namespace, clients: list[VirtualClient], plan: list[tuple[str, list[VirtualClient]]],
              results: list[dict[str, Any]], final: dict[str, Any] | None, run_dir: Path, elapsed: float,
              coordinator_mb: float, unfit: list[str]) -> dict[str, Any]:
    rounds = final["rounds"] if final else []
    committed = [r for r in rounds if r.get("committed_at")]
    span = (committed[-1]["committed_at"] - final["first_task_at"]) if committed and final and final.get(
        "first_task_at") else None
    evals = []
    if (run_dir / "eval.jsonl").exists():
        evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    per_node: dict[str, float] = Counter()
    for result in results:
        per_node[result["node"]] += result["peak_rss_bytes"] / 2**20
    totals: Counter[str] = Counter()
    for result in results:
        totals.update({k: v for k, v in result.items() if isinstance(v, int) and k not in ("peak_rss_bytes", "round",
                                                                                            "clients")})
    return {
        "virtual_clients": len(clients), "model_copies": len(plan), "unfit_clients": len(unfit),
        "peak_rss_mb": round(max((r["peak_rss_bytes"] for r in results), default=0) / 2**20, 1),
        "peak_rss_mb_per_node": {node: round(mb, 1) for node, mb in per_node.items()},
        "rounds": len(committed), "seconds": round(elapsed, 1),
        "rounds_per_hour": round(len(committed) / span * 3600, 1) if span else None,
        "eval_loss_before": evals[0]["eval_loss"] if evals else None,
        "eval_loss_after": evals[-1]["eval_loss"] if len(evals) > 1 else None,
        "fingerprints_agree": bool(committed) and all(r["fingerprints"] == 1 for r in committed),
        "coordinator_rss_mb": round(coordinator_mb, 1) if coordinator_mb else None,
        # The ledger's size on disk (SQLite, WAL checkpointed at exit): for the growth per year.
        "ledger_bytes": (run_dir / "ledger.db").stat().st_size if (run_dir / "ledger.db").exists() else None,
        "updates_sent": totals["updates_sent"], "attacks_sent": totals["attacks_sent"],
        "connects": totals["connects"], "went_offline": totals["went_offline"],
        "actors": results,
    }


if __name__ == "__main__":
    sys.exit(main())
