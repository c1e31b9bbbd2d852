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
#include "parallel.h"
#include "xty.h"

namespace kmf {
namespace {

using V = Simd<double>::V;
constexpr int L = Simd<double>::L;

/// Lane indices 0 .. L-1, for masks.
typedef std::int64_t VI __attribute__((vector_size(kVecBytes)));
VI make_lanes() {  // not constexpr: clang cannot constant-evaluate vector subscript stores
    VI v{};
    for (int q = 0; q < L; ++q) v[q] = q;
    return v;
}
const VI kLane = make_lanes();

inline V vabs(V x) { return x < 0.0 ? -x : x; }
inline V vmax(V a, V b) { return a > b ? a : b; }

constexpr double kEps = DBL_EPSILON / 2;  // unit roundoff, as LAPACK's dlamch('E')
constexpr double kSafeMin = DBL_MIN;

/// ||x||_2 without overflow or harmful underflow.
double norm2(const double* x, std::int64_t m) {
    // One vectorised pass; redo it scaled only where the sum of squares may
    // have under- or overflowed (the matrix is scaled to entries <= 1, so rarely).
    const double s = dot(x, x, m);
    if (s > 1e-290 && s < 1e290) return std::sqrt(s);
    double big = 0.0;
    for (std::int64_t l = 0; l < m; ++l) big = std::max(big, std::fabs(x[l]));
    if (big == 0.0) return 0.0;
    const double inv = 1.0 / big;
    double t = 0.0;
    for (std::int64_t l = 0; l < m; ++l) t += (x[l] * inv) * (x[l] * inv);
    return big * std::sqrt(t);
}

/// The power of two nearest 1 / max |a_ij| over the upper triangle (1 for a zero matrix).
double scale_for(std::int64_t n, const double* a, std::int64_t lda) {
    // Vector lanes: a scalar max would be one chain of dependent compares.
    V acc{};
    double big = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
        const double* row = a + i * lda;
        std::int64_t j = i;
        for (; j + L <= n; j += L) acc = vmax(acc, vabs(vload<V>(row + j)));
        for (; j < n; ++j) big = std::max(big, std::fabs(row[j]));
    }
    for (int q = 0; q < L; ++q) big = std::max(big, acc[q]);
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

/// p[l] += (A v)[l] for the symmetric block of rows / columns [i0, n) of the
/// upper triangle of a: row i adds its diagonal and right part to p_i (a dot
/// product) and its right part to p_l (an axpy). Rows go in fours, which share
/// every load and store of v and p (the pass is bound by loads). Needs zero
/// padding (rows, v, p) up to n + L - 1.
void symv_upper(const double* a, std::int64_t lda, std::int64_t i0, std::int64_t n, const double* v, double* p) {
    constexpr int G = 4;
    std::int64_t i = i0;
    for (; i + G <= n; i += G) {
        const double* r[G];
        for (int g = 0; g < G; ++g) r[g] = a + (i + g) * lda;
        // The G x G diagonal block (symmetric, stored above its diagonal), in scalars.
        double head[G];
        for (int g = 0; g < G; ++g) {
            double sg = 0.0;
            for (int h = 0; h < G; ++h) sg += (h >= g ? r[g][i + h] : r[h][i + g]) * v[i + h];
            head[g] = sg;
        }
        V vg[G], acc[G];
        for (int g = 0; g < G; ++g) vg[g] = V{} + v[i + g];
        // Vectors start at a multiple of L (lanes left of column i + G masked off): the
        // loads of p then match the previous block's stores instead of straddling two.
        const std::int64_t l0 = (i + G) / L * L;
        const VI from = (kLane + l0) >= i + G;
        const V vl0 = vload<V>(v + l0);
        V upd{};
        for (int g = 0; g < G; ++g) {
            V x = vload<V>(r[g] + l0);
            x = from ? x : V{};
            acc[g] = x * vl0;
            upd += x * vg[g];
        }
        vstore(p + l0, vload<V>(p + l0) + upd);
        for (std::int64_t l = l0 + L; l < n; l += L) {
            const V vl = vload<V>(v + l);
            const V x0 = vload<V>(r[0] + l), x1 = vload<V>(r[1] + l), x2 = vload<V>(r[2] + l), x3 = vload<V>(r[3] + l);
            acc[0] += x0 * vl, acc[1] += x1 * vl, acc[2] += x2 * vl, acc[3] += x3 * vl;
            vstore(p + l, vload<V>(p + l) + ((x0 * vg[0] + x1 * vg[1]) + (x2 * vg[2] + x3 * vg[3])));
        }
        for (int g = 0; g < G; ++g) p[i + g] += head[g] + hsum(acc[g]);
    }
    // The last n - i < G rows: their diagonal block, then nothing to their right.
    for (std::int64_t g = i; g < n; ++g) {
        double sg = 0.0;
        for (std::int64_t h = i; h < n; ++h) sg += (h >= g ? a[g * lda + h] : a[h * lda + g]) * v[h];
        p[g] += sg;
    }
}

/// x[l] -= sum_{s < q} (cv[s] V_s[l] + cw[s] W_s[l]) for l in [l0, n): one pass
/// over x for all q (v, w) pairs of a panel (rows of vs / ws, stride lda).
void subtract_panel(double* x, std::int64_t q, const double* cv, const double* cw, const double* vs,
                    const double* ws, std::int64_t lda, std::int64_t l0, std::int64_t n) {
    if (q == 0) return;
    std::int64_t l = l0;
    for (; l + L <= n; l += L) {
        V acc = vload<V>(x + l);
        for (std::int64_t s = 0; s < q; ++s)
            acc -= cv[s] * vload<V>(vs + s * lda + l) + cw[s] * vload<V>(ws + s * lda + l);
        vstore(x + l, acc);
    }
    for (; l < n; ++l)
        for (std::int64_t s = 0; s < q; ++s) x[l] -= cv[s] * vs[s * lda + l] + cw[s] * ws[s * lda + l];
}

/// Householder reduction of the upper triangle of a to T (dsytrd, lower, in
/// row-major terms). Step j reflects x = a[j][j+1..n) onto beta e_1 with
/// H_j = I - tau_j v v^T and stores v over x (v[0] = 1); the trailing block
/// becomes A <- H A H = A - v w^T - w v^T with w = tau p - (tau^2 / 2)(p^T v) v,
/// p = A v.
///
/// Blocked as dlatrd: within a panel of kPanel steps the trailing block is
/// left as it was; each step brings its own row up to date, takes p from
/// the stale block and corrects it by the panel's earlier (v, w) pairs. After
/// the panel, the trailing block takes all of them at once,
/// A -= [V; W]^T [W; V] (xty on the micro-kernel, half the flops).
/// Requires lda >= n + L - 1 with zero columns from n on.
void tridiagonalize(std::int64_t n, double* a, std::int64_t lda, double* d, double* e, double* tau, SymEigWork& wk) {
    if (n == 0) return;
    constexpr std::int64_t kPanel = 16;
    // Rows of lda doubles, indexed by absolute column, zero outside their support:
    // V (kPanel rows), W (kPanel rows), V again, so [V; W] and [W; V] are contiguous.
    // 64-byte aligned, as a's rows (lda is a multiple of L).
    double* vwv = wk.vwv.get<double>(static_cast<std::size_t>(3 * kPanel * lda));
    double* p = wk.p.get<double>(static_cast<std::size_t>(lda));
    double* vs = vwv;
    double* ws = vs + kPanel * lda;
    XtyWork& xw = wk.xty;
    double cv[kPanel], cw[kPanel];
    const std::int64_t steps = n - 1;
    for (std::int64_t j0 = 0; j0 < steps; j0 += kPanel) {
        const std::int64_t nb = std::min(kPanel, steps - j0);
        std::fill(vwv, vwv + 3 * kPanel * lda, 0.0);
        for (std::int64_t q = 0; q < nb; ++q) {
            const std::int64_t j = j0 + q, m = n - j - 1;
            double* rj = a + j * lda;
            for (std::int64_t s = 0; s < q; ++s) cv[s] = ws[s * lda + j], cw[s] = vs[s * lda + j];
            subtract_panel(rj, q, cv, cw, vs, ws, lda, j, n);  // the panel's earlier updates of row j
            double beta;
            const double t = tau[j] = householder(rj + j + 1, m, beta);
            d[j] = rj[j];
            e[j] = beta;
            double* vq = vs + q * lda;
            std::copy(rj + j + 1, rj + n, vq + j + 1);
            if (t == 0.0) continue;  // H_j = I: w stays zero
            std::fill(p, p + lda, 0.0);
            symv_upper(a, lda, j + 1, n, vq, p);
            for (std::int64_t s = 0; s < q; ++s) {  // p -= V_s (W_s . v) + W_s (V_s . v)
                cv[s] = dot(ws + s * lda + j + 1, vq + j + 1, m);
                cw[s] = dot(vs + s * lda + j + 1, vq + j + 1, m);
            }
            subtract_panel(p, q, cv, cw, vs, ws, lda, j + 1, n);
            const double alpha = -0.5 * t * t * dot(p + j + 1, vq + j + 1, m);
            double* wq = ws + q * lda;
            for (std::int64_t l = j + 1; l < n; ++l) wq[l] = t * p[l] + alpha * vq[l];
        }
        std::copy(vs, vs + kPanel * lda, ws + kPanel * lda);
        const std::int64_t j1 = j0 + nb, m = n - j1;
        xty(2 * kPanel, m, m, vs + j1, lda, ws + j1, lda, a + j1 * lda + j1, lda, {false, false, true, true}, xw);
    }
    d[n - 1] = a[(n - 1) * lda + (n - 1)];
}

/// Sturm counts of the tridiagonal T (diagonal d, squared off-diagonal e2)
/// at min(count, G L) shifts x = mid[0..): cnt = the number of negative
/// pivots of T - x I (pivots below pivmin in magnitude taken as -pivmin, as
/// dstebz), i.e. the number of eigenvalues below x. The G vectors of shifts
/// are independent chains, so their divisions overlap; all state stays in
/// registers. Returns the number of shifts done.
template <int G>
std::int64_t sturm_counts(std::int64_t n, const double* d, const double* e2, double pivmin, const double* mid,
                          std::int64_t count, std::int64_t* cnt) {
    const std::int64_t done = std::min<std::int64_t>(count, G * L);
    V x[G], q[G], neg[G];
    for (int g = 0; g < G; ++g) {  // through an array: lane stores into x[g] draw GCC -Wmaybe-uninitialized
        double lanes[L];
        for (int j = 0; j < L; ++j) lanes[j] = mid[std::min<std::int64_t>(g * L + j, done - 1)];
        x[g] = vload<V>(lanes);
    }
    const V pm = V{} + pivmin, minus_pm = V{} - pivmin, one = V{} + 1.0;
    for (int g = 0; g < G; ++g) {
        V t = d[0] - x[g];
        t = vabs(t) < pm ? minus_pm : t;
        q[g] = t;
        neg[g] = t <= 0.0 ? one : V{};
    }
    for (std::int64_t i = 1; i < n; ++i) {
        const double di = d[i], ei = e2[i - 1];
        for (int g = 0; g < G; ++g) {
            V t = (di - x[g]) - ei / q[g];
            t = vabs(t) < pm ? minus_pm : t;
            q[g] = t;
            neg[g] += t <= 0.0 ? one : V{};
        }
    }
    for (std::int64_t c = 0; c < done; ++c) cnt[c] = static_cast<std::int64_t>(neg[c / L][c % L]);
    return done;
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
        normalise(y.data(), out);
        return converged ? 0 : 1;
    }

    /// The same for count <= L eigenvectors with no reorthogonalisation, one
    /// per SIMD lane: the LU factorisation's pivoting becomes a per-lane
    /// select, and each solve multiplies by precomputed reciprocal pivots.
    /// Writes row idx[q] of z for lane q; returns the number not converged.
    int lanes(const std::int64_t* idx, std::size_t count, const double* shifts, double* z, Scratch& buf) const {
        V x{};
        for (int q = 0; q < L; ++q) x[q] = shifts[idx[std::min<std::size_t>(q, count - 1)]];
        V* u0 = buf.get<V>(static_cast<std::size_t>(7 * n));
        V *u1 = u0 + n, *u2 = u1 + n, *mult = u2 + n, *rinv = mult + n, *y = rinv + n;
        V* swapped = y + n;  // 1 where rows k, k + 1 were interchanged
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
        u0[n - 1] = ak, u1[n - 1] = V{}, u2[n - 1] = V{}, mult[n - 1] = V{}, swapped[n - 1] = V{};
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
                    normalise(out.data(), z + idx[q] * n);
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
            normalise(out.data(), z + idx[q] * n);
        }
        return failures;
    }

    /// out = y / ||y||_2 (n values) with its largest entry made positive; out may be y.
    void normalise(const double* y, double* out) const {
        for (std::int64_t i = 0; i < n; ++i) out[i] = y[i];
        double s = 1.0 / norm2(out, n);
        std::int64_t imax = 0;
        for (std::int64_t i = 1; i < n; ++i)
            if (std::fabs(out[i]) > std::fabs(out[imax])) imax = i;
        if (out[imax] < 0) s = -s;
        for (std::int64_t i = 0; i < n; ++i) out[i] *= s;
    }
};

}  // namespace

SymEig::SymEig(std::int64_t n, const double* a, std::int64_t lda, SymEigWork* work)
    : n_(n), lda_((n + 2 * L - 2) / L * L), wk_(work ? work : &own_), d_(static_cast<std::size_t>(n)),
      e_(static_cast<std::size_t>(std::max<std::int64_t>(n - 1, 0))),
      tau_(static_cast<std::size_t>(std::max<std::int64_t>(n - 1, 0))) {
    // The upper triangle, scaled by a power of two, into zero-padded rows (see tridiagonalize).
    const double scale = scale_for(n, a, lda);
    // Left of the diagonal is never read (or only under a mask): only the
    // triangle and the padding are written.
    a_ = wk_->a.get<double>(static_cast<std::size_t>(std::max<std::int64_t>(n * lda_, 1)));
    for (std::int64_t i = 0; i < n; ++i) {
        double* __restrict row = a_ + i * lda_;
        for (std::int64_t j = i; j < n; ++j) row[j] = a[i * lda + j] * scale;
        std::fill(row + n, row + lda_, 0.0);
    }
    scale_ = scale;
    tridiagonalize(n, a_, lda_, d_.data(), e_.data(), tau_.data(), *wk_);
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
        mid(static_cast<std::size_t>(k));
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
        for (std::int64_t c0 = 0; c0 < k;) {  // Sturm counts of all lanes at once
            const std::int64_t left = k - c0;
            if (left > 2 * L)
                c0 += sturm_counts<4>(n, d, e2.data(), pivmin, mid.data() + c0, left, cnt.data() + c0);
            else if (left > L)
                c0 += sturm_counts<2>(n, d, e2.data(), pivmin, mid.data() + c0, left, cnt.data() + c0);
            else
                c0 += sturm_counts<1>(n, d, e2.data(), pivmin, mid.data() + c0, left, cnt.data() + c0);
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
    double* z = wk_->z.get<double>(static_cast<std::size_t>(k * n));
    int failures = 0;
    // 1. The first member of each cluster needs no reorthogonalisation: L at a time, one per SIMD lane.
    std::vector<std::int64_t> heads;
    for (std::int64_t c = 0; c < k; ++c)
        if (head[c] == c) heads.push_back(c);
    for (std::size_t g = 0; g < heads.size(); g += L)
        failures += inv.lanes(heads.data() + g, std::min<std::size_t>(L, heads.size() - g), shift.data(), z, wk_->lanes);
    // 2. The other members one at a time, against the members before them (dstein).
    for (std::int64_t c = 0; c < k; ++c)
        if (head[c] < c) failures += inv.single(c, shift[c], z + head[c] * n, c - head[c], z + c * n);

    for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t c = 0; c < k; ++c) v[i * ldv + c] = z[c * n + i];
    back_transform(k, v, ldv);
    return failures;
}

void SymEig::back_transform(std::int64_t k, double* v, std::int64_t ldv) const {
    // x = H_0 H_1 ... H_{n-2} z, the last reflector first, in blocks of kBlock
    // reflectors (compact WY, as LAPACK's dlarft / dlarfb): for the block
    // [j0, j1), H_j0 ... H_{j1-1} = I - Y T Y^T with Y (M x nb) the reflectors
    // over rows j0 + 1 .. n - 1 (column c starts at row c) and T upper
    // triangular, so X <- X - Y (T (Y^T X)): products on xty.
    constexpr std::int64_t kBlock = 16;  // measured: 8 / 24 / 32 / 64 slower
    const std::int64_t n = n_, nrefl = n - 1;
    if (nrefl <= 0 || k <= 0) return;
    double* buf = wk_->back.get<double>(static_cast<std::size_t>(n * kBlock + 2 * kBlock * kBlock + 2 * kBlock * k));
    double* y = buf;                       // M x nb, row stride kBlock
    double* s = y + n * kBlock;            // Y^T Y (upper triangle)
    double* t = s + kBlock * kBlock;       // T
    double* w1 = t + kBlock * kBlock;      // Y^T X
    double* w2 = w1 + kBlock * k;          // T Y^T X
    for (std::int64_t j0 = (nrefl - 1) / kBlock * kBlock; j0 >= 0; j0 -= kBlock) {
        const std::int64_t nb = std::min(kBlock, nrefl - j0), m = n - j0 - 1;
        // Y[r][c] = v_{j0+c}[r - c] (row j0 + c of a_, right of its diagonal), zero above.
        for (std::int64_t r = 0; r < m; ++r) {
            double* yr = y + r * kBlock;
            for (std::int64_t c = 0; c < nb; ++c) yr[c] = r >= c ? a_[(j0 + c) * lda_ + j0 + 1 + r] : 0.0;
        }
        xty(m, nb, nb, y, kBlock, y, kBlock, s, kBlock, {true, true, true}, wk_->xty);
        // T (dlarft, forward, columnwise): T[c][c] = tau_c, T[0:c][c] = -tau_c T[0:c][0:c] S[0:c][c].
        std::fill(t, t + kBlock * kBlock, 0.0);  // its lower triangle is read as zeros below
        for (std::int64_t c = 0; c < nb; ++c) {
            const double tc = tau_[j0 + c];
            t[c * kBlock + c] = tc;
            for (std::int64_t i = 0; i < c; ++i) {
                double acc = 0.0;
                for (std::int64_t q = i; q < c; ++q) acc += t[i * kBlock + q] * s[q * kBlock + c];
                t[i * kBlock + c] = -tc * acc;
            }
        }
        double* xr = v + (j0 + 1) * ldv;
        xty(m, nb, k, y, kBlock, xr, ldv, w1, k, {true}, wk_->xty);
        XtyShape tw;  // W2 = T W1 = X^T W1 with X = T^T, given as T: x_trans, lower triangular
        tw.x_lower = tw.x_trans = true;
        xty(nb, nb, k, t, kBlock, w1, k, w2, k, tw, wk_->xty);
        XtyShape upd;
        upd.subtract = upd.x_upper = upd.x_trans = true;
        xty(nb, m, k, y, kBlock, w2, k, xr, ldv, upd, wk_->xty);
    }
}

}  // namespace kmf
