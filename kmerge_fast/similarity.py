"""Adapter-to-adapter similarity, the quantity K-Merge routes newcomers by.

For adapters X and Y, the similarity is the mean over their shared modules of
a per-module similarity of the updates dW_X and dW_Y:

- ``cos``: <dW_X, dW_Y>_F / (||dW_X||_F ||dW_Y||_F) (0 if either is zero);
- ``l2``, ``l1``, ``linf``: 1 / (1 + d) with d the Frobenius, entrywise-l1 or
  max-abs distance (the published K-Merge definition for distances).

cos and l2 come from r x r cross-Grams and never form dW; l1 and linf need
the dense values and stream tiles of dW_X - dW_Y through a fixed buffer.
cos is invariant to the scale of the factors on every backend: factors far
outside float32's range run on power-of-two scaled copies (``ops/numerics/scaling.py``),
and an update whose squared norm leaves float64's range (|dW| beyond ~2^+-511)
is recomputed scaled by 2^-+600 (l2 distances are scaled back exactly).
Squared norms of every module are cached on the LoRAModule (per backend and
precision), so a stored slot pays for its norm once; missing ones are computed
in the same backend call as the inner products.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from typing import Sequence

import torch

from . import ops
from .lora import LoRA
from .merge import module_table
from .ops import Factor
from .ops.numerics.scaling import ldexp, ldexp_tensor

METRICS = ("cos", "l2", "l1", "linf")


def _factor(module) -> Factor:
    return Factor(module.A, module.B, module.scaling)


def cache_norms(loras: Sequence[LoRA], metric: str = "cos") -> None:
    """Compute and cache every module norm a later ``similarity_matrix(..., metric)`` call needs.

    A no-op for ``l1`` / ``linf`` (they use no norms) and for modules whose norm
    is cached already. The online merger calls it for a freshly merged slot
    while the store writes that slot, so the next step does not pay for it.
    """
    if metric not in ("cos", "l2"):
        return
    modules = [m for lora in loras for m in lora.modules.values()]
    if not modules:
        return
    precise = metric == "l2"
    key = _norm_key([[_factor(m) for m in modules]], precise)
    missing = _missing_norms(modules, [m.cached_sq_norm(key) for m in modules])
    if missing:
        _cache_self_dots(missing, ops.inner_products(_self_pairs(missing), precise=precise), key)


def _norm_key(factor_lists, precise: bool) -> str:
    """The cache key of squared norms computed with these factors: the backend that runs them, and the precision."""
    return f"{ops.backend_name(factor_lists)}/{'precise' if precise else 'fast'}"


def _missing_norms(modules, norms) -> list:
    """The modules (each once) whose cached squared norm in ``norms`` (one per module) is None."""
    return list({id(m): m for m, v in zip(modules, norms) if v is None}.values())


def _self_pairs(modules) -> list[tuple[list[Factor], list[Factor]]]:
    """inner_products batch entries (xs, xs), xs = [f]: the modules' squared norms (one list
    object on both sides, so a backend can compute the symmetric Gram once)."""
    return [(xs, xs) for xs in ([_factor(m)] for m in modules)]


def _cache_self_dots(modules, self_dots, key: str) -> None:
    for m, dots in zip(modules, self_dots):
        m.cache_sq_norm(float(dots[0, 0]), key)


def similarity_matrix(xs: Sequence[LoRA], ys: Sequence[LoRA] | None = None, metric: str = "cos") -> torch.Tensor:
    """The (len(xs), len(ys)) float64 matrix of mean per-module similarities.

    Args:
        xs: adapters (rows).
        ys: adapters (columns); default ``xs`` (a symmetric matrix).
        metric: ``"cos"`` (default), ``"l2"``, ``"l1"`` or ``"linf"``.

    A pair with no shared module gets similarity 0. A zero module has cosine 0
    with everything (itself included), never NaN.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: unknown similarity metric {metric!r}; choose from {list(METRICS)}")
    symmetric = ys is None
    ys = xs if symmetric else ys
    table_x = module_table(xs, "xs")
    table_y = table_x if symmetric else module_table(ys, "ys")
    total = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    count = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    names = [n for n in table_x if n in table_y]
    for name in names:
        x0, y0 = table_x[name][0][1], table_y[name][0][1]
        if x0.shape != y0.shape:
            raise ValueError(f"module {name!r}: xs update {x0.shape} weights but ys {y0.shape} ones")
    if not names:  # nothing shared: nothing to compute
        per_module = []
    elif metric in ("cos", "l2"):
        per_module = _gram_similarities(table_x, table_y, names, metric, symmetric)
    else:
        per_module = _dense_similarities(table_x, table_y, names, metric)
    # modules held by the same adapters add up as one block (usually all of them)
    blocks: dict[tuple, list[torch.Tensor]] = {}
    for name, sim in zip(names, per_module):
        layout = (tuple(i for i, _ in table_x[name]), tuple(j for j, _ in table_y[name]))
        blocks.setdefault(layout, []).append(sim)
    for (ix, iy), sims in blocks.items():
        rows, cols = torch.tensor(ix)[:, None], torch.tensor(iy)[None, :]
        total[rows, cols] += torch.stack(sims).sum(0)
        count[rows, cols] += len(sims)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def _gram_similarities(table_x, table_y, names, metric, symmetric) -> list[torch.Tensor]:
    batch = []
    for name in names:
        xs = [_factor(m) for _, m in table_x[name]]
        batch.append((xs, xs) if symmetric else (xs, [_factor(m) for _, m in table_y[name]]))
    # l2 subtracts nearly equal terms when adapters are close: it needs float64 Grams.
    precise = metric == "l2"
    key = _norm_key([f for pair in batch for f in pair], precise)
    groups = [[m for _, m in table_x[name]] for name in names]
    if not symmetric:
        groups += [[m for _, m in table_y[name]] for name in names]
    # Norms: a symmetric matrix has them on its diagonals. Otherwise those not cached yet
    # come from self-pairs in the same backend call (one launch, the same arithmetic
    # as the inner products they divide).
    norms = [[m.cached_sq_norm(key) for m in group] for group in groups]
    missing = [] if symmetric else \
        _missing_norms([m for group in groups for m in group], [v for values in norms for v in values])
    results = ops.inner_products(batch + _self_pairs(missing), precise=precise)
    inner = results[:len(batch)]
    _cache_self_dots(missing, results[len(batch):], key)
    if symmetric:
        for group, dots in zip(groups, inner):
            for m, v in zip(group, dots.diagonal().tolist()):
                m.cache_sq_norm(v, key)
    if symmetric or missing:
        norms = [[m.cached_sq_norm(key) for m in group] for group in groups]
    norms_x, norms_y = norms[:len(names)], norms[len(names):] or norms
    shifts = _rescue_out_of_range(batch, inner, norms_x, norms_y, precise, metric)
    # The per-module similarities, batched over modules of the same (len(xs), len(ys)).
    out: list = [None] * len(names)
    by_shape = defaultdict(list)
    for k, dots in enumerate(inner):
        by_shape[tuple(dots.shape)].append(k)
    for idx in by_shape.values():
        dots = torch.stack([inner[k] for k in idx])                                      # (n, X, Y)
        nx = torch.tensor([norms_x[k] for k in idx], dtype=torch.float64)[:, :, None]  # (n, X, 1)
        ny = torch.tensor([norms_y[k] for k in idx], dtype=torch.float64)[:, None, :]  # (n, 1, Y)
        if metric == "cos":
            denom = (nx * ny).sqrt()
            sim = torch.where(denom > 0, dots / denom.clamp_min(math.ulp(0.0)), torch.zeros_like(dots))
            sim = sim.clamp(-1.0, 1.0)  # rounding can step past |cos| = 1 for parallel updates
        else:
            dist = (nx + ny - 2 * dots).clamp_min(0).sqrt()
            shift = torch.tensor([shifts[k] for k in idx], dtype=torch.int64)[:, None, None]
            dist = ldexp_tensor(dist, shift) if bool(shift.any()) else dist  # undo the rescue's 2^-shift
            sim = 1.0 / (1.0 + dist)
        for k, one in zip(idx, sim.unbind(0)):
            out[k] = one
    return out


#: Power-of-two shift of updates whose squared norms leave float64's range (|dW| beyond ~2^+-512).
RESCUE_SHIFT = 600


def _shifted(f: Factor, k: int) -> Factor:
    """The factor of 2^-k dW: on the coef when that stays a normal float64, else on a copy of B."""
    coef = ldexp(float(f.coef), -k)
    if math.isfinite(coef) and abs(coef) >= sys.float_info.min:
        return Factor(f.A, f.B, coef)
    return Factor(f.A, f.B.to(torch.float64) * ldexp(1.0, -k) * f.coef, 1.0)


def _rescue_out_of_range(batch, inner, norms_x, norms_y, precise, metric) -> list[int]:
    """Recompute, in place, the modules whose squared norms or inner products left float64's
    range, on updates scaled by powers of two; returns per module the shift k (the l2
    distance of the scaled updates is 2^-k times the true one).

    The backends normalise factors for their own arithmetic (ops/numerics/scaling.py), but they return
    <dW_x, dW_y> itself, which overflows when |dW| exceeds ~2^512 and underflows below
    ~2^-511. cos: each update is scaled on its own (cos does not change), down when its
    squared norm overflowed, up when it underflowed (a zero update stays zero); l2: one
    shift down for the whole module when anything overflowed (an update small enough to
    underflow then is negligible in the distance, and a distance below 2^-511 has
    similarity 1 in float64 anyway).
    """
    shifts = [0] * len(batch)

    def out_of_range(v: float) -> bool:
        return not math.isfinite(v) or abs(v) < sys.float_info.min

    redo = []
    for k, dots in enumerate(inner):
        overflow = not bool(torch.isfinite(dots).all()) or not all(math.isfinite(v) for v in (*norms_x[k], *norms_y[k]))
        if overflow or (metric == "cos" and any(out_of_range(v) for v in (*norms_x[k], *norms_y[k]))):
            redo.append(k)
    if not redo:
        return shifts

    def shift_of(v: float) -> int:
        if metric == "l2":
            return RESCUE_SHIFT
        return RESCUE_SHIFT if not math.isfinite(v) else -RESCUE_SHIFT if abs(v) < sys.float_info.min else 0

    entries, plan = [], []
    for k in redo:
        xs, ys = batch[k]
        sx = [_shifted(f, shift_of(v)) for f, v in zip(xs, norms_x[k])]
        sy = sx if ys is xs else [_shifted(f, shift_of(v)) for f, v in zip(ys, norms_y[k])]
        entries.append((sx, sy))
        entries.extend(_self_pairs_of(sx))
        if ys is not xs:
            entries.extend(_self_pairs_of(sy))
        plan.append((k, len(xs), 0 if ys is xs else len(ys)))
    results = iter(ops.inner_products(entries, precise=precise))
    for k, n_x, n_y in plan:
        inner[k] = next(results)
        norms_x[k] = [float(next(results)[0, 0]) for _ in range(n_x)]
        norms_y[k] = [float(next(results)[0, 0]) for _ in range(n_y)] if n_y else norms_x[k]
        shifts[k] = RESCUE_SHIFT if metric == "l2" else 0
    return shifts


def _self_pairs_of(factors: list[Factor]) -> list[tuple[list[Factor], list[Factor]]]:
    return [(xs, xs) for xs in ([f] for f in factors)]


def _dense_similarities(table_x, table_y, names, metric) -> list[torch.Tensor]:
    batch, shapes = [], []
    for name in names:
        xs, ys = table_x[name], table_y[name]
        batch.extend((_factor(mx), _factor(my)) for _, mx in xs for _, my in ys)
        shapes.append((len(xs), len(ys)))
    stats = ops.diff_stats(batch)
    column = 0 if metric == "l1" else 1
    out, k = [], 0
    for n, m in shapes:
        dist = stats[k:k + n * m, column].reshape(n, m)
        out.append(1.0 / (1.0 + dist))
        k += n * m
    return out
