"""Beyond one machine: ``edgefed-sim`` on Ray with 1,000 virtual clients of SmolLM2-135M,
and what one coordinator process costs per connected client.

1. **The simulation** (``edgefed-sim``, a local single-node Ray): 1,000 virtual clients,
   a Dirichlet(0.5) split of the shipped records, half 0.75 GiB and half 4 GiB devices
   (MeZO and ferret by the chooser), 5% online per round with churn 0.2, for ``--rounds``
   rounds; the real coordinator and evaluator as processes. Reported: virtual clients,
   model copies (actors), peak RSS (per actor, per node), rounds per hour, held-out loss
   before and after, whether every round's fingerprints agree, the coordinator's peak RSS.
2. **The coordinator under connected clients** (no model anywhere): N observers connect,
   say hello and report a fingerprint after every commit, while one scripted client
   trains every round with canned scalars. For N in ``--sessions``: the coordinator's
   RSS, the rounds it commits per second (each commit broadcast to all N, each answered
   by a fingerprint), and the bytes per round. These measured points are what the
   README's scale note extrapolates from; the clients run in this one process, so on 2
   cores they compete with the coordinator and the rates are a floor.

    python bench/scale.py            # ~15 minutes
    python bench/scale.py --quick    # 200 clients, 3 rounds; sessions 200, 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench._results import write_result  # noqa: E402

BIN = Path(sys.executable).parent
HASH = "cd" * 32
DIGEST = "0" * 64


def run_simulation(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    command = [str(BIN / "edgefed-sim"), "--clients", str(args.clients), "--availability", str(args.availability),
               "--churn", "0.2", "--rounds", str(args.rounds), "--clients-per-round", str(args.clients_per_round),
               "--actors", "2", "--run-dir", str(run_dir), "--log-level", "WARNING", "--seed", "0"]
    print("$ " + " ".join(command[1:]).replace(str(BIN) + "/", ""), flush=True)
    started = time.monotonic()
    process = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    print(process.stdout)
    if process.returncode != 0:
        raise SystemExit(f"edgefed-sim failed:\n{process.stderr[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_s"] = round(time.monotonic() - started, 1)
    return summary


async def load_coordinator(sessions: int, rounds: int) -> dict[str, Any]:
    """A coordinator process with ``sessions`` observers and one scripted trainer."""
    from websockets.asyncio.client import connect

    from protocol import codec
    from protocol.messages import (Challenge, DeviceProfile, Fingerprint, Hello, RoundCommit, RoundTask, Update,
                                   Welcome)

    device = DeviceProfile(device_type="cpu", device_name="bench", accelerator_total_bytes=0, accelerator_free_bytes=0,
                           host_total_bytes=1 << 30, host_free_bytes=1 << 29, memory_budget_bytes=None)
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        coordinator = subprocess.Popen(
            [str(BIN / "edgefed-coordinator"), "--model-hash", HASH, "--port", "0", "--port-file", str(port_file),
             "--ledger-path", str(Path(tmp) / "ledger.db"), "--rounds", "0", "--min-clients", "1",
             "--clients-per-round", "1", "--quorum", "1", "--local-steps", "64", "--seed-pool-size", "4096",
             "--max-connections-per-address", str(sessions + 64), "--max-connections-in-handshake",
             str(sessions + 64), "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not port_file.exists():
                await asyncio.sleep(0.05)
            url = f"ws://127.0.0.1:{port_file.read_text()}"
            committed: list[float] = []

            async def join(client_id: str, mode: str) -> Any:
                ws = await connect(url, compression=None, open_timeout=60, ping_interval=None)
                assert isinstance(codec.decode(await ws.recv()), Challenge)
                await ws.send(codec.encode(Hello(protocol_version=(2, 0), client_id=client_id, device=device,
                                                 mode=mode, model_hash=HASH, last_round=0, table_digest=None,
                                                 plan=None, public_key=None, signature=None)))
                welcome = codec.decode(await ws.recv())
                assert isinstance(welcome, Welcome)
                await ws.send(codec.encode(Fingerprint(round=welcome.last_committed_round, fingerprint="a" * 64,
                                                       table_digest=DIGEST)))
                return ws

            async def observe(ws: Any) -> None:
                async for frame in ws:
                    message = codec.decode(frame)
                    if isinstance(message, RoundCommit):
                        await ws.send(codec.encode(Fingerprint(round=message.round, fingerprint="a" * 64,
                                                               table_digest=DIGEST)))

            async def train(ws: Any) -> None:
                async for frame in ws:
                    message = codec.decode(frame)
                    if isinstance(message, RoundTask):
                        await ws.send(codec.encode(Update(
                            round=message.round, attempt=message.attempt, client_id="trainer",
                            pairs=tuple((seed, 0.5) for seed in message.seeds), num_examples=4, loss_before=2.0,
                            loss_after=1.9, nonce=os.urandom(16), signature=None)))
                    elif isinstance(message, RoundCommit):
                        committed.append(time.monotonic())
                        await ws.send(codec.encode(Fingerprint(round=message.round, fingerprint="a" * 64,
                                                               table_digest=DIGEST)))

            joined_at = time.monotonic()
            observers = []
            for start in range(0, sessions, 100):  # in batches: the handshake cap is not the subject here
                observers += await asyncio.gather(*(join(f"obs-{i}", "observe")
                                                    for i in range(start, min(sessions, start + 100))))
            join_s = time.monotonic() - joined_at
            listeners = [asyncio.create_task(observe(ws)) for ws in observers]
            await asyncio.sleep(1.0)
            rss_idle = _rss_mb(coordinator.pid)
            trainer = await join("trainer", "mezo")
            training = asyncio.create_task(train(trainer))
            while len(committed) < rounds + 1:
                await asyncio.sleep(0.01)
                if coordinator.poll() is not None:
                    raise SystemExit("the coordinator died")
            span = committed[-1] - committed[0]
            rss_peak = _hwm_mb(coordinator.pid)
            for task in (*listeners, training):
                task.cancel()
            for ws in (*observers, trainer):
                await ws.close()
            return {"sessions": sessions, "join_s": round(join_s, 2),
                    "coordinator_rss_mb_idle": rss_idle, "coordinator_rss_mb_peak": rss_peak,
                    "rounds_per_s": round(rounds / span, 2),
                    "ms_per_round": round(1000 * span / rounds, 1)}
        finally:
            coordinator.terminate()
            coordinator.wait(30)


def round_at_scale(updates: int, seeds: int, rounds: int) -> dict[str, Any]:
    """The coordinator's compute for one round of ``updates`` updates of ``seeds`` scalars
    each, measured on its own code: the per-seed robust aggregation, and the ledger
    commit (coefficients + every contribution's pairs), and the ledger's growth per round."""
    import random
    import statistics

    from coordinator.aggregate import AggregationRule, aggregate_with_report
    from coordinator.ledger import Contribution, Ledger
    from protocol.messages import Update
    from protocol.seeds import pool_seed

    rng = random.Random(0)
    aggregate_s, commit_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.db"
        with Ledger(str(path)) as ledger:
            for number in range(1, rounds + 1):
                round_seeds = [pool_seed(7, (number * seeds + i) % 4096) for i in range(seeds)]
                batch = [Update(round=number, attempt=0, client_id=f"c{j}",
                                pairs=tuple((seed, rng.gauss(0.0, 1.0)) for seed in round_seeds), num_examples=4,
                                loss_before=2.0, loss_after=1.9, nonce=os.urandom(16), signature=None)
                         for j in range(updates)]
                started = time.perf_counter()
                report = aggregate_with_report(round_seeds, batch, 1e-4, AggregationRule())
                aggregate_s.append(time.perf_counter() - started)
                contributions = [Contribution(u.client_id, u.num_examples, u.loss_before, u.loss_after,
                                              tuple(u.pairs)) for u in batch]
                started = time.perf_counter()
                ledger.commit_round(number, 0, report.coefficients, contributions)
                commit_s.append(time.perf_counter() - started)
        wal = path.with_name(path.name + "-wal")
        size = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    return {"updates": updates, "seeds": seeds, "rounds": rounds,
            "aggregate_s_median": round(statistics.median(aggregate_s), 3),
            "commit_s_median": round(statistics.median(commit_s), 3),
            "ledger_bytes_per_round": round(size / rounds),
            "ledger_bytes_per_contributed_scalar": round(size / (rounds * updates * seeds), 1)}


def _rss_mb(pid: int) -> float | None:
    return _proc_field(pid, "VmRSS:")


def _hwm_mb(pid: int) -> float | None:
    return _proc_field(pid, "VmHWM:")


def _proc_field(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--availability", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients-per-round", type=int, default=4)
    parser.add_argument("--sessions", default="500,1000,2000", help="observer counts for part 2")
    parser.add_argument("--load-rounds", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-sim", action="store_true", help="part 2 only")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.sessions, args.load_rounds = 200, 3, "200,500", 10
    details: dict[str, Any] = {"settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="edgefed-scale-") as tmp:
        summary = None if args.skip_sim else run_simulation(args, Path(tmp) / "sim")
    details["simulation"] = summary
    print("== the coordinator under connected clients (no model; clients in this process) ==")
    print(f"{'sessions':>9s} {'join s':>7s} {'RSS MiB':>8s} {'rounds/s':>9s} {'ms/round':>9s}")
    points = []
    for sessions in (int(s) for s in args.sessions.split(",")):
        point = asyncio.run(load_coordinator(sessions, args.load_rounds))
        points.append(point)
        print(f"{sessions:9d} {point['join_s']:7.1f} {point['coordinator_rss_mb_idle'] or 0:8.1f} "
              f"{point['rounds_per_s']:9.2f} {point['ms_per_round']:9.1f}")
    details["coordinator_load"] = points
    print("== one round's aggregation and ledger commit at scale (the coordinator's own code) ==")
    scale_rounds = [round_at_scale(updates, 1024, 3) for updates in ((10, 100) if args.quick else (10, 100, 1000))]
    for point in scale_rounds:
        print(f"  {point['updates']:5d} updates x {point['seeds']} seeds: aggregate {point['aggregate_s_median']:.3f} s, "
              f"commit {point['commit_s_median']:.3f} s, ledger +{point['ledger_bytes_per_round'] / 2**20:.2f} MiB "
              f"({point['ledger_bytes_per_contributed_scalar']} B per scalar)")
    details["round_at_scale"] = scale_rounds
    # What one more connected client costs the coordinator: the slope between the
    # smallest and the largest point (the intercept is the process itself).
    low, high = points[0], points[-1]
    marginal_kib = ((high["coordinator_rss_mb_idle"] - low["coordinator_rss_mb_idle"]) * 1024
                    / (high["sessions"] - low["sessions"])) if len(points) > 1 else None
    marginal_ms = ((high["ms_per_round"] - low["ms_per_round"]) / (high["sessions"] - low["sessions"])
                   if len(points) > 1 else None)
    print(f"per connected client: {marginal_kib:.1f} KiB of coordinator RSS, {marginal_ms:.3f} ms per round"
          if marginal_kib is not None else "")
    line = {key: (summary or {}).get(key) for key in ("virtual_clients", "model_copies", "peak_rss_mb",
                                                      "rounds_per_hour", "eval_loss_before", "eval_loss_after",
                                                      "fingerprints_agree", "coordinator_rss_mb")}
    line["peak_rss_mb_per_node"] = (summary or {}).get("peak_rss_mb_per_node")
    line["coordinator_ms_per_round_at_sessions"] = {p["sessions"]: p["ms_per_round"] for p in points}
    line["coordinator_kib_per_session"] = None if marginal_kib is None else round(marginal_kib, 1)
    line["coordinator_ms_per_round_per_session"] = None if marginal_ms is None else round(marginal_ms, 4)
    line["round_at_scale"] = {p["updates"]: {"aggregate_s": p["aggregate_s_median"], "commit_s": p["commit_s_median"],
                                             "ledger_mib": round(p["ledger_bytes_per_round"] / 2**20, 2)}
                              for p in scale_rounds}
    line["ledger_bytes_per_round"] = (round(summary["ledger_bytes"] / summary["rounds"])
                                      if summary and summary.get("ledger_bytes") and summary.get("rounds") else None)
    path = write_result("scale-quick" if args.quick else "scale", line, details)
    print(f"full result: {path}")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
