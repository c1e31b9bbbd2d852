"""The ``kmerge-fast`` command line.

Subcommands:
  demo     build a few synthetic adapters on disk (peft format), then load them,
           print their similarity matrix and merge them, with timings.
  stream   add adapter folders one by one to an online merger's store (K-Merge).
  inspect  print a store's slot table.
  export   write one slot of a store as a peft adapter folder.
  cluster  D2C: cluster adapters into K merged adapters by their tasks' losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import __version__, ops
from .errors import KMergeError
from .lora import LoRA
from .merge import merge
from .online import DEFAULT_MODE, MODES, STRATEGIES, OnlineMerger
from .similarity import METRICS, similarity_matrix
from .store import MANIFEST


def _synthetic_adapters(folder: Path, n: int, layers: int, hidden: int, rank: int, seed: int) -> list[Path]:
    """Write ``n`` adapters for a Llama-like model (q/k/v/o of ``layers`` layers).

    Adapters come in two families that share a random direction per module,
    so the similarity matrix shows structure: even ones resemble each other,
    odd ones too.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden // 4, hidden),
              "v_proj": (hidden // 4, hidden), "o_proj": (hidden, hidden)}
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in shapes]
    family = [{nm: (torch.randn(rank, shapes[nm.rsplit('.', 1)[1]][1], generator=g),
                    torch.randn(shapes[nm.rsplit('.', 1)[1]][0], rank, generator=g)) for nm in names}
              for _ in range(2)]
    paths = []
    for k in range(n):
        factors = {}
        for nm in names:
            a0, b0 = family[k % 2][nm]
            factors[nm] = (a0 + 0.5 * torch.randn(a0.shape, generator=g), b0 + 0.5 * torch.randn(b0.shape, generator=g))
        path = folder / f"task_{k}"
        LoRA.from_factors(factors, scaling=2.0).save(path)
        paths.append(path)
    return paths


def _cmd_demo(args: argparse.Namespace) -> int:
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kmerge_fast_demo_"))
    print(f"kmerge_fast {__version__}; backends here: {', '.join(ops.backends())}")
    paths = _synthetic_adapters(folder, args.adapters, args.layers, args.hidden, args.rank, args.seed)
    print(f"wrote {len(paths)} synthetic adapters ({args.layers} layers x q/k/v/o, r={args.rank}) under {folder}")
    loras = [LoRA.load(p) for p in paths]

    t0 = time.perf_counter()
    sims = similarity_matrix(loras)
    t_sim = time.perf_counter() - t0
    print(f"\nmean per-module cosine similarity ({t_sim * 1e3:.1f} ms):")
    print("        " + " ".join(f"{p.name:>7}" for p in paths))
    for p, row in zip(paths, sims.tolist()):
        print(f"{p.name:>7} " + " ".join(f"{v:7.3f}" for v in row))

    t0 = time.perf_counter()
    merged = merge(loras, [1.0 / len(loras)] * len(loras), method="svd")
    t_merge = time.perf_counter() - t0
    out = folder / "merged"
    merged.save(out)
    sim_to_merged = similarity_matrix(loras, [merged])[:, 0]
    print(f"\nsvd merge of {len(loras)} adapters to rank {args.rank}: {t_merge * 1e3:.1f} ms; saved to {out}")
    print("cosine of each input with the merge: " + ", ".join(f"{v:.3f}" for v in sim_to_merged.tolist()))
    return 0


def _cmd_stream(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    store = Path(args.store)
    if (store / MANIFEST).exists():
        merger = OnlineMerger.open(store)
        if args.budget is not None and args.budget != merger.budget:
            merger.close()
            raise ValueError(f"--budget {args.budget}: the store at {store} has budget {merger.budget}")
        print(f"resuming {store}: strategy {merger.strategy}, budget {merger.budget}, "
              f"{sum(map(len, merger.members))} tasks in {len(merger.slots)} slots")
    else:
        if args.budget is None:
            raise ValueError("--budget: required to start a new store")
        merger = OnlineMerger(args.budget, strategy=args.strategy, similarity=args.similarity,
                              threshold=_threshold(args.threshold), mode=args.mode, store=store, seed=args.seed)
    with merger, tqdm(args.adapters, desc="adapters", unit="adapter", disable=args.quiet) as bar:
        for folder in bar:
            task = Path(folder).name
            t0 = time.perf_counter()
            slot = merger.add(LoRA.load(folder), task, replace=args.replace)
            ms = (time.perf_counter() - t0) * 1e3
            step = merger.history[-1]
            best = f"{max(step.similarities):.4f}" if step.similarities else "-"
            tqdm.write(f"{task}: {step.action} -> slot {slot} (best similarity {best}) {ms:.1f} ms")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .store import Store

    store = Store.open(args.store)
    try:
        s = store.manifest["settings"]
        print(f"store {store.root}: strategy {s['strategy']}, budget {s['budget']}, similarity {s['similarity']}, "
              f"mode {s['mode']}" + (f", threshold {s['threshold']}" if s["threshold"] is not None else ""))
        print(f"{'slot':>4}  {'rank':>4}  {'bytes':>12}  tasks")
        for i, slot in enumerate(store.manifest["slots"]):
            size = sum((store.slot_dir(i) / name).stat().st_size for name in slot["files"])
            print(f"{i:>4}  {slot['rank']:>4}  {size:>12,}  {', '.join(slot['tasks'])}")
    finally:
        store.close()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .store import Store

    store = Store.open(args.store)
    try:
        if not 0 <= args.slot < len(store.manifest["slots"]):
            raise ValueError(f"--slot {args.slot}: the store has {len(store.manifest['slots'])} slots")
        store.load_slot(args.slot).save(args.out)
    finally:
        store.close()
    print(f"wrote slot {args.slot} to {args.out}")
    return 0


def _read_examples(path: Path) -> dict[str, list[tuple[str, str]]]:
    """examples.jsonl: one {"task": ..., "prompt": ..., "target": ...} object per line."""
    examples: dict[str, list[tuple[str, str]]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"--examples {path}: cannot read ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task, prompt, target = row["task"], row["prompt"], row["target"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"--examples {path}:{n}: expected a JSON object with task, prompt and target") from None
        examples.setdefault(str(task), []).append((str(prompt), str(target)))
    return examples


def _cmd_cluster(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import d2c

    adapters = {Path(p).name: LoRA.load(p) for p in args.adapters}
    if len(adapters) != len(args.adapters):
        raise ValueError("ADAPTER_DIR: two adapter folders share a name (the task name is the folder name)")
    examples = _read_examples(Path(args.examples))
    unknown = sorted(set(examples) - set(adapters))
    missing = sorted(set(adapters) - set(examples))
    if unknown:
        raise ValueError(f"--examples: examples for unknown tasks {unknown[:5]} (no adapter folder of that name)")
    if missing:
        raise ValueError(f"--examples: no examples for tasks {missing[:5]}")
    if args.method == "d2c" or args.score:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.base, local_files_only=True, gguf_file=args.gguf)
        tokenizer = AutoTokenizer.from_pretrained(args.base, local_files_only=True, gguf_file=args.gguf)
        scorer = d2c.LossScorer(model, tokenizer, examples, batch_size=args.batch_size)
        calls = tqdm(desc="scoring", unit="call", disable=args.quiet)

        def counted(merged, tasks):
            calls.update(1)
            return scorer(merged, tasks)
    else:
        counted = None
    merge_kwargs = {"density": args.density} if args.density is not None else {}
    if args.method == "d2c":
        result = d2c.cluster(adapters, args.budget, counted, merge=args.merge, init=args.init, seed=args.seed,
                             max_iters=args.max_iters, merge_kwargs=merge_kwargs, progress=not args.quiet)
    else:
        baseline = d2c.kmeans if args.method == "kmeans" else d2c.random_clusters
        result = baseline(adapters, args.budget, seed=args.seed, merge=args.merge, merge_kwargs=merge_kwargs,
                          scorer=counted)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, adapter in enumerate(result.adapters):
        adapter.save(out / f"cluster_{i}")
    report = {"method": args.method, "budget": args.budget, "merge": args.merge, "assignment": result.assignment,
              "clusters": result.clusters, "total_loss": result.total_loss,
              "history": [{"assignment": h.assignment, "total_loss": h.total_loss, "seconds": h.seconds,
                           "merges": h.merges, "scored": h.scored} for h in result.history]}
    (out / "assignment.json").write_text(json.dumps(report, indent=1))
    for i, members in enumerate(result.clusters):
        print(f"cluster_{i}: {', '.join(members)}")
    if result.total_loss is not None:
        print(f"total loss {result.total_loss:.4f}")
    print(f"wrote {len(result.adapters)} adapters and assignment.json to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmerge-fast", description="Fast merging of LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"kmerge_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in example on synthetic adapters",
                          description="Write synthetic peft adapters, then load, compare and merge them.")
    demo.add_argument("--out", help="folder for the adapters (default: a new temporary folder)")
    demo.add_argument("--adapters", type=int, default=6, help="number of adapters (default 6)")
    demo.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    demo.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    demo.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    stream = sub.add_parser("stream", help="add adapters one by one to an online merger's store",
                            description="Add peft adapter folders, in order, to the K-Merge store in --store "
                                        "(created if needed, resumed otherwise). The task name is the folder name.")
    stream.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="peft adapter folders, in arrival order")
    stream.add_argument("--store", required=True, help="the store folder")
    stream.add_argument("--budget", type=int, help="K, the number of slots (required for a new store)")
    stream.add_argument("--strategy", default="kmerge", choices=STRATEGIES, help="default kmerge")
    stream.add_argument("--similarity", default="cos", choices=METRICS, help="default cos")
    stream.add_argument("--threshold", help="kmerge++'s similarity threshold: a number, or "
                        "'auto' (default: mean over modules of rank / n_in)")
    stream.add_argument("--mode", choices=MODES, help=f"merge mode of the running-average strategies "
                        f"(default {DEFAULT_MODE}; 'faithful' reproduces the published K-Merge)")
    stream.add_argument("--seed", type=int, help="seed of the random and DARE strategies")
    stream.add_argument("--replace", action="store_true", help="let a stored task's adapter replace it")
    stream.add_argument("--quiet", action="store_true", help="no progress bar")
    stream.set_defaults(func=_cmd_stream)

    inspect = sub.add_parser("inspect", help="print a store's slots", description="Print the slot table of a store.")
    inspect.add_argument("--store", required=True, help="the store folder")
    inspect.set_defaults(func=_cmd_inspect)

    export = sub.add_parser("export", help="write one slot as a peft adapter",
                            description="Write slot --slot of the store as a peft adapter folder OUT.")
    export.add_argument("--store", required=True, help="the store folder")
    export.add_argument("--slot", type=int, required=True, help="slot index")
    export.add_argument("out", metavar="OUT", help="the adapter folder to write")
    export.set_defaults(func=_cmd_export)

    cluster = sub.add_parser("cluster", help="cluster adapters into K merged adapters (D2C)",
                             description="Cluster task adapters into --budget merged adapters. d2c reassigns "
                                         "tasks by their examples' loss under each cluster's merge (needs --base); "
                                         "kmeans and random are the baselines. The task name is the folder name.")
    cluster.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="peft adapter folders, one per task")
    cluster.add_argument("--budget", type=int, required=True, help="K, the number of merged adapters")
    cluster.add_argument("--examples", required=True,
                         help="JSONL file of {task, prompt, target} objects (about 10 per task)")
    cluster.add_argument("--base", help="the base model folder (transformers format, or with --gguf)")
    cluster.add_argument("--gguf", help="a GGUF file name inside --base")
    cluster.add_argument("--method", default="d2c", choices=("d2c", "kmeans", "random"), help="default d2c")
    cluster.add_argument("--merge", default="svd", help="merge method of each cluster (default svd)")
    cluster.add_argument("--density", type=float, help="density for ties / dare / magnitude_prune merges")
    cluster.add_argument("--init", default="kmeans", choices=("kmeans", "random"), help="d2c's start (default kmeans)")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--max-iters", type=int, default=20)
    cluster.add_argument("--batch-size", type=int, default=16)
    cluster.add_argument("--score", action="store_true", help="also score the kmeans / random result (needs --base)")
    cluster.add_argument("--out", required=True, help="folder for cluster_<i>/ adapters and assignment.json")
    cluster.add_argument("--quiet", action="store_true", help="no progress bars")
    cluster.set_defaults(func=_cmd_cluster)
    return parser


def _threshold(text: str | None):
    """--threshold: None, 'auto' or a number."""
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--threshold: expected a number or 'auto', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "method", None) == "d2c" or getattr(args, "score", False):
        if args.base is None:
            parser.error("--base: the d2c method (and --score) need the base model")
    try:
        return args.func(args)
    except (KMergeError, ValueError, TypeError, KeyError, OSError) as e:
        print(f"kmerge-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
