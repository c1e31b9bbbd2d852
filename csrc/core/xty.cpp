#include "xty.h"

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace kmf {
namespace {

/// The k-major panels of width W of a row-major kd x cols matrix: panel p
/// holds columns [p W, p W + W) as dst[p W kd + k W + j], zero-padded past cols.
void pack_panels(double* dst, const double* src, std::int64_t ld, std::int64_t kd, std::int64_t cols, std::int64_t width) {
    for (std::int64_t p = 0; p * width < cols; ++p) {
        const std::int64_t j0 = p * width, nj = std::min<std::int64_t>(width, cols - j0);
        double* d = dst + p * width * kd;
        for (std::int64_t k = 0; k < kd; ++k) {
            const double* row = src + k * ld + j0;
            std::copy(row, row + nj, d + k * width);
            std::fill(d + k * width + nj, d + (k + 1) * width, 0.0);
        }
    }
}

/// The same panels of width W from the transpose: column j of the packed
/// matrix is row j of src (cols x kd, row stride ld).
void pack_panels_transposed(double* dst, const double* src, std::int64_t ld, std::int64_t kd, std::int64_t cols,
                            std::int64_t width) {
    for (std::int64_t p = 0; p * width < cols; ++p) {
        const std::int64_t j0 = p * width, nj = std::min<std::int64_t>(width, cols - j0);
        double* d = dst + p * width * kd;
        if (nj < width) std::fill(d, d + width * kd, 0.0);
        for (std::int64_t j = 0; j < nj; ++j) {
            const double* row = src + (j0 + j) * ld;
            for (std::int64_t k = 0; k < kd; ++k) d[k * width + j] = row[k];
        }
    }
}

}  // namespace

void xty(std::int64_t kd, std::int64_t m, std::int64_t n, const double* x, std::int64_t ldx, const double* y,
         std::int64_t ldy, double* c, std::int64_t ldc, XtyShape shape, XtyWork& wk) {
    constexpr int MR = TileShape<double>::MR, NR = TileShape<double>::NR;
    const std::int64_t nq = (m + MR - 1) / MR, np = (n + NR - 1) / NR;
    double* ap = wk.pa.get<double>(static_cast<std::size_t>(std::max<std::int64_t>(1, nq * MR * kd)));
    double* bp = wk.pb.get<double>(static_cast<std::size_t>(std::max<std::int64_t>(1, np * NR * kd)));
    double* tile = wk.tile.get<double>(MR * NR);
    if (shape.x_trans)
        pack_panels_transposed(ap, x, ldx, kd, m, MR);
    else
        pack_panels(ap, x, ldx, kd, m, MR);
    pack_panels(bp, y, ldy, kd, n, NR);
    for (std::int64_t q = 0; q < nq; ++q) {
        const std::int64_t i0 = q * MR, ni = std::min<std::int64_t>(MR, m - i0);
        for (std::int64_t p = 0; p < np; ++p) {
            const std::int64_t j0 = p * NR, nj = std::min<std::int64_t>(NR, n - j0);
            if (shape.upper_only && j0 + nj <= i0) continue;  // the tile lies below the diagonal
            std::int64_t kb = 0, ke = kd;
            if (shape.x_lower) kb = std::max(kb, i0);
            if (shape.y_lower) kb = std::max(kb, j0);
            if (shape.x_upper) ke = std::min(ke, i0 + MR);
            kb = std::min(kb, ke);
            const double* a = ap + q * MR * kd + kb * MR;
            const double* b = bp + p * NR * kd + kb * NR;
            // A whole tile that needs no masking goes straight into C.
            if (ni == MR && nj == NR && (!shape.upper_only || j0 >= i0 + MR - 1)) {
                double* ct = c + i0 * ldc + j0;
                if (shape.subtract)
                    micro_kernel<double, true, TileOut::kSubtract>(ke - kb, a, 0, b, ct, ldc);
                else
                    micro_kernel<double, true, TileOut::kStore>(ke - kb, a, 0, b, ct, ldc);
                continue;
            }
            micro_kernel<double, true>(ke - kb, a, 0, b, tile);
            for (std::int64_t i = 0; i < ni; ++i) {
                double* ci = c + (i0 + i) * ldc + j0;
                const std::int64_t jb = shape.upper_only ? std::max<std::int64_t>(0, i0 + i - j0) : 0;
                const double* ti = tile + i * NR;
                if (shape.subtract)
                    for (std::int64_t j = jb; j < nj; ++j) ci[j] -= ti[j];
                else
                    for (std::int64_t j = jb; j < nj; ++j) ci[j] = ti[j];
            }
        }
    }
}

}  // namespace kmf
