// Dense-domain merges streamed tile by tile, and the magnitude threshold by
// radix select. Same scheme as dense_stats: a work item is a block of M (at
// most kRowBlock x kColBlock); it packs each term's B rows (the micro-kernel's
// a operand: MR-row groups, column panels or k-major like dense_stats) and A
// columns (its b operand: NR-wide row panels) into per-worker scratch, then
// runs the shared micro-kernel once per term for every MR x NR tile of the
// block. The k term tiles (k * MR * NR values, in L1) get their keep rules
// applied in place and are combined into one tile of M, which is stored.
// Nothing of size out x in is allocated.
//
// Every element's value depends only on its term's packed factors and the
// micro-kernel (never on the block or worker that computed it), so results do
// not depend on the thread count, and abs_kth sees exactly the values the merge
// prunes (it uses the same pack_term / term_tile).
#include "dense_merge.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "pack.h"
#include "parallel.h"

namespace kmf {
namespace {

constexpr std::int64_t kRowBlock = 256;  // rows of M per work item
constexpr std::int64_t kColBlock = 256;  // columns of M per work item

/// One term's factors as single-block stacks (what the packing helpers read).
struct Factor {
    Stack b, a;           // B: out x r, A: r x in
    bool kmajor = false;  // B read by columns (a transposed view): k-major a panels
};

Factor make_factor(const Mat& b, const Mat& a) {
    Factor f;
    f.b = Stack(std::vector<Mat>{b});
    f.a = Stack(std::vector<Mat>{a});
    f.kmajor = !f.b.rows_contiguous() && f.b.cols_contiguous();
    return f;
}

/// A term packed for one block [p0, p1) x [c0, c1) of M.
struct TermPack {
    Scratch a, b;
    std::int64_t r = 0, ldr = 1;
    bool kmajor = false;
};

/// a: group q (rows p0 + q * MR ...) at a + q * MR * ldr, laid out a[i * ldr + k]
///    (or a[k * MR + i] when k-major); rows past the block are zero.
/// b: panel p (columns c0 + p * NR ...) at b + p * NR * r, laid out b[k * NR + j];
///    columns past the block are zero.
template <typename T>
void pack_term(const Factor& f, std::int64_t p0, std::int64_t p1, std::int64_t c0, std::int64_t c1, TermPack& tp,
               Scratch& tmp) {
    constexpr int MR = TileShape<T>::MR, NR = TileShape<T>::NR;
    const std::int64_t R = f.b.cols, ldr = std::max<std::int64_t>(R, 1);
    const std::int64_t na = (p1 - p0 + MR - 1) / MR, nb = (c1 - c0 + NR - 1) / NR;
    tp.r = R, tp.ldr = ldr, tp.kmajor = f.kmajor;
    T* ap = tp.a.get<T>(static_cast<std::size_t>(na * MR * ldr));
    for (std::int64_t q = 0; q < na; ++q) {
        const std::int64_t i0 = p0 + q * MR, ni = std::min<std::int64_t>(MR, p1 - i0);
        T* d = ap + q * MR * ldr;
        if (f.kmajor) {
            pack_cols<T>(d, MR, f.b, i0, ni, 0, R, R, MR);
        } else {
            pack_row_panels<T>(d, ldr, f.b, i0, ni, 0, R, tmp);
            std::fill(d + ni * ldr, d + MR * ldr, T(0));
        }
    }
    T* bp = tp.b.get<T>(static_cast<std::size_t>(std::max<std::int64_t>(1, nb * NR * R)));
    pack_row_panels<T, NR>(bp, NR, f.a, 0, R, c0, c1 - c0, tmp);
}

/// tile[i * NR + j] = t(row group q, column panel p) of a packed term.
template <typename T>
inline void term_tile(const TermPack& tp, std::int64_t q, std::int64_t p, T* tile) {
    constexpr int MR = TileShape<T>::MR, NR = TileShape<T>::NR;
    const T* a = tp.a.data<T>() + q * MR * tp.ldr;
    const T* b = tp.b.data<T>() + p * NR * tp.r;
    if (tp.kmajor)
        micro_kernel<T, true>(tp.r, a, 0, b, tile);
    else
        micro_kernel<T, false>(tp.r, a, tp.ldr, b, tile);
}

/// Work items: blocks of an P x Q matrix, row-major order.
struct Block {
    std::int64_t p0, p1, c0, c1;
};

std::vector<Block> blocks_of(std::int64_t P, std::int64_t Q) {
    std::vector<Block> out;
    for (std::int64_t p0 = 0; p0 < P; p0 += kRowBlock)
        for (std::int64_t c0 = 0; c0 < Q; c0 += kColBlock)
            out.push_back({p0, std::min(P, p0 + kRowBlock), c0, std::min(Q, c0 + kColBlock)});
    return out;
}

// ------------------------------------------------------------------ merge
/// A term's rule with its parameters in the accumulation type.
template <typename T>
struct Rule {
    int keep = kKeepAll;
    T weight = 1, tau = 0, density = 1;
    std::uint64_t seed = 0, thresh = 0;
};

/// The smallest T >= tau (so |v| >= result iff |v| >= tau for every T v); NaN stays NaN.
template <typename T>
T tau_up(double tau) {
    T t = static_cast<T>(tau);
    if (t == t && static_cast<double>(t) < tau) t = std::nextafter(t, std::numeric_limits<T>::infinity());
    return t;
}

/// m[j] = keep ? 1 : 0 for the NR consecutive elements whose hash inputs are
/// x0 + j * golden: the 64-bit hash on vectors of LU lanes, the 0 / 1 result
/// narrowed to 32 bits and converted (both native on AVX2, unlike 64-bit ones).
template <typename T>
inline void dare_row(T* __restrict m, std::uint64_t x0, std::uint64_t thresh) {
    constexpr int NR = TileShape<T>::NR, LU = kVecBytes / 8;
    typedef std::uint64_t VU __attribute__((vector_size(kVecBytes)));
    typedef std::int32_t VI32 __attribute__((vector_size(kVecBytes / 2)));
    typedef T VT __attribute__((vector_size(LU * sizeof(T))));
    static_assert(NR % LU == 0, "tile width must be a multiple of the 64-bit lanes");
    VU step = VU{}, lane = VU{};
    for (int l = 0; l < LU; ++l) lane[l] = static_cast<std::uint64_t>(l) * kDareGolden;
    step += static_cast<std::uint64_t>(LU) * kDareGolden;
    VU x = lane + x0;
    const VU th = VU{} + thresh;
    KMF_UNROLL for (int j = 0; j < NR; j += LU, x += step) {
        VU h = x;
        h ^= h >> 33;
        h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33;
        h *= 0xc4ceb9fe1a85ec53ULL;
        // The final h ^= h >> 33 leaves bits 40..63 unchanged (they would mix in
        // bits 73.. which are zero), so it is skipped: h >> 40 is the same.
        // (h >> 40) and thresh24 are < 2^25: the signed compare AVX2 has is exact.
        typedef std::int64_t VS __attribute__((vector_size(kVecBytes)));
        const VS keep = reinterpret_cast<VS>(h >> 40) < reinterpret_cast<VS>(th);  // -1 / 0
        const VI32 k32 = __builtin_convertvector(-keep, VI32);
        vstore(m + j, __builtin_convertvector(k32, VT));
    }
}

/// Applies a term's keep rule to its tile in place (p = v * mask [/ density]).
/// (gi, gj): M coordinates of the tile's first element; rows >= ni are padding.
template <typename T>
inline void keep_tile(const Rule<T>& r, T* __restrict tile, std::int64_t gi, std::int64_t gj, std::int64_t ni,
                      std::int64_t in, T* __restrict mask) {
    using V = typename Simd<T>::V;
    constexpr int MR = TileShape<T>::MR, NR = TileShape<T>::NR, L = TileShape<T>::L, E = MR * NR;
    const V one = V{} + T(1), zero = V{};
    if (r.keep == kKeepMagnitude) {
        const V tau = V{} + r.tau;
        KMF_UNROLL for (int e = 0; e < E; e += L) {
            const V v = vload<V>(tile + e);
            const V a = v < 0 ? -v : v;
            vstore(tile + e, v * (a >= tau ? one : zero));  // |NaN| >= tau fails: NaN * 0 stays NaN
        }
    } else if (r.keep == kKeepDare) {
        const V d = V{} + r.density;
        if (r.thresh >= (std::uint64_t(1) << 24)) {  // keeps everything: no hashing
            KMF_UNROLL for (int e = 0; e < E; e += L) vstore(tile + e, vload<V>(tile + e) / d);
            return;
        }
        for (std::int64_t i = 0; i < MR; ++i) {
            T* m = mask + i * NR;
            if (i >= ni) {
                std::fill(m, m + NR, T(0));
                continue;
            }
            // hash input of element (gi + i, gj): seed + (idx + 1) * golden, idx = row * in + col (mod 2^64)
            const std::uint64_t idx = static_cast<std::uint64_t>(gi + i) * static_cast<std::uint64_t>(in) +
                                      static_cast<std::uint64_t>(gj);
            dare_row<T>(m, r.seed + (idx + 1u) * kDareGolden, r.thresh);
        }
        KMF_UNROLL for (int e = 0; e < E; e += L) vstore(tile + e, (vload<V>(tile + e) * vload<V>(mask + e)) / d);
    }
}

/// res = combination of the k kept tiles (tiles[t * E + e]), elementwise.
template <typename T, int Mode, int Sign>
void combine_tile(const T* __restrict tiles, std::size_t k, const T* __restrict w, T* __restrict res) {
    using V = typename Simd<T>::V;
    constexpr int MR = TileShape<T>::MR, NR = TileShape<T>::NR, L = TileShape<T>::L, E = MR * NR;
    const V one = V{} + T(1), zero = V{};
    for (int e = 0; e < E; e += L) {
        if (Mode == kCombineSum) {
            V acc = w[0] * vload<V>(tiles + e);
            for (std::size_t t = 1; t < k; ++t) acc += w[t] * vload<V>(tiles + t * E + e);
            vstore(res + e, acc);
            continue;
        }
        // ties: elect with the unweighted p_i, merge the weighted ones.
        V s = zero;
        for (std::size_t t = 0; t < k; ++t) {
            const V p = vload<V>(tiles + t * E + e);
            if (Sign == kSignTotal)
                s += p;
            else
                s += (p > 0 ? one : zero) - (p < 0 ? one : zero);
        }
        const V elect = s >= 0 ? one : -one;  // NaN: -1 (the NaN term still poisons acc below)
        V acc = zero, cnt = zero;
        for (std::size_t t = 0; t < k; ++t) {
            const V p = vload<V>(tiles + t * E + e);
            const V sg = (p > 0 ? one : zero) - (p < 0 ? one : zero);  // sign(NaN) = 0: never elected
            const V m = sg == elect ? one : zero;
            acc += (w[t] * p) * m;  // masked by multiplication, as peft does
            cnt += m;
        }
        vstore(res + e, acc / (cnt < one ? one : cnt));
    }
}

template <typename T>
using CombineFn = void (*)(const T*, std::size_t, const T*, T*);

template <typename T>
CombineFn<T> pick_combine(int mode, int sign) {
    if (mode == kCombineSum) return &combine_tile<T, kCombineSum, kSignTotal>;
    return sign == kSignFrequency ? &combine_tile<T, kCombineTies, kSignFrequency> : &combine_tile<T, kCombineTies, kSignTotal>;
}

struct MergeWorker {
    std::vector<TermPack> packs;
    Scratch tmp, tiles, mask, res;
};

template <typename T>
void merge_block(const std::vector<Factor>& f, const std::vector<Rule<T>>& rules, const std::vector<T>& w, const Mat& out,
                 CombineFn<T> combine, const Block& blk, MergeWorker& wk) {
    constexpr int MR = TileShape<T>::MR, NR = TileShape<T>::NR, E = MR * NR;
    const std::size_t k = f.size();
    const std::int64_t in = out.cols;
    if (wk.packs.size() < k) wk.packs.resize(k);
    for (std::size_t t = 0; t < k; ++t) pack_term<T>(f[t], blk.p0, blk.p1, blk.c0, blk.c1, wk.packs[t], wk.tmp);
    T* tiles = wk.tiles.get<T>(k * E);
    T* mask = wk.mask.get<T>(E);
    T* res = wk.res.get<T>(E);
    const bool direct = out.cs == 1 && out.dtype == (sizeof(T) == 8 ? kF64 : kF32);
    const std::int64_t na = (blk.p1 - blk.p0 + MR - 1) / MR, nb = (blk.c1 - blk.c0 + NR - 1) / NR;
    for (std::int64_t p = 0; p < nb; ++p) {
        const std::int64_t gj = blk.c0 + p * NR, nj = std::min<std::int64_t>(NR, blk.c1 - gj);
        for (std::int64_t q = 0; q < na; ++q) {
            const std::int64_t gi = blk.p0 + q * MR, ni = std::min<std::int64_t>(MR, blk.p1 - gi);
            for (std::size_t t = 0; t < k; ++t) {
                T* tile = tiles + t * E;
                term_tile<T>(wk.packs[t], q, p, tile);
                keep_tile<T>(rules[t], tile, gi, gj, ni, in, mask);
            }
            combine(tiles, k, w.data(), res);
            for (std::int64_t i = 0; i < ni; ++i) {
                if (direct)
                    std::memcpy(out.at_mut(gi + i, gj), res + i * NR, sizeof(T) * static_cast<std::size_t>(nj));
                else
                    store_run<T>(out.at_mut(gi + i, gj), out.dtype, nj, out.cs, res + i * NR);
            }
        }
    }
}

template <typename T>
void merge_impl(const std::vector<MergeTerm>& terms, const Mat& out, int mode, int sign, int threads) {
    std::vector<Factor> f;
    std::vector<Rule<T>> rules;
    std::vector<T> w;
    double work_per_elem = 0.0;
    for (const MergeTerm& t : terms) {
        f.push_back(make_factor(t.b, t.a));
        Rule<T> r;
        r.keep = t.keep;
        r.weight = static_cast<T>(t.weight);
        r.tau = tau_up<T>(t.tau);
        r.density = static_cast<T>(t.density);
        r.seed = t.seed;
        r.thresh = t.thresh24;
        rules.push_back(r);
        w.push_back(r.weight);
        work_per_elem += double(t.b.cols) + 4.0 + (t.keep == kKeepDare ? 24.0 : 0.0);
    }
    const std::vector<Block> blocks = blocks_of(out.rows, out.cols);
    threads = threads_for_work(threads, work_per_elem * double(out.rows) * double(out.cols));
    std::vector<MergeWorker> wk(static_cast<std::size_t>(num_workers(threads, static_cast<std::int64_t>(blocks.size()))));
    const CombineFn<T> combine = pick_combine<T>(mode, sign);
    parallel_for(static_cast<std::int64_t>(blocks.size()), threads, [&](std::int64_t n, int wi) {
        merge_block<T>(f, rules, w, out, combine, blocks[static_cast<std::size_t>(n)], wk[static_cast<std::size_t>(wi)]);
    });
}

// ------------------------------------------------------------------ abs_kth
template <typename T>
struct BitsOf;
template <>
struct BitsOf<float> {
    using U = std::uint32_t;
    static constexpr U kAbs = 0x7fffffffu;
};
template <>
struct BitsOf<double> {
    using U = std::uint64_t;
    static constexpr U kAbs = 0x7fffffffffffffffull;
};

constexpr std::int64_t kBuckets = 1 << 16;

struct KthWorker {
    TermPack pack;
    Scratch tmp, tile;
    std::vector<std::uint64_t> hist;
};

/// Histograms bits [shift, shift + 16) of the |t| bit patterns whose higher bits
/// (above shift + 16) equal prefix. The patterns of non-negative floats order
/// like the floats, NaNs above +inf.
template <typename T>
void hist_block(const Factor& f, const Block& blk, int shift, typename BitsOf<T>::U prefix, KthWorker& wk) {
    using U = typename BitsOf<T>::U;
    constexpr int MR = TileShape<T>::MR, NR = TileShape<T>::NR;
    pack_term<T>(f, blk.p0, blk.p1, blk.c0, blk.c1, wk.pack, wk.tmp);
    T* tile = wk.tile.get<T>(MR * NR);
    std::uint64_t* h = wk.hist.data();
    const std::int64_t na = (blk.p1 - blk.p0 + MR - 1) / MR, nb = (blk.c1 - blk.c0 + NR - 1) / NR;
    for (std::int64_t p = 0; p < nb; ++p) {
        const std::int64_t nj = std::min<std::int64_t>(NR, blk.c1 - (blk.c0 + p * NR));
        for (std::int64_t q = 0; q < na; ++q) {
            const std::int64_t ni = std::min<std::int64_t>(MR, blk.p1 - (blk.p0 + q * MR));
            term_tile<T>(wk.pack, q, p, tile);
            for (std::int64_t i = 0; i < ni; ++i) {
                for (std::int64_t j = 0; j < nj; ++j) {
                    U u;
                    std::memcpy(&u, tile + i * NR + j, sizeof(U));
                    const U s = (u & BitsOf<T>::kAbs) >> shift;
                    if ((s >> 16) == prefix) ++h[s & 0xffff];
                }
            }
        }
    }
}

template <typename T>
double abs_kth_one(const AbsKthTask& task, int threads, std::vector<KthWorker>& pool) {
    using U = typename BitsOf<T>::U;
    const std::int64_t P = task.b.rows, Q = task.a.cols;
    if (task.k == 0) return std::numeric_limits<double>::infinity();
    const Factor f = make_factor(task.b, task.a);
    const std::vector<Block> blocks = blocks_of(P, Q);
    threads = threads_for_work(threads, double(P) * double(Q) * double(task.b.cols + 4));
    const std::size_t nw = static_cast<std::size_t>(num_workers(threads, static_cast<std::int64_t>(blocks.size())));
    if (pool.size() < nw) pool.resize(nw);
    for (std::size_t w = 0; w < nw; ++w) pool[w].hist.resize(kBuckets);
    U prefix = 0;
    std::int64_t need = task.k;  // rank of the wanted value among the elements matching prefix
    for (int shift = int(8 * sizeof(U)) - 16; shift >= 0; shift -= 16) {
        for (std::size_t w = 0; w < nw; ++w) std::fill(pool[w].hist.begin(), pool[w].hist.end(), 0);
        parallel_for(static_cast<std::int64_t>(blocks.size()), threads, [&](std::int64_t n, int wi) {
            hist_block<T>(f, blocks[static_cast<std::size_t>(n)], shift, prefix, pool[static_cast<std::size_t>(wi)]);
        });
        std::vector<std::uint64_t>& h = pool[0].hist;
        for (std::size_t w = 1; w < nw; ++w)
            for (std::int64_t b = 0; b < kBuckets; ++b) h[b] += pool[w].hist[b];
        std::int64_t b = kBuckets - 1;
        for (; b > 0; --b) {
            if (static_cast<std::int64_t>(h[b]) >= need) break;
            need -= static_cast<std::int64_t>(h[b]);
        }
        prefix = static_cast<U>((prefix << 16) | static_cast<U>(b));
    }
    T v;
    std::memcpy(&v, &prefix, sizeof(T));
    return static_cast<double>(v);
}

}  // namespace

void dense_merge(const std::vector<MergeTerm>& terms, const Mat& out, int mode, int sign_method, int threads) {
    if (terms.empty() || out.rows == 0 || out.cols == 0) return;
    bool dbl = false;
    for (const MergeTerm& t : terms) dbl = dbl || t.b.dtype == kF64 || t.a.dtype == kF64;
    if (dbl)
        merge_impl<double>(terms, out, mode, sign_method, threads);
    else
        merge_impl<float>(terms, out, mode, sign_method, threads);
}

std::vector<double> abs_kth(const std::vector<AbsKthTask>& tasks, int threads) {
    std::vector<double> out;
    out.reserve(tasks.size());
    std::vector<KthWorker> pool;
    for (const AbsKthTask& t : tasks) {
        const bool dbl = t.b.dtype == kF64 || t.a.dtype == kF64;
        out.push_back(dbl ? abs_kth_one<double>(t, threads, pool) : abs_kth_one<float>(t, threads, pool));
    }
    return out;
}

}  // namespace kmf
