// Vector kernels on contiguous float64 runs, for the small dense algebra
// (sym_eig, gram_svd). Reductions keep explicit vector accumulators: the
// compiler may not reassociate a scalar sum into lanes on its own.
#pragma once

#include <cstdint>

#include "simd.h"

namespace kmf {

inline double hsum(Simd<double>::V v) {
    double s = 0.0;
    for (int i = 0; i < Simd<double>::L; ++i) s += v[i];
    return s;
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
