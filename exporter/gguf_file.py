"""Writing a model as a GGUF file that keeps its source GGUF's metadata and tokenizer.

The federation's model came from a GGUF (the default model does); llama.cpp and Ollama
users want the fine-tuned one back in that format. The file written here is the source
file with its tensors replaced: every metadata key (architecture, hyper-parameters, the
tokenizer's vocabulary, merges and special tokens, the chat template) is copied as it
is, ``general.file_type`` says the new tensor type, and a few ``edgefed.*`` keys record
where the weights come from. Tensors are written as float32 or float16; one-dimensional
ones (norms, biases) stay float32, as llama.cpp's own converter keeps them.

Names and layouts go the way transformers reads them back
(``transformers.modeling_gguf_pytorch_utils``): its ``get_gguf_hf_weights_map`` gives
each GGUF tensor's Hugging Face name, and for the ``llama`` architecture the rows of
the query and key projections are put back in GGUF's interleaved rotary order (the
inverse of transformers' ``_reverse_permute_weights``; PROTOCOL.md §6.6.1 documents
the permutation). Architectures for which transformers applies any other tensor
processing are refused rather than written wrong.

Why not llama.cpp's ``convert_hf_to_gguf.py``: it is not installed (it ships with
llama.cpp's sources, not with the ``gguf`` package), and it would rebuild the metadata
from the Hugging Face files instead of keeping the source's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["GGUF_DTYPES", "write_gguf", "gguf_tensors"]

GGUF_DTYPES = ("f32", "f16")

# Architectures whose GGUF tensors transformers reads with no processing but renaming
# are written by renaming back; "llama" also needs its q/k rows permuted.
_PERMUTED_ARCHITECTURES = frozenset({"llama"})


def _torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().contiguous().numpy()


def _to_gguf_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotary row order -> GGUF's: within each head, the first and second
    halves of the rows are interleaved (HF row ``a·2h + b·h + i`` is GGUF row
    ``a·2h + 2i + b``)."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_tensors(model: Any, architecture: str) -> dict[str, np.ndarray]:
    """The model's weights under their GGUF names, in GGUF layout, as float32 arrays.

    Args:
        model: a plain (not peft-wrapped) Hugging Face causal LM.
        architecture: the GGUF ``general.architecture`` (e.g. ``"llama"``).

    Raises:
        ValueError: transformers reads this architecture with a tensor processor that is
            not a plain renaming (fused or split tensors), or does not know it.
    """
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    if architecture in TENSOR_PROCESSORS and architecture not in _PERMUTED_ARCHITECTURES:
        raise ValueError(f"GGUF export of the {architecture!r} architecture is not supported: transformers "
                         f"transforms its tensors on load in ways this exporter does not invert")
    try:
        names = get_gguf_hf_weights_map(model, TensorProcessor())  # GGUF name -> HF name
    except NotImplementedError as error:
        raise ValueError(f"GGUF export: {error}") from None
    state = model.state_dict()
    config = model.config
    out: dict[str, np.ndarray] = {}
    for gguf_name, hf_name in names.items():
        if hf_name not in state:
            continue
        array = _torch_to_numpy(state[hf_name])
        if architecture in _PERMUTED_ARCHITECTURES:
            if ".attn_q." in gguf_name:
                array = _to_gguf_rows(array, config.num_attention_heads)
            elif ".attn_k." in gguf_name:
                array = _to_gguf_rows(array, config.num_key_value_heads)
        out[gguf_name] = np.ascontiguousarray(array)
    return out


def write_gguf(path: str | os.PathLike[str], model: Any, source: str | os.PathLike[str], *, dtype: str = "f16",
               metadata: dict[str, str] | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> None:
    """Write ``model`` to ``path`` as a GGUF with ``source``'s metadata and tokenizer.

    Args:
        path: the file to write (its directory must exist).
        model: a plain Hugging Face causal LM of the source's architecture.
        source: the GGUF file the federation's base model came from.
        dtype: "f32" or "f16" for the matrices (1-D tensors stay float32).
        metadata: extra string keys (e.g. ``edgefed.round``) to add.
        progress: ``progress("gguf", tensors_written, tensors_total)``.

    Raises:
        ValueError: the dtype is unknown, the architecture is not supported, or the
            model's tensors do not match the source's names or shapes.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    reader = gguf.GGUFReader(source, "r")
    architecture_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if architecture_field is None:
        raise ValueError(f"{source} has no general.architecture")
    architecture = str(architecture_field.contents())
    tensors = gguf_tensors(model, architecture)

    writer = gguf.GGUFWriter(os.fspath(path), architecture, endianess=reader.endianess)
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    for field in reader.fields.values():
        # GGUF.* are the reader's view of the header; the writer writes its own, and the
        # architecture (given to the writer above).
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            continue  # replaced below: the tensors' type changes
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(int(file_type))
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)

    planned: list[tuple[str, np.ndarray]] = []
    for tensor in reader.tensors:
        name = tensor.name
        numpy_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if name in tensors:
            array = tensors[name]
            if array.shape != numpy_shape:
                raise ValueError(f"tensor {name}: the model's is {array.shape}, the source GGUF's {numpy_shape}")
            if dtype == "f16" and array.ndim > 1:
                array = array.astype(np.float16)
        elif tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            # Not a model weight transformers loads (e.g. llama-3's rope_freqs): kept as is.
            array = np.asarray(tensor.data).reshape(numpy_shape)
        else:
            raise ValueError(f"the source GGUF's tensor {name} has no counterpart in the model")
        planned.append((name, array))
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, (_, array) in enumerate(planned):
        writer.write_tensor_data(array)
        if progress is not None:
            progress("gguf", index + 1, len(planned))
    writer.close()
