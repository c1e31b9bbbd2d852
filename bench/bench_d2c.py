"""Cost of D2C clustering per iteration: merges, forward passes, seconds, and merging vs scoring.

Run from the repository root::

    python -m bench.bench_d2c            # N = 40 adapters, K = 5
    python -m bench.bench_d2c --quick    # N = 12, K = 3

Setup (not timed): a tiny Llama built from a config (hidden 128, 4 layers,
vocabulary 256; no downloads), N LoRA adapters of rank 8 on q/k/v/o in 5
families (a shared random update per family plus noise), and 10 examples per
task: a random 24-token prompt and, as target, the 8 tokens the model
generates greedily with its family's centre adapter applied - so an
adapter's family really serves its tasks best and the clustering has
structure to find. The scorer is ``kf.d2c.LossScorer`` (batch 32).

Each row is one D2C round from a K-Means start with the ``svd`` merge:
clusters merged (cache misses), (task, cluster) pairs scored, forward
passes, seconds, and the share of the round spent in the scorer (forward
passes) versus merging and bookkeeping. The K-Means and random baselines'
total losses are given for comparison.
"""

from __future__ import annotations

import time

import torch

import kmerge_fast as kf
from kmerge_fast.scoring import _Hooks

from . import harness as h

FAMILIES = 5


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def adapters_and_examples(model, n: int, rank: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {key: (m.out_features, m.in_features) for key, m in model.named_modules()
              if key.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}
    families = [{k: (torch.randn(rank, s[1], generator=g) / s[1] ** 0.5, torch.randn(s[0], rank, generator=g) * 0.3)
                 for k, s in shapes.items()} for _ in range(FAMILIES)]
    hooks = _Hooks(model)
    adapters, examples = {}, {}
    for i in range(n):
        base = families[i % FAMILIES]
        factors = {k: (a + 0.5 * a.std() * torch.randn(a.shape, generator=g),
                       b + 0.5 * b.std() * torch.randn(b.shape, generator=g)) for k, (a, b) in base.items()}
        task = f"task{i:02d}"
        adapters[task] = kf.LoRA.from_factors(factors, scaling=2.0)
        prompts = torch.randint(0, 256, (10, 24), generator=g)
        hooks.load(kf.LoRA.from_factors(base, scaling=2.0), torch.float32, "cpu")
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8,
                                 do_sample=False, pad_token_id=0)
        hooks.active = {}
        examples[task] = [(p.tolist(), o[24:].tolist()) for p, o in zip(prompts, out)]
    hooks.remove()
    return adapters, examples


class TimedScorer:
    """Wraps a scorer to count its seconds and forward passes per call."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.seconds = 0.0

    def __call__(self, merged, tasks):
        t0 = time.perf_counter()
        try:
            return self.scorer(merged, tasks)
        finally:
            self.seconds += time.perf_counter() - t0


def main(argv=None) -> None:
    args = h.parse_quick(__doc__, "N = 12, K = 3", argv)
    n, budget = (12, 3) if args.quick else (40, 5)
    model = tiny_model()
    adapters, examples = adapters_and_examples(model, n)
    scorer = kf.d2c.LossScorer(model, None, examples, batch_size=32)
    timed = TimedScorer(scorer)

    # per round: scorer seconds and forward passes, read between rounds through the history
    marks = []
    original = kf.d2c._reassign

    def reassign_and_mark(*a, **kw):
        marks.append((timed.seconds, scorer.forward_passes))
        return original(*a, **kw)

    kf.d2c._reassign = reassign_and_mark
    try:
        t0 = time.perf_counter()
        result = kf.d2c.cluster(adapters, budget, timed, init="kmeans", seed=0, max_iters=20)
        total_seconds = time.perf_counter() - t0
    finally:
        kf.d2c._reassign = original
    rows, prev = [], (0.0, 0)
    for i, (it, mark) in enumerate(zip(result.history, marks)):
        score_s, passes = mark[0] - prev[0], mark[1] - prev[1]
        prev = mark
        rows.append([i, it.merges, it.scored, passes, it.seconds, 100 * score_s / it.seconds,
                     100 * (1 - score_s / it.seconds), it.total_loss])
    km = kf.d2c.kmeans(adapters, budget, seed=0, scorer=scorer)
    rnd = kf.d2c.random_clusters(adapters, budget, seed=0, scorer=scorer)
    # which merge serves D2C best: the exact average (svd) or peft's factor-wise linear
    by_merge = {"svd": result.total_loss}
    for method in ("linear", "cat"):
        by_merge[method] = kf.d2c.cluster(adapters, budget, scorer, merge=method, init="kmeans", seed=0).total_loss
    headers = ["round", "merges", "pairs scored", "forward passes", "seconds", "% scoring", "% merging+other",
               "total loss"]
    notes = f"""
N = {n} adapters (rank 8, q/k/v/o of a config-built 4-layer Llama, hidden 128), K = {budget}, 10 examples
per task, LossScorer batch 32, `svd` merge, K-Means start. Whole run {total_seconds:.2f} s over
{len(result.history)} rounds. Total loss: D2C {result.total_loss:.4f}, K-Means {km.total_loss:.4f},
random {rnd.total_loss:.4f}. Rounds after the first re-merge and re-score only clusters whose members changed.
D2C total loss by merge method (lower is better): {", ".join(f"{k} {v:.4f}" for k, v in by_merge.items())}
(`cat` is the exact average at full rank, `svd` its rank-8 truncation, `linear` peft's factor-wise merge).
"""
    h.report("d2c-quick" if args.quick else "d2c", "D2C cost per round", headers, rows, notes, vars(args))


if __name__ == "__main__":
    main()
