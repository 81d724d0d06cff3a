"""The projection <delta, z(seed)>: exact fixed point, backend agreement, error bound."""

from __future__ import annotations

import math
import os
import shutil
import sys
from fractions import Fraction

import pytest
import torch

import protocol.perturb as perturb
from protocol.perturb import (
    PerturbationError,
    padded_length,
    project_rademacher,
    projection_exponent,
    rademacher_signs,
    rademacher_tensor,
)

# 2,500 words: with the eager chunk shrunk to 1,000 words the last chunk is a half one.
N = 64 * 2_500
SMALL_CHUNK_WORDS = 1_000
# Six seeds, four per compiled pass (see few_seeds_per_pass): a full pass and a remainder.
SEEDS = [3, 99, 2**62, 0, 12345, 2**63 - 1]
SEEDS_PER_PASS = 4
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _require_cxx_compiler() -> None:
    """Skip where torch.compile's CPU backend has no C++ compiler (as tests/test_perturb.py)."""
    compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler!r} is not on PATH): only the eager kernel can run")


def exact_projection(delta: torch.Tensor, seed: int) -> float:
    """The definition, computed another way: float64 scaling (exact for any S a float32
    needs), torch.trunc, z from the eager perturbation, one int64 sum."""
    max_abs = float(delta.abs().max())
    exponent = projection_exponent(delta.numel(), max_abs)
    q = torch.trunc(delta.double() * 2.0**exponent).to(torch.int64)
    z = rademacher_tensor(seed, delta.numel()).to(torch.int64)
    return math.ldexp(float(int((q * z).sum())), -exponent)


def error_bound(delta: torch.Tensor) -> float:
    """|p - <delta, z>| < n * 2**-S, plus a float64 rounding of |p| (a few ulps)."""
    exponent = projection_exponent(delta.numel(), float(delta.abs().max()))
    return delta.numel() * 2.0**-exponent + 4 * 2.0**-53 * float(delta.double().abs().sum())


def _truncation_case() -> torch.Tensor:
    """max |delta| = 1 fixes S; the other elements are x * 2**-S with fractional x, so
    truncation toward zero, floor and rounding to nearest all give different sums."""
    exponent = projection_exponent(N, 1.0)
    delta = torch.zeros(N)
    delta[0] = 1.0
    fractions = torch.tensor([2.5, -2.5, 0.75, -0.75, 1.999, -1.999, 3.25, -3.25])
    delta[1 : 1 + 8 * 100] = (fractions * 2.0**-exponent).repeat(100)
    return delta


def _cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    huge = torch.randn(N, generator=gen)
    huge[N // 3] = 3e38
    return {
        "gaussian": torch.randn(N, generator=gen) * 1e-3,
        "negative": -torch.rand(N, generator=gen),
        "truncation": _truncation_case(),
        "subnormal": torch.randn(N, generator=gen) * 1e-40,  # S > 127: two scale factors
        "huge_element": huge,
        "zeros": torch.zeros(N),
        "z_itself": rademacher_tensor(SEEDS[0], N).clone(),
        # Every term positive for SEEDS[0], of magnitudes spread over many binades: q's
        # sum nears 2**59 with low bits set, which a float64 accumulator would round.
        "aligned_with_z": rademacher_tensor(SEEDS[0], N) * torch.rand(N, generator=gen) ** 4,
    }


@pytest.fixture(scope="module", autouse=True)
def few_seeds_per_pass():
    """Fewer seeds per compiled pass than the default, so that SEEDS needs a full pass and
    a remainder pass, and the two kernels compile in a few seconds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perturb, "PROJECTION_SEEDS_PER_PASS", SEEDS_PER_PASS)
        assert 0 < len(SEEDS) % SEEDS_PER_PASS < len(SEEDS)
        yield


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return _cases()


@pytest.fixture(scope="module")
def compiled(cases) -> dict[str, list[float]]:
    """Each case projected by the compiled kernel (built once: one shape, two pass sizes)."""
    _require_cxx_compiler()
    results = {}
    for name, delta in cases.items():
        values, kernel = project_rademacher(delta, SEEDS, backend="compiled")
        assert kernel == "compiled"  # or the comparisons below compare eager with eager
        results[name] = values
    return results


@pytest.fixture
def small_chunks(monkeypatch):
    """Eager chunks that do not divide N, so a partial last chunk is exercised."""
    monkeypatch.setattr(perturb, "EAGER_CHUNK_WORDS", SMALL_CHUNK_WORDS)
    assert (N // 64) % SMALL_CHUNK_WORDS


def test_exponent_is_the_largest_that_keeps_sums_below_2_to_62():
    for n, max_abs in [(64, 1.0), (N, 1e-3), (134_515_008, 0.37), (460_800, 3e38),
                       (64, 1e-45), (1, 2.0**-149), (3, 1.5), (1 << 20, 2.0**-20)]:
        exponent = projection_exponent(n, max_abs)
        total = n * Fraction(max_abs)
        assert total * Fraction(2) ** exponent < 2**62 <= total * Fraction(2) ** (exponent + 1)
    assert projection_exponent(N, 0.0) == 0
    for bad in [(0, 1.0), (64, -1.0), (64, math.inf), (64, math.nan), (True, 1.0)]:
        with pytest.raises(PerturbationError):
            projection_exponent(*bad)


def test_eager_matches_the_float64_reference_within_the_error_bound():
    delta = torch.randn(padded_length(300_000), generator=torch.Generator().manual_seed(1)) * 0.02
    values, kernel = project_rademacher(delta, SEEDS, backend="eager")
    assert kernel == "eager"
    bound = error_bound(delta)
    for seed, value in zip(SEEDS, values):
        reference = float((delta.double() * rademacher_tensor(seed, delta.numel()).double()).sum())
        assert abs(value - reference) < bound
        assert abs(reference) > 100 * bound  # the bound is tight enough to mean something


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("name", list(_cases()))
def test_both_backends_equal_the_exact_fixed_point_definition(cases, compiled, name):
    delta = cases[name]
    eager, kernel = project_rademacher(delta, SEEDS, backend="eager")
    assert kernel == "eager"
    expected = [exact_projection(delta, seed) for seed in SEEDS]
    assert eager == expected  # Python floats: bit for bit
    assert compiled[name] == eager


def test_float_to_integer_conversion_truncates_toward_zero(cases, compiled):
    delta = cases["truncation"]
    exponent = projection_exponent(N, 1.0)
    used = int(delta.nonzero().max()) + 1  # the elements past these are zero
    scaled = [math.ldexp(float(x), exponent) for x in delta[:used].tolist()]
    signs = {seed: rademacher_signs(seed, used) for seed in SEEDS}  # the bitwise spec, §5.3
    for rounding in (math.trunc, math.floor, round):
        sums = [sum(rounding(x) * s for x, s in zip(scaled, signs[seed])) for seed in SEEDS]
        projected = [math.ldexp(float(total), -exponent) for total in sums]
        if rounding is math.trunc:
            assert compiled["truncation"] == projected
            assert project_rademacher(delta, SEEDS, backend="eager")[0] == projected
        else:
            assert compiled["truncation"] != projected


def test_projection_of_z_onto_itself_is_exactly_n(compiled):
    n = 64 * 40
    z = torch.tensor(rademacher_signs(7, n), dtype=torch.float32)  # the bitwise spec, §5.3
    (same, other), _ = project_rademacher(z, [7, 8], backend="eager")
    assert same == float(n)  # a flipped sign convention gives -n
    assert abs(other) < 5 * math.sqrt(n)
    assert compiled["z_itself"][0] == float(N)
    assert all(abs(value) < 5 * math.sqrt(N) for value in compiled["z_itself"][1:])


def test_zero_update_projects_to_exactly_zero(compiled):
    values, _ = project_rademacher(torch.zeros(N), SEEDS, backend="eager")
    assert values == [0.0] * len(SEEDS)
    assert all(math.copysign(1.0, v) == 1.0 for v in values)
    assert compiled["zeros"] == [0.0] * len(SEEDS)


def test_largest_float32_elements_do_not_overflow():
    z = rademacher_tensor(5, N)
    values, _ = project_rademacher(z * FLOAT32_MAX, [5], backend="eager")
    assert values == [N * FLOAT32_MAX]  # exact: every q[i] is a whole float32 times 2**S


@pytest.mark.parametrize("power", [-40, -3, 20])
def test_scaling_delta_by_a_power_of_two_scales_p_exactly(power):
    delta = torch.randn(N, generator=torch.Generator().manual_seed(2))
    base, _ = project_rademacher(delta, SEEDS, backend="eager")
    scaled, _ = project_rademacher(delta * 2.0**power, SEEDS, backend="eager")
    assert scaled == [math.ldexp(value, power) for value in base]


def test_projection_is_linear_within_the_error_bound():
    gen = torch.Generator().manual_seed(3)
    even = torch.arange(N) % 2 == 0
    # Disjoint supports and power-of-two weights: a * d1 + b * d2 is exact in float32,
    # so only the quantisation of the three projections separates the two sides.
    d1 = torch.where(even, torch.randn(N, generator=gen), 0.0)
    d2 = torch.where(even, 0.0, torch.randn(N, generator=gen) * 7.0)
    a, b = 0.5, -2.0
    combined = a * d1 + b * d2
    p1, _ = project_rademacher(d1, SEEDS, backend="eager")
    p2, _ = project_rademacher(d2, SEEDS, backend="eager")
    pc, _ = project_rademacher(combined, SEEDS, backend="eager")
    bound = error_bound(combined) + abs(a) * error_bound(d1) + abs(b) * error_bound(d2)
    for v1, v2, vc in zip(p1, p2, pc):
        assert abs(vc - (a * v1 + b * v2)) < bound


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_non_finite_updates_are_refused(bad, backend):
    delta = torch.zeros(N)
    delta[1234] = bad
    with pytest.raises(PerturbationError, match="non-finite"):
        project_rademacher(delta, SEEDS, backend=backend)


def test_bad_tensors_and_seeds_are_refused():
    with pytest.raises(PerturbationError, match="float32"):
        project_rademacher(torch.zeros(64, dtype=torch.float64), [1])
    with pytest.raises(PerturbationError, match="multiple of 64"):
        project_rademacher(torch.zeros(65), [1])
    with pytest.raises(PerturbationError, match="at least one seed"):
        project_rademacher(torch.zeros(64), [])
    for seed in (-1, 2**63, 1.5, True):
        with pytest.raises(PerturbationError, match="seed"):
            project_rademacher(torch.zeros(64), [1, seed])


def test_auto_runs_the_compiled_kernel_on_large_spaces_and_eager_on_small(monkeypatch, cases, compiled):
    monkeypatch.delenv("EDGEFED_PERTURB_BACKEND", raising=False)
    monkeypatch.setattr(perturb, "COMPILE_MIN_ELEMENTS", N)  # N now counts as large
    delta = cases["gaussian"]
    assert project_rademacher(delta, SEEDS) == (compiled["gaussian"], "compiled")
    assert project_rademacher(delta[: N // 2], SEEDS)[1] == "eager"
    monkeypatch.setenv("EDGEFED_PERTURB_BACKEND", "eager")
    assert project_rademacher(delta, SEEDS) == (compiled["gaussian"], "eager")


def test_a_machine_that_cannot_compile_falls_back_to_the_same_bits(monkeypatch, cases):
    def broken_compile(*args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler")
        return fails

    monkeypatch.setattr(perturb, "_projection_fn", None)
    monkeypatch.setattr(perturb, "_projection_compile_failed", False)
    monkeypatch.setattr(perturb, "_projection_shapes", set())
    monkeypatch.setattr(perturb.torch, "compile", broken_compile)
    delta = cases["gaussian"]
    expected, _ = project_rademacher(delta, SEEDS, backend="eager")
    # The fallback is reported: the caller asked for compiled, eager computed it.
    assert project_rademacher(delta, SEEDS, backend="compiled") == (expected, "eager")
    assert perturb._projection_compile_failed
