"""Tests for edge_client.loss.causal_lm_loss against the models' own loss."""

from __future__ import annotations

import gc
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from edge_client.data import Batch, BatchStream, Record, tokenize
from edge_client.loss import causal_lm_loss, micro_batched_loss
from edge_client.model import load_model
from edge_client.tiny import make_tiny_llama
from profiles.procmem import release_free_memory

RECORDS = [
    Record("Say hi", "hi there", 1),
    Record("Add two and two", "four", 2),
    Record("", "x", 3),
    Record("Write a longer answer please", "Sure. Here is a longer answer with some words.", 4),
    Record("Translate 'chat'", "cat (or: chat, depending on the language)", 5),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def batches(tiny_dir: Path) -> list[Batch]:
    _, tok = load_model(tiny_dir)
    examples = tokenize(RECORDS, tok, max_seq_len=48)
    stream = BatchStream(examples, 3, seed=0, pad_token_id=tok.pad_token_id)
    out = [stream.next_batch() for _ in range(4)]
    assert any(b.attention_mask.eq(0).any() for b in out)  # padding is exercised
    return out


def _reference_loss(model: torch.nn.Module, batch: Batch) -> tuple[float, int]:
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
    return out.loss.item(), int(batch.labels[:, 1:].ne(-100).sum())


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_matches_model_loss(tiny_dir: Path, batches: list[Batch], chunk_tokens: int) -> None:
    model, _ = load_model(tiny_dir)
    for batch in batches:
        loss, n = causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)
        ref_loss, ref_n = _reference_loss(model, batch)
        assert n == ref_n
        assert math.isfinite(loss)
        assert loss == pytest.approx(ref_loss, abs=1e-5)


def test_untied_head(tmp_path: Path, batches: list[Batch]) -> None:
    model, _ = load_model(make_tiny_llama(tmp_path, seed=2, tie_word_embeddings=False))
    for batch in batches:
        assert causal_lm_loss(model, batch, chunk_tokens=5)[0] == pytest.approx(
            _reference_loss(model, batch)[0], abs=1e-5
        )


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]])
def test_matches_peft_lora_loss(
    tiny_dir: Path, batches: list[Batch], target_modules: list[str]
) -> None:
    base, _ = load_model(tiny_dir)
    plain = [causal_lm_loss(base, b)[0] for b in batches]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # peft zero-initialises B, which would hide the adapter, and draws A from the
            # global generator; both are drawn here so the adapter's effect is the same every run.
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.eval()
    for batch, plain_loss in zip(batches, plain, strict=True):
        for chunk_tokens in (1, 7, 1024):
            loss, _ = causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)
            assert loss == pytest.approx(_reference_loss(model, batch)[0], abs=1e-5)
        assert abs(loss - plain_loss) > 1e-3  # the adapter actually changed the loss


def test_never_builds_full_logits(batches: list[Batch]) -> None:
    vocab = 5000
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    head_inputs: list[tuple[int, ...]] = []
    head_outputs: list[tuple[int, ...]] = []

    def record(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        head_inputs.append(tuple(args[0].shape))
        head_outputs.append(tuple(out.shape))

    handle = model.get_output_embeddings().register_forward_hook(record)
    try:
        batch = batches[-1]
        loss, n = causal_lm_loss(model, batch, chunk_tokens=8)
    finally:
        handle.remove()
    assert math.isfinite(loss) and n > 8
    assert len(head_inputs) == math.ceil(n / 8)
    assert all(len(s) == 2 and s[0] <= 8 for s in head_inputs)
    assert all(s[0] * s[1] <= 8 * vocab for s in head_outputs)
    assert sum(s[0] for s in head_inputs) == n


def test_rejects_batch_without_targets(tiny_dir: Path, batches: list[Batch]) -> None:
    model, _ = load_model(tiny_dir)
    batch = batches[0]
    empty = Batch(batch.input_ids, batch.attention_mask, torch.full_like(batch.labels, -100))
    with pytest.raises(ValueError, match="no response tokens"):
        causal_lm_loss(model, empty)
    with pytest.raises(ValueError, match="chunk_tokens"):
        causal_lm_loss(model, batch, chunk_tokens=0)


@pytest.mark.parametrize("micro_batch", [1, 2, 3, 8])
def test_micro_batches_give_the_same_loss(tiny_dir: Path, batches: list[Batch], micro_batch: int) -> None:
    model, _ = load_model(tiny_dir)
    for batch in batches:
        whole, n = causal_lm_loss(model, batch)
        sliced, n_sliced = micro_batched_loss(model, batch, micro_batch=micro_batch)
        assert n_sliced == n
        assert math.isclose(sliced, whole, rel_tol=1e-5)
    with pytest.raises(ValueError, match="micro_batch"):
        micro_batched_loss(model, batches[0], micro_batch=0)



def _wide_vocab_model(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """A one-layer Llama whose output head dominates its memory, as in real small LMs."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _labelled_batch(vocab: int, rows: int, seq_len: int, prompt: int) -> Batch:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    return Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)


def test_loss_has_the_bits_of_cross_entropy_over_the_same_chunks() -> None:
    # The in-place log-softmax must not change a single bit of the loss: a MeZO step's
    # projected gradient, and so every client's update, depends on it.
    vocab, chunk_tokens = 3001, 50
    model = _wide_vocab_model(vocab)
    batch = _labelled_batch(vocab, rows=3, seq_len=70, prompt=20)
    counted = batch.labels[:, 1:] != -100
    targets = batch.labels[:, 1:][counted]
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     use_cache=False).last_hidden_state
        rows = hidden[:, :-1][counted]
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_tokens):
            logits = model.get_output_embeddings()(rows[start : start + chunk_tokens]).float()
            total += torch.nn.functional.cross_entropy(logits, targets[start : start + chunk_tokens],
                                                       reduction="sum")
    loss, n = causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)
    assert n == targets.numel() > 2 * chunk_tokens
    assert loss == total.item() / n  # exactly, not approximately


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_holds_one_chunk_of_logits_at_a_time() -> None:
    # The head's chunk of logits is the loss's largest buffer (chunk x vocab float32).
    # F.cross_entropy would keep log_softmax's output beside it, doubling the loss's
    # peak; measured here as the process's resident high-water mark during the call.
    try:
        _CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        _status_kib("VmHWM")
    except (OSError, KeyError):
        pytest.skip("needs Linux's resettable resident high-water mark (/proc/self/clear_refs)")
    vocab, rows, seq_len, prompt = 65536, 2, 257, 1
    model = _wide_vocab_model(vocab)
    batch = _labelled_batch(vocab, rows, seq_len, prompt)
    chunk_tokens = rows * (seq_len - prompt)  # every counted row in one chunk
    chunk_bytes = chunk_tokens * vocab * 4  # 128 MiB
    causal_lm_loss(model, batch, chunk_tokens=8)  # warm up kernels and thread pools
    # Earlier tests' garbage must not be freed during the call: the resident set would
    # shrink by more than the chunk and hide it from the high-water mark (seen in CI).
    # And memory they freed must go back to the kernel first, or the chunk may reuse it
    # without the resident set growing at all (a peak of 0, seen in CI).
    release_free_memory()
    gc.disable()
    try:
        _CLEAR_REFS.write_text("5")
        start_kib = _status_kib("VmRSS")
        causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)
        peak_bytes = (_status_kib("VmHWM") - start_kib) * 1024
    finally:
        gc.enable()
    assert peak_bytes > 0.9 * chunk_bytes  # the measurement sees the chunk
    assert peak_bytes < 1.4 * chunk_bytes, f"the loss peaked at {peak_bytes / chunk_bytes:.2f} chunks of logits"
