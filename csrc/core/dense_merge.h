// Dense-domain merges of low-rank terms (peft's ties / dare / magnitude_prune
// on t_i = s_i B_i A_i) without materialising any t_i, and the k-th largest
// |t| of one term (the magnitude-pruning threshold) by radix select.
#pragma once

#include <cstdint>
#include <vector>

#include "mat.h"

namespace kmf {

/// Keep rule applied to each element v of a term t_i.
enum KeepKind : int {
    kKeepAll = 0,        // p = v
    kKeepMagnitude = 1,  // p = v * (|v| >= tau)
    kKeepDare = 2,       // p = (v * keep(seed, row, col)) / density
};

/// How the kept terms p_i combine into M.
enum CombineMode : int {
    kCombineSum = 0,   // M = sum_i w_i p_i
    kCombineTies = 1,  // sign election + disjoint mean (peft's ties / dare_ties)
};

/// Sign election for kCombineTies: sign of sum_i p_i, or of sum_i sign(p_i).
enum SignMethod : int { kSignTotal = 0, kSignFrequency = 1 };

/// The codes above by name (exported as _C.KEEP_KINDS, _C.COMBINE_MODES, _C.SIGN_METHODS).
inline constexpr CodeName kKeepKindCodes[] = {{"all", kKeepAll}, {"magnitude", kKeepMagnitude}, {"dare", kKeepDare}};
inline constexpr CodeName kCombineModeCodes[] = {{"sum", kCombineSum}, {"ties", kCombineTies}};
inline constexpr CodeName kSignMethodCodes[] = {{"total", kSignTotal}, {"frequency", kSignFrequency}};

/// One term t = (b.coef * B) @ (a.coef * A) (B: out x r, A: r x in; the
/// coefs are applied while the factors are read) with its rule and weight.
struct MergeTerm {
    Mat b, a;
    double weight = 1.0;
    int keep = kKeepAll;
    double tau = 0.0;             // kKeepMagnitude: keep |v| >= tau (+inf and NaN keep nothing)
    std::uint64_t seed = 0;       // kKeepDare
    std::uint64_t thresh24 = 0;   // kKeepDare: keep iff (hash >> 40) < thresh24, in [0, 2^24]
    double density = 1.0;         // kKeepDare: rescale kept values by 1 / density (> 0)
};

/// The DARE keep mask, a counter-based hash of the element's row-major index
/// idx = row * in + col (all arithmetic modulo 2^64): the murmur3 finaliser of
/// seed + (idx + 1) * golden. Element kept iff (dare_hash >> 40) < thresh24.
constexpr std::uint64_t kDareGolden = 0x9E3779B97F4A7C15ULL;

inline std::uint64_t dare_mix(std::uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

inline std::uint64_t dare_hash(std::uint64_t seed, std::uint64_t idx) { return dare_mix(seed + (idx + 1) * kDareGolden); }

inline bool dare_keep(std::uint64_t seed, std::uint64_t idx, std::uint64_t thresh24) {
    return (dare_hash(seed, idx) >> 40) < thresh24;
}

/// M = merge of the terms, written to out (out x in, float32 or float64, any
/// strides, coef 1; fully overwritten). Every term needs the same out x in.
/// Each t_i is computed tile by tile (MR x NR registers of float32, or
/// float64 when any factor of any term is float64: then every term is
/// accumulated in float64), the keep rule applied to the tile and
/// the tiles combined elementwise, in peft 0.21's order:
///   sum:  M = sum_i w_i p_i
///   ties: e = +1 if S >= 0 else -1 with S = sum_i p_i (total) or
///         sum_i sign(p_i) (frequency); M = sum_{sign(p_i) == e} w_i p_i /
///         max(1, #{i: sign(p_i) == e}).
/// Masks multiply (as in peft), so a NaN (or an infinity that is masked out)
/// in any t_i gives NaN at that element. A magnitude threshold keeps every
/// element with |v| >= tau: with tau = abs_kth(k) that is peft's top-k unless
/// values tie at tau (peft keeps exactly k of them, chosen by topk). Parallel
/// over 256 x 256 blocks of M; every element's value is independent of the
/// thread count.
void dense_merge(const std::vector<MergeTerm>& terms, const Mat& out, int mode, int sign_method, int threads);

/// The k-th largest |t| over the out x in elements of t = (b.coef B)(a.coef A),
/// computed with exactly the tiles dense_merge computes (same values, bit for
/// bit, when the merge accumulates in the same precision: float32 unless a
/// factor is float64). k = 0 gives +inf; k must be <= out * in.
/// NaN elements order above +inf (the result is NaN when k <= #NaN).
struct AbsKthTask {
    Mat b, a;
    std::int64_t k = 0;
};

std::vector<double> abs_kth(const std::vector<AbsKthTask>& tasks, int threads);

}  // namespace kmf
