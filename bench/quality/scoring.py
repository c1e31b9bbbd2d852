"""Teacher-forced exact-match scoring of a (merged) adapter, one batched forward pass per task.

An example is *exactly right* when, given the correct prefix, every target
token and the end-of-turn token are the model's argmax: precisely the
condition under which greedy decoding reproduces the target and stops, so the
score equals greedy exact match at the cost of one forward pass instead of one
per generated token. The mean target log-likelihood (nats per target token)
is kept beside it.

Cost savers (both exact): every prompt of a task shares the chat template's
system turn and the task's instruction, so that common token prefix runs once
per batch (batch 1) and its key / value cache serves the whole batch; the LM
head runs only on the positions that predict a target token.

Adapters are applied through the forward hooks of ``kmerge_fast.scoring._Hooks``
(as ``kf.d2c.LossScorer`` does): the base weights are never touched. Results
are cached by (adapter content, task) and can be persisted to a JSON file, so
a rerun or a resumed run scores only what is new. With ``workers`` > 1 the
passes run in worker processes of one thread each (:mod:`bench.quality.workers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import kmerge_fast as kf
from kmerge_fast.scoring import _Hooks

from .tasks import Example, f1
from .train import encode
from .workers import ScoringPool


def fingerprint(lora: kf.LoRA) -> str:
    """SHA-1 of an adapter's module names, factors and scalings (the cache key)."""
    h = hashlib.sha1()
    for name in sorted(lora.modules):
        m = lora.modules[name]
        h.update(name.encode())
        h.update(m.A.detach().contiguous().float().numpy().tobytes())
        h.update(m.B.detach().contiguous().float().numpy().tobytes())
        h.update(repr(float(m.scaling)).encode())
    return h.hexdigest()


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _cache_key(entry: str) -> tuple[str, str]:
    """(adapter fingerprint, task) of a ``"<adapter>|<task>"`` key of the JSON cache."""
    a, b = entry.split("|", 1)
    return a, b


class Scorer:
    """``score(lora | None, tasks) -> {task: {"exact": [0/1 per example], "ll": [nats per token]}}``.

    Args:
        model: a causal LM (Llama-like: ``model.model`` the decoder, ``model.lm_head``), eval mode.
        tok: its tokenizer (prompts through :func:`bench.quality.train.encode`).
        tests: task -> examples.
        batch_size: sequences per forward pass.
        workers: 1 scores in this process at its torch thread count; N >= 2 starts N worker processes of
            one thread each (:mod:`bench.quality.workers`; CPU only), whose scores equal this process's
            at one thread. :meth:`close` stops them. The workers are spawned, which re-imports the
            script that started them: a script building a Scorer with workers keeps its top level under
            ``if __name__ == "__main__":`` (as ``python -m bench.quality`` does).
    """

    def __init__(self, model, tok, tests: dict[str, list[Example]], batch_size: int = 64, workers: int = 1):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: must be an int >= 1, got {workers!r}")
        self.model = model.eval()
        self.tok = tok
        self.tests = tests
        self.batch_size = batch_size
        self.pairs = {t: [encode(tok, e.prompt, e.target) for e in ex] for t, ex in tests.items()}
        # at least one prompt token stays in every suffix: it predicts the first target token
        self.prefix = {t: max(0, min(_common_prefix([p for p, _ in pairs]), min(len(p) for p, _ in pairs) - 1))
                       for t, pairs in self.pairs.items()}
        self.hooks = _Hooks(model)
        self.cache: dict[tuple[str, str], dict] = {}
        self.passes = 0          # (adapter, task) evaluations actually run
        self.seconds = 0.0
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.cache_path: Path | None = None
        self._unsaved = 0
        self.pool = ScoringPool(model, self.pairs, self.prefix, self.pad, batch_size, workers) if workers > 1 else None

    # ------------------------------------------------------------------ cache on disk
    def persist(self, path) -> None:
        """Keep the results in ``path`` (JSON) across runs; loads what is there."""
        self.cache_path = Path(path)
        if self.cache_path.exists():
            for k, v in json.loads(self.cache_path.read_text()).items():
                self.cache[_cache_key(k)] = v

    def save(self) -> None:
        """Write the cache, keeping entries another run (an eval beside a ``d2c``) saved meanwhile."""
        if self.cache_path is not None and self._unsaved:
            entries = {f"{a}|{b}": v for (a, b), v in self.cache.items()}
            try:
                on_disk = json.loads(self.cache_path.read_text())
            except (OSError, ValueError):
                on_disk = {}
            for k, v in on_disk.items():
                if k not in entries:
                    entries[k] = v
                    self.cache[_cache_key(k)] = v
            tmp = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.tmp")  # one per process
            tmp.write_text(json.dumps(entries))
            tmp.replace(self.cache_path)
            self._unsaved = 0

    # ------------------------------------------------------------------ scoring
    def score(self, lora: kf.LoRA | None, tasks) -> dict[str, dict]:
        """Each task's scores with ``lora`` applied (None: the base), from the cache where it has them."""
        return self.score_many([(lora, tasks)])[0]

    def score_many(self, requests) -> list[dict[str, dict]]:
        """:meth:`score` for each (lora | None, tasks) of ``requests`` (e.g. the slots of one merge); with
        workers, every pass the cache lacks is handed out at once, so the workers share them."""
        keyed = [(fingerprint(lora) if lora is not None else "base", lora, list(tasks)) for lora, tasks in requests]
        unknown = sorted({t for _, _, tasks in keyed for t in tasks} - set(self.pairs))
        if unknown:
            raise ValueError(f"tasks: no test examples for {unknown[:5]}")
        todo: dict[tuple[str, str], kf.LoRA | None] = {}
        for key, lora, tasks in keyed:
            for t in tasks:
                if (key, t) not in self.cache:
                    todo.setdefault((key, t), lora)
        if todo:
            if self.pool is None:
                self._score_here(todo)
            else:
                self._score_in_workers(todo)
            if self._unsaved >= 50:
                self.save()
        return [{t: self.cache[key, t] for t in tasks} for key, _, tasks in keyed]

    def _score_here(self, todo: dict) -> None:
        param = next(self.model.parameters())
        for key in dict.fromkeys(k for k, _ in todo):
            tasks = [t for k, t in todo if k == key]
            lora = todo[key, tasks[0]]
            if lora is not None:
                self.hooks.load(lora, param.dtype, param.device)
            try:
                for t in tasks:
                    self.cache[key, t] = self.run(t)
                    self._unsaved += 1
            finally:
                self.hooks.active = {}

    def _score_in_workers(self, todo: dict) -> None:
        param = next(self.model.parameters())
        checked = set()
        for (key, _), lora in todo.items():     # refuse a mismatched adapter here, naming its module
            if lora is not None and key not in checked:
                checked.add(key)
                self.hooks.load(lora, param.dtype, param.device)
                self.hooks.active = {}
        start = time.perf_counter()
        results = self.pool.run([(key, lora, t) for (key, t), lora in todo.items()])
        self.seconds += time.perf_counter() - start
        self.passes += len(results)
        self.cache.update(results)
        self._unsaved += len(results)

    def run(self, task: str) -> dict:
        """Score ``task`` with the model as it is now (hooks or a peft wrapper included); no cache."""
        start = time.perf_counter()
        out = teacher_forced(self.model, self.pairs[task], self.prefix[task], self.pad, self.batch_size)
        self.passes += 1
        self.seconds += time.perf_counter() - start
        return out

    def close(self) -> None:
        self.save()
        self.hooks.remove()
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def teacher_forced(model, pairs: list[tuple[list[int], list[int]]], n_pre: int, pad: int, batch_size: int) -> dict:
    """One task's teacher-forced scores with ``model`` as it is (hooks included).

    ``pairs``: (prompt ids, target ids) per example, the target ending with the end-of-turn token;
    ``n_pre``: how many leading tokens every prompt shares (run once per batch, its key / value cache
    repeated over the batch). Returns {"exact": [0/1 per example], "ll": [mean target log-prob, nats]}.
    """
    exact, ll = [], []
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for s in range(0, len(pairs), batch_size):
            batch = pairs[s:s + batch_size]
            past = None
            if n_pre:
                past = model.model(input_ids=torch.tensor([batch[0][0][:n_pre]], device=dev),
                                   use_cache=True).past_key_values
                past.batch_repeat_interleave(len(batch))
            suffix = [p[n_pre:] + y for p, y in batch]
            width = max(map(len, suffix))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros(len(batch), n_pre + width, dtype=torch.long)
            mask[:, :n_pre] = 1
            rows, cols, targets = [], [], []
            for i, ((p, y), seq) in enumerate(zip(batch, suffix)):
                ids[i, :len(seq)] = torch.tensor(seq)
                mask[i, n_pre:n_pre + len(seq)] = 1
                first = len(p) - n_pre - 1            # the position predicting the first target token
                rows += [i] * len(y)
                cols += range(first, first + len(y))
                targets += y
            hidden = model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                 past_key_values=past, use_cache=past is not None).last_hidden_state
            logits = model.lm_head(hidden[rows, cols]).float()
            target = torch.tensor(targets, device=dev)
            right = (logits.argmax(-1) == target).cpu()
            logp = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0].cpu()
            at = 0
            for _, y in batch:
                exact.append(int(bool(right[at:at + len(y)].all())))
                ll.append(float(logp[at:at + len(y)].mean()))
                at += len(y)
    return {"exact": exact, "ll": ll}


def generation_f1(model, tok, lora: kf.LoRA | None, examples: list[Example], batch_size: int = 16) -> dict:
    """Greedy decoding cross-check: per example the token F1 of the first output line and exact match."""
    hooks = _Hooks(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    param = next(model.parameters())
    if lora is not None:
        hooks.load(lora, param.dtype, param.device)
    out_f1, out_exact = [], []
    try:
        with torch.inference_mode():
            for s in range(0, len(examples), batch_size):
                batch = examples[s:s + batch_size]
                prompts = [encode(tok, e.prompt)[0] for e in batch]
                max_new = max(len(encode(tok, "", e.target)[1]) for e in batch) + 1
                width = max(map(len, prompts))
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, p in enumerate(prompts):    # left padding for generation
                    ids[i, width - len(p):] = torch.tensor(p)
                    mask[i, width - len(p):] = 1
                gen = model.generate(input_ids=ids.to(param.device), attention_mask=mask.to(param.device),
                                     max_new_tokens=max_new, do_sample=False, pad_token_id=pad,
                                     eos_token_id=tok.eos_token_id)
                for i, row in enumerate(gen[:, width:].cpu()):
                    text = tok.decode(row, skip_special_tokens=True)
                    out_f1.append(f1(text, batch[i].target))
                    out_exact.append(int(text.strip() == batch[i].target.strip()))
    finally:
        hooks.remove()
    return {"f1": out_f1, "exact": out_exact}


def mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
