"""Tests for coordinator.ledger: fl32 accumulation, atomicity, durability, metadata."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import coordinator.ledger as ledger_mod
from coordinator.ledger import (
    CommittedRound,
    Contribution,
    Ledger,
    LedgerClosed,
    LedgerCorrupt,
    LedgerError,
    RoundNotFound,
    RoundOrderError,
    table_digest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FLT_MAX = float(np.finfo(np.float32).max)


def independent_digest(table: dict[int, np.float32]) -> str:
    """Digest computed here from scratch: ascending seed, nonzero, '<Q' seed + '<f' total."""
    data = b"".join(
        struct.pack("<Q", seed) + struct.pack("<f", float(total))
        for seed, total in sorted(table.items())
        if total != 0
    )
    return hashlib.sha256(data).hexdigest()


def np_table_items(table: dict[int, np.float32]) -> list[tuple[int, float]]:
    return [(s, float(t)) for s, t in sorted(table.items()) if t != 0]


def snapshot(led: Ledger) -> tuple[Any, ...]:
    """Everything observable about committed rounds, for before/after comparisons."""
    last = led.last_round()
    return (
        last,
        led.rounds_between(0, last),
        [led.table_at(r) for r in range(last + 1)],
        led.current_table(),
        [led.contributions(r) for r in range(1, last + 1)],
    )


def contrib(client_id: str, n: int, before: float, after: float, pairs: Any) -> Contribution:
    return Contribution(client_id, n, before, after, tuple(pairs))


# --------------------------------------------------------------- accumulation


def test_three_rounds_accumulate_in_float32(tmp_path: Path) -> None:
    big = 2**63 - 1
    rounds = [
        # Seed 1 gets 1.0, then 2**-30 (lost in float32, kept in float64), then 2**-30 again.
        # Seed 2 cancels to exactly zero in round 3 and must leave the table.
        [(1, 1.0), (2, 0.75), (big, -3.5), (40, float(np.float32(0.1)))],
        [(2, 0.5), (1, 2.0**-30), (40, float(np.float32(0.2))), (7, float(np.float32(-1e-3)))],
        [(40, float(np.float32(0.3))), (2, -1.25), (1, 2.0**-30), (big, 1.5), (9, 2.5)],
    ]
    contributions = [
        [contrib("a", 10, 2.0, 1.5, [(1, 0.3)]), contrib("b", 30, 1.0, 0.5, [(1, -0.1)])],
        [contrib("a", 5, 3.0, 2.0, [(2, 1e-9)])],
        [],
    ]
    expected_losses = [(1.25, 0.75), (3.0, 2.0), (None, None)]

    expected_table: dict[int, np.float32] = {}
    expected_tables: list[list[tuple[int, float]]] = [[]]
    expected_digests: list[str] = []
    expected_totals: list[tuple[tuple[int, float], ...]] = []
    for coefs in rounds:
        totals = []
        for seed, c in coefs:
            t = np.float32(expected_table.get(seed, np.float32(0.0))) + np.float32(c)
            assert isinstance(t, np.float32)
            expected_table[seed] = t
            totals.append((seed, float(t)))
        expected_totals.append(tuple(totals))
        expected_tables.append(np_table_items(expected_table))
        expected_digests.append(independent_digest(expected_table))
    # Sanity of the scenario itself: float32 drops the tiny increments, float64 would not.
    assert expected_table[1] == np.float32(1.0)
    assert 2 not in dict(expected_tables[3])

    with Ledger(tmp_path / "l.db") as led:
        assert led.last_round() == 0
        assert led.table_at(0) == []
        assert led.current_table() == []
        committed = []
        for i, (coefs, contribs) in enumerate(zip(rounds, contributions), start=1):
            cr = led.commit_round(i, attempt=i % 2, coefficients=coefs, contributions=contribs)
            committed.append(cr)
            assert cr.round == i
            assert cr.attempt == i % 2
            assert cr.coefficients == tuple(coefs)
            assert cr.totals == expected_totals[i - 1]
            assert cr.table_digest == expected_digests[i - 1]
            assert cr.num_updates == len(contribs)
            assert cr.num_examples == sum(c.num_examples for c in contribs)
            assert (cr.loss_before, cr.loss_after) == expected_losses[i - 1]
            assert led.last_round() == i

        for r in range(4):
            assert led.table_at(r) == expected_tables[r]
        assert led.current_table() == led.table_at(3) == expected_tables[3]
        assert table_digest(led.current_table()) == expected_digests[2]
        for r in (1, 2, 3):
            assert led.get_round(r) == committed[r - 1]
        assert led.rounds_between(0, 3) == committed
        assert led.rounds_between(1, 2) == committed[1:2]
        assert led.rounds_between(2, 99) == committed[2:]
        assert led.rounds_between(3, 3) == []
        assert led.contributions(1) == contributions[0]
        with pytest.raises(RoundNotFound):
            led.get_round(4)
        with pytest.raises(KeyError):
            led.get_round(0)
        with pytest.raises(RoundNotFound):
            led.table_at(4)


def test_many_random_rounds_match_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1234)
    table: dict[int, np.float32] = {}
    with Ledger(tmp_path / "l.db") as led:
        for r in range(1, 31):
            seeds = rng.choice(60, size=int(rng.integers(1, 25)), replace=False)
            values = (rng.standard_normal(len(seeds)) * 10.0 ** rng.integers(-6, 3)).astype(np.float32)
            coefs = [(int(s), float(v)) for s, v in zip(seeds, values)]
            for s, v in zip(seeds, values):
                table[int(s)] = np.float32(table.get(int(s), np.float32(0.0)) + v)
            cr = led.commit_round(r, 0, coefs, [])
            assert cr.table_digest == independent_digest(table)
            assert led.current_table() == np_table_items(table)
        assert led.table_at(30) == np_table_items(table)


# ---------------------------------------------------------- order and atomicity


def test_round_order_enforced(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        led.commit_round(1, 0, [(1, 0.5)], [contrib("a", 1, 1.0, 0.9, [(1, 0.5)])])
        before = snapshot(led)
        for bad in (3, 1, 0, -1):
            with pytest.raises(RoundOrderError):
                led.commit_round(bad, 0, [(2, 0.25)], [contrib("b", 1, 1.0, 0.9, [(2, 0.25)])])
            assert snapshot(led) == before
        cr = led.commit_round(2, 0, [(2, 0.25)], [])
        assert led.last_round() == 2
        assert cr.totals == ((2, 0.25),)


GOOD_ROUND_2 = [(1, 0.5), (3, -2.0)]


@pytest.mark.parametrize(
    ("coefficients", "contributions"),
    [
        pytest.param([(1, 0.5), (3, 0.1)], [], id="not-float32"),
        pytest.param([(1, 0.5), (3, 1.0), (1, 0.25)], [], id="duplicate-seed"),
        pytest.param([(1, float("nan"))], [], id="nan"),
        pytest.param([(1, float("inf"))], [], id="inf"),
        pytest.param([(-1, 0.5)], [], id="negative-seed"),
        pytest.param([(2**63, 0.5)], [], id="seed-too-large"),
        pytest.param([(True, 0.5)], [], id="bool-seed"),
        pytest.param([(1, "0.5")], [], id="str-coefficient"),
        pytest.param([(5, FLT_MAX)], [], id="total-overflows-float32"),
        pytest.param(
            GOOD_ROUND_2,
            [contrib("a", 1, 1.0, 0.5, []), contrib("a", 2, 1.0, 0.5, [])],
            id="duplicate-client",
        ),
        pytest.param(GOOD_ROUND_2, [contrib("a", 1, float("nan"), 0.5, [])], id="nan-loss"),
        pytest.param(GOOD_ROUND_2, [contrib("a", -1, 1.0, 0.5, [])], id="negative-examples"),
        pytest.param(GOOD_ROUND_2, [contrib("a", 1, 1.0, 0.5, [(1, float("inf"))])], id="inf-pair"),
    ],
)
def test_failed_commit_leaves_ledger_unchanged(
    tmp_path: Path, coefficients: list[tuple[Any, Any]], contributions: list[Contribution]
) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.commit_round(1, 0, [(1, 1.0), (5, FLT_MAX)], [contrib("z", 3, 2.0, 1.0, [(1, 1.0)])])
        before = snapshot(led)
        with pytest.raises(LedgerError):
            led.commit_round(2, 0, coefficients, contributions)
        assert snapshot(led) == before
    with Ledger(path) as led:  # a fresh connection sees the same
        assert snapshot(led) == before
        cr = led.commit_round(2, 0, GOOD_ROUND_2, [])
        assert cr.totals == ((1, 1.5), (3, -2.0))
        assert led.current_table() == [(1, 1.5), (3, -2.0), (5, FLT_MAX)]


def test_failure_midway_through_writes_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.commit_round(1, 0, [(1, 1.0)], [])
        before = snapshot(led)

        def boom(pairs: Any) -> str:
            raise RuntimeError("simulated failure after the round and coefficient rows were written")

        # Contributions are encoded while inserting, after rounds/coefficients/totals rows.
        monkeypatch.setattr(ledger_mod, "_encode_pairs", boom)
        with pytest.raises(RuntimeError, match="simulated"):
            led.commit_round(2, 0, [(1, 0.5), (2, 0.25)], [contrib("a", 1, 1.0, 0.5, [(1, 0.1)])])
        assert snapshot(led) == before
        monkeypatch.undo()
        cr = led.commit_round(2, 0, [(1, 0.5), (2, 0.25)], [contrib("a", 1, 1.0, 0.5, [(1, 0.1)])])
        assert cr.totals == ((1, 1.5), (2, 0.25))
    with Ledger(path) as led:
        assert led.last_round() == 2
        assert led.current_table() == [(1, 1.5), (2, 0.25)]


# ------------------------------------------------------------------ durability

ROUND_PLAN_SRC = """
def round_plan(r):
    # Deterministic from the round number: 1..19 distinct seeds, overlapping across rounds.
    n = 1 + (r * 7) % 19
    seeds = [(r * 13 + i * 5) % 97 + (2**62 if i % 3 == 0 else 0) for i in range(n)]
    return [(s, ((r * 31 + i * 17) % 33 - 16) / 64.0) for i, s in enumerate(seeds)]
"""
_ns: dict[str, Any] = {}
exec(ROUND_PLAN_SRC, _ns)
round_plan = _ns["round_plan"]

WRITER_SRC = ROUND_PLAN_SRC + """
import sys
sys.path.insert(0, sys.argv[1])
from coordinator.ledger import Contribution, Ledger

led = Ledger(sys.argv[2])
print("ready", led.last_round(), flush=True)
for _ in range(1_000_000):
    r = led.last_round() + 1
    plan = round_plan(r)
    led.commit_round(r, 0, plan, [Contribution("w%d" % r, r, 2.0, 1.0, tuple(plan))])
"""


def check_ledger_matches_plan(led: Ledger) -> int:
    assert led.integrity_check() == "ok"
    last = led.last_round()
    rounds = led.rounds_between(0, last)
    assert [cr.round for cr in rounds] == list(range(1, last + 1))
    table: dict[int, np.float32] = {}
    for cr in rounds:
        plan = round_plan(cr.round)
        assert cr.coefficients == tuple(plan)
        assert len(cr.totals) == len(plan)
        for seed, c in plan:
            table[seed] = np.float32(table.get(seed, np.float32(0.0)) + np.float32(c))
        assert cr.totals == tuple((s, float(table[s])) for s, _ in plan)
        assert cr.table_digest == independent_digest(table)
        assert cr.num_updates == 1
    assert led.current_table() == np_table_items(table)
    return last


def test_survives_sigkill_of_writer_process(tmp_path: Path) -> None:
    path = str(tmp_path / "l.db")
    rng = random.Random(20240601)
    last_seen = 0
    parent_commits = 0

    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER_SRC, str(REPO_ROOT), path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line.startswith("ready"), (line, proc.stderr.read() if proc.stderr else "")
            assert int(line.split()[1]) == last_seen
            try:
                proc.wait(timeout=rng.uniform(0.05, 0.4))
            except subprocess.TimeoutExpired:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        assert proc.returncode == -signal.SIGKILL

        with Ledger(path) as led:  # open runs quick_check and the table/digest cross-check
            last = check_ledger_matches_plan(led)
            assert last >= last_seen
            nxt = led.last_round() + 1
            plan = round_plan(nxt)
            cr = led.commit_round(nxt, 1, plan, [Contribution("parent", 1, 1.0, 1.0, tuple(plan))])
            assert cr.round == nxt
            parent_commits += 1
            last_seen = check_ledger_matches_plan(led)
            assert last_seen == nxt
    # The writer must actually have committed something, or the test proves nothing.
    assert last_seen > parent_commits + 6, last_seen


# ------------------------------------------------------- meta, fingerprints, clients


def test_set_meta_once_refuses_a_different_value(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        assert led.get_meta("federation_id") is None
        assert led.get_meta("schema_version") == str(ledger_mod.SCHEMA_VERSION)
        led.set_meta_once("federation_id", "fed-A")
        led.set_meta_once("federation_id", "fed-A")  # same value: no-op
        with pytest.raises(LedgerError) as excinfo:
            led.set_meta_once("federation_id", "fed-B")
        message = str(excinfo.value)
        assert "federation_id" in message and "fed-A" in message and "fed-B" in message
        assert led.get_meta("federation_id") == "fed-A"
    with Ledger(path) as led:
        with pytest.raises(LedgerError, match="fed-B"):
            led.set_meta_once("federation_id", "fed-B")
        assert led.get_meta("federation_id") == "fed-A"


def test_fingerprints_upsert(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        led.record_fingerprint(0, "a", "base-a")  # round 0 is the base model
        with pytest.raises(RoundNotFound):
            led.record_fingerprint(1, "a", "fp1")
        led.commit_round(1, 0, [(1, 0.5)], [])
        led.record_fingerprint(1, "a", "fp1")
        led.record_fingerprint(1, "b", "fp1")
        led.record_fingerprint(1, "a", "fp1-rereported")
        assert led.fingerprints(1) == {"a": "fp1-rereported", "b": "fp1"}
        assert led.fingerprints(0) == {"a": "base-a"}
        assert led.fingerprints(2) == {}


def test_record_client_keeps_first_seen(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        led.record_client("a", '{"ram_gb": 8}', "train")
        led.record_client("b", "{}", "eval")
        (a1,) = [c for c in led.clients() if c["client_id"] == "a"]
        led.record_client("a", '{"ram_gb": 16}', "eval")
        (a2,) = [c for c in led.clients() if c["client_id"] == "a"]
        assert a2["first_seen"] == a1["first_seen"]
        assert a2["last_seen"] >= a1["last_seen"]
        assert (a2["device_json"], a2["mode"]) == ('{"ram_gb": 16}', "eval")
        assert sorted(c["client_id"] for c in led.clients()) == ["a", "b"]
        assert set(a2) == {"client_id", "device_json", "mode", "first_seen", "last_seen"}
        with pytest.raises(LedgerError):
            led.record_client("c", "{not json", "train")
        assert len(led.clients()) == 2


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.set_meta_once("federation_id", "fed-A")
        led.commit_round(1, 0, [(3, 0.5), (1, -0.25)], [contrib("a", 4, 2.0, 1.0, [(3, 0.7)])])
        led.commit_round(2, 2, [(1, 0.25), (8, 1.0)], [contrib("b", 1, 1.0, 0.0, [(8, 2.0)])])
        led.record_fingerprint(2, "a", "fp-a")
        led.record_client("a", "{}", "train")
        before = (snapshot(led), led.fingerprints(2), led.clients())
    with Ledger(path) as led:
        assert (snapshot(led), led.fingerprints(2), led.clients()) == before
        assert led.get_meta("federation_id") == "fed-A"
        assert led.current_table() == [(3, 0.5), (8, 1.0)]  # seed 1 cancelled to zero
        assert led.integrity_check() == "ok"
        led.commit_round(3, 0, [(1, 1.0)], [])
        assert led.current_table() == [(1, 1.0), (3, 0.5), (8, 1.0)]


# ------------------------------------------------------------- guards on the file


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led._conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")  # type: ignore[union-attr]
    with pytest.raises(LedgerError, match="schema version '99'"):
        Ledger(path)


def test_a_version_1_ledger_gains_the_adaptive_settings_table_and_keeps_its_rounds(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.commit_round(1, 0, [(5, 0.25)], [])
        led._conn.execute("DROP TABLE adaptive_settings")  # type: ignore[union-attr]
        led._conn.execute("ALTER TABLE contributions DROP COLUMN learning_rate")  # type: ignore[union-attr]
        led._conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")  # type: ignore[union-attr]
    with Ledger(path) as led:
        assert led.get_meta("schema_version") == str(ledger_mod.SCHEMA_VERSION)
        assert led.last_round() == 1 and led.current_table() == [(5, 0.25)]
        assert led.adaptive_state("a", "droppeft") is None
        led.save_adaptive_state("a", "droppeft", {"arms": [1, 2]})
        led.save_adaptive_state("a", "droppeft", {"arms": [3]})  # replaced, not added
    with Ledger(path) as led:
        assert led.adaptive_state("a", "droppeft") == {"arms": [3]}
        assert led.adaptive_state("b", "droppeft") is None


def test_a_version_2_ledger_gains_the_contributions_learning_rate_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    old = ledger_mod.Contribution("a", 4, 2.0, 1.5, ((5, 0.5),))
    with Ledger(path) as led:
        led.commit_round(1, 0, [(5, 0.25)], [old])
        led._conn.execute("ALTER TABLE contributions DROP COLUMN learning_rate")  # type: ignore[union-attr]
        led._conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")  # type: ignore[union-attr]
    with Ledger(path) as led:
        assert led.get_meta("schema_version") == str(ledger_mod.SCHEMA_VERSION)
        assert led.contributions(1) == [old]  # learning_rate None: the federation's rate
        rated = dataclasses.replace(old, learning_rate=1.5e-6)
        led.commit_round(2, 0, [(6, 0.5)], [rated])
    with Ledger(path) as led:
        assert led.contributions(2) == [rated]
        with pytest.raises(ledger_mod.LedgerError, match="learning_rate"):
            led.commit_round(3, 0, [(7, 0.5)], [dataclasses.replace(old, learning_rate=0.0)])


def test_garbage_file_is_reported_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    path.write_bytes(b"this is not an sqlite database" * 200)
    with pytest.raises(LedgerCorrupt):
        Ledger(path)


def test_tampered_current_table_is_detected_on_open(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.commit_round(1, 0, [(1, 0.5)], [])
        led._conn.execute("UPDATE seed_totals SET total = 0.75 WHERE seed = 1")  # type: ignore[union-attr]
    with pytest.raises(LedgerCorrupt, match="digest"):
        Ledger(path)


def test_committed_rows_are_append_only(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        led.commit_round(1, 0, [(1, 0.5)], [contrib("a", 1, 1.0, 0.5, [])])
        conn = led._conn
        assert conn is not None
        for sql in (
            "UPDATE rounds SET attempt = 7",
            "DELETE FROM rounds",
            "UPDATE coefficients SET coefficient = 1.0",
            "DELETE FROM coefficients",
            "DELETE FROM contributions",
        ):
            with pytest.raises(Exception, match="append-only"):
                conn.execute(sql)
        assert led.get_round(1).coefficients == ((1, 0.5),)


def test_closed_ledger_refuses_use(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.db")
    led.close()
    led.close()
    with pytest.raises(LedgerClosed):
        led.last_round()


# ------------------------------------------------------------------ table_digest


def test_table_digest_layout() -> None:
    assert table_digest([]) == hashlib.sha256(b"").hexdigest()
    entries = [(0, 1.0), (5, -0.5), (2**63 - 1, FLT_MAX)]
    raw = (
        (0).to_bytes(8, "little") + bytes.fromhex("0000803f")
        + (5).to_bytes(8, "little") + bytes.fromhex("000000bf")
        + (2**63 - 1).to_bytes(8, "little") + bytes.fromhex("ffff7f7f")
    )
    assert table_digest(entries) == hashlib.sha256(raw).hexdigest()
    for bad in (
        [(5, 1.0), (0, 1.0)],  # not ascending
        [(1, 1.0), (1, 2.0)],  # duplicate seed
        [(1, 0.0)],  # zero total
        [(1, 0.1)],  # not a float32
        [(-1, 1.0)],
        [(2**63, 1.0)],
        [(1, float("inf"))],
    ):
        with pytest.raises(ValueError):
            table_digest(bad)


def test_committed_round_is_frozen(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        cr: CommittedRound = led.commit_round(1, 0, [(1, 0.5)], [])
    with pytest.raises(AttributeError):
        cr.round = 2  # type: ignore[misc]


def test_absurd_losses_do_not_fail_a_commit(tmp_path: Path) -> None:
    # Two losses near the float64 maximum overflow a weighted sum: the informative
    # round losses become None and the coefficients still commit.
    with Ledger(tmp_path / "l.db") as led:
        record = led.commit_round(1, 0, [(5, 0.25)], [contrib("a", 3, 1e308, 1.0, [(5, 0.1)]),
                                                     contrib("b", 2, 1e308, 2.0, [(5, 0.3)])])
        assert record.loss_before is None and record.loss_after == pytest.approx(1.4)
        assert led.last_round() == 1
