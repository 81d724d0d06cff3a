"""Memory-lean causal-LM loss for forward-only (zeroth-order) training.

The ``(B, T, vocab)`` logits tensor a plain ``model(...)`` call builds is by
far the largest activation of a small LM (SmolLM2-135M: 49152 logits per
token). :func:`causal_lm_loss` avoids it: it runs the decoder body, keeps only
the hidden states whose next token is a counted label, and applies the output
head to those rows in bounded chunks, taking the log-softmax of each chunk in
place (one ``chunk x vocab`` float32 buffer at a time, not two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_client.data import IGNORE_INDEX, Batch


def causal_lm_loss(
    model: nn.Module, batch: Batch, *, chunk_tokens: int = 1024
) -> tuple[float, int]:
    """Computes the mean next-token cross-entropy over response tokens.

    Equivalent to ``model(input_ids, attention_mask=..., labels=...).loss``
    (logits at position ``t`` predict label ``t + 1``; labels equal to -100
    are ignored) but never materialises the full logits: at most
    ``chunk_tokens`` rows of logits exist at a time, and the cross-entropy is
    accumulated in float32. Works on plain transformers causal LMs and on
    peft-wrapped ones (LoRA adapters in the decoder and/or on ``lm_head``).

    Args:
        model: A transformers causal LM, optionally wrapped by peft.
        batch: The batch; tensors are moved to the model's device.
        chunk_tokens: Maximum number of rows passed to the output head at once.

    Returns:
        ``(mean_loss, n_tokens)`` where ``n_tokens`` is the number of counted
        labels.

    Raises:
        ValueError: If the batch has no counted label, ``chunk_tokens`` < 1, or
            the model's structure is not supported.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    base = _unwrap(model)
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    if decoder is None or decoder is base or head is None:
        raise ValueError(f"{type(base).__name__} has no separate decoder body and output head")
    config = base.config
    device = head.weight.device if hasattr(head, "weight") else batch.input_ids.device

    with torch.no_grad():
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask.to(device)
        labels = batch.labels.to(device)

        next_labels = labels[:, 1:]
        counted = next_labels != IGNORE_INDEX
        targets = next_labels[counted]
        n_tokens = int(targets.numel())
        if n_tokens == 0:
            raise ValueError("the batch has no response tokens to compute a loss on")

        outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        # Boolean indexing copies only the N counted rows (N x H), never B x T x V.
        rows = hidden[:, :-1][counted]
        del hidden, outputs

        softcap = getattr(config, "final_logit_softcapping", None)
        logit_scale = getattr(config, "logit_scale", None)  # Cohere multiplies
        logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides
        total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, n_tokens, chunk_tokens):
            logits = head(rows[start : start + chunk_tokens]).float()
            if logit_scale is not None:
                logits = logits * logit_scale
            if logits_scaling is not None:
                logits = logits / logits_scaling
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            # cross_entropy is nll_loss(log_softmax(logits)); F.cross_entropy would hold
            # log_softmax's output next to the logits, a second chunk x V float32 buffer
            # (96 MiB for 512 rows of SmolLM2's 49152-word vocabulary). Writing it over
            # the logits, which nothing else reads, gives the same bits with one buffer.
            torch.log_softmax(logits, dim=-1, out=logits)
            total += F.nll_loss(logits, targets[start : start + chunk_tokens], reduction="sum")
    return total.item() / n_tokens, n_tokens


def _unwrap(model: nn.Module) -> nn.Module:
    """Returns the transformers model inside a peft wrapper (or the model).

    peft injects LoRA layers in place into the wrapped model's modules, so
    the decoder body and ``lm_head`` of the unwrapped model include them.
    """
    get_base_model = getattr(model, "get_base_model", None)
    if get_base_model is None:
        return model
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        # Prompt-learning adapters act in the wrapper's forward, which we bypass.
        raise ValueError(
            "prompt-learning peft adapters (prefix/prompt tuning) are not supported; use LoRA"
        )
    return get_base_model()


def micro_batched_loss(
    model: nn.Module, batch: Batch, *, micro_batch: int, chunk_tokens: int = 1024
) -> tuple[float, int]:
    """:func:`causal_lm_loss` of ``batch`` computed ``micro_batch`` rows at a time.

    The same quantity (the mean over every counted token of the batch), with the peak
    memory of a ``micro_batch``-row forward: per-slice sums are added in float64 and
    divided by the total count once. Slices without a counted token are skipped.

    Raises:
        ValueError: ``micro_batch`` < 1, or the batch has no counted label.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
    rows = batch.input_ids.shape[0]
    if micro_batch >= rows:
        return causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)
    total, count = 0.0, 0
    for start in range(0, rows, micro_batch):
        part = Batch(input_ids=batch.input_ids[start : start + micro_batch],
                     attention_mask=batch.attention_mask[start : start + micro_batch],
                     labels=batch.labels[start : start + micro_batch])
        if not bool((part.labels[:, 1:] != IGNORE_INDEX).any()):
            continue
        mean, n_tokens = causal_lm_loss(model, part, chunk_tokens=chunk_tokens)
        total += mean * n_tokens
        count += n_tokens
    if count == 0:
        raise ValueError("the batch has no response tokens to compute a loss on")
    return total / count, count

