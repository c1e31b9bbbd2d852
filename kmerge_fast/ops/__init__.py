"""Kernel ops and the one dispatch point that picks a backend for them.

Every backend module (``reference``, ``cpu``, later ``triton``) exposes the
same ops on *batches of modules*; a batch entry is a list of
:class:`Factor` (A, B, coef) standing for the update ``coef * B @ A``:

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
  largest |coef B A| over all elements (+inf for k = 0), without storing dW.
- ``weighted_sum(batch, dtype) -> list[Tensor]``: batch entries are
  (tensors, weights), same-shape 2-D tensors; returns per entry
  ((w_0 t_0) + w_1 t_1) + ... with every product and sum rounded in
  ``compute_dtype(dtype)``, left to right, then cast to ``dtype``: for one or
  two terms bit-equal to peft's ``task_arithmetic`` (factor-wise ``linear``).
- ``dense_combine(factors, weights, keeps, mode, sign_method) -> Tensor``: one
  module; the dense (n_out, n_in) result of pruning each dW_i = coef_i B_i A_i
  by ``keeps[i]`` and combining with ``weights`` (SUM or TIES, see
  ``ops/elementwise.py``), in ``compute_dtype`` of the factors. The C++
  backend holds one tile of each dW_i at a time, never all of them.

Range: ``inner_products``, ``diff_stats`` and ``truncate`` are exact up to
rounding whatever the factors' magnitudes (subnormal, or far beyond float32):
each backend runs factors outside [2^-32, 2^32] on power-of-two scaled copies
and scales the results back (``ops/scaling.py``); a result is +-inf or 0 only
where the true value is out of float64's (or the output dtype's) range.
Ordinary factors run unchanged, bit for bit. ``truncate`` with rank 0 returns
empty factors.

Selection: ``KMERGE_FAST_BACKEND=reference|cpp|triton`` (or :func:`use_backend`)
forces a backend and raises :class:`BackendError` if it cannot run the inputs;
otherwise the first backend of :data:`PREFERENCE` that supports them runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import NamedTuple

import torch

from ..errors import BackendError


class Factor(NamedTuple):
    """One term ``coef * B @ A`` of a sum: A (r x n_in), B (n_out x r)."""

    A: torch.Tensor
    B: torch.Tensor
    coef: float


#: Backend names in the order auto-selection tries them (fastest first).
PREFERENCE = ("triton", "cpp", "reference")
_MODULES = {"reference": "reference", "cpp": "cpu", "triton": "triton"}
ENV_VAR = "KMERGE_FAST_BACKEND"
_forced: list[str] = []


def _load(name: str):
    """The backend module, or a string saying why it cannot be loaded here."""
    try:
        module = importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as e:  # a missing optional dependency or extension
        return f"cannot import: {e}"
    reason = module.unavailable_reason()
    return reason if reason else module


def backends() -> list[str]:
    """Names of the backends that can run on this machine, in preference order."""
    return [name for name in PREFERENCE if not isinstance(_load(name), str)]


def unavailable_reasons() -> dict[str, str]:
    """For every backend that cannot run here, why not."""
    return {name: m for name in PREFERENCE if isinstance(m := _load(name), str)}


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a ``with`` block (``None``: automatic selection)."""
    if name is not None and name not in _MODULES:
        raise ValueError(f"backend: unknown name {name!r}; choose from {list(_MODULES)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or the environment, if any."""
    if _forced and _forced[-1] is not None:
        return _forced[-1]
    if _forced:  # use_backend(None) overrides the environment
        return None
    name = os.environ.get(ENV_VAR, "").strip()
    if name and name not in _MODULES:
        raise BackendError(f"{ENV_VAR}={name!r}: unknown backend; choose from {list(_MODULES)}")
    return name or None


def select(device: torch.device, dtype: torch.dtype):
    """The backend module to run an op on tensors of this device and dtype."""
    forced = forced_backend()
    if forced is not None:
        module = _load(forced)
        if isinstance(module, str):
            raise BackendError(f"backend {forced!r} was forced but is unavailable: {module}")
        reason = module.unsupported_reason(device, dtype)
        if reason:
            raise BackendError(f"backend {forced!r} was forced but cannot run {dtype} on {device}: {reason}")
        return module
    for name in PREFERENCE:
        module = _load(name)
        if not isinstance(module, str) and not module.unsupported_reason(device, dtype):
            return module
    raise BackendError(f"no backend can run {dtype} on {device}")  # reference takes everything: unreachable


def select_for(factor_lists) -> object:
    """The backend for a batch: every factor must live on one device."""
    device, dtype = None, None
    for factors in factor_lists:
        for f in factors:
            for t in (f.A, f.B):
                if device is None:
                    device, dtype = t.device, t.dtype
                elif t.device != device:
                    raise ValueError(f"factors live on different devices ({device} and {t.device})")
    return select(device or torch.device("cpu"), dtype or torch.float32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
