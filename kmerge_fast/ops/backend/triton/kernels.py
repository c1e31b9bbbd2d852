"""The Triton kernels of the ``triton`` backend (imported only when Triton is).

Every kernel reads its work from *tables*: one int64 row per work item with
the raw addresses (``tensor.data_ptr()``), sizes and element strides of the
factors it reads, plus a float table of coefficients. Addresses become typed
pointers in the kernel (``int.to(tl.pointer_type(DT))``), so one launch covers
every module and adapter pair of a batch, whatever their shapes, strides and
ranks (``DT``: the one element type of the launch; the Python layer converts
mixed-dtype batches to float32, which is exact for fp16 / bf16).

Layout flags: ``CONTIG`` / ``LAYOUT``: every factor of the launch has unit
column stride (row-major, what ``LoRA.load`` gives), so the kernel uses the
constant 1 for that stride; ``ALIGN``: the Python layer checked that every
address is 16-byte aligned and the other strides and sizes are multiples of 8
/ 16, and the kernel says so (``tl.multiple_of``) so that the loads become
16-byte vector / async copies (the addresses come from a table, so Triton
cannot know their alignment otherwise). Strided views run the same code with
their strides read from the table.

Accumulation: ``DOT_DT`` is the operand type of ``tl.dot`` and ``ACC_DT`` the
accumulator's. Fast Grams: fp16 / bf16 operands with a float32 accumulator
(exact products), float32 operands with ``input_precision="ieee"`` (no TF32).
Precise Grams and the truncation rebuild: float64 operands and accumulator
(products of fp32 / half values are exact in float64), like the C++ backend.

Under ``TRITON_INTERPRET=1`` the same kernels run on the host (numpy) on CPU
tensors: the addresses are host addresses of the tensors' storage.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...contract import COMBINE_MODES, KEEP_KINDS, SIGN_METHODS

# The contract's codes, as constants the kernels may read (Triton kernels only see constexpr globals).
_KEEP_MAGNITUDE = tl.constexpr(KEEP_KINDS["magnitude"])
_KEEP_DARE = tl.constexpr(KEEP_KINDS["dare"])
_MODE_SUM = tl.constexpr(COMBINE_MODES["sum"])
_SIGN_TOTAL = tl.constexpr(SIGN_METHODS["total"])

# Row widths of the work tables the Python layer pads to (the column layouts are in
# each kernel's docstring).
PAIR_COLS = 22  # pair_gram_kernel
DIFF_COLS = 16  # diff_stats_kernel (the first 16 columns of a pair row)


# ----------------------------------------------------------------- helpers
@triton.jit
def _cast_out(x, OUT_DT: tl.constexpr):
    """x rounded to nearest even in OUT_DT. bfloat16 goes through float32 and integer
    rounding (Triton's interpreter truncates, or loses the carry, in its own conversion)."""
    if OUT_DT == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x32 != x32, 0x7FC0, bits)  # NaN stays NaN
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(OUT_DT)


@triton.jit
def _xty_tile(x, sxk, sxr, rx, i0, y, syk, syr, ry, j0, K,
              BR: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr, ACC_DT: tl.constexpr):
    """The (BR, BR) tile X[:, i0:i0+BR]^T Y[:, j0:j0+BR], summed over the K rows.

    Element (k, c) of X is at ``x + k * sxk + c * sxr`` (Y likewise); columns
    past rx / ry and rows past K read as zero.
    """
    ri = i0 + tl.arange(0, BR)
    rj = j0 + tl.arange(0, BR)
    kk = tl.arange(0, BK)
    mi = (ri < rx)[:, None]
    mj = (rj < ry)[None, :]
    xp = x + ri[:, None] * sxr + kk[None, :] * sxk
    yp = y + kk[:, None] * syk + rj[None, :] * syr
    acc = tl.full((BR, BR), 0, ACC_DT)
    for k0 in range(0, K, BK):
        mk = kk < K - k0
        xt = tl.load(xp, mask=mi & mk[None, :], other=0.0)
        yv = tl.load(yp, mask=mk[:, None] & mj, other=0.0)
        # out_dtype: compiled tl.dot types its result float32 unless told (the interpreter does not check)
        acc = tl.dot(xt.to(DOT_DT), yv.to(DOT_DT), acc, input_precision="ieee", out_dtype=ACC_DT)
        xp += BK * sxk
        yp += BK * syk
    return acc


@triton.jit
def _bxa_tile(b, sb0, sb1, a, sa0, sa1, r, rows, cols, mr, mc,
              BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DOT_DT: tl.constexpr):
    """The float32 (BM, BN) tile (B A)[rows, cols] of one factor, summed over its r columns of B."""
    acc = tl.full((BM, BN), 0, tl.float32)
    cc = tl.arange(0, BR)
    bp = b + rows[:, None] * sb0 + cc[None, :] * sb1
    ap = a + cc[:, None] * sa0 + cols[None, :] * sa1
    for c0 in range(0, r, BR):
        mcs = cc < r - c0
        bt = tl.load(bp, mask=mr[:, None] & mcs[None, :], other=0.0)
        at = tl.load(ap, mask=mcs[:, None] & mc[None, :], other=0.0)
        acc = tl.dot(bt.to(DOT_DT), at.to(DOT_DT), acc, input_precision="ieee")
        bp += BR * sb1
        ap += BR * sa0
    return acc


@triton.jit
def _dare_keep(rows, cols, n_in, seed, thresh):
    """keep iff mix64(seed + (row * n_in + col + 1) * golden) >> 40 < thresh, all in uint64 (mod 2^64)."""
    idx = rows.to(tl.uint64)[:, None] * n_in.to(tl.uint64) + cols.to(tl.uint64)[None, :]
    x = seed.to(tl.uint64) + (idx + 1) * 0x9E3779B97F4A7C15
    x ^= x >> 33
    x *= 0xFF51AFD7ED558CCD
    x ^= x >> 33
    x *= 0xC4CEB9FE1A85EC53
    x ^= x >> 33
    return (x >> 40).to(tl.int64) < thresh


# ------------------------------------------------------------------- Grams
@triton.jit
def pair_gram_kernel(itab, ftab, out_ptr, DT: tl.constexpr, STORE: tl.constexpr, CONTIG: tl.constexpr,
                     ALIGN: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, DOT_DT: tl.constexpr,
                     ACC_DT: tl.constexpr):
    """One work item: factors x = (B_x, A_x) and y = (B_y, A_y) of one module.

    Row (int64): 0 B_x, 1 A_x, 2 B_y, 3 A_y (addresses), 4 r_x, 5 r_y, 6 n_out,
    7 n_in, 8-11 strides of B_x (row, col) and A_x (row, col), 12-15 those of y,
    then STORE=False: 16 output index, 17 mirror index (-1: none); STORE=True:
    16 / 17 addresses (float64) of the Gb block and of its mirror, 18 / 19 those
    of Ga, 20 leading dimension, 21 mirror mode (0 none, 1 write the
    transposed tile too, 2 diagonal block: upper tiles only, mirrored).
    ftab (float64): coefficient c of the item (Gb is scaled by it).

    STORE=False: out[idx] = c * sum((B_x^T B_y) * (A_x A_y^T)), the Frobenius
    inner product of the updates. STORE=True: writes c B_x^T B_y and A_x A_y^T.
    ALIGN (with CONTIG): every address is a multiple of 16 bytes, every row
    stride and rank of 8 elements, n_out and n_in of 16, so the loads can be
    vectorised (the masks are constant over 8 elements).
    """
    pid = tl.program_id(0)
    row = itab + pid.to(tl.int64) * 22
    bx = tl.load(row + 0).to(tl.pointer_type(DT))
    ax = tl.load(row + 1).to(tl.pointer_type(DT))
    by = tl.load(row + 2).to(tl.pointer_type(DT))
    ay = tl.load(row + 3).to(tl.pointer_type(DT))
    rx = tl.load(row + 4)
    ry = tl.load(row + 5)
    n_out = tl.load(row + 6)
    n_in = tl.load(row + 7)
    sbx0 = tl.load(row + 8)
    sax0 = tl.load(row + 10)
    sby0 = tl.load(row + 12)
    say0 = tl.load(row + 14)
    if CONTIG:
        sbx1 = 1
        sax1 = 1
        sby1 = 1
        say1 = 1
        if ALIGN:
            bx = tl.multiple_of(bx, 16)
            ax = tl.multiple_of(ax, 16)
            by = tl.multiple_of(by, 16)
            ay = tl.multiple_of(ay, 16)
            sbx0 = tl.multiple_of(sbx0, 8)
            sax0 = tl.multiple_of(sax0, 8)
            sby0 = tl.multiple_of(sby0, 8)
            say0 = tl.multiple_of(say0, 8)
            rx = tl.multiple_of(rx, 8)
            ry = tl.multiple_of(ry, 8)
            n_out = tl.multiple_of(n_out, 16)
            n_in = tl.multiple_of(n_in, 16)
    else:
        sbx1 = tl.load(row + 9)
        sax1 = tl.load(row + 11)
        sby1 = tl.load(row + 13)
        say1 = tl.load(row + 15)
    coef = tl.load(ftab + pid)
    if STORE:
        ob = tl.load(row + 16).to(tl.pointer_type(tl.float64))
        ob_m = tl.load(row + 17).to(tl.pointer_type(tl.float64))
        oa = tl.load(row + 18).to(tl.pointer_type(tl.float64))
        oa_m = tl.load(row + 19).to(tl.pointer_type(tl.float64))
        ld = tl.load(row + 20)
        mode = tl.load(row + 21)
        for i0 in range(0, rx, BR):
            for j0 in range(0, ry, BR):
                if (mode != 2) | (j0 >= i0):
                    # B: (k, c) at b + k * row stride + c * col stride; A^T: (k, c) = A[c, k].
                    gb = _xty_tile(bx, sbx0, sbx1, rx, i0, by, sby0, sby1, ry, j0, n_out, BR, BK, DOT_DT, ACC_DT)
                    ga = _xty_tile(ax, sax1, sax0, rx, i0, ay, say1, say0, ry, j0, n_in, BR, BK, DOT_DT, ACC_DT)
                    gb = gb.to(tl.float64) * coef
                    ga = ga.to(tl.float64)
                    ri = i0 + tl.arange(0, BR)
                    rj = j0 + tl.arange(0, BR)
                    m = (ri[:, None] < rx) & (rj[None, :] < ry)
                    tl.store(ob + ri[:, None] * ld + rj[None, :], gb, mask=m)
                    tl.store(oa + ri[:, None] * ld + rj[None, :], ga, mask=m)
                    if (mode == 1) | ((mode == 2) & (j0 > i0)):
                        tl.store(ob_m + rj[None, :] * ld + ri[:, None], gb, mask=m)
                        tl.store(oa_m + rj[None, :] * ld + ri[:, None], ga, mask=m)
    else:
        acc = tl.full((BR, BR), 0, tl.float64)
        for i0 in range(0, rx, BR):
            for j0 in range(0, ry, BR):
                gb = _xty_tile(bx, sbx0, sbx1, rx, i0, by, sby0, sby1, ry, j0, n_out, BR, BK, DOT_DT, ACC_DT)
                ga = _xty_tile(ax, sax1, sax0, rx, i0, ay, say1, say0, ry, j0, n_in, BR, BK, DOT_DT, ACC_DT)
                acc += gb.to(tl.float64) * ga.to(tl.float64)
        total = tl.sum(acc) * coef
        tl.store(out_ptr + tl.load(row + 16), total)
        mirror = tl.load(row + 17)
        if mirror >= 0:
            tl.store(out_ptr + mirror, total)


# ------------------------------------------------------------------ rebuild
@triton.jit
def apply_kernel(itab, btab, bftab, DT: tl.constexpr, OUT_DT: tl.constexpr, LAYOUT: tl.constexpr,
                 ALIGN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    """out (K x rank) = [c_1 X_1, ..., c_k X_k] T in float64, stored in OUT_DT.

    Item row: 0 K, 1 number of blocks, 2 first block row in btab, 3 T address
    (float64, R x rank row-major), 4 rank, 5 out address, 6 / 7 out strides
    (along K, along rank), 8 unused. Block row: 0 X_i address, 1 r_i, 2 / 3
    strides (along K, along r), 4 first row of the block in T. bftab: c_i.
    LAYOUT 1: unit stride along r of every X_i and along rank of out (B' from
    row-major B's); 2: along K of both (A'^T from row-major A's); 0: any.
    ALIGN (LAYOUT 1 / 2): addresses are multiples of 16 bytes, the other
    strides, r_i and rank of 8 elements, K of 16. Grid: (items, K tiles, rank tiles); tiles past an
    item's K do nothing.
    """
    pid = tl.program_id(0)
    pk = tl.program_id(1)
    pn = tl.program_id(2)
    row = itab + pid.to(tl.int64) * 9
    K = tl.load(row + 0)
    if pk * BK < K:
        n_blocks = tl.load(row + 1)
        b0 = tl.load(row + 2)
        t_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float64))
        rank = tl.load(row + 4)
        out = tl.load(row + 5).to(tl.pointer_type(OUT_DT))
        so0 = tl.load(row + 6)
        so1 = tl.load(row + 7)
        if LAYOUT == 1:
            so1 = 1
            if ALIGN:
                out = tl.multiple_of(out, 16)
                so0 = tl.multiple_of(so0, 8)
        if LAYOUT == 2:
            so0 = 1
            if ALIGN:
                out = tl.multiple_of(out, 16)
                so1 = tl.multiple_of(so1, 8)
        if ALIGN:
            K = tl.multiple_of(K, 16)
            rank = tl.multiple_of(rank, 8)
        ks = pk * BK + tl.arange(0, BK)
        ns = pn * BN + tl.arange(0, BN)
        cc = tl.arange(0, BR)
        mk = ks < K
        mn = ns < rank
        acc = tl.full((BK, BN), 0, tl.float64)
        for b in range(0, n_blocks):
            brow = btab + (b0 + b) * 5
            x = tl.load(brow + 0).to(tl.pointer_type(DT))
            r = tl.load(brow + 1)
            s0 = tl.load(brow + 2)
            s1 = tl.load(brow + 3)
            if LAYOUT == 1:
                s1 = 1
                if ALIGN:
                    x = tl.multiple_of(x, 16)
                    s0 = tl.multiple_of(s0, 8)
            if LAYOUT == 2:
                s0 = 1
                if ALIGN:
                    x = tl.multiple_of(x, 16)
                    s1 = tl.multiple_of(s1, 8)
            if ALIGN:
                r = tl.multiple_of(r, 8)
            t0 = tl.load(brow + 4)
            coef = tl.load(bftab + b0 + b)
            part = tl.full((BK, BN), 0, tl.float64)
            xp = x + ks[:, None] * s0 + cc[None, :] * s1
            tp = t_ptr + (t0 + cc)[:, None] * rank + ns[None, :]
            for c0 in range(0, r, BR):
                mc = cc < r - c0
                xt = tl.load(xp, mask=mk[:, None] & mc[None, :], other=0.0)
                tt = tl.load(tp, mask=mc[:, None] & mn[None, :], other=0.0)
                part = tl.dot(xt.to(tl.float64), tt, part, input_precision="ieee", out_dtype=tl.float64)
                xp += BR * s1
                tp += BR * rank
            acc += coef * part
        tl.store(out + ks[:, None] * so0 + ns[None, :] * so1, _cast_out(acc, OUT_DT), mask=mk[:, None] & mn[None, :])


# -------------------------------------------------------------------- copy
@triton.jit
def copy_kernel(itab, ftab, DT: tl.constexpr, OUT_DT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dst = c * src (computed in float32, stored in OUT_DT), one item per (src, dst) matrix.

    Row: 0 src, 1 dst (addresses), 2 rows, 3 cols, 4 / 5 src strides, 6 / 7 dst
    strides. Grid: (items, tiles); tiles past an item's size do nothing.
    """
    pid = tl.program_id(0)
    pt = tl.program_id(1)
    row = itab + pid.to(tl.int64) * 8
    rows = tl.load(row + 2)
    cols = tl.load(row + 3)
    n_tn = (cols + BN - 1) // BN
    if pt < (rows + BM - 1) // BM * n_tn:
        src = tl.load(row + 0).to(tl.pointer_type(DT))
        dst = tl.load(row + 1).to(tl.pointer_type(OUT_DT))
        ri = (pt // n_tn) * BM + tl.arange(0, BM)
        ci = (pt % n_tn) * BN + tl.arange(0, BN)
        m = (ri[:, None] < rows) & (ci[None, :] < cols)
        x = tl.load(src + ri[:, None] * tl.load(row + 4) + ci[None, :] * tl.load(row + 5), mask=m, other=0.0)
        coef = tl.load(ftab + pid)
        tl.store(dst + ri[:, None] * tl.load(row + 6) + ci[None, :] * tl.load(row + 7),
                 _cast_out(x.to(tl.float32) * coef, OUT_DT), mask=m)


@triton.jit
def max_abs_kernel(itab, out_ptr, DT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """max |x| of one 2-D matrix per program, in float32 (exact: abs and max do not round); NaN
    when the matrix holds NaN (tracked on its own: a compiled maximum drops NaN operands).

    Row: 0 address, 1 rows, 2 cols, 3 / 4 strides. Grid: (items,).
    """
    pid = tl.program_id(0)
    row = itab + pid.to(tl.int64) * 5
    src = tl.load(row + 0).to(tl.pointer_type(DT))
    rows = tl.load(row + 1)
    cols = tl.load(row + 2)
    s0 = tl.load(row + 3)
    s1 = tl.load(row + 4)
    n_tn = (cols + BN - 1) // BN
    n_tiles = (rows + BM - 1) // BM * n_tn
    peak = tl.full((BM, BN), 0, tl.float32)
    nan = tl.full((BM, BN), 0, tl.int32)
    for t in range(0, n_tiles):
        ri = (t // n_tn) * BM + tl.arange(0, BM)
        ci = (t % n_tn) * BN + tl.arange(0, BN)
        m = (ri[:, None] < rows) & (ci[None, :] < cols)
        x = tl.load(src + ri[:, None] * s0 + ci[None, :] * s1, mask=m, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.abs(x))
        nan = tl.maximum(nan, (x != x).to(tl.int32))
    tl.store(out_ptr + pid, tl.where(tl.max(nan) > 0, float("nan"), tl.max(peak)))


# ------------------------------------------------------------------- dense
@triton.jit
def _kept_term(tab, ftab, t, rows, cols, mr, mc, n_in,
               DT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DOT_DT: tl.constexpr):
    """(p, w): term t's tile of coef * B A after its keep rule, and its weight.

    Term row: 0 B, 1 A (addresses), 2 r, 3 / 4 B strides, 5 / 6 A strides,
    7 keep kind (the contract's KEEP_KINDS), 8 DARE seed (uint64 bits), 9
    DARE threshold (24 bits). ftab (float32, 4 per term): coef, weight, tau, density.
    """
    row = tab + t * 10
    fr = ftab + t * 4
    b = tl.load(row + 0).to(tl.pointer_type(DT))
    a = tl.load(row + 1).to(tl.pointer_type(DT))
    r = tl.load(row + 2)
    v = _bxa_tile(b, tl.load(row + 3), tl.load(row + 4), a, tl.load(row + 5), tl.load(row + 6), r,
                  rows, cols, mr, mc, BM, BN, BR, DOT_DT)
    v = tl.load(fr + 0) * v
    kind = tl.load(row + 7)
    p = v
    if kind == _KEEP_MAGNITUDE:  # magnitude: |v| >= tau (NaN kept, so it is not silently dropped)
        tau = tl.load(fr + 2)
        p = tl.where((tl.abs(v) >= tau) | (v != v), v, 0.0)
    if kind == _KEEP_DARE:  # DARE: kept with probability density, rescaled by 1 / density
        density = tl.load(fr + 3)
        thresh = tl.load(row + 9)
        if thresh >= 16777216:  # keeps everything: no hashing
            p = v / density
        else:
            keep = _dare_keep(rows, cols, n_in, tl.load(row + 8), thresh)
            p = tl.where(keep, v / density, 0.0)
    return p, tl.load(fr + 1)


@triton.jit
def dense_combine_kernel(tab, ftab, out_ptr, n_terms, n_out, n_in, so0, so1, DT: tl.constexpr,
                         MODE: tl.constexpr, SIGN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BR: tl.constexpr, DOT_DT: tl.constexpr):
    """One (BM, BN) tile of the combined dense update; each term's tile is formed in
    registers (twice for TIES: the election, then the merge), never in memory.

    MODE SUM: sum_i w_i p_i. MODE TIES: elect = +1 if sum_i p_i >= 0
    (SIGN total) or sum_i sign(p_i) >= 0 (SIGN frequency) else -1;
    sum of w_i p_i over the terms whose sign is elect, over their count (>= 1);
    NaN anywhere gives NaN.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mr = rows < n_out
    mc = cols < n_in
    acc = tl.full((BM, BN), 0, tl.float32)
    if MODE == _MODE_SUM:
        for t in range(0, n_terms):
            p, w = _kept_term(tab, ftab, t, rows, cols, mr, mc, n_in, DT, BM, BN, BR, DOT_DT)
            acc += w * p
    else:
        votes = tl.full((BM, BN), 0, tl.float32)
        for t in range(0, n_terms):
            p, w = _kept_term(tab, ftab, t, rows, cols, mr, mc, n_in, DT, BM, BN, BR, DOT_DT)
            if SIGN == _SIGN_TOTAL:
                votes += p
            else:
                votes += tl.where(p > 0, 1.0, tl.where(p < 0, -1.0, 0.0))
        elect = tl.where(votes >= 0, 1.0, -1.0)
        count = tl.full((BM, BN), 0, tl.float32)
        nans = tl.full((BM, BN), 0, tl.int32)
        for t in range(0, n_terms):
            p, w = _kept_term(tab, ftab, t, rows, cols, mr, mc, n_in, DT, BM, BN, BR, DOT_DT)
            agree = tl.where(p > 0, 1.0, tl.where(p < 0, -1.0, 0.0)) == elect
            acc += tl.where(agree, w * p, 0.0)
            count += agree.to(tl.float32)
            nans += (p != p).to(tl.int32)
        acc = acc / tl.maximum(count, 1.0)
        acc = tl.where(nans > 0, float("nan"), acc)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * so0 + cols[None, :] * so1, acc, mask=mr[:, None] & mc[None, :])


@triton.jit
def diff_stats_kernel(tab, ftab, sum_ptr, max_ptr, SPLIT: tl.constexpr, DT: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DOT_DT: tl.constexpr):
    """Partial [sum |D|, max |D|] of D = c_x B_x A_x - c_y B_y A_y over the tiles
    split, split + SPLIT, ...; each term's tile is accumulated on its own, so
    identical updates cancel exactly. D is never stored.

    Row: 0 B_x, 1 A_x, 2 B_y, 3 A_y (addresses), 4 r_x, 5 r_y, 6 n_out, 7 n_in,
    8-11 strides of B_x, A_x, 12-15 of B_y, A_y. ftab (float32): c_x, c_y.
    Outputs at [item * SPLIT + split] (float64 sum, float32 max).
    """
    pid = tl.program_id(0)
    ps = tl.program_id(1)
    row = tab + pid.to(tl.int64) * 16
    bx = tl.load(row + 0).to(tl.pointer_type(DT))
    ax = tl.load(row + 1).to(tl.pointer_type(DT))
    by = tl.load(row + 2).to(tl.pointer_type(DT))
    ay = tl.load(row + 3).to(tl.pointer_type(DT))
    rx = tl.load(row + 4)
    ry = tl.load(row + 5)
    n_out = tl.load(row + 6)
    n_in = tl.load(row + 7)
    sbx0 = tl.load(row + 8)
    sbx1 = tl.load(row + 9)
    sax0 = tl.load(row + 10)
    sax1 = tl.load(row + 11)
    sby0 = tl.load(row + 12)
    sby1 = tl.load(row + 13)
    say0 = tl.load(row + 14)
    say1 = tl.load(row + 15)
    cx = tl.load(ftab + pid * 2)
    cy = tl.load(ftab + pid * 2 + 1)
    n_tn = (n_in + BN - 1) // BN
    n_tiles = (n_out + BM - 1) // BM * n_tn
    total = tl.full((BM, BN), 0, tl.float64)
    peak = tl.full((BM, BN), 0, tl.float32)
    for t in range(ps, n_tiles, SPLIT):
        rows = (t // n_tn) * BM + tl.arange(0, BM)
        cols = (t % n_tn) * BN + tl.arange(0, BN)
        mr = rows < n_out
        mc = cols < n_in
        tx = _bxa_tile(bx, sbx0, sbx1, ax, sax0, sax1, rx, rows, cols, mr, mc, BM, BN, BR, DOT_DT)
        ty = _bxa_tile(by, sby0, sby1, ay, say0, say1, ry, rows, cols, mr, mc, BM, BN, BR, DOT_DT)
        d = tl.abs(cx * tx - cy * ty)
        total += d.to(tl.float64)
        peak = tl.maximum(peak, d)
    tl.store(sum_ptr + pid * SPLIT + ps, tl.sum(total))
    tl.store(max_ptr + pid * SPLIT + ps, tl.max(peak))


# ------------------------------------------------------------- interpreter
#: Whether these kernels were created for Triton's interpreter (TRITON_INTERPRET=1 when
#: Triton's ``jit`` ran): they then run on the host, on CPU tensors only.
INTERPRETED = type(pair_gram_kernel).__name__ == "InterpretedFunction"

if INTERPRETED:
    # Triton's interpreter re-patches triton.language on every device-function
    # call (milliseconds each, most of the interpreted run time); the kernel's
    # own launch has patched it already, so the kernels call the helpers'
    # rewritten Python code directly. Numerics are unchanged.
    def _direct(helper):
        rewrite = getattr(helper, "rewrite", None)
        if rewrite is None:  # another interpreter version: keep its own call path
            return helper

        def call(*args, **kwargs):
            return rewrite()(*args, **kwargs)

        return call

    for _name in ("_cast_out", "_xty_tile", "_bxa_tile", "_dare_keep", "_kept_term"):
        globals()[_name] = _direct(globals()[_name])
    del _name
