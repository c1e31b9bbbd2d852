// Leading eigenpairs of a small dense symmetric matrix, in float64.
#pragma once

#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xty.h"

namespace kmf {

/// Buffers of one thread's SymEig calls, reused across matrices (a fresh
/// half-megabyte per module would come back as page faults).
struct SymEigWork {
    Scratch a, vwv, p, z, lanes, back;
    XtyWork xty;
};

/// Eigenvalues and eigenvectors of a symmetric n x n matrix A, largest first,
/// by LAPACK dsyevx's method:
///
///   1. (constructor) Householder reduction A = Q T Q^T to a tridiagonal T,
///      2/3 n^3 multiply-adds, in panels whose trailing updates (half the
///      work) run on the shared micro-kernel;
///   2. (top_values) bisection on Sturm counts of T for the k largest
///      eigenvalues, each to an absolute accuracy of a few eps ||T||;
///   3. (vectors) inverse iteration on T for their eigenvectors, O(n) per
///      solve, with modified Gram-Schmidt inside clusters of close
///      eigenvalues (gap below 1e-3 ||T||_1), so tied and clustered
///      eigenvalues still get orthonormal vectors (the first vector of each
///      cluster needs none: those go SIMD-lane-parallel); then back-transformation
///      by the reflectors of step 1 in compact-WY blocks of 16 reflectors
///      (their products on xty), n^2 (k + 4) multiply-adds.
///
/// The matrix is scaled by a power of two first (exact), so every tolerance
/// is relative to its largest entry and nothing over- or underflows.
class SymEig {
public:
    /// a: row-major, lda >= n; only the upper triangle (column >= row) is
    /// read, into a copy (the reduction works there). Entries must be finite.
    /// work: the caller's buffers (kept alive and unshared while this object
    /// is used); null: the object's own.
    SymEig(std::int64_t n, const double* a, std::int64_t lda, SymEigWork* work = nullptr);
    SymEig(const SymEig&) = delete;
    SymEig& operator=(const SymEig&) = delete;

    /// The k largest eigenvalues (0 <= k <= n) into w, descending.
    void top_values(std::int64_t k, double* w) const;

    /// Unit eigenvectors for the eigenvalues w[0..k) returned by top_values:
    /// column c of v (n x k, row-major, ldv >= k) belongs to w[c]. Returns
    /// how many inverse iterations missed their convergence test within the
    /// iteration limit (0 on success; those vectors are still orthonormalised
    /// within their cluster).
    int vectors(std::int64_t k, const double* w, double* v, std::int64_t ldv) const;

private:
    /// v (n x k, row stride ldv) <- Q v with the reflectors of the reduction.
    void back_transform(std::int64_t k, double* v, std::int64_t ldv) const;

    std::int64_t n_;
    std::int64_t lda_;            // row stride of a_: n + L - 1 or more, rounded to whole vectors
    SymEigWork own_;              // used when the caller passes no work
    SymEigWork* wk_;
    double* a_ = nullptr;         // the scaled upper triangle, then the reflectors
    double scale_ = 1.0;          // T = Q^T (scale_ A) Q
    std::vector<double> d_, e_;   // diagonal (n) and off-diagonal (n - 1) of T
    std::vector<double> tau_;     // reflector coefficients
};

}  // namespace kmf
