"""Tests for edge_client.evaluate: metrics, evaluation loop and record loading."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import hashlib
import itertools
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from edge_client.data import IGNORE_INDEX, DataError, Record, collate, format_prompt, tokenize
from edge_client.evaluate import (
    EvalRecord,
    EvalResult,
    evaluate,
    exact_match,
    first_line,
    lcs_length,
    load_eval_records,
    rouge_l,
    rouge_tokens,
)
from edge_client.loss import causal_lm_loss
from edge_client.model import load_model
from edge_client.tiny import make_tiny_llama

SHIPPED = Path(__file__).resolve().parents[1] / "edge_client" / "datasets" / "instructions.jsonl"


# --- rouge_l ---------------------------------------------------------------------------


def test_rouge_identical_and_disjoint() -> None:
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("alpha beta", "gamma delta") == 0.0


def test_rouge_worked_example() -> None:
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = 5/6, F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2: P = 2/4, R = 2/2, F = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    assert rouge_l("a c", "a b c d") == pytest.approx(2 / 3)
    # Order matters: the LCS of "a b" and "b a" is one token.
    assert rouge_l("a b", "b a") == pytest.approx(0.5)
    # Repeated tokens count once per match: LCS("a a a", "a") = 1 → P = 1/3, R = 1.
    assert rouge_l("a a a", "a") == pytest.approx(0.5)


def test_rouge_normalisation() -> None:
    assert rouge_tokens("  The CAT, sat... (on) \"it\"!  ") == ["the", "cat", "sat", "on", "it"]
    assert rouge_tokens("don't 3.5 — «quoted»") == ["don't", "3.5", "quoted"]
    assert rouge_l("The cat, SAT.", "the cat sat") == 1.0
    # Punctuation inside a token is kept.
    assert rouge_l("don't", "dont") == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference"), [("", "x"), ("x", ""), ("", ""), ("!!! ...", "x"), ("  ", "  ")]
)
def test_rouge_empty(prediction: str, reference: str) -> None:
    assert rouge_l(prediction, reference) == 0.0


def _brute_force_lcs(a: list[str], b: list[str]) -> int:
    for k in range(min(len(a), len(b)), 0, -1):
        subsequences = set(itertools.combinations(b, k))
        if any(c in subsequences for c in itertools.combinations(a, k)):
            return k
    return 0


def test_lcs_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _brute_force_lcs(a, b), (a, b)
        assert lcs_length(b, a) == lcs_length(a, b)


# --- exact_match -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("51", "51", True),
        ("51.", "51", True),
        ("It is 5", "it is 5.", True),
        ("  Positive  ", "positive", True),
        ("orange  planet\tsilver", "orange planet silver", True),
        ("positive\nbecause the reviewer liked it", "positive", True),
        ("\n\n51\n", "51", True),
        ("51..", "51", False),
        ("5", "51", False),
        ("positive negative", "positive", False),
        ("first\nsecond", "first second", False),
        ("", "51", False),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: bool) -> None:
    assert exact_match(prediction, reference) is expected


# --- evaluate on the tiny model --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Untied head: with tied embeddings the random tiny model just repeats the
    # prompt's last token ("\n"), so every prediction would be empty.
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def records() -> list[EvalRecord | Record]:
    shipped = load_eval_records(SHIPPED, limit=9)
    # data.Record has no family attribute: it must count under "all".
    return [*shipped, Record("Say hi", "hi there", 1)]


def _state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _direct_loss(model: torch.nn.Module, tok, records, batch_size: int, max_seq_len: int):
    examples = tokenize(records, tok, max_seq_len=max_seq_len)
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_token_id=tok.pad_token_id)
        mean, n = causal_lm_loss(model, batch)
        total += mean * n
        tokens += n
    return total / tokens, tokens


def _comparable(result: EvalResult) -> EvalResult:
    return replace(result, seconds=0.0)


def test_loss_is_token_weighted(tiny_dir: Path, records: list) -> None:
    model, tok = load_model(tiny_dir)
    result = evaluate(model, tok, records, batch_size=3, max_seq_len=96, generate=False)
    expected, tokens = _direct_loss(model, tok, records, 3, 96)
    assert result.tokens == tokens
    assert result.loss == pytest.approx(expected, abs=1e-6)
    # Token weighting makes the loss independent of the batching; a mean of
    # batch means would not be.
    single = evaluate(model, tok, records, batch_size=1, max_seq_len=96, generate=False)
    assert single.loss == pytest.approx(result.loss, abs=1e-6)
    assert single.tokens == result.tokens
    assert result.examples == len(records)
    assert math.isnan(result.rouge_l) and math.isnan(result.exact_match)
    assert all(s["prediction"] == "" for s in result.samples)


def test_generation_is_deterministic_and_leaves_model_alone(
    tiny_dir: Path, records: list
) -> None:
    model, tok = load_model(tiny_dir)
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    before = _state_hash(model)
    calls: list[tuple[int, int]] = []

    first = evaluate(
        model,
        tok,
        records,
        batch_size=4,
        max_new_tokens=10,
        progress=lambda done, total: calls.append((done, total)),
    )
    second = evaluate(model, tok, records, batch_size=4, max_new_tokens=10)

    assert _comparable(first) == _comparable(second)
    assert _state_hash(model) == before
    assert [m.training for m in model.modules()] == modes
    assert first.examples == len(records)
    assert len(first.samples) == 5
    assert all(isinstance(s["prediction"], str) for s in first.samples)
    assert any(s["prediction"] for s in first.samples)
    assert all("\n" not in s["prediction"] for s in first.samples)
    assert 0.0 <= first.rouge_l <= 1.0 and 0.0 <= first.exact_match <= 1.0
    # 3 loss batches + 3 generation batches.
    assert calls == [(i, 6) for i in range(1, 7)]

    families = {getattr(r, "family", "all") for r in records}
    assert set(first.by_family) == families | {"all"}
    assert first.by_family["all"]["examples"] == 1.0
    assert sum(f["examples"] for f in first.by_family.values()) == len(records)


def _predictions(model, tok, records, batch_size: int) -> list[str]:
    result = evaluate(
        model, tok, records, batch_size=batch_size, max_new_tokens=10, num_samples=len(records)
    )
    return [s["prediction"] for s in result.samples]


def test_left_padding_does_not_change_predictions(tiny_dir: Path, records: list) -> None:
    model, tok = load_model(tiny_dir)
    # Prompts of different lengths share batches, so padding is exercised.
    assert len({len(r.instruction) for r in records[:4]}) > 1
    assert _predictions(model, tok, records, 4) == _predictions(model, tok, records, 1)


def test_references_equal_to_predictions_score_one(tiny_dir: Path, records: list) -> None:
    model, tok = load_model(tiny_dir)
    predictions = _predictions(model, tok, records, 1)
    echoes = [
        EvalRecord(r.instruction, p, "echo")
        for r, p in zip(records, predictions, strict=True)
        if rouge_tokens(p)
    ]
    assert len(echoes) >= 3
    result = evaluate(model, tok, echoes, batch_size=1, max_new_tokens=10)
    assert result.exact_match == 1.0
    assert result.rouge_l == pytest.approx(1.0)
    assert result.by_family == {
        "echo": {"rouge_l": 1.0, "exact_match": 1.0, "examples": len(echoes)}
    }
    # And the original references (nonsense for a random model) do not match.
    assert evaluate(model, tok, records, batch_size=4, max_new_tokens=10).exact_match == 0.0


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_peft_lora_model(tiny_dir: Path, records: list, task_type: str | None) -> None:
    base, tok = load_model(tiny_dir)
    base_result = evaluate(base, tok, records, batch_size=4, max_new_tokens=8)
    config = LoraConfig(
        r=2,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,  # random B: the adapter changes the outputs
        task_type=task_type,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wrapped = get_peft_model(base, config)
    wrapped.eval()
    before = _state_hash(wrapped)

    result = evaluate(wrapped, tok, records, batch_size=4, max_new_tokens=8)

    assert _state_hash(wrapped) == before
    assert not any(m.training for m in wrapped.modules())
    expected, tokens = _direct_loss(wrapped, tok, records, 4, 256)
    assert result.tokens == tokens
    assert result.loss == pytest.approx(expected, abs=1e-6)
    assert result.loss != pytest.approx(base_result.loss, abs=1e-4)
    assert _comparable(evaluate(wrapped, tok, records, batch_size=4, max_new_tokens=8)) == (
        _comparable(result)
    )


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
def test_generation_prompts_match_training_prompts(
    tiny_dir: Path, records: list, prompt_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = load_model(tiny_dir)
    if prompt_format == "chat":
        tok.chat_template = (
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    seen: list[torch.Tensor] = []
    completions: list[str] = []
    generate = model.generate

    def spy(**kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(row[m.bool()] for row, m in zip(ids, mask, strict=True))
        assert (mask[:, -1] == 1).all()  # left padding
        out = generate(**kwargs)
        new = out[:, ids.shape[1] :]
        completions.extend(tok.batch_decode(new, skip_special_tokens=True))
        return out

    monkeypatch.setattr(model, "generate", spy)
    result = evaluate(
        model,
        tok,
        records,
        batch_size=4,
        max_new_tokens=6,
        prompt_format=prompt_format,
        num_samples=len(records),
    )
    # Only the new tokens are decoded, and the first line of them is scored.
    assert [s["prediction"] for s in result.samples] == [first_line(c) for c in completions]
    examples = tokenize(records, tok, max_seq_len=256, prompt_format=prompt_format)
    expected = [
        [t for t, label in zip(e.input_ids, e.labels, strict=True) if label == IGNORE_INDEX]
        for e in examples
    ]
    assert [row.tolist() for row in seen] == expected
    if prompt_format == "chat":
        assert "<|assistant|>" in tok.decode(seen[0])


def test_only_the_first_line_is_scored(tmp_path: Path, records: list) -> None:
    # With tied embeddings the random tiny model greedily repeats the prompt's
    # last token, "\n": each completion is blank lines, so each scored first
    # line is empty.
    model, tok = load_model(make_tiny_llama(tmp_path, seed=1))
    assert format_prompt("x").endswith("\n")
    result = evaluate(model, tok, records, max_new_tokens=4, num_samples=len(records))
    assert [s["prediction"] for s in result.samples] == [""] * len(records)
    assert result.rouge_l == 0.0 and result.exact_match == 0.0


def test_long_prompt_is_still_generated(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    recs = [EvalRecord("short", "a"), EvalRecord("word " * 40, "b")]
    result = evaluate(model, tok, recs, max_seq_len=48, max_new_tokens=4)
    # The long record is truncated out of the loss but still scored.
    assert result.examples == 2
    assert result.tokens == 2  # "a" + eos
    assert len(result.samples) == 2


def test_evaluate_rejects_empty(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    with pytest.raises(ValueError, match="no records"):
        evaluate(model, tok, [])


# --- load_eval_records -----------------------------------------------------------------


def test_load_shipped_records() -> None:
    records = load_eval_records(SHIPPED)
    assert records and all(r.response.strip() for r in records)
    assert {r.family for r in records} == {
        "arithmetic",
        "formatting",
        "classification",
        "extraction",
    }
    assert load_eval_records(SHIPPED, limit=3) == records[:3]
    assert load_eval_records(SHIPPED, limit=0) == []


def test_load_good_lines(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text(
        json.dumps({"instruction": "Add 1 and 2", "response": "3", "family": "arithmetic"})
        + "\n\n   \n"
        + json.dumps({"instruction": "", "response": "yes", "extra": 1})
        + "\n",
        encoding="utf-8",
    )
    assert load_eval_records(path) == [
        EvalRecord("Add 1 and 2", "3", "arithmetic", line=1),
        EvalRecord("", "yes", "all", line=4),
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"instruction": "x"}', "'response'"),
        ('{"instruction": 3, "response": "x"}', "'instruction'"),
        ('{"instruction": "x", "response": "  "}', "empty response"),
        ('{"instruction": "x", "response": "y", "family": 7}', "'family'"),
    ],
)
def test_load_bad_line_names_path_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "eval.jsonl"
    good = json.dumps({"instruction": "a", "response": "b"})
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError, match=reason) as info:
        load_eval_records(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_load_bad_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_bytes(b'{"instruction": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=r":1: not valid UTF-8"):
        load_eval_records(path)
    with pytest.raises(DataError, match="cannot read"):
        load_eval_records(tmp_path / "missing.jsonl")
