"""bench/zo_step.py: which figures it reports and how (not run at full size here).

The memory children are replaced by stand-ins with known peaks (the real ones load the
model in three fresh processes); the timing part runs for real on the tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench" / "zo_step.py"
MIB_IN_KIB = 1024


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("zo_step_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(kind: str, peak_mib: int, kernel: str | None) -> dict[str, Any]:
    """What a memory child prints: 100 MiB interpreter, 600 MiB loaded, the given peak."""
    interp, loaded = 100 * MIB_IN_KIB, 600 * MIB_IN_KIB
    return {
        "kind": kind, "interp_rss_kib": interp, "interp_ru_maxrss_kib": interp,
        "space_rss_kib": loaded - (50 * MIB_IN_KIB if kind == "zo" else 0),
        "loaded_rss_kib": loaded, "loaded_hwm_kib": 900 * MIB_IN_KIB,
        "loaded_ru_maxrss_kib": 900 * MIB_IN_KIB, "hwm_reset": True,
        "peak_hwm_kib": interp + peak_mib * MIB_IN_KIB,
        "peak_ru_maxrss_kib": interp + peak_mib * MIB_IN_KIB, "op_seconds": [1.0, 1.0],
        "compile_seconds": 0.5 if kind == "zo" else None, "kernel": kernel,
        "step_part_rise_bytes": {"perturb +eps": 0, "loss L+": 2**20} if kind == "zo" else None,
    }


def test_the_step_benchmark_reports_like_for_like_figures_the_kernel_and_every_repetition(
        monkeypatch, capsys):
    zo_step = _bench_module()
    peaks = {"forward": 800, "hf": 1000, "zo": 840}
    children_run: list[str] = []

    def fake_child(kind: str, args: Any) -> dict[str, Any]:
        children_run.append(kind)
        return _child(kind, peaks[kind], "compiled" if kind == "zo" else None)

    saved: dict[str, Any] = {}

    def fake_write_result(name: str, result: dict, details: dict) -> Path:
        saved.update(name=name, result=result, details=details)
        return REPO_ROOT / "bench" / "results" / f"{name}.json"

    def timed_without_gc(fn: Any) -> float:
        # The benchmark collects garbage before each timed call (tens of ms with torch
        # loaded), which would dominate this test's run time; the ops still run.
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    monkeypatch.setattr(zo_step, "run_child", fake_child)
    monkeypatch.setattr(zo_step, "write_result", fake_write_result)
    monkeypatch.setattr(zo_step._measure, "timed", timed_without_gc)
    repeats = 3
    assert zo_step.main(["--model", "tiny", "--batch-size", "1", "--seq-len", "128",
                         "--repeats", str(repeats)]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out.strip().splitlines()[-1])

    assert sorted(children_run) == ["forward", "hf", "zo"]
    # Like for like: the ZO step over a forward with the same chunked loss; the HF
    # forward is a second, labelled figure.
    assert printed["zo_peak_vs_forward_peak"] == pytest.approx(840 / 800, abs=1e-4)
    assert printed["zo_peak_vs_hf_forward_peak"] == pytest.approx(840 / 1000, abs=1e-4)
    assert printed["bytes"]["zo_kernel_setup_resident"] == 50 * 2**20
    # The tiny model's space is below the compile threshold: the eager kernel ran, and
    # the benchmark says so.
    assert printed["kernel"] == "eager"
    assert "perturbation kernel used by the step: eager" in out

    # The measured ratio is the median of interleaved repetitions, with its spread.
    rows = saved["details"]["step_repetitions"]
    assert len(rows) == repeats
    assert [row["order"] for row in rows] == ["step, forward, forward", "forward, forward, step",
                                              "step, forward, forward"]
    ratios = [row["step"] / sum(row["forwards"]) for row in rows]
    assert printed["zo_step_vs_two_forwards"] == pytest.approx(statistics.median(ratios), abs=1e-4)
    assert printed["zo_step_vs_two_forwards_spread"] == pytest.approx([min(ratios), max(ratios)], abs=1e-4)
    assert "min, max" in printed["spread"]
    assert "The parts leave out" in out

    # Everything goes to bench/results/zo_step.json: the figures printed and every
    # repetition, every child's counters.
    assert saved["name"] == "zo_step" and saved["result"] == printed
    assert len(saved["details"]["perturbation_repetitions"]) == 5 * repeats
    assert set(saved["details"]["children"]) == {"forward", "hf", "zo"}
    for key in ("perturb_vs_add", "perturb_eager_vs_add", "zo_step_vs_two_forwards_from_parts",
                "zo_peak_vs_forward_peak_ru_maxrss_no_reset", "targets", "seconds", "bytes"):
        assert key in printed


def test_the_zo_child_reports_its_kernel_and_what_each_part_of_a_step_adds():
    done = subprocess.run([sys.executable, str(BENCH), "--child", "zo", "--model", "tiny",
                           "--batch-size", "1", "--seq-len", "128", "--child-ops", "1",
                           "--backend", "eager"],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["kernel"] == "eager"
    if child["hwm_reset"]:
        assert list(child["step_part_rise_bytes"]) == [
            "perturb +eps", "loss L+", "perturb -2 eps", "loss L-", "restore + update"]


@pytest.mark.parametrize(("args", "message"), [
    (["--seq-len", "2"], "--seq-len must be at least 4"),
    (["--repeats", "0"], "must be at least 1"),
    (["--backend", "fast"], "invalid choice: 'fast'"),
])
def test_the_step_benchmark_refuses_bad_arguments_in_one_line(args, message, capsys):
    zo_step = _bench_module()
    with pytest.raises(SystemExit) as exit_info:
        zo_step.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
