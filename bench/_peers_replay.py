"""Catch-up for ``bench/peers.py``: a client that returns after N rounds, N = 10, 100, 1,000.

Two ways to bring a client holding round 0 to round N, on the README federation's
settings (SmolLM2-135M with the LoRA scope: r = 8 on q_proj/v_proj, 460,800 values;
1,024 seeds per round as the ferret clients take them; a seed pool of K = 16,384;
``rebase_every`` 4; pool key 1; Rademacher directions):

* ``table-rebuild``, this project's catch-up (PROTOCOL.md §6): the coordinator's sync
  response (``coordinator.server.Coordinator._sync_response``) carries the seed table as of
  the last rebase round (at most K entries, the fl32 per-seed totals) and the at most
  ``rebase_every - 1`` rounds after it; the client rebuilds with
  :meth:`edge_client.sync.ModelSync.catch_up`, theta_0 plus one direction per table entry
  plus one per later coefficient. Bounded by K + (rebase_every - 1) x 1,024 directions,
  whatever N is.
* ``history-replay``: the client downloads every missed round's (seed, coefficient) list
  and applies all N x 1,024 directions in commit order. It is measured with the same code
  path: the same ``_sync_response`` on a ledger that never rebases (base round 0, no
  table, all N rounds), and the same ``ModelSync.catch_up`` with a ``rebase_every`` larger
  than N, so it runs the very perturbation kernel the table rebuild runs, and checks the
  same table digest at the end.

**What FedKSeed does** (Qin et al., ICML 2024, arXiv 2312.06353). Every zeroth-order step
draws its seed from K candidate seeds fixed at the start; clients upload (seed, scalar
gradient) pairs; the server keeps, for each candidate seed, the scalar gradients it has
received and their running sum. A client taking part pulls the scalar gradients it has
not seen and replays them on its model. Because every direction is one of K, the history
can be folded per seed: the download is bounded by K scalars (the "under 18 kilobytes"
of the title is a few thousand float32 values, the seeds being known to both sides) and
the replay by K directions; the public implementation rebuilds the global model from
theta_0 and the K accumulated per-seed scalars ("pull the latest model via accumulated
{seed, grad} pairs"). That folded table is what this project's
``table-rebuild`` is, made bit-exact (fl32 accumulation, rebase points and a digest, so
every client and the exporter reach the same float32 bits). The ``history-replay`` row is
therefore the *unfolded* history, every (seed, coefficient) of every missed round in
order: what a seed-and-scalar federation without a bounded seed pool has to do (there
every step has a fresh seed, so nothing folds), and what FedKSeed's per-seed folding is
there to avoid. This benchmark puts a number on that difference; it is not a claim that
FedKSeed's own catch-up is unbounded.

**Why the comparison is fair.** Same ledger (built with the real
:class:`coordinator.ledger.Ledger` ``commit_round``; seeds drawn from the pool exactly as
the coordinator draws them, ``Coordinator._seeds_for`` keyed by the pool key; float32
coefficients of magnitude ~1e-4), same model and LoRA space, same message type and codec,
same client code and kernel, same machine and threads, one method after the other. Both
end at the same ledger state: ``catch_up`` verifies the table digest of round N for both.
The two models are not bit-identical once a rebase round has passed (the table rebuild
adds the fl32 per-seed totals in ascending seed order, the history adds every
coefficient in commit order, so float32 rounding differs); each history row reports the
largest absolute difference from the table-rebuilt values.

**Bytes** are the length of the message as :func:`protocol.codec.encode` writes it (one
msgpack map, seeds as uint64, values as float64: about 19 bytes a pair): the websocket
payload, the coordinator running with compression off, websocket framing (2 to 14 bytes a
frame) and TLS excluded. ``raw_bytes`` is the same content at 12 bytes a pair (an 8-byte
seed and a float32), for reference. A history of 1,000 rounds (~19 MB) is more than one
frame may carry (4 MiB, :data:`protocol.limits.MAX_FRAME_BYTES`); it is encoded without
that limit, as if split over several frames (the split would add a few bytes a frame).

**Seconds** are the wall time of ``ModelSync.catch_up`` alone (decoding the frame and
loading the model are not counted), the median of ``repeats`` runs after a one-round warm-up.
The history replay of N rounds costs N x 1,024 directions at the same per-direction cost
as the table rebuild's (~0.6 ms a direction on this 2-core CPU: ~1 minute for N = 100,
~10 minutes for N = 1,000). N <= ``history_run_upto`` (100) is always run, a larger N
only when its estimate (measured seconds per direction x directions) is under
``history_run_limit_s`` (2 minutes); otherwise its seconds are derived linearly from the
measured per-round cost of the largest N that was run, and the row says ``"derived"``
(``seconds_how`` says from what). A history run estimated over that limit is timed once
unless ``history_repeats`` says otherwise. Bytes are always measured (encoding is
cheap), even where the seconds are derived. The machine is shared, so seconds carry its
noise: each row keeps every run (``runs_s``) and ``seconds_spread``.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

__all__ = [
    "catch_up_comparison",
    "extend_ledger",
    "history_message",
    "round_coefficients",
    "round_seeds",
    "table_message",
    "time_catch_up",
]

SEEDS_PER_ROUND = 1024  # edgefed-local --ferret-seeds
SEED_POOL_SIZE = 16384  # edgefed-local --seed-pool-size
REBASE_EVERY = 4  # edgefed-local --rebase-every
POOL_KEY = 1  # edgefed-local --pool-key
COEFFICIENT_SCALE = 1e-4
RAW_BYTES_PER_PAIR = 12  # an 8-byte seed and a float32
HISTORY_RUN_UPTO = 100
HISTORY_RUN_LIMIT_S = 120.0


# ---------------------------------------------------------------------------- the ledger


def round_seeds(round_number: int, *, count: int = SEEDS_PER_ROUND, seed_pool_size: int = SEED_POOL_SIZE,
                pool_key: int = POOL_KEY) -> list[int]:
    """The seeds of a round's first attempt, drawn as the coordinator draws them."""
    from coordinator.server import Coordinator

    shim = SimpleNamespace(pool_key=pool_key, config=SimpleNamespace(seed_pool_size=seed_pool_size))
    return Coordinator._seeds_for(shim, round_number, 0, count)  # type: ignore[arg-type]


def round_coefficients(round_number: int, seeds: Sequence[int], *, scale: float = COEFFICIENT_SCALE
                       ) -> list[tuple[int, float]]:
    """Deterministic float32 coefficients of magnitude ~``scale`` for a round's seeds."""
    rng = np.random.default_rng([0x7E91A7, round_number])
    values = (rng.standard_normal(len(seeds)) * scale).astype(np.float32)
    values[values == 0] = np.float32(scale)  # a zero coefficient would be legal, but is no direction
    return [(int(seed), float(value)) for seed, value in zip(seeds, values)]


def extend_ledger(ledger: Any, upto: int, *, seeds_per_round: int = SEEDS_PER_ROUND,
                  seed_pool_size: int = SEED_POOL_SIZE, pool_key: int = POOL_KEY,
                  scale: float = COEFFICIENT_SCALE) -> None:
    """Commit rounds ``ledger.last_round() + 1 .. upto`` (no contributions: only the
    coefficients matter to catch-up)."""
    for round_number in range(ledger.last_round() + 1, upto + 1):
        seeds = round_seeds(round_number, count=seeds_per_round, seed_pool_size=seed_pool_size, pool_key=pool_key)
        ledger.commit_round(round_number, 0, round_coefficients(round_number, seeds, scale=scale), [])


def table_message(ledger: Any, have_round: int, rebase_every: int) -> Any:
    """The coordinator's sync response to a client holding ``have_round``."""
    from coordinator.server import Coordinator

    shim = SimpleNamespace(ledger=ledger, config=SimpleNamespace(rebase_every=rebase_every))
    return Coordinator._sync_response(shim, have_round)  # type: ignore[arg-type]


def history_message(ledger: Any, have_round: int = 0) -> Any:
    """The same sync response from a coordinator that never rebases: no table, every
    round after ``have_round``."""
    return table_message(ledger, have_round, ledger.last_round() + 1)


def _directions(message: Any) -> int:
    return len(message.table) + sum(len(entry.coefficients) for entry in message.rounds)


# -------------------------------------------------------------------------- the replay


def time_catch_up(space: Any, theta_0: torch.Tensor, message: Any, rebase_every: int, repeats: int
                  ) -> tuple[list[float], torch.Tensor]:
    """Run ``ModelSync.catch_up`` on ``message`` ``repeats`` times from theta_0.

    Returns:
        the wall seconds of each run, and the values it reached (a copy).
    """
    from edge_client.sync import ModelSync, RoundCoefficients

    space.load(theta_0)
    sync = ModelSync(space, rebase_every=rebase_every, copies_where="memory")
    rounds = [RoundCoefficients(entry.round, tuple(entry.coefficients)) for entry in message.rounds]
    seconds = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        sync.catch_up(message.base_round, message.table, rounds, message.table_digest)
        seconds.append(time.perf_counter() - started)
    if sync.round != message.target_round:
        raise RuntimeError(f"catch-up reached round {sync.round}, not {message.target_round}")
    return seconds, space.values().detach().clone()


def _encoded(message: Any) -> tuple[bytes, Any]:
    """The frame and the message as the client decodes it (no frame-size limit)."""
    from protocol import codec

    frame = codec.encode(message, max_size=None)
    return frame, codec.decode(frame, max_size=None)


def _spread(seconds: Sequence[float]) -> list[float]:
    return [min(seconds), max(seconds)]


# ------------------------------------------------------------------------ the benchmark


def catch_up_comparison(n_values: Sequence[int] = (10, 100, 1000), *, model_source: str = "smollm2-135m",
                        repeats: int = 3, history_repeats: int | None = None,
                        seeds_per_round: int = SEEDS_PER_ROUND, seed_pool_size: int = SEED_POOL_SIZE,
                        rebase_every: int = REBASE_EVERY, pool_key: int = POOL_KEY,
                        coefficient_scale: float = COEFFICIENT_SCALE, scope: Any = None,
                        history_run_upto: int = HISTORY_RUN_UPTO, history_run_limit_s: float = HISTORY_RUN_LIMIT_S,
                        cache_dir: str | Path | None = None,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Catch-up of a client returning after each N of ``n_values`` rounds: table rebuild
    against full history replay (see the module docstring). Prints nothing; ``progress``,
    when given, is called with a line of text as each measurement starts.

    Args:
        n_values: the rounds missed (the client holds round 0, the ledger round N).
        model_source: the base model (:func:`edge_client.model.resolve_model`).
        repeats: timed runs of each table rebuild (the median is reported), and of each
            history replay unless ``history_repeats`` says otherwise.
        history_repeats: timed runs of each history replay; None: ``repeats`` where one run
            is estimated under ``history_run_limit_s``, else 1.
        seeds_per_round, seed_pool_size, rebase_every, pool_key: the federation's settings.
        coefficient_scale: the coefficients' standard deviation.
        scope: the :class:`edge_client.scope.ScopeConfig` (default: the federation's LoRA).
        history_run_upto: history replays of at most this many rounds are always run.
        history_run_limit_s: a longer history is run only if estimated under this.
        cache_dir: the model conversion cache.

    Returns:
        ``rows`` (one per N and method: ``n``, ``method``, ``bytes``, ``seconds``,
        ``seconds_spread`` [min, max], ``how`` "run" or "derived", and details),
        ``replay_vs_table_bytes_n1000`` and ``replay_vs_table_seconds_n1000`` (None when
        1,000 is not among ``n_values``), ``ratios`` for every N, and ``settings``.
    """
    from coordinator.ledger import Ledger
    from edge_client.model import load_model, resolve_model
    from edge_client.scope import ScopeConfig, build_space
    from protocol import codec, perturb
    from protocol.limits import MAX_FRAME_BYTES

    say = progress or (lambda line: None)
    ns = sorted({int(n) for n in n_values})
    if not ns or ns[0] < 1:
        raise ValueError(f"n_values must be positive round counts, got {n_values!r}")
    scope = scope if scope is not None else ScopeConfig(kind="lora")

    say(f"loading {model_source}")
    model_dir = resolve_model(model_source, cache_dir=Path(cache_dir) if cache_dir else None)
    base_model, _tokenizer = load_model(model_dir)
    _model, space = build_space(base_model, scope)
    theta_0 = space.values().detach().clone()
    threads = torch.get_num_threads()

    rows: list[dict[str, Any]] = []
    ratios: dict[int, dict[str, float]] = {}
    per_direction: list[float] = []  # measured seconds per direction, every timed run
    history_per_round: tuple[int, float, list[float]] | None = None  # (n, median s/round, spread s/round)
    # The ledger's fsyncs are not what is measured: keep it in memory where there is a tmpfs.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="edgefed-replay-", dir=shm if shm.is_dir() else None) as tmp:
        with Ledger(Path(tmp) / "ledger.db") as ledger:
            # Warm-up: one round's replay (the kernel, the allocator, the first-touch pages).
            extend_ledger(ledger, 1, seeds_per_round=seeds_per_round, seed_pool_size=seed_pool_size,
                          pool_key=pool_key, scale=coefficient_scale)
            say("warm-up: replaying one round")
            time_catch_up(space, theta_0, history_message(ledger), 2, 1)

            for n in ns:
                started = time.perf_counter()
                extend_ledger(ledger, n, seeds_per_round=seeds_per_round, seed_pool_size=seed_pool_size,
                              pool_key=pool_key, scale=coefficient_scale)
                ledger_s = time.perf_counter() - started

                # This project: the coordinator's own sync response, encoded, decoded, replayed.
                frame, table_sync = _encoded(table_message(ledger, 0, rebase_every))
                directions = _directions(table_sync)
                say(f"N={n}: table rebuild, {directions} directions x {repeats}")
                seconds, table_values = time_catch_up(space, theta_0, table_sync, rebase_every, repeats)
                per_direction += [s / directions for s in seconds]
                table_row = {
                    "n": n, "method": "table-rebuild", "bytes": len(frame), "seconds": statistics.median(seconds),
                    "seconds_spread": _spread(seconds), "how": "run", "bytes_how": "run", "seconds_how": "run",
                    "runs_s": seconds, "directions": directions, "base_round": table_sync.base_round,
                    "table_entries": len(table_sync.table), "rounds_sent": len(table_sync.rounds),
                    "raw_bytes": RAW_BYTES_PER_PAIR * _directions(table_sync),
                    "fits_one_frame": len(frame) <= MAX_FRAME_BYTES, "ledger_build_s": ledger_s,
                    "kernel": perturb.last_kernel(),
                }
                rows.append(table_row)
                del frame

                # The unfolded history: every round since 0, the same codec and client code.
                history = history_message(ledger)
                history_bytes = len(codec.encode(history, max_size=None))
                directions = _directions(history)
                estimate = directions * statistics.median(per_direction)
                run_it = n <= history_run_upto or estimate <= history_run_limit_s
                history_row: dict[str, Any] = {
                    "n": n, "method": "history-replay", "bytes": history_bytes, "bytes_how": "run",
                    "directions": directions, "base_round": history.base_round, "table_entries": 0,
                    "rounds_sent": len(history.rounds), "raw_bytes": RAW_BYTES_PER_PAIR * _directions(history),
                    "fits_one_frame": history_bytes <= MAX_FRAME_BYTES,
                }
                if run_it:
                    times = history_repeats if history_repeats is not None else (
                        repeats if estimate <= history_run_limit_s else 1)
                    _, decoded = _encoded(history)
                    say(f"N={n}: history replay, {directions} directions x {times} (~{estimate * times:.0f} s)")
                    seconds, history_values = time_catch_up(space, theta_0, decoded, n + 1, times)
                    del decoded
                    per_direction += [s / directions for s in seconds]
                    history_per_round = (n, statistics.median(seconds) / n, [s / n for s in _spread(seconds)])
                    difference = (history_values - table_values).abs().max().item()
                    history_row.update({
                        "seconds": statistics.median(seconds), "seconds_spread": _spread(seconds), "how": "run",
                        "seconds_how": "run", "runs_s": seconds, "max_abs_diff_vs_table": difference,
                        "identical_to_table": bool(torch.equal(history_values, table_values)),
                    })
                else:
                    if history_per_round is None:
                        raise ValueError(f"no history replay was run to derive N={n} from; raise history_run_upto")
                    from_n, per_round, spread = history_per_round
                    history_row.update({
                        "seconds": per_round * n, "seconds_spread": [s * n for s in spread], "how": "derived",
                        "seconds_how": f"derived: {n} x the measured per-round cost of N={from_n}",
                        "estimate_from_per_direction_s": estimate,
                    })
                    say(f"N={n}: history replay derived ({history_row['seconds']:.0f} s)")
                rows.append(history_row)
                del history
                ratios[n] = {"bytes": history_row["bytes"] / table_row["bytes"],
                             "seconds": history_row["seconds"] / table_row["seconds"]}

    max_table = seed_pool_size + (rebase_every - 1) * seeds_per_round
    return {
        "rows": rows,
        "replay_vs_table_bytes_n1000": ratios[1000]["bytes"] if 1000 in ratios else None,
        "replay_vs_table_seconds_n1000": ratios[1000]["seconds"] if 1000 in ratios else None,
        "ratios": {str(n): value for n, value in ratios.items()},
        "settings": {
            "model": model_source, "model_dir": str(model_dir), "scope": _describe_scope(scope),
            "space_values": space.numel, "perturbation": space.distribution, "kernel": perturb.last_kernel(),
            "torch_threads": threads, "seeds_per_round": seeds_per_round, "seed_pool_size": seed_pool_size,
            "rebase_every": rebase_every, "pool_key": pool_key, "coefficient_scale": coefficient_scale,
            "repeats": repeats, "history_repeats": history_repeats, "history_run_upto": history_run_upto,
            "history_run_limit_s": history_run_limit_s, "client_round": 0,
            "seconds_per_direction_median": statistics.median(per_direction),
            "bytes": "len(protocol.codec.encode(sync_response)): the websocket payload (msgpack, seeds uint64, "
                     "values float64; compression off); websocket framing and TLS excluded; raw_bytes: 12 bytes/pair",
            "seconds": "wall time of ModelSync.catch_up (frame decoding and model loading excluded), median of the "
                       "runs after a one-round warm-up",
            "bound": {"table_rebuild_directions_at_most": max_table,
                      "history_replay_directions": f"N x {seeds_per_round}"},
        },
    }


def _describe_scope(scope: Any) -> str:
    if scope.kind != "lora":
        return str(scope.kind)
    return f"lora r={scope.lora_rank} alpha={scope.lora_alpha} targets={','.join(scope.lora_targets)}"
