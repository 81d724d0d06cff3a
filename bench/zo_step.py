#!/usr/bin/env python
"""How much one zeroth-order (MeZO) step costs next to the forward passes it contains.

Run from the repository root::

    python bench/zo_step.py                       # SmolLM2-135M, batch 8 x 128 tokens
    python bench/zo_step.py --model tiny          # a tiny random Llama (smoke run)
    python bench/zo_step.py --model PATH --batch-size 4 --seq-len 256 --repeats 5

Three ratios, each measured in the same run (CPU, torch's default thread count):

``perturb_vs_add``
    One ``apply_rademacher(space.flat, seed, 1e-3)`` over the full-parameter space
    (default backend: the fused compiled kernel for a space this big), divided by one
    ``p.add_(1.0)`` pass over every parameter of the model (the same elements; the
    memory-bound floor). ``perturb_eager_vs_add`` is the same for the eager fallback.
``zo_step_vs_two_forwards``
    One ``MeZOEngine.step`` (two ``causal_lm_loss`` forwards + three perturbation
    passes) divided by two ``causal_lm_loss`` forwards on the same batch, timed
    back-to-back. The two are measured interleaved, so drift hits both alike.
``zo_peak_vs_forward_peak``
    Peak resident memory of ZO steps vs plain Hugging Face forwards
    (``model(input_ids, attention_mask, labels)`` under ``torch.no_grad()``, which builds
    the full (B, T, vocab) logits), each above the RSS of the interpreter with torch
    imported, each in its own fresh child process. The weights are inside both peaks.

Times are the best (minimum) of several repeats after at least one warm-up call of the
same operation; compilation time is reported separately and never counted. The last
line printed on stdout is one JSON object with the ratios, the raw figures and the
versions (progress messages go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _path in (str(REPO_ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import _measure  # noqa: E402  (bench/_measure.py, found through HERE)

# Heavy imports come after the path set-up; a child records its interpreter baseline
# right after them, before it loads anything.
import torch  # noqa: E402
import transformers  # noqa: E402

from edge_client.data import Batch, Record, collate, format_prompt, tokenize  # noqa: E402
from edge_client.engines.mezo import MeZOConfig, MeZOEngine  # noqa: E402
from edge_client.loss import causal_lm_loss  # noqa: E402
from edge_client.model import DEFAULT_MODEL, load_model, resolve_model  # noqa: E402
from edge_client.scope import ScopeConfig, build_space  # noqa: E402
from protocol import perturb  # noqa: E402
from protocol.perturb import apply_rademacher  # noqa: E402

TARGETS = {
    "perturb_vs_add": 3.0,
    "zo_peak_vs_forward_peak": 1.0,
    "zo_step_vs_two_forwards": 1.10,
}
SEED = 1234567
EPSILON = 1e-3
LEARNING_RATE = 1e-6
MIB = 1024 * 1024

_WORDS = (
    "river mountain signal packet kernel matrix gradient ledger client server round "
    "seed scalar update memory bandwidth thread cache vector tensor model weight "
    "token sentence paragraph summary answer question careful simple quickly slowly "
    "because however therefore although green blue orange winter summer morning "
    "evening library garden window engine battery network protocol record value"
).split()


def _log(message: str) -> None:
    print(f"[zo_step] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Model and batch
# ---------------------------------------------------------------------------


def _model_dir(source: str) -> Path:
    if source == "tiny":
        from edge_client.tiny import make_tiny_llama

        return make_tiny_llama(Path(tempfile.gettempdir()) / "edgefed-bench-tiny")
    return resolve_model(source)


def build_batch(tokenizer, batch_size: int, seq_len: int, seed: int = 0) -> tuple[Batch, int]:
    """``batch_size`` synthetic instruction/response rows of exactly ``seq_len`` tokens.

    Each row's prompt (:func:`format_prompt` of a generated instruction) is grown to
    about half of ``seq_len`` tokens; the response is long enough to be truncated, so it
    fills the other half and carries the labels. Returns (batch, counted labels).
    """
    if seq_len < 4:
        raise SystemExit("--seq-len must be at least 4")
    rng = random.Random(seed)
    half = seq_len // 2

    def prompt_len(instruction: str) -> int:
        return len(tokenizer(format_prompt(instruction), add_special_tokens=True)["input_ids"])

    records = []
    for row in range(batch_size):
        instruction = ""
        while True:
            candidate = f"{instruction} {rng.choice(_WORDS)}".lstrip()
            if prompt_len(candidate) > half:
                break
            instruction = candidate
        response = " ".join(rng.choice(_WORDS) for _ in range(seq_len))
        records.append(Record(instruction=instruction, response=response, line=row + 1))
    examples = tokenize(records, tokenizer, max_seq_len=seq_len)
    if len(examples) != batch_size or any(len(e.input_ids) != seq_len for e in examples):
        raise SystemExit(f"could not build {batch_size} rows of exactly {seq_len} tokens")
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    counted = int((batch.labels[:, 1:] != -100).sum())
    return batch, counted


def load_everything(source: str, batch_size: int, seq_len: int):
    """(model, space, batch, counted labels, model dir): the full-parameter scope."""
    model_dir = _model_dir(source)
    model, tokenizer = load_model(model_dir)
    model, space = build_space(model, ScopeConfig(kind="full"))
    batch, counted = build_batch(tokenizer, batch_size, seq_len)
    return model, space, batch, counted, model_dir


def hf_forward(model, batch: Batch) -> float:
    """The standard Hugging Face forward + loss: materialises (B, T, vocab) logits."""
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    labels=batch.labels)
        loss = float(out.loss)
    del out
    return loss


# ---------------------------------------------------------------------------
# Child: peak memory of one kind of operation in a fresh process
# ---------------------------------------------------------------------------


def child_main(kind: str, source: str, batch_size: int, seq_len: int, ops: int) -> None:
    _measure.release_free_memory()
    interp_rss = _measure.status_kib("VmRSS")
    interp_ru = _measure.ru_maxrss_kib()

    model, space, batch, counted, _ = load_everything(source, batch_size, seq_len)
    compile_s = None
    if kind == "zo":
        engine = MeZOEngine(model, space, MeZOConfig())
        # One-time cost, not the step's: compile the perturbation kernel before the
        # baseline (coefficient 0 leaves the weights as they are).
        start = time.perf_counter()
        space.apply(SEED, 0.0)
        compile_s = time.perf_counter() - start

        def op() -> float:
            with torch.no_grad():
                _, plus, minus = engine.step(SEED, batch, LEARNING_RATE, EPSILON)
            return 0.5 * (plus + minus)
    else:
        def op() -> float:
            return hf_forward(model, batch)

    _measure.release_free_memory()
    loaded_ru = _measure.ru_maxrss_kib()
    loaded_hwm = _measure.status_kib("VmHWM")
    loaded_rss = _measure.status_kib("VmRSS")
    reset = _measure.hwm_reset()
    losses, seconds = [], []
    for _ in range(ops):
        start = time.perf_counter()
        losses.append(op())
        seconds.append(time.perf_counter() - start)
    result = {
        "kind": kind,
        "interp_rss_kib": interp_rss,
        "interp_ru_maxrss_kib": interp_ru,
        "loaded_rss_kib": loaded_rss,
        "loaded_rss_anon_kib": _measure.status_kib("RssAnon"),
        "loaded_hwm_kib": loaded_hwm,
        "loaded_ru_maxrss_kib": loaded_ru,
        "hwm_reset": reset,
        "peak_hwm_kib": _measure.status_kib("VmHWM"),
        "peak_ru_maxrss_kib": _measure.ru_maxrss_kib(),
        "final_rss_kib": _measure.status_kib("VmRSS"),
        "ops": ops,
        "op_seconds": seconds,
        "losses": losses,
        "counted_labels": counted,
        "compile_seconds": compile_s,
        "perturb_backend": perturb._resolve_backend(space.backend, space.flat.numel()),
    }
    print(json.dumps(result), flush=True)


def run_child(kind: str, args: argparse.Namespace) -> dict:
    source = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
               "--model", source, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--child-ops", str(args.child_ops)]
    _log(f"memory: fresh child process for the {kind} op ...")
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {kind} child failed with exit status {done.returncode}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


def _peak_figures(child: dict) -> dict:
    """Peaks in bytes above the interpreter and above the loaded baseline."""
    kib = 1024
    if child["hwm_reset"] and child["peak_hwm_kib"] is not None:
        peak = child["peak_hwm_kib"]
        method = "VmHWM reset after baseline"
    else:
        peak = child["peak_ru_maxrss_kib"]
        method = "ru_maxrss"
    return {
        "method": method,
        "peak_above_interp": (peak - child["interp_rss_kib"]) * kib,
        "peak_above_loaded": (peak - child["loaded_rss_kib"]) * kib,
        # What ru_maxrss alone would say had the high-water mark not been reset after
        # loading: the larger of the loading transient and the op's peak.
        "ru_no_reset_above_interp": (max(child["loaded_ru_maxrss_kib"], child["peak_ru_maxrss_kib"])
                                     - child["interp_rss_kib"]) * kib,
        "loaded_above_interp": (child["loaded_rss_kib"] - child["interp_rss_kib"]) * kib,
        "load_transient_above_interp": (child["loaded_hwm_kib"] - child["interp_rss_kib"]) * kib
        if child["loaded_hwm_kib"] is not None else None,
    }


# ---------------------------------------------------------------------------
# Parent: timings
# ---------------------------------------------------------------------------


def time_perturbation(model, space, repeats: int) -> dict:
    params = list(model.parameters())
    n_param_elements = sum(p.numel() for p in params)
    flat = space.flat
    sign = [1.0]

    def add_pass() -> None:
        value = sign[0]
        with torch.no_grad():
            for p in params:
                p.add_(value)

    def rademacher(backend: str) -> None:
        apply_rademacher(flat, SEED, sign[0] * EPSILON, backend=backend)

    resolved = perturb._resolve_backend("auto", flat.numel())

    # Warm-up: the first default-backend call compiles (timed, reported, not counted).
    first = _measure.timed(lambda: rademacher("auto"))
    compiled_ok = resolved != "compiled" or perturb._compiled_fn is not None
    sign[0] = -sign[0]
    _measure.timed(lambda: rademacher("auto"))
    for fn in (add_pass, add_pass, lambda: rademacher("eager"), lambda: rademacher("eager")):
        sign[0] = -sign[0]
        _measure.timed(fn)

    samples: dict[str, list[float]] = {"add": [], "auto": [], "eager": []}
    for _ in range(repeats):
        for name, fn in (("add", add_pass), ("auto", lambda: rademacher("auto")),
                         ("eager", lambda: rademacher("eager"))):
            sign[0] = -sign[0]  # alternate +/- so the weights stay where they were
            samples[name].append(_measure.timed(fn))
    return {
        "param_elements": n_param_elements,
        "space_elements": flat.numel(),
        "resolved_backend": resolved if compiled_ok else "eager (compile unavailable)",
        "first_call_s": first,
        "add_s": min(samples["add"]),
        "perturb_s": min(samples["auto"]),
        "perturb_eager_s": min(samples["eager"]),
        "samples": samples,
    }


def time_step(model, space, batch: Batch, repeats: int) -> dict:
    config = MeZOConfig()
    engine = MeZOEngine(model, space, config)

    def two_forwards() -> None:
        causal_lm_loss(model, batch, chunk_tokens=config.chunk_tokens)
        causal_lm_loss(model, batch, chunk_tokens=config.chunk_tokens)

    def one_forward() -> None:
        causal_lm_loss(model, batch, chunk_tokens=config.chunk_tokens)

    def step() -> None:
        engine.step(SEED, batch, LEARNING_RATE, EPSILON)

    # Warm-up of each measured op (the perturbation kernel is already compiled).
    _measure.timed(one_forward)
    _measure.timed(step)

    samples: dict[str, list[float]] = {"two_forwards": [], "step": [], "one_forward": []}
    for r in range(repeats):
        order = (("two_forwards", two_forwards), ("step", step))
        for name, fn in order if r % 2 == 0 else reversed(order):
            samples[name].append(_measure.timed(fn))
    samples["one_forward"].append(_measure.timed(one_forward))
    return {
        "two_forwards_s": min(samples["two_forwards"]),
        "step_s": min(samples["step"]),
        "one_forward_s": min(samples["one_forward"]),
        "samples": samples,
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / MIB:8.1f} MiB"


def _verdict(key: str, value: float) -> str:
    return "ok" if value <= TARGETS[key] else "MISSES"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model source (default {DEFAULT_MODEL!r}; 'tiny' = a tiny "
                             "random Llama, or a model directory / .gguf file)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats of the step and of the two forwards (default 5); "
                             "the perturbation passes get 5x as many")
    parser.add_argument("--child-ops", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("forward", "zo"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be at least 1")

    if args.child:
        child_main(args.child, args.model, args.batch_size, args.seq_len, args.child_ops)
        return 0

    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    # Memory first, in fresh processes, while this one holds nothing but the imports.
    fwd_child = run_child("forward", args)
    zo_child = run_child("zo", args)
    fwd_mem, zo_mem = _peak_figures(fwd_child), _peak_figures(zo_child)

    _log("timing: loading the model ...")
    model, space, batch, counted, model_dir = load_everything(args.model, args.batch_size,
                                                              args.seq_len)
    vocab = model.config.vocab_size
    _log("timing: perturbation passes ...")
    pt = time_perturbation(model, space, repeats=5 * args.repeats)
    _log("timing: ZO step vs two forwards ...")
    st = time_step(model, space, batch, repeats=args.repeats)
    total_s = time.perf_counter() - started

    perturb_vs_add = pt["perturb_s"] / pt["add_s"]
    perturb_eager_vs_add = pt["perturb_eager_s"] / pt["add_s"]
    step_ratio = st["step_s"] / st["two_forwards_s"]
    # The same ratio built from its parts: forward-to-forward noise (a few percent on a
    # shared CPU) is larger than the three passes, so this one is steadier.
    step_ratio_parts = 1.0 + 3.0 * pt["perturb_s"] / st["two_forwards_s"]
    mem_ratio = zo_mem["peak_above_interp"] / fwd_mem["peak_above_interp"]
    mem_ratio_ru = zo_mem["ru_no_reset_above_interp"] / fwd_mem["ru_no_reset_above_interp"]
    weights_bytes = space.flat.numel() * 4
    hf_logits_bytes = args.batch_size * args.seq_len * vocab * 4

    rows = [
        f"edgefed ZO step benchmark: {args.model} ({pt['param_elements'] / 1e6:.1f}M params, "
        f"vocab {vocab}), batch {args.batch_size} x {args.seq_len} tokens, {counted} labelled",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; total {total_s:.0f} s",
        "",
        "1. perturbation pass over the full parameter space "
        f"({pt['space_elements']:,} fp32 elements), best of {5 * args.repeats}",
        f"   {'p.add_(1.0) over every parameter (floor)':<44}{pt['add_s']:9.4f} s   1.00x",
        f"   {'apply_rademacher, default: ' + pt['resolved_backend']:<44}{pt['perturb_s']:9.4f} s"
        f"  {perturb_vs_add:5.2f}x   target <= {TARGETS['perturb_vs_add']}x: "
        f"{_verdict('perturb_vs_add', perturb_vs_add)}",
        f"   {'apply_rademacher, eager fallback':<44}{pt['perturb_eager_s']:9.4f} s"
        f"  {perturb_eager_vs_add:5.2f}x",
        f"   (first default-backend call, incl. compile: {pt['first_call_s']:.1f} s; not counted)",
        "",
        f"2. time, best of {args.repeats} (interleaved)",
        f"   {'one causal_lm_loss forward':<44}{st['one_forward_s']:9.3f} s",
        f"   {'two causal_lm_loss forwards':<44}{st['two_forwards_s']:9.3f} s   1.00x",
        f"   {'one MeZOEngine.step (2 fwd + 3 passes)':<44}{st['step_s']:9.3f} s"
        f"  {step_ratio:5.3f}x   target <= {TARGETS['zo_step_vs_two_forwards']}x: "
        f"{_verdict('zo_step_vs_two_forwards', step_ratio)}",
        f"   step - two forwards = {st['step_s'] - st['two_forwards_s']:+.3f} s "
        f"(3 perturbation passes = {3 * pt['perturb_s']:.3f} s, "
        f"so from its parts the step is {step_ratio_parts:.3f}x)",
        "",
        f"3. peak RSS, fresh process each, {args.child_ops} ops each ({fwd_mem['method']})",
        "                                   above interpreter   above loaded   op time",
        f"   HF model(..., labels) no_grad  {_mb(fwd_mem['peak_above_interp'])}"
        f"   {_mb(fwd_mem['peak_above_loaded'])}   {min(fwd_child['op_seconds']):6.2f} s",
        f"   MeZOEngine.step (chunked loss) {_mb(zo_mem['peak_above_interp'])}"
        f"   {_mb(zo_mem['peak_above_loaded'])}   {min(zo_child['op_seconds']):6.2f} s",
        f"   ratio ZO / forward             {mem_ratio:8.3f}x"
        f"   target <= {TARGETS['zo_peak_vs_forward_peak']}x: "
        f"{_verdict('zo_peak_vs_forward_peak', mem_ratio)}",
        f"   weights {_mb(weights_bytes).strip()} are in both; HF logits alone "
        f"{_mb(hf_logits_bytes).strip()} per fp32 (B, T, V) copy",
        f"   after-load baseline above interpreter: forward child "
        f"{_mb(fwd_mem['loaded_above_interp']).strip()}, ZO child "
        f"{_mb(zo_mem['loaded_above_interp']).strip()}: the ZO child ran the perturbation "
        f"once ({zo_child['perturb_backend']}",
        f"   backend, {zo_child['compile_seconds']:.1f} s incl. any compile) before its baseline; "
        "what that left resident "
        f"({_mb(zo_mem['loaded_above_interp'] - fwd_mem['loaded_above_interp']).strip()}) "
        "counts against ZO above",
        f"   loading itself peaked at {_mb(fwd_mem['load_transient_above_interp']).strip()} above "
        "the interpreter (weights copied during from_pretrained/adopt);",
        "   the high-water mark is reset after loading, else ru_maxrss would report that: "
        f"ratio {mem_ratio_ru:.3f}x",
    ]
    print("\n".join(rows), flush=True)

    summary = {
        "perturb_vs_add": round(perturb_vs_add, 4),
        "perturb_eager_vs_add": round(perturb_eager_vs_add, 4),
        "zo_step_vs_two_forwards": round(step_ratio, 4),
        "zo_peak_vs_forward_peak": round(mem_ratio, 4),
        "zo_step_vs_two_forwards_from_parts": round(step_ratio_parts, 4),
        "zo_peak_vs_forward_peak_ru_maxrss_no_reset": round(mem_ratio_ru, 4),
        "targets": TARGETS,
        "seconds": {
            "add_pass": pt["add_s"],
            "perturb": pt["perturb_s"],
            "perturb_eager": pt["perturb_eager_s"],
            "perturb_first_call_incl_compile": pt["first_call_s"],
            "one_forward": st["one_forward_s"],
            "two_forwards": st["two_forwards_s"],
            "zo_step": st["step_s"],
            "hf_forward_child_best": min(fwd_child["op_seconds"]),
            "zo_step_child_best": min(zo_child["op_seconds"]),
            "zo_child_compile": zo_child["compile_seconds"],
            "total_run": total_s,
        },
        "bytes": {
            "forward_peak_above_interp": fwd_mem["peak_above_interp"],
            "zo_peak_above_interp": zo_mem["peak_above_interp"],
            "forward_peak_above_loaded": fwd_mem["peak_above_loaded"],
            "zo_peak_above_loaded": zo_mem["peak_above_loaded"],
            "forward_loaded_above_interp": fwd_mem["loaded_above_interp"],
            "zo_loaded_above_interp": zo_mem["loaded_above_interp"],
            "forward_ru_maxrss_no_reset_above_interp": fwd_mem["ru_no_reset_above_interp"],
            "zo_ru_maxrss_no_reset_above_interp": zo_mem["ru_no_reset_above_interp"],
            "forward_load_transient_above_interp": fwd_mem["load_transient_above_interp"],
            "zo_load_transient_above_interp": zo_mem["load_transient_above_interp"],
            "weights": weights_bytes,
            "hf_logits_one_copy": hf_logits_bytes,
        },
        "memory_method": fwd_mem["method"],
        "samples_seconds": {"perturbation": pt["samples"], "step": st["samples"]},
        "model": args.model,
        "model_dir": str(model_dir),
        "param_elements": pt["param_elements"],
        "space_elements": pt["space_elements"],
        "vocab_size": vocab,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "labelled_tokens": counted,
        "repeats": args.repeats,
        "perturb_backend": pt["resolved_backend"],
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": "cpu",
        "platform": platform.platform(),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
