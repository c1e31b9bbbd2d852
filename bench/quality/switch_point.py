"""isoswitch's switch point, replayed from quality runs that hold both an isonorm and an isogeo row.

``python -m bench.quality.switch_point RUN [RUN ...]`` (RUN: a quality.json or the folder holding it)
prints, per arm of each run, (1) the per-slot comparison: for slots of n tasks, the mean over their tasks of
(exact with isogeo's slot - exact with isonorm's slot) / exact with the task's own adapter, and (2) for each
switch point T, S of isoswitch switching at T minus the better of isonorm's and isogeo's S, per K (mean over
the run's random orders, the adversarial order left out as in the S-scores).

Why a replay is exact up to near-ties: with the default cosine routing the three modes fill the same slots
(``python_tests/test_online.py``), and a task is scored with its own slot only, so S is a sum over slots;
isoswitch's slot of n <= T tasks is isonorm's bit for bit, a larger one isogeo's served norm on the same
flat average (its last bits differ: the slot's history ran under isonorm, which can flip bfloat16 argmax
near-ties). The replay chose the switch point of 10 (README, Quality); the runs that confirm it are real.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .evaluate import run_schedule

NORM, GEO = "kmerge-isonorm", "kmerge-isogeo"


def arms(path: str | Path) -> dict[str, dict]:
    """{arm name: arm} of a quality.json (or of the folder holding one) that has both rows."""
    path = Path(path)
    data = json.loads((path / "quality.json" if path.is_dir() else path).read_text())
    return {name: a for name, a in data["arms"].items() if NORM in a["members"] and GEO in a["members"]}


def _ratio(arm: dict, row: str, k: str, order: int, task: str) -> float:
    return arm["task_exact"][row][k][order][task] / arm["single"][task]


def _scored(arm: dict, tasks) -> list[str]:
    return [t for t in tasks if arm["single"][t] > 0]   # as stats.s_point: tasks no single adapter solves drop


def per_slot(arm: dict) -> dict[int, tuple[float, int]]:
    """{n: (mean over tasks in slots of n tasks of isogeo's minus isonorm's ratio, number of slots)}, over
    every K and every order (the adversarial one included). Raises ValueError where the rows' slots differ."""
    sums, tasks, slots = defaultdict(float), defaultdict(int), defaultdict(int)
    for k, orders in arm["members"][NORM].items():
        for o, members in enumerate(orders):
            if sorted(map(sorted, members)) != sorted(map(sorted, arm["members"][GEO][k][o])):
                raise ValueError(f"K = {k}, order {o}: isonorm's and isogeo's slots differ (not cosine routing?)")
            for slot in members:
                live = _scored(arm, slot)
                sums[len(slot)] += sum(_ratio(arm, GEO, k, o, t) - _ratio(arm, NORM, k, o, t) for t in live)
                tasks[len(slot)] += len(live)
                slots[len(slot)] += 1
    return {n: (sums[n] / tasks[n] if tasks[n] else 0.0, slots[n]) for n in sorted(slots)}


def random_runs(arm: dict, row: str, k: str) -> list[int]:
    """Positions in a cell's runs list (members / task_exact) of the random orders' runs: the list is in
    the sequence the runs ran (``run_orders`` gives their order indices; runs before it was recorded
    followed evaluate.run_schedule), and the adversarial order is the index past the random ones."""
    runs = len(arm["members"][row][k])
    indices = arm.get("run_orders", {}).get(row, {}).get(k) or run_schedule(len(arm["orders"]))[:runs]
    return [pos for pos, order in enumerate(indices) if order < arm["n_random_orders"]]


def replay(arm: dict, up_to: int) -> dict[str, float]:
    """{K: S of isoswitch switching after ``up_to`` tasks}, over the arm's random orders."""
    out = {}
    for k, orders in arm["members"][NORM].items():
        s = []
        for o in random_runs(arm, NORM, k):
            ratios = [_ratio(arm, NORM if len(slot) <= up_to else GEO, k, o, t)
                      for slot in orders[o] for t in _scored(arm, slot)]
            s.append(np.mean(ratios))
        out[k] = float(np.mean(s))
    return out


def best_of_both(arm: dict) -> dict[str, float]:
    """{K: max(S isonorm, S isogeo)}, by the same replay (T = inf is isonorm, T = 0 isogeo)."""
    norm, geo = replay(arm, 10**9), replay(arm, 0)
    return {k: max(norm[k], geo[k]) for k in norm}


def margins(arm: dict, up_to: int, best: dict[str, float] | None = None) -> dict[str, float]:
    """{K: replayed S at switch point ``up_to`` minus max(S isonorm, S isogeo)}; ``best``: that max
    (:func:`best_of_both`), when the caller replays several switch points of one arm."""
    best = best or best_of_both(arm)
    return {k: s - best[k] for k, s in replay(arm, up_to).items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="quality.json files or folders holding one")
    p.add_argument("--up-to", default="1,2,3,4,5,6,7,8,9,10,11,12,14,16,20", help="switch points to replay")
    args = p.parse_args(argv)
    points = [int(x) for x in args.up_to.split(",")]
    worst, mean = defaultdict(list), defaultdict(list)
    for run in args.runs:
        for name, arm in arms(run).items():
            print(f"\n{run} ({name} A, {len(arm['tasks'])} tasks, {arm['n_random_orders']} random orders)")
            print("  n  slots  isogeo - isonorm per task")
            for n, (d, count) in per_slot(arm).items():
                print(f"{n:3d} {count:6d}  {d:+.4f}")
            ks = sorted(arm["members"][NORM], key=int)
            print("  T  " + " ".join(f"{'K=' + k:>7s}" for k in ks) + "   (replayed S - max(isonorm, isogeo))")
            best = best_of_both(arm)
            for t in points:
                m = margins(arm, t, best)
                worst[t].append(min(m.values()))
                mean[t] += list(m.values())
                print(f"{t:3d}  " + " ".join(f"{m[k]:+7.3f}" for k in ks))
    print("\n  T  margin over every run, arm and K: worst, mean")
    for t in points:
        print(f"{t:3d}  {min(worst[t]):+.4f}  {np.mean(mean[t]):+.4f}")


if __name__ == "__main__":
    main()
