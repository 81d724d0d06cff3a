"""The projected first-order engine (Ferret, issue #16 §2).

* The coordinator's rule rebuilds a client's local update without bias from its scalars
  (PROTOCOL.md §8.1): tested statistically, with tolerances derived from the estimator's
  variance, through the real aggregation and the real perturbation.
* In a mixed federation an honest first-order client is not the value the trimmed mean
  cuts merely for being first-order: its scalars estimate what the zeroth-order clients'
  do, on the same scale.
* The engine trains (gradients reach exactly the space), and a real federation mixes
  MeZO and Ferret clients, each handed its mode's seeds and settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest
import torch
from harness import Tiny, coordinator, make_tiny, write_data

from coordinator.aggregate import AggregationRule, aggregate, aggregate_with_report
from edge_client.daemon import ClientConfig, EdgeClient
from edge_client.data import BatchStream, load_jsonl, tokenize
from edge_client.engines import RoundPlan, engine_policy, get_engine
from edge_client.engines.ferret import (FerretEngine, FerretSettings, first_order_memory, optimizer_state_bytes,
                                        projected_scalars)
from edge_client.engines.mezo import MeZOEngine, MeZOSettings
from edge_client.model import load_model
from edge_client.scope import ScopeConfig
from edge_client.space import ParameterSpace
from profiles.chooser import TrainingTask, choose
from protocol.messages import Update
from protocol.perturb import padded_length

ETA = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def as_update(client: str, seeds, scalars, n: int = 8) -> Update:
    return Update(round=1, attempt=0, client_id=client, pairs=tuple(zip(seeds, scalars)), num_examples=n,
                  loss_before=1.0, loss_after=1.0, nonce=bytes(16), signature=None)


def reconstruct(delta: torch.Tensor, seeds: tuple[int, ...]) -> torch.Tensor:
    """What the federation applies for one client's update ``delta``: its scalars, the
    coordinator's aggregation (float32 coefficients), then the ordered perturbations."""
    coefficients = aggregate(seeds, [as_update("a", seeds, projected_scalars(delta, seeds, ETA))], ETA, "mean")
    space = ParameterSpace(torch.zeros_like(delta), [], "rademacher", backend="eager")
    for seed, coefficient in coefficients:
        space.apply(seed, coefficient)
    return space.flat


def test_the_reconstruction_is_unbiased_with_the_variance_protocol_md_states():
    """E[Δ̂] = Δ and E‖Δ̂ − Δ‖² = (d − 1)/K · ‖Δ‖² (PROTOCOL.md §8.1).

    Over R independent seed sets the mean reconstruction's component along Δ,
    a = <mean Δ̂, Δ>/‖Δ‖², has mean 1 and, since each seed contributes (zᵀΔ)²/‖Δ‖² with
    variance 2 − 2Σδᵢ⁴/‖Δ‖⁴ ≤ 2, a standard deviation of at most √(2/(KR)); the test
    allows 5 of them. The squared error of one reconstruction is a sum over K seeds of
    independent terms, so its mean over R sets is within a few percent of (d − 1)/K ‖Δ‖².
    Ferret's clipped-normal bases, a third of the update, would give a ≈ 0.33."""
    d, K, R = 1000, 64, 120
    generator = torch.Generator().manual_seed(3)
    delta = torch.zeros(padded_length(d))
    delta[:d] = torch.randn(d, generator=generator) * 1e-3
    norm2 = float(delta.double().square().sum())
    real = delta[:d].double()
    mean = torch.zeros(d, dtype=torch.float64)
    errors = []
    for r in range(R):
        seeds = tuple(10_000 * r + k for k in range(K))
        rebuilt = reconstruct(delta, seeds)[:d].double()  # the padding moves too, and is never read
        mean += rebuilt / R
        errors.append(float((rebuilt - real).square().sum()))
    along = float((mean * real).sum()) / norm2
    assert abs(along - 1.0) <= 5 * math.sqrt(2 / (K * R)), along
    expected = (d - 1) / K * norm2
    # each error is a mean of K terms of relative variance ~2: the mean over R has ~2% spread
    assert abs(sum(errors) / R / expected - 1.0) < 0.12, sum(errors) / R / expected


def test_the_scalars_encode_the_update_not_the_learning_rate():
    """Under FO-only federations η cancels: any η commits the same model change."""
    delta = torch.zeros(128)
    delta[:100] = torch.linspace(-1e-3, 1e-3, 100)
    seeds = tuple(range(1, 33))
    at = {eta: aggregate(seeds, [as_update("a", seeds, projected_scalars(delta, seeds, eta))], eta, "mean")
          for eta in (1e-2, 1e-4)}
    for (_, slow), (_, fast) in zip(at[1e-2], at[1e-4]):
        assert slow == pytest.approx(fast, rel=1e-6)


def load_tiny_space(tiny: Tiny, engine_cls, scope: str = "lora"):
    model, tokenizer = load_model(tiny.directory)
    model, space = engine_cls.prepare(model, ScopeConfig(kind=scope))
    return model, space, tokenizer


def batches(tokenizer, path: Path, seed: int, batch_size: int = 4) -> BatchStream:
    records, _ = load_jsonl(path)
    examples = tokenize(records, tokenizer, max_seq_len=64, prompt_format="plain")
    return BatchStream(examples, batch_size, seed=seed, pad_token_id=tokenizer.pad_token_id or 0)


def test_gradients_reach_exactly_the_space_and_the_local_steps_lower_the_loss(tmp_path: Path, tiny: Tiny):
    model, space, tokenizer = load_tiny_space(tiny, FerretEngine)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == space.numel
    data = batches(tokenizer, write_data(tmp_path / "a.jsonl", 8), seed=1)
    engine = FerretEngine(model, space, FerretSettings(local_steps=6, optimizer="adamw", local_lr=1e-2))
    before = space.values().clone()
    update = engine.train_round(RoundPlan(1, tuple(range(1, 17)), ETA, 1e-3, 4), data)
    assert update.loss_after < update.loss_before
    assert update.num_examples == 6 * 4 and len(update.pairs) == 16
    assert not torch.equal(before, space.values())
    assert all(p.grad is None for p in model.parameters())  # nothing kept after the round


def test_an_honest_first_order_client_is_not_trimmed_for_being_first_order(tmp_path: Path, tiny: Tiny):
    """Two MeZO clients and one Ferret client answer the same 256 seeds from the same
    model on their own data; the trimmed mean of 3 keeps the middle value per seed. If the
    Ferret scalars estimated another quantity or sat on another scale, it would be the
    cut extreme almost always; on the same scale it is kept at least as often as a ZO
    client (with exact, batch-averaged gradients it is the least noisy of the three). A
    first-order client on AdamW's scale (not the protocol's) is shown being cut."""
    K = 256
    seeds = tuple(range(1, K + 1))
    updates, scalars = [], {}
    for name, engine_cls, settings in (
            ("zo-a", MeZOEngine, MeZOSettings()), ("zo-b", MeZOEngine, MeZOSettings()),
            ("fo", FerretEngine, FerretSettings(local_steps=2))):
        model, space, tokenizer = load_tiny_space(tiny, engine_cls)
        data = batches(tokenizer, write_data(tmp_path / f"{name}.jsonl", 16, offset=zlib.crc32(name.encode()) % 50), seed=len(name))
        engine = engine_cls(model, space, settings)
        update = engine.train_round(RoundPlan(1, seeds, 1e-4, 1e-3, 4), data)
        scalars[name] = [value for _, value in update.pairs]
        updates.append(as_update(name, seeds, scalars[name]))

    def kept_counts(values: dict[str, list[float]]) -> dict[str, int]:
        kept = dict.fromkeys(values, 0)
        for k in range(K):
            ranked = sorted(values, key=lambda name: values[name][k])
            kept[ranked[1]] += 1  # the trimmed mean of 3 keeps the middle one
        return kept

    kept = kept_counts(scalars)
    # Exchangeable clients would each be kept K/3 ≈ 85 times (sd 7.5).
    assert kept["fo"] >= K / 3 - 4 * math.sqrt(K * 2 / 9), kept
    report = aggregate_with_report(seeds, updates, 1e-4, AggregationRule(method="trimmed_mean"))
    assert report.robust and report.values_min == 3
    rms = {name: math.sqrt(sum(v * v for v in values) / K) for name, values in scalars.items()}
    assert rms["fo"] / rms["zo-a"] == pytest.approx(1.0, abs=0.6), rms  # the same scale
    mis_scaled = {**scalars, "fo": [value * 30 for value in scalars["fo"]]}
    assert kept_counts(mis_scaled)["fo"] < K / 10


def test_a_mixed_federation_hands_each_mode_its_seeds_and_settings(tmp_path: Path, tiny: Tiny) -> None:
    """A MeZO client and a Ferret client in one real federation: each gets its mode's
    number of seeds (a prefix of the round's) and settings, both updates commit, and the
    two replicas hold the same model after every round. Each sends its values packed
    as its mode's ``value_encoding`` says (q8, f32), and the ledger holds them decoded."""
    clients: list[EdgeClient] = []

    async def body() -> None:
        async with coordinator(tmp_path, tiny, rounds=2, clients_per_round=2, quorum=2, min_clients=2,
                               scope="lora", local_steps=3, learning_rate=1e-4,
                               modes={"ferret": {"seeds": 40, "local_steps": 2, "optimizer": "sgd",
                                                 "value_encoding": "q8"},
                                      "mezo": {"value_encoding": "f32"}}) as server:
            for name, mode in (("zo", "mezo"), ("fo", "ferret")):
                client = EdgeClient(ClientConfig(
                    url=f"ws://127.0.0.1:{server.port}", client_id=name, mode=mode,
                    data_path=str(write_data(tmp_path / f"{name}.jsonl", 20)), model=str(tiny.directory),
                    device="cpu", copies="memory", memory_budget_bytes=4 << 30, cache_dir=str(tmp_path / "cache")))
                client.prepare()
                clients.append(client)
            await asyncio.wait_for(asyncio.gather(*(client.run() for client in clients)), 180)

    asyncio.run(body())
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        rows = db.execute("SELECT round, client_id, num_examples, pairs_json FROM contributions "
                          "ORDER BY round, client_id").fetchall()
    # Ferret: 2 local steps of batch 2 and 40 seeds; MeZO: 3 seeds, one batch each.
    assert [(r, c, n, len(json.loads(pairs))) for r, c, n, pairs in rows] == [
        (1, "fo", 2 * 2, 40), (1, "zo", 3 * 2, 3), (2, "fo", 2 * 2, 40), (2, "zo", 3 * 2, 3)]
    for r in (1, 2):  # the MeZO client's seeds are the first 3 of the Ferret client's
        fo_seeds, zo_seeds = ([seed for seed, _ in json.loads(pairs)] for _, _, _, pairs in rows[2 * r - 2:2 * r])
        assert zo_seeds == fo_seeds[:3]
    for _, client_id, _, pairs in rows:
        values = [value for _, value in json.loads(pairs)]
        if client_id == "fo":  # q8: every value is one scale times an integer in [-127, 127]
            scale = max(abs(v) for v in values) / 127
            assert all(abs(v / scale - round(v / scale)) < 1e-6 for v in values), values
        else:  # f32: every value survives a float32 round trip
            assert all(struct.unpack("<f", struct.pack("<f", v))[0] == v for v in values), values
    zo, fo = clients
    assert type(fo.engine).__name__ == "FerretEngine" and fo.engine.settings.local_steps == 2
    assert zo.sync.round == fo.sync.round == 2
    assert zo.sync.space.fingerprint() == fo.sync.space.fingerprint()


def test_personal_layers_stay_on_the_client_and_survive_a_restart(tmp_path: Path, tiny: Tiny):
    """PTLS: the last decoder layer's adapters are this client's own. Its scalars are the
    projection of the rest of its update only; it trains on its own values of that layer
    (which a restarted client reads back from disk), not on the shared ones."""
    model, space, tokenizer = load_tiny_space(tiny, FerretEngine)
    engine = FerretEngine(model, space, FerretSettings(local_steps=2, personal_layers=1))
    engine.personal_path = tmp_path / "personal.pt"
    personal = engine.personal_indices(1)
    layers = {entry.name.split(".layers.")[1].split(".")[0] for entry in space.entries}
    last = str(max(int(number) for number in layers))
    in_last = [e for e in space.entries if f".layers.{last}." in e.name]
    assert personal.numel() == sum(e.numel for e in in_last) > 0
    data = batches(tokenizer, write_data(tmp_path / "a.jsonl", 8), seed=1)
    shared_start = space.flat.detach().clone()
    seeds = tuple(range(1, 33))
    update = engine.train_round(RoundPlan(1, seeds, ETA, 1e-3, 4), data)
    trained = space.flat.detach().clone()
    delta = trained - shared_start
    assert float(delta[personal].abs().max()) > 0  # the personal layer trained ...
    delta[personal] = 0.0  # ... but only the rest is sent
    assert [value for _, value in update.pairs] == pytest.approx(projected_scalars(delta, seeds, ETA), rel=1e-9)

    # A restarted client on the shared model (the commit restored the round-start copy):
    # its next round starts from its own last layer, read back from disk.
    model2, space2, _ = load_tiny_space(tiny, FerretEngine)
    engine2 = FerretEngine(model2, space2, FerretSettings(local_steps=1, personal_layers=1, local_lr=1e-12))
    engine2.personal_path = tmp_path / "personal.pt"
    engine2.train_round(RoundPlan(2, seeds, ETA, 1e-3, 4), data)
    assert torch.allclose(space2.flat.detach()[personal], trained[personal], atol=1e-9)
    others = torch.ones_like(trained, dtype=torch.bool)
    others[personal] = False
    assert torch.allclose(space2.flat.detach()[others], shared_start[others], atol=1e-9)  # the rest is shared


def test_adamw_moments_are_fitted_into_the_memory_or_the_round_runs_sgd() -> None:
    """The chooser plans an SGD step (no optimizer state); a coordinator asking for AdamW
    adds two float32 moments per trainable value. They are fitted by a smaller
    micro-batch, and where even one row does not fit, the round runs SGD."""
    from test_droppeft import SMOLLM2

    task = TrainingTask(scope="full", batch_size=4, max_seq_len=96)
    policy = [entry for entry in engine_policy() if entry.mode == "ferret"]
    moments = optimizer_state_bytes(FerretSettings(optimizer="adamw"), SMOLLM2, task)
    assert moments == 8 * SMOLLM2.param_count and optimizer_state_bytes(FerretSettings(), SMOLLM2, task) == 0
    sgd_peak = first_order_memory(SMOLLM2, task, 4).total
    roomy = choose(SMOLLM2, task, budget_bytes=sgd_peak + moments, headroom=0.0, policy=policy)
    assert (roomy.mode, roomy.batch) == ("ferret", 4)
    adamw = FerretSettings(optimizer="adamw", micro_batch=4)

    def fit(settings: FerretSettings, usable: int) -> FerretSettings:
        return FerretEngine.fit_settings(settings, shape=SMOLLM2, task=task,
                                         choice=dataclasses.replace(roomy, usable_bytes=usable))

    assert fit(adamw, sgd_peak + moments) == adamw
    fewer_rows = fit(adamw, first_order_memory(SMOLLM2, task, 2).total + moments)
    assert (fewer_rows.optimizer, fewer_rows.micro_batch) == ("adamw", 2)
    fallback = fit(dataclasses.replace(adamw, local_lr=1e-4), sgd_peak)
    assert (fallback.optimizer, fallback.local_lr) == ("sgd", None)  # SGD at its own (MeZO-scale) rate
    assert fit(FerretSettings(micro_batch=4), sgd_peak) == FerretSettings(micro_batch=4)
