"""Parameter space, model sync and the MeZO step on small models."""

import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from edge_client.engines import RoundPlan
from edge_client.engines.mezo import MeZOEngine
from edge_client.space import HostCopy, ParameterSpace, SpaceError, sweep_stale_copies
from edge_client.sync import ModelSync, RoundCoefficients, SyncError
from protocol.table import accumulate, fl32, sorted_entries, table_digest


class Toy(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(37, 5, generator=g), requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(11, generator=g), requires_grad=False)
        self.lin = torch.nn.Linear(5, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 5, generator=g))
            self.lin.bias.copy_(torch.randn(3, generator=g))


def make_space(seed: int = 0, **kw) -> tuple[Toy, ParameterSpace]:
    model = Toy(seed)
    return model, ParameterSpace.adopt(list(model.named_parameters()), **kw)


def test_adopt_orders_by_name_and_keeps_values_and_views():
    model = Toy(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    space = ParameterSpace.adopt(list(model.named_parameters()))
    assert space.names() == sorted(before)
    assert space.flat.numel() % 64 == 0 and space.numel == sum(t.numel() for t in before.values())
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
    space.apply(3, 0.5)  # the model's parameters move with the buffer
    assert not torch.equal(model.w, before["w"])
    assert model.w.data_ptr() == space.flat.data_ptr() + space.entries[space.names().index("w")].offset * 4


def test_adopt_refuses_non_float32_duplicates_and_empty():
    model = Toy(0).double()
    with pytest.raises(SpaceError, match="float32"):
        ParameterSpace.adopt(list(model.named_parameters()))
    with pytest.raises(SpaceError, match="no parameters"):
        ParameterSpace.adopt([])
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(SpaceError, match="shared"):
        ParameterSpace.adopt([("a", p), ("b", p)])


@pytest.mark.parametrize("where", ["memory", "file"])
def test_host_copy_restores_exactly(where, tmp_path):
    _, space = make_space()
    copy = HostCopy(space.numel, where=where, directory=tmp_path)
    copy.save(space)
    fp = space.fingerprint()
    for seed in range(5):
        space.apply(seed, 1e-3)
    assert space.fingerprint() != fp
    copy.restore(space)
    assert space.fingerprint() == fp
    copy.close()


def _mapped_under(directory: Path) -> list[str]:
    """This process's mappings of files under ``directory`` (Linux)."""
    rows = [line.split(None, 5) for line in Path("/proc/self/maps").read_text().splitlines()]
    return sorted({row[5] for row in rows if len(row) == 6 and row[5].startswith(str(directory))})


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_a_file_copy_lives_under_the_cache_unlinked_while_mapped_and_is_unmapped_on_close(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFED_CACHE", str(tmp_path / "cache"))
    _, space = make_space()
    sync = ModelSync(space, rebase_every=2, copies_where="file", copies_owner="laptop-1")
    copies = tmp_path / "cache" / "copies"
    mapped = _mapped_under(copies)
    # the base copy and the round-start snapshot, named by client and process, already unlinked:
    # a SIGKILL cannot leave them behind
    assert len(mapped) == 2 and all(name.endswith(" (deleted)") for name in mapped), mapped
    assert all(f"edgefed-copy.laptop-1.pid{os.getpid()}." in name for name in mapped), mapped
    assert sorted(path.name for path in copies.iterdir()) == []
    fp = space.fingerprint()
    sync.begin_local_training(0)
    space.apply(3, 1e-2)
    assert space.fingerprint() != fp
    sync.discard_local_training()  # from the round-start snapshot
    assert space.fingerprint() == fp  # the unlinked copy still holds the values
    sync.base.close()
    sync.snapshot.close()
    assert _mapped_under(copies) == []


def _write(path: Path, age_s: float = 0.0) -> Path:
    path.write_bytes(bytes(64))
    if age_s:
        written = time.time() - age_s
        os.utime(path, (written, written))
    return path


def test_the_sweep_removes_only_copies_whose_owner_is_gone(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited, not reaped yet
    deadline = time.monotonic() + 30
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    me = os.getpid()
    dead = _write(tmp_path / f"edgefed-copy.a.pid{finished.pid}.base.x1.f32")
    exited = _write(tmp_path / f"edgefed-copy.b.pid{zombie.pid}.snapshot.x2.f32")
    # this pid, but the file was written a day before this process started: a reused pid
    reused = _write(tmp_path / f"edgefed-copy.c.pid{me}.base.x3.f32", age_s=86400 + time.time()
                    - psutil.Process(me).create_time())
    live = _write(tmp_path / f"edgefed-copy.d.pid{me}.snapshot.x4.f32")
    parent = _write(tmp_path / f"edgefed-copy.e.pid{os.getppid()}.base.x5.f32")
    unrelated = [_write(tmp_path / name) for name in ("notes.f32", "edgefed-copy-abc123.f32",
                                                       f"edgefed-copy.f.pid{finished.pid}.base.x6.bin")]
    try:
        removed = sweep_stale_copies(tmp_path)
    finally:
        zombie.wait()
    assert sorted(removed) == sorted([dead, exited, reused])
    assert sorted(tmp_path.iterdir()) == sorted([live, parent, *unrelated])
    assert sweep_stale_copies(tmp_path / "missing") == []


def _rounds(count: int, pool: list[int], rng: random.Random) -> list[RoundCoefficients]:
    out = []
    for r in range(1, count + 1):
        seeds = rng.sample(pool, 3)
        out.append(RoundCoefficients(r, tuple((s, fl32(rng.uniform(-1e-3, 1e-3))) for s in seeds)))
    return out


@pytest.mark.parametrize("rebase_every", [1, 3])
def test_online_and_catch_up_paths_reach_identical_bits(rebase_every):
    rng = random.Random(0)
    pool = [rng.randrange(2**63) for _ in range(6)]
    rounds = _rounds(7, pool, rng)
    _, online_space = make_space()
    online = ModelSync(online_space, rebase_every=rebase_every)
    table: dict[int, float] = {}
    fingerprints = []
    for entry in rounds:
        # local training drifts the model before each commit
        online.begin_local_training(entry.round - 1)
        for seed in pool[:2]:
            online_space.apply(seed, 0.01)
        for seed, coef in entry.coefficients:
            table[seed] = accumulate(table.get(seed, 0.0), coef)
        totals = [(s, table[s]) for s, _ in entry.coefficients]
        online.apply_commit(entry.round, entry.coefficients, totals, table_digest(sorted_entries(table)))
        fingerprints.append(online_space.fingerprint())

    # The definition, written out independently: theta_r from theta_0.
    _, reference = make_space()
    base = reference.values().clone()
    ref_table: dict[int, float] = {}
    for entry in rounds:
        for seed, coef in entry.coefficients:
            ref_table[seed] = accumulate(ref_table.get(seed, 0.0), coef)
        if entry.round % rebase_every == 0:
            reference.load(base)
            for seed, total in sorted((s, t) for s, t in ref_table.items() if t != 0.0):  # ascending seed, by hand
                reference.apply(seed, total)
        else:
            for seed, coef in entry.coefficients:
                reference.apply(seed, coef)
        assert reference.fingerprint() == fingerprints[entry.round - 1]

    # A late client catches up from the last rebase round's table plus the rounds after it.
    for target in range(1, len(rounds) + 1):
        base_round = target - target % rebase_every
        t: dict[int, float] = {}
        for entry in rounds[:base_round]:
            for seed, coef in entry.coefficients:
                t[seed] = accumulate(t.get(seed, 0.0), coef)
        _, late_space = make_space()
        late = ModelSync(late_space, rebase_every=rebase_every)
        digest = table_digest(sorted_entries({**t, **_fold(t, rounds[base_round:target])}))
        late.catch_up(base_round, sorted_entries(t), rounds[base_round:target], digest)
        assert late.round == target
        assert late_space.fingerprint() == fingerprints[target - 1]


def _fold(table, rounds):
    t = dict(table)
    for entry in rounds:
        for seed, coef in entry.coefficients:
            t[seed] = accumulate(t.get(seed, 0.0), coef)
    return t


@pytest.mark.parametrize("rebase_every", [1, 2, 3])
def test_discarding_local_training_returns_to_the_current_round_whatever_comes_next(rebase_every):
    rng = random.Random(5)
    pool = [rng.randrange(2**63) for _ in range(6)]
    _, space = make_space()
    sync = ModelSync(space, rebase_every=rebase_every)
    for entry in _rounds(6, pool, rng):
        canonical = space.fingerprint()
        sync.begin_local_training(entry.round - 1)
        space.apply(pool[0], 0.05)  # an abandoned attempt's local steps
        sync.discard_local_training()
        assert space.fingerprint() == canonical, entry.round
        sync.begin_local_training(entry.round - 1)  # the retried attempt
        space.apply(pool[1], 0.05)
        sync.apply_commit(entry.round, entry.coefficients)


def test_a_failed_catch_up_leaves_the_base_model_not_a_half_applied_one():
    rng = random.Random(3)
    rounds = _rounds(4, [rng.randrange(2**63) for _ in range(5)], rng)
    _, space = make_space()
    base = space.fingerprint()
    sync = ModelSync(space, rebase_every=2)
    with pytest.raises(SyncError, match="digest"):
        sync.catch_up(2, sorted_entries(_fold({}, rounds[:2])), rounds[2:], "0" * 64)
    assert (sync.round, sync.table, space.fingerprint()) == (0, {}, base)
    sync.begin_local_training(0)  # usable again: train, discard, commit
    sync.discard_local_training()
    assert space.fingerprint() == base


def test_commit_checks_order_totals_and_digest():
    _, space = make_space()
    sync = ModelSync(space, rebase_every=2)
    with pytest.raises(SyncError, match="round 2"):
        sync.apply_commit(2, [(1, 1e-3)])
    with pytest.raises(SyncError, match="total of seed"):
        sync.apply_commit(1, [(1, fl32(1e-3))], totals=[(1, fl32(2e-3))])
    with pytest.raises(SyncError, match="digest"):
        sync.apply_commit(1, [(1, fl32(1e-3))], expected_digest="0" * 64)
    assert sync.round == 0  # refused commits change nothing
    with pytest.raises(SyncError, match="based on round 3"):
        sync.begin_local_training(3)


class Quadratic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(256), requires_grad=False)
        self.target = torch.linspace(-1, 1, 256)


def quadratic_loss(model, batch) -> float:
    return float(((model.w - model.target) ** 2).mean())


class NoData:
    def next_batch(self):
        return None


def test_mezo_reduces_a_quadratic_and_reports_projected_gradients():
    model = Quadratic()
    space = ParameterSpace.adopt(list(model.named_parameters()))
    engine = MeZOEngine(model, space, loss_fn=quadratic_loss)
    start = quadratic_loss(model, None)
    rng = random.Random(1)
    plan = RoundPlan(round=1, seeds=tuple(rng.randrange(2**63) for _ in range(300)),
                     learning_rate=0.5, epsilon=1e-3, batch_size=1)
    update = engine.train_round(plan, NoData())
    end = quadratic_loss(model, None)
    assert end < 0.5 * start
    assert update.loss_before == pytest.approx(start) and update.loss_after == pytest.approx(end)
    assert [s for s, _ in update.pairs] == list(plan.seeds)
    # The first scalar is the directional derivative (L+ - L-) / 2eps at w = 0: 2/n <w - t, z>.
    from protocol.perturb import rademacher_tensor
    z = rademacher_tensor(plan.seeds[0], 256)
    expected = float(2 * ((0 - model.target) * z).mean())
    assert update.pairs[0][1] == pytest.approx(expected, rel=1e-2, abs=1e-4)


def test_mezo_step_restores_then_updates_in_place_without_copies():
    model = Quadratic()
    space = ParameterSpace.adopt(list(model.named_parameters()))
    engine = MeZOEngine(model, space, loss_fn=quadratic_loss)
    ptr = space.flat.data_ptr()
    grad, lp, lm = engine.step(42, None, learning_rate=0.0, epsilon=1e-3)
    assert space.flat.data_ptr() == ptr
    # With lr = 0 the step is +eps, -2eps, +eps: within one ulp-scale of the start, not exact.
    assert float(space.values().abs().max()) < 1e-6
    assert lp != lm and math.isfinite(grad)
