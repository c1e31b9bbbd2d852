"""The C++ truncation core: the symmetric eigensolver (``_C.sym_eig``) and the
fused per-module truncation (``_C.truncate``: Grams, both routes of the R x R
algebra, rebuild), against float64 torch truth.

Factors of a truncation are not unique, so results are judged by what is: the
excess of the approximation error over the optimal one, the product B'A'
where sigma_r > sigma_{r+1}, and A' A'^T = I.
"""

from __future__ import annotations

import threading

import pytest
import torch

from kmerge_fast.ops.backend import cpp as cpu
from kmerge_fast.ops.backend.cpp import _mat as mat  # (ptr, dtype, rows, cols, row_stride, col_stride, coef)
from kmerge_fast.ops.numerics import gram_svd

_C = pytest.importorskip("kmerge_fast._C")

EPS = torch.finfo(torch.float64).eps


# ---------------------------------------------------------------- sym_eig
def sym_eig(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(w (k), v (n x k), failures) from _C.sym_eig on a float64 copy of a."""
    n = a.shape[0]
    a = a.double().contiguous().clone()
    w, v = torch.empty(k, dtype=torch.float64), torch.empty(n, k, dtype=torch.float64)
    failures = _C.sym_eig(a.data_ptr(), n, k, w.data_ptr(), v.data_ptr())
    return w, v, failures


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q


def with_spectrum(s: torch.Tensor, seed: int) -> torch.Tensor:
    q = orthogonal(s.numel(), seed)
    return (q * s.double()) @ q.T


def symmetric_cases():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 17, 33, 130, 300):
        x = torch.randn(n, n, generator=g, dtype=torch.float64)
        yield f"random{n}", x + x.T
    x = torch.randn(96, 700, generator=g, dtype=torch.float64)
    yield "wishart", x @ x.T
    yield "ties", with_spectrum(torch.cat([torch.full((6,), 5.0), torch.rand(58, generator=g)]), 1)
    yield "all_equal", with_spectrum(torch.full((40,), 2.0), 2)
    yield "zero", torch.zeros(24, 24, dtype=torch.float64)
    yield "rank3", with_spectrum(torch.cat([torch.rand(3, generator=g) + 1, torch.zeros(45)]), 3)
    yield "graded", with_spectrum(torch.logspace(0, -14, 64), 4)
    yield "graded_extreme", with_spectrum(torch.logspace(0, -300, 64), 5)
    yield "tiny", with_spectrum(torch.rand(32, generator=g), 6) * 1e-200
    yield "huge", with_spectrum(torch.rand(32, generator=g), 7) * 1e200
    yield "diagonal_ties", torch.diag(torch.tensor([1.0, 3, 3, 2, 3, 0, 3, -1] * 5, dtype=torch.float64))
    path = torch.diag(torch.ones(49, dtype=torch.float64), 1)
    yield "path_graph", path + path.T
    wilkinson = torch.diag(torch.tensor([abs(10.0 - i) for i in range(21)], dtype=torch.float64))
    yield "wilkinson21", wilkinson + torch.diag(torch.ones(20, dtype=torch.float64), 1) + \
        torch.diag(torch.ones(20, dtype=torch.float64), -1)
    yield "negative_definite", -with_spectrum(torch.rand(30, generator=g) + 0.1, 8)


@pytest.mark.parametrize("name,a", list(symmetric_cases()), ids=[c[0] for c in symmetric_cases()])
def test_sym_eig_matches_float64_eigh(name, a):
    n = a.shape[0]
    truth = torch.linalg.eigvalsh(a).flip(0)
    scale = max(float(truth.abs().max()), 1e-300)
    for k in sorted({0, 1, min(n, 5), n}):
        w, v, failures = sym_eig(a, k)
        assert failures == 0, (name, k)
        if k == 0:
            continue
        assert float((w - truth[:k]).abs().max()) <= 8 * n * EPS * scale, (name, k)
        # residuals and orthonormality: what makes the vectors eigenvectors, ties or not
        residual = ((a / scale) @ v - v * (w / scale)).norm(dim=0).max()  # scaled: no overflow at 1e200
        assert float(residual) <= 16 * n * EPS, (name, k)
        assert float((v.T @ v - torch.eye(k, dtype=torch.float64)).abs().max()) <= 16 * n * EPS, (name, k)


def test_sym_eig_reads_only_the_upper_triangle():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 20, generator=g, dtype=torch.float64)
    sym = x + x.T
    upper_only = sym.triu() + torch.full((20, 20), float("nan"), dtype=torch.float64).tril(-1)
    w_sym, v_sym, _ = sym_eig(sym, 4)
    w_up, v_up, _ = sym_eig(upper_only, 4)
    assert torch.equal(w_sym, w_up) and torch.equal(v_sym, v_up)


def test_sym_eig_bad_arguments():
    a = torch.eye(3, dtype=torch.float64)
    w, v = torch.empty(3, dtype=torch.float64), torch.empty(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="k"):
        _C.sym_eig(a.data_ptr(), 3, 4, w.data_ptr(), v.data_ptr())
    with pytest.raises(ValueError, match="n"):
        _C.sym_eig(a.data_ptr(), -1, 0, w.data_ptr(), v.data_ptr())
    a[0, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        _C.sym_eig(a.data_ptr(), 3, 2, w.data_ptr(), v.data_ptr())


# ---------------------------------------------------------------- truncate
def truncate(terms: list[tuple[torch.Tensor, torch.Tensor, float]], rank: int, dtype=torch.float64, threads: int = 0):
    """_C.truncate of one module sum_i c_i B_i A_i: (A', B', route)."""
    (route,), (a, b) = truncate_many([terms], rank, dtype, threads)
    return a[0], b[0], route


def truncate_many(modules, rank: int, dtype=torch.float64, threads: int = 0):
    """_C.truncate of several modules: (routes, ([A'], [B']))."""
    tasks, outs = [], ([], [])
    for terms in modules:
        n_out, n_in = terms[0][1].shape[0], terms[0][0].shape[1]
        new_b, new_a = torch.empty(n_out, rank, dtype=dtype), torch.empty(rank, n_in, dtype=dtype)
        tasks.append(([mat(b, c) for a, b, c in terms], [mat(a, 1.0, transpose=True) for a, b, c in terms],
                      mat(new_b), mat(new_a, transpose=True)))
        outs[0].append(new_a)
        outs[1].append(new_b)
    return _C.truncate(tasks, rank, threads), outs


def product(terms) -> torch.Tensor:
    return sum(c * b.double() @ a.double() for a, b, c in terms)


def excess(terms, new_a, new_b, rank) -> float:
    """(||M - B'A'||_F - optimal) / ||M||_F in float64."""
    m = product(terms)
    best = float(torch.linalg.svdvals(m)[rank:].square().sum().sqrt())
    return (float((m - new_b.double() @ new_a.double()).norm()) - best) / max(float(m.norm()), 1e-300)


def gaussian_terms(n_out, n_in, ranks, seed, dtype=torch.float64, coefs=None):
    g = torch.Generator().manual_seed(seed)
    coefs = coefs or [1.0] * len(ranks)
    return [(torch.randn(r, n_in, generator=g, dtype=torch.float64).to(dtype),
             torch.randn(n_out, r, generator=g, dtype=torch.float64).to(dtype), c) for r, c in zip(ranks, coefs)]


def test_well_conditioned_sums_take_the_cholesky_route_and_are_optimal():
    for seed, (n_out, n_in, ranks, rank) in enumerate([(40, 33, [4, 8], 5), (300, 260, [32] * 6, 32),
                                                        (129, 7, [3, 3], 4), (1, 9, [2], 1)]):
        terms = gaussian_terms(n_out, n_in, ranks, seed, coefs=[0.7, -1.3, 2.0, 0.5, 1.0, -0.2][:len(ranks)])
        new_a, new_b, route = truncate(terms, rank)
        assert route == cpu.ROUTE_CHOLESKY
        assert excess(terms, new_a, new_b, rank) <= 1e-12
        k = min(rank, sum(ranks), n_in, n_out)
        torch.testing.assert_close(new_a[:k] @ new_a[:k].T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ranks", [[17], [16, 17], [32, 33, 32], [64, 64, 64, 67]], ids=lambda r: f"R{sum(r)}")
def test_stacked_ranks_off_the_block_sizes_are_optimal(ranks):
    """R not a multiple of the algebra's blocks (16, 32) nor of the tile sizes: partial blocks everywhere."""
    big_r = sum(ranks)
    terms = gaussian_terms(big_r + 41, big_r + 23, ranks, seed=big_r, coefs=[0.9, -0.6, 1.1, 0.4][:len(ranks)])
    rank = min(13, big_r - 1)
    new_a, new_b, route = truncate(terms, rank)
    assert route == cpu.ROUTE_CHOLESKY
    assert excess(terms, new_a, new_b, rank) <= 1e-12
    torch.testing.assert_close(new_a @ new_a.T, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-10)


def test_product_equals_the_torch_algebra_where_sigma_r_is_separated():
    """The same B'A' as ops/numerics/gram_svd.py (torch.linalg) on the same Grams."""
    terms = gaussian_terms(90, 70, [8, 8, 8], seed=3, coefs=[1.0, 0.5, -0.25])
    rank = 6
    new_a, new_b, route = truncate(terms, rank)
    b = torch.cat([c * b for a, b, c in terms], dim=1)
    a = torch.cat([a for a, b, c in terms], dim=0)
    t_b, t_a = gram_svd.core_transforms((b.T @ b)[None], (a @ a.T)[None], rank)
    torch_b, torch_a = b @ t_b[0], (a.T @ t_a[0]).T
    m = product(terms)
    s = torch.linalg.svdvals(m)
    assert float(s[rank - 1] / s[rank]) > 1.05  # the rank-6 subspace is well posed here
    assert float((new_b @ new_a - torch_b @ torch_a).norm()) <= 1e-10 * float(m.norm())


def test_near_dependent_stacks_take_the_eigen_route():
    g = torch.Generator().manual_seed(4)
    a0 = torch.randn(4, 50, generator=g, dtype=torch.float64)
    a1 = a0 + 1e-7 * torch.randn(4, 50, generator=g, dtype=torch.float64)  # cond(Ga) ~ 1e14
    b0, b1 = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64)
    terms = [(a0, b0, 1.0), (a1, b1, 1.0)]
    new_a, new_b, route = truncate(terms, 6)
    assert route == cpu.ROUTE_EIGEN
    assert excess(terms, new_a, new_b, 6) <= 1e-7


def test_identical_and_zero_adapters_give_no_nan():
    terms = gaussian_terms(20, 15, [3], seed=5)
    a, b, _ = terms[0]
    twice = [(a, b, 1.0), (a, b, 0.5)]  # Ga singular
    new_a, new_b, route = truncate(twice, 4)
    assert route == cpu.ROUTE_EIGEN
    assert torch.isfinite(new_a).all() and torch.isfinite(new_b).all()
    assert excess(twice, new_a, new_b, 4) <= 1e-12
    zeros = [(torch.zeros(6, 15, dtype=torch.float64), torch.zeros(20, 6, dtype=torch.float64), 1.0)]
    new_a, new_b, route = truncate(zeros, 4)
    assert route == cpu.ROUTE_EIGEN
    assert float((new_b @ new_a).abs().max()) == 0.0 and torch.isfinite(new_a).all()


def test_rank_above_stacked_rank_pads_with_zeros():
    terms = gaussian_terms(12, 9, [2, 1], seed=6)
    new_a, new_b, route = truncate(terms, 5)
    assert route == cpu.ROUTE_CHOLESKY
    assert float(new_b[:, 3:].abs().max()) == 0.0 and float(new_a[3:].abs().max()) == 0.0
    m = product(terms)
    torch.testing.assert_close(new_b @ new_a, m, rtol=0, atol=1e-12 * float(m.norm()))


def terms_with_spectrum(s: torch.Tensor, n_out: int, n_in: int, g: torch.Generator, dtype=torch.float64):
    """Rank-32 terms whose sum M (n_out x n_in) has singular values s (R of them, R a multiple of 32),
    its stacks mixed by a random R x R matrix, so that neither stack is orthogonal."""
    big_r = s.numel()
    u = torch.linalg.qr(torch.randn(n_out, big_r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n_in, big_r, generator=g, dtype=torch.float64)).Q
    mix = torch.randn(big_r, big_r, generator=g, dtype=torch.float64)
    b, a = (u * s.double()) @ torch.linalg.inv(mix), mix @ v.T
    return [(a[i:i + 32].to(dtype), b[:, i:i + 32].to(dtype), 1.0) for i in range(0, big_r, 32)]


@pytest.mark.parametrize("spectrum", ["flat", "tied_at_r", "steep", "rank_below_r"])
def test_large_stacks_are_float64_optimal(spectrum):
    """R = 192 > r = 32, on the spectra that stress the eigensolver."""
    g = torch.Generator().manual_seed(7)
    big_r, rank, n_out, n_in = 192, 32, 300, 260
    if spectrum == "flat":
        terms = gaussian_terms(n_out, n_in, [32] * 6, seed=8)
    else:
        s = {"tied_at_r": torch.cat([torch.linspace(10, 2, rank - 1), torch.tensor([1.0, 1.0, 1.0]),
                                     torch.rand(big_r - rank - 2, generator=g)]),
             "steep": torch.logspace(0, -12, big_r),
             "rank_below_r": torch.cat([torch.rand(20, generator=g) + 0.5, torch.zeros(big_r - 20)])}[spectrum]
        terms = terms_with_spectrum(s, n_out, n_in, g)
    new_a, new_b, route = truncate(terms, rank)
    assert route in (cpu.ROUTE_CHOLESKY, cpu.ROUTE_EIGEN)
    assert excess(terms, new_a, new_b, rank) <= 1e-10


def truncate_and_exact(terms, rank: int, dtype):
    """(A', B') in dtype, and (A', B') in float64 of the same terms taken as float64."""
    new_a, new_b, _ = truncate(terms, rank, dtype=dtype)
    exact_a, exact_b, _ = truncate([(a.double(), b.double(), c) for a, b, c in terms], rank)
    return new_a, new_b, exact_a, exact_b


def near_cancelling_terms(seed: int, eps: float, dtype):
    """B1 A1 - B2 A2 of two rank-16 adapters within eps of a common one (A 16 x 190, B 230 x 16)."""
    g = torch.Generator().manual_seed(seed)
    a0, b0 = torch.randn(16, 190, generator=g, dtype=torch.float64), torch.randn(230, 16, generator=g, dtype=torch.float64)
    return [((a0 + eps * torch.randn(16, 190, generator=g, dtype=torch.float64)).to(dtype),
             (b0 + eps * torch.randn(230, 16, generator=g, dtype=torch.float64)).to(dtype), c) for c in (1.0, -1.0)]


def relative_product_error(new_a, new_b, exact_a, exact_b) -> float:
    """|B'A' - (B'A')_64| / |(B'A')_64| against the float64 result of float64 inputs."""
    exact = exact_b @ exact_a
    return float((new_b.double() @ new_a.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_well_conditioned_rebuilds_err_at_the_output_rounding(dtype):
    # no cancellation: the rebuild may accumulate in float32 (kFloatRebuildTol = 1e-5
    # bounds its estimated error for float32 outputs; coarser outputs round more anyway)
    terms = gaussian_terms(301, 257, [16, 16, 9, 16], seed=9, dtype=dtype, coefs=[0.5, -2.0, 1.0, 0.25])
    new_a, new_b, exact_a, exact_b = truncate_and_exact(terms, 12, dtype)
    err = relative_product_error(new_a, new_b, exact_a, exact_b)
    rounding = relative_product_error(exact_a.to(dtype), exact_b.to(dtype), exact_a, exact_b)
    assert err <= (1e-5 if dtype == torch.float32 else 2 * rounding)
    assert excess(terms, new_a, new_b, 12) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_of_mildly_cancelling_sums_err_at_their_rounding(dtype):
    # estimate u32 (kappa_B + kappa_A) ~ 2e-5: above the float32 tolerance, below half precision's rounding, so
    # the rebuild may run in float32 for these outputs; the error stays at their rounding
    new_a, new_b, exact_a, exact_b = truncate_and_exact(near_cancelling_terms(13, 0.02, dtype), 8, dtype)
    err = relative_product_error(new_a, new_b, exact_a, exact_b)
    assert err <= 2 * relative_product_error(exact_a.to(dtype), exact_b.to(dtype), exact_a, exact_b)


def test_float64_outputs_keep_the_float64_rebuild():
    # float32 inputs are exact in float64: float64 outputs equal those of float64 inputs
    terms = gaussian_terms(120, 97, [8, 8, 5], seed=12, dtype=torch.float32, coefs=[0.5, 1.0, -1.5])
    new_a, new_b, exact_a, exact_b = truncate_and_exact(terms, 6, torch.float64)
    assert torch.equal(new_a, exact_a) and torch.equal(new_b, exact_b)


def test_cancelling_sums_keep_the_float64_rebuild():
    # B1 A1 - B2 A2 of nearly equal adapters: |B| |A| is ~100 |B'A'|, so a float32
    # rebuild would err by ~1e-5; the float64 one rounds once to float32
    new_a, new_b, exact_a, exact_b = truncate_and_exact(near_cancelling_terms(11, 1e-2, torch.float32), 8, torch.float32)
    assert torch.equal(new_a, exact_a.float()) and torch.equal(new_b, exact_b.float())


def test_float32_grams_give_way_to_float64_on_mixed_graded_stacks():
    # Float32 Grams err by ~u32 |x_i| |x_j| per entry. M of rank r = 32 with
    # sigma_32 = 1e-3 sigma_1, behind stacks mixed by a random matrix, amplifies
    # that to an excess of 2e-3 (measured with float32 Grams forced); the
    # estimate sends it to float64 Grams
    g = torch.Generator().manual_seed(21)
    terms = terms_with_spectrum(torch.cat([torch.logspace(0, -3, 32), torch.zeros(96)]), 260, 230, g, torch.float32)
    new_a, new_b, route = truncate(terms, 32, dtype=torch.float32)
    assert route == cpu.ROUTE_CHOLESKY
    assert excess(terms, new_a, new_b, 32) <= 1e-5  # float32 outputs: ~1e-6 from their rounding


def test_float32_grams_give_way_to_float64_on_cancelling_sums():
    # float32 Grams alone: product error 1e-6; with float64 Grams and rebuild the
    # results equal the float64 inputs' bit for bit
    terms = near_cancelling_terms(22, 1e-2, torch.float32)
    new_a, new_b, exact_a, exact_b = truncate_and_exact(terms, 8, torch.float32)
    assert torch.equal(new_a, exact_a.float()) and torch.equal(new_b, exact_b.float())


def test_float32_grams_give_way_to_float64_on_near_dependent_stacks():
    # four adapters 1e-4 apart in A: cond(Ga) ~ 1e8 > 1 / u32, which the float32
    # Grams' Cholesky cannot factor (they would need the eigen route: excess 9e-7);
    # float64 Grams factor it: the Cholesky route, float64-level excess
    g = torch.Generator().manual_seed(21)
    a0 = torch.randn(8, 150, generator=g, dtype=torch.float64)
    terms = [((a0 + 1e-4 * torch.randn(8, 150, generator=g, dtype=torch.float64)).float(),
              torch.randn(170, 8, generator=g, dtype=torch.float64).float(), 1.0) for _ in range(4)]
    new_a, new_b, route = truncate(terms, 8, dtype=torch.float32)
    assert route == cpu.ROUTE_CHOLESKY
    assert excess(terms, new_a, new_b, 8) <= 1e-8


def shared_a_terms(seed: int, coefs: list[float], b_spread: float | None = None):
    """float32 adapters with one A (8 x 150), as when only B is trained: Ga is singular.
    B_i independent (b_spread None) or within b_spread of a common B."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, 150, generator=g, dtype=torch.float64).float()
    b0 = torch.randn(170, 8, generator=g, dtype=torch.float64)
    bs = [torch.randn(170, 8, generator=g, dtype=torch.float64) if b_spread is None else
          b0 + b_spread * torch.randn(170, 8, generator=g, dtype=torch.float64) for _ in coefs]
    return [(a, b.float(), c) for b, c in zip(bs, coefs)]


def test_shared_a_takes_the_eigen_route_on_a_float64_ga():
    # the float32 Ga fails Cholesky and is redone in float64 for the eigen route; Gb may stay float32
    terms = shared_a_terms(24, [0.5, 1.0, -0.7, 0.3])
    new_a, new_b, route = truncate(terms, 5, dtype=torch.float32)
    assert route == cpu.ROUTE_EIGEN
    assert excess(terms, new_a, new_b, 5) <= 1e-6


def test_shared_a_with_cancelling_b_redoes_both_grams():
    # (B1 - B2) A with B1, B2 1e-2 apart: after Ga, Gb's estimate sends it to float64 too,
    # and the float64 rebuild makes the results those of float64 inputs, bit for bit
    terms = shared_a_terms(25, [1.0, -1.0], b_spread=1e-2)
    new_a, new_b, exact_a, exact_b = truncate_and_exact(terms, 5, torch.float32)
    assert torch.equal(new_a, exact_a.float()) and torch.equal(new_b, exact_b.float())


def test_float32_grams_give_way_to_float64_below_float32_range():
    # |B| ~ 2^-74: float32 products of B's entries (~2^-148) are subnormal with a
    # bit or two left (float32 Grams forced: excess 2e-3); the underflow check
    # sends them to float64, where the scale is harmless
    terms = gaussian_terms(140, 120, [16, 16], seed=23, coefs=[1.0, -0.5])
    tiny = [(a.float(), (b * 2.0 ** -74).float(), c) for a, b, c in terms]
    new_a, new_b, route = truncate(tiny, 12, dtype=torch.float32)
    assert route == cpu.ROUTE_CHOLESKY
    assert excess(tiny, new_a, new_b, 12) <= 1e-6


def test_results_do_not_depend_on_threads_or_batching():
    modules = [gaussian_terms(60 + 7 * i, 45, [8, 4 + i], seed=10 + i, dtype=torch.float32) for i in range(5)]
    routes1, (a1, b1) = truncate_many(modules, 6, torch.float32, threads=1)
    routes2, (a2, b2) = truncate_many(modules, 6, torch.float32, threads=2)
    singles = [truncate(m, 6, torch.float32, threads=2) for m in modules]  # fewer modules than threads
    assert routes1 == routes2 == [s[2] for s in singles]
    for i in range(5):
        assert torch.equal(a1[i], a2[i]) and torch.equal(b1[i], b2[i])
        assert torch.equal(a1[i], singles[i][0]) and torch.equal(b1[i], singles[i][1])


def test_concurrent_calls_and_reused_buffers_give_the_serial_results():
    # Workers and their buffers are cached between calls: calls from several
    # threads at once, and calls after larger ones, must not see each other's data.
    sets = [[gaussian_terms(50 + 9 * j, 41 + 5 * i, [6 + 2 * i, 5], seed=40 + 7 * i + j) for j in range(3)]
            for i in range(4)]
    serial = [truncate_many(mods, 5, threads=2) for mods in sets]
    results = [None] * len(sets)

    def run(i):
        for _ in range(3):
            results[i] = truncate_many(sets[i], 5, threads=2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (routes, (a, b)), (routes_s, (a_s, b_s)) in zip(results, serial):
        assert routes == routes_s
        assert all(torch.equal(x, y) for x, y in zip(a + b, a_s + b_s))


def test_non_finite_input_is_reported_and_left_to_the_caller():
    terms = gaussian_terms(10, 8, [3], seed=11)
    terms[0][0][1, 2] = float("nan")
    new_a, new_b, route = truncate(terms, 2)
    assert route == cpu.ROUTE_FAILED


def test_cpu_backend_redoes_a_failed_module_with_the_torch_algebra(monkeypatch):
    """A module _C.truncate cannot settle goes through ops/numerics/gram_svd.py: same product."""
    from kmerge_fast.ops import Factor

    terms = gaussian_terms(50, 40, [6, 6], seed=12, dtype=torch.float32)
    batch = [[Factor(a, b, c) for a, b, c in terms]]
    (want_a, want_b), = cpu.truncate(batch, 4, torch.float32)
    monkeypatch.setattr(cpu._C, "truncate", lambda tasks, rank, threads: [cpu.ROUTE_FAILED] * len(tasks))
    (got_a, got_b), = cpu.truncate(batch, 4, torch.float32)
    m = product(terms)
    assert float((got_b.double() @ got_a.double() - want_b.double() @ want_a.double()).norm()) <= \
        1e-5 * float(m.norm())


def test_bad_descriptions_raise():
    terms = gaussian_terms(10, 8, [3], seed=13)
    a, b, c = terms[0]
    out_b, out_a = torch.empty(10, 2, dtype=torch.float64), torch.empty(2, 8, dtype=torch.float64)
    good = ([mat(b)], [mat(a, transpose=True)], mat(out_b), mat(out_a, transpose=True))
    with pytest.raises(ValueError, match="rank"):
        _C.truncate([good], 0, 0)
    with pytest.raises(ValueError, match="out_B"):
        _C.truncate([good], 3, 0)
    with pytest.raises(ValueError, match="stacked columns"):
        _C.truncate([([mat(b)], [mat(a[:2], transpose=True)], mat(out_b), mat(out_a, transpose=True))], 2, 0)
