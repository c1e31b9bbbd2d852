"""peft combination-type checks shared by test_merge_methods.py (CPU backends) and test_triton.py (Triton).

Each runs under the backend its caller forced (``backend`` names it). The
oracles are peft's own merge_utils functions run on float64 tensors; a case
that needs them skips without peft.
"""

from __future__ import annotations

import pytest
import torch

import kmerge_fast as kf
from conftest import SHAPES_AWKWARD, TRUNC_TOL, dense64, random_lora
from kmerge_fast import ops
from kmerge_fast.ops import Factor
from kmerge_fast.ops.numerics.elementwise import DARE, MAGNITUDE, SUM, Keep, dare_mask, dare_thresh24, magnitude_k

SHAPES = {"q": (23, 17), "v": (9, 40), "o": (40, 40)}
WEIGHTS = [0.8, -0.5, 1.3]


def method_loras(dtype, k=3, ranks=(3, 5, 2), shared_only=False):
    """``k`` adapters over SHAPES (the second lacks "o" unless ``shared_only``; the third is strided)."""
    out = []
    for i in range(k):
        shapes = dict(SHAPES)
        if i == 1 and not shared_only:
            shapes.pop("o")  # a module only some adapters hold
        out.append(random_lora(shapes, ranks[i], dtype, scaling=0.4 + 0.3 * i, seed=i, strided=i == 2))
    return out


def _peft_dense(method, deltas, weights, density, sign):
    """peft's own combination of the float64 ``deltas`` (skips the calling test without peft)."""
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    w = torch.tensor(weights, dtype=torch.float64)
    if method == "ties_svd":
        return merge_utils.ties(deltas, w, density, sign)
    if method == "magnitude_prune_svd":
        return merge_utils.magnitude_prune(deltas, w, density)
    return merge_utils.task_arithmetic(deltas, w)


def dense_domain_matches_peft_math(backend, dtype, method, density, sign):
    loras = method_loras(dtype)
    merged = kf.merge(loras, WEIGHTS, method=method, density=density, majority_sign_method=sign, rank=4)
    for name, module in merged.modules.items():
        holders = [(l, w) for l, w in zip(loras, WEIGHTS) if name in l.modules]
        m = _peft_dense(method, [dense64(l.modules[name]) for l, _ in holders], [w for _, w in holders], density, sign)
        assert module.A.shape == (4, m.shape[1]) and module.A.dtype == dtype and module.scaling == 1.0
        s = torch.linalg.svdvals(m)
        best = float(s[4:].square().sum().sqrt())
        got = float((m - dense64(module)).norm())
        assert got - best <= TRUNC_TOL[dtype] * float(m.norm()), (name, got, best)


def dense_combine_backends_agree(backend, dtype, mode, kind, sign):
    """The C++ tile kernel and the torch reference: same thresholds, same DARE masks."""
    factors = [Factor(l.modules[f"base_model.model.{n}"].A, l.modules[f"base_model.model.{n}"].B, 0.5 + i)
               for i, l in enumerate([random_lora(SHAPES_AWKWARD, r, dtype, seed=s) for s, r in ((1, 3), (2, 1))])
               for n in ["odd"]]
    impl = ops._load(ops.backend_name([factors]))
    ref = ops._load("reference")
    numel = 577 * 193
    keeps = []
    for j, f in enumerate(factors):
        if kind == MAGNITUDE:
            tau = impl.abs_kth([(f, magnitude_k(0.4, numel))])[0]
            tau_ref = ref.abs_kth([(f, magnitude_k(0.4, numel))])[0]
            assert tau == pytest.approx(tau_ref, rel=1e-5)
            keeps.append(Keep(MAGNITUDE, tau=tau))
        elif kind == DARE:
            keeps.append(Keep(DARE, seed=1234 + j, thresh24=dare_thresh24(0.3), density=0.3))
        else:
            keeps.append(Keep())
    got = impl.dense_combine([(factors, [0.9, -1.1], keeps)], mode, sign)[0]
    want = ref.dense_combine([(factors, [0.9, -1.1], keeps)], mode, sign)[0]
    assert got.shape == (577, 193) and got.dtype == torch.float32
    scale = float(want.abs().max())
    # Elements right at a magnitude threshold may round to the other side in one backend.
    close = (got - want).abs() <= 1e-5 * scale
    assert float(close.float().mean()) >= 1 - 1e-4


def dare_rescales_kept_values(backend):
    f = Factor(torch.randn(3, 50), torch.randn(40, 3), 0.7)
    dense = 0.7 * (f.B.double() @ f.A.double())
    impl = ops._load(ops.backend_name([[f]]))
    out = impl.dense_combine([([f], [1.0], [Keep(DARE, seed=7, thresh24=dare_thresh24(0.25), density=0.25)])], SUM)[0]
    kept = out != 0
    torch.testing.assert_close(out[kept].double(), dense[kept] / 0.25, rtol=1e-5, atol=1e-6)
    assert torch.equal(kept, dare_mask(7, (40, 50), dare_thresh24(0.25)))


def svd_clamp_bounds_factors(backend):
    loras = method_loras(torch.float32)
    merged = kf.merge(loras, WEIGHTS, method="svd", svd_clamp=0.8)
    plain = kf.merge(loras, WEIGHTS, method="svd")
    for name, module in merged.modules.items():
        values = torch.cat([plain.modules[name].B.flatten(), plain.modules[name].A.flatten()]).double()
        q = float(torch.quantile(values, 0.8))
        assert float(module.A.abs().max()) <= q * (1 + 1e-6) and float(module.B.abs().max()) <= q * (1 + 1e-6)
