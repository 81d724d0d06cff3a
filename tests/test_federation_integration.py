"""A real federation: a coordinator process and client processes on 127.0.0.1.

Real websockets, real msgpack, real SQLite, a tiny randomly initialised Llama. The
coordinator is SIGKILLed mid-run and restarted; a late client joins and catches up.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edge_client.model import base_weights_hash, load_model
from edge_client.tiny import make_tiny_llama

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def write_data(path: Path, offset: int, count: int = 40) -> Path:
    with path.open("w") as out:
        for i in range(offset, offset + count):
            a, b = i % 17, (i * 7) % 13
            out.write(json.dumps({"instruction": f"What is {a} plus {b}?", "response": f"{a + b}"}) + "\n")
    return path


class Federation:
    def __init__(self, tmp: Path, *, rounds: int, rebase_every: int, extra: list[str] | None = None) -> None:
        self.tmp = tmp
        self.model_dir = make_tiny_llama(tmp / "tiny")
        model, _ = load_model(self.model_dir)
        self.model_hash = base_weights_hash(model)
        self.ledger = tmp / "ledger.db"
        self.port_file = tmp / "port"
        self.rounds = rounds
        self.rebase_every = rebase_every
        self.extra = extra or []
        self.coordinator: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}
        self.port: int | None = None
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "EDGEFED_THREADS": "1",
                    "EDGEFED_PERTURB_BACKEND": "eager"}

    def start_coordinator(self, port: int = 0, min_clients: int = 3) -> None:
        self.port_file.unlink(missing_ok=True)
        log = (self.tmp / "coordinator.log").open("a")
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "--model-hash", self.model_hash, "--model-name", "tiny",
             "--ledger-path", str(self.ledger), "--port", str(port), "--port-file", str(self.port_file),
             "--rounds", str(self.rounds), "--rebase-every", str(self.rebase_every), "--seed-pool-size", "64",
             "--local-steps", "4", "--batch-size", "2", "--max-seq-len", "96", "--learning-rate", "1e-3",
             "--epsilon", "1e-3", "--clients-per-round", "3", "--quorum", "2", "--min-clients", str(min_clients),
             "--deadline-s", "60", "--commit-wait-s", "5", *self.extra],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while not self.port_file.exists():
            assert self.coordinator.poll() is None, self.log("coordinator")
            assert time.time() < deadline, "coordinator did not start"
            time.sleep(0.1)
        self.port = int(self.port_file.read_text())

    def start_client(self, name: str, data_offset: int, budget: str | None = None) -> None:
        data = write_data(self.tmp / f"{name}.jsonl", data_offset)
        log = (self.tmp / f"{name}.log").open("a")
        self.clients[name] = subprocess.Popen(
            [sys.executable, "-m", "edge_client.cli", "--url", f"ws://127.0.0.1:{self.port}", "--client-id", name,
             "--data", str(data), "--model", str(self.model_dir), "--device", "cpu", "--copies", "memory",
             "--memory-budget", budget or f"{data_offset + 1}GiB"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=5) as response:
            return json.loads(response.read())

    def committed_rounds(self) -> int:
        if not self.ledger.exists():
            return 0
        with sqlite3.connect(self.ledger) as db:
            try:
                return db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()[0]
            except sqlite3.OperationalError:
                return 0

    def wait_for_round(self, target: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while self.committed_rounds() < target:
            if time.time() > deadline:
                pytest.fail(f"round {target} not committed in {timeout}s\n" + self.log("coordinator"))
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in [*self.clients.values(), self.coordinator]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.clients.values(), self.coordinator]:
            if proc is not None:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def ledger_rows(path: Path) -> tuple[list[tuple], list[tuple], dict[int, dict[str, str]]]:
    with sqlite3.connect(path) as db:
        rounds = db.execute("SELECT round, num_updates FROM rounds ORDER BY round").fetchall()
        coefficients = db.execute("SELECT round, seed, coefficient FROM coefficients ORDER BY round, position").fetchall()
        fps: dict[int, dict[str, str]] = {}
        for round_number, client, fingerprint in db.execute("SELECT round, client_id, fingerprint FROM fingerprints"):
            fps.setdefault(round_number, {})[client] = fingerprint
    return rounds, coefficients, fps


@pytest.mark.parametrize("rebase_every, scope", [(3, "full"), (1, "lora")])
def test_federation_survives_coordinator_kill_and_late_client_catches_up(tmp_path, rebase_every, scope):
    fed = Federation(tmp_path, rounds=7, rebase_every=rebase_every, extra=["--scope", scope])
    try:
        fed.start_coordinator()
        for index, name in enumerate(["alpha", "beta", "gamma"]):
            fed.start_client(name, index * 40)
        fed.wait_for_round(3)
        status = fed.status()
        assert {c["client_id"] for c in status["clients"]} == {"alpha", "beta", "gamma"}
        assert all(c["mode"] == "mezo" and c["device"]["device_type"] == "cpu" for c in status["clients"])

        # SIGKILL the coordinator mid-run: nothing committed may be lost.
        before = fed.committed_rounds()
        rows_before, coefficients_before, _ = ledger_rows(fed.ledger)
        fed.coordinator.send_signal(signal.SIGKILL)
        fed.coordinator.wait(10)
        # Restarted, it waits for four clients: the latecomer must catch up before round 4+.
        fed.start_coordinator(port=fed.port, min_clients=4)
        rows_after, coefficients_after, _ = ledger_rows(fed.ledger)
        assert rows_after[:before] == rows_before[:before]
        assert coefficients_after[: len(coefficients_before)] == coefficients_before

        fed.start_client("latecomer", 200)  # joins after >= 3 committed rounds and must catch up
        fed.wait_for_round(7)
        deadline = time.time() + 120
        while fed.coordinator.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # the coordinator exits once the last fingerprints are in
        assert fed.coordinator.returncode == 0, fed.log("coordinator")
    finally:
        fed.stop()

    rounds, coefficients, fingerprints = ledger_rows(fed.ledger)
    assert [r for r, _ in rounds] == list(range(1, 8))
    assert all(num_updates >= 2 for _, num_updates in rounds)
    per_round: dict[int, list[int]] = {}
    for round_number, seed, coefficient in coefficients:
        per_round.setdefault(round_number, []).append(seed)
        assert coefficient == coefficient and abs(coefficient) < 1.0
    assert all(len(seeds) == 4 and len(set(seeds)) == 4 for seeds in per_round.values())
    # Every client that reported a round agrees on its fingerprint, the latecomer included.
    final = fingerprints[7]
    assert set(final) == {"alpha", "beta", "gamma", "latecomer"}, fed.log("latecomer")
    assert len(set(final.values())) == 1
    for round_number, reports in fingerprints.items():
        assert len(set(reports.values())) == 1, (round_number, reports)
    assert "caught up to round" in fed.log("latecomer")


def test_edgefed_local_runs_a_whole_federation_and_reports(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEFED_PERTURB_BACKEND": "eager"}
    result = subprocess.run(
        [sys.executable, "-m", "edge_client.local_federation", "--model", str(model_dir), "--clients", "3",
         "--rounds", "2", "--max-seq-len", "200", "--local-steps", "3", "--learning-rate", "1e-3", "--heldout", "8",
         "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "all clients hold the same model: yes" in result.stdout
    status = json.loads((run_dir / "status.json").read_text())
    assert status["round"] == 2 and status["finished"]
    trainers = [c for c in status["clients"] if c["mode"] == "mezo"]
    budgets = sorted(c["device"]["memory_budget_bytes"] for c in trainers)
    assert budgets == [2 * 2**30, 4 * 2**30, 8 * 2**30]
    # each trainer chose its mode and batch for the announced task and said why
    for client in trainers:
        budget = client["device"]["memory_budget_bytes"] / 2**30
        assert client["plan"].startswith("mezo (zeroth-order), batch 4/4 x 200 tokens"), client["plan"]
        assert f"{budget:.2f} GiB set by the user - 10% headroom" in client["plan"]
    # the evaluator (an observer) follows the same ledger: same fingerprint, never trained
    assert [c["mode"] for c in status["clients"] if c not in trainers] == ["observe"]
    assert len({c["fingerprint"] for c in status["clients"]}) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["fingerprints_agree"]
    assert 0 < summary["bytes_per_client_round"] < 2000  # an update and a fingerprint, framing included
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(m["eval_loss"] > 0 for m in metrics)
    assert summary["eval_loss_before"] == metrics[0]["eval_loss"]
    assert summary["eval_loss_after"] == metrics[-1]["eval_loss"]
    assert (run_dir / "eval_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heldout = {line for line in (run_dir / "heldout.jsonl").read_text().splitlines()}
    for index in range(3):
        assert not heldout & set((run_dir / f"client-{index}.jsonl").read_text().splitlines())
    rounds, _, _ = ledger_rows(run_dir / "ledger.db")
    assert rounds == [(1, 3), (2, 3)]


def test_a_client_stops_cleanly_on_sigterm(tmp_path):
    fed = Federation(tmp_path, rounds=1, rebase_every=1)
    try:
        fed.start_coordinator(min_clients=5)  # never starts a round: the client just waits
        fed.start_client("solo", 0)
        deadline = time.time() + 60
        while not fed.status()["clients"]:
            assert time.time() < deadline, fed.log("solo")
            time.sleep(0.2)
        fed.clients["solo"].send_signal(signal.SIGTERM)
        assert fed.clients["solo"].wait(20) == 0, fed.log("solo")
        deadline = time.time() + 10
        while "said goodbye: client stopping" not in fed.log("coordinator"):
            assert time.time() < deadline, fed.log("coordinator")
            time.sleep(0.1)
        assert fed.status()["clients"] == []
    finally:
        fed.stop()


def test_a_client_whose_memory_is_too_small_declines_with_the_budget_it_needs(tmp_path):
    fed = Federation(tmp_path, rounds=1, rebase_every=1)
    try:
        fed.start_coordinator(min_clients=5)
        fed.start_client("small", 0, budget="2MiB")
        assert fed.clients["small"].wait(120) == 2, fed.log("small")
        log = fed.log("small")
        assert "no training mode fits: mezo needs" in log and "The smallest budget that would work is" in log
        assert "Traceback" not in log
        deadline = time.time() + 10
        while "declined to join: no training mode fits" not in fed.log("coordinator"):
            assert time.time() < deadline, fed.log("coordinator")
            time.sleep(0.1)
        assert fed.status()["clients"] == []
    finally:
        fed.stop()



def test_a_sign_flipping_client_is_trimmed_out_of_every_coefficient(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEFED_PERTURB_BACKEND": "eager"}
    result = subprocess.run(
        [sys.executable, "-m", "edge_client.local_federation", "--model", str(model_dir), "--clients", "4",
         "--adversaries", "1", "--attack-scale", "100", "--rounds", "1", "--max-seq-len", "96",
         "--local-steps", "3", "--learning-rate", "1e-3", "--heldout", "0", "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["aggregation"] == "trimmed_mean" and summary["adversaries"] == 1
    with sqlite3.connect(run_dir / "ledger.db") as db:
        coefficients = dict(db.execute("SELECT seed, coefficient FROM coefficients WHERE round = 1"))
        contributions = db.execute("SELECT client_id, pairs_json FROM contributions WHERE round = 1").fetchall()
    by_client = {client: dict(json.loads(pairs)) for client, pairs in contributions}
    assert len(by_client) == 4
    honest = [pairs for client, pairs in by_client.items() if client != "client-3"]
    poisoned = by_client["client-3"]
    for seed, coefficient in coefficients.items():
        values = [pairs[seed] for pairs in honest]
        g = -coefficient / 1e-3  # the aggregated projected gradient (float32-rounded)
        slack = 1e-5 * max(abs(v) for v in values) + 1e-9
        assert min(values) - slack <= g <= max(values) + slack, (seed, values, g, poisoned[seed])
    # the attack was real: the poisoned scalars fall outside the honest range
    assert any(not min(pairs[s] for pairs in honest) <= poisoned[s] <= max(pairs[s] for pairs in honest)
               for s in coefficients)
