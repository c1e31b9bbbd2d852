"""peft's combination types in kf.merge: every backend against float64 oracles, and DARE statistics.

The oracles are peft's own merge_utils functions run on float64 tensors (an
independent implementation of TIES / DARE / magnitude pruning).
"""

from __future__ import annotations

import math

import pytest
import torch

import kmerge_fast as kf
from conftest import STORE_TOL, random_lora
from helpers import method_cases as cases
from helpers.method_cases import WEIGHTS, method_loras
from kmerge_fast import ops
from kmerge_fast.ops import Factor
from kmerge_fast.ops.numerics.elementwise import (ALL, DARE, MAGNITUDE, SUM, TIES, Keep, dare_mask, dare_thresh24, mix64)

merge_utils = pytest.importorskip("peft.utils.merge_utils")


@pytest.mark.parametrize("method,density,sign", [
    ("ties_svd", 0.5, "total"), ("ties_svd", 0.3, "frequency"), ("ties_svd", 1.0, "total"),
    ("magnitude_prune_svd", 0.4, "total"), ("magnitude_prune_svd", 1.0, "total")])
def test_dense_domain_matches_peft_math(backend, dtype, method, density, sign):
    cases.dense_domain_matches_peft_math(backend, dtype, method, density, sign)


@pytest.mark.parametrize("method,density,sign", [
    ("linear", None, "total"), ("ties", 0.5, "total"), ("ties", 0.7, "frequency"), ("magnitude_prune", 0.3, "total")])
def test_factor_wise_matches_peft_math(backend, dtype, method, density, sign):
    loras = method_loras(dtype, ranks=(4, 4, 4))
    merged = kf.merge(loras, WEIGHTS, method=method, density=density, majority_sign_method=sign)
    fn = {"linear": lambda t, w: merge_utils.task_arithmetic(t, w),
          "ties": lambda t, w: merge_utils.ties(t, w, density, sign),
          "magnitude_prune": lambda t, w: merge_utils.magnitude_prune(t, w, density)}[method]
    for name, module in merged.modules.items():
        holders = [(l.modules[name], w) for l, w in zip(loras, WEIGHTS) if name in l.modules]
        ws = [w * m.scaling for m, w in holders]
        w_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in ws], dtype=torch.float64)
        w_b = torch.tensor([math.sqrt(abs(x)) for x in ws], dtype=torch.float64)
        a = fn([m.A.double() for m, _ in holders], w_a)
        b = fn([m.B.double() for m, _ in holders], w_b)
        tol = STORE_TOL[dtype]
        torch.testing.assert_close(module.A.double(), a, rtol=tol, atol=tol * float(a.abs().max()))
        torch.testing.assert_close(module.B.double(), b, rtol=tol, atol=tol * float(b.abs().max()))


def test_weighted_sum_rounds_like_peft():
    """``combine(SUM)`` skips peft's stack for 1-2 terms but must keep its roundings: bit-equal in float32."""
    g = torch.Generator().manual_seed(3)
    for k, shape in [(1, (33, 70)), (2, (33, 70)), (2, (32, 2048)), (3, (33, 70)), (5, (33, 70)), (5, (64, 2048))]:
        tensors = [torch.randn(*shape, generator=g) for _ in range(k)]
        weights = [float(w) for w in torch.randn(k, generator=g, dtype=torch.float64)]
        want = merge_utils.task_arithmetic(tensors, torch.tensor(weights))
        assert torch.equal(ops.numerics.elementwise.combine(tensors, weights, SUM), want)


def _bits_equal(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same dtype, shape and values, NaN where NaN and the sign of every zero."""
    return (got.dtype == want.dtype and got.shape == want.shape
            and bool(((got == want) | (got.isnan() & want.isnan())).all())
            and torch.equal(torch.signbit(got), torch.signbit(want)))


def _sum_terms(dtype, shape, k, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(k):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, shape, generator=g)
        t = t.to(dtype)
        tensors.append(t.T.contiguous().T if strided else t)  # strided: column-major storage
    weights = [float(w) for w in torch.randn(k, generator=g, dtype=torch.float64) * 3]
    return tensors, weights


@pytest.mark.parametrize("shape", [(1, 1), (1, 257), (33, 70), (70, 33), (32, 2048)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_weighted_sum_backend_bit_equal_to_reference(backend, dtype, shape, k):
    """Every backend's weighted_sum rounds exactly as the torch reference (peft's roundings)."""
    impl, ref = ops._load(backend), ops._load("reference")
    batch = [_sum_terms(dtype, shape, k, seed=7 * k + j, strided=j == 1) for j in range(3)]
    for got, want in zip(impl.weighted_sum(batch, dtype), ref.weighted_sum(batch, dtype)):
        assert _bits_equal(got, want)
    # and against float64 truth: one rounding per operation
    for (tensors, weights), got in zip(batch, impl.weighted_sum(batch, dtype)):
        truth = sum(w * t.double() for t, w in zip(tensors, weights))
        scale = sum(abs(w) * t.double().abs() for t, w in zip(tensors, weights))
        eps = torch.finfo(dtype).eps if dtype == torch.float64 else torch.finfo(torch.float32).eps
        bound = k * 2 * eps * scale + torch.finfo(dtype).eps * truth.abs() + torch.finfo(dtype).tiny
        assert bool(((got.double() - truth).abs() <= bound).all())


def test_weighted_sum_special_values_and_mixed_dtypes(backend):
    """NaN, +-inf, -0, float16 overflow and subnormals, and a float16 + float32 pair promoted to float32."""
    impl, ref = ops._load(backend), ops._load("reference")
    special = torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 6e-8, 65504.0, 1e-3]])
    other = torch.tensor([[1.0, -float("inf"), 2.0, -0.0, -0.0, 6e-8, 65504.0, -1e-3]])
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        batch = [([special.to(dtype), other.to(dtype)], [0.5, 1.5]), ([special.to(dtype)], [-0.0])]
        for got, want in zip(impl.weighted_sum(batch, dtype), ref.weighted_sum(batch, dtype)):
            assert _bits_equal(got, want), (dtype, got, want)
    mixed = [([special.to(torch.float16), other], [0.3, -0.7])]
    got, want = impl.weighted_sum(mixed, torch.float32)[0], ref.weighted_sum(mixed, torch.float32)[0]
    assert _bits_equal(got, want)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_linear_merge_bit_equal_to_peft(backend, in_dtype):
    """kf.merge(method="linear") of two adapters: exactly peft's task_arithmetic on the factors, cast back."""
    loras = method_loras(in_dtype, k=2, ranks=(4, 4), shared_only=True)
    weights = [0.75, 0.25]
    merged = kf.merge(loras, weights, method="linear")
    for name, module in merged.modules.items():
        ms = [l.modules[name] for l in loras]
        ws = [w * m.scaling for m, w in zip(ms, weights)]
        w_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in ws])
        w_b = torch.tensor([math.sqrt(abs(x)) for x in ws])
        assert _bits_equal(module.A, merge_utils.task_arithmetic([m.A for m in ms], w_a).to(in_dtype))
        assert _bits_equal(module.B, merge_utils.task_arithmetic([m.B for m in ms], w_b).to(in_dtype))


def test_factor_wise_needs_equal_ranks():
    loras = method_loras(torch.float32)
    with pytest.raises(ValueError, match="needs equal ranks"):
        kf.merge(loras, WEIGHTS, method="linear")


@pytest.mark.parametrize("mode,kind,sign", [(SUM, ALL, "total"), (SUM, MAGNITUDE, "total"), (TIES, MAGNITUDE, "total"),
                                            (TIES, MAGNITUDE, "frequency"), (SUM, DARE, "total"), (TIES, DARE, "total")])
def test_dense_combine_backends_agree(backend, dtype, mode, kind, sign):
    cases.dense_combine_backends_agree(backend, dtype, mode, kind, sign)


# ------------------------------------------------------------------ DARE
@pytest.mark.parametrize("density", [0.05, 0.5, 0.9])
def test_dare_mask_keeps_density_fraction(density):
    mask = dare_mask(987654321, (300, 400), dare_thresh24(density))
    n = mask.numel()
    assert abs(float(mask.float().mean()) - density) <= 5 * math.sqrt(density * (1 - density) / n)
    # rows, columns and seeds are not correlated: per-row fractions spread binomially
    rows = mask.float().mean(1)
    assert float(rows.std()) == pytest.approx(math.sqrt(density * (1 - density) / 400), rel=0.25)
    other = dare_mask(987654322, (300, 400), dare_thresh24(density))
    agree = float((mask == other).float().mean())
    assert agree == pytest.approx(density ** 2 + (1 - density) ** 2, abs=0.01)


def test_dare_rescales_kept_values(backend):
    cases.dare_rescales_kept_values(backend)


def test_dare_expectation_is_the_weighted_sum(backend):
    """E[DARE merge] = sum_i w_i dW_i: the mean of many draws converges at the binomial rate."""
    gen = torch.Generator().manual_seed(0)
    factors = [Factor(torch.randn(2, 30, generator=gen), torch.randn(20, 2, generator=gen), s) for s in (1.0, 0.5)]
    weights, d, draws = [0.6, -1.2], 0.4, 300
    impl = ops._load(ops.backend_name([factors]))
    total = torch.zeros(20, 30, dtype=torch.float64)
    for k in range(draws):
        keeps = [Keep(DARE, seed=mix64(2 * k + i), thresh24=dare_thresh24(d), density=d) for i in range(2)]
        total += impl.dense_combine([(factors, weights, keeps)], SUM)[0].double()
    mean = total / draws
    dense = [f.coef * (f.B.double() @ f.A.double()) for f in factors]
    truth = sum(w * t for w, t in zip(weights, dense))
    var = sum((w * t) ** 2 for w, t in zip(weights, dense)) * (1 - d) / d / draws
    z = (mean - truth).abs() / var.sqrt().clamp_min(1e-12)
    assert float(z.max()) < 5.5
    # mean z^2 ~ chi^2_600 / 600: 1 +- 0.06; a wrong rescale or a biased mask moves it far off
    assert float(z.square().mean()) == pytest.approx(1.0, abs=0.25)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_merge_reproducible(method):
    loras = method_loras(torch.float32, ranks=(4, 4, 4))

    def run(seed):
        return kf.merge(loras, WEIGHTS, method=method, density=0.5, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    name = "base_model.model.q"
    assert torch.equal(a.modules[name].A, b.modules[name].A)
    assert not torch.equal(a.modules[name].A, c.modules[name].A)


def test_dare_linear_factor_values():
    lora = random_lora({"q": (8, 9)}, 3, scaling=4.0)
    other = random_lora({"q": (8, 9)}, 3, scaling=4.0, seed=5)
    merged = kf.merge([lora, other], [1.0, 0.0], method="dare_linear", density=0.5,
                      generator=torch.Generator().manual_seed(0))
    m, src = merged.modules["base_model.model.q"], lora.modules["base_model.model.q"]
    kept = m.A != 0
    # weight 1, scaling 4: sqrt(4) = 2 on A and B, then / density on kept values
    torch.testing.assert_close(m.A[kept], 2 * src.A[kept] / 0.5)
    assert 0.2 < float(kept.float().mean()) < 0.8


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kw,message", [
    (dict(method="dare"), "method: unknown combination type"),
    (dict(method="ties"), "density: method 'ties' needs"),
    (dict(method="ties_svd", density=0.0), r"density: must be in \(0, 1\]"),
    (dict(method="ties_svd", density=1.01), r"density: must be in \(0, 1\]"),
    (dict(method="svd", density=0.5), "density: not used"),
    (dict(method="linear", rank=2), "rank: only the svd methods"),
    (dict(method="ties", density=0.5, majority_sign_method="max"), "majority_sign_method"),
    (dict(method="cat", svd_clamp=0.9), "svd_clamp: only the svd methods"),
    (dict(method="svd", svd_clamp=2.0), "svd_clamp: a quantile"),
])
def test_bad_arguments(kw, message):
    loras = method_loras(torch.float32, ranks=(4, 4, 4))
    with pytest.raises(ValueError, match=message):
        kf.merge(loras, WEIGHTS, **kw)


def test_nan_input_to_dense_method_is_an_error():
    a = random_lora({"q": (6, 5)}, 2)
    b = random_lora({"q": (6, 5)}, 2, seed=3)
    b.modules["base_model.model.q"].A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        kf.merge([a, b], [0.5, 0.5], method="ties_svd", density=0.5)


def test_svd_clamp_bounds_factors(backend):
    cases.svd_clamp_bounds_factors(backend)
