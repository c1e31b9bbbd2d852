// Strided copy: one row (or column, whichever is contiguous in the destination)
// at a time through a float64 buffer, so coef * src is exact before the single
// rounding to the destination dtype.
#include "copy.h"

#include <cstdint>
#include <utility>

#include "dtype.h"
#include "parallel.h"

namespace kmf {

void copy(const std::vector<CopyTask>& tasks, int threads) {
    double work = 0.0;  // a copy is memory-bound: count each element as a few multiply-adds
    for (const CopyTask& t : tasks) work += 4.0 * double(t.src.rows) * double(t.src.cols);
    threads = threads_for_work(threads, work);
    std::vector<Scratch> scratch(static_cast<std::size_t>(num_workers(threads, static_cast<std::int64_t>(tasks.size()))));
    parallel_for(static_cast<std::int64_t>(tasks.size()), threads, [&](std::int64_t n, int w) {
        const CopyTask& t = tasks[static_cast<std::size_t>(n)];
        Mat s = t.src, d = t.dst;
        if (walk_by_columns(d, s)) {
            std::swap(s.rows, s.cols), std::swap(s.rs, s.cs);
            std::swap(d.rows, d.cols), std::swap(d.rs, d.cs);
        }
        double* buf = scratch[static_cast<std::size_t>(w)].get<double>(static_cast<std::size_t>(s.cols));
        for (std::int64_t i = 0; i < s.rows; ++i) {
            load_run<double>(buf, s.at(i, 0), s.dtype, s.cols, s.cs, s.coef);
            store_run<double>(d.at_mut(i, 0), d.dtype, s.cols, d.cs, buf);
        }
    });
}

}  // namespace kmf
