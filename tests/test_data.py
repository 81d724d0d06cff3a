"""Tests for edge_client.data: JSONL loading, tokenization and batching."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from edge_client.data import (
    IGNORE_INDEX,
    BatchStream,
    DataError,
    Example,
    Record,
    format_prompt,
    load_jsonl,
    prompt_adds_special_tokens,
    prompt_ids,
    prompt_text,
    tokenize,
)
from edge_client.model import load_model
from edge_client.tiny import BOS_ID, EOS_ID, PAD_ID, make_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    _, tok = load_model(tiny_dir)
    return tok


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tiny_dir: Path):
    """A fresh tiny tokenizer with a simple chat template (the shared one has none)."""
    _, tok = load_model(tiny_dir)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"instruction": "Say hi", "response": "hi"})
BAD_LINES = [
    GOOD,  # 1
    "{not json",  # 2
    json.dumps({"instruction": "x"}),  # 3 missing response
    json.dumps({"instruction": "x", "response": 5}),  # 4 non-string
    json.dumps({"instruction": "x", "response": "  "}),  # 5 empty response
    json.dumps(["a", "b"]),  # 6 not an object
    "",  # 7 blank: ignored
    json.dumps({"instruction": "", "response": "ok"}),  # 8 good (empty instruction allowed)
]


def test_load_good_jsonl(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        [GOOD, json.dumps({"instruction": "Add", "response": "2+2=4", "extra": 1})],
    )
    records, problems = load_jsonl(path)
    assert problems == []
    assert records == [Record("Say hi", "hi", 1), Record("Add", "2+2=4", 2)]


def test_load_custom_fields(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [json.dumps({"q": "a", "a": "b"})])
    records, _ = load_jsonl(path, instruction_field="q", response_field="a")
    assert records == [Record("a", "b", 1)]


def test_bad_lines_reported_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "d.jsonl", BAD_LINES)
    with caplog.at_level(logging.WARNING, logger="edge_client.data"):
        records, problems = load_jsonl(path)
    assert [r.line for r in records] == [1, 8]
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "invalid JSON" in problems[0]
    assert "missing field 'response'" in problems[1]
    assert "must be a string" in problems[2]
    assert "empty response" in problems[3]
    assert "expected a JSON object, got array" in problems[4]
    assert "skipped 5 bad line(s)" in caplog.text


def test_bad_line_raises_in_raise_mode(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", BAD_LINES)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: invalid JSON")):
        load_jsonl(path, on_error="raise")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (json.dumps({"response": "x"}), "missing field 'instruction'"),
        (
            json.dumps({"instruction": "x", "response": None}),
            "field 'response' must be a string, got null",
        ),
        (json.dumps({"instruction": "x", "response": ""}), "empty response"),
    ],
)
def test_each_problem_raises(tmp_path: Path, line: str, reason: str) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD, line])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {reason}")):
        load_jsonl(path, on_error="raise")


def test_invalid_utf8_reported(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    records, problems = load_jsonl(path)
    assert len(records) == 1 and problems[0].startswith(f"{path}:2: not valid UTF-8")


def test_empty_result_raises(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", ["{bad", ""])
    with pytest.raises(DataError, match="no usable records"):
        load_jsonl(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_format_prompt() -> None:
    assert format_prompt("Do X") == "### Instruction:\nDo X\n\n### Response:\n"


def test_tokenize_masks_prompt(tokenizer) -> None:
    [ex] = tokenize([Record("Say hi", "hé", 1)], tokenizer, max_seq_len=256)
    prompt = tokenizer(format_prompt("Say hi")).input_ids
    response = list("hé".encode())
    assert prompt[0] == BOS_ID
    assert ex.input_ids == prompt + response + [EOS_ID]
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response + [EOS_ID]


def test_tokenize_truncates_and_drops(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    prompt_len = len(tokenizer(format_prompt("q")).input_ids)
    records = [Record("q", "abcdef", 1), Record("q" * 50, "abc", 2)]
    with caplog.at_level(logging.WARNING, logger="edge_client.data"):
        examples = tokenize(records, tokenizer, max_seq_len=prompt_len + 2)
    [ex] = examples
    assert len(ex.input_ids) == len(ex.labels) == prompt_len + 2
    assert ex.labels[-2:] == [ord("a"), ord("b")]
    assert "dropped 1 of 2" in caplog.text and "lines 2" in caplog.text


def test_tokenize_all_dropped_raises(tokenizer) -> None:
    with pytest.raises(DataError, match="truncated away"):
        tokenize([Record("long instruction", "x", 1)], tokenizer, max_seq_len=5)


def test_prompt_text_plain_needs_no_tokenizer() -> None:
    assert prompt_text("Do X", None, "plain") == format_prompt("Do X")
    assert prompt_text("Do X", None) == format_prompt("Do X")
    assert prompt_adds_special_tokens("plain") and not prompt_adds_special_tokens("chat")


def test_plain_is_the_default(tokenizer) -> None:
    records = [Record("Say hi", "hi", 1), Record("", "x", 2)]
    default = tokenize(records, tokenizer, max_seq_len=256)
    plain = tokenize(records, tokenizer, max_seq_len=256, prompt_format="plain")
    assert default == plain
    assert default[0].input_ids[: -3] == prompt_ids("Say hi", tokenizer, "plain")


def test_chat_refused_without_template(tokenizer) -> None:
    assert not tokenizer.chat_template
    with pytest.raises(DataError, match="chat template"):
        tokenize([Record("Say hi", "hi", 1)], tokenizer, max_seq_len=256, prompt_format="chat")
    with pytest.raises(DataError, match="chat template"):
        tokenize([], tokenizer, max_seq_len=256, prompt_format="chat")  # refused up front
    with pytest.raises(DataError, match="chat template"):
        prompt_text("Say hi", tokenizer, "chat")
    with pytest.raises(DataError, match="chat template"):
        prompt_text("Say hi", None, "chat")


def test_unknown_prompt_format(tokenizer) -> None:
    with pytest.raises(ValueError, match="prompt_format"):
        tokenize([Record("a", "b", 1)], tokenizer, max_seq_len=256, prompt_format="alpaca")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt_format"):
        prompt_text("a", tokenizer, "alpaca")  # type: ignore[arg-type]


def test_chat_prompt_text(chat_tokenizer) -> None:
    assert prompt_text("Say hi", chat_tokenizer, "chat") == "<|bos|><user>Say hi\n<assistant>"


def test_tokenize_chat_masks_prompt(chat_tokenizer) -> None:
    [ex] = tokenize([Record("Say hi", "hé", 1)], chat_tokenizer, max_seq_len=256, prompt_format="chat")
    prompt = [BOS_ID, *b"<user>Say hi\n<assistant>"]  # bos from the template, once
    response = list("hé".encode())
    assert prompt_ids("Say hi", chat_tokenizer, "chat") == prompt
    assert ex.input_ids == prompt + response + [EOS_ID]
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response + [EOS_ID]
    assert ex.input_ids.count(BOS_ID) == 1


def test_tokenize_chat_template_error(chat_tokenizer) -> None:
    chat_tokenizer.chat_template = "{{ raise_exception('no user turns here') }}"
    with pytest.raises(DataError, match="no user turns here"):
        tokenize([Record("a", "b", 1)], chat_tokenizer, max_seq_len=256, prompt_format="chat")


def _examples(n: int) -> list[Example]:
    # Example i has length i + 2 and carries its index in the first token.
    return [
        Example(input_ids=[i] * (i + 2), labels=[IGNORE_INDEX] + [i] * (i + 1)) for i in range(n)
    ]


def test_batch_padding() -> None:
    stream = BatchStream(_examples(5), 3, seed=0, pad_token_id=PAD_ID)
    batch = stream.next_batch()
    ids = batch.input_ids[:, 0].tolist()
    width = max(ids) + 2
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (3, width)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == torch.long
    for row, i in enumerate(ids):
        n = i + 2
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert batch.input_ids[row, n:].eq(PAD_ID).all()
        assert batch.labels[row, n:].eq(IGNORE_INDEX).all()
        assert batch.labels[row, :n].tolist() == [IGNORE_INDEX] + [i] * (i + 1)


def _draw(stream: BatchStream, n: int) -> list[list[int]]:
    return [stream.next_batch().input_ids[:, 0].tolist() for _ in range(n)]


def test_batch_stream_deterministic() -> None:
    a = _draw(BatchStream(_examples(10), 4, seed=7), 20)
    b = _draw(BatchStream(_examples(10), 4, seed=7), 20)
    c = _draw(BatchStream(_examples(10), 4, seed=8), 20)
    assert a == b
    assert a != c


def test_batch_stream_epoch_coverage() -> None:
    n, batch_size = 10, 4
    stream = BatchStream(_examples(n), batch_size, seed=3)
    drawn = [i for batch in _draw(stream, 3 * n // 2) for i in batch]  # 60 = 6 epochs
    epochs = [drawn[k * n : (k + 1) * n] for k in range(len(drawn) // n)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
    assert stream.epoch == 5
    assert Counter(drawn) == {i: 6 for i in range(n)}


def test_batch_stream_rejects_empty() -> None:
    with pytest.raises(DataError):
        BatchStream([], 2, seed=0)
    with pytest.raises(ValueError):
        BatchStream(_examples(2), 0, seed=0)
