// kmerge_fast._C: the only file that knows about Python. It turns plain tuples
// of ints / floats into kmf::Mat / kmf::Stack descriptions, validates them
// (ValueError with the offending task and block named), then runs the C++
// kernels with the GIL released.
//
// Mat   = (ptr, dtype, rows, cols, row_stride, col_stride, coef); strides in
//         elements; dtype 0=float32, 1=float16, 2=bfloat16, 3=float64.
// Stack = sequence of >= 1 Mats with equal rows, concatenated along columns.
#include <pybind11/pybind11.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/apply.h"
#include "core/copy.h"
#include "core/dense_merge.h"
#include "core/dense_stats.h"
#include "core/finite.h"
#include "core/gram.h"
#include "core/parallel.h"
#include "core/peak.h"
#include "core/simd.h"
#include "core/sym_eig.h"
#include "core/truncate.h"
#include "core/weighted_sum.h"

namespace py = pybind11;

#ifndef KMERGE_FAST_VERSION
#define KMERGE_FAST_VERSION "0.1.0"
#endif

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

bool is_sequence(py::handle h) { return py::isinstance<py::tuple>(h) || py::isinstance<py::list>(h); }

/// A Python int (or an object with __index__, e.g. a numpy integer) as int64.
std::int64_t get_int(py::handle h, const std::string& what) {
    if (py::isinstance<py::float_>(h) || !PyIndex_Check(h.ptr()))
        fail(what + ": expected an int, got " + std::string(py::str(py::type::handle_of(h).attr("__name__"))));
    py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(h.ptr()));
    if (!index) throw py::error_already_set();
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow != 0) fail(what + ": integer out of range");
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    return static_cast<std::int64_t>(v);
}

/// A pointer passed as a Python int (tensor.data_ptr()).
std::uintptr_t get_ptr(py::handle h, const std::string& what) {
    if (py::isinstance<py::float_>(h) || !PyIndex_Check(h.ptr())) fail(what + ": expected a pointer (int)");
    py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(h.ptr()));
    if (!index) throw py::error_already_set();
    const unsigned long long v = PyLong_AsUnsignedLongLong(index.ptr());
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        PyErr_Clear();
        fail(what + ": pointer is not a valid address (negative or too large)");
    }
    if (v > UINTPTR_MAX) fail(what + ": pointer is too large for this platform");
    return static_cast<std::uintptr_t>(v);
}

/// A real number: Python float or int, or anything with __float__ (numpy scalars).
double get_float(py::handle h, const std::string& what) {
    const double v = PyFloat_AsDouble(h.ptr());
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        fail(what + ": expected a float, got " + std::string(py::str(py::type::handle_of(h).attr("__name__"))));
    }
    return v;
}

void check_threads(int threads) {
    if (threads < 0) fail("threads: must be >= 0 (0 = all hardware threads), got " + std::to_string(threads));
}

kmf::Mat parse_mat(py::handle h, const std::string& where) {
    if (!is_sequence(h) || py::len(h) != 7)
        fail(where + ": expected a Mat tuple (ptr, dtype, rows, cols, row_stride, col_stride, coef)");
    py::sequence t = py::reinterpret_borrow<py::sequence>(h);
    kmf::Mat m;
    const std::uintptr_t ptr = get_ptr(t[0], where + " ptr");
    const std::int64_t code = get_int(t[1], where + " dtype");
    if (!kmf::valid_dtype(static_cast<int>(code)) || code != static_cast<int>(code))
        fail(where + ": bad dtype code " + std::to_string(code) + " (0=float32, 1=float16, 2=bfloat16, 3=float64)");
    m.dtype = static_cast<int>(code);
    m.rows = get_int(t[2], where + " rows");
    m.cols = get_int(t[3], where + " cols");
    m.rs = get_int(t[4], where + " row_stride");
    m.cs = get_int(t[5], where + " col_stride");
    m.coef = get_float(t[6], where + " coef");
    if (m.rows < 0 || m.cols < 0)
        fail(where + ": negative shape (" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + ")");
    // Every element offset (i * rs + j * cs) * elem_size must fit in 63 bits.
    const double span = (std::fabs(double(m.rs)) * double(m.rows) + std::fabs(double(m.cs)) * double(m.cols)) * 8.0;
    if (span >= 9.0e18 || double(m.rows) * double(m.cols) >= 9.0e18) fail(where + ": shape or strides too large");
    if (ptr == 0 && m.rows > 0 && m.cols > 0) fail(where + ": null pointer for a non-empty matrix");
    if (ptr % static_cast<std::uintptr_t>(kmf::elem_size(m.dtype)) != 0)
        fail(where + ": pointer is not aligned to its " + kmf::dtype_name(m.dtype) + " element size");
    m.ptr = reinterpret_cast<const void*>(ptr);
    return m;
}

kmf::Stack parse_stack(py::handle h, const std::string& where) {
    if (!is_sequence(h)) fail(where + ": expected a list of Mat tuples");
    py::sequence seq = py::reinterpret_borrow<py::sequence>(h);
    const std::size_t n = py::len(seq);
    if (n == 0) fail(where + ": a stack needs at least one block");
    std::vector<kmf::Mat> blocks;
    blocks.reserve(n);
    for (std::size_t b = 0; b < n; ++b) {
        blocks.push_back(parse_mat(seq[b], where + " block " + std::to_string(b)));
        if (blocks[b].rows != blocks[0].rows)
            fail(where + ": block " + std::to_string(b) + " has " + std::to_string(blocks[b].rows) +
                 " rows, block 0 has " + std::to_string(blocks[0].rows) + " (blocks of a stack must have equal rows)");
    }
    return kmf::Stack(std::move(blocks));
}

py::sequence task_tuple(py::handle h, std::size_t len, const std::string& where, const char* shape) {
    if (!is_sequence(h) || py::len(h) != len) fail(where + ": expected a tuple " + shape);
    return py::reinterpret_borrow<py::sequence>(h);
}

bool same_mat(const kmf::Mat& a, const kmf::Mat& b) {
    return a.ptr == b.ptr && a.dtype == b.dtype && a.rows == b.rows && a.cols == b.cols && a.rs == b.rs &&
           a.cs == b.cs && a.coef == b.coef;
}

std::vector<py::handle> task_list(const py::handle& tasks) {
    if (!is_sequence(tasks)) fail("tasks: expected a list of task tuples");
    std::vector<py::handle> out;
    for (py::handle h : tasks) out.push_back(h);
    return out;
}

void gram(py::handle tasks, bool precise, int threads) {
    check_threads(threads);
    std::vector<kmf::GramTask> parsed;
    const auto list = task_list(tasks);
    for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string w = "gram task " + std::to_string(i);
        py::sequence t = task_tuple(list[i], 4, w, "(X: Stack, Y: Stack, out_ptr: int, symmetric: bool)");
        kmf::GramTask g;
        g.x = parse_stack(t[0], w + " X");
        g.y = parse_stack(t[1], w + " Y");
        const std::uintptr_t out = get_ptr(t[2], w + " out_ptr");
        if (!py::isinstance<py::bool_>(t[3]) && !py::isinstance<py::int_>(t[3])) fail(w + " symmetric: expected a bool");
        g.symmetric = py::cast<bool>(t[3]);
        if (g.x.rows != g.y.rows)
            fail(w + ": X has " + std::to_string(g.x.rows) + " rows, Y has " + std::to_string(g.y.rows) + " (X^T Y needs equal K)");
        if (g.symmetric) {
            bool same = g.x.blocks.size() == g.y.blocks.size();
            for (std::size_t b = 0; same && b < g.x.blocks.size(); ++b) same = same_mat(g.x.blocks[b], g.y.blocks[b]);
            if (!same) fail(w + ": symmetric=True requires X and Y to be the same stack");
        }
        if (out == 0 && g.x.cols * g.y.cols > 0) fail(w + ": out_ptr is null");
        if (out % alignof(double) != 0) fail(w + ": out_ptr is not aligned for float64");
        g.out = reinterpret_cast<double*>(out);
        parsed.push_back(std::move(g));
    }
    py::gil_scoped_release release;
    kmf::gram(parsed, precise, threads);
}

void apply(py::handle tasks, bool precise, int threads) {
    check_threads(threads);
    std::vector<kmf::ApplyTask> parsed;
    const auto list = task_list(tasks);
    for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string w = "apply task " + std::to_string(i);
        py::sequence t = task_tuple(list[i], 4, w, "(X: Stack, T_ptr: int, C: int, out: Mat)");
        kmf::ApplyTask a;
        a.x = parse_stack(t[0], w + " X");
        const std::uintptr_t tp = get_ptr(t[1], w + " T_ptr");
        a.c = get_int(t[2], w + " C");
        a.out = parse_mat(t[3], w + " out");
        if (a.c < 0) fail(w + ": C must be >= 0, got " + std::to_string(a.c));
        if (a.out.rows != a.x.rows || a.out.cols != a.c)
            fail(w + ": out is " + std::to_string(a.out.rows) + " x " + std::to_string(a.out.cols) + ", expected K x C = " +
                 std::to_string(a.x.rows) + " x " + std::to_string(a.c));
        if (a.out.coef != 1.0) fail(w + ": out coef must be 1");
        if (tp == 0 && a.x.cols * a.c > 0) fail(w + ": T_ptr is null");
        if (tp % alignof(double) != 0) fail(w + ": T_ptr is not aligned for float64");
        a.t = reinterpret_cast<const double*>(tp);
        parsed.push_back(std::move(a));
    }
    py::gil_scoped_release release;
    kmf::apply(parsed, precise, threads);
}

void dense_stats(py::handle tasks, int threads) {
    check_threads(threads);
    std::vector<kmf::DenseStatsTask> parsed;
    const auto list = task_list(tasks);
    for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string w = "dense_stats task " + std::to_string(i);
        py::sequence t = task_tuple(list[i], 3, w, "(X: Stack, Y: Stack, out_ptr: int)");
        kmf::DenseStatsTask d;
        d.x = parse_stack(t[0], w + " X");
        d.y = parse_stack(t[1], w + " Y");
        const std::uintptr_t out = get_ptr(t[2], w + " out_ptr");
        if (d.x.cols != d.y.cols)
            fail(w + ": X has " + std::to_string(d.x.cols) + " columns, Y has " + std::to_string(d.y.cols) + " (X Y^T needs equal R)");
        if (out == 0) fail(w + ": out_ptr is null");
        if (out % alignof(double) != 0) fail(w + ": out_ptr is not aligned for float64");
        d.out = reinterpret_cast<double*>(out);
        parsed.push_back(std::move(d));
    }
    py::gil_scoped_release release;
    kmf::dense_stats(parsed, threads);
}

py::list all_finite(py::handle mats, int threads) {
    check_threads(threads);
    std::vector<kmf::Mat> parsed;
    const auto list = task_list(mats);
    for (std::size_t i = 0; i < list.size(); ++i) parsed.push_back(parse_mat(list[i], "all_finite mat " + std::to_string(i)));
    std::vector<char> flags;
    {
        py::gil_scoped_release release;
        flags = kmf::all_finite(parsed, threads);
    }
    py::list out;
    for (const char f : flags) out.append(py::bool_(f != 0));
    return out;
}

py::list max_abs(py::handle mats, int threads) {
    check_threads(threads);
    std::vector<kmf::Mat> parsed;
    const auto list = task_list(mats);
    for (std::size_t i = 0; i < list.size(); ++i) parsed.push_back(parse_mat(list[i], "max_abs mat " + std::to_string(i)));
    std::vector<double> values;
    {
        py::gil_scoped_release release;
        values = kmf::max_abs(parsed, threads);
    }
    py::list out;
    for (const double v : values) out.append(v);
    return out;
}

void copy(py::handle tasks, int threads) {
    check_threads(threads);
    std::vector<kmf::CopyTask> parsed;
    const auto list = task_list(tasks);
    for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string w = "copy task " + std::to_string(i);
        py::sequence t = task_tuple(list[i], 2, w, "(src: Mat, dst: Mat)");
        kmf::CopyTask c;
        c.src = parse_mat(t[0], w + " src");
        c.dst = parse_mat(t[1], w + " dst");
        if (c.src.rows != c.dst.rows || c.src.cols != c.dst.cols)
            fail(w + ": src is " + std::to_string(c.src.rows) + " x " + std::to_string(c.src.cols) + ", dst is " +
                 std::to_string(c.dst.rows) + " x " + std::to_string(c.dst.cols));
        if (c.dst.coef != 1.0) fail(w + ": dst coef must be 1");
        parsed.push_back(c);
    }
    py::gil_scoped_release release;
    kmf::copy(parsed, threads);
}

void weighted_sum(py::handle tasks, bool precise, int threads) {
    check_threads(threads);
    std::vector<kmf::WeightedSumTask> parsed;
    const auto list = task_list(tasks);
    for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string w = "weighted_sum task " + std::to_string(i);
        py::sequence t = task_tuple(list[i], 2, w, "(srcs: list of Mat, dst: Mat)");
        kmf::WeightedSumTask ws;
        ws.dst = parse_mat(t[1], w + " dst");
        ws.srcs = parse_stack(t[0], w + " srcs").blocks;  // one or more Mats (a stack's parse)
        for (std::size_t k = 0; k < ws.srcs.size(); ++k) {
            const kmf::Mat& m = ws.srcs[k];
            const std::string what = w + " src " + std::to_string(k);
            if (m.rows != ws.dst.rows || m.cols != ws.dst.cols)
                fail(what + " is " + std::to_string(m.rows) + " x " + std::to_string(m.cols) + ", dst is " +
                     std::to_string(ws.dst.rows) + " x " + std::to_string(ws.dst.cols));
            if (!precise && m.dtype == kmf::kF64) fail(what + ": a float64 source needs precise=True");
        }
        if (ws.dst.coef != 1.0) fail(w + ": dst coef must be 1");
        parsed.push_back(std::move(ws));
    }
    py::gil_scoped_release release;
    kmf::weighted_sum(parsed, precise, threads);
}

/// A Python int in [0, 2^64) (e.g. a 64-bit seed).
std::uint64_t get_u64(py::handle h, const std::string& what) {
    if (py::isinstance<py::float_>(h) || !PyIndex_Check(h.ptr()))
        fail(what + ": expected an int, got " + std::string(py::str(py::type::handle_of(h).attr("__name__"))));
    py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(h.ptr()));
    if (!index) throw py::error_already_set();
    const unsigned long long v = PyLong_AsUnsignedLongLong(index.ptr());
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        PyErr_Clear();
        fail(what + ": expected an integer in [0, 2**64)");
    }
    return static_cast<std::uint64_t>(v);
}

std::string shape_str(const kmf::Mat& m) { return std::to_string(m.rows) + " x " + std::to_string(m.cols); }

/// (B, A) of one low-rank term: B is out x r, A is r x in.
std::pair<kmf::Mat, kmf::Mat> parse_factors(py::handle b, py::handle a, const std::string& w) {
    kmf::Mat mb = parse_mat(b, w + " B"), ma = parse_mat(a, w + " A");
    if (mb.cols != ma.rows)
        fail(w + ": B is " + shape_str(mb) + ", A is " + shape_str(ma) + " (B.cols must equal A.rows)");
    return {mb, ma};
}

void dense_merge(py::handle terms, py::handle out, int mode, int sign_method, int threads) {
    check_threads(threads);
    if (mode != kmf::kCombineSum && mode != kmf::kCombineTies)
        fail("mode: expected 0 (sum) or 1 (ties), got " + std::to_string(mode));
    if (sign_method != kmf::kSignTotal && sign_method != kmf::kSignFrequency)
        fail("sign_method: expected 0 (total) or 1 (frequency), got " + std::to_string(sign_method));
    const kmf::Mat o = parse_mat(out, "dense_merge out");
    if (o.dtype != kmf::kF32 && o.dtype != kmf::kF64)
        fail(std::string("dense_merge out: must be float32 or float64, got ") + kmf::dtype_name(o.dtype));
    if (o.coef != 1.0) fail("dense_merge out: coef must be 1");
    if ((o.rs == 0 && o.rows > 1) || (o.cs == 0 && o.cols > 1)) fail("dense_merge out: a zero stride aliases elements");
    if (!is_sequence(terms)) fail("terms: expected a list of term tuples");
    std::vector<kmf::MergeTerm> parsed;
    std::size_t i = 0;
    for (py::handle h : terms) {
        const std::string w = "dense_merge term " + std::to_string(i++);
        py::sequence t = task_tuple(h, 8, w,
                                    "(B: Mat, A: Mat, weight: float, keep_kind: int, tau: float, seed: int, "
                                    "thresh24: int, density: float)");
        kmf::MergeTerm m;
        std::tie(m.b, m.a) = parse_factors(t[0], t[1], w);
        m.weight = get_float(t[2], w + " weight");
        const std::int64_t kind = get_int(t[3], w + " keep_kind");
        m.tau = get_float(t[4], w + " tau");
        m.seed = get_u64(t[5], w + " seed");
        const std::int64_t th = get_int(t[6], w + " thresh24");
        m.density = get_float(t[7], w + " density");
        if (kind != kmf::kKeepAll && kind != kmf::kKeepMagnitude && kind != kmf::kKeepDare)
            fail(w + ": keep_kind must be 0 (all), 1 (magnitude) or 2 (dare), got " + std::to_string(kind));
        m.keep = static_cast<int>(kind);
        if (m.b.rows != o.rows || m.a.cols != o.cols)
            fail(w + ": B @ A is " + std::to_string(m.b.rows) + " x " + std::to_string(m.a.cols) + ", out is " + shape_str(o));
        if (m.keep == kmf::kKeepDare) {
            if (th < 0 || th > (std::int64_t(1) << 24))
                fail(w + ": thresh24 must be in [0, 2**24], got " + std::to_string(th));
            if (!(m.density > 0.0) || !std::isfinite(m.density))
                fail(w + ": density must be a finite number > 0 for dare, got " + std::to_string(m.density));
            m.thresh24 = static_cast<std::uint64_t>(th);
        }
        parsed.push_back(m);
    }
    if (parsed.empty()) fail("terms: need at least one term");
    py::gil_scoped_release release;
    kmf::dense_merge(parsed, o, mode, sign_method, threads);
}

py::list abs_kth(py::handle tasks, int threads) {
    check_threads(threads);
    std::vector<kmf::AbsKthTask> parsed;
    const auto list = task_list(tasks);
    for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string w = "abs_kth task " + std::to_string(i);
        py::sequence t = task_tuple(list[i], 3, w, "(B: Mat, A: Mat, k: int)");
        kmf::AbsKthTask a;
        std::tie(a.b, a.a) = parse_factors(t[0], t[1], w);
        a.k = get_int(t[2], w + " k");
        const double numel = double(a.b.rows) * double(a.a.cols);
        if (a.k < 0 || double(a.k) > numel)
            fail(w + ": k must be in [0, out * in = " + std::to_string(a.b.rows * a.a.cols) + "], got " + std::to_string(a.k));
        parsed.push_back(a);
    }
    std::vector<double> kth;
    {
        py::gil_scoped_release release;
        kth = kmf::abs_kth(parsed, threads);
    }
    py::list result;
    for (double v : kth) result.append(v);
    return result;
}

/// A pointer argument that must be non-null and aligned for float64.
double* f64_ptr(py::handle h, const std::string& what) {
    const std::uintptr_t p = get_ptr(h, what);
    if (p == 0) fail(what + ": null pointer");
    if (p % alignof(double) != 0) fail(what + ": not aligned for float64");
    return reinterpret_cast<double*>(p);
}

py::list truncate_modules(py::handle tasks, std::int64_t rank, int threads) {
    check_threads(threads);
    if (rank < 1) fail("rank: must be >= 1, got " + std::to_string(rank));
    std::vector<kmf::TruncateTask> parsed;
    const auto list = task_list(tasks);
    for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string w = "truncate task " + std::to_string(i);
        py::sequence t = task_tuple(list[i], 4, w, "(B: Stack, At: Stack, out_B: Mat, out_At: Mat)");
        kmf::TruncateTask tr;
        tr.b = parse_stack(t[0], w + " B");
        tr.at = parse_stack(t[1], w + " At");
        tr.out_b = parse_mat(t[2], w + " out_B");
        tr.out_at = parse_mat(t[3], w + " out_At");
        if (tr.b.cols != tr.at.cols)
            fail(w + ": B has " + std::to_string(tr.b.cols) + " stacked columns, At has " + std::to_string(tr.at.cols));
        if (tr.b.cols > (std::int64_t(1) << 16)) fail(w + ": stacked rank above 65536");
        if (tr.out_b.rows != tr.b.rows || tr.out_b.cols != rank)
            fail(w + ": out_B is " + shape_str(tr.out_b) + ", expected " + std::to_string(tr.b.rows) + " x " + std::to_string(rank));
        if (tr.out_at.rows != tr.at.rows || tr.out_at.cols != rank)
            fail(w + ": out_At is " + shape_str(tr.out_at) + ", expected " + std::to_string(tr.at.rows) + " x " +
                 std::to_string(rank));
        if (tr.out_b.coef != 1.0 || tr.out_at.coef != 1.0) fail(w + ": out coefs must be 1");
        parsed.push_back(std::move(tr));
    }
    {
        py::gil_scoped_release release;
        kmf::truncate(parsed, rank, threads);
    }
    py::list routes;
    for (const kmf::TruncateTask& t : parsed) routes.append(t.route);
    return routes;
}

int sym_eig(std::uintptr_t a_ptr, std::int64_t n, std::int64_t k, std::uintptr_t w_ptr, std::uintptr_t v_ptr) {
    if (n < 0 || n > (std::int64_t(1) << 16)) fail("n: must be in [0, 65536], got " + std::to_string(n));
    if (k < 0 || k > n) fail("k: must be in [0, n], got " + std::to_string(k));
    if (n == 0) return 0;
    double* a = f64_ptr(py::int_(a_ptr), "a_ptr");
    double* w = k > 0 ? f64_ptr(py::int_(w_ptr), "w_ptr") : nullptr;
    double* v = k > 0 ? f64_ptr(py::int_(v_ptr), "v_ptr") : nullptr;
    for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = i; j < n; ++j)
            if (!std::isfinite(a[i * n + j])) fail("a: entries must be finite");
    py::gil_scoped_release release;
    kmf::SymEig eig(n, a, n);
    eig.top_values(k, w);
    return eig.vectors(k, w, v, k);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() =
        "kmerge_fast compiled core: batched Gram, apply, dense-statistics and dense-merge kernels on raw strided buffers.\n\n"
        "Mat = (ptr, dtype, rows, cols, row_stride, col_stride, coef): element (i, j) is at\n"
        "ptr + (i*row_stride + j*col_stride)*elem_size and is multiplied by coef.\n"
        "dtype: 0=float32, 1=float16, 2=bfloat16, 3=float64. Stack = list of Mats with equal rows,\n"
        "concatenated along columns. threads=0 uses every hardware thread. The GIL is released\n"
        "while kernels run; the caller keeps the buffers alive and must not alias outputs with inputs.";
    m.def("gram", &gram, py::arg("tasks"), py::arg("precise"), py::arg("threads") = 0,
          "gram(tasks, precise, threads=0) -> None\n\n"
          "tasks: list of (X: Stack, Y: Stack, out_ptr: int, symmetric: bool). X is K x R1, Y is K x R2.\n"
          "Writes G = X^T Y as float64 row-major R1 x R2 at out_ptr. symmetric: X and Y are the same\n"
          "stack; the upper triangle is computed and mirrored (exactly symmetric). precise: accumulate\n"
          "in float64; else float32 within K-chunks of 256 rows, summed in float64.");
    m.def("apply", &apply, py::arg("tasks"), py::arg("precise"), py::arg("threads") = 0,
          "apply(tasks, precise, threads=0) -> None\n\n"
          "tasks: list of (X: Stack, T_ptr: int, C: int, out: Mat). X is K x R, T is float64 row-major\n"
          "R x C, out is K x C (any strides, its dtype is the output dtype, coef 1). out = X @ T,\n"
          "accumulated in float64 (precise) or float32, rounded to nearest even.");
    m.def("dense_stats", &dense_stats, py::arg("tasks"), py::arg("threads") = 0,
          "dense_stats(tasks, threads=0) -> None\n\n"
          "tasks: list of (X: Stack, Y: Stack, out_ptr: int). X is P x R, Y is Q x R. Writes float64\n"
          "[sum |D|, max |D|] of D = X @ Y^T at out_ptr, streaming tiles (D is never stored).");
    m.def("all_finite", &all_finite, py::arg("mats"), py::arg("threads") = 0,
          "all_finite(mats, threads=0) -> list[bool]\n\n"
          "mats: list of Mat. Per matrix: True when no entry is NaN or inf (coef ignored).");
    m.def("max_abs", &max_abs, py::arg("mats"), py::arg("threads") = 0,
          "max_abs(mats, threads=0) -> list[float]\n\n"
          "mats: list of Mat. Per matrix: the largest |entry| as a float (coef ignored; 0.0 when empty,\n"
          "NaN when an entry is NaN).");
    m.def("copy", &copy, py::arg("tasks"), py::arg("threads") = 0,
          "copy(tasks, threads=0) -> None\n\n"
          "tasks: list of (src: Mat, dst: Mat) of equal shape. dst = src.coef * src converted to dst's\n"
          "dtype (one rounding, nearest even); dst coef must be 1.");
    m.def("weighted_sum", &weighted_sum, py::arg("tasks"), py::arg("precise"), py::arg("threads") = 0,
          "weighted_sum(tasks, precise, threads=0) -> None\n\n"
          "tasks: list of (srcs: list of Mat, dst: Mat), all of one shape. dst = ((c_0 s_0) + c_1 s_1) + ...\n"
          "with c_k = srcs[k].coef: every product and sum rounded to float32 (float64 if precise), left\n"
          "to right, no fused multiply-add, then rounded to dst's dtype (nearest even): torch's roundings\n"
          "of t0 * w0 + t1 * w1 on tensors converted to that type. float64 sources need precise.");
    m.def("dense_merge", &dense_merge, py::arg("terms"), py::arg("out"), py::arg("mode"), py::arg("sign_method"),
          py::arg("threads") = 0,
          "dense_merge(terms, out, mode, sign_method, threads=0) -> None\n\n"
          "terms: list of k >= 1 (B: Mat, A: Mat, weight, keep_kind, tau, seed, thresh24, density), one per\n"
          "low-rank term t_i = (B.coef B)(A.coef A) (B: out x r_i, A: r_i x in). out: Mat (float32 or float64,\n"
          "out x in, any strides, coef 1), fully overwritten with the merge of the t_i, computed tile by tile\n"
          "in float32 (float64 when any factor is float64) without storing any t_i. keep_kind per term:\n"
          "0 all (p = t); 1 magnitude (p = t where |t| >= tau, else 0); 2 dare (p = t / density where\n"
          "(hash >> 40) < thresh24, else 0; hash = mix64(seed + (row*in + col + 1) * 0x9E3779B97F4A7C15),\n"
          "mix64 = murmur3 fmix64). mode 0 sum: M = sum w_i p_i; mode 1 ties: elect e = +1 if S >= 0 else -1\n"
          "with S = sum p_i (sign_method 0, total) or sum sign(p_i) (1, frequency); M = sum of w_i p_i over\n"
          "sign(p_i) == e, divided by max(1, their count). Masks multiply (peft 0.21), so NaN propagates.");
    m.def("abs_kth", &abs_kth, py::arg("tasks"), py::arg("threads") = 0,
          "abs_kth(tasks, threads=0) -> list[float]\n\n"
          "tasks: list of (B: Mat, A: Mat, k: int). For each, the k-th largest |t| over the out x in elements of\n"
          "t = (B.coef B)(A.coef A), computed exactly as dense_merge computes it (radix select over the bit\n"
          "patterns, t is never stored). k = 0 gives inf; 0 <= k <= out*in. NaN counts as larger than inf.");
    m.def("truncate", &truncate_modules, py::arg("tasks"), py::arg("rank"), py::arg("threads") = 0,
          "truncate(tasks, rank, threads=0) -> list[int]\n\n"
          "tasks: list of (B: Stack, At: Stack, out_B: Mat, out_At: Mat) for M = B A, B = [c_i B_i] (n_out x R),\n"
          "At = [A_i^T] (n_in x R). Writes B' = U_r S_r into out_B (n_out x rank) and A'^T = V_r into out_At\n"
          "(n_in x rank), M's best rank-r approximation B'A', from float64 Grams and their R x R algebra\n"
          "(Cholesky route, else eigen route), rebuilt in float64 and rounded to the outputs' dtypes.\n"
          "Returns per task the route: 0 Cholesky, 1 eigen (Ga numerically singular or ill conditioned),\n"
          "2 failed (non-finite Grams or an eigenproblem that did not converge: outputs left unwritten).");
    m.def("sym_eig", &sym_eig, py::arg("a_ptr"), py::arg("n"), py::arg("k"), py::arg("w_ptr"), py::arg("v_ptr"),
          "sym_eig(a_ptr, n, k, w_ptr, v_ptr) -> int\n\n"
          "The k largest eigenvalues (descending, into w: k float64) and unit eigenvectors (into v: n x k\n"
          "float64 row-major, column c for w[c]) of the symmetric n x n float64 row-major matrix at a_ptr\n"
          "(its upper triangle is read). Returns the number of eigenvectors\n"
          "whose inverse iteration did not converge (0 on success).");
    m.def(
        "fma_peak",
        [](bool double_precision, int threads, double seconds) {
            check_threads(threads);
            if (!(seconds > 0.0 && seconds <= 60.0)) fail("seconds: must be in (0, 60]");
            py::gil_scoped_release release;
            return kmf::fma_peak_gflops(double_precision, threads, seconds);
        },
        py::arg("double_precision"), py::arg("threads") = 0, py::arg("seconds") = 0.2,
        "fma_peak(double_precision, threads=0, seconds=0.2) -> float\n\n"
        "GFLOP/s (2 per multiply-add) of independent vector multiply-add chains in float64 or float32 on\n"
        "`threads` threads (0: all): the ceiling of the vector ISA this build targets, for benchmarks.");
    m.def(
        "info",
        []() {
            py::dict d;
            d["simd"] = kmf::kSimdName;
#ifdef KMERGE_FAST_NATIVE_BUILD
            d["native"] = true;
#else
            d["native"] = false;
#endif
#ifdef KMF_F16C
            d["f16c"] = true;
#else
            d["f16c"] = false;
#endif
            d["threads"] = kmf::hardware_threads();
            d["version"] = KMERGE_FAST_VERSION;
            return d;
        },
        "info() -> dict: build facts: simd (vector ISA targeted), native (-march=native), f16c (hardware half\n"
          "conversions in contiguous runs), threads, version.");
}
