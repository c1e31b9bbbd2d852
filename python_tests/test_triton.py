"""The Triton backend against the reference backend and float64 truth.

Two modes, chosen by how Triton was imported (conftest.py sets
TRITON_INTERPRET=1 when no CUDA device is present):

- ``triton_interpret``: the kernels run on CPU tensors under Triton's
  interpreter (the backend forced). The interpreter is slow, so the
  correctness cases of the other backends run on small shapes and a subset
  of the dtype x shape matrix.
- ``triton_gpu``: compiled kernels on CUDA tensors: the full matrix (the
  cases marked ``gpu_only`` too) plus Llama-sized shapes.

The cases are the checks the other backends' tests run (helpers/
similarity_cases.py, merge_cases.py, method_cases.py), called with the backend
forced; on a GPU their adapter factory makes CUDA tensors (strides kept). The kernel-level
tests below cover what those do not: layouts, multi-tile ranks, bit-exact
DARE masks, abs_kth against the kernel's own values, NaN, mixed dtypes and
the dispatch rules. Skipped when Triton is not installed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import kmerge_fast as kf  # noqa: E402
from kmerge_fast import ops  # noqa: E402
from kmerge_fast.ops import Factor  # noqa: E402
from kmerge_fast.ops.numerics.elementwise import (ALL, DARE, MAGNITUDE, SUM, TIES, Keep, dare_mask,  # noqa: E402
                                         dare_thresh24, magnitude_k)

import conftest  # noqa: E402
from conftest import DTYPES, SHAPES_AWKWARD, SHAPES_SMALL  # noqa: E402
from helpers import merge_cases, method_cases, similarity_cases  # noqa: E402
from helpers.cpp_tasks import make  # noqa: E402

TRITON = ops._load("triton")
if isinstance(TRITON, str):
    pytest.skip(f"triton backend unavailable: {TRITON}", allow_module_level=True)
if TRITON._load_kernels() is None:
    pytest.skip(f"cannot import triton: {TRITON._import_error}", allow_module_level=True)
INTERPRETED = TRITON._kernels.INTERPRETED
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")

pytestmark = pytest.mark.triton_interpret if INTERPRETED else pytest.mark.triton_gpu
#: Cases too slow for the interpreter: compiled kernels on a GPU only.
gpu_only = pytest.mark.skipif(INTERPRETED, reason="full matrix: compiled kernels on a CUDA device only")
interpret_only = pytest.mark.skipif(not INTERPRETED, reason="builds CPU tensors: interpreter only")


def ids(x):
    return str(x).replace("torch.", "")


def gpu(*values):
    """A parameter set run only with compiled kernels on a GPU."""
    return pytest.param(*values, marks=gpu_only)


# ------------------------------------------------------------------ devices
def on_device(t: torch.Tensor) -> torch.Tensor:
    """t on DEVICE with the same strides (a strided view stays strided)."""
    return conftest.to_device(t, DEVICE)


def random_lora(*args, **kwargs) -> kf.LoRA:
    """conftest.random_lora on DEVICE."""
    with conftest.adapters_on(DEVICE):
        return conftest.random_lora(*args, **kwargs)


@pytest.fixture
def triton_backend():
    """The triton backend forced; on a GPU the shared cases' adapter factory makes CUDA
    tensors (conftest.adapters_on; their float64 truths stay on the CPU)."""
    with conftest.adapters_on(DEVICE), kf.use_backend("triton"):
        yield "triton"


@pytest.fixture(params=["host", "device"])
def algebra(request, monkeypatch):
    """Where truncation's R x R algebra runs (``HOST_ALGEBRA``): the C++ core on the host's threads (the default
    where it is built), or torch.linalg on the Grams' device; checks that the chosen one ran."""
    from kmerge_fast.ops.backend import cpp

    if request.param == "host" and cpp.unavailable_reason():
        pytest.skip(cpp.unavailable_reason())
    monkeypatch.setattr(TRITON, "HOST_ALGEBRA", request.param == "host")
    calls = []
    for module, name in ((cpp, "core_transforms_on_host"), (TRITON, "core_transforms")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    yield request.param
    assert set(calls) == {"core_transforms_on_host" if request.param == "host" else "core_transforms"}, calls


# ---------------------------------------------------- the other backends' cases
def _similarity_cases():
    """Every (dtype, shapes, rank, metric); the interpreter runs the subset that still
    reaches each kernel path per dtype (l1 and linf share one kernel)."""
    interpreted = {  # cos runs the fast inner products (norms too); l2 the precise ones
        (torch.float32, "awkward", 7): {"cos", "l2", "l1"},
        (torch.float16, "awkward", 7): {"cos", "linf"},
        (torch.bfloat16, "awkward", 7): {"cos", "linf"},
        (torch.float32, "small", 4): {"cos", "l2", "l1", "linf"},
        (torch.float16, "awkward", 1): {"cos"},
    }
    shapes = {"small": SHAPES_SMALL, "awkward": SHAPES_AWKWARD}
    for dtype in DTYPES:
        for name, rank in (("awkward", 7), ("small", 4), ("awkward", 1)):
            for metric in ("cos", "l2", "l1", "linf"):
                values = (dtype, shapes[name], rank, metric)
                case_id = f"{ids(dtype)}-{name}-r{rank}-{metric}"
                marks = () if metric in interpreted.get((dtype, name, rank), ()) else gpu_only
                yield pytest.param(*values, marks=marks, id=case_id)


@pytest.mark.parametrize("dtype,shapes,rank,metric", list(_similarity_cases()))
def test_similarity_matches_truth_and_reference(triton_backend, dtype, shapes, rank, metric):
    similarity_cases.matches_truth_and_reference(triton_backend, dtype, metric, shapes, rank)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_similarity_different_ranks_and_negative_scaling(triton_backend, dtype):
    similarity_cases.different_ranks_and_negative_scaling(triton_backend, dtype)


def test_similarity_zero_empty_and_cache(triton_backend, monkeypatch):
    zero = kf.LoRA.from_factors({"q": (on_device(torch.zeros(2, 6)), on_device(torch.zeros(8, 2)))})
    other = random_lora({"q": (8, 6)}, 2)
    sims = kf.similarity_matrix([zero, other], metric="cos")
    assert not sims.isnan().any()
    assert sims[0, 0] == 0 and sims[0, 1] == 0 and sims[1, 1] == pytest.approx(1.0, abs=1e-6)
    similarity_cases.no_shared_module_and_empty_lists(triton_backend, monkeypatch)
    similarity_cases.norm_cache_invalidated_by_inplace_change(triton_backend)


@gpu_only
def test_similarity_many_modules(triton_backend):
    similarity_cases.many_modules(triton_backend)


def test_similarity_many_small_modules(triton_backend):
    shapes = {f"layers.{i}.{p}": (24 + i, 16) for i in range(6) for p in ("q", "v")}
    xs = [random_lora(shapes, 3, seed=s) for s in range(3)]
    torch.testing.assert_close(kf.similarity_matrix(xs), similarity_cases.truth(xs, xs, "cos"), rtol=0,
                               atol=conftest.ACCUM_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shapes,rank,k", [
    (SHAPES_AWKWARD, 4, 4), gpu(SHAPES_SMALL, 3, 2), gpu(SHAPES_AWKWARD, 1, 3)])
def test_cat_is_exact(triton_backend, dtype, shapes, rank, k):
    merge_cases.cat_is_exact(triton_backend, dtype, shapes, rank, k)


@pytest.mark.parametrize("dtype,shapes,rank,k,target", [
    (dtype, SHAPES_AWKWARD, 5, 3, 4) for dtype in DTYPES] + [
    (torch.float32, {"big": (129, 257)}, 8, 8, 8),
    gpu(torch.float16, {"big": (129, 257)}, 8, 8, 8), gpu(torch.bfloat16, {"big": (129, 257)}, 8, 8, 8)] + [
    gpu(dtype, *case) for dtype in DTYPES for case in
    [(SHAPES_SMALL, 3, 2, 3), (SHAPES_SMALL, 4, 3, 2), (SHAPES_AWKWARD, 1, 2, 1)]], ids=ids)
def test_svd_is_optimal(triton_backend, dtype, shapes, rank, k, target):
    merge_cases.svd_is_optimal(triton_backend, dtype, shapes, rank, k, target)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_rank_deficient_one_and_truncate(triton_backend, dtype, algebra):
    merge_cases.rank_deficient_stacks(triton_backend, dtype)
    merge_cases.merge_one_with_weight_one_returns_it(triton_backend, dtype)
    merge_cases.truncate(triton_backend, dtype)


def test_merge_ranks_and_partial_modules(triton_backend):
    merge_cases.svd_default_rank_is_largest_input_rank(triton_backend)
    merge_cases.modules_held_by_some_adapters(triton_backend)
    method_cases.svd_clamp_bounds_factors(triton_backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, gpu(torch.float16)], ids=ids)
@pytest.mark.parametrize("method,density,sign", [
    ("ties_svd", 0.5, "total"), ("magnitude_prune_svd", 0.4, "total"),
    gpu("ties_svd", 0.3, "frequency"), gpu("ties_svd", 1.0, "total"), gpu("magnitude_prune_svd", 1.0, "total")])
def test_dense_domain_matches_peft_math(triton_backend, dtype, method, density, sign):
    method_cases.dense_domain_matches_peft_math(triton_backend, dtype, method, density, sign)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("mode,kind,sign", [
    (TIES, MAGNITUDE, "frequency"), (TIES, DARE, "total"),
    gpu(SUM, ALL, "total"), gpu(SUM, MAGNITUDE, "total"), gpu(TIES, MAGNITUDE, "total"), gpu(SUM, DARE, "total")])
def test_dense_combine_agrees_with_reference(triton_backend, dtype, mode, kind, sign):
    method_cases.dense_combine_backends_agree(triton_backend, dtype, mode, kind, sign)


@interpret_only
def test_dare_rescales_kept_values(triton_backend):
    method_cases.dare_rescales_kept_values(triton_backend)


# ------------------------------------------------------------- kernel level
def layout(rows: int, cols: int, dtype, kind: str, gen) -> torch.Tensor:
    """row-major, a transposed view ("col") or a view with no unit stride ("strided"), on DEVICE."""
    return on_device(make(rows, cols, dtype, kind, gen))


def factor(n_out, n_in, r, dtype, kind, gen, coef=1.0) -> Factor:
    return Factor(layout(r, n_in, dtype, kind, gen), layout(n_out, r, dtype, kind, gen), coef)


def dense(f: Factor) -> torch.Tensor:
    return f.coef * (f.B.double().cpu() @ f.A.double().cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, gpu(torch.float16)], ids=ids)
def test_inner_products_layouts_and_multi_tile_ranks(dtype):
    """Fast (float32 accumulation) and precise (float64) Grams against float64 truth:
    row-major, transposed and strided factors in one batch, ranks past one tile
    (70 > 64), K = 1."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(37, 300, [70, 3], [1, 33], ["row", "col"], ["strided", "row"]),
              (1, 1, [2], [3], ["col"], ["strided"]), (129, 65, [16, 17], [32], ["strided", "row"], ["row"])]
    batch, want, scale = [], [], []
    for n_out, n_in, rx, ry, kx, ky in shapes:
        xs = [factor(n_out, n_in, r, dtype, k, gen, coef=0.5 - i) for i, (r, k) in enumerate(zip(rx, kx))]
        ys = [factor(n_out, n_in, r, dtype, k, gen, coef=1.5) for r, k in zip(ry, ky)]
        batch.append((xs, ys))
        want.append(torch.tensor([[float((dense(x) * dense(y)).sum()) for y in ys] for x in xs], dtype=torch.float64))
        scale.append(torch.tensor([[float(dense(x).norm() * dense(y).norm()) for y in ys] for x in xs]))
    with kf.use_backend("triton"):
        for precise, tol in ((False, conftest.ACCUM_TOL), (True, 1e-12)):
            got = TRITON.inner_products(batch, precise)
            for g, w, s in zip(got, want, scale):
                assert g.dtype == torch.float64 and g.device.type == "cpu" and g.shape == w.shape
                assert ((g - w).abs() <= tol * s + 1e-300).all(), (precise, (g - w).abs().max())
        # symmetric batches compute each pair once and mirror it
        xs = batch[0][0] + batch[0][1]
        sym = TRITON.inner_products([(xs, xs)], precise=True)[0]
        assert torch.equal(sym, sym.T)


@pytest.mark.parametrize("density", [0.05, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 12345, (1 << 64) - 5, 1 << 63])
def test_dare_mask_is_bit_exact(seed, density):
    """The uint64 counter hash in Triton keeps exactly elementwise.dare_mask's elements."""
    gen = torch.Generator().manual_seed(2)
    b = on_device(torch.rand(67, 3, generator=gen) + 0.1)
    a = on_device(torch.rand(3, 130, generator=gen) + 0.1)  # all products > 0: kept iff nonzero
    keep = Keep(DARE, seed=seed, thresh24=dare_thresh24(density), density=density)
    with kf.use_backend("triton"):
        out = TRITON.dense_combine([([Factor(a, b, 1.0)], [1.0], [keep])], SUM)[0].cpu()
    assert torch.equal(out != 0, dare_mask(seed, (67, 130), keep.thresh24))
    t32 = (b.float() @ a.float()).cpu()
    kept = out != 0
    torch.testing.assert_close(out[kept], (t32 / torch.tensor(density))[kept], rtol=1e-6, atol=0)
    # threshold 0 drops everything
    with kf.use_backend("triton"):
        none = TRITON.dense_combine([([Factor(a, b, 1.0)], [1.0], [keep._replace(thresh24=0)])], SUM)[0]
    assert bool((none == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_abs_kth_is_exact_on_the_kernel_values(dtype):
    """tau is the k-th largest of the very values the merge kernel prunes; it keeps >= k of them."""
    gen = torch.Generator().manual_seed(3)
    f = factor(77, 131, 5, dtype, "row", gen, coef=0.3)
    n = 77 * 131
    ks = [0, 1, 17, n // 3, n]
    with kf.use_backend("triton"):
        taus = TRITON.abs_kth([(f, k) for k in ks])
        t = TRITON.dense_combine([([f], [1.0], [Keep()])], SUM)[0].abs().flatten().cpu()
        ref = ops._load("reference").abs_kth([(f, k) for k in ks])
        srt = t.sort(descending=True).values
        assert taus[0] == math.inf
        for k, tau, r in zip(ks[1:], taus[1:], ref[1:]):
            assert tau == float(srt[k - 1])
            assert tau == pytest.approx(r, rel=1e-5, abs=1e-6 * float(srt[0]))
            kept = TRITON.dense_combine([([f], [1.0], [Keep(MAGNITUDE, tau=tau)])], SUM)[0].cpu() != 0
            assert int(kept.sum()) >= k and int((t > tau).sum()) < k


def test_nan_and_identical_pairs():
    gen = torch.Generator().manual_seed(4)
    x = factor(50, 40, 3, torch.float32, "row", gen, coef=0.7)
    y = factor(50, 40, 2, torch.float32, "col", gen)
    bad = Factor(x.A.clone(), x.B.clone(), 1.0)
    bad.A[1, 7] = float("nan")
    ref = ops._load("reference")
    with kf.use_backend("triton"):
        stats = TRITON.diff_stats([(x, x), (x, y), (bad, y)])
        assert stats[0].tolist() == [0.0, 0.0]  # each term's tile on its own: exact cancellation
        torch.testing.assert_close(stats[1], ref.diff_stats([(x, y)])[0], rtol=1e-5, atol=0)
        assert stats[2].isnan().all()
        for mode, sign in ((SUM, "total"), (TIES, "total"), (TIES, "frequency")):
            got = TRITON.dense_combine([([bad, y], [0.5, 1.0], [Keep(), Keep()])], mode, sign)[0].cpu()
            want = ref.dense_combine([([bad, y], [0.5, 1.0], [Keep(), Keep()])], mode, sign)[0].cpu()
            assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=ids)
def test_stack_rounds_like_the_reference(out_dtype):
    """cat: c * A computed in float32 and rounded once to nearest even (bf16 included)."""
    gen = torch.Generator().manual_seed(5)
    batch = [[factor(33, 70, r, dt, kind, gen, coef=c) for r, dt, kind, c in
              [(3, torch.float32, "row", 0.1), (1, torch.float32, "strided", -3.7), (5, torch.float32, "col", 1.0)]],
             [factor(1, 2, 2, torch.float32, "row", gen, coef=2.5)]]
    with kf.use_backend("triton"):
        got = TRITON.stack(batch, out_dtype)
    want = ops._load("reference").stack(batch, out_dtype)
    for (ga, gb), (wa, wb) in zip(got, want):
        assert ga.dtype == out_dtype and ga.device.type == DEVICE.type
        assert torch.equal(ga, wa) and torch.equal(gb, wb)


def test_mixed_dtypes_and_float64_fall_back(triton_backend):
    """A batch mixing fp16 / bf16 / fp32 runs in float32 (exact conversion); one holding
    float64 runs on the reference backend."""
    gen = torch.Generator().manual_seed(6)
    shapes = {"q": (30, 20), "v": (7, 9)}
    loras = [random_lora(shapes, 3, dt, seed=i) for i, dt in enumerate(DTYPES)]
    with kf.use_backend("triton"):
        sims = kf.similarity_matrix(loras, metric="l2")
        merged = kf.merge(loras, [0.5, 0.3, 0.2], rank=3)
    with kf.use_backend("reference"):
        torch.testing.assert_close(sims, kf.similarity_matrix(loras, metric="l2"), rtol=0, atol=conftest.ACCUM_TOL)
    merge_cases.check_truncation(merged, loras, [0.5, 0.3, 0.2], 3, torch.float32)
    f32 = factor(12, 10, 2, torch.float32, "row", gen)
    f64 = Factor(f32.A.double(), f32.B.double(), 1.0)
    with kf.use_backend("triton"):
        got = ops.inner_products([([f32], [f64])], precise=True)[0]
    assert float(got) == pytest.approx(float((dense(f32) * dense(f64)).sum()), rel=1e-12)
    with kf.use_backend("triton"), pytest.raises(kf.BackendError, match="cannot run torch.float64"):
        ops.select(DEVICE, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float64_dots_read_float32_copies_of_half_factors(triton_backend, dtype, monkeypatch):
    """Compiled Triton 3.6 cannot lower a float64 tl.dot of values loaded as 16-bit ("fp64 don't
    support largeK MMA"): precise Grams and the truncation read float32 copies; fast Grams keep half."""
    seen = []
    run_pairs = TRITON._run_pairs
    monkeypatch.setattr(TRITON, "_run_pairs", lambda items, dt, *a, **k: (seen.append((dt, k["precise"])),
                                                                       run_pairs(items, dt, *a, **k)))
    gen = torch.Generator().manual_seed(8)
    x, y = factor(40, 24, 3, dtype, "row", gen), factor(40, 24, 2, dtype, "col", gen, coef=0.5)
    truth = float((dense(x) * dense(y)).sum())
    with kf.use_backend("triton"):
        for precise in (False, True):
            got = float(ops.inner_products([([x], [y])], precise=precise)[0])
            assert got == pytest.approx(truth, rel=1e-5)
        (a, b), = ops.truncate([[x, y]], 4, dtype)
    assert seen == [(dtype, False), (torch.float32, True), (torch.float32, True)]
    assert a.dtype == b.dtype == dtype


def test_truncate_matches_reference_on_many_modules_of_two_stacked_ranks(triton_backend, algebra):
    shapes = {f"layers.{i}.{p}": (24 + 3 * i, 16 + i) for i in range(6) for p in ("q", "v")}
    loras = [random_lora(shapes, 3, seed=s) for s in range(3)] + [random_lora({"layers.0.q": (24, 16)}, 1, seed=9)]
    weights = [0.5, -1.0, 0.25, 2.0]
    with kf.use_backend("triton"):
        merged = kf.merge(loras, weights, rank=4)
    merge_cases.check_truncation(merged, loras, weights, 4, torch.float32)


# ----------------------------------------------------------------- dispatch
def test_dispatch_rules():
    # never chosen automatically for CPU tensors, even where it can run them
    assert ops.select(torch.device("cpu"), torch.float32).NAME != "triton"
    reason = TRITON.manual_only_reason(torch.device("cpu"))
    assert reason and "forced" in reason
    if INTERPRETED:
        with kf.use_backend("triton"):
            assert ops.select(torch.device("cpu"), torch.bfloat16).NAME == "triton"
        # interpreted kernels cannot take CUDA tensors (their addresses are device addresses)
        assert "TRITON_INTERPRET" in TRITON.unsupported_reason(torch.device("cuda"), torch.float32)
    else:
        assert ops.select(DEVICE, torch.float16).NAME == "triton"  # automatic on CUDA
        with kf.use_backend("triton"), pytest.raises(kf.BackendError, match="interpreter"):
            ops.select(torch.device("cpu"), torch.float32)


def test_optional_and_lazy():
    """Importing the backend neither imports Triton nor touches CUDA; without Triton
    everything imports and runs, and the reason says so."""
    code = (
        "import sys, torch, kmerge_fast as kf, kmerge_fast.ops.backend.triton\n"
        "assert 'triton' not in sys.modules and not torch.cuda.is_initialized()\n"
        "print('reason:', kf.ops.unavailable_reasons().get('triton', ''))\n"
        "sys.modules['triton'] = None\n"
        "assert 'triton' not in kf.backends(), kf.backends()\n"
        "assert kf.ops.unavailable_reasons()['triton'].startswith('cannot import triton')\n"
        "a = kf.LoRA.from_factors({'q': (torch.randn(2, 5), torch.randn(4, 2))})\n"
        "print(float(kf.similarity_matrix([a])[0, 0]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    reason, sim = out.stdout.strip().splitlines()
    assert reason.startswith("reason:")
    assert float(sim) == pytest.approx(1.0)
    if not torch.cuda.is_available():  # no GPU and no interpreter: unavailable, with the reason
        assert "no CUDA device" in reason


# ---------------------------------------------------------------- GPU scale
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_llama_sized_merge_and_similarity(dtype):
    """64-module-like shapes at r = 32: triton against the reference on the same GPU."""
    shapes = {"q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048)}
    loras = [random_lora(shapes, 32, dtype, scaling=2.0, seed=s) for s in range(8)]
    with kf.use_backend("triton"):
        sims = kf.similarity_matrix(loras[:1], loras[1:])
        merged = kf.merge(loras, [1 / 8] * 8, rank=32)
    with kf.use_backend("reference"):
        ref_sims = kf.similarity_matrix(loras[:1], loras[1:])
    torch.testing.assert_close(sims, ref_sims, rtol=0, atol=conftest.ACCUM_TOL)
    merge_cases.check_truncation(merged, loras, [1 / 8] * 8, 32, dtype)


@gpu_only
def test_gpu_dare_expectation(triton_backend):
    """peft's DARE statistics (300 draws), on CUDA tensors."""
    gen = torch.Generator().manual_seed(0)
    factors = [Factor(on_device(torch.randn(2, 30, generator=gen)), on_device(torch.randn(20, 2, generator=gen)), s)
               for s in (1.0, 0.5)]
    total = torch.zeros(20, 30, dtype=torch.float64)
    for k in range(300):
        keeps = [Keep(DARE, seed=k * 7 + i, thresh24=dare_thresh24(0.4), density=0.4) for i in range(2)]
        total += TRITON.dense_combine([(factors, [0.6, -1.2], keeps)], SUM)[0].double().cpu()
    truth = sum(w * dense(f) for w, f in zip([0.6, -1.2], factors))
    assert float((total / 300 - truth).abs().max()) < 0.5 * float(truth.abs().max())


@gpu_only
def test_magnitude_k_on_gpu(triton_backend):
    f = factor(300, 200, 8, torch.float16, "row", torch.Generator().manual_seed(7))
    k = magnitude_k(0.3, 300 * 200)
    tau = TRITON.abs_kth([(f, k)])[0]
    kept = TRITON.dense_combine([([f], [1.0], [Keep(MAGNITUDE, tau=tau)])], SUM)[0] != 0
    assert int(kept.sum()) >= k


# ------------------------------------------------------------------- max_abs
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_max_abs_matches_torch_exactly(dtype):
    """The scaling pre-pass's max |t| (max_abs_kernel): bit-equal to torch's, NaN where a tensor holds NaN
    (compiled maxima drop NaN operands: the kernel tracks it on its own), inf kept, 0.0 for empty tensors;
    strided views, awkward and multi-tile shapes; 1-D and other devices' tensors go to torch."""
    g = torch.Generator().manual_seed(3)

    def t(*shape):
        return on_device((torch.randn(*shape, generator=g) * 3).to(dtype))

    nan, inf = t(7, 9), t(40, 3)
    nan[5, 2] = float("nan")
    inf[39, 0] = -float("inf")
    big = t(300, 70)
    tensors = [t(1, 1), t(3, 300), t(257, 5), t(64, 32).T, big[::3, 1::2], nan, inf, t(0, 5),
               on_device(torch.zeros(16, 16, dtype=dtype)), t(11), t(5, 6)]
    tensors[-1][4, 5] = 1e4 if dtype != torch.float16 else 6e4  # the peak in the last tile
    got = TRITON.max_abs(tensors)
    want = [float(x.abs().amax()) if x.numel() else 0.0 for x in tensors]
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (math.isnan(a) and math.isnan(b)) or a == b, (i, a, b)
    assert math.isnan(got[5]) and got[6] == math.inf and got[7] == 0.0
    assert TRITON.max_abs([]) == []
