"""Held-out evaluation of a (possibly LoRA-wrapped) causal LM on instruction data.

Two kinds of numbers come out of :func:`evaluate`:

* the mean cross-entropy over response tokens (the quantity the federation
  optimises), computed with :func:`edge_client.loss.causal_lm_loss` on the
  same tokenization as training (:func:`edge_client.data.tokenize`);
* generation metrics: greedy completions of each prompt scored against the
  reference with :func:`rouge_l` (the metric FedKSeed and Ferret report) and
  :func:`exact_match` (every family of the shipped instruction set has a
  checkable exact answer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import string
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from edge_client.data import (
    DataError,
    PromptFormat,
    Record,
    collate,
    prompt_adds_special_tokens,
    prompt_text,
    read_raw_lines,
    tokenize,
)
from edge_client.loss import causal_lm_loss

logger = logging.getLogger(__name__)

DEFAULT_FAMILY = "all"
"""Family of records that do not name one."""

_ASCII_PUNCTUATION = frozenset(string.punctuation)


class EvalRecordLike(Protocol):
    """What :func:`evaluate` needs of a record (``family`` is optional)."""

    @property
    def instruction(self) -> str: ...  # noqa: D102

    @property
    def response(self) -> str: ...  # noqa: D102


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation example.

    Attributes:
        instruction: The instruction (prompt) text; may be empty.
        response: The reference response; never empty.
        family: Task family the record belongs to (``"all"`` if unnamed).
        line: 1-based line number in the source file (0 if not from a file).
    """

    instruction: str
    response: str
    family: str = DEFAULT_FAMILY
    line: int = 0


@dataclass(frozen=True)
class EvalResult:
    """The outcome of :func:`evaluate`.

    Attributes:
        loss: Mean response-token cross-entropy, weighted by tokens over the
            whole set (records whose response ``tokenize`` truncates away
            entirely do not count).
        tokens: Number of response tokens (including eos) the loss covers.
        rouge_l: Mean :func:`rouge_l` F-measure over examples; NaN when
            generation was off.
        exact_match: Fraction of examples whose prediction is an
            :func:`exact_match`; NaN when generation was off.
        examples: Number of records evaluated.
        by_family: Per family: ``{"rouge_l": ..., "exact_match": ...,
            "examples": ...}`` (the metrics NaN when generation was off).
        seconds: Wall-clock time of the evaluation.
        samples: The first few examples as ``{"instruction", "reference",
            "prediction"}`` (``prediction`` is the scored first line; empty
            when generation was off).
    """

    loss: float
    tokens: int
    rouge_l: float
    exact_match: float
    examples: int
    by_family: dict[str, dict[str, float]]
    seconds: float
    samples: list[dict[str, str]] = field(default_factory=list)


def rouge_tokens(text: str) -> list[str]:
    """Normalises and tokenizes text the way :func:`rouge_l` does.

    The text is lowercased (``str.lower``) and split on whitespace
    (``str.split()``); from each token, leading and trailing characters that
    are ASCII punctuation (``string.punctuation``) or Unicode punctuation
    (category ``P*``) are removed; tokens left empty are dropped. Punctuation
    inside a token is kept (``"don't"``, ``"3.5"``); a leading ``"-"`` or
    ``"$"`` is ASCII punctuation and goes (``"-5"`` becomes ``"5"``, as with
    the usual ROUGE tokenizers, which drop all non-alphanumerics).

    Args:
        text: Any text.

    Returns:
        The normalised tokens.
    """
    tokens = []
    for raw in text.lower().split():
        start, end = 0, len(raw)
        while start < end and _is_punctuation(raw[start]):
            start += 1
        while end > start and _is_punctuation(raw[end - 1]):
            end -= 1
        if start < end:
            tokens.append(raw[start:end])
    return tokens


def _is_punctuation(ch: str) -> bool:
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Dynamic programming in ``O(len(a) * len(b))`` time, keeping one row over
    the shorter sequence (``O(min(len(a), len(b)))`` memory).

    Args:
        a: First sequence.
        b: Second sequence.

    Returns:
        The LCS length.
    """
    if len(a) < len(b):
        a, b = b, a
    # row[j] = LCS of the processed prefix of `a` and b[:j].
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous iteration of the outer loop
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin 2004, beta = 1) of a prediction against a reference.

    Both texts are normalised by :func:`rouge_tokens` (lowercase, whitespace
    split, punctuation stripped from token edges, empty tokens dropped).
    With ``L`` the :func:`lcs_length` of the token lists, precision is
    ``L / len(prediction)``, recall ``L / len(reference)`` and the result
    ``2 * P * R / (P + R)``.

    Args:
        prediction: The generated text.
        reference: The reference text.

    Returns:
        The F-measure in ``[0, 1]``; 0.0 if either text has no token after
        normalisation (also when both are empty) or they share no token.
    """
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_line(text: str) -> str:
    """The first line of ``text`` after stripping surrounding whitespace.

    Leading blank lines are skipped, so ``"\\n 51\\nmore"`` gives ``"51"``.
    Only ``"\\n"`` ends a line (a ``"\\r"`` before it goes with the
    stripping); ``str.splitlines`` is not used because it also splits on
    control characters such as ``"\\x1d"`` that byte-level models emit.

    Args:
        text: Any text.

    Returns:
        The first line, stripped; ``""`` for blank text.
    """
    return text.strip().split("\n", 1)[0].strip()


def normalize_answer(text: str) -> str:
    """Normalises an answer for :func:`exact_match`.

    Strips surrounding whitespace, lowercases, collapses every whitespace run
    (line breaks included) to one space, then removes one trailing period
    (and whitespace before it).

    Args:
        text: Any text.

    Returns:
        The normalised text.
    """
    text = " ".join(text.lower().split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction's first line is the reference, up to normalisation.

    The prediction is cut to its :func:`first_line` (so a model that goes on
    after the answer is not penalised), then both texts go through
    :func:`normalize_answer`.

    Args:
        prediction: The generated text.
        reference: The reference answer.

    Returns:
        True on a match.
    """
    return normalize_answer(first_line(prediction)) == normalize_answer(reference)


def load_eval_records(
    path: str | os.PathLike[str], *, limit: int | None = None
) -> list[EvalRecord]:
    """Reads evaluation records from a JSONL file.

    Each non-blank line must be a JSON object with string fields
    ``instruction`` and ``response`` (non-blank) and optionally a string
    ``family`` (default ``"all"``).

    Args:
        path: The JSONL file (UTF-8).
        limit: Read at most this many records (the first ones); ``None`` for all.

    Returns:
        The records, in file order.

    Raises:
        DataError: If the file cannot be read or a line is bad; the message
            starts with ``"PATH:LINE: "``.
        ValueError: If ``limit`` is negative.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    path_str = str(path)
    raw_lines = read_raw_lines(path, "evaluation file")

    records: list[EvalRecord] = []
    for line_no, raw in enumerate(raw_lines, start=1):
        if limit is not None and len(records) >= limit:
            break
        if not raw.strip():
            continue
        try:
            records.append(_parse_eval_line(raw, line_no))
        except ValueError as e:
            raise DataError(f"{path_str}:{line_no}: {e}") from e
    return records


def _parse_eval_line(raw: bytes, line_no: int) -> EvalRecord:
    """Parses one JSONL line; raises ValueError with the reason."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("instruction", "response"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"field {key!r} must be a string")
    if not obj["response"].strip():
        raise ValueError("empty response")
    family = obj.get("family", DEFAULT_FAMILY)
    if not isinstance(family, str) or not family:
        raise ValueError("field 'family' must be a non-empty string")
    return EvalRecord(obj["instruction"], obj["response"], family=family, line=line_no)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EvalRecordLike],
    *,
    max_seq_len: int = 256,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    generate: bool = True,
    progress: Callable[[int, int], None] | None = None,
    num_samples: int = 5,
    prompt_format: PromptFormat = "plain",
) -> EvalResult:
    """Evaluates a causal LM on records: response loss and greedy-generation metrics.

    The loss is computed on ``tokenize(records, max_seq_len=...,
    prompt_format=...)`` in consecutive batches of ``batch_size``
    (right-padded by ``collate``) and combined token-weighted. For
    generation, each prompt is built and tokenized exactly as ``tokenize``
    does it (``prompt_text`` / ``prompt_adds_special_tokens``), left-padded
    into batches, and completed greedily; the new tokens are decoded without
    special tokens and the prediction scored is their :func:`first_line`.

    The model's weights are not touched; it is put in eval mode for the
    duration and every module's train/eval flag is restored afterwards. The
    result is deterministic for a given model and record list (apart from
    ``seconds``).

    Args:
        model: A transformers causal LM, optionally wrapped by peft (LoRA).
        tokenizer: Its tokenizer; must have an eos token.
        records: Objects with ``instruction`` and ``response`` strings and
            optionally ``family`` (missing or ``None`` counts as ``"all"``).
        max_seq_len: Token budget per loss example, as in training; prompts
            for generation longer than this keep their last ``max_seq_len``
            tokens.
        batch_size: Examples per forward / generate call.
        max_new_tokens: Generation budget per prompt.
        generate: Whether to generate; if False the generation metrics are NaN.
        progress: Called as ``progress(done, total)`` after each batch, where
            the steps are the loss batches followed by the generation batches.
        num_samples: How many leading examples to copy into ``samples``.
        prompt_format: ``"plain"`` or ``"chat"``, as in training (see
            :func:`edge_client.data.prompt_text`).

    Returns:
        The :class:`EvalResult`.

    Raises:
        ValueError: If ``records`` is empty or a size argument is out of range.
        DataError: If the tokenizer has no eos token (or no chat template for
            ``"chat"``), or every record is truncated away for the loss.
    """
    if not records:
        raise ValueError("no records to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    started = time.perf_counter()
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    # tokenize wants data.Record (it names source lines in its warnings).
    as_records = [
        Record(r.instruction, r.response, getattr(r, "line", None) or i)
        for i, r in enumerate(records, start=1)
    ]
    examples = tokenize(
        as_records, tokenizer, max_seq_len=max_seq_len, prompt_format=prompt_format
    )
    loss_batches = [
        collate(examples[i : i + batch_size], pad_token_id=pad_id)
        for i in range(0, len(examples), batch_size)
    ]
    gen_batches = math.ceil(len(records) / batch_size) if generate else 0
    total_steps = len(loss_batches) + gen_batches

    training_flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        loss_sum, tokens = 0.0, 0
        for step, batch in enumerate(loss_batches, start=1):
            mean, n = causal_lm_loss(model, batch)
            loss_sum += mean * n
            tokens += n
            if progress is not None:
                progress(step, total_steps)

        predictions: list[str] | None = None
        if generate:
            predictions = _generate(
                model,
                tokenizer,
                [r.instruction for r in records],
                max_seq_len=max_seq_len,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                prompt_format=prompt_format,
                pad_id=pad_id,
                eos_id=eos_id,
                on_batch=(
                    None
                    if progress is None
                    else lambda done: progress(len(loss_batches) + done, total_steps)
                ),
            )
    finally:
        for module, flag in training_flags:
            module.training = flag

    families = [getattr(r, "family", None) or DEFAULT_FAMILY for r in records]
    rouge_scores: list[float] = []
    matches: list[bool] = []
    if predictions is not None:
        for record, prediction in zip(records, predictions, strict=True):
            rouge_scores.append(rouge_l(prediction, record.response))
            matches.append(exact_match(prediction, record.response))

    by_family: dict[str, dict[str, float]] = {}
    for family in sorted(set(families)):
        idx = [i for i, f in enumerate(families) if f == family]
        scored = predictions is not None
        by_family[family] = {
            "rouge_l": _mean([rouge_scores[i] for i in idx]) if scored else math.nan,
            "exact_match": _mean([float(matches[i]) for i in idx]) if scored else math.nan,
            "examples": float(len(idx)),
        }

    samples = [
        {
            "instruction": record.instruction,
            "reference": record.response,
            "prediction": predictions[i] if predictions is not None else "",
        }
        for i, record in enumerate(records[:num_samples])
    ]
    result = EvalResult(
        loss=loss_sum / tokens,
        tokens=tokens,
        rouge_l=_mean(rouge_scores) if predictions is not None else math.nan,
        exact_match=_mean([float(m) for m in matches]) if predictions is not None else math.nan,
        examples=len(records),
        by_family=by_family,
        seconds=time.perf_counter() - started,
        samples=samples,
    )
    logger.info(
        "evaluated %d example(s): loss %.4f over %d tokens, ROUGE-L %.4f, exact match %.4f "
        "(%.1f s)",
        result.examples,
        result.loss,
        result.tokens,
        result.rouge_l,
        result.exact_match,
        result.seconds,
    )
    return result


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    *,
    max_seq_len: int,
    batch_size: int,
    max_new_tokens: int,
    prompt_format: PromptFormat,
    pad_id: int,
    eos_id: int,
    on_batch: Callable[[int], None] | None,
) -> list[str]:
    """Greedily completes each prompt; returns the first line of each completion."""
    # Same call as edge_client.data.tokenize makes for the prompt part, so the
    # prompt tokens are identical to the ones the model was trained on.
    prompts = tokenizer(
        [prompt_text(i, tokenizer, prompt_format) for i in instructions],
        add_special_tokens=prompt_adds_special_tokens(prompt_format),
    )["input_ids"]
    cut = sum(len(p) > max_seq_len for p in prompts)
    if cut:
        logger.warning(
            "%d prompt(s) longer than max_seq_len=%d keep only their last %d tokens for generation",
            cut,
            max_seq_len,
            max_seq_len,
        )
    device = next(model.parameters()).device
    predictions: list[str] = []
    with torch.no_grad():
        for done, start in enumerate(range(0, len(prompts), batch_size), start=1):
            chunk = [p[-max_seq_len:] for p in prompts[start : start + batch_size]]
            width = max(len(p) for p in chunk)
            # Left padding: every row's last prompt token sits at the same
            # position, so the generated tokens line up in one column per step.
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            new_tokens = output[:, width:].cpu()
            for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                predictions.append(first_line(text))
            if on_batch is not None:
                on_batch(done)
    return predictions
