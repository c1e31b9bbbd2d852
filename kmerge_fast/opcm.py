"""Orthogonal-projection continual merging (OPCM), in low-rank form.

OPCM (Tang et al., 2025, "Merging Models on the Fly Without Retraining") is the
continual-merging baseline of the K-Merge paper. Our reading of its dense
formulation, per weight matrix, for the merged task vector D_{t-1} of the
tasks so far and a newcomer tau_t:

1. P(tau) = tau - U_k U_k^T tau V_k V_k^T, with U_k, V_k the leading singular
   vectors of D_{t-1} holding a fraction ``alpha`` of its energy: the newcomer
   loses the part that lives in the subspace the earlier tasks use.
2. lambda_t = ||lambda_{t-1} D_{t-1} + P(tau_t)||_F / mean_{i<=t} ||tau_i||_F
   (lambda_1 = 1): a rescaling that keeps the merged update at the size of an
   average task vector.
3. D_t = (lambda_{t-1} D_{t-1} + P(tau_t)) / lambda_t.

Every step stays in factor form: with D = U S V^T (rank r, from the SVD
kernel) and tau = s B A, the core C = U_k^T (s B)(A V_k) is k x k, so
P(tau) = [s B, -U_k C] [A; V_k^T] has rank r + k; the norms come from
r x r Grams; D_t is truncated back to the slot's rank r with the SVD
kernel. Deviation from the dense method: that truncation (dense OPCM keeps
a full-rank D_t; a slot here has a fixed rank) - lambda_t uses the exact norm
of the untruncated sum.
"""

from __future__ import annotations

import torch

from . import ops
from .lora import LoRA, LoRAModule
from .merge import merge, truncate
from .ops import Factor

#: Fraction of the merged update's energy whose subspace is projected out.
ALPHA = 0.5


def _sq_norm(factors: list[Factor]) -> float:
    """||sum_i c_i B_i A_i||_F^2 from r x r Grams."""
    grams = ops.inner_products([(factors, factors)], precise=True)[0]
    return max(float(grams.sum()), 0.0)


def _energy_rank(s: torch.Tensor, alpha: float) -> int:
    """Smallest k whose leading s_i^2 sum to at least ``alpha`` of the total."""
    energy = s.double().square()
    total = float(energy.sum())
    if total <= 0:
        return 0
    return int((energy.cumsum(0) < alpha * total).sum()) + 1


def opcm_step(slot: LoRA, new: LoRA, state: dict, rank: int, alpha: float = ALPHA) -> tuple[LoRA, dict]:
    """Merge ``new`` into ``slot`` with OPCM; returns the new slot and its state.

    Args:
        slot: the merged adapter D_{t-1} (any rank; scaling per module).
        new: the newcomer tau_t (same modules).
        state: per module ``{"lambda": lambda_{t-1}, "norm_sum": sum_{i<t} ||tau_i||, "count": t - 1}``;
            empty for a slot that holds one unmerged adapter (lambda 1, its own norm).
        rank: the slot's rank r.
    """
    svd_slot = truncate(slot, rank)  # B = U S, A = V^T
    pieces, out_state = {}, {}
    for name, d in svd_slot.modules.items():
        t = new.modules[name]
        old = slot.modules[name]
        prev = state.get(name) or {"lambda": 1.0, "norm_sum": _sq_norm([Factor(old.A, old.B, old.scaling)]) ** 0.5,
                                   "count": 1}
        s = d.B.double().norm(dim=0)                                   # singular values of D
        k = _energy_rank(s, alpha)
        u = d.B.double()[:, :k] / s[:k].clamp_min(torch.finfo(torch.float64).tiny)
        v = d.A.double()[:k].T
        core = u.T @ (t.scaling * t.B.double()) @ (t.A.double() @ v)   # k x k
        lam = prev["lambda"]
        # lambda_{t-1} D + P(tau): factors of rank r + r_t + k
        terms = [Factor(d.A.double(), d.B.double(), lam), Factor(t.A.double(), t.B.double(), t.scaling),
                 Factor(v.T.contiguous(), (-u @ core).contiguous(), 1.0)]
        norm_t = _sq_norm([terms[1]]) ** 0.5
        norm_sum, count = prev["norm_sum"] + norm_t, prev["count"] + 1
        mean_norm = norm_sum / count
        total = _sq_norm(terms) ** 0.5
        lam_new = total / mean_norm if mean_norm > 0 else 1.0
        lam_new = lam_new if lam_new > 0 else 1.0
        pieces[name] = LoRAModule(torch.cat([f.A * f.coef for f in terms]), torch.cat([f.B for f in terms], dim=1),
                                  1.0 / lam_new)
        out_state[name] = {"lambda": lam_new, "norm_sum": norm_sum, "count": count}
    merged = merge([LoRA(pieces)], [1.0], method="svd", rank=rank).to(dtype=slot.dtype)
    return LoRA(merged.modules, slot.config), out_state
