"""The coordinator's in-memory fingerprint reports: majorities, replaced reports, and
rounds read back from the ledger once."""

from coordinator.fingerprints import FingerprintBook


def test_majority_follows_reports_replacements_and_ties():
    loads = []
    stored = {3: {"a": "x", "b": "x", "c": "y"}}

    def load(round_number):
        loads.append(round_number)
        return dict(stored.get(round_number, {}))

    book = FingerprintBook(load, keep=2)
    assert book.majority(3) == "x" and book.counts(3) == {"x": 2, "y": 1}
    book.record(3, "b", "y")  # b's report replaced: y now leads
    assert book.majority(3) == "y" and book.counts(3) == {"x": 1, "y": 2}
    book.record(3, "d", "x")  # a tie at the top: no majority
    assert book.majority(3) is None
    assert book.reports(3) == {"a": "x", "b": "y", "c": "y", "d": "x"}
    assert loads == [3]  # read from the store once
    book.record(4, "a", "z")
    assert book.majority(4) is None  # one report is no majority
    book.record(5, "a", "z")  # keep=2: round 3 leaves memory ...
    assert book.reports(3) == stored[3] and loads == [3, 4, 5, 3]  # ... and is read again (the store is the record)
