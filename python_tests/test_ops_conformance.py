"""Every op of the contract (``ops/contract.py``) on every backend, against float64 dense truth.

Each backend module must define every function of :class:`ops.contract.Backend`
with the protocol's signature (names, kinds, defaults and types), and every
op must agree with the float64 product of the factors. The triton backend
runs under Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 when there is no GPU), or compiled on a GPU; skipped when
Triton is not importable. The dispatcher's decisions are checked at the end.
"""

from __future__ import annotations

import importlib
import inspect
import math
import typing

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast import ops
from kmerge_fast.ops import contract
from kmerge_fast.ops.contract import ALL, DARE, MAGNITUDE, SUM, TIES, Factor, Keep
from kmerge_fast.ops.numerics.elementwise import apply_keep, combine, dare_thresh24

NAMES = list(ops.PREFERENCE)
#: Relative tolerance per factor dtype of results accumulated in float32 (float64: float64 throughout).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}
#: ... and of results rounded to the factor dtype (stack, weighted_sum).
STORE_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float64: 1e-14}


def _runnable(name: str):
    """(backend module, device) for a backend that can run here, else skip."""
    module = ops._load(name)
    if isinstance(module, str):
        pytest.skip(f"backend {name!r} unavailable: {module}")
    if name == "triton":
        if module._load_kernels() is None:
            pytest.skip(f"cannot import triton: {module._import_error}")
        return module, torch.device("cpu" if module._kernels.INTERPRETED else "cuda")
    return module, torch.device("cpu")


@pytest.fixture(params=NAMES)
def backend(request):
    module, device = _runnable(request.param)
    with kf.use_backend(request.param):  # the triton backend takes CPU tensors only when forced
        yield module, device


@pytest.fixture(params=[torch.float32, torch.float64, torch.bfloat16], ids=str)
def dtype(request, backend):
    module, device = backend
    reason = module.unsupported_reason(device, request.param)
    if reason:
        pytest.skip(reason)
    return request.param


# ---------------------------------------------------------------- signatures
@pytest.mark.parametrize("name", NAMES)
def test_backend_implements_every_op_of_the_contract(name):
    """Importing a backend module never needs its dependency (triton is imported on first use)."""
    module = importlib.import_module(f"kmerge_fast.ops.backend.{name}")
    assert module.NAME == name
    assert isinstance(module, contract.Backend)
    members = [m for m in vars(contract.Backend) if not m.startswith("_") and callable(getattr(contract.Backend, m))]
    assert set(contract.OPS) <= set(members)
    for member in members:
        want = inspect.signature(getattr(contract.Backend, member))
        want = want.replace(parameters=list(want.parameters.values())[1:])  # without self
        got = inspect.signature(getattr(module, member))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == \
            [(p.name, p.kind, p.default) for p in want.parameters.values()], (name, member)
        assert typing.get_type_hints(getattr(module, member)) == \
            typing.get_type_hints(getattr(contract.Backend, member)), (name, member)


def test_codes_come_from_the_extension():
    _C = pytest.importorskip("kmerge_fast._C")
    assert contract.KEEP_KINDS == _C.KEEP_KINDS and (ALL, MAGNITUDE, DARE) == tuple(_C.KEEP_KINDS.values())
    assert contract.COMBINE_MODES == _C.COMBINE_MODES and (SUM, TIES) == tuple(_C.COMBINE_MODES.values())
    assert contract.SIGN_METHODS == _C.SIGN_METHODS
    assert {str(k).removeprefix("torch."): v for k, v in contract.DTYPE_CODES.items()} == _C.DTYPES
    assert (contract.ROUTE_CHOLESKY, contract.ROUTE_EIGEN, contract.ROUTE_FAILED) == \
        (_C.ROUTES["cholesky"], _C.ROUTES["eigen"], _C.ROUTES["failed"])


# ---------------------------------------------------------------- the ops
def _factor(n_out, n_in, r, dtype, device, seed, coef=1.0, strided=False) -> Factor:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, 2 * n_in if strided else n_in, generator=g), torch.randn(n_out, r, generator=g)
    a = a[:, ::2] if strided else a
    return Factor(a.to(dtype).to(device), b.to(dtype).to(device), coef)


def _dense(f: Factor) -> torch.Tensor:
    return f.coef * (f.B.double().cpu() @ f.A.double().cpu())


def _close(got, want, dtype, scale, tol=TOL) -> None:
    got = torch.as_tensor(got, dtype=torch.float64).cpu()
    assert (got - want).abs().max() <= tol[dtype] * scale + 1e-300, float((got - want).abs().max())


MODULES = [(13, 9, (2, 3)), (1, 17, (1, 2)), (20, 20, (4, 4))]


def _modules(dtype, device, seed=0) -> list[list[Factor]]:
    return [[_factor(n_out, n_in, r, dtype, device, seed + 10 * k + i, coef=0.5 - i, strided=i == 1)
             for i, r in enumerate(ranks)] for k, (n_out, n_in, ranks) in enumerate(MODULES)]


@pytest.mark.parametrize("precise", [False, True])
def test_inner_products(backend, dtype, precise):
    module, device = backend
    xs_all, ys_all = _modules(dtype, device), _modules(dtype, device, seed=100)
    batch = [(xs, ys) for xs, ys in zip(xs_all, ys_all)] + [(xs_all[0], xs_all[0])]
    for (xs, ys), got in zip(batch, module.inner_products(batch, precise)):
        want = torch.tensor([[float((_dense(x) * _dense(y)).sum()) for y in ys] for x in xs], dtype=torch.float64)
        scale = max(float(_dense(x).norm() * _dense(y).norm()) for x in xs for y in ys)
        assert got.dtype == torch.float64 and got.shape == want.shape
        _close(got, want, torch.float64 if precise else torch.float32, scale)  # fast: float32 sums


def test_diff_stats(backend, dtype):
    module, device = backend
    pairs = [(xs[0], ys[-1]) for xs, ys in zip(_modules(dtype, device), _modules(dtype, device, seed=100))]
    got = module.diff_stats(pairs)
    assert got.shape == (len(pairs), 2) and got.dtype == torch.float64
    for (x, y), row in zip(pairs, got.cpu()):
        d = _dense(x) - _dense(y)
        scale = float(d.abs().sum())
        _close(row[0], d.abs().sum(), torch.float32, scale)  # float32 tiles, even for float64 (cpp)
        _close(row[1], d.abs().max(), torch.float32, scale)


def test_stack(backend, dtype):
    module, device = backend
    batch = _modules(dtype, device)
    for factors, (a, b) in zip(batch, module.stack(batch, dtype)):
        rank = sum(f.A.shape[0] for f in factors)
        assert a.shape == (rank, factors[0].A.shape[1]) and b.shape == (factors[0].B.shape[0], rank)
        assert a.dtype == b.dtype == dtype and a.device.type == device.type
        want = sum(_dense(f) for f in factors)
        scale = sum(float((f.B.double().abs().cpu() @ f.A.double().abs().cpu()).max()) * abs(f.coef) for f in factors)
        _close(b.double().cpu() @ a.double().cpu(), want, dtype, scale, STORE_TOL)


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_truncate(backend, dtype, rank):
    module, device = backend
    batch = _modules(dtype, device)
    for factors, (a, b) in zip(batch, module.truncate(batch, rank, dtype)):
        n_out, n_in = factors[0].B.shape[0], factors[0].A.shape[1]
        assert a.shape == (rank, n_in) and b.shape == (n_out, rank) and a.dtype == b.dtype == dtype
        want = sum(_dense(f) for f in factors)
        s = torch.linalg.svdvals(want)
        best = float(s[rank:].square().sum().sqrt())
        err = float((want - b.double().cpu() @ a.double().cpu()).norm())
        tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
        assert err - best <= tol * float(s.square().sum().sqrt()), (err, best)


def test_abs_kth(backend, dtype):
    module, device = backend
    f = _factor(11, 7, 3, dtype, device, seed=1, coef=0.3)
    values = _dense(f).abs().flatten().sort(descending=True).values
    ks = [0, 1, 5, 40, values.numel()]
    got = module.abs_kth([(f, k) for k in ks])
    assert got[0] == math.inf
    for k, tau in zip(ks[1:], got[1:]):
        _close(tau, values[k - 1], dtype, float(values[0]))


def test_weighted_sum(backend, dtype):
    module, device = backend
    g = torch.Generator().manual_seed(2)
    batch = [([torch.randn(5, 7, generator=g).to(dtype).to(device) for _ in range(n)], [0.75, -0.5, 2.0][:n])
             for n in (1, 2, 3)]
    for (tensors, weights), got in zip(batch, module.weighted_sum(batch, dtype)):
        want = sum(w * t.double().cpu() for t, w in zip(tensors, weights))
        assert got.dtype == dtype and got.shape == want.shape
        _close(got.double(), want, dtype, sum(abs(w) * float(t.abs().max()) for t, w in zip(tensors, weights)),
               STORE_TOL)


@pytest.mark.parametrize("mode,sign", [(SUM, "total"), (TIES, "total"), (TIES, "frequency")])
@pytest.mark.parametrize("kind", [ALL, MAGNITUDE, DARE])
def test_dense_combine(backend, dtype, mode, sign, kind):
    """Against the elementwise rules applied in float64 to the dense updates; values within
    rounding of the magnitude threshold are left out of the comparison."""
    module, device = backend
    batch, truths, near = [], [], []
    for factors in _modules(dtype, device):
        dense = [_dense(f) for f in factors]
        if kind == MAGNITUDE:
            keeps = [Keep(MAGNITUDE, tau=float(d.abs().median())) for d in dense]
        elif kind == DARE:
            keeps = [Keep(DARE, seed=17 + i, thresh24=dare_thresh24(0.5), density=0.5) for i in range(len(dense))]
        else:
            keeps = [Keep()] * len(dense)
        weights = [0.9, -1.1][:len(factors)]
        batch.append((factors, weights, keeps))
        truths.append(combine([apply_keep(d, k) for d, k in zip(dense, keeps)], weights, mode, sign))
        near.append(torch.stack([(d.abs() - k.tau).abs() <= 1e-4 * k.tau for d, k in zip(dense, keeps)]).any(0))
    got = module.dense_combine(batch, mode, sign)
    assert isinstance(got, list) and len(got) == len(batch)
    for out, want, skip, (factors, _, _) in zip(got, truths, near, batch):
        assert out.shape == want.shape
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        scale = max(float(_dense(f).abs().max()) for f in factors) * 4
        _close(torch.where(skip, 0.0, out.double().cpu()), torch.where(skip, 0.0, want), dtype, scale)


def test_max_abs_and_all_finite(backend, dtype):
    module, device = backend
    t = torch.tensor([[1.0, -3.5], [2.0, 0.25]], dtype=dtype, device=device)
    bad = t.clone()
    bad[1, 0] = float("inf")
    empty = torch.zeros(0, 3, dtype=dtype, device=device)
    assert module.max_abs([t, empty]) == [3.5, 0.0]
    assert module.all_finite([t, bad, empty]) == [True, False, True]


# ---------------------------------------------------------------- dispatch
def _spy(monkeypatch, op: str) -> list[str]:
    """Record which backend runs ``op`` through the dispatcher (the calls still run)."""
    calls = []
    for name in NAMES:
        module = ops._load(name)
        if not isinstance(module, str):
            original = getattr(module, op)
            monkeypatch.setattr(module, op, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    return calls


def test_dispatcher_hands_batches_a_backend_cannot_run_whole_to_the_reference(monkeypatch):
    calls = _spy(monkeypatch, "inner_products")
    f32 = _factor(6, 5, 2, torch.float32, torch.device("cpu"), seed=3)
    f64 = Factor(f32.A.double(), f32.B.double(), 1.0)
    ops.inner_products([([f32], [f64])])
    assert calls[-1] == ("cpp" if "cpp" in ops.backends() else "reference")  # cpp runs both dtypes
    triton = ops._load("triton")
    if not isinstance(triton, str) and triton._load_kernels() is not None and triton._kernels.INTERPRETED:
        assert ops.select(torch.device("cpu"), torch.float32).NAME != "triton"  # CPU tensors: forced only
        with kf.use_backend("triton"):
            ops.inner_products([([f32], [f32])])
            assert calls[-1] == "triton"
            ops.inner_products([([f32], [f64])])
            assert calls[-1] == "reference"  # float64 in the batch
            assert ops.backend_name([[f32]]) == "triton" and ops.backend_name([[f32, f64]]) == "reference"
        with kf.use_backend("triton"), pytest.raises(kf.BackendError, match="cannot run torch.float64"):
            ops.backend_name([[f64]])  # forced, and the batch's first dtype is one it cannot run


def test_dispatcher_refuses_mixed_devices_and_takes_empty_batches():
    f = _factor(6, 5, 2, torch.float32, torch.device("cpu"), seed=4)
    meta = Factor(f.A.to("meta"), f.B.to("meta"), 1.0)
    with pytest.raises(ValueError, match="different devices"):
        ops.inner_products([([f], [meta])])
    assert ops.inner_products([]) == [] and ops.stack([], torch.float32) == []
    assert ops.diff_stats([]).shape == (0, 2) and ops.dense_combine([], SUM) == [] and ops.abs_kth([]) == []


def test_all_finite_takes_any_shape_and_device_whatever_is_forced():
    tensors = [torch.ones(2, 3), torch.tensor([1.0, float("nan")]), torch.zeros(0, 4), torch.ones(2, 2, 2),
               torch.tensor([[float("-inf")]], dtype=torch.float64)]
    for name in (None, "reference"):
        with kf.use_backend(name):
            assert ops.all_finite(tensors) == [True, False, True, True, False]
