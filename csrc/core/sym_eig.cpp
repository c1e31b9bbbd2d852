// Symmetric eigenpairs (see sym_eig.h). The three stages follow LAPACK's
// dsytd2 (reduction), dlaebz (bisection) and dstein / dlagtf / dlagts
// (inverse iteration); the code is ours, written for row-major storage.
//
// Storage: the upper triangle of a row-major matrix is the lower triangle of
// a column-major one, so row j right of the diagonal is "column j below the
// diagonal": every pass of the reduction reads and writes contiguous runs.
#include "sym_eig.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include "blas1.h"

namespace kmf {
namespace {

using V = Simd<double>::V;
constexpr int L = Simd<double>::L;

inline V vabs(V x) { return x < 0.0 ? -x : x; }
inline V vmax(V a, V b) { return a > b ? a : b; }

constexpr double kEps = DBL_EPSILON / 2;  // unit roundoff, as LAPACK's dlamch('E')
constexpr double kSafeMin = DBL_MIN;

/// ||x||_2 without overflow or harmful underflow.
double norm2(const double* x, std::int64_t m) {
    double big = 0.0;
    for (std::int64_t l = 0; l < m; ++l) big = std::max(big, std::fabs(x[l]));
    if (big == 0.0) return 0.0;
    double s = 0.0;
    for (std::int64_t l = 0; l < m; ++l) {
        const double t = x[l] / big;
        s += t * t;
    }
    return big * std::sqrt(s);
}

/// The power of two nearest 1 / max |a_ij| over the upper triangle (1 for a zero matrix).
double scale_for(std::int64_t n, const double* a, std::int64_t lda) {
    double big = 0.0;
    for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = i; j < n; ++j) big = std::max(big, std::fabs(a[i * lda + j]));
    if (big == 0.0 || !std::isfinite(big)) return 1.0;
    int ex = 0;
    std::frexp(big, &ex);  // big = f 2^ex, f in [0.5, 1)
    return std::ldexp(1.0, -ex);
}

/// H x = beta e_1 for x of length m (dlarfg): returns tau of H = I - tau v v^T
/// and overwrites x with v (v[0] = 1).
double householder(double* x, std::int64_t m, double& beta) {
    const double alpha = x[0];
    const double xnorm = norm2(x + 1, m - 1);
    double tau = 0.0;
    beta = alpha;
    if (xnorm != 0.0) {
        beta = -std::copysign(std::hypot(alpha, xnorm), alpha);
        tau = (beta - alpha) / beta;
        const double s = 1.0 / (alpha - beta);
        for (std::int64_t l = 1; l < m; ++l) x[l] *= s;
    }
    x[0] = 1.0;
    return tau;
}

/// Householder reduction of the upper triangle of a to T (dsytd2, lower, in
/// row-major terms). Step j reflects x = a[j][j+1..n) onto beta e_1 with
/// H_j = I - tau_j v v^T, stores v over x (v[0] = 1), and updates the
/// trailing block A22 <- H A22 H = A22 - v w^T - w v^T, where p = A22 v and
/// w = tau p - (tau^2 / 2)(p^T v) v.
///
/// The passes are fused: row j + 1 is updated first and yields the next
/// reflector v', then each further row is updated and at once multiplied by
/// v' (p' = A22' v'), so the trailing block is read and written once per step.
/// Requires lda >= n + L - 1 with zero columns from n on, so every row run
/// is a whole number of vectors (the padding stays zero).
void tridiagonalize(std::int64_t n, double* a, std::int64_t lda, double* d, double* e, double* tau) {
    if (n == 0) return;
    // Vectors indexed by absolute column, zero outside the current block and in the padding.
    const std::size_t len = static_cast<std::size_t>(n + 2 * L);
    std::vector<double> v_buf(len, 0.0), next_buf(len, 0.0), w(len, 0.0), p(len, 0.0);
    double* v = v_buf.data();
    double* next = next_buf.data();
    auto reflect_row = [&](std::int64_t r, double* out) {  // the reflector of step r from row r
        double* x = a + r * lda + r + 1;
        double beta;
        tau[r] = householder(x, n - r - 1, beta);
        d[r] = a[r * lda + r];
        e[r] = beta;
        std::fill(out, out + len, 0.0);
        std::copy(x, x + (n - r - 1), out + r + 1);
    };
    if (n == 1) {
        d[0] = a[0];
        return;
    }
    reflect_row(0, v);
    for (std::int64_t i = 1; i < n; ++i) {  // p = A22 v for step 0 (unfused start)
        const double* ri = a + i * lda;
        p[i] += ri[i] * v[i] + dot_axpy(ri + i + 1, v + i + 1, p.data() + i + 1, v[i], n - i - 1);
    }
    for (std::int64_t j = 0; j + 1 < n; ++j) {
        const double t = tau[j];
        const std::int64_t r1 = j + 1;
        std::fill(w.begin(), w.end(), 0.0);
        if (t != 0.0) {
            const double half = -0.5 * t * t * dot(p.data() + r1, v + r1, n - r1);
            for (std::int64_t l = r1; l < n; ++l) w[l] = t * p[l] + half * v[l];
        }
        double* row1 = a + r1 * lda;
        for (std::int64_t l = r1; l < n; ++l) row1[l] -= v[r1] * w[l] + w[r1] * v[l];
        if (r1 + 1 == n) {
            d[r1] = row1[r1];
            break;
        }
        reflect_row(r1, next);
        std::fill(p.begin(), p.end(), 0.0);
        // Rows two at a time: each vector of w, v, v' and p is loaded once for both.
        double* wd = w.data();
        double* pd = p.data();
        std::int64_t i = r1 + 1;
        for (; i + 1 < n; i += 2) {
            double* ra = a + i * lda;
            double* rb = ra + lda;
            ra[i] -= 2.0 * v[i] * w[i];
            const double x01 = ra[i + 1] - (v[i] * w[i + 1] + w[i] * v[i + 1]);
            ra[i + 1] = x01;
            rb[i + 1] -= 2.0 * v[i + 1] * w[i + 1];
            const double sa = ra[i] * next[i] + x01 * next[i + 1], sb = rb[i + 1] * next[i + 1];
            pd[i + 1] += x01 * next[i];
            const V va = V{} + v[i], wa = V{} + w[i], na = V{} + next[i];
            const V vb = V{} + v[i + 1], wb = V{} + w[i + 1], nb = V{} + next[i + 1];
            V acc_a0{}, acc_a1{}, acc_b0{}, acc_b1{};
            std::int64_t l = i + 2;
            for (; l + L < n; l += 2 * L) {
                const V w0 = vload<V>(wd + l), w1 = vload<V>(wd + l + L);
                const V v0 = vload<V>(v + l), v1 = vload<V>(v + l + L);
                const V n0 = vload<V>(next + l), n1 = vload<V>(next + l + L);
                const V xa0 = vload<V>(ra + l) - (va * w0 + wa * v0), xa1 = vload<V>(ra + l + L) - (va * w1 + wa * v1);
                const V xb0 = vload<V>(rb + l) - (vb * w0 + wb * v0), xb1 = vload<V>(rb + l + L) - (vb * w1 + wb * v1);
                vstore(ra + l, xa0);
                vstore(ra + l + L, xa1);
                vstore(rb + l, xb0);
                vstore(rb + l + L, xb1);
                acc_a0 += xa0 * n0;
                acc_a1 += xa1 * n1;
                acc_b0 += xb0 * n0;
                acc_b1 += xb1 * n1;
                vstore(pd + l, vload<V>(pd + l) + (xa0 * na + xb0 * nb));
                vstore(pd + l + L, vload<V>(pd + l + L) + (xa1 * na + xb1 * nb));
            }
            for (; l < n; l += L) {  // at most one more vector, into the zero padding
                const V w0 = vload<V>(wd + l), v0 = vload<V>(v + l), n0 = vload<V>(next + l);
                const V xa0 = vload<V>(ra + l) - (va * w0 + wa * v0);
                const V xb0 = vload<V>(rb + l) - (vb * w0 + wb * v0);
                vstore(ra + l, xa0);
                vstore(rb + l, xb0);
                acc_a0 += xa0 * n0;
                acc_b0 += xb0 * n0;
                vstore(pd + l, vload<V>(pd + l) + (xa0 * na + xb0 * nb));
            }
            pd[i] += sa + hsum(acc_a0 + acc_a1);
            pd[i + 1] += sb + hsum(acc_b0 + acc_b1);
        }
        if (i < n) {  // the last row, alone (n - 1 - i is zero: only its diagonal)
            double* ri = a + i * lda;
            ri[i] -= 2.0 * v[i] * w[i];
            pd[i] += ri[i] * next[i];
        }
        std::swap(v, next);
    }
}

/// LU factorisation with partial pivoting of T - lambda I (dlagtf): U has the
/// diagonal a, super-diagonals b and c2; mult holds the multipliers and
/// swapped[k] whether rows k and k + 1 were interchanged.
struct TriLU {
    std::vector<double> a, b, c2, mult;
    std::vector<char> swapped;

    void factor(std::int64_t n, const double* d, const double* e, double lambda) {
        a.assign(d, d + n);
        b.assign(e, e + std::max<std::int64_t>(n - 1, 0));
        mult.assign(e, e + std::max<std::int64_t>(n - 1, 0));  // the sub-diagonal, replaced by multipliers
        c2.assign(static_cast<std::size_t>(std::max<std::int64_t>(n - 2, 0)), 0.0);
        swapped.assign(static_cast<std::size_t>(n), 0);
        for (double& x : a) x -= lambda;
        if (n <= 1) return;
        double scale1 = std::fabs(a[0]) + std::fabs(b[0]);
        for (std::int64_t k = 0; k + 1 < n; ++k) {
            double scale2 = std::fabs(mult[k]) + std::fabs(a[k + 1]);
            if (k + 2 < n) scale2 += std::fabs(b[k + 1]);
            const double piv1 = a[k] == 0.0 ? 0.0 : std::fabs(a[k]) / scale1;
            if (mult[k] == 0.0) {
                scale1 = scale2;
                continue;  // nothing to eliminate (multiplier 0)
            }
            const double piv2 = std::fabs(mult[k]) / scale2;
            if (piv2 <= piv1) {
                scale1 = scale2;
                mult[k] /= a[k];
                a[k + 1] -= mult[k] * b[k];
            } else {
                swapped[k] = 1;
                const double m = a[k] / mult[k];
                a[k] = mult[k];
                const double temp = a[k + 1];
                a[k + 1] = b[k] - m * temp;
                if (k + 2 < n) {
                    c2[k] = b[k + 1];
                    b[k + 1] = -m * c2[k];
                }
                b[k] = temp;
                mult[k] = m;
            }
        }
    }

    /// Solves (T - lambda I) x = y in place (dlagts, job -1): pivots of U
    /// smaller than tol are pushed away from zero, so a singular system (lambda
    /// an exact eigenvalue) still gives a large, eigenvector-rich solution.
    void solve(std::int64_t n, double* y, double tol) const {
        for (std::int64_t k = 1; k < n; ++k) {
            if (!swapped[k - 1]) {
                y[k] -= mult[k - 1] * y[k - 1];
            } else {
                const double temp = y[k - 1];
                y[k - 1] = y[k];
                y[k] = temp - mult[k - 1] * y[k];
            }
        }
        const double bignum = 1.0 / kSafeMin;
        for (std::int64_t k = n - 1; k >= 0; --k) {
            double temp = y[k];
            if (k + 1 < n) temp -= b[k] * y[k + 1];
            if (k + 2 < n) temp -= c2[k] * y[k + 2];
            double ak = a[k], pert = std::copysign(tol, ak);
            for (;;) {
                const double absak = std::fabs(ak);
                if (absak < 1.0) {
                    if (absak < kSafeMin) {
                        if (absak == 0.0 || std::fabs(temp) * kSafeMin > absak) {
                            ak += pert;
                            pert *= 2.0;
                            continue;
                        }
                        temp *= bignum;
                        ak *= bignum;
                    } else if (std::fabs(temp) > absak * bignum) {
                        ak += pert;
                        pert *= 2.0;
                        continue;
                    }
                }
                break;
            }
            y[k] = temp / ak;
        }
    }

    /// dlagts' default perturbation: eps times the largest entry of U.
    double default_tol(std::int64_t n) const {
        double t = 0.0;
        for (std::int64_t k = 0; k < n; ++k) t = std::max(t, std::fabs(a[k]));
        for (const double x : b) t = std::max(t, std::fabs(x));
        for (const double x : c2) t = std::max(t, std::fabs(x));
        t *= kEps;
        return t == 0.0 ? kEps : t;
    }
};

/// A reproducible uniform(-1, 1) stream (splitmix64), for inverse iteration's start vectors.
struct Uniform {
    std::uint64_t s;
    double next() {
        std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        return static_cast<double>(z >> 11) * (2.0 / 9007199254740992.0) - 1.0;
    }
};

/// Inverse iteration on T - shift I (dstein): a random start, then up to
/// kMaxIts solves with the LU factors, each right-hand side scaled so that a
/// converged solution has max-norm >= sqrt(0.1 / n); accepted once that held
/// kExtra + 1 times. Vectors are normalised, largest entry positive.
struct InverseIteration {
    std::int64_t n;
    const double* d;
    const double* e;
    double onenrm;
    static constexpr int kMaxIts = 5, kExtra = 2;

    static Uniform start(std::int64_t c) { return Uniform{0x5DEECE66Dull + static_cast<std::uint64_t>(c) * 0x2545F4914F6CDD1Dull}; }
    double dtpcrt() const { return std::sqrt(0.1 / static_cast<double>(n)); }

    /// Eigenvector c at `shift`, orthogonalised after every solve against the
    /// m unit vectors prev (rows of n); returns 1 if it did not converge.
    int single(std::int64_t c, double shift, const double* prev, std::int64_t m, double* out) const {
        TriLU lu;
        lu.factor(n, d, e, shift);
        const double tol = lu.default_tol(n);
        std::vector<double> y(static_cast<std::size_t>(n));
        Uniform rng = start(c);
        for (std::int64_t i = 0; i < n; ++i) y[i] = rng.next();
        int checks = 0;
        bool converged = false;
        for (int its = 0; its < kMaxIts && !converged; ++its) {
            double ymax = 0.0;
            for (std::int64_t i = 0; i < n; ++i) ymax = std::max(ymax, std::fabs(y[i]));
            const double scl = static_cast<double>(n) * onenrm * std::max(kEps, std::fabs(lu.a[n - 1])) / ymax;
            for (std::int64_t i = 0; i < n; ++i) y[i] *= scl;
            lu.solve(n, y.data(), tol);
            for (std::int64_t j = 0; j < m; ++j) {  // modified Gram-Schmidt
                const double* zj = prev + j * n;
                const double h = dot(y.data(), zj, n);
                for (std::int64_t i = 0; i < n; ++i) y[i] -= h * zj[i];
            }
            double nrm = 0.0;
            for (std::int64_t i = 0; i < n; ++i) nrm = std::max(nrm, std::fabs(y[i]));
            if (!(nrm < dtpcrt()) && ++checks >= kExtra + 1) converged = true;
        }
        normalise(y.data(), 1, 0, out);
        return converged ? 0 : 1;
    }

    /// The same for count <= L eigenvectors with no reorthogonalisation, one
    /// per SIMD lane: the LU factorisation's pivoting becomes a per-lane
    /// select, and each solve multiplies by precomputed reciprocal pivots.
    /// Writes row idx[q] of z for lane q; returns the number not converged.
    int lanes(const std::int64_t* idx, std::size_t count, const double* shifts, double* z) const {
        V x{};
        for (int q = 0; q < L; ++q) x[q] = shifts[idx[std::min<std::size_t>(q, count - 1)]];
        std::vector<V> u0(n), u1(n), u2(n), mult(n), rinv(n), y(n);
        std::vector<V> swapped(n);  // 1 where rows k, k + 1 were interchanged
        // dlagtf, lane-parallel (piv2 <= piv1 compared without dividing).
        V ak = d[0] - x, bk = V{} + (n > 1 ? e[0] : 0.0);
        V scale1 = vabs(ak) + vabs(bk);
        for (std::int64_t k = 0; k + 1 < n; ++k) {
            const V an = d[k + 1] - x;
            const double ek = e[k], en = k + 2 < n ? e[k + 1] : 0.0;
            const V scale2 = std::fabs(ek) + vabs(an) + std::fabs(en);
            if (ek == 0.0) {  // nothing to eliminate
                u0[k] = ak, u1[k] = bk, u2[k] = V{}, mult[k] = V{}, swapped[k] = V{};
                scale1 = scale2, ak = an, bk = V{} + en;
                continue;
            }
            const auto keep = std::fabs(ek) * scale1 <= vabs(ak) * scale2;  // no interchange
            const V m = (keep ? (V{} + ek) : ak) / (keep ? ak : (V{} + ek));
            u0[k] = keep ? ak : V{} + ek;
            u1[k] = keep ? bk : an;
            u2[k] = keep ? V{} : V{} + en;
            mult[k] = m;
            swapped[k] = keep ? V{} : V{} + 1.0;
            const V a_next = keep ? an - m * bk : bk - m * an;
            bk = keep ? V{} + en : -m * en;
            scale1 = keep ? scale2 : scale1;
            ak = a_next;
        }
        u0[n - 1] = ak;
        // dlagts' perturbation of zero pivots: tol = eps max |U|, per lane.
        V tol{};
        for (std::int64_t k = 0; k < n; ++k) tol = vmax(tol, vmax(vabs(u0[k]), vmax(vabs(u1[k]), vabs(u2[k]))));
        tol *= kEps;
        tol = tol == 0.0 ? V{} + kEps : tol;
        for (std::int64_t k = 0; k < n; ++k) {
            const V a = u0[k];
            rinv[k] = 1.0 / (vabs(a) < kSafeMin ? a + (a < 0.0 ? -tol : tol) : a);
        }
        for (int q = 0; q < L; ++q) {
            Uniform rng = start(idx[std::min<std::size_t>(q, count - 1)]);
            for (std::int64_t i = 0; i < n; ++i) y[i][q] = rng.next();
        }
        const V last = vmax(V{} + kEps, vabs(u0[n - 1]));
        int checks[L] = {};
        bool done[L] = {};
        std::vector<double> out(static_cast<std::size_t>(n));
        for (int its = 0; its < kMaxIts; ++its) {
            V ymax{};
            for (std::int64_t i = 0; i < n; ++i) ymax = vmax(ymax, vabs(y[i]));
            const V scl = static_cast<double>(n) * onenrm * last / ymax;
            for (std::int64_t i = 0; i < n; ++i) y[i] *= scl;
            for (std::int64_t k = 1; k < n; ++k) {  // apply L^{-1} P
                const V prev = y[k - 1], cur = y[k];
                const auto sw = swapped[k - 1] > 0.5;
                y[k - 1] = sw ? cur : prev;
                y[k] = sw ? prev - mult[k - 1] * cur : cur - mult[k - 1] * prev;
            }
            for (std::int64_t k = n - 1; k >= 0; --k) {  // U^{-1}
                V t = y[k];
                if (k + 1 < n) t -= u1[k] * y[k + 1];
                if (k + 2 < n) t -= u2[k] * y[k + 2];
                y[k] = t * rinv[k];
            }
            V nrm{};
            for (std::int64_t i = 0; i < n; ++i) nrm = vmax(nrm, vabs(y[i]));
            bool all = true;
            for (std::size_t q = 0; q < count; ++q) {
                if (done[q]) continue;
                if (!(nrm[q] < dtpcrt()) && ++checks[q] >= kExtra + 1) {
                    done[q] = true;
                    for (std::int64_t i = 0; i < n; ++i) out[i] = y[i][q];
                    normalise(out.data(), 1, 0, z + idx[q] * n);
                }
                all = all && done[q];
            }
            if (all) break;
        }
        int failures = 0;
        for (std::size_t q = 0; q < count; ++q) {
            if (done[q]) continue;
            ++failures;
            for (std::int64_t i = 0; i < n; ++i) out[i] = y[i][q];
            normalise(out.data(), 1, 0, z + idx[q] * n);
        }
        return failures;
    }

    /// out = y / ||y||_2 with its largest entry made positive (y: n values at stride `stride`, offset `off`).
    void normalise(const double* y, std::int64_t stride, std::int64_t off, double* out) const {
        for (std::int64_t i = 0; i < n; ++i) out[i] = y[i * stride + off];
        double s = 1.0 / norm2(out, n);
        std::int64_t imax = 0;
        for (std::int64_t i = 1; i < n; ++i)
            if (std::fabs(out[i]) > std::fabs(out[imax])) imax = i;
        if (out[imax] < 0) s = -s;
        for (std::int64_t i = 0; i < n; ++i) out[i] *= s;
    }
};

}  // namespace

SymEig::SymEig(std::int64_t n, const double* a, std::int64_t lda)
    : n_(n), lda_((n + 2 * L - 2) / L * L), d_(static_cast<std::size_t>(n)),
      e_(static_cast<std::size_t>(std::max<std::int64_t>(n - 1, 0))),
      tau_(static_cast<std::size_t>(std::max<std::int64_t>(n - 1, 0))) {
    // The upper triangle, scaled by a power of two, into zero-padded rows (see tridiagonalize).
    const double scale = scale_for(n, a, lda);
    a_.assign(static_cast<std::size_t>(n * lda_), 0.0);
    for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = i; j < n; ++j) a_[static_cast<std::size_t>(i * lda_ + j)] = a[i * lda + j] * scale;
    scale_ = scale;
    tridiagonalize(n, a_.data(), lda_, d_.data(), e_.data(), tau_.data());
}

void SymEig::top_values(std::int64_t k, double* w) const {
    const std::int64_t n = n_;
    if (k <= 0) return;
    const double* d = d_.data();
    std::vector<double> e2(e_.size());
    double e2max = 0.0;
    for (std::size_t i = 0; i < e_.size(); ++i) e2max = std::max(e2max, e2[i] = e_[i] * e_[i]);
    const double pivmin = kSafeMin * std::max(1.0, e2max);
    // Gershgorin interval, widened as dstebz does.
    double gl = d[0], gu = d[0];
    for (std::int64_t i = 0; i < n; ++i) {
        const double r = (i > 0 ? std::fabs(e_[i - 1]) : 0.0) + (i + 1 < n ? std::fabs(e_[i]) : 0.0);
        gl = std::min(gl, d[i] - r);
        gu = std::max(gu, d[i] + r);
    }
    const double tnorm = std::max(std::fabs(gl), std::fabs(gu));
    if (tnorm == 0.0) {  // T = 0
        std::fill(w, w + k, 0.0);
        return;
    }
    gl -= 2.1 * tnorm * kEps * n + 4.2 * pivmin;
    gu += 2.1 * tnorm * kEps * n + 4.2 * pivmin;
    // Lane c looks for the eigenvalue with ascending index n - 1 - c: with
    // count(x) = #{eigenvalues < x}, keep count(lo) <= idx < count(hi).
    std::vector<double> lo(static_cast<std::size_t>(k), gl), hi(static_cast<std::size_t>(k), gu),
        mid(static_cast<std::size_t>(k)), q(static_cast<std::size_t>(k));
    std::vector<std::int64_t> cnt(static_cast<std::size_t>(k));
    const double atol = kEps * tnorm + 2.0 * pivmin;
    for (int iter = 0; iter < 128; ++iter) {
        bool done = true;
        for (std::int64_t c = 0; c < k; ++c) {
            mid[c] = 0.5 * (lo[c] + hi[c]);
            const double width = hi[c] - lo[c];
            if (width > 2.0 * kEps * std::max(std::fabs(lo[c]), std::fabs(hi[c])) + atol) done = false;
        }
        if (done) break;
        // Sturm counts of all lanes at once (the lane loop vectorises).
        for (std::int64_t c = 0; c < k; ++c) {
            double t = d[0] - mid[c];
            t = std::fabs(t) < pivmin ? -pivmin : t;
            q[c] = t;
            cnt[c] = t <= 0.0;
        }
        for (std::int64_t i = 1; i < n; ++i) {
            const double di = d[i], ei = e2[i - 1];
            for (std::int64_t c = 0; c < k; ++c) {
                double t = (di - mid[c]) - ei / q[c];
                t = std::fabs(t) < pivmin ? -pivmin : t;
                q[c] = t;
                cnt[c] += t <= 0.0;
            }
        }
        for (std::int64_t c = 0; c < k; ++c) {
            if (cnt[c] > n - 1 - c)
                hi[c] = mid[c];
            else
                lo[c] = mid[c];
        }
    }
    for (std::int64_t c = 0; c < k; ++c) w[c] = 0.5 * (lo[c] + hi[c]) / scale_;
}

int SymEig::vectors(std::int64_t k, const double* w, double* v, std::int64_t ldv) const {
    const std::int64_t n = n_;
    if (k <= 0 || n == 0) return 0;
    const double* d = d_.data();
    const double* e = e_.data();
    double onenrm = 0.0;
    for (std::int64_t i = 0; i < n; ++i)
        onenrm = std::max(onenrm, std::fabs(d[i]) + (i > 0 ? std::fabs(e[i - 1]) : 0.0) + (i + 1 < n ? std::fabs(e[i]) : 0.0));
    if (onenrm == 0.0) {  // T = 0: every vector is an eigenvector; take e_0 .. e_{k-1}
        for (std::int64_t i = 0; i < n; ++i)
            for (std::int64_t c = 0; c < k; ++c) v[i * ldv + c] = i == c ? 1.0 : 0.0;
        return 0;  // all reflectors are zero, so no back-transformation either
    }
    const InverseIteration inv{n, d, e, onenrm};

    // Shifts and clusters as dstein: (nearly) equal eigenvalues are separated a
    // little so their LU factors differ; a cluster is a run with gaps below ortol.
    const double ortol = 1e-3 * onenrm;
    std::vector<double> shift(static_cast<std::size_t>(k));
    std::vector<std::int64_t> head(static_cast<std::size_t>(k));
    for (std::int64_t c = 0; c < k; ++c) {
        double x = w[c] * scale_;
        head[c] = c;
        if (c > 0) {
            const double prev = shift[c - 1], pertol = 10.0 * std::fabs(kEps * x);
            if (prev - x < pertol) x = prev - pertol;
            if (!(prev - x > ortol)) head[c] = head[c - 1];
        }
        shift[c] = x;
    }
    // z: the k eigenvectors of T, one contiguous row each (z[c * n + i]).
    std::vector<double> z(static_cast<std::size_t>(k * n));
    int failures = 0;
    // 1. The first member of each cluster needs no reorthogonalisation: L at a time, one per SIMD lane.
    std::vector<std::int64_t> heads;
    for (std::int64_t c = 0; c < k; ++c)
        if (head[c] == c) heads.push_back(c);
    for (std::size_t g = 0; g < heads.size(); g += L)
        failures += inv.lanes(heads.data() + g, std::min<std::size_t>(L, heads.size() - g), shift.data(), z.data());
    // 2. The other members one at a time, against the members before them (dstein).
    for (std::int64_t c = 0; c < k; ++c)
        if (head[c] < c) failures += inv.single(c, shift[c], z.data() + head[c] * n, c - head[c], z.data() + c * n);

    // Back-transformation x = H_0 H_1 ... H_{n-3} z, the last reflector first,
    // on the row-major n x k block v.
    for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t c = 0; c < k; ++c) v[i * ldv + c] = z[c * n + i];
    std::vector<double> h(static_cast<std::size_t>(k));
    for (std::int64_t j = n - 2; j >= 0; --j) {
        const double t = tau_[j];
        if (t == 0.0) continue;
        const double* x = a_.data() + j * lda_ + j + 1;  // v over rows j+1 .. n-1, v[0] = 1
        std::fill(h.begin(), h.end(), 0.0);
        for (std::int64_t i = 0; i < n - j - 1; ++i) {
            const double xi = x[i];
            const double* vi = v + (j + 1 + i) * ldv;
            for (std::int64_t c = 0; c < k; ++c) h[c] += xi * vi[c];
        }
        for (std::int64_t c = 0; c < k; ++c) h[c] *= t;
        for (std::int64_t i = 0; i < n - j - 1; ++i) {
            const double xi = x[i];
            double* __restrict vi = v + (j + 1 + i) * ldv;
            for (std::int64_t c = 0; c < k; ++c) vi[c] -= xi * h[c];
        }
    }
    return failures;
}

}  // namespace kmf
