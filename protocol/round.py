"""The round state machine, sans I/O (PROTOCOL.md §7).

One :class:`RoundMachine` follows one attempt at one round on the coordinator. It never
touches a socket or a clock: the server feeds it updates (:meth:`RoundMachine.receive`)
and deadline expiry (:meth:`RoundMachine.deadline`), and acts on what they return.

States and transitions (all of them; anything else raises InvalidState)::

    COLLECTING --update (not last)------> COLLECTING
    COLLECTING --update (all assigned)--> READY
    COLLECTING --deadline, >= quorum----> READY
    COLLECTING --deadline, <  quorum----> ABANDONED   (terminal: the round is retried
                                                        as a new attempt with new seeds)
    READY      --committed--------------> COMMITTED   (terminal)
    READY      --update-----------------> READY       (late: refused, nothing changes)
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from protocol.errors import InvalidState
from protocol.messages import PackedUpdate, Update

__all__ = ["RoundState", "RoundMachine", "UpdateRefused", "Accepted", "TRANSITIONS"]

logger = logging.getLogger(__name__)


class RoundState(enum.Enum):
    COLLECTING = "collecting"
    READY = "ready"
    COMMITTED = "committed"
    ABANDONED = "abandoned"


class Event(enum.Enum):
    UPDATE = "update"
    LAST_UPDATE = "last_update"
    DEADLINE_QUORUM = "deadline_quorum"
    DEADLINE_SHORT = "deadline_short"
    COMMITTED = "committed"


TRANSITIONS: dict[tuple[RoundState, Event], RoundState] = {
    (RoundState.COLLECTING, Event.UPDATE): RoundState.COLLECTING,
    (RoundState.COLLECTING, Event.LAST_UPDATE): RoundState.READY,
    (RoundState.COLLECTING, Event.DEADLINE_QUORUM): RoundState.READY,
    (RoundState.COLLECTING, Event.DEADLINE_SHORT): RoundState.ABANDONED,
    (RoundState.READY, Event.COMMITTED): RoundState.COMMITTED,
}


class UpdateRefused(Exception):
    """An update that this round cannot take. The sender gets an ``error`` message with
    ``code`` and the connection stays open (a late or misdirected update is not a
    protocol violation)."""

    def __init__(self, code: str, message: str, *, round: int, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.round = round
        self.field = field


@dataclass(frozen=True)
class Accepted:
    """Outcome of a good update: ``duplicate`` if the same update was already counted."""

    duplicate: bool


class RoundMachine:
    """Collects the updates of one round attempt.

    Args:
        round: the round number being trained.
        attempt: which attempt at this round (0, 1, ...).
        seeds: the seeds handed out, in task order.
        assigned: client ids asked to train.
        quorum: updates needed to commit when the deadline passes.
    """

    def __init__(self, round: int, attempt: int, seeds: Iterable[int], assigned: Iterable[str], quorum: int,
                 *, client_seeds: Mapping[str, Sequence[int]] | None = None) -> None:
        self.round = round
        self.attempt = attempt
        self.seeds = tuple(seeds)
        self.assigned = frozenset(assigned)
        # The seeds each client was handed: a prefix of the attempt's (its mode's count),
        # or a block client's seeds of its block (PROTOCOL.md §5.5), in the attempt's
        # order; a client not listed got them all.
        self.client_seeds = {cid: tuple(handed) for cid, handed in (client_seeds or {}).items()}
        position = {seed: index for index, seed in enumerate(self.seeds)}
        for cid, handed in self.client_seeds.items():
            places = [position.get(seed, -1) for seed in handed]
            if not handed or -1 in places or places != sorted(set(places)):
                raise ValueError(f"the seeds handed to {cid!r} must be some of the attempt's seeds, in its order")
        if quorum < 1:
            raise ValueError("quorum must be >= 1")
        self.quorum = quorum
        self.updates: dict[str, Update] = {}
        self._state = RoundState.COLLECTING

    @property
    def state(self) -> RoundState:
        return self._state

    def _fire(self, event: Event) -> None:
        try:
            new = TRANSITIONS[(self._state, event)]
        except KeyError:
            raise InvalidState(self._state.value, event.value) from None
        if new is not self._state:
            logger.debug("round %d.%d: %s -> %s", self.round, self.attempt, self._state.value, new.value)
        self._state = new

    def receive(self, update: Update) -> Accepted:
        """Validate an update against this round and count it.

        Call :meth:`is_ready` afterwards: when it turns true, aggregate and commit.

        Raises:
            UpdateRefused: wrong round or attempt, round closed, client not assigned,
                seeds not the ones handed out, non-finite values, or a different update
                from a client that already sent one.
        """
        if update.round != self.round or update.attempt != self.attempt:
            code = "stale_round" if (update.round, update.attempt) < (self.round, self.attempt) else "round_not_open"
            raise UpdateRefused(
                code,
                f"update for round {update.round} attempt {update.attempt}, but the open round is "
                f"{self.round} attempt {self.attempt}",
                round=update.round,
                field="update.round",
            )
        previous = self.updates.get(update.client_id)
        if previous is not None:
            if _same_content(previous, update):
                return Accepted(duplicate=True)
            raise UpdateRefused("conflicting_update", "a different update was already accepted from this client "
                                "for this round", round=self.round)
        if self._state is not RoundState.COLLECTING:
            raise UpdateRefused("round_closed", f"round {self.round} is no longer collecting updates",
                                round=self.round)
        if update.client_id not in self.assigned:
            raise UpdateRefused("not_assigned", f"client {update.client_id!r} was not given round {self.round}",
                                round=self.round, field="update.client_id")
        sent = tuple(seed for seed, _ in update.pairs)
        handed = self.client_seeds.get(update.client_id, self.seeds)
        if sent != handed:
            extra = sorted(set(sent) - set(handed))
            detail = f"seeds {extra[:3]} were not handed out" if extra else "seeds differ from the task's, or are out of order"
            raise UpdateRefused("wrong_seeds", detail, round=self.round, field="update.pairs")
        for index, (_, value) in enumerate(update.pairs):
            if not math.isfinite(value):
                raise UpdateRefused("invalid_field", "not finite", round=self.round, field=f"update.pairs[{index}][1]")
        self.updates[update.client_id] = update
        self._fire(Event.LAST_UPDATE if set(self.updates) >= self.assigned else Event.UPDATE)
        return Accepted(duplicate=False)

    def unpack(self, packed: PackedUpdate) -> Update:
        """The ``update`` a ``packed_update`` stands for: its values paired with the
        seeds this round handed its sender, in task order (PROTOCOL.md §4.3.1).

        Check the signature before this (it covers the packed bytes), then pass the
        result to :meth:`receive`.

        Raises:
            UpdateRefused: the client was not handed this round, or the update does not
                carry exactly one value per seed handed to it.
        """
        if packed.round != self.round or packed.attempt != self.attempt:
            code = "stale_round" if (packed.round, packed.attempt) < (self.round, self.attempt) else "round_not_open"
            raise UpdateRefused(code, f"update for round {packed.round} attempt {packed.attempt}, but the open "
                                f"round is {self.round} attempt {self.attempt}", round=packed.round,
                                field="packed_update.round")
        if packed.client_id not in self.assigned:
            raise UpdateRefused("not_assigned", f"client {packed.client_id!r} was not given round {self.round}",
                                round=self.round, field="packed_update.client_id")
        handed = self.client_seeds.get(packed.client_id, self.seeds)
        if packed.count != len(handed):
            raise UpdateRefused("wrong_seeds", f"{packed.count} values for the {len(handed)} seeds handed out",
                                round=self.round, field="packed_update.values")
        return Update(round=packed.round, attempt=packed.attempt, client_id=packed.client_id,
                      pairs=tuple(zip(handed, packed.decoded())), num_examples=packed.num_examples,
                      loss_before=packed.loss_before, loss_after=packed.loss_after, nonce=packed.nonce,
                      signature=packed.signature)

    def is_ready(self) -> bool:
        return self._state is RoundState.READY

    def deadline(self) -> RoundState:
        """The deadline passed: move to READY (quorum met) or ABANDONED. Returns the state."""
        if self._state is RoundState.COLLECTING:
            self._fire(Event.DEADLINE_QUORUM if len(self.updates) >= self.quorum else Event.DEADLINE_SHORT)
        return self._state

    def committed(self) -> None:
        self._fire(Event.COMMITTED)

    def missing(self) -> frozenset[str]:
        return self.assigned - set(self.updates)


def _same_content(a: Update, b: Update) -> bool:
    return (a.pairs, a.num_examples, a.loss_before, a.loss_after) == (b.pairs, b.num_examples, b.loss_before, b.loss_after)
