"""Numerical edge cases of the kernels on every backend (issue 19, items 13-15).

- cosine similarity is invariant to scaling the factors (any power of two, and
  scalings such as 1e20 or 1e-30), and distances of float64 updates near 1e300
  are finite where the true value is (power-of-two range normalisation,
  ``ops/numerics/scaling.py``);
- subnormal factors truncate; an output that overflows its dtype says so;
- mixed float32 / float64 dense-domain merges agree across backends; rank-0
  modules and absurd ranks are handled.

Triton runs here only under its interpreter (slow): tiny shapes, few examples.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kmerge_fast as kf
from kmerge_fast import ops
from kmerge_fast.lora import LoRAModule
from kmerge_fast.ops import Factor

from conftest import available_backends


def _triton_interpreted() -> bool:
    module = ops._load("triton")
    return not isinstance(module, str) and module._load_kernels() is not None and module._kernels.INTERPRETED


BACKENDS = available_backends() + (["triton"] if _triton_interpreted() else [])
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _runs(backend: str, dtype: torch.dtype) -> bool:
    return not (backend == "triton" and dtype == torch.float64)  # triton: float64 is the other backends' job


def one(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> kf.LoRA:
    return kf.LoRA({"q": LoRAModule(a, b, scaling)})


def factors(n_out=6, n_in=5, r=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n_in, generator=g, dtype=torch.float64), torch.randn(n_out, r, generator=g,
                                                                               dtype=torch.float64)


def scaled(a, b, dtype, sa=1.0, sb=1.0):
    """(A * sa, B * sb) formed in float64, then stored in dtype."""
    return (a * sa).to(dtype), (b * sb).to(dtype)


# ------------------------------------------------------------------ item 13: cosine
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["scaling=1e20", "scaling=1e-30", "A*1e25,B*1e-25", "A*1e-20,B*1e-20"])
def test_cosine_with_itself_is_one_at_any_scale(backend, dtype, case):
    if not _runs(backend, dtype):
        pytest.skip("triton runs float32 / half only")
    a, b = factors()
    s = 1.0
    if case == "scaling=1e20":
        s = 1e20
    elif case == "scaling=1e-30":
        s = 1e-30
    elif case == "A*1e25,B*1e-25":
        a, b = a * 1e25, b * 1e-25
    else:
        a, b = a * 1e-20, b * 1e-20
    x = one(*scaled(a, b, dtype), s)
    y = one(x.modules["q"].A.clone(), x.modules["q"].B.clone(), s)
    other = one(*scaled(*factors(seed=1), dtype))
    with kf.use_backend(backend):
        cross = kf.similarity_matrix([x], [y, other], "cos")
        sym = kf.similarity_matrix([x, y], metric="cos")
    assert cross[0, 0] == pytest.approx(1.0, abs=1e-6), (backend, dtype, case, cross)
    assert sym.min() == pytest.approx(1.0, abs=1e-6), (backend, dtype, case, sym)


def _scale_pair(a, b, s, k, mode):
    if mode == "A":
        return a * 2.0 ** k, b, s
    if mode == "B":
        return a, b * 2.0 ** k, s
    if mode == "scaling":
        return a, b, s * 2.0 ** k
    return a * 2.0 ** k, b * 2.0 ** -k, s  # the same update


def _check_scale_invariance(backend, k, mode, seed, dtype):
    a, b = factors(seed=seed)
    base = one(*scaled(a, b, dtype), 0.5)
    other = one(*scaled(*factors(seed=seed + 1), dtype), 0.5)
    sa, sb, s = _scale_pair(a, b, 0.5, k, mode)
    moved = one(*scaled(sa, sb, dtype), s)
    with kf.use_backend(backend):
        want = kf.similarity_matrix([base], [base, other], "cos")
        got = kf.similarity_matrix([moved], [base, other], "cos")
    assert got[0, 0] == pytest.approx(1.0, abs=1e-6), (backend, k, mode, got)
    assert got[0, 1] == pytest.approx(float(want[0, 1]), abs=1e-6), (backend, k, mode, got, want)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(-100, 100), mode=st.sampled_from(["A", "B", "scaling", "pair"]), seed=st.integers(0, 50),
       dtype=st.sampled_from([torch.float32, torch.float64]))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_cosine_invariant_to_power_of_two_scaling(backend, k, mode, seed, dtype):
    _check_scale_invariance(backend, k, mode, seed, dtype)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton interpreter unavailable")
@settings(max_examples=6, deadline=None)
@given(k=st.integers(-100, 100), mode=st.sampled_from(["A", "B", "scaling", "pair"]))
def test_cosine_invariant_to_power_of_two_scaling_triton(k, mode):
    _check_scale_invariance("triton", k, mode, 0, torch.float32)


# ------------------------------------------------------------------ item 13: distances near 1e300
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("metric", ["l1", "l2", "linf"])
def test_distances_of_huge_float64_updates_are_finite(backend, metric):
    a, b = factors(n_out=7, n_in=9, r=3)
    x = one(a * 1e150, b * 1e150)                      # entries of dW ~ 1e300
    y = one(a * 1e150, b * 1e150 * (1 + 2 ** -10))    # differs by ~1e-3 relative
    # Truth from the dense updates scaled by 2^-1000 (exact), measured, scaled back.
    dx, dy = [m.B @ (m.A * 2.0 ** -1000) for m in (x.modules["q"], y.modules["q"])]
    diff = dx - dy
    d = {"l1": diff.abs().sum(), "l2": diff.norm(), "linf": diff.abs().max()}[metric]
    want = 1.0 / (1.0 + math.ldexp(float(d), 1000))
    with kf.use_backend(backend):
        got = float(kf.similarity_matrix([x], [y], metric)[0, 0])
    assert math.isfinite(got) and got > 0, (backend, metric, got)
    # The C++ tiles of l1 / linf are float32: the distance to float32 accuracy of the 1e300 entries.
    assert got == pytest.approx(want, rel=1e-2 if metric != "l2" else 1e-6), (backend, metric, got, want)


# ------------------------------------------------------------------ item 14: subnormal factors
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sa,sb", [(1e-40, 1.0), (1e-40, 1e30), (1.0, 1e-40), (1e-19, 1e-19)])
def test_subnormal_factors_truncate(backend, sa, sb):
    a, b = factors(n_out=8, n_in=6, r=3)
    a32, b32 = scaled(a, b, torch.float32, sa, sb)
    lora = one(a32, b32)
    with kf.use_backend(backend):
        out = kf.truncate(lora, 2)
    m = out.modules["q"]
    # Truth: the best rank-2 approximation of the stored values, in float64.
    dense = b32.double() @ a32.double()
    u, s, vh = torch.linalg.svd(dense)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    got = m.B.double() @ m.A.double()
    assert torch.isfinite(got).all()
    assert float((got - best).norm() / best.norm()) < 1e-4, (backend, sa, sb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["svd", "cat", "linear"])
def test_fp16_overflow_says_output_overflows(backend, method):
    a, b = factors()
    lora = one((a * 300).half(), (b * 300).half())
    with kf.use_backend(backend), pytest.raises(kf.AdapterError) as err:
        kf.merge([lora, lora], [1e6, 1e6], method=method)
    msg = str(err.value)
    assert "overflows torch.float16" in msg and "wider dtype" in msg and "'q'" in msg, msg


# ------------------------------------------------------------------ item 15: mixed dtypes, ranks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["magnitude_prune_svd", "ties_svd"])
@pytest.mark.parametrize("seed", range(4))
def test_mixed_float32_float64_dense_methods_agree(backend, method, seed):
    if not _runs(backend, torch.float64):
        pytest.skip("triton runs float32 / half only")
    a, b = factors(n_out=9, n_in=11, r=3, seed=seed)
    a2, b2 = factors(n_out=9, n_in=11, r=3, seed=seed + 10)
    x = one(a.float(), b.float(), 0.7)   # float32
    y = one(a2, b2, 1.3)                 # float64
    with kf.use_backend("reference"):
        want = kf.merge([x, y], method=method, density=0.5, rank=9)
    with kf.use_backend(backend):
        got = kf.merge([x, y], method=method, density=0.5, rank=9)
    mw, mg = want.modules["q"], got.modules["q"]
    assert mg.A.dtype == torch.float64
    dw, dg = mw.B @ mw.A, mg.B @ mg.A
    torch.testing.assert_close(dg, dw, rtol=0, atol=1e-9 * float(dw.abs().max()))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_dense_combine_of_mixed_dtypes_is_float64(backend):
    a, b = factors()
    fs = [Factor(a.float(), b.float(), 1.0), Factor(a, b, 1.0)]
    out = ops._load(backend).dense_combine([(fs, [1.0, 1.0], [ops.Keep()] * 2)], ops.SUM)[0]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, b.float().double() @ a.float().double() + b @ a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_absurd_rank_is_refused_clearly(backend):
    a, b = factors(n_out=12, n_in=16, r=4)
    with kf.use_backend(backend), pytest.raises(ValueError, match=r"rank: 1000000 is above the largest rank .*at most 12"):
        kf.truncate(one(a.float(), b.float()), 10 ** 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["svd", "cat", "ties_svd"])
def test_rank_zero_modules_merge(backend, method):
    z = one(torch.zeros(0, 5), torch.zeros(6, 0))
    kw = {"density": 0.5} if method == "ties_svd" else {}
    with kf.use_backend(backend):
        out = kf.merge([z, z], method=method, **kw)
        sims = kf.similarity_matrix([z, z], metric="cos")
    m = out.modules["q"]
    assert m.A.shape == (0, 5) and m.B.shape == (6, 0)
    assert not sims.isnan().any()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_max_abs_matches_torch():
    from kmerge_fast.ops.backend import cpp as cpu
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 14, generator=g, dtype=torch.float64) * 1e3
    tensors = [base.to(d) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]
    tensors += [base.float().T, base[:, ::3], torch.zeros(0, 4), torch.tensor([[1e-40, -3e-41]]),
                torch.tensor([[-1e300, 2.0]], dtype=torch.float64)]
    want = [float(t.abs().max()) if t.numel() else 0.0 for t in tensors]
    assert cpu.max_abs(tensors) == want
    assert math.isnan(cpu.max_abs([torch.tensor([[1.0, float("nan")]])])[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_topk_keep_equals_topk_with_and_without_ties(dtype):
    """The selection shortcut keeps exactly topk's entries: distinct magnitudes, ties at the k-th largest
    (half precision makes them common; forced below), k = 0 and k = numel, NaN."""
    from kmerge_fast.ops.numerics.elementwise import topk_keep

    def plain(t, k):
        flat = t.flatten()
        out = torch.zeros_like(flat)
        index = torch.topk(flat.abs(), k).indices
        out[index] = flat[index]
        return out.reshape(t.shape)

    gen = torch.Generator().manual_seed(7)
    cases = [torch.randn(16, 37, generator=gen).to(dtype)]
    tied = torch.randn(16, 37, generator=gen).to(dtype)
    tied[3, :9] = 0.5                                   # 9 entries tie in magnitude ...
    tied[5, :4] = -0.5
    tied[tied.abs() > 0.5] = 0.25 * tied[tied.abs() > 0.5].sign()   # ... among few larger ones
    cases.append(tied)
    nan = torch.randn(8, 8, generator=gen).to(dtype)
    nan[2, 2] = float("nan")
    cases.append(nan)
    for t in cases:
        for k in sorted({0, 1, 5, t.numel() // 3, t.numel() // 2, t.numel() - 1, t.numel()}):
            got, want = topk_keep(t, k), plain(t, k)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), k
            assert int((got != 0).sum()) <= k
