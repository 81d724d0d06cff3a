"""Splitting a record set into per-client training shares and a held-out set.

:func:`split_records` first sets aside a held-out evaluation set (stratified by
task family, never trained on by any client), then distributes the rest over
the clients, either IID (shuffle and deal) or non-IID by family with a
Dirichlet draw per family, as in the FedKSeed and Ferret experiments.
:func:`write_split` writes the result as JSONL files; :func:`summarise` renders
the family mix per client as a small table.

Everything is deterministic for a given seed: all randomness comes from one
``random.Random(seed)`` (the Dirichlet draws use ``gammavariate``), so no
numpy or torch RNG is involved and results do not depend on library versions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_FAMILY", "Split", "family_counts", "split_records", "summarise", "write_split"]

DEFAULT_FAMILY = "all"
"""Family of records that have no family field."""

HELDOUT_FILE = "heldout.jsonl"


@dataclass(frozen=True)
class Split:
    """Records divided among clients plus a held-out evaluation set.

    Records are the very dict objects passed to :func:`split_records` (not
    copies), so writing them back with :func:`write_split` is lossless.

    Attributes:
        clients: One list of records per client; each holds at least one.
        heldout: The held-out evaluation records, in input order.
        unused: Records left out only because of the ``per_client`` cap
            (empty without a cap); in input order.
    """

    clients: list[list[dict]]
    heldout: list[dict]
    unused: list[dict] = field(default_factory=list)


def _family(record: dict, family_field: str) -> str:
    value = record.get(family_field)
    return DEFAULT_FAMILY if value is None else str(value)


def family_counts(records: Sequence[dict], family_field: str = "family") -> dict[str, int]:
    """Counts records per family (missing field: :data:`DEFAULT_FAMILY`), sorted by name."""
    counts = Counter(_family(r, family_field) for r in records)
    return dict(sorted(counts.items()))


def split_records(
    records: Sequence[dict],
    *,
    clients: int,
    heldout: int | float = 0.1,
    per_client: int | None = None,
    scheme: Literal["iid", "dirichlet"] = "iid",
    alpha: float = 0.5,
    family_field: str = "family",
    seed: int = 0,
) -> Split:
    """Splits records into a held-out set and one training share per client.

    1. Held-out set: ``heldout`` records are drawn per family in proportion to
       the family sizes (largest-remainder rounding), so its family mix
       matches the data's. It depends only on ``records``, ``heldout``,
       ``family_field`` and ``seed``, not on ``clients`` or ``scheme``.
    2. The remaining records are distributed:

       * ``"iid"``: shuffled and dealt round-robin, so client sizes differ by
         at most one and every client sees roughly the global family mix.
       * ``"dirichlet"``: for each family (in name order), proportions
         ``p ~ Dirichlet(alpha)`` over the clients are drawn (normalised
         ``gammavariate(alpha, 1)`` draws) and the family's shuffled records
         are cut at ``floor(cumsum(p) * n_family)``. As in the reference
         implementation used by FedKSeed/Ferret, a client that already holds
         at least ``remaining / clients`` records gets proportion 0 for the
         following families, which keeps client sizes from diverging. Small
         ``alpha`` (0.1) gives each client one or two dominant families;
         large ``alpha`` (100) approaches IID. Each client's records are
         shuffled at the end.

    3. A client left with no record gets one from the currently largest
       client (a warning is logged); the reference implementation resamples
       instead, which may never terminate with few families.
    4. With ``per_client``, each client keeps its first ``per_client``
       records (a random subset, since the lists are shuffled); the rest
       go to :attr:`Split.unused`.

    Args:
        records: JSON objects, e.g. the parsed lines of a JSONL file.
        clients: Number of clients, at least 1.
        heldout: Size of the held-out set: an ``int`` count in
            ``[0, len(records))`` or a ``float`` fraction in ``[0, 1)``
            (rounded to the nearest count, but at least 1 if positive).
        per_client: Optional cap on each client's record count (at least 1).
        scheme: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration, > 0 (only used by ``"dirichlet"``,
            but always validated).
        family_field: Key holding a record's family; records without it (or
            with ``null``) belong to family ``"all"``. Non-string values are
            converted with ``str``.
        seed: Seed of the ``random.Random`` that drives every choice.

    Returns:
        The :class:`Split`. Without ``per_client`` every record is in exactly
        one client list or the held-out set.

    Raises:
        ValueError: Naming the offending argument, if ``clients`` < 1,
            ``alpha`` <= 0, ``heldout`` is out of range, ``per_client`` < 1,
            ``scheme`` is unknown, a record is not a dict, or fewer records
            than clients remain after the held-out set.
    """
    _check_int("clients", clients, minimum=1)
    if per_client is not None:
        _check_int("per_client", per_client, minimum=1)
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"scheme must be 'iid' or 'dirichlet', got {scheme!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"records[{index}] must be a dict (a JSON object), got {type(record).__name__}")
    total = len(records)
    if total == 0:
        raise ValueError("records is empty: nothing to split")
    n_heldout = _heldout_count(heldout, total)
    if total - n_heldout < clients:
        raise ValueError(
            f"too few records: {total} record(s) minus heldout={heldout!r} ({n_heldout}) leave "
            f"{total - n_heldout} for clients={clients}; every client needs at least one"
        )

    rng = random.Random(seed)
    # Group indices by family in name order; within a family, input order.
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(_family(record, family_field), []).append(index)
    groups = dict(sorted(groups.items()))
    for indices in groups.values():
        rng.shuffle(indices)

    quotas = _stratified_quotas({name: len(ix) for name, ix in groups.items()}, n_heldout)
    heldout_ix = sorted(i for name, ix in groups.items() for i in ix[: quotas[name]])
    rest = {name: ix[quotas[name] :] for name, ix in groups.items()}

    if scheme == "iid":
        pool = [i for ix in rest.values() for i in ix]
        rng.shuffle(pool)
        shares = [pool[c::clients] for c in range(clients)]
    else:
        shares = _dirichlet_shares(rest, clients, alpha, rng)

    _fill_empty(shares, family_field, records)

    unused_ix: list[int] = []
    if per_client is not None:
        for share in shares:
            unused_ix.extend(share[per_client:])
            del share[per_client:]
        if unused_ix:
            logger.info(
                "per_client=%d leaves %d record(s) unused", per_client, len(unused_ix)
            )

    return Split(
        clients=[[records[i] for i in share] for share in shares],
        heldout=[records[i] for i in heldout_ix],
        unused=[records[i] for i in sorted(unused_ix)],
    )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _heldout_count(heldout: int | float, total: int) -> int:
    if isinstance(heldout, bool) or not isinstance(heldout, (int, float)):
        raise ValueError(f"heldout must be an int count or a float fraction, got {heldout!r}")
    if isinstance(heldout, int):
        if not 0 <= heldout < total:
            raise ValueError(
                f"heldout must be a count in [0, {total}) for {total} record(s), got {heldout}"
            )
        return heldout
    if not (math.isfinite(heldout) and 0.0 <= heldout < 1.0):
        raise ValueError(f"heldout must be a fraction in [0, 1), got {heldout!r}")
    count = math.floor(heldout * total + 0.5)
    if heldout > 0:
        count = max(count, 1)
    return min(count, total - 1)


def _stratified_quotas(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Splits ``n`` over families in proportion to their sizes (largest remainder)."""
    total = sum(sizes.values())
    quotas = {name: n * size // total for name, size in sizes.items()}
    short = n - sum(quotas.values())
    by_remainder = sorted(sizes, key=lambda name: (-(n * sizes[name] % total), name))
    for name in by_remainder[:short]:
        quotas[name] += 1
    return quotas


def _dirichlet_shares(
    groups: dict[str, list[int]], clients: int, alpha: float, rng: random.Random
) -> list[list[int]]:
    total = sum(len(ix) for ix in groups.values())
    fair = total / clients
    shares: list[list[int]] = [[] for _ in range(clients)]
    for indices in groups.values():
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(clients)]
        eligible = [len(share) < fair for share in shares]
        if not any(eligible):  # cannot happen while records remain; be safe
            eligible = [True] * clients
        weights = [d if ok else 0.0 for d, ok in zip(draws, eligible, strict=True)]
        weight_sum = sum(weights)
        if weight_sum <= 0.0:
            # Every eligible draw underflowed (tiny alpha): the Dirichlet's
            # limit is a one-hot vector on a random client.
            chosen = rng.choice([c for c, ok in enumerate(eligible) if ok])
            weights = [1.0 if c == chosen else 0.0 for c in range(clients)]
            weight_sum = 1.0
        # Cut the shuffled family at floor(cumsum(p) * n); the last client
        # with a positive weight takes the tail, so rounding never hands
        # records to a client whose proportion is 0.
        last = max(c for c in range(clients) if weights[c] > 0.0)
        start, cumulative = 0, 0.0
        for c in range(clients):
            cumulative += weights[c] / weight_sum
            end = len(indices) if c >= last else min(len(indices), int(cumulative * len(indices)))
            end = max(end, start)
            shares[c].extend(indices[start:end])
            start = end
    for share in shares:
        rng.shuffle(share)
    return shares


def _fill_empty(shares: list[list[int]], family_field: str, records: Sequence[dict]) -> None:
    """Gives each empty share one record taken from the largest share."""
    for c, share in enumerate(shares):
        if share:
            continue
        donor = max(range(len(shares)), key=lambda k: (len(shares[k]), -k))
        moved = shares[donor].pop()
        share.append(moved)
        logger.warning(
            "client %d received no record; moved one record (family %r) from client %d to it",
            c,
            _family(records[moved], family_field),
            donor,
        )


def write_split(
    split: Split, directory: str | os.PathLike[str], *, family_field: str = "family"
) -> dict[str, Any]:
    """Writes a split as JSONL files and summarises it.

    Writes ``client-<i>.jsonl`` for each client ``i`` (0-based) and
    ``heldout.jsonl`` (always, even when empty) into ``directory``, which is
    created if needed; existing files of those names are overwritten and
    other files are left alone. Each line is ``json.dumps(record)``: the same
    keys in the same order with ASCII escapes, so reading a line back gives an
    equal dict.

    Args:
        split: From :func:`split_records`.
        directory: Output directory.
        family_field: Family key, as passed to :func:`split_records`.

    Returns:
        A JSON-serialisable summary::

            {"directory": str,
             "families": [names...],
             "clients": [{"path": str, "records": int, "families": {name: int}}, ...],
             "heldout": {"path": str, "records": int, "families": {name: int}},
             "unused": int}

        Family count dicts list every family of the whole split (zeros
        included), in name order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    families = _all_families(split, family_field)

    def dump(records: list[dict], name: str) -> dict[str, Any]:
        path = directory / name
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        counts = family_counts(records, family_field)
        return {
            "path": str(path),
            "records": len(records),
            "families": {family: counts.get(family, 0) for family in families},
        }

    summary = {
        "directory": str(directory),
        "families": families,
        "clients": [dump(records, f"client-{i}.jsonl") for i, records in enumerate(split.clients)],
        "heldout": dump(split.heldout, HELDOUT_FILE),
        "unused": len(split.unused),
    }
    return summary


def _all_families(split: Split, family_field: str) -> list[str]:
    names: set[str] = set()
    for records in (*split.clients, split.heldout, split.unused):
        names.update(_family(r, family_field) for r in records)
    return sorted(names)


def summarise(split: Split, *, family_field: str = "family") -> str:
    """Renders the split as a table: records per family for each client.

    One row per client, then the held-out set (and the records left unused
    by ``per_client``, if any); the last column is the share of the row's
    largest family, a quick measure of how skewed a client's mix is.

    Args:
        split: From :func:`split_records`.
        family_field: Family key, as passed to :func:`split_records`.

    Returns:
        The table, lines joined by ``\\n`` (no trailing newline).
    """
    families = _all_families(split, family_field)
    header = ["", "records", *families, "top share"]
    rows = [header]
    named = [(f"client {i}", records) for i, records in enumerate(split.clients)]
    named.append(("heldout", split.heldout))
    if split.unused:
        named.append(("unused", split.unused))
    for name, records in named:
        counts = family_counts(records, family_field)
        top = max(counts.values(), default=0) / len(records) if records else 0.0
        rows.append(
            [name, str(len(records)), *(str(counts.get(f, 0)) for f in families), f"{top:.0%}"]
        )
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
