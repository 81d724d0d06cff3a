"""FedBiOT through the emulator (issue #19, third slice): one parameter space for emulator
and full-model clients.

* The federation's lora scope restricted to the adapter layers, built on the full model
  and on the emulator (whose adapter layers have other indices), is the same space bit
  for bit: names, order, shapes, initial values, fingerprint.
* The scope restriction travels in ScopeSpec.lora_layers, left off the wire when empty.
* The fedbiot engine trains the adapter through a quantised emulator with ferret's round
  and an optional proximal term.
* An nf4 emulator client and a full-model ferret client in one real federation (real
  coordinator and clients over websockets on 127.0.0.1) report the same fingerprint
  after every round; an emulator of another base model, or another emulator than the
  federation's, is refused with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from harness import Tiny, client_status, coordinator, until, write_data

ROOT = Path(__file__).resolve().parents[1]

from coordinator.config import ConfigError, FederationConfig, load_config
from edge_client.daemon import ClientConfig, EdgeClient, FatalClientError
from edge_client.data import BatchStream, load_jsonl, tokenize
from edge_client.emulator import build_emulator, public_records
from edge_client.engines import EngineRefused, RoundPlan, get_engine
from edge_client.engines.fedbiot import FedBiOTEngine, FedBiOTSettings, load_client_emulator
from edge_client.engines.fedbiot_zo import FedBiOTZOEngine, FedBiOTZOSettings
from edge_client.engines.ferret import FerretEngine
from edge_client.events import ClientCallbacks, SyncEvent
from edge_client.model import base_weights_hash, load_model
from edge_client.quantize import quantization_support
from edge_client.scope import ScopeConfig, ScopeError, build_space
from edge_client.tiny import make_tiny_llama
from protocol.errors import InvalidMessage
from protocol.codec import _record_from_wire, _record_to_wire
from protocol.messages import ScopeSpec

LAYERS = 11
# The full model's last two layers. 9 and 10 sort as "10" < "9" (names compare as bytes,
# PROTOCOL.md §5.1) while the emulator's own adapter layers, 4 and 5, sort the other way:
# without the name mapping the two spaces would differ in order, init and fingerprint.
ADAPTER = (9, 10)
SCOPE = ScopeConfig(kind="lora", lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj"), lora_init_seed=11,
                    lora_layers=ADAPTER)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", num_layers=LAYERS)
    model, _ = load_model(path)
    return Tiny(path, base_weights_hash(model))


@pytest.fixture(scope="module")
def emulator(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("emulators") / "emu"
    manifest = build_emulator(tiny.directory, out, records=public_records()[:24], adapter_layers=2, drop_ratio=0.5,
                              steps=2, learning_rate=1e-3, batch_size=4, max_seq_len=64, eval_records=8)
    # The emulator's adapter layers are renumbered: the premise of the name mapping.
    assert manifest["adapter_layers"] == list(ADAPTER) and manifest["emulator_adapter_layers"] != list(ADAPTER)
    return out, manifest


def nf4_or_skip() -> str:
    supported, reason = quantization_support("nf4", "cpu")
    if not supported:
        pytest.skip(reason)
    return "nf4"


def entries(space) -> list[tuple[str, tuple[int, ...], int]]:
    return [(entry.name, tuple(entry.shape), entry.offset) for entry in space.entries]


def adapters_by_full_layer(model, layer_map: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """The model's LoRA tensors keyed by the full-model layer their module sits on."""
    found = {}
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            own = int(name.split("layers.")[1].split(".")[0])
            layer = layer_map[own] if layer_map is not None else own
            found[f"{layer}:{name.split('layers.')[1].split('.', 1)[1]}"] = parameter.detach().clone()
    return found


# ------------------------------------------------------------------------ one space


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_the_emulator_builds_the_full_models_adapter_space_bit_for_bit(tiny: Tiny, emulator, quantization) -> None:
    if quantization:
        nf4_or_skip()
    full, _ = load_model(tiny.directory)
    full, full_space = FerretEngine.prepare(full, SCOPE)
    emu, _, manifest = load_client_emulator(emulator[0], quantization=quantization)
    emu, emu_space = FedBiOTEngine.prepare(emu, SCOPE)

    names = [name for name, _, _ in entries(full_space)]
    assert names == sorted(names, key=lambda n: n.encode()) and len(names) == 2 * 2 * 2  # layers x targets x A/B
    assert [name.split(".")[2] for name in names][::4] == ["10", "9"]  # only the adapter layers, full-model indices
    assert entries(emu_space) == entries(full_space)
    assert emu_space.numel == full_space.numel
    assert torch.equal(emu_space.flat, full_space.flat)  # the seed-defined init, bit for bit
    assert float(full_space.flat.abs().max()) > 0  # (lora_A is not zero)
    assert emu_space.fingerprint() == full_space.fingerprint()
    # On the emulator the adapters sit on its own last two layers ...
    trainable = {name for name, p in emu.named_parameters() if p.requires_grad}
    own = [str(i) for i in manifest["emulator_adapter_layers"]]
    assert trainable and {name.split("layers.")[1].split(".")[0] for name in trainable} == set(own)
    assert sum(p.numel() for p in emu.parameters() if p.requires_grad) == emu_space.numel
    # ... and a step moves both replicas the same way, module for module: the emulator's
    # layer that stands for full-model layer L holds the full model's layer L adapters.
    full_space.apply(12345, 1e-3)
    emu_space.apply(12345, 1e-3)
    assert emu_space.fingerprint() == full_space.fingerprint()
    on_full = adapters_by_full_layer(full)
    on_emu = adapters_by_full_layer(emu, dict(enumerate(manifest["kept_layers"])))
    assert sorted(on_full) == sorted(on_emu) and len(on_full) == 8
    assert all(torch.equal(on_full[key], on_emu[key]) for key in on_full)


def test_without_the_layer_map_the_emulators_space_would_differ(tiny: Tiny, emulator) -> None:
    """The mapping is what makes the spaces agree: the emulator's own indices name other
    tensors, in another order, so full-model layer 9's adapter would hold what the full
    model puts on layer 10 (every layer has the same shapes, so only the modules tell)."""
    full, _ = load_model(tiny.directory)
    _, full_space = build_space(full, SCOPE)
    emu, _, manifest = load_client_emulator(emulator[0], quantization=None)
    own = dataclasses.replace(SCOPE, lora_layers=tuple(manifest["emulator_adapter_layers"]))
    _, naive = build_space(emu, own)
    assert [e.name for e in naive.entries] != [e.name for e in full_space.entries]
    assert {e.name.split(".")[2] for e in naive.entries} == {str(i) for i in manifest["emulator_adapter_layers"]}
    full_space.apply(12345, 1e-3)
    naive.apply(12345, 1e-3)
    on_full = adapters_by_full_layer(full)
    on_emu = adapters_by_full_layer(emu, dict(enumerate(manifest["kept_layers"])))
    assert sorted(on_full) == sorted(on_emu)
    assert not any(torch.equal(on_full[key], on_emu[key]) for key in on_full if ".lora_A." in key)


def test_a_restricted_scope_adapts_only_its_layers_and_refuses_missing_ones(tiny: Tiny, emulator) -> None:
    full, _ = load_model(tiny.directory)
    _, everywhere = build_space(full, dataclasses.replace(SCOPE, lora_layers=()))
    assert {e.name.split(".")[2] for e in everywhere.entries} == {str(i) for i in range(LAYERS)}
    model, _ = load_model(tiny.directory)
    with pytest.raises(ScopeError, match=r"layers \[11\].*11 decoder layers"):
        build_space(model, dataclasses.replace(SCOPE, lora_layers=(10, 11)))
    emu, _, _ = load_client_emulator(emulator[0], quantization=None)
    with pytest.raises(EngineRefused, match=r"\[1\] are not among this emulator's adapter layers \[9, 10\]"):
        FedBiOTEngine.prepare(emu, dataclasses.replace(SCOPE, lora_layers=(1, 9, 10)))
    with pytest.raises(EngineRefused, match="lora restricted to them"):
        FedBiOTEngine.prepare(emu, dataclasses.replace(SCOPE, lora_layers=()))
    model, _ = load_model(tiny.directory)
    with pytest.raises(EngineRefused, match="trains through an emulator"):
        FedBiOTEngine.prepare(model, SCOPE)


def test_the_layer_restriction_travels_as_an_optional_scope_field(tmp_path: Path) -> None:
    plain = ScopeSpec(kind="lora", lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj",), lora_init_seed=0)
    wire = _record_to_wire(plain)
    assert "lora_layers" not in wire  # left off when empty: today's bytes, today's peers
    assert _record_from_wire(ScopeSpec, wire, "scope", tagged=False) == plain
    restricted = dataclasses.replace(plain, lora_layers=(28, 29))
    assert _record_to_wire(restricted)["lora_layers"] == (28, 29)
    assert _record_from_wire(ScopeSpec, _record_to_wire(restricted), "scope", tagged=False) == restricted
    with pytest.raises(InvalidMessage, match="ascending"):
        _record_from_wire(ScopeSpec, {**wire, "lora_layers": [29, 28]}, "scope", tagged=False)
    with pytest.raises(InvalidMessage, match="unknown field"):
        _record_from_wire(ScopeSpec, {**wire, "lora_layer": [1]}, "scope", tagged=False)
    path = tmp_path / "federation.toml"
    path.write_text(f'[model]\nhash = "{"a" * 64}"\n[training]\nscope = "lora"\nlora_layers = [28, 29]\n')
    config = load_config(path)
    assert config.lora_layers == (28, 29) and config.identity()["scope"].endswith(":layers=28,29")
    with pytest.raises(ConfigError, match="lora_layers"):
        FederationConfig(model_hash="a" * 64, scope="full", lora_layers=(1,))


# ------------------------------------------------------------------------ the engine


def batches(tokenizer, path: Path, seed: int) -> BatchStream:
    records, _ = load_jsonl(path)
    return BatchStream(tokenize(records, tokenizer, max_seq_len=64, prompt_format="plain"), 4, seed=seed,
                       pad_token_id=tokenizer.pad_token_id)


def test_the_nf4_emulator_trains_the_adapter_and_the_proximal_term_holds_it_back(tmp_path: Path, tiny: Tiny,
                                                                               emulator) -> None:
    quantization = nf4_or_skip()
    data_path = write_data(tmp_path / "a.jsonl", 12)
    deltas = {}
    for proximal in (0.0, 50.0):
        model, tokenizer, _ = load_client_emulator(emulator[0], quantization=quantization)
        model, space = FedBiOTEngine.prepare(model, SCOPE)
        lr = 1e-2
        engine = FedBiOTEngine(model, space, FedBiOTSettings(local_steps=3, local_lr=lr, proximal=proximal))
        start = space.flat.detach().clone()
        update = engine.train_round(RoundPlan(1, tuple(range(1, 33)), 1e-3, 1e-3, 4),
                                    batches(tokenizer, data_path, seed=1))
        assert len(update.pairs) == 32 and update.num_examples == 3 * 4
        deltas[proximal] = space.flat.detach() - start
        assert all(p.grad is None for p in model.parameters())
    assert float(deltas[0.0].abs().max()) > 0
    # 2λ·lr = 1: each later step pulls the adapter back to its round start, leaving
    # only the last step's data gradient, so the update is smaller.
    assert float(deltas[50.0].norm()) < 0.8 * float(deltas[0.0].norm())


def direction(space, seed: int) -> torch.Tensor:
    """The space's direction z(seed), read off by applying it."""
    before = space.flat.detach().clone()
    space.apply(seed, 1.0)
    z = space.flat.detach() - before
    space.flat.data.copy_(before)
    return z.double()


def test_the_zeroth_order_emulator_step_adds_the_proximal_terms_exact_directional_derivative(
        tmp_path: Path, tiny: Tiny, emulator) -> None:
    data_path = write_data(tmp_path / "a.jsonl", 12)
    model, tokenizer, _ = load_client_emulator(emulator[0], quantization=None)
    model, space = FedBiOTZOEngine.prepare(model, SCOPE)
    assert not any(p.requires_grad for p in model.parameters())  # forward-only: nothing takes gradients
    assert entries(space) == entries(build_space(load_model(tiny.directory)[0], SCOPE)[1])  # the federation's space
    start = space.flat.detach().clone()
    lr, eps, lam = 1e-2, 1e-3, 30.0
    plan = RoundPlan(1, (5, 6), lr, eps, 4)
    scalars = {}
    for proximal in (0.0, lam):
        space.flat.data.copy_(start)
        engine = FedBiOTZOEngine(model, space, FedBiOTZOSettings(proximal=proximal))
        update = engine.train_round(plan, batches(tokenizer, data_path, seed=1))
        scalars[proximal] = [value for _, value in update.pairs]
        assert update.loss_before == pytest.approx(update.loss_before)  # the data loss alone, finite
    # Step 1 starts at the round start: the proximal term is the same at θ ± εz and adds
    # nothing (but float32's rounding of the two perturbed points, λ-scaled).
    assert scalars[lam][0] == pytest.approx(scalars[0.0][0], rel=1e-3)
    # Step 2 starts at Δ = -lr g1 z1 from it: its scalar gains 2λ⟨Δ, z2⟩, exactly (a quadratic).
    delta = -lr * scalars[0.0][0] * direction(space, 5)
    expected = 2 * lam * float(delta @ direction(space, 6))
    assert abs(expected) > 1e-3
    assert scalars[lam][1] - scalars[0.0][1] == pytest.approx(expected, rel=1e-3)


def test_the_chooser_takes_the_emulator_only_when_nothing_else_fits() -> None:
    from edge_client.daemon import emulator_int8_fits, plan_training
    from edge_client.device import detect_device
    from profiles.chooser import NoModeFits, TrainingTask
    from profiles.estimator import ModelShape

    assert get_engine("fedbiot") is FedBiOTEngine
    # SmolLM2-1.7B's shape: the budgets where the modes part are then GiB apart, far
    # from the estimator's constant overheads; the emulator keeps 13 of its 24 layers.
    shape = ModelShape.from_hf_config({"model_type": "llama", "vocab_size": 49152, "hidden_size": 2048,
                                       "intermediate_size": 8192, "num_hidden_layers": 24,
                                       "num_attention_heads": 32, "num_key_value_heads": 32,
                                       "tie_word_embeddings": True})
    manifest = {"num_layers_full": 24, "kept_layers": list(range(0, 22, 2)) + [22, 23], "adapter_layers": [22, 23]}
    task = TrainingTask(scope="lora", batch_size=2, max_seq_len=256, lora_rank=4)

    def plan(gib: float, held: dict | None):
        report = detect_device("cpu", memory_budget_bytes=int(gib * (1 << 30)), headroom=0.1)
        try:
            choice = plan_training(shape, task, report, copies="memory", rebase_every=3, mode="auto", emulator=held)
        except NoModeFits:
            return None
        int8 = choice.mode == "fedbiot" and emulator_int8_fits(shape, task, report, choice, held, copies="memory")
        return choice.mode, int8

    budgets = [quarter / 4 for quarter in range(1, 48)]
    alone = {gib: plan(gib, None) for gib in budgets}
    held = {gib: plan(gib, manifest) for gib in budgets}
    full_from = min(gib for gib in budgets if alone[gib] is not None)
    zo_from = min(gib for gib in budgets if held[gib] is not None)
    emulator_from = min(gib for gib in budgets if held[gib] is not None and held[gib][0] != "fedbiot_zo")
    int8_from = min(gib for gib in budgets if held[gib] is not None and held[gib][1])
    # The emulator's forward fits first, then its backward in 4 bits, then in 8, then the full model.
    assert zo_from < emulator_from < int8_from < full_from
    assert all(alone[gib] is None or alone[gib][0] not in ("fedbiot", "fedbiot_zo")
               for gib in budgets)  # offered to holders only
    for gib in budgets:
        if gib >= full_from:  # the emulator is the fallback, ranked last: never taken while a mode fits
            assert held[gib] == alone[gib] and held[gib][0] not in ("fedbiot", "fedbiot_zo")
        elif gib >= emulator_from:
            assert held[gib] == ("fedbiot", gib >= int8_from)
        elif gib >= zo_from:
            assert held[gib] == ("fedbiot_zo", False)
    with pytest.raises(ValueError, match="trains through an emulator"):
        EdgeClient(ClientConfig(url="ws://127.0.0.1:1", client_id="x", data_path=None, mode="fedbiot"))
    with pytest.raises(ValueError, match="trains the full model; leave the emulator out"):
        EdgeClient(ClientConfig(url="ws://127.0.0.1:1", client_id="x", data_path=None, mode="ferret",
                                emulator="somewhere"))


# ------------------------------------------------------------------------ federations


def federation(tiny: Tiny, tmp_path: Path, **modes) -> dict:
    return dict(rounds=3, clients_per_round=2, quorum=2, min_clients=2, scope="lora", lora_rank=SCOPE.lora_rank,
                lora_alpha=SCOPE.lora_alpha, lora_targets=SCOPE.lora_targets, lora_init_seed=SCOPE.lora_init_seed,
                lora_layers=ADAPTER, local_steps=3, learning_rate=1e-4, modes=modes)


def client(server, tmp_path: Path, name: str, tiny: Tiny, seen: dict, **config) -> EdgeClient:
    def on_sync(event: SyncEvent) -> None:
        seen.setdefault(name, {})[event.round] = event.fingerprint

    made = EdgeClient(ClientConfig(url=f"ws://127.0.0.1:{server.port}", client_id=name,
                                   data_path=str(write_data(tmp_path / f"{name}.jsonl", 20, offset=len(name))),
                                   model=str(tiny.directory), device="cpu", copies="memory",
                                   memory_budget_bytes=4 << 30, cache_dir=str(tmp_path / "cache"), **config),
                      callbacks=ClientCallbacks(on_sync=on_sync))
    made.prepare()
    return made


def test_an_emulator_client_and_a_full_model_client_agree_every_round(tmp_path: Path, tiny: Tiny, emulator) -> None:
    quantization = nf4_or_skip()
    directory, manifest = emulator
    seen: dict[str, dict[int, str]] = {}
    clients: list[EdgeClient] = []

    async def body() -> None:
        modes = {"ferret": {"seeds": 32, "local_steps": 2},
                 "fedbiot": {"seeds": 32, "local_steps": 2, "proximal": 0.1,
                             "emulator_hash": manifest["emulator_hash"]},
                 "fedbiot_zo": {"emulator_hash": manifest["emulator_hash"]}}
        four = {**federation(tiny, tmp_path, **modes), "clients_per_round": 4, "quorum": 4, "min_clients": 4}
        async with coordinator(tmp_path, tiny, **four) as server:
            clients.append(client(server, tmp_path, "full", tiny, seen))
            clients.append(client(server, tmp_path, "emu", tiny, seen, emulator=str(directory),
                                  emulator_quantization=quantization, mode="fedbiot"))
            # Holds the emulator too, but its budget fits a full-model mode: the chooser
            # leaves the emulator (the fallback) and the client loads the full model.
            clients.append(client(server, tmp_path, "both", tiny, seen, emulator=str(directory)))
            assert clients[-1].model is None  # nothing loaded before the plan
            # A zeroth-order emulator client (the smallest budgets): MeZO's round through it.
            clients.append(client(server, tmp_path, "emuzo", tiny, seen, emulator=str(directory),
                                  emulator_quantization=quantization, mode="fedbiot_zo"))
            # edgefed-eval follows the ledger and scores the emulator with the same adapter.
            log = tmp_path / "evaluator.log"
            with log.open("wb") as stderr:
                evaluator = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "edge_client.evaluator", "--url", f"ws://127.0.0.1:{server.port}",
                    "--heldout", str(write_data(tmp_path / "heldout.jsonl", 8, offset=100)), "--model",
                    str(tiny.directory), "--emulator", str(directory), "--loss-only", "--metrics",
                    str(tmp_path / "eval.jsonl"), "--cache-dir", str(tmp_path / "cache"), "--max-seq-len", "64",
                    env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=stderr)
            try:
                await until(lambda: client_status(server, "evaluator") is not None or evaluator.returncode is not None,
                            "the evaluator to join", 60)
                await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 240)
                await asyncio.wait_for(evaluator.wait(), 120)
            finally:
                if evaluator.returncode is None:
                    evaluator.kill()
            assert evaluator.returncode == 0, log.read_text()[-3000:]

    asyncio.run(body())
    full, emu, both, emuzo = clients
    assert full.choice.mode == "ferret" and emu.choice.mode == "fedbiot" and both.choice.mode == "ferret"
    assert emuzo.choice.mode == "fedbiot_zo" and isinstance(emuzo.engine, FedBiOTZOEngine)
    assert seen["emuzo"] == seen["full"] and emuzo.rounds_trained == 3
    assert not hasattr(both.model, "edgefed_emulator_manifest")
    assert both.model.config.num_hidden_layers == LAYERS and seen["both"] == seen["full"]
    assert isinstance(emu.engine, FedBiOTEngine) and emu.engine.settings.proximal == 0.1
    assert emu.model_hash == tiny.model_hash == manifest["base_model_hash"]
    assert emu.rounds_trained == full.rounds_trained == 3
    # Every round's commit gives both replicas the same weights (round 0 included).
    assert set(seen["full"]) == set(seen["emu"]) >= {0, 1, 2, 3}
    for round_ in seen["full"]:
        assert seen["emu"][round_] == seen["full"][round_], round_
    assert len(set(seen["full"].values())) == len(seen["full"])  # the model moved every round
    assert emu.sync.space.fingerprint() == full.sync.space.fingerprint()
    # The adapter the emulator client holds plugs into the full model layer for layer.
    on_full = adapters_by_full_layer(full.model)
    on_emu = adapters_by_full_layer(emu.model, dict(enumerate(manifest["kept_layers"])))
    assert sorted(on_full) == sorted(on_emu)
    assert all(torch.equal(on_full[key], on_emu[key]) for key in on_full)
    assert any(float(on_full[key].abs().max()) > 0 for key in on_full if ".lora_B." in key)  # trained
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        rows = db.execute("SELECT round, client_id, pairs_json FROM contributions ORDER BY round, client_id").fetchall()
    # MeZO's round takes one seed per local step (3), a prefix of the others' 32.
    assert [(r, c, len(json.loads(p))) for r, c, p in rows] == [
        (r, c, 3 if c == "emuzo" else 32) for r in (1, 2, 3) for c in ("both", "emu", "emuzo", "full")]
    for name in ("emu", "emuzo"):
        values = [v for r, c, p in rows if c == name for _, v in json.loads(p)]
        assert any(v != 0 for v in values)  # the emulator clients' updates are real
    # The evaluator scored the full model and the emulator every round, each with the
    # federation's adapter: the emulator's number moves with it.
    entries = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["round"] for e in entries] == [0, 1, 2, 3]
    assert all(math.isfinite(e["eval_loss"]) and math.isfinite(e["emulator_eval_loss"]) for e in entries)
    assert len({e["emulator_eval_loss"] for e in entries}) == 4
    assert all(e["emulator_eval_loss"] != e["eval_loss"] for e in entries)  # two models


def run_lone_emulator_client(tmp_path: Path, tiny: Tiny, emulator_dir: Path, **modes) -> None:
    """One fedbiot client holding ``emulator_dir`` in a one-client federation, to the end."""
    async def body() -> None:
        settings = {**federation(tiny, tmp_path, **modes), "min_clients": 1, "clients_per_round": 1, "quorum": 1}
        async with coordinator(tmp_path, tiny, **settings) as server:
            emu = client(server, tmp_path, "emu", tiny, {}, emulator=str(emulator_dir), emulator_quantization="none",
                         mode="fedbiot")
            await asyncio.wait_for(emu.run(), 60)

    asyncio.run(body())


def test_an_emulator_of_another_base_model_is_refused(tmp_path: Path, tiny: Tiny) -> None:
    other = make_tiny_llama(tmp_path / "other", num_layers=LAYERS, seed=1)
    out = tmp_path / "emu-other"
    build_emulator(other, out, records=public_records()[:16], steps=0, batch_size=4, max_seq_len=64, eval_records=4)

    with pytest.raises(FatalClientError, match=r"^the emulator in .* was built from base model .*build an emulator "
                                               r"of that model$"):
        run_lone_emulator_client(tmp_path, tiny, out)


def test_a_client_holding_another_emulator_than_the_federations_is_refused(tmp_path: Path, tiny: Tiny,
                                                                           emulator) -> None:
    directory, manifest = emulator
    pinned = "0" * 64
    assert manifest["emulator_hash"] != pinned

    with pytest.raises(FatalClientError, match=rf"^this client's emulator is {manifest['emulator_hash'][:16]}\.\.\., "
                                               r"but the federation trains through emulator 0000000000000000"):
        run_lone_emulator_client(tmp_path, tiny, directory, fedbiot={"emulator_hash": pinned})


def test_edgefed_local_restricts_the_scope_to_the_emulators_adapter_and_pins_its_hash(tmp_path: Path, tiny: Tiny,
                                                                                      emulator) -> None:
    import tomllib

    from edge_client.local_federation import build_parser, modes_config

    directory, manifest = emulator
    args = build_parser().parse_args(["--emulator", str(directory)])
    args.emulator_manifest = manifest
    args.model_layers = 30
    written = tmp_path / "modes.toml"
    written.write_text(modes_config(args), encoding="utf-8")
    parsed = tomllib.loads(written.read_text())
    assert parsed["training"]["lora_layers"] == manifest["adapter_layers"] == list(ADAPTER)
    assert parsed["modes"]["fedbiot"]["emulator_hash"] == manifest["emulator_hash"]
    assert parsed["modes"]["fedbiot_zo"]["emulator_hash"] == manifest["emulator_hash"]
    assert parsed["modes"]["fedbiot"]["seeds"] == parsed["modes"]["ferret"]["seeds"]  # ferret's round
    # The coordinator reads it (the command line's scope beside it) as the federation.
    config = load_config(written, {"model_hash": tiny.model_hash, "scope": "lora"})
    assert config.lora_layers == ADAPTER
    assert config.modes["fedbiot"]["emulator_hash"] == manifest["emulator_hash"]
    # Without an emulator nothing of it is set.
    plain = build_parser().parse_args([])
    plain.emulator_manifest = None
    plain.model_layers = 30
    assert "lora_layers" not in modes_config(plain) and "fedbiot" not in modes_config(plain)


def test_edgefed_eval_scores_the_emulator_beside_the_model_and_refuses_anothers(tmp_path: Path, tiny: Tiny,
                                                                                 emulator, capsys) -> None:
    from edge_client.evaluator import main as evaluator_main

    heldout = write_data(tmp_path / "heldout.jsonl", 8, offset=100)
    common = ["--heldout", str(heldout), "--loss-only", "--max-seq-len", "64", "--emulator", str(emulator[0])]
    assert evaluator_main([*common, "--model", str(tiny.directory)]) == 0
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(entry["emulator_eval_loss"]) and entry["emulator_eval_loss"] != entry["eval_loss"]
    other = make_tiny_llama(tmp_path / "other", num_layers=LAYERS, seed=1)
    assert evaluator_main([*common, "--model", str(other)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("edgefed-eval: --emulator: ") and "built from" in error
