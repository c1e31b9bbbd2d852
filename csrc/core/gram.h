// Batched Gram matrices G = X^T Y of two column stacks with the same row count.
#pragma once

#include <vector>

#include "mat.h"
#include "parallel.h"

namespace kmf {

/// X: K x R1, Y: K x R2 (coefs applied). out: R1 x R2 float64, row-major,
/// overwritten. symmetric: X and Y are the same stack; only tiles touching the
/// upper triangle are computed and the lower triangle is mirrored from them,
/// so the result is exactly symmetric.
struct GramTask {
    Stack x, y;
    double* out = nullptr;
    bool symmetric = false;
};

/// Computes every task, in parallel over tasks (and K-ranges of a task when there
/// are fewer tasks than threads). precise: inputs converted to double and
/// accumulated in double. Otherwise float32 accumulation inside K-chunks of at
/// most kGramChunk rows, each chunk's result added into the float64 output.
void gram(const std::vector<GramTask>& tasks, bool precise, int threads);

/// Packed panels and the tile of one thread's Gram calls, reused across calls.
struct GramWork {
    Scratch a, b, tmp, tile;
};

/// One task on the calling thread with the caller's buffers; the same result,
/// bit for bit, as gram() on any number of threads.
void gram_one(const GramTask& task, bool precise, GramWork& work);

/// Rows per K-chunk (fast mode accumulates at most this many products in float32).
constexpr int kGramChunk = 256;

}  // namespace kmf
