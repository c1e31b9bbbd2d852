// The register-blocked micro-kernel shared by gram, apply and dense_stats:
//
//   tile[i][j] = sum_{k < kc} a(k, i) * b(k, j),   i < MR, j < NR = NV * lanes
//
// b is a packed row panel (b[k * NR + j]); a is either a packed row panel
// (a[k * lda + i], "k-major"; lda = 0 means MR) or column panel (a[i * lda + k]). The MR x NV
// accumulator vectors stay in registers across the k loop: each step loads NV
// vectors of b, broadcasts MR scalars of a, and issues MR * NV FMAs. The tile
// goes to a buffer, or straight into (added to, subtracted from) the output
// when the output has the tile's type and the tile lies wholly inside it.
#pragma once

#include <cstdint>

#include "simd.h"

namespace kmf {

/// Micro-tile shape per element type: MR rows (broadcasts) x NV vectors.
/// MR * NV accumulators + NV b vectors + 1 broadcast must fit the register file.
template <typename T>
struct TileShape {
    static constexpr int MR = kVecRegs >= 32 ? 8 : 6;
    static constexpr int NV = 2;
    static constexpr int L = Simd<T>::L;
    static constexpr int NR = NV * L;
};

#if defined(__GNUC__)
#define KMF_UNROLL _Pragma("GCC unroll 16")
#else
#define KMF_UNROLL
#endif

/// How a micro-kernel leaves its MR x NR result in c (row stride ldc):
/// c = tile, c += tile, or c -= tile (one vector load / op / store per row
/// piece, so adding a finished tile rounds exactly as the scalar c[j] += t[j]).
enum class TileOut { kStore, kAdd, kSubtract };

/// V0 > 0 computes only vectors V0 .. NV - 1 of the tile (columns from V0 * L):
/// for a tile whose first vectors lie wholly below a symmetric result's diagonal.
template <typename T, bool AKMajor, TileOut Out = TileOut::kStore, int V0 = 0>
inline void micro_kernel(std::int64_t kc, const T* __restrict a, std::int64_t lda, const T* __restrict b,
                         T* __restrict c, std::int64_t ldc = TileShape<T>::NR) {
    using V = typename Simd<T>::V;
    constexpr int MR = TileShape<T>::MR, NV = TileShape<T>::NV, L = TileShape<T>::L, NR = TileShape<T>::NR;
    V acc[MR][NV];
    KMF_UNROLL for (int i = 0; i < MR; ++i) KMF_UNROLL for (int v = V0; v < NV; ++v) acc[i][v] = V{};
    const std::int64_t ks = lda > 0 ? lda : MR;  // k-major: the row stride of a
    for (std::int64_t k = 0; k < kc; ++k) {
        V bv[NV];
        KMF_UNROLL for (int v = V0; v < NV; ++v) bv[v] = vload<V>(b + k * NR + v * L);
        KMF_UNROLL for (int i = 0; i < MR; ++i) {
            const T ai = AKMajor ? a[k * ks + i] : a[i * lda + k];
            KMF_UNROLL for (int v = V0; v < NV; ++v) acc[i][v] += ai * bv[v];
        }
    }
    KMF_UNROLL for (int i = 0; i < MR; ++i) KMF_UNROLL for (int v = V0; v < NV; ++v) {
        T* ci = c + i * ldc + v * L;
        if constexpr (Out == TileOut::kAdd)
            vstore(ci, vload<V>(ci) + acc[i][v]);
        else if constexpr (Out == TileOut::kSubtract)
            vstore(ci, vload<V>(ci) - acc[i][v]);
        else
            vstore(ci, acc[i][v]);
    }
}

}  // namespace kmf
