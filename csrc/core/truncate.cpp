#include "truncate.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <vector>

#include "apply.h"
#include "dtype.h"
#include "gram.h"
#include "gram_svd.h"
#include "parallel.h"

namespace kmf {
namespace {

/// One thread's buffers, reused across its modules.
struct Worker {
    Scratch gb, ga, t_b, t_a, sigma2, norms;
    GramWork gram;
    GramSvdWork core;
    ApplyWork apply;
};

/// Workers kept between calls, so that a call does not page in its few
/// megabytes of fresh buffers again (thousands of page faults per merge).
/// Only workers of calls with R <= kCachedMaxR are kept (then at most about
/// 25 MB each), at most one per hardware thread.
class WorkerCache {
public:
    static constexpr std::int64_t kCachedMaxR = 512;

    std::unique_ptr<Worker> take() {
        std::lock_guard<std::mutex> lock(mu_);
        if (free_.empty()) return std::make_unique<Worker>();
        std::unique_ptr<Worker> w = std::move(free_.back());
        free_.pop_back();
        return w;
    }

    void give(std::unique_ptr<Worker> w) {
        std::lock_guard<std::mutex> lock(mu_);
        if (static_cast<int>(free_.size()) < hardware_threads()) free_.push_back(std::move(w));
    }

private:
    std::mutex mu_;
    std::vector<std::unique_ptr<Worker>> free_;
};

WorkerCache& worker_cache() {
    static WorkerCache cache;
    return cache;
}

/// The workers of one truncate call: from the cache, and back to it at the end
/// (also when a module throws) if the call's buffers are small enough to keep.
class Workers {
public:
    Workers(int count, std::int64_t max_r) : keep_(max_r <= WorkerCache::kCachedMaxR) {
        for (int i = 0; i < count; ++i) w_.push_back(keep_ ? worker_cache().take() : std::make_unique<Worker>());
    }
    ~Workers() {
        if (keep_)
            for (std::unique_ptr<Worker>& w : w_) worker_cache().give(std::move(w));
    }
    Workers(const Workers&) = delete;
    Workers& operator=(const Workers&) = delete;
    Worker& operator[](int i) { return *w_[static_cast<std::size_t>(i)]; }

private:
    bool keep_;
    std::vector<std::unique_ptr<Worker>> w_;
};

/// Largest estimated relative error of a float32 rebuild accepted for float32 outputs.
constexpr double kFloatRebuildTol = 1e-5;
/// Largest estimated relative perturbation of the kept factors accepted from
/// float32 Grams (FloatErrors::gram_a + gram_b; each Gram is held to half).
/// Measured on float32 stacks: random adapters estimate ~2e-5 in all, with an
/// excess over the optimal error of ~2e-14;
/// on mixed graded, tied or steep spectra, cancelling sums and nearly
/// dependent adapters, excesses above 1e-7 came only at estimates of 0.05 and
/// more, above 1e-5 only at 0.9 and more: this leaves 500x of margin.
constexpr double kFloatGramTol = 1e-4;

/// Whether the task has float64 inputs or outputs: those keep float64 Grams and rebuilds.
bool has_float64(const TruncateTask& t) {
    for (const Stack* s : {&t.b, &t.at})
        for (const Mat& m : s->blocks)
            if (m.dtype == kF64) return true;
    return t.out_b.dtype == kF64 || t.out_at.dtype == kF64;
}

/// Float32 error estimates of one solved module, relative and from what the
/// R x R algebra left at hand (tr Gb = |B|^2, tr Ga = |A|^2, the columns t_p
/// of T_B and T_A, and sigma2_p = |B' e_p|^2, with |A' e_p| = 1):
///
///   rebuild = u32 (kappa_B + kappa_A), kappa_B^2 = |B|^2 |T_B|^2 / |B'|^2,
///             kappa_A^2 = |A|^2 |T_A|^2 / |A'|^2: rounding T and the sums
///             of B' = B T_B, A'^T = A^T T_A to float32 errs by about this
///             relative to B'A' (measured: a sixteenth of it on random stacks);
///   gram_a  = u32 max_p |A|^2 |t_A,p|^2, gram_b = u32 max_p |B|^2 |t_B,p|^2 / sigma2_p:
///             a float32 Gram errs by ~u32 |x_i| |x_j| in entry (i, j), which
///             moves t_p^T G t_p, the squared norm of kept column p, by about
///             u32 |X|^2 |t_p|^2, relative to its value (1 for A', sigma2_p
///             for B'). A Gram squares the cancellation that the rebuild sees
///             once, so these are squares of per-column kappas.
///
/// All are infinite for a zero or non-finite result (never taken then).
struct FloatErrors {
    double rebuild = HUGE_VAL, gram_a = HUGE_VAL, gram_b = HUGE_VAL;
};

FloatErrors float_errors(const GramSvdTask& core, std::int64_t rank, Scratch& buf) {
    FloatErrors e;
    const std::int64_t R = core.big_r, kept = core.kept;
    if (kept <= 0) return e;
    double tr_b = 0.0, tr_a = 0.0;
    for (std::int64_t i = 0; i < R; ++i) tr_b += core.gb[i * R + i], tr_a += core.ga[i * R + i];
    // Squared column norms of T_B and T_A (row-major R x rank).
    double* norm_b = buf.get<double>(static_cast<std::size_t>(2 * rank));
    double* norm_a = norm_b + rank;
    std::fill(norm_b, norm_b + 2 * rank, 0.0);
    for (std::int64_t i = 0; i < R; ++i)
        for (std::int64_t p = 0; p < kept; ++p) {
            const double b = core.t_b[i * rank + p], a = core.t_a[i * rank + p];
            norm_b[p] += b * b, norm_a[p] += a * a;
        }
    double energy = 0.0, sum_b = 0.0, sum_a = 0.0, worst_a = 0.0, worst_b = 0.0;
    for (std::int64_t p = 0; p < kept; ++p) {
        energy += core.sigma2[p], sum_b += norm_b[p], sum_a += norm_a[p];
        worst_a = std::max(worst_a, norm_a[p]);
        const double q = norm_b[p] / core.sigma2[p];
        worst_b = std::isfinite(q) ? std::max(worst_b, q) : HUGE_VAL;  // sigma2_p = 0, or NaN
    }
    if (!(energy > 0.0)) return e;
    const double u = unit_roundoff(kF32);
    // NaN (non-finite traces or transforms) becomes infinite: never taken.
    auto finite_or_inf = [](double x) { return std::isfinite(x) ? x : HUGE_VAL; };
    e.rebuild = finite_or_inf(u * (std::sqrt(tr_b * sum_b / energy) + std::sqrt(tr_a * sum_a / static_cast<double>(kept))));
    e.gram_a = finite_or_inf(u * tr_a * worst_a);
    e.gram_b = finite_or_inf(u * tr_b * worst_b);
    return e;
}

/// Whether float32 Grams of K rows are safe from underflow: each entry's
/// products below FLT_MIN lose their digits, at most K FLT_MIN in all, which
/// must stay far below the u32 |x_i| |x_j| the estimate allows for; so every
/// column's squared norm (the Gram's diagonal) must exceed K FLT_MIN / u32.
bool above_underflow(const double* g, std::int64_t R, std::int64_t K) {
    const double floor = static_cast<double>(K) * static_cast<double>(std::numeric_limits<float>::min()) /
                         unit_roundoff(kF32);
    for (std::int64_t i = 0; i < R; ++i)
        if (!(g[i * R + i] > floor)) return false;
    return true;
}

/// One module, its Grams and rebuild on `threads` threads.
///
/// Without float64 data both Grams start in float32. A Gram stays so while
/// its estimate (FloatErrors::gram_a / gram_b) is within kFloatGramTol / 2;
/// otherwise it is redone in float64 and the algebra rerun. A float32 Ga
/// allows only the Cholesky route (the eigen route's rank cut assumes float64
/// noise), so a Ga that Cholesky rejects is redone first, keeping Gb: stacks
/// that share A (singular Ga) then pay for one extra float32 Ga only.
void truncate_one(TruncateTask& t, std::int64_t rank, int threads, Worker& wk) {
    const std::int64_t R = t.b.cols;
    GramSvdTask core;
    core.big_r = R;
    double* gb = wk.gb.get<double>(static_cast<std::size_t>(R * R));
    double* ga = wk.ga.get<double>(static_cast<std::size_t>(R * R));
    core.gb = gb, core.ga = ga;
    core.t_b = wk.t_b.get<double>(static_cast<std::size_t>(R * rank));
    core.t_a = wk.t_a.get<double>(static_cast<std::size_t>(R * rank));
    core.sigma2 = wk.sigma2.get<double>(static_cast<std::size_t>(rank));
    const bool wide = has_float64(t);
    const GramTask gram_b{t.b, t.b, gb, true}, gram_a{t.at, t.at, ga, true};
    // Gb and / or Ga, accumulated in float64 (precise) or float32, on the task's threads.
    auto compute = [&](bool b, bool a, bool precise) {
        if (threads == 1) {
            if (b) gram_one(gram_b, precise, wk.gram);
            if (a) gram_one(gram_a, precise, wk.gram);
        } else if (b && a) {
            gram({gram_b, gram_a}, precise, threads);
        } else {
            gram({b ? gram_b : gram_a}, precise, threads);
        }
    };
    bool fast_b = !wide, fast_a = !wide;
    compute(true, true, wide);
    const bool underflow_b = fast_b && !above_underflow(gb, R, t.b.rows);
    const bool underflow_a = fast_a && !above_underflow(ga, R, t.at.rows);
    if (underflow_b || underflow_a) {
        compute(underflow_b, underflow_a, true);
        fast_b = fast_b && !underflow_b, fast_a = fast_a && !underflow_a;
    }
    FloatErrors err;
    for (;;) {
        core.allow_eigen = !fast_a;
        gram_svd_one(core, rank, wk.core);
        err = (wide || core.route == kRouteFailed) ? FloatErrors{} : float_errors(core, rank, wk.norms);
        bool redo_b = false, redo_a = false;
        if (core.route == kRouteFailed) {
            redo_a = fast_a, redo_b = !fast_a && fast_b;  // Ga first: it decides the route
        } else {
            redo_a = fast_a && !(err.gram_a <= 0.5 * kFloatGramTol);
            redo_b = fast_b && !(err.gram_b <= 0.5 * kFloatGramTol);
        }
        if (!redo_a && !redo_b) break;
        compute(redo_b, redo_a, true);
        fast_b = fast_b && !redo_b, fast_a = fast_a && !redo_a;
    }
    t.route = core.route;
    if (core.route == kRouteFailed) return;
    // Float32 rebuilds only without float64 data; coarser outputs round more than the estimate anyway.
    const double u_out = std::max(unit_roundoff(t.out_b.dtype), unit_roundoff(t.out_at.dtype));
    const bool precise = wide || !(err.rebuild <= std::max(kFloatRebuildTol, u_out));
    ApplyTask ab, aa;
    ab.x = t.b, ab.t = core.t_b, ab.c = rank, ab.out = t.out_b;
    aa.x = t.at, aa.t = core.t_a, aa.c = rank, aa.out = t.out_at;
    if (threads == 1) {
        apply_one(ab, precise, wk.apply);
        apply_one(aa, precise, wk.apply);
    } else {
        apply({ab, aa}, precise, threads);
    }
}

}  // namespace

void truncate(std::vector<TruncateTask>& tasks, std::int64_t rank, int threads) {
    if (threads <= 0) threads = hardware_threads();
    const std::int64_t n = static_cast<std::int64_t>(tasks.size());
    std::int64_t max_r = 0;
    for (const TruncateTask& t : tasks) max_r = std::max(max_r, t.b.cols);
    if (n < threads) {
        Workers wk(1, max_r);
        for (TruncateTask& t : tasks) truncate_one(t, rank, threads, wk[0]);
        return;
    }
    // Largest first, for load balance: cost ~ (n_out + n_in) R^2.
    auto cost = [&](const TruncateTask& t) { return double(t.b.rows + t.at.rows) * double(t.b.cols) * double(t.b.cols); };
    std::vector<std::size_t> order(tasks.size());
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return cost(tasks[a]) > cost(tasks[b]); });
    Workers workers(num_workers(threads, n), max_r);
    parallel_for(n, threads, [&](std::int64_t i, int w) {
        truncate_one(tasks[order[static_cast<std::size_t>(i)]], rank, 1, workers[w]);
    });
}

}  // namespace kmf
