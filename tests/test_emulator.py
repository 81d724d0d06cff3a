"""The FedBiOT emulator (edge_client.emulator, edgefed-emulator) on the tiny Llama."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_client import emulator as emu
from edge_client.data import Record
from edge_client.emulator import (
    EmulatorError,
    EmulatorLoadError,
    build_emulator,
    load_emulator,
    plan_emulator,
    public_records,
    read_manifest,
)
from edge_client.emulator_cli import main as cli_main
from edge_client.layer_dropout import find_decoder_layers
from edge_client.model import ModelLoadError, base_weights_hash, load_model
from edge_client.tiny import make_tiny_llama

LAYERS = 8
STEPS = 15
# The tiny model's tokenizer is byte-level, so records are long in tokens: 64 covers the
# prompt template and most of each instruction.
BUILD = dict(steps=STEPS, learning_rate=1e-3, batch_size=4, max_seq_len=64, seed=0, eval_records=8)


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return public_records()[:40]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", num_layers=LAYERS)


@pytest.fixture(scope="module")
def built(tiny: Path, records: list[Record], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("emulators") / "emu"
    calls: list[tuple[int, int, float]] = []
    manifest = build_emulator(tiny, out, records=records,
                              progress=lambda *args: calls.append(args), **BUILD)
    return out, manifest, calls


# ----------------------------------------------------------------------------- plan


def test_plan_keeps_the_ends_of_the_compressed_range_and_the_adapter() -> None:
    plan = plan_emulator(8, adapter_layers=2, drop_ratio=0.5)
    assert plan.kept_layers == (0, 3, 5, 6, 7)
    assert plan.adapter_layers == (6, 7)
    assert plan.compressed_kept == (0, 3, 5)
    assert plan.dropped_layers == (1, 2, 4)
    assert plan.emulator_adapter_layers == (3, 4)
    # SmolLM2-135M: 30 layers, 28 below a 2-layer adapter, 14 dropped.
    big = plan_emulator(30, adapter_layers=2, drop_ratio=0.5)
    assert len(big.kept_layers) == 16 and big.kept_layers[:1] == (0,) and big.compressed_kept[-1] == 27

    for layers in range(3, 33):
        for k in range(1, min(4, layers - 1) + 1):
            n = layers - k
            for ratio in (0.0, 0.2, 0.25, 0.5, 0.7):
                drop = math.floor(ratio * n + 0.5)
                if drop > max(0, n - 2):
                    with pytest.raises(EmulatorError):
                        plan_emulator(layers, adapter_layers=k, drop_ratio=ratio)
                    continue
                plan = plan_emulator(layers, adapter_layers=k, drop_ratio=ratio)
                assert plan.adapter_layers == tuple(range(n, layers))
                assert plan.kept_layers[-k:] == plan.adapter_layers
                assert plan.compressed_kept[0] == 0 and plan.compressed_kept[-1] == n - 1
                assert len(plan.compressed_kept) == n - drop
                assert list(plan.kept_layers) == sorted(set(plan.kept_layers))
                assert plan == plan_emulator(layers, adapter_layers=k, drop_ratio=ratio)
    assert plan_emulator(8, drop_ratio=0.0).kept_layers == tuple(range(8))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_plan_refuses_ratios_outside_zero_one(ratio: object) -> None:
    with pytest.raises(EmulatorError, match="drop ratio must be a number in \\[0, 1\\)"):
        plan_emulator(8, drop_ratio=ratio)  # type: ignore[arg-type]


def test_plan_refuses_dropping_an_end_of_the_range_and_bad_adapters() -> None:
    # 6 layers below the adapter: at most 4 may drop; 0.75 asks for round(4.5) = 5.
    with pytest.raises(EmulatorError, match="drops 5 of the 6 layers below the adapter, but at most 4"):
        plan_emulator(8, adapter_layers=2, drop_ratio=0.75)
    with pytest.raises(EmulatorError, match="adapter layers"):
        plan_emulator(8, adapter_layers=0)
    with pytest.raises(EmulatorError, match="adapter layers"):
        plan_emulator(8, adapter_layers=8)
    with pytest.raises(EmulatorError, match="at least 2 decoder layers"):
        plan_emulator(1)


# ----------------------------------------------------------------------------- data


def test_public_records_are_what_edgefed_local_gives_no_client() -> None:
    from edge_client.local_federation import build_parser

    defaults = build_parser().parse_args([])
    assert emu.PUBLIC_SPLIT["clients"] == defaults.clients
    assert emu.PUBLIC_SPLIT["heldout"] == defaults.heldout
    assert emu.PUBLIC_SPLIT["per_client"] == defaults.records_per_client
    assert emu.PUBLIC_SPLIT["scheme"] == defaults.split
    assert emu.PUBLIC_SPLIT["alpha"] == defaults.alpha
    assert defaults.data.resolve() == emu.SHIPPED_DATA

    from edge_client.splits import split_records

    lines = [json.loads(line) for line in emu.SHIPPED_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    split = split_records(lines, clients=defaults.clients, heldout=defaults.heldout,
                          per_client=defaults.records_per_client, scheme=defaults.split, alpha=defaults.alpha, seed=0)
    public = public_records()
    used = {id(r) for share in (*split.clients, split.heldout) for r in share}
    # Each public record's line points at a record no client got and the evaluator never scores.
    assert len(public) == len(lines) - len(used) > 1000
    assert all(id(lines[r.line - 1]) not in used for r in public)
    assert all(lines[r.line - 1]["instruction"] == r.instruction for r in public)


# ----------------------------------------------------------------------------- build


def test_emulator_has_the_planned_layers_and_copies_the_frozen_parts_exactly(tiny: Path, built) -> None:
    out, manifest, _ = built
    full, _ = load_model(tiny)
    model, _, _ = load_emulator(out)
    plan = plan_emulator(LAYERS)
    assert type(model) is type(full)
    assert model.config.num_hidden_layers == len(plan.kept_layers) == 5
    assert len(find_decoder_layers(model).layers) == 5

    full_state, emu_state = full.state_dict(), model.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(emu_state[name], full_state[name]), name
    for new, old in zip(plan.emulator_adapter_layers, plan.adapter_layers, strict=True):
        prefix_new, prefix_old = f"model.layers.{new}.", f"model.layers.{old}."
        names = [k for k in full_state if k.startswith(prefix_old)]
        assert names
        for name in names:
            assert torch.equal(emu_state[prefix_new + name[len(prefix_old):]], full_state[name]), name
    # Tied embeddings stay tied, and the alignment moved the kept compressed layers.
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    for new, old in enumerate(plan.compressed_kept):
        assert not torch.equal(emu_state[f"model.layers.{new}.mlp.up_proj.weight"],
                               full_state[f"model.layers.{old}.mlp.up_proj.weight"])


def test_manifest_records_the_plan_hashes_and_losses(tiny: Path, built, records: list[Record]) -> None:
    out, manifest, calls = built
    assert json.loads((out / "emulator.json").read_text(encoding="utf-8")) == manifest == read_manifest(out)
    full, _ = load_model(tiny)
    model, _, loaded = load_emulator(out)
    assert manifest["format"] == 1
    assert manifest["base_model_hash"] == base_weights_hash(full)
    assert manifest["emulator_hash"] == base_weights_hash(model) != manifest["base_model_hash"]
    assert manifest["kept_layers"] == [0, 3, 5, 6, 7]
    assert manifest["adapter_layers"] == [6, 7]
    assert manifest["emulator_adapter_layers"] == [3, 4]
    assert manifest["num_layers_full"] == LAYERS and manifest["drop_ratio"] == 0.5
    assert manifest["steps"] == STEPS and manifest["learning_rate"] == 1e-3 and manifest["seed"] == 0
    assert manifest["records"]["count"] == len(records) and manifest["records"]["eval"] == 8
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert [c[:2] for c in calls] == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert all(isinstance(c[2], float) and math.isfinite(c[2]) for c in calls)


def test_alignment_lowers_the_distillation_loss(built) -> None:
    _, manifest, calls = built
    before, after = manifest["alignment_loss_before"], manifest["alignment_loss_after"]
    assert math.isfinite(before) and before > 0
    assert after < 0.5 * before, (before, after)
    assert calls[-1][2] < calls[0][2]


def test_build_is_deterministic_and_overwrite_is_explicit(tiny: Path, built, records, tmp_path: Path) -> None:
    _, manifest, _ = built
    out = tmp_path / "again"
    again = build_emulator(tiny, out, records=records, **BUILD)
    assert again["emulator_hash"] == manifest["emulator_hash"]
    assert again["alignment_loss_after"] == manifest["alignment_loss_after"]

    with pytest.raises(EmulatorError, match="already exists"):
        build_emulator(tiny, out, records=records, **BUILD)
    replaced = build_emulator(tiny, out, records=records, drop_ratio=0.2, overwrite=True, **{**BUILD, "steps": 0})
    assert replaced["kept_layers"] == [0, 1, 3, 4, 5, 6, 7]
    assert read_manifest(out) == replaced
    assert replaced["alignment_loss_before"] == replaced["alignment_loss_after"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_untied_output_head_is_copied(tmp_path: Path, records) -> None:
    full_dir = make_tiny_llama(tmp_path / "untied", num_layers=4, tie_word_embeddings=False)
    build_emulator(full_dir, tmp_path / "emu", records=records, adapter_layers=1, drop_ratio=0.34,
                   **{**BUILD, "steps": 0})
    full, _ = load_model(full_dir)
    model, _, manifest = load_emulator(tmp_path / "emu")
    assert manifest["kept_layers"] == [0, 2, 3]
    assert torch.equal(model.lm_head.weight, full.lm_head.weight)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_a_failed_build_leaves_no_partial_directory(tiny: Path, built, records, tmp_path: Path, monkeypatch) -> None:
    def fail(directory: Path) -> None:
        # Everything is written by now: this is the last moment before the rename.
        assert (directory / "model.safetensors").is_file()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(emu, "_fsync_tree", fail)
    with pytest.raises(OSError, match="simulated"):
        build_emulator(tiny, tmp_path / "emu", records=records, **{**BUILD, "steps": 0})
    assert list(tmp_path.iterdir()) == []

    # A failed rebuild over an existing emulator leaves the old one as it was.
    existing = tmp_path / "existing"
    shutil.copytree(built[0], existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(OSError, match="simulated"):
        build_emulator(tiny, existing, records=records, overwrite=True, **{**BUILD, "steps": 0})
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


# ----------------------------------------------------------------------------- load


def test_load_refuses_tampered_weights(built, tmp_path: Path) -> None:
    out, manifest, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = load_file(copy / "model.safetensors")
    weights["model.layers.4.mlp.down_proj.weight"][0, 0] += 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EmulatorLoadError) as caught:
        load_emulator(copy)
    message = str(caught.value)
    assert "\n" not in message
    assert manifest["emulator_hash"] in message and "weight files were changed" in message
    assert isinstance(caught.value, ModelLoadError)


def test_load_refuses_another_base_model(built) -> None:
    out, manifest, _ = built
    wrong = "0" * 64
    with pytest.raises(EmulatorLoadError) as caught:
        load_emulator(out, expect_base_hash=wrong)
    message = str(caught.value)
    assert "\n" not in message and wrong in message and manifest["base_model_hash"] in message
    _, _, loaded = load_emulator(out, expect_base_hash=manifest["base_model_hash"])
    assert loaded == manifest


def test_load_refuses_a_missing_or_unknown_manifest(built, tmp_path: Path) -> None:
    out, _, _ = built
    with pytest.raises(EmulatorLoadError, match="does not exist"):
        load_emulator(tmp_path / "nowhere")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "emulator.json").read_text(encoding="utf-8"))
    (copy / "emulator.json").write_text(json.dumps({**manifest, "format": 99}), encoding="utf-8")
    with pytest.raises(EmulatorLoadError, match="format 99"):
        load_emulator(copy)
    del manifest["emulator_hash"]
    (copy / "emulator.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(EmulatorLoadError, match="'emulator_hash' is missing"):
        load_emulator(copy)
    (copy / "emulator.json").unlink()
    with pytest.raises(EmulatorLoadError, match="emulator.json is missing"):
        load_emulator(copy)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "argv, words",
    [
        (["frobnicate"], "invalid choice"),
        ([], "required"),
        (["build"], "--out"),
        (["build", "--out", "{tmp}/e", "--ratio", "1.5", "--model", "{tiny}"], "drop ratio"),
        (["build", "--out", "{tmp}/e", "--ratio", "0.9", "--model", "{tiny}"], "at most 4"),
        (["build", "--out", "{tmp}/e", "--steps", "ten"], "invalid int"),
        (["build", "--out", "{tmp}/e", "--model", "{tmp}/no-such-model"], "does not exist"),
        (["build", "--out", "{tmp}/e", "--model", "{tiny}", "--records", "{tmp}/none.jsonl"], "cannot read"),
        (["build", "--out", "{tiny}", "--model", "{tiny}"], "already exists"),
        (["show", "{tmp}/nowhere"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(argv, words, tiny: Path, tmp_path: Path, capsys) -> None:
    argv = [a.format(tmp=tmp_path, tiny=tiny) for a in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgefed-emulator: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert words in err
    assert "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_cli_builds_and_shows(tiny: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "public.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "response": str(i)}) + "\n" for i in range(24)),
                    encoding="utf-8")
    out = tmp_path / "emu"
    assert cli_main(["build", "--model", str(tiny), "--out", str(out), "--records", str(data), "--steps", "3",
                     "--lr", "1e-3", "--batch", "2", "--seq-len", "48"]) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(out)
    assert "step     3/3" in printed and "kept [0, 3, 5, 6, 7]" in printed
    assert f"{manifest['alignment_loss_before']:.4f} -> {manifest['alignment_loss_after']:.4f}" in printed
    assert str(out) in printed.splitlines()[-1]
    assert manifest["records"]["source"] == str(data) and manifest["records"]["count"] == 24

    assert cli_main(["show", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == manifest


# ------------------------------------------------------------------------ re-alignment


def _adapter_dir(tiny: Path, out: Path, layers: tuple[int, ...], scale: float = 0.5) -> Path:
    """A peft LoRA adapter of the tiny model on ``layers``, as edgefed-export writes one,
    with non-zero values (peft's B = 0 would leave the model unchanged)."""
    from edge_client.scope import ScopeConfig, build_space

    model, _ = load_model(tiny)
    wrapped, space = build_space(model, ScopeConfig(kind="lora", lora_rank=4, lora_alpha=8.0,
                                                    lora_targets=("q_proj", "v_proj"), lora_layers=layers))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        space.flat.copy_(torch.randn(space.numel, generator=generator) * scale)
    wrapped.save_pretrained(out, safe_serialization=True)
    return out


def test_realignment_aligns_to_the_adapted_model_and_writes_the_base_adapter_layers(
        tiny: Path, records: list[Record], built, tmp_path: Path) -> None:
    plain_dir, plain, _ = built
    adapter = _adapter_dir(tiny, tmp_path / "adapter", tuple(plain["adapter_layers"]))
    out = tmp_path / "emu-realigned"
    manifest = build_emulator(tiny, out, records=records, adapter=adapter, **BUILD)
    assert manifest["aligned_to_adapter"]["path"] == str(adapter)
    assert len(manifest["aligned_to_adapter"]["sha256"]) == 64
    assert plain["aligned_to_adapter"] is None
    assert manifest["base_model_hash"] == plain["base_model_hash"]  # the base model's, not the merged one's
    # Aligned to another teacher (the adapted model): other weights, another hash.
    assert manifest["emulator_hash"] != plain["emulator_hash"]
    assert manifest["alignment_loss_before"] != plain["alignment_loss_before"]
    assert manifest["alignment_loss_after"] < manifest["alignment_loss_before"]
    realigned, _ = load_model(out)
    aligned, _ = load_model(plain_dir)
    full, _ = load_model(tiny)
    full_layers = find_decoder_layers(full).layers
    # The adapter layers are the base model's, bit for bit: the clients' space starts there.
    for own, index in zip(plain["emulator_adapter_layers"], plain["adapter_layers"], strict=True):
        written = find_decoder_layers(realigned).layers[own].state_dict()
        for name, tensor in full_layers[index].state_dict().items():
            assert torch.equal(written[name], tensor), name
    # The compressed layers moved differently from the plain alignment's.
    first = find_decoder_layers(realigned).layers[1].state_dict()
    other = find_decoder_layers(aligned).layers[1].state_dict()
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_realignment_refuses_an_adapter_on_layers_the_emulator_does_not_keep_intact(
        tiny: Path, records: list[Record], tmp_path: Path) -> None:
    adapter = _adapter_dir(tiny, tmp_path / "adapter", (0, LAYERS - 1))
    with pytest.raises(EmulatorError, match=r"adapts layers \[0, 7\], but the emulator keeps layers \[6, 7\] as its "
                                            r"adapter"):
        build_emulator(tiny, tmp_path / "emu", records=records, adapter=adapter, **BUILD)
    assert not (tmp_path / "emu").exists()
    with pytest.raises(EmulatorError, match="is not a peft adapter directory"):
        build_emulator(tiny, tmp_path / "emu", records=records, adapter=tmp_path, **BUILD)
