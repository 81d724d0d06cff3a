"""Engine interface v2 (issue #16 §1): a new training mode is one class, with no edit
anywhere else.

The toy mode below lives in this file only. Defining it registers it; the chooser offers
it (its own policy row: rank and memory model), the daemon picks it, prepares the model
with it and trains a real federation with it on the tiny model, and the coordinator's
/status reports it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from harness import Tiny, client_status, coordinator, make_tiny, write_data

from edge_client.daemon import ClientConfig, EdgeClient
from edge_client.events import ClientCallbacks, RoundStartEvent
from edge_client.engines import (
    Engine,
    EngineSettings,
    LocalUpdate,
    SettingsError,
    available_engines,
    engine_policy,
    get_engine,
    register_engine,
    unregister_engine,
)
from edge_client.engines.mezo import MeZOSettings
from edge_client.loss import causal_lm_loss
from profiles.chooser import PolicyEntry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@dataclass(frozen=True)
class ForwardDifferenceSettings(EngineSettings):
    scale: float = 1.0


def define_toy_engine() -> type[Engine]:
    """A forward-difference zeroth-order mode: one extra forward per seed instead of two."""

    class ForwardDifferenceEngine(Engine):
        name = "toy-forward-difference"
        settings_cls = ForwardDifferenceSettings
        # Ranked above every built mode, with the memory of a plain forward.
        policy = PolicyEntry("toy-forward-difference", "one-sided zeroth-order", 0, "forward")
        prepared = 0

        @classmethod
        def prepare(cls, model, scope, *, distribution="rademacher"):
            cls.prepared += 1
            return super().prepare(model, scope, distribution=distribution)

        @torch.no_grad()
        def train_round(self, plan, data, progress=None):
            started = time.perf_counter()
            pairs, first, last = [], math.nan, math.nan
            for index, seed in enumerate(plan.seeds):
                batch = data.next_batch()
                base, _ = causal_lm_loss(self.model, batch)
                self.space.apply(seed, plan.epsilon)
                moved, _ = causal_lm_loss(self.model, batch)
                scalar = self.settings.scale * (moved - base) / plan.epsilon
                self.space.apply(seed, -plan.epsilon - plan.learning_rate * scalar)
                pairs.append((seed, scalar))
                first = base if index == 0 else first
                last = moved
            return LocalUpdate(pairs=tuple(pairs), num_examples=len(plan.seeds) * plan.batch_size,
                               loss_before=first, loss_after=last, seconds=time.perf_counter() - started)

    return ForwardDifferenceEngine


@pytest.fixture
def toy_engine():
    engine = define_toy_engine()
    try:
        yield engine
    finally:
        unregister_engine(engine.name)


def test_defining_an_engine_registers_it_and_the_chooser_ranks_its_row(toy_engine):
    assert get_engine("toy-forward-difference") is toy_engine
    assert "toy-forward-difference" in available_engines() and "mezo" in available_engines()
    assert engine_policy()[0].mode == "toy-forward-difference"  # rank 0: offered first


def test_the_toy_engine_is_offered_picked_and_run_in_a_federation(tmp_path: Path, tiny: Tiny, toy_engine) -> None:
    seen: dict = {}

    async def body() -> None:
        async with coordinator(tmp_path, tiny, rounds=2) as server:
            # Read /status while the client is connected: at its first round's start (the
            # callback runs on this loop). Polling raced a federation that ends in a blink.
            def at_round_start(event: RoundStartEvent) -> None:
                seen.setdefault("status", client_status(server, "alpha"))

            client = EdgeClient(ClientConfig(
                url=f"ws://127.0.0.1:{server.port}", client_id="alpha",
                data_path=str(write_data(tmp_path / "alpha.jsonl", 20)), model=str(tiny.directory), device="cpu",
                copies="memory", memory_budget_bytes=4 << 30, cache_dir=str(tmp_path / "cache")),
                callbacks=ClientCallbacks(on_round_start=at_round_start))
            client.prepare()
            await asyncio.wait_for(client.run(), 120)
            seen["final"] = server.status()
            seen["client"] = client

    asyncio.run(body())
    client = seen["client"]
    assert client.choice.mode == "toy-forward-difference"
    assert seen["status"]["mode"] == "toy-forward-difference"
    assert seen["status"]["plan"].startswith("toy-forward-difference (one-sided zeroth-order)")
    assert isinstance(client.engine, toy_engine) and toy_engine.prepared == 1
    assert client.rounds_trained == 2
    assert [r["round"] for r in seen["final"]["rounds"]] == [1, 2]


def test_settings_come_from_the_task_map_and_refuse_what_the_mode_does_not_define():
    settings = MeZOSettings.from_task({"chunk_tokens": 256, "probe_losses": False}, micro_batch=2, mode="mezo")
    assert (settings.chunk_tokens, settings.probe_losses, settings.micro_batch) == (256, False, 2)
    assert ForwardDifferenceSettings.from_task({"scale": 2}).scale == 2.0  # an int is a fine float
    with pytest.raises(SettingsError, match="unknown setting 'chunk_tokes'.*known: chunk_tokens, probe_losses"):
        MeZOSettings.from_task({"chunk_tokes": 256}, mode="mezo")
    with pytest.raises(SettingsError, match="'probe_losses' must be bool"):
        MeZOSettings.from_task({"probe_losses": "yes"}, mode="mezo")
    with pytest.raises(SettingsError, match="chunk_tokens must be >= 1"):
        MeZOSettings.from_task({"chunk_tokens": 0}, mode="mezo")
    with pytest.raises(SettingsError, match="unknown setting 'micro_batch'"):
        MeZOSettings.from_task({"micro_batch": 64})  # the chooser's, not the task's


def test_an_engine_missing_a_declaration_is_refused_when_defined():
    with pytest.raises(TypeError, match="must declare `policy`"):
        class NoPolicy(Engine):  # noqa: F841
            name = "no-policy"

            def train_round(self, plan, data, progress=None): ...

    with pytest.raises(TypeError, match="policy is the row of 'mezo'"):
        class WrongRow(Engine):  # noqa: F841
            name = "wrong-row"
            policy = PolicyEntry("mezo", "", 1)

            def train_round(self, plan, data, progress=None): ...
    assert "no-policy" not in available_engines() and "wrong-row" not in available_engines()


def test_a_second_engine_cannot_take_a_registered_name():
    class Impostor(Engine):
        policy = PolicyEntry("mezo", "", 1)

        def train_round(self, plan, data, progress=None): ...

    Impostor.name = "mezo"
    with pytest.raises(ValueError, match="already registered"):
        register_engine(Impostor)
