"""Tests for edge_client.splits: held-out selection, IID and Dirichlet client splits."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from statistics import mean

import pytest

from edge_client.data import load_jsonl
from edge_client.splits import Split, family_counts, split_records, summarise, write_split

SHIPPED = Path(__file__).resolve().parents[1] / "edge_client" / "datasets" / "instructions.jsonl"
FAMILIES = ("arithmetic", "classification", "extraction", "formatting")


def _records(per_family: int = 100) -> list[dict]:
    """Records of the four families, interleaved, each with a unique id."""
    return [
        {"instruction": f"q{i}", "response": f"a{i}", "family": FAMILIES[i % 4], "id": i}
        for i in range(4 * per_family)
    ]


def _ids(records: list[dict]) -> list[int]:
    return [r["id"] for r in records]


def _top_shares(split: Split) -> list[float]:
    return [max(family_counts(c).values()) / len(c) for c in split.clients]


def test_deterministic() -> None:
    records = _records()
    for scheme in ("iid", "dirichlet"):
        a = split_records(records, clients=5, scheme=scheme, seed=3)
        b = split_records(records, clients=5, scheme=scheme, seed=3)
        c = split_records(records, clients=5, scheme=scheme, seed=4)
        assert [_ids(x) for x in a.clients] == [_ids(x) for x in b.clients]
        assert _ids(a.heldout) == _ids(b.heldout)
        assert [_ids(x) for x in a.clients] != [_ids(x) for x in c.clients]
        assert _ids(a.heldout) != _ids(c.heldout)


def test_pinned_values() -> None:
    """Pins a few draws so a change of algorithm or RNG use is noticed."""
    split = split_records(_records(10), clients=2, heldout=4, scheme="dirichlet", alpha=0.5, seed=0)
    assert [len(c) for c in split.clients] == [15, 21]
    assert _ids(split.heldout) == [3, 28, 30, 37]
    assert [_ids(c)[:5] for c in split.clients] == [[38, 39, 23, 11, 35], [9, 13, 34, 18, 12]]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("clients", [1, 3, 7])
def test_every_record_exactly_once(scheme: str, clients: int) -> None:
    records = _records()
    split = split_records(records, clients=clients, scheme=scheme, seed=clients)
    seen = [i for c in split.clients for i in _ids(c)] + _ids(split.heldout)
    assert sorted(seen) == list(range(len(records)))
    assert split.unused == []
    assert len(split.clients) == clients and all(split.clients)
    # The very same objects: writing them back is lossless.
    by_id = {r["id"]: r for r in records}
    assert all(r is by_id[r["id"]] for c in split.clients for r in c)


def test_heldout_disjoint_and_stratified() -> None:
    records = _records(100) + [
        {"instruction": "x", "response": "y", "family": "rare", "id": 400 + i} for i in range(20)
    ]
    split = split_records(records, clients=4, heldout=0.1, scheme="dirichlet", alpha=0.1)
    held = set(_ids(split.heldout))
    assert len(held) == 42  # round(0.1 * 420)
    for client in split.clients:
        assert held.isdisjoint(_ids(client))
    # Proportional per family: 100/420 * 42 = 10 each, 20/420 * 42 = 2 for "rare".
    assert family_counts(split.heldout) == {f: 10 for f in FAMILIES} | {"rare": 2}
    assert _ids(split.heldout) == sorted(_ids(split.heldout))  # input order


def test_heldout_independent_of_distribution() -> None:
    records = _records()
    base = split_records(records, clients=2, scheme="iid", seed=9)
    other = split_records(records, clients=6, scheme="dirichlet", alpha=0.1, seed=9)
    assert _ids(base.heldout) == _ids(other.heldout)


def test_heldout_count_and_rounding() -> None:
    records = _records(25)  # 100 records
    assert len(split_records(records, clients=2, heldout=7).heldout) == 7
    assert family_counts(split_records(records, clients=2, heldout=6).heldout) == {
        "arithmetic": 2, "classification": 2, "extraction": 1, "formatting": 1,
    }  # largest remainder, ties by name
    assert split_records(records, clients=2, heldout=0).heldout == []
    assert split_records(records, clients=2, heldout=0.0).heldout == []
    assert len(split_records(records[:5], clients=2, heldout=0.01).heldout) == 1  # at least 1


def test_iid_balanced() -> None:
    split = split_records(_records(200), clients=4, heldout=0.1, scheme="iid", seed=1)
    sizes = [len(c) for c in split.clients]
    assert max(sizes) - min(sizes) <= 1
    for client in split.clients:
        counts = family_counts(client)
        assert set(counts) == set(FAMILIES)
        assert all(abs(n / len(client) - 0.25) < 0.08 for n in counts.values())


def _mean_top_share(alpha: float) -> float:
    shares = []
    for seed in range(5):
        split = split_records(_records(150), clients=6, scheme="dirichlet", alpha=alpha, seed=seed)
        shares.extend(_top_shares(split))
    return mean(shares)


def test_dirichlet_small_alpha_is_skewed() -> None:
    # A balanced mix of 4 families has top share 0.25.
    assert _mean_top_share(0.1) > 0.7


def test_dirichlet_large_alpha_is_near_balanced() -> None:
    assert _mean_top_share(100.0) < 0.35
    split = split_records(_records(150), clients=6, scheme="dirichlet", alpha=100.0)
    assert all(set(family_counts(c)) == set(FAMILIES) for c in split.clients)


def test_dirichlet_fills_empty_clients(caplog: pytest.LogCaptureFixture) -> None:
    # Two families and ten clients with a tiny alpha: most clients get nothing
    # from the draws and must be given one record each.
    records = _records(10)[:20]
    with caplog.at_level(logging.WARNING, logger="edge_client.splits"):
        split = split_records(records, clients=10, heldout=0, scheme="dirichlet", alpha=0.01)
    assert all(len(c) >= 1 for c in split.clients)
    assert sorted(i for c in split.clients for i in _ids(c)) == list(range(20))
    assert "received no record" in caplog.text


def test_per_client_cap() -> None:
    records = _records()
    for scheme in ("iid", "dirichlet"):
        split = split_records(records, clients=3, heldout=40, per_client=50, scheme=scheme)
        assert all(1 <= len(c) <= 50 for c in split.clients)
        seen = [i for c in split.clients for i in _ids(c)] + _ids(split.heldout) + _ids(split.unused)
        assert sorted(seen) == list(range(len(records)))
    iid = split_records(records, clients=3, heldout=40, per_client=50)
    assert [len(c) for c in iid.clients] == [50, 50, 50] and len(iid.unused) == 210


def test_missing_family_counts_as_all() -> None:
    records = [{"instruction": str(i), "response": "r", "id": i} for i in range(10)]
    records[0]["family"] = "special"
    split = split_records(records, clients=3, heldout=3, scheme="dirichlet", alpha=1.0)
    assert set(family_counts([r for c in split.clients for r in c]) | family_counts(split.heldout)) == {
        "all", "special",
    }
    assert family_counts(split.heldout) == {"all": 3}


def test_custom_family_field() -> None:
    records = [{"q": str(i), "kind": "ab"[i % 2], "id": i} for i in range(20)]
    split = split_records(records, clients=2, heldout=4, family_field="kind")
    assert family_counts(split.heldout, "kind") == {"a": 2, "b": 2}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"clients": 0}, "clients"),
        ({"clients": 2.0}, "clients"),
        ({"clients": 2, "alpha": 0.0}, "alpha"),
        ({"clients": 2, "alpha": -1.0}, "alpha"),
        ({"clients": 2, "alpha": float("nan")}, "alpha"),
        ({"clients": 2, "heldout": 1.0}, "heldout"),
        ({"clients": 2, "heldout": -0.1}, "heldout"),
        ({"clients": 2, "heldout": -1}, "heldout"),
        ({"clients": 2, "heldout": 40}, "heldout"),
        ({"clients": 2, "heldout": True}, "heldout"),
        ({"clients": 2, "per_client": 0}, "per_client"),
        ({"clients": 2, "scheme": "pathological"}, "scheme"),
        ({"clients": 41}, "too few records"),
        ({"clients": 39, "heldout": 2}, "too few records"),
    ],
)
def test_errors(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        split_records(_records(10), **kwargs)


def test_error_on_empty_and_non_dict() -> None:
    with pytest.raises(ValueError, match="records is empty"):
        split_records([], clients=1)
    with pytest.raises(ValueError, match=r"records\[1\]"):
        split_records([{"a": 1}, "oops"], clients=1, heldout=0)  # type: ignore[list-item]


def test_write_split_round_trip(tmp_path: Path) -> None:
    records = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]
    records[0] = {**records[0], "instruction": "caf\u00e9 \U0001f600 \ud800", "extra": [1, {"b": None}]}
    split = split_records(records, clients=3, heldout=240, per_client=100, scheme="dirichlet", alpha=0.5)
    summary = write_split(split, tmp_path / "out")
    sizes = Counter(r["family"] for r in records)

    for i, client in enumerate(split.clients):
        path = tmp_path / "out" / f"client-{i}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == client
        assert summary["clients"][i]["path"] == str(path)
        assert summary["clients"][i]["records"] == len(client)
        assert summary["clients"][i]["families"] == {
            f: Counter(r["family"] for r in client)[f] for f in FAMILIES
        }
        loaded, problems = load_jsonl(path)  # usable as client training data
        assert len(loaded) == len(client) and problems == []
    held = tmp_path / "out" / "heldout.jsonl"
    assert [json.loads(line) for line in held.read_text(encoding="utf-8").splitlines()] == split.heldout
    assert summary["heldout"]["records"] == 240
    shares = summary["heldout"]["families"]  # stratified: in proportion to each family's size
    assert all(abs(shares[f] - 240 * sizes[f] / len(records)) <= 1 for f in FAMILIES)
    assert summary["families"] == list(FAMILIES)
    assert summary["unused"] == len(records) - 240 - sum(len(c) for c in split.clients)
    json.dumps(summary)  # printable / serialisable


def test_summarise_table() -> None:
    split = split_records(_records(10), clients=2, heldout=4, per_client=10, scheme="iid")
    table = summarise(split)
    lines = table.splitlines()
    assert lines[0].split() == ["records", *FAMILIES, "top", "share"]
    assert lines[1].startswith("client 0") and lines[2].startswith("client 1")
    assert lines[3].split()[:2] == ["heldout", "4"]
    assert lines[4].split()[:2] == ["unused", "16"]
    assert lines[3].endswith("25%")
    assert len(lines) == 5
