// Tests of the C++ core (csrc/core) on its own, without Python: every kernel
// against a truth this file computes itself, in double / long double with
// naive loops, over the four storage dtypes, awkward shapes (1, odd sizes,
// sizes that are not multiples of the micro-tile or vector width, K across
// the 256-row chunk boundary) and layouts (row- and column-major, padded,
// strided, negative strides, stacks of mixed blocks).
//
// The half / bfloat16 truth is independent of dtype.h: values are decoded
// from their bit fields with ldexp, and rounded by a binary search over the
// (monotonic) codes with ties to the even code.
//
// Usage: kmerge_core_tests [test-name ...]   (no name: every test)
// KMF_TEST_SMALL=1 (set by the sanitizer build) shrinks the sizes;
// KMF_TEST_SEED=n draws other random cases (the default seed is fixed).
// This file is compiled with -ffp-contract=off: its float emulations must
// round every product.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/apply.h"
#include "core/codes.h"
#include "core/copy.h"
#include "core/dense_merge.h"
#include "core/dense_stats.h"
#include "core/dtype.h"
#include "core/finite.h"
#include "core/gram.h"
#include "core/gram_svd.h"
#include "core/mat.h"
#include "core/sym_eig.h"
#include "core/truncate.h"
#include "core/weighted_sum.h"

namespace {

using i64 = std::int64_t;
using ld = long double;

// ------------------------------------------------------------------ checks

long g_checks = 0, g_failures = 0;
std::string g_case;  // what the current checks are about
int g_printed = 0;   // failures printed in the current test

void fail_at(const std::string& msg) {
    ++g_failures;
    if (g_printed++ < 12) std::printf("  FAIL [%s] %s\n", g_case.c_str(), msg.c_str());
}

#define CHECK(cond, ...)                                            \
    do {                                                            \
        ++g_checks;                                                 \
        if (!(cond)) {                                              \
            char buf_[512];                                         \
            std::snprintf(buf_, sizeof buf_, __VA_ARGS__);          \
            fail_at(std::string(#cond) + ": " + buf_);              \
        }                                                           \
    } while (0)

bool same_value(double a, double b) {  // equal, or both NaN (bit-equal for zeros)
    if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
    return a == b && std::signbit(a) == std::signbit(b);
}

void check_near(double got, ld want, ld tol, const char* what, i64 i, i64 j) {
    ++g_checks;
    const bool ok = std::isfinite(static_cast<double>(want)) ? std::fabs(static_cast<ld>(got) - want) <= tol
                                                              : same_value(got, static_cast<double>(want));
    if (!ok) {
        char buf[256];
        std::snprintf(buf, sizeof buf, "%s(%lld, %lld): got %.17g, want %.17Lg, tol %.3Lg", what, (long long)i,
                      (long long)j, got, want, tol);
        fail_at(buf);
    }
}

bool g_small = false;
int pick(int full, int small) { return g_small ? small : full; }

// ------------------------------------------------------------------ dtypes (independent of dtype.h)

constexpr int kAllDtypes[] = {kmf::kF32, kmf::kF16, kmf::kBF16, kmf::kF64};

double half_value(std::uint16_t h) {
    const int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? std::ldexp(double(m), -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(double(1024 + m), e - 25);
    return (h & 0x8000) ? -v : v;
}

double bf16_value(std::uint16_t b) {
    const int e = (b >> 7) & 255, m = b & 127;
    double v = e == 0 ? std::ldexp(double(m), -133) : e == 255 ? (m ? NAN : INFINITY) : std::ldexp(double(128 + m), e - 134);
    return (b & 0x8000) ? -v : v;
}

double value16(int dtype, std::uint16_t c) { return dtype == kmf::kF16 ? half_value(c) : bf16_value(c); }

/// x rounded to half / bfloat16: nearest, ties to the even code, overflow to inf.
std::uint16_t round16(int dtype, double x) {
    const bool half = dtype == kmf::kF16;
    if (std::isnan(x)) return half ? 0x7e00 : 0x7fc0;
    const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    const ld a = std::fabs(static_cast<ld>(x));
    const std::uint32_t inf = half ? 0x7c00 : 0x7f80;
    // The infinity code stands for the next binade's first value (65536, 2^128) when rounding.
    auto val = [&](std::uint32_t c) -> ld {
        return c == inf ? (half ? 65536.0L : std::ldexp(1.0L, 128)) : static_cast<ld>(value16(dtype, std::uint16_t(c)));
    };
    if (a >= val(inf)) return std::uint16_t(sign | inf);
    std::uint32_t lo = 0, hi = inf;  // val(lo) <= a < val(hi)
    while (hi - lo > 1) {
        const std::uint32_t mid = (lo + hi) / 2;
        (val(mid) <= a ? lo : hi) = mid;
    }
    const ld dl = a - val(lo), dh = val(hi) - a;
    const std::uint32_t c = dl < dh ? lo : dh < dl ? hi : (lo % 2 == 0 ? lo : hi);
    return std::uint16_t(sign | c);
}

/// x rounded to dtype, as a double.
double round_to(int dtype, double x) {
    switch (dtype) {
        case kmf::kF64: return x;
        case kmf::kF32: return static_cast<double>(static_cast<float>(x));
        default: return value16(dtype, round16(dtype, x));
    }
}

/// Unit roundoff (half an ulp of 1) and half the smallest subnormal of a dtype.
struct Precision {
    double unit, tiny;
};
Precision precision(int dtype) {
    switch (dtype) {
        case kmf::kF16: return {0x1p-11, 0x1p-25};
        case kmf::kBF16: return {0x1p-8, 0x1p-134};
        case kmf::kF64: return {0x1p-53, 0x1p-1074};
        default: return {0x1p-24, 0x1p-150};
    }
}
double unit(int dtype) { return precision(dtype).unit; }
double tiny(int dtype) { return precision(dtype).tiny; }

const char* dname(int dtype) { return kmf::dtype_name(dtype); }

// ------------------------------------------------------------------ strided matrices

enum class Layout { kRow, kCol, kPadded, kStrided, kNegative };
constexpr Layout kLayouts[] = {Layout::kRow, Layout::kCol, Layout::kPadded, Layout::kStrided, Layout::kNegative};
const char* layout_name(Layout l) {
    switch (l) {
        case Layout::kRow: return "row";
        case Layout::kCol: return "col";
        case Layout::kPadded: return "padded";
        case Layout::kStrided: return "strided";
        default: return "negative";
    }
}

/// A rows x cols matrix in a dtype and layout, in a buffer of exactly the
/// bytes it spans (so AddressSanitizer sees any access outside it).
struct Buf {
    int dtype = kmf::kF32;
    i64 rows = 0, cols = 0, rs = 0, cs = 0, base = 0;
    std::vector<unsigned char> bytes;

    Buf() = default;
    Buf(int dt, i64 r, i64 c, Layout l) : dtype(dt), rows(r), cols(c) {
        switch (l) {
            case Layout::kRow: rs = c, cs = 1; break;
            case Layout::kCol: rs = 1, cs = r; break;
            case Layout::kPadded: rs = c + 3, cs = 1; break;
            case Layout::kStrided: rs = 2 * c + 1, cs = 2; break;
            case Layout::kNegative: rs = -c, cs = -1; break;
        }
        if (r == 1) rs = l == Layout::kNegative ? -1 : rs;  // any stride is valid for one row
        const i64 lo = std::min<i64>(0, (r - 1) * rs) + std::min<i64>(0, (c - 1) * cs);
        const i64 hi = std::max<i64>(0, (r - 1) * rs) + std::max<i64>(0, (c - 1) * cs);
        base = -lo;
        const i64 n = (r > 0 && c > 0) ? hi - lo + 1 : 1;
        bytes.assign(static_cast<std::size_t>(n * kmf::elem_size(dt)), 0xA5);  // garbage where nothing is stored
    }
    unsigned char* at(i64 i, i64 j) { return bytes.data() + (base + i * rs + j * cs) * kmf::elem_size(dtype); }
    const unsigned char* at(i64 i, i64 j) const { return const_cast<Buf*>(this)->at(i, j); }

    double get(i64 i, i64 j) const {
        const unsigned char* p = at(i, j);
        switch (dtype) {
            case kmf::kF32: {
                float f;
                std::memcpy(&f, p, 4);
                return f;
            }
            case kmf::kF64: {
                double d;
                std::memcpy(&d, p, 8);
                return d;
            }
            default: {
                std::uint16_t h;
                std::memcpy(&h, p, 2);
                return value16(dtype, h);
            }
        }
    }
    /// Stores x rounded to the dtype.
    void set(i64 i, i64 j, double x) {
        unsigned char* p = at(i, j);
        switch (dtype) {
            case kmf::kF32: {
                const float f = static_cast<float>(x);
                std::memcpy(p, &f, 4);
                break;
            }
            case kmf::kF64: std::memcpy(p, &x, 8); break;
            default: {
                const std::uint16_t h = round16(dtype, x);
                std::memcpy(p, &h, 2);
            }
        }
    }
    kmf::Mat mat(double coef = 1.0) const {
        kmf::Mat m;
        m.ptr = (rows == 0 || cols == 0) ? bytes.data() : at(0, 0);
        m.dtype = dtype;
        m.rows = rows, m.cols = cols, m.rs = rs, m.cs = cs, m.coef = coef;
        return m;
    }
};

std::mt19937_64 g_rng(20260412);
double uniform(double lo = -1.0, double hi = 1.0) { return std::uniform_real_distribution<double>(lo, hi)(g_rng); }
int randint(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g_rng); }

Buf random_buf(int dt, i64 r, i64 c, Layout l, double scale = 1.0) {
    Buf b(dt, r, c, l);
    for (i64 i = 0; i < r; ++i)
        for (i64 j = 0; j < c; ++j) b.set(i, j, scale * uniform());
    return b;
}

Layout any_layout() { return kLayouts[randint(0, 4)]; }
int any_dtype() { return kAllDtypes[randint(0, 3)]; }

/// A column stack: blocks of random widths (summing to cols), dtypes and layouts, each with a coef.
struct StackBuf {
    std::vector<Buf> blocks;
    std::vector<double> coefs;
    i64 rows = 0, cols = 0;

    StackBuf(i64 r, i64 c, int nblocks, const std::vector<int>& dtypes, bool with_coefs) : rows(r), cols(c) {
        nblocks = std::max<int>(1, std::min<i64>(nblocks, std::max<i64>(c, 1)));
        i64 left = c;
        for (int b = 0; b < nblocks; ++b) {
            const i64 w = b + 1 == nblocks ? left : randint(c > 0 ? 1 : 0, int(left - (nblocks - 1 - b)));
            left -= w;
            blocks.push_back(random_buf(dtypes[std::size_t(randint(0, int(dtypes.size()) - 1))], r, w, any_layout()));
            coefs.push_back(with_coefs ? (randint(0, 2) == 0 ? 1.0 : uniform(0.25, 2.0) * (randint(0, 1) ? 1 : -1)) : 1.0);
        }
    }
    kmf::Stack stack() const {
        std::vector<kmf::Mat> m;
        for (std::size_t b = 0; b < blocks.size(); ++b) m.push_back(blocks[b].mat(coefs[b]));
        return kmf::Stack(std::move(m));
    }
    /// Element (i, j) of the stack, coef applied (exact: coef * value in long double).
    ld get(i64 i, i64 j) const {
        for (std::size_t b = 0; b < blocks.size(); ++b) {
            if (j < blocks[b].cols) return static_cast<ld>(coefs[b]) * blocks[b].get(i, j);
            j -= blocks[b].cols;
        }
        std::abort();
    }
    /// The stack as a dense long double matrix (rows x cols, row-major).
    std::vector<ld> dense() const {
        std::vector<ld> d(static_cast<std::size_t>(rows * cols));
        for (i64 i = 0; i < rows; ++i)
            for (i64 j = 0; j < cols; ++j) d[std::size_t(i * cols + j)] = get(i, j);
        return d;
    }
    bool any_f64() const {
        for (const Buf& b : blocks)
            if (b.dtype == kmf::kF64) return true;
        return false;
    }
};

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// ------------------------------------------------------------------ dense truth helpers

/// Symmetric eigenvalues and vectors by cyclic Jacobi (a: n x n row-major, destroyed).
/// Returns eigenvalues descending; vecs column c (row-major n x n) belongs to value c.
std::vector<ld> jacobi(std::vector<ld> a, i64 n, std::vector<ld>* vecs = nullptr) {
    std::vector<ld> v(static_cast<std::size_t>(n * n), 0.0L);
    for (i64 i = 0; i < n; ++i) v[std::size_t(i * n + i)] = 1.0L;
    auto A = [&](i64 i, i64 j) -> ld& { return a[std::size_t(i * n + j)]; };
    for (int sweep = 0; sweep < 100; ++sweep) {
        ld off = 0, tot = 0;
        for (i64 i = 0; i < n; ++i)
            for (i64 j = 0; j < n; ++j) (i == j ? tot : off) += A(i, j) * A(i, j);
        if (off <= 1e-36L * (tot + off) || off == 0) break;
        for (i64 p = 0; p < n; ++p)
            for (i64 q = p + 1; q < n; ++q) {
                if (A(p, q) == 0) continue;
                const ld theta = (A(q, q) - A(p, p)) / (2 * A(p, q));
                const ld t = (theta >= 0 ? 1 : -1) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
                const ld c = 1 / std::sqrt(t * t + 1), s = t * c;
                for (i64 k = 0; k < n; ++k) {  // columns p, q
                    const ld akp = A(k, p), akq = A(k, q);
                    A(k, p) = c * akp - s * akq, A(k, q) = s * akp + c * akq;
                }
                for (i64 k = 0; k < n; ++k) {  // rows p, q
                    const ld apk = A(p, k), aqk = A(q, k);
                    A(p, k) = c * apk - s * aqk, A(q, k) = s * apk + c * aqk;
                }
                for (i64 k = 0; k < n; ++k) {
                    ld& vkp = v[std::size_t(k * n + p)];
                    ld& vkq = v[std::size_t(k * n + q)];
                    const ld x = vkp, y = vkq;
                    vkp = c * x - s * y, vkq = s * x + c * y;
                }
            }
    }
    std::vector<i64> order(static_cast<std::size_t>(n));
    for (i64 i = 0; i < n; ++i) order[std::size_t(i)] = i;
    std::sort(order.begin(), order.end(), [&](i64 x, i64 y) { return A(x, x) > A(y, y); });
    std::vector<ld> w;
    for (i64 i : order) w.push_back(A(i, i));
    if (vecs) {
        vecs->assign(static_cast<std::size_t>(n * n), 0.0L);
        for (i64 c = 0; c < n; ++c)
            for (i64 k = 0; k < n; ++k) (*vecs)[std::size_t(k * n + c)] = v[std::size_t(k * n + order[std::size_t(c)])];
    }
    return w;
}

// ------------------------------------------------------------------ tests

template <typename T>
std::uint64_t bits_of(T x) {
    std::uint64_t u = 0;
    std::memcpy(&u, &x, sizeof(T));
    return u;
}

/// f(at, len) over [0, n) cut into runs of 1, 2, ..., 37 elements (vector bodies and tails).
template <typename F>
void in_runs(std::size_t n, F&& f) {
    for (std::size_t at = 0, len = 1; at < n; at += len, len = len % 37 + 1) f(at, std::min(len, n - at));
}

/// The conversion instructions dtype.h uses (AArch64 FCVT / FCVTXN scalars, F16C or NEON
/// contiguous runs) against its portable bit code: the same bits, NaN payloads included.
void check_half_hw_is_portable() {
    g_case = "half loads: hardware = portable";
    std::vector<std::uint16_t> codes(65536);
    for (std::uint32_t c = 0; c < 65536; ++c) codes[c] = std::uint16_t(c);
    std::vector<float> f32(65536);
    std::vector<double> f64(65536);
    in_runs(codes.size(), [&](std::size_t at, std::size_t len) {
        kmf::load_run<float>(f32.data() + at, codes.data() + at, kmf::kF16, i64(len), 1, 1.0f);
        kmf::load_run<double>(f64.data() + at, codes.data() + at, kmf::kF16, i64(len), 1, 1.0);
    });
    for (std::uint32_t c = 0; c < 65536; ++c) {
        const float want = kmf::half_to_float_portable(std::uint16_t(c));
        CHECK(bits_of(kmf::half_to_float(std::uint16_t(c))) == bits_of(want), "scalar %04x", c);
        CHECK(bits_of(f32[c]) == bits_of(want), "float run %04x", c);
        CHECK(bits_of(f64[c]) == bits_of(static_cast<double>(want)), "double run %04x", c);
    }
    // Floats: every 4099th bit pattern (all exponents, NaN payloads), every half midpoint and its neighbours.
    std::vector<float> fs;
    for (std::uint64_t u = 0; u < (1ull << 32); u += pick(4099, 65537)) fs.push_back(kmf::bits_f32(std::uint32_t(u)));
    for (std::uint32_t c = 0; c < 0x7c00; ++c) {
        const float mid = static_cast<float>((half_value(std::uint16_t(c)) + (c + 1 == 0x7c00 ? 65536.0 : half_value(std::uint16_t(c + 1)))) / 2);
        for (float y : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
            fs.push_back(y);
            fs.push_back(-y);
        }
    }
    // Doubles: random bit patterns, values near float's range ends and subnormals, half midpoints +- tiny.
    std::vector<double> ds = {0.0, -0.0, INFINITY, -INFINITY, NAN, -NAN, 0x1.fffffefffffffp127, 0x1.ffffffp127, 0x1p128, 1e300,
                              -1e-300, 0x1p-149, 0x1p-150, 0x1.0000000000001p-150, 0x1p-151, 0x1.fffffcp-127, 0x1.fffffdp-127};
    for (int k = 0; k < pick(200000, 20000); ++k) {
        const std::uint64_t u = g_rng();
        double d;
        std::memcpy(&d, &u, 8);
        ds.push_back(d);
        const double h = half_value(std::uint16_t(randint(0, 0x7bfe))), e = std::ldexp(1.0, randint(-60, -20));
        ds.push_back((k % 2 ? -1 : 1) * (h + (h < 0x1p-14 ? 0x1p-25 : h * 0x1p-11) + (k % 3 - 1) * e * h));
        ds.push_back(std::ldexp(uniform(1.0, 2.0), randint(-160, 130)));
    }
    g_case = "half stores: hardware = portable";
    std::vector<std::uint16_t> got(std::max(fs.size(), ds.size()));
    in_runs(fs.size(), [&](std::size_t at, std::size_t len) { kmf::store_run<float>(got.data() + at, kmf::kF16, i64(len), 1, fs.data() + at); });
    for (std::size_t i = 0; i < fs.size(); ++i) {
        const std::uint16_t want = kmf::float_to_half_portable(fs[i]);
        CHECK(kmf::float_to_half(fs[i]) == want, "scalar %a -> %04x, want %04x", double(fs[i]), kmf::float_to_half(fs[i]), want);
        CHECK(got[i] == want, "float run %a -> %04x, want %04x", double(fs[i]), got[i], want);
    }
    in_runs(ds.size(), [&](std::size_t at, std::size_t len) { kmf::store_run<double>(got.data() + at, kmf::kF16, i64(len), 1, ds.data() + at); });
    for (std::size_t i = 0; i < ds.size(); ++i) {
        const float odd = kmf::double_to_float_odd_portable(ds[i]);
        CHECK(bits_of(kmf::double_to_float_odd(ds[i])) == bits_of(odd), "double_to_float_odd %a -> %a, want %a", ds[i],
              double(kmf::double_to_float_odd(ds[i])), double(odd));
        CHECK(got[i] == kmf::float_to_half_portable(odd), "double run %a -> %04x, want %04x", ds[i], got[i], kmf::float_to_half_portable(odd));
    }
}

void test_dtype() {
    // Every half / bfloat16 code decodes exactly (dtype.h's branch-free loader).
    for (std::uint32_t c = 0; c < 65536; ++c) {
        g_case = fmt("decode %04x", c);
        CHECK(same_value(kmf::half_to_float(std::uint16_t(c)), half_value(std::uint16_t(c))), "half %04x", c);
        CHECK(same_value(kmf::bf16_to_float(std::uint16_t(c)), bf16_value(std::uint16_t(c))), "bf16 %04x", c);
    }
    // Rounding float -> half / bfloat16 at every midpoint and its neighbours, and at random floats.
    for (int dt : {kmf::kF16, kmf::kBF16}) {
        const std::uint32_t inf = dt == kmf::kF16 ? 0x7c00 : 0x7f80;
        std::vector<float> xs;
        for (std::uint32_t c = 0; c < inf; ++c) {
            const double next = c + 1 == inf ? (dt == kmf::kF16 ? 65536.0 : std::ldexp(1.0, 128)) : value16(dt, std::uint16_t(c + 1));
            const float mid = static_cast<float>((value16(dt, std::uint16_t(c)) + next) / 2);  // exact in float
            xs.push_back(mid);
            xs.push_back(std::nextafter(mid, 0.0f));
            xs.push_back(std::nextafter(mid, INFINITY));
        }
        for (int k = 0; k < 20000; ++k) {
            std::uint32_t u = static_cast<std::uint32_t>(g_rng());
            float f;
            std::memcpy(&f, &u, 4);
            xs.push_back(f);
        }
        g_case = fmt("round to %s", dname(dt));
        for (float x : xs)
            for (float y : {x, -x}) {
                const std::uint16_t got = dt == kmf::kF16 ? kmf::float_to_half(y) : kmf::float_to_bf16(y);
                const std::uint16_t want = round16(dt, y);
                if (std::isnan(y))
                    CHECK(std::isnan(value16(dt, got)), "%a -> %04x", double(y), got);
                else
                    CHECK(got == want, "%a -> %04x, want %04x", double(y), got, want);
            }
        // double -> 16 bits must round once (no double rounding through float).
        g_case = fmt("round double to %s", dname(dt));
        for (int k = 0; k < 20000; ++k) {
            const std::uint32_t c = static_cast<std::uint32_t>(randint(0, int(inf) - 2));
            const double mid = (value16(dt, std::uint16_t(c)) + value16(dt, std::uint16_t(c + 1))) / 2;
            const double x = k % 2 ? std::nextafter(mid, 0.0) : std::nextafter(mid, INFINITY);
            const std::uint16_t got = dt == kmf::kF16 ? kmf::to_half(x) : kmf::to_bf16(x);
            CHECK(got == round16(dt, x), "%a -> %04x, want %04x", x, got, round16(dt, x));
        }
    }
    check_half_hw_is_portable();
    g_case = "codes";
    CHECK(kmf::valid_dtype(3) && !kmf::valid_dtype(4) && !kmf::valid_dtype(-1), "valid_dtype");
    CHECK(std::string(kmf::dtype_name(kmf::kBF16)) == "bfloat16", "dtype_name");
    CHECK(kmf::codes_text(kmf::kCombineModeCodes) == "0 (sum) or 1 (ties)", "%s", kmf::codes_text(kmf::kCombineModeCodes).c_str());
}

void test_copy() {
    const int n = pick(40, 12);
    for (int trial = 0; trial < n; ++trial) {
        const int sd = kAllDtypes[trial % 4], dd = kAllDtypes[(trial / 4) % 4];
        const i64 r = randint(0, 3) == 0 ? 1 : randint(1, 70), c = randint(1, 3) == 1 ? 1 : randint(1, 90);
        const double coef = trial % 3 == 0 ? 1.0 : uniform(-3.0, 3.0);
        const Layout ls = any_layout(), ld_ = any_layout();
        g_case = fmt("copy %s->%s %lldx%lld %s->%s coef %g", dname(sd), dname(dd), (long long)r, (long long)c, layout_name(ls),
                     layout_name(ld_), coef);
        Buf src = random_buf(sd, r, c, ls, trial % 5 == 0 ? 1e5 : 1.0);  // 1e5 overflows half
        Buf dst(dd, r, c, ld_);
        kmf::copy({{src.mat(coef), dst.mat()}}, 1 + trial % 3);
        for (i64 i = 0; i < r; ++i)
            for (i64 j = 0; j < c; ++j) {
                const double want = round_to(dd, coef * src.get(i, j));
                CHECK(same_value(dst.get(i, j), want), "(%lld, %lld): got %a want %a", (long long)i, (long long)j, dst.get(i, j),
                      want);
            }
    }
}

void test_finite() {
    for (int trial = 0; trial < pick(40, 16); ++trial) {
        const int dt = kAllDtypes[trial % 4];
        const i64 r = trial % 7 == 0 ? 0 : randint(1, 40), c = randint(1, 77);
        Buf b = random_buf(dt, r, c, any_layout(), 3.0);
        const int kind = trial % 4;  // 0 finite, 1 inf, 2 NaN, 3 -inf
        if (kind && r > 0) b.set(randint(0, int(r) - 1), randint(0, int(c) - 1), kind == 1 ? INFINITY : kind == 2 ? NAN : -INFINITY);
        g_case = fmt("finite %s %lldx%lld kind %d", dname(dt), (long long)r, (long long)c, kind);
        double mx = 0.0;
        bool finite = true, nan = false;
        for (i64 i = 0; i < r; ++i)
            for (i64 j = 0; j < c; ++j) {
                const double v = b.get(i, j);
                finite = finite && std::isfinite(v);
                nan = nan || std::isnan(v);
                mx = std::max(mx, std::fabs(v));
            }
        const std::vector<kmf::Mat> mats = {b.mat(), b.mat(-2.0)};
        const std::vector<char> flags = kmf::all_finite(mats, 2);
        const std::vector<double> maxes = kmf::max_abs(mats, 2);
        for (int k = 0; k < 2; ++k) {
            CHECK(bool(flags[std::size_t(k)]) == finite, "all_finite %d", int(flags[std::size_t(k)]));
            CHECK(nan ? std::isnan(maxes[std::size_t(k)]) : maxes[std::size_t(k)] == mx, "max_abs %g want %g", maxes[std::size_t(k)], mx);
        }
    }
}

void test_weighted_sum() {
    for (int trial = 0; trial < pick(48, 16); ++trial) {
        const bool precise = trial % 2 == 1;
        const i64 r = randint(0, 2) == 0 ? 1 : randint(1, 50), c = randint(1, 2) == 1 ? 1 : randint(1, 70);
        const int k = randint(1, 4), dd = any_dtype();
        std::vector<Buf> srcs;
        std::vector<double> coefs;
        std::vector<kmf::Mat> mats;
        for (int s = 0; s < k; ++s) {
            const int sd = precise ? any_dtype() : kAllDtypes[randint(0, 2)];  // float64 sources need precise
            srcs.push_back(random_buf(sd, r, c, any_layout()));
            coefs.push_back(uniform(-2.0, 2.0));
        }
        for (int s = 0; s < k; ++s) mats.push_back(srcs[std::size_t(s)].mat(coefs[std::size_t(s)]));
        Buf dst(dd, r, c, any_layout());
        g_case = fmt("weighted_sum precise=%d k=%d %lldx%lld -> %s", int(precise), k, (long long)r, (long long)c, dname(dd));
        kmf::weighted_sum({{mats, dst.mat()}}, precise, 1 + trial % 3);
        for (i64 i = 0; i < r; ++i)
            for (i64 j = 0; j < c; ++j) {
                double want;
                if (precise) {
                    double acc = srcs[0].get(i, j) * coefs[0];
                    for (int s = 1; s < k; ++s) {
                        const double term = srcs[std::size_t(s)].get(i, j) * coefs[std::size_t(s)];
                        acc = acc + term;
                    }
                    want = round_to(dd, acc);
                } else {
                    float acc = static_cast<float>(srcs[0].get(i, j)) * static_cast<float>(coefs[0]);
                    for (int s = 1; s < k; ++s) {
                        const float term = static_cast<float>(srcs[std::size_t(s)].get(i, j)) * static_cast<float>(coefs[std::size_t(s)]);
                        acc = acc + term;
                    }
                    want = round_to(dd, acc);
                }
                CHECK(same_value(dst.get(i, j), want), "(%lld, %lld): got %a want %a", (long long)i, (long long)j, dst.get(i, j), want);
            }
    }
}

/// dot = sum_q x[q xs] y[q ys] and abs = sum_q |x[q xs] y[q ys]| over q < n, in long double.
template <typename X, typename Y>
void dot_abs(const X* x, i64 xs, const Y* y, i64 ys, i64 n, ld& dot, ld& abs) {
    dot = 0, abs = 0;
    for (i64 q = 0; q < n; ++q) {
        const ld p = static_cast<ld>(x[q * xs]) * static_cast<ld>(y[q * ys]);
        dot += p, abs += std::fabs(p);
    }
}

void test_gram() {
    const std::vector<i64> ks = g_small ? std::vector<i64>{1, 7, 257} : std::vector<i64>{1, 2, 7, 33, 255, 256, 257, 600};
    const std::vector<i64> rs = g_small ? std::vector<i64>{1, 5, 19} : std::vector<i64>{1, 3, 8, 13, 17, 33, 40};
    int trial = 0;
    for (i64 k : ks)
        for (i64 r1 : rs) {
            ++trial;
            const bool precise = trial % 2 == 0, symmetric = trial % 3 == 0;
            const i64 r2 = symmetric ? r1 : rs[std::size_t(randint(0, int(rs.size()) - 1))];
            std::vector<int> dts = {kAllDtypes[trial % 4]};
            if (trial % 5 == 0) dts = {kmf::kF32, kmf::kF16, kmf::kBF16, kmf::kF64};
            StackBuf x(k, r1, randint(1, 3), dts, true);
            StackBuf y = symmetric ? x : StackBuf(k, r2, randint(1, 3), dts, true);
            kmf::GramTask t;
            t.x = x.stack(), t.y = symmetric ? t.x : y.stack(), t.symmetric = symmetric;
            std::vector<double> out(static_cast<std::size_t>(r1 * r2), NAN), out1(out);
            t.out = out.data();
            g_case = fmt("gram K=%lld %lldx%lld precise=%d symmetric=%d blocks=%zu", (long long)k, (long long)r1, (long long)r2,
                         int(precise), int(symmetric), x.blocks.size());
            kmf::gram({t}, precise, 2);
            kmf::GramTask t1 = t;
            t1.out = out1.data();
            kmf::gram({t1}, precise, 1);
            const std::vector<ld> xd = x.dense(), yd = symmetric ? xd : y.dense();
            // fast: float32 products of the rounded inputs within chunks of 256 rows.
            const double u = precise ? 0x1p-52 : 0x1p-24;
            const double steps = double(std::min<i64>(k, kmf::kGramChunk)) + 4;
            for (i64 i = 0; i < r1; ++i)
                for (i64 j = 0; j < r2; ++j) {
                    ld dot, abs;
                    dot_abs(xd.data() + i, r1, yd.data() + j, r2, k, dot, abs);
                    const double got = out[std::size_t(i * r2 + j)];
                    check_near(got, dot, steps * u * abs + 1e-300, "G", i, j);
                    CHECK(same_value(got, out1[std::size_t(i * r2 + j)]), "thread count changed (%lld, %lld)", (long long)i, (long long)j);
                    if (symmetric) CHECK(got == out[std::size_t(j * r2 + i)], "not symmetric at (%lld, %lld)", (long long)i, (long long)j);
                }
        }
}

void test_apply() {
    const int n = pick(48, 14);
    for (int trial = 0; trial < n; ++trial) {
        const bool precise = trial % 2 == 1;
        const i64 k = trial % 6 == 0 ? 1 : randint(1, 300), r = randint(1, 37), c = trial % 5 == 0 ? 1 : randint(1, 41);
        const int od = kAllDtypes[(trial / 2) % 4];
        std::vector<int> dts = {kAllDtypes[trial % 4]};
        if (trial % 3 == 0) dts = {kmf::kF32, kmf::kF16, kmf::kBF16, kmf::kF64};
        StackBuf x(k, r, randint(1, 3), dts, true);
        std::vector<double> tm(static_cast<std::size_t>(r * c));
        for (double& v : tm) v = uniform();
        Buf out(od, k, c, any_layout());
        kmf::ApplyTask t;
        t.x = x.stack(), t.t = tm.data(), t.c = c, t.out = out.mat();
        g_case = fmt("apply K=%lld R=%lld C=%lld precise=%d out=%s", (long long)k, (long long)r, (long long)c, int(precise), dname(od));
        kmf::apply({t}, precise, 1 + trial % 2);
        const std::vector<ld> xd = x.dense();
        const double u = precise ? 0x1p-52 : 0x1p-24;
        for (i64 i = 0; i < k; ++i)
            for (i64 j = 0; j < c; ++j) {
                ld dot, abs;
                dot_abs(xd.data() + i * r, 1, tm.data() + j, c, r, dot, abs);
                const ld tol = unit(od) * std::fabs(dot) + (1 + unit(od)) * (double(r) + 4) * u * abs + tiny(od);
                check_near(out.get(i, j), dot, tol, "out", i, j);
            }
    }
}

void test_dense_stats() {
    for (int trial = 0; trial < pick(30, 10); ++trial) {
        const i64 p = trial % 5 == 0 ? 1 : randint(1, 90), q = trial % 7 == 0 ? 1 : randint(1, 90), r = randint(1, 20);
        std::vector<int> dts = {kAllDtypes[trial % 4]};
        if (trial % 3 == 0) dts = {kmf::kF32, kmf::kF16, kmf::kBF16, kmf::kF64};
        StackBuf x(p, r, randint(1, 3), dts, true), y(q, r, randint(1, 3), dts, true);
        double out[2] = {NAN, NAN};
        kmf::DenseStatsTask t;
        t.x = x.stack(), t.y = y.stack(), t.out = out;
        g_case = fmt("dense_stats %lldx%lld R=%lld", (long long)p, (long long)q, (long long)r);
        kmf::dense_stats({t}, 1 + trial % 2);
        const std::vector<ld> xd = x.dense(), yd = y.dense();
        ld sum = 0, mx = 0, sum_tol = 0, max_tol = 0;
        for (i64 i = 0; i < p; ++i)
            for (i64 j = 0; j < q; ++j) {
                ld dot, abs;
                dot_abs(xd.data() + i * r, 1, yd.data() + j * r, 1, r, dot, abs);
                const ld tol = (double(r) + 4) * 0x1p-24 * abs;  // float32 tiles
                sum += std::fabs(dot), mx = std::max(mx, std::fabs(dot));
                sum_tol += tol, max_tol = std::max(max_tol, tol);
            }
        check_near(out[0], sum, sum_tol + double(p * q) * 0x1p-52 * sum, "sum|D|", p, q);
        check_near(out[1], mx, max_tol, "max|D|", p, q);
    }
}

/// The independent DARE mask: murmur3 fmix64 of seed + (idx + 1) * golden.
bool dare_keep_truth(std::uint64_t seed, std::uint64_t idx, std::uint64_t thresh24) {
    std::uint64_t x = seed + (idx + 1) * 0x9E3779B97F4A7C15ULL;
    x ^= x >> 33, x *= 0xff51afd7ed558ccdULL, x ^= x >> 33, x *= 0xc4ceb9fe1a85ec53ULL, x ^= x >> 33;
    return (x >> 40) < thresh24;
}

struct TermBuf {
    Buf b, a;
    double cb = 1, ca = 1;
    kmf::MergeTerm term;
    std::vector<ld> t, abs;  // the term's exact values and their sum_k |b||a| (out x in)
};

TermBuf make_term(i64 out, i64 in, i64 r, const std::vector<int>& dts) {
    TermBuf tb;
    tb.b = random_buf(dts[std::size_t(randint(0, int(dts.size()) - 1))], out, r, any_layout());
    tb.a = random_buf(dts[std::size_t(randint(0, int(dts.size()) - 1))], r, in, any_layout());
    tb.cb = randint(0, 1) ? 1.0 : uniform(0.5, 2.0);
    tb.ca = randint(0, 1) ? 1.0 : -uniform(0.5, 2.0);
    tb.term.b = tb.b.mat(tb.cb), tb.term.a = tb.a.mat(tb.ca);
    tb.t.assign(static_cast<std::size_t>(out * in), 0), tb.abs = tb.t;
    for (i64 i = 0; i < out; ++i)
        for (i64 j = 0; j < in; ++j) {
            ld s = 0, s_abs = 0;
            for (i64 k = 0; k < r; ++k) {
                const ld p = static_cast<ld>(tb.cb) * tb.b.get(i, k) * (static_cast<ld>(tb.ca) * tb.a.get(k, j));
                s += p, s_abs += std::fabs(p);
            }
            tb.t[std::size_t(i * in + j)] = s, tb.abs[std::size_t(i * in + j)] = s_abs;
        }
    return tb;
}

void test_dense_merge() {
    const int n = pick(36, 12);
    for (int trial = 0; trial < n; ++trial) {
        const i64 out = trial % 6 == 0 ? 1 : randint(1, g_small ? 40 : 300), in = trial % 7 == 0 ? 1 : randint(1, g_small ? 40 : 270);
        const int k = randint(1, 4), mode = trial % 2, sign_method = (trial / 2) % 2;
        const bool use_f64 = trial % 5 == 0;
        const std::vector<int> dts = use_f64 ? std::vector<int>{kmf::kF64, kmf::kF32} : std::vector<int>{kmf::kF32, kmf::kF16, kmf::kBF16};
        std::vector<TermBuf> terms;
        for (int i = 0; i < k; ++i) {
            terms.push_back(make_term(out, in, randint(1, 9), dts));
            kmf::MergeTerm& m = terms.back().term;
            m.weight = uniform(0.2, 1.5);
            m.keep = randint(0, 2);
            if (m.keep == kmf::kKeepMagnitude) m.tau = uniform(0.0, 0.8);
            if (m.keep == kmf::kKeepDare) {
                m.seed = g_rng();
                m.density = uniform(0.2, 0.9);
                m.thresh24 = static_cast<std::uint64_t>(m.density * double(1 << 24));
            }
        }
        bool any64 = false;
        for (const TermBuf& t : terms) any64 = any64 || t.b.dtype == kmf::kF64 || t.a.dtype == kmf::kF64;
        const int od = trial % 3 == 0 ? kmf::kF64 : kmf::kF32;
        Buf o(od, out, in, any_layout());
        std::vector<kmf::MergeTerm> mts;
        for (const TermBuf& t : terms) mts.push_back(t.term);
        g_case = fmt("dense_merge %lldx%lld k=%d mode=%d sign=%d out=%s f64=%d", (long long)out, (long long)in, k, mode, sign_method,
                     dname(od), int(any64));
        kmf::dense_merge(mts, o.mat(), mode, sign_method, 1 + trial % 3);
        const double u = any64 ? 0x1p-52 : 0x1p-24;
        int skipped = 0;
        for (i64 i = 0; i < out; ++i)
            for (i64 j = 0; j < in; ++j) {
                const std::size_t e = std::size_t(i * in + j);
                bool ambiguous = false;
                std::vector<ld> p(terms.size()), ptol(terms.size());
                for (std::size_t q = 0; q < terms.size(); ++q) {
                    const TermBuf& t = terms[q];
                    const ld v = t.t[e], tol = (9 + 4) * u * t.abs[e];
                    ld keep = 1;
                    if (t.term.keep == kmf::kKeepMagnitude) {
                        keep = std::fabs(v) >= t.term.tau;
                        ambiguous = ambiguous || std::fabs(std::fabs(v) - t.term.tau) <= tol;
                    }
                    if (t.term.keep == kmf::kKeepDare) keep = dare_keep_truth(t.term.seed, std::uint64_t(e), t.term.thresh24) / t.term.density;
                    p[q] = v * keep, ptol[q] = tol * keep;
                    if (mode == kmf::kCombineTies && keep != 0) ambiguous = ambiguous || std::fabs(v) <= tol;
                }
                ld want = 0, tol = 0;
                if (mode == kmf::kCombineSum) {
                    for (std::size_t q = 0; q < p.size(); ++q) want += terms[q].term.weight * p[q], tol += terms[q].term.weight * ptol[q];
                } else {
                    ld s = 0, s_tol = 0;
                    for (std::size_t q = 0; q < p.size(); ++q) {
                        s += sign_method == kmf::kSignTotal ? p[q] : ld((p[q] > 0) - (p[q] < 0));
                        s_tol += sign_method == kmf::kSignTotal ? ptol[q] : 0;
                    }
                    ambiguous = ambiguous || (sign_method == kmf::kSignTotal && s_tol > 0 && std::fabs(s) <= s_tol);
                    const int el = s >= 0 ? 1 : -1;
                    int count = 0;
                    for (std::size_t q = 0; q < p.size(); ++q)
                        if ((p[q] > 0 ? 1 : p[q] < 0 ? -1 : 0) == el) want += terms[q].term.weight * p[q], tol += terms[q].term.weight * ptol[q], ++count;
                    want /= std::max(1, count), tol /= std::max(1, count);
                }
                if (ambiguous) {
                    ++skipped;
                    continue;
                }
                check_near(o.get(i, j), want, tol + unit(od) * std::fabs(want) + 1e-300, "M", i, j);
            }
        CHECK(skipped <= std::max<i64>(4, out * in / 50), "%d of %lld elements too close to a threshold to check", skipped, (long long)(out * in));
    }
}

void test_abs_kth() {
    for (int trial = 0; trial < pick(24, 8); ++trial) {
        const i64 out = trial % 5 == 0 ? 1 : randint(1, g_small ? 30 : 200), in = trial % 4 == 0 ? 1 : randint(1, g_small ? 30 : 150);
        const bool f64 = trial % 3 == 0;
        TermBuf t = make_term(out, in, randint(1, 9), f64 ? std::vector<int>{kmf::kF64} : std::vector<int>{kmf::kF32, kmf::kF16, kmf::kBF16});
        const i64 numel = out * in;
        std::vector<kmf::AbsKthTask> tasks;
        for (i64 k : {i64(0), i64(1), numel / 3, numel / 2 + 1, numel}) tasks.push_back({t.term.b, t.term.a, k});
        g_case = fmt("abs_kth %lldx%lld f64=%d", (long long)out, (long long)in, int(f64));
        const std::vector<double> got = kmf::abs_kth(tasks, 1 + trial % 2);
        std::vector<ld> mags;
        ld max_tol = 0;
        const double u = f64 ? 0x1p-52 : 0x1p-24;
        for (std::size_t e = 0; e < t.t.size(); ++e) mags.push_back(std::fabs(t.t[e])), max_tol = std::max(max_tol, 13 * u * t.abs[e]);
        std::sort(mags.begin(), mags.end(), std::greater<ld>());
        for (std::size_t q = 0; q < tasks.size(); ++q) {
            const i64 k = tasks[q].k;
            if (k == 0)
                CHECK(got[q] == INFINITY, "k=0 gives %g", got[q]);
            else
                check_near(got[q], mags[std::size_t(k - 1)], max_tol, "kth", k, 0);
        }
        // Consistency with dense_merge: a magnitude keep at tau = abs_kth(k) keeps the elements >= tau, bit for bit.
        Buf all(kmf::kF32, out, in, Layout::kRow), mag(kmf::kF32, out, in, Layout::kRow);
        if (f64) all = Buf(kmf::kF64, out, in, Layout::kRow), mag = Buf(kmf::kF64, out, in, Layout::kRow);
        kmf::MergeTerm m = t.term;
        kmf::dense_merge({m}, all.mat(), kmf::kCombineSum, kmf::kSignTotal, 1);
        m.keep = kmf::kKeepMagnitude, m.tau = got[2];
        kmf::dense_merge({m}, mag.mat(), kmf::kCombineSum, kmf::kSignTotal, 2);
        i64 kept = 0;
        for (i64 i = 0; i < out; ++i)
            for (i64 j = 0; j < in; ++j) {
                const double v = all.get(i, j), w = std::fabs(v) >= got[2] ? v : 0.0;
                kept += std::fabs(v) >= got[2];
                CHECK(mag.get(i, j) == w, "magnitude keep (%lld, %lld): %a vs %a", (long long)i, (long long)j, mag.get(i, j), w);
            }
        CHECK(kept >= tasks[2].k, "kept %lld < k = %lld", (long long)kept, (long long)tasks[2].k);
    }
}

void test_sym_eig() {
    const std::vector<i64> ns = g_small ? std::vector<i64>{1, 2, 5, 17} : std::vector<i64>{1, 2, 3, 5, 8, 17, 33, 60};
    for (i64 n : ns)
        for (int kind = 0; kind < 3; ++kind) {
            // kind 0: random; 1: clustered (3 I + a rank-2 term: n - 2 equal eigenvalues); 2: diagonal with ties.
            std::vector<double> a(static_cast<std::size_t>(n * n));
            std::vector<double> u1(static_cast<std::size_t>(n)), u2(u1);
            for (i64 i = 0; i < n; ++i) u1[std::size_t(i)] = uniform(), u2[std::size_t(i)] = uniform();
            for (i64 i = 0; i < n; ++i)
                for (i64 j = i; j < n; ++j) {
                    double v = kind == 0 ? uniform() : kind == 1 ? (i == j ? 3.0 : 0.0) + u1[std::size_t(i)] * u1[std::size_t(j)] - u2[std::size_t(i)] * u2[std::size_t(j)]
                                                                 : (i == j ? double((i * 7) % 3) : 0.0);
                    a[std::size_t(i * n + j)] = a[std::size_t(j * n + i)] = v;
                }
            std::vector<ld> al(a.begin(), a.end());
            const std::vector<ld> truth = jacobi(al, n);
            ld norm = 0;
            for (double v : a) norm = std::max<ld>(norm, std::fabs(v));
            norm *= double(n);
            for (i64 k : {i64(0), i64(1), n / 2, n}) {
                g_case = fmt("sym_eig n=%lld kind=%d k=%lld", (long long)n, kind, (long long)k);
                // The matrix is read from a buffer with garbage below the diagonal: only the upper triangle counts.
                std::vector<double> in(a);
                for (i64 i = 0; i < n; ++i)
                    for (i64 j = 0; j < i; ++j) in[std::size_t(i * n + j)] = 1e30;
                std::vector<double> w(static_cast<std::size_t>(std::max<i64>(k, 1))), v(static_cast<std::size_t>(std::max<i64>(n * k, 1)));
                kmf::SymEig eig(n, in.data(), n);
                eig.top_values(k, w.data());
                const int bad = eig.vectors(k, w.data(), v.data(), k);
                CHECK(bad == 0, "%d vectors did not converge", bad);
                for (i64 c = 0; c < k; ++c) {
                    check_near(w[std::size_t(c)], truth[std::size_t(c)], 1e-12L * norm, "w", c, 0);
                    for (i64 i = 0; i < n; ++i) {  // residual (A v - w v)_i
                        ld s = 0;
                        for (i64 j = 0; j < n; ++j) s += static_cast<ld>(a[std::size_t(i * n + j)]) * v[std::size_t(j * k + c)];
                        check_near(double(s), static_cast<ld>(w[std::size_t(c)]) * v[std::size_t(i * k + c)], 1e-10L * norm, "Av-wv", i, c);
                    }
                    for (i64 d = 0; d <= c; ++d) {  // orthonormal
                        ld s = 0;
                        for (i64 i = 0; i < n; ++i) s += static_cast<ld>(v[std::size_t(i * k + c)]) * v[std::size_t(i * k + d)];
                        check_near(double(s), c == d ? 1.0L : 0.0L, 1e-10L, "V^T V", c, d);
                    }
                }
            }
        }
}

void test_truncate() {
    const int n = pick(30, 10);
    for (int trial = 0; trial < n; ++trial) {
        const i64 n_out = trial % 7 == 0 ? 1 : randint(1, g_small ? 24 : 70), n_in = trial % 5 == 0 ? 1 : randint(1, g_small ? 24 : 60);
        const int nblocks = randint(1, 3);
        const i64 big_r = randint(nblocks, 12);
        const i64 rank = std::max<i64>(1, big_r + randint(-4, 2));
        const bool f64 = trial % 4 == 0;
        const std::vector<int> dts = f64 ? std::vector<int>{kmf::kF64, kmf::kF32} : std::vector<int>{kmf::kF32, kmf::kF16, kmf::kBF16};
        // B = [c_i B_i] and At = [A_i^T] with matching block widths.
        StackBuf b(n_out, big_r, nblocks, dts, true);
        std::vector<Buf> at_blocks;
        std::vector<kmf::Mat> at_mats;
        for (const Buf& blk : b.blocks) at_blocks.push_back(random_buf(dts[std::size_t(randint(0, int(dts.size()) - 1))], n_in, blk.cols, any_layout()));
        for (const Buf& blk : at_blocks) at_mats.push_back(blk.mat());
        const int od = f64 ? kmf::kF64 : kAllDtypes[randint(0, 2)];
        Buf ob(od, n_out, rank, any_layout()), oat(od, n_in, rank, any_layout());
        kmf::TruncateTask t;
        t.b = b.stack(), t.at = kmf::Stack(at_mats), t.out_b = ob.mat(), t.out_at = oat.mat();
        std::vector<kmf::TruncateTask> tasks = {t};
        g_case = fmt("truncate %lldx%lld R=%lld rank=%lld blocks=%d out=%s", (long long)n_out, (long long)n_in, (long long)big_r,
                     (long long)rank, nblocks, dname(od));
        kmf::truncate(tasks, rank, 1 + trial % 2);
        CHECK(tasks[0].route == kmf::kRouteCholesky || tasks[0].route == kmf::kRouteEigen, "route %d", tasks[0].route);
        if (tasks[0].route == kmf::kRouteFailed) continue;
        // M = B A (n_out x n_in) and the truth: singular values from M^T M.
        const std::vector<ld> bd = b.dense();
        std::vector<ld> m(static_cast<std::size_t>(n_out * n_in), 0), mtm(static_cast<std::size_t>(n_in * n_in), 0);
        for (i64 i = 0; i < n_out; ++i)
            for (i64 j = 0; j < n_in; ++j) {
                ld s = 0;
                i64 col = 0;
                for (const Buf& blk : at_blocks)
                    for (i64 q = 0; q < blk.cols; ++q, ++col) s += bd[std::size_t(i * big_r + col)] * blk.get(j, q);
                m[std::size_t(i * n_in + j)] = s;
            }
        for (i64 i = 0; i < n_in; ++i)
            for (i64 j = 0; j < n_in; ++j)
                for (i64 k = 0; k < n_out; ++k) mtm[std::size_t(i * n_in + j)] += m[std::size_t(k * n_in + i)] * m[std::size_t(k * n_in + j)];
        const std::vector<ld> sig2 = jacobi(mtm, n_in);
        const ld s1 = std::max<ld>(sig2[0], 1e-300L), m_norm2 = [&] {
            ld s = 0;
            for (ld v : m) s += v * v;
            return s;
        }();
        const double tol = f64 ? 1e-9 : 8 * unit(od) + 1e-4;  // relative to sigma_1 (^2 for squared quantities)
        const i64 full = std::min({big_r, n_out, n_in});
        ld kept2 = 0;
        for (i64 p = 0; p < rank; ++p) {
            ld bn = 0, an = 0;
            for (i64 i = 0; i < n_out; ++i) bn += static_cast<ld>(ob.get(i, p)) * ob.get(i, p);
            for (i64 j = 0; j < n_in; ++j) an += static_cast<ld>(oat.get(j, p)) * oat.get(j, p);
            const ld want = p < n_in ? std::max<ld>(sig2[std::size_t(p)], 0) : 0;
            check_near(double(bn), want, tol * s1, "|B'_p|^2 vs sigma_p^2", p, 0);
            if (p < full && sig2[std::size_t(p)] > 1e-6L * s1) check_near(double(an), 1.0L, tol + 4 * unit(od), "|A'_p|^2", p, 0);
            if (p >= big_r) CHECK(an == 0 && bn == 0, "column %lld beyond R = %lld is not zero", (long long)p, (long long)big_r);
            kept2 += bn;
            for (i64 q = 0; q < p; ++q) {
                ld d = 0;
                for (i64 j = 0; j < n_in; ++j) d += static_cast<ld>(oat.get(j, p)) * oat.get(j, q);
                check_near(double(d), 0.0L, tol + 4 * unit(od), "A'_p . A'_q", p, q);
            }
        }
        // The residual of the best rank-r approximation: |M - B' A'|_F^2 = sum of the dropped sigma^2.
        ld resid = 0;
        for (i64 i = 0; i < n_out; ++i)
            for (i64 j = 0; j < n_in; ++j) {
                ld s = 0;
                for (i64 p = 0; p < rank; ++p) s += static_cast<ld>(ob.get(i, p)) * oat.get(j, p);
                const ld d = m[std::size_t(i * n_in + j)] - s;
                resid += d * d;
            }
        ld dropped = 0;
        for (i64 p = rank; p < n_in; ++p) dropped += std::max<ld>(sig2[std::size_t(p)], 0);
        check_near(double(resid), dropped, 4 * tol * m_norm2 + 4 * tol * s1, "|M - B'A'|^2", rank, 0);
        (void)kept2;
    }
}

struct Test {
    const char* name;
    void (*fn)();
};
/// kmf::gram_svd (many modules, one per worker) against gram_svd_one on one thread, bit for bit, with
/// every route in the batch: random stacks (Cholesky), half of A zero (eigen), a non-finite Gram (failed).
void test_gram_svd_batch() {
    const i64 big_r = g_small ? 6 : 12, rank = 4, n_side = 2 * big_r + 3;
    const int n = pick(9, 6);
    std::vector<std::vector<double>> gb(n), ga(n);
    for (int m = 0; m < n; ++m) {
        std::vector<double> b(std::size_t(n_side * big_r)), a(std::size_t(big_r * n_side));
        for (double& v : b) v = uniform();
        for (double& v : a) v = uniform();
        if (m % 3 == 1)  // the second half of A is zero: Ga singular (a zero pivot), the eigen route
            std::fill(a.begin() + big_r / 2 * n_side, a.end(), 0.0);
        gb[m].assign(std::size_t(big_r * big_r), 0.0), ga[m].assign(std::size_t(big_r * big_r), 0.0);
        for (i64 i = 0; i < big_r; ++i)
            for (i64 j = 0; j < big_r; ++j)
                for (i64 k = 0; k < n_side; ++k) {
                    gb[m][std::size_t(i * big_r + j)] += b[std::size_t(k * big_r + i)] * b[std::size_t(k * big_r + j)];
                    ga[m][std::size_t(i * big_r + j)] += a[std::size_t(i * n_side + k)] * a[std::size_t(j * n_side + k)];
                }
        if (m % 3 == 2) gb[m][1] = std::numeric_limits<double>::quiet_NaN();
    }
    auto solve = [&](bool batched, std::vector<int>& routes) {
        std::vector<double> out(std::size_t(n * 2 * big_r * rank + n * rank), -7.0);
        std::vector<kmf::GramSvdTask> tasks(static_cast<std::size_t>(n));
        for (int m = 0; m < n; ++m) {
            kmf::GramSvdTask& t = tasks[std::size_t(m)];
            t.gb = gb[m].data(), t.ga = ga[m].data(), t.big_r = big_r;
            t.t_b = out.data() + m * 2 * big_r * rank, t.t_a = t.t_b + big_r * rank;
            t.sigma2 = out.data() + n * 2 * big_r * rank + m * rank;
        }
        if (batched) {
            kmf::gram_svd(tasks, rank, 3);
        } else {
            kmf::GramSvdWork wk;
            for (kmf::GramSvdTask& t : tasks) kmf::gram_svd_one(t, rank, wk);
        }
        for (const kmf::GramSvdTask& t : tasks) routes.push_back(t.route);
        return out;
    };
    std::vector<int> seq_routes, par_routes;
    const std::vector<double> seq = solve(false, seq_routes), par = solve(true, par_routes);
    for (int m = 0; m < n; ++m) {
        g_case = fmt("gram_svd batch module %d", m);
        const int want = m % 3 == 0 ? kmf::kRouteCholesky : m % 3 == 1 ? kmf::kRouteEigen : kmf::kRouteFailed;
        CHECK(seq_routes[std::size_t(m)] == want && par_routes[std::size_t(m)] == want, "routes %d / %d, want %d",
              seq_routes[std::size_t(m)], par_routes[std::size_t(m)], want);
        if (want == kmf::kRouteFailed) continue;  // its transforms are unspecified
        const i64 base = m * 2 * big_r * rank;
        for (i64 i = 0; i < 2 * big_r * rank; ++i)
            CHECK(std::memcmp(&seq[std::size_t(base + i)], &par[std::size_t(base + i)], sizeof(double)) == 0,
                  "transform entry %lld: %a vs %a", (long long)i, seq[std::size_t(base + i)], par[std::size_t(base + i)]);
    }
}

constexpr Test kTests[] = {
    {"dtype", test_dtype},         {"copy", test_copy},           {"finite", test_finite},       {"weighted_sum", test_weighted_sum},
    {"gram", test_gram},           {"apply", test_apply},         {"dense_stats", test_dense_stats}, {"dense_merge", test_dense_merge},
    {"abs_kth", test_abs_kth},     {"sym_eig", test_sym_eig},     {"truncate", test_truncate},
    {"gram_svd", test_gram_svd_batch},
};

}  // namespace

int main(int argc, char** argv) {
    const char* small = std::getenv("KMF_TEST_SMALL");
    g_small = small && *small && std::strcmp(small, "0") != 0;
    if (const char* seed = std::getenv("KMF_TEST_SEED")) g_rng.seed(std::strtoull(seed, nullptr, 10));
    std::vector<std::string> wanted(argv + 1, argv + argc);
    int ran = 0, failed_tests = 0;
    for (const Test& t : kTests) {
        if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), t.name) == wanted.end()) continue;
        const long f0 = g_failures, c0 = g_checks;
        g_printed = 0;
        g_case = t.name;
        t.fn();
        ++ran;
        const long f = g_failures - f0;
        failed_tests += f > 0;
        std::printf("%-14s %s (%ld checks, %ld failed)\n", t.name, f ? "FAILED" : "ok", g_checks - c0, f);
    }
    if (ran == 0) {
        std::printf("no test named");
        for (const std::string& w : wanted) std::printf(" %s", w.c_str());
        std::printf("; tests:");
        for (const Test& t : kTests) std::printf(" %s", t.name);
        std::printf("\n");
        return 2;
    }
    std::fflush(stdout);
    return failed_tests ? 1 : 0;
}
