// Batched out = X @ T: rebuild factors from a stacked basis and a small transform.
#pragma once

#include <cstdint>
#include <vector>

#include "mat.h"
#include "parallel.h"

namespace kmf {

/// X: K x R stack (coefs applied); t: R x C float64, row-major; out: K x C
/// (its dtype is the output dtype; any strides; coef must be 1).
struct ApplyTask {
    Stack x;
    const double* t = nullptr;
    std::int64_t c = 0;
    Mat out;
};

/// out = X @ T for every task, accumulating in double (precise) or float32,
/// rounding to the output dtype (nearest even). Parallel over tasks and row
/// blocks of each task.
void apply(const std::vector<ApplyTask>& tasks, bool precise, int threads);

/// The packed T and panels of one thread's apply calls, reused across calls.
struct ApplyWork {
    Scratch tp, a, b, tmp, tile;
};

/// One task on the calling thread with the caller's buffers (the same result as apply()).
void apply_one(const ApplyTask& task, bool precise, ApplyWork& work);

}  // namespace kmf
