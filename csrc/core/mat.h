// Strided matrix descriptions shared by every kernel: raw pointers, sizes and
// strides, nothing else (the caller passes views without copying).
#pragma once

#include <cstdint>
#include <vector>

#include "dtype.h"

namespace kmf {

/// A rows x cols matrix: element (i, j) is at ptr + (i * rs + j * cs) * elem_size,
/// and its value is multiplied by coef when read.
struct Mat {
    const void* ptr = nullptr;
    int dtype = kF32;
    std::int64_t rows = 0, cols = 0;
    std::int64_t rs = 0, cs = 0;  // strides in elements (may be any sign)
    double coef = 1.0;

    /// Address of element (i, j).
    const void* at(std::int64_t i, std::int64_t j) const {
        return static_cast<const char*>(ptr) + (i * rs + j * cs) * elem_size(dtype);
    }
    void* at_mut(std::int64_t i, std::int64_t j) const { return const_cast<void*>(at(i, j)); }
};

/// True when an elementwise pass from src to dst (same shape) should run along
/// columns: dst is contiguous along columns and not along rows (else the same
/// for src), so the inner loop is unit-stride where it matters most.
inline bool walk_by_columns(const Mat& dst, const Mat& src) {
    return !(dst.cs == 1 || (dst.rs != 1 && src.cs == 1)) && (dst.rs == 1 || src.rs == 1);
}

/// Blocks with equal row counts, concatenated along columns: rows x sum(cols).
struct Stack {
    std::vector<Mat> blocks;
    std::vector<std::int64_t> col0;  // first stacked column of each block
    std::int64_t rows = 0, cols = 0;

    Stack() = default;
    explicit Stack(std::vector<Mat> b) : blocks(std::move(b)) {
        rows = blocks.empty() ? 0 : blocks[0].rows;
        col0.reserve(blocks.size());
        for (const Mat& m : blocks) {
            col0.push_back(cols);
            cols += m.cols;
        }
    }

    /// True when every block has unit column stride (rows are contiguous runs).
    bool rows_contiguous() const {
        for (const Mat& m : blocks)
            if (m.cs != 1 && m.cols > 1) return false;
        return true;
    }
    /// True when every block has unit row stride (columns are contiguous runs).
    bool cols_contiguous() const {
        for (const Mat& m : blocks)
            if (m.rs != 1 && m.rows > 1) return false;
        return true;
    }
};

}  // namespace kmf
