"""The analytic memory model (profiles.estimator) and one measured check of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from profiles.estimator import BREAKDOWN_KEYS, MODES, ModelShape, estimate

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
# test was written: forward +13%, mezo -7%, sgd 0%, adamw +3%). 25% leaves room for
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


@pytest.mark.parametrize("mode", ["forward", "adamw"])
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
