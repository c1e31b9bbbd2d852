"""The Triton backend: the GPU path. See ``ops/contract.py`` for the op contracts.

Selection: chosen automatically for CUDA tensors when Triton is installed
(``pip install 'kmerge_fast[triton]'``). Without Triton the package works as
before and :func:`unavailable_reason` says why this backend is missing.
Nothing here touches CUDA at import time; Triton itself is imported when the
backend is about to be used (``kernels.py`` beside this file): on a CUDA
machine at the first dispatch, never for CPU tensors that are not forced
onto it.

CPU tensors: never picked automatically. With ``TRITON_INTERPRET=1`` set
before Triton is first imported, the same kernels run on CPU tensors under
Triton's interpreter (numpy, slow) when the backend is forced
(``kf.use_backend("triton")`` or ``KMERGE_FAST_BACKEND=triton``): this is how
the kernels are tested on machines without a GPU. The dispatcher
(``ops/__init__.py``) takes both decisions: it picks this backend for CPU
tensors only when forced (:func:`manual_only_reason`), and hands batches
holding float64 (which this backend does not run) to the reference.

How each op runs (every launch covers the whole batch; work items are rows
of an int64 table of addresses, sizes and strides, see ``kernels.py``):

- ``inner_products``: one program per (module, x, y) pair
  computes both cross-Grams B_x^T B_y and A_x A_y^T tile by tile and reduces
  their elementwise product to the inner product; launches are grouped by
  rank bucket (16 / 32 / 64-wide tiles, 32 at most in float64) and layout
  (contiguous, 16-byte aligned: vectorised loads). Fast mode: fp16 / bf16
  tensor-core products with float32 accumulation, float32 inputs without
  TF32; ``precise``: float64 accumulation. Symmetric
  batches compute each pair once.
- ``truncate``: float64 Grams Gb = B^T B, Ga = A A^T of the stacks (block
  pairs i <= j, mirrored), the R x R core algebra of the C++ backend
  (grouped by stacked rank; on the host's cores with the C++ core of the cpp
  backend when it is built, else ``ops/numerics/gram_svd.py``'s batched
  Cholesky and ``torch.linalg.eigh`` in float64 on the device: ``HOST_ALGEBRA``),
  then one launch rebuilds every B' =
  [c_i B_i] T_B and A'^T = [A_i^T] T_A (float64 accumulation, one rounding
  to the output dtype).
- ``stack``: one copy launch for every block of every module.
- ``max_abs`` (every op's scaling pre-pass): one program per 2-D factor, one
  launch per dtype and tile shape; NaN tracked apart from the maximum.
- ``diff_stats``: tiles of dW_x - dW_y are formed in registers (each term on
  its own, so identical updates cancel exactly), reduced to partial sums and
  maxima per (pair, split); dW is never written to memory.
- ``dense_combine``: each output tile forms every term's tile in registers,
  applies its keep rule (magnitude threshold or the DARE counter hash in
  uint64, bit-exact with ``elementwise.dare_mask``) and combines (SUM, or
  TIES in two passes: election, then merge); only the result is stored.
- ``weighted_sum``: the reference's torch ops on the device (elementwise and
  memory-bound: a kernel would only fuse the passes).
- ``abs_kth``: simpler than the C++ radix select: the update coef * B A is
  formed by the ``dense_combine`` kernel (one term, so the values are
  bit-identical to the ones the merge prunes) into one float32 buffer of
  n_out x n_in (one module at a time: 16 MiB for 2048 x 2048), then
  ``torch.kthvalue``. This is the one op that stores a dense update.

Inputs: float32 / float16 / bfloat16 factors; a batch mixing those dtypes
is converted to float32 (exact) first; a batch holding any other dtype
(float64) runs on the reference backend. Results follow the reference: Grams
and statistics as float64 CPU tensors, factors and dense updates on the
factors' device.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections import defaultdict

import torch

from ....errors import BackendError
from ...contract import (COMBINE_MODES, KEEP_KINDS, MAGNITUDE, SIGN_METHODS, SUM, CombineBatch, DiffBatch, Factor,
                         FactorBatch, InnerBatch, Keep, KthBatch, Pair, SumBatch)
from ...numerics import scaling
from ...numerics.gram_svd import core_transforms
from .. import reference as _reference

NAME = "triton"

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_kernels = None
_import_error: str | None = None

#: Tile sizes on a GPU: K rows per Gram step, largest dense output tile side, copy
#: tiles, rows per rebuild tile, smallest tile side (tl.dot needs 16). Under the
#: interpreter (``_tiles``) tiles are larger and may be narrower: it pays per
#: operation, and its dot per padded element, so few, tight programs run fastest.
#: Tile and warp choices keep every kernel free of register spills on sm_90 (checked
#: with ptxas through ``triton.compile``, not timed: no GPU was available).
GPU_TILES = {"gram_bk": 64, "dense": 64, "copy": 64, "apply_bk": 64, "min": 16}
INTERPRETER_TILES = {"gram_bk": 512, "dense": 256, "copy": 128, "apply_bk": 512, "min": 1}


def _tiles() -> dict:
    return INTERPRETER_TILES if _kernels.INTERPRETED else GPU_TILES


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def _load_kernels():
    """The kernels module (imports Triton on first use), or None with ``_import_error`` set."""
    global _kernels, _import_error
    if _kernels is None and _import_error is None:
        try:
            from . import kernels
        except Exception as e:  # ImportError, or a broken Triton install
            _import_error = f"{type(e).__name__}: {e}"
        else:
            _kernels = kernels
    return _kernels


def _interpreted() -> bool:
    """Whether the kernels run (or, not imported yet, will run) under Triton's interpreter."""
    return _kernels.INTERPRETED if _kernels is not None else _interpret_env()


def unavailable_reason() -> str | None:
    """Why the backend cannot run here, or None. Imports Triton only where it will be used
    (a CUDA device): dispatching CPU tensors stays cheap even with TRITON_INTERPRET=1 set."""
    if importlib.util.find_spec("triton") is None:
        return "cannot import triton: No module named 'triton' (pip install 'kmerge_fast[triton]')"
    if _import_error is not None:
        return f"cannot import triton: {_import_error}"
    if _interpreted():
        return None  # CPU tensors, when forced; Triton is imported on that first use
    if not torch.cuda.is_available():
        return "no CUDA device (Triton kernels need a GPU; TRITON_INTERPRET=1 runs them on the CPU for tests)"
    if _load_kernels() is None:
        return f"cannot import triton: {_import_error}"
    return None


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    device = torch.device(device)
    if dtype not in _SUPPORTED:
        return f"dtype {dtype} is not one of {list(_SUPPORTED)} (float64 runs on the cpp / reference backends)"
    for _ in range(2):  # decided from the environment, then confirmed once the kernels are imported
        if device.type == "cuda":
            if _interpreted():
                return ("TRITON_INTERPRET=1: the kernels were built for Triton's CPU interpreter; "
                        "CUDA tensors need compiled kernels (unset TRITON_INTERPRET)")
        elif device.type == "cpu":
            if not _interpreted():
                return ("CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1 before Triton is "
                        "imported) with the backend forced")
        else:
            return f"tensors on {device}; the Triton backend runs on CUDA devices"
        if _kernels is not None:
            return None
        if _load_kernels() is None:
            return f"cannot import triton: {_import_error}"
    return None


def manual_only_reason(device: torch.device) -> str | None:
    if torch.device(device).type == "cpu":
        return ("CPU tensors run under Triton's interpreter (slow, for tests) only when the backend is "
                "forced: kf.use_backend('triton') or KMERGE_FAST_BACKEND=triton")
    return None


def _require():
    """The kernels module; ops called directly (not through the dispatch) import it here."""
    kernels = _load_kernels()
    if kernels is None:
        raise BackendError(f"backend 'triton' is unavailable: cannot import triton: {_import_error}")
    return kernels


# ------------------------------------------------------------------ helpers
def _tl_dtype(dtype: torch.dtype):
    tl = _kernels.tl
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}[dtype]


def _fast_dot(dtype: torch.dtype):
    """tl.dot operand type for float32 accumulation of ``dtype`` inputs (half products are exact)."""
    tl = _kernels.tl
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not _kernels.INTERPRETED:  # the interpreter's dot has no bf16
        return tl.bfloat16
    return tl.float32


def _precise_dtype(dtype: torch.dtype) -> torch.dtype:
    """The element type that kernels with float64 tl.dot operands read: float32 (an exact copy) for
    fp16 / bf16 factors. Triton 3.6 cannot compile a float64 dot whose operands were loaded as 16-bit
    values (its NVIDIA lowering asserts "fp64 don't support largeK MMA"); the interpreter can, but both
    take this one path."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _common_dtype(tensors) -> torch.dtype:
    """The one element type of a launch: the tensors' dtype, float32 if they mix
    supported dtypes (exact for fp16 / bf16)."""
    dtypes = {t.dtype for t in tensors}
    if not dtypes <= set(_SUPPORTED):  # the dispatcher sends such batches to the reference
        raise BackendError(f"backend 'triton' cannot run {sorted(map(str, dtypes - set(_SUPPORTED)))}")
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _conv(f: Factor, dtype: torch.dtype) -> Factor:
    if f.A.dtype == dtype and f.B.dtype == dtype:
        return f
    return Factor(f.A.to(dtype), f.B.to(dtype), f.coef)


def _aligned(*tensors: torch.Tensor, ranks=(), lengths=()) -> bool:
    """The kernels' ALIGN hints hold: addresses at 16 bytes, row strides and ranks at 8
    elements, lengths (the dimensions the kernel streams) at 16."""
    return (all(t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 for t in tensors)
            and all(r % 8 == 0 for r in ranks) and all(n % 16 == 0 for n in lengths))


def _bucket(r: int, hi: int = 64) -> int:
    """Tile side for sizes up to r: a power of two in [the smallest tile side, hi]."""
    return max(_tiles()["min"], min(hi, 1 << max(0, int(r) - 1).bit_length()))


def _dense_tile(n_out: int, n_in: int) -> tuple[int, int]:
    """(BM, BN) output tile of a dense update: up to the dense tile side, no wider than needed."""
    side = _tiles()["dense"]
    return _bucket(n_out, side), _bucket(n_in, side)


def _table(rows, device, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype).to(device)


def _launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    if any(g == 0 for g in grid):
        return
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _device_of(factor_lists) -> torch.device:
    for factors in factor_lists:
        for f in factors:
            return f.A.device
    return torch.device("cpu")


def _signed64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _float32_at_least(tau: float) -> float:
    """The smallest float32 >= tau (|v| >= it iff |v| >= tau for every float32 v); NaN stays NaN."""
    t = torch.tensor(tau, dtype=torch.float32)
    if not math.isnan(tau) and float(t) < tau:
        t = torch.nextafter(t, torch.tensor(math.inf))
    return float(t)


class _Desc:
    """What the pair kernels read of one factor, computed once per factor and call."""

    __slots__ = ("fields", "r", "contig", "aligned")

    def __init__(self, f: Factor):
        a, b = f.A, f.B
        r, n_in = a.shape
        n_out = b.shape[0]
        sb, sa = b.stride(), a.stride()
        #: B, A addresses, r, n_out, n_in, B strides (row, col), A strides (row, col)
        self.fields = [b.data_ptr(), a.data_ptr(), r, n_out, n_in, *sb, *sa]
        self.r = r
        self.contig = (sb[1] == 1 or r <= 1) and (sa[1] == 1 or n_in <= 1)
        self.aligned = (self.contig and self.fields[0] % 16 == 0 and self.fields[1] % 16 == 0 and sb[0] % 8 == 0
                        and sa[0] % 8 == 0 and r % 8 == 0 and n_out % 16 == 0 and n_in % 16 == 0)


def _pair_row(x: _Desc, y: _Desc, tail: list[int]) -> list[int]:
    fx, fy = x.fields, y.fields
    row = [fx[0], fx[1], fy[0], fy[1], fx[2], fy[2], fx[3], fx[4], *fx[5:], *fy[5:], *tail]
    return row + [0] * (_kernels.PAIR_COLS - len(row))


def _pair_item(x: _Desc, y: _Desc, tail: list[int], coef: float) -> tuple:
    """A pair_gram_kernel work item: (row, coef, max rank, contiguous, aligned)."""
    return (_pair_row(x, y, tail), coef, max(x.r, y.r), x.contig and y.contig,
            x.aligned and y.aligned)


def _run_pairs(items: list[tuple], dtype: torch.dtype, device: torch.device, out: torch.Tensor | None,
               store: bool, precise: bool) -> None:
    """Launch pair_gram_kernel over ``_pair_item``s, one launch per (tile bucket, layout)."""
    tl = _kernels.tl
    groups = defaultdict(list)
    for row, coef, r, contig, aligned in items:  # float64 tiles past 32 x 32 spill registers
        groups[_bucket(r, hi=32 if precise else 64), contig, aligned].append((row, coef))
    dot_dt, acc_dt = (tl.float64, tl.float64) if precise else (_fast_dot(dtype), tl.float32)
    dummy = out if out is not None else torch.empty(1, dtype=torch.float64, device=device)
    for (br, contig, aligned), group in groups.items():
        itab = _table([row for row, _ in group], device)
        ftab = _table([coef for _, coef in group], device, torch.float64)
        _launch(_kernels.pair_gram_kernel, (len(group),), device, itab, ftab, dummy, DT=_tl_dtype(dtype),
                STORE=store, CONTIG=contig, ALIGN=aligned, BR=br, BK=_tiles()["gram_bk"], DOT_DT=dot_dt, ACC_DT=acc_dt,
                num_warps=4 if precise else 8)


# ---------------------------------------------------------------------- ops
def max_abs(tensors: list[torch.Tensor]) -> list[float]:
    """max |t| per tensor (NaN where it holds NaN, 0.0 when empty), one device sync.

    The non-empty 2-D float32 / float16 / bfloat16 tensors on the first tensor's device (every
    factor of a batch): ``max_abs_kernel``, one launch per (dtype, tile shape). The scaling
    pre-pass of every op asks this for every factor of its batch (1,152 for a newcomer against 8
    stored adapters of 64 modules), where torch launches three kernels per tensor. Anything else: torch.
    """
    if not tensors:
        return []
    _require()
    device = tensors[0].device
    groups = defaultdict(list)  # (dtype, BM, BN) -> positions in tensors
    for i, t in enumerate(tensors):
        if t.dim() == 2 and t.numel() and t.dtype in _SUPPORTED and t.device == device:
            bn = _bucket(t.shape[1], hi=64)
            groups[t.dtype, _bucket(t.shape[0], hi=max(16, 4096 // bn)), bn].append(i)
    order = [i for idx in groups.values() for i in idx]
    out = torch.empty(len(order), dtype=torch.float32, device=device)
    start = 0
    for (dtype, bm, bn), idx in groups.items():
        rows = [[tensors[i].data_ptr(), *tensors[i].shape, *tensors[i].stride()] for i in idx]
        _launch(_kernels.max_abs_kernel, (len(idx),), device, _table(rows, device), out[start:start + len(idx)],
                DT=_tl_dtype(dtype), BM=bm, BN=bn)
        start += len(idx)
    result: list[float] = [0.0] * len(tensors)
    for i, v in zip(order, out.tolist()):
        result[i] = v
    done = set(order)
    rest = [i for i in range(len(tensors)) if i not in done]
    for i, v in zip(rest, scaling.torch_max_abs([tensors[i] for i in rest])):
        result[i] = v
    return result


def all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    return _reference.all_finite(tensors)  # torch reductions on the device


def inner_products(batch: InnerBatch, precise: bool = False) -> list[torch.Tensor]:
    # Factors outside float32's comfortable range run on power-of-two scaled copies (ops/numerics/scaling.py).
    _require()
    return scaling.inner_products(batch, precise, _inner_products, max_abs)


def _inner_products(batch: InnerBatch, precise: bool = False) -> list[torch.Tensor]:
    if not batch:
        return []
    dtype = _common_dtype(t for xs, ys in batch for f in (*xs, *ys) for t in (f.A, f.B))
    if precise:
        dtype = _precise_dtype(dtype)
    device = _device_of(xs for xs, _ in batch)
    items, shapes, base, alive, descs = [], [], 0, [], {}  # alive: converted copies, until the kernels ran

    def desc(f: Factor) -> tuple[_Desc, float]:
        key = id(f)
        if key not in descs:
            g = _conv(f, dtype)
            alive.append((f, g))  # keeps id(f) unique for the call, and the copy alive
            descs[key] = (_Desc(g), float(f.coef))
        return descs[key]

    for xs, ys in batch:
        same = xs is ys
        dx = [desc(f) for f in xs]
        dy = dx if same else [desc(f) for f in ys]
        ny = len(dy)
        for i, (x, cx) in enumerate(dx):
            for j, (y, cy) in enumerate(dy):
                if same and j < i:
                    continue
                mirror = base + j * ny + i if same and j != i else -1
                items.append(_pair_item(x, y, [base + i * ny + j, mirror], cx * cy))
        shapes.append((len(dx), ny))
        base += len(dx) * ny
    out = torch.zeros(base, dtype=torch.float64, device=device)
    _run_pairs(items, dtype, device, out, store=False, precise=precise)
    out = out.cpu()
    result, k = [], 0
    for n, m in shapes:
        result.append(out[k:k + n * m].reshape(n, m))
        k += n * m
    return result


def diff_stats(batch: DiffBatch) -> torch.Tensor:
    _require()
    return scaling.diff_stats(batch, _diff_stats, max_abs)


def _diff_stats(batch: DiffBatch) -> torch.Tensor:
    if not batch:
        return torch.zeros(0, 2, dtype=torch.float64)
    dtype = _common_dtype(t for pair in batch for f in pair for t in (f.A, f.B))
    device = _device_of(batch)
    groups, alive = defaultdict(list), []  # (BM, BN) -> [(position, row, coefs, max r, tiles)]
    for k, (x, y) in enumerate(batch):
        x, y = _conv(x, dtype), _conv(y, dtype)
        alive.append((x, y))
        n_out, n_in = x.B.shape[0], x.A.shape[1]
        bm, bn = _dense_tile(n_out, n_in)
        row = _pair_row(_Desc(x), _Desc(y), [])[:_kernels.DIFF_COLS]
        groups[bm, bn].append((k, row, [float(x.coef), float(y.coef)], max(x.A.shape[0], y.A.shape[0]),
                               -(-n_out // bm) * -(-n_in // bn)))
    total = torch.empty(len(batch), dtype=torch.float64, device=device)
    peak = torch.empty(len(batch), dtype=torch.float64, device=device)
    for (bm, bn), group in groups.items():
        max_tiles = max(g[4] for g in group)
        split = 1
        if not _kernels.INTERPRETED:  # enough programs to fill the GPU: ~4 per SM
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            want = -(-4 * sms // len(group))
            split = min(1 << (max(want, 1) - 1).bit_length(), 1 << (max_tiles - 1).bit_length(), 1024)
        sums = torch.empty(len(group), split, dtype=torch.float64, device=device)
        peaks = torch.empty(len(group), split, dtype=torch.float32, device=device)
        _launch(_kernels.diff_stats_kernel, (len(group), split), device, _table([g[1] for g in group], device),
                _table([g[2] for g in group], device, torch.float32), sums, peaks, SPLIT=split,
                DT=_tl_dtype(dtype), BM=bm, BN=bn, BR=_bucket(max(g[3] for g in group), hi=32),
                DOT_DT=_fast_dot(dtype), num_warps=8,
                # no fused multiply-add: c_x t_x - c_y t_y as fma(c_x, t_x, -c_y t_y) leaves the rounding
                # error of c_y t_y where identical updates must cancel exactly
                enable_fp_fusion=False)
        index = torch.tensor([g[0] for g in group], device=device)
        total[index] = sums.sum(1)
        peak[index] = peaks.amax(1).double()
    peak = torch.where(total.isnan(), total, peak)  # NaN in the difference: both statistics are NaN
    return torch.stack([total, peak], dim=1).cpu()


def weighted_sum(batch: SumBatch, dtype: torch.dtype) -> list[torch.Tensor]:
    _require()
    return _reference.weighted_sum(batch, dtype)


def stack(batch: FactorBatch, dtype: torch.dtype) -> list[Pair]:
    _require()
    if not batch:
        return []
    in_dtype = _common_dtype(t for factors in batch for f in factors for t in (f.A, f.B))
    device = _device_of(batch)
    rows, coefs, out, keep = [], [], [], []
    max_tiles, tile = 1, _tiles()["copy"]
    for factors in batch:
        factors = [_conv(f, in_dtype) for f in factors]
        keep.append(factors)
        rank = sum(f.A.shape[0] for f in factors)
        a = torch.empty(rank, factors[0].A.shape[1], dtype=dtype, device=device)
        b = torch.empty(factors[0].B.shape[0], rank, dtype=dtype, device=device)
        r0 = 0
        for f in factors:
            r = f.A.shape[0]
            for src, dst, coef in ((f.A, a[r0:r0 + r], f.coef), (f.B, b[:, r0:r0 + r], 1.0)):
                rows.append([src.data_ptr(), dst.data_ptr(), src.shape[0], src.shape[1], *src.stride(), *dst.stride()])
                coefs.append(float(coef))
                max_tiles = max(max_tiles, -(-src.shape[0] // tile) * -(-src.shape[1] // tile))
            r0 += r
        out.append((a, b))
    _launch(_kernels.copy_kernel, (len(rows), max_tiles), device, _table(rows, device),
            _table(coefs, device, torch.float32), DT=_tl_dtype(in_dtype), OUT_DT=_tl_dtype(dtype), BM=tile, BN=tile)
    return out


def truncate(batch: FactorBatch, rank: int, dtype: torch.dtype) -> list[Pair]:
    """Best rank-r approximation from float64 Grams, as the C++ backend (see ``cpu.truncate``)."""
    _require()
    return scaling.truncate(batch, rank, dtype, _truncate, max_abs)


#: Where ``truncate`` solves its R x R algebra: True (default) on the host's cores with the C++ core when it
#: is built, else (or False) with torch.linalg on the Grams' device.
HOST_ALGEBRA = True


def _core_transforms(g_b: torch.Tensor, g_a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_B, T_A) from the float64 Grams (batch, R, R), on the host or on the Grams' device (``HOST_ALGEBRA``).

    Why the host: torch.linalg.eigh on CUDA solves a batch of small matrices
    one after another (cuSOLVER); it took 336 of the ~425 ms of a merge of 8
    (64 modules, R = 256) on an H200, where the host's C++ core takes one
    module per core. The Grams cross PCIe once (2 x 64 x 512 KiB for that
    merge), the transforms once back (R x r each).
    """
    from .. import cpp

    if HOST_ALGEBRA and cpp.unavailable_reason() is None:
        return cpp.core_transforms_on_host(g_b, g_a, rank)
    return core_transforms(g_b, g_a, rank)


def _truncate(batch: FactorBatch, rank: int, dtype: torch.dtype) -> list[Pair]:
    if not batch:
        return []
    if rank == 0:
        return [(torch.empty(0, fs[0].A.shape[1], dtype=dtype, device=fs[0].A.device),
                 torch.empty(fs[0].B.shape[0], 0, dtype=dtype, device=fs[0].A.device)) for fs in batch]
    in_dtype = _precise_dtype(_common_dtype(t for factors in batch for f in factors for t in (f.A, f.B)))
    device = _device_of(batch)
    batch = [[_conv(f, in_dtype) for f in factors] for factors in batch]

    # 1. float64 Grams of both stacks, grouped by stacked rank R: (modules, R, R) buffers.
    by_rank = defaultdict(list)
    for k, factors in enumerate(batch):
        by_rank[sum(f.A.shape[0] for f in factors)].append(k)
    grams, slot = {}, {}
    for big_r, idx in by_rank.items():
        grams[big_r] = (torch.zeros(len(idx), big_r, big_r, dtype=torch.float64, device=device),
                        torch.zeros(len(idx), big_r, big_r, dtype=torch.float64, device=device))
        for j, k in enumerate(idx):
            slot[k] = j
    items = []
    for k, factors in enumerate(batch):
        big_r = sum(f.A.shape[0] for f in factors)
        g_b, g_a = grams[big_r]
        descs = [_Desc(f) for f in factors]
        starts = [sum(f.A.shape[0] for f in factors[:i]) for i in range(len(factors))]
        base = slot[k] * big_r * big_r
        for i, x in enumerate(factors):
            for j in range(i, len(factors)):
                y = factors[j]
                pos = 8 * (base + starts[i] * big_r + starts[j])
                mirror = 8 * (base + starts[j] * big_r + starts[i])
                tail = [g_b.data_ptr() + pos, g_b.data_ptr() + mirror, g_a.data_ptr() + pos, g_a.data_ptr() + mirror,
                        big_r, 2 if i == j else 1]
                items.append(_pair_item(descs[i], descs[j], tail, float(x.coef) * float(y.coef)))
    _run_pairs(items, in_dtype, device, None, store=True, precise=True)

    # 2. The R x R algebra in float64, batched over modules of equal R (see ``_core_transforms``).
    transforms = {}
    for big_r, idx in by_rank.items():
        t_b, t_a = _core_transforms(*grams[big_r], rank)
        transforms[big_r] = (t_b.to(device).contiguous(), t_a.to(device).contiguous())

    # 3. Rebuild: B' = [c_i B_i] T_B and A'^T = [A_i^T] T_A, one launch per layout class.
    groups = defaultdict(lambda: ([], [], []))  # (layout, aligned) -> (items, blocks, block coefs)
    out = []
    for k, factors in enumerate(batch):
        big_r = sum(f.A.shape[0] for f in factors)
        t_b, t_a = transforms[big_r]
        n_out, n_in = factors[0].B.shape[0], factors[0].A.shape[1]
        new_b = torch.empty(n_out, rank, dtype=dtype, device=device)
        new_a = torch.empty(rank, n_in, dtype=dtype, device=device)
        out.append((new_a, new_b))
        ranks = [f.A.shape[0] for f in factors]
        for side in "BA":
            if side == "B":  # rows of c_i B_i: (k, c) = B[k, c]; out (k, n) = B'[k, n]
                n, t, o, so = n_out, t_b, new_b, new_b.stride()
                blocks = [(f.B, f.B.stride(0), f.B.stride(1), float(f.coef)) for f in factors]
                layout = 1 if all(s1 == 1 or f.B.shape[1] <= 1 for f, (_, _, s1, _) in zip(factors, blocks)) \
                    and (so[1] == 1 or rank <= 1) else 0
                aligned = layout == 1 and _aligned(new_b, *(f.B for f in factors), ranks=[rank, *ranks],
                                                   lengths=[n])
            else:  # rows of A_i^T: (k, c) = A[c, k]; out (k, n) = A'[n, k]
                n, t, o, so = n_in, t_a, new_a, new_a.stride()[::-1]
                blocks = [(f.A, f.A.stride(1), f.A.stride(0), 1.0) for f in factors]
                layout = 2 if all(s0 == 1 or f.A.shape[1] <= 1 for f, (_, s0, _, _) in zip(factors, blocks)) \
                    and (so[0] == 1 or n <= 1) else 0
                aligned = layout == 2 and _aligned(new_a, *(f.A for f in factors), ranks=[rank, *ranks],
                                                   lengths=[n])
            items, brows, bcoefs = groups[layout, aligned]
            items.append([n, len(factors), len(brows), t[slot[k]].data_ptr(), rank, o.data_ptr(), *so, 0])
            r0 = 0
            for x, s0, s1, coef in blocks:
                r = x.shape[0] if side == "A" else x.shape[1]
                brows.append([x.data_ptr(), r, s0, s1, r0])
                bcoefs.append(coef)
                r0 += r
    bn, bk = _bucket(rank), _tiles()["apply_bk"]
    max_r = max(f.A.shape[0] for factors in batch for f in factors)
    for (layout, aligned), (items, brows, bcoefs) in groups.items():
        grid = (len(items), -(-max(it[0] for it in items) // bk), -(-rank // bn))
        _launch(_kernels.apply_kernel, grid, device, _table(items, device), _table(brows, device),
                _table(bcoefs, device, torch.float64), DT=_tl_dtype(in_dtype), OUT_DT=_tl_dtype(dtype),
                LAYOUT=layout, ALIGN=aligned, BK=bk, BR=_bucket(max_r, hi=32), BN=bn)
    return out


def _dense(factors: list[Factor], weights: list[float], keeps: list[Keep], mode: int, sign: int,
           dtype: torch.dtype) -> torch.Tensor:
    """The float32 (n_out, n_in) combination of the kept terms (one launch, tiles in registers)."""
    device = factors[0].A.device
    n_out, n_in = factors[0].B.shape[0], factors[0].A.shape[1]
    rows, floats = [], []
    for f, w, keep in zip(factors, weights, keeps):
        rows.append([f.B.data_ptr(), f.A.data_ptr(), f.A.shape[0], *f.B.stride(), *f.A.stride(), int(keep.kind),
                     _signed64(int(keep.seed)), int(keep.thresh24)])
        tau = _float32_at_least(float(keep.tau)) if keep.kind == MAGNITUDE else 0.0
        floats.append([float(f.coef), float(w), tau, float(keep.density)])
    out = torch.empty(n_out, n_in, dtype=torch.float32, device=device)
    bm, bn = _dense_tile(n_out, n_in)
    grid = (-(-n_out // bm), -(-n_in // bn))
    _launch(_kernels.dense_combine_kernel, grid, device, _table(rows, device), _table(floats, device, torch.float32),
            out, len(factors), n_out, n_in, out.stride(0), out.stride(1), DT=_tl_dtype(dtype), MODE=int(mode),
            SIGN=sign, BM=bm, BN=bn, BR=_bucket(max(f.A.shape[0] for f in factors), hi=32),
            DOT_DT=_fast_dot(dtype), num_warps=8)
    return out


def abs_kth(batch: KthBatch) -> list[float]:
    _require()
    out = []
    for f, k in batch:
        dtype = _common_dtype([f.A, f.B])
        if k == 0:
            out.append(math.inf)
            continue
        # The values the merge prunes: the dense_combine kernel with one unpruned term of weight 1.
        dense = _dense([_conv(f, dtype)], [1.0], [Keep()], SUM, SIGN_METHODS["total"], dtype).abs().flatten()
        dense = torch.where(dense.isnan(), torch.full_like(dense, math.inf), dense)  # NaN counts as largest
        out.append(float(torch.kthvalue(dense, dense.numel() - int(k) + 1).values))
        del dense
    return out


def dense_combine(batch: CombineBatch, mode: int, sign_method: str = "total") -> list[torch.Tensor]:
    """One launch per module (each holds its dense float32 result)."""
    _require()
    if mode not in COMBINE_MODES.values():
        raise ValueError(f"combine mode: unknown {mode}")
    out = []
    for factors, weights, keeps in batch:
        dtype = _common_dtype(t for f in factors for t in (f.A, f.B))
        for keep in keeps:
            if keep.kind not in KEEP_KINDS.values():
                raise ValueError(f"keep kind: unknown {keep.kind}")
        out.append(_dense([_conv(f, dtype) for f in factors], weights, keeps, mode, SIGN_METHODS[sign_method], dtype))
    return out
