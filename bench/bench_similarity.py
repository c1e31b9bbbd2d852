"""Cosine similarity of one newcomer adapter to 8 stored ones (the K-Merge routing step).

Run from the repository root::

    python -m bench.bench_similarity           # all 64 modules
    python -m bench.bench_similarity --quick   # shorter timing budget per row

Adapters: rank r = 32 over the 64 Llama-3.2-1B attention modules, float32 and
float16. Result: the (1, 8) matrix of mean over modules of
cos(dW_new, dW_j) = <dW_new, dW_j>_F / (||dW_new||_F ||dW_j||_F), dW = s B A.

Paths (rows):

- ``dense``: the published K-Merge approach, see :func:`dense_similarity`:
  per module and stored adapter, form both dense dW (n_out x n_in) in float32
  and take ``torch.nn.functional.cosine_similarity`` of the flattened tensors.
- ``kf reference`` / ``kf cpp``: ``kf.similarity_matrix([new], stored, metric="cos")``
  on each backend, from r x r cross-Grams (B_x^T B_y) * (A_x A_y^T), never forming dW;
  - ``cold``: no cached norms (every module's ||dW||^2 recomputed);
  - ``warm``: the stored adapters' norms cached (the K-Merge situation, a
    stored slot pays for its norm once); the newcomer's norm is computed.

Flop count (for GFLOP/s), per module with n = n_in + n_out:

- cross-Grams: 2 r_x r_y n per (newcomer, stored) pair (8 pairs);
- norms (two symmetric r x r Grams per adapter, r^2 n): 9 adapters cold, 1 (the newcomer) warm.

Columns: ``x (cpp cold)`` / ``x (cpp warm)`` are this row's time over the cpp
cold / warm time (> 1: cpp is faster). ``% fp32 peak`` compares a row's
GFLOP/s with the machine's fp32 multiply-add ceiling (``_C.fma_peak``;
cosine Grams accumulate in float32; cold norms in float64). ``max |diff|`` is the largest difference of
the 8 similarities against the dense path's.
"""

from __future__ import annotations

import time

import torch

import kmerge_fast as kf

from . import harness as h

RANK = h.LLAMA_1B_RANK
STORED = 8


def dense_similarity(new: kf.LoRA, stored: list[kf.LoRA]) -> torch.Tensor:
    """(len(stored),) mean over modules of the dense float32 cosine of dW_new and dW_j.

    Per module and stored adapter j: dW = s * (B.float() @ A.float()) for both,
    cos = F.cosine_similarity(dW_new.flatten(), dW_j.flatten(), dim=0).
    """
    sims = torch.zeros(len(stored), dtype=torch.float64)
    names = list(new.modules)
    for name in names:
        x = new.modules[name]
        for j, lora in enumerate(stored):
            y = lora.modules[name]
            dw_x = x.scaling * (x.B.float() @ x.A.float())
            dw_y = y.scaling * (y.B.float() @ y.A.float())
            sims[j] += float(torch.nn.functional.cosine_similarity(dw_x.flatten(), dw_y.flatten(), dim=0))
    return sims / len(names)


def gram_flops(shapes: list[tuple[int, int]], r: int, pairs: int, normed: int) -> float:
    """sum over modules of 2 r^2 n * pairs + r^2 n * normed, n = n_in + n_out."""
    return float(sum(2 * r * r * (n_out + n_in) * pairs + r * r * (n_out + n_in) * normed
                     for n_out, n_in in shapes))


def run_dtype(dtype: torch.dtype, quick: bool, machine: dict) -> list[list]:
    adapters = h.random_adapters(1 + STORED, dtype, seed=1)
    new, stored = adapters[0], adapters[1:]
    dt = h.dtype_name(dtype)
    budget = 2.0 if quick else 5.0
    shapes = list(h.llama_shapes().values())
    t0 = time.perf_counter()
    dense_sims = dense_similarity(new, stored)  # also the dense path's warm-up
    first = time.perf_counter() - t0
    repeats = 1 if quick else max(3, min(5, int(budget / first)))  # the dense path is noisy: >= 3 runs
    t_dense = h.measure(lambda: dense_similarity(new, stored), warmup=0, repeats=repeats)

    def call():
        return kf.similarity_matrix([new], stored, metric="cos")[0]

    def cold():
        h.reset_norm_caches(adapters)

    def warm():
        h.reset_norm_caches([new])  # the newcomer is new; stored norms stay cached

    timed = {}
    for backend in ("reference", "cpp"):
        for temp, setup in (("cold", cold), ("warm", warm)):
            cold()
            if temp == "warm":
                with kf.use_backend("reference"):  # fill the stored norms' cache
                    kf.similarity_matrix(stored, stored[:1], metric="cos")
            sims, why = h.try_backend(backend, call)
            if why:
                timed[backend, temp] = (None, why, None)
                continue
            with kf.use_backend(backend):
                t = h.measure(call, setup=setup, budget_s=budget, max_repeats=61)
            timed[backend, temp] = (t, None, float((sims - dense_sims).abs().max()))

    flops = {"cold": gram_flops(shapes, RANK, STORED, 1 + STORED), "warm": gram_flops(shapes, RANK, STORED, 1)}
    dense_flops = float(sum(STORED * (2 * 2 * RANK * n_out * n_in + 6 * n_out * n_in) for n_out, n_in in shapes))

    def ratio(ms, temp):
        t = timed["cpp", temp][0]
        return ms / t.ms if t else "n/a"

    def gflops(f, t):
        return f / t.seconds / 1e9

    rows = []
    g = gflops(dense_flops, t_dense)
    rows.append([dt, "dense float32 (published)", "–", t_dense.ms, t_dense.runs, ratio(t_dense.ms, "cold"),
                 ratio(t_dense.ms, "warm"), g, 100 * g / h.ceiling(machine, torch.float32), 0.0])
    for backend in ("reference", "cpp"):
        for temp in ("cold", "warm"):
            t, why, diff = timed[backend, temp]
            label = f"kf {backend}"
            if why:
                rows.append([dt, label, temp, why, None, "n/a", "n/a", None, None, None])
                continue
            g = gflops(flops[temp], t)
            rows.append([dt, label, temp, t.ms, t.runs, ratio(t.ms, "cold"), ratio(t.ms, "warm"), g,
                         100 * g / h.ceiling(machine, torch.float32), diff])
    return rows


def main(argv=None) -> None:
    args = h.parse_quick(__doc__, "one dense run, shorter budget for the others", argv)
    machine = h.machine_info()
    rows = []
    for dtype in (torch.float32, torch.float16):
        rows.extend(run_dtype(dtype, args.quick, machine))
    headers = ["dtype", "path", "norms", "time ms", "runs", "x (cpp cold)", "x (cpp warm)", "GFLOP/s",
               "% fp32 peak", "max |diff| vs dense"]
    notes = f"""
cos similarity of 1 newcomer vs {STORED} stored adapters (r={RANK}) over the 64 Llama-3.2-1B attention modules.
`time ms`: median over `runs`. `x (cpp ...)`: row time / cpp time (> 1: cpp faster).
kf flops per module (n = n_in + n_out): 2 r^2 n per pair x {STORED} pairs + r^2 n per normed adapter
({1 + STORED} cold, 1 warm). Dense flops: per pair, two n_out x r x n_in products (4 r n_out n_in) + 6 n_out n_in
for the cosine (counted for reference only: the dense path does the work it does, not the kf algorithm).
"""
    h.report("similarity-quick" if args.quick else "similarity", "Similarity (cos): dense vs kmerge_fast", headers,
             rows, notes, vars(args))


if __name__ == "__main__":
    main()
