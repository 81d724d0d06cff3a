"""The analytic memory model (profiles.estimator) and one measured check of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    # A MeZO step costs a forward plus the compiled perturbation kernel, nothing that
    # grows with the model or the batch.
    assert total["forward"] <= total["mezo"] <= 1.15 * total["forward"]
    # AdamW adds exactly its two float32 moments.
    assert total["adamw"] - total["sgd"] == 2 * 4 * smollm2.param_count


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
    # The counted hidden rows are 16-bit; the chunk of logits and its log_softmax are
    # float32 either way (the 16-bit head output is freed by ``.float()``).
    rows = 4 * 32  # counted rows (the response half, < chunk_tokens)
    assert half.breakdown["logits_loss"] == rows * 64 * 2 + 2 * rows * 1000 * 4
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
# AdamW step, was added: block -1%, adamw +2%, forward +18%). 25% leaves room for
# run-to-run noise of the interpreter baseline (a few MiB) while still failing if any
# term (logits copies, saved activations, optimizer state) were off by a factor. The
# issue's 15% target on the real model is checked by bench/memory_model.py.
TOLERANCE = 0.25


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


@pytest.mark.parametrize("mode", ["forward", "adamw", "block"])
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
    assert abs(error) <= TOLERANCE, json.dumps(
        {"mode": mode, "measured_MiB": measured / 2**20, "estimated_MiB": est.total_mib,
         "breakdown_MiB": {k: v / 2**20 for k, v in est.breakdown.items()}})
