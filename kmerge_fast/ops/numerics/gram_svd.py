"""The best rank-r factors of M = B A from the Grams of B and A (the R x R algebra of ``truncate``).

Used by the triton backend, and by the cpp backend for a module its C++
twin (``csrc/core/gram_svd.cpp``, same two routes, same tolerances) cannot
settle: they form Gb = B^T B and Ga = A A^T in float64 from the stacks
B (n_out x R) and A (R x n_in), call :func:`core_transforms`, and rebuild
the factors as B' = B T_B and A'^T = A^T T_A. Only this step is O(R^3); the
big sides are touched twice (Grams, rebuild), never forming M.

Cholesky route (every module whose Ga is well conditioned). Ga = L L^T gives
A = L Q^T with Q = A^T L^{-T} orthonormal, so M = (B L) Q^T and the SVD of M
follows from the R x R matrix K = L^T Gb L = W S^2 W^T:
B' = U_r S_r = B L W_r and A' = V_r^T = W_r^T L^{-1} A, i.e.
T_B = L W_r, T_A = L^{-T} W_r. A Cholesky factorisation costs R^3 / 3,
a sixth of the eigendecomposition it replaces.

The route is checked, not assumed: A' A'^T = T_A^T Ga T_A must be I_r within
``ORTH_TOL`` (it drifts by ~eps cond(Ga), so this catches ill-conditioned
stacks that unpivoted Cholesky does not flag).

Eigen route (the rest: repeated, zero or nearly dependent adapters).
Ga = Va La Va^T and Ra = La^{1/2} Va^T play the part of L^T, with the
directions below ``RANK_TOL`` of the largest eigenvalue dropped: T_A uses
La^{-1/2} on the kept ones only, so rank-deficient stacks give zero rows,
never NaN.

Everything runs in float64 on the Grams' device, batched over modules, except
one float32 eigendecomposition for large R (see ``_leading_eigvecs``).
"""

from __future__ import annotations

import torch

#: Eigenvalues of Ga below this fraction of the largest are float64 rounding
#: noise (rank-deficient or repeated adapters) and are dropped on the eigen route.
RANK_TOL = 1e-12
#: Stacked ranks above this take the float32 eigh with a float64 Rayleigh-Ritz step (``_leading_eigvecs``).
REFINE_ABOVE = 128
#: Leading float32 eigenvectors beyond the rank kept for that step.
OVERSAMPLE = 16
#: Largest |A' A'^T - I| accepted from the Cholesky route (float64 arithmetic
#: gives ~1e-16 cond(Ga); this admits cond(Ga) up to ~1e10).
ORTH_TOL = 1e-6


def core_transforms(g_b: torch.Tensor, g_a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_B, T_A), each (batch, R, rank) float64, from the Grams Gb, Ga (batch, R, R) float64.

    The columns of T_B / T_A beyond the stacked rank R are zero.
    """
    t_b, t_a, failed = _cholesky_route(g_b, g_a, rank)
    bad = failed | ~_orthonormal(t_a, g_a)
    if bool(bad.any()):
        t_b[bad], t_a[bad] = _eigen_route(g_b[bad], g_a[bad], rank)
    return t_b, t_a


def _leading_eigvecs(k: torch.Tensor, rank: int) -> torch.Tensor:
    """W_r: the eigenvectors of the symmetric K (batch, R, R) for its ``rank`` largest eigenvalues, zero-padded.

    A float64 eigh of all R eigenvectors is O(R^3) and was half of truncation's
    time at R = 256, where only r = 32 are needed. Above ``REFINE_ABOVE``:
    eigh in float32 (of K / trace K); its p = rank + ``OVERSAMPLE`` leading
    eigenvectors V miss the true leading r by ~c eps32 ||K|| / (lambda_r -
    lambda_{p+1}); one step of subspace iteration in float64, orth(K V),
    shrinks that by lambda_{p+1} / lambda_r (to zero when K has rank below p),
    and Rayleigh-Ritz on that span picks the best rank-r directions inside it.
    The approximation error is second order in what is left: float64-accurate
    (tested on flat, steep, tied and rank-deficient spectra).
    """
    k = 0.5 * (k + k.mT)  # exact symmetry for eigh
    big_r = k.shape[-1]
    p = rank + OVERSAMPLE
    if big_r <= max(REFINE_ABOVE, p):
        _, w = torch.linalg.eigh(k)
    else:
        trace = k.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        _, w32 = torch.linalg.eigh((k / trace.clamp_min(torch.finfo(k.dtype).tiny)).to(torch.float32))
        # one float64 step of subspace iteration from the float32 basis, then Rayleigh-Ritz
        q = torch.linalg.qr(k @ w32[..., -p:].to(k.dtype)).Q   # (batch, R, p)
        h = q.mT @ k @ q
        _, y = torch.linalg.eigh(0.5 * (h + h.mT))
        w = q @ y
    w = w.flip(-1)[..., :rank]  # descending singular values
    if w.shape[-1] < rank:  # the stacked rank is below the requested rank: zero columns
        w = torch.nn.functional.pad(w, (0, rank - w.shape[-1]))
    return w


def _cholesky_route(g_b: torch.Tensor, g_a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T_B, T_A, failed): ``failed`` (batch,) marks the Grams Cholesky rejected (their T are placeholders)."""
    l, info = torch.linalg.cholesky_ex(g_a)
    failed = info != 0
    if bool(failed.any()):  # a partial factor may hold NaN, which eigh refuses: use I there
        eye = torch.eye(l.shape[-1], dtype=l.dtype, device=l.device)
        l = torch.where(failed[:, None, None], eye, l)
    w = _leading_eigvecs(l.mT @ g_b @ l, rank)
    return l @ w, torch.linalg.solve_triangular(l.mT, w, upper=True), failed


def _orthonormal(t_a: torch.Tensor, g_a: torch.Tensor) -> torch.Tensor:
    """(batch,) bool: T_A^T Ga T_A = I_r within ``ORTH_TOL`` (zero padding columns excepted)."""
    gram = t_a.mT @ g_a @ t_a
    live = t_a.abs().amax(dim=-2) > 0  # (batch, rank): padding columns are exactly zero
    eye = torch.diag_embed(live.to(gram.dtype))
    dev = (gram - eye).abs().amax(dim=(-2, -1))
    return torch.isfinite(dev) & (dev <= ORTH_TOL)


def _eigen_route(g_b: torch.Tensor, g_a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    la, va = torch.linalg.eigh(g_a)
    keep = la > RANK_TOL * la[..., -1:].clamp_min(0)
    sqrt_la = torch.where(keep, la.clamp_min(0).sqrt(), torch.zeros_like(la))
    inv_sqrt_la = torch.where(keep, 1.0 / sqrt_la.where(keep, torch.ones_like(la)), torch.zeros_like(la))
    r_a = sqrt_la.unsqueeze(-1) * va.mT  # Ra = La^{1/2} Va^T
    w = _leading_eigvecs(r_a @ g_b @ r_a.mT, rank)
    return r_a.mT @ w, (va * inv_sqrt_la.unsqueeze(-2)) @ w
