// Tests of the C API (csrc/include/kmerge_fast.h) through the static library
// kmerge_fast_c: the status code of every kind of bad argument, and results
// against a float64 / long double truth computed here over the four dtypes,
// odd shapes and padded rows (similarity: dense cosines; truncation: the
// Eckart-Young optimality of the result, from a Jacobi SVD of the dense sum;
// linear merge: bit-equal to an emulation of torch's float32 / float64
// roundings). Dtype conversions come from the core's dtype.h (tested there).
//
// Usage: kmerge_capi_tests [errors] [similarity] [truncate] [linear]   (default: all)
// Compiled with -ffp-contract=off: the emulation must round every product.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kmerge_fast.h"

namespace {

using i64 = std::int64_t;
using ld = long double;

long g_checks = 0, g_failures = 0;
std::string g_case;
std::mt19937_64 g_rng(12345);

void check(bool ok, const std::string& msg) {
    ++g_checks;
    if (!ok && g_failures++ < 30) std::printf("  FAIL [%s] %s\n", g_case.c_str(), msg.c_str());
}

double uniform() { return std::uniform_real_distribution<double>(-1.0, 1.0)(g_rng); }

// ------------------------------------------------------------------ matrices of any dtype

double decode(const void* p, int dtype) {
    switch (dtype) {
        case KMF_F32: return *static_cast<const float*>(p);
        case KMF_F16: return kmf::half_to_float(*static_cast<const std::uint16_t*>(p));
        case KMF_BF16: return kmf::bf16_to_float(*static_cast<const std::uint16_t*>(p));
        default: return *static_cast<const double*>(p);
    }
}

/// Stores v rounded to the dtype (nearest even).
void encode(void* p, int dtype, double v) {
    switch (dtype) {
        case KMF_F32: *static_cast<float*>(p) = static_cast<float>(v); break;
        case KMF_F16: *static_cast<std::uint16_t*>(p) = kmf::to_half(v); break;
        case KMF_BF16: *static_cast<std::uint16_t*>(p) = kmf::to_bf16(v); break;
        default: *static_cast<double*>(p) = v;
    }
}

/// A rows x cols matrix with `pad` unused elements after each row.
struct Buf {
    std::vector<unsigned char> mem;  // operator new's alignment (>= 8); char storage may hold any element type
    kmf_matrix m{};
    Buf() = default;
    Buf(int dtype, i64 rows, i64 cols, i64 pad = 0) {
        m.dtype = dtype, m.rows = rows, m.cols = cols, m.row_stride = cols + pad;
        mem.assign(static_cast<std::size_t>(rows * (cols + pad) * kmf::elem_size(dtype)), 0);
        m.data = mem.data();
    }
    Buf(const Buf& o) : mem(o.mem), m(o.m) { m.data = mem.data(); }
    Buf& operator=(const Buf& o) {
        mem = o.mem, m = o.m, m.data = mem.data();
        return *this;
    }
    void* at(i64 i, i64 j) const { return static_cast<char*>(m.data) + (i * m.row_stride + j) * kmf::elem_size(m.dtype); }
    double get(i64 i, i64 j) const { return decode(at(i, j), m.dtype); }
    void set(i64 i, i64 j, double v) { encode(at(i, j), m.dtype, v); }
    void fill(double scale) {
        for (i64 i = 0; i < m.rows; ++i)
            for (i64 j = 0; j < m.cols; ++j) set(i, j, scale * uniform());
    }
};

/// An adapter owning its buffers.
struct Ad {
    std::vector<Buf> a, b;
    std::vector<kmf_module> mods;
    kmf_adapter view{};
    /// shapes: (n_out, n_in) per module; ranks per module.
    Ad(const std::vector<std::pair<i64, i64>>& shapes, const std::vector<i64>& ranks, int dtype, double scale = 1.0,
       double scaling = 1.0, i64 pad = 0) {
        for (std::size_t m = 0; m < shapes.size(); ++m) {
            a.emplace_back(dtype, ranks[m], shapes[m].second, pad);
            b.emplace_back(dtype, shapes[m].first, ranks[m], pad);
            a.back().fill(scale);
            b.back().fill(scale);
        }
        for (std::size_t m = 0; m < shapes.size(); ++m) mods.push_back({a[m].m, b[m].m, scaling});
        view = {mods.data(), mods.size()};
    }
    Ad(const Ad&) = delete;
    /// Points the module structs at the buffers again (after editing a buffer's descriptor).
    void sync() {
        for (std::size_t m = 0; m < mods.size(); ++m) mods[m].a = a[m].m, mods[m].b = b[m].m;
    }
};

/// scaling * B A of module m, dense, long double.
std::vector<ld> dense(const Ad& x, std::size_t m, ld coef = 1) {
    const Buf &A = x.a[m], &B = x.b[m];
    std::vector<ld> w(static_cast<std::size_t>(B.m.rows * A.m.cols), 0);
    for (i64 i = 0; i < B.m.rows; ++i)
        for (i64 j = 0; j < A.m.cols; ++j) {
            ld s = 0;
            for (i64 p = 0; p < A.m.rows; ++p) s += ld(B.get(i, p)) * ld(A.get(p, j));
            w[static_cast<std::size_t>(i * A.m.cols + j)] = coef * ld(x.mods[m].scaling) * s;
        }
    return w;
}

ld dotl(const std::vector<ld>& x, const std::vector<ld>& y) {
    ld s = 0;
    for (std::size_t i = 0; i < x.size(); ++i) s += x[i] * y[i];
    return s;
}

/// Squared singular values (descending) of the rows x cols row-major w: one-sided Jacobi.
std::vector<ld> sigma2(const std::vector<ld>& w, i64 rows, i64 cols) {
    std::vector<std::vector<ld>> c(static_cast<std::size_t>(cols), std::vector<ld>(static_cast<std::size_t>(rows)));
    for (i64 i = 0; i < rows; ++i)
        for (i64 j = 0; j < cols; ++j) c[j][i] = w[static_cast<std::size_t>(i * cols + j)];
    ld total = 0;
    for (const ld v : w) total += v * v;
    for (int sweep = 0; sweep < 80; ++sweep) {
        ld off = 0;
        for (i64 p = 0; p < cols; ++p)
            for (i64 q = p + 1; q < cols; ++q) {
                const ld a = dotl(c[p], c[p]), b = dotl(c[q], c[q]), g = dotl(c[p], c[q]);
                // columns at rounding level of the whole matrix are zeros of its rank
                if (a <= 1e-32L * total || b <= 1e-32L * total || std::fabs(g) <= 1e-18L * std::sqrt(a * b)) continue;
                off = std::max(off, std::fabs(g) / std::sqrt(a * b));
                const ld zeta = (b - a) / (2 * g);
                const ld t = (zeta >= 0 ? 1 : -1) / (std::fabs(zeta) + std::sqrt(1 + zeta * zeta));
                const ld cs = 1 / std::sqrt(1 + t * t), sn = cs * t;
                for (i64 i = 0; i < rows; ++i) {
                    const ld xi = c[p][i], yi = c[q][i];
                    c[p][i] = cs * xi - sn * yi;
                    c[q][i] = sn * xi + cs * yi;
                }
            }
        if (off < 1e-17L) break;
    }
    std::vector<ld> s;
    for (auto& col : c) s.push_back(dotl(col, col));
    std::sort(s.begin(), s.end(), [](ld x, ld y) { return x > y; });
    return s;
}

const char* dname(int d) { return d == KMF_F32 ? "f32" : d == KMF_F16 ? "f16" : d == KMF_BF16 ? "bf16" : "f64"; }

double unit(int d) { return kmf::unit_roundoff(d); }

// ------------------------------------------------------------------ errors

/// The status of a call and that err says the same and names something.
void expect_status(int got, const kmf_error& err, int want, const std::string& what) {
    check(got == want, what + ": status " + std::to_string(got) + " (" + kmf_status_name(got) + "), expected " +
                           std::to_string(want) + " (" + kmf_status_name(want) + "); message: " + err.message);
    check(err.code == got, what + ": err.code differs from the status");
    if (want != KMF_OK) check(std::strlen(err.message) > 0, what + ": empty message");
}

void test_errors() {
    const std::vector<std::pair<i64, i64>> shapes{{12, 10}, {7, 9}};
    Ad x(shapes, {3, 2}, KMF_F32), y(shapes, {4, 2}, KMF_F32), z(shapes, {3, 2}, KMF_F32);
    Ad out(shapes, {3, 2}, KMF_F32);
    kmf_error err;
    double sim[2];
    const kmf_adapter slots[2] = {y.view, z.view};
    const double w[2] = {0.5, 0.5};

    check(std::string(kmf_version()) == std::to_string(KMF_API_VERSION_MAJOR) + "." + std::to_string(KMF_API_VERSION_MINOR) + "." +
                                            std::to_string(KMF_API_VERSION_PATCH), "version string");
    check(kmf_api_version() == KMF_API_VERSION, "api version");
    check(std::string(kmf_status_name(KMF_ERR_ALIAS)) == "alias" && std::string(kmf_status_name(999)) == "unknown", "status names");

    expect_status(kmf_similarity(&x.view, slots, 2, KMF_METRIC_COS, 0, sim, &err), err, KMF_OK, "similarity ok");
    expect_status(kmf_similarity(nullptr, slots, 2, KMF_METRIC_COS, 0, sim, &err), err, KMF_ERR_NULL, "null newcomer");
    expect_status(kmf_similarity(&x.view, nullptr, 2, KMF_METRIC_COS, 0, sim, &err), err, KMF_ERR_NULL, "null slots");
    expect_status(kmf_similarity(&x.view, slots, 2, KMF_METRIC_COS, 0, nullptr, &err), err, KMF_ERR_NULL, "null out");
    expect_status(kmf_similarity(&x.view, nullptr, 0, KMF_METRIC_COS, 0, nullptr, &err), err, KMF_OK, "k = 0");
    expect_status(kmf_similarity(&x.view, slots, 2, 1, 0, sim, &err), err, KMF_ERR_UNSUPPORTED, "metric");
    expect_status(kmf_similarity(&x.view, slots, 2, KMF_METRIC_COS, -1, sim, &err), err, KMF_ERR_VALUE, "threads < 0");
    check(kmf_similarity(nullptr, slots, 2, KMF_METRIC_COS, 0, sim, nullptr) == KMF_ERR_NULL, "err may be NULL");

    auto with = [&](Ad& ad, auto edit, int want, const std::string& what) {
        const kmf_module saved = ad.mods[1];
        edit(ad.mods[1]);
        expect_status(kmf_similarity(&x.view, slots, 2, KMF_METRIC_COS, 0, sim, &err), err, want, "similarity " + what);
        check(std::strstr(err.message, "module 1") != nullptr, what + ": message names the module: " + err.message);
        ad.mods[1] = saved;
    };
    with(x, [](kmf_module& m) { m.a.data = nullptr; }, KMF_ERR_NULL, "null data");
    with(y, [](kmf_module& m) { m.b.dtype = 7; }, KMF_ERR_DTYPE, "bad dtype");
    with(z, [](kmf_module& m) { m.a.rows = 0; }, KMF_ERR_SHAPE, "zero rows");
    with(x, [](kmf_module& m) { m.a.row_stride = m.a.cols - 1; }, KMF_ERR_STRIDE, "row_stride < cols");
    with(x, [](kmf_module& m) { m.a.row_stride = std::int64_t(1) << 60; }, KMF_ERR_STRIDE, "huge stride");
    with(x, [](kmf_module& m) { m.a.data = static_cast<char*>(m.a.data) + 2; }, KMF_ERR_ALIGN, "misaligned");
    with(y, [](kmf_module& m) { m.b.cols = 1; }, KMF_ERR_RANK, "B.cols != A.rows");
    with(z, [](kmf_module& m) { m.a.cols = 8; }, KMF_ERR_SHAPE, "n_in differs from the newcomer's");
    with(x, [](kmf_module& m) { m.scaling = NAN; }, KMF_ERR_VALUE, "NaN scaling");
    with(z, [](kmf_module& m) { m.b.reserved = 1; }, KMF_ERR_VALUE, "reserved != 0");
    with(x, [](kmf_module& m) { static_cast<float*>(m.b.data)[3] = INFINITY; }, KMF_ERR_NONFINITE, "inf entry");
    static_cast<float*>(x.b[1].m.data)[3] = 0.25f;
    {
        kmf_adapter fewer = z.view;
        fewer.n_modules = 1;
        const kmf_adapter bad[2] = {y.view, fewer};
        expect_status(kmf_similarity(&x.view, bad, 2, KMF_METRIC_COS, 0, sim, &err), err, KMF_ERR_SHAPE, "module count");
        fewer.modules = nullptr;
        const kmf_adapter bad2[2] = {y.view, fewer};
        expect_status(kmf_similarity(&x.view, bad2, 2, KMF_METRIC_COS, 0, sim, &err), err, KMF_ERR_NULL, "null modules");
    }

    // truncation
    const kmf_adapter terms[2] = {x.view, z.view};
    expect_status(kmf_truncate(terms, 2, w, &out.view, 0, &err), err, KMF_OK, "truncate ok");
    expect_status(kmf_truncate(terms, 0, w, &out.view, 0, &err), err, KMF_ERR_VALUE, "no terms");
    expect_status(kmf_truncate(terms, 2, nullptr, &out.view, 0, &err), err, KMF_ERR_NULL, "null coefs");
    expect_status(kmf_truncate(terms, 2, w, nullptr, 0, &err), err, KMF_ERR_NULL, "null out");
    const double bad_w[2] = {0.5, INFINITY};
    expect_status(kmf_truncate(terms, 2, bad_w, &out.view, 0, &err), err, KMF_ERR_VALUE, "inf coef");
    {
        Ad big(shapes, {8, 2}, KMF_F32);  // rank 8 <= min(12, 10), above the stacked rank 6
        Ad too(shapes, {3, 8}, KMF_F32);  // rank 8 > min(7, 9)
        expect_status(kmf_truncate(terms, 2, w, &too.view, 0, &err), err, KMF_ERR_RANK, "rank > min(n_out, n_in)");
        expect_status(kmf_truncate(terms, 2, w, &big.view, 0, &err), err, KMF_OK, "rank above the stacked rank");
        Ad wrong({{12, 10}, {7, 8}}, {3, 2}, KMF_F32);
        expect_status(kmf_truncate(terms, 2, w, &wrong.view, 0, &err), err, KMF_ERR_SHAPE, "out shape");
    }
    out.mods[0].scaling = 0.0;
    expect_status(kmf_truncate(terms, 2, w, &out.view, 0, &err), err, KMF_ERR_VALUE, "out scaling 0");
    out.mods[0].scaling = 1.0;
    {
        kmf_module saved = out.mods[1];
        out.mods[1].b = z.mods[0].a;  // an output on an input (shape-compatible? use a view into z's A)
        out.mods[1].b.rows = 7, out.mods[1].b.cols = 2, out.mods[1].b.row_stride = 2;
        expect_status(kmf_truncate(terms, 2, w, &out.view, 0, &err), err, KMF_ERR_ALIAS, "output overlaps an input");
        out.mods[1].b = out.mods[0].a;  // two outputs on one buffer
        out.mods[1].b.rows = 7, out.mods[1].b.cols = 2, out.mods[1].b.row_stride = 2;
        expect_status(kmf_truncate(terms, 2, w, &out.view, 0, &err), err, KMF_ERR_ALIAS, "outputs overlap");
        out.mods[1] = saved;
    }
    {
        Ad half_out(shapes, {3, 2}, KMF_F16);
        Ad huge(shapes, {3, 2}, KMF_F32, 1e6);
        const kmf_adapter hterms[1] = {huge.view};
        const double one = 1.0;
        expect_status(kmf_truncate(hterms, 1, &one, &half_out.view, 0, &err), err, KMF_ERR_OVERFLOW, "truncate overflow f16");
    }

    // linear merge
    const kmf_adapter pair[2] = {x.view, z.view};
    expect_status(kmf_linear_merge(pair, 2, w, &out.view, 0, &err), err, KMF_OK, "linear ok");
    expect_status(kmf_linear_merge(pair, 0, w, &out.view, 0, &err), err, KMF_ERR_VALUE, "linear n = 0");
    expect_status(kmf_linear_merge(pair, 2, nullptr, &out.view, 0, &err), err, KMF_ERR_NULL, "linear null weights");
    const kmf_adapter unequal[2] = {x.view, y.view};
    expect_status(kmf_linear_merge(unequal, 2, w, &out.view, 0, &err), err, KMF_ERR_RANK, "linear unequal ranks");
    expect_status(kmf_linear_merge(pair, 2, bad_w, &out.view, 0, &err), err, KMF_ERR_VALUE, "linear inf weight");
    expect_status(kmf_linear_merge(pair, 2, w, &out.view, -3, &err), err, KMF_ERR_VALUE, "linear threads");
    {
        Ad wide(shapes, {3, 2}, KMF_F64);
        const kmf_adapter mixed[2] = {x.view, wide.view};
        expect_status(kmf_linear_merge(mixed, 2, w, &out.view, 0, &err), err, KMF_ERR_DTYPE, "f64 input, f32 output");
        Ad half_out(shapes, {3, 2}, KMF_F16);
        Ad huge(shapes, {3, 2}, KMF_F32, 1e6);
        const kmf_adapter hp[2] = {huge.view, huge.view};
        expect_status(kmf_linear_merge(hp, 2, w, &half_out.view, 0, &err), err, KMF_ERR_OVERFLOW, "linear overflow f16");
        const kmf_adapter self[1] = {out.view};
        expect_status(kmf_linear_merge(self, 1, w, &out.view, 0, &err), err, KMF_ERR_ALIAS, "linear in place");
    }
}

// ------------------------------------------------------------------ results

const int kDtypes[] = {KMF_F32, KMF_F16, KMF_BF16, KMF_F64};
const std::vector<std::pair<i64, i64>> kShapes{{37, 53}, {1, 29}, {64, 17}, {5, 5}};

void test_similarity() {
    for (int dt : kDtypes) {
        for (double scale : {1.0, 0x1p-40, 0x1p+40}) {
            if (dt == KMF_F16 && scale != 1.0) continue;  // out of half's range
            g_case = std::string("similarity ") + dname(dt) + " scale " + std::to_string(scale);
            Ad x(kShapes, {3, 1, 5, 2}, dt, scale, 2.0, 3);
            std::vector<Ad*> ys;
            Ad y0(kShapes, {4, 1, 2, 5}, dt, scale, 0.5);
            Ad y1(kShapes, {3, 1, 5, 2}, dt, scale, -1.0, 1);
            Ad y2(kShapes, {1, 2, 3, 4}, dt, scale, 1.0);
            // y3 = x itself with another scaling (cos 1), y4 zero in module 2 (cos 0 there)
            Ad y3(kShapes, {3, 1, 5, 2}, dt, scale, 3.0, 3);
            for (std::size_t m = 0; m < kShapes.size(); ++m) y3.a[m] = x.a[m], y3.b[m] = x.b[m];
            y3.sync();
            Ad y4(kShapes, {2, 2, 2, 2}, dt, scale, 1.0);
            y4.b[2].fill(0.0);
            y4.sync();
            ys = {&y0, &y1, &y2, &y3, &y4};
            std::vector<kmf_adapter> views;
            for (Ad* y : ys) views.push_back(y->view);
            std::vector<double> sim(ys.size(), -7.0);
            kmf_error err;
            const int st = kmf_similarity(&x.view, views.data(), views.size(), KMF_METRIC_COS, 0, sim.data(), &err);
            check(st == KMF_OK, std::string("status: ") + err.message);
            for (std::size_t j = 0; j < ys.size(); ++j) {
                ld mean = 0;
                for (std::size_t m = 0; m < kShapes.size(); ++m) {
                    const std::vector<ld> dx = dense(x, m), dy = dense(*ys[j], m);
                    const ld nx = dotl(dx, dx), ny = dotl(dy, dy);
                    mean += (nx > 0 && ny > 0) ? dotl(dx, dy) / std::sqrt(nx * ny) : 0;
                }
                mean /= ld(kShapes.size());
                check(std::fabs(ld(sim[j]) - mean) <= 1e-12L, "slot " + std::to_string(j) + ": " + std::to_string(sim[j]) +
                                                                   " vs " + std::to_string(double(mean)));
            }
            check(std::fabs(sim[3] - 1.0) <= 1e-12, "identical updates have cos 1");
        }
    }
}

void test_truncate() {
    for (int in_dt : kDtypes)
        for (int out_dt : kDtypes) {
            for (double scale : {1.0, 0x1p-60, 0x1p+50}) {
                if ((in_dt == KMF_F16 || out_dt == KMF_F16) && scale != 1.0) continue;
                if (scale != 1.0 && in_dt != out_dt) continue;
                g_case = std::string("truncate ") + dname(in_dt) + " -> " + dname(out_dt) + " scale " + std::to_string(scale);
                Ad t0(kShapes, {3, 1, 5, 2}, in_dt, scale, 2.0, 1);
                Ad t1(kShapes, {4, 2, 2, 3}, in_dt, scale, -0.5);
                Ad t2(kShapes, {2, 1, 1, 4}, in_dt, scale, 1.0, 2);
                const std::vector<i64> ranks{2, 1, 4, 3};
                Ad out(kShapes, ranks, out_dt, 1.0, 4.0, 1);  // out scaling 4: B'A' = M / 4
                const kmf_adapter terms[3] = {t0.view, t1.view, t2.view};
                const double coefs[3] = {0.7, 1.3, -0.25};
                kmf_error err;
                const int st = kmf_truncate(terms, 3, coefs, &out.view, 1 + int(g_rng() % 3), &err);
                check(st == KMF_OK, std::string("status: ") + err.message);
                if (st != KMF_OK) continue;
                // fast (float32) Grams and rebuilds aim at 1e-5; plus the output rounding
                const ld tol = 2e-5L + 8 * ld(std::max(unit(out_dt), unit(in_dt)));
                for (std::size_t m = 0; m < kShapes.size(); ++m) {
                    const i64 n_out = kShapes[m].first, n_in = kShapes[m].second, r = ranks[m];
                    std::vector<ld> w = dense(t0, m, coefs[0]), w1 = dense(t1, m, coefs[1]), w2 = dense(t2, m, coefs[2]);
                    for (std::size_t i = 0; i < w.size(); ++i) w[i] += w1[i] + w2[i];
                    const std::vector<ld> s2 = sigma2(w, n_out, n_in);
                    ld top = 0, total = 0;
                    for (std::size_t i = 0; i < s2.size(); ++i) total += s2[i], top += i < std::size_t(r) ? s2[i] : 0;
                    const std::vector<ld> approx = dense(out, m);
                    ld resid = 0;
                    for (std::size_t i = 0; i < w.size(); ++i) resid += (w[i] - approx[i]) * (w[i] - approx[i]);
                    const std::string at = "module " + std::to_string(m);
                    check(std::fabs(resid - (total - top)) <= tol * total,
                          at + ": residual " + std::to_string(double(resid / total)) + " vs tail " + std::to_string(double((total - top) / total)));
                    for (i64 p = 0; p < r; ++p)
                        for (i64 q = 0; q < r; ++q) {
                            ld g = 0;
                            for (i64 j = 0; j < n_in; ++j) g += ld(out.a[m].get(p, j)) * ld(out.a[m].get(q, j));
                            check(std::fabs(g - (p == q)) <= tol * 4, at + ": A' rows orthonormal");
                        }
                }
            }
        }
}

/// torch's (c0 x0) + (c1 x1) in T, then one rounding to the output dtype: the expected bits.
template <typename T>
double emulate(const std::vector<double>& coefs, const std::vector<double>& xs) {
    T acc = static_cast<T>(coefs[0]) * static_cast<T>(xs[0]);
    for (std::size_t k = 1; k < xs.size(); ++k) acc = acc + static_cast<T>(coefs[k]) * static_cast<T>(xs[k]);
    return static_cast<double>(acc);
}

void test_linear() {
    for (int d0 : kDtypes)
        for (int d1 : kDtypes)
            for (int out_dt : kDtypes) {
                const bool wide = out_dt == KMF_F64;
                if ((d0 == KMF_F64 || d1 == KMF_F64) && !wide) continue;  // an error (tested above)
                g_case = std::string("linear ") + dname(d0) + " + " + dname(d1) + " -> " + dname(out_dt);
                const std::vector<i64> ranks{3, 1, 5, 2};
                Ad x0(kShapes, ranks, d0, 1.0, 2.0, 1), x1(kShapes, ranks, d1, 1.0, 0.5);
                Ad out(kShapes, ranks, out_dt, 1.0, 1.0, 2);
                const double weights[2] = {2.0 / 3.0, -1.0 / 3.0};
                const kmf_adapter pair[2] = {x0.view, x1.view};
                kmf_error err;
                const int st = kmf_linear_merge(pair, 2, weights, &out.view, 0, &err);
                check(st == KMF_OK, std::string("status: ") + err.message);
                std::vector<double> wa, wb;
                for (const Ad* x : {&x0, &x1}) {
                    const double ws = weights[x == &x0 ? 0 : 1] * x->mods[0].scaling;
                    wb.push_back(std::sqrt(std::fabs(ws)));
                    wa.push_back(std::copysign(wb.back(), ws));
                }
                long bad = 0;
                for (std::size_t m = 0; m < kShapes.size(); ++m)
                    for (int f = 0; f < 2; ++f) {
                        const Buf& o = f ? out.b[m] : out.a[m];
                        const Buf& s0 = f ? x0.b[m] : x0.a[m];
                        const Buf& s1 = f ? x1.b[m] : x1.a[m];
                        const std::vector<double>& c = f ? wb : wa;
                        for (i64 i = 0; i < o.m.rows; ++i)
                            for (i64 j = 0; j < o.m.cols; ++j) {
                                const std::vector<double> xs{s0.get(i, j), s1.get(i, j)};
                                const double v = wide ? emulate<double>(c, xs) : emulate<float>(c, xs);
                                alignas(8) unsigned char want[8] = {0}, got[8] = {0};
                                encode(want, out_dt, v);
                                std::memcpy(got, o.at(i, j), static_cast<std::size_t>(kmf::elem_size(out_dt)));
                                bad += std::memcmp(want, got, sizeof want) != 0;
                            }
                    }
                check(bad == 0, std::to_string(bad) + " elements differ from the emulation");
            }
}

struct Test {
    const char* name;
    void (*fn)();
};
const Test kTests[] = {{"errors", test_errors}, {"similarity", test_similarity}, {"truncate", test_truncate}, {"linear", test_linear}};

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> wanted(argv + 1, argv + argc);
    int failed = 0, ran = 0;
    for (const Test& t : kTests) {
        if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), t.name) == wanted.end()) continue;
        const long f0 = g_failures, c0 = g_checks;
        g_case = t.name;
        t.fn();
        ++ran;
        failed += g_failures > f0;
        std::printf("%-12s %s (%ld checks, %ld failed)\n", t.name, g_failures > f0 ? "FAILED" : "ok", g_checks - c0, g_failures - f0);
    }
    if (ran == 0) {
        std::printf("no such test\n");
        return 2;
    }
    return failed ? 1 : 0;
}
