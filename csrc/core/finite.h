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

}  // namespace kmf
