"""The compiled core kmerge_fast._C, called directly on raw descriptions.

Every kernel is checked against float64 torch truth built from the exact
values the kernel reads (half inputs are exact in float32), over every dtype,
both accumulation modes, row-major factors and transposed / strided views,
stacks of several blocks with (negative) coefficients, and the edge shapes
(R = 1, K = 0, odd sizes). Bad descriptions must raise ValueError.

Mat = (ptr, dtype, rows, cols, row_stride, col_stride, coef); a Stack is a
list of Mats with equal rows, concatenated along columns.
"""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest
import torch

_C = pytest.importorskip("kmerge_fast._C")
from helpers.cpp_tasks import make, mat  # noqa: E402

IN_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ROOT = pathlib.Path(__file__).resolve().parents[1]

#: fast mode (float32 accumulation in chunks of <= 256 rows) vs float64 truth,
#: relative to ||X||_F ||Y||_F; precise mode with float64 inputs.
FAST_TOL = 1e-5
PRECISE_TOL = 1e-12


def ids(x):
    return str(x).replace("torch.", "")


class Desc(list):
    """A stack description (list of Mats) that keeps its tensors alive: the
    kernels see raw pointers only."""

    def __init__(self, blocks: list[tuple[torch.Tensor, float]]):
        super().__init__(mat(t, c) for t, c in blocks)
        self.tensors = [t for t, _ in blocks]


def stack_of(blocks: list[tuple[torch.Tensor, float]]) -> tuple[list[tuple], torch.Tensor]:
    """(description, float64 truth) of a stack [c_1 M_1, c_2 M_2, ...]."""
    truth = torch.cat([c * t.double() for t, c in blocks], dim=1)
    return Desc(blocks), truth


def random_stack(k: int, widths: list[int], dtype, layout: str, gen, coefs=None):
    coefs = coefs or [1.0] * len(widths)
    return stack_of([(make(k, w, dtype, layout, gen), c) for w, c in zip(widths, coefs)])


def rel_err(got: torch.Tensor, want: torch.Tensor, scale: float) -> float:
    return (got - want).abs().max().item() / max(scale, 1e-300) if want.numel() else 0.0


# ---------------------------------------------------------------- layout rules
def test_core_has_no_torch_pybind_or_python_headers():
    core = ROOT / "csrc" / "core"
    files = sorted(p for p in core.rglob("*") if p.suffix in {".h", ".hpp", ".cpp", ".cc"})
    assert files, f"no sources found under {core}"
    banned = re.compile(r"#\s*include\s*[<\"](torch|ATen|c10|pybind11|Python\.h)")
    for path in files:
        text = path.read_text()
        assert not banned.search(text), f"{path} includes torch / pybind11 / Python headers"
        assert "pybind11" not in text and "Python.h" not in text, f"{path} mentions pybind11 / Python.h"


def test_info():
    info = _C.info()
    assert set(info) >= {"simd", "native", "threads", "version"}
    assert isinstance(info["simd"], str) and info["simd"]
    assert isinstance(info["native"], bool)
    assert info["threads"] >= 1
    assert info["version"] == "0.1.0"


def test_fma_peak_measures_the_vector_ceiling():
    fp64, fp32 = _C.fma_peak(True, 1, 0.05), _C.fma_peak(False, 1, 0.05)
    assert math.isfinite(fp64) and fp64 > 0.5  # GFLOP/s: any vector unit of this century
    assert fp32 > 1.5 * fp64  # twice the lanes per vector
    with pytest.raises(ValueError, match="seconds"):
        _C.fma_peak(True, 1, 0.0)
    with pytest.raises(ValueError, match="threads"):
        _C.fma_peak(True, -1)


# ---------------------------------------------------------------- gram
@pytest.mark.parametrize("precise", [False, True], ids=["fast", "precise"])
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=ids)
@pytest.mark.parametrize("layout", ["row", "col", "strided"])
def test_gram_matches_float64_truth(dtype, precise, layout):
    gen = torch.Generator().manual_seed(1)
    # (K, block widths of X, block widths of Y): odd sizes, R = 1, many blocks
    shapes = [(577, [193], [45]), (2048, [32], [32, 32, 64, 32, 32, 32, 32]), (300, [7, 10], [17]),
              (1, [1], [1]), (513, [1], [3, 1])]
    tasks, checks = [], []
    for k, wx, wy in shapes:
        x, tx = random_stack(k, wx, dtype, layout, gen, coefs=[0.5, -1.5][: len(wx)])
        y, ty = random_stack(k, wy, dtype, layout, gen, coefs=[(-1.0) ** i * (1 + i) for i in range(len(wy))])
        out = torch.full((tx.shape[1], ty.shape[1]), float("nan"), dtype=torch.float64)
        tasks.append((x, y, out.data_ptr(), False))
        checks.append((out, tx.T @ ty, tx.norm().item() * ty.norm().item()))
    _C.gram(tasks, precise, 2)
    # precise: float64 accumulation (products of float32 / half values are exact in float64)
    tol = (PRECISE_TOL if dtype == torch.float64 else 1e-13) if precise else FAST_TOL
    for out, want, scale in checks:
        assert torch.isfinite(out).all()
        assert rel_err(out, want, scale) <= tol


@pytest.mark.parametrize("precise", [False, True], ids=["fast", "precise"])
@pytest.mark.parametrize("layout", ["row", "col", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=ids)
def test_symmetric_gram_equals_general_and_is_exactly_symmetric(dtype, layout, precise):
    gen = torch.Generator().manual_seed(2)
    for k, widths in [(1000, [32, 16, 8]), (577, [193]), (64, [1]), (256, [257])]:
        s, ts = random_stack(k, widths, dtype, layout, gen, coefs=[2.0, -0.5, 1.0][: len(widths)])
        r = ts.shape[1]
        sym = torch.full((r, r), float("nan"), dtype=torch.float64)
        gen_ = torch.full((r, r), float("nan"), dtype=torch.float64)
        _C.gram([(s, s, sym.data_ptr(), True), (s, s, gen_.data_ptr(), False)], precise, 2)
        assert torch.equal(sym, sym.T)
        want = ts.T @ ts
        scale = float((ts**2).sum())
        tol = PRECISE_TOL if precise else FAST_TOL
        assert rel_err(sym, want, scale) <= tol
        assert rel_err(gen_, want, scale) <= tol
        if precise and dtype != torch.float64:
            # float64 accumulation of exactly representable products: same sums either way
            assert rel_err(sym, gen_, scale) <= 1e-15


def test_gram_k_zero_gives_zeros_and_empty_outputs_are_fine():
    a = torch.empty(0, 5)
    b = torch.empty(0, 3, dtype=torch.float16)
    out = torch.full((5, 3), float("nan"), dtype=torch.float64)
    sym = torch.full((5, 5), float("nan"), dtype=torch.float64)
    empty_out = torch.empty(0, 3, dtype=torch.float64)
    no_cols, y = torch.empty(4, 0), torch.randn(4, 3)
    tasks = [([mat(a)], [mat(b)], out.data_ptr(), False), ([mat(a)], [mat(a)], sym.data_ptr(), True),
             ([mat(no_cols)], [mat(y)], empty_out.data_ptr(), False)]
    for precise in (False, True):
        _C.gram(tasks, precise, 0)
        assert torch.equal(out, torch.zeros(5, 3, dtype=torch.float64))
        assert torch.equal(sym, torch.zeros(5, 5, dtype=torch.float64))
    _C.gram([], True, 0)  # no tasks: nothing to do


def test_gram_rank_one_and_a_factor_layout():
    """G_a = A1 A2^T from row-major A's passed as transposed views (n x r, strides (1, n))."""
    gen = torch.Generator().manual_seed(3)
    for r1, r2, n in [(1, 1, 4097), (1, 32, 2048), (32, 256, 2048), (5, 3, 7)]:
        a1, a2 = torch.randn(r1, n, generator=gen), torch.randn(r2, n, generator=gen)
        out = torch.empty(r1, r2, dtype=torch.float64)
        _C.gram([([mat(a1.T, 0.25)], [mat(a2.T, -4.0)], out.data_ptr(), False)], False, 2)
        want = -(a1.double() @ a2.double().T)
        assert rel_err(out, want, a1.double().norm().item() * a2.double().norm().item()) <= FAST_TOL


@pytest.mark.parametrize("precise", [False, True], ids=["fast", "precise"])
def test_gram_results_do_not_depend_on_threads_or_batching(precise):
    """A lone task is split over K between threads; its chunk sums are combined in
    the unsplit order, so every thread count and batch gives the same bits."""
    gen = torch.Generator().manual_seed(4)
    x, tx = random_stack(3000, [24, 8], torch.float32, "row", gen, coefs=[1.0, -2.0])
    y, ty = random_stack(3000, [40], torch.float32, "col", gen)
    results = []
    for threads in (1, 2, 3, 5, 0):
        o = torch.empty(32, 40, dtype=torch.float64)
        s = torch.empty(32, 32, dtype=torch.float64)
        _C.gram([(x, y, o.data_ptr(), False)], precise, threads)
        _C.gram([(x, x, s.data_ptr(), True)], precise, threads)
        results.append((o, s))
    many = [torch.empty(32, 40, dtype=torch.float64) for _ in range(7)]
    _C.gram([(x, y, o.data_ptr(), False) for o in many], precise, 2)
    for o, s in results[1:]:
        assert torch.equal(o, results[0][0]) and torch.equal(s, results[0][1])
    for o in many:
        assert torch.equal(o, results[0][0])
    tol = 1e-13 if precise else FAST_TOL
    assert rel_err(results[0][0], tx.T @ ty, tx.norm().item() * ty.norm().item()) <= tol
    assert rel_err(results[0][1], tx.T @ tx, tx.norm().item() ** 2) <= tol


def test_gram_half_inputs_are_exact_in_precise_mode():
    """fp16 / bf16 values and their products are exact in float64: precise mode is exact up to summation."""
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(600, 9, generator=gen).to(dtype)
        y = torch.randn(600, 11, generator=gen).to(dtype)
        out = torch.empty(9, 11, dtype=torch.float64)
        _C.gram([([mat(x)], [mat(y)], out.data_ptr(), False)], True, 1)
        want = x.double().T @ y.double()
        assert rel_err(out, want, x.double().norm().item() * y.double().norm().item()) <= 1e-15


def test_random_mixed_stacks_all_kernels():
    """Stacks whose blocks mix dtypes, layouts, widths and coefs (panels that
    straddle blocks of different layouts), against float64 truth."""
    rng = np.random.default_rng(13)
    gen = torch.Generator().manual_seed(13)
    layouts = ["row", "col", "strided"]
    for trial in range(40):
        k = int(rng.choice([0, 1, 5, 64, 255, 256, 257, 700]))
        nblocks = int(rng.integers(1, 5))
        blocks = []
        for _ in range(nblocks):
            w = int(rng.choice([1, 3, 8, 9, 16, 31, 33]))
            dtype = IN_DTYPES[int(rng.integers(0, 4))]
            blocks.append((make(k, w, dtype, layouts[int(rng.integers(0, 3))], gen), float(rng.normal())))
        x, tx = stack_of(blocks)
        y, ty = stack_of(blocks[::-1])
        precise = bool(trial % 2)
        g = torch.full((tx.shape[1], ty.shape[1]), float("nan"), dtype=torch.float64)
        sym = torch.full((tx.shape[1], tx.shape[1]), float("nan"), dtype=torch.float64)
        _C.gram([(x, y, g.data_ptr(), False), (x, x, sym.data_ptr(), True)], precise, 2)
        tol = 1e-13 if precise else FAST_TOL
        assert rel_err(g, tx.T @ ty, tx.norm().item() * ty.norm().item() + 1e-300) <= tol, trial
        assert rel_err(sym, tx.T @ tx, tx.norm().item() ** 2 + 1e-300) <= tol, trial
        assert torch.equal(sym, sym.T)
        # apply through a transposed output view
        c = int(rng.integers(1, 40))
        t = torch.randn(tx.shape[1], c, generator=gen, dtype=torch.float64)
        out = torch.empty(c, k, dtype=torch.float64)
        _C.apply([(x, t.data_ptr(), c, mat(out.T))], precise, 2)
        bound = (tx.shape[1] + 2) * (2.0**-52 if precise else 2.0**-23) * (tx.abs() @ t.abs())
        assert ((out.T - tx @ t).abs() <= bound + 1e-300).all(), trial
        # dense_stats of X Y'^T against a second stack with the same columns
        q = int(rng.integers(1, 90))
        y2, ty2 = stack_of([(make(q, m.shape[1], torch.float32, layouts[int(rng.integers(0, 3))], gen), 1.0)
                            for m, _ in blocks])
        st = torch.empty(2, dtype=torch.float64)
        _C.dense_stats([(x, y2, st.data_ptr())], 2)
        d = (tx @ ty2.T).abs()
        scale = (tx.abs() @ ty2.abs().T)
        s_tol = 1e-5 * scale.sum().item() + 1e-300
        assert abs(st[0].item() - d.sum().item()) <= s_tol, trial
        assert abs(st[1].item() - (d.max().item() if d.numel() else 0.0)) <= 1e-5 * (scale.max().item() if d.numel() else 0) + 1e-300, trial


# ---------------------------------------------------------------- apply
@pytest.mark.parametrize("precise", [False, True], ids=["fast", "precise"])
@pytest.mark.parametrize("out_dtype", IN_DTYPES, ids=ids)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=ids)
def test_apply_matches_truth(in_dtype, out_dtype, precise):
    gen = torch.Generator().manual_seed(6)
    cases = [("row", 577, [13, 20], 7, "row"), ("col", 1000, [32, 32], 16, "col"),
             ("strided", 300, [5], 3, "strided"), ("row", 8192 // 16, [1], 1, "col"), ("col", 33, [64, 64, 64], 40, "row")]
    tasks, checks = [], []
    for layout, k, widths, c, out_layout in cases:
        x, tx = random_stack(k, widths, in_dtype, layout, gen, coefs=[(-0.5) ** i for i in range(len(widths))])
        t = torch.randn(tx.shape[1], c, generator=gen, dtype=torch.float64)
        if out_layout == "row":
            out = torch.full((k, c), float("nan")).to(out_dtype)
            view = out
        elif out_layout == "col":  # written through a transposed view, like A' (c x n)
            base = torch.full((c, k), float("nan")).to(out_dtype)
            view = base.T
        else:
            base = torch.full((2 * k, 3 * c), float("nan")).to(out_dtype)
            view = base[::2, 1::3]
        tasks.append((x, t.data_ptr(), c, mat(view)))
        checks.append((view, tx @ t, tx, t))
    _C.apply(tasks, precise, 2)
    eps = 2.0**-52 if precise else 2.0**-23
    store = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 0.0}[out_dtype]
    for view, want, tx, t in checks:
        got = view.double()
        assert torch.isfinite(got).all()
        # accumulation error (R + 2 roundings of |x||t| terms) plus the one output rounding
        r = tx.shape[1]
        bound = (r + 2) * eps * (tx.abs() @ t.abs()) + store * want.abs() * (1 + 1e-6)
        if out_dtype == torch.float16:
            bound = bound + 2.0**-25  # half subnormals have absolute spacing 2^-24
        assert ((got - want).abs() <= bound).all(), (got - want).abs().max()


def test_apply_precise_rounds_once_to_nearest_even():
    """float64 accumulation, one rounding: fp16 / fp32 outputs equal numpy's correctly rounded casts."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    t = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    # integers and halves keep the float64 products exact so the truth is exact too
    x = torch.round(x * 64) / 64
    t = torch.round(t * 64) / 64
    want = (x @ t).numpy()
    for dtype, np_dtype in [(torch.float16, np.float16), (torch.float32, np.float32)]:
        out = torch.empty(500, 5, dtype=dtype)
        _C.apply([([mat(x)], t.data_ptr(), 5, mat(out))], True, 1)
        np.testing.assert_array_equal(out.float().numpy(), want.astype(np_dtype).astype(np.float32))


def test_apply_edge_shapes():
    x = torch.randn(0, 4)
    t = torch.randn(4, 3, dtype=torch.float64)
    out = torch.empty(0, 3)
    _C.apply([([mat(x)], t.data_ptr(), 3, mat(out))], True, 0)
    # R = 0: out = 0
    x = torch.empty(5, 0)
    out = torch.full((5, 2), float("nan"))
    t0 = torch.empty(0, 2, dtype=torch.float64)
    _C.apply([([mat(x)], t0.data_ptr(), 2, mat(out))], False, 0)
    assert torch.equal(out, torch.zeros(5, 2))
    # C = 0
    out = torch.empty(5, 0)
    x, t0 = torch.randn(5, 2), torch.empty(2, 0, dtype=torch.float64)
    _C.apply([([mat(x)], t0.data_ptr(), 0, mat(out))], False, 0)


def test_apply_matches_the_truncation_use():
    """B' = [c_i B_i] T_B and A'^T = [A_i^T] T_A written through A' (rank x n_in) transposed."""
    gen = torch.Generator().manual_seed(8)
    bs = [torch.randn(300, 4, generator=gen) for _ in range(3)]
    as_ = [torch.randn(4, 200, generator=gen) for _ in range(3)]
    coefs = [0.5, -1.0, 2.0]
    tb = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    ta = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    new_b = torch.empty(300, 6)
    new_a = torch.empty(6, 200)
    tasks = [([mat(b, c) for b, c in zip(bs, coefs)], tb.data_ptr(), 6, mat(new_b)),
             ([mat(a.T) for a in as_], ta.data_ptr(), 6, mat(new_a.T))]
    _C.apply(tasks, True, 0)
    want_b = torch.cat([c * b.double() for b, c in zip(bs, coefs)], 1) @ tb
    want_a = (torch.cat([a.double().T for a in as_], 1) @ ta).T
    assert rel_err(new_b.double(), want_b, want_b.abs().max().item()) <= 1e-6
    assert rel_err(new_a.double(), want_a, want_a.abs().max().item()) <= 1e-6


# ---------------------------------------------------------------- dense_stats
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=ids)
def test_dense_stats_l1_linf_of_a_difference(dtype):
    gen = torch.Generator().manual_seed(9)
    tasks, wants, keep = [], [], []  # keep: the kernels see raw pointers only
    for n_out, n_in, rx, ry in [(577, 193, 4, 8), (64, 300, 1, 1), (1, 1, 2, 3), (1000, 700, 16, 16)]:
        bx, by = torch.randn(n_out, rx, generator=gen).to(dtype), torch.randn(n_out, ry, generator=gen).to(dtype)
        ax, ay = torch.randn(rx, n_in, generator=gen).to(dtype), torch.randn(ry, n_in, generator=gen).to(dtype)
        keep += [bx, by, ax, ay]
        sx, sy = 0.75, 2.0
        xs = [mat(bx, sx), mat(by, -sy)]
        ys = [mat(ax.T), mat(ay.T)]
        out = torch.full((2,), float("nan"), dtype=torch.float64)
        tasks.append((xs, ys, out.data_ptr()))
        d = sx * bx.double() @ ax.double() - sy * by.double() @ ay.double()
        wants.append((out, d.abs().sum().item(), d.abs().max().item(), d.numel()))
    _C.dense_stats(tasks, 2)
    for out, s, m, numel in wants:
        assert out[0].item() == pytest.approx(s, rel=1e-5)
        assert out[1].item() == pytest.approx(m, rel=1e-5)


@pytest.mark.parametrize("layout", ["row", "col", "strided"])
def test_dense_stats_any_layout(layout):
    gen = torch.Generator().manual_seed(10)
    x = make(333, 9, torch.float32, layout, gen)
    y = make(129, 9, torch.float32, "row" if layout == "col" else "col", gen)
    out = torch.empty(2, dtype=torch.float64)
    _C.dense_stats([([mat(x, -3.0)], [mat(y)], out.data_ptr())], 1)
    d = -3.0 * x.double() @ y.double().T
    assert out[0].item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
    assert out[1].item() == pytest.approx(d.abs().max().item(), rel=1e-5)


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=ids)
def test_dense_stats_of_identical_updates_is_exactly_zero(dtype):
    """[s B, -s B] [A^T, A^T]^T: each block's partial tile is accumulated on its
    own, so the two cancel exactly (l1 / linf distance of an adapter to itself)."""
    gen = torch.Generator().manual_seed(14)
    b = torch.randn(577, 7, generator=gen).to(dtype)
    a = torch.randn(7, 193, generator=gen).to(dtype)
    out = torch.full((2,), float("nan"), dtype=torch.float64)
    _C.dense_stats([([mat(b, 0.3), mat(b, -0.3)], [mat(a.T), mat(a.T)], out.data_ptr())], 2)
    assert out.tolist() == [0.0, 0.0]


def test_dense_stats_edge_cases():
    out = torch.full((2,), float("nan"), dtype=torch.float64)
    x, y = torch.empty(0, 3), torch.randn(5, 3)
    _C.dense_stats([([mat(x)], [mat(y)], out.data_ptr())], 0)
    assert out.tolist() == [0.0, 0.0]
    out = torch.full((2,), float("nan"), dtype=torch.float64)
    x, y = torch.randn(4, 0), torch.randn(5, 0)
    _C.dense_stats([([mat(x)], [mat(y)], out.data_ptr())], 0)
    assert out.tolist() == [0.0, 0.0]
    x = torch.randn(10, 2)
    x[3, 1] = float("nan")
    out = torch.zeros(2, dtype=torch.float64)
    y = torch.randn(7, 2)
    _C.dense_stats([([mat(x)], [mat(y)], out.data_ptr())], 0)
    assert math.isnan(out[0].item()) and math.isnan(out[1].item())


# ---------------------------------------------------------------- copy / conversions
def test_copy_scales_converts_and_writes_through_views():
    gen = torch.Generator().manual_seed(11)
    for src_dtype in IN_DTYPES:
        for dst_dtype in IN_DTYPES:
            src = torch.randn(37, 23, generator=gen).to(src_dtype)
            dst = torch.empty(23, 37, dtype=dst_dtype).T  # a transposed destination view
            _C.copy([(mat(src, -0.5), mat(dst))], 0)
            want = (src.double() * -0.5).numpy()
            if dst_dtype == torch.float16:
                np.testing.assert_array_equal(dst.double().numpy(), want.astype(np.float16).astype(np.float64))
            elif dst_dtype == torch.float32:
                np.testing.assert_array_equal(dst.double().numpy(), want.astype(np.float32).astype(np.float64))
            elif dst_dtype == torch.float64:
                np.testing.assert_array_equal(dst.double().numpy(), want)
            else:
                assert torch.allclose(dst.double(), torch.from_numpy(want), rtol=2**-8, atol=0)


def test_half_and_bfloat16_conversions_are_exact_and_round_to_nearest_even():
    # every fp16 / bf16 bit pattern -> float32, bit for bit (NaNs stay NaN)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        src = bits.view(dtype).reshape(256, 256)
        dst = torch.empty(256, 256)
        _C.copy([(mat(src), mat(dst))], 0)
        want = src.float()
        nan = want.isnan()
        assert torch.equal(dst.isnan(), nan)
        assert torch.equal(dst[~nan].view(torch.int32), want[~nan].view(torch.int32))
    # float32 -> fp16 / bf16 on random bit patterns (normals, subnormals, inf, overflow, ties)
    gen = torch.Generator().manual_seed(12)
    raw = torch.randint(-(2**31), 2**31 - 1, (512, 512), generator=gen, dtype=torch.int64).to(torch.int32)
    f = raw.view(torch.float32).clone()
    special = [65504.0, 65519.0, 65520.0, 1e-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26, -0.0, float("inf"), -float("inf"),
               1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 2.0**-14 + 2.0**-25]
    f[0, : len(special)] = torch.tensor(special)
    scaled = f.clone()
    scaled[1:, :] = torch.ldexp(torch.frexp(f[1:, :]).mantissa, torch.randint(-30, 18, (511, 512), generator=gen).float())
    for src in (f, scaled):
        for dtype in (torch.float16, torch.bfloat16):
            dst = torch.empty(512, 512, dtype=dtype)
            _C.copy([(mat(src), mat(dst))], 2)
            want = src.to(dtype)
            nan = want.isnan()
            assert torch.equal(dst.isnan(), nan)
            assert torch.equal(dst[~nan].view(torch.int16), want[~nan].view(torch.int16))


def _double_rounding_traps(gen: torch.Generator, n: int) -> torch.Tensor:
    """float64 values near fp16 rounding boundaries: random halves +- half an fp16 ulp +- tiny offsets
    (rounding them to float32 first, then to fp16, would be wrong on the ties)."""
    h = torch.randint(0, 0x7bff, (n,), generator=gen, dtype=torch.int32).to(torch.int16).view(torch.float16).double()
    ulp = torch.where(h.abs() < 2.0**-14, torch.full_like(h, 2.0**-24), h.abs() * 2.0**-10)
    tiny = torch.ldexp(torch.ones_like(h), torch.randint(-45, -30, (n,), generator=gen)) * h.abs().clamp_min(2.0**-24)
    sign = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return sign * (h.abs() + 0.5 * ulp + torch.randint(-1, 2, (n,), generator=gen).double() * tiny)


@pytest.mark.parametrize("n", [1, 3, 4, 7, 8, 9, 61, 4096])
def test_double_to_half_rounds_once(n):
    """float64 -> fp16 stores (copy: the vector F16C runs where built, the portable code on the tail and on
    strided runs) give numpy's correctly rounded float64 -> float16, bit for bit."""
    gen = torch.Generator().manual_seed(n)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65520.0, 65519.999, 1e300, -1e-300,
                            2.0**-25, 2.0**-25 + 2.0**-60, 1 + 2.0**-11 + 2.0**-40, 1 + 2.0**-11 - 2.0**-40],
                           dtype=torch.float64)
    values = torch.cat([special, _double_rounding_traps(gen, 4 * n)])
    values = values[torch.randint(0, values.numel(), (16 * n,), generator=gen)].reshape(16, n)
    values += torch.randn(values.shape, generator=gen, dtype=torch.float64) * 2.0**-50 * values.abs()
    with np.errstate(over="ignore"):
        want = torch.from_numpy(values.numpy().astype(np.float16))
    for dst in (torch.empty(values.shape, dtype=torch.float16), torch.empty(values.T.shape, dtype=torch.float16).T):
        _C.copy([(mat(values), mat(dst))], 1)
        nan = want.isnan()
        assert torch.equal(dst.isnan(), nan)
        assert torch.equal(dst[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_float_to_half_stores_in_apply():
    """apply in float (precise=False) stores fp16 rows straight from float: X @ I must equal X.to(fp16)."""
    gen = torch.Generator().manual_seed(5)
    raw = torch.randint(0, 2**31 - 1, (37, 24), generator=gen, dtype=torch.int64).to(torch.int32)
    x = raw.view(torch.float32).clone()
    x = torch.ldexp(torch.frexp(x).mantissa, torch.randint(-30, 18, x.shape, generator=gen).float())
    x[(x == 0) | ~x.isfinite()] = 1.0  # X @ I adds 0 * x terms: no signed zeros, no inf or NaN
    x *= torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1
    eye = torch.eye(24, dtype=torch.float64)
    out = torch.empty(37, 24, dtype=torch.float16)
    _C.apply([([mat(x)], eye.data_ptr(), 24, mat(out))], False, 1)
    assert torch.equal(out, x.to(torch.float16))


# ---------------------------------------------------------------- errors
def test_bad_descriptions_raise_value_error():
    x = torch.randn(10, 4)
    y = torch.randn(10, 3)
    short = torch.randn(9, 3)
    out = torch.empty(4, 3, dtype=torch.float64)
    good = mat(x)
    x64 = x.double()

    def gram(tasks, precise=False, threads=0):
        _C.gram(tasks, precise, threads)

    cases = {
        "rows": lambda: gram([([mat(x), mat(short)], [mat(y)], out.data_ptr(), False)]),
        "K": lambda: gram([([mat(x)], [mat(short)], out.data_ptr(), False)]),
        "dtype": lambda: gram([([(x.data_ptr(), 7, 10, 4, 4, 1, 1.0)], [mat(y)], out.data_ptr(), False)]),
        "neg dtype": lambda: gram([([(x.data_ptr(), -1, 10, 4, 4, 1, 1.0)], [mat(y)], out.data_ptr(), False)]),
        "null ptr": lambda: gram([([(0, 0, 10, 4, 4, 1, 1.0)], [mat(y)], out.data_ptr(), False)]),
        "null out": lambda: gram([([good], [mat(y)], 0, False)]),
        "empty stack": lambda: gram([([], [mat(y)], out.data_ptr(), False)]),
        "short mat": lambda: gram([([good[:6]], [mat(y)], out.data_ptr(), False)]),
        "neg shape": lambda: gram([([(x.data_ptr(), 0, -1, 4, 4, 1, 1.0)], [mat(y)], out.data_ptr(), False)]),
        "not int": lambda: gram([([(x.data_ptr(), 0, 10.0, 4, 4, 1, 1.0)], [mat(y)], out.data_ptr(), False)]),
        "task arity": lambda: gram([([good], [mat(y)], out.data_ptr())]),
        "sym differs": lambda: gram([([good], [mat(x, 2.0)], out.data_ptr(), True)]),
        "threads": lambda: gram([([good], [mat(y)], out.data_ptr(), False)], threads=-1),
        "misaligned": lambda: gram([([(x.data_ptr() + 2, 0, 10, 4, 4, 1, 1.0)], [mat(y)], out.data_ptr(), False)]),
        "apply shape": lambda: _C.apply([([good], out.data_ptr(), 3, mat(torch.empty(10, 2)))], True, 0),
        "apply null T": lambda: _C.apply([([good], 0, 3, mat(torch.empty(10, 3)))], True, 0),
        "apply coef": lambda: _C.apply([([good], out.data_ptr(), 3, mat(torch.empty(10, 3), 2.0))], True, 0),
        "stats R": lambda: _C.dense_stats([([good], [mat(y)], out.data_ptr())], 0),
        "stats null": lambda: _C.dense_stats([([good], [mat(x)], 0)], 0),
        "copy shape": lambda: _C.copy([(good, mat(y))], 0),
        "wsum shape": lambda: _C.weighted_sum([([good, mat(torch.randn(10, 3))], mat(torch.empty(10, 4)))], False, 0),
        "wsum empty": lambda: _C.weighted_sum([([], mat(torch.empty(10, 4)))], False, 0),
        "wsum f64": lambda: _C.weighted_sum([([mat(x64)], mat(torch.empty(10, 4)))], False, 0),
        "wsum coef": lambda: _C.weighted_sum([([good], mat(torch.empty(10, 4), 2.0))], False, 0),
        "tasks type": lambda: _C.gram("abc", False, 0),
    }
    for name, call in cases.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"{name}: no ValueError")


def test_error_messages_name_the_problem():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"block 1 has 9 rows"):
        _C.gram([([mat(x), mat(torch.randn(9, 2))], [mat(x)], torch.empty(6, 4, dtype=torch.float64).data_ptr(), False)],
                False, 0)
    with pytest.raises(ValueError, match=r"dtype code 9"):
        _C.gram([([(x.data_ptr(), 9, 10, 4, 4, 1, 1.0)], [mat(x)], 1 << 12, False)], False, 0)
    with pytest.raises(ValueError, match=r"null pointer"):
        _C.dense_stats([([(0, 0, 3, 4, 4, 1, 1.0)], [mat(x)], 1 << 12)], 0)


@pytest.mark.parametrize("dst_layout", ["row", "col"])
def test_weighted_sum_any_layout(dst_layout):
    """_C.weighted_sum on row- and column-major sources and destinations (walked along the
    destination's contiguous direction): torch's roundings, bit for bit, into float16."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(37, 53, generator=g)
    y = torch.randn(53, 37, generator=g).half().T  # column-major float16 source
    out = torch.empty(37, 53, dtype=torch.float16) if dst_layout == "row" else \
        torch.empty(53, 37, dtype=torch.float16).T
    _C.weighted_sum([([mat(x, 0.3), mat(y, -1.7)], mat(out))], False, 2)
    want = (x * 0.3 + y.float() * -1.7).half()
    assert torch.equal(out, want)
