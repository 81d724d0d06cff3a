"""bench/peers.py: how it reads its contenders' checkpoints into the issue's figures.

The runs are stand-ins with known checkpoints (the real ones train SmolLM2-135M for
minutes); what is checked is the protocol: a budget takes the last checkpoint inside
it, the target is a fraction of the centralized gain, cost to target is the first
checkpoint at or below it, and the ratios divide like by like.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench import peers  # noqa: E402


def run(points: list[tuple[float, float, float]], *, rss: int = 1 << 30, rouge: float = 0.5) -> dict[str, Any]:
    """A run whose checkpoints are (train_s, bytes per client, held-out loss)."""
    checkpoints = [{"train_s": t, "bytes_per_client": b, "eval_loss": loss} for t, b, loss in points]
    final = max(i for i, p in enumerate(checkpoints) if p["train_s"] <= 100)
    checkpoints[final].update(rouge_l=rouge, exact_match=0.25)
    return {"lr": 1e-3, "points": checkpoints, "final_index": final, "peak_client_rss_bytes": rss}


BASE = {"eval_loss": 3.0, "rouge_l": 0.1, "exact_match": 0.0}


def test_budgets_take_the_last_checkpoint_inside_them_and_the_ratios_divide_like_by_like(capsys):
    runs = {
        # gain 2.0 within 100 s: the target is 3.0 - 0.5 x 2.0 = 2.0
        "centralized": [run([(0, 500, 3.0), (40, 500, 2.5), (90, 500, 1.0), (150, 500, 0.5)])],
        "flower-fedavg": [run([(0, 0, 3.0), (30, 4e6, 2.4), (60, 8e6, 1.9), (95, 12e6, 1.6)])],
        # its last round ended past the largest budget: no table may use it
        "ferret": [run([(0, 0, 3.0), (20, 2e4, 2.2), (45, 4e4, 2.0), (99, 8e4, 1.2), (120, 9e4, 0.1)])],
        "zo-lora": [run([(0, 0, 3.0), (50, 1e4, 2.9), (100, 2e4, 2.8)])],
    }
    report = peers.summarise(runs, BASE, (50, 100), (1e4, 1e6))
    result, tables = report["result"], report["tables"]
    assert result["centralized_gain"] == pytest.approx(2.0)  # 3.0 - 1.0: the 150 s checkpoint is past the budget
    assert result["target_eval_loss"] == pytest.approx(2.0)
    assert result["best_fed_mode"] == "ferret"  # zo-lora reaches 2.8; flower is not a mode of this project
    assert result["best_fed_gain_ratio"] == pytest.approx((3.0 - 1.2) / 2.0)
    assert result["flower_fedavg_gain_ratio"] == pytest.approx((3.0 - 1.6) / 2.0)
    assert tables["quality_by_time"]["ferret"]["50"]["median"] == 2.0
    assert tables["quality_by_time"]["flower-fedavg"]["50"]["median"] == 2.4
    # per byte: flower's first round alone is 4 MB, so nothing fits in 10 KB or 1 MB
    assert tables["quality_by_bytes"]["flower-fedavg"]["10000"]["median"] is None
    assert tables["quality_by_bytes"]["ferret"]["1e+06"]["median"] == 1.2
    assert tables["quality_by_bytes"]["zo-lora"]["10000"]["median"] == 2.9
    assert tables["quality_by_bytes"]["ferret"]["10000"]["median"] is None  # only the start fits
    # cost to target: the first checkpoint at or below 2.0
    cost = tables["cost_to_target"]
    assert (cost["ferret"]["train_s"], cost["ferret"]["bytes_per_client"]) == (45, 4e4)
    assert (cost["flower-fedavg"]["train_s"], cost["flower-fedavg"]["bytes_per_client"]) == (60, 8e6)
    assert cost["zo-lora"]["reached"] == "0/1" and cost["zo-lora"]["train_s"] is None
    assert result["best_fed_bytes_vs_flower"] == pytest.approx(4e4 / 8e6)
    assert result["best_fed_time_to_target_vs_flower"] == pytest.approx(45 / 60)
    assert "ferret" in capsys.readouterr().out


def test_seeds_give_a_median_and_a_spread_and_a_missing_centralized_run_gives_no_ratios():
    runs = {
        "ferret": [run([(0, 0, 3.0), (10, 1e3, 2.0)]), run([(0, 0, 3.0), (10, 1e3, 1.0)]),
                   run([(0, 0, 3.0), (10, 1e3, 1.5)])],
    }
    report = peers.summarise(runs, BASE, (10,), (1e4,))
    cell = report["tables"]["quality_by_time"]["ferret"]["10"]
    assert (cell["median"], cell["spread"], cell["n"]) == (1.5, [1.0, 2.0], 3)
    assert report["result"]["centralized_gain"] is None and report["result"]["best_fed_gain_ratio"] is None
    assert report["tables"]["cost_to_target"] == {}


def test_thinning_keeps_every_budget_checkpoint():
    points = [{"train_s": float(i)} for i in range(200)]
    kept = peers.thin(points, {7, 133}, limit=20)
    assert {0, 7, 133, 199} <= set(kept) and len(kept) <= 22
    assert peers.thin(points[:10], set(), limit=20) == list(range(10))
    assert peers.last_within(points, "train_s", 41.5) == 41 and peers.last_within(points, "train_s", -1) is None
