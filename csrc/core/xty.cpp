#include "xty.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "kernels.h"
#include "pack.h"

namespace kmf {
namespace {

/// The k-major panels of width W of a row-major kd x cols matrix: panel p
/// holds columns [p W, p W + W) as dst[p W kd + k W + j], zero-padded past
/// cols. W is a compile-time constant so whole rows copy as a few vector moves.
template <int W>
void pack_panels(double* __restrict dst, const double* __restrict src, std::int64_t ld, std::int64_t kd,
                 std::int64_t cols) {
    for (std::int64_t p = 0; p * W < cols; ++p) {
        const std::int64_t j0 = p * W, nj = std::min<std::int64_t>(W, cols - j0);
        double* d = dst + p * W * kd;
        if (nj == W) {
            for (std::int64_t k = 0; k < kd; ++k) {
                const double* row = src + k * ld + j0;
                KMF_UNROLL for (int j = 0; j < W; ++j) d[k * W + j] = row[j];
            }
            continue;
        }
        for (std::int64_t k = 0; k < kd; ++k) {
            const double* row = src + k * ld + j0;
            for (std::int64_t j = 0; j < W; ++j) d[k * W + j] = j < nj ? row[j] : 0.0;
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
        transpose_into<double>(d, width, src + j0 * ld, ld, kd, nj);  // in square blocks of vector shuffles
    }
}

/// C (m x n) = or -= X^T Y from packed X (nq MR-panels of kd rows) and Y
/// panels of NR columns, panel p at bp + p * bstride (rows k at k * NR).
void xty_core(std::int64_t kd, std::int64_t m, std::int64_t n, const double* ap, const double* bp, std::int64_t bstride,
              double* c, std::int64_t ldc, XtyShape shape, double* tile) {
    constexpr int MR = TileShape<double>::MR, NR = TileShape<double>::NR;
    const std::int64_t nq = (m + MR - 1) / MR, np = (n + NR - 1) / NR;
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
            const double* b = bp + p * bstride + kb * NR;
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

/// The k-major panels of width W of a kd x cols operand (given as itself,
/// or with trans as its transpose) in buf.
template <int W>
const double* pack_operand(Scratch& buf, std::int64_t kd, std::int64_t cols, const double* src, std::int64_t ld,
                           bool trans) {
    const std::int64_t np = (cols + W - 1) / W;
    double* dst = buf.get<double>(static_cast<std::size_t>(std::max<std::int64_t>(1, np * W * kd)));
    if (trans)
        pack_panels_transposed(dst, src, ld, kd, cols, W);
    else
        pack_panels<W>(dst, src, ld, kd, cols);
    return dst;
}

}  // namespace

void xty(std::int64_t kd, std::int64_t m, std::int64_t n, const double* x, std::int64_t ldx, const double* y,
         std::int64_t ldy, double* c, std::int64_t ldc, XtyShape shape, XtyWork& wk) {
    constexpr int MR = TileShape<double>::MR, NR = TileShape<double>::NR;
    const double* ap = pack_operand<MR>(wk.pa, kd, m, x, ldx, shape.x_trans);
    const double* bp = pack_operand<NR>(wk.pb, kd, n, y, ldy, false);
    xty_core(kd, m, n, ap, bp, NR * kd, c, ldc, shape, wk.tile.get<double>(MR * NR));
}

void pack_y(std::int64_t kd, std::int64_t n, const double* y, std::int64_t ldy, bool trans, PackedY& out) {
    pack_operand<TileShape<double>::NR>(out.buf, kd, n, y, ldy, trans);
    out.kd = kd, out.n = n;
}

void xty_packed(std::int64_t m, const double* x, std::int64_t ldx, const PackedY& y, std::int64_t r0, std::int64_t c0,
                double* c, std::int64_t ldc, XtyShape shape, XtyWork& wk) {
    constexpr int MR = TileShape<double>::MR, NR = TileShape<double>::NR;
    if (c0 % NR != 0) throw std::logic_error("xty_packed: c0 is not a multiple of the panel width");
    const std::int64_t kd = y.kd - r0, n = y.n - c0;
    const double* ap = pack_operand<MR>(wk.pa, kd, m, x, ldx, shape.x_trans);
    const double* bp = y.buf.data<double>() + (c0 / NR) * NR * y.kd + r0 * NR;
    xty_core(kd, m, n, ap, bp, NR * y.kd, c, ldc, shape, wk.tile.get<double>(MR * NR));
}

}  // namespace kmf
