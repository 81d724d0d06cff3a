"""What an embedding app hears from a client: typed events and the callbacks that get them.

Every callback runs on the client's event-loop thread (the thread running
:meth:`edge_client.daemon.EdgeClient.run`: an app's own asyncio loop with ``await
client.run()``, or the background thread ``edgefed.Client.start()`` made), one at a
time and in the order the events happen:

    on_plan                          once, when the federation's task is known (not for an observer)
    on_sync                          the model reached a ledger round (first sync, each commit)
    on_round_start                   a round task accepted, training begins
    on_step ... on_step              each local step (from the training thread, handed over)
    on_round_end                     the update was sent (or the round failed: ``sent`` False)
    on_sync                          the round's commit applied
    ...

A callback must return quickly (the loop also answers the coordinator's pings); an
exception in one is logged and does not stop the client. Training runs in a worker thread;
its step events are handed to the loop thread with ``call_soon_threadsafe``, so an app
never has to lock against the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ClientCallbacks", "PlanEvent", "RoundEndEvent", "RoundStartEvent", "StepEvent", "SyncEvent"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanEvent:
    """The mode and micro-batch the client chose for the federation's task.

    Attributes:
        mode: the training mode (engine name), or "observe".
        batch: rows per forward/backward (the micro-batch); 0 for an observer.
        explanation: the one-line plan also sent to the coordinator's ``/status``.
    """

    mode: str
    batch: int
    explanation: str


@dataclass(frozen=True)
class SyncEvent:
    """The model now holds a ledger round.

    Attributes:
        round: the ledger round the model holds.
        fingerprint: its trainable weights' fingerprint (PROTOCOL.md §6.5), as reported.
        how: "commit" (one round applied), "catch_up" (replayed after a gap or at start),
            or "current" (already at the coordinator's round on connecting).
    """

    round: int
    fingerprint: str
    how: str


@dataclass(frozen=True)
class RoundStartEvent:
    """A round task was accepted and local training begins.

    Attributes:
        round: the round being trained.
        mode: the engine training it.
        seeds: how many seeds the task carries (scalars the update will hold).
        settings: the mode's settings for this round, after fitting to the memory budget.
    """

    round: int
    mode: str
    seeds: int
    settings: dict[str, Any]


@dataclass(frozen=True)
class StepEvent:
    """One local step of a round.

    Attributes:
        round: the round being trained.
        step: steps done so far (1-based), of ``total``.
        total: the round's local steps.
        loss: the step's training loss.
    """

    round: int
    step: int
    total: int
    loss: float


@dataclass(frozen=True)
class RoundEndEvent:
    """A round's local work ended.

    Attributes:
        round: the round.
        sent: True when the update was sent; False when training failed or was stopped.
        loss_before, loss_after: the round's loss on its first batch before and after
            (NaN when nothing was sent).
        seconds: local training time.
        scalars: values in the update (0 when nothing was sent).
        error: why nothing was sent, or None.
    """

    round: int
    sent: bool
    loss_before: float
    loss_after: float
    seconds: float
    scalars: int
    error: str | None = None


@dataclass
class ClientCallbacks:
    """The app's callbacks; each is optional (see the module docstring for the thread and
    the order)."""

    on_plan: Callable[[PlanEvent], None] | None = None
    on_sync: Callable[[SyncEvent], None] | None = None
    on_round_start: Callable[[RoundStartEvent], None] | None = None
    on_step: Callable[[StepEvent], None] | None = None
    on_round_end: Callable[[RoundEndEvent], None] | None = None

    def emit(self, name: str, event: object) -> None:
        """Call the callback ``name`` with ``event``; a failing callback is logged."""
        callback = getattr(self, name)
        if callback is None:
            return
        try:
            callback(event)
        except Exception:  # an app's bug must not take the federation client down
            logger.exception("the %s callback raised; the client goes on", name)
