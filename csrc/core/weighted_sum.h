// Batched weighted sums of same-shape matrices with torch's roundings: peft's
// factor-wise ``linear`` merge (sqrt-weighted A's and B's) in one pass.
#pragma once

#include <vector>

#include "mat.h"

namespace kmf {

/// dst = ((c_0 s_0) + c_1 s_1) + ... with c_k the coef of srcs[k]: every
/// product and every sum rounded to T (float, or double if precise), left to
/// right, then one rounding (nearest even) to dst's dtype. That is the
/// rounding sequence of torch's `t0 * w0 + t1 * w1` on tensors converted to
/// T (a float64 source is only allowed when precise: it would be rounded
/// before the product). All shapes equal; dst coef is 1.
struct WeightedSumTask {
    std::vector<Mat> srcs;
    Mat dst;
};

void weighted_sum(const std::vector<WeightedSumTask>& tasks, bool precise, int threads);

}  // namespace kmf
