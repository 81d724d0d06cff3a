"""Personalised client-wise learning rates (FedMeZO, Ling et al. 2024, arXiv 2402.05926).

FedMeZO studies zeroth-order federated tuning and finds that its convergence is governed
by how far the clients' local objectives differ (data heterogeneity) and by the variance
of the zeroth-order estimates, both of which differ from client to client: one global
rate is then too large for some clients and too small for others. It therefore gives
each client ``i`` its own rate from a statistic ``x_i`` of its recent training, spread
around the global rate ``lr``. Its public code (FederatedScope's FedMeZO branch) uses

    lr_i = lr + δ · (x_i − mean(x)) / max_j |x_j − mean(x)|,     δ = lr / 2,

so every rate stays within ``[lr − δ, lr + δ]`` (``[lr/2, 3lr/2]`` there), with ``x_i``
the client's last-round loss, its mean loss over its last five rounds, or the size of
its last update. That code is written for exactly three clients; here the rule runs over
the clients chosen for a round, however many, from what the ledger holds:

* a client with no statistic yet (it never contributed) gets ``lr``, and the mean and
  the largest deviation are taken over the clients that have one;
* a client that skipped rounds keeps the statistic of its last contribution;
* with fewer than two statistics, or when all are equal (``max_j |x_j − mean| = 0``),
  every client gets ``lr``: there is nothing to personalise by.

The rate of each client enters its round task (``learning_rate``) and the ledger's
contribution row, and the coordinator combines ``(lr_i / lr) · g_i`` per seed before
multiplying by ``lr`` (PROTOCOL.md §8.2): a client's update moves the model by its own
rate, as FedMeZO's clients' local steps do, and replay needs only the committed
coefficients, so it stays bit-exact.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = ["STATISTICS", "MEAN_LOSS_ROUNDS", "ClientStatistics", "personalised_rates", "update_size"]

STATISTICS: Final = ("last_loss", "mean_loss", "update_size")
"""What ``x_i`` is: the loss after the client's last contribution, the mean of that loss
over its last :data:`MEAN_LOSS_ROUNDS` contributions, or the root mean square of its last
update's scalars (the size of its step along the round's directions; RMS rather than
the norm, so clients handed different numbers of seeds compare)."""

MEAN_LOSS_ROUNDS: Final = 5


def update_size(values: Sequence[float]) -> float | None:
    """The root mean square of an update's finite scalars (None when it has none)."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return None
    return math.sqrt(math.fsum(value * value for value in finite) / len(finite))


def personalised_rates(learning_rate: float, spread: float, clients: Sequence[str],
                       statistics: Mapping[str, float | None]) -> dict[str, float]:
    """Each client's rate for a round by FedMeZO's rule (module docstring).

    Args:
        learning_rate: the global rate ``lr`` (> 0).
        spread: ``δ / lr`` in [0, 1): the rates stay within ``lr·(1 ± spread)``.
        clients: the round's clients.
        statistics: ``x_i`` per client; a client missing, or with None or a non-finite
            value, has no statistic.

    Returns:
        ``{client: rate}`` for every client of ``clients``.
    """
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"spread must be in [0, 1), got {spread!r}")
    known = {client: float(x) for client in clients
             if (x := statistics.get(client)) is not None and math.isfinite(x)}
    rates = dict.fromkeys(clients, learning_rate)
    if len(known) < 2:
        return rates
    mean = math.fsum(known.values()) / len(known)
    widest = max(abs(x - mean) for x in known.values())
    if widest == 0.0:
        return rates
    delta = spread * learning_rate
    for client, x in known.items():
        rates[client] = learning_rate + delta * (x - mean) / widest
    return rates


class ClientStatistics:
    """The statistic ``x_i`` of every client, from its contributions (oldest first).

    Args:
        statistic: one of :data:`STATISTICS`.
    """

    def __init__(self, statistic: str) -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        self.statistic = statistic
        self._losses: dict[str, deque[float]] = {}
        self._sizes: dict[str, float | None] = {}

    def observe(self, client: str, loss_after: float, values: Sequence[float]) -> None:
        """Record one committed contribution of ``client``: its reported loss after its
        local steps and its scalars."""
        losses = self._losses.setdefault(client, deque(maxlen=MEAN_LOSS_ROUNDS))
        if math.isfinite(loss_after):
            losses.append(float(loss_after))
        self._sizes[client] = update_size(values)

    def value(self, client: str) -> float | None:
        """``x_client``, or None when the client has none yet."""
        if self.statistic == "update_size":
            return self._sizes.get(client)
        losses = self._losses.get(client)
        if not losses:
            return None
        if self.statistic == "last_loss":
            return losses[-1]
        return math.fsum(losses) / len(losses)

    def values(self, clients: Sequence[str]) -> dict[str, float | None]:
        return {client: self.value(client) for client in clients}
