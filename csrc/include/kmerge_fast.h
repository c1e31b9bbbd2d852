/* kmerge_fast.h: the C API of kmerge_fast's C++ core (LoRA adapter merging).
 *
 * A small C99 interface over the same kernels the Python package runs:
 *
 *   kmf_similarity    cosine similarity of a newcomer adapter against K slots
 *                     (mean over modules of <dW_x, dW_y>_F / (|dW_x|_F |dW_y|_F));
 *   kmf_truncate      best rank-r approximation (SVD re-truncation) of
 *                     sum_i coef_i s_i B_i A_i, per module, into caller buffers;
 *   kmf_linear_merge  peft's factor-wise "linear" merge (bit-equal to
 *                     kmerge_fast.merge(..., method="linear") for 1 or 2 adapters);
 *   kmf_version, kmf_api_version, kmf_status_name.
 *
 * Link: the static library libkmerge_fast_c.a (which contains the core) and
 * the C++ runtime, e.g.
 *   cc prog.c -I csrc/include libkmerge_fast_c.a -lstdc++ -lm -lpthread
 *
 * Memory: every buffer belongs to the caller; nothing is allocated for the
 * caller and nothing is kept between calls. The library allocates internal
 * scratch (freed before returning) and may start up to `threads` worker
 * threads per call (joined before returning).
 *
 * Errors: every function returns a kmf_status (KMF_OK = 0) and, when `err`
 * is not NULL, fills err->code and a NUL-terminated err->message naming the
 * offending argument (adapter, module, factor). No C++ exception ever crosses
 * this interface (allocation failure is KMF_ERR_NOMEM). Every function
 * rejects factors holding NaN or infinity (KMF_ERR_NONFINITE) and results
 * that do not fit their output dtype (KMF_ERR_OVERFLOW). On an error the
 * output buffers may have been partly written.
 *
 * Thread safety: the functions keep no global state and may be called
 * concurrently on distinct output buffers.
 *
 * ABI promises (for a given KMF_API_VERSION_MAJOR):
 *   - the layout of kmf_matrix, kmf_module, kmf_adapter and kmf_error, and the
 *     numeric values of kmf_dtype, kmf_metric and kmf_status never change;
 *   - existing function signatures and semantics never change; new functions,
 *     new enum values (new metrics, new error codes) may be added in a minor
 *     version: treat an unknown nonzero status as an error;
 *   - results are deterministic for given inputs and thread count; bit-exact
 *     results across library versions (and thread counts) are promised only
 *     for kmf_linear_merge.
 * A program can check at run time that the library it links matches the
 * header it was compiled with:
 *   kmf_api_version() / 10000 == KMF_API_VERSION_MAJOR.
 */
#ifndef KMERGE_FAST_H
#define KMERGE_FAST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KMF_API_VERSION_MAJOR 1
#define KMF_API_VERSION_MINOR 0
#define KMF_API_VERSION_PATCH 0
/* major * 10000 + minor * 100 + patch */
#define KMF_API_VERSION (KMF_API_VERSION_MAJOR * 10000 + KMF_API_VERSION_MINOR * 100 + KMF_API_VERSION_PATCH)

/* Element types (the same codes as the core's and Python's kmerge_fast._C.DTYPES). */
typedef enum kmf_dtype {
    KMF_F32 = 0,  /* IEEE binary32 */
    KMF_F16 = 1,  /* IEEE binary16 (half) */
    KMF_BF16 = 2, /* bfloat16 */
    KMF_F64 = 3   /* IEEE binary64 */
} kmf_dtype;

/* Similarity metrics. Version 1.0 implements cosine only; any other value is
 * KMF_ERR_UNSUPPORTED. */
typedef enum kmf_metric { KMF_METRIC_COS = 0 } kmf_metric;

typedef enum kmf_status {
    KMF_OK = 0,
    KMF_ERR_NULL = 1,        /* a required pointer is NULL */
    KMF_ERR_DTYPE = 2,       /* unknown dtype code, or a dtype combination not allowed */
    KMF_ERR_SHAPE = 3,       /* shapes do not match, or a dimension < 1 or too large */
    KMF_ERR_STRIDE = 4,      /* row_stride < cols, or the matrix spans too many bytes */
    KMF_ERR_ALIGN = 5,       /* data not aligned to its element size */
    KMF_ERR_RANK = 6,        /* ranks differ where they must match, or a rank out of bounds */
    KMF_ERR_VALUE = 7,       /* a weight, coefficient or scaling is not finite (or is 0 where it divides) */
    KMF_ERR_UNSUPPORTED = 8, /* e.g. a metric other than KMF_METRIC_COS */
    KMF_ERR_NONFINITE = 9,   /* an input factor holds NaN or infinity */
    KMF_ERR_ALIAS = 10,      /* an output buffer overlaps an input or another output */
    KMF_ERR_OVERFLOW = 11,   /* a result does not fit its output dtype (an entry became inf or NaN) */
    KMF_ERR_NUMERIC = 12,    /* the small eigenproblem of a truncation did not settle */
    KMF_ERR_NOMEM = 13,      /* out of memory */
    KMF_ERR_INTERNAL = 14    /* a bug: please report the message */
} kmf_status;

#define KMF_ERROR_MESSAGE_SIZE 256

typedef struct kmf_error {
    int32_t code;                          /* the returned kmf_status */
    char message[KMF_ERROR_MESSAGE_SIZE];  /* NUL-terminated; "" on success */
} kmf_error;

/* A rows x cols matrix, row-major with a row stride: element (i, j) is at
 * (element type*)data + i * row_stride + j. Requirements: rows >= 1,
 * cols >= 1, row_stride >= cols, data non-NULL and aligned to the element
 * size. Inputs are only read (data is `void*` so one type serves inputs and
 * outputs). */
typedef struct kmf_matrix {
    void* data;
    int32_t dtype;      /* a kmf_dtype */
    int32_t reserved;   /* must be 0 (else KMF_ERR_VALUE): room for later use */
    int64_t rows;
    int64_t cols;
    int64_t row_stride; /* in elements */
} kmf_matrix;

/* One LoRA module: the update dW = scaling * B @ A (n_out x n_in).
 * a: r x n_in, b: n_out x r (peft's lora_A / lora_B weights), any dtypes. */
typedef struct kmf_module {
    kmf_matrix a;
    kmf_matrix b;
    double scaling; /* finite; peft's lora_alpha / r (or 1) */
} kmf_module;

/* An adapter: its modules in a fixed order. Adapters passed together must
 * list the same modules in the same order (module m of one adapter pairs with
 * module m of the others: equal n_out and n_in; ranks may differ where noted).
 * For an output adapter the module structs are only read; their a.data and
 * b.data buffers are written. */
typedef struct kmf_adapter {
    const kmf_module* modules;
    size_t n_modules;
} kmf_adapter;

/* The C API version, "MAJOR.MINOR.PATCH" (the library's, not the header's). */
const char* kmf_version(void);

/* The library's KMF_API_VERSION. */
int kmf_api_version(void);

/* A short static name for a status code ("ok", "null", ..., "unknown"). */
const char* kmf_status_name(int status);

/* Similarity of `newcomer` to each of the k adapters slots[0..k):
 *   out_k[j] = (1 / M) sum_m cos(dW_newcomer_m, dW_slot_j_m),
 * M = newcomer->n_modules (every slot must have M modules of the same
 * shapes; ranks may differ). cos is 0 when either update is zero, and lies
 * in [-1, 1]. M = 0 gives 0. The inner products come from float64 cross-Grams
 * (B_x^T B_y) .* (A_x A_y^T) without forming dW, on power-of-two normalised
 * factors (cos does not depend on the factors' scale, only the scalings'
 * signs). metric: KMF_METRIC_COS only. threads: 0 = all hardware threads.
 * k = 0 returns KMF_OK (out_k may then be NULL). */
int kmf_similarity(const kmf_adapter* newcomer, const kmf_adapter* slots, size_t k, int metric, int threads,
                   double* out_k, kmf_error* err);

/* SVD re-truncation of stacked factors. For every module m:
 *   out.scaling * B' A'  =  best rank-r approximation of  sum_i coefs[i] * s_i * B_i A_i
 * with r = out->modules[m].a.rows, s_i the terms' scalings, B' = U_r S_r
 * (out b: n_out x r) and A' = V_r^T (out a: r x n_in, orthonormal rows), in the
 * output buffers' dtypes. The stacks B = [c_1 B_1, ...] and A = [A_1; ...] are
 * never concatenated: the Grams B^T B and A A^T, their R x R eigenproblem in
 * float64 and the rebuild run as in kmerge_fast.merge(..., method="svd")
 * (float32 accumulation where the core's error estimates allow it, float64
 * otherwise; power-of-two normalisation of factors far from float32's range).
 * Requirements: n_terms >= 1; every term and out have the same modules;
 * 1 <= r <= min(n_out, n_in); the stacked rank sum_i r_i <= 65536; out scalings
 * finite and nonzero. Directions beyond the sum's numerical rank come out as
 * zero columns / rows. KMF_ERR_NUMERIC: a module's eigenproblem did not
 * settle (the Python package then falls back to torch.linalg). */
int kmf_truncate(const kmf_adapter* terms, size_t n_terms, const double* coefs, const kmf_adapter* out, int threads,
                 kmf_error* err);

/* peft's factor-wise linear merge (add_weighted_adapter(combination_type="linear")):
 * for every module, with w_i = weights[i] * s_i / out.scaling,
 *   A' = sum_i sign(w_i) sqrt(|w_i|) A_i,   B' = sum_i sqrt(|w_i|) B_i,
 * summed left to right with torch's roundings (every product and sum rounded
 * to float32, or to float64 when the output factor is float64; one rounding to
 * the output dtype). With out scalings 1 and output dtypes equal to the
 * inputs' promoted dtype (torch's rules: f16 with bf16 gives f32) the result is
 * bit-equal to kmerge_fast.merge(adapters, weights, method="linear") for 1 or
 * 2 adapters (the running-average K-Merge step uses weights (1 - 1/n, 1/n)).
 * Requirements: n >= 1; all adapters and out have the same modules with equal
 * ranks (peft's requirement); a float64 input needs a float64 output factor. */
int kmf_linear_merge(const kmf_adapter* adapters, size_t n, const double* weights, const kmf_adapter* out, int threads,
                     kmf_error* err);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KMERGE_FAST_H */
