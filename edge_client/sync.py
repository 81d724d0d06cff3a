"""Keeping the client's model equal to the ledger's model (PROTOCOL.md §6).

The ledger defines the model after round ``r`` exactly, from the base weights theta_0:

* if ``r`` is a rebase round (``r % rebase_every == 0``):
  ``theta_r = theta_0`` then, for each table entry in ascending seed order with a
  nonzero total, ``theta <- fl32(theta + total * z(seed))``;
* otherwise ``theta_r = theta_{r-1}`` then the round's coefficients in task order.

So catching up from any distance costs at most one table (≤ K entries, K the seed-pool
size) plus ``rebase_every - 1`` rounds: bounded by K·d, not by the length of history.

:class:`ModelSync` holds the client's replica of the table, the base copy and the
round-start snapshot, and moves the parameter space from one canonical state to the next.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from edge_client.space import HostCopy, ParameterSpace
from protocol.table import accumulate, sorted_entries, table_digest

__all__ = ["ModelSync", "SyncError", "RoundCoefficients"]

logger = logging.getLogger(__name__)


class SyncError(RuntimeError):
    """The client cannot reach the ledger's state from what it holds or was sent."""


@dataclass(frozen=True)
class RoundCoefficients:
    """One committed round as a client needs it: its number and coefficients in order."""

    round: int
    coefficients: tuple[tuple[int, float], ...]


class ModelSync:
    """The client's view of the ledger and the canonical state of its parameter space.

    Args:
        space: the parameter space, holding theta_0 when this is built.
        rebase_every: the federation's rebase interval (>= 1).
        copies_where: "memory" or "file" for the base copy and round-start snapshot.
        copies_dir: where file copies go (None: :func:`edge_client.space.round_copy_directory`).
        copies_owner: whose copies they are (the client id), part of the files' names.
    """

    def __init__(self, space: ParameterSpace, *, rebase_every: int, copies_where: str = "memory",
                 copies_dir: str | os.PathLike | None = None, copies_owner: str = "edgefed") -> None:
        if rebase_every < 1:
            raise ValueError(f"rebase_every must be >= 1, got {rebase_every}")
        self.space = space
        self.rebase_every = rebase_every
        self.base = HostCopy(space.numel, where=copies_where, directory=copies_dir,  # type: ignore[arg-type]
                             owner=copies_owner, role="base")
        self.base.save(space)
        # The round-start snapshot is only needed between rebases.
        self.snapshot = (
            HostCopy(space.numel, where=copies_where, directory=copies_dir,  # type: ignore[arg-type]
                     owner=copies_owner, role="snapshot")
            if rebase_every > 1
            else None
        )
        self.round = 0
        self.snapshot_round = -1
        self.table: dict[int, float] = {}
        self.drifted = False  # local training moved the space off theta_round
        self._progress: _ProgressCounter | None = None  # set during catch_up only
        self._mark_canonical()

    # -- queries -----------------------------------------------------------------

    def table_digest(self) -> str:
        return table_digest(sorted_entries(self.table))

    def is_rebase(self, round_number: int) -> bool:
        return round_number % self.rebase_every == 0

    # -- transitions -------------------------------------------------------------

    def begin_local_training(self, base_round: int) -> None:
        """Called before an engine trains on top of theta_{base_round}."""
        if base_round != self.round or self.drifted:
            raise SyncError(
                f"task is based on round {base_round} but the model holds round {self.round}"
                + (" (drifted)" if self.drifted else "")
            )
        self.drifted = True

    def discard_local_training(self) -> None:
        """Return to the canonical theta_round after local training that will not count."""
        if self.drifted:
            self._reach_current()

    def apply_commit(self, round_number: int, coefficients: Sequence[tuple[int, float]],
                     totals: Sequence[tuple[int, float]] | None = None,
                     expected_digest: str | None = None) -> None:
        """Move from theta_{round-1} to theta_round.

        Args:
            round_number: must be ``self.round + 1``.
            coefficients: the round's (seed, coefficient) pairs in task order.
            totals: the coordinator's new totals for those seeds; when given they must
                equal the client's own accumulation (a cheap consistency check).
            expected_digest: the table digest after the round, if the coordinator sent one.
        """
        if round_number != self.round + 1:
            raise SyncError(f"commit of round {round_number} but the model holds round {self.round}")
        new_table = dict(self.table)
        for seed, coefficient in coefficients:
            new_table[seed] = accumulate(new_table.get(seed, 0.0), coefficient)
        if totals is not None:
            for seed, total in totals:
                if new_table.get(seed, 0.0) != total:
                    raise SyncError(
                        f"round {round_number}: total of seed {seed} is {total!r} at the "
                        f"coordinator but {new_table.get(seed, 0.0)!r} here"
                    )
        if expected_digest is not None:
            got = table_digest(sorted_entries(new_table))
            if got != expected_digest:
                raise SyncError(f"round {round_number}: table digest {got} != coordinator's {expected_digest}")
        self.table = new_table
        self.round = round_number
        if self.is_rebase(round_number):
            self._rebuild_from_table()
        else:
            self._restore_round_start()
            self._apply_pairs(coefficients)
        self._mark_canonical()

    def catch_up(self, base_round: int, table: Iterable[tuple[int, float]],
                 rounds: Sequence[RoundCoefficients], target_digest: str,
                 progress: Callable[[int, int], None] | None = None) -> None:
        """Jump to ``base_round + len(rounds)`` from a sync response.

        ``table`` is the ledger's table as of ``base_round`` (a rebase round, or 0), and
        ``rounds`` the committed rounds after it. If anything does not check out, the
        replica is reset to the base weights (round 0, empty table) before SyncError is
        raised, so no unverified state is ever reported or trained on. ``progress``, when
        given, is called as ``progress(directions_applied, directions_total)`` as the
        replay goes (a full-model replay can take minutes).
        """
        table = list(table)
        total = len(table) + sum(len(entry.coefficients) for entry in rounds)
        self._progress = None if progress is None else _ProgressCounter(progress, total)
        try:
            self._catch_up(base_round, table, rounds, target_digest)
        except Exception:
            self._progress = None
            self.table = {}
            self.round = 0
            self.base.restore(self.space)
            self._mark_canonical()
            raise
        self._progress = None

    def _catch_up(self, base_round: int, table: Iterable[tuple[int, float]],
                  rounds: Sequence[RoundCoefficients], target_digest: str) -> None:
        if base_round and not self.is_rebase(base_round):
            raise SyncError(f"sync base round {base_round} is not a rebase round")
        self.table = {seed: total for seed, total in table}
        self.round = base_round
        self._rebuild_from_table()
        for expected, entry in enumerate(rounds, start=base_round + 1):
            if entry.round != expected:
                raise SyncError(f"sync rounds are not consecutive: got {entry.round}, expected {expected}")
            for seed, coefficient in entry.coefficients:
                self.table[seed] = accumulate(self.table.get(seed, 0.0), coefficient)
            self.round = entry.round
            if self.is_rebase(entry.round):
                self._rebuild_from_table()
            else:
                self._apply_pairs(entry.coefficients)
        digest = self.table_digest()
        if digest != target_digest:
            raise SyncError(f"after sync the table digest is {digest}, coordinator says {target_digest}")
        self._mark_canonical()

    # -- internals ---------------------------------------------------------------

    def _apply_pairs(self, pairs: Iterable[tuple[int, float]]) -> None:
        progress = self._progress
        for seed, coefficient in pairs:
            self.space.apply(seed, coefficient)
            if progress is not None:
                progress.step()

    def _rebuild_from_table(self) -> None:
        self.base.restore(self.space)
        entries = sorted_entries(self.table)
        logger.debug("rebuilding round %d from theta_0 and %d seeds", self.round, len(entries))
        self._apply_pairs(entries)

    def _restore_round_start(self) -> None:
        """Called by apply_commit after ``self.round`` advanced: put the previous round's
        canonical state back if local training moved the space off it."""
        if self.drifted:
            self._restore_canonical(self.round - 1)

    def _reach_current(self) -> None:
        self._restore_canonical(self.round)
        self.drifted = False

    def _restore_canonical(self, round_number: int) -> None:
        if self.snapshot is not None:
            if self.snapshot_round != round_number:
                raise SyncError(f"round-start copy holds round {self.snapshot_round}, needed round {round_number}")
            self.snapshot.restore(self.space)
        elif self.is_rebase(round_number):
            # Without a snapshot (rebase_every == 1) every round is a table rebuild.
            saved_round = self.round
            self.round = round_number
            self._rebuild_from_table()
            self.round = saved_round
        else:
            raise SyncError(f"no copy of round {round_number} to restore")

    def _mark_canonical(self) -> None:
        # The snapshot always holds the canonical state of the current round: the next
        # commit may not need it (a rebase), but discarding local training always does.
        self.drifted = False
        if self.snapshot is not None:
            self.snapshot.save(self.space)
            self.snapshot_round = self.round


class _ProgressCounter:
    """Counts applied directions for :meth:`ModelSync.catch_up`'s ``progress`` callback,
    calling it about every 1% (and at the end), not per direction."""

    def __init__(self, callback: Callable[[int, int], None], total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0
        self.every = max(1, total // 100)
        callback(0, total)

    def step(self) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            self.callback(self.done, self.total)
