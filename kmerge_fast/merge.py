"""Merging adapters: ``merge`` (every combination type of peft 0.21's
``add_weighted_adapter``) and ``truncate`` (re-truncation of one adapter).

Conventions follow peft: a merged adapter has scaling 1 (``lora_alpha = r``).
The methods, their families (``svd``, ``cat``, factor-wise, dense-domain;
formulas in ``methods.py``) and the checks of their arguments are the
registry's (``kmerge_fast/methods.py``). The ops run on the backend the
dispatcher picks (``kmerge_fast.ops``): ``svd`` is ``ops.truncate``, ``cat``
``ops.stack``; dense-domain methods combine the pruned dW_i of one module at
a time (``ops.abs_kth``, ``ops.dense_combine``; the C++ backend builds it tile
by tile, holding one dense matrix per module), then truncate it (``top_svd``).

The elementwise rules and their two documented differences from peft (ties
at the magnitude threshold, DARE's hash-based masks) are in
``ops/numerics/elementwise.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import ops
from .errors import AdapterError
from .lora import LoRA, LoRAModule, first_non_finite
from .methods import METHODS, check_args  # noqa: F401 (METHODS: kmerge_fast.merge.METHODS, the method names)
from .ops import Factor
from .ops.contract import ALL, COMBINE_MODES, DARE, KEEP_KINDS, MAGNITUDE, Keep
from .ops.numerics.elementwise import apply_keep, combine, dare_thresh24, magnitude_k, mix64, topk_keep
from .ops.numerics.top_svd import top_svd


def module_table(loras: Sequence[LoRA], arg: str = "loras") -> dict[str, list[tuple[int, LoRAModule]]]:
    """Module name -> [(adapter index, module)] over the adapters that hold it.

    Raises AdapterError when two adapters disagree on a module's shape
    (they were trained on different base models).
    """
    if not isinstance(loras, (list, tuple)):
        raise TypeError(f"{arg}: expected a list of LoRA, got {type(loras).__name__}")
    table: dict[str, list[tuple[int, LoRAModule]]] = {}
    shapes: dict[str, tuple[int, int]] = {}  # of each module's first holder
    for i, lora in enumerate(loras):
        if not isinstance(lora, LoRA):
            raise TypeError(f"{arg}[{i}]: expected a kmerge_fast.LoRA, got {type(lora).__name__}")
        for name, module in lora.modules.items():
            shape = module.shape
            if shapes.setdefault(name, shape) != shape:
                j = table[name][0][0]
                raise AdapterError(
                    f"module {name!r}: {arg}[{i}] updates a {shape} weight but {arg}[{j}] a "
                    f"{shapes[name]} one (different base models?)"
                )
            table.setdefault(name, []).append((i, module))
    return table


def result_dtype(loras: Sequence[LoRA]) -> torch.dtype:
    """The promoted dtype of the inputs' factors."""
    dtype = None
    for lora in loras:
        if lora.dtype is not None:
            dtype = lora.dtype if dtype is None else torch.promote_types(dtype, lora.dtype)
    return dtype or torch.float32


def check_weights(weights, n: int) -> list[float]:
    """Validate ``weights`` for ``n`` adapters (None: all 1.0)."""
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights: {len(weights)} weights for {n} adapters")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights: must be finite, got {bad}")
    return weights


def merge(loras: Sequence[LoRA], weights: Sequence[float] | None = None, method: str = "svd",
          rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
          svd_clamp: float | None = None, generator: torch.Generator | None = None) -> LoRA:
    """Merge adapters into one, per module, with peft 0.21's combination types.

    Args:
        loras: the adapters (at least one). A module held by only some of them
            merges over those that hold it.
        weights: one finite float per adapter (default: all 1.0); may be negative.
        method: one of :data:`METHODS` (see the module docstring):
            ``svd`` (default), ``cat``, ``linear``, ``ties``, ``dare_linear``,
            ``dare_ties``, ``magnitude_prune``, ``ties_svd``,
            ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``.
        rank: the rank of the ``svd`` family's result (default: the largest
            input rank); not used by the other methods. A rank above every
            module's min(n_out, n_in) is refused (ValueError): it could only
            add zero padding. Modules of lower rank come back zero-padded.
        density: the fraction of values kept, in (0, 1]; required by the TIES,
            DARE and magnitude-prune methods (1 keeps everything).
        majority_sign_method: ``"total"`` (sign of the sum) or ``"frequency"``
            (sign of the vote) for the TIES methods.
        svd_clamp: for the ``svd`` family, clamp B and A to the
            [-q, q] range with q the ``svd_clamp`` quantile of all their
            entries (peft's ``svd_clamp``); None: no clamping.
        generator: the ``torch.Generator`` DARE draws its seed from (default:
            torch's global generator, so ``torch.manual_seed`` makes it
            reproducible as in peft). The masks themselves come from a
            counter-based hash of that seed (``ops/numerics/elementwise.py``).

    Returns:
        A LoRA with scaling 1 on every module, in the inputs' promoted dtype.
        Ranks: ``cat``: sum of the inputs' ranks per module; factor-wise: the
        common input rank; ``svd`` family: ``rank``.

    Raises:
        AdapterError: a result factor does not fit the result dtype (e.g. a
            float16 merge with values above 65504); the message names the
            module and suggests converting the inputs to a wider dtype.

    Dense-domain methods with float32 and float64 inputs compute every term in
    float64 (so the magnitude threshold compares the values it was taken from).
    """
    entry, density = check_args(method, rank, density, majority_sign_method, svd_clamp)
    if not isinstance(loras, (list, tuple)) or not loras:
        raise ValueError("loras: need at least one adapter to merge")
    weights = check_weights(weights, len(loras))
    mode, kind = COMBINE_MODES[entry.combine], KEEP_KINDS[entry.keep]
    table = module_table(loras)
    dtype = result_dtype(loras)
    names = list(table)
    seeds = _Seeds(generator) if kind == DARE and density < 1 else None
    if entry.family == "factor_wise":
        if entry.sums_factors(len(loras), density):
            pairs = _factor_sums(names, table, weights, method, dtype)
        else:
            pairs = [_factor_wise(name, table[name], weights, method, mode, kind, density, majority_sign_method,
                                  seeds, dtype) for name in names]
    else:
        if rank is None and entry.takes_rank:
            rank = max(max(lora.ranks.values(), default=1) for lora in loras)
        elif rank is not None:
            _check_rank_fits(rank, table)
        batch = [[Factor(m.A, m.B, weights[i] * m.scaling) for i, m in table[name]] for name in names]
        if entry.family == "cat":
            pairs = ops.stack(batch, dtype)
        elif entry.family == "svd":
            pairs = ops.truncate(batch, rank, dtype)
        else:
            pairs = [_dense_domain(name, table[name], weights, method, mode, kind, rank, density,
                                   majority_sign_method, seeds, dtype) for name in names]
        if svd_clamp is not None:
            pairs = [clamp_factors(a, b, float(svd_clamp)) for a, b in pairs]
    config = next((lora.config for lora in loras if lora.config), {})
    modules = {name: LoRAModule(a, b, 1.0) for name, (a, b) in zip(names, pairs)}
    try:
        return LoRA(modules, config)
    except AdapterError:
        bad = first_non_finite(modules)
        if bad is None:
            raise
        # The inputs were finite (LoRA checks them): the result does not fit its dtype.
        raise AdapterError(
            f"merge: module {bad[0]!r}: the merged lora_{bad[1]} overflows {dtype} (method {method!r}; "
            f"largest finite {dtype} value {torch.finfo(dtype).max:.4g}); merge in a wider dtype, e.g. "
            f"[lora.to(torch.float32) for lora in loras]") from None


def _check_rank_fits(rank: int, table) -> None:
    """Refuse a ``rank`` above every module's largest possible rank, min(n_out, n_in): its
    zero padding is all the result would add (and could be too large to allocate)."""
    if not table:
        return
    name, entries = max(table.items(), key=lambda item: min(item[1][0][1].shape))
    limit = min(entries[0][1].shape)
    if rank > limit:
        n_out, n_in = entries[0][1].shape
        raise ValueError(f"rank: {rank} is above the largest rank any module can have ({limit}, module {name!r} "
                         f"is {n_out} x {n_in}); ask for at most {limit}")


class _Seeds:
    """Per-tensor DARE seeds: mix64 of one base seed drawn from ``generator`` and a counter."""

    def __init__(self, generator: torch.Generator | None):
        self.base = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        self.count = 0

    def next(self) -> int:
        self.count += 1
        return mix64(self.base + self.count * 0x9E3779B97F4A7C15)


def _keep(kind: int, density: float, seeds: _Seeds | None, tau: float = 0.0) -> Keep:
    if kind == ALL or density >= 1.0:  # peft prunes nothing at density 1 (DARE does not rescale either)
        return Keep()
    if kind == MAGNITUDE:
        return Keep(MAGNITUDE, tau=tau)
    return Keep(DARE, seed=seeds.next(), thresh24=dare_thresh24(density), density=density)


def _factor_weights(name: str, entries, weights, method) -> tuple[list[float], list[float]]:
    """peft's factor-wise weights of one module: sign(w s) sqrt(|w s|) on the A's, sqrt(|w s|) on the B's.

    Raises ValueError unless every entry has the same rank (peft's requirement).
    """
    if len({m.rank for _, m in entries}) > 1:
        raise ValueError(f"method {method!r} needs equal ranks, but module {name!r} has ranks "
                         f"{[m.rank for _, m in entries]} (use 'cat' or an svd method)")
    signed = [weights[i] * m.scaling for i, m in entries]
    w_a = [math.copysign(math.sqrt(abs(ws)), ws) if ws != 0 else 0.0 for ws in signed]
    w_b = [math.sqrt(abs(ws)) for ws in signed]
    return w_a, w_b


def _factor_sums(names, table, weights, method, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The factor-wise SUM without pruning over at most two adapters (``Method.sums_factors``):
    every module's A and B sums in one backend call (``ops.weighted_sum``, peft's roundings)."""
    batch = []
    for name in names:
        entries = table[name]
        w_a, w_b = _factor_weights(name, entries, weights, method)
        batch.append(([m.A for _, m in entries], w_a))
        batch.append(([m.B for _, m in entries], w_b))
    sums = ops.weighted_sum(batch, dtype)
    return [(sums[2 * k], sums[2 * k + 1]) for k in range(len(names))]


def _factor_wise(name: str, entries, weights, method, mode, kind, density, sign_method, seeds, dtype):
    """peft's factor-wise merge of one module: the rule on the A's and on the B's separately."""
    w_a, w_b = _factor_weights(name, entries, weights, method)
    out = []
    for tensors, w in (([m.A for _, m in entries], w_a), ([m.B for _, m in entries], w_b)):
        work = ops.compute_dtype(dtype)
        pruned = []
        for t in tensors:
            t = t.to(work)
            if kind == MAGNITUDE and density < 1.0:
                pruned.append(topk_keep(t, magnitude_k(density, t.numel())))
            else:
                pruned.append(apply_keep(t, _keep(kind, density, seeds)))
        out.append(combine(pruned, w, mode, sign_method).to(dtype))
    return out[0], out[1]


def _dense_domain(name, entries, weights, method, mode, kind, rank, density, sign_method, seeds, dtype):
    """One module of a dense-domain method: combine the pruned dW_i, truncate to ``rank``.

    One module per ``ops.dense_combine`` call: each holds its (n_out, n_in) result."""
    # Mixed float32 / float64 terms: every term in float64 on every backend, so that the
    # magnitude threshold is the k-th largest of the very values the merge compares with it.
    wide = torch.float64 if any(m.A.dtype == torch.float64 for _, m in entries) else None
    factors = [Factor(m.A.to(wide or m.A.dtype), m.B.to(wide or m.B.dtype), m.scaling) for _, m in entries]
    if kind == MAGNITUDE and density < 1.0:
        numel = factors[0].B.shape[0] * factors[0].A.shape[1]
        taus = ops.abs_kth([(f, magnitude_k(density, numel)) for f in factors])
    else:
        taus = [0.0] * len(factors)
    keeps = [_keep(kind, density, seeds, tau) for tau in taus]
    combined, = ops.dense_combine([(factors, [weights[i] for i, _ in entries], keeps)], mode, sign_method)
    if not bool(torch.isfinite(combined).all()):
        raise ValueError(f"method {method!r}: module {name!r}: the combined update is not finite (NaN/Inf in the "
                         f"inputs, or values beyond {combined.dtype}'s range: merge in float64, e.g. "
                         f"[lora.to(torch.float64) for lora in loras])")
    a, b = top_svd(combined, rank)
    return a.to(dtype), b.to(dtype)


def clamp_factors(a: torch.Tensor, b: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``svd_clamp``: clamp A and B to [-q, q], q the ``quantile`` of all their entries."""
    values = torch.cat([b.flatten(), a.flatten()]).double()
    hi = _quantile(values, quantile)
    return a.clamp(-hi, hi), b.clamp(-hi, hi)


def _quantile(values: torch.Tensor, q: float) -> float:
    """torch.quantile's linear interpolation, without its input-size limit."""
    pos = q * (values.numel() - 1)
    lo = math.floor(pos)
    v_lo = float(values.kthvalue(lo + 1).values)
    if pos == lo:
        return v_lo
    v_hi = float(values.kthvalue(lo + 2).values)
    return v_lo + (pos - lo) * (v_hi - v_lo)


def truncate(lora: LoRA, rank: int) -> LoRA:
    """The best rank-``rank`` approximation of every module of ``lora`` (scaling 1).

    B = U_r S_r, A = V_r^T of s B A; a module whose rank is below ``rank``
    comes back zero-padded to ``rank``.
    """
    if not isinstance(lora, LoRA):
        raise TypeError(f"lora: expected a kmerge_fast.LoRA, got {type(lora).__name__}")
    return merge([lora], [1.0], method="svd", rank=rank)
