// Weighted sums, a row (or column) at a time through buffers of T. This file
// is compiled with -ffp-contract=off: a fused multiply-add would skip the
// product's rounding and break bit-equality with torch (and so with peft).
#include "weighted_sum.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include "dtype.h"
#include "parallel.h"

namespace kmf {
namespace {

/// Elements per work item: large enough to amortise the hand-out, small
/// enough to balance a few big matrices over the threads.
constexpr std::int64_t kItemElems = std::int64_t(1) << 16;

struct Item {
    std::size_t task;
    std::int64_t r0, r1;  // rows [r0, r1) of the (possibly transposed) task
};

/// The task with rows and columns swapped where the destination is contiguous
/// along columns, so runs are unit-stride in the destination (else the sources).
WeightedSumTask oriented(const WeightedSumTask& t) {
    if (!walk_by_columns(t.dst, t.srcs[0])) return t;
    WeightedSumTask o = t;
    std::swap(o.dst.rows, o.dst.cols), std::swap(o.dst.rs, o.dst.cs);
    for (Mat& m : o.srcs) std::swap(m.rows, m.cols), std::swap(m.rs, m.cs);
    return o;
}

template <typename T>
void weighted_sum_impl(const std::vector<WeightedSumTask>& input, int threads) {
    std::vector<WeightedSumTask> tasks;
    tasks.reserve(input.size());
    std::vector<Item> items;
    double work = 0.0;
    std::int64_t widest = 0;
    for (std::size_t i = 0; i < input.size(); ++i) {
        tasks.push_back(oriented(input[i]));
        const Mat& d = tasks.back().dst;
        if (d.rows == 0 || d.cols == 0) continue;
        widest = std::max(widest, d.cols);
        work += 4.0 * double(d.rows) * double(d.cols) * double(tasks.back().srcs.size());  // memory-bound
        const std::int64_t step = std::max<std::int64_t>(1, kItemElems / d.cols);
        for (std::int64_t r = 0; r < d.rows; r += step) items.push_back({i, r, std::min(d.rows, r + step)});
    }
    threads = threads_for_work(threads, work);
    const int workers = num_workers(threads, static_cast<std::int64_t>(items.size()));
    std::vector<Scratch> acc_buf(static_cast<std::size_t>(workers)), term_buf(static_cast<std::size_t>(workers));
    parallel_for(static_cast<std::int64_t>(items.size()), threads, [&](std::int64_t n, int w) {
        const Item& it = items[static_cast<std::size_t>(n)];
        const WeightedSumTask& t = tasks[it.task];
        const std::int64_t cols = t.dst.cols;
        T* acc = acc_buf[static_cast<std::size_t>(w)].get<T>(static_cast<std::size_t>(widest));
        T* term = term_buf[static_cast<std::size_t>(w)].get<T>(static_cast<std::size_t>(widest));
        for (std::int64_t i = it.r0; i < it.r1; ++i) {
            const Mat& s0 = t.srcs[0];
            load_run<T>(acc, s0.at(i, 0), s0.dtype, cols, s0.cs, static_cast<T>(s0.coef));
            for (std::size_t k = 1; k < t.srcs.size(); ++k) {
                const Mat& s = t.srcs[k];
                load_run<T>(term, s.at(i, 0), s.dtype, cols, s.cs, static_cast<T>(s.coef));
                for (std::int64_t j = 0; j < cols; ++j) acc[j] += term[j];
            }
            store_run<T>(t.dst.at_mut(i, 0), t.dst.dtype, cols, t.dst.cs, acc);
        }
    });
}

}  // namespace

void weighted_sum(const std::vector<WeightedSumTask>& tasks, bool precise, int threads) {
    if (precise)
        weighted_sum_impl<double>(tasks, threads);
    else
        weighted_sum_impl<float>(tasks, threads);
}

}  // namespace kmf
