"""The C++ backend (``kmerge_fast._C``): the on-device path.

The compiled core works on raw pointers, sizes and strides; this module turns
tensors into those descriptions (no copies: transposed views are passed as
strides). Truncation runs in C++ end to end, its small R x R algebra included
(``csrc/core/gram_svd.cpp``, with our own symmetric eigensolver); the torch
version of that algebra (``ops/numerics/gram_svd.py``) is the fallback for a module the
C++ one cannot settle. See ``ops/contract.py`` for the op contracts; the
dtype, keep-kind, combine-mode, sign-method and route codes passed to and
from ``_C`` are the contract's (``_C``'s own tables).
"""

from __future__ import annotations

import functools
import math
import threading
from collections import defaultdict

import torch

from ...contract import (ROUTE_CHOLESKY, ROUTE_EIGEN, ROUTE_FAILED, C_IMPORT_ERROR, DTYPE_CODES,  # noqa: F401 (routes:
                         SIGN_METHODS, CombineBatch, DiffBatch, Factor, FactorBatch, InnerBatch,  # ``_C.truncate``'s
                         KthBatch, Pair, SumBatch, _C, compute_dtype)  # results, for its tests)
from ...numerics import scaling
from ...numerics.gram_svd import core_transforms

NAME = "cpp"


def unavailable_reason() -> str | None:
    return None if _C is not None else f"the C++ extension kmerge_fast._C is not built ({C_IMPORT_ERROR})"


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if torch.device(device).type != "cpu":
        return f"tensors on {device}; the C++ backend runs on CPU tensors"
    if dtype not in DTYPE_CODES:
        return f"dtype {dtype} is not one of {list(DTYPE_CODES)}"
    return None


def manual_only_reason(device: torch.device) -> str | None:
    return None


# ------------------------------------------------------------- descriptions
def _mat(t: torch.Tensor, coef: float = 1.0, transpose: bool = False) -> tuple:
    """(ptr, dtype, rows, cols, row_stride, col_stride, coef) of a 2-D tensor (or its transpose)."""
    rows, cols = t.shape
    rs, cs = t.stride()
    if transpose:
        rows, cols, rs, cs = cols, rows, cs, rs
    return (t.data_ptr(), DTYPE_CODES[t.dtype], rows, cols, rs, cs, float(coef))


def _b_stack(factors: list[Factor]) -> list[tuple]:
    """[c_1 B_1, ..., c_k B_k]: n_out x R."""
    return [_mat(f.B, f.coef) for f in factors]


def _at_stack(factors: list[Factor]) -> list[tuple]:
    """[A_1^T, ..., A_k^T]: n_in x R, as strided views of the row-major A's."""
    return [_mat(f.A, 1.0, transpose=True) for f in factors]


def _empty(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.float64)


#: Largest scratch buffer a thread keeps between calls (float64 elements: 32 MiB).
SCRATCH_KEEP = 4 << 20
_scratch_local = threading.local()


def _scratch(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Float64 buffers of these shapes, carved from one buffer this thread reuses across calls.

    Only for temporaries that never leave the op. Fresh allocations of megabytes
    come from new pages, and touching a new page costs a fault (expensive in
    virtual machines: ~0.7 ms per MiB measured): the online merger's similarity
    step would pay that for its Gram buffers at every call. Buffers over
    SCRATCH_KEEP elements are allocated per call and not kept.
    """
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    buf = getattr(_scratch_local, "buf", None)
    if buf is None or buf.numel() < total:
        buf = torch.empty(total, dtype=torch.float64)
        if total <= SCRATCH_KEEP:
            _scratch_local.buf = buf
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(buf[start:start + size].view(shape))
        start += size
    return out


# ------------------------------------------------------------------- ops
def max_abs(tensors: list[torch.Tensor]) -> list[float]:
    """max |t| of each 2-D CPU tensor (0.0 when empty, NaN when it holds NaN): one C++ scan."""
    return list(_C.max_abs([_mat(t) for t in tensors], 0)) if tensors else []


def inner_products(batch: InnerBatch, precise: bool = False) -> list[torch.Tensor]:
    # Factors outside float32's comfortable range run on power-of-two scaled copies (ops/numerics/scaling.py).
    return scaling.inner_products(batch, precise, _inner_products, max_abs)


def _inner_products(batch: InnerBatch, precise: bool = False) -> list[torch.Tensor]:
    # Modules with the same rank layout share one (n, Rx, Ry) Gram buffer and one batched block reduction.
    groups = defaultdict(list)
    for k, (xs, ys) in enumerate(batch):
        groups[_ranks(xs), _ranks(ys)].append(k)
    tasks, buffers = [], []
    shapes = [(len(idx), sum(rx), sum(ry)) for (rx, ry), idx in groups.items()]
    scratch = iter(_scratch(*[s for shape in shapes for s in (shape, shape)]))
    for (rx, ry), idx in groups.items():
        g_b, g_a = next(scratch), next(scratch)  # temporaries: only the block sums below leave
        for j, k in enumerate(idx):
            xs, ys = batch[k]
            same = xs is ys
            tasks.append((_b_stack(xs), _b_stack(ys), g_b[j].data_ptr(), same))
            tasks.append((_at_stack(xs), _at_stack(ys), g_a[j].data_ptr(), same))
        buffers.append((g_b, g_a))
    _C.gram(tasks, precise, 0)
    out: list = [None] * len(batch)
    for ((rx, ry), idx), (g_b, g_a) in zip(groups.items(), buffers):
        # Sum each (r_i x r_j) block of the elementwise product: S_x^T (Gb * Ga) S_y
        # with S the 0/1 matrices mapping stacked rank rows to adapters.
        dots = _block_indicator(rx).T @ g_b.mul_(g_a) @ _block_indicator(ry)
        for j, k in enumerate(idx):
            out[k] = dots[j]
    return out


def _ranks(factors: list[Factor]) -> tuple[int, ...]:
    return tuple(f.A.shape[0] for f in factors)


@functools.lru_cache(maxsize=64)
def _block_indicator(ranks: tuple[int, ...]) -> torch.Tensor:
    """(sum(ranks), len(ranks)) float64: 1 where stacked rank row i belongs to adapter j (do not modify)."""
    owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks, dtype=torch.long))
    s = torch.zeros(sum(ranks), len(ranks), dtype=torch.float64)
    s[torch.arange(owner.numel()), owner] = 1.0
    return s


def diff_stats(batch: DiffBatch) -> torch.Tensor:
    # The tiles are float32 even for float64 inputs: scaled into its range first (ops/numerics/scaling.py).
    return scaling.diff_stats(batch, _diff_stats, max_abs)


def _diff_stats(batch: DiffBatch) -> torch.Tensor:
    out = torch.zeros(len(batch), 2, dtype=torch.float64)
    tasks = []
    for k, (x, y) in enumerate(batch):
        # dW_x - dW_y = [cx Bx, -cy By] @ [Ax^T, Ay^T]^T
        xs = [_mat(x.B, x.coef), _mat(y.B, -y.coef)]
        ys = [_mat(x.A, 1.0, True), _mat(y.A, 1.0, True)]
        tasks.append((xs, ys, out[k].data_ptr()))
    _C.dense_stats(tasks, 0)
    return out


def stack(batch: FactorBatch, dtype: torch.dtype) -> list[Pair]:
    tasks, out = [], []
    for factors in batch:
        rank = sum(f.A.shape[0] for f in factors)
        a = torch.empty(rank, factors[0].A.shape[1], dtype=dtype)
        b = torch.empty(factors[0].B.shape[0], rank, dtype=dtype)
        r0 = 0
        for f in factors:
            r = f.A.shape[0]
            tasks.append((_mat(f.A, f.coef), _mat(a[r0:r0 + r])))
            tasks.append((_mat(f.B), _mat(b[:, r0:r0 + r])))
            r0 += r
        out.append((a, b))
    _C.copy(tasks, 0)
    return out


def truncate(batch: FactorBatch, rank: int, dtype: torch.dtype) -> list[Pair]:
    """Best rank-r approximation from the Grams, without QR of the tall stacks.

    One ``_C.truncate`` call, one module per thread: the Grams Gb = B^T B and
    Ga = A A^T, their R x R algebra in float64 (the two routes of
    ``ops/numerics/gram_svd.py``, in C++), and the rebuild B' = B T_B, A'^T = A^T T_A.
    Without float64 data the Grams accumulate in float32 first; each is
    redone in float64 when its estimated perturbation of the kept factors
    exceeds 5e-5 (cancelling, graded or nearly dependent stacks), and Ga also
    when the Cholesky route rejects it; the rebuild accumulates in float32
    where its estimated error is at most 1e-5 relative, else in float64 (see
    ``float_errors`` in csrc/core/truncate.cpp). The tall stacks are read
    twice and the R x R Grams never leave the worker's scratch. A module the
    C++ algebra cannot settle (non-finite Grams, an eigenproblem that did not
    converge) is redone with the torch algebra of ``ops/numerics/gram_svd.py``. A module
    whose factors lie outside float32's comfortable range (subnormal or huge
    entries) runs on power-of-two scaled copies (``ops/numerics/scaling.py``). ``rank``
    0 gives empty factors.
    """
    return scaling.truncate(batch, rank, dtype, _truncate, max_abs)


def _truncate(batch: FactorBatch, rank: int, dtype: torch.dtype) -> list[Pair]:
    if rank == 0:
        return [(torch.empty(0, fs[0].A.shape[1], dtype=dtype), torch.empty(fs[0].B.shape[0], 0, dtype=dtype))
                for fs in batch]
    out, tasks = [], []
    for factors in batch:
        n_out, n_in = factors[0].B.shape[0], factors[0].A.shape[1]
        new_b = torch.empty(n_out, rank, dtype=dtype)
        new_a = torch.empty(rank, n_in, dtype=dtype)
        tasks.append((_b_stack(factors), _at_stack(factors), _mat(new_b), _mat(new_a, 1.0, transpose=True)))
        out.append((new_a, new_b))
    routes = _C.truncate(tasks, rank, 0)
    for factors, (new_a, new_b), route in zip(batch, out, routes):
        if route == ROUTE_FAILED:
            _truncate_with_torch_algebra(factors, rank, new_a, new_b)
    return out


def core_transforms_on_host(g_b: torch.Tensor, g_a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ops.numerics.gram_svd.core_transforms` in C++ on the host's threads, one module per thread.

    g_b, g_a: (batch, R, R) float64 Grams Gb = B^T B, Ga = A A^T on any device
    (copied to the CPU); returns (T_B, T_A), each (batch, R, rank) float64 on
    the CPU, zero beyond the stacked rank. For Grams formed on a GPU: its
    batched eigensolver runs the small matrices one after another, the
    host's cores take one each. Modules the C++ algebra cannot settle take the
    torch algebra, as in :func:`truncate`.
    """
    g_b = g_b.detach().to("cpu", torch.float64).contiguous()
    g_a = g_a.detach().to("cpu", torch.float64).contiguous()
    n, big_r = g_b.shape[0], g_b.shape[-1]
    t_b, t_a = torch.zeros(n, big_r, rank, dtype=torch.float64), torch.zeros(n, big_r, rank, dtype=torch.float64)
    routes = _C.gram_svd(g_b.data_ptr(), g_a.data_ptr(), t_b.data_ptr(), t_a.data_ptr(), n, big_r, rank, 0)
    failed = torch.tensor([route == ROUTE_FAILED for route in routes], dtype=torch.bool)
    if bool(failed.any()):
        t_b[failed], t_a[failed] = core_transforms(g_b[failed], g_a[failed], rank)
    return t_b, t_a


def _truncate_with_torch_algebra(factors: list[Factor], rank: int, new_a: torch.Tensor, new_b: torch.Tensor) -> None:
    """``truncate`` of one module with the R x R algebra of ``ops/numerics/gram_svd.py`` (torch.linalg),
    into new_a / new_b."""
    big_r = sum(_ranks(factors))
    g_b, g_a = _empty(1, big_r, big_r), _empty(1, big_r, big_r)
    bs, ats = _b_stack(factors), _at_stack(factors)
    _C.gram([(bs, bs, g_b.data_ptr(), True), (ats, ats, g_a.data_ptr(), True)], True, 0)
    t_b, t_a = (t[0].contiguous() for t in core_transforms(g_b, g_a, rank))
    _C.apply([(bs, t_b.data_ptr(), rank, _mat(new_b)), (ats, t_a.data_ptr(), rank, _mat(new_a, 1.0, transpose=True))],
             True, 0)


def all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Per 2-D CPU tensor: True when it holds no NaN or inf (a C++ bit test, on the extension's threads)."""
    return list(_C.all_finite([_mat(t) for t in tensors], 0))


def abs_kth(batch: KthBatch) -> list[float]:
    return list(_C.abs_kth([(_mat(f.B), _mat(f.A, f.coef), int(k)) for f, k in batch], 0))


def weighted_sum(batch: SumBatch, dtype: torch.dtype) -> list[torch.Tensor]:
    out, tasks = [], []
    for tensors, weights in batch:
        result = torch.empty(tensors[0].shape, dtype=dtype)
        tasks.append(([_mat(t, w) for t, w in zip(tensors, weights)], _mat(result)))
        out.append(result)
    _C.weighted_sum(tasks, compute_dtype(dtype) == torch.float64, 0)
    return out


def dense_combine(batch: CombineBatch, mode: int, sign_method: str = "total") -> list[torch.Tensor]:
    """One ``_C.dense_merge`` call per module (its tiles run on the extension's threads)."""
    out = []
    for factors, weights, keeps in batch:
        f0 = factors[0]
        # The C++ merge accumulates every term in float64 when any factor is float64: the result too.
        wide = any(t.dtype == torch.float64 for f in factors for t in (f.A, f.B))
        result = torch.empty(f0.B.shape[0], f0.A.shape[1], dtype=torch.float64 if wide else torch.float32)
        terms = [(_mat(f.B), _mat(f.A, f.coef), float(w), k.kind, float(k.tau), int(k.seed), int(k.thresh24),
                  float(k.density)) for f, w, k in zip(factors, weights, keeps)]
        _C.dense_merge(terms, _mat(result), mode, SIGN_METHODS[sign_method], 0)
        out.append(result)
    return out
