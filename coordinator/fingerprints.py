"""The fingerprint reports of recent rounds, in memory, with each round's majority.

Every connected client reports a fingerprint after every commit, and the coordinator
checks each report against its round's majority (PROTOCOL.md §6.10). Reading the round's
reports back from the ledger for each report made a round cost O(N²) in the clients
connected (measured by bench/scale.py: 1,000 connected observers, 1.2 s a round; 2,000,
4.1 s). Here each report updates a per-round counter, so the check costs O(1) unless the
majority itself changes. The ledger stays the durable record; a round not in memory
(after a restart) is read from it once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

__all__ = ["FingerprintBook"]


class FingerprintBook:
    """The reports of the last ``keep`` rounds seen.

    Args:
        load: reads a round's reports from the durable store (the ledger).
        keep: rounds kept in memory (older ones are read again when asked for).
    """

    def __init__(self, load: Callable[[int], dict[str, str]], keep: int = 64) -> None:
        self._load = load
        self._keep = keep
        self._reports: dict[int, dict[str, str]] = {}
        self._counts: dict[int, Counter[str]] = {}

    def reports(self, round_number: int) -> dict[str, str]:
        """``{client_id: fingerprint}`` for the round (do not modify it)."""
        if round_number not in self._reports:
            reports = dict(self._load(round_number))
            self._reports[round_number] = reports
            self._counts[round_number] = Counter(reports.values())
            while len(self._reports) > self._keep:  # the oldest other round leaves, never the one asked for
                oldest = min(r for r in self._reports if r != round_number)
                del self._reports[oldest], self._counts[oldest]
        return self._reports[round_number]

    def record(self, round_number: int, client_id: str, fingerprint: str) -> None:
        """Add or replace a client's report for the round."""
        reports = self.reports(round_number)
        counts = self._counts[round_number]
        previous = reports.get(client_id)
        if previous is not None:
            counts[previous] -= 1
            if not counts[previous]:
                del counts[previous]
        reports[client_id] = fingerprint
        counts[fingerprint] += 1

    def counts(self, round_number: int) -> Counter[str]:
        """How many reports each distinct fingerprint of the round has."""
        self.reports(round_number)
        return self._counts[round_number]

    def majority(self, round_number: int) -> str | None:
        """The round's most reported fingerprint; None with fewer than 2 reports or a tie
        at the top (no majority: nobody is flagged)."""
        ranked = self.counts(round_number).most_common(2)
        if sum(self._counts[round_number].values()) < 2 or not ranked:
            return None
        if len(ranked) == 2 and ranked[0][1] == ranked[1][1]:
            return None
        return ranked[0][0]
