"""D2C clustering: planted groups with a synthetic scorer, baselines, LossScorer on a tiny trained model."""

from __future__ import annotations

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast import d2c

SHAPES = {f"model.layers.0.{p}": (24, 20) for p in ("q", "v")}


def planted(groups: int = 3, per_group: int = 4, rank: int = 3, noise: float = 0.35, seed: int = 0):
    """Adapters around ``groups`` random centres; returns (adapters, true group of each task)."""
    g = torch.Generator().manual_seed(seed)
    centres = [{n: (torch.randn(rank, s[1], generator=g), torch.randn(s[0], rank, generator=g))
                for n, s in SHAPES.items()} for _ in range(groups)]
    adapters, truth = {}, {}
    for k in range(groups * per_group):
        c = k % groups
        factors = {n: (a + noise * torch.randn(a.shape, generator=g), b + noise * torch.randn(b.shape, generator=g))
                   for n, (a, b) in centres[c].items()}
        adapters[f"task{k:02d}"] = kf.LoRA.from_factors(factors)
        truth[f"task{k:02d}"] = c
    return adapters, truth


class DistanceScorer:
    """Loss of a task under a merge: ||dW_merged - dW_task||^2 / ||dW_task||^2, summed over modules."""

    def __init__(self, adapters):
        self.dense = {t: {n: m.delta(torch.float64) for n, m in a.modules.items()} for t, a in adapters.items()}
        self.calls = 0

    def __call__(self, merged, tasks):
        self.calls += len(tasks)
        out = []
        for t in tasks:
            loss = 0.0
            for n, m in merged.modules.items():
                own = self.dense[t][n]
                loss += float((m.delta(torch.float64) - own).square().sum() / own.square().sum())
            out.append(loss)
        return out


def same_partition(assignment, truth) -> bool:
    pairs = {(assignment[t], truth[t]) for t in truth}
    return len(pairs) == len(set(truth.values())) == len({a for a, _ in pairs})


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_recovers_planted_groups_from_random_starts(seed):
    adapters, truth = planted()
    result = d2c.cluster(adapters, 3, DistanceScorer(adapters), merge="svd", init="random", seed=seed)
    assert same_partition(result.assignment, truth), result.clusters
    assert len(result.adapters) == 3 and all(isinstance(a, kf.LoRA) for a in result.adapters)


@pytest.mark.parametrize("method,kw", [("svd", {}), ("cat", {}), ("linear", {}), ("ties", {"density": 0.7}),
                                       ("ties_svd", {"density": 0.7}), ("magnitude_prune_svd", {"density": 0.7}),
                                       ("dare_linear_svd", {"density": 0.7, "generator": None})])
def test_recovers_planted_groups_from_kmeans_with_every_merge(method, kw):
    adapters, truth = planted()
    kw = {k: v for k, v in kw.items() if v is not None}
    # linear merges overshoot (sums of cross terms), so the moves rightly leave the planted groups there
    # (test_follows_its_loss_where_linear_merges_overshoot): the alternation alone for that one
    refine = 0 if method == "linear" else 3
    result = d2c.cluster(adapters, 3, DistanceScorer(adapters), merge=method, init="kmeans", merge_kwargs=kw,
                         refine=refine)
    assert same_partition(result.assignment, truth), (method, result.clusters)


def test_follows_its_loss_where_linear_merges_overshoot():
    """peft's factor-wise linear merge of adapters around one centre gives about n times the centre's update
    (the cross terms B_i A_j add up), so under the distance loss the planted groups are a poor clustering:
    the alternation stays at K-Means' planted start, the move search leaves it for a lower loss."""
    adapters, truth = planted()
    plain = d2c.cluster(adapters, 3, DistanceScorer(adapters), merge="linear", init="kmeans", refine=0)
    ours = d2c.cluster(adapters, 3, DistanceScorer(adapters), merge="linear", init="kmeans")  # refine=3
    assert same_partition(plain.assignment, truth)
    assert ours.total_loss < 0.5 * plain.total_loss


def test_best_state_and_history():
    adapters, truth = planted(groups=3, per_group=4, noise=0.6, seed=5)
    scorer = DistanceScorer(adapters)
    result = d2c.cluster(adapters, 3, scorer, init="random", seed=11, max_iters=10, refine=3)
    totals = [h.total_loss for h in result.history]
    assert result.total_loss == min(totals)
    assert result.history[0].merges == 3  # every cluster merged once at the start
    # caching: later rounds only merge and score clusters whose members changed
    assert all(h.merges <= 3 for h in result.history if h.kind == "reassign")
    refined = [h for h in result.history if h.kind == "refine"]
    assert refined and refined[-1].moves == 0 and refined[-1].total_loss == result.total_loss
    assert scorer.calls == sum(h.scored for h in result.history)
    assert sum(h.scored for h in result.history) <= len(adapters) * sum(h.merges for h in result.history)
    # the returned total is the scorer's total for the returned assignment
    check = sum(DistanceScorer(adapters)(result.adapters[c], [t])[0] for t, c in result.assignment.items())
    assert check == pytest.approx(result.total_loss)


def _total(adapters, assignment, budget):
    """Total DistanceScorer loss of an assignment, each cluster merged from scratch (svd, equal weights)."""
    scorer, total = DistanceScorer(adapters), 0.0
    for c in range(budget):
        members = [t for t in adapters if assignment[t] == c]
        merged = kf.merge([adapters[t] for t in members], [1 / len(members)] * len(members), method="svd")
        total += sum(scorer(merged, members))
    return total


def test_refine_moves_tasks_the_alternation_cannot():
    """Unrelated adapters of different norms: a task is scored under merges that exclude it, except its own
    cluster's, so reassignment stalls; the move search measures the merge a task would join, and groups
    tasks whose updates dilute each other least."""
    g = torch.Generator().manual_seed(0)
    adapters = {f"task{i}": kf.LoRA.from_factors({n: (torch.randn(3, s[1], generator=g) * scale,
                                                      torch.randn(s[0], 3, generator=g))
                                                  for n, s in SHAPES.items()})
                for i, scale in enumerate([0.2, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])}
    plain = d2c.cluster(adapters, 3, DistanceScorer(adapters), init="random", seed=0, refine=0)
    assert len(plain.history) < 20  # the alternation stopped at a repeat, not at max_iters
    ours = d2c.cluster(adapters, 3, DistanceScorer(adapters), init="random", seed=0, refine=3)
    assert ours.total_loss < 0.95 * plain.total_loss
    assert sum(h.moves for h in ours.history) >= 1
    assert ours.total_loss == pytest.approx(_total(adapters, ours.assignment, 3), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refine_ends_at_a_local_optimum_never_worse(seed):
    adapters, _ = planted(groups=3, per_group=3, noise=1.2, seed=seed)
    plain = d2c.cluster(adapters, 3, DistanceScorer(adapters), init="random", seed=seed, refine=0)
    ours = d2c.cluster(adapters, 3, DistanceScorer(adapters), init="random", seed=seed, refine=50)
    assert ours.total_loss <= plain.total_loss + 1e-9
    assert ours.history[-1].kind == "refine" and ours.history[-1].moves == 0
    # brute force: no single-task move (keeping every cluster non-empty) lowers the total
    base = _total(adapters, ours.assignment, 3)
    assert base == pytest.approx(ours.total_loss, rel=1e-6)
    for t, own in ours.assignment.items():
        if sum(c == own for c in ours.assignment.values()) == 1:
            continue
        for c in range(3):
            if c != own:
                moved = dict(ours.assignment, **{t: c})
                assert _total(adapters, moved, 3) >= base * (1 - 1e-6), (t, c)


def test_deterministic_for_a_seed():
    adapters, _ = planted(noise=0.8)
    runs = [d2c.cluster(adapters, 4, DistanceScorer(adapters), init="random", seed=7).assignment for _ in range(2)]
    assert runs[0] == runs[1]


def test_a_shared_cache_changes_no_result_and_saves_the_repeats():
    """One Cache over several budgets and seeds: each call returns what it returns alone, and a member set
    merged or scored by an earlier call is not merged or scored again (a repeated call costs nothing)."""
    adapters, _ = planted(groups=3, per_group=4, noise=0.8, seed=2)
    calls = [(3, 0), (3, 1), (4, 0), (3, 0)]
    alone = []
    for budget, seed in calls:
        scorer = DistanceScorer(adapters)
        alone.append((d2c.cluster(adapters, budget, scorer, init="random", seed=seed), scorer.calls))
    scorer, cache = DistanceScorer(adapters), d2c.Cache()
    for (budget, seed), (own, own_calls) in zip(calls, alone):
        before = scorer.calls
        shared = d2c.cluster(adapters, budget, scorer, init="random", seed=seed, cache=cache)
        assert shared.assignment == own.assignment and shared.total_loss == own.total_loss
        for a, b in zip(shared.adapters, own.adapters):
            for name in a.modules:
                assert torch.equal(a.modules[name].delta(), b.modules[name].delta())
        assert scorer.calls - before == sum(h.scored for h in shared.history) <= own_calls
    assert sum(h.scored + h.merges for h in shared.history) == 0     # the last call repeats the first
    assert scorer.calls < sum(c for _, c in alone)


def test_a_cache_is_refused_for_other_adapters_scorer_or_merge():
    adapters, _ = planted()
    scorer, cache = DistanceScorer(adapters), d2c.Cache()
    d2c.cluster(adapters, 3, scorer, cache=cache, refine=0)
    d2c.cluster(dict(adapters), 3, scorer, cache=cache, refine=0)   # an equal dict of the same LoRAs is fine
    others = dict(adapters, task00=planted(seed=9)[0]["task00"])
    reordered = dict(reversed(list(adapters.items())))
    for kwargs in (dict(adapters=others), dict(adapters=reordered), dict(scorer=DistanceScorer(adapters)),
                   dict(merge="linear"), dict(merge_kwargs={"rank": 2})):
        args = dict(adapters=adapters, budget=3, scorer=scorer, cache=cache, refine=0)
        args.update(kwargs)
        with pytest.raises(ValueError, match="cache: it holds the merges and scores of other"):
            d2c.cluster(**args)
    with pytest.raises(TypeError, match="cache: expected a kmerge_fast.d2c.Cache"):
        d2c.cluster(adapters, 3, scorer, cache={})


def test_d2c_no_worse_than_its_start_and_baselines():
    adapters, _ = planted(groups=4, per_group=3, noise=0.9, seed=3)
    scorer = DistanceScorer(adapters)
    km = d2c.kmeans(adapters, 4, seed=0, scorer=scorer)
    rnd = d2c.random_clusters(adapters, 4, seed=0, scorer=scorer)
    ours = d2c.cluster(adapters, 4, scorer, init="kmeans", seed=0)
    assert ours.total_loss <= km.total_loss + 1e-9
    assert km.total_loss < rnd.total_loss


def test_kmeans_and_random_baselines():
    adapters, truth = planted()
    km = d2c.kmeans(adapters, 3, seed=0)
    assert same_partition(km.assignment, truth) and km.total_loss is None
    rnd = d2c.random_clusters(adapters, 3, seed=4)
    assert sorted(set(rnd.assignment.values())) == [0, 1, 2]
    assert rnd.assignment == d2c.random_clusters(adapters, 3, seed=4).assignment
    assert [len(c) for c in km.clusters] == [4, 4, 4]


def test_empty_cluster_is_refilled():
    adapters, truth = planted(groups=2, per_group=3)
    # start with three clusters where the best answer wants two: a cluster would empty out
    result = d2c.cluster(adapters, 3, DistanceScorer(adapters), init="random", seed=0)
    assert sorted(set(result.assignment.values())) == [0, 1, 2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(budget=0), "budget: must be an int in \\[1, 12\\]"),
    (dict(budget=13), "budget"),
    (dict(merge="mean"), "merge: unknown"),
    (dict(init="spectral"), "init: unknown"),
    (dict(max_iters=0), "max_iters"),
    (dict(refine=-1), "refine: must be an int >= 0"),
    (dict(refine=True), "refine"),
    (dict(scorer=lambda m, t: [float("nan")] * len(t)), "scorer: non-finite"),
    (dict(scorer=lambda m, t: [0.0]), "scorer: returned 1 losses"),
])
def test_bad_input(kwargs, message):
    adapters, _ = planted()
    args = dict(adapters=adapters, budget=3, scorer=DistanceScorer(adapters))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        d2c.cluster(**args)


def test_different_base_models_refused():
    adapters, _ = planted()
    other = kf.LoRA.from_factors({"model.layers.0.q": (torch.randn(3, 21), torch.randn(24, 3)),
                                  "model.layers.0.v": (torch.randn(3, 20), torch.randn(24, 3))})
    adapters["odd"] = other
    with pytest.raises(ValueError, match="differ in modules or shapes"):
        d2c.cluster(adapters, 3, DistanceScorer(planted()[0]))
