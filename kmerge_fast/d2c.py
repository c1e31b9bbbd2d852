"""D2C: data-driven clustering of N task adapters into K multi-task adapters.

The published D2C clusters adapters by iterative optimisation with about 10
examples per task; its exact update rule is not public. This is **our
definition**, a K-Means-like alternation on task losses:

1. Initialise an assignment task -> cluster (``kmeans`` on the adapters'
   low-rank cosine similarity, ``random``, or an explicit dict).
2. Merge each cluster's members into one adapter with equal weights
   (``merge``: any :func:`kmerge_fast.merge` method; default ``svd``, the
   exact average truncated to the largest input rank).
3. Score every (task, cluster) pair: ``scorer(merged, tasks)`` returns each
   task's loss under that cluster's adapter (lower is better).
4. Reassign each task to its lowest-loss cluster (ties keep the current
   one). A cluster left empty takes the task worst served by its own
   cluster among clusters that keep at least one member.
5. Repeat 2-4 until an assignment repeats or ``max_iters``; keep the best
   assignment seen by total loss.
6. Refine it by moves (``refine`` sweeps at most; default 3, 0 turns it off): for each task in
   turn, the move to another cluster that lowers the total loss most, where
   the loss of both affected clusters is measured *with* the move (the task's
   old cluster re-merged without it, the new one with it). Step 4 scores a
   task only under merges that exclude it (every cluster but its own), so on
   real adapters it almost never leaves the initial clustering; a move
   evaluates the merge the task would actually get. A sweep without a move
   ends the search. Return the final assignment (its total loss is never
   above step 5's best), its K merged adapters and the history.

   On bench/quality (SmolLM2, 20 adapters, 10 examples per task, 2 seeds)
   ``refine=3`` beats K-Means at K = 5 and 8 (S +0.06 [0.02, 0.10] and
   +0.14 [0.08, 0.21]) and equals it at K = 3 (no move was found), hence
   the default.

Merges are cached by member set and scores by (member set, task), so only
clusters whose members changed are re-merged and re-scored; a :class:`Cache`
passed to several calls (other budgets, seeds or initialisations of the same
adapters and scorer) carries them from one call to the next. A refinement
sweep costs up to N (K - 1) merges of a cluster plus one task, each scored on
its members only.

The default merge is ``svd`` because peft's factor-wise ``linear`` merge of
unrelated adapters adds cross terms B_i A_j that blur the scores.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .lora import LoRA
from .merge import merge
from .methods import lookup
from .similarity import similarity_matrix

INITS = ("kmeans", "random")
Scorer = Callable[[LoRA, list], Sequence[float]]


@dataclass
class Iteration:
    """One round: the assignment scored, its total loss, and what it cost.

    ``kind`` is ``"reassign"`` (steps 2-4 of the module docstring) or
    ``"refine"`` (one sweep of step 6, which made ``moves`` moves).
    """

    assignment: dict
    total_loss: float
    seconds: float
    merges: int          # clusters merged this round (cache misses)
    scored: int          # (task, cluster) pairs scored this round (cache misses)
    kind: str = "reassign"
    moves: int = 0


@dataclass
class Result:
    """A clustering: ``assignment`` task -> cluster index, the K merged ``adapters``, the ``history``.

    ``total_loss`` is the scorer's total over tasks (None for a baseline run without a scorer).
    """

    assignment: dict
    adapters: list
    history: list = field(default_factory=list)
    total_loss: float | None = None

    @property
    def clusters(self) -> list[list[str]]:
        """Member tasks of each cluster, in task order."""
        out: list[list[str]] = [[] for _ in self.adapters]
        for task, c in self.assignment.items():
            out[c].append(task)
        return out


class Cache:
    """Merges (member set -> merged LoRA) and scores ((member set, task) -> loss) shared by :func:`cluster` calls.

    Pass one ``Cache`` to several calls on the same adapters with the same scorer and merge method (several
    budgets, seeds or initialisations): a member set merged or scored by one call is neither merged nor
    scored again by the next, and every result is the same as without the cache (the merges and the
    scorer are deterministic). The first call binds it to its adapters (the LoRA objects, in their order),
    scorer, merge method and merge kwargs; a call with any other is refused, since the cached values would
    not be its own. It keeps every merged LoRA it has seen in memory, so memory grows with the member sets
    tried: on the quality benchmark (SmolLM2-135M, rank 16, 20 tasks, K = 3, 5, 8 x 2 seeds) peak RSS went
    from 3.6 to 5.6 GiB with it; drop the cache between unrelated runs.
    """

    def __init__(self):
        self.merges: dict[frozenset, LoRA] = {}
        self.scores: dict[tuple[frozenset, str], float] = {}
        self._owner: tuple | None = None

    def _bind(self, adapters: Mapping[str, LoRA], scorer, merge: str, merge_kwargs: dict) -> None:
        if self._owner is None:
            self._owner = (dict(adapters), scorer, merge, dict(merge_kwargs))
            return
        known, known_scorer, known_merge, known_kwargs = self._owner
        # the task order too: a cluster's members are merged in it, and another order rounds differently
        same = (list(known) == list(adapters) and all(known[t] is adapters[t] for t in known)
                and known_scorer is scorer and known_merge == merge and known_kwargs == merge_kwargs)
        if not same:
            raise ValueError("cache: it holds the merges and scores of other adapters (or another task order), "
                             "another scorer or another merge method; use one Cache per (adapters, scorer, merge, "
                             "merge_kwargs)")


# ---------------------------------------------------------------- checks
def _check(adapters, budget) -> list[str]:
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("adapters: need a non-empty dict task -> LoRA")
    tasks = list(adapters)
    reference = None
    for task, lora in adapters.items():
        if not isinstance(task, str) or not task:
            raise ValueError(f"adapters: task names must be non-empty strings, got {task!r}")
        if not isinstance(lora, LoRA):
            raise TypeError(f"adapters[{task!r}]: expected a kmerge_fast.LoRA, got {type(lora).__name__}")
        shapes = {n: m.shape for n, m in lora.modules.items()}
        if reference is None:
            reference = (task, shapes)
        elif shapes != reference[1]:
            diff = sorted(set(shapes.items()) ^ set(reference[1].items()))[:2]
            raise ValueError(f"adapters: {task!r} and {reference[0]!r} differ in modules or shapes {diff} "
                             "(adapters of different base models?)")
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= len(tasks):
        raise ValueError(f"budget: must be an int in [1, {len(tasks)}] (the number of tasks), got {budget!r}")
    return tasks


def _merged(members: list[str], adapters, method: str, merge_kwargs: dict) -> LoRA:
    loras = [adapters[t] for t in members]
    if len(loras) == 1 and method != "cat":
        return loras[0]
    return merge(loras, [1.0 / len(loras)] * len(loras), method=method, **merge_kwargs)


def _clusters(assignment: dict, budget: int) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(budget)]
    for task, c in assignment.items():
        out[c].append(task)
    return out


# ---------------------------------------------------------------- baselines
def _kernel_kmeans(kernel: torch.Tensor, budget: int, seed: int, n_init: int = 10, iters: int = 100) -> list[int]:
    """K-Means in the feature space of a PSD ``kernel`` (n x n), k-means++ starts, best of ``n_init``."""
    n = kernel.shape[0]
    diag = kernel.diagonal()
    rng = random.Random(seed)
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        centers = [rng.randrange(n)]
        while len(centers) < budget:  # k-means++: far points are likelier
            d = torch.stack([diag - 2 * kernel[:, c] + kernel[c, c] for c in centers]).min(0).values.clamp_min(0)
            weights = d.tolist()
            centers.append(rng.choices(range(n), weights=weights)[0] if sum(weights) > 0 else rng.randrange(n))
        labels = torch.tensor([min(range(budget), key=lambda k: float(diag[i] - 2 * kernel[i, centers[k]]
                                                                      + kernel[centers[k], centers[k]]))
                               for i in range(n)])
        for _ in range(iters):
            dist = torch.empty(n, budget, dtype=torch.float64)
            for k in range(budget):
                members = (labels == k).nonzero().flatten()
                if len(members) == 0:
                    dist[:, k] = math.inf
                    continue
                sub = kernel[:, members]
                dist[:, k] = diag - 2 * sub.mean(1) + kernel[members][:, members].mean()
            new = dist.argmin(1)
            for k in range(budget):  # an emptied cluster takes the point farthest from its centre
                if not (new == k).any():
                    far = int(dist.gather(1, new[:, None]).flatten().argmax())
                    new[far] = k
            if torch.equal(new, labels):
                break
            labels = new
        inertia = float(dist.gather(1, labels[:, None]).clamp_min(0).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels.tolist(), inertia
    return best


def kmeans_assignment(adapters: Mapping[str, LoRA], budget: int, seed: int = 0) -> dict[str, int]:
    """K-Means of the adapters on their low-rank cosine similarity (the paper's K-Means baseline).

    The mean per-module cosine S_ij = mean_m <u_i^m, u_j^m> with u = dW / ||dW|| is
    the Gram matrix of the concatenated normalised updates, so K-Means runs exactly
    in that space as kernel K-Means on S, without forming any dW.
    """
    tasks = _check(adapters, budget)
    kernel = similarity_matrix([adapters[t] for t in tasks], metric="cos")
    labels = _kernel_kmeans(kernel, budget, seed)
    return _canonical(dict(zip(tasks, labels)), tasks)


def _canonical(assignment: dict, tasks: list[str]) -> dict[str, int]:
    """Relabel clusters by first appearance in task order (equal partitions get equal labels)."""
    order: dict[int, int] = {}
    for t in tasks:
        order.setdefault(assignment[t], len(order))
    return {t: order[assignment[t]] for t in tasks}


def random_assignment(tasks: list[str], budget: int, seed: int = 0) -> dict[str, int]:
    """A seeded random assignment with every cluster non-empty."""
    rng = random.Random(seed)
    labels = list(range(budget)) + [rng.randrange(budget) for _ in range(len(tasks) - budget)]
    rng.shuffle(labels)
    return _canonical(dict(zip(tasks, labels)), tasks)


def _baseline(adapters, assignment, budget, merge_method, merge_kwargs, scorer) -> Result:
    groups = _clusters(assignment, budget)
    merged = [_merged(g, adapters, merge_method, merge_kwargs) for g in groups]
    total = None
    if scorer is not None:
        total = sum(sum(_score(scorer, adapter, group)) for adapter, group in zip(merged, groups))
    return Result(dict(assignment), merged, [], total)


def kmeans(adapters: Mapping[str, LoRA], budget: int, seed: int = 0, merge: str = "svd",
           merge_kwargs: dict | None = None, scorer: Scorer | None = None) -> Result:
    """The K-Means baseline: :func:`kmeans_assignment`, then each cluster merged (total loss if ``scorer``)."""
    _check_merge(merge)
    assignment = kmeans_assignment(adapters, budget, seed)
    return _baseline(adapters, assignment, budget, merge, merge_kwargs or {}, scorer)


def random_clusters(adapters: Mapping[str, LoRA], budget: int, seed: int = 0, merge: str = "svd",
                    merge_kwargs: dict | None = None, scorer: Scorer | None = None) -> Result:
    """The random baseline: a seeded random assignment, then each cluster merged."""
    _check_merge(merge)
    tasks = _check(adapters, budget)
    return _baseline(adapters, random_assignment(tasks, budget, seed), budget, merge, merge_kwargs or {}, scorer)


def _check_merge(method: str) -> None:
    lookup(method, "merge")


def _score(scorer: Scorer, merged: LoRA, tasks: list[str]) -> list[float]:
    values = scorer(merged, list(tasks))
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"scorer: must return a sequence of floats, got {type(values).__name__}") from None
    if len(values) != len(tasks):
        raise ValueError(f"scorer: returned {len(values)} losses for {len(tasks)} tasks")
    bad = [t for t, v in zip(tasks, values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"scorer: non-finite loss for tasks {bad[:5]}")
    return values


# ---------------------------------------------------------------- D2C
def cluster(adapters: Mapping[str, LoRA], budget: int, scorer: Scorer, merge: str = "svd", init="kmeans",
            seed: int = 0, max_iters: int = 20, merge_kwargs: dict | None = None,
            progress: bool = False, refine: int = 3, cache: Cache | None = None) -> Result:
    """Cluster ``adapters`` (task -> LoRA) into ``budget`` merged adapters by task loss (module docstring).

    Args:
        adapters: task name -> adapter; all of one base model.
        budget: K, 1 <= K <= number of tasks.
        scorer: ``scorer(merged, tasks) -> losses``, e.g. :class:`LossScorer`.
        merge: the merge method for each cluster (equal weights); ``merge_kwargs``
            go to :func:`kmerge_fast.merge` (e.g. ``{"density": 0.5}``).
        init: ``"kmeans"``, ``"random"`` or a dict task -> cluster index.
        seed: for the initialisation.
        max_iters: rounds of merge / score / reassign at most.
        progress: show a progress bar over rounds and scoring calls.
        refine: sweeps of the move search (step 6) at most (default 3); 0 turns
            it off (the alternation of steps 2-5 alone).
        cache: a :class:`Cache` shared with other calls on these adapters, scorer and
            merge (None: this call's own); the history counts this call's misses.
    """
    tasks = _check(adapters, budget)
    _check_merge(merge)
    if not callable(scorer):
        raise TypeError(f"scorer: must be callable, got {type(scorer).__name__}")
    _check_scorer_tasks(scorer, tasks)
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters: must be an int >= 1, got {max_iters!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine: must be an int >= 0 (sweeps; 0 = off), got {refine!r}")
    merge_kwargs = dict(merge_kwargs or {})
    if cache is None:
        cache = Cache()
    elif not isinstance(cache, Cache):
        raise TypeError(f"cache: expected a kmerge_fast.d2c.Cache, got {type(cache).__name__}")
    cache._bind(adapters, scorer, merge, merge_kwargs)
    assignment = _initial(adapters, tasks, budget, init, seed)

    merges, scores = cache.merges, cache.scores
    history: list[Iteration] = []
    seen: set[tuple] = set()
    best: tuple[float, dict] | None = None
    bar = _progress(progress, max_iters + refine)
    try:
        for _ in range(max_iters):
            start = time.perf_counter()
            groups = _clusters(assignment, budget)
            keys = [frozenset(g) for g in groups]
            n_merges = n_scored = 0
            for key, group in zip(keys, groups):
                if key not in merges:
                    merges[key] = _merged(group, adapters, merge, merge_kwargs)
                    n_merges += 1
                todo = [t for t in tasks if (key, t) not in scores]
                if todo:
                    for t, v in zip(todo, _score(scorer, merges[key], todo)):
                        scores[key, t] = v
                    n_scored += len(todo)
            loss = torch.tensor([[scores[key, t] for key in keys] for t in tasks], dtype=torch.float64)
            total = float(sum(loss[i, assignment[t]] for i, t in enumerate(tasks)))
            history.append(Iteration(dict(assignment), total, time.perf_counter() - start, n_merges, n_scored))
            if best is None or total < best[0]:
                best = (total, dict(assignment))
            seen.add(tuple(assignment[t] for t in tasks))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(total_loss=f"{total:.4f}", merges=n_merges, scored=n_scored)
            new = _reassign(loss, tasks, assignment, budget)
            if tuple(new[t] for t in tasks) in seen:
                break
            assignment = new
        total, assignment = best
        if refine:
            total, assignment = _refine(assignment, tasks, budget, refine, adapters, merge, merge_kwargs,
                                        scorer, merges, scores, history, bar)
    finally:
        if bar is not None:
            bar.close()
    groups = _clusters(assignment, budget)
    return Result(assignment, [merges[frozenset(g)] for g in groups], history, total)


def _refine(assignment, tasks, budget, sweeps, adapters, merge, merge_kwargs, scorer, merges, scores,
            history, bar) -> tuple[float, dict]:
    """Step 6 of the module docstring: best-improving single-task moves, ``sweeps`` sweeps at most.

    ``merges`` and ``scores`` are :func:`cluster`'s caches (member set -> merged
    adapter; (member set, task) -> loss); ``history`` gets one ``refine``
    :class:`Iteration` per sweep. Returns (total loss, assignment).
    """
    counts = {"merges": 0, "scored": 0}

    def group_loss(members: list[str]) -> float:
        """Sum over ``members`` of their losses under the merge of exactly ``members``."""
        key = frozenset(members)
        if key not in merges:
            merges[key] = _merged([t for t in tasks if t in key], adapters, merge, merge_kwargs)
            counts["merges"] += 1
        todo = [t for t in tasks if t in key and (key, t) not in scores]
        if todo:
            for t, v in zip(todo, _score(scorer, merges[key], todo)):
                scores[key, t] = v
            counts["scored"] += len(todo)
        return sum(scores[key, t] for t in key)

    def total_of(assignment: dict) -> float:
        """The total in task order, summed as the alternation sums it (so equal assignments give equal totals)."""
        groups = _clusters(assignment, budget)
        for g in groups:
            group_loss(g)
        keys = {t: frozenset(groups[assignment[t]]) for t in tasks}
        return float(sum(scores[keys[t], t] for t in tasks))

    assignment = dict(assignment)
    total = total_of(assignment)
    for _ in range(sweeps):
        start = time.perf_counter()
        counts.update(merges=0, scored=0)
        moves = 0
        for t in tasks:
            groups = _clusters(assignment, budget)
            own = assignment[t]
            if len(groups[own]) == 1:  # moving it would leave a cluster empty
                continue
            # change of the total when t leaves `own`, then when it joins c
            leave = group_loss([u for u in groups[own] if u != t]) - group_loss(groups[own])
            best_delta, best_c = 0.0, None
            for c in range(budget):
                if c == own:
                    continue
                delta = leave + group_loss(groups[c] + [t]) - group_loss(groups[c])
                # a move must gain more than rounding noise, so sweeps cannot cycle
                if delta < best_delta and -delta > 1e-9 * max(1.0, abs(total)):
                    best_delta, best_c = delta, c
            if best_c is not None:
                assignment[t] = best_c
                moves += 1
        total = total_of(assignment)
        history.append(Iteration(dict(assignment), total, time.perf_counter() - start, counts["merges"],
                                 counts["scored"], kind="refine", moves=moves))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(total_loss=f"{total:.4f}", moves=moves)
        if moves == 0:
            break
    return total, assignment


def _check_scorer_tasks(scorer, tasks: list[str]) -> None:
    """A scorer that knows its tasks (LossScorer.tasks) must hold examples for exactly the adapters' tasks."""
    known = getattr(scorer, "tasks", None)
    if known is None:
        return
    missing, unknown = sorted(set(tasks) - set(known)), sorted(set(known) - set(tasks))
    if missing:
        raise ValueError(f"scorer: no examples for tasks {missing[:5]}")
    if unknown:
        raise ValueError(f"scorer: examples for unknown tasks {unknown[:5]} (no adapter of that name)")


def _initial(adapters, tasks, budget, init, seed) -> dict[str, int]:
    if isinstance(init, Mapping):
        if set(init) != set(tasks):
            raise ValueError(f"init: the assignment must cover exactly the tasks; differs in "
                             f"{sorted(set(init) ^ set(tasks))[:5]}")
        if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < budget for c in init.values()):
            raise ValueError(f"init: cluster indices must be ints in [0, {budget})")
        if len(set(init.values())) != budget:
            raise ValueError(f"init: every one of the {budget} clusters needs a member")
        return {t: init[t] for t in tasks}
    if init == "kmeans":
        return kmeans_assignment(adapters, budget, seed)
    if init == "random":
        return random_assignment(tasks, budget, seed)
    raise ValueError(f"init: unknown {init!r}; choose from {list(INITS)} or pass a dict task -> cluster")


def _reassign(loss: torch.Tensor, tasks: list[str], assignment: dict, budget: int) -> dict[str, int]:
    """Each task to its lowest-loss cluster (ties keep the current); refill emptied clusters."""
    new = {}
    for i, t in enumerate(tasks):
        current = assignment[t]
        best = int(loss[i].argmin())
        new[t] = current if loss[i, current] <= loss[i, best] else best
    for k in range(budget):
        if k in new.values():
            continue
        sizes = {c: list(new.values()).count(c) for c in range(budget)}
        # the task worst served by its own cluster, among clusters that keep a member
        movable = [(float(loss[i, new[t]]), -i, t) for i, t in enumerate(tasks) if sizes[new[t]] > 1]
        _, _, worst = max(movable)
        new[worst] = k
    return new


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="d2c rounds", unit="round")


from .scoring import LossScorer  # noqa: E402  (re-exported: kf.d2c.LossScorer)

__all__ = ["INITS", "Cache", "Iteration", "LossScorer", "Result", "cluster", "kmeans", "kmeans_assignment",
           "random_assignment", "random_clusters"]
