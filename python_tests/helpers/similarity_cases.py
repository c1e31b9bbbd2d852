"""Similarity checks shared by test_similarity.py (CPU backends) and test_triton.py (Triton).

Each runs under the backend its caller forced (``backend`` names it) and compares
``kf.similarity_matrix`` with float64 dense truth and the reference backend.
"""

from __future__ import annotations

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast import ops
from conftest import ACCUM_TOL, dense64, random_lora


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


def matches_truth_and_reference(backend, dtype, metric, shapes, rank):
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


def different_ranks_and_negative_scaling(backend, dtype):
    shapes = {"a": (33, 17), "b": (9, 40), "c": (5, 5)}
    xs = [random_lora(shapes, {"a": 1, "b": 6, "c": 3}, dtype, scaling=-0.7, seed=1)]
    ys = [random_lora(shapes, {"a": 5, "b": 2, "c": 9}, dtype, seed=2),
          random_lora({"a": (33, 17)}, 3, dtype, seed=3)]  # shares one module only
    for metric in ("cos", "l2"):
        torch.testing.assert_close(kf.similarity_matrix(xs, ys, metric), truth(xs, ys, metric), rtol=0, atol=ACCUM_TOL)


def many_modules(backend):
    shapes = {f"layers.{i}.{p}": (24 + i, 16) for i in range(20) for p in ("q", "v")}
    xs = [random_lora(shapes, 3, seed=s) for s in range(4)]
    torch.testing.assert_close(kf.similarity_matrix(xs), truth(xs, xs, "cos"), rtol=0, atol=ACCUM_TOL)


def no_shared_module_and_empty_lists(backend, monkeypatch):
    a = random_lora({"q": (4, 4)}, 2)
    b = random_lora({"v": (4, 4)}, 2)
    with monkeypatch.context() as m:  # nothing to run: no backend is chosen (none could be placed)
        m.setattr(ops, "backend_name", lambda *_: pytest.fail("a backend was chosen for an empty batch"))
        for metric in ("cos", "l2", "l1", "linf"):
            assert kf.similarity_matrix([a], [b], metric).tolist() == [[0.0]]
    assert kf.similarity_matrix([], [a]).shape == (0, 1)


def norm_cache_invalidated_by_inplace_change(backend):
    a, b = random_lora({"q": (9, 7)}, 3, seed=1), random_lora({"q": (9, 7)}, 3, seed=2)
    first = kf.similarity_matrix([a], [b])
    module = b.modules["base_model.model.q"]
    assert module.cached_sq_norm(f"{backend}/fast") is not None  # cos: the fast arithmetic
    module.B.mul_(-2.0)  # cos flips sign; a stale norm would also rescale it
    torch.testing.assert_close(kf.similarity_matrix([a], [b]), -first, rtol=0, atol=ACCUM_TOL)
