// Twelve independent accumulators per thread hide the multiply-add latency
// on every target (latency x ports <= 12 on current x86-64 and Arm cores).
#include "peak.h"

#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "parallel.h"
#include "simd.h"

namespace kmf {
namespace {

constexpr int kChains = 12;

template <typename T>
T chains(std::int64_t iters) {
    using V = typename Simd<T>::V;
    V acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = V{} + T(c);
    const V mul = V{} + T(0.999999), add = V{} + T(1e-7);
    for (std::int64_t it = 0; it < iters; ++it)
        for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * mul + add;
    T s = 0;
    for (int c = 0; c < kChains; ++c)
        for (int l = 0; l < Simd<T>::L; ++l) s += acc[c][l];
    return s;
}

template <typename T>
double peak(int threads, double seconds) {
    using clock = std::chrono::steady_clock;
    if (threads <= 0) threads = hardware_threads();
    // Calibrate the iteration count on one thread, then time all threads at once.
    std::int64_t iters = 1 << 16;
    for (;;) {
        const auto t0 = clock::now();
        volatile T sink = chains<T>(iters);
        (void)sink;
        if (std::chrono::duration<double>(clock::now() - t0).count() > seconds / 8 || iters > (std::int64_t(1) << 40)) break;
        iters *= 2;
    }
    iters *= 8;
    std::vector<T> out(static_cast<std::size_t>(threads));
    const auto t0 = clock::now();
    parallel_for(threads, threads, [&](std::int64_t i, int) { out[static_cast<std::size_t>(i)] = chains<T>(iters); });
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    volatile T sink = out[0];
    (void)sink;
    return 2.0 * kChains * Simd<T>::L * double(iters) * threads / dt / 1e9;
}

}  // namespace

double fma_peak_gflops(bool double_precision, int threads, double seconds) {
    return double_precision ? peak<double>(threads, seconds) : peak<float>(threads, seconds);
}

}  // namespace kmf
