"""The seeded perturbation: published vectors, backend agreement, exactness."""

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from protocol.perturb import (
    PerturbationError,
    apply_gaussian,
    apply_rademacher,
    last_kernel,
    mix64,
    padded_length,
    rademacher_signs,
    rademacher_tensor,
    seed_key,
    word,
)

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "PROTOCOL.md"


def _require_cxx_compiler() -> None:
    """Skip where torch.compile's CPU backend has no C++ compiler to build the kernel.

    It uses $CXX, else g++ (clang++ on macOS); only there may the compiled kernel fall
    back to eager. Everywhere else a fallback is a failure the tests must see.
    """
    compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler!r} is not on PATH): torch.compile cannot build "
                    "the CPU kernel here, so only the eager kernel can run")


def published_vectors() -> list[dict[str, str]]:
    """Parse the test-vector table of PROTOCOL.md §5.4 (so the document and the code agree)."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    block = text.split("<!-- vectors:begin -->", 1)[1].split("<!-- vectors:end -->", 1)[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"\d+", cells[0]):
            rows.append(dict(zip(["seed", "key", "word0", "word1", "signs"], cells)))
    return rows


def test_published_vectors_match_the_implementation():
    rows = published_vectors()
    assert len(rows) >= 4
    for row in rows:
        seed = int(row["seed"])
        assert f"{seed_key(seed):016x}" == row["key"]
        assert f"{word(seed, 0):016x}" == row["word0"]
        assert f"{word(seed, 1):016x}" == row["word1"]
        expected = [1 if c == "+" else -1 for c in row["signs"]]
        assert rademacher_signs(seed, len(expected)) == expected


def test_mix64_matches_splitmix64_reference_output():
    # SplitMix64 seeded with 0 produces 0xE220A8397B1DCDAF first (Vigna's reference code).
    assert mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("seed", [0, 1, 7, 2**40 + 3, 2**63 - 1])
def test_tensor_path_equals_bitwise_reference(seed):
    n = 64 * 5 + 17
    expected = torch.tensor(rademacher_signs(seed, n), dtype=torch.float32)
    assert torch.equal(rademacher_tensor(seed, n), expected)


def test_compiled_and_eager_backends_agree_bitwise():
    _require_cxx_compiler()
    n = padded_length(300_000)
    base = torch.randn(n, generator=torch.Generator().manual_seed(0))
    eager, compiled = base.clone(), base.clone()
    for seed, coef in [(3, 1e-3), (99, -2e-3), (2**62, 7.5e-4)]:
        assert apply_rademacher(eager, seed, coef, backend="eager") == "eager"
        # The compiled kernel must really have run, or this compares eager with eager.
        assert apply_rademacher(compiled, seed, coef, backend="compiled") == "compiled"
        assert last_kernel() == "compiled"
    assert not torch.equal(compiled, base)
    assert torch.equal(eager, compiled)


def test_auto_runs_the_compiled_kernel_on_large_spaces_and_eager_on_small(monkeypatch):
    _require_cxx_compiler()
    import protocol.perturb as perturb

    monkeypatch.delenv("EDGEFED_PERTURB_BACKEND", raising=False)
    # Lower the size threshold so a test-sized space counts as large.
    monkeypatch.setattr(perturb, "COMPILE_MIN_ELEMENTS", 1 << 16)
    large = torch.zeros(1 << 16)
    small = torch.zeros(1 << 10)
    assert apply_rademacher(large, 21, 0.5) == "compiled"
    assert last_kernel() == "compiled"
    assert apply_rademacher(small, 21, 0.5) == "eager"
    assert last_kernel() == "eager"
    assert torch.equal(large[: small.numel()], small)  # same bits, whichever kernel
    monkeypatch.setenv("EDGEFED_PERTURB_BACKEND", "eager")
    assert apply_rademacher(large, 21, -0.5) == "eager"
    assert torch.equal(large, torch.zeros(1 << 16))


def test_application_is_one_float32_rounding_of_theta_plus_minus_c():
    n = padded_length(10_000)
    theta = torch.randn(n, generator=torch.Generator().manual_seed(1))
    coef = 1.2345e-3
    z = rademacher_tensor(5, n)
    expected = (theta.double() + float(torch.tensor(coef, dtype=torch.float32)) * z.double()).float()
    got = theta.clone()
    apply_rademacher(got, 5, coef)
    assert torch.equal(got, expected)


def test_signs_are_balanced_and_seeds_differ():
    a = rademacher_tensor(1, 1 << 16)
    b = rademacher_tensor(2, 1 << 16)
    assert abs(float(a.mean())) < 0.02
    assert float((a == b).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_perturbation_is_not_exactly_reversible_but_restore_from_copy_is():
    # Documents why clients restore from a copy: (theta + c) - c != theta in float32.
    n = padded_length(100_000)
    theta = torch.randn(n, generator=torch.Generator().manual_seed(2))
    moved = theta.clone()
    apply_rademacher(moved, 11, 1e-3)
    apply_rademacher(moved, 11, -1e-3)
    assert not torch.equal(moved, theta)
    assert float((moved - theta).abs().max()) < 1e-6


def test_gaussian_direction_is_standard_normal():
    flat = torch.zeros(padded_length(200_000))
    apply_gaussian(flat, 4, 1.0)
    assert abs(float(flat.mean())) < 0.01
    assert float(flat.std()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "3"])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(PerturbationError):
        apply_rademacher(torch.zeros(64), seed, 1.0)


def test_bad_tensors_and_coefficients_are_refused():
    with pytest.raises(PerturbationError, match="multiple of 64"):
        apply_rademacher(torch.zeros(65), 1, 1.0)
    with pytest.raises(PerturbationError, match="float32"):
        apply_rademacher(torch.zeros(64, dtype=torch.float64), 1, 1.0)
    with pytest.raises(PerturbationError, match="finite"):
        apply_rademacher(torch.zeros(64), 1, float("nan"))
    with pytest.raises(PerturbationError, match="finite"):
        apply_rademacher(torch.zeros(64), 1, 1e39)


def test_a_machine_that_cannot_compile_falls_back_to_the_same_bits(monkeypatch):
    import protocol.perturb as perturb

    def broken_compile(*args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler")
        return fails

    monkeypatch.setattr(perturb, "_compiled_fn", None)
    monkeypatch.setattr(perturb, "_compile_failed", False)
    monkeypatch.setattr(perturb, "_compiled_shapes", set())
    monkeypatch.setattr(perturb.torch, "compile", broken_compile)
    n = padded_length(10_000)
    expected = torch.zeros(n)
    apply_rademacher(expected, 8, 0.25, backend="eager")
    got = torch.zeros(n)
    # The fallback is reported: the caller asked for compiled, eager computed it.
    assert apply_rademacher(got, 8, 0.25, backend="compiled") == "eager"
    assert last_kernel() == "eager"
    assert torch.equal(got, expected)
    assert perturb._compile_failed
