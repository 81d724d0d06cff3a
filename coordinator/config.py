"""Federation configuration: a TOML file plus command-line overrides.

Example (every key optional except where noted)::

    [federation]
    id = "demo"
    rounds = 20                 # rounds to run; 0 = run until stopped

    [model]
    name = "smollm2-135m"
    hash = "<sha256 of the base weights>"   # required: clients must match it

    [training]
    scope = "full"              # or "lora"
    # lora_layers = [28, 29]    # lora only: adapters on these decoder layers (default: all)
    seed_pool_size = 1024       # K seeds in the pool (1..65536)
    rebase_every = 8
    learning_rate = 1e-6
    epsilon = 1e-3
    # personalised_lr = "mean_loss"   # FedMeZO's client-wise rates: "last_loss", "mean_loss",
    # personalised_lr_spread = 0.5    # "update_size" (default "off"); within lr x (1 +- spread)
    local_steps = 10
    batch_size = 4
    max_seq_len = 128
    aggregation = "trimmed_mean"      # or "median", "mean" (PROTOCOL.md §8.2)
    aggregation_trim = 0.2            # fraction cut from each end by trimmed_mean, [0, 0.5)
    aggregation_clip = 1000.0         # bound on |projected gradient|, (0, 1e30]
    aggregation_max_examples = 10000  # cap on an update's num_examples weight, [1, 10**9]

    [modes.ferret]              # per training mode (the client's hello names its mode):
    seeds = 1024                # seeds its clients get each round (default: local_steps)
    value_encoding = "q8"       # how they send their values: "pairs" (default), "f32", "q8"
    local_steps = 4             # every other key goes to those clients in round_task.settings

    [modes.droppeft]
    adapt = "dropout_ratio"     # a setting the coordinator tunes per client with a bandit
    adapt_values = [0.1, 0.25]        # (coordinator/adaptive.py)

    [modes.fedcybgd]            # cyclic block updates; the table's presence offers the mode
    blocks = 30                 # required: decoder layers of the model (blocks 0..blocks-1)
    block_order = "ascending"   # or "descending", "random" (coordinator/blocks.py)
    outer_block = false         # true: the embedding/norm/head are a block too (full scope)
    block_seeds = 256           # seeds per block (FederationInfo.block_seeds, PROTOCOL.md §5.5)
    seeds = 64                  # of them, each client's per round

    [rounds]
    clients_per_round = 3
    quorum = 3                  # updates to commit at the deadline; default: default_quorum()
    deadline_s = 600
    min_clients = 3

    [server]
    host = "0.0.0.0"
    port = 8765
    allowlist = "allow.txt"     # client keys (edgefed-keys allow ...); absent = open mode
    tls_cert = "certs/server.pem"   # wss://, required beyond loopback ...
    tls_key = "certs/server.key"    # (edgefed-keys tls-init --dir certs --host ADDRESS)
    insecure = false            # ... unless this is true
    max_connections_per_address = 256    # open TCP connections one IP address may hold
    max_connections_in_handshake = 1024  # connections, over all addresses, not past their hello
    read_token = "..."          # guards the page, /status and /metrics (?token= or Bearer); see below
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.blocks import ORDERS, BlockSchedule, schedule_blocks
from coordinator.aggregate import ROBUST_METHODS, ROBUST_MIN_VALUES, AggregationRule, RuleError
from coordinator.personal_lr import STATISTICS
from coordinator.tls import TlsError, check_transport
from protocol import limits
from protocol.blocks import MAX_BLOCK_SEEDS, OUTER_BLOCK
from protocol.messages import InvalidMessage, SettingsKind
from protocol.values import ValueEncodingError, encoding_of

__all__ = ["ConfigError", "FederationConfig", "config_from_document", "default_quorum", "load_config"]

# Seed pairs in one sync_response: each costs at most 19 bytes on the wire (fixarray,
# uint64, float64), so this keeps a sync under limits.MAX_FRAME_BYTES with room to spare.
MAX_SYNC_PAIRS = 150_000

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_READ_TOKEN = re.compile(r"[A-Za-z0-9_.~-]{16,256}")  # URL-safe: travels as ?token= unescaped


class ConfigError(ValueError):
    """The federation configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class FederationConfig:
    """Everything the coordinator decides for a federation.

    Attributes:
        federation_id: name of the federation (letters, digits, ``_.-``).
        model_name: the model clients load (informational; identity is the hash).
        model_hash: SHA-256 of the base weights (edge_client.model.base_weights_hash).
        scope: "full" or "lora".
        lora_rank, lora_alpha, lora_targets, lora_init_seed: the LoRA scope.
        lora_layers: the decoder layers (full-model indices, ascending) whose targets get
            adapters; () (the default): every layer. A FedBiOT federation sets the
            emulator's adapter layers here, so emulator and full-model clients train one
            space (PROTOCOL.md §5.1).
        seed_pool_size: K seeds in the pool (1..65536); the seed table, and so catch-up,
            never holds more than K entries.
        pool_key: the key the seed pool is derived from (PROTOCOL.md §6.11); None draws a
            random one when the ledger is created. Fixing it makes a run reproducible.
        rebase_every: every this many rounds the model is defined from theta_0 and the
            seed table (PROTOCOL.md §6); bounds catch-up to one table plus this many rounds.
        perturbation: "rademacher" (bit-exact) or "gaussian".
        aggregation: how per-seed scalars are combined: "trimmed_mean", "median" or "mean"
            (PROTOCOL.md §8.2).
        aggregation_trim: fraction of the values cut from each end by "trimmed_mean".
        aggregation_clip: bound on |projected gradient| before combining.
        aggregation_max_examples: cap on an update's num_examples weight.
        learning_rate, epsilon: the MeZO step size and perturbation scale.
        personalised_lr: "off" (every client runs ``learning_rate``) or the statistic of
            FedMeZO's personalised client-wise rates (:mod:`coordinator.personal_lr`):
            "last_loss", "mean_loss" (its last five rounds) or "update_size".
        personalised_lr_spread: δ / lr of those rates, in [0, 1): they stay within
            ``learning_rate · (1 ± spread)`` (FedMeZO's code: 0.5).
        local_steps: seeds per round for a client whose mode sets no ``seeds`` in
            ``modes`` (a MeZO client takes one step per seed).
        modes: per training mode (the name a client's hello gives), its settings: the key
            ``seeds`` (how many of the attempt's seeds its clients get, a prefix of the
            attempt's list, PROTOCOL.md §6.11) and any others, which go to its clients in
            ``round_task.settings`` (the client checks their names and types), except
            ``adapt`` and ``adapt_values``: a setting the coordinator tunes per client
            and the values it tries (:mod:`coordinator.adaptive`). ``value_encoding``
            (``"pairs"``, ``"f32"`` or ``"q8"``) goes to the clients too and says how
            they send their values (:mod:`protocol.values`).
        batch_size, max_seq_len: the clients' batch shape.
        rounds: rounds to run (0 = until stopped).
        clients_per_round: clients asked to train in a round.
        quorum: updates needed to commit at the deadline; None (the default) takes
            :func:`default_quorum`, which keeps a robust method in force. Read
            :attr:`commit_quorum` for the value in force.
        min_clients: connected clients needed before a round opens.
        deadline_s: seconds a round waits for its updates.
        commit_wait_s: seconds to wait for fingerprints after a commit before the next round.
        ledger_path: the SQLite ledger file.
        host, port: where to listen.
        allowlist: allow-list file of client public keys; None = open mode (anyone may
            join, nothing is authenticated: local federations only).
        tls_cert, tls_key: PEM certificate and key to serve wss://.
        insecure: allow plain ws:// on a non-loopback host.
        max_connections_per_address: open TCP connections one IP address may hold (a
            local federation runs every client from 127.0.0.1, hence the generous
            default). At the cap a new connection makes room by dropping the oldest one
            of that address that has not said hello yet, so idle connections cannot lock
            out the honest devices behind one NAT; it is refused at accept only when all
            of them have said hello.
        max_connections_in_handshake: connections, over all addresses, that have not
            said hello yet; at the cap the oldest of them is dropped to make room, so
            connections from many addresses (an IPv6 prefix) cannot exhaust the process.
        read_token: the token the page (``/``), ``/status``, ``/metrics`` and the page's
            feed require (``?token=`` or ``Authorization: Bearer``; 16 to 256 of
            [A-Za-z0-9_.~-]); None: reads are open, except in allow-list mode, where the
            coordinator generates one at start and logs the page's address with it.
    """

    model_hash: str
    federation_id: str = "edgefed"
    model_name: str = "smollm2-135m"
    scope: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_init_seed: int = 0
    lora_layers: tuple[int, ...] = ()
    seed_pool_size: int = 1024
    pool_key: int | None = None
    rebase_every: int = 8
    perturbation: str = "rademacher"
    aggregation: str = "trimmed_mean"
    aggregation_trim: float = 0.2
    aggregation_clip: float = 1000.0
    aggregation_max_examples: int = 10_000
    learning_rate: float = 1e-6
    epsilon: float = 1e-3
    personalised_lr: str = "off"
    personalised_lr_spread: float = 0.5
    local_steps: int = 10
    batch_size: int = 4
    max_seq_len: int = 128
    rounds: int = 10
    clients_per_round: int = 3
    quorum: int | None = None
    min_clients: int = 1
    deadline_s: float = 600.0
    commit_wait_s: float = 0.0
    ledger_path: str = "federation.db"
    host: str = "127.0.0.1"
    port: int = 8765
    allowlist: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False
    max_connections_per_address: int = 256
    max_connections_in_handshake: int = 1024
    read_token: str | None = field(default=None, repr=False)  # a secret: kept out of reprs and logs
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{key}: {why} (got {getattr(self, key)!r})")

        if not _ID.match(self.federation_id):
            raise bad("federation_id", "1-64 letters, digits or _.-")
        if not _HEX64.match(self.model_hash):
            raise bad("model_hash", "must be 64 lowercase hex characters (the client prints it)")
        if self.scope not in ("full", "lora"):
            raise bad("scope", "must be 'full' or 'lora'")
        if self.perturbation not in ("rademacher", "gaussian"):
            raise bad("perturbation", "must be 'rademacher' or 'gaussian'")
        try:
            self.aggregation_rule  # builds, so validates, the rule
        except RuleError as error:
            raise bad(_RULE_FIELDS[error.parameter], error.why) from None
        if not 1 <= self.seed_pool_size <= limits.MAX_TABLE_ENTRIES:
            # A bounded pool bounds the seed table, hence catch-up and sync frames.
            raise bad("seed_pool_size", f"must be between 1 and {limits.MAX_TABLE_ENTRIES}")
        if self.pool_key is not None and not 0 <= self.pool_key <= limits.MAX_SEED:
            raise bad("pool_key", "must be in [0, 2**63)")
        if not 1 <= self.rebase_every <= limits.MAX_SYNC_ROUNDS:
            raise bad("rebase_every", f"must be between 1 and {limits.MAX_SYNC_ROUNDS}")
        self._check_modes()
        most = self.max_seeds_per_round
        if most > limits.MAX_SEEDS_PER_ROUND:
            raise ConfigError(f"modes.{BLOCK_MODE}.seeds: a round's seeds (the most a mode takes, plus each of "
                              f"clients_per_round block clients' own) come to {most}, more than a round holds "
                              f"({limits.MAX_SEEDS_PER_ROUND})")
        if self.table_capacity > limits.MAX_TABLE_ENTRIES:
            raise ConfigError(f"modes.{BLOCK_MODE}.block_seeds: the seed table could hold {self.table_capacity} "
                              f"entries (pool and every block's seeds), more than {limits.MAX_TABLE_ENTRIES}")
        if self.table_capacity + (self.rebase_every - 1) * most > MAX_SYNC_PAIRS:
            raise bad("rebase_every", f"a sync (the table's {self.table_capacity} entries + (rebase_every - 1) * "
                      f"seeds per round = {self.table_capacity + (self.rebase_every - 1) * most} pairs) must fit "
                      f"one frame: at most {MAX_SYNC_PAIRS} pairs")
        if self.scope == "lora":
            if not 1 <= self.lora_rank <= limits.MAX_LORA_RANK:
                raise bad("lora_rank", f"must be between 1 and {limits.MAX_LORA_RANK}")
            if not 1 <= len(self.lora_targets) <= limits.MAX_LORA_TARGETS or not all(self.lora_targets):
                raise bad("lora_targets", f"must name 1 to {limits.MAX_LORA_TARGETS} modules")
            if not 0 <= self.lora_init_seed <= limits.MAX_SEED:
                raise bad("lora_init_seed", "must be in [0, 2**63)")
        if self.lora_layers:
            if self.scope != "lora":
                raise bad("lora_layers", "restricts the lora scope; leave it out for scope 'full'")
            layers = list(self.lora_layers)
            if (len(layers) > limits.MAX_LORA_LAYERS or layers != sorted(set(layers))
                    or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= limits.MAX_LAYER_INDEX
                               for i in layers)):
                raise bad("lora_layers", f"must be distinct ascending layer indices in [0, {limits.MAX_LAYER_INDEX}], "
                          f"at most {limits.MAX_LORA_LAYERS}")
        if not 1 <= self.local_steps <= limits.MAX_SEEDS_PER_ROUND:
            raise bad("local_steps", f"must be between 1 and {limits.MAX_SEEDS_PER_ROUND}")
        if self.seed_pool_size and self.local_steps > self.seed_pool_size:
            raise bad("local_steps", "cannot exceed seed_pool_size (seeds in a round are distinct)")
        if self.personalised_lr not in ("off", *STATISTICS):
            raise bad("personalised_lr", f"must be 'off' or one of {', '.join(STATISTICS)}")
        if not 0.0 <= self.personalised_lr_spread < 1.0:
            raise bad("personalised_lr_spread", "must be in [0, 1)")
        for key in ("learning_rate", "epsilon", "deadline_s"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise bad(key, "must be a finite number > 0")
        for key in ("batch_size", "max_seq_len", "clients_per_round", "min_clients"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.quorum is not None and not 1 <= self.quorum <= self.clients_per_round:
            raise bad("quorum", f"must be between 1 and clients_per_round ({self.clients_per_round})")
        if self.rounds < 0:
            raise bad("rounds", "must be >= 0")
        if self.commit_wait_s < 0:
            raise bad("commit_wait_s", "must be >= 0")
        if not 0 <= self.port <= 65535:
            raise bad("port", "must be a TCP port")
        for key in ("max_connections_per_address", "max_connections_in_handshake"):
            if not 1 <= getattr(self, key) <= 1_000_000:
                raise bad(key, "must be between 1 and 1000000")
        if self.read_token is not None and not _READ_TOKEN.fullmatch(self.read_token):
            raise ConfigError("read_token: must be 16 to 256 characters of [A-Za-z0-9_.~-]")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise bad("tls_cert", "tls_cert and tls_key go together")
        try:
            check_transport(self.host, tls=self.tls_cert is not None, insecure=self.insecure)
        except TlsError as error:
            raise ConfigError(str(error)) from None

    def _check_modes(self) -> None:
        if not isinstance(self.modes, dict):
            raise ConfigError(f"modes: expected a table per mode, got {self.modes!r}")
        for mode, table in self.modes.items():
            if not isinstance(table, dict):
                raise ConfigError(f"modes.{mode}: expected a table, got {table!r}")
            seeds = table.get("seeds", self.local_steps)
            if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= limits.MAX_SEEDS_PER_ROUND:
                raise ConfigError(f"modes.{mode}.seeds: must be an integer between 1 and "
                                  f"{limits.MAX_SEEDS_PER_ROUND} (got {seeds!r})")
            if mode == BLOCK_MODE:
                self._check_block_table(table, seeds)
            elif any(key in table for key in _BLOCK_KEYS):
                raise ConfigError(f"modes.{mode}: {', '.join(sorted(_BLOCK_KEYS & table.keys()))} belong to "
                                  f"[modes.{BLOCK_MODE}]")
            elif seeds > self.seed_pool_size:
                raise ConfigError(f"modes.{mode}.seeds: cannot exceed seed_pool_size ({self.seed_pool_size}); "
                                  "seeds in a round are distinct")
            try:
                encoding_of(table)
            except ValueEncodingError as error:
                raise ConfigError(f"modes.{mode}.{error}") from None
            settings = self.settings_for_mode(mode)
            if "adapt" in table or "adapt_values" in table:
                name, values = table.get("adapt"), table.get("adapt_values")
                if not isinstance(name, str) or not isinstance(values, list) or not values \
                        or len(values) > limits.MAX_MODE_SETTINGS:
                    raise ConfigError(f"modes.{mode}: adapt (a setting's name) and adapt_values (1 to "
                                      f"{limits.MAX_MODE_SETTINGS} values) go together")
                if name in settings:
                    raise ConfigError(f"modes.{mode}: {name} is both fixed and adapted")
                for value in values:  # each value must be sendable in round_task.settings
                    settings_with = {**settings, name: value}
                    try:
                        SettingsKind(limits.MAX_MODE_SETTINGS).check(settings_with, f"modes.{mode}")
                    except InvalidMessage as error:
                        raise ConfigError(str(error)) from None
            try:
                SettingsKind(limits.MAX_MODE_SETTINGS).check(settings, f"modes.{mode}")
            except InvalidMessage as error:
                raise ConfigError(str(error)) from None

    def _check_block_table(self, table: Mapping[str, Any], seeds: int) -> None:
        where = f"modes.{BLOCK_MODE}"
        layers = table.get("blocks")
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= OUTER_BLOCK:
            raise ConfigError(f"{where}.blocks: the model's number of decoder layers is required, an integer "
                              f"between 1 and {OUTER_BLOCK - 1} (got {layers!r})")
        order = table.get("block_order", "ascending")
        if order not in ORDERS:
            raise ConfigError(f"{where}.block_order: must be one of {', '.join(ORDERS)} (got {order!r})")
        if not isinstance(table.get("outer_block", False), bool):
            raise ConfigError(f"{where}.outer_block: expected true or false (got {table['outer_block']!r})")
        if table.get("outer_block") and self.scope != "full":
            raise ConfigError(f"{where}.outer_block: only the full scope has parameters outside the decoder layers")
        if not self._scheduled_blocks(table):
            raise ConfigError(f"{where}.blocks: none of the decoder layers 0..{layers - 1} is in lora_layers, so "
                              "there is no block to train")
        per_block = table.get("block_seeds", DEFAULT_BLOCK_SEEDS)
        if isinstance(per_block, bool) or not isinstance(per_block, int) or not 1 <= per_block <= MAX_BLOCK_SEEDS:
            raise ConfigError(f"{where}.block_seeds: must be an integer between 1 and {MAX_BLOCK_SEEDS} "
                              f"(got {per_block!r})")
        if seeds > per_block:
            raise ConfigError(f"{where}.seeds: cannot exceed block_seeds ({per_block}); a client's seeds are "
                              "distinct seeds of its block")

    @property
    def block_seeds(self) -> int:
        """Seeds per block (FederationInfo.block_seeds): 0 unless cyclic block updates are offered."""
        table = self.modes.get(BLOCK_MODE)
        return 0 if table is None else int(table.get("block_seeds", DEFAULT_BLOCK_SEEDS))

    def block_schedule(self) -> BlockSchedule | None:
        """The cyclic schedule of the block mode's clients, or None when it is not offered."""
        table = self.modes.get(BLOCK_MODE)
        if table is None:
            return None
        return BlockSchedule(self._scheduled_blocks(table), table.get("block_order", "ascending"),
                             seed=self.federation_id)

    def _scheduled_blocks(self, table: Mapping[str, Any]) -> list[int]:
        """The blocks of the space: its decoder layers (only lora_layers where the scope
        restricts them), then the outer block when configured."""
        blocks = schedule_blocks(int(table["blocks"]), bool(table.get("outer_block", False)))
        return [block for block in blocks if block in self.lora_layers] if self.lora_layers else blocks

    def seeds_for_mode(self, mode: str) -> int:
        """How many seeds a client of ``mode`` gets each round."""
        return int(self.modes.get(mode, {}).get("seeds", self.local_steps))

    def settings_for_mode(self, mode: str) -> dict[str, Any]:
        """What a client of ``mode`` gets in ``round_task.settings``."""
        return {key: value for key, value in self.modes.get(mode, {}).items() if key not in _COORDINATOR_KEYS}

    @property
    def max_seeds_per_round(self) -> int:
        """The most seeds an attempt can hand out (the attempt takes the most its chosen
        clients' modes need)."""
        whole_space = max([self.local_steps, *(self.seeds_for_mode(mode) for mode in self.modes if mode != BLOCK_MODE)])
        # Block clients get seeds of their own block each, after the attempt's others.
        blocks = self.clients_per_round * self.seeds_for_mode(BLOCK_MODE) if BLOCK_MODE in self.modes else 0
        return whole_space + blocks

    @property
    def table_capacity(self) -> int:
        """The most entries the seed table can hold: the pool and every block's seeds."""
        table = self.modes.get(BLOCK_MODE)
        if table is None:
            return self.seed_pool_size
        return self.seed_pool_size + len(self._scheduled_blocks(table)) * self.block_seeds

    @property
    def commit_quorum(self) -> int:
        """Updates a round needs to commit at its deadline: ``quorum``, or when that is
        not set, :func:`default_quorum`."""
        return self.quorum if self.quorum is not None else default_quorum(self.aggregation, self.clients_per_round)

    @property
    def quorum_defeats_robustness(self) -> bool:
        """An explicit quorum lets a round of a robust method commit on fewer values than
        the method needs, although ``clients_per_round`` could supply them."""
        return (self.aggregation in ROBUST_METHODS and self.clients_per_round >= ROBUST_MIN_VALUES
                and self.commit_quorum < ROBUST_MIN_VALUES)

    @property
    def aggregation_rule(self) -> AggregationRule:
        """The rule the aggregation settings describe (coordinator/aggregate.py)."""
        return AggregationRule(method=self.aggregation, trim_fraction=self.aggregation_trim,
                               clip=self.aggregation_clip, max_examples=self.aggregation_max_examples)

    def public_settings(self) -> dict[str, Any]:
        """The settings the live page shows: the federation's, not the host's (no
        paths, no keys, no token)."""
        hidden = {"pool_key", "read_token", "ledger_path", "allowlist", "tls_cert", "tls_key", "host", "port",
                  "insecure", "quorum"}
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in hidden}
        settings["quorum"] = self.commit_quorum
        settings["access"] = "allow-list" if self.allowlist else "open"
        settings["transport"] = "wss" if self.tls_cert else "ws"
        return {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}

    def identity(self) -> dict[str, str]:
        """The settings a ledger is bound to: changing them under an existing ledger is refused."""
        return {
            "federation_id": self.federation_id,
            "model_hash": self.model_hash,
            "scope": f"{self.scope}:{self.lora_rank}:{self.lora_alpha}:{','.join(self.lora_targets)}:{self.lora_init_seed}"
            + (f":layers={','.join(map(str, self.lora_layers))}" if self.lora_layers else "")
            if self.scope == "lora" else "full",
            "perturbation": self.perturbation,
            "rebase_every": str(self.rebase_every),
            "seed_pool_size": str(self.seed_pool_size),
            # Which seeds are block seeds (PROTOCOL.md §5.5) is part of the model's definition.
            "block_seeds": str(self.block_seeds),
        }


def default_quorum(aggregation: str, clients_per_round: int) -> int:
    """The quorum when the config sets none. A robust method needs ROBUST_MIN_VALUES
    values per seed to trim or take a median, so its rounds wait for that many updates
    where clients_per_round allows (and for a majority of a larger round); the plain mean
    needs a majority only."""
    majority = max(1, math.ceil(clients_per_round / 2))
    if aggregation in ROBUST_METHODS:
        return min(clients_per_round, max(ROBUST_MIN_VALUES, majority))
    return majority


# Keys of a [modes.<name>] table that the coordinator reads itself (not sent to clients).
_BLOCK_KEYS = frozenset({"blocks", "block_order", "outer_block", "block_seeds"})
_COORDINATOR_KEYS = frozenset({"seeds", "adapt", "adapt_values"}) | _BLOCK_KEYS
# The mode whose clients train one block at a time (edge_client/engines/fedcybgd.py).
BLOCK_MODE = "fedcybgd"
DEFAULT_BLOCK_SEEDS = 256

# AggregationRule parameter -> the FederationConfig field that sets it
_RULE_FIELDS: dict[str, str] = {
    "method": "aggregation", "trim_fraction": "aggregation_trim", "clip": "aggregation_clip",
    "max_examples": "aggregation_max_examples",
}

# TOML table -> {toml key: dataclass field}
_TOML_KEYS: dict[str, dict[str, str]] = {
    "federation": {"id": "federation_id", "rounds": "rounds", "ledger": "ledger_path"},
    "model": {"name": "model_name", "hash": "model_hash"},
    "training": {
        "scope": "scope", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
        "lora_targets": "lora_targets", "lora_init_seed": "lora_init_seed", "lora_layers": "lora_layers",
        "seed_pool_size": "seed_pool_size", "pool_key": "pool_key", "rebase_every": "rebase_every",
        "perturbation": "perturbation", "aggregation": "aggregation", "aggregation_trim": "aggregation_trim",
        "aggregation_clip": "aggregation_clip", "aggregation_max_examples": "aggregation_max_examples",
        "learning_rate": "learning_rate", "epsilon": "epsilon", "local_steps": "local_steps",
        "personalised_lr": "personalised_lr", "personalised_lr_spread": "personalised_lr_spread",
        "batch_size": "batch_size", "max_seq_len": "max_seq_len",
    },
    "rounds": {
        "clients_per_round": "clients_per_round", "quorum": "quorum", "min_clients": "min_clients",
        "deadline_s": "deadline_s", "commit_wait_s": "commit_wait_s",
    },
    "server": {"host": "host", "port": "port", "allowlist": "allowlist", "tls_cert": "tls_cert",
               "tls_key": "tls_key", "insecure": "insecure",
               "max_connections_per_address": "max_connections_per_address",
               "max_connections_in_handshake": "max_connections_in_handshake", "read_token": "read_token"},
}


def _coerce(name: str, value: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(FederationConfig)}
    expected = fields[name].type
    if expected == "int | None" and value is None:
        return value
    if expected in ("int", "int | None") and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if expected in ("float",):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if expected in ("str", "str | None") and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if expected == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if name == "lora_targets":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of module names, got {value!r}")
        return tuple(value)
    if name == "lora_layers":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
            raise ConfigError(f"{name}: expected a list of decoder layer indices, got {value!r}")
        return tuple(value)
    return value


def _mode_tables(path: str | Path, content: Any) -> dict[str, dict[str, Any]]:
    """The ``[modes.<name>]`` tables, each a table of scalars."""
    if not isinstance(content, Mapping):
        raise ConfigError(f"{path}: [modes] must hold one table per mode, e.g. [modes.ferret]")
    for mode, table in content.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{path}: modes.{mode} must be a table ([modes.{mode}])")
    return {mode: dict(table) for mode, table in content.items()}


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> FederationConfig:
    """Read a TOML file (optional) and apply overrides (dataclass field names).

    Raises:
        ConfigError: unreadable file, unknown table or key, wrong type, invalid value.
    """
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return config_from_document(document, overrides, source=str(path) if path is not None else "config")


def config_from_document(document: Mapping[str, Any], overrides: dict[str, Any] | None = None, *,
                         source: str = "config") -> FederationConfig:
    """The config of a TOML document already parsed, or built by an app as the same nested
    tables (``{"federation": {"rounds": 20}, "training": {...}, "modes": {...}}``), with
    overrides (dataclass field names) applied.

    Raises:
        ConfigError: unknown table or key, wrong type, invalid value (``source`` names
            where the document came from in the message).
    """
    values: dict[str, Any] = {}
    for table, content in document.items():
        if table == "modes":
            values["modes"] = _mode_tables(source, content)
            continue
        if table not in _TOML_KEYS or not isinstance(content, Mapping):
            raise ConfigError(f"{source}: unknown table [{table}]; known: {', '.join([*_TOML_KEYS, 'modes'])}")
        for key, value in content.items():
            if key not in _TOML_KEYS[table]:
                raise ConfigError(f"{source}: unknown key {table}.{key}")
            name = _TOML_KEYS[table][key]
            values[name] = _coerce(name, value)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value if name == "modes" else _coerce(name, value)
    if "model_hash" not in values:
        raise ConfigError("model_hash: required ([model] hash in the config, or --model-hash)")
    try:
        return FederationConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
