"""Per-op microbenchmarks: the C++ kernels (``kmerge_fast._C``) alone, on Llama-3.2-1B attention shapes.

Run from the repository root::

    python -m bench.bench_ops            # 64 modules (dense_merge / abs_kth: layer 0's 4), ~3 s per row
    python -m bench.bench_ops --quick    # layer 0's 4 modules for every op, ~0.5 s per row

Each row times one batch of ``_C`` calls as the C++ backend issues them: the
task tuples of the backend (Mat = (ptr, dtype, rows, cols, row_stride,
col_stride, coef), B stacks [c_i B_i], A^T stacks as transposed views; dtype
codes from ``_C.DTYPES``), all cores (threads = 0), buffers allocated outside
the timed call. Adapters: ``harness.random_adapters`` (rank r = 32, scaling 2),
k = 8 of them (R = k r = 256 stacked) unless the row says otherwise.

Rows and their work (per module, n_out x n_in; GFLOP counts multiply-adds as 2):

- ``gram`` cross: the cos similarity's Grams of 1 newcomer against 8 stored
  adapters, B^T B' and A A'^T: 2 (n_out + n_in) r (8 r); ``fast`` accumulates in
  float32 (ceiling: fp32 FMA), ``precise`` in float64 (fp64 FMA).
- ``gram`` symmetric: the truncation's Grams of one stack, upper triangle
  mirrored: (n_out + n_in) R (R + 1).
- ``apply``: the rebuild B' = [c_i B_i] T_B and A'^T = [A_i^T] T_A, T float64
  R x r: 2 (n_out + n_in) R r.
- ``truncate``: the whole SVD merge of the stack into rank r (Grams, R x R
  algebra, rebuild): ``bench_merge.cpp_merge_flops``; % of the fp32 ceiling (the
  Grams and the rebuild accumulate in float32 on these adapters, the algebra in float64).
- ``dense_merge``: peft's dense combinations of the k terms t_i = B_i A_i
  (sum, ties, ties of magnitude-pruned terms with the thresholds given, dare_ties at
  density 0.3), out float32, one call per module: 2 k n_out n_in r (forming the
  t_i tile by tile; the per-element combination is not counted).
- ``abs_kth``: the magnitude thresholds (k-th largest |t_i|, density 0.3) of the
  k terms: effective GFLOP/s counts one formation of each t_i, 2 n_out n_in r.
- ``weighted_sum``: the factor-wise ``linear`` merge, A' = sum w_i A_i and
  B' = sum w_i B_i over all modules: memory-bound, GB/s = bytes read + written
  over time; % of the machine's copy bandwidth (``harness.copy_bandwidth``).

``torch ms``: a pure-torch way of doing the same on the same tensors (float32;
weighted_sum in the tensors' dtype): matmuls of pre-concatenated stacks (gram,
apply, the concatenation untimed), peft's dense way (every t_i
formed, then stacked, signed, pruned with ``torch.topk`` or masked with
``torch.bernoulli``: dense_merge, abs_kth; these were
``python_tests/test_cpp_dense_merge.py::test_benchmark``), ``t_0 w_0 + t_1 w_1 + ...``
(weighted_sum); ``x torch`` = torch ms / time ms. ``rel. diff``: max over the batch of
||C++ - torch||_F / ||torch||_F where both compute the same thing (sanity, not accuracy).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import harness as h
from .bench_merge import cpp_merge_flops

try:
    from kmerge_fast import _C
except ImportError as e:  # the extension is not built: main() says so
    _C, _WHY = None, str(e)

RANK = h.LLAMA_1B_RANK
K = 8
DENSITY = 0.3


def mat(t: torch.Tensor, coef: float = 1.0, transpose: bool = False) -> tuple:
    """The Mat of a 2-D tensor (or of its transpose, as a strided view)."""
    rows, cols = t.shape
    rs, cs = t.stride()
    if transpose:
        rows, cols, rs, cs = cols, rows, cs, rs
    return (t.data_ptr(), _C.DTYPES[h.dtype_name(t.dtype)], rows, cols, rs, cs, float(coef))


@dataclass
class Case:
    op: str
    case: str
    dtype: torch.dtype
    modules: int
    run: Callable[[], object]  # the timed C++ call(s)
    work: float  # GFLOP or GB per run
    unit: str  # "GFLOP/s" or "GB/s"
    ceiling: str  # "fp32", "fp64" or "copy"
    torch_run: Callable[[], object] | None = None
    diff: Callable[[], float] | None = None  # rel. diff of the C++ result vs torch (after run / torch_run)
    keep: object = None  # what the tasks point into (inputs, outputs): alive as long as the case


def _rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-300)) for g, w in zip(got, want))


class Stacks:
    """Per module of ``shapes``: the k adapters' factors, as tensors and as C++ stacks (weights 1/k)."""

    def __init__(self, shapes: dict, k: int, dtype: torch.dtype, seed: int = 0):
        loras = h.random_adapters(k, dtype, shapes, seed=seed)
        self.shapes = list(shapes.values())
        self.mods = [[lora.modules[name] for lora in loras] for name in loras[0].modules]
        self.w = [1.0 / k] * k
        self.b = [[mat(m.B, w * m.scaling) for m, w in zip(ms, self.w)] for ms in self.mods]
        self.at = [[mat(m.A, 1.0, transpose=True) for m in ms] for ms in self.mods]

    @functools.cached_property
    def b32(self) -> list[torch.Tensor]:
        """Per module the float32 [c_i B_i] (n_out x R), for the torch peers."""
        return [torch.cat([w * m.scaling * m.B.float() for m, w in zip(ms, self.w)], 1) for ms in self.mods]

    @functools.cached_property
    def at32(self) -> list[torch.Tensor]:
        """Per module the float32 [A_i^T] (n_in x R), for the torch peers."""
        return [torch.cat([m.A.float().T for m in ms], 1) for ms in self.mods]


def gram_cases(shapes: dict) -> list[Case]:
    s = Stacks(shapes, 1 + K, torch.float32, seed=1)
    n = sum(a + b for a, b in s.shapes)
    out = []
    for precise in (False, True):
        bufs = [(torch.empty(RANK, K * RANK, dtype=torch.float64), torch.empty(RANK, K * RANK, dtype=torch.float64))
                for _ in s.mods]
        tasks = [t for j, (gb, ga) in enumerate(bufs) for t in (
            (s.b[j][:1], s.b[j][1:], gb.data_ptr(), False), (s.at[j][:1], s.at[j][1:], ga.data_ptr(), False))]
        peer = [None]

        def torch_run(s=s, peer=peer):
            peer[0] = [x[:, :RANK].T @ x[:, RANK:] for j in range(len(s.mods)) for x in (s.b32[j], s.at32[j])]

        def diff(bufs=bufs, peer=peer):
            return _rel([g for pair in bufs for g in pair], peer[0])

        out.append(Case("gram", f"cross 1 x {K} (r={RANK}), {'precise' if precise else 'fast'}", torch.float32,
                        len(s.mods), lambda tasks=tasks, p=precise: _C.gram(tasks, p, 0),
                        2 * n * RANK * K * RANK / 1e9, "GFLOP/s", "fp64" if precise else "fp32", torch_run, diff,
                        (s, bufs)))
    s = Stacks(shapes, K, torch.float32)
    big_r = K * RANK
    bufs = [(torch.empty(big_r, big_r, dtype=torch.float64), torch.empty(big_r, big_r, dtype=torch.float64))
            for _ in s.mods]
    tasks = [t for j, (gb, ga) in enumerate(bufs) for t in (
        (s.b[j], s.b[j], gb.data_ptr(), True), (s.at[j], s.at[j], ga.data_ptr(), True))]
    peer = [None]

    def torch_sym():
        peer[0] = [x.T @ x for j in range(len(s.mods)) for x in (s.b32[j], s.at32[j])]

    out.append(Case("gram", f"symmetric, stack of {K} (R={big_r}), fast", torch.float32, len(s.mods),
                    lambda: _C.gram(tasks, False, 0), n * big_r * (big_r + 1) / 1e9, "GFLOP/s", "fp32", torch_sym,
                    lambda: _rel([g for pair in bufs for g in pair], peer[0]), (s, bufs)))
    return out


def apply_cases(shapes: dict) -> list[Case]:
    s = Stacks(shapes, K, torch.float32)
    big_r = K * RANK
    n = sum(a + b for a, b in s.shapes)
    g = torch.Generator().manual_seed(2)
    ts = [(torch.randn(big_r, RANK, generator=g, dtype=torch.float64),
           torch.randn(big_r, RANK, generator=g, dtype=torch.float64)) for _ in s.mods]
    out = []
    for precise in (False, True):
        outs = [(torch.empty(n_out, RANK), torch.empty(RANK, n_in)) for n_out, n_in in s.shapes]
        tasks = [t for j, ((tb, ta), (ob, oa)) in enumerate(zip(ts, outs)) for t in (
            (s.b[j], tb.data_ptr(), RANK, mat(ob)), (s.at[j], ta.data_ptr(), RANK, mat(oa, 1.0, transpose=True)))]
        peer = [None]

        def torch_run(peer=peer):
            peer[0] = [x @ t.float() for j, (tb, ta) in enumerate(ts) for x, t in ((s.b32[j], tb), (s.at32[j], ta))]

        def diff(outs=outs, peer=peer):
            return _rel([t for ob, oa in outs for t in (ob, oa.T)], peer[0])

        out.append(Case("apply", f"R={big_r} -> r={RANK}, {'precise' if precise else 'fast'}", torch.float32,
                        len(s.mods), lambda tasks=tasks, p=precise: _C.apply(tasks, p, 0),
                        2 * n * big_r * RANK / 1e9, "GFLOP/s", "fp64" if precise else "fp32", torch_run, diff,
                        (s, ts, outs)))
    return out


def truncate_cases(shapes: dict) -> list[Case]:
    out = []
    for k, dtype in ((2, torch.float32), (K, torch.float32), (K, torch.float16)):
        s = Stacks(shapes, k, dtype, seed=k)
        outs = [(torch.empty(n_out, RANK, dtype=dtype), torch.empty(RANK, n_in, dtype=dtype)) for n_out, n_in in s.shapes]
        tasks = [(s.b[j], s.at[j], mat(ob), mat(oa, 1.0, transpose=True)) for j, (ob, oa) in enumerate(outs)]
        out.append(Case("truncate", f"stack of {k} (R={k * RANK}) -> r={RANK}", dtype, len(s.mods),
                        lambda tasks=tasks: _C.truncate(tasks, RANK, 0), cpp_merge_flops(s.shapes, k * RANK, RANK) / 1e9,
                        "GFLOP/s", "fp32", keep=(s, outs)))
    return out


def _torch_dense(ms: list) -> torch.Tensor:
    return torch.stack([m.scaling * (m.B.float() @ m.A.float()) for m in ms])


def _torch_ties(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """peft's ties with majority sign "total" on the (pruned) stack ``t``: disjoint mean."""
    t = t * w.view(-1, 1, 1)
    elect = torch.where(t.sum(0) >= 0, 1.0, -1.0)
    mask = t.sign() == elect
    return (t * mask).sum(0) / mask.sum(0).clamp(min=1)


def _torch_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """peft's magnitude_based_pruning of each term: keep its top density fraction of |t|."""
    kept = []
    for ti in t:
        mask = torch.zeros(ti.numel())
        mask[torch.topk(ti.abs().flatten(), k=int(density * ti.numel())).indices] = 1
        kept.append(ti * mask.view(ti.shape))
    return torch.stack(kept)


def dense_merge_cases(shapes: dict) -> list[Case]:
    s = Stacks(shapes, K, torch.float32, seed=3)
    w = torch.tensor(s.w)
    codes, modes, signs = _C.KEEP_KINDS, _C.COMBINE_MODES, _C.SIGN_METHODS
    thresh24 = int(round(DENSITY * (1 << 24)))
    flops = sum(2 * K * n_out * n_in * RANK for n_out, n_in in s.shapes) / 1e9
    kth_tasks = [[(mat(m.B), mat(m.A, m.scaling), int(DENSITY * m.B.shape[0] * m.A.shape[1])) for m in ms]
                 for ms in s.mods]
    taus = [_C.abs_kth(tasks, 0) for tasks in kth_tasks]
    outs = [torch.empty(n_out, n_in) for n_out, n_in in s.shapes]

    def terms(j: int, kind: str) -> list[tuple]:
        return [(mat(m.B), mat(m.A, m.scaling), wi, codes[kind], taus[j][i] if kind == "magnitude" else 0.0,
                 1 + i, thresh24, DENSITY) for i, (m, wi) in enumerate(zip(s.mods[j], s.w))]

    out = []
    for name, kind, mode, peer in [
        ("sum (task arithmetic)", "all", "sum", lambda t: (t * w.view(-1, 1, 1)).sum(0)),
        ("ties", "all", "ties", lambda t: _torch_ties(t, w)),
        ("ties + magnitude (thresholds given)", "magnitude", "ties",
         lambda t: _torch_ties(_torch_magnitude(t, DENSITY), w)),
        (f"dare_ties (hash vs torch.bernoulli), d={DENSITY}", "dare", "ties",
         lambda t: _torch_ties(t * torch.bernoulli(torch.full_like(t, DENSITY)) / DENSITY, w)),
    ]:
        calls = [(terms(j, kind), mat(o)) for j, o in enumerate(outs)]
        results = [None]

        def run(calls=calls, mode=mode):
            for t, o in calls:
                _C.dense_merge(t, o, modes[mode], signs["total"], 0)

        def torch_run(peer=peer, results=results):
            results[0] = [peer(_torch_dense(ms)) for ms in s.mods]

        # hash masks and torch.bernoulli draw differently; the thresholds may split ties differently
        diff = (lambda results=results: _rel(outs, results[0])) if kind == "all" else None
        out.append(Case("dense_merge", f"{name}, k={K}", torch.float32, len(s.mods), run, flops, "GFLOP/s", "fp32",
                        torch_run, diff, (s, outs)))

    def torch_kth():
        return [torch.topk(t.abs().flatten(), k).values[-1] for ms, tasks in zip(s.mods, kth_tasks)
                for t, (_, _, k) in zip(_torch_dense(ms), tasks)]

    out.append(Case("abs_kth", f"k={K} terms, top {DENSITY:g} of |t|", torch.float32, len(s.mods),
                    lambda: [_C.abs_kth(tasks, 0) for tasks in kth_tasks], flops, "GFLOP/s", "fp32", torch_kth,
                    keep=s))
    return out


def weighted_sum_cases(shapes: dict) -> list[Case]:
    out = []
    for dtype in (torch.float32, torch.float16):
        s = Stacks(shapes, K, dtype, seed=4)
        pairs = [(srcs, torch.empty(srcs[0].shape, dtype=dtype))
                 for ms in s.mods for srcs in ([m.A for m in ms], [m.B for m in ms])]
        tasks = [([mat(t, w) for t, w in zip(srcs, s.w)], mat(dst)) for srcs, dst in pairs]
        size = torch.finfo(dtype).bits // 8
        gb = sum((K + 1) * dst.numel() * size for _, dst in pairs) / 1e9
        peer = [None]

        def torch_run(pairs=pairs, s=s, peer=peer):
            res = []
            for srcs, _ in pairs:
                acc = srcs[0] * s.w[0]
                for t, wi in zip(srcs[1:], s.w[1:]):
                    acc = acc + t * wi
                res.append(acc)
            peer[0] = res

        def diff(pairs=pairs, peer=peer):
            return _rel([dst for _, dst in pairs], peer[0])

        out.append(Case("weighted_sum", f"linear merge of {K} adapters' A and B factors", dtype, len(s.mods),
                        lambda tasks=tasks: _C.weighted_sum(tasks, False, 0), gb, "GB/s", "copy", torch_run, diff,
                        (s, pairs)))
    return out


def run_cases(cases: list[Case], machine: dict, budget_s: float) -> list[list]:
    ceilings = {"fp32": h.ceiling(machine, torch.float32), "fp64": h.ceiling(machine, torch.float64),
                "copy": machine.get("copy_gbs")}
    rows = []
    for c in cases:
        t = h.measure(c.run, budget_s=budget_s, max_repeats=61)
        rate = c.work / t.seconds
        ceiling = ceilings[c.ceiling]
        torch_ms = ratio = diff = None
        if c.torch_run is not None:
            tt = h.measure(c.torch_run, budget_s=budget_s, max_repeats=61)
            torch_ms, ratio = tt.ms, tt.seconds / t.seconds
            if c.diff is not None:
                c.run()
                diff = c.diff()
        unit = c.unit.split("/")[0]
        rows.append([c.op, c.case, h.dtype_name(c.dtype), c.modules, t.ms, t.runs, f"{c.work:.3g} {unit}", rate,
                     c.unit, 100 * rate / ceiling if ceiling else None, f"{c.ceiling} {ceiling}", torch_ms, ratio,
                     diff])
    return rows


HEADERS = ["op", "case", "dtype", "modules", "time ms", "runs", "work", "rate", "unit", "% ceiling", "ceiling",
           "torch ms", "x torch", "rel. diff"]


def run_all(shapes: dict, dense_shapes: dict, machine: dict, budget_s: float) -> list[list]:
    """Every row: gram, apply, truncate, weighted_sum on ``shapes``; dense_merge, abs_kth on ``dense_shapes``.

    One op's tensors at a time (64 modules of 8 adapters take ~200 MiB in float32).
    """
    rows = []
    for build, on in ((gram_cases, shapes), (apply_cases, shapes), (truncate_cases, shapes),
                      (dense_merge_cases, dense_shapes), (weighted_sum_cases, shapes)):
        rows += run_cases(build(on), machine, budget_s)
    return rows


def main(argv=None) -> None:
    args = h.parse_quick(__doc__, "layer 0's 4 modules for every op, ~0.5 s per row", argv)
    if _C is None:
        raise SystemExit(f"kmerge_fast._C is not built: {_WHY}")
    machine = h.machine_info()
    load_start = os.getloadavg()[0]
    layer0 = h.llama_shapes(layers=1)
    shapes = layer0 if args.quick else h.llama_shapes()
    rows = run_all(shapes, layer0, machine, 0.5 if args.quick else 3.0)
    load_end = os.getloadavg()[0]
    notes = f"""
The C++ kernels alone (`kmerge_fast._C`, {_C.info()['simd']}, threads = all), on Llama-3.2-1B attention shapes
(q/o 2048x2048, k/v 512x2048; `modules` per call batch), adapters of rank {RANK}, k = {K} unless the case says.
`time ms`: median over `runs`; `work`: GFLOP (multiply-add = 2) or GB (read + written) per call; `rate` = work / time;
`% ceiling`: of the `ceiling` column (fp32 / fp64 `_C.fma_peak`, or the 256 MiB copy bandwidth), see the module docstring.
`torch ms` / `x torch`: a pure-torch way of doing the same, `x torch` > 1: the kernel is faster.
`rel. diff`: ||C++ - torch||_F / ||torch||_F where both compute the same values.
1-min load average at start / end: {load_start:.2f} / {load_end:.2f} (on a 2-core machine, other busy processes
slow every row; compare ratios within one run).
"""
    h.report("ops-quick" if args.quick else "ops", "Per-op microbenchmarks: the C++ kernels alone", HEADERS, rows,
             notes, {**vars(args), "loadavg_start": load_start, "loadavg_end": load_end})


if __name__ == "__main__":
    main()
