#include "truncate.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "apply.h"
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
    ApplyTask ab, aa;
    ab.x = t.b, ab.t = core.t_b, ab.c = rank, ab.out = t.out_b;
    aa.x = t.at, aa.t = core.t_a, aa.c = rank, aa.out = t.out_at;
    if (threads == 1) {
        apply_one(ab, true, wk.apply);
        apply_one(aa, true, wk.apply);
    } else {
        apply({ab, aa}, true, threads);
    }
}

}  // namespace

void truncate(std::vector<TruncateTask>& tasks, std::int64_t rank, int threads) {
    if (threads <= 0) threads = hardware_threads();
    const std::int64_t n = static_cast<std::int64_t>(tasks.size());
    if (n < threads) {
        Worker wk;
        for (TruncateTask& t : tasks) truncate_one(t, rank, threads, wk);
        return;
    }
    // Largest first, for load balance: cost ~ (n_out + n_in) R^2.
    auto cost = [&](const TruncateTask& t) { return double(t.b.rows + t.at.rows) * double(t.b.cols) * double(t.b.cols); };
    std::vector<std::size_t> order(tasks.size());
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return cost(tasks[a]) > cost(tasks[b]); });
    std::vector<Worker> workers(static_cast<std::size_t>(num_workers(threads, n)));
    parallel_for(n, threads, [&](std::int64_t i, int w) {
        truncate_one(tasks[order[static_cast<std::size_t>(i)]], rank, 1, workers[static_cast<std::size_t>(w)]);
    });
}

}  // namespace kmf
