"""Fused low-rank merge (cat) and SVD re-truncation against the reference and float64 truth."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kmerge_fast as kf
from conftest import SHAPES_AWKWARD, SHAPES_SMALL, random_lora
from helpers import merge_cases as cases
from helpers.merge_cases import check_truncation


@pytest.mark.parametrize("shapes,rank,k", [(SHAPES_SMALL, 3, 2), (SHAPES_AWKWARD, 1, 3), (SHAPES_AWKWARD, 4, 4)])
def test_cat_is_exact(backend, dtype, shapes, rank, k):
    cases.cat_is_exact(backend, dtype, shapes, rank, k)


@pytest.mark.parametrize("shapes,rank,k,target", [
    (SHAPES_SMALL, 3, 2, 3), (SHAPES_SMALL, 4, 3, 2), (SHAPES_AWKWARD, 1, 2, 1),
    (SHAPES_AWKWARD, 5, 3, 4), ({"big": (129, 257)}, 8, 8, 8),
])
def test_svd_is_optimal(backend, dtype, shapes, rank, k, target):
    cases.svd_is_optimal(backend, dtype, shapes, rank, k, target)


def test_svd_default_rank_is_largest_input_rank(backend):
    cases.svd_default_rank_is_largest_input_rank(backend)


def test_rank_deficient_stacks(backend, dtype):
    cases.rank_deficient_stacks(backend, dtype)


def test_merge_one_with_weight_one_returns_it(backend, dtype):
    cases.merge_one_with_weight_one_returns_it(backend, dtype)


def test_truncate(backend, dtype):
    cases.truncate(backend, dtype)


def test_modules_held_by_some_adapters(backend):
    cases.modules_held_by_some_adapters(backend)


def test_bad_arguments():
    a = random_lora({"q": (10, 8)}, 2, seed=0)
    with pytest.raises(ValueError, match="method: unknown"):
        kf.merge([a], method="average")
    with pytest.raises(ValueError, match="at least one"):
        kf.merge([])
    with pytest.raises(ValueError, match="weights: 2 weights for 1"):
        kf.merge([a], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        kf.merge([a], [float("nan")])
    with pytest.raises(kf.AdapterError, match=r"module 'q': loras\[1\] updates a \(10, 9\) weight "
                                              r"but loras\[0\] a \(\d+, \d+\) one"):
        kf.merge([a, random_lora({"q": (10, 9)}, 2)])
    with pytest.raises(TypeError, match=r"loras\[1\]"):
        kf.merge([a, "adapter"])


@settings(max_examples=20, deadline=None)
@given(n_out=st.integers(1, 20), n_in=st.integers(1, 20), ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       target=st.integers(1, 6), seed=st.integers(0, 1000), backend_name=st.sampled_from(["reference", "cpp"]))
def test_truncation_property(n_out, n_in, ranks, target, seed, backend_name):
    """For any shapes and ranks, the error is that of the optimal rank-r approximation."""
    if backend_name not in kf.backends():
        return
    with kf.use_backend(backend_name):
        loras = [random_lora({"m": (n_out, n_in)}, r, seed=seed + i) for i, r in enumerate(ranks)]
        weights = [(-1.0) ** i * (i + 1) for i in range(len(ranks))]
        if target > min(n_out, n_in):  # no module can have that rank: refused (issue 19, item 15)
            with pytest.raises(ValueError, match=f"rank: {target} is above the largest rank"):
                kf.merge(loras, weights, rank=target)
            return
        check_truncation(kf.merge(loras, weights, rank=target), loras, weights, target, torch.float32)
