"""DropPEFT (issue #16 §3): ferret's round with stochastic layer dropout, its memory bound,
and the coordinator's per-client bandit over the dropout ratio."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from harness import SMOLLM2, Tiny, client_status, coordinator, make_tiny, until, write_data

from coordinator.adaptive import AdaptiveSettings
from coordinator.config import ConfigError, FederationConfig
from coordinator.ledger import Ledger
from edge_client.daemon import ClientConfig, EdgeClient
from edge_client.data import BatchStream, load_jsonl, tokenize
from edge_client.engines import RoundPlan, engine_policy
from edge_client.engines.droppeft import DropPEFTEngine, DropPEFTSettings, dropout_memory, kept_layers_bound
from edge_client.model import load_model
from edge_client.scope import ScopeConfig
from profiles.chooser import TrainingTask, choose
from profiles.estimator import estimate

GIB = 1024**3
TASK = TrainingTask(scope="lora", batch_size=4, max_seq_len=96)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def engine_on(tiny: Tiny, tmp_path: Path, settings: DropPEFTSettings):
    model, tokenizer = load_model(tiny.directory)
    model, space = DropPEFTEngine.prepare(model, ScopeConfig(kind="lora"))
    records, _ = load_jsonl(write_data(tmp_path / "d.jsonl", 12))
    stream = BatchStream(tokenize(records, tokenizer, max_seq_len=64, prompt_format="plain"), 4, seed=1,
                         pad_token_id=tokenizer.pad_token_id or 0)
    return DropPEFTEngine(model, space, settings), stream


def test_each_step_skips_layers_at_the_ratio_and_the_round_is_reproducible(tmp_path: Path, tiny: Tiny):
    engine, stream = engine_on(tiny, tmp_path, DropPEFTSettings(local_steps=40, dropout_ratio=0.5, local_lr=1e-3,
                                                                keep_first=0, keep_last=0))
    engine.train_round(RoundPlan(3, (1, 2, 3), 1e-3, 1e-3, 4), stream)
    skipped = engine.last_skipped
    layers = engine.num_layers
    assert len(skipped) == 40 and all(len(step) < layers for step in skipped)  # at least one layer kept
    rate = sum(len(step) for step in skipped) / (40 * layers)
    assert 0.3 < rate < 0.6, rate  # mean 0.5 (less the kept-one rule) over 160 draws
    first = list(skipped)
    engine.train_round(RoundPlan(3, (1, 2, 3), 1e-3, 1e-3, 4), stream)
    assert engine.last_skipped == first  # the same round draws the same layers
    engine.update_settings(dataclasses.replace(engine.settings, dropout_ratio=0.0, local_steps=3))
    engine.train_round(RoundPlan(4, (1, 2, 3), 1e-3, 1e-3, 4), stream)
    assert engine.last_skipped == [(), (), ()]


def test_a_ratio_the_budget_cannot_hold_runs_at_a_smaller_micro_batch_or_else_a_higher_ratio():
    policy = [entry for entry in engine_policy() if entry.mode == "droppeft"]
    usable = dropout_memory(SMOLLM2, TASK, 4).total  # exactly the planned ratio's peak at batch 4
    choice = choose(SMOLLM2, TASK, budget_bytes=usable, headroom=0.0, policy=policy)
    assert (choice.mode, choice.batch) == ("droppeft", 4)
    asked = DropPEFTSettings(dropout_ratio=0.1, micro_batch=4)
    fitted = DropPEFTEngine.fit_settings(asked, shape=SMOLLM2, task=TASK, choice=choice)
    assert fitted.dropout_ratio == 0.1 and fitted.micro_batch < 4  # the asked ratio, fewer rows at once
    assert dropout_memory(SMOLLM2, TASK, fitted.micro_batch, 0.1).total <= usable
    assert dropout_memory(SMOLLM2, TASK, fitted.micro_batch + 1, 0.1).total > usable  # the largest that fits
    # Room for one row at the planned ratio only: the ratio goes up, to the smallest that fits.
    tight = choose(SMOLLM2, TASK, budget_bytes=dropout_memory(SMOLLM2, TASK, 1).total, headroom=0.0, policy=policy)
    assert tight.batch == 1
    raised = DropPEFTEngine.fit_settings(DropPEFTSettings(dropout_ratio=0.1, micro_batch=1), shape=SMOLLM2,
                                         task=TASK, choice=tight)
    assert raised.micro_batch == 1 and 0.1 < raised.dropout_ratio <= 0.5
    assert dropout_memory(SMOLLM2, TASK, 1, round(raised.dropout_ratio - 0.05, 2)).total > tight.usable_bytes
    roomy = dataclasses.replace(choice, usable_bytes=10 * GIB)
    assert DropPEFTEngine.fit_settings(asked, shape=SMOLLM2, task=TASK, choice=roomy) == asked


def test_the_memory_model_counts_a_heavy_step_not_the_mean_one():
    """Layers are skipped independently, so about half the steps keep more than the mean;
    the estimate counts mean + 2 sd kept layers (21 of 30 at p = 0.5)."""
    assert kept_layers_bound(30, 0.5) == 21 and kept_layers_bound(30, 0.0) == 30
    mean_kept = estimate(SMOLLM2, "dropout", batch=4, seq_len=96, scope="lora", drop_ratio=0.5).breakdown
    heavy = dropout_memory(SMOLLM2, TASK, 4).breakdown
    assert heavy["activations"] > mean_kept["activations"]


def test_the_chooser_takes_droppeft_where_ferret_does_not_fit():
    ferret_need = next(e for e in engine_policy() if e.mode == "ferret").memory(SMOLLM2, TASK, 1).total
    choice = choose(SMOLLM2, TASK, budget_bytes=ferret_need - 1, headroom=0.0, policy=engine_policy())
    assert choice.mode == "droppeft" and "not ferret needs" in choice.explanation


def test_adaptive_settings_reward_progress_per_second_and_survive_a_restart(tmp_path: Path):
    modes = {"droppeft": {"adapt": "dropout_ratio", "adapt_values": [0.25, 0.5, 0.75]}}
    with Ledger(tmp_path / "l.db") as ledger:
        adaptive = AdaptiveSettings(modes, ledger)
        assert adaptive.assign("a", "ferret", 1) == {}  # a mode that adapts nothing
        tried = []
        for round_number in range(1, 4):  # each value is tried once first
            value = adaptive.assign("a", "droppeft", round_number)["dropout_ratio"]
            tried.append(value)
            adaptive.update_received("a", round_number, 2.0, 2.0 - (1.0 if value == 0.75 else 0.1))
        assert sorted(tried) == [0.25, 0.5, 0.75]
        for round_number in range(4, 10):
            value = adaptive.assign("a", "droppeft", round_number)["dropout_ratio"]
            adaptive.update_received("a", round_number, 2.0, 2.0 - (1.0 if value == 0.75 else 0.1))
        status = adaptive.status("a", "droppeft")
        best = max(status["values"], key=lambda row: row["pulls"])
        assert best["value"] == 0.75
        next_choice = adaptive.assign("a", "droppeft", 10)
    with Ledger(tmp_path / "l.db") as ledger:  # a restarted coordinator carries on
        assert AdaptiveSettings(modes, ledger).assign("a", "droppeft", 10) == next_choice
        assert AdaptiveSettings(modes, ledger).status("a", "droppeft") == status


def test_a_value_whose_rounds_bring_no_update_gets_the_worst_reward_not_a_free_retry(tmp_path: Path):
    modes = {"droppeft": {"adapt": "dropout_ratio", "adapt_values": [0.25, 0.5]}}
    with Ledger(tmp_path / "l.db") as ledger:
        adaptive = AdaptiveSettings(modes, ledger)
        first = adaptive.assign("a", "droppeft", 1)["dropout_ratio"]
        adaptive.update_received("a", 1, 2.0, 1.9)  # a positive reward for the first value
        second = adaptive.assign("a", "droppeft", 2)["dropout_ratio"]
        assert second != first  # the untried value next
        adaptive.attempt_ended(2, ["a"])  # ... whose update never came
        rows = {row["value"]: row for row in adaptive.status("a", "droppeft")["values"]}
        assert rows[second]["pulls"] > 0 and rows[second]["mean_reward"] == 0.0  # no progress, recorded
        assert adaptive.assign("a", "droppeft", 3)["dropout_ratio"] == first  # not retried as untried


def test_the_adapt_keys_are_checked_and_never_sent_to_clients():
    config = FederationConfig(model_hash="a" * 64, modes={
        "droppeft": {"adapt": "dropout_ratio", "adapt_values": [0.25, 0.5], "local_steps": 2, "seeds": 5}})
    assert config.settings_for_mode("droppeft") == {"local_steps": 2}
    with pytest.raises(ConfigError, match="go together"):
        FederationConfig(model_hash="a" * 64, modes={"droppeft": {"adapt": "dropout_ratio"}})
    with pytest.raises(ConfigError, match="both fixed and adapted"):
        FederationConfig(model_hash="a" * 64, modes={
            "droppeft": {"adapt": "dropout_ratio", "adapt_values": [0.5], "dropout_ratio": 0.5}})


class RecordingClient(EdgeClient):
    """Keeps the settings each round task turned into."""

    def __init__(self, config: ClientConfig) -> None:
        super().__init__(config)
        self.settings_seen: list = []

    def _settings_for(self, values):  # type: ignore[no-untyped-def]
        settings = super()._settings_for(values)
        if values is not None:
            self.settings_seen.append(settings)
        return settings


def test_a_droppeft_client_gets_the_bandits_ratio_each_round(tmp_path: Path, tiny: Tiny) -> None:
    seen: dict = {}

    async def body() -> None:
        async with coordinator(tmp_path, tiny, rounds=3, scope="lora", modes={
                "droppeft": {"seeds": 16, "local_steps": 2, "adapt": "dropout_ratio",
                             "adapt_values": [0.25, 0.5, 0.75]}}) as server:
            client = RecordingClient(ClientConfig(
                url=f"ws://127.0.0.1:{server.port}", client_id="alpha", mode="droppeft",
                data_path=str(write_data(tmp_path / "alpha.jsonl", 20)), model=str(tiny.directory), device="cpu",
                copies="memory", memory_budget_bytes=4 << 30, cache_dir=str(tmp_path / "cache")))
            client.prepare()
            running = asyncio.create_task(client.run())
            await until(lambda: (client_status(server, "alpha") or {}).get("adaptive") is not None or running.done(),
                        "alpha's hello")
            seen["first"] = client_status(server, "alpha")["adaptive"]
            await asyncio.wait_for(running, 120)
            seen["adaptive"] = server.adaptive.status("alpha", "droppeft")
            seen["trained"] = client.rounds_trained
            seen["settings"] = client.settings_seen

    asyncio.run(body())
    assert seen["trained"] == 3
    adaptive = seen["adaptive"]
    assert seen["first"]["setting"] == adaptive["setting"] == "dropout_ratio"  # shown in /status
    assert [row["pulls"] for row in adaptive["values"]] == [1, 1, 1]  # every value tried once, first
    assert all(row["mean_reward"] is not None for row in adaptive["values"])
    # the client ran each value it was sent, with the mode's fixed settings beside it
    assert sorted(s.dropout_ratio for s in seen["settings"]) == [0.25, 0.5, 0.75]
    assert {s.local_steps for s in seen["settings"]} == {2}
