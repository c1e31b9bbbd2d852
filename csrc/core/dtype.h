// Element types the kernels read and write, and portable conversions between
// them and float / double (bit manipulation only: no _Float16). The
// exceptions use conversion instructions that give the same bits as the
// portable code (csrc/tests/test_core.cpp checks them against it):
//   x86 with F16C (-march=native): contiguous half runs (VCVTPH2PS / VCVTPS2PH);
//   AArch64 (every ARMv8-A core: FCVT, FCVTL, FCVTN and FCVTXN are base
//   instructions; +fp16 adds half arithmetic, which the kernels do not use):
//   every half conversion, scalar and contiguous runs, and double -> float
//   rounded to odd. Same bits (NaNs keep their payload, quieted) under the
//   FPCR's default modes, round to nearest even and no flush-to-zero, which
//   nothing here changes.
//
// Loading (half/bfloat16 -> float) is exact and written branch-free so the
// compiler vectorises the packing loops. Storing (float/double -> half or
// bfloat16) rounds to nearest, ties to even (IEEE default rounding).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "codes.h"

#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
#define KMF_F16C 1
#define KMF_HALF_HW 1
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FP16_FORMAT_IEEE) && !defined(KMF_PORTABLE_HALF)
#include <arm_neon.h>
#define KMF_NEON_HALF 1
#define KMF_HALF_HW 1
#endif

namespace kmf {

/// dtype codes of a Mat, shared with the caller.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

/// The dtype codes by torch's names (exported as _C.DTYPES).
inline constexpr CodeName kDTypeCodes[] = {{"float32", kF32}, {"float16", kF16}, {"bfloat16", kBF16}, {"float64", kF64}};

inline bool valid_dtype(int code) { return valid_code(kDTypeCodes, code); }

inline int elem_size(int code) {
    switch (code) {
        case kF32: return 4;
        case kF16: return 2;
        case kBF16: return 2;
        case kF64: return 8;
        default: return 0;
    }
}

inline const char* dtype_name(int code) { return code_name(kDTypeCodes, code); }

/// Unit roundoff (half an ulp of 1) of a storage dtype.
inline double unit_roundoff(int code) {
    switch (code) {
        case kF16: return 0x1p-11;
        case kBF16: return 0x1p-8;
        case kF64: return 0x1p-53;
        default: return 0x1p-24;
    }
}

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ------------------------------------------------------------------ loading
/// IEEE binary16 -> float, exact for every input (normals, subnormals, +-0,
/// +-inf; NaNs stay NaN with their payload, quieted like F16C and FCVT do).
/// Written with masks instead of branches so loops over it vectorise.
inline float half_to_float_portable(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t o = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent and mantissa in float position
    const uint32_t e = o & 0x0f800000u;                       // the half's exponent field
    o += (127u - 15u) << 23;                                  // rebias the exponent
    const uint32_t inf_mask = 0u - static_cast<uint32_t>(e == 0x0f800000u);
    o += inf_mask & ((128u - 16u) << 23);                     // inf / NaN: exponent all ones
    const uint32_t nan_mask = inf_mask & (0u - static_cast<uint32_t>((o & 0x007fffffu) != 0u));
    o |= nan_mask & 0x00400000u;                              // quiet NaN
    // Zero / subnormal: renormalise through a float subtraction (exact).
    const uint32_t sub_mask = 0u - static_cast<uint32_t>(e == 0u);
    const uint32_t sub = f32_bits(bits_f32(o + (1u << 23)) - bits_f32(113u << 23));
    return bits_f32((sub & sub_mask) | (o & ~sub_mask) | sign);
}

/// binary16 -> float (FCVT on AArch64, the same bits).
inline float half_to_float(uint16_t h) {
#ifdef KMF_NEON_HALF
    __fp16 x;
    std::memcpy(&x, &h, 2);
    return static_cast<float>(x);
#else
    return half_to_float_portable(h);
#endif
}

/// bfloat16 -> float: the top 16 bits of a float. Exact.
inline float bf16_to_float(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

// ------------------------------------------------------------------ storing
/// float -> binary16, round to nearest even; overflow -> inf, NaN -> quiet NaN.
/// (F. Giesen's float_to_half_fast3_rtne.)
inline uint16_t float_to_half_portable(float f) {
    uint32_t x = f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    uint32_t o;
    if (x >= (143u << 23)) {  // >= 2^16 (beyond half's range after rounding), inf or NaN
        o = x > 0x7f800000u ? (0x7e00u | ((x >> 13) & 0x3ffu)) : 0x7c00u;
    } else if (x < (113u << 23)) {  // < 2^-14: half subnormal or zero
        // Adding 0.5 aligns the half-subnormal ulp with float's ulp; the FPU
        // rounds (nearest even) and the low bits are the result.
        const float a = bits_f32(x) + 0.5f;
        o = f32_bits(a) - f32_bits(0.5f);
    } else {
        const uint32_t odd = (x >> 13) & 1u;
        x += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;  // rebias, round
        o = x >> 13;  // a carry into exponent 31 correctly gives inf
    }
    return static_cast<uint16_t>(o | sign);
}

/// float -> binary16 (FCVT on AArch64, the same bits).
inline uint16_t float_to_half(float f) {
#ifdef KMF_NEON_HALF
    const __fp16 x = static_cast<__fp16>(f);
    uint16_t h;
    std::memcpy(&h, &x, 2);
    return h;
#else
    return float_to_half_portable(f);
#endif
}

/// float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
    const uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/// double -> float rounded to odd (toward zero, then set the last bit if
/// inexact). Rounding that float to half or bfloat16 (nearest even) then equals
/// rounding the double directly: no double-rounding error. A finite double
/// beyond float's range gives the largest float (which rounds on to inf).
inline float double_to_float_odd_portable(double d) {
    float f = static_cast<float>(d);
    if (static_cast<double>(f) != d && d == d) {
        uint32_t u = f32_bits(f);
        const double af = f < 0 ? -static_cast<double>(f) : static_cast<double>(f);
        const double ad = d < 0 ? -d : d;
        if (af > ad) u -= 1;  // rounded away from zero: step back toward zero
        u |= 1u;
        f = bits_f32(u);
    }
    return f;
}

/// double -> float rounded to odd (FCVTXN on AArch64, the same bits).
inline float double_to_float_odd(double d) {
#ifdef KMF_NEON_HALF
    return vcvtxd_f32_f64(d);
#else
    return double_to_float_odd_portable(d);
#endif
}

inline uint16_t to_half(float f) { return float_to_half(f); }
inline uint16_t to_half(double d) { return float_to_half(double_to_float_odd(d)); }
inline uint16_t to_bf16(float f) { return float_to_bf16(f); }
inline uint16_t to_bf16(double d) { return float_to_bf16(double_to_float_odd(d)); }

// ------------------------------------------------------------------ readers
// One reader per source dtype: value(s) * coef in T (in double for float64
// sources, so a float64 input is scaled before it is rounded to float).
struct SrcF32 {
    using S = float;
    template <typename T>
    static T get(S v, T coef) { return static_cast<T>(v) * coef; }
};
struct SrcF16 {
    using S = std::uint16_t;
    template <typename T>
    static T get(S v, T coef) { return static_cast<T>(half_to_float(v)) * coef; }
};
struct SrcBF16 {
    using S = std::uint16_t;
    template <typename T>
    static T get(S v, T coef) { return static_cast<T>(bf16_to_float(v)) * coef; }
};
struct SrcF64 {
    using S = double;
    template <typename T>
    static T get(S v, T coef) { return static_cast<T>(v * static_cast<double>(coef)); }
};

/// Calls f(Src{}) with the reader for dtype `code`.
template <typename F>
inline void with_src(int code, F&& f) {
    switch (code) {
        case kF32: f(SrcF32{}); break;
        case kF16: f(SrcF16{}); break;
        case kBF16: f(SrcBF16{}); break;
        case kF64: f(SrcF64{}); break;
        default: break;
    }
}

// ------------------------------------------------------------ hardware half runs
// half_load_hw / half_store_hw (F16C on x86, NEON on AArch64) each convert the
// longest prefix of whole vectors of a contiguous run and return its length;
// the caller finishes the rest with the scalar code.
#ifdef KMF_F16C
constexpr int kF16CRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

inline __m256 f16c_load8(const std::uint16_t* s) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
}

/// dst[t] = float(s[t]) * coef (exact conversion; the product rounds as the portable code's).
inline std::int64_t half_load_hw(float* dst, const std::uint16_t* s, std::int64_t n, float coef) {
    const __m256 c = _mm256_set1_ps(coef);
    std::int64_t t = 0;
    for (; t + 8 <= n; t += 8) _mm256_storeu_ps(dst + t, _mm256_mul_ps(f16c_load8(s + t), c));
    return t;
}

/// dst[t] = double(float(s[t])) * coef.
inline std::int64_t half_load_hw(double* dst, const std::uint16_t* s, std::int64_t n, double coef) {
    const __m256d c = _mm256_set1_pd(coef);
    std::int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 f = f16c_load8(s + t);
        _mm256_storeu_pd(dst + t, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f)), c));
        _mm256_storeu_pd(dst + t + 4, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)), c));
    }
    return t;
}

/// d[t] = half(src[t]), round to nearest even.
inline std::int64_t half_store_hw(std::uint16_t* d, const float* src, std::int64_t n) {
    std::int64_t t = 0;
    for (; t + 8 <= n; t += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + t), _mm256_cvtps_ph(_mm256_loadu_ps(src + t), kF16CRound));
    return t;
}

/// d[t] = half(src[t]) through double_to_float_odd (vectorised: nearest, then
/// one step toward zero where that rounded away, then the odd bit where inexact).
inline std::int64_t half_store_hw(std::uint16_t* d, const double* src, std::int64_t n) {
    const __m256d sign = _mm256_set1_pd(-0.0);
    const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);  // 64-bit masks -> 32-bit lanes
    auto narrow = [&](__m256d mask) {  // all-ones lanes -> 1, else 0, as 4 x int32
        const __m256i m = _mm256_permutevar8x32_epi32(_mm256_castpd_si256(mask), low_halves);
        return _mm_srli_epi32(_mm256_castsi256_si128(m), 31);
    };
    std::int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const __m256d x = _mm256_loadu_pd(src + t);
        const __m128 f = _mm256_cvtpd_ps(x);
        const __m256d back = _mm256_cvtps_pd(f);
        const __m256d inexact = _mm256_cmp_pd(back, x, _CMP_NEQ_OQ);  // false for NaN: it stays as it is
        const __m256d away = _mm256_and_pd(
            inexact, _mm256_cmp_pd(_mm256_andnot_pd(sign, back), _mm256_andnot_pd(sign, x), _CMP_GT_OQ));
        __m128i u = _mm_sub_epi32(_mm_castps_si128(f), narrow(away));
        u = _mm_or_si128(u, narrow(inexact));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(d + t), _mm_cvtps_ph(_mm_castsi128_ps(u), kF16CRound));
    }
    return t;
}
#elif defined(KMF_NEON_HALF)
/// dst[t] = float(s[t]) * coef (FCVTL: exact; the product rounds as the portable code's).
inline std::int64_t half_load_hw(float* dst, const std::uint16_t* s, std::int64_t n, float coef) {
    std::int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(s + t));
        vst1q_f32(dst + t, vmulq_n_f32(vcvt_f32_f16(vget_low_f16(h)), coef));
        vst1q_f32(dst + t + 4, vmulq_n_f32(vcvt_high_f32_f16(h), coef));
    }
    return t;
}

/// dst[t] = double(float(s[t])) * coef.
inline std::int64_t half_load_hw(double* dst, const std::uint16_t* s, std::int64_t n, double coef) {
    std::int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const float32x4_t f = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + t)));
        vst1q_f64(dst + t, vmulq_n_f64(vcvt_f64_f32(vget_low_f32(f)), coef));
        vst1q_f64(dst + t + 2, vmulq_n_f64(vcvt_high_f64_f32(f), coef));
    }
    return t;
}

/// d[t] = half(src[t]) (FCVTN: round to nearest even).
inline std::int64_t half_store_hw(std::uint16_t* d, const float* src, std::int64_t n) {
    std::int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const float16x8_t h = vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(src + t)), vld1q_f32(src + t + 4));
        vst1q_u16(d + t, vreinterpretq_u16_f16(h));
    }
    return t;
}

/// d[t] = half(src[t]) through double -> float rounded to odd (FCVTXN), then FCVTN.
inline std::int64_t half_store_hw(std::uint16_t* d, const double* src, std::int64_t n) {
    std::int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const float32x4_t f = vcvtx_high_f32_f64(vcvtx_f32_f64(vld1q_f64(src + t)), vld1q_f64(src + t + 2));
        vst1_u16(d + t, vreinterpret_u16_f16(vcvt_f16_f32(f)));
    }
    return t;
}
#endif

// ------------------------------------------------------------------ runs
/// dst[i * ldd + t] = coef * src_i[t * stride] for i < runs, t < n, with run
/// i at src + i * run_step bytes, of dtype `code`, converted to T: one dtype
/// dispatch for all runs (short runs would otherwise pay it per run). stride
/// is in elements. The stride-1 loops vectorise.
template <typename T>
inline void load_runs(T* __restrict dst, std::int64_t ldd, const void* src, std::int64_t run_step, std::int64_t runs,
                      int code, std::int64_t n, std::int64_t stride, T coef) {
    with_src(code, [&](auto reader) {
        using Src = decltype(reader);
        using S = typename Src::S;
        for (std::int64_t i = 0; i < runs; ++i) {
            const S* s = reinterpret_cast<const S*>(static_cast<const char*>(src) + i * run_step);
            T* __restrict d = dst + i * ldd;
            std::int64_t t0 = 0;
#ifdef KMF_HALF_HW
            if constexpr (std::is_same_v<Src, SrcF16>)
                if (stride == 1) t0 = half_load_hw(d, s, n, coef);
#endif
            if (stride == 1)
                for (std::int64_t t = t0; t < n; ++t) d[t] = Src::get(s[t], coef);
            else
                for (std::int64_t t = 0; t < n; ++t) d[t] = Src::get(s[t * stride], coef);
        }
    });
}

/// dst[t] = coef * src[t * stride] for t < n (one run of load_runs).
template <typename T>
inline void load_run(T* __restrict dst, const void* src, int code, std::int64_t n, std::int64_t stride, T coef) {
    load_runs<T>(dst, 0, src, 0, 1, code, n, stride, coef);
}

/// dst[t * stride] = src[t] for t < n, converted from T to dtype `code`
/// (round to nearest even).
template <typename T>
inline void store_run(void* dst, int code, std::int64_t n, std::int64_t stride, const T* __restrict src) {
    switch (code) {
        case kF32: {
            float* d = static_cast<float*>(dst);
            if (stride == 1)
                for (std::int64_t t = 0; t < n; ++t) d[t] = static_cast<float>(src[t]);
            else
                for (std::int64_t t = 0; t < n; ++t) d[t * stride] = static_cast<float>(src[t]);
            break;
        }
        case kF16: {
            uint16_t* d = static_cast<uint16_t*>(dst);
            std::int64_t t0 = 0;
#ifdef KMF_HALF_HW
            if (stride == 1) t0 = half_store_hw(d, src, n);
#endif
            for (std::int64_t t = t0; t < n; ++t) d[t * stride] = to_half(src[t]);
            break;
        }
        case kBF16: {
            uint16_t* d = static_cast<uint16_t*>(dst);
            for (std::int64_t t = 0; t < n; ++t) d[t * stride] = to_bf16(src[t]);
            break;
        }
        case kF64: {
            double* d = static_cast<double*>(dst);
            if (stride == 1)
                for (std::int64_t t = 0; t < n; ++t) d[t] = static_cast<double>(src[t]);
            else
                for (std::int64_t t = 0; t < n; ++t) d[t * stride] = static_cast<double>(src[t]);
            break;
        }
        default: break;
    }
}

}  // namespace kmf
