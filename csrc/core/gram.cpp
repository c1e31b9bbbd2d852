// G = X^T Y, BLAS-style: for each K-chunk, pack both operands into contiguous
// panels (dtype conversion + coef), then sweep MR x NR micro-tiles of G with
// the register-blocked kernel, adding each chunk's tile into the float64 output.
#include "gram.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>

#include "kernels.h"
#include "pack.h"
#include "parallel.h"


namespace kmf {
namespace {

/// Rows per K-chunk: the float32 accumulation bound for float; for double only
/// a cache-blocking choice (the packed panels of a chunk stay in L1 / L2).
template <typename T>
struct ChunkRows {
    static constexpr std::int64_t value = kGramChunk;
};
template <>
struct ChunkRows<double> {
    static constexpr std::int64_t value = 128;  // measured faster than 256 / 512
};

/// Cost of packing a stack as the row-panel (vector) operand: free when its
/// rows are contiguous, a transpose of all its columns otherwise.
std::int64_t row_panel_cost(const Stack& s) { return s.rows_contiguous() ? 0 : s.cols; }

/// out (R1 x R2, row-major) += X[kb:ke]^T Y[kb:ke] (upper-triangle tiles only if symmetric).
/// With chunk_stride > 0, chunk c (rows [c KC, (c + 1) KC)) is instead written
/// to its own zeroed slot out + c * chunk_stride, for a split task.
template <typename T>
void gram_range(const GramTask& t, std::int64_t kb, std::int64_t ke, double* out_base, std::int64_t chunk_stride,
                GramWork& s) {
    constexpr int MR = TileShape<T>::MR, NR = TileShape<T>::NR;
    const std::int64_t R2 = t.y.cols;
    // The vector operand B should pack without a transpose (rows contiguous);
    // if only X does, compute tiles of G^T = Y^T X instead.
    const bool swap = !t.symmetric && row_panel_cost(t.y) > row_panel_cost(t.x);
    const Stack& A = swap ? t.y : t.x;
    const Stack& B = swap ? t.x : t.y;
    const std::int64_t RA = A.cols, RB = B.cols;
    // The broadcast operand A packs as row panels (k-major) from contiguous
    // rows, as column panels from contiguous columns: a straight copy either way.
    const bool a_kmajor = A.rows_contiguous() || !A.cols_contiguous();
    // A symmetric Gram packs its one stack once when MR-wide tiles fall inside NR-wide panels.
    const bool shared = t.symmetric && NR % MR == 0;
    const std::int64_t na = (RA + MR - 1) / MR, nb = (RB + NR - 1) / NR;
    constexpr std::int64_t KC = ChunkRows<T>::value;
    T* ap = s.a.get<T>(static_cast<std::size_t>(na * MR * KC));
    T* bp = s.b.get<T>(static_cast<std::size_t>(nb * NR * KC));
    T* tile = s.tile.get<T>(MR * NR);

    for (std::int64_t k0 = kb; k0 < ke; k0 += KC) {
        const std::int64_t kc = std::min<std::int64_t>(KC, ke - k0);
        double* out = out_base;
        if (chunk_stride > 0) {
            out = out_base + (k0 / KC) * chunk_stride;
            std::fill(out, out + t.x.cols * R2, 0.0);
        }
        // While packing this chunk, prefetch the same rows of the next one.
        const std::int64_t ahead = std::min<std::int64_t>(KC, ke - k0 - kc);
        pack_row_panels<T, NR>(bp, NR, B, k0, kc, 0, RB, s.tmp, ahead);
        if (shared) {
            // X = Y: the broadcast operand's MR columns are read out of B's NR-wide panels.
        } else if (a_kmajor) {
            pack_row_panels<T, MR>(ap, MR, A, k0, kc, 0, RA, s.tmp, ahead);
        } else {
            for (std::int64_t q = 0; q < na; ++q)
                pack_cols<T>(ap + q * kc * MR, kc, A, k0, kc, q * MR, std::min<std::int64_t>(MR, RA - q * MR), MR, kc,
                             ahead);
        }
        for (std::int64_t p = 0; p < nb; ++p) {
            const std::int64_t j0 = p * NR, nj = std::min<std::int64_t>(NR, RB - j0);
            for (std::int64_t q = 0; q < na; ++q) {
                const std::int64_t i0 = q * MR, ni = std::min<std::int64_t>(MR, RA - i0);
                if (t.symmetric && j0 + nj - 1 < i0) continue;  // entirely below the diagonal
                // One tile with its a operand in whichever layout it was packed: into
                // c (row stride ldc) as Out says, computing vectors V0 .. NV - 1 only.
                auto kernel = [&](auto out_tag, auto v0_tag, T* c, std::int64_t ldc) {
                    constexpr TileOut Out = decltype(out_tag)::value;
                    constexpr int V0 = decltype(v0_tag)::value;
                    const T* b = bp + p * kc * NR;
                    if (shared)
                        micro_kernel<T, true, Out, V0>(kc, bp + (i0 / NR) * kc * NR + i0 % NR, NR, b, c, ldc);
                    else if (a_kmajor)
                        micro_kernel<T, true, Out, V0>(kc, ap + q * kc * MR, 0, b, c, ldc);
                    else
                        micro_kernel<T, false, Out, V0>(kc, ap + q * kc * MR, kc, b, c, ldc);
                };
                using Add = std::integral_constant<TileOut, TileOut::kAdd>;
                using Store = std::integral_constant<TileOut, TileOut::kStore>;
                if constexpr (std::is_same_v<T, double>) {
                    if (!swap && ni == MR && nj == NR) {  // a whole tile: added to out in place
                        double* o = out + i0 * R2 + j0;
                        // A symmetric result's tile whose first vector lies below the diagonal skips it.
                        if (t.symmetric && TileShape<T>::NV == 2 && i0 >= j0 + Simd<T>::L)
                            kernel(Add{}, std::integral_constant<int, 1>{}, o, R2);
                        else
                            kernel(Add{}, std::integral_constant<int, 0>{}, o, R2);
                        continue;
                    }
                }
                kernel(Store{}, std::integral_constant<int, 0>{}, tile, NR);
                if (!swap) {
                    for (std::int64_t i = 0; i < ni; ++i) {
                        double* o = out + (i0 + i) * R2 + j0;
                        const T* ti = tile + i * NR;
                        for (std::int64_t j = 0; j < nj; ++j) o[j] += static_cast<double>(ti[j]);
                    }
                } else {  // the tile is a block of G^T
                    for (std::int64_t j = 0; j < nj; ++j) {
                        double* o = out + (j0 + j) * R2 + i0;
                        for (std::int64_t i = 0; i < ni; ++i) o[i] += static_cast<double>(tile[i * NR + j]);
                    }
                }
            }
        }
    }
}

/// g[i][j] = g[j][i] for j < i (r x r, row-major), in square blocks: a
/// column-order read of the upper triangle would touch a new line per element.
void mirror_upper(double* g, std::int64_t r) {
    constexpr std::int64_t kB = 16;
    for (std::int64_t i0 = 0; i0 < r; i0 += kB)
        for (std::int64_t j0 = 0; j0 <= i0; j0 += kB)
            for (std::int64_t i = i0; i < std::min(r, i0 + kB); ++i)
                for (std::int64_t j = j0; j < std::min(i, j0 + kB); ++j) g[i * r + j] = g[j * r + i];
}

/// All of task t into t.out.
template <typename T>
void gram_whole(const GramTask& t, GramWork& s) {
    const std::int64_t r1 = t.x.cols, size = r1 * t.y.cols;
    if (size == 0) return;
    std::fill(t.out, t.out + size, 0.0);
    gram_range<T>(t, 0, t.x.rows, t.out, 0, s);
    if (t.symmetric) mirror_upper(t.out, r1);
}

struct Item {
    std::size_t task;
    std::int64_t kb, ke;
};

template <typename T>
void gram_impl(const std::vector<GramTask>& tasks, int threads) {
    constexpr std::int64_t KC = ChunkRows<T>::value;
    const std::int64_t nt = static_cast<std::int64_t>(tasks.size());
    double work = 0.0;
    for (const GramTask& t : tasks) work += double(t.x.rows) * double(t.x.cols) * double(t.y.cols) / (t.symmetric ? 2 : 1);
    threads = threads_for_work(threads, work);
    const int max_threads = threads;

    // Items are whole tasks, except when there are fewer tasks than threads:
    // then a task's K range is split into pieces whose chunk results go to
    // separate slots, summed afterwards in chunk order, i.e. in exactly the
    // order the unsplit loop adds them: results never depend on the threads.
    constexpr std::int64_t kMaxSplitBytes = std::int64_t(256) << 20;
    std::vector<Item> items;
    std::vector<std::vector<double>> slots(tasks.size());  // chunk results of split tasks
    for (std::size_t ti = 0; ti < tasks.size(); ++ti) {
        const GramTask& t = tasks[ti];
        const std::int64_t K = t.x.rows, size = t.x.cols * t.y.cols;
        if (size == 0) continue;  // empty output: nothing to read or write
        const std::int64_t chunks = (K + KC - 1) / KC;
        std::int64_t pieces = 1;
        if (nt < max_threads && chunks * size * 8 <= kMaxSplitBytes)
            pieces = std::min<std::int64_t>(chunks, (max_threads + nt - 1) / nt);
        if (pieces <= 1) {
            items.push_back({ti, 0, K});
            continue;
        }
        slots[ti].assign(static_cast<std::size_t>(chunks * size), 0.0);
        const std::int64_t per = (chunks + pieces - 1) / pieces * KC;
        for (std::int64_t kb = 0; kb < K; kb += per) items.push_back({ti, kb, std::min(K, kb + per)});
    }
    // Largest first, for load balance.
    std::vector<std::size_t> order(items.size());
    std::iota(order.begin(), order.end(), std::size_t(0));
    auto cost = [&](const Item& it) {
        const GramTask& t = tasks[it.task];
        return (it.ke - it.kb) * t.x.cols * t.y.cols / (t.symmetric ? 2 : 1);
    };
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return cost(items[a]) > cost(items[b]); });

    std::vector<GramWork> scratch(static_cast<std::size_t>(num_workers(threads, static_cast<std::int64_t>(items.size()))));
    parallel_for(static_cast<std::int64_t>(items.size()), threads, [&](std::int64_t n, int w) {
        const Item& it = items[order[static_cast<std::size_t>(n)]];
        const GramTask& t = tasks[it.task];
        const std::int64_t size = t.x.cols * t.y.cols;
        std::vector<double>& slot = slots[it.task];
        if (!slot.empty()) {
            gram_range<T>(t, it.kb, it.ke, slot.data(), size, scratch[static_cast<std::size_t>(w)]);
            return;
        }
        gram_whole<T>(t, scratch[static_cast<std::size_t>(w)]);
    });
    for (std::size_t ti = 0; ti < tasks.size(); ++ti) {
        if (slots[ti].empty()) continue;
        const GramTask& t = tasks[ti];
        const std::int64_t size = t.x.cols * t.y.cols, chunks = static_cast<std::int64_t>(slots[ti].size()) / size;
        std::fill(t.out, t.out + size, 0.0);
        for (std::int64_t c = 0; c < chunks; ++c) {
            const double* p = slots[ti].data() + c * size;
            for (std::int64_t e = 0; e < size; ++e) t.out[e] += p[e];
        }
        if (t.symmetric) mirror_upper(t.out, t.x.cols);
    }
}

}  // namespace

void gram_one(const GramTask& task, bool precise, GramWork& work) {
    if (precise)
        gram_whole<double>(task, work);
    else
        gram_whole<float>(task, work);
}

void gram(const std::vector<GramTask>& tasks, bool precise, int threads) {
    if (precise)
        gram_impl<double>(tasks, threads);
    else
        gram_impl<float>(tasks, threads);
}

}  // namespace kmf
