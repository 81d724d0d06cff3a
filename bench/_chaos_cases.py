"""Fault injection shared by ``bench/chaos.py`` and ``tests/test_faults.py`` (issue #10).

* :class:`TinyFederation` -- a real coordinator process and real client processes (a tiny
  random Llama) on 127.0.0.1, each in its own process group, all killed on close.
* :func:`read_snapshot`, :func:`integrity_check`, :func:`lost_rounds` -- what the ledger
  holds, read from outside through read-only SQLite connections.
* :func:`kill_campaign` -- SIGKILL the coordinator again and again (right as a round
  commits, at the next ledger write, after a random delay, while clients reconnect),
  checking after every kill and every restart that no committed round is lost or changed.
* :data:`HOSTILE_CASES`, :func:`run_hostile_case`, :func:`fresh_client_latency` --
  hostile frames over real websockets and raw sockets.
* :func:`open_idle_connections`, :func:`count_held` -- websocket connections that finish
  the opening handshake and then say nothing; :func:`fresh_client_round` -- a protocol
  client (no model) that says hello and trains one round, to show it is still served.
* :func:`rss_mb` -- a process's resident set size from ``/proc/<pid>/status``.

Nothing here imports torch: client processes load the model themselves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocol import codec, limits  # noqa: E402
from protocol.errors import PeerProtocolError  # noqa: E402
from protocol.messages import (  # noqa: E402
    Challenge,
    DeviceProfile,
    Error,
    Goodbye,
    Hello,
    Fingerprint,
    Message,
    Reject,
    RoundCommit,
    RoundTask,
    Update,
    UpdateAck,
    Welcome,
)

__all__ = [
    "ChaosFailure",
    "CampaignReport",
    "HOSTILE_CASES",
    "HostileCase",
    "KillRecord",
    "LedgerSnapshot",
    "TinyFederation",
    "TinySettings",
    "count_held",
    "fresh_client_latency",
    "fresh_client_round",
    "integrity_check",
    "kill_campaign",
    "lost_rounds",
    "open_idle_connections",
    "read_snapshot",
    "rss_mb",
    "run_hostile_case",
]

APPLIED = re.compile(r" round (\d+): fingerprint ([0-9a-f]{16})")


class ChaosFailure(AssertionError):
    """A fault broke a promise (a round lost, a check failed, a process that should live died)."""


# ------------------------------------------------------------------------------- ledger


@dataclass(frozen=True)
class LedgerSnapshot:
    """The append-only part of a ledger: every column of every committed round's rows."""

    rounds: tuple[tuple[Any, ...], ...] = ()
    coefficients: tuple[tuple[Any, ...], ...] = ()
    contributions: tuple[tuple[Any, ...], ...] = ()
    meta: tuple[tuple[Any, ...], ...] = ()

    @property
    def last_round(self) -> int:
        return int(self.rounds[-1][0]) if self.rounds else 0

    def round_rows(self, round_number: int) -> tuple[Any, ...]:
        """Everything stored for one round (its row, coefficients and contributions)."""
        return (
            tuple(r for r in self.rounds if r[0] == round_number),
            tuple(c for c in self.coefficients if c[0] == round_number),
            tuple(c for c in self.contributions if c[0] == round_number),
        )

    def upto(self, round_number: int) -> LedgerSnapshot:
        return LedgerSnapshot(
            rounds=tuple(r for r in self.rounds if r[0] <= round_number),
            coefficients=tuple(c for c in self.coefficients if c[0] <= round_number),
            contributions=tuple(c for c in self.contributions if c[0] <= round_number),
            meta=self.meta,
        )


def _read_only(path: Path) -> sqlite3.Connection:
    # mode=ro: reading never checkpoints or deletes the WAL, whoever closes last.
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10)


def read_snapshot(path: Path) -> LedgerSnapshot:
    """Every committed row of the append-only tables (one read transaction); empty if no ledger yet."""
    if not path.exists():
        return LedgerSnapshot()
    with contextlib.closing(_read_only(path)) as db:
        try:
            db.execute("BEGIN")
            snapshot = LedgerSnapshot(
                rounds=tuple(db.execute("SELECT * FROM rounds ORDER BY round")),
                coefficients=tuple(db.execute("SELECT * FROM coefficients ORDER BY round, position")),
                contributions=tuple(db.execute("SELECT * FROM contributions ORDER BY round, position")),
                meta=tuple(db.execute("SELECT * FROM meta ORDER BY key")),
            )
            db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return LedgerSnapshot()  # created, schema not written yet
            raise
    return snapshot


def lost_rounds(before: LedgerSnapshot, after: LedgerSnapshot) -> list[int]:
    """Rounds ``before`` holds that ``after`` lacks or holds differently (any column)."""
    lost = [r for r in range(1, before.last_round + 1) if before.round_rows(r) != after.round_rows(r)]
    if before.meta and not set(before.meta) <= set(after.meta):
        lost.append(0)  # the federation's identity or pool key changed
    return lost


def integrity_check(path: Path) -> str:
    with contextlib.closing(_read_only(path)) as db:
        return "\n".join(str(row[0]) for row in db.execute("PRAGMA integrity_check"))


def fingerprints_by_round(path: Path) -> dict[int, dict[str, str]]:
    with contextlib.closing(_read_only(path)) as db:
        out: dict[int, dict[str, str]] = {}
        for round_number, client, value in db.execute("SELECT round, client_id, fingerprint FROM fingerprints"):
            out.setdefault(int(round_number), {})[client] = value
    return out


# ----------------------------------------------------------------------- tiny federation


def write_data(path: Path, offset: int, count: int = 40) -> Path:
    """Arithmetic records (like tests/test_federation_integration.py), distinct per offset."""
    with path.open("w") as out:
        for i in range(offset, offset + count):
            a, b = i % 17, (i * 7) % 13
            out.write(json.dumps({"instruction": f"What is {a} plus {b}?", "response": f"{a + b}"}) + "\n")
    return path


@dataclass(frozen=True)
class TinySettings:
    """A federation sized for fault injection: many short rounds of a tiny model."""

    rounds: int
    clients: tuple[str, ...] = ("alpha", "beta", "gamma")
    rebase_every: int = 3
    local_steps: int = 16  # a round of ~0.3 s: long enough for kills to land mid-training
    seed_pool_size: int = 256
    min_clients: int = 3
    clients_per_round: int = 3
    quorum: int = 2
    deadline_s: float = 60.0
    commit_wait_s: float = 5.0
    pool_key: int = 20240610


class TinyFederation:
    """A coordinator process and client processes (tiny random Llama) on 127.0.0.1.

    Every process runs in its own session (process group); :meth:`close` kills what is
    left. The coordinator is restarted on the same port, so clients find it again by
    themselves (they reconnect with backoff, PROTOCOL.md §1.3).
    """

    def __init__(self, workdir: Path, settings: TinySettings) -> None:
        from edge_client.model import base_weights_hash, load_model  # torch: only here
        from edge_client.tiny import make_tiny_llama

        self.workdir = workdir
        self.settings = settings
        self.model_dir = make_tiny_llama(workdir / "tiny")
        model, _ = load_model(self.model_dir)
        self.model_hash = base_weights_hash(model)
        del model
        self.ledger = workdir / "ledger.db"
        self.port_file = workdir / "port"
        self.status_file = workdir / "status.json"
        self.port = 0
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.coordinator_starts = 0
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "EDGEFED_THREADS": "1",
                    "EDGEFED_PERTURB_BACKEND": "eager"}
        self._reader: sqlite3.Connection | None = None

    # -- processes ------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()  # the child holds its own descriptor

    def start_coordinator(self, timeout: float = 60.0) -> None:
        """Start (or restart, on the same port) the coordinator and wait until it listens."""
        s = self.settings
        self.port_file.unlink(missing_ok=True)
        self.coordinator = self._spawn("coordinator", [
            sys.executable, "-m", "coordinator.cli", "--model-hash", self.model_hash, "--model-name", "tiny",
            "--ledger-path", str(self.ledger), "--port", str(self.port), "--port-file", str(self.port_file),
            "--status-file", str(self.status_file), "--rounds", str(s.rounds),
            "--rebase-every", str(s.rebase_every), "--seed-pool-size", str(s.seed_pool_size),
            "--pool-key", str(s.pool_key), "--local-steps", str(s.local_steps), "--batch-size", "2",
            "--max-seq-len", "96", "--learning-rate", "1e-3", "--epsilon", "1e-3",
            "--clients-per-round", str(s.clients_per_round), "--quorum", str(s.quorum),
            "--min-clients", str(s.min_clients), "--deadline-s", str(s.deadline_s),
            "--commit-wait-s", str(s.commit_wait_s),
        ])
        self.coordinator_starts += 1
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.coordinator.poll() is not None:
                raise ChaosFailure(f"the coordinator exited with {self.coordinator.returncode}:\n"
                                   + self.log("coordinator"))
            if time.monotonic() > deadline:
                raise ChaosFailure("the coordinator did not start listening\n" + self.log("coordinator"))
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())

    def start_client(self, name: str, offset: int) -> None:
        data = write_data(self.workdir / f"{name}.jsonl", offset)
        self.clients[name] = self._spawn(name, [
            sys.executable, "-m", "edge_client.cli", "--url", f"ws://127.0.0.1:{self.port}", "--client-id", name,
            "--data", str(data), "--model", str(self.model_dir), "--device", "cpu", "--copies", "memory",
            "--memory-budget", "4GiB",
        ])

    def start(self) -> None:
        self.start_coordinator()
        for index, name in enumerate(self.settings.clients):
            self.start_client(name, index * 40)

    def kill_coordinator(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed by the process itself."""
        assert self.coordinator is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.coordinator.pid, signal.SIGKILL)
        self.coordinator.wait(30)

    def signal_client(self, name: str, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.clients[name].pid, sig)

    def check_alive(self, names: Sequence[str] | None = None) -> None:
        for name in names if names is not None else self.clients:
            code = self.clients[name].poll()
            if code is not None:
                raise ChaosFailure(f"client {name} exited with {code}:\n{self.log(name)}")

    def close(self) -> None:
        """Stop every process still running: SIGTERM to its group, then SIGKILL."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        processes = [p for p in [*self.clients.values(), self.coordinator] if p is not None]
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGCONT)  # a stopped client cannot handle SIGTERM
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    def __enter__(self) -> TinyFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observing -------------------------------------------------------------------

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def committed_rounds(self) -> int:
        """The ledger's last round, through one persistent read-only connection (cheap to poll)."""
        if self._reader is None:
            if not self.ledger.exists():
                return 0
            self._reader = _read_only(self.ledger)
        try:
            row = self._reader.execute("SELECT MAX(round) FROM rounds").fetchone()
        except sqlite3.OperationalError:
            return 0  # the schema is not written yet
        return int(row[0] or 0)

    def applied_rounds(self) -> dict[str, int]:
        """The highest round each client logged as applied (after a commit or a sync)."""
        out: dict[str, int] = {}
        for name in self.clients:
            path = self.workdir / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            out[name] = max((int(m.group(1)) for m in APPLIED.finditer(text)), default=0)
        return out

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=5) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    def wait_for_round(self, target: int, timeout: float, poll_s: float = 0.002,
                       alive: Sequence[str] | None = None) -> int:
        """Poll the ledger until it holds ``target`` rounds; return the round seen."""
        deadline = time.monotonic() + timeout
        check_at = 0.0
        while True:
            seen = self.committed_rounds()
            if seen >= target:
                return seen
            now = time.monotonic()
            if now > deadline:
                raise ChaosFailure(f"round {target} not committed within {timeout:.0f}s (ledger at {seen})\n"
                                   + self.log("coordinator"))
            if now > check_at:
                check_at = now + 0.5
                if self.coordinator is not None and self.coordinator.poll() is not None:
                    raise ChaosFailure(f"the coordinator exited with {self.coordinator.returncode}\n"
                                       + self.log("coordinator"))
                self.check_alive(alive)
            time.sleep(poll_s)

    def wait_for_finish(self, timeout: float) -> None:
        """The coordinator exits 0 once every round is in, then every client exits 0."""
        assert self.coordinator is not None
        try:
            code = self.coordinator.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ChaosFailure(f"the federation did not finish in {timeout:.0f}s (ledger at "
                               f"{self.committed_rounds()})\n" + self.log("coordinator")) from None
        if code != 0:
            raise ChaosFailure(f"the coordinator exited with {code}\n" + self.log("coordinator"))
        for name, process in self.clients.items():
            if process.poll() is None and name in self.settings.clients:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    raise ChaosFailure(f"client {name} did not stop after the goodbye\n" + self.log(name)) from None


# --------------------------------------------------------------------------- SIGKILLs


KILL_MODES = ("commit", "write", "random", "reconnect")


@dataclass
class KillRecord:
    """One SIGKILL of the coordinator and what the ledger held around it."""

    index: int
    mode: str
    delay_s: float
    round_seen: int  # the highest round the poller saw committed before the kill
    round_after: int  # the ledger's last round with the coordinator dead
    applied: int  # the highest round any client had applied (from their logs)
    lost: list[int]  # rounds committed before the kill, missing or changed after it or the restart
    integrity_after_kill: str
    integrity_after_restart: str
    recovery_s: float | None = None  # restart to the next commit, if one followed before the next kill

    @property
    def ok(self) -> bool:
        return not self.lost and self.integrity_after_kill == "ok" and self.integrity_after_restart == "ok"


@dataclass
class CampaignReport:
    kills: list[KillRecord] = field(default_factory=list)
    final_round: int = 0
    final_lost: list[int] = field(default_factory=list)
    final_integrity: str = ""
    fingerprints_agree: bool = False
    final_fingerprints: dict[str, str] = field(default_factory=dict)
    disagreeing_rounds: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def rounds_lost(self) -> int:
        return len({r for k in self.kills for r in k.lost} | set(self.final_lost))


def kill_schedule(kills: int) -> list[str]:
    """Modes in a fixed rotation: right at a commit, at the next ledger write, at a random
    moment, and (every fourth) while the clients are still reconnecting."""
    return [KILL_MODES[i % len(KILL_MODES)] for i in range(kills)]


def _wait_for_write(wal: Path, deadline: float, fed: TinyFederation) -> None:
    """Return as soon as the coordinator writes to the ledger's WAL (mid-transaction, or
    right after: a commit's frames or a fingerprint's)."""
    def stamp() -> tuple[int, int]:
        try:
            st = wal.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    first = stamp()
    while stamp() == first:
        if time.monotonic() > deadline:
            raise ChaosFailure("no ledger write within the deadline\n" + fed.log("coordinator"))
        time.sleep(0.0005)


def kill_campaign(fed: TinyFederation, kills: int, rng: random.Random, *, round_timeout: float = 120.0,
                  progress: Callable[[KillRecord], None] | None = None) -> CampaignReport:
    """SIGKILL the running coordinator ``kills`` times and restart it each time; then let
    the federation finish. Raises ChaosFailure when the federation cannot go on (a process
    died, no round commits); records (does not raise) lost rounds and failed checks.

    Per kill: the ledger is read right before and right after the kill (the coordinator
    dead) and again once the restarted coordinator listens. Every round read before, seen
    committed by the poller, or applied by a client must be there after, row for row,
    and the restart must change none of them; ``PRAGMA integrity_check`` must say ok.
    """
    started = time.monotonic()
    report = CampaignReport()
    history: list[LedgerSnapshot] = []
    last_restart = time.monotonic()
    wal = fed.ledger.with_name(fed.ledger.name + "-wal")
    total = fed.settings.rounds
    for index, mode in enumerate(kill_schedule(kills)):
        if fed.committed_rounds() + 3 >= total:
            raise ChaosFailure(f"only {index} of {kills} kills fit in {total} rounds")
        base = fed.committed_rounds()
        delay = 0.0
        if mode == "reconnect":  # while clients reconnect, say hello and sync
            delay = rng.uniform(0.05, 1.5)
            time.sleep(max(0.0, last_restart + delay - time.monotonic()))
            before = read_snapshot(fed.ledger)
        else:
            # One commit since the restart first: every client is back and has applied a
            # round on its new connection (so its reconnect backoff starts over).
            base = fed.wait_for_round(base + 1, round_timeout)
            if index > 0 and report.kills[-1].recovery_s is None:
                report.kills[-1].recovery_s = round(time.monotonic() - last_restart, 2)
            if mode == "commit":  # right as the next round commits
                before = read_snapshot(fed.ledger)
                fed.wait_for_round(base + 1, round_timeout, poll_s=0.0005)
            elif mode == "write":  # at the first ledger write after a random pause
                delay = rng.uniform(0.0, 0.5)
                time.sleep(delay)
                before = read_snapshot(fed.ledger)
                _wait_for_write(wal, time.monotonic() + round_timeout, fed)
            else:  # "random": anywhere in a round (training, aggregating, committing, syncing)
                delay = rng.uniform(0.0, 1.0)
                time.sleep(delay)
                before = read_snapshot(fed.ledger)
        seen = fed.committed_rounds()
        fed.kill_coordinator()

        after_kill = read_snapshot(fed.ledger)
        integrity_kill = integrity_check(fed.ledger)
        applied = max(fed.applied_rounds().values(), default=0)
        lost = set(lost_rounds(before, after_kill))
        for old in history:
            lost |= set(lost_rounds(old, after_kill))
        lost |= set(range(after_kill.last_round + 1, max(seen, applied) + 1))  # acknowledged, then gone

        fed.start_coordinator()
        last_restart = time.monotonic()
        after_restart = read_snapshot(fed.ledger)
        integrity_restart = integrity_check(fed.ledger)
        lost |= set(lost_rounds(after_kill, after_restart))
        history.append(after_kill)

        record = KillRecord(index=index + 1, mode=mode, delay_s=round(delay, 3), round_seen=seen,
                            round_after=after_kill.last_round, applied=applied, lost=sorted(lost),
                            integrity_after_kill=integrity_kill, integrity_after_restart=integrity_restart)
        report.kills.append(record)
        if progress is not None:
            progress(record)
        fed.check_alive()

    if report.kills:  # the last restart: time to its first commit
        fed.wait_for_round(report.kills[-1].round_after + 1, round_timeout)
        report.kills[-1].recovery_s = round(time.monotonic() - last_restart, 2)
    fed.wait_for_round(total, round_timeout * 2, poll_s=0.05)
    fed.wait_for_finish(180)
    final = read_snapshot(fed.ledger)
    report.final_round = final.last_round
    report.final_integrity = integrity_check(fed.ledger)
    lost_final: set[int] = set()
    for old in history:
        lost_final |= set(lost_rounds(old, final))
    report.final_lost = sorted(lost_final)
    fingerprints = fingerprints_by_round(fed.ledger)
    report.disagreeing_rounds = sorted(r for r, reports in fingerprints.items() if len(set(reports.values())) > 1)
    report.final_fingerprints = fingerprints.get(final.last_round, {})
    status = json.loads(fed.status_file.read_text()) if fed.status_file.exists() else {}
    status_prints = {c["client_id"]: c["fingerprint"] for c in status.get("clients", [])}
    report.fingerprints_agree = (
        set(report.final_fingerprints) >= set(fed.settings.clients)
        and len(set(report.final_fingerprints.values())) == 1
        and not report.disagreeing_rounds
        and set(status_prints.values()) <= set(report.final_fingerprints.values())
    )
    report.wall_s = round(time.monotonic() - started, 1)
    return report


# ------------------------------------------------------------------------ hostile input

HASH = "cd" * 32
DEVICE = DeviceProfile(device_type="cpu", device_name="chaos", accelerator_total_bytes=0, accelerator_free_bytes=0,
                       host_total_bytes=1 << 30, host_free_bytes=1 << 29, memory_budget_bytes=None)


def hello(client_id: str = "probe", *, version: tuple[int, int] = (2, 0), model_hash: str = HASH) -> Hello:
    return Hello(protocol_version=version, client_id=client_id, device=DEVICE, mode="mezo", model_hash=model_hash,
                 last_round=0, table_digest=None, plan=None, public_key=None, signature=None)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _wire(message: Message) -> dict[str, Any]:
    obj: dict[str, Any] = msgpack.unpackb(codec.encode(message), raw=False)
    return obj


def _update_wire(**changes: Any) -> bytes:
    obj = _wire(Update(round=1, attempt=0, client_id="hostile", pairs=((5, 0.5), (6, 0.25)), num_examples=10,
                       loss_before=2.0, loss_after=1.9, nonce=b"n" * 16, signature=None))
    obj.update(changes)
    return _pack(obj)


def _hello_wire(**changes: Any) -> bytes:
    obj = _wire(hello("hostile"))
    obj.update(changes)
    return _pack(obj)


_GOODBYE = codec.encode(Goodbye(reason="bye"))
_HEAD = b"\x82" + _pack("type") + _pack("goodbye") + _pack("reason")  # a goodbye whose reason follows


@dataclass(frozen=True)
class HostileCase:
    """One hostile input and the answer PROTOCOL.md §9 requires.

    ``frame`` is a websocket message (bytes: binary, str: text) sent in place of the
    hello (``phase="handshake"``) or after a welcome (``phase="session"``); ``raw`` is
    written to the socket as is, after the opening handshake. ``reply`` is the message
    expected first: ``"error"`` (with ``code``), ``"reject"`` (with ``code``) or None (no
    message, only a close); ``close`` is the close code, None when the connection must
    stay open.
    """

    name: str
    phase: str
    reply: str | None
    code: str | None
    close: int | None
    frame: bytes | str | None = None
    raw: bytes | None = None
    field_path: str | None = None


def _masked(payload: bytes, *, opcode: int = 0x2, length: int | None = None, mask: bool = True) -> bytes:
    """A client websocket frame (RFC 6455 §5.2); ``length`` overrides the declared length."""
    declared = len(payload) if length is None else length
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if declared < 126:
        head += bytes([bit | declared])
    elif declared < 65536:
        head += bytes([bit | 126]) + declared.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + declared.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


_FRAME_CASES: list[tuple[str, bytes | str, str, int]] = [
    ("garbage bytes", bytes(range(256)), "malformed", 1007),
    ("reserved byte 0xc1", b"\xc1garbage", "malformed", 1007),
    ("empty frame", b"", "malformed", 1007),
    ("truncated msgpack", _GOODBYE[:-2], "malformed", 1007),
    ("trailing bytes", _GOODBYE + b"\x00", "malformed", 1007),
    ("int map key", _pack({"type": "goodbye", "reason": "x", 1: 2}), "malformed", 1007),
    ("nil map key", b"\x81\xc0\x01", "malformed", 1007),
    ("duplicate map key", b"\x82" + _pack("type") + _pack("goodbye") + _pack("type") + _pack("goodbye"),
     "malformed", 1007),
    (f"nested {limits.MAX_NESTING_DEPTH + 1} levels", _HEAD + b"\x91" * limits.MAX_NESTING_DEPTH + b"\x00",
     "malformed", 1007),
    ("nested 100,000 levels", b"\x91" * 100_000 + b"\x00", "malformed", 1007),
    ("ext type (fixext1)", _HEAD + b"\xd4\x01\x00", "malformed", 1007),
    ("ext32 claiming 2 GiB", _HEAD + b"\xc9\x7f\xff\xff\xff\x05", "malformed", 1007),
    ("str32 claiming 2 GiB, no body", _HEAD + b"\xdb\x7f\xff\xff\xff", "malformed", 1007),
    ("bin32 claiming 4 GiB, no body", _HEAD + b"\xc6\xff\xff\xff\xff", "malformed", 1007),
    ("array32 claiming 4G items, no body", _HEAD + b"\xdd\xff\xff\xff\xff", "malformed", 1007),
    ("map32 claiming 4G keys, no body", _HEAD + b"\xdf\xff\xff\xff\xff", "malformed", 1007),
    ("invalid UTF-8", _HEAD + b"\xa2\xff\xfe", "malformed", 1007),
    ("top level not a map", _pack([1, 2, 3]), "malformed", 1007),
    ("text frame", '{"type": "hello"}', "malformed", 1007),
    ("unknown message type", _pack({"type": "launch_missiles"}), "unknown_type", 1003),
    ("type missing", _pack({"reason": "x"}), "invalid_field", 1007),
    ("type not a str", _pack({"type": 7}), "invalid_field", 1007),
]

_FIELD_CASES: list[tuple[str, str, bytes, str]] = [
    ("update: seed as str", "session", _update_wire(pairs=[["5", 0.5]]), "update.pairs[0][0]"),
    ("update: bool for the round", "session", _update_wire(round=True), "update.round"),
    ("update: bool for a seed", "session", _update_wire(pairs=[[True, 0.5]]), "update.pairs[0][0]"),
    ("update: float for num_examples", "session", _update_wire(num_examples=10.0), "update.num_examples"),
    ("update: NaN gradient", "session", _update_wire(pairs=[[5, math.nan]]), "update.pairs[0][1]"),
    ("update: +inf loss", "session", _update_wire(loss_after=math.inf), "update.loss_after"),
    ("update: seed 2**64-1", "session", _update_wire(pairs=[[2**64 - 1, 0.5]]), "update.pairs[0][0]"),
    ("update: unknown field", "session", _update_wire(bonus=1), "update.bonus"),
    ("hello: bool last_round", "handshake", _hello_wire(last_round=True), "hello.last_round"),
    ("hello: client_id of 65 chars", "handshake", _hello_wire(client_id="a" * 65), "hello.client_id"),
    ("hello: NaN in the device", "handshake",
     _pack({**_wire(hello("hostile")), "device": {**_wire(hello("hostile"))["device"], "host_total_bytes": math.nan}}),
     "hello.device.host_total_bytes"),
]


def _build_cases() -> list[HostileCase]:
    cases: list[HostileCase] = []
    for name, frame, code, close in _FRAME_CASES:
        for phase in ("handshake", "session"):
            cases.append(HostileCase(f"{name} ({phase})", phase, "error", code, close, frame=frame))
    for name, phase, frame, path in _FIELD_CASES:
        cases.append(HostileCase(name, phase, "error", "invalid_field", 1007, frame=frame, field_path=path))
    cases += [
        HostileCase("hello of protocol 3.0", "handshake", "reject", "version", 1002,
                    frame=codec.encode(hello(version=(3, 0)))),
        HostileCase("hello of protocol 65535.0, other shape", "handshake", "reject", "version", 1002,
                    frame=_pack({"type": "hello", "protocol_version": [65535, 0], "identity": {"key": b"x"}})),
        HostileCase("hello with a foreign model hash", "handshake", "reject", "model_mismatch", 1008,
                    frame=codec.encode(hello(model_hash="ef" * 32))),
        HostileCase("first frame an update, not a hello", "handshake", "reject", "bad_hello", 1008,
                    frame=_update_wire()),
        HostileCase("coordinator-only type from a client", "session", "error", "unexpected", None,
                    frame=codec.encode(RoundCommit(round=1, attempt=0, coefficients=(), totals=(),
                                                   table_digest="00" * 32, num_updates=1))),
        HostileCase("over-size frame (4 MiB + 1)", "session", None, None, 1009,
                    frame=b"\x00" * (limits.MAX_FRAME_BYTES + 1)),
        HostileCase("websocket header claiming 2 PiB", "handshake", None, None, 1009,
                    raw=_masked(b"\x81\xa4type", length=2**51)),
        HostileCase("reserved websocket opcode 0x3", "handshake", None, None, 1002,
                    raw=_masked(b"\x80", opcode=0x3)),
        HostileCase("unmasked client frame", "handshake", None, None, 1002,
                    raw=_masked(codec.encode(hello()), mask=False)),
    ]
    return cases


HOSTILE_CASES: list[HostileCase] = _build_cases()


@dataclass
class CaseResult:
    case: HostileCase
    passed: bool
    got: str
    served_after_s: float | None


async def _recv_message(ws: Any, timeout: float) -> Message | bytes | str:
    frame = await asyncio.wait_for(ws.recv(), timeout)
    if isinstance(frame, str):
        return frame
    try:
        return codec.decode(frame)
    except PeerProtocolError:
        return frame


async def _raw_upgrade(port: int, host: str = "127.0.0.1",
                       local_host: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(local_host, 0) if local_host else None)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    if not response.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"upgrade refused: {response[:60]!r}")
    return reader, writer


async def _read_server_frame(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), timeout)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(length), timeout)


async def _raw_case(port: int, case: HostileCase, timeout: float) -> str:
    assert case.raw is not None
    reader, writer = await _raw_upgrade(port)
    try:
        opcode, payload = await _read_server_frame(reader, timeout)
        if opcode != 0x2 or not isinstance(codec.decode(payload), Challenge):
            return f"no challenge (opcode {opcode})"
        writer.write(case.raw)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        messages: list[str] = []
        while True:
            try:
                opcode, payload = await _read_server_frame(reader, timeout)
            except asyncio.IncompleteReadError:
                return "closed without a close frame" + (f" after {messages}" if messages else "")
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                return f"close {code}" + (f" after {messages}" if messages else "")
            messages.append(type(codec.decode(payload)).__name__ if opcode == 0x2 else f"opcode {opcode}")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1)


async def _frame_case(url: str, case: HostileCase, timeout: float) -> tuple[bool, str]:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with connect(url, open_timeout=timeout, max_size=None, compression=None) as ws:
        challenge = await _recv_message(ws, timeout)
        if not isinstance(challenge, Challenge):
            return False, f"expected a challenge, got {challenge!r:.80}"
        if case.phase == "session":
            await ws.send(codec.encode(hello(f"hostile-{os.getpid()}-{random.randrange(10**9)}")))
            welcome = await _recv_message(ws, timeout)
            if not isinstance(welcome, Welcome):
                return False, f"expected a welcome, got {welcome!r:.80}"
        assert case.frame is not None
        with contextlib.suppress(ConnectionClosed):
            await ws.send(case.frame)
        reply: Message | bytes | str | None = None
        got: list[str] = []
        ok = True
        if case.reply is not None:
            try:
                reply = await _recv_message(ws, timeout)
            except ConnectionClosed:
                reply = None
            if case.reply == "error":
                ok = isinstance(reply, Error) and reply.code == case.code and (
                    case.field_path is None or reply.field == case.field_path)
            else:
                ok = isinstance(reply, Reject) and reply.code == case.code
            got.append(f"{type(reply).__name__}({getattr(reply, 'code', '')}"
                       f"{', ' + str(reply.field) if isinstance(reply, Error) and reply.field else ''})")
        if case.close is None:  # the connection must stay open: a goodbye is still answered
            await ws.send(codec.encode(Goodbye(reason="done")))
            await asyncio.wait_for(ws.wait_closed(), timeout)
            got.append(f"open, then close {ws.close_code} on goodbye")
            return ok and ws.close_code == 1000, "; ".join(got)
        await asyncio.wait_for(ws.wait_closed(), timeout)
        got.append(f"close {ws.close_code}")
        return ok and ws.close_code == case.close, "; ".join(got)


async def fresh_client_latency(url: str, timeout: float = 1.0, local_host: str | None = None) -> float:
    """Seconds until a brand-new client has its challenge (raises if not within ``timeout``)."""
    from websockets.asyncio.client import connect

    started = time.monotonic()
    kwargs: dict[str, Any] = {"local_addr": (local_host, 0)} if local_host else {}
    async with connect(url, open_timeout=timeout, **kwargs) as ws:
        challenge = codec.decode(await asyncio.wait_for(ws.recv(), max(0.01, timeout - (time.monotonic() - started))))
    elapsed = time.monotonic() - started
    if not isinstance(challenge, Challenge) or elapsed > timeout:
        raise TimeoutError(f"no challenge within {timeout}s")
    return elapsed


async def run_hostile_case(url: str, port: int, case: HostileCase, timeout: float = 5.0) -> CaseResult:
    """Send one hostile input on a fresh connection, check the answer and the close, then
    check that a fresh client still gets its challenge within 1 s."""
    try:
        if case.raw is not None:
            got = await _raw_case(port, case, timeout)
            passed = got == f"close {case.close}"
        else:
            passed, got = await _frame_case(url, case, timeout)
    except Exception as error:  # a hung or broken exchange is a failed case, not a crashed bench
        passed, got = False, f"{type(error).__name__}: {error}"
    try:
        served = await fresh_client_latency(url, 1.0)
    except Exception as error:
        return CaseResult(case, False, f"{got}; no fresh challenge: {type(error).__name__}", None)
    return CaseResult(case, passed, got, served)


async def fresh_client_round(url: str, client_id: str, *, local_host: str | None = None,
                             timeout: float = 10.0) -> tuple[float, float]:
    """A brand-new protocol client (no model: its update is made-up scalars) says hello,
    reports its fingerprint, takes the round's task, answers it and reads the commit.
    Returns (seconds to its welcome, seconds to the commit); raises if any step fails or
    takes longer than ``timeout``."""
    from websockets.asyncio.client import connect

    started = time.monotonic()
    kwargs: dict[str, Any] = {"local_addr": (local_host, 0)} if local_host else {}
    async with connect(url, open_timeout=timeout, compression=None, **kwargs) as ws:
        async def expect(kind: type[Message]) -> Any:
            message = codec.decode(await asyncio.wait_for(ws.recv(), max(0.01, timeout - (time.monotonic() - started))))
            if not isinstance(message, kind):
                raise ChaosFailure(f"{client_id}: expected {kind.__name__}, got {message!r:.120}")
            return message

        await expect(Challenge)
        await ws.send(codec.encode(hello(client_id)))
        welcome = await expect(Welcome)
        welcomed = time.monotonic() - started
        await ws.send(codec.encode(Fingerprint(round=welcome.last_committed_round, fingerprint="11" * 32,
                                               table_digest="00" * 32)))
        task = await expect(RoundTask)
        await ws.send(codec.encode(Update(round=task.round, attempt=task.attempt, client_id=client_id,
                                          pairs=tuple((seed, 0.5) for seed in task.seeds), num_examples=4,
                                          loss_before=2.0, loss_after=1.9, nonce=os.urandom(16), signature=None)))
        await expect(UpdateAck)
        commit = await expect(RoundCommit)
        if commit.round != task.round:
            raise ChaosFailure(f"{client_id}: commit of round {commit.round}, trained {task.round}")
        return welcomed, time.monotonic() - started


# ------------------------------------------------------------------- idle connections


@dataclass
class IdleConnection:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    closed: bool = False


async def open_idle_connections(port: int, count: int, *, sources: Sequence[str] = ("127.0.0.1",),
                                batch: int = 200, deadline_s: float = 25.0) -> tuple[list[IdleConnection], int]:
    """Open up to ``count`` websocket connections that finish the opening handshake (101)
    and then say nothing, from the loopback ``sources`` in turn. Stops early at
    ``deadline_s`` (the coordinator drops a silent connection 30 s after its challenge).
    Returns the connections and how many attempts failed (refused, reset, upgrade refused)."""
    loop = asyncio.get_running_loop()
    opened: list[IdleConnection] = []
    failed = 0
    stop_at = time.monotonic() + deadline_s

    async def one(source: str) -> None:
        nonlocal failed
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            await loop.sock_connect(sock, ("127.0.0.1", port))
            key = base64.b64encode(os.urandom(16)).decode()
            await loop.sock_sendall(sock, (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            head = bytearray()
            while b"\r\n\r\n" not in head:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
                if not chunk:
                    raise ConnectionError("closed during the upgrade")
                head += chunk
            end = head.index(b"\r\n\r\n") + 4
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError("upgrade refused")
            opened.append(IdleConnection(sock, bytearray(head[end:])))
        except (OSError, asyncio.TimeoutError):
            failed += 1
            sock.close()

    for start in range(0, count, batch):
        if time.monotonic() > stop_at:
            break
        await asyncio.gather(*(one(sources[i % len(sources)]) for i in range(start, min(start + batch, count))))
    return opened, failed


def _has_close_frame(buffer: bytearray) -> bool:
    """Whether the server frames in ``buffer`` (unmasked) include a close frame."""
    offset = 0
    while offset + 2 <= len(buffer):
        opcode, length = buffer[offset] & 0x0F, buffer[offset + 1] & 0x7F
        offset += 2
        if length == 126:
            if offset + 2 > len(buffer):
                return False
            length = int.from_bytes(buffer[offset:offset + 2], "big")
            offset += 2
        elif length == 127:
            if offset + 8 > len(buffer):
                return False
            length = int.from_bytes(buffer[offset:offset + 8], "big")
            offset += 8
        if opcode == 0x8:
            return True
        offset += length
    return False


def count_held(connections: list[IdleConnection]) -> int:
    """How many are still open: no EOF, no reset and no close frame from the coordinator."""
    held = 0
    for conn in connections:
        if not conn.closed:
            try:
                while True:
                    chunk = conn.sock.recv(65536)
                    if not chunk:
                        conn.closed = True
                        break
                    conn.buffer += chunk
            except BlockingIOError:
                pass
            except OSError:
                conn.closed = True
            if _has_close_frame(conn.buffer):
                conn.closed = True
        held += not conn.closed
    return held


# --------------------------------------------------------------------------- memory


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ChaosFailure(f"no VmRSS for process {pid}")
