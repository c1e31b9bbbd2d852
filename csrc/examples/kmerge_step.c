/* One K-Merge step on in-memory LoRA factors, with nothing but kmerge_fast.h
 * and the static library libkmerge_fast_c.a:
 *
 *   1. K slots (each the merge of n_j earlier adapters) and a newcomer, drawn
 *      from a seeded PRNG, float32, small Llama-like module shapes;
 *   2. kmf_similarity: cosine of the newcomer to every slot; pick the most similar;
 *   3. merge it into that slot with the running-average weights (1 - 1/n, 1/n),
 *      n = n_j + 1, twice: peft's factor-wise linear merge (kmf_linear_merge,
 *      the published K-Merge step) and the exact merge (kmf_truncate of the
 *      stacked factors back to the slot's rank);
 *   4. verify everything against a naive dense float64 computation done here
 *      (dense updates, cosines, the merged factors, and a Jacobi SVD showing the
 *      truncation is the best rank-r approximation). Exit status 1 on a mismatch.
 *
 * Build (see CMakeLists.txt; target kmerge_step), or by hand:
 *   cc -std=c99 -O2 csrc/examples/kmerge_step.c -I csrc/include build/libkmerge_fast_c.a -lstdc++ -lm -lpthread
 * Run: ./kmerge_step [seed]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmerge_fast.h"

#define N_LAYERS 2
#define N_KINDS 4
#define N_MODULES (N_LAYERS * N_KINDS)
#define K_SLOTS 4
#define RANK 8
#define ALPHA 16.0

/* A tiny Llama: hidden 64, grouped-query k/v 16, MLP 172 (n_out, n_in per module kind). */
static const int64_t kShapes[N_KINDS][2] = {{64, 64}, {16, 64}, {172, 64}, {64, 172}};
static const char* const kKinds[N_KINDS] = {"q_proj", "v_proj", "up_proj", "down_proj"};

/* ------------------------------------------------------------------ PRNG (splitmix64) */
static uint64_t rng_state;

static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static double uniform(void) { return (double)(next_u64() >> 11) * 0x1p-52 - 1.0; }

/* ------------------------------------------------------------------ adapters in memory */
typedef struct {
    kmf_module modules[N_MODULES];
    kmf_adapter view;
} adapter;

static void* xcalloc(size_t n, size_t size) {
    void* p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static kmf_matrix matrix_f32(int64_t rows, int64_t cols) {
    kmf_matrix m;
    memset(&m, 0, sizeof m);
    m.data = xcalloc((size_t)(rows * cols), sizeof(float));
    m.dtype = KMF_F32;
    m.rows = rows;
    m.cols = cols;
    m.row_stride = cols;
    return m;
}

/* An adapter of rank `rank` with factors drawn around `base` (NULL: none): x = base + spread * u. */
static void make_adapter(adapter* ad, int64_t rank, const adapter* base, double spread) {
    int m;
    for (m = 0; m < N_MODULES; ++m) {
        const int64_t n_out = kShapes[m % N_KINDS][0], n_in = kShapes[m % N_KINDS][1];
        kmf_module* mod = &ad->modules[m];
        int64_t i, n;
        mod->a = matrix_f32(rank, n_in);
        mod->b = matrix_f32(n_out, rank);
        mod->scaling = ALPHA / (double)rank;
        n = rank * n_in;
        for (i = 0; i < n; ++i)
            ((float*)mod->a.data)[i] = (float)((base ? ((const float*)base->modules[m].a.data)[i] : 0.0) + spread * uniform() * 0.1);
        n = n_out * rank;
        for (i = 0; i < n; ++i)
            ((float*)mod->b.data)[i] = (float)((base ? ((const float*)base->modules[m].b.data)[i] : 0.0) + spread * uniform() * 0.05);
    }
    ad->view.modules = ad->modules;
    ad->view.n_modules = N_MODULES;
}

static void free_adapter(adapter* ad) {
    int m;
    for (m = 0; m < N_MODULES; ++m) {
        free(ad->modules[m].a.data);
        free(ad->modules[m].b.data);
    }
}

static double get(const kmf_matrix* m, int64_t i, int64_t j) { return ((const float*)m->data)[i * m->row_stride + j]; }

/* ------------------------------------------------------------------ naive dense float64 */
/* dW = coef * scaling * B A, n_out x n_in, added into w. */
static void add_dense(double* w, const kmf_module* mod, double coef) {
    const int64_t n_out = mod->b.rows, n_in = mod->a.cols, r = mod->a.rows;
    int64_t i, j, p;
    for (i = 0; i < n_out; ++i)
        for (j = 0; j < n_in; ++j) {
            double s = 0.0;
            for (p = 0; p < r; ++p) s += get(&mod->b, i, p) * get(&mod->a, p, j);
            w[i * n_in + j] += coef * mod->scaling * s;
        }
}

static double dot(const double* x, const double* y, int64_t n) {
    double s = 0.0;
    int64_t i;
    for (i = 0; i < n; ++i) s += x[i] * y[i];
    return s;
}

/* Singular values (descending) of the n_out x n_in matrix w by one-sided Jacobi on a copy
 * (on the columns of w or of w^T, whichever are fewer: min(n_out, n_in) values). */
static void singular_values(const double* w, int64_t n_out, int64_t n_in, double* sv) {
    const int transpose = n_in > n_out;
    const int64_t len = transpose ? n_in : n_out, n = transpose ? n_out : n_in;
    double* u = (double*)xcalloc((size_t)(n_out * n_in), sizeof(double)); /* column j at u + j * len */
    double total = 0.0;
    int64_t i, j, p, q;
    int sweep;
    for (i = 0; i < n_out; ++i)
        for (j = 0; j < n_in; ++j) {
            const double v = w[i * n_in + j];
            u[transpose ? i * len + j : j * len + i] = v;
            total += v * v;
        }
    for (sweep = 0; sweep < 60; ++sweep) {
        double off = 0.0;
        for (p = 0; p < n; ++p)
            for (q = p + 1; q < n; ++q) {
                double* x = u + p * len;
                double* y = u + q * len;
                const double a = dot(x, x, len), b = dot(y, y, len), c = dot(x, y, len);
                double zeta, t, cs, sn;
                /* columns at rounding level of the whole matrix are zeros of its rank */
                if (a <= 1e-28 * total || b <= 1e-28 * total || fabs(c) <= 1e-15 * sqrt(a * b)) continue;
                off = fmax(off, fabs(c) / sqrt(a * b));
                zeta = (b - a) / (2.0 * c);
                t = (zeta >= 0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
                cs = 1.0 / sqrt(1.0 + t * t);
                sn = cs * t;
                for (i = 0; i < len; ++i) {
                    const double xi = x[i], yi = y[i];
                    x[i] = cs * xi - sn * yi;
                    y[i] = sn * xi + cs * yi;
                }
            }
        if (off < 1e-14) break;
    }
    for (j = 0; j < n; ++j) sv[j] = sqrt(dot(u + j * len, u + j * len, len));
    for (j = n; j < n_in; ++j) sv[j] = 0.0;
    /* sort descending (insertion sort: n is small) */
    for (j = 1; j < n; ++j) {
        const double v = sv[j];
        i = j - 1;
        while (i >= 0 && sv[i] < v) {
            sv[i + 1] = sv[i];
            --i;
        }
        sv[i + 1] = v;
    }
    free(u);
}

static int failures = 0;

static void expect(int ok, const char* what, double got, double want) {
    if (!ok) {
        fprintf(stderr, "MISMATCH %s: got %.17g, expected %.17g\n", what, got, want);
        ++failures;
    }
}

/* got = w[0] s0 + w[1] s1 to float32's rounding, elementwise; returns the sum of got. */
static double check_sum(const kmf_matrix* got, const kmf_matrix* s0, const kmf_matrix* s1, const double* w, const char* what) {
    double total = 0.0;
    int64_t i, j;
    for (i = 0; i < got->rows; ++i)
        for (j = 0; j < got->cols; ++j) {
            const double t0 = w[0] * get(s0, i, j), t1 = w[1] * get(s1, i, j), g = get(got, i, j);
            expect(fabs(g - (t0 + t1)) <= 1e-6 * (fabs(t0) + fabs(t1)) + 1e-30, what, g, t0 + t1);
            total += g;
        }
    return total;
}

static void check_status(int status, const kmf_error* err) {
    if (status != KMF_OK) {
        fprintf(stderr, "kmerge_fast error %d (%s): %s\n", status, kmf_status_name(status), err->message);
        exit(1);
    }
}

int main(int argc, char** argv) {
    const uint64_t seed = argc > 1 ? (uint64_t)strtoull(argv[1], NULL, 10) : 20261204u;
    static adapter slots[K_SLOTS], newcomer, linear, exact;
    kmf_adapter slot_views[K_SLOTS];
    const int members[K_SLOTS] = {3, 1, 4, 2};
    double sim[K_SLOTS], weights[2], check = 0.0;
    kmf_error err;
    int j, m, best = 0, n;

    if (kmf_api_version() / 10000 != KMF_API_VERSION_MAJOR) {
        fprintf(stderr, "library API %s does not match the header's major version %d\n", kmf_version(), KMF_API_VERSION_MAJOR);
        return 1;
    }
    rng_state = seed;
    for (j = 0; j < K_SLOTS; ++j) {
        make_adapter(&slots[j], RANK, NULL, 1.0);
        slot_views[j] = slots[j].view;
    }
    /* the newcomer: close to one slot (chosen by the seed), plus noise */
    make_adapter(&newcomer, RANK, &slots[next_u64() % K_SLOTS], 0.6);

    /* 2. similarities and the routing decision */
    check_status(kmf_similarity(&newcomer.view, slot_views, K_SLOTS, KMF_METRIC_COS, 0, sim, &err), &err);
    for (j = 1; j < K_SLOTS; ++j)
        if (sim[j] > sim[best]) best = j;
    for (j = 0; j < K_SLOTS; ++j) {
        /* naive: mean over modules of the dense cosine */
        double mean = 0.0;
        for (m = 0; m < N_MODULES; ++m) {
            const int64_t size = newcomer.modules[m].b.rows * newcomer.modules[m].a.cols;
            double* x = (double*)xcalloc((size_t)size, sizeof(double));
            double* y = (double*)xcalloc((size_t)size, sizeof(double));
            add_dense(x, &newcomer.modules[m], 1.0);
            add_dense(y, &slots[j].modules[m], 1.0);
            mean += dot(x, y, size) / sqrt(dot(x, x, size) * dot(y, y, size)) / N_MODULES;
            free(x);
            free(y);
        }
        printf("slot %d (%d members): cos %.6f\n", j, members[j], sim[j]);
        expect(fabs(sim[j] - mean) <= 1e-9, "cosine", sim[j], mean);
    }
    n = members[best] + 1;
    weights[0] = 1.0 - 1.0 / n;
    weights[1] = 1.0 / n;
    printf("chosen slot: %d (cos %.6f), merging as member %d: weights (%.6f, %.6f)\n", best, sim[best], n, weights[0],
           weights[1]);

    {
        const kmf_adapter pair[2] = {slot_views[best], newcomer.view};
        /* 3a. peft's factor-wise linear merge (result scaling 1) */
        make_adapter(&linear, RANK, NULL, 0.0);
        for (m = 0; m < N_MODULES; ++m) linear.modules[m].scaling = 1.0;
        check_status(kmf_linear_merge(pair, 2, weights, &linear.view, 0, &err), &err);
        /* 3b. exact: best rank-RANK approximation of the weighted sum of updates */
        make_adapter(&exact, RANK, NULL, 0.0);
        for (m = 0; m < N_MODULES; ++m) exact.modules[m].scaling = 1.0;
        check_status(kmf_truncate(pair, 2, weights, &exact.view, 0, &err), &err);

        /* 4. verify against float64 */
        for (m = 0; m < N_MODULES; ++m) {
            const kmf_module* s = &slots[best].modules[m];
            const kmf_module* x = &newcomer.modules[m];
            const int64_t n_out = s->b.rows, n_in = s->a.cols;
            const int64_t size = n_out * n_in;
            double* w = (double*)xcalloc((size_t)size, sizeof(double));
            double* approx = (double*)xcalloc((size_t)size, sizeof(double));
            double* sv = (double*)xcalloc((size_t)n_in, sizeof(double));
            double wa[2], wb[2], top = 0.0, tail = 0.0, kept, resid = 0.0, norm2;
            int64_t i, c, p;
            /* linear: A' = sum sign(w s) sqrt|w s| A_i, B' = sum sqrt|w s| B_i (float32 roundings) */
            for (i = 0; i < 2; ++i) {
                const double ws = weights[i] * (i == 0 ? s : x)->scaling;
                wb[i] = sqrt(fabs(ws));
                wa[i] = ws < 0 ? -wb[i] : wb[i];
            }
            check_sum(&linear.modules[m].a, &s->a, &x->a, wa, "linear A");
            check += check_sum(&linear.modules[m].b, &s->b, &x->b, wb, "linear B");
            /* exact: M = sum w_i s_i B_i A_i; B'A' must be its best rank-RANK approximation */
            add_dense(w, s, weights[0]);
            add_dense(w, x, weights[1]);
            add_dense(approx, &exact.modules[m], 1.0);
            singular_values(w, n_out, n_in, sv);
            for (i = 0; i < n_in; ++i) *(i < RANK ? &top : &tail) += sv[i] * sv[i];
            norm2 = top + tail;
            for (i = 0; i < size; ++i) resid += (w[i] - approx[i]) * (w[i] - approx[i]);
            kept = 0.0;
            for (i = 0; i < n_out; ++i)
                for (p = 0; p < RANK; ++p) kept += get(&exact.modules[m].b, i, p) * get(&exact.modules[m].b, i, p);
            /* ||B'||^2 = sum of the top RANK sigma^2, and the residual is the tail (Eckart-Young) */
            expect(fabs(kept - top) <= 1e-5 * norm2, "exact kept energy", kept, top);
            expect(fabs(resid - tail) <= 1e-5 * norm2, "exact residual", resid, tail);
            /* A' has orthonormal rows */
            for (p = 0; p < RANK; ++p)
                for (c = 0; c < RANK; ++c) {
                    double g = 0.0;
                    for (i = 0; i < n_in; ++i) g += get(&exact.modules[m].a, p, i) * get(&exact.modules[m].a, c, i);
                    expect(fabs(g - (p == c)) <= 1e-5, "exact A' A'^T", g, p == c);
                }
            printf("%-6s layer %d: |M|_F %.6f, exact merge keeps %.4f%% of |M|^2\n", kKinds[m % N_KINDS], m / N_KINDS,
                   sqrt(norm2), 100.0 * kept / norm2);
            check += kept;
            free(w);
            free(approx);
            free(sv);
        }
    }
    printf("check value: %.6f\n", check);
    for (j = 0; j < K_SLOTS; ++j) free_adapter(&slots[j]);
    free_adapter(&newcomer);
    free_adapter(&linear);
    free_adapter(&exact);
    if (failures) {
        fprintf(stderr, "kmerge_step: %d mismatches against the float64 computation\n", failures);
        return 1;
    }
    printf("kmerge_step: OK (C API %s)\n", kmf_version());
    return 0;
}
