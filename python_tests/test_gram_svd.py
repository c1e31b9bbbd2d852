"""The R x R algebra of truncation (``ops/numerics/gram_svd.py``): both routes, and the check that picks between them."""

from __future__ import annotations

import pytest
import torch

from kmerge_fast.ops.numerics import gram_svd


def stacks(n_out: int, n_in: int, big_r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_out, big_r, generator=g, dtype=torch.float64), \
        torch.randn(big_r, n_in, generator=g, dtype=torch.float64)


def near_dependent(n_out: int, n_in: int, r: int, eps: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two adapters whose A rows differ by ``eps``-sized noise: cond(A A^T) ~ 1 / eps^2."""
    b, a = stacks(n_out, n_in, 2 * r, seed)
    a[r:] = a[:r] + eps * a[r:]
    return b, a


def truncate(bs: list[torch.Tensor], as_: list[torch.Tensor], rank: int):
    g_b = torch.stack([b.T @ b for b in bs])
    g_a = torch.stack([a @ a.T for a in as_])
    t_b, t_a = gram_svd.core_transforms(g_b, g_a, rank)
    return [(t_a[i].T @ a, b @ t_b[i]) for i, (a, b) in enumerate(zip(as_, bs))]


def excess_error(b, a, new_a, new_b, rank) -> float:
    """(||M - B'A'||_F - optimal) / ||M||_F, M = B A, in float64."""
    m = b @ a
    s = torch.linalg.svdvals(m)
    best = float(s[rank:].pow(2).sum().sqrt())
    return (float((m - new_b @ new_a).norm()) - best) / float(m.norm())


@pytest.fixture
def eigen_calls(monkeypatch):
    """Counts the modules that took the eigen route."""
    calls = []
    original = gram_svd._eigen_route

    def counting(g_b, g_a, rank):
        calls.append(g_a.shape[0])
        return original(g_b, g_a, rank)

    monkeypatch.setattr(gram_svd, "_eigen_route", counting)
    return calls


def test_well_conditioned_stacks_take_the_cholesky_route(eigen_calls):
    pairs = [stacks(40, 33, 12, seed=s) for s in range(3)]
    out = truncate([b for b, _ in pairs], [a for _, a in pairs], 5)
    assert eigen_calls == []
    for (b, a), (new_a, new_b) in zip(pairs, out):
        assert excess_error(b, a, new_a, new_b, 5) <= 1e-12
        # A' = V_r^T has orthonormal rows
        torch.testing.assert_close(new_a @ new_a.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ill_conditioned_stack_is_caught_by_the_orthonormality_check(eigen_calls):
    b, a = near_dependent(30, 50, 4, eps=1e-7, seed=1)  # cond(Ga) ~ 1e14: Cholesky succeeds but is inaccurate
    g_b, g_a = (b.T @ b)[None], (a @ a.T)[None]
    _, info = torch.linalg.cholesky_ex(g_a)
    assert int(info) == 0  # the factorisation alone does not flag it
    t_b, t_a, failed = gram_svd._cholesky_route(g_b, g_a, 6)
    assert not bool(failed) and not bool(gram_svd._orthonormal(t_a, g_a))
    (new_a, new_b), = truncate([b], [a], 6)
    assert eigen_calls == [1]
    assert excess_error(b, a, new_a, new_b, 6) <= 1e-7


def test_singular_stacks_take_the_eigen_route_without_nan(eigen_calls):
    b, a = stacks(20, 15, 3, seed=2)
    twice_a = torch.cat([a, a])  # the same adapter twice: Ga singular
    twice_b = torch.cat([b, 0.5 * b], dim=1)
    zero_a, zero_b = torch.zeros(6, 15, dtype=torch.float64), torch.zeros(20, 6, dtype=torch.float64)
    out = truncate([twice_b, zero_b], [twice_a, zero_a], 4)
    assert eigen_calls == [2]
    for t in (x for pair in out for x in pair):
        assert torch.isfinite(t).all()
    (new_a, new_b), (zero_new_a, zero_new_b) = out
    assert excess_error(twice_b, twice_a, new_a, new_b, 4) <= 1e-12
    assert float((zero_new_b @ zero_new_a).abs().max()) == 0.0


def test_mixed_batch_routes_each_module(eigen_calls):
    good = [stacks(25, 18, 8, seed=s) for s in range(2)]
    bad = near_dependent(25, 18, 4, eps=1e-8, seed=3)  # Cholesky fails or is caught: either way, eigen route
    pairs = [good[0], bad, good[1]]
    out = truncate([b for b, _ in pairs], [a for _, a in pairs], 3)
    assert eigen_calls == [1]
    for (b, a), (new_a, new_b) in zip(pairs, out):
        assert excess_error(b, a, new_a, new_b, 3) <= 1e-7


def test_rank_above_stacked_rank_pads_with_zero_columns(eigen_calls):
    b, a = stacks(12, 9, 3, seed=4)
    (new_a, new_b), = truncate([b], [a], 5)
    assert eigen_calls == []
    assert float(new_b[:, 3:].abs().max()) == 0.0 and float(new_a[3:].abs().max()) == 0.0
    torch.testing.assert_close(new_b @ new_a, b @ a, rtol=0, atol=1e-12 * float((b @ a).norm()))


def spectrum_stacks(n_out: int, n_in: int, s: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (n_out x R), A (R x n_in) with B A = U diag(s) V^T, each factor mixed by a random R x R rotation."""
    g = torch.Generator().manual_seed(seed)
    big_r = s.numel()
    u = torch.linalg.qr(torch.randn(n_out, big_r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n_in, big_r, generator=g, dtype=torch.float64)).Q
    mix = torch.randn(big_r, big_r, generator=g, dtype=torch.float64)
    return u * s @ torch.linalg.inv(mix), mix @ v.T


@pytest.mark.parametrize("case", ["random", "near_tie_at_r", "rank_below_r", "steep"])
def test_large_stacks_refine_a_float32_eigh_to_float64_accuracy(case, eigen_calls, monkeypatch):
    big_r, rank = 192, 32
    assert big_r > max(gram_svd.REFINE_ABOVE, rank + gram_svd.OVERSAMPLE)  # the refined path runs
    g = torch.Generator().manual_seed(7)
    if case == "random":
        b, a = stacks(300, 260, big_r, seed=5)
    else:
        s = {"near_tie_at_r": torch.cat([torch.linspace(10, 2, rank - 1), torch.tensor([1 + 1e-9, 1.0]),
                                         torch.rand(big_r - rank - 1, generator=g)]),
             "rank_below_r": torch.cat([torch.rand(20, generator=g) + 0.5, torch.zeros(big_r - 20)]),
             "steep": torch.logspace(0, -12, big_r)}[case].double()
        b, a = spectrum_stacks(300, 260, s, seed=6)
    (new_a, new_b), = truncate([b], [a], rank)
    assert eigen_calls == []
    assert excess_error(b, a, new_a, new_b, rank) <= 1e-10
    # the same product as the all-float64 eigendecomposition
    monkeypatch.setattr(gram_svd, "REFINE_ABOVE", 10**6)
    (exact_a, exact_b), = truncate([b], [a], rank)
    m = b @ a
    if case in ("rank_below_r", "steep"):  # elsewhere sigma_r ~ sigma_{r+1}: the rank-r subspace is ill-posed
        assert float((new_b @ new_a - exact_b @ exact_a).norm()) <= 1e-7 * float(m.norm())  # first order in the angle


# ---------------------------------------------- the same algebra in C++ (``_C.gram_svd``), for Grams formed elsewhere
def host_truncate(bs: list[torch.Tensor], as_: list[torch.Tensor], rank: int):
    """``truncate`` above with cpp.core_transforms_on_host (all stacks of one R)."""
    from kmerge_fast.ops.backend import cpp

    g_b = torch.stack([b.T @ b for b in bs])
    g_a = torch.stack([a @ a.T for a in as_])
    t_b, t_a = cpp.core_transforms_on_host(g_b, g_a, rank)
    assert t_b.device.type == t_a.device.type == "cpu" and t_b.dtype == t_a.dtype == torch.float64
    assert t_b.shape == t_a.shape == (len(bs), g_b.shape[-1], rank)
    return [(t_a[i].T @ a, b @ t_b[i]) for i, (a, b) in enumerate(zip(as_, bs))]


@pytest.fixture
def host_algebra(monkeypatch):
    """Skips without the C++ core; counts the modules handed to the torch fallback."""
    from kmerge_fast.ops.backend import cpp

    if cpp.unavailable_reason():
        pytest.skip(cpp.unavailable_reason())
    calls = []

    def counting(g_b, g_a, rank):
        calls.append(g_a.shape[0])
        return gram_svd.core_transforms(g_b, g_a, rank)

    monkeypatch.setattr(cpp, "core_transforms", counting)
    return calls


@pytest.mark.parametrize("case", ["well_conditioned", "near_dependent", "singular", "zero", "rank_above_r",
                                  "large_random", "large_steep"])
def test_host_algebra_matches_the_optimum(case, host_algebra):
    rank = {"rank_above_r": 5, "large_random": 32, "large_steep": 32}.get(case, 4)
    if case == "well_conditioned":
        pairs = [stacks(40, 33, 12, seed=s) for s in range(3)]
    elif case == "near_dependent":
        pairs = [near_dependent(30, 50, 4, eps=1e-7, seed=1), near_dependent(30, 50, 4, eps=1e-8, seed=3)]
    elif case == "singular":  # the same adapter twice: Ga singular
        b, a = stacks(20, 15, 3, seed=2)
        pairs = [(torch.cat([b, 0.5 * b], dim=1), torch.cat([a, a]))]
    elif case == "zero":
        pairs = [(torch.zeros(20, 6, dtype=torch.float64), torch.zeros(6, 15, dtype=torch.float64))]
    elif case == "rank_above_r":
        pairs = [stacks(12, 9, 3, seed=4)]
    elif case == "large_random":
        pairs = [stacks(300, 260, 192, seed=5)]
    else:
        pairs = [spectrum_stacks(300, 260, torch.logspace(0, -12, 192).double(), seed=6)]
    out = host_truncate([b for b, _ in pairs], [a for _, a in pairs], rank)
    assert host_algebra == []  # the C++ algebra settled every module
    tol = 1e-7 if case == "near_dependent" else 1e-10
    for (b, a), (new_a, new_b) in zip(pairs, out):
        assert torch.isfinite(new_a).all() and torch.isfinite(new_b).all()
        if case == "zero":
            assert float((new_b @ new_a).abs().max()) == 0.0
            continue
        assert excess_error(b, a, new_a, new_b, rank) <= tol
        if case == "large_random":  # sigma_r ~ sigma_{r+1}: the rank-r subspace is ill-posed, the optimum suffices
            continue
        # the same product as the torch algebra (the rank-r subspace is well separated in these cases)
        (ref_a, ref_b), = truncate([b], [a], rank)
        m = b @ a
        agree = 1e-7 if case in ("near_dependent", "large_steep") else 1e-9  # first order in the subspace angle
        assert float((new_b @ new_a - ref_b @ ref_a).norm()) <= agree * float(m.norm())
    if case == "rank_above_r":
        (new_a, new_b), = out
        assert float(new_b[:, 3:].abs().max()) == 0.0 and float(new_a[3:].abs().max()) == 0.0


def test_host_algebra_hands_unsettled_modules_to_torch(host_algebra):
    """A module with non-finite Grams fails in C++ (route 2) and is redone by the torch algebra; the others are not."""
    from kmerge_fast.ops.backend import cpp

    pairs = [stacks(20, 16, 6, seed=s) for s in range(3)]
    g_b = torch.stack([b.T @ b for b, _ in pairs])
    g_a = torch.stack([a @ a.T for _, a in pairs])
    g_b[1, 2, 3] = float("inf")
    t_b, t_a = torch.zeros(3, 6, 2, dtype=torch.float64), torch.zeros(3, 6, 2, dtype=torch.float64)
    routes = cpp._C.gram_svd(g_b.data_ptr(), g_a.data_ptr(), t_b.data_ptr(), t_a.data_ptr(), 3, 6, 2, 1)
    assert routes == [cpp.ROUTE_CHOLESKY, cpp.ROUTE_FAILED, cpp.ROUTE_CHOLESKY]
    with pytest.raises(Exception):
        cpp.core_transforms_on_host(g_b, g_a, 2)  # the torch algebra refuses inf too (eigh of a non-finite matrix)
    assert host_algebra == [1]
    g_b[1, 2, 3] = g_b[1, 3, 2]
    t_b, t_a = cpp.core_transforms_on_host(g_b, g_a, 2)
    assert host_algebra == [1]
    want_b, want_a = gram_svd.core_transforms(g_b, g_a, 2)
    for got, want in ((t_b, want_b), (t_a, want_a)):  # columns equal up to sign
        sign = torch.sign((got * want).sum(dim=1, keepdim=True))
        torch.testing.assert_close(got * sign, want, rtol=1e-9, atol=1e-12)


def test_host_algebra_arguments(host_algebra):
    from kmerge_fast.ops.backend import cpp

    g = torch.eye(4, dtype=torch.float64)[None].contiguous()
    t = torch.zeros(1, 4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank"):
        cpp._C.gram_svd(g.data_ptr(), g.data_ptr(), t.data_ptr(), t.data_ptr(), 1, 4, 0, 0)
    with pytest.raises(ValueError, match="n:"):
        cpp._C.gram_svd(g.data_ptr(), g.data_ptr(), t.data_ptr(), t.data_ptr(), -1, 4, 2, 0)
    with pytest.raises(ValueError, match="gb_ptr: null"):
        cpp._C.gram_svd(0, g.data_ptr(), t.data_ptr(), t.data_ptr(), 1, 4, 2, 0)
    assert cpp._C.gram_svd(0, 0, 0, 0, 0, 4, 2, 0) == []
    t_b, t_a = cpp.core_transforms_on_host(torch.zeros(2, 0, 0, dtype=torch.float64),
                                           torch.zeros(2, 0, 0, dtype=torch.float64), 3)
    assert t_b.shape == t_a.shape == (2, 0, 3)
