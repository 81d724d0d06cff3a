"""Measures the peak memory of each training mode and compares it with the estimate.

Run from the repository root::

    python -m profiles.profiler --model smollm2-135m --batch 4 --seq-len 128 \\
        --modes forward,mezo,sgd,adamw --out profiles/data/cpu-smollm2-b4-t128.json

For every mode a fresh child process (``python -m profiles.profiler --child MODE ...``)
imports torch and transformers, records the interpreter baseline (resident memory after
the imports, before anything is loaded), loads the model, builds a synthetic batch
(random token ids; the first half of every row is prompt, labelled -100, the second
half response), prepares the mode (parameter space, optimizer, compiled kernels), frees
what loading left behind, resets the high-water mark, runs the operation twice and
reports the peak:

* CPU: ``VmHWM`` (reset through ``/proc/self/clear_refs`` right before the operation)
  minus the interpreter baseline, i.e. the weights are inside the measured peak, as
  they are inside the estimate;
* CUDA: ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) after
  ``reset_peak_memory_stats``; nothing is allocated on the device before loading, so
  the baseline is zero. (Written, not tested here: this machine has no GPU.)

The parent compares each peak with :func:`profiles.estimator.estimate`, writes a JSON
profile and prints a table. The last line on stdout is the profile as one JSON object.

Modes: ``forward`` (our chunked loss under no_grad), ``mezo`` (one MeZOEngine.step on
the full-parameter space), ``sgd`` and ``adamw`` (``model(**batch, labels=...).loss``
backward + optimizer step + ``zero_grad(set_to_none=True)`` on every parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = ("forward", "mezo", "sgd", "adamw")
MIB = 1024 * 1024
SEED = 1234567
EPSILON = 1e-3
LEARNING_RATE = 1e-6

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _log(message: str) -> None:
    print(f"[profiler] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Child: one mode in a fresh process
# ---------------------------------------------------------------------------


def _child(mode: str, source: str, batch_size: int, seq_len: int, device: str, ops: int,
           chunk_tokens: int) -> dict:
    # Imports first, then the baseline: the interpreter with torch, transformers and our
    # modules loaded is what a client process costs before it holds a model.
    import torch
    import transformers  # noqa: F401

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import _measure  # bench/_measure.py

    from edge_client.data import Batch
    from edge_client.engines.mezo import MeZOConfig, MeZOEngine
    from edge_client.loss import causal_lm_loss
    from edge_client.model import load_model, resolve_model
    from edge_client.scope import ScopeConfig, build_space

    cuda = device.startswith("cuda")
    _measure.release_free_memory()
    interp_rss_kib = _measure.status_kib("VmRSS")

    model, _ = load_model(resolve_model(source), device=device)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100  # the prompt half is not counted
    batch = Batch(input_ids=input_ids.to(device),
                  attention_mask=torch.ones_like(input_ids).to(device),
                  labels=labels.to(device))

    if mode == "forward":
        def op() -> float:
            return causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)[0]
    elif mode == "mezo":
        model, space = build_space(model, ScopeConfig(kind="full"))
        engine = MeZOEngine(model, space, MeZOConfig(chunk_tokens=chunk_tokens))
        space.apply(SEED, 0.0)  # compiles the perturbation kernel once, before the baseline

        def op() -> float:
            _, plus, minus = engine.step(SEED, batch, LEARNING_RATE, EPSILON)
            return 0.5 * (plus + minus)
    elif mode in ("sgd", "adamw"):
        model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        if mode == "sgd":
            optimizer = torch.optim.SGD(params, lr=LEARNING_RATE)
        else:
            optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

        def op() -> float:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        labels=batch.labels)
            loss = out.loss
            loss.backward()
            value = float(loss.detach())
            del out, loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return value
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    _measure.release_free_memory()
    loaded_rss_kib = _measure.status_kib("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        loaded_device = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    reset = _measure.hwm_reset()
    seconds, losses = [], []
    for _ in range(ops):
        start = time.perf_counter()
        losses.append(op())
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak_hwm_kib = _measure.status_kib("VmHWM") if reset else None
    if peak_hwm_kib is None:
        peak_hwm_kib = _measure.ru_maxrss_kib()
    result = {
        "mode": mode,
        "hwm_reset": reset,
        "interp_rss_kib": interp_rss_kib,
        "loaded_rss_kib": loaded_rss_kib,
        "peak_hwm_kib": peak_hwm_kib,
        "host_peak_bytes": (peak_hwm_kib - interp_rss_kib) * 1024,
        "loaded_bytes": (loaded_rss_kib - interp_rss_kib) * 1024,
        "op_seconds": seconds,
        "losses": losses,
        "config": config.to_dict(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    if cuda:
        result["device_peak_allocated"] = torch.cuda.max_memory_allocated()
        result["device_peak_reserved"] = torch.cuda.max_memory_reserved()
        result["device_loaded_allocated"] = loaded_device
        result["device_name"] = torch.cuda.get_device_name()
        result["measured_bytes"] = result["device_peak_allocated"]
    else:
        result["measured_bytes"] = result["host_peak_bytes"]
    return result


def run_child(mode: str, source: str, batch_size: int, seq_len: int, *, device: str = "cpu",
              ops: int = 2, chunk_tokens: int = 1024) -> dict:
    """Runs one mode in a fresh interpreter and returns its measurement dict."""
    command = [sys.executable, "-m", "profiles.profiler", "--child", mode, "--model", source,
               "--batch", str(batch_size), "--seq-len", str(seq_len), "--device", device,
               "--ops", str(ops), "--chunk-tokens", str(chunk_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"the {mode} child failed with exit status {done.returncode}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


def profile(source: str, batch_size: int, seq_len: int, modes: list[str], *,
            device: str = "cpu", ops: int = 2, chunk_tokens: int = 1024) -> dict:
    """Measures every mode in its own child and pairs it with the estimate."""
    from profiles.estimator import ModelShape, estimate

    entries = []
    versions: dict = {}
    for mode in modes:
        _log(f"{mode}: batch {batch_size} x {seq_len} in a fresh child ...")
        child = run_child(mode, source, batch_size, seq_len, device=device, ops=ops,
                          chunk_tokens=chunk_tokens)
        shape = ModelShape.from_hf_config(child["config"], num_parameters=child["num_parameters"])
        est = estimate(shape, mode, batch=batch_size, seq_len=seq_len, chunk_tokens=chunk_tokens)
        measured = child["measured_bytes"]
        versions = {"torch": child["torch"], "transformers": child["transformers"],
                    "threads": child["threads"]}
        entries.append({
            "mode": mode,
            "batch": batch_size,
            "seq_len": seq_len,
            "measured_bytes": measured,
            "estimated_bytes": est.total,
            "rel_error": (est.total - measured) / measured,
            "breakdown": est.breakdown,
            "loaded_bytes": child["loaded_bytes"],
            "step_seconds": min(child["op_seconds"]),
            "op_seconds": child["op_seconds"],
            "hwm_reset": child["hwm_reset"],
            **({k: child[k] for k in ("device_peak_allocated", "device_peak_reserved")
                if k in child}),
        })
    return {
        "device": {"kind": device, "platform": platform.platform(),
                   "machine": platform.machine(), "cpus": os.cpu_count(),
                   "measure": "cuda max_memory_allocated" if device.startswith("cuda")
                   else "VmHWM above interpreter baseline"},
        **versions,
        "python": platform.python_version(),
        "model": source,
        "profiles": entries,
    }


def format_table(entries: list[dict]) -> str:
    rows = [f"{'mode':<8}{'setting':>10}{'estimated MiB':>15}{'measured MiB':>14}"
            f"{'error %':>9}{'step s':>9}"]
    for e in entries:
        rows.append(f"{e['mode']:<8}{str(e['batch']) + 'x' + str(e['seq_len']):>10}"
                    f"{e['estimated_bytes'] / MIB:>15.1f}{e['measured_bytes'] / MIB:>14.1f}"
                    f"{100 * e['rel_error']:>+9.1f}{e['step_seconds']:>9.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ops", type=int, default=2, help="operations per child (default 2)")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, help="where to write the JSON profile")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq_len < 4 or args.ops < 1:
        parser.error("--batch and --ops must be >= 1 and --seq-len >= 4")

    source = args.model
    if Path(source).exists():
        source = str(Path(source).resolve())
    if args.child:
        result = _child(args.child, source, args.batch, args.seq_len, args.device, args.ops,
                        args.chunk_tokens)
        print(json.dumps(result), flush=True)
        return 0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes must name some of {', '.join(MODES)}; got {args.modes!r}")
    result = profile(source, args.batch, args.seq_len, modes, device=args.device,
                     ops=args.ops, chunk_tokens=args.chunk_tokens)
    print(format_table(result["profiles"]), file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        _log(f"wrote {args.out}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
