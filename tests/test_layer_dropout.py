"""Stochastic layer dropout on tiny random models: skipping equals removing, restores, samples right."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from torch import nn

from edge_client.layer_dropout import (
    LayerDropoutError,
    find_decoder_layers,
    layer_probabilities,
    sample_skipped,
    skip_layers,
)
from edge_client.model import load_model
from edge_client.scope import ScopeConfig, build_space
from edge_client.tiny import make_tiny_llama

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny4"), num_layers=NUM_LAYERS)


@pytest.fixture()
def model(tiny_dir):
    model, _ = load_model(tiny_dir)  # float32, eval mode, frozen
    return model


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[257, 72, 105, 33, 10, 65, 66, 258], [257, 79, 107, 10, 67, 258, 256, 256]])
    return {"input_ids": ids, "attention_mask": (ids != 256).long()}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(), use_cache=False).logits


def without_layers(model: nn.Module, removed: set[int]) -> nn.Module:
    """A deep copy of ``model`` built without the ``removed`` layers (the reference)."""
    reference = copy.deepcopy(model)
    found = find_decoder_layers(reference)
    kept = [layer for i, layer in enumerate(found.layers) if i not in removed]
    setattr(found.parent, found.attribute, nn.ModuleList(kept))
    config = found.model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in removed]
    config.num_hidden_layers = len(kept)
    return reference


@pytest.mark.parametrize("removed", [{0}, {2}, {3}, {1, 3}])
def test_skipping_layers_equals_the_model_built_without_them(model, removed):
    expected = logits(without_layers(model, removed))
    with skip_layers(model, removed) as skipped:
        assert skipped == tuple(sorted(removed))
        got = logits(model)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, logits(model), atol=1e-3)  # skipping changed something


def test_skipped_layers_get_no_gradient_and_kept_layers_do(model):
    model.requires_grad_(True)
    skipped = 1
    batch = inputs()
    with skip_layers(model, [skipped]):
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    loss.backward()  # outside the block: the graph holds only what ran
    layers = model.model.layers
    for name, param in layers[skipped].named_parameters():
        assert param.grad is None, name
    for i in set(range(NUM_LAYERS)) - {skipped}:
        for name, param in layers[i].named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"layer {i} {name}"
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_the_model_is_restored_after_the_block_also_when_it_raises(model):
    before = logits(model)
    layers = model.model.layers
    keys = list(model.state_dict())
    with skip_layers(model, [0, 2]):
        assert model.config.use_cache is False
        assert len(list(model.model.layers.parameters())) < len(list(layers.parameters()))
    assert model.model.layers is layers and model.config.use_cache is True
    assert torch.equal(logits(model), before)

    with pytest.raises(RuntimeError, match="boom"):
        with skip_layers(model, [1]):
            raise RuntimeError("boom")
    assert model.model.layers is layers and model.config.use_cache is True
    assert list(model.state_dict()) == keys
    assert torch.equal(logits(model), before)


def test_skipping_nothing_changes_nothing(model):
    before = logits(model)
    with skip_layers(model, ()):
        assert torch.equal(logits(model), before)


def test_works_through_a_peft_lora_wrapper(model):
    wrapped, space = build_space(model, ScopeConfig(kind="lora", lora_rank=4))
    space.apply(3, 1e-1)  # B != 0, so the adapters change the function and get A-gradients
    found = find_decoder_layers(wrapped)
    assert found.path == "model.layers" and len(found) == NUM_LAYERS

    expected = logits(without_layers(wrapped, {2}))
    with skip_layers(wrapped, {2}):
        got = logits(wrapped)
        batch = inputs()
        loss = wrapped(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    loss.backward()
    lora = {n: p for n, p in wrapped.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    for name, param in lora.items():
        if ".layers.2." in name:
            assert param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_sliding_window_layer_types_stay_with_their_layers():
    # Qwen2 picks each layer's mask by its position in config.layer_types: skipping must
    # keep every kept layer at its own index (a compacted list would shift the types).
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=2,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        qwen = Qwen2ForCausalLM(config).eval()
    removed = {1}
    expected = logits(without_layers(qwen, removed))
    with skip_layers(qwen, removed):
        got = logits(qwen)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_bad_models_indices_nesting_and_caches_are_refused(model):
    with pytest.raises(LayerDropoutError, match="num_hidden_layers"):
        find_decoder_layers(nn.Linear(2, 2))
    with pytest.raises(LayerDropoutError, match="not an index"):
        with skip_layers(model, [NUM_LAYERS]):
            pass
    with pytest.raises(LayerDropoutError, match="not an index"):
        with skip_layers(model, [-1]):
            pass
    with skip_layers(model, [0]):
        with pytest.raises(LayerDropoutError, match="does not nest"):
            with skip_layers(model, [1]):
                pass
        with pytest.raises(LayerDropoutError, match="KV cache"):
            model(**inputs(), use_cache=True)
    assert model.model.layers[0].__class__.__name__ == "LlamaDecoderLayer"


def binomial_tolerance(p: float, n: int, sigmas: float = 5.0) -> float:
    """``sigmas`` standard deviations of a rate estimated from ``n`` Bernoulli(p) draws.

    The count of skips of a layer over n independent steps is Binomial(n, p), so its rate
    has standard deviation sqrt(p (1 - p) / n); a correct sampler lands outside 5 of them
    with probability below 1e-6 per layer (normal approximation, n p (1 - p) >> 1 here).
    """
    return sigmas * math.sqrt(p * (1.0 - p) / n)


def test_sampler_skip_rates_match_the_probabilities():
    probabilities = [0.0, 0.1, 0.5, 0.9, 0.3]
    n = 20_000
    generator = random.Random(1234)
    draws = [set(sample_skipped(probabilities, generator, min_kept=0)) for _ in range(n)]
    for layer, p in enumerate(probabilities):
        rate = sum(layer in d for d in draws) / n
        assert abs(rate - p) <= binomial_tolerance(p, n), (layer, rate, p)
    assert not any(0 in d for d in draws)  # p = 0 is never skipped
    # Independence: a pair is skipped together at the product of its rates.
    joint = sum({2, 3} <= d for d in draws) / n
    assert abs(joint - 0.45) <= binomial_tolerance(0.45, n)


def test_sampler_is_reproducible_and_keeps_the_least_droppable_layer():
    probabilities = [0.99, 0.95, 0.99]
    free = [sample_skipped(probabilities, g, min_kept=0) for g in [random.Random(7)] for _ in range(500)]
    again = [sample_skipped(probabilities, g, min_kept=0) for g in [random.Random(7)] for _ in range(500)]
    assert free == again
    kept = [sample_skipped(probabilities, g) for g in [random.Random(7)] for _ in range(500)]
    assert (0, 1, 2) in free  # the rule had something to do
    for unconstrained, constrained in zip(free, kept):
        if unconstrained == (0, 1, 2):
            assert constrained == (0, 2)  # layer 1 has the lowest drop probability
        else:
            assert constrained == unconstrained
    with pytest.raises(LayerDropoutError, match="min_kept"):
        sample_skipped(probabilities, random.Random(0), min_kept=4)


@pytest.mark.parametrize("bad", [[1.0], [-0.1], [float("nan")], [], [0.5, "x"]])
def test_sampler_refuses_bad_probabilities(bad):
    with pytest.raises(LayerDropoutError, match="drop_probabilities"):
        sample_skipped(bad, random.Random(0))


@pytest.mark.parametrize("profile", ["uniform", "linear"])
@pytest.mark.parametrize("num_layers", [1, 2, 7, 32])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99])
def test_layer_probabilities_have_the_ratio_as_mean_and_stay_probabilities(ratio, num_layers, profile):
    probabilities = layer_probabilities(ratio, num_layers, profile)
    assert len(probabilities) == num_layers
    assert sum(probabilities) / num_layers == pytest.approx(ratio, abs=1e-12)
    assert all(0.0 <= p < 1.0 for p in probabilities)
    sample_skipped(probabilities, random.Random(0))  # accepted by the sampler
    if profile == "linear" and num_layers > 1 and ratio > 0:
        assert all(a < b for a, b in zip(probabilities, probabilities[1:]))  # deeper drops more


@pytest.mark.parametrize("profile", ["uniform", "linear"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_kept_end_layers_are_never_dropped_and_the_others_carry_the_ratio(ratio, profile):
    probabilities = layer_probabilities(ratio, 30, profile, keep_first=2, keep_last=1)
    assert probabilities[:2] == (0.0, 0.0) and probabilities[-1] == 0.0
    assert all(p > 0 for p in probabilities[2:-1])
    assert sum(probabilities) / 30 == pytest.approx(ratio, abs=1e-12)  # the same expected drops
    for seed in range(50):
        skipped = sample_skipped(probabilities, random.Random(seed))
        assert not {0, 1, 29} & set(skipped)


def test_a_ratio_the_middle_layers_cannot_carry_is_capped_and_ends_may_cover_everything():
    capped = layer_probabilities(0.9, 10, keep_first=2, keep_last=2)
    assert capped == (0.0, 0.0) + (0.95,) * 6 + (0.0, 0.0)  # 0.9 * 10 / 6 > 0.95
    assert layer_probabilities(0.5, 3, keep_first=2, keep_last=1) == (0.0, 0.0, 0.0)
    with pytest.raises(LayerDropoutError, match="keep_first"):
        layer_probabilities(0.5, 4, keep_first=-1)


def test_linear_profile_is_the_steepest_ramp():
    assert layer_probabilities(0.25, 2, "linear") == pytest.approx((0.125, 0.375))
    assert layer_probabilities(0.75, 2, "linear") == pytest.approx((0.625, 0.875))
    with pytest.raises(LayerDropoutError, match="profile"):
        layer_probabilities(0.5, 4, "cosine")
    with pytest.raises(LayerDropoutError, match="ratio"):
        layer_probabilities(1.0, 4)
    with pytest.raises(LayerDropoutError, match="num_layers"):
        layer_probabilities(0.5, 0)
