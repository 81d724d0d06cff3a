"""Cyclic block updates (FedCyBGD, issue #20): blocks of the space, block seeds and their
directions (PROTOCOL.md §5.5), the coordinator's cyclic schedule, the block engine, its
memory model, and a real federation where a block client and a MeZO client agree."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from harness import SMOLLM2, Tiny, client_status, coordinator, make_tiny, until, write_data

from coordinator.blocks import BlockSchedule, schedule_blocks
from coordinator.config import ConfigError, FederationConfig
from edge_client.daemon import ClientCallbacks, ClientConfig, EdgeClient, SyncEvent
from edge_client.data import BatchStream, load_jsonl, tokenize
from edge_client.engines import RoundPlan, engine_policy
from edge_client.engines.fedcybgd import FedCyBGDEngine, FedCyBGDSettings, block_memory, trainable_blocks
from edge_client.engines.ferret import FerretEngine
from edge_client.model import load_model
from edge_client.scope import ScopeConfig
from profiles.chooser import Choice, TrainingTask, choose
from protocol.blocks import OUTER_BLOCK, block_of, block_seed, block_seed_map
from protocol.perturb import apply_rademacher, padded_length, project_rademacher

GIB = 1024**3
TASK = TrainingTask(scope="lora", batch_size=4, max_seq_len=96)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().view(torch.int32)


# ------------------------------------------------------------------------ blocks and directions


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_blocks_partition_the_space_every_element_once(tiny: Tiny, kind: str) -> None:
    model, _ = load_model(tiny.directory)
    _, space = FerretEngine.prepare(model, ScopeConfig(kind=kind))
    blocks = space.blocks()
    assert blocks[:2] == [0, 1]  # the tiny model's two decoder layers
    assert (OUTER_BLOCK in blocks) == (kind == "full")  # embedding and norm: only the full scope has them
    covered = torch.zeros(space.numel, dtype=torch.int32)
    for block in blocks:
        for low, high in space.block_ranges(block):
            covered[low:high] += 1
    assert bool((covered == 1).all())  # every element in exactly one block
    for entry in space.entries:  # and a tensor's block is its layer's
        ranges = space.block_ranges(block_of(entry.name))
        assert any(low <= entry.offset and entry.offset + entry.numel <= high for low, high in ranges)
    assert block_of("model.layers.12.self_attn.q_proj.lora_A.weight") == 12
    assert block_of("model.embed_tokens.weight") == block_of("model.norm.weight") == OUTER_BLOCK


def test_a_block_seeds_direction_is_the_seeds_signs_on_its_block_and_nothing_elsewhere(tiny: Tiny) -> None:
    model, _ = load_model(tiny.directory)
    _, space = FerretEngine.prepare(model, ScopeConfig(kind="full"))
    seed_blocks = block_seed_map("fed", space.blocks(), 3)
    assert len(seed_blocks) == 3 * len(space.blocks())
    assert block_seed("fed", 1, 2) in seed_blocks and block_seed("other", 1, 2) not in seed_blocks
    space.use_block_seeds(seed_blocks)
    for seed, block in seed_blocks.items():
        before = space.flat.detach().clone()
        space.apply(seed, 0.125)
        whole = before.clone()
        apply_rademacher(whole, seed, 0.125, backend="eager")
        inside = torch.zeros_like(before, dtype=torch.bool)
        for low, high in space.block_ranges(block):
            inside[low:high] = True
        expected = torch.where(inside, whole, before)
        assert torch.equal(bits(space.flat), bits(expected)), block  # bit for bit, and untouched outside
    # A seed that is not a block seed still moves the whole space.
    before = space.flat.detach().clone()
    space.apply(12345, 0.5)
    assert bool((space.flat[:space.numel] != before[:space.numel]).all())


def test_a_windows_projection_is_the_whole_spaces_projection_of_the_same_update() -> None:
    generator = torch.Generator().manual_seed(0)
    low, high = 100, 700
    delta = torch.zeros(padded_length(1000))
    delta[low:high] = torch.randn(high - low, generator=generator)
    first = low // 64
    window = delta[first * 64:padded_length(high)].clone()
    seeds = [3, 99, 2**62]
    whole, _ = project_rademacher(delta, seeds, backend="eager")
    part, _ = project_rademacher(window, seeds, first_word=first)
    assert part == pytest.approx(whole, rel=1e-9)


# ------------------------------------------------------------------------ the schedule


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
def test_the_cyclic_schedule_trains_every_block_once_per_cycle(order: str) -> None:
    blocks = schedule_blocks(5, outer=True)
    schedule = BlockSchedule(blocks, order, seed="fed")
    cycles = []
    for _ in range(3):
        seen: list[int] = []
        while len(seen) < len(blocks):  # two clients a round, the cycle's blocks in order
            seen += list(schedule.assign([("a", ()), ("b", ())]).values())
        cycles.append(seen[:len(blocks)])
        assert sorted(cycles[-1]) == sorted(blocks)
    if order == "ascending":
        assert cycles[0] == [0, 1, 2, 3, 4, OUTER_BLOCK]
    elif order == "descending":
        assert cycles[0] == [OUTER_BLOCK, 4, 3, 2, 1, 0]
    else:
        assert len({tuple(cycle) for cycle in cycles}) > 1  # a new permutation each cycle


def test_a_client_is_only_assigned_the_blocks_its_memory_holds() -> None:
    schedule = BlockSchedule(list(range(6)), "ascending")
    small, trained = (3, 4, 5), []
    for _ in range(4):
        assigned = schedule.assign([("small", small), ("big", ())])
        assert assigned["small"] in small
        trained += assigned.values()
    assert set(trained) == set(range(6))  # the big client takes the blocks the small one cannot
    with pytest.raises(ValueError, match="none of the blocks"):
        schedule.assign([("tiny", (9,))])


def test_the_block_mode_is_configured_in_its_table_and_checked() -> None:
    base = dict(model_hash="a" * 64, scope="lora", seed_pool_size=64, local_steps=3)
    config = FederationConfig(**base, modes={"fedcybgd": {"blocks": 4, "seeds": 8, "block_seeds": 16,
                                                          "local_steps": 2}})
    assert config.block_seeds == 16 and config.settings_for_mode("fedcybgd") == {"local_steps": 2}
    assert config.block_schedule().blocks == (0, 1, 2, 3)
    assert config.max_seeds_per_round == 3 + 3 * 8  # the others' seeds, then each block client's own
    assert FederationConfig(**base).block_seeds == 0 and FederationConfig(**base).block_schedule() is None
    assert FederationConfig(**base).identity()["block_seeds"] == "0"  # a ledger is bound to it
    restricted = FederationConfig(**{**base, "lora_layers": (2, 3)}, modes={"fedcybgd": {"blocks": 4, "seeds": 2}})
    assert restricted.block_schedule().blocks == (2, 3)
    for table, why in [({}, "blocks: the model's number of decoder layers is required"),
                       ({"blocks": 4, "seeds": 32, "block_seeds": 16}, "cannot exceed block_seeds"),
                       ({"blocks": 4, "block_order": "sideways"}, "block_order"),
                       ({"blocks": 4, "outer_block": True}, "only the full scope")]:
        with pytest.raises(ConfigError, match=why):
            FederationConfig(**base, modes={"fedcybgd": table})
    with pytest.raises(ConfigError, match=r"belong to \[modes.fedcybgd\]"):
        FederationConfig(**base, modes={"ferret": {"blocks": 4}})


# ------------------------------------------------------------------------ the engine


def block_engine(tiny: Tiny, tmp_path: Path, kind: str = "lora", **settings):
    model, tokenizer = load_model(tiny.directory)
    model, space = FedCyBGDEngine.prepare(model, ScopeConfig(kind=kind))
    space.use_block_seeds(block_seed_map("fed", space.blocks(), 8))
    records, _ = load_jsonl(write_data(tmp_path / "d.jsonl", 12))
    stream = BatchStream(tokenize(records, tokenizer, max_seq_len=64, prompt_format="plain"), 4, seed=1,
                         pad_token_id=tokenizer.pad_token_id or 0)
    return FedCyBGDEngine(model, space, FedCyBGDSettings(local_steps=2, **settings)), space, stream


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_block_clients_round_moves_its_block_and_leaves_every_other_bit_alone(tiny: Tiny, tmp_path: Path,
                                                                                kind: str) -> None:
    engine, space, stream = block_engine(tiny, tmp_path, kind, block=1)
    seeds = tuple(block_seed("fed", 1, j) for j in range(8))
    before = bits(space.flat)
    frozen = {name: bits(p) for name, p in engine.model.named_parameters()}  # the base weights too
    update = engine.train_round(RoundPlan(round=1, seeds=seeds, learning_rate=1e-3, epsilon=1e-3, batch_size=4),
                                stream)
    after = bits(space.flat)
    inside = torch.zeros(space.flat.numel(), dtype=torch.bool)
    for low, high in space.block_ranges(1):
        inside[low:high] = True
    assert torch.equal(after[~inside], before[~inside])  # every other block: bit-identical
    assert bool((after[inside] != before[inside]).any())  # the block trained
    moved = {name for name, p in engine.model.named_parameters() if not torch.equal(bits(p), frozen[name])}
    assert moved and all(block_of(name.replace("base_model.model.", "").replace(".default", "")) == 1
                         for name in moved)
    assert [seed for seed, _ in update.pairs] == list(seeds) and all(value != 0 for _, value in update.pairs)
    assert not any(p.requires_grad for p in engine.model.parameters())  # nothing left needing gradients
    # The scalars are ferret's, over the block's directions: −<Δ, z_b> / (η K).
    with pytest.raises(Exception, match="not a seed of block 1"):
        engine.train_round(RoundPlan(round=2, seeds=(5, 6), learning_rate=1e-3, epsilon=1e-3, batch_size=4), stream)


def test_a_round_without_a_block_or_with_a_foreign_block_is_refused(tiny: Tiny, tmp_path: Path) -> None:
    engine, _, stream = block_engine(tiny, tmp_path)
    plan = RoundPlan(round=1, seeds=(block_seed("fed", 0, 0),), learning_rate=1e-3, epsilon=1e-3, batch_size=4)
    with pytest.raises(Exception, match="names no block"):
        engine.train_round(plan, stream)
    engine.update_settings(FedCyBGDSettings(block=OUTER_BLOCK))  # the lora scope has no outer block
    with pytest.raises(Exception, match="holds no parameter"):
        engine.train_round(plan, stream)


def test_the_memory_model_counts_each_block_and_the_chooser_offers_blocks_where_the_rest_does_not_fit() -> None:
    full = TrainingTask(scope="full", batch_size=4, max_seq_len=96)
    per_block = [block_memory(SMOLLM2, full, 4, block).total for block in range(30)]
    assert per_block == sorted(per_block, reverse=True)  # a lower block keeps more for backward
    outer = block_memory(SMOLLM2, full, 4, OUTER_BLOCK).total
    assert outer > per_block[0]  # the embedding block is the largest
    # A budget that holds the upper blocks only: the chooser takes fedcybgd over MeZO, and
    # the client announces just the blocks that fit.
    usable = (per_block[20] + per_block[21]) // 2
    choice = choose(SMOLLM2, full, budget_bytes=int(usable / 0.9), headroom=0.1, policy=engine_policy())
    assert choice.mode == "fedcybgd"
    fitting = trainable_blocks(SMOLLM2, full, choice, [*range(30), OUTER_BLOCK])
    assert fitting == tuple(range(21, 30))
    everything = Choice(choice.mode, choice.batch, choice.estimate, 64 * GIB, "")
    assert FedCyBGDEngine.announced_blocks(SMOLLM2, full, everything, [*range(30), OUTER_BLOCK]) == ()


# ------------------------------------------------------------------------ a federation


def test_a_block_client_and_a_mezo_client_agree_every_round(tmp_path: Path, tiny: Tiny) -> None:
    seen: dict[str, dict[int, str]] = {}
    clients: list[EdgeClient] = []
    hellos: dict = {}

    def make(server, name: str, mode: str) -> EdgeClient:
        def on_sync(event: SyncEvent) -> None:
            seen.setdefault(name, {})[event.round] = event.fingerprint

        client = EdgeClient(ClientConfig(url=f"ws://127.0.0.1:{server.port}", client_id=name, mode=mode,
                                         data_path=str(write_data(tmp_path / f"{name}.jsonl", 20, offset=len(name))),
                                         model=str(tiny.directory), device="cpu", copies="memory",
                                         memory_budget_bytes=4 << 30, cache_dir=str(tmp_path / "cache")),
                            callbacks=ClientCallbacks(on_sync=on_sync))
        client.prepare()
        return client

    async def body() -> None:
        modes = {"fedcybgd": {"blocks": 2, "block_seeds": 16, "seeds": 8, "local_steps": 2}}
        async with coordinator(tmp_path, tiny, rounds=3, clients_per_round=2, quorum=2, min_clients=2, scope="lora",
                               learning_rate=1e-4, modes=modes) as server:
            clients.append(make(server, "blocky", "fedcybgd"))
            clients.append(make(server, "zero", "mezo"))
            running = asyncio.gather(*(c.run() for c in clients))
            await until(lambda: client_status(server, "blocky") is not None, "the block client's hello")
            hellos["federation"] = server.federation
            await until(lambda: (client_status(server, "blocky") or {}).get("block") is not None or running.done(),
                        "the block client's first task")
            hellos["status"] = client_status(server, "blocky")
            await asyncio.wait_for(running, 240)
            hellos["blocks"] = [server.ledger.contributions(r) for r in (1, 2, 3)]

    asyncio.run(body())
    blocky, zero = clients
    assert isinstance(blocky.engine, FedCyBGDEngine) and hellos["federation"].block_seeds == 16
    assert blocky.rounds_trained == zero.rounds_trained == 3
    assert set(seen["blocky"]) >= {0, 1, 2, 3} and seen["blocky"] == seen["zero"]
    assert len(set(seen["zero"].values())) == len(seen["zero"])  # the model moved every round
    # The block client was cycled through blocks 0, 1, 0, answering its block's seeds only.
    seed_blocks = block_seed_map(hellos["federation"].federation_id, [0, 1], 16)
    blocks_trained = []
    for contributions in hellos["blocks"]:
        pairs = next(c.pairs for c in contributions if c.client_id == "blocky")
        blocks_trained.append({seed_blocks.get(seed, -1) for seed, _ in pairs})
        mezo_pairs = next(c.pairs for c in contributions if c.client_id == "zero")
        assert not {seed for seed, _ in mezo_pairs} & seed_blocks.keys()  # MeZO's seeds cover the space
    assert blocks_trained == [{0}, {1}, {0}]
    assert hellos["status"]["block"] == 0 and hellos["status"]["blocks_allowed"] is None  # /status shows it


def test_a_block_client_is_refused_by_a_federation_without_blocks_and_auto_clients_never_pick_it(
        tmp_path: Path, tiny: Tiny) -> None:
    from edge_client.daemon import FatalClientError, plan_training
    from edge_client.device import DeviceReport

    errors: list[str] = []

    async def body() -> None:
        async with coordinator(tmp_path, tiny, scope="lora") as server:
            client = EdgeClient(ClientConfig(url=f"ws://127.0.0.1:{server.port}", client_id="blocky", mode="fedcybgd",
                                             data_path=str(write_data(tmp_path / "b.jsonl", 8)),
                                             model=str(tiny.directory), device="cpu", copies="memory",
                                             memory_budget_bytes=4 << 30, cache_dir=str(tmp_path / "cache")))
            client.prepare()
            try:
                await asyncio.wait_for(client.run(), 60)
            except FatalClientError as error:
                errors.append(str(error))

    asyncio.run(body())
    assert len(errors) == 1 and "does not offer cyclic block updates" in errors[0] and "[modes.fedcybgd]" in errors[0], errors
    # The chooser offers the block mode only where the federation has block seeds.
    full = TrainingTask(scope="full", batch_size=4, max_seq_len=96)
    usable = block_memory(SMOLLM2, full, 4).total + (1 << 20)
    budget = int(usable / 0.9)
    report = DeviceReport(device="cpu", kind="cpu", name="test", accelerators=(), host_total_bytes=8 * GIB,
                          host_free_bytes=8 * GIB, bf16=False, detected_bytes=budget, budget_bytes=budget,
                          budget_source="--memory-budget", user_budget_bytes=budget, headroom=0.1)
    assert plan_training(SMOLLM2, full, report, copies="file", rebase_every=1, mode="auto",
                         block_seeds=16).mode == "fedcybgd"
    assert plan_training(SMOLLM2, full, report, copies="file", rebase_every=1, mode="auto").mode != "fedcybgd"


def test_edgefed_local_offers_blocks_when_asked_and_the_coordinator_reads_its_table(tmp_path: Path) -> None:
    from coordinator.config import load_config
    from edge_client.local_federation import build_parser, modes_config

    for argv, offered in [([], False), (["--blocks", "--block-seeds", "32"], True), (["--mode", "fedcybgd"], True)]:
        args = build_parser().parse_args(argv)
        args.model_layers, args.emulator_manifest = 30, None
        written = tmp_path / "modes.toml"
        written.write_text(modes_config(args), encoding="utf-8")
        config = load_config(written, {"model_hash": "a" * 64, "scope": "lora"})
        assert (config.block_schedule() is not None) == offered, argv
        if offered:
            assert config.block_schedule().blocks == tuple(range(30))
            assert config.block_seeds == 2 * args.block_seeds and config.seeds_for_mode("fedcybgd") == args.block_seeds
            assert config.settings_for_mode("fedcybgd")["value_encoding"] == "q8"  # one byte a scalar, as ferret's
