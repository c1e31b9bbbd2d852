// The C API (csrc/include/kmerge_fast.h) over the core: argument checks, the
// kernels' task descriptions built from the caller's plain structs, and every
// C++ exception turned into a status code and message at the boundary.
#include "kmerge_fast.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "core/copy.h"
#include "core/dtype.h"
#include "core/finite.h"
#include "core/gram.h"
#include "core/gram_svd.h"
#include "core/mat.h"
#include "core/truncate.h"
#include "core/weighted_sum.h"

static_assert(int(KMF_F32) == int(kmf::kF32) && int(KMF_F16) == int(kmf::kF16) && int(KMF_BF16) == int(kmf::kBF16) &&
                  int(KMF_F64) == int(kmf::kF64),
              "the C API's dtype codes are the core's");

namespace {

#define KMF_STR2(x) #x
#define KMF_STR(x) KMF_STR2(x)
constexpr const char* kVersionText =
    KMF_STR(KMF_API_VERSION_MAJOR) "." KMF_STR(KMF_API_VERSION_MINOR) "." KMF_STR(KMF_API_VERSION_PATCH);

/// An argument error: thrown inside, reported as (code, message) at the boundary.
struct Failure {
    int code;
    std::string message;
};

[[noreturn]] void fail(int code, std::string message) { throw Failure{code, std::move(message)}; }

void set_error(kmf_error* err, int code, const char* message) {
    if (!err) return;
    err->code = code;
    std::snprintf(err->message, sizeof err->message, "%s", message);
}

/// Runs body() and turns whatever it throws into a status (the only way out of the API).
template <typename Body>
int guarded(kmf_error* err, const char* fn, Body body) noexcept {
    try {
        body();
        set_error(err, KMF_OK, "");
        return KMF_OK;
    } catch (const Failure& f) {
        set_error(err, f.code, (std::string(fn) + ": " + f.message).c_str());
        return f.code;
    } catch (const std::bad_alloc&) {
        set_error(err, KMF_ERR_NOMEM, (std::string(fn) + ": out of memory").c_str());
        return KMF_ERR_NOMEM;
    } catch (const std::exception& e) {
        // Building the message may itself throw bad_alloc: fall back to the static text.
        try {
            set_error(err, KMF_ERR_INTERNAL, (std::string(fn) + ": internal error: " + e.what()).c_str());
        } catch (...) {
            set_error(err, KMF_ERR_INTERNAL, "internal error");
        }
        return KMF_ERR_INTERNAL;
    } catch (...) {
        set_error(err, KMF_ERR_INTERNAL, "internal error (unknown exception)");
        return KMF_ERR_INTERNAL;
    }
}

std::string num(std::int64_t v) { return std::to_string(v); }
std::string shape(std::int64_t r, std::int64_t c) { return num(r) + " x " + num(c); }

void check_threads(int threads) {
    if (threads < 0) fail(KMF_ERR_VALUE, "threads must be >= 0 (0 = all hardware threads), got " + num(threads));
}

template <typename T>
void need(const T* p, const std::string& what) {
    if (!p) fail(KMF_ERR_NULL, what + " is NULL");
}

/// One kmf_matrix, checked, as a core Mat (column stride 1).
kmf::Mat to_mat(const kmf_matrix& m, const std::string& what) {
    if (!kmf::valid_dtype(m.dtype))
        fail(KMF_ERR_DTYPE, what + ": unknown dtype code " + num(m.dtype) + " (expected " + kmf::codes_text(kmf::kDTypeCodes) + ")");
    if (m.reserved != 0) fail(KMF_ERR_VALUE, what + ": reserved must be 0");
    if (m.rows < 1 || m.cols < 1) fail(KMF_ERR_SHAPE, what + ": shape " + shape(m.rows, m.cols) + " (rows and cols must be >= 1)");
    if (m.row_stride < m.cols)
        fail(KMF_ERR_STRIDE, what + ": row_stride " + num(m.row_stride) + " is below cols " + num(m.cols));
    // Every byte offset, and the products the kernels form from the sizes, must fit far inside int64.
    const double span = (double(m.rows - 1) * double(m.row_stride) + double(m.cols)) * 8.0;
    if (span >= 4.0e18) fail(KMF_ERR_STRIDE, what + ": the matrix spans too many bytes");
    if (!m.data) fail(KMF_ERR_NULL, what + ": data is NULL");
    const int es = kmf::elem_size(m.dtype);
    if (reinterpret_cast<std::uintptr_t>(m.data) % static_cast<std::uintptr_t>(es) != 0)
        fail(KMF_ERR_ALIGN, what + ": data is not aligned to its " + kmf::dtype_name(m.dtype) + " element size");
    kmf::Mat out;
    out.ptr = m.data;
    out.dtype = m.dtype;
    out.rows = m.rows, out.cols = m.cols;
    out.rs = m.row_stride, out.cs = 1;
    return out;
}

kmf::Mat transposed(kmf::Mat m) {
    std::swap(m.rows, m.cols);
    std::swap(m.rs, m.cs);
    return m;
}

kmf::Mat with_coef(kmf::Mat m, double coef) {
    m.coef = coef;
    return m;
}

/// Bytes [first, last) a matrix covers (row-major, cs = 1, rs >= cols).
struct Extent {
    std::uintptr_t first, last;
    bool output;
    std::string what;
};

Extent extent(const kmf::Mat& m, bool output, std::string what) {
    const std::uintptr_t p = reinterpret_cast<std::uintptr_t>(m.ptr);
    const std::uintptr_t bytes = static_cast<std::uintptr_t>(((m.rows - 1) * m.rs + m.cols) * kmf::elem_size(m.dtype));
    return {p, p + bytes, output, std::move(what)};
}

/// No output may overlap an input or another output (inputs may share memory).
void check_no_alias(std::vector<Extent> ex) {
    std::sort(ex.begin(), ex.end(), [](const Extent& a, const Extent& b) { return a.first < b.first; });
    // Sweep: remember the extent reaching furthest so far, and the furthest output.
    const Extent* far = nullptr;
    const Extent* far_out = nullptr;
    for (const Extent& e : ex) {
        const Extent* hit = nullptr;
        if (e.output && far && far->last > e.first) hit = far;
        else if (!e.output && far_out && far_out->last > e.first) hit = far_out;
        if (hit) fail(KMF_ERR_ALIAS, e.what + " overlaps " + hit->what);
        if (!far || e.last > far->last) far = &e;
        if (e.output && (!far_out || e.last > far_out->last)) far_out = &e;
    }
}

std::string mod_name(const std::string& adapter, std::size_t m) { return adapter + " module " + std::to_string(m); }

/// An adapter pointer, checked: non-null, modules non-null when any.
const kmf_adapter& adapter_ref(const kmf_adapter* a, const std::string& what) {
    need(a, what);
    if (a->n_modules > 0) need(a->modules, what + " modules");
    return *a;
}

/// The (A, B) of one module as core Mats, checked against each other and against n_out x n_in
/// (n_out = n_in = 0: not known yet, taken from this module).
struct Factors {
    kmf::Mat a, b;
    double scaling = 1.0;
    std::int64_t rank() const { return a.rows; }
};

Factors factors(const kmf_module& m, const std::string& what, std::int64_t n_out, std::int64_t n_in) {
    Factors f;
    f.a = to_mat(m.a, what + " A");
    f.b = to_mat(m.b, what + " B");
    f.scaling = m.scaling;
    if (f.a.rows != f.b.cols)
        fail(KMF_ERR_RANK, what + ": A is " + shape(f.a.rows, f.a.cols) + ", B is " + shape(f.b.rows, f.b.cols) +
                               " (B.cols must equal A.rows, the rank)");
    if (n_out > 0 && (f.b.rows != n_out || f.a.cols != n_in))
        fail(KMF_ERR_SHAPE, what + ": the update is " + shape(f.b.rows, f.a.cols) + ", expected " + shape(n_out, n_in));
    if (!std::isfinite(f.scaling)) fail(KMF_ERR_VALUE, what + ": scaling is not finite");
    return f;
}

/// Every module of `count` adapters (adapters[i] named "<what> i", or "<what>" for a single
/// argument such as the newcomer), each checked to pair with `ref`'s modules (same count and
/// n_out x n_in; default: the first adapter's). Result: [adapter][module].
std::vector<std::vector<Factors>> adapters_factors(const kmf_adapter* adapters, std::size_t count, const std::string& what,
                                                   const std::vector<Factors>* ref, bool single = false) {
    std::vector<std::vector<Factors>> out;
    for (std::size_t i = 0; i < count; ++i) {
        const std::string name = single ? what : what + " " + std::to_string(i);
        const kmf_adapter& a = adapter_ref(adapters + i, name);
        const std::vector<Factors>* first = ref ? ref : (out.empty() ? nullptr : &out[0]);
        if (first && a.n_modules != first->size())
            fail(KMF_ERR_SHAPE, name + " has " + std::to_string(a.n_modules) + " modules, expected " + std::to_string(first->size()));
        std::vector<Factors> mods;
        for (std::size_t m = 0; m < a.n_modules; ++m)
            mods.push_back(factors(a.modules[m], mod_name(name, m), first ? (*first)[m].b.rows : 0, first ? (*first)[m].a.cols : 0));
        out.push_back(std::move(mods));
    }
    return out;
}

/// KMF_ERR_NONFINITE naming the first input factor holding NaN or inf.
void check_finite(const std::vector<kmf::Mat>& mats, const std::vector<std::string>& names, int threads) {
    const std::vector<char> ok = kmf::all_finite(mats, threads);
    for (std::size_t i = 0; i < ok.size(); ++i)
        if (!ok[i]) fail(KMF_ERR_NONFINITE, names[i] + " holds NaN or infinity");
}

/// KMF_ERR_OVERFLOW naming the first output factor that does not fit its dtype (holds inf or NaN).
void check_outputs(const std::vector<Factors>& out, int threads) {
    std::vector<kmf::Mat> mats;
    for (const Factors& f : out) mats.push_back(f.a), mats.push_back(f.b);
    const std::vector<char> ok = kmf::all_finite(mats, threads);
    for (std::size_t i = 0; i < ok.size(); ++i)
        if (!ok[i])
            fail(KMF_ERR_OVERFLOW, mod_name("out", i / 2) + (i % 2 ? " B" : " A") + ": the result does not fit its dtype (" +
                                       kmf::dtype_name(mats[i].dtype) + ")");
}

/// The frexp exponent of x > 0 (x 2^-e in [1/2, 1)), clamped so 2^-e and 2^e stay normal doubles.
int exponent_of(double x) {
    if (!(x > 0.0) || !std::isfinite(x)) return 0;
    int e = 0;
    std::frexp(x, &e);
    return std::clamp(e, -1000, 1000);
}

/// Input factors of one call, collected for the finiteness scan, the peak scan and the alias check.
struct Inputs {
    std::vector<kmf::Mat> mats;
    std::vector<std::string> names;
    void add(const Factors& f, const std::string& what) {
        mats.push_back(f.a), names.push_back(what + " A");
        mats.push_back(f.b), names.push_back(what + " B");
    }
    std::vector<Extent> extents() const {
        std::vector<Extent> ex;
        for (std::size_t i = 0; i < mats.size(); ++i) ex.push_back(extent(mats[i], false, names[i]));
        return ex;
    }
};

/// The checked inputs of truncate and linear_merge: threads, n >= 1 adapters (named "<item> i")
/// and their n finite values (coefs or weights).
std::vector<std::vector<Factors>> weighted_inputs(const kmf_adapter* adapters, std::size_t n, const double* values, int threads,
                                                  const char* adapters_arg, const char* values_arg, const char* item) {
    check_threads(threads);
    need(adapters, adapters_arg);
    if (n == 0) fail(KMF_ERR_VALUE, std::string("the number of ") + adapters_arg + " must be >= 1");
    need(values, values_arg);
    for (std::size_t i = 0; i < n; ++i)
        if (!std::isfinite(values[i])) fail(KMF_ERR_VALUE, std::string(values_arg) + "[" + std::to_string(i) + "] is not finite");
    return adapters_factors(adapters, n, item, nullptr);
}

// ------------------------------------------------------------------ similarity

/// kmf_similarity (out_k is written only at the end, so nothing it overlaps is read after it changes).
void similarity(const kmf_adapter* newcomer, const kmf_adapter* slots, std::size_t k, int metric, int threads, double* out_k) {
    check_threads(threads);
    if (metric != KMF_METRIC_COS) fail(KMF_ERR_UNSUPPORTED, "metric " + num(metric) + " is not supported (only KMF_METRIC_COS = 0)");
    const std::vector<Factors> x = adapters_factors(newcomer, 1, "newcomer", nullptr, true)[0];
    if (k == 0) return;
    need(slots, "slots");
    need(out_k, "out_k");
    const std::vector<std::vector<Factors>> ys = adapters_factors(slots, k, "slot", &x);
    const std::size_t n_mod = x.size();
    std::vector<double> out(k, 0.0);
    if (n_mod == 0) {
        std::copy(out.begin(), out.end(), out_k);
        return;
    }

    // adapter 0 = the newcomer, 1..k the slots
    std::vector<const std::vector<Factors>*> all{&x};
    for (const auto& y : ys) all.push_back(&y);
    Inputs in;
    for (std::size_t i = 0; i < all.size(); ++i)
        for (std::size_t m = 0; m < n_mod; ++m) in.add((*all[i])[m], mod_name(i ? "slot " + std::to_string(i - 1) : "newcomer", m));
    check_finite(in.mats, in.names, threads);
    const std::vector<double> peak = kmf::max_abs(in.mats, threads);

    // Per (adapter, module): A^T and B with power-of-two coefs bringing their peaks into [1/2, 1),
    // the scaling's sign on B (cos ignores every positive scale); a zero update is flagged.
    struct Norm {
        kmf::Mat at, b;
        bool zero;
    };
    std::vector<Norm> nm(all.size() * n_mod);
    for (std::size_t i = 0; i < all.size(); ++i)
        for (std::size_t m = 0; m < n_mod; ++m) {
            const std::size_t q = i * n_mod + m;
            const Factors& f = (*all[i])[m];
            const double pa = peak[2 * q], pb = peak[2 * q + 1];
            nm[q].zero = pa == 0.0 || pb == 0.0 || f.scaling == 0.0;
            nm[q].at = with_coef(transposed(f.a), std::ldexp(1.0, -exponent_of(pa)));
            nm[q].b = with_coef(f.b, std::copysign(std::ldexp(1.0, -exponent_of(pb)), f.scaling));
        }

    // Per module: cross Grams of the newcomer against all slots (r_x x R_slots) and each adapter's
    // own Grams (r_i x r_i); all in one float64 gram call.
    std::vector<kmf::GramTask> tasks;
    std::vector<std::size_t> cross_at(n_mod), self_at(all.size() * n_mod);
    std::size_t total = 0;
    std::vector<std::pair<std::size_t, std::size_t>> sizes;  // per task: (offset, elements)
    auto add = [&](kmf::Stack x_, kmf::Stack y_, bool sym) {
        const std::size_t n = static_cast<std::size_t>(x_.cols * y_.cols);
        tasks.push_back({std::move(x_), std::move(y_), nullptr, sym});
        sizes.push_back({total, n});
        total += n;
        return tasks.size() - 1;
    };
    for (std::size_t m = 0; m < n_mod; ++m) {
        std::vector<kmf::Mat> bs, ats;
        for (std::size_t i = 1; i < all.size(); ++i) bs.push_back(nm[i * n_mod + m].b), ats.push_back(nm[i * n_mod + m].at);
        cross_at[m] = add(kmf::Stack({nm[m].b}), kmf::Stack(bs), false);
        add(kmf::Stack({nm[m].at}), kmf::Stack(ats), false);
    }
    for (std::size_t q = 0; q < nm.size(); ++q) {
        self_at[q] = add(kmf::Stack({nm[q].b}), kmf::Stack({nm[q].b}), true);
        add(kmf::Stack({nm[q].at}), kmf::Stack({nm[q].at}), true);
    }
    std::vector<double> buf(total);
    for (std::size_t t = 0; t < tasks.size(); ++t) tasks[t].out = buf.data() + sizes[t].first;
    kmf::gram(tasks, true, threads);

    // <X, Y> = sum_pq Gb_pq Ga_pq over the block of the pair.
    auto block_dot = [&](std::size_t task, std::int64_t c0, std::int64_t c1) {
        const kmf::GramTask& gb = tasks[task];
        const double* b = gb.out;
        const double* a = tasks[task + 1].out;
        const std::int64_t ld = gb.y.cols;
        double s = 0.0;
        for (std::int64_t p = 0; p < gb.x.cols; ++p)
            for (std::int64_t c = c0; c < c1; ++c) s += b[p * ld + c] * a[p * ld + c];
        return s;
    };
    for (std::size_t m = 0; m < n_mod; ++m) {
        const double nx = block_dot(self_at[m], 0, nm[m].b.cols);
        std::int64_t c0 = 0;
        for (std::size_t j = 0; j < k; ++j) {
            const std::size_t q = (j + 1) * n_mod + m;
            const std::int64_t r = nm[q].b.cols;
            const double dot = block_dot(cross_at[m], c0, c0 + r);
            const double ny = block_dot(self_at[q], 0, r);
            c0 += r;
            double cos = 0.0;
            if (!nm[m].zero && !nm[q].zero && nx > 0.0 && ny > 0.0)
                cos = std::clamp(dot / (std::sqrt(nx) * std::sqrt(ny)), -1.0, 1.0);
            out[j] += cos;
        }
    }
    for (std::size_t j = 0; j < k; ++j) out_k[j] = out[j] / static_cast<double>(n_mod);
}

// ------------------------------------------------------------------ truncation

/// Largest |log2| of a factor's peak used without normalisation (ops/numerics/scaling.py's SAFE_EXP).
constexpr int kSafeExp = 32;

bool safe(int e) { return -kSafeExp <= e && e <= kSafeExp; }

void truncate(const kmf_adapter* terms, std::size_t n_terms, const double* coefs, const kmf_adapter* out, int threads) {
    const std::vector<std::vector<Factors>> ts = weighted_inputs(terms, n_terms, coefs, threads, "terms", "coefs", "term");
    const std::vector<Factors> o = adapters_factors(out, 1, "out", nullptr, true)[0];
    const std::size_t n_mod = ts[0].size();
    if (o.size() != n_mod) fail(KMF_ERR_SHAPE, "out has " + std::to_string(o.size()) + " modules, the terms " + std::to_string(n_mod));

    Inputs in;
    std::vector<Extent> ex;
    for (std::size_t i = 0; i < n_terms; ++i)
        for (std::size_t m = 0; m < n_mod; ++m) in.add(ts[i][m], mod_name("term " + std::to_string(i), m));
    for (std::size_t m = 0; m < n_mod; ++m) {
        const Factors& f = o[m];
        const std::string w = mod_name("out", m);
        const std::int64_t n_out = ts[0][m].b.rows, n_in = ts[0][m].a.cols, r = f.rank();
        if (f.b.rows != n_out || f.a.cols != n_in)
            fail(KMF_ERR_SHAPE, w + ": the update is " + shape(f.b.rows, f.a.cols) + ", the terms' " + shape(n_out, n_in));
        if (r > std::min(n_out, n_in)) fail(KMF_ERR_RANK, w + ": rank " + num(r) + " exceeds min(n_out, n_in) = " + num(std::min(n_out, n_in)));
        if (f.scaling == 0.0) fail(KMF_ERR_VALUE, w + ": scaling must be nonzero");
        std::int64_t big_r = 0;
        for (std::size_t i = 0; i < n_terms; ++i) big_r += ts[i][m].rank();
        if (big_r > (std::int64_t(1) << 16)) fail(KMF_ERR_RANK, mod_name("term", m) + ": stacked rank " + num(big_r) + " exceeds 65536");
        ex.push_back(extent(f.a, true, w + " A"));
        ex.push_back(extent(f.b, true, w + " B"));
    }
    for (Extent& e : in.extents()) ex.push_back(std::move(e));
    check_no_alias(std::move(ex));
    check_finite(in.mats, in.names, threads);
    const std::vector<double> peak = kmf::max_abs(in.mats, threads);

    // One task per module; a module whose factors are far from float32's range runs on float64
    // copies normalised by powers of two, A_i 2^-ea_i and c_i 2^(ea_i - E) B_i, so the kernels see
    // 2^-E M, and its B' (written to a float64 buffer) is multiplied back by 2^E in one rounding.
    std::vector<kmf::TruncateTask> tasks(n_mod);
    std::vector<int> shift(n_mod, 0);
    std::vector<std::vector<double>> wide(n_mod);
    std::vector<std::vector<double>> copies;  // the normalised float64 factors
    std::vector<kmf::CopyTask> to_copy;
    auto normalised = [&](const kmf::Mat& m, double coef) {
        copies.emplace_back(static_cast<std::size_t>(m.rows * m.cols));
        kmf::Mat d;
        d.ptr = copies.back().data(), d.dtype = kmf::kF64, d.rows = m.rows, d.cols = m.cols, d.rs = m.cols, d.cs = 1;
        to_copy.push_back({with_coef(m, coef), d});
        return d;
    };
    for (std::size_t m = 0; m < n_mod; ++m) {
        std::vector<double> c(n_terms);
        std::vector<int> ea(n_terms), eb(n_terms);
        bool normalise = false;
        int big_e = INT_MIN;
        for (std::size_t i = 0; i < n_terms; ++i) {
            const std::size_t q = i * n_mod + m;
            c[i] = coefs[i] * ts[i][m].scaling / o[m].scaling;
            if (!std::isfinite(c[i])) fail(KMF_ERR_VALUE, mod_name("term " + std::to_string(i), m) + ": coef * scaling / out scaling is not finite");
            ea[i] = exponent_of(peak[2 * q]);
            eb[i] = exponent_of(std::fabs(c[i])) + exponent_of(peak[2 * q + 1]);
            normalise = normalise || !safe(ea[i]) || !safe(eb[i]) || !safe(exponent_of(std::fabs(c[i])));
            if (c[i] != 0.0 && peak[2 * q] > 0.0 && peak[2 * q + 1] > 0.0) big_e = std::max(big_e, eb[i] + ea[i]);
        }
        if (big_e == INT_MIN) normalise = false;  // a zero sum
        kmf::TruncateTask& t = tasks[m];
        std::vector<kmf::Mat> bs, ats;
        for (std::size_t i = 0; i < n_terms; ++i) {
            const Factors& f = ts[i][m];
            if (normalise) {
                bs.push_back(normalised(f.b, std::ldexp(c[i], ea[i] - big_e)));
                ats.push_back(transposed(normalised(f.a, std::ldexp(1.0, -ea[i]))));
            } else {
                bs.push_back(with_coef(f.b, c[i]));
                ats.push_back(transposed(f.a));
            }
        }
        t.b = kmf::Stack(std::move(bs));
        t.at = kmf::Stack(std::move(ats));
        t.out_at = transposed(o[m].a);
        t.out_b = o[m].b;
        if (normalise) {
            shift[m] = big_e;
            wide[m].resize(static_cast<std::size_t>(o[m].b.rows * o[m].b.cols));
            t.out_b.ptr = wide[m].data();
            t.out_b.dtype = kmf::kF64;
            t.out_b.rs = o[m].b.cols;
        }
    }
    if (!to_copy.empty()) kmf::copy(to_copy, threads);
    // The core truncates every task to one rank: group the modules by rank.
    std::vector<std::int64_t> ranks;
    for (const Factors& f : o) ranks.push_back(f.rank());
    std::sort(ranks.begin(), ranks.end());
    ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
    for (std::int64_t r : ranks) {
        std::vector<kmf::TruncateTask> group;
        std::vector<std::size_t> idx;
        for (std::size_t m = 0; m < n_mod; ++m)
            if (o[m].rank() == r) group.push_back(tasks[m]), idx.push_back(m);
        kmf::truncate(group, r, threads);
        for (std::size_t g = 0; g < group.size(); ++g)
            if (group[g].route == kmf::kRouteFailed)
                fail(KMF_ERR_NUMERIC, mod_name("term", idx[g]) + ": the truncation's eigenproblem did not settle");
    }
    std::vector<kmf::CopyTask> back;
    for (std::size_t m = 0; m < n_mod; ++m)
        if (!wide[m].empty()) back.push_back({with_coef(tasks[m].out_b, std::ldexp(1.0, shift[m])), o[m].b});
    if (!back.empty()) kmf::copy(back, threads);
    check_outputs(o, threads);
}

// ------------------------------------------------------------------ linear merge

void linear_merge(const kmf_adapter* adapters, std::size_t n, const double* weights, const kmf_adapter* out, int threads) {
    const std::vector<std::vector<Factors>> as = weighted_inputs(adapters, n, weights, threads, "adapters", "weights", "adapter");
    const std::vector<Factors> o = adapters_factors(out, 1, "out", &as[0], true)[0];
    const std::size_t n_mod = o.size();
    Inputs in;
    std::vector<Extent> ex;
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t m = 0; m < n_mod; ++m) {
            const std::string w = mod_name("adapter " + std::to_string(i), m);
            in.add(as[i][m], w);
            if (as[i][m].rank() != o[m].rank())
                fail(KMF_ERR_RANK, w + ": rank " + num(as[i][m].rank()) + ", out rank " + num(o[m].rank()) +
                                       " (the linear merge needs equal ranks)");
        }
    // task 2m: A' of module m, 2m + 1: B'; each precise when its output is float64.
    std::vector<kmf::WeightedSumTask> fast, precise;
    for (std::size_t m = 0; m < n_mod; ++m) {
        const std::string w = mod_name("out", m);
        if (o[m].scaling == 0.0) fail(KMF_ERR_VALUE, w + ": scaling must be nonzero");
        kmf::WeightedSumTask ta, tb;
        ta.dst = o[m].a, tb.dst = o[m].b;
        for (std::size_t i = 0; i < n; ++i) {
            const double ws = weights[i] * as[i][m].scaling / o[m].scaling;
            if (!std::isfinite(ws)) fail(KMF_ERR_VALUE, mod_name("adapter " + std::to_string(i), m) + ": weight * scaling / out scaling is not finite");
            const double root = std::sqrt(std::fabs(ws));
            ta.srcs.push_back(with_coef(as[i][m].a, ws != 0.0 ? std::copysign(root, ws) : 0.0));
            tb.srcs.push_back(with_coef(as[i][m].b, root));
        }
        for (kmf::WeightedSumTask* t : {&ta, &tb}) {
            const bool wide = t->dst.dtype == kmf::kF64;
            for (const kmf::Mat& s : t->srcs)
                if (s.dtype == kmf::kF64 && !wide) fail(KMF_ERR_DTYPE, w + (t == &ta ? " A" : " B") + ": a float64 input needs a float64 output");
            (wide ? precise : fast).push_back(std::move(*t));
        }
        ex.push_back(extent(o[m].a, true, w + " A"));
        ex.push_back(extent(o[m].b, true, w + " B"));
    }
    for (Extent& e : in.extents()) ex.push_back(std::move(e));
    check_no_alias(std::move(ex));
    check_finite(in.mats, in.names, threads);
    if (!fast.empty()) kmf::weighted_sum(fast, false, threads);
    if (!precise.empty()) kmf::weighted_sum(precise, true, threads);
    check_outputs(o, threads);
}

}  // namespace

extern "C" {

const char* kmf_version(void) { return kVersionText; }

int kmf_api_version(void) { return KMF_API_VERSION; }

const char* kmf_status_name(int status) {
    switch (status) {
        case KMF_OK: return "ok";
        case KMF_ERR_NULL: return "null";
        case KMF_ERR_DTYPE: return "dtype";
        case KMF_ERR_SHAPE: return "shape";
        case KMF_ERR_STRIDE: return "stride";
        case KMF_ERR_ALIGN: return "align";
        case KMF_ERR_RANK: return "rank";
        case KMF_ERR_VALUE: return "value";
        case KMF_ERR_UNSUPPORTED: return "unsupported";
        case KMF_ERR_NONFINITE: return "nonfinite";
        case KMF_ERR_ALIAS: return "alias";
        case KMF_ERR_OVERFLOW: return "overflow";
        case KMF_ERR_NUMERIC: return "numeric";
        case KMF_ERR_NOMEM: return "nomem";
        case KMF_ERR_INTERNAL: return "internal";
        default: return "unknown";
    }
}

int kmf_similarity(const kmf_adapter* newcomer, const kmf_adapter* slots, size_t k, int metric, int threads, double* out_k,
                   kmf_error* err) {
    return guarded(err, "kmf_similarity", [&] { similarity(newcomer, slots, k, metric, threads, out_k); });
}

int kmf_truncate(const kmf_adapter* terms, size_t n_terms, const double* coefs, const kmf_adapter* out, int threads,
                 kmf_error* err) {
    return guarded(err, "kmf_truncate", [&] { truncate(terms, n_terms, coefs, out, threads); });
}

int kmf_linear_merge(const kmf_adapter* adapters, size_t n, const double* weights, const kmf_adapter* out, int threads,
                     kmf_error* err) {
    return guarded(err, "kmf_linear_merge", [&] { linear_merge(adapters, n, weights, out, threads); });
}

}  // extern "C"
