// Packing: copy a K-chunk of a Stack into contiguous, zero-padded panels of T
// (float or double), converting the dtype and applying each block's coef on
// the way. The micro-kernels then read only unit-stride memory, whatever the
// source strides (row-major factors or transposed views).
//
// Two panel layouts, for rows [k0, k0 + kc) and stacked columns [j0, j0 + n):
//   row panels:   ceil(n / W) panels of kc x W, panel p at dst + p * kc * W,
//                 element (k, j) at [k * W + j % W]  (the micro-kernel's b, or
//                 its k-major a);
//   column panel: dst[j * ld + k] (a column is contiguous in k).
// Both read the source in address order when it has unit stride in the
// matching direction (rows for row panels, columns for column panels) and
// prefetch the same rows of the next chunk (`ahead` rows) into cache, so the
// stream from memory overlaps the compute on the current chunk. A row panel
// from a column-contiguous source goes through a blocked transpose.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype.h"
#include "mat.h"
#include "parallel.h"

namespace kmf {

/// Prefetch [p, p + bytes) for reading (into the outer caches).
inline void prefetch_range(const void* p, std::int64_t bytes) {
#if defined(__GNUC__)
    const char* c = static_cast<const char*>(p);
    for (std::int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
#else
    (void)p, (void)bytes;
#endif
}

/// Calls f(block, local_col0, panel_col0, count) for each block segment that
/// covers stacked columns [j0, j0 + n).
template <typename F>
inline void for_segments(const Stack& s, std::int64_t j0, std::int64_t n, F&& f) {
    const std::int64_t j1 = j0 + n;
    for (std::size_t b = 0; b < s.blocks.size(); ++b) {
        const std::int64_t c0 = s.col0[b], c1 = c0 + s.blocks[b].cols;
        const std::int64_t lo = std::max(c0, j0), hi = std::min(c1, j1);
        if (lo < hi) f(s.blocks[b], lo - c0, lo - j0, hi - lo);
    }
}

/// True when a block is better read column by column (a transposed view).
inline bool column_major(const Mat& m) { return m.rs == 1 && m.cs != 1 && m.cols > 1 && m.rows > 1; }

#if KMF_HAVE_SHUFFLEVECTOR
/// dst[k * ld + i] = src[i * lds + k] for an 8 x 8 float block (three shuffle stages).
inline void transpose_block(float* __restrict dst, std::int64_t ld, const float* __restrict src, std::int64_t lds) {
    typedef float v8 __attribute__((vector_size(32)));
    v8 r0 = vload<v8>(src), r1 = vload<v8>(src + lds), r2 = vload<v8>(src + 2 * lds), r3 = vload<v8>(src + 3 * lds);
    v8 r4 = vload<v8>(src + 4 * lds), r5 = vload<v8>(src + 5 * lds), r6 = vload<v8>(src + 6 * lds),
       r7 = vload<v8>(src + 7 * lds);
    const v8 t0 = __builtin_shufflevector(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13);
    const v8 t1 = __builtin_shufflevector(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);
    const v8 t2 = __builtin_shufflevector(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13);
    const v8 t3 = __builtin_shufflevector(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);
    const v8 t4 = __builtin_shufflevector(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13);
    const v8 t5 = __builtin_shufflevector(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);
    const v8 t6 = __builtin_shufflevector(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13);
    const v8 t7 = __builtin_shufflevector(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);
    const v8 u0 = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
    const v8 u1 = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
    const v8 u2 = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
    const v8 u3 = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
    const v8 u4 = __builtin_shufflevector(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
    const v8 u5 = __builtin_shufflevector(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
    const v8 u6 = __builtin_shufflevector(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
    const v8 u7 = __builtin_shufflevector(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
    vstore(dst, __builtin_shufflevector(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11));
    vstore(dst + ld, __builtin_shufflevector(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11));
    vstore(dst + 2 * ld, __builtin_shufflevector(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11));
    vstore(dst + 3 * ld, __builtin_shufflevector(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11));
    vstore(dst + 4 * ld, __builtin_shufflevector(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15));
    vstore(dst + 5 * ld, __builtin_shufflevector(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15));
    vstore(dst + 6 * ld, __builtin_shufflevector(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15));
    vstore(dst + 7 * ld, __builtin_shufflevector(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15));
}

#if !defined(__AVX512F__)
/// dst[k * ld + i] = src[i * lds + k] for a 4 x 4 double block.
inline void transpose_block(double* __restrict dst, std::int64_t ld, const double* __restrict src, std::int64_t lds) {
    typedef double v4 __attribute__((vector_size(32)));
    const v4 r0 = vload<v4>(src), r1 = vload<v4>(src + lds), r2 = vload<v4>(src + 2 * lds), r3 = vload<v4>(src + 3 * lds);
    const v4 t0 = __builtin_shufflevector(r0, r1, 0, 4, 2, 6), t1 = __builtin_shufflevector(r0, r1, 1, 5, 3, 7);
    const v4 t2 = __builtin_shufflevector(r2, r3, 0, 4, 2, 6), t3 = __builtin_shufflevector(r2, r3, 1, 5, 3, 7);
    vstore(dst, __builtin_shufflevector(t0, t2, 0, 1, 4, 5));
    vstore(dst + ld, __builtin_shufflevector(t1, t3, 0, 1, 4, 5));
    vstore(dst + 2 * ld, __builtin_shufflevector(t0, t2, 2, 3, 6, 7));
    vstore(dst + 3 * ld, __builtin_shufflevector(t1, t3, 2, 3, 6, 7));
}
#else
/// dst[k * ld + i] = src[i * lds + k] for an 8 x 8 double block (512-bit vectors, three shuffle stages).
inline void transpose_block(double* __restrict dst, std::int64_t ld, const double* __restrict src, std::int64_t lds) {
    typedef double v8 __attribute__((vector_size(64)));
    v8 r[8];
    for (int i = 0; i < 8; ++i) r[i] = vload<v8>(src + i * lds);
    v8 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {  // pairs of rows: even / odd columns interleaved
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 2, 10, 4, 12, 6, 14);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    }
    for (int h = 0; h < 8; h += 4)  // quads of rows: columns 0 / 2 (mod 4) from the even pairs, 1 / 3 from the odd
        for (int e = 0; e < 2; ++e) {
            u[h + 2 * e] = __builtin_shufflevector(t[h + e], t[h + 2 + e], 0, 1, 8, 9, 4, 5, 12, 13);
            u[h + 2 * e + 1] = __builtin_shufflevector(t[h + e], t[h + 2 + e], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    // u[q] (q < 4) holds rows 0-3 of columns {c, c + 4} with c = 0, 2, 1, 3 for q = 0, 1, 2, 3; u[4 + q] rows 4-7.
    const int col[4] = {0, 2, 1, 3};
    for (int q = 0; q < 4; ++q) {
        vstore(dst + col[q] * ld, __builtin_shufflevector(u[q], u[4 + q], 0, 1, 2, 3, 8, 9, 10, 11));
        vstore(dst + (col[q] + 4) * ld, __builtin_shufflevector(u[q], u[4 + q], 4, 5, 6, 7, 12, 13, 14, 15));
    }
}
#endif
#endif

/// Side of the square blocks transpose_into moves with vector shuffles (the
/// float64 block fills 512-bit vectors where the build has them).
template <typename T>
constexpr int kTransposeBlock =
#if defined(__AVX512F__)
    std::is_same_v<T, double> ? 8 :
#endif
    32 / sizeof(T);

/// dst[k * ld + j] = src[j * lds + k] for k < kc, j < n: whole blocks with
/// vector shuffles (where available), the edges element by element.
template <typename T>
inline void transpose_into(T* __restrict dst, std::int64_t ld, const T* __restrict src, std::int64_t lds,
                           std::int64_t kc, std::int64_t n) {
    constexpr std::int64_t B = kTransposeBlock<T>;
    std::int64_t j0 = 0;
#if KMF_HAVE_SHUFFLEVECTOR
    const std::int64_t kfull = kc / B * B;
    for (; j0 + B <= n; j0 += B) {
        for (std::int64_t k = 0; k < kfull; k += B) transpose_block(dst + k * ld + j0, ld, src + j0 * lds + k, lds);
        for (std::int64_t k = kfull; k < kc; ++k)
            for (std::int64_t j = j0; j < j0 + B; ++j) dst[k * ld + j] = src[j * lds + k];
    }
#endif
    for (std::int64_t k = 0; k < kc; ++k)
        for (std::int64_t j = j0; j < n; ++j) dst[k * ld + j] = src[j * lds + k];
}

/// Row panels of width W (see the file comment); padded columns are zero.
/// `tmp` is scratch for column-major blocks; `ahead` rows after the chunk are
/// prefetched. CW > 0 fixes the width at compile time (W must equal it): the
/// copy of a full panel row then unrolls into a few vector moves.
template <typename T, int CW = 0>
inline void pack_row_panels(T* __restrict dst, std::int64_t Wrt, const Stack& s, std::int64_t k0, std::int64_t kc,
                            std::int64_t j0, std::int64_t n, Scratch& tmp, std::int64_t ahead = 0) {
    const std::int64_t W = CW > 0 ? CW : Wrt;
    const std::int64_t ps = kc * W;  // panel stride
    for_segments(s, j0, n, [&](const Mat& m, std::int64_t c, std::int64_t jj, std::int64_t cnt) {
        const T coef = static_cast<T>(m.coef);
        const int es = elem_size(m.dtype);
        if (column_major(m) && kc > 1) {
            // Read a group of columns (contiguous runs), then transpose it into the panels.
            constexpr std::int64_t G = kTransposeBlock<T>;
            T* t = tmp.get<T>(static_cast<std::size_t>(G * kc));
            for (std::int64_t j = 0; j < cnt;) {
                const std::int64_t p = (jj + j) / W, off = (jj + j) % W;
                const std::int64_t g = std::min(std::min(G, W - off), cnt - j);
                for (std::int64_t i = 0; i < g; ++i) {
                    load_run<T>(t + i * kc, m.at(k0, c + j + i), m.dtype, kc, 1, coef);
                    if (ahead > 0) prefetch_range(m.at(k0 + kc, c + j + i), ahead * es);
                }
                transpose_into<T>(dst + p * ps + off, W, t, kc, kc, g);
                j += g;
            }
            return;
        }
        with_src(m.dtype, [&](auto src) {
            using Src = decltype(src);
            using S = typename Src::S;
            const std::int64_t cs = m.cs;
            const std::int64_t p0 = jj / W, off0 = jj % W;
            // Convert each row in one vectorised pass into rowbuf, then cut it into the panels.
            // A segment starting at a panel boundary is cut into whole-width pieces
            // (fixed-size copies); rowbuf's zero padding fills the last panel's tail,
            // which a following segment (if any) overwrites.
            const bool aligned = off0 == 0;
            const std::int64_t padded = (cnt + W - 1) / W * W;
            T* rowbuf = cs == 1 ? tmp.get<T>(static_cast<std::size_t>(padded)) : nullptr;
            if (rowbuf) std::fill(rowbuf + cnt, rowbuf + padded, T(0));
            const char* row_ptr = static_cast<const char*>(m.at(k0, c));
            const std::int64_t row_step = m.rs * es;
            for (std::int64_t k = 0; k < kc; ++k, row_ptr += row_step) {
                const S* row = reinterpret_cast<const S*>(row_ptr);
                if (k < ahead && cs == 1) prefetch_range(row_ptr + kc * row_step, cnt * es);
                if (cs == 1) {
                    std::int64_t t0 = 0;
#ifdef KMF_HALF_HW
                    if constexpr (std::is_same_v<Src, SrcF16>) t0 = half_load_hw(rowbuf, row, cnt, coef);
#endif
                    for (std::int64_t t = t0; t < cnt; ++t) rowbuf[t] = Src::get(row[t], coef);
                    if (aligned) {
                        T* d = dst + p0 * ps + k * W;
                        for (std::int64_t j = 0; j < cnt; j += W, d += ps) std::memcpy(d, rowbuf + j, sizeof(T) * W);
                        continue;
                    }
                    for (std::int64_t j = 0, p = p0, off = off0; j < cnt; ++p, off = 0) {
                        const std::int64_t len = std::min(W - off, cnt - j);
                        std::memcpy(dst + p * ps + k * W + off, rowbuf + j, sizeof(T) * static_cast<std::size_t>(len));
                        j += len;
                    }
                } else {
                    for (std::int64_t j = 0, p = p0, off = off0; j < cnt; ++p, off = 0) {
                        const std::int64_t len = std::min(W - off, cnt - j);
                        T* __restrict d = dst + p * ps + k * W + off;
                        for (std::int64_t t = 0; t < len; ++t) d[t] = Src::get(row[(j + t) * cs], coef);
                        j += len;
                    }
                }
            }
        });
    });
    const std::int64_t np = (n + W - 1) / W, tail = np * W - n;
    if (tail > 0) {
        T* last = dst + (np - 1) * ps;
        for (std::int64_t k = 0; k < kc; ++k) std::fill(last + k * W + (W - tail), last + k * W + W, T(0));
    }
}

/// Column panel: dst[j * ld + k] = S(k0 + k, j0 + j), k < kc, j < n; entries
/// with k in [kc, kpad) or j in [n, npad) are zero. `ahead` rows after the
/// chunk are prefetched for column-major blocks.
template <typename T>
inline void pack_cols(T* __restrict dst, std::int64_t ld, const Stack& s, std::int64_t k0, std::int64_t kc,
                      std::int64_t j0, std::int64_t n, std::int64_t npad, std::int64_t kpad, std::int64_t ahead = 0) {
    for_segments(s, j0, n, [&](const Mat& m, std::int64_t c, std::int64_t jj, std::int64_t cnt) {
        const T coef = static_cast<T>(m.coef);
        const bool pf = ahead > 0 && m.rs == 1;
        for (std::int64_t j = 0; j < cnt; ++j) {
            T* d = dst + (jj + j) * ld;
            load_run<T>(d, m.at(k0, c + j), m.dtype, kc, m.rs, coef);
            if (pf) prefetch_range(m.at(k0 + kc, c + j), ahead * elem_size(m.dtype));
            std::fill(d + kc, d + kpad, T(0));
        }
    });
    for (std::int64_t j = n; j < npad; ++j) std::fill(dst + j * ld, dst + j * ld + kpad, T(0));
}

}  // namespace kmf
