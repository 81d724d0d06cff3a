"""Which block each cyclic-block client trains (FedCyBGD, Wang et al. 2024, arXiv 2406.11187).

FedCyBGD partitions the model into blocks and has clients train them in turn, so that
over one cycle every block is trained once and no client ever holds gradients or
optimizer state for more than one block. Its code offers three orders: ascending,
descending and random (a fresh permutation per cycle). Here the coordinator, which
never sees the model, holds the schedule: the blocks are named by number
(PROTOCOL.md §5.5: decoder layers, and the outer block when ``outer_block`` is set),
and each ``fedcybgd`` client a round chooses gets the next block of the current cycle
that its memory can train (its hello's ``blocks``; empty: any). A cycle ends when each
of its blocks has been assigned once; a client whose blocks were all assigned already in
this cycle gets the first of them in cycle order again rather than no task.

The schedule lives in memory: a restarted coordinator starts a new cycle (the blocks
already trained keep their updates in the ledger; only the order restarts).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from protocol.blocks import OUTER_BLOCK

__all__ = ["ORDERS", "BlockSchedule", "schedule_blocks"]

ORDERS = ("ascending", "descending", "random")


def schedule_blocks(layers: int, outer: bool) -> list[int]:
    """The blocks a schedule cycles over: decoder layers ``0 … layers − 1``, then the outer
    block (embedding, final norm, head) when ``outer``."""
    return list(range(layers)) + ([OUTER_BLOCK] if outer else [])


class BlockSchedule:
    """Cyclic assignment of blocks to clients, one cycle after another."""

    def __init__(self, blocks: Sequence[int], order: str = "ascending", *, seed: str = "") -> None:
        if not blocks:
            raise ValueError("a block schedule needs at least one block")
        if len(set(blocks)) != len(blocks):
            raise ValueError("the blocks of a schedule must be distinct")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.blocks = tuple(sorted(blocks))
        self.order = order
        self._seed = seed
        self.cycle = -1
        self._cycle_order: tuple[int, ...] = ()
        self._remaining: list[int] = []
        self._next_cycle()

    def _next_cycle(self) -> None:
        self.cycle += 1
        ordered = list(self.blocks)
        if self.order == "descending":
            ordered.reverse()
        elif self.order == "random":
            random.Random(f"blocks:{self._seed}:{self.cycle}").shuffle(ordered)
        self._cycle_order = tuple(ordered)
        self._remaining = ordered

    def assign(self, clients: Sequence[tuple[str, Sequence[int]]]) -> dict[str, int]:
        """One round's blocks: ``clients`` are ``(client_id, blocks it can train)`` (empty:
        any), served in the given order; each gets the first block of the cycle's
        remaining ones it can train, a new cycle starting when none remain.

        Raises:
            ValueError: a client can train none of the schedule's blocks.
        """
        assigned: dict[str, int] = {}
        for client_id, allowed in clients:
            fits = set(allowed) & set(self.blocks) if allowed else set(self.blocks)
            if not fits:
                raise ValueError(f"client {client_id!r} can train none of the blocks {list(self.blocks)}")
            if not self._remaining:
                self._next_cycle()
            block = next((b for b in self._remaining if b in fits), None)
            if block is None:  # its blocks were all trained this cycle: repeat the first
                block = next(b for b in self._cycle_order if b in fits)
            else:
                self._remaining.remove(block)
            assigned[client_id] = block
        return assigned
