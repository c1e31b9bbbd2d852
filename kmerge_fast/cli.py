"""The ``kmerge-fast`` command line.

Subcommands:
  demo   build a few synthetic adapters on disk (peft format), then load them,
         print their similarity matrix and merge them, with timings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import __version__, ops
from .errors import KMergeError
from .lora import LoRA
from .merge import merge
from .similarity import similarity_matrix


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KMergeError as e:
        print(f"kmerge-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
