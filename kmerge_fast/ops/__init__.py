"""The ops' entry points and the one dispatch point that picks a backend for them.

Callers (``merge``, ``similarity``, ``opcm``, ``lora``) call the module-level
ops here (``ops.truncate(batch, rank, dtype)``, ``ops.inner_products(...)``,
...); the contract of each op is in ``ops/contract.py``, the backends in
``ops/backend/<name>/`` and the torch numerics they share in
``ops/numerics/``. Every backend decision is taken here, per call:

1. The batch's tensors must live on one device (ValueError otherwise).
2. Selection by the device and the dtype of the batch's first tensor:
   ``KMERGE_FAST_BACKEND=reference|cpp|triton`` (or :func:`use_backend`)
   forces a backend and raises :class:`BackendError` if it cannot run them;
   otherwise the first backend of :data:`PREFERENCE` that is available,
   supports them and may be picked automatically on that device
   (``manual_only_reason``: Triton's interpreter on CPU tensors is for tests,
   forced only) runs.
3. Fallback: a batch the selected backend cannot run whole (another dtype
   among its tensors, or an output dtype it does not produce: Triton with
   float64) runs on the reference backend, whatever was forced; so does an
   empty batch (no tensor, so no device to judge; the op returns its empty
   result).

``all_finite`` is validation, not a merge op: it runs the C++ bit test on
the CPU tensors that backend takes whatever is forced, torch on the rest.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Iterable

import torch

from ..errors import BackendError
from .contract import (ALL, DARE, MAGNITUDE, SIGN_METHODS, SUM, TIES, Backend, CombineBatch, DiffBatch, Factor,
                       FactorBatch, InnerBatch, Keep, KthBatch, Pair, SumBatch, compute_dtype)

__all__ = ["ALL", "DARE", "MAGNITUDE", "SIGN_METHODS", "SUM", "TIES", "Backend", "Factor", "Keep", "PREFERENCE",
           "abs_kth", "all_finite", "backend_name", "backends", "compute_dtype", "dense_combine", "diff_stats",
           "forced_backend", "inner_products", "max_abs", "select", "stack", "truncate", "unavailable_reasons",
           "use_backend", "weighted_sum"]

#: Backend names in the order auto-selection tries them (fastest first).
PREFERENCE = ("triton", "cpp", "reference")
ENV_VAR = "KMERGE_FAST_BACKEND"
_forced: list[str] = []


def _load(name: str):
    """The backend module ``ops/backend/<name>``, or a string saying why it cannot be loaded here."""
    try:
        module = importlib.import_module(f".backend.{name}", __name__)
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
    if name is not None and name not in PREFERENCE:
        raise ValueError(f"backend: unknown name {name!r}; choose from {list(PREFERENCE)}")
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
    if name and name not in PREFERENCE:
        raise BackendError(f"{ENV_VAR}={name!r}: unknown backend; choose from {list(PREFERENCE)}")
    return name or None


def select(device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend module for tensors of this device and dtype (rule 2 of the module docstring)."""
    device = torch.device(device)
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
        if (not isinstance(module, str) and not module.unsupported_reason(device, dtype)
                and not module.manual_only_reason(device)):
            return module
    raise BackendError(f"no backend can run {dtype} on {device}")  # reference takes everything: unreachable


def _backend(tensors: Iterable[torch.Tensor], out_dtype: torch.dtype | None = None) -> Backend:
    """The backend for a batch holding ``tensors`` (and producing ``out_dtype``): rules 1-3 (3: empty batches too)."""
    device, dtypes = None, {}
    for t in tensors:
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"factors live on different devices ({device} and {t.device})")
        dtypes.setdefault(t.dtype, None)
    if device is None:
        # An empty batch computes nothing, so it has no device for the rules to judge (a forced GPU backend
        # would refuse the CPU default): the reference returns the op's empty result, whatever is forced.
        return _load("reference")
    if out_dtype is not None:
        dtypes.setdefault(out_dtype, None)
    dtypes = list(dtypes)
    module = select(device, dtypes[0])
    if any(module.unsupported_reason(device, dtype) for dtype in dtypes[1:]):
        return _load("reference")
    return module


def _factor_tensors(factor_lists: Iterable[Iterable[Factor]]) -> Iterable[torch.Tensor]:
    for factors in factor_lists:
        for f in factors:
            yield f.A
            yield f.B


def backend_name(factor_lists: Iterable[Iterable[Factor]]) -> str:
    """The name of the backend that runs a batch of these factor lists (e.g. a cache key of its results)."""
    return _backend(_factor_tensors(factor_lists)).NAME


# ------------------------------------------------------------ entry points
# Each: the contract's op (ops/contract.py), on the backend chosen for its batch.
def inner_products(batch: InnerBatch, precise: bool = False) -> list[torch.Tensor]:
    return _backend(_factor_tensors(fs for pair in batch for fs in pair)).inner_products(batch, precise)


def diff_stats(batch: DiffBatch) -> torch.Tensor:
    if not batch:
        return torch.zeros(0, 2, dtype=torch.float64)
    return _backend(_factor_tensors(batch)).diff_stats(batch)


def stack(batch: FactorBatch, dtype: torch.dtype) -> list[Pair]:
    return _backend(_factor_tensors(batch), dtype).stack(batch, dtype)


def truncate(batch: FactorBatch, rank: int, dtype: torch.dtype) -> list[Pair]:
    return _backend(_factor_tensors(batch), dtype).truncate(batch, rank, dtype)


def abs_kth(batch: KthBatch) -> list[float]:
    return _backend(_factor_tensors([[f for f, _ in batch]])).abs_kth(batch)


def weighted_sum(batch: SumBatch, dtype: torch.dtype) -> list[torch.Tensor]:
    return _backend((t for tensors, _ in batch for t in tensors), dtype).weighted_sum(batch, dtype)


def dense_combine(batch: CombineBatch, mode: int, sign_method: str = "total") -> list[torch.Tensor]:
    return _backend(_factor_tensors(factors for factors, _, _ in batch)).dense_combine(batch, mode, sign_method)


def max_abs(tensors: list[torch.Tensor]) -> list[float]:
    return _backend(tensors).max_abs(tensors)


def all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor (any shape): no NaN or inf. The C++ scan for the non-empty 2-D CPU tensors it
    takes (it tests exponent bits on the extension's threads, without waking torch's pool), torch
    for the rest, whatever backend is forced."""
    flags: list[bool | None] = [None] * len(tensors)
    cpp = _load("cpp")
    if not isinstance(cpp, str):
        idx = [i for i, t in enumerate(tensors)
               if t.dim() == 2 and t.numel() and cpp.unsupported_reason(t.device, t.dtype) is None]
        for i, ok in zip(idx, cpp.all_finite([tensors[i] for i in idx])):
            flags[i] = ok
    rest = [i for i, flag in enumerate(flags) if flag is None]
    for i, ok in zip(rest, _load("reference").all_finite([tensors[i] for i in rest])):
        flags[i] = ok
    return flags
