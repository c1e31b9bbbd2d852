// Truncation of a sum of low-rank terms to rank r, one module per thread:
// Grams, the R x R algebra and the rebuild fused, so the Grams live only in
// the worker's cache-sized scratch.
#pragma once

#include <cstdint>
#include <vector>

#include "mat.h"

namespace kmf {

/// One module: M = B A with the stacks B = [c_1 B_1, ...] (n_out x R) and
/// A^T = [A_1^T, ...] (n_in x R). Out: B' = U_r S_r (n_out x rank) and
/// A'^T = V_r (n_in x rank) of M's best rank-r approximation, in the dtypes
/// and strides of out_b / out_at (coef 1).
struct TruncateTask {
    Stack b, at;
    Mat out_b, out_at;
    /// Out: the route of gram_svd (kRouteFailed: out_b / out_at were not
    /// written, and the caller must solve this module another way).
    int route = 0;
};

/// Gb = B^T B and Ga = A A^T, then gram_svd_one, then B' = B T_B and
/// A'^T = A^T T_A. Without float64 inputs or outputs, the Grams accumulate in
/// float32 first (twice the rate); each is redone in float64 when its
/// estimated effect on the kept factors exceeds kFloatGramTol / 2, and Ga
/// also when the Cholesky route rejects it (truncate_one in truncate.cpp);
/// the rebuild accumulates in float32 where its
/// estimated error allows, else in float64 (see float_errors in
/// truncate.cpp). Modules run in parallel, each on one thread; with fewer
/// modules than threads they run one after another, each Gram and rebuild on
/// all threads.
void truncate(std::vector<TruncateTask>& tasks, std::int64_t rank, int threads);

}  // namespace kmf
