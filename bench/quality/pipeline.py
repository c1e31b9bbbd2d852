"""The stages end to end: tasks -> adapters (+ single scores) -> online mergers and D2C -> report."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import kmerge_fast as kf

from . import model as base
from .evaluate import STRATEGIES, Evaluator, arrival_orders, run_d2c, run_online
from .report import write_report
from .tasks import LANGS, TYPES, dataset, task_name
from .train import Recipe, train_lora


@dataclass
class Config:
    types: list = field(default_factory=lambda: list(TYPES))
    langs: list = field(default_factory=lambda: list(LANGS))
    n_train: int = 256
    n_test: int = 32
    recipe: Recipe = field(default_factory=Recipe)
    budgets: list = field(default_factory=lambda: [1, 2, 4, 6, 8])
    orders: int = 3
    strategies: list = field(default_factory=lambda: list(STRATEGIES))
    d2c_budget: int = 5
    d2c_examples: int = 10
    batch_size: int = 16
    tiny: bool = False
    reductions: list = field(default_factory=list)   # what this run cut from the full protocol, for quality.md
    deadline: float | None = None   # time.time() after which eval starts no new (strategy, K) cell
    base_id: str = ""     # fingerprint of the base model's weights (set by load_model): adapters belong to one base

    @property
    def tasks(self) -> list[str]:
        return [task_name(k, l) for k in self.types for l in self.langs]

    def key(self) -> str:
        """Identifies a set of adapters: tasks, data sizes and the recipe."""
        blob = json.dumps({"tasks": self.tasks, "n_train": self.n_train, "n_test": self.n_test,
                           "recipe": self.recipe.to_dict(), "tiny": self.tiny,
                           "base": self.base_id}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


def tiny_config() -> Config:
    return Config(types=["reply", "extract"], langs=["en", "de"], n_train=128, n_test=16,
                  recipe=Recipe(rank=8, alpha=16, steps=300, batch_size=16, lr=1e-2),
                  budgets=[1, 2, 3], orders=3, d2c_budget=2, d2c_examples=10, batch_size=16, tiny=True)


# ------------------------------------------------------------------ data and model
def data(cfg: Config):
    train, test = {}, {}
    for kind in cfg.types:
        for lang in cfg.langs:
            t = task_name(kind, lang)
            train[t], test[t] = dataset(kind, lang, cfg.n_train, cfg.n_test)
    return train, test


def _base_id(model) -> str:
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def load_model(cfg: Config, train, test, log=print):
    """The real prepared model, or (tiny) a config-built Llama pre-trained from scratch; sets ``cfg.base_id``."""
    model, tok, name = _load_model(cfg, train, test, log)
    cfg.base_id = _base_id(model)
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


# ------------------------------------------------------------------ stage: train
def adapters_dir(cfg: Config, root: Path | None = None) -> Path:
    return (root or base.cache_dir() / "adapters") / cfg.key()


def train_stage(cfg: Config, model, tok, train, test, root: Path | None = None, log=print) -> dict:
    """Train (or resume) every adapter, then score each alone and the base; returns the manifest."""
    folder = adapters_dir(cfg, root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.update({"config": cfg.to_dict(), "tasks": cfg.tasks})
    manifest.setdefault("adapters", {})
    manifest.setdefault("train", {})
    for i, t in enumerate(cfg.tasks):
        if t in manifest["adapters"] and (folder / t / "adapter_model.safetensors").exists():
            continue
        lora, stats = train_lora(model, tok, train[t], cfg.recipe, stream_seed=i)
        lora.save(folder / t)
        manifest["adapters"][t] = t
        manifest["train"][t] = stats
        log(f"  trained {t:12s} in {stats['seconds']:6.1f}s loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f}")
        path.write_text(json.dumps(manifest, indent=1))    # resumable after every adapter
    if "single" not in manifest or set(manifest["single"]) != set(cfg.tasks):
        ev = Evaluator(model, tok, test, cfg.batch_size)
        try:
            start = time.perf_counter()
            manifest["base"] = ev.score(None, cfg.tasks)
            manifest["single"] = {t: ev.score(kf.LoRA.load(folder / t), [t])[t] for t in cfg.tasks}
            manifest["eval_seconds_per_task"] = (time.perf_counter() - start) / (2 * len(cfg.tasks))
        finally:
            ev.close()
        path.write_text(json.dumps(manifest, indent=1))
    log(f"adapters: {folder}  single mean {_mean(manifest['single']):.3f}  base mean {_mean(manifest['base']):.3f}")
    return manifest


def machine() -> dict:
    """Where the run happened (for the report): CPU, its SIMD, cores, torch and the commit."""
    from ..harness import cpu_isa, cpu_model, git_commit

    return {"cpu": cpu_model(), "isa": cpu_isa(), "cores": os.cpu_count(), "torch": torch.__version__,
            "commit": git_commit()}


def _mean(d: dict) -> float:
    return sum(d.values()) / len(d)


# ------------------------------------------------------------------ stage: eval
def eval_stage(cfg: Config, model, tok, model_name: str, train, test, out_dir: Path, root: Path | None = None,
               log=print) -> dict:
    folder = adapters_dir(cfg, root)
    path = folder / "manifest.json"
    if not path.exists():
        raise SystemExit(f"no adapters at {folder}: run `python -m bench.quality train` (same flags) first")
    manifest = json.loads(path.read_text())
    if "single" not in manifest:
        raise SystemExit(f"{path}: adapters incomplete; rerun `python -m bench.quality train`")
    adapters = {t: kf.LoRA.load(folder / t) for t in cfg.tasks}
    single = manifest["single"]
    ev = Evaluator(model, tok, test, cfg.batch_size)
    ev.persist(folder / "scores.json")       # test scores by (adapter content, task), reused across runs
    from .evaluate import fingerprint

    for t, lora in adapters.items():      # single scores are known: never decode them again
        ev.cache[fingerprint(lora), t] = single[t]
    for t, v in manifest["base"].items():
        ev.cache["base", t] = v
    start = time.perf_counter()
    try:
        orders = arrival_orders(cfg.tasks, cfg.orders)
        budgets = [k for k in cfg.budgets if k <= len(cfg.tasks)]
        online = run_online(ev, adapters, single, budgets, orders, cfg.strategies, cfg.deadline, log=log)
        d2c = None
        if cfg.d2c_budget and cfg.d2c_budget <= len(cfg.tasks):
            if cfg.deadline is not None and time.time() > cfg.deadline:
                online["skipped"].append(f"D2C / K-Means / random K={cfg.d2c_budget}")
                log("deadline reached: D2C skipped")
            else:
                examples = {t: train[t][:cfg.d2c_examples] for t in cfg.tasks}
                d2c = run_d2c(ev, model, tok, adapters, single, examples, cfg.d2c_budget, log=log)
    finally:
        ev.close()
    results = {
        "model": model_name,
        "tasks": cfg.tasks,
        "n_adapters": len(adapters),
        "orders": orders,
        "single": single,
        "s_score": online["s_score"],
        "d2c": d2c,
        # extras
        "base": manifest["base"],
        "score": online["score"],
        "members": online["members"],
        "orders_done": online["orders_done"],
        "kmerge++_threshold": online["threshold"],
        "skipped": online["skipped"],
        "config": cfg.to_dict(),
        "train_seconds": {t: s["seconds"] for t, s in manifest.get("train", {}).items()},
        "eval": {"decoded_task_passes": ev.passes, "decode_seconds": ev.seconds,
                 "seconds": time.perf_counter() - start},
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(results, out_dir)
    log(f"wrote {out_dir}/quality.json, quality.md" + (", quality.png" if (out_dir / "quality.png").exists() else ""))
    return results

