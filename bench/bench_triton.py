"""The Triton backend on a GPU: SVD merge and newcomer-vs-8 similarity (GPU ONLY).

This benchmark needs a CUDA device and Triton (``pip install 'kmerge_fast[triton]'``).
Without them it prints why and exits with status 2, timing nothing. It has never
been run on the development machine (no GPU there), so ``results/triton.*`` only
exist where someone ran it on a GPU. Run from the repository root::

    python -m bench.bench_triton            # all rows, the dense peft path over all 64 modules
    python -m bench.bench_triton --quick    # dense peft path on 8 modules, scaled x8

Shapes: the 64 Llama-3.2-1B attention modules (``harness.llama_shapes``), rank
r = 32, scaling 2 (``harness.random_adapters``), float16 and float32, every
adapter on the GPU. Rows, all on the same GPU:

- SVD merge of k = 2 and k = 8 adapters (weights 1/k) into rank 32:
  ``peft dense SVD`` (``bench_merge.peft_dense_svd_merge``: dense dW per module,
  full ``torch.linalg.svd``; timed once after a one-module warm-up, with
  ``torch.cuda.synchronize``), ``kf reference`` (torch QR + SVD per module),
  ``kf triton`` (float64 Grams on the GPU, their R x R algebra on the host's
  cores in C++, one rebuild launch) and ``kf triton, algebra on GPU`` (the
  same with ``HOST_ALGEBRA = False``: batched torch.linalg on the GPU);
- cosine similarity of 1 newcomer vs 8 stored adapters: ``dense float32``
  (``bench_similarity.dense_similarity``), ``kf reference`` and ``kf triton``,
  cold (every norm recomputed) and warm (the stored adapters' norms cached).

Timing: ``triton.testing.do_bench`` (median, ms) of the whole call, host work
included (module tables, launches, the device-to-host copy of similarities).
Throughput: the algorithmic flop counts of ``bench_merge.cpp_merge_flops`` and
``bench_similarity.gram_flops``, and the unique factor bytes the call must read
(merge: the stacks twice, plus the outputs), against this GPU's measured peaks:
dense fp16 / fp32 (no TF32) / fp64 ``torch.matmul`` and a device-to-device copy.

Targets (printed with PASS / MISS): triton >= 100x faster than the dense path,
>= 3x faster than the torch reference, newcomer-vs-8 similarity < 1 ms.
"""

from __future__ import annotations

import sys
import time

import torch

import kmerge_fast as kf

from . import harness as h
from .bench_merge import cpp_merge_flops, peft_dense_svd_merge
from .bench_similarity import dense_similarity, gram_flops

RANK = h.LLAMA_1B_RANK
STORED = 8
TARGET_VS_DENSE = 100.0
TARGET_VS_REFERENCE = 3.0
TARGET_SIMILARITY_MS = 1.0


def why_not_runnable() -> str | None:
    """None if this machine can run the benchmark, else the reason."""
    from kmerge_fast.ops.backend.triton import _interpret_env

    if _interpret_env():
        return "TRITON_INTERPRET is set: the benchmark times compiled kernels (unset it)"
    if not torch.cuda.is_available():
        return "no CUDA device: this benchmark runs on a GPU only"
    reason = kf.ops.unavailable_reasons().get("triton")
    if reason:
        return f"the triton backend is unavailable: {reason}"
    return None


# ----------------------------------------------------------------- the GPU
def gpu_peaks(device: torch.device) -> dict:
    """Measured peaks of this GPU: matmul TFLOP/s per dtype and copy GB/s."""
    from triton.testing import do_bench

    props = torch.cuda.get_device_properties(device)
    out = {"gpu": props.name, "sms": props.multi_processor_count,
           "memory_gib": round(props.total_memory / 2**30, 1)}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 peak without TF32, as the kernels run
    try:
        for dtype, n in ((torch.float16, 8192), (torch.float32, 4096), (torch.float64, 4096)):
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            ms = do_bench(lambda: torch.matmul(a, b), return_mode="median")
            out[f"peak_{h.dtype_name(dtype)}_tflops"] = round(2 * n**3 / ms / 1e9, 1)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    out["peak_copy_gbs"] = round(2 * src.numel() / ms / 1e6, 1)  # read + write
    del src, dst
    torch.cuda.empty_cache()
    return out


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def once_ms(fn) -> float:
    """One synchronised wall-clock run (for the minutes-long dense path)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def on_gpu(loras, device):
    return [lora.to(device=device) for lora in loras]


def factor_bytes(shapes, r: int, dtype: torch.dtype) -> int:
    return sum((n_out + n_in) * r for n_out, n_in in shapes) * torch.tensor([], dtype=dtype).element_size()


def run_backend(name: str, fn):
    """(ms, result) with backend ``name`` forced, or (why, None)."""
    result, why = h.try_backend(name, fn)
    if why:
        return why, None
    try:
        with kf.use_backend(name):
            return bench_ms(fn), result
    except Exception as e:  # one broken row never stops the benchmark
        print(f"[bench] timing {name!r} failed: {e!r}", file=sys.stderr)
        return f"error: {type(e).__name__}", None


# ------------------------------------------------------------------- cases
def merge_rows(k: int, dtype: torch.dtype, quick: bool, device, peaks: dict, checks: list) -> list[list]:
    loras = on_gpu(h.random_adapters(k, dtype, seed=k), device)
    weights = [1.0 / k] * k
    all_names = list(h.llama_shapes())
    names = all_names[:8] if quick else all_names
    scale = len(all_names) / len(names)
    shapes = list(h.llama_shapes().values())
    case, dt = f"merge k={k}", h.dtype_name(dtype)

    dense_out: dict = {}
    peft_dense_svd_merge(loras, weights, RANK, names[:1])  # cuSOLVER / cuBLAS initialisation
    dense_ms = once_ms(lambda: dense_out.update(peft_dense_svd_merge(loras, weights, RANK, names))) * scale
    dense_label = "peft dense SVD" + (f" ({len(names)} modules, x{scale:g})" if quick else "")

    def merge():
        return kf.merge(loras, weights, method="svd", rank=RANK)

    def merge_algebra_on_gpu():
        from kmerge_fast.ops.backend import triton as triton_backend

        triton_backend.HOST_ALGEBRA = False
        try:
            return merge()
        finally:
            triton_backend.HOST_ALGEBRA = True

    timed = {b: run_backend(b, merge) for b in ("reference", "triton")}
    timed["triton, algebra on GPU"] = run_backend("triton", merge_algebra_on_gpu)
    flops = cpp_merge_flops(shapes, k * RANK, RANK)
    nbytes = 2 * factor_bytes(shapes, k * RANK, dtype) + factor_bytes(shapes, RANK, dtype)
    t_tr = timed["triton"][0] if isinstance(timed["triton"][0], float) else None
    rows = [[case, dt, dense_label, dense_ms, 1.0, None, None, None, None, None]]
    for backend in ("reference", "triton", "triton, algebra on GPU"):
        ms, merged = timed[backend]
        if not isinstance(ms, float):
            rows.append([case, dt, f"kf {backend}", ms, "n/a", None, None, None, None, None])
            continue
        tflops = flops / ms / 1e9
        gbs = nbytes / ms / 1e6
        err = rel_err(merged, dense_out)
        rows.append([case, dt, f"kf {backend}", ms, dense_ms / ms, tflops,
                     100 * tflops / peaks["peak_float64_tflops"], gbs, 100 * gbs / peaks["peak_copy_gbs"], err])
    if t_tr:
        checks.append((f"{case} {dt}: triton vs dense", dense_ms / t_tr, TARGET_VS_DENSE))
        if isinstance(timed["reference"][0], float):
            checks.append((f"{case} {dt}: triton vs torch reference", timed["reference"][0] / t_tr,
                           TARGET_VS_REFERENCE))
    return rows


def rel_err(merged: kf.LoRA, dense: dict) -> float:
    """max over ``dense``'s modules of ||B'A' - B_d A_d||_F / ||B_d A_d||_F (float64, on the GPU)."""
    worst = 0.0
    for name, (a_d, b_d) in dense.items():
        m = merged.modules[kf.lora.canonical_name(name)]
        ref = b_d.double() @ a_d.double()
        got = m.scaling * (m.B.double() @ m.A.double())
        worst = max(worst, float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)))
    return worst


def similarity_rows(dtype: torch.dtype, device, peaks: dict, checks: list) -> list[list]:
    adapters = on_gpu(h.random_adapters(1 + STORED, dtype, seed=1), device)
    new, stored = adapters[0], adapters[1:]
    shapes = list(h.llama_shapes().values())
    case, dt = f"cos 1 vs {STORED}", h.dtype_name(dtype)
    dense_sims = dense_similarity(new, stored)
    dense_ms = bench_ms(lambda: dense_similarity(new, stored))
    rows = [[case, dt, "dense float32 (published)", dense_ms, 1.0, None, None, None, None, 0.0]]

    def cold():
        h.reset_norm_caches(adapters)
        return kf.similarity_matrix([new], stored, metric="cos")[0]

    def warm():
        h.reset_norm_caches([new])  # the newcomer is new; the stored norms stay cached
        return kf.similarity_matrix([new], stored, metric="cos")[0]

    flops = {"cold": gram_flops(shapes, RANK, STORED, 1 + STORED), "warm": gram_flops(shapes, RANK, STORED, 1)}
    nbytes = factor_bytes(shapes, RANK, dtype) * (1 + STORED)  # unique bytes: every adapter read once
    for backend in ("reference", "triton"):
        for temp, fn in (("cold", cold), ("warm", warm)):
            h.reset_norm_caches(adapters)
            if temp == "warm":  # fill the stored norms' cache for this backend
                h.try_backend(backend, lambda: kf.similarity_matrix(stored, stored[:1], metric="cos"))
            ms, sims = run_backend(backend, fn)
            label = f"kf {backend} ({temp})"
            if not isinstance(ms, float):
                rows.append([case, dt, label, ms, "n/a", None, None, None, None, None])
                continue
            tflops = flops[temp] / ms / 1e9
            gbs = nbytes / ms / 1e6
            rows.append([case, dt, label, ms, dense_ms / ms, tflops, 100 * tflops / peaks["peak_float32_tflops"],
                         gbs, 100 * gbs / peaks["peak_copy_gbs"], float((sims.cpu() - dense_sims).abs().max())])
            if backend == "triton":
                checks.append((f"{case} {dt} ({temp}): triton ms", ms, TARGET_SIMILARITY_MS))
                ref = next((r[3] for r in rows if r[2] == f"kf reference ({temp})" and isinstance(r[3], float)), None)
                if ref:
                    checks.append((f"{case} {dt} ({temp}): triton vs torch reference", ref / ms, TARGET_VS_REFERENCE))
    return rows


def print_targets(checks: list) -> str:
    lines = []
    for label, value, target in checks:
        if label.endswith(" ms"):
            ok = value < target
            lines.append(f"{'PASS' if ok else 'MISS'}  {label}: {value:.3f} ms (target < {target:g} ms)")
        else:
            ok = value >= target
            lines.append(f"{'PASS' if ok else 'MISS'}  {label}: {value:.1f}x (target >= {target:g}x)")
    text = "\n".join(lines)
    print("\nTargets:\n" + text)
    return text


def main(argv=None) -> int:
    args = h.parse_quick(__doc__, "dense peft path on 8 modules, scaled x8", argv)
    reason = why_not_runnable()
    if reason:
        print(f"bench_triton: not run: {reason}.", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    peaks = gpu_peaks(device)
    print(f"GPU: {peaks}", flush=True)
    rows, checks = [], []
    for dtype in (torch.float16, torch.float32):
        for k in (2, 8):
            rows.extend(merge_rows(k, dtype, args.quick, device, peaks, checks))
        rows.extend(similarity_rows(dtype, device, peaks, checks))
    headers = ["case", "dtype", "path", "time ms", "x (vs dense)", "TFLOP/s", "% fp64 / fp32 peak", "GB/s",
               "% copy peak", "err vs dense"]
    targets = print_targets(checks)
    scope = "dense path timed on 8 modules and scaled x8" if args.quick else "all paths over all 64 modules"
    notes = f"""
GPU {peaks['gpu']} ({peaks['sms']} SMs, {peaks['memory_gib']} GiB); measured peaks: fp16 matmul
{peaks['peak_float16_tflops']} TFLOP/s, fp32 (no TF32) {peaks['peak_float32_tflops']}, fp64
{peaks['peak_float64_tflops']}, device copy {peaks['peak_copy_gbs']} GB/s. triton {__import__('triton').__version__}.
Llama-3.2-1B attention shapes (64 modules), r={RANK}; {scope}. `time ms`: triton.testing.do_bench median of the
whole call (the dense merge: one synchronised run after a one-module warm-up). `% fp64 / fp32 peak`: merge rows
against the fp64 matmul peak (the Grams and the rebuild accumulate in float64), similarity rows against fp32.
`GB/s`: unique factor bytes the call must read (merge: both stacks twice, plus the outputs) / time.
`err vs dense`: merge: max_module ||B'A' - B_d A_d||_F / ||B_d A_d||_F; similarity: max |diff| of the 8 values.

Targets:
{targets}
"""
    h.report("triton-quick" if args.quick else "triton", "Triton backend on a GPU: SVD merge and similarity",
             headers, rows, notes, {**vars(args), "gpu": peaks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
