"""S-scores with 95% bootstrap intervals over test examples and arrival orders.

S = mean over orders of (mean over tasks of score_merged(task) / score_single(task)),
score = exact-match rate on the task's test examples. One bootstrap replicate
resamples each task's test examples (the same indices for the merged and the
single-adapter score: the ratio is paired) and resamples the orders; the
interval is the 2.5 and 97.5 percentiles of the replicates. Tasks whose single
score is 0 (in the replicate) are left out of its task mean.
"""

from __future__ import annotations

import numpy as np


def _replicates(merged: np.ndarray, single: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, rows): S of each row of ``merged`` (rows x orders x tasks x examples) in each replicate.

    All rows are resampled with the same draw, so differences between rows are paired.
    """
    rows, orders, tasks, examples = merged.shape
    rng = np.random.default_rng(seed)
    out = np.empty((n, rows))
    t_idx = np.arange(tasks)[:, None]
    for b in range(n):
        e = rng.integers(0, examples, (tasks, examples))
        o = rng.integers(0, orders, orders)
        m = merged[:, o][:, :, t_idx, e].mean(-1)          # (rows, orders, tasks)
        s = single[t_idx, e].mean(-1)                      # (tasks,)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(s > 0, m / s, np.nan)
        out[b] = np.nanmean(np.nanmean(ratio, axis=2), axis=1)
    return out


def s_point(merged: np.ndarray, single: np.ndarray) -> float:
    """S of ``merged`` (orders x tasks x examples, 0/1) against ``single`` (tasks x examples)."""
    s = single.mean(-1)
    m = merged.mean(-1)
    keep = s > 0
    return float((m[:, keep] / s[keep]).mean()) if keep.any() else float("nan")


def _interval(point: float, reps: np.ndarray) -> tuple[float, float, float]:
    return point, float(np.nanpercentile(reps, 2.5)), float(np.nanpercentile(reps, 97.5))


def s_interval(merged: np.ndarray, single: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(S, low, high): the point estimate and its 95% bootstrap interval."""
    merged, single = np.asarray(merged, float), np.asarray(single, float)
    return _interval(s_point(merged, single), _replicates(merged[None], single, n, seed)[:, 0])


def difference_interval(a: np.ndarray, b: np.ndarray, single: np.ndarray, n: int = 1000,
                        seed: int = 0) -> tuple[float, float, float]:
    """S(a) - S(b) with its 95% interval from *paired* replicates (the same examples and orders for both).

    ``a`` and ``b`` are orders x tasks x examples on the same orders.
    """
    a, b, single = (np.asarray(x, float) for x in (a, b, single))
    reps = _replicates(np.stack([a, b]), single, n, seed)
    return _interval(s_point(a, single) - s_point(b, single), reps[:, 0] - reps[:, 1])


def mean_interval(values: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-example values (tasks x examples) with a 95% interval resampling examples per task."""
    values = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    tasks, examples = values.shape
    t_idx = np.arange(tasks)[:, None]
    reps = np.array([values[t_idx, rng.integers(0, examples, (tasks, examples))].mean() for _ in range(n)])
    return _interval(float(values.mean()), reps)
