"""Batched adapter distance: every backend against the reference and float64 dense truth."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kmerge_fast as kf
from kmerge_fast import ops
from conftest import ACCUM_TOL, SHAPES_AWKWARD, SHAPES_SMALL, dense64, random_lora


def truth(xs, ys, metric):
    """Mean over shared modules of the per-module similarity, from dense float64 updates."""
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            sims = []
            for name in set(x.modules) & set(y.modules):
                dx, dy = dense64(x.modules[name]), dense64(y.modules[name])
                if metric == "cos":
                    denom = dx.norm() * dy.norm()
                    sims.append(float((dx * dy).sum() / denom) if denom > 0 else 0.0)
                else:
                    d = {"l2": (dx - dy).norm(), "l1": (dx - dy).abs().sum(), "linf": (dx - dy).abs().max()}[metric]
                    sims.append(1.0 / (1.0 + float(d)))
            out[i, j] = sum(sims) / len(sims) if sims else 0.0
    return out


def _tol(metric):
    # cos is bounded by 1: an absolute bound is the relative one at the scale of the inputs.
    # Distances: 1/(1+d) has derivative <= 1, so a relative error e on d moves it by <= e.
    return ACCUM_TOL


@pytest.mark.parametrize("metric", ["cos", "l2", "l1", "linf"])
@pytest.mark.parametrize("shapes,rank", [(SHAPES_SMALL, 4), (SHAPES_AWKWARD, 1), (SHAPES_AWKWARD, 7)])
def test_matches_truth_and_reference(backend, dtype, metric, shapes, rank):
    xs = [random_lora(shapes, rank, dtype, scaling=0.3 + i, seed=i) for i in range(3)]
    ys = [random_lora(shapes, rank, dtype, seed=10 + j, strided=j == 1) for j in range(2)]
    ys.append(xs[1])  # an identical pair: cos 1, distances 0
    got = kf.similarity_matrix(xs, ys, metric)
    want = truth(xs, ys, metric)
    assert got.dtype == torch.float64 and got.shape == (3, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(metric))
    with kf.use_backend("reference"):
        ref = kf.similarity_matrix(xs, ys, metric)
    torch.testing.assert_close(got, ref, rtol=0, atol=_tol(metric))


def test_different_ranks_and_negative_scaling(backend, dtype):
    shapes = {"a": (33, 17), "b": (9, 40), "c": (5, 5)}
    xs = [random_lora(shapes, {"a": 1, "b": 6, "c": 3}, dtype, scaling=-0.7, seed=1)]
    ys = [random_lora(shapes, {"a": 5, "b": 2, "c": 9}, dtype, seed=2),
          random_lora({"a": (33, 17)}, 3, dtype, seed=3)]  # shares one module only
    for metric in ("cos", "l2"):
        torch.testing.assert_close(kf.similarity_matrix(xs, ys, metric), truth(xs, ys, metric), rtol=0, atol=ACCUM_TOL)


def test_many_modules(backend):
    shapes = {f"layers.{i}.{p}": (24 + i, 16) for i in range(20) for p in ("q", "v")}
    xs = [random_lora(shapes, 3, seed=s) for s in range(4)]
    torch.testing.assert_close(kf.similarity_matrix(xs), truth(xs, xs, "cos"), rtol=0, atol=ACCUM_TOL)


def test_zero_adapter_is_zero_not_nan(backend):
    shapes = {"q": (8, 6)}
    zero = kf.LoRA.from_factors({"q": (torch.zeros(2, 6), torch.zeros(8, 2))})
    other = random_lora(shapes, 2)
    sims = kf.similarity_matrix([zero, other], metric="cos")
    assert not sims.isnan().any()
    assert sims[0, 0] == 0 and sims[0, 1] == 0 and sims[1, 1] == pytest.approx(1.0, abs=1e-6)


def test_no_shared_module_and_empty_lists(backend):
    a = random_lora({"q": (4, 4)}, 2)
    b = random_lora({"v": (4, 4)}, 2)
    assert kf.similarity_matrix([a], [b])[0, 0] == 0
    assert kf.similarity_matrix([], [a]).shape == (0, 1)


def test_diff_stats_propagate_nan_and_inf(backend):
    """A NaN (or Inf) in one factor makes both statistics NaN (Inf) on every backend, whatever tile holds it."""
    from kmerge_fast.ops import Factor
    g = torch.Generator().manual_seed(5)
    x = Factor(torch.randn(3, 7, generator=g), torch.randn(600, 3, generator=g), 1.0)  # several row tiles
    y = Factor(torch.randn(3, 7, generator=g), torch.randn(600, 3, generator=g), 0.5)
    impl = ops._load(backend)
    for value, check in ((float("nan"), math.isnan), (float("inf"), math.isinf)):
        bad_b = x.B.clone()
        bad_b[300, 1] = value  # not in the first tile
        stats = impl.diff_stats([(Factor(x.A, bad_b, 1.0), y), (x, y)])
        assert all(check(v) for v in stats[0].tolist()), (backend, stats[0])
        assert all(math.isfinite(v) for v in stats[1].tolist())


def test_shape_mismatch_and_bad_metric():
    a = random_lora({"q": (4, 4)}, 2)
    b = random_lora({"q": (4, 5)}, 2)
    with pytest.raises(ValueError, match="module 'base_model.model.q'"):
        kf.similarity_matrix([a], [b])
    with pytest.raises(ValueError, match="metric: unknown"):
        kf.similarity_matrix([a], metric="cosine")


def test_norm_cache_invalidated_by_inplace_change(backend):
    a, b = random_lora({"q": (9, 7)}, 3, seed=1), random_lora({"q": (9, 7)}, 3, seed=2)
    first = kf.similarity_matrix([a], [b])
    module = b.modules["base_model.model.q"]
    assert module.cached_sq_norm(f"{backend}/fast") is not None  # cos: the fast arithmetic
    module.B.mul_(-2.0)  # cos flips sign; a stale norm would also rescale it
    torch.testing.assert_close(kf.similarity_matrix([a], [b]), -first, rtol=0, atol=ACCUM_TOL)


# -------------------------------------------------------------- properties
_shape = st.tuples(st.integers(1, 24), st.integers(1, 24))


@settings(max_examples=25, deadline=None)
@given(shape=_shape, r1=st.integers(1, 5), r2=st.integers(1, 5), seed=st.integers(0, 10_000),
       scale=st.floats(0.01, 100.0), backend_name=st.sampled_from(["reference", "cpp"]))
def test_properties(shape, r1, r2, seed, scale, backend_name):
    if backend_name not in kf.backends():
        return
    with kf.use_backend(backend_name):
        x = random_lora({"m": shape}, r1, seed=seed)
        y = random_lora({"m": shape}, r2, seed=seed + 1)
        sims = kf.similarity_matrix([x, y])
        # symmetric, self-similarity 1
        assert abs(float(sims[0, 1] - sims[1, 0])) < 1e-6
        assert abs(float(sims[0, 0]) - 1.0) < 1e-6 and abs(float(sims[1, 1]) - 1.0) < 1e-6
        # cosine is invariant to positive scaling of either adapter
        y.modules["base_model.model.m"].scaling *= scale
        assert abs(float(kf.similarity_matrix([x], [y])[0, 0] - sims[0, 1])) < 1e-6


def test_symmetric_matrix_takes_norms_from_its_diagonal(backend, monkeypatch):
    from kmerge_fast import ops

    loras = [random_lora({"q": (9, 7), "v": (5, 7)}, 3, seed=s) for s in range(3)]
    impl = ops.select(torch.device("cpu"), torch.float32)
    calls = []
    original = impl.inner_products
    monkeypatch.setattr(impl, "inner_products", lambda batch, precise=False: calls.append(batch) or original(batch, precise))
    for metric in ("cos", "l2"):
        sims = kf.similarity_matrix(loras, metric=metric)
        torch.testing.assert_close(sims.diagonal(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # one call per metric, one entry per module: no self-pairs for norms
    assert [len(batch) for batch in calls] == [2, 2]
    module = loras[1].modules["base_model.model.q"]
    assert module.cached_sq_norm(f"{backend}/precise") == pytest.approx(float(module.delta(torch.float64).norm()) ** 2,
                                                                         rel=1e-12)
