"""Raw descriptions of tensors for ``kmerge_fast._C``, and the layouts they describe (test_cpp_*.py, test_triton.py).

Mat = (ptr, dtype code, rows, cols, row_stride, col_stride, coef): the format
``kmerge_fast``'s C++ backend builds; the codes are written out here so the
tests do not take them from the code under test.
"""

from __future__ import annotations

import torch

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def mat(t: torch.Tensor, coef: float = 1.0) -> tuple:
    """Description of a 2-D tensor or view (its strides are passed as they are)."""
    rows, cols = t.shape
    rs, cs = t.stride()
    return (t.data_ptr(), CODES[t.dtype], rows, cols, rs, cs, float(coef))


def make(rows: int, cols: int, dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A rows x cols tensor (view) in one of the layouts the Python layer passes.

    row: row-major (B factors); col: a transposed view of a row-major
    (cols x rows) tensor, as A^T is passed; strided: every other column and row
    of a bigger tensor (neither stride is 1).
    """
    if layout == "row":
        return torch.randn(rows, cols, generator=gen).to(dtype)
    if layout == "col":
        return torch.randn(cols, rows, generator=gen).to(dtype).T
    if layout == "strided":
        return torch.randn(2 * rows + 1, 2 * cols, generator=gen).to(dtype)[1::2, ::2]
    raise AssertionError(layout)
