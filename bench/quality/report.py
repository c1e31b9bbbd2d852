"""quality.json, quality.md (tables) and quality.png (S-score vs K, one line per strategy)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _clean(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _orders_text(r: dict) -> str:
    done = sorted({n for row in r.get("orders_done", {}).values() for n in row.values()})
    planned = len(r["orders"])
    if not done or done == [planned]:
        return f"{planned} arrival order(s)"
    return (f"the arrival orders each cell reached before the deadline ({' to '.join(map(str, [done[0], done[-1]]))} "
            f"of {planned} planned; per cell in quality.json `orders_done`)")


def markdown(r: dict) -> str:
    cfg = r["config"]
    budgets = sorted({int(k) for v in r["s_score"].values() for k in v})
    lines = [f"# Quality benchmark: S-score of the online mergers and D2C", "",
             f"Model: {r['model']}. {r['n_adapters']} adapters ({len(cfg['types'])} task types x "
             f"{len(cfg['langs'])} languages: {', '.join(cfg['types'])} / {', '.join(cfg['langs'])}), "
             f"LoRA r={cfg['recipe']['rank']} alpha={cfg['recipe']['alpha']} on "
             f"{'/'.join(t.split('_')[0] for t in cfg['recipe']['targets'])}, {cfg['recipe']['steps']} steps x "
             f"batch {cfg['recipe']['batch_size']}, lr {cfg['recipe']['lr']}, the same seed for every adapter. "
             f"{cfg['n_test']} test examples per task, greedy decoding, token F1 (exact match for one-token answers). "
             f"S-score = mean over tasks of (score with its slot / its single-adapter score), "
             f"averaged over {_orders_text(r)}.", ""]
    if r.get("machine"):
        m = r["machine"]
        lines += [f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, torch {m['torch']}; "
                  f"kmerge_fast @ {m['commit']}.", ""]
    if cfg.get("reductions"):
        lines += ["**Reduced run** (not the full protocol of issue 7):", ""]
        lines += [f"- {x}" for x in cfg["reductions"]] + [""]
    lines += ["## S-score by budget K", "", "| strategy | " + " | ".join(f"K={k}" for k in budgets) + " |",
              "|---|" + "---:|" * len(budgets)]
    for label, row in r["s_score"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(str(k))) for k in budgets) + " |")
    if r.get("skipped"):
        lines += ["", f"Not reached before the deadline: {', '.join(r['skipped'])}."]
    lines += ["", f"kmerge++ threshold (median pairwise cosine): {r['kmerge++_threshold']:.4f}", ""]
    if r.get("d2c"):
        d = r["d2c"]
        lines += [f"## Offline clustering at K = {d['budget']} ({d['examples_per_task']} train examples per task "
                  "for D2C's LossScorer; clusters merged with `svd`)", "",
                  "| method | S-score | mean score | clusters |", "|---|---:|---:|---|"]
        for m in ("d2c", "kmeans", "random"):
            lines.append(f"| {m} | {_fmt(d[m])} | {_fmt(d[m + '_score'])} | "
                         + " ; ".join(",".join(c) for c in d[m + "_clusters"]) + " |")
        lines.append("")
    lines += ["## Per task: base (zero-shot) and single-adapter score", "", "| task | base | single |", "|---|---:|---:|"]
    for t in r["tasks"]:
        lines.append(f"| {t} | {_fmt(r['base'][t])} | {_fmt(r['single'][t])} |")
    mean = lambda d: sum(d.values()) / len(d)
    lines += [f"| **mean** | {_fmt(mean(r['base']))} | {_fmt(mean(r['single']))} |", ""]
    train_s = r.get("train_seconds") or {}
    if train_s:
        lines.append(f"Training: {mean(train_s):.1f} s per adapter on average ({r['threads']} CPU threads). ")
    lines.append(f"Evaluation: {r['eval']['decoded_task_passes']} task passes decoded in "
                 f"{r['eval']['decode_seconds']:.0f} s, {r['eval']['seconds']:.0f} s in all (cached by adapter "
                 "content: a slot holding one adapter reuses its single score).")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, row in r["s_score"].items():
        ks = sorted(int(k) for k in row)
        ax.plot(ks, [row[str(k)] for k in ks], marker="o", label=label)
    ax.set_xlabel("budget K (slots)")
    ax.set_ylabel("S-score")
    ax.set_title(f"{r['model'].split(' (')[0]}: {r['n_adapters']} adapters, {_orders_text(r)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(r: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    (out_dir / "quality.json").write_text(json.dumps(_clean(r), indent=1, ensure_ascii=False) + "\n")
    (out_dir / "quality.md").write_text(markdown(r))
    plot(r, out_dir / "quality.png")
