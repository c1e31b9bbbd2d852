// Both routes of the truncation core (see gram_svd.h), one module per thread.
// The O(R^3) products run on the shared register-blocked micro-kernel and
// skip the zero half of triangular operands; the eigenproblems go to SymEig.
#include "gram_svd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "blas1.h"
#include "finite.h"
#include "xty.h"
#include "parallel.h"
#include "sym_eig.h"

namespace kmf {
namespace {

/// Ga = U^T U (= L L^T with L = U^T) for upper triangular U (row-major
/// n x n, the zero triangle written as zeros); false if a pivot is not
/// positive (Ga not numerically positive definite). Right-looking in panels
/// of kPanel rows: a panel is factored with row operations, then the trailing
/// block takes the rank-kPanel update A22 -= U12^T U12 on the micro-kernel.
/// The callers read L as U through the transposed operands of xty.
bool cholesky(std::int64_t n, const double* g, double* u, GramSvdWork& wk) {
    constexpr std::int64_t kPanel = 32;
    for (std::int64_t i = 0; i < n; ++i) {
        std::fill(u + i * n, u + i * n + i, 0.0);
        std::copy(g + i * n + i, g + (i + 1) * n, u + i * n + i);
    }
    for (std::int64_t k0 = 0; k0 < n; k0 += kPanel) {
        const std::int64_t k1 = std::min(n, k0 + kPanel);
        for (std::int64_t k = k0; k < k1; ++k) {
            double* uk = u + k * n;
            if (!(uk[k] > 0.0)) return false;
            const double ukk = std::sqrt(uk[k]), inv = 1.0 / ukk;
            uk[k] = ukk;
            for (std::int64_t j = k + 1; j < n; ++j) uk[j] *= inv;
            for (std::int64_t i = k + 1; i < k1; ++i) {  // the rest of the panel
                double* __restrict ui = u + i * n;
                const double f = uk[i];
                for (std::int64_t j = i; j < n; ++j) ui[j] -= f * uk[j];
            }
        }
        const std::int64_t m = n - k1;
        if (m > 0)
            xty(k1 - k0, m, m, u + k0 * n + k1, n, u + k0 * n + k1, n, u + k1 * n + k1, n,
                {false, false, true, true}, wk.xty);
    }
    return true;
}

/// The kk leading eigenvectors of the symmetric k_mat (n x n, upper triangle
/// read) into w (n x ldw, columns 0..kk), and their eigenvalues, clamped at
/// zero, into values (kk); false if inverse iteration failed.
bool leading_vectors(std::int64_t n, const double* k_mat, std::int64_t kk, double* w, std::int64_t ldw,
                     SymEigWork& ew, double* values) {
    SymEig eig(n, k_mat, n, &ew);
    eig.top_values(kk, values);
    const bool ok = eig.vectors(kk, values, w, ldw) == 0;
    for (std::int64_t p = 0; p < kk; ++p) values[p] = std::max(values[p], 0.0);
    return ok;
}

/// X = U^{-1} W in place for upper triangular U (n x n) and W (n x c, row
/// stride ldw): back substitution in blocks of kBlock rows from the bottom;
/// each block first takes the solved rows below it, W_b -= U_b,below X_below
/// (xty, with U_b,below as the transposed X operand), then solves its diagonal block.
void upper_solve(std::int64_t n, const double* u, double* w, std::int64_t c, std::int64_t ldw, XtyWork& xw) {
    constexpr std::int64_t kBlock = 32;
    XtyShape above;  // X = U[b0:b1, b1:]^T
    above.subtract = above.x_trans = true;
    for (std::int64_t b1 = n; b1 > 0; b1 -= kBlock) {
        const std::int64_t b0 = std::max<std::int64_t>(0, b1 - kBlock);
        if (b1 < n)
            xty(n - b1, b1 - b0, c, u + b0 * n + b1, n, w + b1 * ldw, ldw, w + b0 * ldw, ldw, above, xw);
        for (std::int64_t i = b1 - 1; i >= b0; --i) {
            double* __restrict xi = w + i * ldw;
            for (std::int64_t k = i + 1; k < b1; ++k) {
                const double uik = u[i * n + k];
                const double* xk = w + k * ldw;
                for (std::int64_t q = 0; q < c; ++q) xi[q] -= uik * xk[q];
            }
            const double inv = 1.0 / u[i * n + i];
            for (std::int64_t q = 0; q < c; ++q) xi[q] *= inv;
        }
    }
}

/// The upper triangle of K = L^T G L (G symmetric, L = U^T lower triangular, all
/// n x n row-major), by block rows of kBlock: rows [k0, k1) of K right of
/// column k0 need only G and L from k0 on, as
///   Z^T = L[k0:, k0:k1]^T G[k0:, k0:],   K[k0:k1, k0:] = Z^T L[k0:, k0:],
/// n^3 / 2 multiply-adds in all (the two full products G L, L^T (G L) take
/// 5 n^3 / 6). G and L are packed once; each product packs only its thin X.
void congruence_upper(std::int64_t n, const double* g, const double* u, double* k_mat, GramSvdWork& wk) {
    constexpr std::int64_t kBlock = 32;
    pack_y(n, n, g, n, false, wk.packed_g);
    pack_y(n, n, u, n, true, wk.packed_l);  // L = U^T
    double* zt = wk.u.get<double>(static_cast<std::size_t>(kBlock * n));
    XtyShape first, second;
    first.x_lower = first.x_trans = true;  // X = L[k0:, k0:k1] = U[k0:k1, k0:]^T: L[k0 + k][k0 + i] = 0 for k < i
    second.y_lower = second.x_trans = true;
    for (std::int64_t k0 = 0; k0 < n; k0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - k0), m = n - k0;
        xty_packed(nb, u + k0 * n + k0, n, wk.packed_g, k0, k0, zt, m, first, wk.xty);
        xty_packed(nb, zt, m, wk.packed_l, k0, k0, k_mat + k0 * n + k0, n, second, wk.xty);
    }
}

/// Cholesky route; false if Cholesky or the orthonormality check rejects the module.
bool cholesky_route(GramSvdTask& t, std::int64_t rank, GramSvdWork& wk) {
    const std::int64_t R = t.big_r, kk = std::min(rank, R);
    double* lt = wk.lt.get<double>(static_cast<std::size_t>(R * R));  // L^T
    if (!cholesky(R, t.ga, lt, wk)) return false;
    double* k_mat = wk.k.get<double>(static_cast<std::size_t>(R * R));
    congruence_upper(R, t.gb, lt, k_mat, wk);
    double* w = wk.w.get<double>(static_cast<std::size_t>(R * rank));
    std::fill(w, w + R * rank, 0.0);
    if (!leading_vectors(R, k_mat, kk, w, rank, wk.eig, t.sigma2)) return false;
    t.kept = kk;
    // T_B = L W = (L^T)^T W; T_A = L^{-T} W.
    XtyShape by_lt;  // X = L^T, upper triangular
    by_lt.x_upper = true;
    xty(R, R, rank, lt, R, w, rank, t.t_b, rank, by_lt, wk.xty);
    std::copy(w, w + R * rank, t.t_a);
    upper_solve(R, lt, t.t_a, rank, rank, wk.xty);
    // The check: A' A'^T = T_A^T Ga T_A = I on the kk live columns (the rest are zero).
    double* g1 = wk.g1.get<double>(static_cast<std::size_t>(R * rank));
    double* chk = wk.chk.get<double>(static_cast<std::size_t>(rank * rank));
    xty(R, R, rank, t.ga, R, t.t_a, rank, g1, rank, {}, wk.xty);
    xty(R, rank, rank, t.t_a, rank, g1, rank, chk, rank, {}, wk.xty);
    double dev = 0.0;
    for (std::int64_t i = 0; i < rank; ++i)
        for (std::int64_t j = 0; j < rank; ++j) {
            const double want = (i == j && i < kk) ? 1.0 : 0.0;
            dev = std::max(dev, std::fabs(chk[i * rank + j] - want));
        }
    return dev <= kOrthTol;  // false for NaN too
}

/// Eigen route; false if an eigenproblem failed.
bool eigen_route(GramSvdTask& t, std::int64_t rank, GramSvdWork& wk) {
    const std::int64_t R = t.big_r;
    SymEig eig_a(R, t.ga, R);  // its own buffers: leading_vectors below uses wk.eig
    std::vector<double> la(static_cast<std::size_t>(R));
    eig_a.top_values(R, la.data());
    const double cut = kRankTol * std::max(la[0], 0.0);
    std::int64_t nk = 0;
    while (nk < R && la[static_cast<std::size_t>(nk)] > cut) ++nk;
    std::fill(t.t_b, t.t_b + R * rank, 0.0);
    std::fill(t.t_a, t.t_a + R * rank, 0.0);
    std::fill(t.sigma2, t.sigma2 + rank, 0.0);  // a rejected Cholesky route may have written them
    t.kept = 0;
    if (nk == 0) return true;  // Ga = 0: the product is zero
    double* va = wk.va.get<double>(static_cast<std::size_t>(R * nk));
    if (eig_a.vectors(nk, la.data(), va, nk) != 0) return false;
    // S = Va La^{1/2} (R x nk); K = S^T (Gb S) (nk x nk, upper triangle).
    double* s = wk.g1.get<double>(static_cast<std::size_t>(R * nk));
    for (std::int64_t i = 0; i < R; ++i)
        for (std::int64_t c = 0; c < nk; ++c) s[i * nk + c] = va[i * nk + c] * std::sqrt(la[static_cast<std::size_t>(c)]);
    double* u = wk.u.get<double>(static_cast<std::size_t>(R * nk));
    double* k_mat = wk.chk.get<double>(static_cast<std::size_t>(nk * nk));
    xty(R, R, nk, t.gb, R, s, nk, u, nk, {}, wk.xty);
    xty(R, nk, nk, s, nk, u, nk, k_mat, nk, {false, false, true}, wk.xty);
    const std::int64_t kk = std::min(rank, nk);
    double* w = wk.w.get<double>(static_cast<std::size_t>(nk * kk));
    if (!leading_vectors(nk, k_mat, kk, w, kk, wk.eig, t.sigma2)) return false;
    t.kept = kk;
    for (std::int64_t i = 0; i < R; ++i) {
        double* __restrict tb = t.t_b + i * rank;
        double* __restrict ta = t.t_a + i * rank;
        for (std::int64_t q = 0; q < nk; ++q) {
            const double root = std::sqrt(la[static_cast<std::size_t>(q)]);
            const double sb = va[i * nk + q] * root, sa = va[i * nk + q] / root;
            const double* wq = w + q * kk;
            for (std::int64_t c = 0; c < kk; ++c) {
                tb[c] += sb * wq[c];
                ta[c] += sa * wq[c];
            }
        }
    }
    return true;
}

}  // namespace

void gram_svd_one(GramSvdTask& t, std::int64_t rank, GramSvdWork& wk) {
    const std::int64_t R = t.big_r;
    std::fill(t.sigma2, t.sigma2 + rank, 0.0);
    t.kept = 0;
    if (R == 0) {
        t.route = kRouteCholesky;
    } else if (!all_finite(t.gb, R * R) || !all_finite(t.ga, R * R)) {
        t.route = kRouteFailed;
    } else if (cholesky_route(t, rank, wk)) {
        t.route = kRouteCholesky;
    } else if (t.allow_eigen) {
        t.route = eigen_route(t, rank, wk) ? kRouteEigen : kRouteFailed;
    } else {
        t.route = kRouteFailed;
    }
}

void gram_svd(std::vector<GramSvdTask>& tasks, std::int64_t rank, int threads) {
    const std::int64_t n = static_cast<std::int64_t>(tasks.size());
    std::vector<GramSvdWork> work(static_cast<std::size_t>(num_workers(threads, n)));
    parallel_for(n, threads, [&](std::int64_t i, int w) { gram_svd_one(tasks[static_cast<std::size_t>(i)], rank, work[static_cast<std::size_t>(w)]); });
}

}  // namespace kmf
