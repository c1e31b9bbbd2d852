#include "finite.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"

namespace kmf {
namespace {

/// True when none of the n entries (stride in elements) has its exponent
/// field all ones: (bits & mask) == mask marks NaN and inf in every IEEE format.
template <typename U>
bool run_finite(const void* p, std::int64_t n, std::int64_t stride, U mask) {
    const U* s = static_cast<const U*>(p);
    U bad = 0;
    if (stride == 1)
        for (std::int64_t t = 0; t < n; ++t) bad |= static_cast<U>((s[t] & mask) == mask);
    else
        for (std::int64_t t = 0; t < n; ++t) bad |= static_cast<U>((s[t * stride] & mask) == mask);
    return bad == 0;
}

/// run_finite for dtype `code`.
bool entries_finite(const void* p, int dtype, std::int64_t n, std::int64_t stride) {
    switch (dtype) {
        case kF32: return run_finite<std::uint32_t>(p, n, stride, 0x7f800000u);
        case kF16: return run_finite<std::uint16_t>(p, n, stride, 0x7c00u);
        case kBF16: return run_finite<std::uint16_t>(p, n, stride, 0x7f80u);
        case kF64: return run_finite<std::uint64_t>(p, n, stride, 0x7ff0000000000000ull);
        default: return false;
    }
}

/// The largest (bits & mask) over n entries: with mask clearing the sign bit,
/// the patterns of |x| order like the values (NaN patterns above inf).
template <typename U>
U run_max_bits(const void* p, std::int64_t n, std::int64_t stride, U mask) {
    const U* s = static_cast<const U*>(p);
    U best = 0;
    if (stride == 1)
        for (std::int64_t t = 0; t < n; ++t) best = std::max<U>(best, s[t] & mask);
    else
        for (std::int64_t t = 0; t < n; ++t) best = std::max<U>(best, s[t * stride] & mask);
    return best;
}

/// max |entry| of one matrix (its largest sign-cleared bit pattern, decoded).
template <typename U>
U mat_max_bits(const Mat& m, U mask) {
    const bool by_rows = m.cs == 1 || m.rs != 1;
    const std::int64_t outer = by_rows ? m.rows : m.cols, inner = by_rows ? m.cols : m.rows;
    const std::int64_t step = by_rows ? m.cs : m.rs;
    U best = 0;
    for (std::int64_t o = 0; o < outer; ++o)
        best = std::max<U>(best, run_max_bits<U>(by_rows ? m.at(o, 0) : m.at(0, o), inner, step, mask));
    return best;
}

double mat_max_abs(const Mat& m) {
    switch (m.dtype) {
        case kF32: return static_cast<double>(bits_f32(mat_max_bits<std::uint32_t>(m, 0x7fffffffu)));
        case kF16: return static_cast<double>(half_to_float(mat_max_bits<std::uint16_t>(m, 0x7fffu)));
        case kBF16: return static_cast<double>(bf16_to_float(mat_max_bits<std::uint16_t>(m, 0x7fffu)));
        case kF64: {
            const std::uint64_t u = mat_max_bits<std::uint64_t>(m, 0x7fffffffffffffffull);
            double d;
            std::memcpy(&d, &u, sizeof d);
            return d;
        }
        default: return 0.0;
    }
}

// f(mat) for every matrix, on threads over the matrices. A scan is bound by memory:
// an entry costs about the time of 16 multiply-adds.
template <class R, class F>
std::vector<R> per_mat(const std::vector<Mat>& mats, int threads, F f) {
    double work = 0.0;
    for (const Mat& m : mats) work += double(m.rows) * double(m.cols);
    std::vector<R> out(mats.size(), R{});
    parallel_for(static_cast<std::int64_t>(mats.size()), threads_for_work(threads, 16 * work),
                 [&](std::int64_t i, int) { out[static_cast<std::size_t>(i)] = f(mats[static_cast<std::size_t>(i)]); });
    return out;
}

}  // namespace

std::vector<double> max_abs(const std::vector<Mat>& mats, int threads) {
    return per_mat<double>(mats, threads, mat_max_abs);
}

bool all_finite(const Mat& m) {
    // Along the unit-stride direction when there is one.
    const bool by_rows = m.cs == 1 || m.rs != 1;
    const std::int64_t outer = by_rows ? m.rows : m.cols, inner = by_rows ? m.cols : m.rows;
    const std::int64_t step = by_rows ? m.cs : m.rs;
    for (std::int64_t o = 0; o < outer; ++o)
        if (!entries_finite(by_rows ? m.at(o, 0) : m.at(0, o), m.dtype, inner, step)) return false;
    return true;
}

bool all_finite(const double* p, std::int64_t n) { return entries_finite(p, kF64, n, 1); }

std::vector<char> all_finite(const std::vector<Mat>& mats, int threads) {
    return per_mat<char>(mats, threads, [](const Mat& m) -> char { return all_finite(m); });
}

}  // namespace kmf
