"""kmerge_fast._C.dense_merge and _C.abs_kth against a pure-torch oracle.

dense_merge streams t_i = s_i B_i A_i tile by tile (float32, or float64 for
float64 factors) and combines them with peft 0.21's elementwise rules; the
oracle forms every t_i densely in float64 and applies the same rules
(including the DARE counter hash, reimplemented here in numpy uint64 and in
torch int64). Elements whose keep / sign decision is within float32 rounding
of the boundary (|t| ~ tau, sum ~ 0, t ~ 0) are ambiguous between float32 and
float64 and are left out of the value comparison (they are rare: asserted).

abs_kth is checked exactly against torch.topk of the very float32 t the
merge kernel computes (dense_merge with one "all" term), and against float64.

Timings against torch: ``python -m bench.bench_ops`` (the dense_merge and abs_kth rows).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

_C = pytest.importorskip("kmerge_fast._C")
from helpers.cpp_tasks import make, mat  # noqa: E402  (one way to describe tensors to _C)

GOLDEN = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1
SUM, TIES = 0, 1
TOTAL, FREQUENCY = 0, 1
ALL, MAGNITUDE, DARE = 0, 1, 2


# ---------------------------------------------------------------- DARE hash
def thresh24(density: float) -> int:
    return int(round(density * (1 << 24)))


def dare_mask_np(seed: int, rows: int, cols: int, th: int) -> torch.Tensor:
    """keep iff (mix(seed + (idx + 1) * golden) >> 40) < th, numpy uint64 (wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        idx = np.arange(rows * cols, dtype=np.uint64)
        x = np.uint64(seed) + (idx + np.uint64(1)) * np.uint64(GOLDEN)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
        keep = (x >> np.uint64(40)) < np.uint64(th)
    return torch.from_numpy(keep.reshape(rows, cols).copy())


def _s64(v: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical shift right of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def dare_mask_torch(seed: int, rows: int, cols: int, th: int) -> torch.Tensor:
    """The same hash in torch int64 (two's complement wraparound multiply, logical shifts)."""
    idx = torch.arange(rows * cols, dtype=torch.int64)
    x = (idx + 1) * _s64(GOLDEN) + _s64(seed)
    x = x ^ _lsr(x, 33)
    x = x * _s64(0xFF51AFD7ED558CCD)
    x = x ^ _lsr(x, 33)
    x = x * _s64(0xC4CEB9FE1A85EC53)
    x = x ^ _lsr(x, 33)
    return (_lsr(x, 40) < th).reshape(rows, cols)


def dare_keep_py(seed: int, idx: int, th: int) -> bool:
    x = (seed + (idx + 1) * GOLDEN) & M64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    x ^= x >> 33
    return (x >> 40) < th


# ---------------------------------------------------------------- terms and oracle
class Term:
    """One low-rank term with its rule; keeps its tensors alive."""

    def __init__(self, B, A, s=1.0, w=1.0, kind=ALL, tau=0.0, seed=0, density=1.0, b_coef=1.0):
        self.B, self.A, self.s, self.w, self.kind = B, A, s, w, kind
        self.tau, self.seed, self.density, self.b_coef = tau, seed, density, b_coef
        self.th = thresh24(density) if kind == DARE else 0

    def desc(self) -> tuple:
        return (mat(self.B, self.b_coef), mat(self.A, self.s), float(self.w), self.kind, float(self.tau), self.seed,
                self.th, float(self.density))

    def t64(self) -> torch.Tensor:
        return (self.B.double() * self.b_coef) @ (self.A.double() * self.s)

    def bound(self) -> torch.Tensor:
        """Elementwise |B| |A| |coefs|: scale of the rounding error of t (of its finite part)."""
        fin = lambda x: x.double().abs().nan_to_num(nan=0.0, posinf=0.0)  # noqa: E731
        return (fin(self.B) @ fin(self.A)) * abs(self.s * self.b_coef)


def oracle(terms: list[Term], mode: int, sign_method: int = TOTAL):
    """(M, ambiguous, err_scale) in float64, peft 0.21 semantics (masks multiply)."""
    ts = [t.t64() for t in terms]
    bounds = [t.bound() for t in terms]
    amb = torch.zeros(ts[0].shape, dtype=torch.bool)
    ps = []
    for term, t, bnd in zip(terms, ts, bounds):
        if term.kind == ALL:
            p = t
        elif term.kind == MAGNITUDE:
            amb |= ((t.abs() - term.tau).abs() <= 1e-4 * bnd) & torch.isfinite(t)
            p = t * (t.abs() >= term.tau)
        else:
            rows, cols = t.shape
            p = t * dare_mask_np(term.seed, rows, cols, term.th) / term.density
        ps.append(p)
    P = torch.stack(ps)
    W = torch.tensor([t.w for t in terms], dtype=torch.float64).view(-1, 1, 1)
    scale = sum(abs(t.w) / (t.density if t.kind == DARE else 1.0) * b for t, b in zip(terms, bounds))
    if mode == SUM:
        return (P * W).sum(0), amb, scale
    sgn = P.sign()
    S = P.sum(0) if sign_method == TOTAL else sgn.sum(0)
    elect = torch.where(S >= 0, 1.0, -1.0)
    mask = sgn == elect
    M = (P * W * mask).sum(0) / mask.sum(0).clamp(min=1)
    if sign_method == TOTAL:  # cancellation: the sign of the sum is decided by rounding
        amb |= (S.abs() <= 1e-4 * scale) & ((P != 0).sum(0) >= 2)
    for p, term, bnd in zip(ps, terms, bounds):  # sign(p) of a near-zero kept value
        amb |= (p != 0) & (p.abs() <= 1e-4 * bnd / (term.density if term.kind == DARE else 1.0))
    return M, amb, scale


def run_merge(terms, mode, sign_method=TOTAL, out=None, threads=0, out_dtype=torch.float32):
    rows, cols = terms[0].B.shape[0], terms[0].A.shape[1]
    if out is None:
        out = torch.full((rows, cols), 12345.0, dtype=out_dtype)
    _C.dense_merge([t.desc() for t in terms], mat(out), mode, sign_method, threads)
    return out


def check(terms, mode, sign_method=TOTAL, out=None, threads=0, tol=None, out_dtype=torch.float32, max_amb=0.01):
    got = run_merge(terms, mode, sign_method, out=out, threads=threads, out_dtype=out_dtype).double()
    want, amb, scale = oracle(terms, mode, sign_method)
    if tol is None:
        f64 = all(t.B.dtype == torch.float64 and t.A.dtype == torch.float64 for t in terms)
        tol = 1e-12 if f64 and out_dtype == torch.float64 else 1e-5
    assert amb.float().mean().item() <= max_amb, "too many ambiguous elements: the test is not testing"
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got) & ~amb, nan & ~amb)
    inf = torch.isinf(want) & ~amb
    assert torch.equal(got[inf], want[inf])
    ok = ~amb & torch.isfinite(want)
    err = (got - want).abs()[ok]
    lim = (tol * scale + 1e-30)[ok]
    assert bool((err <= lim).all()), f"max err / scale {(err / (lim / tol)).max().item():.3g} > {tol}"
    return got


def random_terms(rows, cols, ranks, dtype=torch.float32, layouts=("row", "col"), kinds=(ALL,), gen=None,
                 densities=(0.5,), tau_q=0.6):
    """Terms with differing ranks, negative weights / scalings, given layouts and keep kinds."""
    gen = gen or torch.Generator().manual_seed(0)
    terms = []
    for i, r in enumerate(ranks):
        lb, la = layouts[i % len(layouts)], layouts[(i + 1) % len(layouts)]
        B = make(rows, r, dtype, lb, gen)
        A = make(r, cols, dtype, la, gen)
        s = [0.7, -1.3, 2.0, 0.25, -0.5][i % 5]
        w = [1.0, -0.6, 0.8, 1.7, 0.3][i % 5]
        kind = kinds[i % len(kinds)]
        density = densities[i % len(densities)]
        term = Term(B, A, s=s, w=w, kind=kind, seed=(0xDEADBEEF12345678 * (i + 1)) & M64, density=density)
        if kind == MAGNITUDE:
            term.tau = gap_tau(term.t64(), tau_q)
        terms.append(term)
    return terms


def gap_tau(t: torch.Tensor, q: float) -> float:
    """A threshold near the q-quantile of |t| in a gap between two values (so f32 vs f64 agree)."""
    v = t.abs().flatten().sort().values
    n = v.numel()
    if n == 1:
        return float(v[0]) * 0.5
    i0 = min(max(int(q * n), 1), n - 1)
    best, best_gap = i0, -1.0
    for i in range(max(1, i0 - 20), min(n, i0 + 20)):
        gap = float(v[i] - v[i - 1]) / max(float(v[i]), 1e-30)
        if gap > best_gap:
            best, best_gap = i, gap
    return float(v[best - 1] + v[best]) / 2


# ---------------------------------------------------------------- the hash
def test_hash_implementations_agree():
    for seed in [0, 1, 12345, (1 << 63) + 17, M64]:
        th = thresh24(0.3)
        a = dare_mask_np(seed, 7, 11, th)
        b = dare_mask_torch(seed, 7, 11, th)
        c = torch.tensor([dare_keep_py(seed, i, th) for i in range(77)]).reshape(7, 11)
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [3, (1 << 63) + 5])
def test_dare_mask_is_bit_exact_and_has_the_right_density(density, seed):
    rows, cols = 129, 515
    gen = torch.Generator().manual_seed(5)
    # Positive factors: t > 0 everywhere, so M != 0 is exactly the mask.
    B = torch.rand(rows, 3, generator=gen) + 0.1
    A = torch.rand(3, cols, generator=gen) + 0.1
    term = Term(B, A, s=1.0, kind=DARE, seed=seed, density=density)
    M = run_merge([term], SUM)
    kept = M != 0
    want = dare_mask_torch(seed, rows, cols, term.th)
    assert torch.equal(kept, want)
    n = rows * cols
    frac = kept.double().mean().item()
    assert abs(frac - density) <= 5 * math.sqrt(density * (1 - density) / n) + 1.0 / n
    # kept values are t / density (division in float32)
    t32 = B @ A
    assert torch.allclose(M[kept], (t32 / torch.tensor(density, dtype=torch.float32))[kept], rtol=1e-6, atol=0)


def test_dare_threshold_extremes():
    gen = torch.Generator().manual_seed(9)
    B, A = torch.rand(20, 2, generator=gen) + 0.1, torch.rand(2, 30, generator=gen) + 0.1
    full = Term(B, A, kind=DARE, seed=1, density=1.0)
    assert full.th == 1 << 24
    assert bool((run_merge([full], SUM) != 0).all())
    none = Term(B, A, kind=DARE, seed=1, density=0.5)
    none.th = 0
    assert bool((run_merge([none], SUM) == 0).all())


# ---------------------------------------------------------------- merge rules
MODES = [(SUM, TOTAL), (TIES, TOTAL), (TIES, FREQUENCY)]
MODE_IDS = ["sum", "ties-total", "ties-frequency"]


@pytest.mark.parametrize("mode,sign_method", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind", [ALL, MAGNITUDE, DARE], ids=["all", "magnitude", "dare"])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_every_mode_kind_and_term_count(mode, sign_method, kind, k):
    gen = torch.Generator().manual_seed(100 + k)
    terms = random_terms(37, 61, [4, 1, 7, 3, 2][:k], kinds=(kind,), gen=gen, densities=(0.5, 0.3, 0.8))
    check(terms, mode, sign_method)


@pytest.mark.parametrize("mode,sign_method", MODES, ids=MODE_IDS)
def test_mixed_kinds(mode, sign_method):
    gen = torch.Generator().manual_seed(7)
    terms = random_terms(50, 70, [5, 8, 2, 6], kinds=(ALL, MAGNITUDE, DARE), gen=gen, densities=(0.4, 0.7))
    check(terms, mode, sign_method)


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (37, 61), (129, 515)], ids=str)
@pytest.mark.parametrize("mode,sign_method", MODES, ids=MODE_IDS)
def test_awkward_shapes(shape, mode, sign_method):
    gen = torch.Generator().manual_seed(sum(shape))
    terms = random_terms(*shape, [1, 3, 2], kinds=(MAGNITUDE, DARE, ALL), gen=gen)
    # 1 x 1: every decision can be borderline-free only by construction (gap_tau); allow all or nothing
    check(terms, mode, sign_method, max_amb=1.0 if shape == (1, 1) else 0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layouts", [("row",), ("col",), ("strided",), ("row", "col", "strided")], ids=str)
def test_dtypes_and_layouts(dtype, layouts):
    gen = torch.Generator().manual_seed(11)
    terms = random_terms(45, 83, [6, 3, 9], dtype=dtype, layouts=layouts, kinds=(MAGNITUDE, DARE, ALL), gen=gen)
    for mode, sm in MODES:
        check(terms, mode, sm)
        check(terms, mode, sm, out_dtype=torch.float64)


def test_float64_factors_accumulate_in_float64():
    gen = torch.Generator().manual_seed(12)
    terms = random_terms(40, 90, [16, 5], dtype=torch.float64, kinds=(MAGNITUDE, DARE), gen=gen)
    for mode, sm in MODES:
        check(terms, mode, sm, out_dtype=torch.float64, tol=1e-12)


def test_both_coefs_apply():
    gen = torch.Generator().manual_seed(13)
    terms = random_terms(30, 40, [4, 2], gen=gen)
    terms[0].b_coef, terms[1].b_coef = -2.0, 0.5
    check(terms, SUM)
    check(terms, TIES, TOTAL)


@pytest.mark.parametrize("layout", ["row", "col"])
def test_strided_outputs(layout):
    gen = torch.Generator().manual_seed(14)
    terms = random_terms(33, 47, [3, 5], kinds=(DARE, MAGNITUDE), gen=gen)
    for dtype in [torch.float32, torch.float64]:
        base = torch.full((47 * 2, 33 * 3), 7.0, dtype=dtype)
        out = base[::2, ::3].T if layout == "col" else base.T[::3, ::2]
        assert out.shape == (33, 47)
        check(terms, TIES, FREQUENCY, out=out)
        # untouched elements of the base stay as they were
        mask = torch.ones_like(base, dtype=torch.bool)
        if layout == "col":
            mask[::2, ::3] = False
        else:
            mask.T[::3, ::2] = False
        assert bool((base[mask] == 7.0).all())


def test_rank_zero_term_is_zero():
    gen = torch.Generator().manual_seed(15)
    terms = random_terms(10, 12, [3], gen=gen)
    terms.append(Term(torch.zeros(10, 0), torch.zeros(0, 12), w=2.0))
    check(terms, SUM)
    check(terms, TIES, FREQUENCY)


def test_magnitude_extremes():
    gen = torch.Generator().manual_seed(16)
    B, A = torch.randn(20, 4, generator=gen), torch.randn(4, 25, generator=gen)
    t32 = B @ A
    assert torch.equal(run_merge([Term(B, A, kind=MAGNITUDE, tau=float("inf"))], SUM), torch.zeros(20, 25))
    assert torch.equal(run_merge([Term(B, A, kind=MAGNITUDE, tau=float("nan"))], SUM), torch.zeros(20, 25))
    kept = run_merge([Term(B, A, kind=MAGNITUDE, tau=0.0)], SUM)
    assert torch.equal(kept, run_merge([Term(B, A)], SUM))
    assert torch.allclose(kept, t32, rtol=1e-5, atol=1e-5)
    # a float64 tau between two float32 values: |v| >= tau decided exactly
    v = float(t32.abs().max())
    below = float(np.nextafter(np.float32(v), np.float32(0)))
    tau = (below + v) / 2  # not a float32
    assert (run_merge([Term(B, A, kind=MAGNITUDE, tau=tau)], SUM) != 0).sum().item() == 1


def test_nan_propagates():
    gen = torch.Generator().manual_seed(17)
    terms = random_terms(30, 40, [3, 4, 2], kinds=(ALL, MAGNITUDE, DARE), gen=gen)
    terms[1].B[5, 1] = float("nan")
    terms[2].A[0, 7] = float("nan")
    for mode, sm in MODES:
        got = check(terms, mode, sm)
        assert bool(torch.isnan(got[5]).all()) and bool(torch.isnan(got[:, 7]).all())
        assert int(torch.isnan(got).sum()) == 40 + 30 - 1


def test_infinities_follow_peft():
    """peft masks by multiplying: a masked-out infinity becomes NaN (inf * 0), a kept one stays."""
    gen = torch.Generator().manual_seed(19)
    terms = random_terms(30, 40, [3, 4, 2], kinds=(DARE, ALL, MAGNITUDE), gen=gen)
    terms[0].B[4, 2] = float("inf")
    terms[1].A[1, 9] = float("-inf")
    for mode, sm in MODES:
        got = check(terms, mode, sm)
        assert bool(torch.isinf(got).any()) and bool(torch.isnan(got[4]).any())


def test_threads_do_not_change_results():
    gen = torch.Generator().manual_seed(18)
    terms = random_terms(600, 700, [32, 20, 16], kinds=(MAGNITUDE, DARE, ALL), gen=gen,
                         layouts=("row", "col"))
    for mode, sm in MODES:
        one = run_merge(terms, mode, sm, threads=1)
        many = run_merge(terms, mode, sm, threads=0)
        three = run_merge(terms, mode, sm, threads=3)
        assert torch.equal(one, many) and torch.equal(one, three)
    check(terms, TIES, TOTAL)


# ---------------------------------------------------------------- abs_kth
def kernel_t(B, A, s=1.0):
    """The float32 (float64 for float64 factors) t exactly as the merge kernel computes it."""
    f64 = B.dtype == torch.float64 or A.dtype == torch.float64
    return run_merge([Term(B, A, s=s)], SUM, out_dtype=torch.float64 if f64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (37, 61), (129, 515), (600, 700)], ids=str)
def test_abs_kth_is_topk_of_the_kernel_values(dtype, shape):
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows + cols)
    r = 64 if rows * cols > 100_000 else 5
    B = make(rows, r, dtype, "col", gen)
    A = make(r, cols, dtype, "row", gen)
    s = -0.75
    n = rows * cols
    ks = sorted(k for k in {1, 2, n, n // 3, n // 2 + 1, n - 1} if 1 <= k <= n)
    got = _C.abs_kth([(mat(B), mat(A, s), k) for k in ks])
    t = kernel_t(B, A, s)
    ref = t.abs().flatten().topk(n).values
    t64 = (B.double() @ A.double() * s).abs().flatten().sort(descending=True).values
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    # torch's own float32 product (another summation order): rank k up to values within rounding
    # (1e-5 of max |t|: the error of a small element is relative to the scale, not to itself)
    t32 = (B.float() @ A.float() * s).abs() if dtype != torch.float64 else t.abs()
    for k, tau in zip(ks, got):
        assert tau == float(ref[k - 1]), (k, tau, float(ref[k - 1]))  # exact: the same float32 values
        assert abs(tau - float(t64[k - 1])) <= tol * float(t64[0])
        slack = tol * float(t64[0])
        assert int((t32 > tau + slack).sum()) < k <= int((t32 >= tau - slack).sum())
        # and the merge keeps exactly the elements at or above it
        kept = run_merge([Term(B, A, s=s, kind=MAGNITUDE, tau=tau)], SUM, out_dtype=t.dtype) != 0
        assert int((t.abs() > tau).sum()) < k <= int(kept.sum())
        assert torch.equal(kept, (t.abs() >= tau) & (t != 0))


def test_abs_kth_threads_and_edge_values():
    gen = torch.Generator().manual_seed(21)
    B, A = torch.randn(700, 48, generator=gen), torch.randn(48, 650, generator=gen)
    n = 700 * 650
    ks = [0, 1, 17, n // 5, n]
    one = _C.abs_kth([(mat(B), mat(A, 0.3), k) for k in ks], threads=1)
    many = _C.abs_kth([(mat(B), mat(A, 0.3), k) for k in ks], threads=0)
    assert one == many
    assert one[0] == math.inf
    t = kernel_t(B, A, 0.3).abs().flatten()
    assert one[-1] == float(t.min()) and one[1] == float(t.max())
    # zeros and ties
    Z, ones24 = torch.zeros(3, 2), torch.ones(2, 4)  # (keep the tensors alive: _C sees raw pointers)
    assert _C.abs_kth([(mat(Z), mat(ones24), 5)]) == [0.0]
    ones, minus = torch.ones(4, 1), -torch.ones(1, 5)
    assert _C.abs_kth([(mat(ones), mat(minus), k) for k in [1, 20]]) == [1.0, 1.0]


def test_abs_kth_nan_counts_as_largest():
    gen = torch.Generator().manual_seed(22)
    B, A = torch.randn(10, 3, generator=gen), torch.randn(3, 8, generator=gen)
    B[2, 0] = float("nan")  # row 2 of t: 8 NaNs
    res = _C.abs_kth([(mat(B), mat(A), k) for k in [1, 8, 9, 80]])
    assert math.isnan(res[0]) and math.isnan(res[1])
    t = kernel_t(B, A).abs()
    finite = t[~torch.isnan(t)].sort(descending=True).values
    assert res[2] == float(finite[0]) and res[3] == float(finite[-1])


# ---------------------------------------------------------------- validation
def test_bad_arguments_raise_value_error():
    B, A = torch.randn(4, 2), torch.randn(2, 5)
    out = torch.empty(4, 5)
    good = Term(B, A).desc()
    with pytest.raises(ValueError, match="term 1"):
        _C.dense_merge([good, Term(torch.randn(4, 3), A).desc()], mat(out), 0, 0)  # B.cols != A.rows
    with pytest.raises(ValueError, match="term 1"):
        _C.dense_merge([good, Term(torch.randn(3, 2), A).desc()], mat(out), 0, 0)  # wrong out rows
    with pytest.raises(ValueError, match="term 0"):
        _C.dense_merge([Term(B, torch.randn(2, 6)).desc()], mat(out), 0, 0)  # wrong in
    with pytest.raises(ValueError, match="keep_kind"):
        _C.dense_merge([good[:3] + (3,) + good[4:]], mat(out), 0, 0)
    with pytest.raises(ValueError, match="thresh24"):
        _C.dense_merge([good[:3] + (2, 0.0, 1, (1 << 24) + 1, 0.5)], mat(out), 0, 0)
    with pytest.raises(ValueError, match="density"):
        _C.dense_merge([good[:3] + (2, 0.0, 1, 100, 0.0)], mat(out), 0, 0)
    with pytest.raises(ValueError, match="seed"):
        _C.dense_merge([good[:5] + (-1,) + good[6:]], mat(out), 0, 0)
    with pytest.raises(ValueError, match="seed"):
        _C.dense_merge([good[:5] + (1 << 64,) + good[6:]], mat(out), 0, 0)
    with pytest.raises(ValueError, match="mode"):
        _C.dense_merge([good], mat(out), 2, 0)
    with pytest.raises(ValueError, match="sign_method"):
        _C.dense_merge([good], mat(out), 1, 2)
    with pytest.raises(ValueError, match="at least one"):
        _C.dense_merge([], mat(out), 0, 0)
    with pytest.raises(ValueError, match="float32 or float64"):
        _C.dense_merge([good], mat(out.half()), 0, 0)
    with pytest.raises(ValueError, match="coef"):
        _C.dense_merge([good], mat(out, 2.0), 0, 0)
    with pytest.raises(ValueError, match="threads"):
        _C.dense_merge([good], mat(out), 0, 0, -1)
    with pytest.raises(ValueError, match="expected a tuple"):
        _C.dense_merge([good[:7]], mat(out), 0, 0)
    with pytest.raises(ValueError, match="task 1"):
        _C.abs_kth([(mat(B), mat(A), 1), (mat(B), mat(A), 21)])
    with pytest.raises(ValueError, match="task 0"):
        _C.abs_kth([(mat(B), mat(A), -1)])
    with pytest.raises(ValueError, match="task 0"):
        _C.abs_kth([(mat(B), mat(torch.randn(3, 5)), 1)])
    assert _C.abs_kth([]) == []
    # a seed >= 2^63 is fine
    _C.dense_merge([good[:3] + (2, 0.0, (1 << 64) - 1, 100, 0.5)], mat(out), 0, 0)
