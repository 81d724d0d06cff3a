"""A tiny randomly initialised Llama model with a byte-level tokenizer.

Used by fast unit tests, integration tests and benchmarks: it is written to a
local directory in well under a second, needs no download, and loads with
:func:`edge_client.model.load_model` like any real model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
# Byte b has token id b; the special tokens follow in this order.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

_SPEC_FILE = "edgefed_tiny.json"
_SPEC_VERSION = 1


def make_tiny_llama(
    directory: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
) -> Path:
    """Writes a tiny random ``LlamaForCausalLM`` and a byte-level tokenizer.

    The tokenizer maps byte ``b`` to id ``b`` and has the special tokens
    ``<|pad|>`` (256), ``<|bos|>`` (257, prepended by default like Llama
    tokenizers) and ``<|eos|>`` (258); the config's ``vocab_size`` is 259.
    Weights are fp32, drawn after ``torch.manual_seed(seed)`` so the same
    arguments always give the same weights; the caller's global RNG state is
    left untouched.

    Idempotent: if ``directory`` already holds a model written with the same
    arguments it is left as is.

    Args:
        directory: Where to write; created if missing.
        seed: Seed for the weight initialisation.
        hidden_size: Model width.
        num_layers: Number of decoder layers.
        num_heads: Number of attention heads.
        num_kv_heads: Number of key/value heads (grouped-query attention).
        intermediate_size: MLP width.
        max_position_embeddings: Context length.
        tie_word_embeddings: Whether lm_head shares the input embedding.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    spec: dict[str, Any] = {
        "version": _SPEC_VERSION,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
    }
    spec_path = directory / _SPEC_FILE
    if _read_json(spec_path) == spec and (directory / "config.json").is_file():
        logger.debug("tiny model in %s is up to date", directory)
        return directory

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()

    directory.mkdir(parents=True, exist_ok=True)
    # Remove the marker first so a crash mid-write never leaves a directory
    # that looks complete.
    spec_path.unlink(missing_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    make_byte_tokenizer(max_position_embeddings).save_pretrained(directory)
    spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.debug("wrote tiny llama (%d params) to %s", model.num_parameters(), directory)
    return directory


def make_byte_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Builds the byte-level tokenizer used by :func:`make_tiny_llama`.

    Args:
        model_max_length: Stored as the tokenizer's ``model_max_length``.

    Returns:
        A fast tokenizer with ``vocab_size`` 259 (see module constants).
    """
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    # BPE without merges over the GPT-2 byte alphabet: every byte is one token
    # and decoding round-trips arbitrary UTF-8.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    assert tok.get_vocab_size() == VOCAB_SIZE and tok.token_to_id(EOS_TOKEN) == EOS_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible mapping from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
