// sum / max of |X Y^T|, streamed: the only storage is per-worker packed panels
// (kRowBlock rows of one operand, kColBlock rows of the other, each x R) and
// two MR x NR tiles; D (P x Q, e.g. 2048 x 8192 for an MLP projection) is never
// allocated. Each tile is reduced (sum |.| in float per lane, then float64;
// max |.|) right after the micro-kernel computes it.
//
// Work items are (task, block of kRowBlock rows of the "a" operand); each item
// keeps float64 partial results, combined in a fixed order afterwards.
#include "dense_stats.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "pack.h"
#include "parallel.h"

namespace kmf {
namespace {

constexpr std::int64_t kRowBlock = 256;  // rows of the a operand per work item
constexpr std::int64_t kColBlock = 256;  // rows of the b operand packed at once

struct Scratches {
    Scratch a, b, tmp, tile;
};

struct Partial {
    double sum = 0.0;
    float max = 0.0f;
};

using V = Simd<float>::V;
typedef double VD __attribute__((vector_size(2 * kVecBytes)));

/// Adds |tile| (ni x nj valid entries, rows of NR) into the accumulators.
inline void reduce_tile(const float* tile, std::int64_t ni, std::int64_t nj, VD& sum, V& vmax, Partial& part) {
    constexpr int MR = TileShape<float>::MR, NR = TileShape<float>::NR, L = TileShape<float>::L;
    if (ni == MR && nj == NR) {
        V s = V{}, m = vmax;
        KMF_UNROLL for (int e = 0; e < MR * NR; e += L) {
            V t = vload<V>(tile + e);
            t = t < 0 ? -t : t;
            s += t;
            m = t > m ? t : m;
            // A NaN fails the comparison (max ignores it) but propagates through s.
        }
        sum += __builtin_convertvector(s, VD);
        vmax = m;
        return;
    }
    float m = part.max;
    for (std::int64_t i = 0; i < ni; ++i) {
        float s = 0.0f;
        for (std::int64_t j = 0; j < nj; ++j) {
            const float t = std::fabs(tile[i * NR + j]);
            s += t;
            m = t > m ? t : m;
        }
        part.sum += s;
    }
    part.max = m;
}

void stats_rows(const DenseStatsTask& task, std::int64_t p0, std::int64_t p1, Partial& part, Scratches& s) {
    constexpr int MR = TileShape<float>::MR, NR = TileShape<float>::NR, L = TileShape<float>::L;
    // b operand (vector lanes) = the stack whose columns are contiguous: then
    // packing b (rows of b run along the lanes) is a straight copy. sum and max
    // of |D| do not change under transposition, so the roles may swap.
    const bool swap = !task.y.cols_contiguous() && task.x.cols_contiguous();
    const Stack& A = swap ? task.y : task.x;
    const Stack& B = swap ? task.x : task.y;
    const std::int64_t R = A.cols, Q = B.rows;
    const std::int64_t ldr = std::max<std::int64_t>(R, 1);
    const bool a_kmajor = !A.rows_contiguous() && A.cols_contiguous();
    const std::int64_t rows = p1 - p0, na = (rows + MR - 1) / MR;

    // Pack the item's rows of A once: a(r, i) = A(p0 + q * MR + i, r).
    float* ap = s.a.get<float>(static_cast<std::size_t>(na * MR * ldr));
    for (std::int64_t q = 0; q < na; ++q) {
        const std::int64_t i0 = p0 + q * MR, ni = std::min<std::int64_t>(MR, p1 - i0);
        float* d = ap + q * MR * ldr;
        if (a_kmajor) {  // d[r * MR + i]
            pack_cols<float>(d, MR, A, i0, ni, 0, R, R, MR);
        } else {  // d[i * R + r]
            pack_row_panels<float>(d, ldr, A, i0, ni, 0, R, s.tmp);
            std::fill(d + ni * ldr, d + MR * ldr, 0.0f);
        }
    }
    float* bp = s.b.get<float>(static_cast<std::size_t>(kColBlock * ldr));
    float* tile = s.tile.get<float>(2 * MR * NR);
    float* part_tile = tile + MR * NR;
    // Segments of the shared dimension R where both stacks stay within one block.
    std::vector<std::int64_t> segs(A.col0.begin(), A.col0.end());
    segs.insert(segs.end(), B.col0.begin(), B.col0.end());
    segs.push_back(R);
    std::sort(segs.begin(), segs.end());
    segs.erase(std::unique(segs.begin(), segs.end()), segs.end());
    VD sum = VD{};
    V vmax = V{};
    for (std::int64_t c0 = 0; c0 < Q; c0 += kColBlock) {
        const std::int64_t nc = std::min<std::int64_t>(kColBlock, Q - c0), nb = (nc + NR - 1) / NR;
        for (std::int64_t p = 0; p < nb; ++p) {  // bp[p][r * NR + j] = B(c0 + p * NR + j, r)
            const std::int64_t j0 = c0 + p * NR, nj = std::min<std::int64_t>(NR, Q - j0);
            pack_cols<float>(bp + p * NR * ldr, NR, B, j0, nj, 0, R, R, NR);
        }
        for (std::int64_t p = 0; p < nb; ++p) {
            const std::int64_t nj = std::min<std::int64_t>(NR, Q - (c0 + p * NR));
            for (std::int64_t q = 0; q < na; ++q) {
                const std::int64_t ni = std::min<std::int64_t>(MR, rows - q * MR);
                // One accumulation per segment, then their sum: with X = [c B, -c B]
                // and Y = [A^T, A^T] the two partial tiles are exact negatives, so
                // identical updates give exactly D = 0.
                for (std::size_t g = 0; g + 1 < segs.size(); ++g) {
                    const std::int64_t r0 = segs[g], nr = segs[g + 1] - r0;
                    float* tg = g == 0 ? tile : part_tile;
                    if (a_kmajor)
                        micro_kernel<float, true>(nr, ap + q * MR * ldr + r0 * MR, 0, bp + p * NR * ldr + r0 * NR, tg);
                    else
                        micro_kernel<float, false>(nr, ap + q * MR * ldr + r0, ldr, bp + p * NR * ldr + r0 * NR, tg);
                    if (g > 0)
                        for (int e = 0; e < MR * NR; ++e) tile[e] += part_tile[e];
                }
                if (segs.size() < 2) std::fill(tile, tile + MR * NR, 0.0f);  // R = 0
                reduce_tile(tile, ni, nj, sum, vmax, part);
            }
        }
    }
    for (int l = 0; l < L; ++l) {
        part.sum += sum[l];
        part.max = vmax[l] > part.max ? vmax[l] : part.max;
    }
}

struct Item {
    std::size_t task;
    std::int64_t p0, p1;
};

}  // namespace

void dense_stats(const std::vector<DenseStatsTask>& tasks, int threads) {
    double work = 0.0;
    for (const DenseStatsTask& t : tasks) work += double(t.x.rows) * double(t.y.rows) * double(t.x.cols + 1);
    threads = threads_for_work(threads, work);
    std::vector<Item> items;
    std::vector<std::size_t> first(tasks.size() + 1, 0);
    for (std::size_t ti = 0; ti < tasks.size(); ++ti) {
        first[ti] = items.size();
        const DenseStatsTask& t = tasks[ti];
        const bool swap = !t.y.cols_contiguous() && t.x.cols_contiguous();
        const std::int64_t P = (t.x.rows == 0 || t.y.rows == 0) ? 0 : (swap ? t.y.rows : t.x.rows);
        for (std::int64_t p0 = 0; p0 < P; p0 += kRowBlock) items.push_back({ti, p0, std::min(P, p0 + kRowBlock)});
    }
    first[tasks.size()] = items.size();
    std::vector<Partial> parts(items.size());
    std::vector<Scratches> scratch(static_cast<std::size_t>(num_workers(threads, static_cast<std::int64_t>(items.size()))));
    parallel_for(static_cast<std::int64_t>(items.size()), threads, [&](std::int64_t n, int w) {
        const Item& it = items[static_cast<std::size_t>(n)];
        stats_rows(tasks[it.task], it.p0, it.p1, parts[static_cast<std::size_t>(n)], scratch[static_cast<std::size_t>(w)]);
    });
    for (std::size_t ti = 0; ti < tasks.size(); ++ti) {
        double sum = 0.0, mx = 0.0;
        for (std::size_t i = first[ti]; i < first[ti + 1]; ++i) {
            sum += parts[i].sum;
            mx = std::max(mx, static_cast<double>(parts[i].max));
        }
        if (std::isnan(sum)) mx = std::numeric_limits<double>::quiet_NaN();
        tasks[ti].out[0] = sum;
        tasks[ti].out[1] = mx;
    }
}

}  // namespace kmf
