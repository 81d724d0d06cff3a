"""Per-client adaptive settings: the coordinator tunes one setting of a mode, client by client.

A mode's ``[modes.<name>]`` table may name one of its settings to adapt and the values to
try::

    [modes.droppeft]
    adapt = "dropout_ratio"
    adapt_values = [0.1, 0.25]

Each round, each client of that mode gets, in its ``round_task.settings``, the value its
own bandit (:class:`coordinator.bandit.DropoutBandit`, discounted UCB) chooses; when its
update arrives, the bandit is rewarded with the round's training progress per second,
``(loss_before − loss_after) / seconds`` (:func:`coordinator.bandit.progress_reward`),
the seconds measured here from sending the task to receiving the update. Bandit state
lives in the ledger, so a restarted coordinator carries on where it stopped.

The coordinator knows nothing of what the setting does (it never loads a model): a
client bounds what it runs by its own memory budget (DropPEFT: a ratio below what its
budget allows is run at the smallest ratio that fits, edge_client/engines/droppeft.py).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from coordinator.bandit import Arm, BanditError, DropoutBandit, progress_reward
from coordinator.ledger import Ledger

__all__ = ["AdaptiveSettings"]

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    mode: str
    arm: int
    round: int
    sent_at: float


class AdaptiveSettings:
    """The bandits of every (client, mode) whose mode adapts a setting."""

    def __init__(self, modes: dict[str, dict[str, Any]], ledger: Ledger) -> None:
        self._specs = {mode: (str(table["adapt"]), list(table["adapt_values"]))
                       for mode, table in modes.items() if "adapt" in table}
        self._ledger = ledger
        self._bandits: dict[tuple[str, str], DropoutBandit] = {}
        self._pending: dict[str, _Pending] = {}

    def adapts(self, mode: str) -> bool:
        return mode in self._specs

    def _bandit(self, client_id: str, mode: str) -> DropoutBandit:
        key = (client_id, mode)
        bandit = self._bandits.get(key)
        if bandit is None:
            _, values = self._specs[mode]
            try:
                saved = self._ledger.adaptive_state(client_id, mode)
            except ValueError as error:  # not JSON: say so, start afresh
                logger.warning("client %s: saved %s state unreadable (%s); starting afresh", client_id, mode, error)
                saved = None
            bandit = None
            if saved is not None:
                try:
                    if saved.get("values") != values:  # the configured values changed: start afresh
                        raise BanditError(f"saved for values {saved.get('values')}, configured {values}")
                    bandit = DropoutBandit.from_dict(saved["bandit"])
                except (BanditError, KeyError, TypeError, AttributeError) as error:
                    logger.warning("client %s: saved %s bandit unusable (%s); starting afresh", client_id, mode,
                                   error)
                    bandit = None
            if bandit is None:
                bandit = DropoutBandit([Arm(index, 0) for index in range(len(values))],
                                       seed=zlib.crc32(f"{client_id}:{mode}".encode()))
            self._bandits[key] = bandit
        return bandit

    def assign(self, client_id: str, mode: str, round_number: int) -> dict[str, Any]:
        """The adapted setting for this client's task (empty for a mode that adapts none);
        remembers the choice until the client's update arrives."""
        if mode not in self._specs:
            return {}
        name, values = self._specs[mode]
        arm = self._bandit(client_id, mode).choose(round_number)
        self._pending[client_id] = _Pending(mode, int(arm.id), round_number, time.monotonic())
        return {name: values[int(arm.id)]}

    def update_received(self, client_id: str, round_number: int, loss_before: float, loss_after: float) -> None:
        """Reward the client's bandit for the setting of the task this update answers."""
        pending = self._pending.pop(client_id, None)
        if pending is None or pending.round != round_number:
            return
        seconds = max(time.monotonic() - pending.sent_at, 1e-3)
        bandit = self._bandit(client_id, pending.mode)
        self._report(client_id, pending, progress_reward(loss_before, loss_after, seconds))

    def attempt_ended(self, round_number: int, client_ids: Iterable[str]) -> None:
        """An attempt committed or was abandoned: a client of it whose update never came
        (it missed the deadline, ran out of memory, refused the setting) is rewarded as
        a round of no progress, 0, or the worst reward seen if that is lower: a value
        that keeps a client from contributing is then not chosen again and again (the
        bandit tries untried values first, and would otherwise never learn it was
        tried)."""
        for client_id in client_ids:
            pending = self._pending.get(client_id)
            if pending is None or pending.round != round_number:
                continue
            del self._pending[client_id]
            means = [mean for _, mean in self._bandit(client_id, pending.mode).estimates().values() if mean is not None]
            self._report(client_id, pending, min([0.0, *means]))

    def _report(self, client_id: str, pending: _Pending, reward: float) -> None:
        bandit = self._bandit(client_id, pending.mode)
        if bandit.report(pending.arm, reward):
            self._ledger.save_adaptive_state(client_id, pending.mode,
                                             {"values": self._specs[pending.mode][1], "bandit": bandit.to_dict()})

    def status(self, client_id: str, mode: str) -> dict[str, Any] | None:
        """For /status: each value's discounted pulls and mean reward so far."""
        if mode not in self._specs:
            return None
        name, values = self._specs[mode]
        estimates = self._bandit(client_id, mode).estimates()
        return {"setting": name, "values": [
            {"value": values[index], "pulls": round(pulls, 3), "mean_reward": mean}
            for index, (pulls, mean) in sorted(estimates.items())]}
