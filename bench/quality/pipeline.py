"""The stages end to end: tasks -> adapters (+ single scores) -> online mergers and D2C -> report."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import kmerge_fast as kf

from . import model as base
from . import stats
from .workers import THREADS as WORKER_THREADS
from .evaluate import DEFAULT_ROWS, ONLINE, STRATEGIES, arrival_orders, comparisons, run_d2c, run_online
from .scoring import Scorer, generation_f1, mean
from .report import default_row, write_report
from .tasks import TYPES, dataset, split, task_name
from .train import Recipe, train_lora


@dataclass
class Config:
    types: list = field(default_factory=lambda: list(TYPES[:5]))
    langs: list = field(default_factory=lambda: ["en", "de", "fr", "es"])
    calib_langs: list = field(default_factory=lambda: ["it"])   # held-out adapters for K-Merge++'s threshold
    n_train: int = 256
    n_val: int = 32          # held-out examples per task: the training plateau check
    n_test: int = 32
    recipe: Recipe = field(default_factory=Recipe)
    budgets: list = field(default_factory=lambda: list(range(1, 9)))
    orders: int = 5          # random arrival orders; the adversarial one is added (``adversarial``)
    order_seed: int = 0      # seeds the random orders (evaluate.arrival_orders); another seed: unscreened orders
    adversarial: bool = True
    strategies: list = field(default_factory=lambda: list(DEFAULT_ROWS))   # tiny_config: every row
    secondary: list = field(default_factory=list)   # rows run on the first ``secondary_orders`` orders only
    secondary_orders: int | None = None
    d2c_budgets: list = field(default_factory=lambda: [3, 5, 8])
    d2c_examples: int = 10
    d2c_seeds: int = 2              # seeds per D2C / K-Means / random cell (one seed ~11 min on 2 cores)
    d2c_refine: int = 3             # D2C's move sweeps (kmerge_fast.d2c.cluster(refine=...))
    crosscheck: int = 8      # test examples per task decoded greedily for the F1 cross-check (0: off)
    bootstrap: int = 1000
    batch_size: int = 64
    workers: int = 1         # scoring processes: 1 scores in the main process at its torch thread count (how
                             # quality.json was scored); N >= 2 in N one-thread workers (bench.quality.workers)
    dtype: str = "bfloat16"  # the base model's dtype for training and scoring
    device: str = "cpu"      # where the base model trains and scores ("cuda": a GPU); merging stays on the CPU
    tiny: bool = False
    reductions: list = field(default_factory=list)   # what this run cut from the protocol, for quality.md
    deadline: float | None = None   # time.time() after which eval starts no new (strategy, K) cell
    base_id: str = ""     # fingerprint of the base model's weights (set by load_model): adapters belong to one base

    @property
    def tasks(self) -> list[str]:
        return [task_name(k, l) for k in self.types for l in self.langs]

    @property
    def calib_tasks(self) -> list[str]:
        return [task_name(k, l) for k in self.types for l in self.calib_langs if l not in self.langs]

    def key(self) -> str:
        """Identifies a set of adapters: data sizes, the recipe (initialisation arm included), the base."""
        fields = {"n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test,
                  "recipe": self.recipe.to_dict(), "tiny": self.tiny, "dtype": self.dtype, "base": self.base_id}
        if self.device != "cpu":   # other kernels train other adapters; the CPU's keys predate the field
            fields["device"] = self.device
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


def tiny_config() -> Config:
    return Config(types=["reply", "extract"], langs=["en", "de"], calib_langs=["fr"], n_train=128, n_val=16,
                  n_test=16, recipe=Recipe(rank=8, alpha=16, max_steps=300, min_steps=300, check_every=300,
                                           batch_size=16, lr=1e-2, autocast=False),
                  budgets=[1, 2, 3], orders=2, d2c_budgets=[2], d2c_examples=10, d2c_seeds=1, crosscheck=4,
                  bootstrap=200, batch_size=64, dtype="float32", tiny=True, strategies=list(STRATEGIES))


# ------------------------------------------------------------------ data and model
def data(cfg: Config):
    """(train, val, test): task -> examples, for the stream's tasks and the held-out calibration tasks."""
    train, val, test = {}, {}, {}
    for t in cfg.tasks + cfg.calib_tasks:
        kind, lang = split(t)
        train[t], val[t], test[t] = dataset(kind, lang, cfg.n_train, cfg.n_test, n_val=cfg.n_val)
    return train, val, test


def _base_id(model) -> str:
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def load_model(cfg: Config, train, test, log=print):
    """The real prepared model (in ``cfg.dtype``, on ``cfg.device``), or (tiny) a config-built Llama
    pre-trained from scratch (on the CPU, then moved).

    Sets ``cfg.base_id`` (from the float32 weights, before any cast).
    """
    model, tok, name = _load_model(cfg, train, test, log)
    cfg.base_id = _base_id(model)
    model.to(getattr(torch, cfg.dtype))
    model.to(cfg.device)
    return model, tok, name


def _load_model(cfg: Config, train, test, log=print):
    if not cfg.tiny:
        model, tok = base.load_real()
        return model, tok, base.MODEL_NAME
    words = {w for split_ in (train, test) for ex in split_.values() for e in ex
             for w in (e.prompt + " " + e.target).split()}
    tok = base.tiny_tokenizer(sorted(words))
    model = base.tiny_model(len(tok))
    # language-model pre-training on prompts and answers as separate texts: the base knows every word,
    # but never saw an answer follow its prompt (that is what the adapters learn)
    start = time.perf_counter()
    texts = [e.prompt for ex in train.values() for e in ex] + [e.target for ex in train.values() for e in ex]
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        batch = rng.sample(texts, 32)
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    log(f"tiny base: {sum(p.numel() for p in model.parameters())} params, vocab {len(tok)}, "
        f"pre-trained on prompts and answers in {time.perf_counter() - start:.1f}s (loss {float(loss):.2f})")
    return model, tok, "tiny Llama (config-built, 2 layers, hidden 64, word-level tokenizer)"


#: torch threads of the committed CPU results (``--threads``' default)
DEFAULT_THREADS = 2


def scoring_threads(cfg: Config) -> int:
    """torch threads of each scoring pass: one per worker with ``cfg.workers`` > 1, else the process's."""
    return WORKER_THREADS if cfg.workers > 1 else torch.get_num_threads()


def score_cache(folder: Path, cfg: Config) -> Path:
    """The score cache file in an adapter folder: ``scores.json`` for scores computed at the default thread
    count (or on a GPU), ``scores-<n>threads.json`` for another CPU thread count per pass. CPU scores depend
    on it (bfloat16 reductions split per thread: 1 vs 2 threads move the log-likelihood by ~0.005 nats/token
    on average), while the cache is keyed by adapter content and task, so each count keeps its own file
    (a run with workers and a ``--threads 1`` run share one)."""
    threads = scoring_threads(cfg)
    if cfg.device == "cuda" or threads == DEFAULT_THREADS:
        return folder / "scores.json"
    return folder / f"scores-{threads}threads.json"


# ------------------------------------------------------------------ stage: train
def adapters_dir(cfg: Config, root: Path | None = None) -> Path:
    return (root or base.cache_dir() / "adapters") / cfg.key()


def train_stage(cfg: Config, model, tok, train, val, test, root: Path | None = None, log=print) -> dict:
    """Train (or resume) every adapter of the stream and of the calibration set; returns the manifest.

    The manifest (``<adapters>/manifest.json``) is rewritten after every adapter, so an
    interrupted run continues with the next one.
    """
    folder = adapters_dir(cfg, root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.update({"recipe": cfg.recipe.to_dict(), "base_id": cfg.base_id})
    manifest.setdefault("train", {})
    tasks = cfg.tasks + cfg.calib_tasks
    held = Scorer(model, tok, {t: val[t] for t in tasks}, cfg.batch_size)
    try:
        for i, t in enumerate(tasks):
            if t in manifest["train"] and (folder / t / "adapter_model.safetensors").exists():
                continue
            held.hooks.active = {}
            lora, stats = train_lora(model, tok, train[t], cfg.recipe, t, stream_seed=i,
                                     held_out=lambda: mean(held.run(t)["exact"]))
            lora.save(folder / t)
            manifest["train"][t] = stats
            log(f"  trained {t:12s} {stats['steps']:3d} steps in {stats['seconds']:6.1f}s "
                f"({stats['seconds_per_step']:.2f} s/step) loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f} "
                f"held-out exact {stats['held_out']:.3f}  A moved {stats['a_moved']:.2f}")
            _write_json(path, manifest)    # resumable after every adapter
    finally:
        held.close()
    return manifest


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def machine() -> dict:
    """Where the run happened (for the report): CPU, its SIMD, cores, torch and the commit."""
    from ..harness import cpu_isa, cpu_model, git_commit

    return {"cpu": cpu_model(), "isa": cpu_isa(), "cores": os.cpu_count(), "torch": torch.__version__,
            "commit": git_commit()}


# ------------------------------------------------------------------ stage: eval
def _exact(scores: dict, tasks: list[str]) -> np.ndarray:
    return np.array([scores[t]["exact"] for t in tasks], dtype=float)


def summarize(cells: dict, tasks: list[str], single: np.ndarray, n_random: int, boot: int,
              compare: list[tuple[str, list[str]]] = ()) -> dict:
    """Per (row, K): S with its 95% interval over the random orders, S on the adversarial order (if run),
    mean exact and log-likelihood, slots used; and paired differences S(row) - S(peer) for each
    ``(row, [peers])`` of ``compare``, on the orders both rows ran."""
    out: dict = {}
    arrays: dict = {}
    for label, by_k in cells.items():
        for k, runs in by_k.items():
            rnd = [r for r in runs if r["order"] < n_random]
            adv = [r for r in runs if r["order"] >= n_random]
            row = out.setdefault(label, {})
            cell = {"orders": len(rnd), "slots": [len(r["members"]) for r in runs]}
            if rnd:
                m = np.stack([_exact(r["scores"], tasks) for r in rnd])
                arrays[label, k] = m
                cell["s"] = stats.s_interval(m, single, boot)
                cell["exact"] = float(m.mean())
                cell["ll"] = float(np.mean([[np.mean(r["scores"][t]["ll"]) for t in tasks] for r in rnd]))
            if adv:
                cell["s_adversarial"] = stats.s_interval(_exact(adv[0]["scores"], tasks)[None], single, boot)
            row[k] = cell
    diffs: dict = {}
    for row, peers in compare:
        for peer in peers:
            for k in out.get(row, {}):
                if (row, k) in arrays and (peer, k) in arrays:
                    n = min(len(arrays[row, k]), len(arrays[peer, k]))
                    diffs.setdefault(row, {}).setdefault(peer, {})[k] = stats.difference_interval(
                        arrays[row, k][:n], arrays[peer, k][:n], single, boot)
    return {"cells": out, "differences": diffs}


#: the Config fields of the D2C part of an arm (kept or replaced together with it)
D2C_SETTINGS = ("d2c_budgets", "d2c_seeds", "d2c_examples", "d2c_refine")
#: the reduction line of a run given a deadline (``build_config``); dropped when no cell was cut
DEADLINE_REDUCTION = "online cells started before a deadline only"


def eval_stage(cfg: Config, model, tok, model_name: str, train, val, test, out_dir: Path,
               root: Path | None = None, log=print) -> dict:
    """Score the base, every single adapter, every row at every K and order, and D2C; write the report."""
    from kmerge_fast.online import width_threshold

    folder = adapters_dir(cfg, root)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    missing = [t for t in cfg.tasks + cfg.calib_tasks if t not in manifest.get("train", {})]
    if missing:
        raise SystemExit(f"{folder}: no adapters for {missing[:5]}: run `python -m bench.quality train` "
                         "(same flags) first")
    start = time.perf_counter()
    tasks = cfg.tasks
    adapters = {t: kf.LoRA.load(folder / t) for t in tasks}
    calib = [kf.LoRA.load(folder / t) for t in cfg.calib_tasks]
    rule = width_threshold(next(iter(adapters.values())))
    threshold = kf.calibrate_threshold(calib) if len(calib) >= 2 else "auto"
    scorer = Scorer(model, tok, {t: test[t] for t in tasks}, cfg.batch_size, cfg.workers)
    scorer.persist(score_cache(folder, cfg))
    try:
        base_scores = scorer.score(None, tasks)
        single_scores = {t: scorer.score(adapters[t], [t])[t] for t in tasks}
        single = _exact(single_scores, tasks)
        log(f"base exact {_exact(base_scores, tasks).mean():.3f}  single exact {single.mean():.3f}  "
            f"threshold {threshold if isinstance(threshold, str) else f'{threshold:.4f}'} (rule r/n_in {rule:.4f})")
        orders = arrival_orders(tasks, cfg.orders, seed=cfg.order_seed, adversarial=cfg.adversarial)
        budgets = [k for k in cfg.budgets if k <= len(tasks)]
        online = run_online(scorer, adapters, budgets, orders, cfg.strategies, threshold, cfg.deadline, log=log,
                            secondary=tuple(cfg.secondary), secondary_orders=cfg.secondary_orders)
        d2c = None
        budgets_d2c = [k for k in cfg.d2c_budgets if k <= len(tasks)]
        if budgets_d2c:
            examples = {t: train[t][:cfg.d2c_examples] for t in tasks}
            d2c = run_d2c(scorer, model, tok, adapters, examples, budgets_d2c, cfg.d2c_seeds, cfg.d2c_refine, log=log)
        check = crosscheck(cfg, model, tok, scorer, adapters, test, online["cells"], budgets, log)
    finally:
        scorer.close()
    if not online["skipped"]:  # a deadline that cut nothing is no reduction
        cfg.reductions = [x for x in cfg.reductions if not x.startswith(DEADLINE_REDUCTION)]
    summary = summarize(online["cells"], tasks, single, cfg.orders, cfg.bootstrap, comparisons(online["cells"]))
    results = {
        "model": model_name,
        "arm": cfg.recipe.init,
        "tasks": tasks,
        "calib_tasks": cfg.calib_tasks,
        "n_adapters": len(adapters),
        "orders": orders,
        "n_random_orders": cfg.orders,
        "order_seed": cfg.order_seed,
        "summary": summary,
        # members / task_exact list a cell's runs in the sequence they ran (evaluate.run_schedule:
        # order 0, the adversarial one, 1, 2, ...); run_orders gives each run's index into "orders"
        "run_orders": {label: {k: [r["order"] for r in runs] for k, runs in by_k.items()}
                       for label, by_k in online["cells"].items()},
        "members": {label: {k: [r["members"] for r in runs] for k, runs in by_k.items()}
                    for label, by_k in online["cells"].items()},
        "task_exact": {label: {k: [{t: float(np.mean(r["scores"][t]["exact"])) for t in tasks} for r in runs]
                               for k, runs in by_k.items()} for label, by_k in online["cells"].items()},
        "single": {t: float(np.mean(single_scores[t]["exact"])) for t in tasks},
        "single_interval": stats.mean_interval(single, cfg.bootstrap),
        "single_ll": float(np.mean([np.mean(single_scores[t]["ll"]) for t in tasks])),
        "base": {t: float(np.mean(base_scores[t]["exact"])) for t in tasks},
        "base_interval": stats.mean_interval(_exact(base_scores, tasks), cfg.bootstrap),
        "base_ll": float(np.mean([np.mean(base_scores[t]["ll"]) for t in tasks])),
        "d2c": _summarize_d2c(d2c, tasks, single, cfg.bootstrap) if d2c else None,
        "kmerge++_threshold": threshold,
        "threshold_rule": rule,
        "crosscheck": check,
        "skipped": online["skipped"],
        "config": cfg.to_dict(),
        "train": manifest.get("train", {}),
        "eval": {"scored_task_passes": scorer.passes, "scoring_seconds": scorer.seconds,
                 "seconds": time.perf_counter() - start},
        "threads": torch.get_num_threads(),
        "scoring": {"workers": cfg.workers, "threads_per_pass": scoring_threads(cfg)},
        "machine": machine(),
    }
    if d2c is None:  # no D2C budgets this time: keep the arm's D2C part from an earlier eval or `d2c` run
        earlier = _stored_arm(out_dir, cfg.recipe.init)
        if earlier and earlier.get("d2c") and earlier.get("tasks") == tasks:
            results["d2c"], results["d2c_run"] = earlier["d2c"], earlier.get("d2c_run")
            for name in D2C_SETTINGS:
                results["config"][name] = earlier["config"].get(name)
    write_report(results, out_dir)
    log(f"wrote {out_dir}/quality.json (arm {cfg.recipe.init}), quality.md, quality.png")
    return results


def _stored_arm(out_dir: Path, arm: str) -> dict | None:
    """Arm ``arm`` of ``out_dir/quality.json`` as it is on disk now (None if absent)."""
    path = Path(out_dir) / "quality.json"
    return json.loads(path.read_text()).get("arms", {}).get(arm) if path.exists() else None


def d2c_stage(cfg: Config, model, tok, train, test, out_dir: Path, root: Path | None = None, log=print) -> dict:
    """Re-run only D2C vs K-Means vs random and replace that part of the arm in ``out_dir/quality.json``.

    For a change of the clustering alone: the arm's online rows, singles and base stay as the last
    ``eval`` wrote them; the arm records when and with which code its D2C part ran (``d2c_run``).
    """
    import datetime as dt

    path = Path(out_dir) / "quality.json"
    arm = _stored_arm(out_dir, cfg.recipe.init)
    if arm is None or arm.get("tasks") != cfg.tasks:
        raise SystemExit(f"{path}: no {cfg.recipe.init} arm with these tasks: run `eval` (same flags) first")
    budgets_d2c = [k for k in cfg.d2c_budgets if k <= len(cfg.tasks)]
    if not budgets_d2c:
        raise SystemExit("d2c: no --d2c-budgets within the number of tasks")
    folder = adapters_dir(cfg, root)
    adapters = {t: kf.LoRA.load(folder / t) for t in cfg.tasks}
    start = time.perf_counter()
    scorer = Scorer(model, tok, {t: test[t] for t in cfg.tasks}, cfg.batch_size, cfg.workers)
    scorer.persist(score_cache(folder, cfg))
    try:
        single = _exact({t: scorer.score(adapters[t], [t])[t] for t in cfg.tasks}, cfg.tasks)
        examples = {t: train[t][:cfg.d2c_examples] for t in cfg.tasks}
        d2c = run_d2c(scorer, model, tok, adapters, examples, budgets_d2c, cfg.d2c_seeds, cfg.d2c_refine, log=log)
    finally:
        scorer.close()
    arm = _stored_arm(out_dir, cfg.recipe.init) or arm  # as it is now: an eval may have rewritten it meanwhile
    arm["d2c"] = _summarize_d2c(d2c, cfg.tasks, single, cfg.bootstrap)
    for name in D2C_SETTINGS:
        arm["config"][name] = getattr(cfg, name)
    arm["d2c_run"] = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "seconds": time.perf_counter() - start, "machine": machine()}
    write_report(arm, out_dir)
    log(f"wrote the D2C part of {path} (arm {cfg.recipe.init}), quality.md, quality.png")
    return arm


def _summarize_d2c(d2c: dict, tasks, single, boot) -> dict:
    out = {"examples_per_task": d2c["examples_per_task"], "s": {}, "clusters": {}, "fit_seconds": {}}
    for name, by_k in d2c["cells"].items():
        for k, runs in by_k.items():
            m = np.stack([_exact(r["scores"], tasks) for r in runs])
            out["s"].setdefault(name, {})[k] = stats.s_interval(m, single, boot)
            out["clusters"].setdefault(name, {})[k] = [r["members"] for r in runs]
            out["fit_seconds"].setdefault(name, {})[k] = float(np.mean([r["fit_seconds"] for r in runs]))
    arrays = {(n, k): np.stack([_exact(r["scores"], tasks) for r in runs])
              for n, by_k in d2c["cells"].items() for k, runs in by_k.items()}
    out["d2c_minus_kmeans"] = {k: stats.difference_interval(arrays["d2c", k], arrays["kmeans", k], single, boot)
                               for n, k in arrays if n == "d2c" and ("kmeans", k) in arrays}
    return out


def crosscheck(cfg: Config, model, tok, scorer, adapters, test, cells, budgets, log=print) -> dict | None:
    """Greedy decoding on ``cfg.crosscheck`` test examples per task: token F1 and exact match, and how often
    the decoded exact match agrees with the teacher-forced one (base, singles, one merged cell per mode)."""
    n = cfg.crosscheck
    if not n:
        return None
    tasks = cfg.tasks
    sub = {t: test[t][:n] for t in tasks}
    cases = [("base", None, [tasks])] + [("single", [adapters[t]], [[t]]) for t in tasks]
    k = str(budgets[len(budgets) // 2])
    for label in ("kmerge", default_row(), "kmerge-exact", "kmerge-rms"):   # those that ran
        runs = cells.get(label, {}).get(k, [])
        if runs:
            members = runs[0]["members"]
            cases.append((f"{label} K={k}", _rebuild(label, adapters, members, int(k), runs[0]), members))
    agree = total = 0
    f1s: dict = {}
    start = time.perf_counter()
    for name, loras, groups in cases:
        for i, group in enumerate(groups):
            lora = loras[i] if loras else None
            tf = scorer.score(lora, group)
            for t in group:
                g = generation_f1(model, tok, lora, sub[t])
                f1s.setdefault(name.split(" ")[0], []).extend(g["f1"])
                agree += sum(int(a == b) for a, b in zip(g["exact"], tf[t]["exact"][:n]))
                total += n
    out = {"examples_per_task": n, "agreement": agree / total, "compared": total,
           "f1": {k: float(np.mean(v)) for k, v in f1s.items()}, "seconds": time.perf_counter() - start}
    log(f"cross-check: decoded exact match agrees with teacher-forced on {agree}/{total} examples")
    return out


def _rebuild(label: str, adapters, members, k: int, run) -> list:
    """The slots of one online cell again (the merges are deterministic)."""
    kwargs = dict(ONLINE[label])
    merger = kf.OnlineMerger(budget=k, seed=run["order"], **kwargs)
    for task in run["arrival"]:
        merger.add(adapters[task], task=task)
    assert [list(m) for m in merger.members] == members
    return merger.slots
