"""A tiny GGUF source model for export tests: edge_client.tiny's random Llama and byte
tokenizer, written as llama.cpp writes a Llama GGUF (float32 tensors, q/k rows in GGUF's
rotary order, a ``gpt2``-type tokenizer whose 256 byte tokens are GPT-2's byte alphabet).

It is written independently of the exporter's metadata copying (keys set one by one
here), so a federation started from it exercises the whole path: transformers converts
it (the base model), the exporter writes it back with this file's metadata, and
transformers reads the export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_client.model import load_model
from edge_client.tiny import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, _bytes_to_unicode, make_tiny_llama
from exporter.gguf_file import gguf_tensors


def write_tiny_gguf(directory: Path, *, seed: int = 0) -> Path:
    """Write ``directory/tiny.gguf`` (once) and return its path."""
    import gguf

    path = directory / "tiny.gguf"
    if path.is_file():
        return path
    model, _ = load_model(make_tiny_llama(directory / "hf", seed=seed))
    config = model.config
    writer = gguf.GGUFWriter(str(path) + ".partial", "llama")
    writer.add_name("edgefed tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]) if getattr(config, "rope_parameters", None)
                              else float(config.rope_theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)] + list(SPECIAL_TOKENS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(gguf.TokenType.NORMAL)] * 256 + [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS))
    # No merges: the tiny tokenizer is bytes only. GGUF cannot hold an empty merges array,
    # so the loader derives merges from the vocabulary instead: with scores and nothing
    # but single bytes and whole special tokens, it derives none.
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, array in gguf_tensors(model, "llama").items():
        if name == "output.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp writes token_embd only
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(path) + ".partial").rename(path)
    return path
