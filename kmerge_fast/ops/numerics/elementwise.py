"""Elementwise trim / elect / drop rules of TIES, DARE and magnitude pruning, in torch.

These act on whole tensors: the factor-wise merges (peft's ``ties``,
``dare_*``, ``magnitude_prune`` on the A and B factors) call them directly,
and the reference backend's ``dense_combine`` applies them to dense updates
(the C++ backend applies the same rules tile by tile, see
``csrc/core/dense_merge.cpp``). Semantics are peft 0.21's
(``peft/utils/merge_utils.py``), with two documented differences:

- magnitude pruning of dense updates keeps ``|v| >= tau`` with ``tau`` the
  k-th largest ``|v|``, ``k = int(density * numel)`` (a threshold is what a
  tile-by-tile kernel can apply); peft's ``topk`` keeps exactly k. They
  differ only when values tie at ``tau``, which float32 products of real
  factors practically never do. Factor-wise pruning (small tensors, often
  half precision, where ties are common) keeps exactly k with ``topk``, as
  peft does (:func:`topk_keep`).
- DARE draws its keep mask from a counter-based hash of (seed, element index)
  instead of ``torch.bernoulli`` on the global RNG: the mask is the same on
  every backend, thread count and tile order, and reproducible from a seed.
  Each element is kept independently with probability ``density`` (to
  2^-24), as in peft; the masks themselves are not peft's.

Keep kinds and combine modes (their integer codes are the C++ core's, see
``ops/contract.py``):

- keep ``ALL``: p = v; ``MAGNITUDE``: p = v if |v| >= tau else 0;
  ``DARE``: p = v / density if kept else 0.
- combine ``SUM``: sum_i w_i p_i. ``TIES``: elect = +1 if
  sum_i p_i >= 0 (sign method ``total``) or sum_i sign(p_i) >= 0
  (``frequency``), else -1; result = sum_{i: sign(p_i) = elect} w_i p_i /
  max(1, #{i: sign(p_i) = elect}).
"""

from __future__ import annotations

import torch

from ..contract import ALL, DARE, MAGNITUDE, SUM, TIES, Keep

_M64 = (1 << 64) - 1
_MIX1, _MIX2, _GOLDEN = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x9E3779B97F4A7C15


def mix64(x: int) -> int:
    """The murmur3 64-bit finaliser on a Python int (mod 2^64): seeds per tensor."""
    x &= _M64
    x ^= x >> 33
    x = (x * _MIX1) & _M64
    x ^= x >> 33
    x = (x * _MIX2) & _M64
    return x ^ (x >> 33)


def _signed(c: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def dare_thresh24(density: float) -> int:
    """The integer keep threshold of :func:`dare_mask` for ``density``."""
    return int(round(density * (1 << 24)))


def dare_mask(seed: int, shape: tuple[int, int], thresh24: int, device=None) -> torch.Tensor:
    """Bool (rows, cols) mask: element (i, j) kept iff hash(seed, i * cols + j) >> 40 < thresh24.

    hash = mix64(seed + (idx + 1) * 0x9E3779B97F4A7C15), all modulo 2^64; int64
    arithmetic in torch wraps like uint64, shifts are made logical.
    """
    rows, cols = shape
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device)
    x = (idx + 1) * _signed(_GOLDEN) + _signed(seed & _M64)
    x = x ^ _shr(x, 33)
    x = x * _signed(_MIX1)
    x = x ^ _shr(x, 33)
    x = x * _signed(_MIX2)
    x = x ^ _shr(x, 33)
    return (_shr(x, 40) < thresh24).reshape(rows, cols)


def kth_largest_abs(t: torch.Tensor, k: int) -> float:
    """The k-th largest |t| (+inf for k = 0); NaN counts as larger than everything."""
    if k == 0:
        return float("inf")
    flat = t.abs().flatten()
    flat = torch.where(flat.isnan(), torch.full_like(flat, float("inf")), flat)
    return float(torch.topk(flat, k).values[-1])


def topk_keep(t: torch.Tensor, k: int) -> torch.Tensor:
    """t with all but its k largest-magnitude entries zeroed (exactly k; ties as torch.topk breaks them).

    The k-th largest magnitude comes from ``kthvalue`` (a selection, about 3x cheaper than
    ``topk``'s partial sort on the CPU at k = n / 2); when exactly k entries reach it, they are
    topk's k. When several entries tie at it (common in half precision) or a NaN is present,
    ``topk`` decides which of them stay, as peft does.
    """
    flat = t.flatten()
    mag = flat.abs()
    n = flat.numel()
    if 0 < k < n:
        wide = mag if mag.dtype in (torch.float32, torch.float64) else mag.float()  # exact for half types
        keep = mag >= torch.kthvalue(wide, n - k + 1).values.to(mag.dtype)
        # an upper set {|v| >= c} of exactly k entries is the k largest, whatever c is
        if int(keep.sum()) == k and not bool(mag.isnan().any()):
            return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).reshape(t.shape)
    out = torch.zeros_like(flat)
    index = torch.topk(mag, k).indices
    out[index] = flat[index]
    return out.reshape(t.shape)


def magnitude_k(density: float, numel: int) -> int:
    """peft's number of kept values: int(density * numel)."""
    return int(density * numel)


def apply_keep(t: torch.Tensor, keep: Keep) -> torch.Tensor:
    """p = keep(t) elementwise (see the module docstring)."""
    if keep.kind == ALL:
        return t
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    if keep.kind == MAGNITUDE:
        return torch.where((t.abs() >= keep.tau) | t.isnan(), t, zero)
    if keep.kind == DARE:
        mask = dare_mask(keep.seed, tuple(t.shape), keep.thresh24, t.device)
        return torch.where(mask, t / keep.density, zero)
    raise ValueError(f"keep kind: unknown {keep.kind}")


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """((w_0 t_0) + w_1 t_1) + ...: each product and sum rounded in the tensors' dtype, left to right.

    For one or two terms these are the roundings of peft's ``(stack * w).sum(0)``
    (two products have one sum); with more terms its reduction order varies.
    """
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        out = out + t * w
    return out


def combine(pruned: list[torch.Tensor], weights: list[float], mode: int, sign_method: str = "total") -> torch.Tensor:
    """Combine pruned tensors p_i (same shape) with weights w_i: SUM or TIES."""
    if mode == SUM and len(pruned) <= 2:
        return weighted_sum(pruned, weights)  # the online mergers' case, without the stack
    stacked = torch.stack(pruned)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if mode == SUM:
        return (stacked * w).sum(0)
    if mode != TIES:
        raise ValueError(f"combine mode: unknown {mode}")
    sign = stacked.sign()
    votes = stacked.sum(0) if sign_method == "total" else sign.sum(0)
    elect = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = sign == elect
    total = torch.where(agree, stacked * w, torch.zeros((), dtype=stacked.dtype, device=stacked.device)).sum(0)
    # NaN has sign NaN (never "agrees"); put it back so it is not silently dropped.
    total = torch.where(stacked.isnan().any(0), torch.full_like(total, float("nan")), total)
    return total / agree.sum(0).clamp_min(1).to(stacked.dtype)
