"""The federation's rules that do not depend on sockets: what a client is told, how a
ledger is bound, which seeds and clients an attempt draws (PROTOCOL.md §6.11) and what a
catch-up carries (§6.9). The coordinator drives rounds with them, and so does anything
else that writes a ledger this project's tools must replay (the Flower strategy,
flower_adapter/): one definition, so the two cannot drift apart.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from typing import TypeVar

from coordinator.config import FederationConfig
from coordinator.ledger import Ledger
from protocol.messages import FederationInfo, PackedUpdate, RoundEntry, ScopeSpec, SyncResponse, Update
from protocol.round import UpdateRefused
from protocol.seeds import pool_seed
from protocol.table import table_digest

__all__ = ["MAX_ABS_LOSS", "bind_ledger", "check_losses", "draw_clients", "draw_seeds", "federation_info",
           "sync_response"]

MAX_ABS_LOSS = 1e30  # a reported loss beyond this is refused: summing such losses overflows the round's mean

_T = TypeVar("_T")


def federation_info(config: FederationConfig) -> FederationInfo:
    """The federation's settings as a client is told them (``welcome.federation``)."""
    lora = config.scope == "lora"
    return FederationInfo(
        federation_id=config.federation_id,
        model_name=config.model_name,
        model_hash=config.model_hash,
        scope=ScopeSpec(kind=config.scope, lora_rank=config.lora_rank if lora else 0, lora_alpha=config.lora_alpha,
                        lora_targets=tuple(config.lora_targets) if lora else (), lora_init_seed=config.lora_init_seed,
                        lora_layers=tuple(config.lora_layers) if lora else ()),
        seed_pool_size=config.seed_pool_size,
        rebase_every=config.rebase_every,
        perturbation=config.perturbation,
        aggregation=config.aggregation,
        learning_rate=config.learning_rate,
        epsilon=config.epsilon,
        local_steps=config.local_steps,
        batch_size=config.batch_size,
        max_seq_len=config.max_seq_len,
        block_seeds=config.block_seeds,
    )


def bind_ledger(config: FederationConfig, ledger: Ledger) -> int:
    """Bind ``ledger`` to the federation's identity and return its pool key: a ledger of another federation, model or scope is
    refused (LedgerError), and the pool key is drawn once, when the ledger is new.
    """
    for key, value in config.identity().items():
        ledger.set_meta_once(key, value)
    if config.pool_key is not None:
        ledger.set_meta_once("pool_key", str(config.pool_key))
    elif ledger.get_meta("pool_key") is None:
        ledger.set_meta_once("pool_key", str(secrets.randbits(63)))
    return int(ledger.get_meta("pool_key") or 0)


def draw_seeds(pool_key: int, pool_size: int, round_number: int, attempt: int, count: int) -> list[int]:
    """The attempt's seeds, in task order (PROTOCOL.md §6.11)."""
    rng = random.Random(f"{pool_key}:{round_number}:{attempt}")
    return [pool_seed(pool_key, index) for index in rng.sample(range(pool_size), count)]


def draw_clients(pool_key: int, round_number: int, attempt: int, ready: Sequence[_T], count: int) -> list[_T]:
    """The attempt's clients: ``ready`` must already be sorted by client id."""
    rng = random.Random(f"clients:{pool_key}:{round_number}:{attempt}")
    return rng.sample(list(ready), min(count, len(ready)))


def sync_response(ledger: Ledger, rebase_every: int, have_round: int) -> SyncResponse:
    """What a replica at ``have_round`` needs to reach the ledger's last round
    (PROTOCOL.md §6.9): the rounds after ``have_round``
    when it is at or after the latest rebase round, else the table at that rebase round
    and the rounds since."""
    target = ledger.last_round()
    rebase = target - target % rebase_every
    base = have_round if rebase <= have_round <= target else rebase
    rounds = ledger.rounds_between(base, target)
    table = tuple(ledger.table_at(base)) if base % rebase_every == 0 else ()
    return SyncResponse(
        target_round=target,
        base_round=base,
        table=table,
        rounds=tuple(RoundEntry(round=r.round, coefficients=r.coefficients) for r in rounds),
        table_digest=rounds[-1].table_digest if rounds else table_digest(ledger.table_at(target)),
    )


def check_losses(update: Update | PackedUpdate) -> None:
    """Refuse an update whose reported losses could overflow the round's mean (PROTOCOL.md §7.2).

    Raises:
        UpdateRefused: invalid_field, naming the loss.
    """
    for name in ("loss_before", "loss_after"):
        if abs(getattr(update, name)) > MAX_ABS_LOSS:
            raise UpdateRefused("invalid_field", f"|{name}| exceeds {MAX_ABS_LOSS:g}", round=update.round,
                                field=f"{update.TYPE}.{name}")
