"""The ``kmerge-fast`` command line.

Subcommands:
  demo     build a few synthetic adapters on disk (peft format), then load them,
           print their similarity matrix and merge them, with timings.
  stream   add adapter folders one by one to an online merger's store (K-Merge);
           ``--emit gguf --base BASE`` / ``--emit mlx`` also write every slot as llama.cpp's
           GGUF / MLX-LM's folder, in the same commit.
  inspect  print a store's slot table and each slot's files.
  export   write one slot of a store as a peft adapter folder (or ``--format gguf|mlx``).
  cluster  D2C: cluster adapters into K merged adapters by their tasks' losses.

Errors are one line, ``kmerge-fast: error: ...``, exit status 2; they name
flags, not the library's arguments (:func:`cli_message`). ``stream`` checks
everything before its first commit, refuses settings that differ from an
existing store's, and on Ctrl-C says how far it got (exit status 130).
``inspect`` and ``export`` are readers (no lock, nothing written in the store).
Only ``--help`` and ``inspect`` must stay free of torch: numeric modules are
imported inside the commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

# Only light imports here: `kmerge-fast --help` and `inspect` must not pay for torch
# (about 1 s); each command imports the numeric modules it needs.
from . import __version__
from .errors import KMergeError
from .formats import FORMATS
from .methods import METHODS

# The flags' choices, copied from kmerge_fast.online and kmerge_fast.similarity (which import
# torch) so that building the parser does not; test_cli checks that the copies match.
STRATEGIES = ("kmerge", "kmerge++", "linear", "ties", "dare_linear", "dare_ties", "random", "oracle", "opcm")
MODES = ("faithful", "exact", "iso", "isonorm", "isogeo", "isoswitch", "rms", "sum")
DEFAULT_MODE = "isoswitch"
METRICS = ("cos", "l2", "l1", "linf")
GGUF_DTYPES = ("f32", "f16", "bf16")  # kmerge_fast.store.GGUF_DTYPES
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def _synthetic_adapters(folder: Path, n: int, layers: int, hidden: int, rank: int, seed: int) -> list[Path]:
    """Write ``n`` adapters for a Llama-like model (q/k/v/o of ``layers`` layers).

    Adapters come in two families that share a random direction per module,
    so the similarity matrix shows structure: even ones resemble each other,
    odd ones too.
    """
    import torch

    from .lora import LoRA

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
    from . import ops
    from .lora import LoRA
    from .merge import merge
    from .similarity import similarity_matrix

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


class _Progress:
    """How far ``stream`` got: adds committed by this run, out of those it planned."""

    def __init__(self, planned: int):
        self.done = 0
        self.planned = planned


def _cmd_stream(args: argparse.Namespace) -> int:
    progress = _Progress(len(args.adapters))
    try:
        return _stream(args, progress)
    except KeyboardInterrupt:
        # Every add commits atomically before it returns, so the store holds a prefix of the
        # stream: say how far it got and stop, without a traceback.
        print(f"kmerge-fast: interrupted after {progress.done} of {progress.planned} adds; "
              f"{_store_summary(Path(args.store))}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _stream(args: argparse.Namespace, progress: _Progress) -> int:
    """``stream``: everything is checked before the first commit, then the adapters are added in order.

    Checked first: the task names (folder names) are distinct; on an existing
    store, the settings given on the command line equal the store's and the
    tasks already stored are skipped (``--skip-existing``), replaced
    (``--replace``, a task alone in its slot) or refused; every adapter to add
    loads and has the same modules and shapes as the others (and the store's
    slots); ``--groups`` names a group for each of them. A new store is
    created only after all of that.
    """
    from tqdm import tqdm

    from .lora import LoRA
    from .online import OnlineMerger
    from .store import MANIFEST, check_slot_formats, format_settings, store_formats

    store = Path(args.store)
    tasks = _task_names(args.adapters)
    groups = _read_groups(Path(args.groups)) if args.groups is not None else None
    oracle = groups.__getitem__ if groups is not None else None
    given = {"budget": args.budget, "strategy": args.strategy, "similarity": args.similarity,
             "threshold": _threshold(args.threshold), "mode": args.mode, "seed": args.seed, "density": args.density}
    given = {key: value for key, value in given.items() if value is not None}
    emitted = {"formats": ["peft", *(f for f in FORMATS if f in (args.emit or ()))] if args.emit else None,
               "base": os.path.abspath(args.base) if args.base is not None else None, "gguf_dtype": args.dtype}
    emitted = {key: value for key, value in emitted.items() if value is not None}
    merger = None
    try:
        if (store / MANIFEST).exists():
            merger = OnlineMerger.open(store, oracle=oracle)
            if groups is not None and merger.strategy != "oracle":
                raise ValueError(f"--groups: the store at {store} has --strategy {merger.strategy}; "
                                 "only --strategy oracle uses a groups file")
            if args.calibrate:
                given["threshold"] = _calibrate(args.calibrate, args.adapters, merger.similarity)
            gguf = merger.settings.get("gguf", {})
            stored = {**merger.settings, "formats": list(store_formats(merger.settings)), "base": gguf.get("base"),
                      "gguf_dtype": gguf.get("dtype")}
            _check_same_settings(store, {**given, **emitted}, stored, calibrated=bool(args.calibrate))
            formats = merger.settings
            print(f"resuming {store}: strategy {merger.strategy}, budget {merger.budget}, "
                  f"{sum(map(len, merger.members))} tasks in {len(merger.slots)} slots", flush=True)
            todo = _plan(merger, list(zip(args.adapters, tasks)), args)
        else:
            if args.budget is None:
                raise ValueError("--budget: required to start a new store")
            if args.calibrate:
                if given.get("strategy") != "kmerge++":
                    raise ValueError("--calibrate: only --strategy kmerge++ uses a threshold")
                given["threshold"] = _calibrate(args.calibrate, args.adapters, given.get("similarity", "cos"))
            OnlineMerger(oracle=oracle, **given)  # checks the settings (in memory: no store is created yet)
            if "gguf" not in emitted.get("formats", ()) and (args.base or args.dtype):
                raise ValueError(f"{'--base' if args.base else '--dtype'}: only --emit gguf uses it")
            formats = format_settings(emitted.get("formats", ["peft"]), args.base, args.dtype)  # reads --base
            todo = list(zip(args.adapters, tasks))
        progress.planned = len(todo)
        if groups is not None:
            missing = [task for _, task in todo if task not in groups]
            if missing:
                raise ValueError(f"--groups {args.groups}: no group for tasks {missing[:5]}"
                                 + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        _check_adapters([folder for folder, _ in todo], merger.slots[0] if merger and merger.slots else None,
                        quiet=args.quiet)
        if todo and len(store_formats(formats)) > 1:  # all adapters have the first one's modules and shapes
            check_slot_formats(LoRA.load(todo[0][0]), formats, [task for _, task in todo], todo[0][0])
        if merger is None:
            merger = OnlineMerger(store=store, oracle=oracle, formats=emitted.get("formats", ("peft",)),
                                  base=args.base, gguf_dtype=args.dtype, **given)
        with tqdm(todo, desc="adapters", unit="adapter", disable=args.quiet) as bar:
            for folder, task in bar:
                t0 = time.perf_counter()
                slot = merger.add(LoRA.load(folder), task, replace=args.replace)
                progress.done += 1
                ms = (time.perf_counter() - t0) * 1e3
                step = merger.history[-1]
                best = f"{max(step.similarities):.4f}" if step.similarities else "-"
                tqdm.write(f"{task}: {step.action} -> slot {slot} (best similarity {best}) {ms:.1f} ms")
                sys.stdout.flush()  # one line per step, also into a pipe
    finally:
        if merger is not None:
            merger.close()
    return 0


def _task_names(folders: list[str]) -> list[str]:
    """The task name of each adapter folder (its name); two folders of one name are an error."""
    names, seen = [], {}
    for folder in folders:
        name = Path(os.path.abspath(folder)).name  # "x/" and "./x" name x; "." names the current folder
        if not name:
            raise ValueError(f"ADAPTER_DIR {folder}: no folder name to use as the task name")
        if name in seen:
            raise ValueError(f"ADAPTER_DIR: {seen[name]} and {folder} share the task name {name!r} "
                             "(the task name is the folder name)")
        seen[name] = folder
        names.append(name)
    return names


def _read_groups(path: Path) -> dict[str, str | int]:
    """--groups FILE: a JSON object task -> group (a string or an integer), for ``--strategy oracle``."""
    try:
        groups = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"--groups {path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--groups {path}: not JSON ({e})") from None
    if not isinstance(groups, dict):
        raise ValueError(f"--groups {path}: expected a JSON object task -> group, got {type(groups).__name__}")
    for task, group in groups.items():
        if isinstance(group, bool) or not isinstance(group, (str, int)):
            raise ValueError(f"--groups {path}: the group of {task!r} must be a string or an integer, got {group!r}")
    return groups


def _calibrate(folders: list[str], streamed: list[str], metric: str) -> float:
    """--calibrate DIR...: kmerge++'s threshold, the median pairwise similarity of held-out adapters."""
    from .lora import LoRA
    from .online import calibrate_threshold

    overlap = {str(Path(f).resolve()) for f in folders} & {str(Path(f).resolve()) for f in streamed}
    if overlap:
        raise ValueError(f"--calibrate: {sorted(overlap)[0]} is also streamed; calibrate on held-out adapters")
    return calibrate_threshold([LoRA.load(f) for f in folders], metric=metric)


_SETTING_FLAGS = {"budget": "--budget", "strategy": "--strategy", "similarity": "--similarity",
                  "threshold": "--threshold", "mode": "--mode", "seed": "--seed", "density": "--density",
                  "formats": "--emit", "base": "--base", "gguf_dtype": "--dtype"}


def _flag_text(key: str, value) -> str:
    """A setting as the flags that give it: ``--mode exact``, ``--emit gguf --emit mlx``, ``no --seed``."""
    if key == "formats":
        value = value[1:] or None  # peft is always written
        if value is not None:
            return " ".join(f"--emit {fmt}" for fmt in value)
    return f"no {_SETTING_FLAGS[key]}" if value is None else f"{_SETTING_FLAGS[key]} {value}"


def _check_same_settings(store: Path, given: dict, stored: dict, calibrated: bool) -> None:
    """Every setting given on the command line must equal the existing store's (a store keeps its settings).

    Numbers compare with a relative tolerance of 1e-9: a threshold from
    ``--calibrate`` is recomputed on each run.
    """
    diffs = []
    for key, value in given.items():
        have = stored.get(key)
        if isinstance(value, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
            same = math.isclose(value, have, rel_tol=1e-9)
        else:
            same = value == have
        if not same:
            flag = f"--calibrate (threshold {value:.6g})" if key == "threshold" and calibrated else \
                _flag_text(key, value)
            diffs.append(f"{flag} (the store has {_flag_text(key, have)})")
    if diffs:
        raise ValueError(f"{'; '.join(diffs)}: the store at {store} keeps the settings it was created with; "
                         "leave these flags out to resume it, or use another --store")


def _plan(merger, pairs: list[tuple[str, str]], args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (folder, task) pairs to add to an existing store.

    A task already stored is skipped and reported (``--skip-existing``), kept
    to replace its slot (``--replace``: only a task alone in its slot), or
    refused, before anything is added.
    """
    todo = []
    for folder, task in pairs:
        slot = next((i for i, members in enumerate(merger.members) if task in members), None)
        if slot is None:
            todo.append((folder, task))
        elif args.skip_existing:
            print(f"{task}: already stored in slot {slot}, skipped", flush=True)
        elif not args.replace:
            raise ValueError(f"{task}: already stored (slot {slot}); pass --skip-existing to skip the tasks "
                             "already stored, or --replace to replace them")
        elif merger.members[slot] != [task]:
            raise ValueError(f"--replace: task {task!r} shares slot {slot} with "
                             f"{len(merger.members[slot]) - 1} other task(s); a merged task cannot be replaced")
        else:
            todo.append((folder, task))
    return todo


def _check_adapters(folders: list[str], like=None, quiet: bool = False) -> None:
    """Load every adapter once (it exists and parses) and check that all have the modules and shapes
    of the first one (or of ``like``, the store's slot 0): a bad folder stops the stream before it starts.

    The adapters are not kept: a long stream would hold them all in memory.
    """
    from tqdm import tqdm

    from .lora import LoRA

    want = {n: m.shape for n, m in like.modules.items()} if like is not None else None
    first = "the store's slots"
    for folder in tqdm(folders, desc="checking", unit="adapter", disable=quiet, leave=False):
        got = {n: m.shape for n, m in LoRA.load(folder).modules.items()}
        if want is None:
            want, first = got, folder
        elif got != want:
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            shape = sorted(n for n in set(want) & set(got) if want[n] != got[n])
            raise ValueError(f"ADAPTER_DIR {folder}: does not match {first} (all adapters must be of one base model): "
                             f"missing modules {missing[:3]}, unknown modules {extra[:3]}, "
                             f"shape mismatch in {[(n, got[n], want[n]) for n in shape[:3]]}")


def _store_summary(store: Path) -> str:
    """What the store on disk holds now (its last committed state), for the interrupt message."""
    from .store import MANIFEST, Store

    if not (store / MANIFEST).exists():
        return f"no store was created at {store}"
    try:
        st = Store.open(store, readonly=True, verify=False)  # the manifest is all it needs
    except KMergeError as e:
        return f"the store at {store} cannot be opened: {e}"
    try:
        slots = st.manifest["slots"]
        tasks = sum(len(slot["tasks"]) for slot in slots)
    finally:
        st.close()
    return f"the store holds {tasks} tasks in {len(slots)} slots ({store})"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .store import Store

    # a reader: no lock, nothing written; works while a writer streams (its last commit)
    store = Store.open(args.store, readonly=True)
    try:
        s = store.manifest["settings"]
        print(f"store {store.root}: strategy {s['strategy']}, budget {s['budget']}, similarity {s['similarity']}, "
              f"mode {s['mode']}" + (f" (isonorm up to {s['isonorm_up_to']} tasks)" if "isonorm_up_to" in s else "")
              + (f", threshold {s['threshold']}" if s["threshold"] is not None else ""))
        gguf = s.get("gguf")
        print("formats: " + ", ".join(f"gguf (base {gguf['base']}, {gguf['dtype']})" if fmt == "gguf" else fmt
                                      for fmt in store.formats))
        print(f"{'slot':>4}  {'rank':>4}  {'bytes':>12}  tasks / files")
        for i, slot in enumerate(store.manifest["slots"]):
            sizes = {name: (store.slot_dir(i) / name).stat().st_size for name in store.files}
            print(f"{i:>4}  {slot['rank']:>4}  {sum(sizes.values()):>12,}  {', '.join(slot['tasks'])}")
            for name, size in sizes.items():
                print(f"{'':>10}  {size:>12,}  {slot['dir']}/{name}")
    finally:
        store.close()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """``export``: a reader (as ``inspect``) that loads only the slot asked for, verified.

    The target is checked first, by the library's own rule
    (:func:`kmerge_fast.store.check_export_target`, as ``OnlineMerger.export``):
    never inside a store, and not a non-empty folder unless ``--force``.
    """
    from .store import Store, export_adapter

    options = {key: value for key, value in (("base", args.base), ("dtype", args.dtype)) if value is not None}
    if options and args.format != "gguf":
        raise ValueError(f"--{next(iter(options))}: only --format gguf takes it")
    store = Store.open(args.store, readonly=True, verify=False)  # load_slot verifies the bytes it uses
    try:
        if not 0 <= args.slot < len(store.manifest["slots"]):
            raise ValueError(f"--slot {args.slot}: the store has {len(store.manifest['slots'])} slots")
        lora = store.load_slot(args.slot)
        export_adapter(lora, args.out, args.force, args.format, store.manifest["slots"][args.slot]["tasks"],
                       store.manifest["settings"], flag="--force", **options)
    finally:
        store.close()
    print(f"wrote slot {args.slot} to {args.out} ({args.format})")
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


#: Files of which a model folder holds at least one when its tokenizer was saved with it
#: (``tokenizer.save_pretrained``; older formats keep only a vocabulary or a SentencePiece model).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _check_base(base: Path, gguf: str | None) -> None:
    """--base (and --gguf): a folder with a model config and a tokenizer (checked before any long work)."""
    if not base.is_dir():
        raise ValueError(f"--base {base}: not a folder (expected the base model's folder)")
    if gguf is not None:
        if not (base / gguf).is_file():
            raise ValueError(f"--gguf {gguf}: no such file in --base {base}")
        return  # the GGUF file holds the config and the tokenizer
    if not (base / "config.json").is_file():
        raise ValueError(f"--base {base}: no config.json (not a transformers model folder)")
    if not any((base / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"--base {base}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer into the model's folder (tokenizer.save_pretrained)")


def _cmd_cluster(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import d2c
    from .lora import LoRA

    scored = args.method == "d2c" or args.score
    if scored:
        _check_base(Path(args.base), args.gguf)
    tasks = _task_names(args.adapters)
    # kmeans and random use no examples unless --score; when given, they are checked all the same
    examples = _read_examples(Path(args.examples)) if args.examples is not None else None
    if examples is not None:
        unknown = sorted(set(examples) - set(tasks))
        missing = sorted(set(tasks) - set(examples))
        if unknown:
            raise ValueError(f"--examples: examples for unknown tasks {unknown[:5]} (no adapter folder of that name)")
        if missing:
            raise ValueError(f"--examples: no examples for tasks {missing[:5]}")
    adapters = {task: LoRA.load(folder) for task, folder in zip(tasks, args.adapters)}
    if scored:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # the tokenizer first: it is quick, and a folder without one fails before the model loads
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.base, local_files_only=True, gguf_file=args.gguf)
        except (OSError, ValueError) as e:
            raise ValueError(f"--base {args.base}: cannot load its tokenizer: {e}") from None
        model = AutoModelForCausalLM.from_pretrained(args.base, local_files_only=True, gguf_file=args.gguf)
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
                             max_iters=args.max_iters, merge_kwargs=merge_kwargs, progress=not args.quiet,
                             refine=args.refine)
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
                           "merges": h.merges, "scored": h.scored, "kind": h.kind, "moves": h.moves}
                          for h in result.history]}
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

    stream = sub.add_parser(
        "stream", help="add adapters one by one to an online merger's store",
        description="Add peft adapter folders, in order, to the K-Merge store in --store (created if needed, "
                    "resumed otherwise). The task name is the folder name. Every adapter is loaded and checked "
                    "before the first add. A store keeps the settings it was created with: on an existing store, "
                    "a setting flag that differs from the store's is an error. Each add is committed before the "
                    "next starts; after Ctrl-C (exit status 130) the store holds the adds done so far, and the "
                    "same command with --skip-existing continues the stream.")
    stream.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="peft adapter folders, in arrival order")
    stream.add_argument("--store", required=True, help="the store folder")
    settings = stream.add_argument_group("settings of a new store (on an existing one: left out, or equal to its own)")
    settings.add_argument("--budget", type=int, help="K, the number of slots (required for a new store)")
    settings.add_argument("--strategy", choices=STRATEGIES, help="default kmerge")
    settings.add_argument("--similarity", choices=METRICS, help="default cos")
    threshold = settings.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", help="kmerge++'s similarity threshold: a number, or 'auto' "
                           "(the default: mean over modules of rank / n_in)")
    threshold.add_argument("--calibrate", nargs="+", action="extend", metavar="DIR",
                           help="kmerge++'s threshold from held-out adapter folders (not streamed): the median of "
                                "their pairwise similarities. Put it after the ADAPTER_DIRs, or before --store")
    settings.add_argument("--mode", choices=MODES, help=f"merge mode of the running-average strategies "
                          f"(default {DEFAULT_MODE}; 'faithful' reproduces the published K-Merge)")
    settings.add_argument("--seed", type=int, help="seed of the random and DARE strategies")
    settings.add_argument("--density", type=float, help="kept fraction of the ties and dare strategies "
                          "(default 0.5)")
    settings.add_argument("--groups", metavar="FILE", help="--strategy oracle's task -> group map: a JSON object "
                          "naming the group of every task streamed (needed again to resume such a store)")
    settings.add_argument("--emit", action="append", choices=[f for f in FORMATS if f != "peft"],
                          help="also write every slot in this format, in the same commit (repeatable): gguf "
                               "(slots/DIR/adapter.gguf, for llama.cpp's --lora; needs --base), mlx (slots/DIR/mlx/, "
                               "for mlx_lm's --adapter-path); peft is always written")
    settings.add_argument("--base", help="--emit gguf's base model: a base GGUF file, or a transformers config.json "
                          "or its folder (the store keeps its absolute path)")
    settings.add_argument("--dtype", choices=GGUF_DTYPES, help="--emit gguf's factor dtype (default f32)")
    again = stream.add_mutually_exclusive_group()
    again.add_argument("--replace", action="store_true",
                       help="let an adapter replace its task's stored one (a task alone in its slot)")
    again.add_argument("--skip-existing", action="store_true",
                       help="skip (and report) the tasks already in the store: rerunning a command is harmless")
    stream.add_argument("--quiet", action="store_true", help="no progress bar")
    stream.set_defaults(func=_cmd_stream)

    inspect = sub.add_parser("inspect", help="print a store's slots",
                             description="Print the slot table of a store, after checking every file's checksum. "
                                         "A reader: works while a writer streams, and on a read-only store.")
    inspect.add_argument("--store", required=True, help="the store folder")
    inspect.set_defaults(func=_cmd_inspect)

    export = sub.add_parser("export", help="write one slot as a peft, GGUF or MLX adapter",
                            description="Write slot --slot of the store as a peft adapter folder OUT (or, with "
                                        "--format, a GGUF file OUT or an MLX-LM folder OUT). OUT must be new, or an "
                                        "empty folder (or --force), and is never inside a store. A reader: works "
                                        "while a writer streams, and on a read-only store.")
    export.add_argument("--store", required=True, help="the store folder")
    export.add_argument("--slot", type=int, required=True, help="slot index")
    export.add_argument("out", metavar="OUT", help="the adapter folder (the file, for gguf) to write")
    export.add_argument("--format", choices=FORMATS, default="peft", help="default peft")
    export.add_argument("--base", help="--format gguf's base model (a base GGUF file, or a transformers config.json "
                        "or its folder); default: the store's, if it emits gguf")
    export.add_argument("--dtype", choices=GGUF_DTYPES, help="--format gguf's factor dtype (default: the store's, "
                        "else f32)")
    export.add_argument("--force", action="store_true",
                        help="write into OUT even if it holds files (its adapter files are replaced)")
    export.set_defaults(func=_cmd_export)

    cluster = sub.add_parser("cluster", help="cluster adapters into K merged adapters (D2C)",
                             description="Cluster task adapters into --budget merged adapters. d2c reassigns "
                                         "tasks by their examples' loss under each cluster's merge (needs --base); "
                                         "kmeans and random are the baselines. The task name is the folder name.")
    cluster.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="peft adapter folders, one per task")
    cluster.add_argument("--budget", type=int, required=True, help="K, the number of merged adapters")
    cluster.add_argument("--examples", help="JSONL file of {task, prompt, target} objects (about 10 per task); "
                         "needed by d2c and --score")
    cluster.add_argument("--base", help="the base model folder with its tokenizer (transformers format, or with "
                         "--gguf); needed by d2c and --score")
    cluster.add_argument("--gguf", help="a GGUF file name inside --base")
    cluster.add_argument("--method", default="d2c", choices=("d2c", "kmeans", "random"), help="default d2c")
    cluster.add_argument("--merge", default="svd", choices=METHODS, help="merge method of each cluster (default svd)")
    cluster.add_argument("--density", type=float, help="density for ties / dare / magnitude_prune merges")
    cluster.add_argument("--init", default="kmeans", choices=("kmeans", "random"), help="d2c's start (default kmeans)")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--max-iters", type=int, default=20)
    cluster.add_argument("--refine", type=int, default=3,
                         help="d2c: sweeps of single-task moves after the alternation (default 3; 0: off)")
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


# The library names its arguments (``mode: ...``, ``pass replace=True``); the command line
# names its flags. Library messages are translated here, at the one boundary, so that each
# message has one source. A message's leading "argument:" -> the flag:
_ARGUMENT_FLAGS = {"budget": "--budget", "strategy": "--strategy", "similarity": "--similarity",
                   "metric": "--similarity", "threshold": "--threshold", "mode": "--mode", "seed": "--seed",
                   "density": "--density", "oracle": "--groups", "loras": "--calibrate", "slot": "--slot",
                   "merge": "--merge", "init": "--init", "max_iters": "--max-iters", "refine": "--refine",
                   "overwrite": "--force",
                   "formats": "--emit", "base": "--base", "gguf_dtype": "--dtype", "format": "--format"}
# ... and keyword arguments inside a message -> flags:
_KEYWORD_FLAGS = [
    (re.compile(r"\breplace=True\b"), "--replace"),
    (re.compile(r"\boverwrite=True\b"), "--force"),
    (re.compile(r"\boracle=task -> group\b|\bthe task -> group function\b"), "--groups FILE"),
    (re.compile(r"\(see kf\.calibrate_threshold, kf\.online\.width_threshold\)"), "(or --calibrate DIR...)"),
    (re.compile(r"\b(mode|strategy|similarity|merge)='([^']*)'"), r"--\1 \2"),
]


def cli_message(message: str) -> str:
    """A library error message in the command line's words: ``mode='exact'`` -> ``--mode exact``,
    ``replace=True`` -> ``--replace``, a leading ``budget:`` -> ``--budget:`` (see the tables above)."""
    head = re.match(r"(\w+): ", message)
    if head and head[1] in _ARGUMENT_FLAGS:
        message = _ARGUMENT_FLAGS[head[1]] + message[len(head[1]):]
    for pattern, flag in _KEYWORD_FLAGS:
        message = pattern.sub(flag, message)
    return message


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "method", None) == "d2c" or getattr(args, "score", False):
        if args.base is None:
            parser.error("--base: the d2c method (and --score) need the base model")
        if args.examples is None:
            parser.error("--examples: the d2c method (and --score) need examples of each task")
    try:
        return args.func(args)
    except (KMergeError, ValueError, TypeError, KeyError, OSError) as e:
        print(f"kmerge-fast: error: {cli_message(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # stream reports its own progress; the others have nothing to keep
        print("kmerge-fast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
