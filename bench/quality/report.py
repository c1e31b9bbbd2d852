"""quality.json (one entry per initialisation arm), quality.md (tables with 95% intervals) and
quality.png (S-score vs K with interval bands, one panel per arm)."""

from __future__ import annotations

import json
import math
from pathlib import Path

ARMS = ("independent", "shared")
ARM_TEXT = {"independent": "independent LoRA-A initialisation (as users and the published code train)",
            "shared": "one shared LoRA-A initialisation for every adapter"}
#: rows drawn in the plot (the rest are in the tables)
PLOTTED = ("kmerge", "kmerge-exact", "kmerge-iso", "kmerge-isonorm", "kmerge-isogeo", "kmerge-isoswitch", "kmerge-rms",
           "ties", "opcm", "task_arithmetic", "avg_unbounded")


def default_row() -> str:
    """The benchmark row of the package's default online mode (kmerge_fast.online.DEFAULT_MODE)."""
    from kmerge_fast.online import DEFAULT_MODE

    return "kmerge" if DEFAULT_MODE == "faithful" else f"kmerge-{DEFAULT_MODE}"


def _arm_order(arms: dict) -> list[str]:
    return sorted(arms, key=lambda a: ARMS.index(a) if a in ARMS else len(ARMS))


def _clean(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _ci(v) -> str:
    if not v or v[0] is None:
        return "-"
    return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"


def _budgets(r: dict) -> list[str]:
    return sorted({k for row in r["summary"]["cells"].values() for k in row}, key=int)


def _arm_markdown(r: dict) -> list[str]:
    cfg, rec = r["config"], r["config"]["recipe"]
    budgets = _budgets(r)
    cells = r["summary"]["cells"]
    default = default_row()
    n_orders = max((c["orders"] for row in cells.values() for c in row.values()), default=0)
    tr = r.get("train", {})
    steps = [v["steps"] for t, v in tr.items() if t in r["tasks"]]
    lines = [f"## Arm: {r['arm']} ({ARM_TEXT.get(r['arm'], '')})", ""]
    if cfg.get("reductions"):
        lines += ["Reductions against the default configuration:", ""] + [f"- {x}" for x in cfg["reductions"]] + [""]
    lines += [
             f"{r['n_adapters']} adapters ({len(cfg['types'])} task types x {len(cfg['langs'])} languages: "
             f"{', '.join(cfg['types'])} / {', '.join(cfg['langs'])}); LoRA r={rec['rank']} alpha={rec['alpha']} on "
             f"{'/'.join(t.split('_')[0] for t in rec['targets'])}, batch {rec['batch_size']}, lr {rec['lr']}, "
             f"trained until the held-out exact match plateaued ({min(steps, default=0)}-{max(steps, default=0)} "
             f"steps). {cfg['n_test']} test examples per task, up to {n_orders} random arrival orders (per cell in "
             "quality.json `summary.cells.<row>.<K>.orders`)"
             + (" + the adversarial order" if cfg.get("adversarial") else "") + ".", "",
             f"Zero-shot base (chat template): exact {_ci(r['base_interval'])}, log-lik {r['base_ll']:.2f} nats/token. "
             f"Single adapters: exact {_ci(r['single_interval'])}, log-lik {r['single_ll']:.2f}.", "",
             "### S-score by budget K (95% bootstrap interval over test examples and random orders)", "",
             "| row | " + " | ".join(f"K={k}" for k in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for label, row in cells.items():
        mark = " (breaks the budget)" if label == "avg_unbounded" else (" (default)" if label == default else "")
        lines.append(f"| {label}{mark} | " + " | ".join(_ci(row.get(k, {}).get("s")) for k in budgets) + " |")
    adv = {label: row for label, row in cells.items() if any("s_adversarial" in c for c in row.values())}
    if adv:
        lines += ["", "### S-score on the adversarial order (all languages of one type, then the next; "
                  "interval over test examples)", "",
                  "| row | " + " | ".join(f"K={k}" for k in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for label, row in adv.items():
            lines.append(f"| {label} | " + " | ".join(_ci(row.get(k, {}).get("s_adversarial")) for k in budgets) + " |")
    for cand, peers in (r["summary"].get("differences") or {}).items():
        lines += ["", f"### {cand} minus each peer (paired bootstrap over the orders both ran, 95% interval; "
                  "above 0: the candidate is better)", "",
                  "| peer | " + " | ".join(f"K={k}" for k in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for peer, row in peers.items():
            lines.append(f"| {peer} | " + " | ".join(_ci(row.get(k)) for k in budgets) + " |")
    pp = {label: row for label, row in cells.items() if label.startswith("kmerge++")}
    if pp:
        thr, rule = r["kmerge++_threshold"], r["threshold_rule"]
        source = (f"the width rule r / n_in, {rule:.4f} (no held-out adapters)" if isinstance(thr, str) else
                  f"{thr:.4f}, the median pairwise cosine of the held-out adapters "
                  f"{', '.join(r.get('calib_tasks') or [])}; the width rule r / n_in gives {rule:.4f}")
        lines += ["", f"K-Merge++ threshold: {source}. Slots in use after the stream (mean over orders):", "",
                  "| row | " + " | ".join(f"K={k}" for k in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for label, row in pp.items():
            lines.append(f"| {label} | " + " | ".join(
                f"{sum(row[k]['slots']) / len(row[k]['slots']):.1f}" if k in row else "-" for k in budgets) + " |")
    if r.get("d2c"):
        d = r["d2c"]
        ks = sorted({k for v in d["s"].values() for k in v}, key=int)
        when = (f"; this part re-run {r['d2c_run']['date']} in {r['d2c_run']['seconds'] / 60:.0f} min"
                if r.get("d2c_run") else "")
        seeds = r["config"].get("d2c_seeds")
        refine = r["config"].get("d2c_refine")
        when = (f"; D2C with up to {refine} move sweeps (`d2c-alternation`: the same fit before them)"
                if refine else "") + when
        lines += ["", f"### Offline clustering ({d['examples_per_task']} train examples per task for D2C's loss; "
                  f"clusters merged with `svd`; {seeds} seeds; interval over test examples and seeds{when})", "",
                  "| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for m, row in d["s"].items():
            lines.append(f"| {m} | " + " | ".join(_ci(row.get(k)) for k in ks) + " |")
        lines.append("| d2c minus kmeans (paired) | " + " | ".join(_ci(d["d2c_minus_kmeans"].get(k)) for k in ks) + " |")
    if r.get("crosscheck"):
        c = r["crosscheck"]
        lines += ["", f"Cross-check by greedy decoding ({c['examples_per_task']} test examples per task; base, "
                  f"singles, one merged cell per mode): decoded exact match equals the teacher-forced one on "
                  f"{c['agreement'] * c['compared']:.0f}/{c['compared']} examples ({100 * c['agreement']:.1f}%); "
                  "token F1 " + ", ".join(f"{k} {v:.3f}" for k, v in c["f1"].items()) + "."]
    lines += ["", "### Adapters", "", "| task | base | single | steps | s/step | final loss | held-out | A moved |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in r["tasks"] + (r.get("calib_tasks") or []):
        s = tr.get(t, {})
        lines.append(f"| {t}{' (held out)' if t not in r['tasks'] else ''} | "
                     f"{r['base'].get(t, float('nan')):.3f} | {r['single'].get(t, float('nan')):.3f} | "
                     f"{s.get('steps', '-')} | {s.get('seconds_per_step', float('nan')):.2f} | "
                     f"{s.get('last_loss', float('nan')):.4f} | {s.get('held_out') or float('nan'):.3f} | "
                     f"{s.get('a_moved', float('nan')):.2f} |")
    train_s = sum(v["seconds"] for v in tr.values())
    lines += ["", f"Training {train_s / 60:.1f} min for {len(tr)} adapters; evaluation "
              f"{r['eval']['seconds'] / 60:.1f} min ({r['eval']['scored_task_passes']} (adapter, task) passes scored, "
              f"{r['eval']['scoring_seconds'] / 60:.1f} min of it in scoring) on {r['threads']} threads"
              + _workers(r) + "."]
    if r.get("skipped"):
        lines += ["", f"Not reached before the deadline: {len(r['skipped'])} cells ({', '.join(r['skipped'][:8])}...)."]
    return lines


def _workers(r: dict) -> str:
    """How the passes were scored, where the arm ran them in worker processes (arms before the option: none)."""
    scoring = r.get("scoring") or {}
    if scoring.get("workers", 1) <= 1:
        return ""
    return f", the passes in {scoring['workers']} worker processes of {scoring['threads_per_pass']} thread each"


def markdown(arms: dict) -> str:
    first = next(iter(arms.values()))
    lines = ["# Quality benchmark: S-score of the online mergers and D2C", "",
             f"Model: {first['model']}. Score: exact match of the whole answer (teacher-forced argmax of every "
             "target token and the end of turn, which equals greedy exact match), prompts through the chat template. "
             "S-score = mean over tasks of (exact match with the task's slot / with its own adapter).", ""]
    m = first.get("machine")
    if m:
        lines += [f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, torch {m['torch']}; "
                  f"kmerge_fast @ {m['commit']}.", ""]
    for arm in _arm_order(arms):
        lines += _arm_markdown(arms[arm]) + [""]
    return "\n".join(lines)


def plot(arms: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = _arm_order(arms)
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    for ax, arm in zip(axes[0], names):
        cells = arms[arm]["summary"]["cells"]
        for label in PLOTTED:
            row = cells.get(label)
            if not row:
                continue
            ks = [k for k in sorted(row, key=int) if row[k].get("s")]
            x = [int(k) for k in ks]
            line, = ax.plot(x, [row[k]["s"][0] for k in ks], marker="o", ms=3, label=label,
                            ls="--" if label == "avg_unbounded" else "-")
            ax.fill_between(x, [row[k]["s"][1] for k in ks], [row[k]["s"][2] for k in ks], alpha=0.15,
                            color=line.get_color())
        ax.set_xlabel("budget K (slots)")
        ax.set_ylabel("S-score (95% interval)")
        ax.set_title(f"{arms[arm]['model'].split(' (')[0]}, {arm} A init, {arms[arm]['n_adapters']} adapters",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(r: dict | None, out_dir: Path) -> dict:
    """Put arm ``r`` (None: only re-render) into ``out_dir/quality.json`` and render quality.md / .png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "quality.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    arms = data.get("arms", {})       # a file of the older single-run layout has none: replaced
    if r is not None:
        arms[r["arm"]] = _clean(r)
    path.write_text(json.dumps({"arms": arms}, indent=1, ensure_ascii=False) + "\n")
    (out_dir / "quality.md").write_text(markdown(arms))
    plot(arms, out_dir / "quality.png")
    return arms
