// The machine's multiply-add ceiling for the vector ISA this build targets:
// the denominator of the benchmarks' "% of peak" columns.
#pragma once

namespace kmf {

/// GFLOP/s (2 per multiply-add) of independent vector multiply-add chains
/// on `threads` threads (<= 0: all), in float64 (`double_precision`) or
/// float32, timed over about `seconds`.
double fma_peak_gflops(bool double_precision, int threads, double seconds);

}  // namespace kmf
