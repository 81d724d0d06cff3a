"""bench/_peers_replay.py on the tiny model: the table rebuild it times is the protocol's
catch-up, the history replay reaches the same ledger state, and what each one sends grows
(or does not) with the rounds missed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench._peers_replay import catch_up_comparison, extend_ledger, history_message, table_message, time_catch_up
from coordinator.ledger import Ledger
from edge_client.model import load_model
from edge_client.scope import ScopeConfig, build_space
from edge_client.sync import ModelSync
from harness import Tiny, make_tiny

SEEDS, POOL, REBASE = 16, 64, 2
SMALL: dict[str, Any] = dict(seeds_per_round=SEEDS, seed_pool_size=POOL, pool_key=7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _space(tiny: Tiny) -> Any:
    model, _ = load_model(tiny.directory)
    return build_space(model, ScopeConfig(kind="lora"))[1]


def test_the_timed_table_rebuild_is_the_model_a_client_following_every_commit_holds(tiny: Tiny,
                                                                                    tmp_path: Path) -> None:
    space = _space(tiny)
    theta_0 = space.values().detach().clone()
    with Ledger(tmp_path / "ledger.db") as ledger:
        extend_ledger(ledger, 5, **SMALL)
        follower = ModelSync(space, rebase_every=REBASE)
        for committed in ledger.rounds_between(0, 5):
            follower.apply_commit(committed.round, committed.coefficients, committed.totals, committed.table_digest)
        followed = space.values().detach().clone()

        sync = table_message(ledger, 0, REBASE)
        assert (sync.base_round, len(sync.rounds)) == (4, 1)  # the table of round 4, then round 5
        _, rebuilt = time_catch_up(space, theta_0, sync, REBASE, 1)
        assert torch.equal(rebuilt, followed)  # PROTOCOL.md §6: bit for bit

        history = history_message(ledger)
        assert (history.base_round, len(history.table), len(history.rounds)) == (0, 0, 5)
        assert history.table_digest == sync.table_digest  # the same ledger state, checked by catch_up
        _, replayed = time_catch_up(space, theta_0, history, 6, 1)
        # Not the same float32 sums (per-seed totals vs every coefficient in order), so
        # equal only up to rounding.
        assert torch.allclose(replayed, rebuilt, rtol=0, atol=1e-6)


def test_table_bytes_stay_bounded_while_history_bytes_grow_linearly(tiny: Tiny) -> None:
    result = catch_up_comparison((1, 2, 5, 9), model_source=str(tiny.directory), repeats=1, rebase_every=REBASE,
                                 history_run_upto=5, history_run_limit_s=0.0, **SMALL)
    rows = {(row["n"], row["method"]): row for row in result["rows"]}
    assert len(rows) == 8 and result["replay_vs_table_bytes_n1000"] is None
    for n in (1, 2, 5, 9):
        table, history = rows[n, "table-rebuild"], rows[n, "history-replay"]
        assert table["how"] == "run" and table["seconds"] > 0
        assert table["directions"] <= POOL + (REBASE - 1) * SEEDS
        assert history["directions"] == n * SEEDS and history["rounds_sent"] == n
        assert history["how"] == ("run" if n <= 5 else "derived")
        assert result["ratios"][str(n)]["bytes"] == history["bytes"] / table["bytes"]
    # Before the first rebase both send the same round and replay it the same way.
    assert rows[1, "history-replay"]["identical_to_table"]
    assert rows[1, "history-replay"]["bytes"] == rows[1, "table-rebuild"]["bytes"]
    assert rows[5, "history-replay"]["max_abs_diff_vs_table"] < 1e-6
    # History bytes: a constant per round (round numbers < 128 are one msgpack byte).
    per_round = [(rows[b, "history-replay"]["bytes"] - rows[a, "history-replay"]["bytes"]) / (b - a)
                 for a, b in ((1, 2), (2, 5), (5, 9))]
    assert max(per_round) - min(per_round) <= 1 and per_round[0] > SEEDS * 18
    # Table bytes: bounded by the pool, however many rounds were missed.
    bound = (POOL + (REBASE - 1) * SEEDS) * 19 + 200
    assert all(rows[n, "table-rebuild"]["bytes"] <= bound for n in (1, 2, 5, 9))
    assert rows[9, "history-replay"]["bytes"] > rows[9, "table-rebuild"]["bytes"]
    derived = rows[9, "history-replay"]
    assert derived["seconds"] == pytest.approx(rows[5, "history-replay"]["seconds"] / 5 * 9)
