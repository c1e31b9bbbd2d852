// kmerge_fast._C: the only file that knows about Python. It turns plain tuples
// of ints / floats into kmf::Mat / kmf::Stack descriptions, validates them
// (ValueError with the offending task and block named), then runs the C++
// kernels with the GIL released.
//
// Mat   = (ptr, dtype, rows, cols, row_stride, col_stride, coef); strides in
//         elements; dtype codes: _C.DTYPES (kmf::kDTypeCodes).
// Stack = sequence of >= 1 Mats with equal rows, concatenated along columns.
//
// Every task tuple is described once by its fields (name and kind, e.g.
// {"X", Kind::kStack}): the reader checks the tuple's length against them,
// names them in its errors, and parses each field by its kind.
#include <pybind11/pybind11.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/apply.h"
#include "core/codes.h"
#include "core/copy.h"
#include "core/dense_merge.h"
#include "core/dense_stats.h"
#include "core/finite.h"
#include "core/gram.h"
#include "core/gram_svd.h"
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

// ------------------------------------------------------------------ scalars

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

bool is_sequence(py::handle h) { return py::isinstance<py::tuple>(h) || py::isinstance<py::list>(h); }

std::string type_name(py::handle h) { return py::str(py::type::handle_of(h).attr("__name__")); }

/// An integer-like object (a Python int, or anything with __index__ such as a numpy integer) as a Python int.
py::object as_index(py::handle h, const std::string& what, const char* expected) {
    if (py::isinstance<py::float_>(h) || !PyIndex_Check(h.ptr())) fail(what + ": expected " + expected + ", got " + type_name(h));
    py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(h.ptr()));
    if (!index) throw py::error_already_set();
    return index;
}

/// An int in the int64 range.
std::int64_t get_int(py::handle h, const std::string& what) {
    const py::object index = as_index(h, what, "an int");
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow != 0) fail(what + ": integer out of range");
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    return static_cast<std::int64_t>(v);
}

/// An int in [0, 2^64); `range` says what the value is when it is not.
unsigned long long get_unsigned(py::handle h, const std::string& what, const char* expected, const char* range) {
    const py::object index = as_index(h, what, expected);
    const unsigned long long v = PyLong_AsUnsignedLongLong(index.ptr());
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        PyErr_Clear();
        fail(what + ": " + range);
    }
    return v;
}

/// A 64-bit unsigned int (e.g. a seed).
std::uint64_t get_u64(py::handle h, const std::string& what) {
    return static_cast<std::uint64_t>(get_unsigned(h, what, "an int", "expected an integer in [0, 2**64)"));
}

/// A pointer passed as a Python int (tensor.data_ptr()).
std::uintptr_t get_ptr(py::handle h, const std::string& what) {
    const unsigned long long v =
        get_unsigned(h, what, "a pointer (int)", "pointer is not a valid address (negative or too large)");
    if (v > UINTPTR_MAX) fail(what + ": pointer is too large for this platform");
    return static_cast<std::uintptr_t>(v);
}

/// A real number: Python float or int, or anything with __float__ (numpy scalars).
double get_float(py::handle h, const std::string& what) {
    const double v = PyFloat_AsDouble(h.ptr());
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        fail(what + ": expected a float, got " + type_name(h));
    }
    return v;
}

bool get_bool(py::handle h, const std::string& what) {
    if (!py::isinstance<py::bool_>(h) && !py::isinstance<py::int_>(h)) fail(what + ": expected a bool, got " + type_name(h));
    return py::cast<bool>(h);
}

/// A code of `table` (a dtype, keep kind, mode, ...).
template <std::size_t N>
int check_code(const kmf::CodeName (&table)[N], long long code, const std::string& what) {
    if (!kmf::valid_code(table, code))
        fail(what + ": expected " + kmf::codes_text(table) + ", got " + std::to_string(code));
    return static_cast<int>(code);
}

void check_threads(int threads) {
    if (threads < 0) fail("threads: must be >= 0 (0 = all hardware threads), got " + std::to_string(threads));
}

/// A float64 buffer given by its address: aligned, and non-null when `needed` (something is read or written there).
double* f64_buffer(std::uintptr_t p, const std::string& what, bool needed = true) {
    if (p == 0 && needed) fail(what + ": null pointer");
    if (p % alignof(double) != 0) fail(what + ": not aligned for float64");
    return reinterpret_cast<double*>(p);
}

// ------------------------------------------------------------------ matrices

std::string shape_str(const kmf::Mat& m) { return std::to_string(m.rows) + " x " + std::to_string(m.cols); }
std::string shape_str(std::int64_t rows, std::int64_t cols) { return std::to_string(rows) + " x " + std::to_string(cols); }

kmf::Mat parse_mat(py::handle h, const std::string& where) {
    if (!is_sequence(h) || py::len(h) != 7)
        fail(where + ": expected a Mat tuple (ptr, dtype, rows, cols, row_stride, col_stride, coef)");
    py::sequence t = py::reinterpret_borrow<py::sequence>(h);
    kmf::Mat m;
    const std::uintptr_t ptr = get_ptr(t[0], where + " ptr");
    const std::int64_t code = get_int(t[1], where + " dtype");
    if (!kmf::valid_dtype(static_cast<int>(code)) || code != static_cast<int>(code))
        fail(where + ": bad dtype code " + std::to_string(code) + " (expected " + kmf::codes_text(kmf::kDTypeCodes) + ")");
    m.dtype = static_cast<int>(code);
    m.rows = get_int(t[2], where + " rows");
    m.cols = get_int(t[3], where + " cols");
    m.rs = get_int(t[4], where + " row_stride");
    m.cs = get_int(t[5], where + " col_stride");
    m.coef = get_float(t[6], where + " coef");
    if (m.rows < 0 || m.cols < 0) fail(where + ": negative shape (" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + ")");
    // Every element offset (i * rs + j * cs) * elem_size must fit in 63 bits.
    const double span = (std::fabs(double(m.rs)) * double(m.rows) + std::fabs(double(m.cs)) * double(m.cols)) * 8.0;
    if (span >= 9.0e18 || double(m.rows) * double(m.cols) >= 9.0e18) fail(where + ": shape or strides too large");
    if (ptr == 0 && m.rows > 0 && m.cols > 0) fail(where + ": null pointer for a non-empty matrix");
    if (ptr % static_cast<std::uintptr_t>(kmf::elem_size(m.dtype)) != 0)
        fail(where + ": pointer is not aligned to its " + kmf::dtype_name(m.dtype) + " element size");
    m.ptr = reinterpret_cast<const void*>(ptr);
    return m;
}

/// Calls each(item, index) for every item of a list or tuple; `what` names the argument in the error.
template <typename Each>
void for_each_item(py::handle seq, const std::string& what, const char* expected, Each each) {
    if (!is_sequence(seq)) fail(what + ": expected a list of " + expected);
    std::size_t i = 0;
    for (py::handle h : seq) each(h, i++);
}

kmf::Stack parse_stack(py::handle h, const std::string& where) {
    std::vector<kmf::Mat> blocks;
    for_each_item(h, where, "Mat tuples", [&](py::handle b, std::size_t k) {
        blocks.push_back(parse_mat(b, where + " block " + std::to_string(k)));
        if (blocks[k].rows != blocks[0].rows)
            fail(where + ": block " + std::to_string(k) + " has " + std::to_string(blocks[k].rows) + " rows, block 0 has " +
                 std::to_string(blocks[0].rows) + " (blocks of a stack must have equal rows)");
    });
    if (blocks.empty()) fail(where + ": a stack needs at least one block");
    return kmf::Stack(std::move(blocks));
}

/// A list of Mats (all_finite, max_abs): element i is named "<what> i".
std::vector<kmf::Mat> parse_mats(py::handle mats, const std::string& what) {
    std::vector<kmf::Mat> out;
    for_each_item(mats, "mats", "Mat tuples",
                  [&](py::handle h, std::size_t i) { out.push_back(parse_mat(h, what + " " + std::to_string(i))); });
    return out;
}

bool same_mat(const kmf::Mat& a, const kmf::Mat& b) {
    return a.ptr == b.ptr && a.dtype == b.dtype && a.rows == b.rows && a.cols == b.cols && a.rs == b.rs && a.cs == b.cs &&
           a.coef == b.coef;
}

// ------------------------------------------------------------------ task tuples

/// What one field of a task tuple holds.
enum class Kind { kMat, kStack, kMats, kPtr, kInt, kU64, kFloat, kBool };

const char* kind_text(Kind k) {
    switch (k) {
        case Kind::kMat: return "Mat";
        case Kind::kStack: return "Stack";
        case Kind::kMats: return "list of Mat";
        case Kind::kFloat: return "float";
        case Kind::kBool: return "bool";
        default: return "int";
    }
}

struct Field {
    const char* name;
    Kind kind;
};

/// One task tuple, checked against its fields: field i is read with the
/// accessor of its kind and named "<where> <field name>" in errors.
class Fields {
public:
    template <std::size_t N>
    Fields(py::handle h, std::string where, const Field (&fields)[N]) : where_(std::move(where)), fields_(fields), n_(N) {
        if (!is_sequence(h) || py::len(h) != N) fail(where_ + ": expected a tuple " + shape());
        seq_ = py::reinterpret_borrow<py::sequence>(h);
    }

    const std::string& where() const { return where_; }
    kmf::Mat mat(std::size_t i) const { return parse_mat(item(i, Kind::kMat), name(i)); }
    kmf::Stack stack(std::size_t i) const { return parse_stack(item(i, Kind::kStack), name(i)); }
    std::vector<kmf::Mat> mats(std::size_t i) const { return parse_stack(item(i, Kind::kMats), name(i)).blocks; }
    std::uintptr_t ptr(std::size_t i) const { return get_ptr(item(i, Kind::kPtr), name(i)); }
    double* f64(std::size_t i, bool needed = true) const { return f64_buffer(ptr(i), name(i), needed); }
    std::int64_t integer(std::size_t i) const { return get_int(item(i, Kind::kInt), name(i)); }
    std::uint64_t u64(std::size_t i) const { return get_u64(item(i, Kind::kU64), name(i)); }
    double real(std::size_t i) const { return get_float(item(i, Kind::kFloat), name(i)); }
    bool flag(std::size_t i) const { return get_bool(item(i, Kind::kBool), name(i)); }

    /// "(X: Stack, Y: Stack, out_ptr: int)".
    std::string shape() const {
        std::string s = "(";
        for (std::size_t i = 0; i < n_; ++i) s += std::string(i ? ", " : "") + fields_[i].name + ": " + kind_text(fields_[i].kind);
        return s + ")";
    }

private:
    py::handle item(std::size_t i, Kind kind) const {
        if (i >= n_ || fields_[i].kind != kind) throw std::logic_error(where_ + ": field read as the wrong kind (bindings bug)");
        return seq_[i];
    }
    std::string name(std::size_t i) const { return where_ + " " + fields_[i].name; }

    std::string where_;
    const Field* fields_;
    std::size_t n_;
    py::sequence seq_;
};

/// Every tuple of the list `arg` ("tasks") parsed by parse(Fields) into a Task; tuple i is "<what> i".
template <typename Task, std::size_t N, typename Parse>
std::vector<Task> parse_tuples(py::handle list, const char* arg, const std::string& what, const Field (&fields)[N], Parse parse) {
    std::vector<Task> out;
    const std::string item = std::string(arg).substr(0, std::string(arg).size() - 1);  // "tasks" -> "task"
    for_each_item(list, arg, (item + " tuples").c_str(),
                  [&](py::handle h, std::size_t i) { out.push_back(parse(Fields(h, what + " " + std::to_string(i), fields))); });
    return out;
}

/// (B, A) of one low-rank term: B is out x r, A is r x in.
std::pair<kmf::Mat, kmf::Mat> parse_factors(const Fields& t, std::size_t b, std::size_t a) {
    kmf::Mat mb = t.mat(b), ma = t.mat(a);
    if (mb.cols != ma.rows) fail(t.where() + ": B is " + shape_str(mb) + ", A is " + shape_str(ma) + " (B.cols must equal A.rows)");
    return {mb, ma};
}

void check_unit_coef(const kmf::Mat& m, const std::string& what) {
    if (m.coef != 1.0) fail(what + " coef must be 1");
}

/// Parses the list of task tuples, then runs kernel(parsed) with the GIL
/// released and returns its result (converted to Python by the caller).
template <typename Task, std::size_t N, typename Parse, typename Kernel>
auto run_tasks(py::handle tasks, int threads, const std::string& what, const Field (&fields)[N], Parse parse, Kernel kernel) {
    check_threads(threads);
    std::vector<Task> parsed = parse_tuples<Task>(tasks, "tasks", what, fields, parse);
    py::gil_scoped_release release;
    return kernel(parsed);
}

template <typename T>
py::list to_list(const std::vector<T>& values) {
    py::list out;
    for (const T& v : values) out.append(v);
    return out;
}

// ------------------------------------------------------------------ the task tuples of each kernel

constexpr Field kGramFields[] = {{"X", Kind::kStack}, {"Y", Kind::kStack}, {"out_ptr", Kind::kPtr}, {"symmetric", Kind::kBool}};

kmf::GramTask parse_gram(const Fields& t) {
    kmf::GramTask g;
    g.x = t.stack(0);
    g.y = t.stack(1);
    g.symmetric = t.flag(3);
    const std::string& w = t.where();
    if (g.x.rows != g.y.rows)
        fail(w + ": X has " + std::to_string(g.x.rows) + " rows, Y has " + std::to_string(g.y.rows) + " (X^T Y needs equal K)");
    if (g.symmetric) {
        bool same = g.x.blocks.size() == g.y.blocks.size();
        for (std::size_t b = 0; same && b < g.x.blocks.size(); ++b) same = same_mat(g.x.blocks[b], g.y.blocks[b]);
        if (!same) fail(w + ": symmetric=True requires X and Y to be the same stack");
    }
    g.out = t.f64(2, g.x.cols * g.y.cols > 0);
    return g;
}

constexpr Field kApplyFields[] = {{"X", Kind::kStack}, {"T_ptr", Kind::kPtr}, {"C", Kind::kInt}, {"out", Kind::kMat}};

kmf::ApplyTask parse_apply(const Fields& t) {
    kmf::ApplyTask a;
    a.x = t.stack(0);
    a.c = t.integer(2);
    a.out = t.mat(3);
    const std::string& w = t.where();
    if (a.c < 0) fail(w + ": C must be >= 0, got " + std::to_string(a.c));
    if (a.out.rows != a.x.rows || a.out.cols != a.c)
        fail(w + ": out is " + shape_str(a.out) + ", expected K x C = " + shape_str(a.x.rows, a.c));
    check_unit_coef(a.out, w + ": out");
    a.t = t.f64(1, a.x.cols * a.c > 0);
    return a;
}

constexpr Field kDenseStatsFields[] = {{"X", Kind::kStack}, {"Y", Kind::kStack}, {"out_ptr", Kind::kPtr}};

kmf::DenseStatsTask parse_dense_stats(const Fields& t) {
    kmf::DenseStatsTask d;
    d.x = t.stack(0);
    d.y = t.stack(1);
    if (d.x.cols != d.y.cols)
        fail(t.where() + ": X has " + std::to_string(d.x.cols) + " columns, Y has " + std::to_string(d.y.cols) +
             " (X Y^T needs equal R)");
    d.out = t.f64(2);
    return d;
}

constexpr Field kCopyFields[] = {{"src", Kind::kMat}, {"dst", Kind::kMat}};

kmf::CopyTask parse_copy(const Fields& t) {
    kmf::CopyTask c;
    c.src = t.mat(0);
    c.dst = t.mat(1);
    if (c.src.rows != c.dst.rows || c.src.cols != c.dst.cols)
        fail(t.where() + ": src is " + shape_str(c.src) + ", dst is " + shape_str(c.dst));
    check_unit_coef(c.dst, t.where() + ": dst");
    return c;
}

constexpr Field kWeightedSumFields[] = {{"srcs", Kind::kMats}, {"dst", Kind::kMat}};

kmf::WeightedSumTask parse_weighted_sum(const Fields& t, bool precise) {
    kmf::WeightedSumTask ws;
    ws.dst = t.mat(1);
    ws.srcs = t.mats(0);  // one or more Mats (a stack's parse)
    for (std::size_t k = 0; k < ws.srcs.size(); ++k) {
        const kmf::Mat& m = ws.srcs[k];
        const std::string what = t.where() + " src " + std::to_string(k);
        if (m.rows != ws.dst.rows || m.cols != ws.dst.cols) fail(what + " is " + shape_str(m) + ", dst is " + shape_str(ws.dst));
        if (!precise && m.dtype == kmf::kF64) fail(what + ": a float64 source needs precise=True");
    }
    check_unit_coef(ws.dst, t.where() + ": dst");
    return ws;
}

constexpr Field kMergeTermFields[] = {{"B", Kind::kMat},        {"A", Kind::kMat},     {"weight", Kind::kFloat},
                                      {"keep_kind", Kind::kInt}, {"tau", Kind::kFloat}, {"seed", Kind::kU64},
                                      {"thresh24", Kind::kInt},  {"density", Kind::kFloat}};

kmf::MergeTerm parse_merge_term(const Fields& t, const kmf::Mat& out) {
    kmf::MergeTerm m;
    const std::string& w = t.where();
    std::tie(m.b, m.a) = parse_factors(t, 0, 1);
    m.weight = t.real(2);
    const std::int64_t kind = t.integer(3);
    m.tau = t.real(4);
    m.seed = t.u64(5);
    const std::int64_t th = t.integer(6);
    m.density = t.real(7);
    m.keep = check_code(kmf::kKeepKindCodes, kind, w + ": keep_kind");
    if (m.b.rows != out.rows || m.a.cols != out.cols)
        fail(w + ": B @ A is " + shape_str(m.b.rows, m.a.cols) + ", out is " + shape_str(out));
    if (m.keep == kmf::kKeepDare) {
        if (th < 0 || th > (std::int64_t(1) << 24)) fail(w + ": thresh24 must be in [0, 2**24], got " + std::to_string(th));
        if (!(m.density > 0.0) || !std::isfinite(m.density))
            fail(w + ": density must be a finite number > 0 for dare, got " + std::to_string(m.density));
        m.thresh24 = static_cast<std::uint64_t>(th);
    }
    return m;
}

constexpr Field kAbsKthFields[] = {{"B", Kind::kMat}, {"A", Kind::kMat}, {"k", Kind::kInt}};

kmf::AbsKthTask parse_abs_kth(const Fields& t) {
    kmf::AbsKthTask a;
    std::tie(a.b, a.a) = parse_factors(t, 0, 1);
    a.k = t.integer(2);
    const double numel = double(a.b.rows) * double(a.a.cols);
    if (a.k < 0 || double(a.k) > numel)
        fail(t.where() + ": k must be in [0, out * in = " + std::to_string(a.b.rows * a.a.cols) + "], got " + std::to_string(a.k));
    return a;
}

constexpr Field kTruncateFields[] = {{"B", Kind::kStack}, {"At", Kind::kStack}, {"out_B", Kind::kMat}, {"out_At", Kind::kMat}};

kmf::TruncateTask parse_truncate(const Fields& t, std::int64_t rank) {
    kmf::TruncateTask tr;
    tr.b = t.stack(0);
    tr.at = t.stack(1);
    tr.out_b = t.mat(2);
    tr.out_at = t.mat(3);
    const std::string& w = t.where();
    if (tr.b.cols != tr.at.cols) fail(w + ": B has " + std::to_string(tr.b.cols) + " stacked columns, At has " + std::to_string(tr.at.cols));
    if (tr.b.cols > (std::int64_t(1) << 16)) fail(w + ": stacked rank above 65536");
    if (tr.out_b.rows != tr.b.rows || tr.out_b.cols != rank)
        fail(w + ": out_B is " + shape_str(tr.out_b) + ", expected " + shape_str(tr.b.rows, rank));
    if (tr.out_at.rows != tr.at.rows || tr.out_at.cols != rank)
        fail(w + ": out_At is " + shape_str(tr.out_at) + ", expected " + shape_str(tr.at.rows, rank));
    if (tr.out_b.coef != 1.0 || tr.out_at.coef != 1.0) fail(w + ": out coefs must be 1");
    return tr;
}

// ------------------------------------------------------------------ entry points

void gram(py::handle tasks, bool precise, int threads) {
    run_tasks<kmf::GramTask>(tasks, threads, "gram task", kGramFields, parse_gram,
                             [&](const auto& p) { kmf::gram(p, precise, threads); });
}

void apply(py::handle tasks, bool precise, int threads) {
    run_tasks<kmf::ApplyTask>(tasks, threads, "apply task", kApplyFields, parse_apply,
                              [&](const auto& p) { kmf::apply(p, precise, threads); });
}

void dense_stats(py::handle tasks, int threads) {
    run_tasks<kmf::DenseStatsTask>(tasks, threads, "dense_stats task", kDenseStatsFields, parse_dense_stats,
                                   [&](const auto& p) { kmf::dense_stats(p, threads); });
}

void copy(py::handle tasks, int threads) {
    run_tasks<kmf::CopyTask>(tasks, threads, "copy task", kCopyFields, parse_copy, [&](const auto& p) { kmf::copy(p, threads); });
}

void weighted_sum(py::handle tasks, bool precise, int threads) {
    run_tasks<kmf::WeightedSumTask>(
        tasks, threads, "weighted_sum task", kWeightedSumFields, [&](const Fields& t) { return parse_weighted_sum(t, precise); },
        [&](const auto& p) { kmf::weighted_sum(p, precise, threads); });
}

py::list abs_kth(py::handle tasks, int threads) {
    return to_list(run_tasks<kmf::AbsKthTask>(tasks, threads, "abs_kth task", kAbsKthFields, parse_abs_kth,
                                              [&](const auto& p) { return kmf::abs_kth(p, threads); }));
}

py::list truncate_modules(py::handle tasks, std::int64_t rank, int threads) {
    check_threads(threads);
    if (rank < 1) fail("rank: must be >= 1, got " + std::to_string(rank));
    return to_list(run_tasks<kmf::TruncateTask>(
        tasks, threads, "truncate task", kTruncateFields, [&](const Fields& t) { return parse_truncate(t, rank); },
        [&](std::vector<kmf::TruncateTask>& p) {
            kmf::truncate(p, rank, threads);
            std::vector<int> routes;
            for (const kmf::TruncateTask& t : p) routes.push_back(t.route);
            return routes;
        }));
}

void dense_merge(py::handle terms, py::handle out, int mode, int sign_method, int threads) {
    check_threads(threads);
    check_code(kmf::kCombineModeCodes, mode, "mode");
    check_code(kmf::kSignMethodCodes, sign_method, "sign_method");
    const kmf::Mat o = parse_mat(out, "dense_merge out");
    if (o.dtype != kmf::kF32 && o.dtype != kmf::kF64)
        fail(std::string("dense_merge out: must be float32 or float64, got ") + kmf::dtype_name(o.dtype));
    check_unit_coef(o, "dense_merge out:");
    if ((o.rs == 0 && o.rows > 1) || (o.cs == 0 && o.cols > 1)) fail("dense_merge out: a zero stride aliases elements");
    const auto parsed = parse_tuples<kmf::MergeTerm>(terms, "terms", "dense_merge term", kMergeTermFields,
                                                     [&](const Fields& t) { return parse_merge_term(t, o); });
    if (parsed.empty()) fail("terms: need at least one term");
    py::gil_scoped_release release;
    kmf::dense_merge(parsed, o, mode, sign_method, threads);
}

/// all_finite / max_abs: a list of Mats, one result each.
template <typename Kernel>
auto run_mats(py::handle mats, int threads, const char* what, Kernel kernel) {
    check_threads(threads);
    const std::vector<kmf::Mat> parsed = parse_mats(mats, what);
    py::gil_scoped_release release;
    return kernel(parsed);
}

py::list all_finite(py::handle mats, int threads) {
    const std::vector<char> flags = run_mats(mats, threads, "all_finite mat", [&](const auto& p) { return kmf::all_finite(p, threads); });
    return to_list(std::vector<bool>(flags.begin(), flags.end()));
}

py::list max_abs(py::handle mats, int threads) {
    return to_list(run_mats(mats, threads, "max_abs mat", [&](const auto& p) { return kmf::max_abs(p, threads); }));
}

py::list gram_svd(std::uintptr_t gb_ptr, std::uintptr_t ga_ptr, std::uintptr_t tb_ptr, std::uintptr_t ta_ptr,
                   std::int64_t n, std::int64_t big_r, std::int64_t rank, int threads) {
    check_threads(threads);
    if (n < 0) fail("n: must be >= 0, got " + std::to_string(n));
    if (big_r < 0 || big_r > (std::int64_t(1) << 16)) fail("big_r: must be in [0, 65536], got " + std::to_string(big_r));
    if (rank < 1) fail("rank: must be >= 1, got " + std::to_string(rank));
    if (n == 0 || big_r == 0) return to_list(std::vector<int>(static_cast<std::size_t>(n), kmf::kRouteCholesky));
    std::vector<kmf::GramSvdTask> tasks(static_cast<std::size_t>(n));
    std::vector<double> sigma2(static_cast<std::size_t>(n * rank));
    const double* gb = f64_buffer(gb_ptr, "gb_ptr");
    const double* ga = f64_buffer(ga_ptr, "ga_ptr");
    double* tb = f64_buffer(tb_ptr, "tb_ptr");
    double* ta = f64_buffer(ta_ptr, "ta_ptr");
    for (std::int64_t i = 0; i < n; ++i) {
        kmf::GramSvdTask& t = tasks[static_cast<std::size_t>(i)];
        t.gb = gb + i * big_r * big_r, t.ga = ga + i * big_r * big_r, t.big_r = big_r;
        t.t_b = tb + i * big_r * rank, t.t_a = ta + i * big_r * rank;
        t.sigma2 = sigma2.data() + i * rank;
    }
    {
        py::gil_scoped_release release;
        kmf::gram_svd(tasks, rank, threads);
    }
    std::vector<int> routes;
    for (const kmf::GramSvdTask& t : tasks) routes.push_back(t.route);
    return to_list(routes);
}

int sym_eig(std::uintptr_t a_ptr, std::int64_t n, std::int64_t k, std::uintptr_t w_ptr, std::uintptr_t v_ptr) {
    if (n < 0 || n > (std::int64_t(1) << 16)) fail("n: must be in [0, 65536], got " + std::to_string(n));
    if (k < 0 || k > n) fail("k: must be in [0, n], got " + std::to_string(k));
    if (n == 0) return 0;
    double* a = f64_buffer(a_ptr, "a_ptr");
    double* w = k > 0 ? f64_buffer(w_ptr, "w_ptr") : nullptr;
    double* v = k > 0 ? f64_buffer(v_ptr, "v_ptr") : nullptr;
    for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = i; j < n; ++j)
            if (!std::isfinite(a[i * n + j])) fail("a: entries must be finite");
    py::gil_scoped_release release;
    kmf::SymEig eig(n, a, n);
    eig.top_values(k, w);
    return eig.vectors(k, w, v, k);
}

/// A code table as a Python dict {name: code}.
template <std::size_t N>
py::dict code_dict(const kmf::CodeName (&table)[N]) {
    py::dict d;
    for (const kmf::CodeName& c : table) d[py::str(c.name)] = py::int_(c.code);
    return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() =
        "kmerge_fast compiled core: batched Gram, apply, dense-statistics and dense-merge kernels on raw strided buffers.\n\n"
        "Mat = (ptr, dtype, rows, cols, row_stride, col_stride, coef): element (i, j) is at\n"
        "ptr + (i*row_stride + j*col_stride)*elem_size and is multiplied by coef.\n"
        "dtype: 0=float32, 1=float16, 2=bfloat16, 3=float64. Stack = list of Mats with equal rows,\n"
        "concatenated along columns. threads=0 uses every hardware thread. The GIL is released\n"
        "while kernels run; the caller keeps the buffers alive and must not alias outputs with inputs.\n\n"
        "The integer codes, as dicts name -> code: DTYPES (Mat dtype), KEEP_KINDS, COMBINE_MODES,\n"
        "SIGN_METHODS (dense_merge) and ROUTES (truncate's result).";
    m.attr("DTYPES") = code_dict(kmf::kDTypeCodes);
    m.attr("KEEP_KINDS") = code_dict(kmf::kKeepKindCodes);
    m.attr("COMBINE_MODES") = code_dict(kmf::kCombineModeCodes);
    m.attr("SIGN_METHODS") = code_dict(kmf::kSignMethodCodes);
    m.attr("ROUTES") = code_dict(kmf::kRouteCodes);
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
    m.def("gram_svd", &gram_svd, py::arg("gb_ptr"), py::arg("ga_ptr"), py::arg("tb_ptr"), py::arg("ta_ptr"),
          py::arg("n"), py::arg("big_r"), py::arg("rank"), py::arg("threads") = 0,
          "gram_svd(gb_ptr, ga_ptr, tb_ptr, ta_ptr, n, big_r, rank, threads=0) -> list[int]\n\n"
          "The R x R algebra of truncate alone, for Grams formed elsewhere: gb, ga are n contiguous float64\n"
          "R x R matrices (Gb = B^T B, Ga = A A^T, symmetric, row-major); writes the transforms T_B, T_A\n"
          "(n contiguous float64 R x rank, row-major) so that B' = B T_B = U_r S_r and A'^T = A^T T_A = V_r.\n"
          "One module per thread. Returns per module the route: 0 Cholesky, 1 eigen, 2 failed (non-finite\n"
          "Grams or an eigenproblem that did not converge: that module's T_B, T_A are unspecified).");
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
