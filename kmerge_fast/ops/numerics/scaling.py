"""Power-of-two range normalisation of factors, shared by every backend.

The kernels accumulate half and float32 inputs in float32 (range about
2^-126 .. 2^128, subnormals below), and even float64 overflows on the squared
norms of updates with entries near 1e300. An update dW = c B A is unchanged
by A -> 2^-e_A A, c B -> 2^(e_A) c B, and every quantity the ops return is a
sum of products, so scaling each factor by an exact power of two and
multiplying the result back by the matching power of two changes nothing
but the range the arithmetic runs in.

A factor whose largest |A| and largest |c B| both lie in
[2^-SAFE_EXP, 2^SAFE_EXP] is used as it is (exponent 0): its products
stay far inside float32's range, and ordinary adapters keep the exact
arithmetic (and bits) they always had. Any other factor is replaced, for the
duration of one op, by a copy A' = 2^-e_A A, B' = 2^-e_B c B (coef 1, float32
or float64) whose largest entries are in [1/2, 1); e = the ``math.frexp``
exponent of the largest magnitude. Copies happen only for such factors.

Wrappers, each taking the backend's own op (``run``) and its max-abs scan:

- :func:`inner_products`: results multiplied by 2^(e_i + e_j) with e = e_A + e_B;
- :func:`diff_stats`: both factors of a pair share one scale 2^E, E = the larger e;
- :func:`truncate`: the terms of a module share 2^E (a sum must keep its terms'
  ratios); the result's B is multiplied by 2^E.

Results that are out of float64's range after the scaling back are +-inf
(or 0), as the true value would be.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch

from ..contract import Factor

#: Largest |log2| of a factor's peak magnitude used without rescaling.
SAFE_EXP = 32
#: Largest power-of-two step applied at once (2^STEP and 2^-STEP are normal float64).
_STEP = 1000


def exponent(peak: float) -> int:
    """The ``math.frexp`` exponent e of ``peak`` (peak * 2^-e in [1/2, 1)), or 0 when ``peak``
    is 0, not finite, or within [2^-SAFE_EXP, 2^SAFE_EXP] (no rescaling needed)."""
    if not math.isfinite(peak) or peak == 0.0:
        return 0
    e = math.frexp(peak)[1]
    return 0 if -SAFE_EXP <= e <= SAFE_EXP else e


def _product_exponent(coef: float, peak: float) -> int:
    """The exponent e_B for c B with ``peak`` = max |B|: :func:`exponent` of |coef| * peak (without
    forming the product), but nonzero also when the coef alone is outside the safe range (the C++
    kernels round it to float32 for float32 factors): such a factor is normalised too."""
    if coef == 0.0 or not math.isfinite(coef):
        return 0
    mc, ec = math.frexp(abs(coef))
    if peak == 0.0 or not math.isfinite(peak):  # a zero B: only the coef's own range matters
        return exponent(abs(coef))
    mp, ep = math.frexp(peak)
    e = ec + ep + math.frexp(mc * mp)[1]  # mc * mp in [1/4, 1): exact, no range issue
    if -SAFE_EXP <= e <= SAFE_EXP and -SAFE_EXP <= ec <= SAFE_EXP:
        return 0
    return e or 1  # nonzero marks the factor for normalisation (any consistent exponent will do)


def ldexp(x: float, e: int) -> float:
    """x * 2^e, saturating to +-inf (or 0) instead of raising OverflowError."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.copysign(math.inf, x)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e for integer e in [-1022, 1023], exactly, as float64 (built from the exponent bits)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def ldexp_tensor(t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """t * 2^e elementwise (t float64, e integers broadcastable to it), in exact steps of at
    most 2^1000: with one sign of e per element, an intermediate over- or underflows only
    when the result does."""
    e = e.to(torch.int64).expand_as(t) if e.dim() else e.to(torch.int64)
    while True:
        step = e.clamp(-_STEP, _STEP)
        if not bool(step.any()):
            return t
        t = t * _pow2(step).to(t.device)
        e = e - step


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scaled(t: torch.Tensor, mult: float) -> torch.Tensor:
    """mult * t rounded once to float32 (float64 for float64 t): the product is formed in float64."""
    return (t.to(torch.float64) * mult).to(_work_dtype(t))


#: id(tensor) -> (weak reference, version counter, max |entry|): a stored slot's factors are
#: scanned once, not at every similarity call. The weak reference's callback drops the entry
#: when its tensor dies, before the id can be reused; a hit also checks the reference.
_PEAKS: dict[int, tuple] = {}


def peaks(tensors: list[torch.Tensor], max_abs: Callable) -> list[float]:
    """max |t| of each tensor, from the cache while the tensor is unchanged (its version counter),
    the others in one ``max_abs`` call."""
    out: list = [None] * len(tensors)
    todo = []
    for k, t in enumerate(tensors):
        hit = _PEAKS.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            out[k] = hit[2]
        else:
            todo.append(k)
    if todo:
        fresh = max_abs([tensors[k] for k in todo])
        for k, v in zip(todo, fresh):
            out[k] = float(v)
            t = tensors[k]
            if not t.is_inference():  # inference tensors have no version counter
                key = id(t)
                _PEAKS[key] = (weakref.ref(t, lambda _, key=key: _PEAKS.pop(key, None)), t._version, out[k])
    return out


def _exponents(factors: list[Factor], max_abs: Callable) -> dict[int, tuple[int, int]]:
    """id(factor) -> (e_A, e_B) with e_B the exponent of |coef| * max|B|, for each distinct factor."""
    unique = list({id(f): f for f in factors}.values())
    values = peaks([t for f in unique for t in (f.A, f.B)], max_abs) if unique else []
    out = {}
    for k, f in enumerate(unique):
        out[id(f)] = (exponent(values[2 * k]), _product_exponent(float(f.coef), values[2 * k + 1]))
    return out


def _normalised(f: Factor, e_a: int, e_b: int) -> Factor:
    """The copy 2^-e_A A, 2^-e_B c B with coef 1 (dW = 2^(e_A + e_B) c B A)."""
    return Factor(_scaled(f.A, ldexp(1.0, -e_a)), _scaled(f.B, ldexp(float(f.coef), -e_b)), 1.0)


def inner_products(batch, precise: bool, run: Callable, max_abs: Callable) -> list[torch.Tensor]:
    """``run(batch, precise)`` on normalised factors, scaled back (see the module docstring)."""
    exps = _exponents([f for xs, ys in batch for f in (*xs, *ys)], max_abs)
    if not any(any(e) for e in exps.values()):
        return run(batch, precise)
    cache: dict[int, Factor] = {}

    def norm(f: Factor) -> Factor:
        e_a, e_b = exps[id(f)]
        if not (e_a or e_b):
            return f
        if id(f) not in cache:
            cache[id(f)] = _normalised(f, e_a, e_b)
        return cache[id(f)]

    scaled_batch = []
    for xs, ys in batch:
        nxs = [norm(f) for f in xs]
        scaled_batch.append((nxs, nxs if ys is xs else [norm(f) for f in ys]))
    results = run(scaled_batch, precise)
    out = []
    for (xs, ys), g in zip(batch, results):
        ex = torch.tensor([sum(exps[id(f)]) for f in xs], dtype=torch.int64)
        ey = torch.tensor([sum(exps[id(f)]) for f in ys], dtype=torch.int64)
        out.append(ldexp_tensor(g.to(torch.float64), ex[:, None] + ey[None, :]) if (ex.any() or ey.any()) else g)
    return out


def diff_stats(batch, run: Callable, max_abs: Callable) -> torch.Tensor:
    """``run(batch)`` ([sum |dW_x - dW_y|, max |dW_x - dW_y|] per pair) with both updates of a
    pair scaled by one 2^-E, E the larger of their exponents; results times 2^E."""
    exps = _exponents([f for pair in batch for f in pair], max_abs)
    if not any(any(e) for e in exps.values()):
        return run(batch)
    scaled_batch, shifts = [], []
    for x, y in batch:
        (ax, bx), (ay, by) = exps[id(x)], exps[id(y)]
        if not (ax or bx or ay or by):
            scaled_batch.append((x, y))
            shifts.append(0)
            continue
        big = max(ax + bx, ay + by)
        scaled_batch.append((_normalised(x, ax, big - ax), _normalised(y, ay, big - ay)))
        shifts.append(big)
    stats = run(scaled_batch)
    return ldexp_tensor(stats.to(torch.float64), torch.tensor(shifts, dtype=torch.int64)[:, None])


def truncate(batch, rank: int, dtype: torch.dtype, run: Callable, max_abs: Callable):
    """``run(batch, rank, dtype)`` with each module's terms scaled by one 2^-E (E the largest
    term exponent, so the terms keep their ratios); the module's result B times 2^E."""
    exps = _exponents([f for factors in batch for f in factors], max_abs)
    if not any(any(e) for e in exps.values()):
        return run(batch, rank, dtype)
    scaled_batch, shifts = [], []
    for factors in batch:
        pairs = [exps[id(f)] for f in factors]
        if not any(a or b for a, b in pairs):
            scaled_batch.append(factors)
            shifts.append(0)
            continue
        big = max(a + b for a, b in pairs)
        scaled_batch.append([_normalised(f, a, big - a) for f, (a, _) in zip(factors, pairs)])
        shifts.append(big)
    out = run(scaled_batch, rank, dtype)
    fixed = []
    for (a, b), shift in zip(out, shifts):
        if shift:
            # Rounded to dtype twice (here and in run): only for inputs outside the safe range.
            b = ldexp_tensor(b.to(torch.float64), torch.tensor(shift)).to(b.dtype)
        fixed.append((a, b))
    return fixed


def torch_max_abs(tensors: list[torch.Tensor]) -> list[float]:
    """max |t| of each tensor (0.0 when empty, NaN when it holds NaN), one device sync."""
    if not tensors:
        return []
    peaks = [t.abs().amax().to(torch.float64) if t.numel() else torch.zeros((), dtype=torch.float64, device=t.device)
             for t in tensors]
    return torch.stack(peaks).cpu().tolist()
