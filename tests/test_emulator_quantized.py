"""The FedBiOT emulator loaded with its frozen part quantised by bitsandbytes (nf4, int8).

On a tiny untied Llama of 8 layers: the emulator keeps layers (0, 3, 5) below a 2-layer
adapter, so emulator layers 0-2 are frozen (quantised) and 3-4 are the adapter (float32).
Where bitsandbytes cannot run a mode on this machine, the tests of a working load skip
with the probe's reason; the refusal tests run everywhere.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edge_client import emulator as emu
from edge_client import quantize
from edge_client.data import Record
from edge_client.emulator import (
    EmulatorLoadError,
    build_emulator,
    load_emulator,
    public_records,
    stored_weights_hash,
)
from edge_client.layer_dropout import find_decoder_layers
from edge_client.quantize import model_bytes, quantization_support, quantized_linears
from edge_client.tiny import make_tiny_llama
from profiles.estimator import quantised_linear_bytes

LAYERS = 8
ADAPTER = (3, 4)  # emulator indices of the adapter layers
FROZEN = (0, 1, 2)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BUILD = dict(steps=2, learning_rate=1e-3, batch_size=4, max_seq_len=48, seed=0, eval_records=4)

# Measured on this repository's CPU machine (bitsandbytes 0.50.2, torch 2.13.0+cpu):
# relative L2 distance of the quantised emulator's logits from the float32 emulator's,
# nf4 0.158 and int8 0.017 (random tiny weights, three quantised layers). The bounds
# leave about 2x / 3x room; a broken kernel is off by about 1.
LOGITS_VS_FLOAT32 = {"nf4": 0.3, "int8": 0.05}
# Against a float32 model holding the dequantised weights, the quantised model computes
# the same function: exactly so up to float32 rounding where bitsandbytes dequantises
# and multiplies in float32 (nf4 always, as prepare_quantized makes it; int8 in training
# mode), within int8's input quantisation for int8 in eval mode (LLM.int8() quantises
# the activations too: measured 0.012).
VS_DEQUANTISED = {("nf4", False): 1e-5, ("nf4", True): 1e-5, ("int8", False): 0.05,
                  ("int8", True): 1e-5}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


@pytest.fixture(autouse=True)
def _fresh_support_cache():
    quantization_support.cache_clear()
    yield
    quantization_support.cache_clear()


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return public_records()[:24]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, records: list[Record]):
    root = tmp_path_factory.mktemp("quantized")
    tiny = make_tiny_llama(root / "tiny", num_layers=LAYERS, tie_word_embeddings=False)
    out = root / "emu"
    manifest = build_emulator(tiny, out, records=records, adapter_layers=2, drop_ratio=0.5, **BUILD)
    assert manifest["emulator_adapter_layers"] == list(ADAPTER)
    return out, manifest


@pytest.fixture(scope="module")
def stored(built) -> dict[str, torch.Tensor]:
    return load_file(built[0] / "model.safetensors")


@pytest.fixture(scope="module")
def reference(built):
    model, _, _ = load_emulator(built[0])
    return model


def _supported_or_skip(quantization: str) -> None:
    ok, reason = quantization_support(quantization)
    if not ok:
        pytest.skip(reason)


def _load(built, quantization: str):
    _supported_or_skip(quantization)
    model, tokenizer, manifest = load_emulator(built[0], quantization=quantization)
    return model


def _dequantised_copy(quantised: nn.Module, reference: nn.Module) -> nn.Module:
    """The float32 emulator with each quantised weight replaced by its dequantised value."""
    import bitsandbytes as bnb

    model = copy.deepcopy(reference)
    with torch.no_grad():
        for path, module in quantized_linears(quantised):
            weight = module.weight
            if isinstance(module, bnb.nn.Linear4bit):
                value = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
            else:
                value = weight.data.float() * weight.SCB.float()[:, None] / 127.0
            model.get_submodule(path).weight.copy_(value.float())
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- support


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_support_is_one_line_and_cached(quantization: str, monkeypatch) -> None:
    ok, reason = quantization_support(quantization)
    assert isinstance(ok, bool) and reason and "\n" not in reason and quantization in reason
    if ok:
        assert reason.startswith("bitsandbytes ") and " runs " in reason
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(quantize, "_probe", lambda q, d: calls.append((q, d)) or (False, "x"))
    assert quantization_support(quantization) == (ok, reason)  # cached: no second probe
    assert quantization_support(quantization, "cpu") == (ok, reason)
    assert calls == []
    quantization_support.cache_clear()
    assert quantization_support(quantization) == (False, "x") and calls == [(quantization, "cpu")]


def test_support_refuses_without_bitsandbytes_or_device(monkeypatch) -> None:
    def no_bnb():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(quantize, "_bnb", no_bnb)
    for quantization in ("nf4", "int8"):
        ok, reason = quantization_support(quantization)
        assert not ok and "\n" not in reason
        assert "bitsandbytes cannot be imported" in reason and "No module named" in reason
    monkeypatch.undo()
    quantization_support.cache_clear()
    ok, reason = quantization_support("nf4", "no-such-device")
    assert not ok and "no-such-device" in reason and "\n" not in reason
    if not torch.cuda.is_available():
        ok, reason = quantization_support("int8", "cuda")
        assert not ok and "no CUDA device" in reason
    with pytest.raises(ValueError, match="fp8"):
        quantization_support("fp8")


def test_support_refuses_a_backend_that_loses_the_input_gradient(monkeypatch) -> None:
    _supported_or_skip("nf4")
    import bitsandbytes as bnb

    real = bnb.matmul_4bit
    # A forward that computes the right numbers but is cut off from autograd.
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: real(*a, **k).detach())
    quantization_support.cache_clear()
    ok, reason = quantization_support("nf4")
    assert not ok and "\n" not in reason and "cannot run nf4 on cpu" in reason


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
def test_support_catches_the_cpu_repack_that_drops_gradients(monkeypatch) -> None:
    """bitsandbytes' own fault, which prepare_quantized works around (see there)."""
    _supported_or_skip("nf4")
    import bitsandbytes as bnb

    if not getattr(bnb.nn.Linear4bit(64, 64), "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    monkeypatch.setattr(quantize, "prepare_quantized", lambda model: 0)
    quantization_support.cache_clear()
    ok, reason = quantization_support("nf4")
    assert not ok and "backward gives the input no gradient" in reason


def test_prepare_quantized_keeps_4bit_layers_off_the_cpu_repack() -> None:
    """Checked without running a kernel, so it holds even where the probe says no."""
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(bnb.nn.Linear4bit(64, 64, bias=False), nn.Linear(64, 64),
                          bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False))
    model[0].support_avx512bf16_for_cpu = True
    assert quantize.prepare_quantized(model) == 2
    assert model[0].support_avx512bf16_for_cpu is False


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_frozen_part_is_quantised_and_the_adapter_is_the_stored_float32(
        quantization: str, built, stored) -> None:
    import bitsandbytes as bnb

    model = _load(built, quantization)
    kind = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    layers = find_decoder_layers(model).layers
    assert len(layers) == len(built[1]["kept_layers"])
    for index in FROZEN:
        for name in PROJECTIONS:
            module = layers[index].get_submodule(name)
            assert isinstance(module, kind), (index, name, type(module))
            assert module.weight.dtype == (torch.uint8 if quantization == "nf4" else torch.int8)
    unquantised = {name for name, _ in model.named_parameters()} - {
        f"{path}.weight" for path, _ in quantized_linears(model)}
    for index in ADAPTER:
        for name in PROJECTIONS:
            module = layers[index].get_submodule(name)
            assert type(module) is nn.Linear
            key = f"model.layers.{index}.{name}.weight"
            assert key in unquantised
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # Everything not quantised (adapter, head, norms, embeddings) is bit-for-bit stored.
    assert unquantised == {k for k in stored if not k.startswith(tuple(
        f"model.layers.{i}.{p}.weight" for i in FROZEN for p in PROJECTIONS))}
    params = dict(model.named_parameters())
    for name in sorted(unquantised):
        assert params[name].dtype == torch.float32, name
        assert torch.equal(params[name], stored[name]), name
    assert {"lm_head.weight", "model.norm.weight", "model.layers.4.mlp.down_proj.weight"} <= unquantised
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_forward_is_the_dequantised_network_and_close_to_float32(
        quantization: str, built, reference) -> None:
    model = _load(built, quantization)
    dequantised = _dequantised_copy(model, reference)
    ids = _ids()
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        for training in (False, True):
            model.train(training)
            dequantised.train(training)
            got = model(input_ids=ids).logits
            assert torch.isfinite(got).all()
            assert _rel(got, want) <= LOGITS_VS_FLOAT32[quantization]
            assert _rel(got, dequantised(input_ids=ids).logits) <= VS_DEQUANTISED[(quantization, training)]
    # The quantisation does change the frozen part (the bound above is not vacuous).
    assert _rel(got, want) > 1e-4


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_gradients_reach_the_adapter_and_pass_through_the_quantised_layers(
        quantization: str, built, reference) -> None:
    model = _load(built, quantization)
    dequantised = _dequantised_copy(model, reference)
    ids = _ids()
    # An eval-mode forward without gradients first, as a client's evaluation does: on
    # CPUs with AVX512-BF16 that is what made bitsandbytes drop the input gradient.
    with torch.no_grad():
        model(input_ids=ids)

    def grads(net: nn.Module, training: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        net.train(training)
        weight = net.model.layers[ADAPTER[0]].self_attn.q_proj.weight
        weight.requires_grad_(True)
        try:
            embeds = net.model.embed_tokens(ids).detach().requires_grad_(True)
            loss = net(inputs_embeds=embeds, labels=ids).loss
            loss.backward()
            return weight.grad.clone(), embeds.grad.clone(), loss.detach().item()
        finally:
            weight.requires_grad_(False)
            weight.grad = None
            net.eval()

    tolerance = max(VS_DEQUANTISED[(quantization, False)], 1e-5)
    for training in (False, True):
        adapter_grad, input_grad, loss = grads(model, training)
        want_adapter, want_input, want_loss = grads(dequantised, training)
        assert torch.isfinite(adapter_grad).all() and adapter_grad.abs().sum() > 0
        assert torch.isfinite(input_grad).all() and input_grad.abs().sum() > 0
        assert abs(loss - want_loss) <= 0.05 * abs(want_loss)
        # The float32 adapter's gradient and the gradient below the three quantised
        # layers are the dequantised network's, not merely non-zero (a dropped gradient
        # at a quantised layer's input still leaves the residual path's).
        bound = tolerance if training or quantization == "nf4" else 0.05
        assert _rel(adapter_grad, want_adapter) <= max(bound, 1e-4)
        assert _rel(input_grad, want_input) <= max(bound, 1e-4)
    assert not any(p.requires_grad for p in model.parameters())


def test_quantised_parameters_take_less_memory(built, reference) -> None:
    float32 = model_bytes(reference)
    assert float32 == sum(p.numel() * 4 for p in reference.parameters()) + sum(
        b.numel() * b.element_size() for b in reference.buffers())
    sizes: dict[str, int] = {}
    ratios: dict[str, float] = {}
    for quantization, bits in (("nf4", 4), ("int8", 8)):
        model = _load(built, quantization)
        sizes[quantization] = model_bytes(model)
        for path, module in quantized_linears(model):
            measured = model_bytes(module)
            estimated = quantised_linear_bytes(module.out_features, module.in_features, bits)
            # int8: exactly the memory model's count. nf4: the memory model leaves out
            # the 16-entry float32 NF4 codebook and the absmax offset each weight keeps.
            assert abs(measured - estimated) <= (0 if bits == 8 else 16 * 4 + 4), (path, measured, estimated)
        frozen = nn.ModuleList(find_decoder_layers(model).layers[i] for i in FROZEN)
        frozen_float32 = nn.ModuleList(find_decoder_layers(reference).layers[i] for i in FROZEN)
        ratios[quantization] = model_bytes(frozen) / model_bytes(frozen_float32)
    print(f"bytes: float32 {float32}, {sizes}; frozen part vs float32 {ratios}")
    assert sizes["nf4"] < sizes["int8"] < float32
    # Measured: the frozen layers take 0.184 (nf4) and 0.266 (int8) of their float32
    # bytes; at 64-wide layers each 4-bit weight's 1 KiB absmax codebook is much of it.
    assert ratios["nf4"] < ratios["int8"] < 0.3
    # The frozen part is 3 of 5 layers here; embeddings and head stay float32 (0.585).
    assert sizes["nf4"] < 0.75 * float32


# ----------------------------------------------------------------------------- refusals


def test_unsupported_quantisation_is_refused_in_one_line(built, monkeypatch) -> None:
    reason = "bitsandbytes 0.0 cannot run nf4 on cpu: no backend (simulated)"
    monkeypatch.setattr(quantize, "_probe", lambda q, d: (False, reason))

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded although the mode is unsupported")

    monkeypatch.setattr(emu.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(EmulatorLoadError) as caught:
        load_emulator(built[0], quantization="nf4")
    message = str(caught.value)
    assert "\n" not in message and reason in message and "quantised to nf4" in message


def test_bad_quantisation_arguments_are_refused(built) -> None:
    with pytest.raises(EmulatorLoadError, match="unknown quantization 'fp8'"):
        load_emulator(built[0], quantization="fp8")
    with pytest.raises(EmulatorLoadError, match="float32"):
        load_emulator(built[0], quantization="int8", dtype=torch.bfloat16)


def test_changed_frozen_weights_are_refused_before_quantising(built, tmp_path: Path, monkeypatch) -> None:
    out, manifest = built
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    weights = load_file(changed / "model.safetensors")
    # A frozen weight: after quantisation no comparison could see this change.
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(quantize, "_probe", lambda q, d: (True, "ok"))
    monkeypatch.setattr(emu.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded changed weights"))
    with pytest.raises(EmulatorLoadError) as caught:
        load_emulator(changed, quantization="nf4")
    assert "\n" not in str(caught.value) and "weight files were changed" in str(caught.value)
    assert manifest["emulator_hash"] in str(caught.value)


def test_manifest_adapter_layers_must_be_the_last_ones(built, tmp_path: Path, monkeypatch) -> None:
    copy_dir = tmp_path / "copy"
    shutil.copytree(built[0], copy_dir)
    manifest = json.loads((copy_dir / "emulator.json").read_text(encoding="utf-8"))
    manifest["emulator_adapter_layers"] = [2, 3]
    (copy_dir / "emulator.json").write_text(json.dumps(manifest), encoding="utf-8")
    monkeypatch.setattr(quantize, "_probe", lambda q, d: (True, "ok"))
    with pytest.raises(EmulatorLoadError, match=r"\[2, 3\] are not the last 2 of its 5 layers"):
        load_emulator(copy_dir, quantization="int8")


def test_stored_hash_is_the_manifest_hash_for_tied_and_untied_heads(
        built, reference, records, tmp_path: Path) -> None:
    out, manifest = built
    names = [name for name, _ in reference.named_parameters()]
    assert stored_weights_hash(out, names) == manifest["emulator_hash"]
    tied_dir = make_tiny_llama(tmp_path / "tied", num_layers=4, tie_word_embeddings=True)
    tied_manifest = build_emulator(tied_dir, tmp_path / "emu", records=records,
                                   adapter_layers=1, drop_ratio=0.34, **{**BUILD, "steps": 0})
    tied, _, _ = load_emulator(tmp_path / "emu")
    assert "lm_head.weight" not in dict(tied.named_parameters())
    assert stored_weights_hash(tmp_path / "emu", [n for n, _ in tied.named_parameters()]) == \
        tied_manifest["emulator_hash"]
    ok, _ = quantization_support("int8")
    if ok:
        model, _, _ = load_emulator(tmp_path / "emu", quantization="int8")
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert [p for p, _ in quantized_linears(model)][0].startswith("model.layers.0.")
