"""The leading rank-r SVD of one dense matrix, for the dense-domain ``*_svd`` merges.

TIES, DARE and magnitude pruning act elementwise on dW, so their result M is
full rank and its truncation needs a dense SVD. peft computes all
min(n_out, n_in) singular triples (``torch.linalg.svd``, seconds for a
2048 x 2048 module on a CPU); only the leading r are kept. Here:

- small matrices (min side <= max(2 ell, EXACT_BELOW), ell = 2 r + 8): one exact SVD in float64;
- larger ones: block subspace iteration with Rayleigh-Ritz. With Q an
  orthonormal basis (n_out x ell), the thin SVD of W = M^T Q = V_w S U_w^T
  gives the Ritz triples (Q U_w, S, V_w) of M; the next basis is orth(M W).
  The rank-r Ritz approximation is the projection U_r U_r^T M, so its error
  is exactly ||M - B A||_F^2 = ||M||_F^2 - sum_{j<=r} s_j^2, which only
  decreases (geometrically) towards the optimum. Iteration stops when the
  predicted remaining decrease (the last step's, times rho / (1 - rho) with
  rho the ratio of the last two steps) is below ``tol`` times the current
  error: the approximation error is then within ``tol`` (relative) of the
  optimal one. If that does not happen within ``max_iters``, or the spectrum
  is so flat that the iteration stalls, an exact SVD is taken instead.

The products with M run in M's dtype (float32 for the merges); the ell-wide
algebra runs in float64.
"""

from __future__ import annotations

import torch

#: Target: approximation error within this fraction of the optimal one.
TOL = 1e-5
MAX_ITERS = 80
#: Matrices whose short side is at most this take the exact SVD (it is cheaper there).
EXACT_BELOW = 256


def _oversampled(rank: int, n: int) -> int:
    return min(n, 2 * rank + 8)


def _exact(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x.double()).Q.to(x.dtype)


def _iterate(m: torch.Tensor, r: int, ell: int, tol: float, max_iters: int, seed: int):
    gen = torch.Generator(device=m.device).manual_seed(seed)
    q = _orth(m @ torch.randn(m.shape[1], ell, generator=gen, device=m.device, dtype=m.dtype))
    total = float(m.double().square().sum())
    captured: list[float] = []
    for _ in range(max_iters):
        w = m.T @ q                                               # n_in x ell
        w64 = w.double()
        ritz = torch.linalg.eigvalsh(w64.T @ w64).flip(0)[:r]     # s_j^2, descending
        captured.append(float(ritz.clamp_min(0).sum()))
        error = max(total - captured[-1], 0.0)
        if len(captured) >= 3:
            step, prev = captured[-1] - captured[-2], captured[-2] - captured[-3]
            rho = step / prev if prev > 0 else 0.0
            if step <= 0 or (rho < 1 and step * rho / (1 - rho) <= tol * error):
                v_w, s, u_wt = torch.linalg.svd(w64, full_matrices=False)
                return q.double() @ u_wt.T[:, :r], s[:r], v_w[:, :r].T
        q = _orth(m @ w)
    return None


def top_svd(m: torch.Tensor, rank: int, tol: float = TOL, max_iters: int = MAX_ITERS,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B = U_r S_r (n_out x rank), A = V_r^T (rank x n_in) of M's best rank-r approximation.

    Args:
        m: (n_out, n_in) float32 or float64, finite.
        rank: r; where min(n_out, n_in) < r the factors are zero-padded.
        tol, max_iters, seed: of the subspace iteration (see the module docstring).
    Returns:
        Factors in float64 (the caller casts).
    """
    n = min(m.shape)
    r = min(rank, n)
    ell = _oversampled(r, n)
    found = None if n <= max(2 * ell, EXACT_BELOW) else _iterate(m, r, ell, tol, max_iters, seed)
    u, s, vh = found if found is not None else _exact(m, r)
    a = torch.zeros(rank, m.shape[1], dtype=torch.float64, device=m.device)
    b = torch.zeros(m.shape[0], rank, dtype=torch.float64, device=m.device)
    a[:r] = vh
    b[:, :r] = u * s
    return a, b
