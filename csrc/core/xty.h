// C = X^T Y for small row-major float64 matrices (the O(R^3) products of the
// truncation core and the symmetric eigensolver), on the shared micro-kernel.
#pragma once

#include <cstdint>

#include "parallel.h"

namespace kmf {

/// Which zeros of the operands xty may skip, and which part of C it writes.
struct XtyShape {
    bool x_lower = false;     // X[k][i] = 0 for k < i
    bool y_lower = false;     // Y[k][j] = 0 for k < j
    bool upper_only = false;  // write only C[i][j] with j >= i
    bool subtract = false;    // C -= X^T Y instead of C = X^T Y
    bool x_upper = false;     // X[k][i] = 0 for k > i
    bool x_trans = false;     // x holds X^T (m x kd, row stride ldx) instead of X
};

/// Packed panels and the tile of one thread's xty calls, reused across calls.
struct XtyWork {
    Scratch pa, pb, tile;
};

/// C (m x n, ldc) = X^T Y (or C -= X^T Y) for X (kd x m, ldx; or its
/// transpose, m x kd, with x_trans) and Y (kd x n, ldy), all row-major
/// float64: both are packed into the micro-kernel's k-major panels, and each
/// MR x NR tile sums only over the k where neither operand is known to be
/// zero. Single-threaded.
void xty(std::int64_t kd, std::int64_t m, std::int64_t n, const double* x, std::int64_t ldx, const double* y,
         std::int64_t ldy, double* c, std::int64_t ldc, XtyShape shape, XtyWork& wk);

/// A Y operand packed once, for several xty_packed calls on its trailing blocks.
struct PackedY {
    Scratch buf;
    std::int64_t kd = 0, n = 0;
};

/// Packs Y (kd x n, row-major float64) into out: from y (row stride ldy),
/// or with trans from y holding Y^T (n x kd, row stride ldy).
void pack_y(std::int64_t kd, std::int64_t n, const double* y, std::int64_t ldy, bool trans, PackedY& out);

/// xty with Y the trailing block y[r0:, c0:] of a packed Y (y_lower then
/// means y[r0 + k][c0 + j] = 0 for k < j). Only X is packed. c0 must be a
/// multiple of 16, which every build's panel width divides (else logic_error).
void xty_packed(std::int64_t m, const double* x, std::int64_t ldx, const PackedY& y, std::int64_t r0, std::int64_t c0,
                double* c, std::int64_t ldc, XtyShape shape, XtyWork& wk);

}  // namespace kmf
