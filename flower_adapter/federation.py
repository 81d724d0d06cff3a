"""The coordinator's rules, for a strategy that is not the coordinator.

A ledger written by the Flower strategy must be one this project's own tools replay
(``edgefed-export``, :mod:`exporter.replay`), and a round it drives must be the round the
coordinator would drive: the same seed draw (PROTOCOL.md §6.11), the same client draw,
the same catch-up response (§6.9), the same identity bound into the ledger. Those rules
are the coordinator's own (:mod:`coordinator.rules`); what is here is what the adapter
refuses. Model-free: nothing here imports the client side.
"""

from __future__ import annotations

from coordinator.config import BLOCK_MODE, FederationConfig
from coordinator.rules import bind_ledger, draw_clients, draw_seeds, federation_info, sync_response

__all__ = ["UnsupportedSetting", "bind_ledger", "check_supported", "draw_clients", "draw_seeds",
           "federation_info", "sync_response"]


class UnsupportedSetting(ValueError):
    """The federation asks for something the Flower adapter does not drive."""


def check_supported(config: FederationConfig, mode: str) -> None:
    """Refuse, in one line, the coordinator features this adapter leaves out: they need
    per-client state the coordinator keeps across connections (a bandit per client, a
    block schedule, per-client statistics)."""
    if BLOCK_MODE in config.modes or mode == BLOCK_MODE:
        raise UnsupportedSetting(f"mode {BLOCK_MODE} (cyclic block updates) needs the coordinator's block schedule; "
                                 f"the Flower adapter does not drive it: choose another mode")
    if config.personalised_lr != "off":
        raise UnsupportedSetting("personalised_lr is not supported by the Flower adapter: set it to 'off'")
    table = config.modes.get(mode, {})
    if "adapt" in table or "adapt_values" in table:
        raise UnsupportedSetting(f"modes.{mode}.adapt: the coordinator's per-client bandit is not supported by the "
                                 f"Flower adapter: fix the setting's value instead")
