#include "truncate.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <numeric>
#include <vector>

#include "apply.h"
#include "blas1.h"
#include "dtype.h"
#include "gram.h"
#include "gram_svd.h"
#include "parallel.h"

namespace kmf {
namespace {

/// One thread's buffers, reused across its modules.
struct Worker {
    Scratch gb, ga, t_b, t_a;
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

/// Whether the rebuild B' = B T_B, A'^T = A^T T_A may accumulate in float32
/// (twice the rate of float64). Rounding T and the sums to float32 errs by
/// about u32 (kappa_B + kappa_A) relative to B'A' (measured: a sixteenth of
/// that on random stacks of rank 256), where kappa_B = |B| |T_B| / |B'| and
/// kappa_A = |A| |T_A| / |A'| (Frobenius norms, |B|^2 = tr Gb, |A|^2 = tr Ga)
/// measure the cancellation in the two products. Float32 is taken when that
/// estimate is within kFloatRebuildTol, or within the outputs' own rounding
/// if coarser; never for float64 data, nor for a zero or non-finite result.
bool float_rebuild_ok(const TruncateTask& t, const GramSvdTask& core, std::int64_t rank) {
    double u_out = 0.0;
    for (const Stack* s : {&t.b, &t.at})
        for (const Mat& m : s->blocks)
            if (m.dtype == kF64) return false;
    for (const Mat* m : {&t.out_b, &t.out_at}) {
        if (m->dtype == kF64) return false;
        u_out = std::max(u_out, unit_roundoff(m->dtype));
    }
    if (!(core.energy > 0.0) || core.kept <= 0) return false;
    const std::int64_t R = core.big_r;
    double tr_b = 0.0, tr_a = 0.0;
    for (std::int64_t i = 0; i < R; ++i) tr_b += core.gb[i * R + i], tr_a += core.ga[i * R + i];
    const double kappa_b = std::sqrt(tr_b * dot(core.t_b, core.t_b, R * rank) / core.energy);
    const double kappa_a = std::sqrt(tr_a * dot(core.t_a, core.t_a, R * rank) / static_cast<double>(core.kept));
    const double estimate = unit_roundoff(kF32) * (kappa_b + kappa_a);
    return estimate <= std::max(kFloatRebuildTol, u_out);  // false for NaN too
}

/// One module, its Grams and rebuild on `threads` threads.
void truncate_one(TruncateTask& t, std::int64_t rank, int threads, Worker& wk) {
    const std::int64_t R = t.b.cols;
    GramSvdTask core;
    core.big_r = R;
    double* gb = wk.gb.get<double>(static_cast<std::size_t>(R * R));
    double* ga = wk.ga.get<double>(static_cast<std::size_t>(R * R));
    core.gb = gb, core.ga = ga;
    core.t_b = wk.t_b.get<double>(static_cast<std::size_t>(R * rank));
    core.t_a = wk.t_a.get<double>(static_cast<std::size_t>(R * rank));
    const GramTask gram_b{t.b, t.b, gb, true}, gram_a{t.at, t.at, ga, true};
    if (threads == 1) {
        gram_one(gram_b, true, wk.gram);
        gram_one(gram_a, true, wk.gram);
    } else {
        gram({gram_b, gram_a}, true, threads);
    }
    gram_svd_one(core, rank, wk.core);
    t.route = core.route;
    if (core.route == kRouteFailed) return;
    const bool precise = !float_rebuild_ok(t, core, rank);
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
