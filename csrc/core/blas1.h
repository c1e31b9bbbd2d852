// Vector kernels on contiguous float64 runs, for the small dense algebra
// (sym_eig, gram_svd). Reductions keep explicit vector accumulators: the
// compiler may not reassociate a scalar sum into lanes on its own.
#pragma once

#include <cstdint>

#include "simd.h"

namespace kmf {

/// Sum of the lanes of v, as a tree (the halves of the vector added until
/// one lane is left): log2(L) dependent adds instead of L - 1.
inline double hsum(Simd<double>::V v) {
#if KMF_HAVE_SHUFFLEVECTOR && defined(__AVX512F__)
    typedef double V4 __attribute__((vector_size(32)));
    typedef double V2 __attribute__((vector_size(16)));
    const V4 s4 = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    const V2 s2 = __builtin_shufflevector(s4, s4, 0, 1) + __builtin_shufflevector(s4, s4, 2, 3);
    return s2[0] + s2[1];
#else
    double s = 0.0;
    for (int i = 0; i < Simd<double>::L; ++i) s += v[i];
    return s;
#endif
}

/// sum_l a[l] b[l], l < m.
inline double dot(const double* __restrict a, const double* __restrict b, std::int64_t m) {
    using V = Simd<double>::V;
    constexpr int L = Simd<double>::L;
    V acc0{}, acc1{};
    std::int64_t l = 0;
    for (; l + 2 * L <= m; l += 2 * L) {
        acc0 += vload<V>(a + l) * vload<V>(b + l);
        acc1 += vload<V>(a + l + L) * vload<V>(b + l + L);
    }
    double sum = hsum(acc0 + acc1);
    for (; l < m; ++l) sum += a[l] * b[l];
    return sum;
}

}  // namespace kmf
