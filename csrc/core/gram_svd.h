// The R x R algebra of truncation: the best rank-r factors of M = B A from the
// Grams Gb = B^T B and Ga = A A^T, held in float64 (the C++ twin of kmerge_fast/ops/numerics/gram_svd.py).
#pragma once

#include <cstdint>
#include <vector>

#include "codes.h"
#include "parallel.h"
#include "sym_eig.h"
#include "xty.h"

namespace kmf {

/// One module: Gb, Ga (R x R float64, row-major, symmetric) in; the
/// transforms T_B, T_A (R x rank float64, row-major) out, so that
/// B' = B T_B = U_r S_r and A'^T = A^T T_A = V_r. Columns beyond R (or, on
/// the eigen route, beyond the numerical rank of Ga) are zero.
struct GramSvdTask {
    const double* gb = nullptr;
    const double* ga = nullptr;
    std::int64_t big_r = 0;
    double* t_b = nullptr;
    double* t_a = nullptr;
    /// Out (rank entries, the caller's buffer): the kept squared singular
    /// values, sigma2[p] = ||B' e_p||^2, descending, zero beyond `kept`; and the
    /// number of kept (nonzero) columns, ||A'||_F^2.
    double* sigma2 = nullptr;
    std::int64_t kept = 0;
    /// false: a module the Cholesky route rejects is reported kRouteFailed
    /// without trying the eigen route (for Grams the caller will redo in float64).
    bool allow_eigen = true;
    /// Out: kRouteCholesky, kRouteEigen, or kRouteFailed (T_B, T_A unspecified:
    /// the caller must solve this module another way).
    int route = 0;
};

constexpr int kRouteCholesky = 0;
constexpr int kRouteEigen = 1;
constexpr int kRouteFailed = 2;
/// The routes by name (exported as _C.ROUTES).
inline constexpr CodeName kRouteCodes[] = {{"cholesky", kRouteCholesky}, {"eigen", kRouteEigen}, {"failed", kRouteFailed}};

/// Eigenvalues of Ga below this fraction of the largest are dropped on the eigen route.
constexpr double kRankTol = 1e-12;
/// Largest |A' A'^T - I| accepted from the Cholesky route.
constexpr double kOrthTol = 1e-6;

/// Per-thread workspace of gram_svd_one, reused across modules.
struct GramSvdWork {
    XtyWork xty;
    PackedY packed_g, packed_l;
    SymEigWork eig;
    Scratch va, lt, k, u, w, g1, chk;
};

/// Cholesky route: Ga = L L^T, K = L^T Gb L = W S^2 W^T (leading rank
/// eigenpairs only), T_B = L W, T_A = L^{-T} W; accepted when
/// T_A^T Ga T_A = I within kOrthTol. Otherwise the eigen route:
/// Ga = Va La Va^T without the directions below kRankTol, S = Va La^{1/2},
/// K = S^T Gb S = W S^2 W^T, T_B = S W, T_A = Va La^{-1/2} W.
/// One module, on the calling thread; sets t.route.
void gram_svd_one(GramSvdTask& t, std::int64_t rank, GramSvdWork& wk);

/// Many modules, one per worker (`threads` 0: all hardware threads); sets
/// every task's route. For Grams formed elsewhere (the GPU's): the host's
/// cores solve many small eigenproblems at once, where a GPU solver runs them
/// one after another.
void gram_svd(std::vector<GramSvdTask>& tasks, std::int64_t rank, int threads);

}  // namespace kmf
