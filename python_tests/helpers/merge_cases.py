"""Merge checks shared by test_merge.py (CPU backends) and test_triton.py (Triton).

Each runs under the backend its caller forced (``backend`` names it) and compares
``kf.merge`` / ``kf.truncate`` with float64 truth (Eckart-Young for the SVD
methods) and the reference backend.
"""

from __future__ import annotations

import pytest
import torch

import kmerge_fast as kf
from conftest import SHAPES_AWKWARD, STORE_TOL, TRUNC_TOL, dense64, random_lora


def weighted_sum64(loras, weights, name):
    return sum(w * dense64(l.modules[name]) for l, w in zip(loras, weights) if name in l.modules)


def optimal_error(m: torch.Tensor, rank: int) -> float:
    """||M - M_r||_F for the best rank-r M_r (Eckart-Young), from a float64 SVD."""
    s = torch.linalg.svdvals(m)
    return float(s[rank:].pow(2).sum().sqrt())


def check_truncation(merged, loras, weights, rank, dtype):
    for name, module in merged.modules.items():
        m = weighted_sum64(loras, weights, name)
        assert module.scaling == 1.0
        assert module.A.shape == (rank, m.shape[1]) and module.B.shape == (m.shape[0], rank)
        assert module.A.dtype == dtype and module.B.dtype == dtype
        got = float((m - dense64(module)).norm())
        best = optimal_error(m, rank)
        scale = float(m.norm()) or 1.0
        assert got - best <= TRUNC_TOL[dtype] * scale, (name, got, best)
        assert not torch.isnan(module.A).any() and not torch.isnan(module.B).any()


def cat_is_exact(backend, dtype, shapes, rank, k):
    loras = [random_lora(shapes, rank, dtype, scaling=0.5 + i, seed=i, strided=i == 1) for i in range(k)]
    weights = [0.7, -1.3, 2.0, 0.25][:k]
    merged = kf.merge(loras, weights, method="cat")
    for name, module in merged.modules.items():
        assert module.rank == rank * k and module.scaling == 1.0 and module.A.dtype == dtype
        want = weighted_sum64(loras, weights, name)
        got = dense64(module)
        # the only rounding is storing w*s*A back in the input dtype
        assert float((got - want).norm()) <= STORE_TOL[dtype] * float(want.norm()) * k
    with kf.use_backend("reference"):
        ref = kf.merge(loras, weights, method="cat")
    for name in merged.modules:
        torch.testing.assert_close(merged.modules[name].A, ref.modules[name].A)
        torch.testing.assert_close(merged.modules[name].B, ref.modules[name].B)


def svd_is_optimal(backend, dtype, shapes, rank, k, target):
    loras = [random_lora(shapes, rank, dtype, scaling=0.5 + i, seed=i, strided=i == 0) for i in range(k)]
    weights = [1.0, -0.5, 0.3, 2.0, 1.0, 1.0, -1.0, 0.1][:k]
    merged = kf.merge(loras, weights, method="svd", rank=target)
    check_truncation(merged, loras, weights, target, dtype)
    with kf.use_backend("reference"):
        ref = kf.merge(loras, weights, method="svd", rank=target)
    # factors are not unique: compare products
    for name in merged.modules:
        torch.testing.assert_close(dense64(merged.modules[name]), dense64(ref.modules[name]),
                                   rtol=0, atol=TRUNC_TOL[dtype] * float(dense64(ref.modules[name]).norm()) + 1e-12)


def svd_default_rank_is_largest_input_rank(backend):
    shapes = {"q": (20, 16)}
    merged = kf.merge([random_lora(shapes, 2, seed=0), random_lora(shapes, 5, seed=1)], [0.5, 0.5])
    assert merged.modules["base_model.model.q"].rank == 5


def rank_deficient_stacks(backend, dtype):
    shapes = {"q": (31, 17), "v": (8, 40)}
    a = random_lora(shapes, 4, dtype, seed=0)
    zero = kf.LoRA.from_factors({n: (torch.zeros_like(m.A), torch.zeros_like(m.B))
                                 for n, m in a.modules.items()})
    # identical adapters (stack rank 4 of 12), a zero adapter, and r above the stacked rank
    for loras, weights, rank in [([a, a, a], [0.2, 0.3, 0.5], 4), ([a, zero], [1.0, 1.0], 6), ([zero], [1.0], 3)]:
        merged = kf.merge(loras, weights, rank=rank)
        check_truncation(merged, loras, weights, rank, dtype)


def merge_one_with_weight_one_returns_it(backend, dtype):
    lora = random_lora(SHAPES_AWKWARD, 3, dtype, scaling=1.7, seed=4)
    merged = kf.merge([lora], [1.0], method="svd")
    for name, module in lora.modules.items():
        want = dense64(module)
        assert float((dense64(merged.modules[name]) - want).norm()) <= TRUNC_TOL[dtype] * float(want.norm())


def truncate(backend, dtype):
    lora = random_lora({"q": (40, 30), "k": (7, 30)}, 6, dtype, scaling=0.3, seed=5)
    out = kf.truncate(lora, 2)
    check_truncation(out, [lora], [1.0], 2, dtype)
    with pytest.raises(ValueError, match="rank: must be a positive int"):
        kf.truncate(lora, 0)


def modules_held_by_some_adapters(backend):
    a = random_lora({"q": (10, 8), "v": (10, 8)}, 2, seed=0)
    b = random_lora({"q": (10, 8)}, 2, seed=1)
    merged = kf.merge([a, b], [1.0, 2.0], method="cat")
    assert merged.modules["base_model.model.v"].rank == 2
    torch.testing.assert_close(dense64(merged.modules["base_model.model.v"]), dense64(a.modules["base_model.model.v"]))
