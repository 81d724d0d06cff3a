#!/usr/bin/env python
"""How much the exact projection ``<delta, z(seed)>`` costs next to a perturbation pass.

Run from the repository root::

    python bench/projection.py                 # SmolLM2-135M and LoRA r=8 q/v sizes
    python bench/projection.py --repeats 9 --k 64
    python bench/projection.py --full 4194304 --lora 65536 --repeats 3   # a quick run

Two flat float32 spaces: SmolLM2-135M's full parameter space (134,515,008 elements
padded) and a LoRA r=8 space on q_proj/v_proj (460,800). On each, with the compiled
kernels forced (the LoRA size is below the size where "auto" would compile):

``projection_s`` / ``perturb_s``
    One ``project_rademacher(delta, [seed])`` call (the max-|delta| read that fixes the
    fixed-point scale, then one fused pass) and one ``apply_rademacher`` pass, timed
    alternately; medians of ``--repeats``. ``projection_vs_perturb`` (full size) and
    ``projection_vs_perturb_lora`` are the medians of the per-repetition ratios.
``projection_k_per_seed_s``
    One call with K = ``--k`` seeds, divided by K: the kernel projects onto
    ``PROJECTION_SEEDS_PER_PASS`` seeds per read of delta. Beside it, K separate
    one-seed calls (the same values, checked), and a sweep of seeds per pass (one call
    with 32 seeds for each setting, full size, the settings alternated) that shows why
    the constant is what it is.
``eager_projection_s``
    The eager fallback's one-seed call at full size, next to the eager perturbation.

Compilation is timed separately and never counted. Every repetition goes to
``bench/results/projection.json`` (``bench/_results.py``); the last line printed on
stdout is one JSON object with the figures (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _path in (str(REPO_ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _results import write_result  # noqa: E402  (bench/_results.py)

import torch  # noqa: E402

from protocol import perturb  # noqa: E402
from protocol.perturb import apply_rademacher, project_rademacher  # noqa: E402

FULL_ELEMENTS = 134_515_008  # SmolLM2-135M, every parameter, padded to a multiple of 64
LORA_ELEMENTS = 460_800  # LoRA r=8 on q_proj and v_proj of SmolLM2-135M's 30 layers
TARGET_RATIO = 1.5  # projection per seed <= ~1.5x a perturbation pass
SWEEP_SEEDS = 32
SWEEP_PER_PASS = (1, 4, 8, 16, 32)
SEED = 1234567


def _log(message: str) -> None:
    print(f"[projection] {message}", file=sys.stderr, flush=True)


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _summary(times: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "all": times}


# A repetition of a fast call repeats it until it lasts this long, so that timer
# resolution and scheduler noise (on a shared machine) stay small next to it.
MIN_REPETITION_S = 0.05


def _alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, once per repetition, in turn, so drift hits
    them alike; a fast call is repeated within a repetition (``MIN_REPETITION_S``)."""
    calls = {name: max(1, math.ceil(MIN_REPETITION_S / max(_timed(fn), 1e-6))) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            times[name].append((time.perf_counter() - started) / calls[name])
    return times


def measure_size(n: int, k: int, repeats: int, *, eager: bool, separate: bool) -> dict[str, Any]:
    """Every timing on one space size; see the module docstring."""
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(n, generator=gen) * 1e-3  # a plausible update
    theta = torch.randn(n, generator=gen)
    seeds = [SEED + i for i in range(k)]
    out: dict[str, Any] = {"elements": n}

    # Warm-up: compile every kernel timed below (one- and k-seed passes, the perturbation).
    out["compile_s"] = {
        "projection_1": _timed(lambda: project_rademacher(delta, seeds[:1], backend="compiled")),
        "projection_k": _timed(lambda: project_rademacher(delta, seeds, backend="compiled")),
        "perturb": _timed(lambda: apply_rademacher(theta, SEED, 1e-3, backend="compiled")),
    }
    one, kernel = project_rademacher(delta, seeds[:1], backend="compiled")
    if kernel != "compiled" or perturb.last_kernel() != "compiled":
        raise SystemExit("the compiled kernels did not run here; this benchmark compares them")

    _log(f"n = {n:,}: one projection vs one perturbation, {repeats} alternating repetitions")
    pair = _alternate({
        "projection": lambda: project_rademacher(delta, seeds[:1], backend="compiled"),
        "perturb": lambda: apply_rademacher(theta, SEED, 1e-3, backend="compiled"),
    }, repeats)
    ratios = [p / q for p, q in zip(pair["projection"], pair["perturb"])]
    out["projection_s"] = _summary(pair["projection"])
    out["perturb_s"] = _summary(pair["perturb"])
    out["ratio"] = _summary(ratios)

    _log(f"n = {n:,}: K = {k} seeds in one call")
    many, _ = project_rademacher(delta, seeds, backend="compiled")
    k_times = _alternate({"k": lambda: project_rademacher(delta, seeds, backend="compiled")}, repeats)["k"]
    out["k"] = k
    out["k_call_s"] = _summary(k_times)
    out["k_per_seed_s"] = statistics.median(k_times) / k
    out["k_per_seed_vs_perturb"] = out["k_per_seed_s"] / out["perturb_s"]["median"]
    if separate:
        _log(f"n = {n:,}: K = {k} separate one-seed calls")
        singles = [project_rademacher(delta, [seed], backend="compiled")[0][0] for seed in seeds]
        if singles != many:
            raise SystemExit("one call with K seeds and K one-seed calls disagree")

        def one_by_one() -> None:
            for seed in seeds:
                project_rademacher(delta, [seed], backend="compiled")

        out["separate_calls_s"] = _summary(_alternate({"separate": one_by_one}, repeats)["separate"])
    if eager:
        _log(f"n = {n:,}: eager kernels, {repeats} alternating repetitions")
        eager_one, eager_kernel = project_rademacher(delta, seeds[:1], backend="eager")
        if eager_kernel != "eager" or eager_one != one:
            raise SystemExit("the eager projection disagrees with the compiled one")
        eager_pair = _alternate({
            "projection": lambda: project_rademacher(delta, seeds[:1], backend="eager"),
            "perturb": lambda: apply_rademacher(theta, SEED, 1e-3, backend="eager"),
        }, repeats)
        out["eager_projection_s"] = _summary(eager_pair["projection"])
        out["eager_perturb_s"] = _summary(eager_pair["perturb"])
    return out


def sweep_seeds_per_pass(n: int, repeats: int) -> dict[int, dict[str, Any]]:
    """Per-seed time of one call with SWEEP_SEEDS seeds for each number of seeds per pass
    (settings alternated within each repetition, so load changes hit them alike)."""
    delta = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 1e-3
    seeds = [SEED + i for i in range(SWEEP_SEEDS)]
    saved = perturb.PROJECTION_SEEDS_PER_PASS

    def call_with(per_pass: int) -> Callable[[], Any]:
        def call() -> Any:
            perturb.PROJECTION_SEEDS_PER_PASS = per_pass
            return project_rademacher(delta, seeds, backend="compiled")
        return call

    calls = {per_pass: call_with(per_pass) for per_pass in SWEEP_PER_PASS}
    try:
        compile_s = {}
        reference = None
        for per_pass, call in calls.items():
            _log(f"n = {n:,}: compiling {per_pass} seeds per pass")
            compile_s[per_pass] = _timed(call)
            values, _ = call()
            if reference is not None and values != reference:
                raise SystemExit("the seeds-per-pass setting changed the projected values")
            reference = values
        _log(f"n = {n:,}: seeds per pass {SWEEP_PER_PASS}, {repeats} alternating repetitions")
        times = _alternate(calls, repeats)
    finally:
        perturb.PROJECTION_SEEDS_PER_PASS = saved
    return {per_pass: {"compile_s": compile_s[per_pass], "call_s": _summary(times[per_pass]),
                       "per_seed_s": statistics.median(times[per_pass]) / SWEEP_SEEDS}
            for per_pass in SWEEP_PER_PASS}


def _fmt(summary: dict[str, Any]) -> str:
    return f"{summary['median']:9.4f} s  [{summary['min']:.4f}, {summary['max']:.4f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", type=int, default=FULL_ELEMENTS, help="full space size (elements)")
    parser.add_argument("--lora", type=int, default=LORA_ELEMENTS, help="LoRA space size (elements)")
    parser.add_argument("--k", type=int, default=64, help="seeds in the many-seed call (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each timing (default 5)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.k < 1:
        parser.error("--repeats and --k must be at least 1")
    for name in ("full", "lora"):
        if getattr(args, name) < 64 or getattr(args, name) % 64:
            parser.error(f"--{name} must be a positive multiple of 64")

    started = time.perf_counter()
    full = measure_size(args.full, args.k, args.repeats, eager=True, separate=True)
    lora = measure_size(args.lora, args.k, args.repeats, eager=True, separate=True)
    sweep = sweep_seeds_per_pass(args.full, args.repeats)
    total_s = time.perf_counter() - started

    rows = [
        f"edgefed projection benchmark: torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} CPUs; total {total_s:.0f} s; medians [min, max] of {args.repeats}",
    ]
    for label, m in (("full (SmolLM2-135M)", full), ("LoRA r=8 q/v", lora)):
        k, perturb_s = m["k"], m["perturb_s"]["median"]
        separate_per_seed = m["separate_calls_s"]["median"] / k
        rows += [
            "",
            f"{label}: {m['elements']:,} fp32 elements",
            f"   {'apply_rademacher, compiled':<42}{_fmt(m['perturb_s'])}   1.00x",
            f"   {'project_rademacher, 1 seed, compiled':<42}{_fmt(m['projection_s'])}  "
            f"{m['ratio']['median']:5.2f}x  (target <= {TARGET_RATIO}x)",
            f"   {'project_rademacher, ' + str(k) + ' seeds, per seed':<42}{m['k_per_seed_s']:9.4f} s"
            f"{'':20}{m['k_per_seed_vs_perturb']:5.2f}x  (call {m['k_call_s']['median']:.3f} s)",
            f"   {str(k) + ' one-seed calls, per seed':<42}{separate_per_seed:9.4f} s"
            f"{'':20}{separate_per_seed / perturb_s:5.2f}x",
            f"   {'apply_rademacher, eager':<42}{_fmt(m['eager_perturb_s'])}",
            f"   {'project_rademacher, 1 seed, eager':<42}{_fmt(m['eager_projection_s'])}",
            "   compile (not counted): "
            + ", ".join(f"{name} {v:.1f} s" for name, v in m["compile_s"].items()),
        ]
    rows += ["", f"seeds per compiled pass, one {SWEEP_SEEDS}-seed call at {args.full:,} elements:"]
    for per_pass, row in sweep.items():
        marker = "  <- PROJECTION_SEEDS_PER_PASS" if per_pass == perturb.PROJECTION_SEEDS_PER_PASS else ""
        rows.append(f"   {per_pass} per pass: {row['per_seed_s']:.4f} s per seed  "
                    f"({row['per_seed_s'] / full['perturb_s']['median']:.2f}x a perturbation){marker}")
    print("\n".join(rows), flush=True)

    result = {
        "projection_vs_perturb": full["ratio"]["median"],
        "projection_vs_perturb_lora": lora["ratio"]["median"],
        "projection_s": full["projection_s"]["median"],
        "perturb_s": full["perturb_s"]["median"],
        "eager_projection_s": full["eager_projection_s"]["median"],
        "projection_k_per_seed_s": full["k_per_seed_s"],
        "projection_k_per_seed_vs_perturb": full["k_per_seed_vs_perturb"],
        "k": args.k,
        "seeds_per_pass": perturb.PROJECTION_SEEDS_PER_PASS,
    }
    details = {"full": full, "lora": lora, "seeds_per_pass_sweep": sweep, "total_s": total_s}
    path = write_result("projection", result, details)
    _log(f"wrote {path.relative_to(REPO_ROOT)}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
