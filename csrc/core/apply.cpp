// out = X @ T with the shared micro-kernel. Two orientations, chosen so that
// packing X is a straight copy:
//   row mode (X rows contiguous, e.g. B factors): tiles of out, a = X rows
//     (column panel over r), b = T packed once per task as row panels over c;
//   column mode (X columns contiguous, e.g. A^T views): tiles of out^T = T^T X^T,
//     a = T packed once per task (k-major panels over c), b = X rows k as
//     row panels over r; out^T tiles are stored through out's strides.
#include "apply.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "pack.h"
#include "parallel.h"

namespace kmf {
namespace {

constexpr std::int64_t kRowBlock = 256;  // rows of X per work item

template <typename T>
struct Prepared {
    bool col_mode = false;
    const T* tp = nullptr;  // packed T
};

/// Packs T (R x C float64) into storage as row panels over c (row mode:
/// tp[p][r * NR + j]) or as k-major MR panels over c (column mode: tp[q][r * MR + i]).
template <typename T>
Prepared<T> prepare(const ApplyTask& task, Scratch& storage) {
    constexpr int MR = TileShape<T>::MR, NR = TileShape<T>::NR;
    const std::int64_t R = task.x.cols, C = task.c;
    Prepared<T> prep;
    prep.col_mode = !task.x.rows_contiguous() && task.x.cols_contiguous();
    const std::int64_t W = prep.col_mode ? MR : NR;
    const std::int64_t np = (C + W - 1) / W;
    T* tp = storage.template get<T>(static_cast<std::size_t>(std::max<std::int64_t>(1, np * W * R)));
    prep.tp = tp;
    for (std::int64_t p = 0; p < np; ++p) {
        T* d = tp + p * W * R;
        const std::int64_t c0 = p * W, n = std::min<std::int64_t>(W, C - c0);
        for (std::int64_t r = 0; r < R; ++r) {
            for (std::int64_t j = 0; j < n; ++j) d[r * W + j] = static_cast<T>(task.t[r * C + c0 + j]);
            for (std::int64_t j = n; j < W; ++j) d[r * W + j] = T(0);
        }
    }
    return prep;
}

template <typename T>
void apply_rows(const ApplyTask& task, const Prepared<T>& prep, std::int64_t k0, std::int64_t k1, ApplyWork& s) {
    constexpr int MR = TileShape<T>::MR, NR = TileShape<T>::NR;
    const std::int64_t R = task.x.cols, C = task.c;
    const Mat& out = task.out;
    const T* tp = prep.tp;
    T* tile = s.tile.get<T>(MR * NR);
    if (!prep.col_mode) {
        const std::int64_t ldr = std::max<std::int64_t>(R, 1);
        T* ap = s.a.get<T>(static_cast<std::size_t>(MR * ldr));
        const std::int64_t np = (C + NR - 1) / NR;
        for (std::int64_t i0 = k0; i0 < k1; i0 += MR) {
            const std::int64_t ni = std::min<std::int64_t>(MR, k1 - i0);
            // a[i * R + r] = X(i0 + i, r), converted straight into place one block
            // row at a time (a row of the column panel is one run per block); rows past ni are zero.
            for (std::size_t b = 0; b < task.x.blocks.size(); ++b) {
                const Mat& m = task.x.blocks[b];
                const int es = elem_size(m.dtype);
                load_runs<T>(ap + task.x.col0[b], ldr, m.at(i0, 0), m.rs * es, ni, m.dtype, m.cols, m.cs,
                             static_cast<T>(m.coef));
                // The Grams read these rows long ago (the algebra ran since): fetch the
                // rows kAhead tiles down now, so their misses overlap this tile's work.
                constexpr std::int64_t kAhead = 4 * MR;
                if (m.cs == 1 && i0 + kAhead < k1)
                    for (std::int64_t i = 0; i < std::min<std::int64_t>(MR, k1 - i0 - kAhead); ++i)
                        prefetch_range(m.at(i0 + kAhead + i, 0), m.cols * es);
            }
            std::fill(ap + ni * ldr, ap + MR * ldr, T(0));
            for (std::int64_t p = 0; p < np; ++p) {
                const std::int64_t c0 = p * NR, nj = std::min<std::int64_t>(NR, C - c0);
                micro_kernel<T, false>(R, ap, ldr, tp + p * NR * R, tile);
                for (std::int64_t i = 0; i < ni; ++i) store_run<T>(out.at_mut(i0 + i, c0), out.dtype, nj, out.cs, tile + i * NR);
            }
        }
    } else {
        // kGroup panels of NR rows of X are packed together: per stacked column r one
        // run of up to kGroup * NR contiguous values (a row of some A_i) is converted
        // into a buffer and cut into the panels (b_g[r * NR + j] = X(j0 + g NR + j, r)).
        constexpr std::int64_t kGroup = 4, GW = kGroup * NR;
        const std::int64_t ldr = std::max<std::int64_t>(R, 1);
        T* bp = s.b.get<T>(static_cast<std::size_t>(ldr * GW));
        std::int64_t max_cols = 0;
        for (const Mat& m : task.x.blocks) max_cols = std::max(max_cols, m.cols);
        T* runs = s.tmp.get<T>(static_cast<std::size_t>(std::max<std::int64_t>(1, max_cols * GW)));
        const std::int64_t nq = (C + MR - 1) / MR;
        for (std::int64_t g0 = k0; g0 < k1; g0 += GW) {
            const std::int64_t ng = std::min<std::int64_t>(GW, k1 - g0);
            for (std::size_t b = 0; b < task.x.blocks.size(); ++b) {
                const Mat& m = task.x.blocks[b];
                const int es = elem_size(m.dtype);
                load_runs<T>(runs, GW, m.at(g0, 0), m.cs * es, m.cols, m.dtype, ng, m.rs, static_cast<T>(m.coef));
                for (std::int64_t c = 0; c < m.cols; ++c) {
                    // Hundreds of such runs are live at once, too many streams for the
                    // hardware prefetcher: fetch this run's next group now.
                    if (g0 + GW < k1 && m.rs == 1)
                        prefetch_range(m.at(g0 + GW, c), std::min<std::int64_t>(GW, k1 - g0 - GW) * es);
                    T* run = runs + c * GW;
                    std::fill(run + ng, run + GW, T(0));
                    const std::int64_t r = task.x.col0[b] + c;
                    for (std::int64_t g = 0; g < kGroup; ++g) std::memcpy(bp + g * ldr * NR + r * NR, run + g * NR, sizeof(T) * NR);
                }
            }
            for (std::int64_t g = 0; g * NR < ng; ++g) {
                const std::int64_t j0 = g0 + g * NR, nj = std::min<std::int64_t>(NR, ng - g * NR);
                for (std::int64_t q = 0; q < nq; ++q) {
                    const std::int64_t c0 = q * MR, ni = std::min<std::int64_t>(MR, C - c0);
                    micro_kernel<T, true>(R, tp + q * MR * R, 0, bp + g * ldr * NR, tile);
                    // tile[i][j] = out(j0 + j, c0 + i)
                    for (std::int64_t i = 0; i < ni; ++i)
                        store_run<T>(out.at_mut(j0, c0 + i), out.dtype, nj, out.rs, tile + i * NR);
                }
            }
        }
    }
}

struct Item {
    std::size_t task;
    std::int64_t k0, k1;
};

template <typename T>
void apply_impl(const std::vector<ApplyTask>& tasks, int threads) {
    double work = 0.0;
    for (const ApplyTask& t : tasks) work += double(t.x.rows) * double(t.x.cols + 1) * double(t.c);
    threads = threads_for_work(threads, work);
    std::vector<Scratch> storage(tasks.size());
    std::vector<Prepared<T>> prep(tasks.size());
    parallel_for(static_cast<std::int64_t>(tasks.size()), threads, [&](std::int64_t i, int) {
        const std::size_t t = static_cast<std::size_t>(i);
        prep[t] = prepare<T>(tasks[t], storage[t]);
    });
    std::vector<Item> items;
    for (std::size_t ti = 0; ti < tasks.size(); ++ti) {
        const std::int64_t K = tasks[ti].c > 0 ? tasks[ti].x.rows : 0;  // C = 0: nothing to write
        for (std::int64_t k0 = 0; k0 < K; k0 += kRowBlock) items.push_back({ti, k0, std::min(K, k0 + kRowBlock)});
    }
    std::vector<ApplyWork> scratch(static_cast<std::size_t>(num_workers(threads, static_cast<std::int64_t>(items.size()))));
    parallel_for(static_cast<std::int64_t>(items.size()), threads, [&](std::int64_t n, int w) {
        const Item& it = items[static_cast<std::size_t>(n)];
        apply_rows<T>(tasks[it.task], prep[it.task], it.k0, it.k1, scratch[static_cast<std::size_t>(w)]);
    });
}

template <typename T>
void apply_whole(const ApplyTask& task, ApplyWork& work) {
    if (task.c <= 0) return;  // nothing to write
    const Prepared<T> prep = prepare<T>(task, work.tp);
    apply_rows<T>(task, prep, 0, task.x.rows, work);
}

}  // namespace

void apply_one(const ApplyTask& task, bool precise, ApplyWork& work) {
    if (precise)
        apply_whole<double>(task, work);
    else
        apply_whole<float>(task, work);
}

void apply(const std::vector<ApplyTask>& tasks, bool precise, int threads) {
    if (precise)
        apply_impl<double>(tasks, threads);
    else
        apply_impl<float>(tasks, threads);
}

}  // namespace kmf
