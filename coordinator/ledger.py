"""Append-only SQLite ledger of committed federation rounds.

The ledger is the coordinator's only durable state. Every committed round
stores its ordered (seed, coefficient) list together with each seed's
accumulated float32 total after the round, so the seed table as of any round
can be reconstructed and compared (by digest) with what clients hold.

This is the only module of the project that imports :mod:`sqlite3`.

Accumulation rule: for each seed, ``total_r = fl32(total_{r-1} + coefficient)``
where ``fl32`` rounds a Python float to the nearest float32 and a seed not yet
used has total ``0.0``.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from protocol import table as _table

__all__ = [
    "SCHEMA_VERSION",
    "MAX_SEED",
    "CommittedRound",
    "Contribution",
    "Ledger",
    "LedgerClosed",
    "LedgerCorrupt",
    "LedgerError",
    "RoundNotFound",
    "RoundOrderError",
    "fl32",
    "table_digest",
]

SCHEMA_VERSION = 3
# Version 2 added the adaptive_settings table; a version-1 ledger gains it when opened.
_ADAPTIVE_SETTINGS_TABLE = """CREATE TABLE adaptive_settings (
    client_id  TEXT NOT NULL,
    mode       TEXT NOT NULL,
    state_json TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (client_id, mode)
)"""
MAX_SEED = 2**63 - 1


class LedgerError(Exception):
    """Base class for every error raised by the ledger."""


class RoundOrderError(LedgerError):
    """A round was committed out of order (it must be ``last_round() + 1``)."""


class RoundNotFound(LedgerError, KeyError):
    """The requested round has not been committed."""

    # KeyError.__str__ would repr() the message and wrap it in quotes.
    __str__ = Exception.__str__


class LedgerCorrupt(LedgerError):
    """The database file failed an integrity check or holds inconsistent rows."""


class LedgerClosed(LedgerError):
    """The ledger was used after :meth:`Ledger.close`."""


def fl32(x: float) -> float:
    """:func:`protocol.table.fl32`, raising :class:`LedgerError` on overflow or non-finite."""
    try:
        return _table.fl32(x)
    except _table.TableError as exc:
        raise LedgerError(str(exc)) from exc


table_digest = _table.table_digest


@dataclass(frozen=True)
class Contribution:
    """One client's accepted update in a round.

    Attributes:
        client_id: Identifier of the contributing client.
        num_examples: Number of training examples the update was computed on.
        loss_before: Client-reported loss before applying its update.
        loss_after: Client-reported loss after applying its update.
        pairs: ``(seed, projected-gradient scalar)`` pairs exactly as sent.
        learning_rate: the client's own rate for the round (personalised learning rates,
            :mod:`coordinator.personal_lr`), or None: the federation's rate.
    """

    client_id: str
    num_examples: int
    loss_before: float
    loss_after: float
    pairs: tuple[tuple[int, float], ...]
    learning_rate: float | None = None


@dataclass(frozen=True)
class CommittedRound:
    """A round as committed to the ledger.

    Attributes:
        round: Round number (>= 1).
        attempt: Attempt number of the round that was committed.
        coefficients: ``(seed, coefficient)`` pairs in task order.
        totals: ``(seed, total)`` for the same seeds in the same order, the
            accumulated totals after this round.
        table_digest: :func:`table_digest` of the whole table after this round.
        num_updates: Number of contributions.
        num_examples: Sum of the contributions' example counts.
        loss_before: Example-weighted mean of ``loss_before`` over the
            contributions, or None when they cover no examples.
        loss_after: Example-weighted mean of ``loss_after``, likewise.
        committed_at: Unix time of the commit.
    """

    round: int
    attempt: int
    coefficients: tuple[tuple[int, float], ...]
    totals: tuple[tuple[int, float], ...]
    table_digest: str
    num_updates: int
    num_examples: int
    loss_before: float | None
    loss_after: float | None
    committed_at: float


_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE rounds (
    round            INTEGER PRIMARY KEY CHECK (round >= 1),
    attempt          INTEGER NOT NULL CHECK (attempt >= 0),
    num_coefficients INTEGER NOT NULL CHECK (num_coefficients >= 0),
    table_digest     TEXT    NOT NULL,
    num_updates      INTEGER NOT NULL CHECK (num_updates >= 0),
    num_examples     INTEGER NOT NULL CHECK (num_examples >= 0),
    loss_before      REAL,
    loss_after       REAL,
    committed_at     REAL    NOT NULL
);
CREATE TABLE coefficients (
    round       INTEGER NOT NULL REFERENCES rounds(round),
    position    INTEGER NOT NULL CHECK (position >= 0),
    seed        INTEGER NOT NULL CHECK (typeof(seed) = 'integer' AND seed >= 0),
    coefficient REAL    NOT NULL,
    total_after REAL    NOT NULL,
    PRIMARY KEY (round, position),
    UNIQUE (round, seed)
) WITHOUT ROWID;
CREATE INDEX coefficients_by_seed ON coefficients (seed, round);
CREATE TABLE seed_totals (
    seed  INTEGER PRIMARY KEY CHECK (seed >= 0),
    total REAL    NOT NULL,
    round INTEGER NOT NULL REFERENCES rounds(round)
);
CREATE TABLE contributions (
    round        INTEGER NOT NULL REFERENCES rounds(round),
    position     INTEGER NOT NULL CHECK (position >= 0),
    client_id    TEXT    NOT NULL,
    num_examples INTEGER NOT NULL CHECK (num_examples >= 0),
    loss_before  REAL    NOT NULL,
    loss_after   REAL    NOT NULL,
    pairs_json   TEXT    NOT NULL,
    learning_rate REAL,
    PRIMARY KEY (round, position),
    UNIQUE (round, client_id)
) WITHOUT ROWID;
CREATE TABLE fingerprints (
    round       INTEGER NOT NULL CHECK (round >= 0),
    client_id   TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    reported_at REAL    NOT NULL,
    PRIMARY KEY (round, client_id)
) WITHOUT ROWID;
CREATE TABLE clients (
    client_id   TEXT PRIMARY KEY,
    device_json TEXT NOT NULL,
    mode        TEXT NOT NULL,
    first_seen  REAL NOT NULL,
    last_seen   REAL NOT NULL
);
""" + _ADAPTIVE_SETTINGS_TABLE + ";\n"

_APPEND_ONLY_TABLES = ("rounds", "coefficients", "contributions")


def _schema_statements() -> list[str]:
    statements = [s.strip() for s in _SCHEMA.split(";") if s.strip()]
    for table in _APPEND_ONLY_TABLES:
        for op in ("UPDATE", "DELETE"):
            statements.append(
                f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            )
    return statements


def _check_seed(seed: Any, what: str) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise LedgerError(f"{what}: seed {seed!r} is not an integer")
    value = int(seed)
    if not 0 <= value <= MAX_SEED:
        raise LedgerError(f"{what}: seed {value} is outside [0, 2**63)")
    return value


def _check_real(value: Any, what: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise LedgerError(f"{what}: {value!r} is not a real number")
    out = float(value)
    if not math.isfinite(out):
        raise LedgerError(f"{what}: {out!r} is not finite")
    return out


def _validate_coefficients(
    coefficients: Sequence[tuple[int, float]],
) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    seen: set[int] = set()
    for position, item in enumerate(coefficients):
        try:
            raw_seed, raw_coef = item
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"coefficient #{position} is not a (seed, coefficient) pair") from exc
        seed = _check_seed(raw_seed, f"coefficient #{position}")
        if seed in seen:
            raise LedgerError(f"duplicate seed {seed} in coefficients (position {position})")
        seen.add(seed)
        coef = _check_real(raw_coef, f"coefficient #{position} (seed {seed})")
        if fl32(coef) != coef:
            raise LedgerError(
                f"coefficient #{position} (seed {seed}) = {coef!r} is not exactly a float32"
            )
        # SQLite does not reliably keep the sign of a stored -0.0; normalise so
        # what we return from commit_round equals what get_round reads back.
        out.append((seed, coef + 0.0))
    return out


def _validate_contributions(contributions: Sequence[Contribution]) -> list[Contribution]:
    out: list[Contribution] = []
    seen: set[str] = set()
    for position, contrib in enumerate(contributions):
        where = f"contribution #{position}"
        if not isinstance(contrib, Contribution):
            raise LedgerError(f"{where} is not a Contribution: {contrib!r}")
        if not isinstance(contrib.client_id, str) or not contrib.client_id:
            raise LedgerError(f"{where}: client_id must be a non-empty str")
        where = f"{where} (client {contrib.client_id!r})"
        if contrib.client_id in seen:
            raise LedgerError(f"{where}: client contributed more than once to the round")
        seen.add(contrib.client_id)
        n = contrib.num_examples
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise LedgerError(f"{where}: num_examples {n!r} must be a non-negative int")
        pairs: list[tuple[int, float]] = []
        for i, pair in enumerate(contrib.pairs):
            try:
                raw_seed, raw_value = pair
            except (TypeError, ValueError) as exc:
                raise LedgerError(f"{where}: pair #{i} is not a (seed, value) pair") from exc
            pairs.append(
                (_check_seed(raw_seed, f"{where} pair #{i}"), _check_real(raw_value, f"{where} pair #{i}"))
            )
        out.append(
            Contribution(
                client_id=contrib.client_id,
                num_examples=int(n),
                loss_before=_check_real(contrib.loss_before, f"{where} loss_before"),
                loss_after=_check_real(contrib.loss_after, f"{where} loss_after"),
                pairs=tuple(pairs),
                learning_rate=_check_rate(contrib.learning_rate, f"{where} learning_rate"),
            )
        )
    return out


def _check_rate(value: object, where: str) -> float | None:
    if value is None:
        return None
    rate = _check_real(value, where)
    if not rate > 0:
        raise LedgerError(f"{where}: {rate!r} must be > 0")
    return rate


def _weighted_mean(values: Iterable[tuple[int, float]]) -> float | None:
    """The example-weighted mean of the reported losses (informative), or None when
    there is no weight or the mean is not a finite float (absurd losses must not make a
    commit fail: the round's coefficients are what matters)."""
    items = list(values)
    weight = sum(n for n, _ in items)
    if weight == 0:
        return None
    try:
        mean = math.fsum(n * v for n, v in items) / weight
    except OverflowError:
        return None
    return mean if math.isfinite(mean) else None


def _encode_pairs(pairs: tuple[tuple[int, float], ...]) -> str:
    # repr-based float formatting in json round-trips doubles exactly.
    return json.dumps([[seed, value] for seed, value in pairs], allow_nan=False)


def _decode_pairs(text: str) -> tuple[tuple[int, float], ...]:
    return tuple((int(seed), float(value)) for seed, value in json.loads(text))


class Ledger:
    """Append-only round ledger backed by one SQLite file (WAL mode).

    Committed rounds, their coefficient rows and contributions are never
    updated or deleted (triggers enforce this); the per-seed current-total rows
    are the only rows changed in place, and only inside the commit
    transaction. Intended for use from a single thread (the coordinator's
    event loop); other processes may open the same file, and writers serialise
    through ``BEGIN IMMEDIATE`` and the busy timeout.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 10.0) -> None:
        """Open or create the ledger at ``path``.

        Args:
            path: Database file path; created (with the schema) if absent.
            busy_timeout_s: How long to wait for another writer's lock.

        Raises:
            LedgerCorrupt: If the file is not a database or fails
                ``PRAGMA quick_check`` or the stored table disagrees with the
                last round's digest.
            LedgerError: If the file is a database of an unknown schema
                version, is not a ledger, or cannot be opened in WAL mode.
        """
        if busy_timeout_s < 0:
            raise LedgerError(f"busy_timeout_s must be >= 0, got {busy_timeout_s!r}")
        self._path = os.fspath(path)
        self._conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=busy_timeout_s)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self._path!r}: {exc}") from exc
        self._conn = conn
        try:
            with self._translate("open"):
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                self._quick_check()
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal" and self._path != ":memory:":
                    raise LedgerError(f"cannot put {self._path!r} in WAL mode (got {mode!r})")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
                self._init_schema()
                self._verify_current_table()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ plumbing

    @property
    def path(self) -> str:
        """The database file path as given."""
        return self._path

    def close(self) -> None:
        """Close the connection; further use raises :class:`LedgerClosed`. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerClosed(f"ledger {self._path!r} is closed")
        return self._conn

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """Re-raise sqlite3 errors as LedgerError (LedgerCorrupt for corruption)."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, (sqlite3.OperationalError, sqlite3.IntegrityError)):
                raise LedgerError(f"{what} failed on {self._path!r}: {exc}") from exc
            # DatabaseError proper: "file is not a database", "malformed" etc.
            raise LedgerCorrupt(f"{what} failed on {self._path!r}: {exc}") from exc
        except sqlite3.Error as exc:
            raise LedgerError(f"{what} failed on {self._path!r}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self, what: str, *, write: bool) -> Iterator[sqlite3.Connection]:
        """Run the body in one transaction; roll back on any exception.

        Write transactions use ``BEGIN IMMEDIATE`` so the write lock is taken
        up front (waiting up to the busy timeout) instead of failing to upgrade
        a read lock halfway through. Read transactions give a consistent
        snapshot across several SELECTs.
        """
        conn = self._db()
        with self._translate(what):
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _quick_check(self) -> None:
        rows = [r[0] for r in self._db().execute("PRAGMA quick_check").fetchall()]
        if rows != ["ok"]:
            raise LedgerCorrupt(f"quick_check failed on {self._path!r}: {'; '.join(map(str, rows))}")

    def _init_schema(self) -> None:
        with self._transaction("schema setup", write=True) as conn:
            tables = {
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                )
            }
            if not tables:
                # Statement by statement: executescript() would COMMIT our transaction.
                for statement in _schema_statements():
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                return
            if "meta" not in tables:
                raise LedgerError(f"{self._path!r} is an SQLite database but not a ledger (no meta table)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                raise LedgerError(f"{self._path!r} has no schema_version; not a ledger")
            if row[0] in ("1", "2"):  # additive migrations: nothing of the older version changes
                if row[0] == "1":
                    conn.execute(_ADAPTIVE_SETTINGS_TABLE)
                # Version 3: a contribution's own learning rate (NULL: the federation's).
                conn.execute("ALTER TABLE contributions ADD COLUMN learning_rate REAL")
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                return
            if row[0] != str(SCHEMA_VERSION):
                raise LedgerError(
                    f"{self._path!r} has ledger schema version {row[0]!r}; "
                    f"this code supports only {SCHEMA_VERSION}"
                )

    def _verify_current_table(self) -> None:
        """Cross-check the current-total rows against the last round's digest."""
        with self._transaction("open-time consistency check", write=False) as conn:
            row = conn.execute(
                "SELECT round, table_digest FROM rounds ORDER BY round DESC LIMIT 1"
            ).fetchone()
            table = self._current_table(conn)
        expected = row[1] if row is not None else table_digest(())
        try:
            actual = table_digest(table)
        except ValueError as exc:
            raise LedgerCorrupt(f"current table in {self._path!r} is malformed: {exc}") from exc
        if actual != expected:
            raise LedgerCorrupt(
                f"current table in {self._path!r} does not match the digest of round "
                f"{row[0] if row else 0}: {actual} != {expected}"
            )

    # ---------------------------------------------------------------------- meta

    def get_meta(self, key: str) -> str | None:
        """Return the meta value for ``key``, or None if unset."""
        with self._translate("get_meta"):
            row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta_once(self, key: str, value: str) -> None:
        """Set ``key`` to ``value`` unless already set; re-setting the same value is a no-op.

        Args:
            key: Meta key (e.g. the federation identity).
            value: Value to store.

        Raises:
            LedgerError: If ``key`` already holds a different value.
        """
        if not isinstance(key, str) or not isinstance(value, str):
            raise LedgerError(f"meta key and value must be str, got {key!r}: {value!r}")
        with self._transaction("set_meta_once", write=True) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            elif row[0] != value:
                raise LedgerError(
                    f"meta {key!r} is already {row[0]!r} in {self._path!r}; "
                    f"refusing to change it to {value!r}"
                )

    # -------------------------------------------------------------------- rounds

    def last_round(self) -> int:
        """Return the last committed round number, or 0 if none."""
        with self._translate("last_round"):
            return self._last_round(self._db())

    @staticmethod
    def _last_round(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT MAX(round) FROM rounds").fetchone()
        return 0 if row[0] is None else int(row[0])

    def commit_round(
        self,
        round: int,
        attempt: int,
        coefficients: Sequence[tuple[int, float]],
        contributions: Sequence[Contribution],
    ) -> CommittedRound:
        """Atomically commit round ``round``.

        Args:
            round: Must be ``last_round() + 1``.
            attempt: Attempt number (>= 0) of the round being committed.
            coefficients: ``(seed, coefficient)`` pairs in task order; seeds
                distinct ints in ``[0, 2**63)``, coefficients finite and
                exactly representable as float32. May be empty.
            contributions: Accepted client updates (one per client) the
                coefficients were aggregated from.

        Returns:
            The committed round, as :meth:`get_round` would return it.

        Raises:
            RoundOrderError: If ``round`` is not ``last_round() + 1``.
            LedgerError: On invalid input, or if a total would overflow
                float32. Nothing is written in any failure case.
        """
        if not isinstance(round, int) or isinstance(round, bool) or round < 1:
            raise RoundOrderError(f"round must be an int >= 1, got {round!r}")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
            raise LedgerError(f"attempt must be an int >= 0, got {attempt!r}")
        coefs = _validate_coefficients(coefficients)
        contribs = _validate_contributions(contributions)
        num_examples = sum(c.num_examples for c in contribs)
        loss_before = _weighted_mean((c.num_examples, c.loss_before) for c in contribs)
        loss_after = _weighted_mean((c.num_examples, c.loss_after) for c in contribs)

        with self._transaction(f"commit of round {round}", write=True) as conn:
            last = self._last_round(conn)
            if round != last + 1:
                raise RoundOrderError(
                    f"cannot commit round {round}: last committed round is {last}, "
                    f"expected {last + 1}"
                )
            table = {int(s): float(t) for s, t in conn.execute("SELECT seed, total FROM seed_totals")}
            totals: list[tuple[int, float]] = []
            for seed, coef in coefs:
                try:
                    total = fl32(float(table.get(seed, 0.0)) + coef)
                except LedgerError as exc:
                    raise LedgerError(f"round {round}: total for seed {seed}: {exc}") from exc
                totals.append((seed, total))
                table[seed] = total
            digest = table_digest(sorted((s, t) for s, t in table.items() if t != 0.0))
            committed_at = time.time()

            conn.execute(
                "INSERT INTO rounds (round, attempt, num_coefficients, table_digest, num_updates,"
                " num_examples, loss_before, loss_after, committed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (round, attempt, len(coefs), digest, len(contribs), num_examples,
                 loss_before, loss_after, committed_at),
            )
            conn.executemany(
                "INSERT INTO coefficients (round, position, seed, coefficient, total_after)"
                " VALUES (?, ?, ?, ?, ?)",
                [(round, i, seed, coef, total)
                 for i, ((seed, coef), (_, total)) in enumerate(zip(coefs, totals))],
            )
            conn.executemany(
                "INSERT INTO seed_totals (seed, total, round) VALUES (?, ?, ?)"
                " ON CONFLICT (seed) DO UPDATE SET total = excluded.total, round = excluded.round",
                [(seed, total, round) for seed, total in totals],
            )
            conn.executemany(
                "INSERT INTO contributions (round, position, client_id, num_examples,"
                " loss_before, loss_after, pairs_json, learning_rate) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(round, i, c.client_id, c.num_examples, c.loss_before, c.loss_after,
                  _encode_pairs(c.pairs), c.learning_rate) for i, c in enumerate(contribs)],
            )

        return CommittedRound(
            round=round,
            attempt=attempt,
            coefficients=tuple(coefs),
            totals=tuple(totals),
            table_digest=digest,
            num_updates=len(contribs),
            num_examples=num_examples,
            loss_before=loss_before,
            loss_after=loss_after,
            committed_at=committed_at,
        )

    def get_round(self, round: int) -> CommittedRound:
        """Return committed round ``round``.

        Raises:
            RoundNotFound: If the round has not been committed.
            LedgerCorrupt: If the round's coefficient rows are incomplete.
        """
        rounds = self._load_rounds(round - 1, round)
        if not rounds:
            raise RoundNotFound(f"round {round} is not committed in {self._path!r}")
        return rounds[0]

    def rounds_between(self, after: int, upto: int) -> list[CommittedRound]:
        """Return the committed rounds ``r`` with ``after < r <= upto``, ascending.

        Rounds beyond :meth:`last_round` simply do not appear; ``upto <= after``
        gives an empty list.

        Raises:
            LedgerError: If ``after`` is negative.
        """
        if after < 0:
            raise LedgerError(f"rounds_between: after must be >= 0, got {after}")
        if upto <= after:
            return []
        return self._load_rounds(after, upto)

    def _load_rounds(self, after: int, upto: int) -> list[CommittedRound]:
        with self._transaction("reading rounds", write=False) as conn:
            round_rows = conn.execute(
                "SELECT round, attempt, num_coefficients, table_digest, num_updates, num_examples,"
                " loss_before, loss_after, committed_at FROM rounds"
                " WHERE round > ? AND round <= ? ORDER BY round",
                (after, upto),
            ).fetchall()
            coef_rows = conn.execute(
                "SELECT round, position, seed, coefficient, total_after FROM coefficients"
                " WHERE round > ? AND round <= ? ORDER BY round, position",
                (after, upto),
            ).fetchall()
        by_round: dict[int, list[tuple[int, int, float, float]]] = {}
        for r, position, seed, coef, total in coef_rows:
            by_round.setdefault(int(r), []).append((int(position), int(seed), float(coef), float(total)))
        out: list[CommittedRound] = []
        for r, attempt, n_coef, digest, n_upd, n_ex, lb, la, at in round_rows:
            rows = by_round.get(int(r), [])
            if len(rows) != n_coef or [p for p, *_ in rows] != list(range(n_coef)):
                raise LedgerCorrupt(
                    f"round {r} in {self._path!r} should have {n_coef} coefficient rows, found {len(rows)}"
                )
            out.append(
                CommittedRound(
                    round=int(r),
                    attempt=int(attempt),
                    coefficients=tuple((seed, coef) for _, seed, coef, _ in rows),
                    totals=tuple((seed, total) for _, seed, _, total in rows),
                    table_digest=digest,
                    num_updates=int(n_upd),
                    num_examples=int(n_ex),
                    loss_before=None if lb is None else float(lb),
                    loss_after=None if la is None else float(la),
                    committed_at=float(at),
                )
            )
        return out

    def contributions(self, round: int) -> list[Contribution]:
        """Return the contributions stored with committed round ``round``, in commit order.

        Raises:
            RoundNotFound: If the round has not been committed.
        """
        with self._transaction("reading contributions", write=False) as conn:
            if conn.execute("SELECT 1 FROM rounds WHERE round = ?", (round,)).fetchone() is None:
                raise RoundNotFound(f"round {round} is not committed in {self._path!r}")
            rows = conn.execute(
                "SELECT client_id, num_examples, loss_before, loss_after, pairs_json, learning_rate"
                " FROM contributions WHERE round = ? ORDER BY position",
                (round,),
            ).fetchall()
        return [
            Contribution(
                client_id=cid,
                num_examples=int(n),
                loss_before=float(lb),
                loss_after=float(la),
                pairs=_decode_pairs(pairs),
                learning_rate=None if rate is None else float(rate),
            )
            for cid, n, lb, la, pairs, rate in rows
        ]

    # -------------------------------------------------------------------- tables

    def table_at(self, round: int) -> list[tuple[int, float]]:
        """Return the seed table as of round ``round`` (0 gives ``[]``).

        Returns:
            ``(seed, total)`` in ascending seed order, nonzero totals only.

        Raises:
            RoundNotFound: If ``round`` is negative or beyond :meth:`last_round`.
        """
        with self._transaction("table_at", write=False) as conn:
            last = self._last_round(conn)
            if not 0 <= round <= last:
                raise RoundNotFound(f"round {round} is not committed in {self._path!r} (last is {last})")
            # SQLite guarantees the bare column total_after comes from the row
            # holding MAX(round) in each group, i.e. the latest total per seed.
            rows = conn.execute(
                "SELECT seed, total_after, MAX(round) FROM coefficients"
                " WHERE round <= ? GROUP BY seed ORDER BY seed",
                (round,),
            ).fetchall()
        return [(int(seed), float(total)) for seed, total, _ in rows if total != 0.0]

    def current_table(self) -> list[tuple[int, float]]:
        """Return the seed table after the last committed round (ascending seed, nonzero totals)."""
        with self._translate("current_table"):
            return self._current_table(self._db())

    @staticmethod
    def _current_table(conn: sqlite3.Connection) -> list[tuple[int, float]]:
        rows = conn.execute("SELECT seed, total FROM seed_totals WHERE total != 0 ORDER BY seed")
        return [(int(seed), float(total)) for seed, total in rows]

    # -------------------------------------------------------------- fingerprints

    def record_fingerprint(self, round: int, client_id: str, fingerprint: str) -> None:
        """Record (or replace) ``client_id``'s model fingerprint after ``round``.

        Args:
            round: A committed round, or 0 for the base model.
            client_id: Reporting client.
            fingerprint: Opaque fingerprint string.

        Raises:
            RoundNotFound: If ``round`` is negative or not yet committed.
        """
        if not isinstance(client_id, str) or not isinstance(fingerprint, str):
            raise LedgerError("client_id and fingerprint must be str")
        with self._transaction("record_fingerprint", write=True) as conn:
            last = self._last_round(conn)
            if not 0 <= round <= last:
                raise RoundNotFound(
                    f"cannot record a fingerprint for round {round}: last committed round is {last}"
                )
            conn.execute(
                "INSERT INTO fingerprints (round, client_id, fingerprint, reported_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (round, client_id) DO UPDATE SET"
                " fingerprint = excluded.fingerprint, reported_at = excluded.reported_at",
                (round, client_id, fingerprint, time.time()),
            )

    def fingerprints(self, round: int) -> dict[str, str]:
        """Return ``{client_id: fingerprint}`` reported for ``round``."""
        with self._translate("fingerprints"):
            rows = self._db().execute(
                "SELECT client_id, fingerprint FROM fingerprints WHERE round = ? ORDER BY client_id",
                (round,),
            ).fetchall()
        return {cid: fp for cid, fp in rows}

    # ------------------------------------------------------------------- clients

    def record_client(self, client_id: str, device_json: str, mode: str) -> None:
        """Insert or refresh a client; ``first_seen`` is kept, the rest is replaced.

        Raises:
            LedgerError: If ``device_json`` is not valid JSON.
        """
        if not isinstance(client_id, str) or not client_id:
            raise LedgerError(f"client_id must be a non-empty str, got {client_id!r}")
        if not isinstance(mode, str):
            raise LedgerError(f"mode must be a str, got {mode!r}")
        try:
            json.loads(device_json)
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"device_json for client {client_id!r} is not valid JSON: {exc}") from exc
        now = time.time()
        with self._transaction("record_client", write=True) as conn:
            conn.execute(
                "INSERT INTO clients (client_id, device_json, mode, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (client_id) DO UPDATE SET device_json = excluded.device_json,"
                " mode = excluded.mode, last_seen = excluded.last_seen",
                (client_id, device_json, mode, now, now),
            )

    def save_adaptive_state(self, client_id: str, mode: str, state: dict[str, Any]) -> None:
        """Keep the coordinator's adaptive state (a bandit's) for a client's mode."""
        text = json.dumps(state, sort_keys=True)
        with self._transaction("save_adaptive_state", write=True) as conn:
            conn.execute(
                "INSERT INTO adaptive_settings (client_id, mode, state_json, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (client_id, mode) DO UPDATE SET state_json = excluded.state_json,"
                " updated_at = excluded.updated_at", (client_id, mode, text, time.time()))

    def adaptive_state(self, client_id: str, mode: str) -> dict[str, Any] | None:
        """The state :meth:`save_adaptive_state` kept, or None."""
        with self._transaction("adaptive_state", write=False) as conn:
            row = conn.execute("SELECT state_json FROM adaptive_settings WHERE client_id = ? AND mode = ?",
                               (client_id, mode)).fetchone()
        return None if row is None else json.loads(row[0])

    def clients(self) -> list[dict[str, Any]]:
        """Return all known clients ordered by first_seen, then client_id.

        Returns:
            Dicts with keys ``client_id``, ``device_json``, ``mode``,
            ``first_seen`` and ``last_seen`` (unix times).
        """
        with self._translate("clients"):
            rows = self._db().execute(
                "SELECT client_id, device_json, mode, first_seen, last_seen FROM clients"
                " ORDER BY first_seen, client_id"
            ).fetchall()
        return [
            {"client_id": cid, "device_json": dev, "mode": mode,
             "first_seen": float(first), "last_seen": float(last)}
            for cid, dev, mode, first, last in rows
        ]

    # ----------------------------------------------------------------- integrity

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check`` and return its result (``"ok"`` when healthy)."""
        with self._translate("integrity_check"):
            rows = self._db().execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)
