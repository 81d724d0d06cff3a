"""Parameter scopes on a tiny Llama: full (tied weights) and seed-initialised LoRA."""

import pytest
import torch

from edge_client.data import Batch
from edge_client.loss import causal_lm_loss
from edge_client.model import load_model
from edge_client.scope import ScopeConfig, ScopeError, build_space
from edge_client.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def batch() -> Batch:
    ids = torch.tensor([[257, 72, 105, 33, 10, 65, 66, 258], [257, 79, 107, 10, 67, 258, 256, 256]])
    mask = (ids != 256).long()
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return Batch(ids, mask, labels)


def test_full_scope_keeps_the_function_and_counts_tied_weights_once(tiny_dir):
    model, _ = load_model(tiny_dir)
    before = causal_lm_loss(model, batch())[0]
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates the tied head
    model, space = build_space(model, ScopeConfig(kind="full"))
    assert space.numel == total
    assert "lm_head.weight" not in space.names() and "model.embed_tokens.weight" in space.names()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert causal_lm_loss(model, batch())[0] == before
    space.apply(5, 1e-2)
    assert causal_lm_loss(model, batch())[0] != before


def test_lora_scope_starts_identical_on_every_client_and_equals_the_base(tiny_dir):
    scope = ScopeConfig(kind="lora", lora_rank=4, lora_targets=("q_proj", "v_proj"), lora_init_seed=9)
    model_a, _ = load_model(tiny_dir)
    base_loss = causal_lm_loss(model_a, batch())[0]
    model_a, space_a = build_space(model_a, scope)
    model_b, space_b = build_space(load_model(tiny_dir)[0], scope)
    assert space_a.fingerprint() == space_b.fingerprint()
    assert all(".lora_A." in n or ".lora_B." in n for n in space_a.names())
    assert causal_lm_loss(model_a, batch())[0] == pytest.approx(base_loss, abs=1e-6)  # B = 0
    other = build_space(load_model(tiny_dir)[0], ScopeConfig(kind="lora", lora_rank=4, lora_init_seed=10))[1]
    assert other.fingerprint() != space_a.fingerprint()
    space_a.apply(3, 1e-1)
    assert causal_lm_loss(model_a, batch())[0] != pytest.approx(base_loss, abs=1e-6)


def test_lora_on_a_bfloat16_base_keeps_trainable_parameters_float32(tiny_dir):
    model, _ = load_model(tiny_dir, dtype=torch.bfloat16)
    model, space = build_space(model, ScopeConfig(kind="lora", lora_rank=2))
    assert space.flat.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    loss, tokens = causal_lm_loss(model, batch())
    assert tokens > 0 and loss == loss


def test_full_scope_refuses_a_half_precision_model_and_unknown_targets(tiny_dir):
    with pytest.raises(ScopeError, match="float32"):
        build_space(load_model(tiny_dir, dtype=torch.bfloat16)[0], ScopeConfig(kind="full"))
    with pytest.raises(ScopeError, match="not found"):
        build_space(load_model(tiny_dir)[0], ScopeConfig(kind="lora", lora_targets=("nope_proj",)))
    with pytest.raises(ValueError, match="scope.kind"):
        ScopeConfig(kind="half")
