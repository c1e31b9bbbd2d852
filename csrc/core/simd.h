// Vector types for the micro-kernels: GCC/Clang vector extensions, sized to the
// widest registers the build targets, so the same source lowers to AVX-512,
// AVX2, SSE2 or NEON. No intrinsics: portable across x86-64 and aarch64.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kmf {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr const char* kSimdName = "avx512 (512-bit vectors)";
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#if defined(__AVX2__) && defined(__FMA__)
constexpr const char* kSimdName = "avx2+fma (256-bit vectors)";
#else
constexpr const char* kSimdName = "avx (256-bit vectors)";
#endif
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
constexpr int kVecBytes = 16;
constexpr const char* kSimdName = "neon (128-bit vectors)";
#elif defined(__SSE2__)
constexpr int kVecBytes = 16;
constexpr const char* kSimdName = "sse2 (128-bit vectors)";
#else
constexpr int kVecBytes = 16;
constexpr const char* kSimdName = "generic (128-bit vector extensions)";
#endif

/// Number of architectural vector registers: bounds the micro-tile size.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif

/// __builtin_shufflevector (lane permutations of vector extensions) is available.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define KMF_HAVE_SHUFFLEVECTOR 1
#endif

/// Scratch buffers are aligned to this many bytes (one cache line, >= kVecBytes).
constexpr std::size_t kAlign = 64;

template <typename T>
struct Simd;

template <>
struct Simd<float> {
    typedef float V __attribute__((vector_size(kVecBytes)));
    static constexpr int L = kVecBytes / 4;  // lanes
};

template <>
struct Simd<double> {
    typedef double V __attribute__((vector_size(kVecBytes)));
    static constexpr int L = kVecBytes / 8;
};

/// Unaligned vector load / store (memcpy lowers to one vector move).
template <typename V, typename T>
inline V vload(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}

template <typename V, typename T>
inline void vstore(T* p, V v) {
    std::memcpy(p, &v, sizeof(V));
}

}  // namespace kmf
