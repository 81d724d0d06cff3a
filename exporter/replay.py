"""Rebuilding a federation's model of one round from the coordinator's ledger file.

The ledger defines the model of every round bit for bit (PROTOCOL.md §6): the base
weights, the scope's seed-defined start, and the (seed, coefficient) rows. The rebuild
here is the one every client does (:class:`edge_client.sync.ModelSync`), from the
ledger's own rows instead of a sync response, and it is checked twice: the table digest
after the replay must equal the round's stored digest, and the trainable weights'
fingerprint must equal what the clients reported for that round.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.ledger import Ledger, LedgerError
from edge_client.model import ModelLoadError, base_weights_hash, load_model, resolve_model
from edge_client.scope import ScopeConfig, ScopeError, build_space
from edge_client.space import ParameterSpace
from edge_client.sync import ModelSync, RoundCoefficients, SyncError
from protocol.blocks import block_seed_map
from protocol.table import table_digest

__all__ = ["ExportError", "LedgerFacts", "Rebuilt", "parse_scope", "read_ledger", "rebuild"]

logger = logging.getLogger(__name__)

_SQLITE_MAGIC = b"SQLite format 3\x00"


class ExportError(ValueError):
    """The model cannot be rebuilt or written; the message says why and what to do."""


@dataclass(frozen=True)
class LedgerFacts:
    """What a ledger file (or a live coordinator) says about its federation: its identity
    and last round.

    Attributes:
        source: the ledger file's path, or the coordinator's URL.
    """

    source: str
    federation_id: str
    model_hash: str
    scope: ScopeConfig
    perturbation: str
    rebase_every: int
    last_round: int
    block_seeds: int = 0  # seeds per block (PROTOCOL.md §5.5); 0: none


@dataclass
class Rebuilt:
    """The model of one round, rebuilt and checked.

    Attributes:
        model: the scoped model (peft-wrapped for the ``lora`` scope), float32, on the CPU.
        tokenizer: the base model's tokenizer.
        space: the trainable parameter space, holding the round's values.
        facts: the ledger's identity.
        round: the round rebuilt.
        fingerprint: the space's fingerprint (PROTOCOL.md §6.5).
        reported: client id -> the fingerprint it reported for the round.
        model_dir: the resolved base model directory (or hub id).
    """

    model: Any
    tokenizer: Any
    space: ParameterSpace
    facts: LedgerFacts
    round: int
    fingerprint: str
    reported: dict[str, str] = field(default_factory=dict)
    model_dir: Path | str = ""

    @property
    def agreeing(self) -> list[str]:
        """Clients whose reported fingerprint equals the rebuilt one."""
        return sorted(client for client, value in self.reported.items() if value == self.fingerprint)


def parse_scope(text: str) -> ScopeConfig:
    """The ledger's ``scope`` meta (``coordinator/config.py``'s ``identity()``): ``full``
    or ``lora:<rank>:<alpha>:<target,...>:<init_seed>[:layers=<i,...>]``."""
    if text == "full":
        return ScopeConfig(kind="full")
    parts = text.split(":")
    layers: tuple[int, ...] = ()
    if len(parts) == 6 and parts[5].startswith("layers="):
        try:
            layers = tuple(int(i) for i in parts.pop()[len("layers="):].split(","))
        except ValueError:
            raise ExportError(f"the ledger's scope {text!r} is malformed: bad layer list") from None
    if len(parts) != 5 or parts[0] != "lora":
        raise ExportError(f"the ledger's scope {text!r} is not one this version of edgefed knows")
    try:
        return ScopeConfig(kind="lora", lora_rank=int(parts[1]), lora_alpha=float(parts[2]),
                           lora_targets=tuple(parts[3].split(",")), lora_init_seed=int(parts[4]),
                           lora_layers=layers)
    except ValueError as error:
        raise ExportError(f"the ledger's scope {text!r} is malformed: {error}") from None


def _open_ledger(path: Path) -> Ledger:
    """Open an existing ledger file; never create one (a mistyped path must not leave an
    empty ledger behind)."""
    if not path.is_file():
        raise ExportError(f"no ledger at {path}: pass the coordinator's ledger file "
                          f"(edgefed-local writes it as <run dir>/ledger.db)")
    with path.open("rb") as handle:
        if handle.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
            raise ExportError(f"{path} is not a ledger (not an SQLite database)")
    try:
        return Ledger(path)
    except LedgerError as error:
        raise ExportError(f"cannot read the ledger {path}: {error}") from None


def read_ledger(path: str | os.PathLike[str]) -> LedgerFacts:
    """The federation identity and last round of the ledger at ``path``."""
    path = Path(path)
    with _open_ledger(path) as ledger:
        return _facts(ledger, path)


def _facts(ledger: Ledger, path: Path) -> LedgerFacts:
    meta = {key: ledger.get_meta(key) for key in
            ("federation_id", "model_hash", "scope", "perturbation", "rebase_every")}
    missing = [key for key, value in meta.items() if value is None]
    if missing:
        raise ExportError(f"{path} is not a federation's ledger: it has no {', '.join(missing)} "
                          f"(no coordinator has run on it)")
    try:
        rebase_every = int(meta["rebase_every"] or "")
    except ValueError:
        raise ExportError(f"{path}: rebase_every {meta['rebase_every']!r} is not a number") from None
    block_seeds = ledger.get_meta("block_seeds") or "0"  # a ledger from before block seeds has none
    if not block_seeds.isdigit():
        raise ExportError(f"{path}: block_seeds {block_seeds!r} is not a number")
    return LedgerFacts(source=str(path.absolute()), federation_id=meta["federation_id"] or "", model_hash=meta["model_hash"] or "",
                       scope=parse_scope(meta["scope"] or ""), perturbation=meta["perturbation"] or "",
                       rebase_every=rebase_every, last_round=ledger.last_round(), block_seeds=int(block_seeds))


def rebuild(ledger_path: str | os.PathLike[str], model_source: str, *, round_number: int | None = None,
            cache_dir: str | os.PathLike[str] | None = None, verify: bool = True,
            progress: Callable[[str, int, int], None] | None = None) -> Rebuilt:
    """Rebuild the model of ``round_number`` (default: the last committed) from a ledger.

    Args:
        ledger_path: the coordinator's ledger file.
        model_source: the federation's base model (what its clients were given).
        round_number: the round to rebuild; 0 is the base model with the scope's start.
        cache_dir: the model conversion cache.
        verify: refuse unless a client reported the rebuilt fingerprint for the round, and
            the most clients reported that one.
        progress: ``progress(stage, done, total)`` while replaying ("replay").

    Raises:
        ExportError: the ledger or the model cannot be read, the base model is not the
            federation's, the round is not committed, the replay does not reach the
            stored digest, or the fingerprint check fails.
    """
    path = Path(ledger_path)
    with _open_ledger(path) as ledger:
        facts = _facts(ledger, path)
        target = facts.last_round if round_number is None else round_number
        if not 0 <= target <= facts.last_round:
            held = f"rounds 1 to {facts.last_round}" if facts.last_round else "no committed round"
            raise ExportError(f"round {target} is not in the ledger {path}: it holds {held}")
        base_round = target - target % facts.rebase_every
        table = ledger.table_at(base_round) if base_round else []
        rounds = [RoundCoefficients(entry.round, tuple(entry.coefficients))
                  for entry in ledger.rounds_between(base_round, target)]
        digest = ledger.get_round(target).table_digest if target else table_digest([])
        reported = ledger.fingerprints(target) if target else {}

    try:
        model_dir = resolve_model(model_source, cache_dir=Path(cache_dir) if cache_dir else None)
        model, tokenizer = load_model(model_dir)
    except ModelLoadError as error:
        raise ExportError(str(error)) from None
    model_hash = base_weights_hash(model)
    if model_hash != facts.model_hash:
        raise ExportError(f"the model {model_source!r} is not this federation's base model: its weights hash to "
                          f"{model_hash[:16]}..., the ledger's federation was trained from {facts.model_hash[:16]}...; "
                          f"pass the model the clients were given (--model)")
    try:
        model, space = build_space(model, facts.scope, distribution=facts.perturbation)  # type: ignore[arg-type]
    except (ScopeError, ValueError) as error:
        raise ExportError(f"cannot apply the federation's scope to the model: {error}") from None
    if facts.block_seeds:
        space.use_block_seeds(block_seed_map(facts.federation_id, space.blocks(), facts.block_seeds))
    sync = ModelSync(space, rebase_every=facts.rebase_every, copies_where="memory")
    try:
        sync.catch_up(base_round, table, rounds, digest,
                      progress=None if progress is None else (lambda done, total: progress("replay", done, total)))
    except SyncError as error:
        raise ExportError(f"the ledger's rows do not rebuild round {target}: {error}") from None
    rebuilt = Rebuilt(model=model, tokenizer=tokenizer, space=space, facts=facts, round=target,
                      fingerprint=space.fingerprint(), reported=dict(reported), model_dir=model_dir)
    if verify:
        check_fingerprint(rebuilt)
    return rebuilt


def check_fingerprint(rebuilt: Rebuilt) -> None:
    """Refuse unless the rebuilt fingerprint is the one most clients reported for the round.

    A round nobody reported (round 0, or a ledger whose clients were all gone before they
    applied the commit) cannot be checked, and is refused: ``verify=False`` exports it
    unchecked.
    """
    if not rebuilt.reported:
        raise ExportError(f"no client reported a fingerprint for round {rebuilt.round}, so the rebuilt model cannot "
                          f"be checked against theirs; export another round (or, from a coordinator, wait for "
                          f"its clients to report), or pass --no-verify to export it unchecked")
    counts = Counter(rebuilt.reported.values())
    most = max(counts.values())
    if counts.get(rebuilt.fingerprint, 0) != most:
        reports = ", ".join(f"{client}: {value[:16]}..." for client, value in sorted(rebuilt.reported.items()))
        raise ExportError(f"the rebuilt model of round {rebuilt.round} is not the clients' model: its fingerprint is "
                          f"{rebuilt.fingerprint[:16]}..., the clients reported {reports}; nothing was written")
    dissent = sorted(client for client, value in rebuilt.reported.items() if value != rebuilt.fingerprint)
    if dissent:
        logger.warning("round %d: %s reported another fingerprint than the rebuilt model (and than most clients)",
                       rebuilt.round, ", ".join(dissent))
