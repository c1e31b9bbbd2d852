"""Batched adapter distance: every backend against the reference and float64 dense truth."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kmerge_fast as kf
from kmerge_fast import ops
from conftest import SHAPES_AWKWARD, SHAPES_SMALL, random_lora
from helpers import similarity_cases as cases


@pytest.mark.parametrize("metric", ["cos", "l2", "l1", "linf"])
@pytest.mark.parametrize("shapes,rank", [(SHAPES_SMALL, 4), (SHAPES_AWKWARD, 1), (SHAPES_AWKWARD, 7)])
def test_matches_truth_and_reference(backend, dtype, metric, shapes, rank):
    cases.matches_truth_and_reference(backend, dtype, metric, shapes, rank)


def test_different_ranks_and_negative_scaling(backend, dtype):
    cases.different_ranks_and_negative_scaling(backend, dtype)


def test_many_modules(backend):
    cases.many_modules(backend)


def test_zero_adapter_is_zero_not_nan(backend):
    shapes = {"q": (8, 6)}
    zero = kf.LoRA.from_factors({"q": (torch.zeros(2, 6), torch.zeros(8, 2))})
    other = random_lora(shapes, 2)
    sims = kf.similarity_matrix([zero, other], metric="cos")
    assert not sims.isnan().any()
    assert sims[0, 0] == 0 and sims[0, 1] == 0 and sims[1, 1] == pytest.approx(1.0, abs=1e-6)


def test_no_shared_module_and_empty_lists(backend, monkeypatch):
    cases.no_shared_module_and_empty_lists(backend, monkeypatch)


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
    with pytest.raises(ValueError, match="module 'q'"):
        kf.similarity_matrix([a], [b])
    with pytest.raises(ValueError, match="metric: unknown"):
        kf.similarity_matrix([a], metric="cosine")


def test_norm_cache_invalidated_by_inplace_change(backend):
    cases.norm_cache_invalidated_by_inplace_change(backend)


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
