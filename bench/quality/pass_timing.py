"""``python -m bench.quality.pass_timing [--tasks N] [--workers W]``: seconds per scoring pass, in-process vs workers.

Scores one trained adapter of the default configuration on its first N tasks three ways: in this process at
``--threads`` (default 2), in W one-thread workers (``Scorer(workers=W)``), and in this process at one thread;
prints the seconds per pass of the first two, their ratio, and whether the workers' scores equal the one-thread
ones and the in-process ones bit for bit. Needs ``python -m bench.quality prepare`` and ``train`` first.
"""

from __future__ import annotations

import argparse
import time

import torch

import kmerge_fast as kf

from .pipeline import DEFAULT_THREADS, Config, adapters_dir, data, load_model
from .scoring import Scorer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quality.pass_timing", description=__doc__)
    p.add_argument("--tasks", type=int, default=10, help="passes timed each way (tasks of the first adapter)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (>= 2)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="this process's torch threads")
    args = p.parse_args(argv)
    if args.workers < 2:
        raise SystemExit(f"--workers: must be >= 2, got {args.workers}")
    torch.set_num_threads(args.threads)
    cfg = Config()
    train, val, test = data(cfg)
    model, tok, _ = load_model(cfg, train, test, log=lambda *a: None)
    folder = adapters_dir(cfg)
    if not (folder / cfg.tasks[0]).exists():
        raise SystemExit(f"{folder}: no trained adapters: run `python -m bench.quality train` first")
    tasks = cfg.tasks[:args.tasks]
    lora, warm = kf.LoRA.load(folder / cfg.tasks[0]), kf.LoRA.load(folder / cfg.tasks[1])
    tests = {t: test[t] for t in tasks}
    scorers = [Scorer(model, tok, tests, cfg.batch_size), Scorer(model, tok, tests, cfg.batch_size, args.workers)]
    try:
        scorers[1].score(warm, tasks[:args.workers])      # the workers' start-up is not timed
        seconds, scores = [], []
        for s in scorers:
            start = time.perf_counter()
            scores.append(s.score(lora, tasks))
            seconds.append((time.perf_counter() - start) / len(tasks))
        torch.set_num_threads(1)
        scorers.append(Scorer(model, tok, tests, cfg.batch_size))
        one = scorers[2].score(lora, tasks)
    finally:
        for s in scorers:
            s.close()
    print(f"{args.threads} threads in-process: {seconds[0]:.3f} s/pass; {args.workers} one-thread workers: "
          f"{seconds[1]:.3f} s/pass; ratio {seconds[0] / seconds[1]:.2f}x ({len(tasks)} passes each)")
    print(f"workers' scores equal one thread's: {scores[1] == one}; equal {args.threads} threads': "
          f"{sum(scores[1][t] == scores[0][t] for t in tasks)} of {len(tasks)} tasks")


if __name__ == "__main__":
    main()
