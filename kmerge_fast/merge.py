"""Merging adapters: ``merge`` (weighted sum in factor form, or its best rank-r
approximation) and ``truncate`` (re-truncation of one adapter).

Conventions follow peft's ``add_weighted_adapter``: a merged adapter has
scaling 1 (``lora_alpha = r``); ``cat`` stacks the factors exactly, putting
weight * scaling on A; ``svd`` returns B = U_r S_r, A = V_r^T of the best
rank-r approximation of sum_i w_i s_i B_i A_i, with r defaulting to the
largest input rank.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import ops
from .errors import AdapterError
from .lora import LoRA, LoRAModule
from .ops import Factor

METHODS = ("svd", "cat")


def module_table(loras: Sequence[LoRA], arg: str = "loras") -> dict[str, list[tuple[int, LoRAModule]]]:
    """Module name -> [(adapter index, module)] over the adapters that hold it.

    Raises AdapterError when two adapters disagree on a module's shape
    (they were trained on different base models).
    """
    if not isinstance(loras, (list, tuple)):
        raise TypeError(f"{arg}: expected a list of LoRA, got {type(loras).__name__}")
    table: dict[str, list[tuple[int, LoRAModule]]] = {}
    for i, lora in enumerate(loras):
        if not isinstance(lora, LoRA):
            raise TypeError(f"{arg}[{i}]: expected a kmerge_fast.LoRA, got {type(lora).__name__}")
        for name, module in lora.modules.items():
            entries = table.setdefault(name, [])
            if entries and entries[0][1].shape != module.shape:
                j = entries[0][0]
                raise AdapterError(
                    f"module {name!r}: {arg}[{i}] updates a {module.shape} weight but {arg}[{j}] a "
                    f"{entries[0][1].shape} one (different base models?)"
                )
            entries.append((i, module))
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
          rank: int | None = None) -> LoRA:
    """Merge adapters into one: sum_i w_i s_i B_i A_i per module.

    Args:
        loras: the adapters (at least one). A module held by only some of them
            merges over those that hold it.
        weights: one float per adapter (default: all 1.0).
        method: ``"svd"``: the best rank-``rank`` approximation of the sum
            (never forms dW); ``"cat"``: the exact sum in factor form, rank
            sum_i r_i (A = [w_1 s_1 A_1; ...], B = [B_1, ...]).
        rank: the rank of an ``svd`` merge (default: the largest input rank).

    Returns:
        A LoRA with scaling 1 on every module, in the inputs' promoted dtype.
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown merge method {method!r}; choose from {list(METHODS)}")
    if not isinstance(loras, (list, tuple)) or not loras:
        raise ValueError("loras: need at least one adapter to merge")
    weights = check_weights(weights, len(loras))
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank: must be a positive int, got {rank!r}")
    if method == "cat" and rank is not None:
        raise ValueError("rank: not used by method='cat' (its rank is the sum of the input ranks)")
    table = module_table(loras)
    dtype = result_dtype(loras)
    names = list(table)
    batch = [[Factor(m.A, m.B, weights[i] * m.scaling) for i, m in table[name]] for name in names]
    if method == "cat":
        pairs = ops.select_for(batch).stack(batch, dtype)
    else:
        if rank is None:
            rank = max(max(lora.ranks.values(), default=1) for lora in loras)
        pairs = ops.select_for(batch).truncate(batch, rank, dtype)
    config = next((lora.config for lora in loras if lora.config), {})
    return LoRA({name: LoRAModule(a, b, 1.0) for name, (a, b) in zip(names, pairs)}, config)


def truncate(lora: LoRA, rank: int) -> LoRA:
    """The best rank-``rank`` approximation of every module of ``lora`` (scaling 1).

    B = U_r S_r, A = V_r^T of s B A; a module whose rank is below ``rank``
    comes back zero-padded to ``rank``.
    """
    if not isinstance(lora, LoRA):
        raise TypeError(f"lora: expected a kmerge_fast.LoRA, got {type(lora).__name__}")
    return merge([lora], [1.0], method="svd", rank=rank)
