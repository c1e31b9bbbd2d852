// Batched [sum |D|, max |D|] of D = X @ Y^T without materialising D.
#pragma once

#include <vector>

#include "mat.h"

namespace kmf {

/// X: P x R, Y: Q x R stacks (coefs applied), same R. out[0] = sum |D_ij|,
/// out[1] = max |D_ij| (float64) for D = X Y^T (P x Q). D is computed tile by
/// tile in float32 registers and reduced on the fly (a NaN in D gives NaN for both).
struct DenseStatsTask {
    Stack x, y;
    double* out = nullptr;
};

void dense_stats(const std::vector<DenseStatsTask>& tasks, int threads);

}  // namespace kmf
