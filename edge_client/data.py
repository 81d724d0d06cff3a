"""Loading instruction/response JSONL data and turning it into padded batches.

Pipeline: :func:`load_jsonl` → :func:`tokenize` → :class:`BatchStream`.
Loss is computed on response tokens only; prompt and padding positions carry
the label ``-100`` (:data:`IGNORE_INDEX`).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value for positions that do not count towards the loss."""

_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"

PromptFormat = Literal["plain", "chat"]
"""How an instruction becomes a prompt: :func:`format_prompt` or the chat template."""


class DataError(ValueError):
    """Training data is missing, malformed or unusable."""


@dataclass(frozen=True)
class Record:
    """One training example as read from a JSONL file.

    Attributes:
        instruction: The instruction (prompt) text; may be empty.
        response: The expected response text; never empty.
        line: 1-based line number in the source file.
    """

    instruction: str
    response: str
    line: int


@dataclass
class Example:
    """A tokenized example.

    Attributes:
        input_ids: Prompt tokens, then response tokens, then eos (possibly
            truncated on the right).
        labels: Same length as ``input_ids``; :data:`IGNORE_INDEX` on prompt
            tokens, the token id on response tokens and eos.
    """

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Batch:
    """A right-padded batch.

    Attributes:
        input_ids: ``(B, T)`` long; padding positions hold the pad token id.
        attention_mask: ``(B, T)`` long; 1 on real tokens, 0 on padding.
        labels: ``(B, T)`` long; :data:`IGNORE_INDEX` on prompt and padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    instruction_field: str = "instruction",
    response_field: str = "response",
    on_error: Literal["skip", "raise"] = "skip",
) -> tuple[list[Record], list[str]]:
    """Reads instruction/response records from a JSONL file.

    Each non-blank line must be a JSON object with string fields
    ``instruction_field`` and ``response_field``; the response must not be
    empty or whitespace only. Blank lines are ignored (they hold no record).

    Args:
        path: The JSONL file (UTF-8).
        instruction_field: Key of the instruction in each object.
        response_field: Key of the response in each object.
        on_error: ``"skip"`` to skip bad lines (each is reported in the
            returned problems and summarised in a warning), ``"raise"`` to
            raise on the first bad line.

    Returns:
        ``(records, problems)``; each problem reads ``"PATH:LINE: reason"``.

    Raises:
        DataError: If the file cannot be read, if ``on_error="raise"`` and a
            line is bad, or if no valid record remains.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    path_str = str(path)
    raw_lines = read_raw_lines(path, "data file")

    records: list[Record] = []
    problems: list[str] = []
    for line_no, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        record, reason = _parse_line(raw, line_no, instruction_field, response_field)
        if record is not None:
            records.append(record)
            continue
        problem = f"{path_str}:{line_no}: {reason}"
        if on_error == "raise":
            raise DataError(problem)
        problems.append(problem)

    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        logger.warning(
            "skipped %d bad line(s) of %d records in %s: %s",
            len(problems),
            len(problems) + len(records),
            path_str,
            shown,
        )
    if not records:
        hint = f" Problems: {'; '.join(problems[:5])}" if problems else ""
        raise DataError(
            f"no usable records in {path_str!r}: each line must be a JSON object with string "
            f"fields {instruction_field!r} and {response_field!r} (non-empty response).{hint}"
        )
    return records, problems


def records_from(
    items: Iterable[Any],
    *,
    instruction_field: str = "instruction",
    response_field: str = "response",
    on_error: Literal["skip", "raise"] = "skip",
) -> tuple[list[Record], list[str]]:
    """Instruction/response records from objects an app holds, checked as
    :func:`load_jsonl` checks a file's lines.

    ``items`` may be any iterable of mappings (a list of dicts, a ``datasets.Dataset``,
    a generator) or of objects with the two fields as attributes, or a map-style
    ``torch.utils.data.Dataset`` (``len`` and integer indexing, no ``__iter__``).

    Returns:
        ``(records, problems)``; each problem reads ``"record N: reason"`` (1-based), and
        each record's ``line`` is its position.

    Raises:
        DataError: ``items`` is not iterable, ``on_error="raise"`` and a record is bad,
            or no valid record remains.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    if isinstance(items, (str, bytes, os.PathLike)):
        raise DataError("records_from takes records; pass a file path to load_jsonl")
    if not hasattr(items, "__iter__") and hasattr(items, "__len__") and hasattr(items, "__getitem__"):
        sized: Any = items
        items = (sized[index] for index in range(len(sized)))  # a map-style torch Dataset
    try:
        iterator = iter(items)
    except TypeError:
        raise DataError(f"data must be a file path or an iterable of records, got {type(items).__name__}") from None
    records: list[Record] = []
    problems: list[str] = []
    for number, item in enumerate(iterator, start=1):
        values: list[Any] = []
        reason = ""
        for field in (instruction_field, response_field):
            if isinstance(item, Mapping):
                present, value = field in item, item.get(field)
            else:
                present, value = hasattr(item, field), getattr(item, field, None)
            if not present:
                reason = f"missing field {field!r}"
                break
            if not isinstance(value, str):
                reason = f"field {field!r} must be a string, got {type(value).__name__}"
                break
            values.append(value)
        if not reason and not values[1].strip():
            reason = f"empty response (field {response_field!r})"
        if reason:
            if on_error == "raise":
                raise DataError(f"record {number}: {reason}")
            problems.append(f"record {number}: {reason}")
            continue
        records.append(Record(instruction=values[0], response=values[1], line=number))
    if problems:
        logger.warning("skipped %d bad record(s) of %d: %s", len(problems), len(problems) + len(records),
                       "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))
    if not records:
        hint = f" Problems: {'; '.join(problems[:5])}" if problems else ""
        raise DataError(f"no usable records: each must have string fields {instruction_field!r} and "
                        f"{response_field!r} (non-empty response).{hint}")
    return records, problems


def _parse_line(
    raw: bytes, line_no: int, instruction_field: str, response_field: str
) -> tuple[Record | None, str]:
    """Parses one JSONL line; returns ``(record, "")`` or ``(None, reason)``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {_json_type(obj)}"
    values: list[str] = []
    for field in (instruction_field, response_field):
        if field not in obj:
            return None, f"missing field {field!r}"
        value = obj[field]
        if not isinstance(value, str):
            return None, f"field {field!r} must be a string, got {_json_type(value)}"
        values.append(value)
    instruction, response = values
    if not response.strip():
        return None, f"empty response (field {response_field!r})"
    return Record(instruction=instruction, response=response, line=line_no), ""


def _json_type(value: object) -> str:
    """Names a parsed JSON value's type the way JSON does."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "string"


def format_prompt(instruction: str) -> str:
    """Formats an instruction into the prompt the response follows.

    Args:
        instruction: The instruction text.

    Returns:
        ``"### Instruction:\\n{instruction}\\n\\n### Response:\\n"``.
    """
    return _PROMPT_TEMPLATE.format(instruction=instruction)


def prompt_text(
    instruction: str,
    tokenizer: PreTrainedTokenizerBase | None,
    prompt_format: PromptFormat = "plain",
) -> str:
    """Builds the prompt text that :func:`tokenize` puts before a response.

    Evaluation code should build its prompts here (and tokenize them with
    :func:`prompt_ids`, or with ``add_special_tokens=``
    :func:`prompt_adds_special_tokens`) so they match training exactly.

    Args:
        instruction: The instruction text.
        tokenizer: The model's tokenizer; only used (and required) for
            ``"chat"``.
        prompt_format: ``"plain"`` for :func:`format_prompt`; ``"chat"`` for
            the tokenizer's chat template applied to a single user turn with
            the generation prompt (the assistant header) appended.

    Returns:
        The prompt text.

    Raises:
        DataError: For ``"chat"`` if the tokenizer has no chat template or the
            template fails to render.
        ValueError: If ``prompt_format`` is unknown.
    """
    _check_prompt_format(prompt_format)
    if prompt_format == "plain":
        return format_prompt(instruction)
    _require_chat_template(tokenizer)
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja2 and transformers raise many types on bad templates
        raise DataError(f"the tokenizer's chat template failed to render: {e}") from e
    if not isinstance(text, str):
        raise DataError(f"the tokenizer's chat template rendered {type(text).__name__}, not text")
    return text


def prompt_adds_special_tokens(prompt_format: PromptFormat) -> bool:
    """Whether prompts of this format are tokenized with ``add_special_tokens``.

    ``"plain"`` prompts get the tokenizer's default specials (e.g. bos);
    ``"chat"`` prompts do not, because the chat template already writes any
    special tokens it wants (adding them again would double bos).
    """
    _check_prompt_format(prompt_format)
    return prompt_format == "plain"


def prompt_ids(
    instruction: str,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat = "plain",
) -> list[int]:
    """The prompt token ids :func:`tokenize` uses for ``instruction``.

    Args:
        instruction: The instruction text.
        tokenizer: The model's tokenizer.
        prompt_format: See :func:`prompt_text`.

    Returns:
        Token ids of :func:`prompt_text`, tokenized with
        ``add_special_tokens=``:func:`prompt_adds_special_tokens`.
    """
    text = prompt_text(instruction, tokenizer, prompt_format)
    return list(
        tokenizer(text, add_special_tokens=prompt_adds_special_tokens(prompt_format))["input_ids"]
    )


def _require_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "prompt_format='chat' needs a tokenizer with a chat template, but this tokenizer has "
            "none (no chat_template in its tokenizer_config.json or chat_template.jinja); use "
            "prompt_format='plain' or an instruction-tuned model's tokenizer"
        )


def resolve_prompt_format(requested: str, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """``"auto"`` means the chat template when the tokenizer has one (instruction-tuned
    models expect it), else the plain format; other values are checked and returned.

    Every client of a federation loads the same model (its hash is checked), hence the
    same tokenizer, so "auto" resolves the same way on all of them.
    """
    if requested == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    _check_prompt_format(requested)
    return requested  # type: ignore[return-value]


def read_raw_lines(path: str | os.PathLike[str], what: str) -> list[bytes]:
    """A JSONL file's lines as bytes (decoded per line, so a bad byte names its line).

    Raises:
        DataError: the file cannot be read; the message names ``what`` and the path.
    """
    try:
        with open(path, "rb") as f:
            return f.read().split(b"\n")
    except OSError as e:
        raise DataError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from e


def _check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in ("plain", "chat"):
        raise ValueError(f"prompt_format must be 'plain' or 'chat', not {prompt_format!r}")


def tokenize(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    prompt_format: PromptFormat = "plain",
) -> list[Example]:
    """Tokenizes records into examples whose loss covers the response only.

    The prompt is :func:`prompt_text`: with ``prompt_format="plain"``,
    :func:`format_prompt` tokenized with ``add_special_tokens=True`` (so it
    gets bos if the tokenizer adds one by default); with ``"chat"``, the
    tokenizer's chat template for one user turn plus the generation prompt,
    tokenized with ``add_special_tokens=False`` (the template writes its own
    special tokens). The response is tokenized with
    ``add_special_tokens=False`` and eos is appended, in both formats.
    Sequences longer than ``max_seq_len`` are cut on the right; an example
    whose response is cut away entirely is dropped and counted in a warning.

    Args:
        records: Records from :func:`load_jsonl`.
        tokenizer: The model's tokenizer; must have an eos token (and a chat
            template for ``"chat"``).
        max_seq_len: Maximum number of tokens per example (at least 2).
        prompt_format: ``"plain"`` or ``"chat"``; see :func:`prompt_text`.

    Returns:
        The examples, in the order of ``records`` (minus dropped ones).

    Raises:
        DataError: If the tokenizer has no eos token, ``"chat"`` is asked
            for and the tokenizer has no chat template, or every example was
            dropped by truncation.
        ValueError: If ``max_seq_len`` < 2 or ``prompt_format`` is unknown.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    _check_prompt_format(prompt_format)
    if prompt_format == "chat":
        _require_chat_template(tokenizer)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token; cannot mark the end of responses")
    if not records:
        return []

    prompts = tokenizer(
        [prompt_text(r.instruction, tokenizer, prompt_format) for r in records],
        add_special_tokens=prompt_adds_special_tokens(prompt_format),
    )["input_ids"]
    responses = tokenizer([r.response for r in records], add_special_tokens=False)["input_ids"]

    examples: list[Example] = []
    dropped_lines: list[int] = []
    for record, prompt_ids, response_ids in zip(records, prompts, responses, strict=True):
        target = [*response_ids, eos_id]
        input_ids = [*prompt_ids, *target][:max_seq_len]
        if len(prompt_ids) >= len(input_ids):
            dropped_lines.append(record.line)
            continue
        labels = ([IGNORE_INDEX] * len(prompt_ids) + target)[:max_seq_len]
        examples.append(Example(input_ids=input_ids, labels=labels))

    if dropped_lines:
        logger.warning(
            "dropped %d of %d example(s) whose prompt fills max_seq_len=%d (no response token "
            "left); source lines %s%s; raise max_seq_len or shorten the instructions",
            len(dropped_lines),
            len(records),
            max_seq_len,
            ", ".join(map(str, dropped_lines[:10])),
            ", ..." if len(dropped_lines) > 10 else "",
        )
    if not examples:
        raise DataError(
            f"all {len(records)} example(s) were truncated away: every prompt is at least "
            f"max_seq_len={max_seq_len} tokens long; raise max_seq_len"
        )
    return examples


def collate(examples: Sequence[Example], *, pad_token_id: int) -> Batch:
    """Right-pads examples to the longest one and stacks them into a batch.

    Args:
        examples: At least one example.
        pad_token_id: Token id written into padding positions of ``input_ids``.

    Returns:
        The batch; labels are :data:`IGNORE_INDEX` on padding.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(e.input_ids) for e in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


class BatchStream:
    """An endless, deterministic stream of shuffled batches.

    The examples are visited in epochs; each epoch is a fresh permutation
    drawn from one ``random.Random(seed)`` (no torch RNG involved), so the same
    seed always yields the same batches. Batches are taken as consecutive
    runs of that endless index sequence: every batch has exactly
    ``batch_size`` examples, and a batch may straddle two epochs. Hence the
    first ``k * len(examples)`` examples drawn cover every example exactly
    ``k`` times. Each batch is padded only to its longest example.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        seed: int,
        pad_token_id: int = 0,
    ) -> None:
        """Creates the stream.

        Args:
            examples: Tokenized examples; at least one.
            batch_size: Examples per batch; at least 1.
            seed: Seed of the shuffling RNG.
            pad_token_id: Token id used for padding (pass
                ``tokenizer.pad_token_id``). Padding is masked out of the
                attention and the loss, so this only matters cosmetically.

        Raises:
            DataError: If ``examples`` is empty.
            ValueError: If ``batch_size`` < 1.
        """
        if not examples:
            raise DataError("no training examples to batch")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._examples = list(examples)
        self._batch_size = batch_size
        self._pad_token_id = pad_token_id
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._pos = 0
        self._epoch = -1

    @property
    def epoch(self) -> int:
        """Index of the epoch the last drawn example belongs to (-1 before any)."""
        return self._epoch

    def next_batch(self) -> Batch:
        """Returns the next batch of ``batch_size`` examples."""
        chosen: list[Example] = []
        while len(chosen) < self._batch_size:
            if self._pos == len(self._order):
                self._order = list(range(len(self._examples)))
                self._rng.shuffle(self._order)
                self._pos = 0
                self._epoch += 1
            take = min(self._batch_size - len(chosen), len(self._order) - self._pos)
            chosen.extend(self._examples[i] for i in self._order[self._pos : self._pos + take])
            self._pos += take
        return collate(chosen, pad_token_id=self._pad_token_id)
