// Finiteness scans: does a matrix hold any NaN or inf? A bit test of each
// entry's exponent field (all ones), vectorised over contiguous runs.
#pragma once

#include <cstdint>
#include <vector>

#include "mat.h"

namespace kmf {

/// True when no entry of m is NaN or inf (any dtype, any strides; coef ignored).
bool all_finite(const Mat& m);

/// True when no entry of p[0..n) is NaN or inf.
bool all_finite(const double* p, std::int64_t n);

/// flags[i] = all_finite(mats[i]) for every matrix, in parallel over them.
std::vector<char> all_finite(const std::vector<Mat>& mats, int threads);

/// out[i] = max |entry| of mats[i] as float64 (coef ignored; 0 for an empty
/// matrix; NaN when an entry is NaN). A scan of the bit patterns with the sign
/// cleared, which order like the magnitudes (NaN above inf), in parallel over
/// the matrices: the kernels' power-of-two range normalisation reads it.
std::vector<double> max_abs(const std::vector<Mat>& mats, int threads);

}  // namespace kmf
