"""Shared helpers of the benchmark suite: timing, machine info, a measured
machine peak, Llama-3.2-1B-shaped random adapters, and result tables.

Timing: :func:`measure` runs ``warmup`` untimed calls, then ``N`` timed calls
(``time.perf_counter``) and reports the median; ``N`` adapts to the cost of
one call (``budget_s / t_warmup``, clamped to ``[1, max_repeats]``), so slow
cases are timed down to a single run.

Results: :func:`report` prints a markdown table (with a machine header and the
load average) to stdout, appends one JSON line per run to
``bench/results/<name>.jsonl`` and rewrites ``bench/results/<name>.md`` with
the latest table.
"""

from __future__ import annotations

import argparse

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

import kmerge_fast as kf

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------- shapes
#: Llama-3.2-1B attention projections, (n_out, n_in) of the base weight.
LLAMA_1B_ATTENTION = {"q_proj": (2048, 2048), "k_proj": (512, 2048), "v_proj": (512, 2048), "o_proj": (2048, 2048)}
LLAMA_1B_LAYERS = 16
LLAMA_1B_RANK = 32
#: peft's scaling lora_alpha / r = 64 / 32.
LLAMA_1B_SCALING = 2.0


def llama_shapes(layers: int = LLAMA_1B_LAYERS, projections: dict | None = None) -> dict[str, tuple[int, int]]:
    """Module name -> (n_out, n_in) for ``layers`` layers, names like
    ``model.layers.{i}.self_attn.q_proj`` (16 layers x 4 projections = 64 modules)."""
    projections = projections or LLAMA_1B_ATTENTION
    return {f"model.layers.{i}.self_attn.{p}": shape for i in range(layers) for p, shape in projections.items()}


def random_adapters(k: int, dtype: torch.dtype = torch.float32, shapes: dict | None = None,
                    rank: int = LLAMA_1B_RANK, scaling: float = LLAMA_1B_SCALING, seed: int = 0) -> list[kf.LoRA]:
    """``k`` random adapters over ``shapes`` (default: all 64 Llama-3.2-1B attention modules).

    Per module (n_out, n_in): A ~ N(0, 1) / sqrt(n_in) of shape (rank, n_in),
    B ~ 0.01 N(0, 1) of shape (n_out, rank), drawn in float32 then cast to ``dtype``.
    """
    shapes = shapes or llama_shapes()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        factors = {}
        for name, (n_out, n_in) in shapes.items():
            a = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            b = 0.01 * torch.randn(n_out, rank, generator=g)
            factors[name] = (a.to(dtype), b.to(dtype))
        out.append(kf.LoRA.from_factors(factors, scaling=scaling))
    return out


def reset_norm_caches(loras: Sequence[kf.LoRA]) -> None:
    """Forget every module's cached ||dW||_F^2 (a "cold" similarity call)."""
    for lora in loras:
        lora.clear_caches()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------- timing
@dataclass
class Timing:
    """Median seconds of ``runs`` timed calls (all the samples in ``samples``)."""

    seconds: float
    runs: int
    samples: list[float] = field(default_factory=list)

    @property
    def ms(self) -> float:
        return 1e3 * self.seconds


def measure(fn: Callable[[], object], *, setup: Callable[[], object] | None = None, warmup: int = 1,
            repeats: int | None = None, budget_s: float = 3.0, max_repeats: int = 15) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then the median of N timed calls.

    N is ``repeats`` if given, else ``budget_s / (time of the last warm-up)``
    clamped to [1, max_repeats] (1 when there was no warm-up). ``setup()``
    runs before every call, outside the timed region.
    """
    last = None
    for _ in range(warmup):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
    if repeats is None:
        repeats = 1 if last is None else max(1, min(max_repeats, int(budget_s / max(last, 1e-9))))
    samples = []
    for _ in range(repeats):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), repeats, samples)


def try_backend(name: str, fn: Callable[[], object]) -> tuple[object | None, str | None]:
    """Run ``fn()`` with backend ``name`` forced: (result, None), or (None, why not).

    A backend missing on this machine gives "unavailable"; one that raises
    (e.g. a C++ backend under construction) gives "error: <type>" and the
    traceback goes to stderr, so one broken row never stops the benchmark.
    """
    if name not in kf.backends():
        return None, "unavailable"
    try:
        with kf.use_backend(name):
            return fn(), None
    except Exception as e:  # report and keep benchmarking the other rows
        print(f"[bench] backend {name!r} failed: {e!r}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return None, f"error: {type(e).__name__}"


# --------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest SIMD extensions the CPU reports (x86: avx512f / avx2 / amx; else the machine)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve"]
    return " ".join(f for f in wanted if f in flags) or platform.machine()


def git_commit() -> str:
    """``git rev-parse --short HEAD`` (+ "-dirty" when the tree has changes), or "uncommitted"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "") if head else "uncommitted"
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n x n ``torch.matmul`` (2 n^3 flops) on all torch threads, best of ``repeats``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    b = torch.randn(n, n, generator=g, dtype=dtype)
    t = measure(lambda: torch.matmul(a, b), warmup=1, repeats=repeats)
    return 2 * n ** 3 / min(t.samples) / 1e9


def copy_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """GB/s (bytes read + written) of ``dst.copy_(src)`` on ``mib`` MiB float32 tensors, all threads, best of ``repeats``.

    The ceiling of the memory-bound ops (``bench_ops``'s weighted_sum rows): a
    streaming copy far larger than the caches.
    """
    src = torch.ones(mib << 18)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), warmup=1, repeats=repeats)
    return 2 * src.numel() * src.element_size() / min(t.samples) / 1e9


def fma_peak(dtype: torch.dtype) -> float | None:
    """GFLOP/s ceiling of independent vector multiply-adds on all cores (``_C.fma_peak``), or None without the C++ core.

    The "% of peak" columns use it: on some CPUs torch's BLAS runs a narrower
    code path than the hardware offers (MKL on AMD), so ``matmul_peak`` is not a ceiling.
    """
    try:
        from kmerge_fast import _C
    except ImportError:
        return None
    return max(_C.fma_peak(dtype == torch.float64, 0, 0.2) for _ in range(3))


def ceiling(machine: dict, dtype: torch.dtype) -> float:
    """The machine's GFLOP/s ceiling for ``dtype`` arithmetic: the FMA peak, else the matmul peak."""
    key = "fp64" if dtype == torch.float64 else "fp32"
    return machine.get(f"fma_peak_{key}_gflops") or machine[f"peak_{key}_gflops"]


_MACHINE: dict | None = None


def machine_info() -> dict:
    """CPU, cores, threads, versions, backends, the GPU (if any), commit, the measured fp32 / fp64 matmul peak
    and FMA ceiling (of the CPU)."""
    global _MACHINE
    if _MACHINE is None:
        _MACHINE = {
            "cpu": cpu_model(),
            "isa": cpu_isa(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kmerge_fast": kf.__version__,
            "backends": kf.backends(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "commit": git_commit(),
            "peak_fp32_gflops": round(matmul_peak(torch.float32), 1),
            "peak_fp64_gflops": round(matmul_peak(torch.float64), 1),
            "copy_gbs": round(copy_bandwidth(), 1),
        }
        for dtype, key in ((torch.float32, "fp32"), (torch.float64, "fp64")):
            peak = fma_peak(dtype)
            _MACHINE[f"fma_peak_{key}_gflops"] = round(peak, 1) if peak else None
    return _MACHINE


def machine_header(m: dict) -> str:
    return (f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, torch threads {m['torch_threads']}; "
            f"python {m['python']}, torch {m['torch']}, kmerge_fast {m['kmerge_fast']} @ {m['commit']}; "
            f"backends {m['backends']}" + (f"; GPU {m['gpu']}" if m.get("gpu") else "") + ".\n"
            f"Measured peak (2048^3 torch.matmul, all threads): fp32 {m['peak_fp32_gflops']} GFLOP/s, "
            f"fp64 {m['peak_fp64_gflops']} GFLOP/s; multiply-add ceiling (_C.fma_peak, all cores): "
            f"fp32 {m.get('fma_peak_fp32_gflops')} GFLOP/s, fp64 {m.get('fma_peak_fp64_gflops')} GFLOP/s; "
            f"memory copy (256 MiB, read + write): {m.get('copy_gbs')} GB/s.")


# ----------------------------------------------------------------- tables
def fmt(x, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals (3 significant for small ones), strings as is."""
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and abs(x) < 0.1:
            return f"{x:.2e}"
        return f"{x:,.{digits}f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, title: str, headers: Sequence[str], rows: Sequence[Sequence], notes: str = "",
           args: dict | None = None) -> str:
    """Print the table, append a JSON line to results/<name>.jsonl, rewrite results/<name>.md."""
    m = machine_info()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    table = markdown_table(headers, rows)
    text = (f"# {title}\n\n{stamp}. {machine_header(m)}\n"
            f"Load average (1 / 5 / 15 min) when the table was written: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.\n\n"
            f"{table}\n")
    if notes:
        text += f"\n{notes.strip()}\n"
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {"time": stamp, "name": name, "args": args or {}, "machine": m, "loadavg": load,
              "rows": [dict(zip(headers, row)) for row in rows]}
    with open(RESULTS_DIR / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(text)
    return text


# ---------------------------------------------------------------- memory
_LIBC = None


def _trim() -> None:
    """glibc ``malloc_trim(0)``: give freed heap pages back, so the next call's peak is its own."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_call(fn) -> tuple[float, float | None, float]:
    """(seconds, peak extra MiB or None when the peak cannot be reset, retained MiB) of one ``fn()``."""
    gc.collect()
    _trim()
    before = _status_kib("VmRSS")
    can_peak = _reset_peak()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    gc.collect()
    _trim()
    after = _status_kib("VmRSS")
    return seconds, (hwm - before) / 1024 if can_peak else None, (after - before) / 1024


def parse_quick(doc: str, quick_help: str, argv=None) -> argparse.Namespace:
    """The benches' command line: ``--quick`` (what it shortens: ``quick_help``); the
    description is the first paragraph of the bench module's docstring ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser.parse_args(argv)
