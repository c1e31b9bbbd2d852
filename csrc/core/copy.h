// Batched strided copy with scaling and dtype conversion (used to build
// stacked factors [c_1 A_1; c_2 A_2; ...] in one pass).
#pragma once

#include <vector>

#include "mat.h"

namespace kmf {

/// dst(i, j) = src.coef * src(i, j), converted to dst's dtype (the product is
/// exact in double and rounded once, nearest even). Same shape; dst.coef is 1.
struct CopyTask {
    Mat src, dst;
};

void copy(const std::vector<CopyTask>& tasks, int threads);

}  // namespace kmf
