"""The Flower ServerApp: :class:`~flower_adapter.strategy.SeedScalarStrategy` over this
project's ledger, run by Flower's own strategy loop.

``flower_adapter.server_app:app`` is what ``flwr run`` loads (``[tool.flwr.app.components]
serverapp``). It reads the federation from the run config, the same settings
``edgefed-coordinator`` takes:

======================= ==================================================================
``federation-config``   a federation TOML file (the coordinator's format,
                        :mod:`coordinator.config`); optional
``model-hash``          the base weights' hash (``edgefed-client --print-model-hash``);
                        required unless the TOML has ``[model] hash``
``ledger``              the ledger file (default ``federation.db``)
``num-server-rounds``   Flower rounds to run (default: the config's ``rounds``)
``mode``                the training mode every client runs (default ``mezo``)
any other field         of :class:`coordinator.config.FederationConfig`, hyphenated
                        (``learning-rate``, ``seed-pool-size``, ``clients-per-round``,
                        ``rebase-every``, ``pool-key``, ...), overrides the TOML
======================= ==================================================================

The server never loads the model: it hands out seeds, combines scalars and keeps the
ledger, which ``edgefed-export`` turns into the trained model afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from coordinator.config import ConfigError, FederationConfig, load_config
from coordinator.ledger import Ledger
from flower_adapter.strategy import SeedScalarStrategy

__all__ = ["ServerSettings", "app", "make_server_app", "run_federation", "settings_from_run_config"]

logger = logging.getLogger(__name__)

# FederationConfig fields that describe the coordinator's own server, not a federation.
_SERVER_FIELDS = frozenset({"host", "port", "allowlist", "tls_cert", "tls_key", "insecure", "read_token", "modes",
                            "max_connections_per_address", "max_connections_in_handshake", "commit_wait_s"})
_FIELDS = frozenset(f.name for f in dataclasses.fields(FederationConfig)) - _SERVER_FIELDS
_ALIASES = {"ledger": "ledger_path", "num-server-rounds": "rounds"}


@dataclass(frozen=True)
class ServerSettings:
    """What the ServerApp runs.

    Attributes:
        config: the federation (as ``edgefed-coordinator`` takes it).
        mode: the training mode every client runs.
        num_rounds: Flower rounds to run; each commits one ledger round unless the
            attempt fails (too few updates). None: ``config.rounds``.
    """

    config: FederationConfig
    mode: str = "mezo"
    num_rounds: int | None = None

    def __post_init__(self) -> None:
        rounds = self.config.rounds if self.num_rounds is None else self.num_rounds
        if rounds < 1:
            raise ConfigError("rounds: the Flower adapter runs a fixed number of rounds; set num-server-rounds >= 1")
        if not self.mode or not self.mode.replace("_", "").isalnum():
            raise ConfigError(f"mode: expected a training mode's name (mezo, ferret, ...), got {self.mode!r}")

    @property
    def rounds(self) -> int:
        return self.config.rounds if self.num_rounds is None else self.num_rounds


def settings_from_run_config(run_config: Mapping[str, Any]) -> ServerSettings:
    """The settings a run config describes (see the module docstring).

    Raises:
        ConfigError: a missing model hash, an unreadable TOML file, an invalid value; one line.
    """
    overrides: dict[str, Any] = {}
    for key, value in run_config.items():
        name = _ALIASES.get(key, key.replace("-", "_"))
        if name in _FIELDS:
            overrides[name] = value
    for name in ("lora_targets", "lora_layers"):  # a run config holds scalars: lists come comma-separated
        if isinstance(overrides.get(name), str):
            items = [item.strip() for item in overrides[name].split(",") if item.strip()]
            try:
                overrides[name] = [int(item) for item in items] if name == "lora_layers" else items
            except ValueError:
                raise ConfigError(f"{name}: expected comma-separated layer indices, got {overrides[name]!r}") from None
    path = run_config.get("federation-config") or None
    if path is None and "model_hash" not in overrides:
        raise ConfigError("model_hash: required: set 'model-hash' in the run config (edgefed-client "
                          "--print-model-hash prints it), or [model] hash in the 'federation-config' file")
    config = load_config(path, overrides)
    return ServerSettings(config=config, mode=str(run_config.get("mode", "mezo")),
                          num_rounds=None if "num-server-rounds" not in run_config
                          else int(run_config["num-server-rounds"]))


def run_federation(grid: Grid, settings: ServerSettings,
                   on_finish: Callable[[SeedScalarStrategy], None] | None = None) -> SeedScalarStrategy:
    """Run the federation's rounds on ``grid`` and close the ledger; the strategy, with
    its per-round reports, is returned (and passed to ``on_finish`` first)."""
    config = settings.config
    with Ledger(config.ledger_path) as ledger:  # opened in this thread: SQLite connections stay in theirs
        strategy = SeedScalarStrategy(config, ledger, mode=settings.mode)
        strategy.start(grid, ArrayRecord(), num_rounds=settings.rounds, timeout=config.deadline_s)
        for report in strategy.reports:
            logger.info("round %d attempt %d: %s, %d updates, %d bytes per client (%d down, %d up), "
                        "%d fingerprint(s), %d distinct", report.round, report.attempt,
                        "committed" if report.committed else "abandoned", len(report.trainers),
                        report.bytes_per_client, report.bytes_down, report.bytes_up, len(report.fingerprints),
                        len(set(report.fingerprints.values())))
        if on_finish is not None:
            on_finish(strategy)
    return strategy


def make_server_app(settings: ServerSettings | None = None,
                    on_finish: Callable[[SeedScalarStrategy], None] | None = None) -> ServerApp:
    """A ServerApp running the federation of ``settings`` (None: read from the run config
    when the app starts); ``on_finish`` gets the strategy once the rounds are done."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, settings or settings_from_run_config(context.run_config), on_finish)

    return server


app = make_server_app()
