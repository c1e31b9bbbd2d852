"""Scoring with a (merged) adapter applied, the online mergers over arrival orders, and D2C.

Adapters are applied to the base model in place through the forward hooks of
``kmerge_fast.scoring._Hooks`` (the ones ``kf.d2c.LossScorer`` uses): no peft
model is re-created and the base weights are never touched. Decoding is greedy
and batched with left padding. Scores are cached by (adapter content, task), so
a slot holding a single adapter costs nothing after the single-adapter pass.
"""

from __future__ import annotations

import hashlib
import random
import time

import torch

import kmerge_fast as kf
from kmerge_fast.scoring import _Hooks

from .tasks import Example, f1, split
from .train import encode

#: every OnlineMerger strategy evaluated: label -> constructor kwargs (threshold filled in later)
STRATEGIES = {
    "kmerge": {"strategy": "kmerge"},
    "kmerge++": {"strategy": "kmerge++"},
    "kmerge-exact": {"strategy": "kmerge", "mode": "exact"},
    "linear": {"strategy": "linear"},
    "ties": {"strategy": "ties"},
    "dare_linear": {"strategy": "dare_linear"},
    "dare_ties": {"strategy": "dare_ties"},
    "opcm": {"strategy": "opcm"},
    "random": {"strategy": "random"},
    "oracle": {"strategy": "oracle"},
}


def fingerprint(lora: kf.LoRA) -> str:
    h = hashlib.sha1()
    for name in sorted(lora.modules):
        m = lora.modules[name]
        h.update(name.encode())
        h.update(m.A.detach().contiguous().float().numpy().tobytes())
        h.update(m.B.detach().contiguous().float().numpy().tobytes())
        h.update(repr(float(m.scaling)).encode())
    return h.hexdigest()


class Evaluator:
    """``score(lora | None, tasks) -> {task: mean F1}`` on each task's test examples."""

    def __init__(self, model, tok, tests: dict[str, list[Example]], batch_size: int = 16):
        self.model = model.eval()
        self.tok = tok
        self.batch_size = batch_size
        self.tests = tests
        self.prompts = {t: [encode(tok, e.prompt)[0] for e in ex] for t, ex in tests.items()}
        self.max_new = {t: max(len(encode(tok, "", e.target)[1]) for e in ex) + 1 for t, ex in tests.items()}
        self.hooks = _Hooks(model)
        self.cache: dict[tuple[str, str], float] = {}
        self.passes = 0          # task evaluations actually decoded
        self.seconds = 0.0
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.cache_path = None

    def persist(self, path) -> None:
        """Keep the scores in ``path`` (JSON) across runs: a rerun with more orders decodes only what is new."""
        import json
        from pathlib import Path

        self.cache_path = Path(path)
        if self.cache_path.exists():
            for k, v in json.loads(self.cache_path.read_text()).items():
                self.cache[tuple(k.split("|", 1))] = v

    def _save(self) -> None:
        import json

        if self.cache_path is not None:
            tmp = self.cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({f"{a}|{b}": v for (a, b), v in self.cache.items()}))
            tmp.replace(self.cache_path)

    def score(self, lora: kf.LoRA | None, tasks) -> dict[str, float]:
        key = fingerprint(lora) if lora is not None else "base"
        todo = [t for t in tasks if (key, t) not in self.cache]
        if todo:
            param = next(self.model.parameters())
            if lora is not None:
                self.hooks.load(lora, param.dtype, param.device)
            try:
                for t in todo:
                    self.cache[key, t] = self._task(t)
                self._save()
            finally:
                self.hooks.active = {}
        return {t: self.cache[key, t] for t in tasks}

    def _task(self, task: str) -> float:
        start = time.perf_counter()
        prompts, examples = self.prompts[task], self.tests[task]
        scores = []
        with torch.inference_mode():
            for s in range(0, len(prompts), self.batch_size):
                batch = prompts[s:s + self.batch_size]
                width = max(map(len, batch))
                ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, p in enumerate(batch):    # left padding
                    ids[i, width - len(p):] = torch.tensor(p)
                    mask[i, width - len(p):] = 1
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new[task],
                                          do_sample=False, pad_token_id=self.pad, eos_token_id=self.tok.eos_token_id)
                for i, row in enumerate(out[:, width:]):
                    text = self.tok.decode(row, skip_special_tokens=True)
                    scores.append(f1(text, examples[s + i].target))
        self.passes += 1
        self.seconds += time.perf_counter() - start
        return sum(scores) / len(scores)

    def close(self) -> None:
        self.hooks.remove()


def s_score(scores: dict[str, float], single: dict[str, float]) -> float:
    """Mean over tasks of score / single-adapter score (tasks whose single score is 0 are left out)."""
    ratios = [scores[t] / single[t] for t in scores if single[t] > 0]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def arrival_orders(tasks: list[str], n: int, seed: int = 0) -> list[list[str]]:
    out = []
    for i in range(n):
        order = list(tasks)
        random.Random(f"order-{seed}-{i}").shuffle(order)
        out.append(order)
    return out


def run_online(ev: Evaluator, adapters: dict[str, kf.LoRA], single: dict[str, float], budgets: list[int],
               orders: list[list[str]], strategies: list[str], deadline: float | None = None, log=print) -> dict:
    """S-score and mean score per strategy and budget, averaged over the arrival orders each cell reached.

    Orders outermost, then budgets, then strategies: a run cut short by ``deadline`` (a
    ``time.time()`` value) has every (strategy, K) cell on the first order before any cell
    gets a second one; ``orders_done`` says how many orders each cell averages.
    """
    threshold = kf.calibrate_threshold(list(adapters.values()))
    cells: dict[tuple[str, int], dict[str, list]] = {
        (label, k): {"s": [], "score": [], "members": []} for k in budgets for label in strategies}
    skipped = []
    for i, order in enumerate(orders):
        for k in budgets:
            for label in strategies:
                if deadline is not None and time.time() > deadline:
                    skipped.append(f"{label} K={k} order {i}")
                    continue
                kwargs = dict(STRATEGIES[label])
                if kwargs["strategy"] == "kmerge++":
                    kwargs["threshold"] = threshold
                if kwargs["strategy"] == "oracle":
                    kwargs["oracle"] = lambda task: split(task)[0]       # by task type
                start = time.perf_counter()
                merger = kf.OnlineMerger(budget=k, seed=i, **kwargs)
                for task in order:
                    merger.add(adapters[task], task=task)
                merge_s = time.perf_counter() - start
                scores = {}
                for slot, tasks in enumerate(merger.members):
                    scores.update(ev.score(merger.slots[slot], tasks))
                cell = cells[label, k]
                cell["s"].append(s_score(scores, single))
                cell["score"].append(sum(scores.values()) / len(scores))
                cell["members"].append([list(m) for m in merger.members])
                log(f"  {label:12s} K={k} order {i}: S={cell['s'][-1]:.3f} mean={cell['score'][-1]:.3f} "
                    f"slots={len(merger.slots)} merge {merge_s:.1f}s total {time.perf_counter() - start:.1f}s")
    if skipped:
        log(f"deadline reached: skipped {skipped}")
    out = {"s_score": {}, "score": {}, "members": {}, "orders_done": {}}
    for label in strategies:
        for key in out:
            out[key][label] = {}
        for k in budgets:
            cell = cells[label, k]
            if cell["s"]:
                out["s_score"][label][str(k)] = sum(cell["s"]) / len(cell["s"])
                out["score"][label][str(k)] = sum(cell["score"]) / len(cell["score"])
                out["members"][label][str(k)] = cell["members"]
                out["orders_done"][label][str(k)] = len(cell["s"])
    return {**out, "threshold": threshold, "skipped": skipped}


def run_d2c(ev: Evaluator, model, tok, adapters: dict[str, kf.LoRA], single: dict[str, float],
            examples: dict[str, list[Example]], budget: int, seed: int = 0, log=print) -> dict:
    """D2C (LossScorer on train examples) vs K-Means vs random at ``budget``: S-score of each."""
    from kmerge_fast import d2c

    # token ids, tokenised as in training (prompt, target + EOS)
    scorer = d2c.LossScorer(model, tok, {t: [encode(tok, e.prompt, e.target) for e in ex]
                                         for t, ex in examples.items()})
    out = {"budget": budget, "examples_per_task": len(next(iter(examples.values())))}
    try:
        for name, fn in (("d2c", lambda: d2c.cluster(adapters, budget, scorer, seed=seed)),
                         ("kmeans", lambda: d2c.kmeans(adapters, budget, seed=seed)),
                         ("random", lambda: d2c.random_clusters(adapters, budget, seed=seed))):
            start = time.perf_counter()
            result = fn()
            fit_s = time.perf_counter() - start
            scores = {}
            for adapter, tasks in zip(result.adapters, result.clusters):
                scores.update(ev.score(adapter, tasks))
            out[name] = s_score(scores, single)
            out[f"{name}_score"] = sum(scores.values()) / len(scores)
            out[f"{name}_clusters"] = result.clusters
            log(f"  {name:7s} K={budget}: S={out[name]:.3f} mean={out[f'{name}_score']:.3f} fit {fit_s:.1f}s "
                f"clusters={result.clusters}")
    finally:
        scorer.close()
    return out
