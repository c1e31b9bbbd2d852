"""SVD merge of k LoRA adapters over the 64 Llama-3.2-1B attention modules.

Run from the repository root::

    python -m bench.bench_merge            # full (dense path over all 64 modules: minutes)
    python -m bench.bench_merge --quick    # dense path on 8 modules (2 layers), scaled by 8

Cases: k = 2 and k = 8 adapters of rank r = 32, weights 1/k, in float32 and
float16; the merged rank is r = 32. Per module the target is the best
rank-r approximation of M = sum_i w_i s_i B_i A_i (n_out x n_in), returned
as B' = U_r S_r (n_out x r), A' = V_r^T (r x n_in).

Paths (rows):

- ``peft dense SVD``: peft 0.21's ``add_weighted_adapter(combination_type="svd")``
  per-module math (``LoraModel._svd_generalized_task_arithmetic_weighted_adapter``),
  see :func:`peft_dense_svd_merge`. Timed once, no warm-up.
- ``kf reference``: ``kf.merge(..., method="svd")`` on the pure-torch backend
  (QR of both stacks + SVD of the R x R core).
- ``kf cpp``: the same call on the C++ backend (``kmerge_fast._C``).

Flop count of the cpp algorithm per module (R = k r stacked rank, r merged rank,
n_out + n_in = n), used for its GFLOP/s:

- the two float64 Grams B^T B (R x R over n_out) and A A^T (over n_in), symmetric:
  n_out R^2 + n_in R^2;
- the R x R core (``csrc/core/gram_svd.cpp``): a Cholesky factor of A A^T (R^3 / 3),
  the upper triangle of K = L^T (B^T B) L by block rows (R^3), its Householder
  reduction to tridiagonal form (4 R^3 / 3), bisection and inverse iteration for
  the r leading eigenpairs (O(R r)), back-transformation, T_B, T_A and the
  orthonormality check (~6 R^2 r): ~8/3 R^3 + 6 R^2 r;
- the two rebuild products [c_i B_i] T_B (n_out x R x r) and [A_i^T] T_A (n_in x R x r):
  2 n_out R r + 2 n_in R r.

  flops = n R^2 + 8/3 R^3 + 6 R^2 r + 2 n R r.

Columns: ``x (cpp)`` is this row's time over the cpp row's time (> 1: cpp is
faster); ``% fp64 peak`` compares the cpp GFLOP/s with the machine's fp64
multiply-add ceiling (``_C.fma_peak``; the cpp Grams accumulate in float64)
and ``% fp32 peak`` with the fp32 one. ``rel. err`` is max over the modules the dense path ran on of
||B'A' - B_d A_d||_F / ||B_d A_d||_F against the dense path's result.
"""

from __future__ import annotations


import torch

import kmerge_fast as kf
from kmerge_fast.lora import canonical_name

from . import harness as h

RANK = h.LLAMA_1B_RANK


def peft_dense_svd_merge(loras: list[kf.LoRA], weights: list[float], rank: int,
                         names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's dense SVD merge of ``names``, module by module: {name: (A', B')}.

    Mirrors peft 0.21 (``get_delta_weight`` + ``task_arithmetic`` + the SVD of
    ``_svd_generalized_task_arithmetic_weighted_adapter``), dtypes included:

    - dW_i = (B_i @ A_i) * s_i, computed in float32 when the factors are
      fp16/bf16 on CPU and cast back to their dtype (peft's ``cast_to_fp32``);
    - dW = sum_i w_i dW_i with w a float32 tensor (so the sum is float32);
    - U, S, Vh = torch.linalg.svd(dW, full_matrices=True);
      B' = U[:, :r] @ diag(S[:r]) (n_out x r), A' = Vh[:r] (r x n_in), float32
      (peft assigns them to the new adapter's ``.data``, which takes their dtype).
    """
    out = {}
    for name in names:
        deltas = []
        for lora in loras:
            m = lora.modules[canonical_name(name)]
            dtype = m.B.dtype
            cast_to_fp32 = dtype in (torch.float16, torch.bfloat16)  # CPU tensors
            a, b = (m.A.float(), m.B.float()) if cast_to_fp32 else (m.A, m.B)
            d = (b @ a) * m.scaling
            deltas.append(d.to(dtype) if cast_to_fp32 else d)
        w = torch.tensor(weights).to(deltas[0].device)
        stacked = torch.stack(deltas, dim=0)
        delta = (stacked * w.view(w.shape + (1,) * (stacked.dim() - 1))).sum(dim=0)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        U = U[:, :rank] @ torch.diag(S[:rank])
        out[name] = (Vh[:rank, :], U)
    return out


def cpp_merge_flops(shapes: list[tuple[int, int]], big_r: int, r: int) -> float:
    """sum over modules of (n_out + n_in) R^2 + 8/3 R^3 + 6 R^2 r + 2 (n_out + n_in) R r.

    Two symmetric float64 Grams; the R x R algebra of ``csrc/core/gram_svd.cpp``
    (Cholesky R^3 / 3, the upper triangle of K = L^T Gb L R^3, Householder
    reduction 4 R^3 / 3; back-transformation, T_B, T_A and the check ~6 R^2 r);
    two rebuild products.
    """
    return float(sum((n_out + n_in) * big_r ** 2 + 8 / 3 * big_r ** 3 + 6 * big_r ** 2 * r
                     + 2 * (n_out + n_in) * big_r * r for n_out, n_in in shapes))


def rel_err(merged: kf.LoRA, dense: dict) -> float:
    """max over ``dense``'s modules of ||B'A' - B_d A_d||_F / ||B_d A_d||_F (float64)."""
    worst = 0.0
    for name, (a_d, b_d) in dense.items():
        m = merged.modules[canonical_name(name)]
        ref = b_d.double() @ a_d.double()
        got = m.scaling * (m.B.double() @ m.A.double())
        worst = max(worst, float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)))
    return worst


def run_case(k: int, dtype: torch.dtype, quick: bool, machine: dict) -> list[list]:
    loras = h.random_adapters(k, dtype, seed=k)
    weights = [1.0 / k] * k
    all_names = list(h.llama_shapes())
    names = all_names[:8] if quick else all_names  # quick: 2 layers x 4 projections
    scale = len(all_names) / len(names)
    case, dt = f"k={k}", h.dtype_name(dtype)

    dense_out: dict = {}

    def dense():
        dense_out.clear()
        dense_out.update(peft_dense_svd_merge(loras, weights, RANK, names))

    t_dense = h.measure(dense, warmup=0, repeats=1)
    dense_ms = t_dense.ms * scale
    dense_label = "peft dense SVD" + (f" ({len(names)} of {len(all_names)} modules, x{scale:g})" if quick else "")

    def kf_merge():
        return kf.merge(loras, weights, method="svd", rank=RANK)

    timed = {}
    for backend in ("reference", "cpp"):
        merged, why = h.try_backend(backend, kf_merge)
        if why:
            timed[backend] = (None, why, None)
            continue
        with kf.use_backend(backend):
            # Up to 61 runs over ~10 s: this VM's slow phases last seconds, and a
            # median over a 2 s window can land wholly inside one.
            t = h.measure(kf_merge, budget_s=3.0 if quick else 10.0, max_repeats=61)
        timed[backend] = (t, None, rel_err(merged, dense_out))

    t_cpp = timed["cpp"][0]
    shapes = [(n_out, n_in) for n_out, n_in in h.llama_shapes().values()]
    flops = cpp_merge_flops(shapes, k * RANK, RANK)

    def ratio(ms):
        return ms / t_cpp.ms if t_cpp else "n/a"

    rows = [[case, dt, dense_label, dense_ms, 1, ratio(dense_ms), None, None, None, None]]
    for backend in ("reference", "cpp"):
        t, why, err = timed[backend]
        label = f"kf {backend}"
        if why:
            rows.append([case, dt, label, why, None, why if backend == "cpp" else "n/a", None, None, None, None])
            continue
        gf = pct64 = pct32 = None
        if backend == "cpp":
            gf = flops / t.seconds / 1e9
            pct64 = 100 * gf / h.ceiling(machine, torch.float64)
            pct32 = 100 * gf / h.ceiling(machine, torch.float32)
        rows.append([case, dt, label, t.ms, t.runs, ratio(t.ms), gf, pct64, pct32, err])
    return rows


def main(argv=None) -> None:
    args = h.parse_quick(__doc__, "dense path on 8 modules, scaled by 8", argv)
    machine = h.machine_info()
    rows = []
    for k in (2, 8):
        for dtype in (torch.float32, torch.float16):
            rows.extend(run_case(k, dtype, args.quick, machine))
    headers = ["case", "dtype", "path", "time ms", "runs", "x (cpp)", "cpp GFLOP/s", "% fp64 peak",
               "% fp32 peak", "rel. err vs dense"]
    scope = "dense path timed on 8 modules and scaled x8" if args.quick else "all paths over all 64 modules"
    notes = f"""
SVD merge of k adapters (r={RANK}, weights 1/k) into rank {RANK}, over the 64 Llama-3.2-1B attention modules
(16 layers x q/k/v/o: 2048x2048, 512x2048, 512x2048, 2048x2048); {scope}.
`time ms`: median over `runs` (the dense path: one run, no warm-up). `x (cpp)`: row time / cpp time.
cpp flops per module: (n_out+n_in) R^2 + 8/3 R^3 + 6 R^2 r + 2 (n_out+n_in) R r, R = k r; % of the FMA ceiling.
`rel. err vs dense`: max_module ||B'A' - B_d A_d||_F / ||B_d A_d||_F against the dense path's factors.
"""
    h.report("merge-quick" if args.quick else "merge", "SVD merge: peft dense vs kmerge_fast", headers, rows,
             notes, vars(args))


if __name__ == "__main__":
    main()
