"""The op contract every backend implements: shared types, codes and the :class:`Backend` protocol.

A backend is a module under ``ops/backend/<name>/`` defining the functions
of :class:`Backend` at module level (the conformance test checks their
signatures against this protocol). Callers never pick one: they call the
entry points of ``kmerge_fast.ops`` (``ops.truncate(...)``), whose dispatcher
chooses the backend for the batch (see ``ops/__init__.py``).

Ops work on *batches of modules*; a batch entry is a list of :class:`Factor`
(A, B, coef) standing for the update ``coef * B @ A``:

- ``inner_products(batch, precise) -> list[Tensor]``: batch entries are pairs
  (xs, ys) of factor lists; returns per entry the float64 (len(xs), len(ys))
  matrix of Frobenius inner products <coef_i B_i A_i, coef_j B_j A_j>_F,
  from the r x r cross-Grams (B_i^T B_j) * (A_i A_j^T), never forming dW.
- ``diff_stats(batch) -> Tensor``: batch entries are pairs (x, y) of factors;
  returns float64 (len(batch), 2): [sum |dW_x - dW_y|, max |dW_x - dW_y|],
  streaming tiles of the difference (it is needed densely for l1 / linf).
- ``stack(batch, dtype) -> list[(A, B)]``: the fused low-rank merge
  sum_i coef_i B_i A_i in factor form, A = [coef_1 A_1; ...] (R x n_in),
  B = [B_1, ...] (n_out x R), R = sum r_i (peft's ``cat`` convention).
- ``truncate(batch, rank, dtype) -> list[(A, B)]``: the best rank-``rank``
  approximation of sum_i coef_i B_i A_i with B = U_r S_r (n_out x rank) and
  A = V_r^T (rank x n_in), zero-padded where the sum has lower rank.
- ``abs_kth(batch) -> list[float]``: batch entries are (factor, k); the k-th
  largest |coef B A| over all elements (+inf for k = 0; NaN counts as
  larger than everything), without storing dW.
- ``weighted_sum(batch, dtype) -> list[Tensor]``: batch entries are
  (tensors, weights), same-shape 2-D tensors; returns per entry
  ((w_0 t_0) + w_1 t_1) + ... with every product and sum rounded in
  ``compute_dtype(dtype)``, left to right, then cast to ``dtype``: for one or
  two terms bit-equal to peft's ``task_arithmetic`` (factor-wise ``linear``).
- ``dense_combine(batch, mode, sign_method) -> list[Tensor]``: batch entries
  are modules (factors, weights, keeps); per module the dense (n_out, n_in)
  result of pruning each dW_i = coef_i B_i A_i by ``keeps[i]`` and combining
  with ``weights`` (``mode`` SUM or TIES, ``sign_method`` for TIES, see
  ``ops/numerics/elementwise.py``), in ``compute_dtype`` of the factors
  (float64 when any factor is float64). The C++ backend holds one tile of
  each dW_i at a time, never all of them; every backend returns one dense
  matrix per module, so callers bound memory by the batch they pass.
- ``max_abs(tensors) -> list[float]``: max |t| of each 2-D tensor (0.0 when
  empty, NaN when it holds NaN): the scan behind range normalisation.
- ``all_finite(tensors) -> list[bool]``: per 2-D tensor, no NaN or inf.

Range: ``inner_products``, ``diff_stats`` and ``truncate`` are exact up to
rounding whatever the factors' magnitudes (subnormal, or far beyond float32):
each backend runs factors outside [2^-32, 2^32] on power-of-two scaled copies
and scales the results back (``ops/numerics/scaling.py``); a result is +-inf
or 0 only where the true value is out of float64's (or the output dtype's)
range. Ordinary factors run unchanged, bit for bit. ``truncate`` with rank 0
returns empty factors.

Codes: keep kinds, combine modes, sign methods, dtype codes and truncation
routes are the C++ core's (``csrc/core/codes.h``, exported as plain dicts
``_C.KEEP_KINDS``, ``_C.COMBINE_MODES``, ``_C.SIGN_METHODS``, ``_C.DTYPES``,
``_C.ROUTES``); the Python names below are defined from them, here only.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

from ..methods import COMBINE_RULES, KEEP_RULES, SIGN_METHODS as _SIGN_NAMES

try:
    from .. import _C
    _C.KEEP_KINDS  # noqa: B018  (an extension built before the codes were exported counts as missing)
except (ImportError, AttributeError) as _e:  # not built: the package still imports, without the cpp backend
    _C = None
    C_IMPORT_ERROR: str | None = f"{type(_e).__name__}: {_e}"
else:
    C_IMPORT_ERROR = None


def _codes(table: str, names: tuple[str, ...]) -> dict[str, int]:
    """``_C.<table>``: name -> the C++ core's code, for exactly ``names``.

    Without the extension no code crosses into C++, and the Python backends
    (reference, triton) only need the codes to be distinct: each name then
    gets its position in ``names``.
    """
    codes = dict(getattr(_C, table)) if _C is not None else {name: i for i, name in enumerate(names)}
    if set(codes) != set(names):
        raise ImportError(f"kmerge_fast._C.{table} has {sorted(codes)}, expected {sorted(names)}: rebuild it")
    return codes


#: Keep kinds (how a term is pruned): ALL keeps every value, MAGNITUDE |v| >= tau, DARE a hashed draw.
KEEP_KINDS = _codes("KEEP_KINDS", KEEP_RULES)
ALL, MAGNITUDE, DARE = KEEP_KINDS["all"], KEEP_KINDS["magnitude"], KEEP_KINDS["dare"]
#: Combine modes: SUM (weighted sum) or TIES (sign election, then the agreeing mean).
COMBINE_MODES = _codes("COMBINE_MODES", COMBINE_RULES)
SUM, TIES = COMBINE_MODES["sum"], COMBINE_MODES["ties"]
#: TIES's majority sign: ``total`` (sign of the sum) or ``frequency`` (sign of the vote); name -> code.
SIGN_METHODS = _codes("SIGN_METHODS", _SIGN_NAMES)
#: torch dtype -> the C++ core's element type code (empty without the extension).
DTYPE_CODES = {getattr(torch, name): code for name, code in _C.DTYPES.items()} if _C is not None else {}
#: ``_C.truncate``'s per-module routes: Cholesky route, eigen route, not settled (redo in torch).
ROUTES = dict(_C.ROUTES) if _C is not None else {}
ROUTE_CHOLESKY, ROUTE_EIGEN, ROUTE_FAILED = (ROUTES.get(name) for name in ("cholesky", "eigen", "failed"))


class Factor(NamedTuple):
    """One term ``coef * B @ A`` of a sum: A (r x n_in), B (n_out x r)."""

    A: torch.Tensor
    B: torch.Tensor
    coef: float


class Keep(NamedTuple):
    """How one term is pruned before combining (see ``ops/numerics/elementwise.py``).

    ``kind``: ALL, MAGNITUDE or DARE. ``tau``: the magnitude threshold
    (MAGNITUDE); ``seed`` (uint64), ``thresh24`` (= round(density * 2^24)) and
    ``density``: the DARE draw.
    """

    kind: int = ALL
    tau: float = 0.0
    seed: int = 0
    thresh24: int = 0
    density: float = 1.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The batch types of the ops (see the module docstring).
Pair = tuple[torch.Tensor, torch.Tensor]  # (A, B) of a result
InnerBatch = list[tuple[list[Factor], list[Factor]]]
DiffBatch = list[tuple[Factor, Factor]]
FactorBatch = list[list[Factor]]
KthBatch = list[tuple[Factor, int]]
SumBatch = list[tuple[list[torch.Tensor], list[float]]]
CombineBatch = list[tuple[list[Factor], list[float], list[Keep]]]


@runtime_checkable
class Backend(Protocol):
    """What a backend module defines. ``NAME`` is its name in ``KMERGE_FAST_BACKEND``.

    ``unavailable_reason()``: why it cannot run on this machine at all, or None.
    ``unsupported_reason(device, dtype)``: why it cannot run tensors of this
    device and dtype, or None. ``manual_only_reason(device)``: why automatic
    selection must not pick it for tensors on ``device`` although it can run
    them (it runs there only when forced), or None. The ops are described in
    the module docstring; a backend is only handed batches it supports (one
    device, every dtype supported, output dtype included).
    """

    NAME: str

    def unavailable_reason(self) -> str | None: ...

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> str | None: ...

    def manual_only_reason(self, device: torch.device) -> str | None: ...

    def max_abs(self, tensors: list[torch.Tensor]) -> list[float]: ...

    def all_finite(self, tensors: list[torch.Tensor]) -> list[bool]: ...

    def inner_products(self, batch: InnerBatch, precise: bool = False) -> list[torch.Tensor]: ...

    def diff_stats(self, batch: DiffBatch) -> torch.Tensor: ...

    def stack(self, batch: FactorBatch, dtype: torch.dtype) -> list[Pair]: ...

    def truncate(self, batch: FactorBatch, rank: int, dtype: torch.dtype) -> list[Pair]: ...

    def abs_kth(self, batch: KthBatch) -> list[float]: ...

    def weighted_sum(self, batch: SumBatch, dtype: torch.dtype) -> list[torch.Tensor]: ...

    def dense_combine(self, batch: CombineBatch, mode: int, sign_method: str = "total") -> list[torch.Tensor]: ...


#: The ops of the contract (the :class:`Backend` functions that compute).
OPS = ("max_abs", "all_finite", "inner_products", "diff_stats", "stack", "truncate", "abs_kth", "weighted_sum",
       "dense_combine")
