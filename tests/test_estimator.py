"""The analytic memory model (profiles.estimator) and one measured check of it."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from profiles.estimator import (
    BREAKDOWN_KEYS,
    MODES,
    ModelShape,
    dropout_kept_layers,
    emulator_kept_layers,
    estimate,
    lora_param_count,
    quantised_linear_bytes,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

SMOLLM2_CONFIG = {
    "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
    "head_dim": 64, "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def smollm2() -> ModelShape:
    return ModelShape.from_hf_config(SMOLLM2_CONFIG)


def test_from_hf_config_counts_llama_parameters(smollm2):
    # SmolLM2-135M as model.num_parameters() reports it (tied embeddings once).
    assert smollm2.param_count == 134_515_008
    assert (smollm2.q_dim, smollm2.kv_dim) == (576, 192)
    assert smollm2.tied_embeddings
    explicit = ModelShape.from_hf_config(SMOLLM2_CONFIG, num_parameters=123)
    assert explicit.param_count == 123


def test_from_hf_config_defaults_and_missing_keys():
    config = {k: v for k, v in SMOLLM2_CONFIG.items() if k not in ("head_dim",
                                                                  "num_key_value_heads")}
    shape = ModelShape.from_hf_config(config)
    assert shape.kv_heads == shape.heads and shape.head_dim == 64
    with pytest.raises(ValueError, match="vocab_size"):
        ModelShape.from_hf_config({"hidden_size": 8})


@pytest.mark.parametrize("mode", MODES)
def test_breakdown_sums_to_total(smollm2, mode):
    est = estimate(smollm2, mode, batch=4, seq_len=128)
    assert set(est.breakdown) == set(BREAKDOWN_KEYS)
    assert sum(est.breakdown.values()) == est.total
    assert all(v >= 0 for v in est.breakdown.values())
    if mode == "emulator":  # half the layers, quantised: far less than the float32 model
        assert est.breakdown["weights"] < smollm2.param_count * 4 // 4
    else:
        assert est.breakdown["weights"] == smollm2.param_count * 4


@pytest.mark.parametrize("mode", MODES)
def test_monotone_in_batch_and_seq_len(smollm2, mode):
    totals = [estimate(smollm2, mode, batch=b, seq_len=t).total
              for b, t in ((1, 64), (2, 64), (2, 128), (8, 128), (8, 512))]
    assert totals == sorted(totals)
    assert totals[-1] > totals[0]


@pytest.mark.parametrize("setting", [(1, 32), (4, 128), (8, 256), (16, 1024)])
def test_mode_order(smollm2, setting):
    b, t = setting
    total = {m: estimate(smollm2, m, batch=b, seq_len=t).total for m in MODES}
    assert total["adamw"] > total["sgd"] > total["forward"]
    # What MeZO and AdamW cost beyond a forward / an SGD step is checked against real
    # torch below: the optimizer state against a real AdamW's (an independent count),
    # MeZO's whole peak against a measured one in a fresh process.


def test_lora_scope_is_cheaper_for_first_order(smollm2):
    full = estimate(smollm2, "adamw", batch=4, seq_len=128)
    lora = estimate(smollm2, "adamw", batch=4, seq_len=128, scope="lora", lora_rank=8)
    assert lora.total < full.total
    assert 0 < lora.breakdown["trainable_copy"] < full.breakdown["weights"] // 100
    half = estimate(smollm2, "forward", batch=4, seq_len=128, scope="lora", base_dtype_bytes=2)
    assert half.breakdown["weights"] == smollm2.param_count * 2


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"mode": "lbfgs"}, "mode"),
    ({"batch": 0}, "batch"),
    ({"batch": 2.5}, "batch"),
    ({"seq_len": -1}, "seq_len"),
    ({"scope": "half"}, "scope"),
    ({"chunk_tokens": 0}, "chunk_tokens"),
    ({"base_dtype_bytes": 3}, "base_dtype_bytes"),
    ({"base_dtype_bytes": 2}, "base_dtype_bytes"),  # full scope needs fp32
])
def test_bad_arguments_name_the_argument(smollm2, kwargs, name):
    args = {"mode": "forward", "batch": 4, "seq_len": 128, **kwargs}
    mode = args.pop("mode")
    with pytest.raises(ValueError, match=name):
        estimate(smollm2, mode, **args)


# -- the layered modes (dropout, block, emulator) and the top_layers scope -----------

# A tiny Llama: 8 layers, GQA, tied embeddings (the shape arithmetic is all that matters).
TINY_LLAMA = ModelShape.from_hf_config({
    "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 176, "tie_word_embeddings": True,
})
# The variants of every mode the tests walk over.
VARIANTS = [
    ("forward", {}), ("forward", {"scope": "lora", "base_dtype_bytes": 2}),
    ("mezo", {}), ("mezo", {"scope": "top_layers", "top_layers": 2}),
    ("sgd", {}), ("sgd", {"scope": "top_layers", "top_layers": 3}),
    ("adamw", {}), ("adamw", {"scope": "lora"}),
    ("adamw", {"scope": "top_layers", "top_layers": 1}),
    ("dropout", {}), ("dropout", {"scope": "lora"}),
    ("dropout", {"scope": "lora", "base_dtype_bytes": 2, "drop_ratio": 0.25}),
    ("block", {}), ("block", {"block_layers": 3}), ("block", {"scope": "lora"}),
    ("emulator", {}), ("emulator", {"base_bits": 8}), ("emulator", {"keep_ratio": 0.25}),
]


def _total(mode: str, batch: int = 4, seq_len: int = 64, shape: ModelShape = TINY_LLAMA,
           **kwargs) -> int:
    return estimate(shape, mode, batch=batch, seq_len=seq_len, **kwargs).total


@pytest.mark.parametrize(("mode", "kwargs"), VARIANTS)
def test_every_variant_breaks_down_into_non_negative_parts(mode, kwargs):
    est = estimate(TINY_LLAMA, mode, batch=2, seq_len=32, **kwargs)
    assert est.mode == mode
    assert tuple(est.breakdown) == BREAKDOWN_KEYS
    assert all(isinstance(v, int) and v >= 0 for v in est.breakdown.values())
    assert sum(est.breakdown.values()) == est.total > 0
    assert est.breakdown["weights"] > 0 and est.breakdown["overhead"] > 0


@pytest.mark.parametrize(("mode", "kwargs"), VARIANTS)
def test_every_variant_grows_with_batch_and_seq_len(mode, kwargs):
    totals = [_total(mode, b, t, **kwargs) for b, t in ((1, 16), (2, 16), (2, 64), (8, 64),
                                                         (8, 256))]
    assert totals == sorted(totals)
    assert totals[-1] > totals[0]


def test_dropout_gets_cheaper_as_more_layers_are_dropped():
    for scope in ("lora", "full"):
        totals = [_total("dropout", scope=scope, drop_ratio=p)
                  for p in (0.0, 0.125, 0.25, 0.5, 0.75, 0.875)]
        assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    none = estimate(TINY_LLAMA, "dropout", batch=4, seq_len=64, scope="lora", drop_ratio=0.0)
    half = estimate(TINY_LLAMA, "dropout", batch=4, seq_len=64, scope="lora", drop_ratio=0.5)
    # Dropping layers saves activations (and gradients) only: every weight stays
    # resident, and AdamW's moments cover every adapter.
    assert none.breakdown["weights"] == half.breakdown["weights"]
    assert none.breakdown["optimizer_state"] == half.breakdown["optimizer_state"]
    assert half.breakdown["activations"] < none.breakdown["activations"]


def test_dropout_kept_layers():
    assert dropout_kept_layers(30, 0.5) == 15
    assert dropout_kept_layers(30, 0.0) == 30
    assert dropout_kept_layers(10, 0.7) == 3  # not 4 from 3.0000000000000004
    assert dropout_kept_layers(8, 0.99) == 1
    assert dropout_kept_layers(7, 0.5) == 4  # ceil


def test_block_is_cheaper_than_adamw_and_grows_with_the_block():
    full = estimate(TINY_LLAMA, "adamw", batch=4, seq_len=64)
    block = estimate(TINY_LLAMA, "block", batch=4, seq_len=64)
    assert block.total < full.total
    # Moments only for the block: one layer's parameters.
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64  # q, o; k, v; MLP; norms
    assert block.breakdown["optimizer_state"] == 2 * 4 * layer
    assert block.breakdown["weights"] == full.breakdown["weights"]
    assert block.breakdown["activations"] < full.breakdown["activations"]
    totals = [_total("block", block_layers=k) for k in range(1, 9)]
    assert totals == sorted(totals)
    assert _total("block", scope="lora") < block.total


def test_emulator_4_bit_is_cheaper_than_8_bit_than_a_16_bit_base(smollm2):
    # Where the weights dominate (one short row), the whole peak is ordered.
    four, eight, sixteen = (estimate(TINY_LLAMA, "emulator", batch=1, seq_len=8, base_bits=b)
                            for b in (4, 8, 16))
    assert four.total < eight.total < sixteen.total
    # And every emulator is cheaper than LoRA over the whole 16-bit model.
    for b in (4, 8, 16):
        assert (_total("emulator", 1, 64, smollm2, base_bits=b)
                < _total("adamw", 1, 64, smollm2, scope="lora", base_dtype_bytes=2))
    # At any size the weights are; bitsandbytes' 8-bit matmul keeps its 16-bit input for
    # backward (the 4-bit one and a frozen nn.Linear do not), so at larger batches the
    # 8-bit emulator's activations outgrow its weight saving.
    four, eight, sixteen = (estimate(TINY_LLAMA, "emulator", batch=4, seq_len=64, base_bits=b)
                            for b in (4, 8, 16))
    assert four.breakdown["weights"] < eight.breakdown["weights"] < sixteen.breakdown["weights"]
    assert four.breakdown["activations"] == sixteen.breakdown["activations"]
    assert eight.breakdown["activations"] > four.breakdown["activations"]
    assert four.total < eight.total and four.total < sixteen.total
    # Only the kept layers' adapters train.
    kept = len(emulator_kept_layers(8, 0.5))
    assert four.breakdown["trainable_copy"] == 4 * lora_param_count(TINY_LLAMA, 8) * kept // 8
    # Keeping fewer layers is cheaper.
    assert _total("emulator", keep_ratio=0.25) < four.total


def test_edgefeds_emulator_keeps_activations_and_adapters_only_on_its_adapter_layers():
    # TINY_LLAMA: 8 layers; keep_ratio 0.5 keeps 4, the top 2 of them the float32 adapter.
    layout = dict(batch=4, seq_len=64, keep_ratio=0.5, adapter_layers=2)
    sgd = estimate(TINY_LLAMA, "emulator", optimizer="sgd", **layout)
    adamw = estimate(TINY_LLAMA, "emulator", **layout)
    every = estimate(TINY_LLAMA, "emulator", batch=4, seq_len=64, keep_ratio=0.5)  # all 4 kept layers adapted
    # Adapters (and with AdamW their two moments) on 2 of the 8 layers only; SGD keeps none.
    adapters = lora_param_count(TINY_LLAMA, 8) * 2 // 8
    assert sgd.breakdown["trainable_copy"] == adamw.breakdown["trainable_copy"] == 4 * adapters
    assert sgd.breakdown["optimizer_state"] == 0 and adamw.breakdown["optimizer_state"] == 2 * 4 * adapters
    # No gradient goes below the adapter layers: the quantised layers keep nothing for
    # backward, so two adapted float32 layers keep less than four adapted 16-bit ones.
    assert 0 < sgd.breakdown["activations"] < every.breakdown["activations"]
    two = estimate(TINY_LLAMA, "emulator", optimizer="sgd", **{**layout, "adapter_layers": 1})
    assert two.breakdown["activations"] < sgd.breakdown["activations"]
    # The adapter layers are float32 and unquantised: 8 bits below them cost more than 4,
    # and a third adapter layer costs a float32 layer instead of a quantised one.
    eight = estimate(TINY_LLAMA, "emulator", optimizer="sgd", base_bits=8, **layout)
    assert sgd.breakdown["weights"] < eight.breakdown["weights"]
    three = estimate(TINY_LLAMA, "emulator", optimizer="sgd", **{**layout, "adapter_layers": 3})
    assert three.breakdown["weights"] > sgd.breakdown["weights"]
    with pytest.raises(ValueError, match="adapter_layers is only used by mode 'emulator'"):
        estimate(TINY_LLAMA, "adamw", batch=1, seq_len=8, adapter_layers=2)
    with pytest.raises(ValueError, match="optimizer must be 'adamw', 'sgd' or 'zo'"):
        estimate(TINY_LLAMA, "emulator", batch=1, seq_len=8, optimizer="lion")


def test_the_emulators_zeroth_order_step_holds_its_weights_and_a_forward_only():
    layout = dict(batch=4, seq_len=64, keep_ratio=0.5, adapter_layers=2)
    sgd = estimate(TINY_LLAMA, "emulator", optimizer="sgd", **layout)
    zo = estimate(TINY_LLAMA, "emulator", optimizer="zo", **layout)
    # The same emulator in memory, adapters included ...
    assert zo.breakdown["weights"] == sgd.breakdown["weights"]
    assert zo.breakdown["trainable_copy"] == sgd.breakdown["trainable_copy"]
    # ... but no gradients, no kept activations and our chunked loss instead of HF's logits.
    assert zo.breakdown["gradients"] == zo.breakdown["optimizer_state"] == 0
    assert zo.breakdown["logits_loss"] < sgd.breakdown["logits_loss"]
    assert zo.total < sgd.total
    # Its transients are a forward's: the same as MeZO's full-model forward over float32.
    mezo = estimate(TINY_LLAMA, "mezo", batch=4, seq_len=64, scope="lora")
    assert zo.breakdown["activations"] == mezo.breakdown["activations"]
    assert zo.breakdown["logits_loss"] == mezo.breakdown["logits_loss"]
    assert estimate(TINY_LLAMA, "emulator", optimizer="zo", **{**layout, "batch": 8}).total > zo.total
    with pytest.raises(ValueError, match="optimizer 'zo' is the emulator's zeroth-order step"):
        estimate(TINY_LLAMA, "emulator", batch=1, seq_len=8, optimizer="zo")


def test_quantised_weight_bytes():
    # 4-bit: half a byte per element + a uint8 absmax per 64 + a float32 per 256 absmax +
    # the 256-entry float32 code of the second quantisation.
    assert quantised_linear_bytes(128, 128, 4) == 8192 + 256 + 4 * 1 + 1024
    assert quantised_linear_bytes(128, 128, 8) == 16384 + 4 * 128
    assert quantised_linear_bytes(128, 128, 16) == 2 * 16384


def test_emulator_kept_layers_keep_the_first_and_the_last():
    assert emulator_kept_layers(30, 0.5) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert emulator_kept_layers(8, 1.0) == list(range(8))
    assert emulator_kept_layers(8, 0.1) == [0, 7]
    assert emulator_kept_layers(1, 0.5) == [0]


def test_top_layers_scope_trains_and_keeps_activations_of_the_top_layers_only():
    full = estimate(TINY_LLAMA, "adamw", batch=4, seq_len=64)
    tops = [estimate(TINY_LLAMA, "adamw", batch=4, seq_len=64, scope="top_layers", top_layers=k)
            for k in range(1, 9)]
    assert [t.total for t in tops] == sorted(t.total for t in tops)
    assert tops[-1].total < full.total  # all 8 layers, but the embedding/head stays frozen
    assert tops[0].breakdown["weights"] == full.breakdown["weights"]
    assert [t.breakdown["activations"] for t in tops] == sorted(
        t.breakdown["activations"] for t in tops)
    # Forward / mezo do not care which layers train (beyond the kernel threshold).
    assert _total("forward", scope="top_layers", top_layers=2) == _total("forward")


@pytest.mark.parametrize("mode", ["forward", "mezo"])
def test_a_16_bit_lora_base_halves_weights_and_activations_not_the_float32_head(mode):
    fp32 = estimate(TINY_LLAMA, mode, batch=4, seq_len=64, scope="lora")
    half = estimate(TINY_LLAMA, mode, batch=4, seq_len=64, scope="lora", base_dtype_bytes=2)
    assert half.breakdown["weights"] * 2 == fp32.breakdown["weights"]
    assert half.breakdown["trainable_copy"] == fp32.breakdown["trainable_copy"]  # float32
    assert half.breakdown["activations"] * 2 == fp32.breakdown["activations"]
    # The counted hidden rows are 16-bit; the chunk of logits is float32 either way (its
    # log-softmax is taken in place), and over a 16-bit base the 16-bit head output and
    # its float32 copy coexist while ``.float()`` runs.
    rows = 4 * 32  # counted rows (the response half, < chunk_tokens)
    assert half.breakdown["logits_loss"] == rows * 64 * 2 + rows * 1000 * (4 + 2)
    assert fp32.breakdown["logits_loss"] == rows * 64 * 4 + rows * 1000 * 4
    assert half.total < fp32.total


@pytest.mark.parametrize(("mode", "kwargs", "name"), [
    ("dropout", {"drop_ratio": 1.0}, "drop_ratio"),
    ("dropout", {"drop_ratio": -0.1}, "drop_ratio"),
    ("dropout", {"drop_ratio": "half"}, "drop_ratio"),
    ("emulator", {"base_bits": 3}, "base_bits"),
    ("emulator", {"base_bits": 32}, "base_bits"),
    ("emulator", {"keep_ratio": 0.0}, "keep_ratio"),
    ("emulator", {"keep_ratio": 1.5}, "keep_ratio"),
    ("block", {"block_layers": 9}, "block_layers"),
    ("block", {"block_layers": 0}, "block_layers"),
    ("adamw", {"scope": "top_layers", "top_layers": 9}, "top_layers"),
    ("adamw", {"scope": "top_layers", "top_layers": 0}, "top_layers"),
    ("adamw", {"scope": "top_layers"}, "top_layers"),
    ("adamw", {"top_layers": 2}, "top_layers"),  # without scope="top_layers"
    ("sgd", {"scope": "top_layers", "top_layers": 2, "base_dtype_bytes": 2}, "base_dtype_bytes"),
    ("dropout", {"scope": "full", "base_dtype_bytes": 2}, "base_dtype_bytes"),
    ("dropout", {"scope": "top_layers", "top_layers": 2}, "scope"),
    ("block", {"scope": "top_layers", "top_layers": 2}, "scope"),
])
def test_bad_arguments_of_the_new_modes_name_the_argument(mode, kwargs, name):
    with pytest.raises(ValueError, match=name):
        estimate(TINY_LLAMA, mode, batch=2, seq_len=16, **kwargs)


def test_estimator_does_not_import_torch():
    code = ("import sys; import profiles.estimator; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT)
    assert done.returncode == 0


# -- counts against real torch objects (in this process: tiny models, a few ms) -------

# The shape of TINY_LLAMA as a Hugging Face config, for building the real model.
TINY_LLAMA_CONFIG = {
    "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 176, "tie_word_embeddings": True,
}


def _real_llama(config: dict[str, Any]) -> Any:
    """A real ``LlamaForCausalLM`` (float32, fixed seed) of that config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)


@pytest.mark.parametrize("overrides", [
    {}, {"tie_word_embeddings": False},
    {"head_dim": 32},  # heads x head_dim (128) differs from the hidden size (64)
    {"num_key_value_heads": 4},  # no grouped-query attention
])
def test_the_llama_parameter_count_matches_a_real_model(overrides):
    config = {**TINY_LLAMA_CONFIG, **overrides}
    model = _real_llama(config)
    assert ModelShape.from_hf_config(config).param_count == model.num_parameters()


def _trainable_after_setup(model: Any, mode: str, kwargs: dict[str, Any]
                           ) -> tuple[Any, list[Any]]:
    """Marks what ``mode`` with ``kwargs`` trains on a real model, as the profiler's child
    does (peft LoRA on q_proj / v_proj for the lora scope); returns the model (wrapped by
    peft for LoRA) and the parameters that train."""
    scope = kwargs.get("scope", "full")
    layers = model.model.layers
    if scope == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=kwargs.get("lora_rank", 8), lora_alpha=16,
                                                 target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, bias="none"))
        if mode == "block":  # only the block's adapters train
            block = {id(p) for layer in layers[: kwargs["block_layers"]]
                     for p in layer.parameters()}
            for name, param in model.named_parameters():
                param.requires_grad_("lora_" in name and id(param) in block)
    elif mode == "block":
        model.requires_grad_(False)
        for layer in layers[: kwargs["block_layers"]]:
            layer.requires_grad_(True)
    elif scope == "top_layers":
        model.requires_grad_(False)
        for layer in layers[-kwargs["top_layers"]:]:
            layer.requires_grad_(True)
        model.model.norm.requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad]


def _tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(("mode", "kwargs"), [
    ("sgd", {}),
    ("adamw", {}),
    ("adamw", {"scope": "lora"}),
    ("adamw", {"scope": "lora", "lora_rank": 4}),
    ("sgd", {"scope": "top_layers", "top_layers": 2}),
    ("adamw", {"scope": "top_layers", "top_layers": 3}),
    ("block", {"block_layers": 1}),
    ("block", {"block_layers": 3}),
    ("block", {"scope": "lora", "block_layers": 2}),
])
def test_optimizer_state_and_adapters_match_a_real_training_step(mode, kwargs):
    """One real step of torch's optimizer (SGD for sgd, AdamW otherwise) on the trainable
    parameters; the bytes of its state, of the LoRA adapters and of the weights are
    counted from the tensors, not from the estimator's formulas."""
    import torch

    model, trainable = _trainable_after_setup(_real_llama(TINY_LLAMA_CONFIG), mode, kwargs)
    optimizer = (torch.optim.SGD(trainable, lr=1e-3) if mode == "sgd"
                 else torch.optim.AdamW(trainable, lr=1e-3))
    ids = torch.randint(0, TINY_LLAMA_CONFIG["vocab_size"], (2, 16),
                        generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    est = estimate(TINY_LLAMA, mode, batch=2, seq_len=16, **kwargs)
    # Per-element state only: torch also keeps a 0-d step counter per parameter tensor
    # (4 bytes each), which the estimate leaves out.
    state_bytes = _tensor_bytes(t for state in optimizer.state.values() for t in state.values()
                                if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert est.breakdown["optimizer_state"] == state_bytes
    named = list(model.named_parameters())
    adapters = _tensor_bytes(p for name, p in named if "lora_" in name)
    base = _tensor_bytes({id(p): p for name, p in named if "lora_" not in name}.values())
    assert est.breakdown["trainable_copy"] == adapters
    assert est.breakdown["weights"] == base


# -- one measured check ------------------------------------------------------------

# A random Llama big enough that the model's memory dominates the run-to-run noise of
# the interpreter (tens of MiB): 20.6M parameters (83 MB), vocab 16384 so that the
# logits terms matter as they do for SmolLM2.
TINY = {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4,
        "intermediate_size": 1376, "vocab_size": 16384}
# The estimate must be within 25% of the measured peak. The fixed runtime overhead
# constants (60 MiB) were fitted on SmolLM2-135M, where they are 1-9% of the peak; here
# they are 11-38% of it, and this smaller model's real runtime residual is ~40 MiB, so
# a ~20 MiB absolute miss is a 13% relative one for the forward (observed when this
# test was written: forward +13%, mezo -7%, sgd 0%, adamw +3%; when block, layer 0's
# AdamW step, was added: block -1%, adamw +2%, forward +18%; when mezo came back:
# forward +14%, mezo -2%, +6%, +9%). 25% leaves room for run-to-run noise of the
# interpreter baseline (a few MiB) while still failing if any term (logits copies, saved
# activations, optimizer state) were off by a factor. mezo, the mode that ships, has no
# first-order terms and gets 15%: it must fail if the step held anything the size of
# the weights (79 MB here: a copy of them, or gradients). Checked by holding a clone of
# the parameters through the step in the profiler's child: measured 312 MiB against the
# estimate's 230, an error of -26%, which 25% would let through on a noisy run. The
# issue's 15% target on the real model is checked by bench/memory_model.py.
TOLERANCE = 0.25
TOLERANCE_BY_MODE = {"mezo": 0.15}


def _write_tiny(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_client.tiny import make_byte_tokenizer

    config = LlamaConfig(
        vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"],
        intermediate_size=TINY["intermediate_size"], num_hidden_layers=TINY["num_layers"],
        num_attention_heads=TINY["num_heads"], num_key_value_heads=TINY["num_kv_heads"],
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=256, bos_token_id=257, eos_token_id=258)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    make_byte_tokenizer(256).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("mode", ["forward", "mezo", "adamw", "block"])
def test_estimate_matches_measurement_on_a_small_llama(tmp_path_factory, mode):
    from profiles.profiler import run_child

    directory = tmp_path_factory.getbasetemp() / "estimator-llama"
    if not (directory / "config.json").is_file():
        _write_tiny(directory)
    batch, seq_len = 4, 128
    child = run_child(mode, str(directory), batch, seq_len, ops=2)
    shape = ModelShape.from_hf_config(child["config"], num_parameters=child["num_parameters"])
    est = estimate(shape, mode, batch=batch, seq_len=seq_len)
    measured = child["measured_bytes"]
    error = (est.total - measured) / measured
    assert abs(error) <= TOLERANCE_BY_MODE.get(mode, TOLERANCE), json.dumps(
        {"mode": mode, "measured_MiB": measured / 2**20, "estimated_MiB": est.total_mib,
         "breakdown_MiB": {k: v / 2**20 for k, v in est.breakdown.items()}})


# -- the profiler outside the repository ---------------------------------------------


def test_the_profiler_runs_from_an_installed_copy_outside_the_repository(tmp_path):
    """What pip installs (the packages pyproject.toml lists, without bench/ or tests/),
    run from an unrelated directory: ``--help``, and a real profile of one mezo step."""
    from edge_client.tiny import make_tiny_llama

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    site = tmp_path / "site-packages"
    for init in REPO_ROOT.glob("*/__init__.py"):
        if any(fnmatch.fnmatch(init.parent.name, pattern) for pattern in patterns):
            shutil.copytree(init.parent, site / init.parent.name,
                            ignore=shutil.ignore_patterns("__pycache__"))
    model = make_tiny_llama(tmp_path / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)

    # The copy, not the repository (an editable install must not shadow it).
    where = run("-c", "import profiles.profiler as p; print(p.__file__)")
    assert where.stdout.strip() == str(site / "profiles" / "profiler.py"), where.stderr
    shown = run("-m", "profiles.profiler", "--help")
    assert shown.returncode == 0 and "--modes" in shown.stdout, shown.stderr
    done = run("-m", "profiles.profiler", "--model", str(model), "--modes", "mezo",
               "--batch", "1", "--seq-len", "8", "--ops", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (entry,) = result["profiles"]
    assert entry["mode"] == "mezo" and entry["measured_bytes"] > 0


def test_a_model_the_profiler_cannot_load_is_one_line(capsys):
    from profiles.profiler import main

    assert main(["--model", "/nonexistent/model", "--modes", "forward", "--batch", "1",
                 "--seq-len", "8", "--ops", "1"]) == 2
    err = capsys.readouterr().err
    assert "profiler: error: --model: model source '/nonexistent/model' does not exist" in err
    assert "Traceback" not in err


# -- bench/memory_model.py (the benchmark of this model; not run at full size here) ----


def _memory_model_module() -> Any:
    spec = importlib.util.spec_from_file_location("memory_model",
                                                  REPO_ROOT / "bench" / "memory_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("args", "message"), [
    (["--settings", "4y128"], "--settings: expected BATCHxSEQ_LEN, got '4y128'"),
    (["--settings", "0x128"], "--settings: the batch must be >= 1"),
    (["--modes", "dropout:full+bf16"], "--modes: dropout: a bfloat16 base needs the lora scope"),
])
def test_the_memory_benchmark_refuses_bad_arguments_in_one_line(args, message):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "memory_model.py"), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_the_memory_benchmark_saves_its_summary_and_every_profile(tmp_path, monkeypatch, capsys):
    """The write path of bench/memory_model.py, with the profiler replaced by a stand-in
    (the real one takes 13 minutes): the summary it prints and every setting's whole
    profile go to bench/_results.write_result("memory_model", ...)."""
    memory_model = _memory_model_module()
    profiled: list[tuple[int, int]] = []

    def fake_profile(model: str, batch: int, seq_len: int, modes: list[str]) -> dict:
        profiled.append((batch, seq_len))
        row = {"mode": "mezo", "label": "mezo", "batch": batch, "seq_len": seq_len,
               "measured_bytes": 100 * 2**20, "estimated_bytes": 90 * 2**20,
               "rel_error": -0.1, "step_seconds": 1.0, "breakdown": {"weights": 1}}
        return {"model": model, "torch": "t", "transformers": "tf", "profiles": [row],
                "unmeasured": []}

    saved: dict[str, Any] = {}

    def fake_write_result(name: str, result: dict, details: dict) -> Path:
        saved.update(name=name, result=result, details=details)
        return tmp_path / f"{name}.json"

    monkeypatch.setattr(memory_model, "profile", fake_profile)
    monkeypatch.setattr(memory_model, "write_result", fake_write_result)
    assert memory_model.main(["--model", "tiny", "--settings", "1x8,2x16", "--modes", "mezo",
                              "--out-dir", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert profiled == [(1, 8), (2, 16)]
    assert saved["name"] == "memory_model" and saved["result"] == printed
    assert printed["max_rel_error"] == 0.1 and printed["settings"] == ["1x8", "2x16"]
    assert set(saved["details"]["profiles"]) == {"1x8", "2x16"}
    assert saved["details"]["profiles"]["2x16"]["profiles"][0]["breakdown"] == {"weights": 1}
    assert (tmp_path / "cpu-tiny-b2-t16.json").is_file()
