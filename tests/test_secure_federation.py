"""A federation in allow-list mode over TLS: real processes, wss:// on 127.0.0.1.

Listed clients with their keys and the federation's CA train a round; a client with an
unlisted key, or with no key, is refused; a client that does not trust the CA never
gets in; the coordinator refuses a non-loopback address without TLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from coordinator.allowlist import add
from coordinator.tls import create_local_ca
from edge_client.identity import ClientIdentity
from edge_client.model import base_weights_hash, load_model
from edge_client.tiny import make_tiny_llama

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "EDGEFED_THREADS": "1",
       "EDGEFED_PERTURB_BACKEND": "eager"}


def _data(path: Path, offset: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "response": str(2 * i)}) + "\n"
                            for i in range(offset, offset + 20)))
    return path


def _wait(predicate, timeout: float, what) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what() if callable(what) else what
        time.sleep(0.2)


def test_allow_list_and_tls(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "tiny")
    model_hash = base_weights_hash(load_model(model_dir)[0])
    tls = create_local_ca(tmp_path / "certs", ["127.0.0.1"])
    allow = tmp_path / "allow.txt"
    keys = {}
    for name in ("alice", "bob", "mallory"):
        keys[name] = ClientIdentity.create(tmp_path / f"{name}.key")
    for name in ("alice", "bob"):
        add(allow, keys[name].public_key_bytes, name)

    port_file = tmp_path / "port"
    logs = {}
    # The clients send packed (q8) updates, so the signature over packed bytes is checked too.
    modes = tmp_path / "modes.toml"
    modes.write_text("".join(f'[modes.{mode}]\nvalue_encoding = "q8"\n' for mode in ("mezo", "ferret", "droppeft")))

    def spawn(name: str, command: list[str]) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=logs[name].open("w"), stderr=subprocess.STDOUT)

    def log(name: str) -> str:
        return logs[name].read_text()

    coordinator = spawn("coordinator", [
        sys.executable, "-m", "coordinator.cli", "--config", str(modes), "--model-hash", model_hash,
        "--model-name", "tiny", "--ledger-path", str(tmp_path / "ledger.db"), "--port", "0",
        "--port-file", str(port_file), "--rounds", "1", "--seed-pool-size", "16", "--local-steps", "2", "--batch-size", "2",
        "--max-seq-len", "64", "--learning-rate", "1e-3", "--clients-per-round", "2", "--quorum", "2",
        "--min-clients", "2", "--deadline-s", "60", "--allowlist", str(allow),
        "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)])
    clients: dict[str, subprocess.Popen] = {}
    try:
        _wait(port_file.exists, 60, "the coordinator did not start")
        url = f"wss://127.0.0.1:{port_file.read_text()}"
        assert "listening on wss://" in log("coordinator")

        def client(name: str, *extra: str, key: str | None = None, ca: bool = True) -> subprocess.Popen:
            command = [sys.executable, "-m", "edge_client.cli", "--url", url, "--client-id", name,
                       "--data", str(_data(tmp_path / f"{name}.jsonl", len(clients) * 20)),
                       "--model", str(model_dir), "--device", "cpu", *extra]
            if key:
                command += ["--key", key]
            if ca:
                command += ["--ca-file", str(tls.ca_cert)]
            clients[name] = spawn(name, command)
            return clients[name]

        # Refused: a key that is not listed, and no key at all.
        assert client("mallory", key=str(tmp_path / "mallory.key")).wait(120) == 2, log("mallory")
        assert "not_allowed" in log("mallory") and "unknown_key" in log("mallory")
        assert client("eve").wait(120) == 2, log("eve")
        assert "missing_signature" in log("eve")
        # A client that does not trust the federation's CA never completes the handshake.
        stranger = client("stranger", key=str(tmp_path / "alice.key"), ca=False)
        _wait(lambda: "CERTIFICATE_VERIFY_FAILED" in log("stranger"), 120, lambda: log("stranger"))
        stranger.send_signal(signal.SIGTERM)
        stranger.wait(30)

        # The listed clients, with their keys, train the round: signed hellos and updates.
        for name in ("alice", "bob"):
            client(name, key=str(tmp_path / f"{name}.key"))
        for name in ("alice", "bob"):
            assert clients[name].wait(240) == 0, log(name)
        assert coordinator.wait(60) == 0, log("coordinator")
        text = log("coordinator")
        assert "committed" in text and "refused" in text
        assert "OPEN MODE" not in text
        with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
            stored = [json.loads(pairs) for (pairs,) in db.execute("SELECT pairs_json FROM contributions")]
        assert len(stored) == 2
        for pairs in stored:  # q8: every value one scale times an integer
            scale = max(abs(value) for _, value in pairs) / 127
            assert all(abs(value / scale - round(value / scale)) < 1e-6 for _, value in pairs), pairs
    finally:
        for proc in [*clients.values(), coordinator]:
            if proc.poll() is None:
                proc.kill()


def test_status_is_served_over_https_with_the_ca(tmp_path):
    tls = create_local_ca(tmp_path / "certs", ["127.0.0.1"])
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "--model-hash", "ab" * 32, "--ledger-path",
         str(tmp_path / "l.db"), "--port", "0", "--port-file", str(port_file), "--tls-cert",
         str(tls.server_cert), "--tls-key", str(tls.server_key)],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(port_file.exists, 60, "the coordinator did not start")
        context = ssl.create_default_context(cafile=str(tls.ca_cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{port_file.read_text()}/status", context=context,
                                    timeout=10) as response:
            assert json.loads(response.read())["round"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_no_tls_beyond_loopback_is_refused_unless_insecure(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "--model-hash", "ab" * 32, "--ledger-path",
         str(tmp_path / "l.db"), "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without TLS" in result.stderr and "Traceback" not in result.stderr
