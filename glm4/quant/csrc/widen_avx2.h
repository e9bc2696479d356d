// Dense weights (gemv.h's WeightType: fp32, bf16, fp16) widened to fp32, shared by the AVX2 files that read them
// (gemv_avx2.cpp, gemm_f32_avx2.cpp). Included after their target pragma; anonymous namespace, so each file's copy is
// compiled for its own target.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "gemv.h"

namespace glm4k {
namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// 8 weights at element offset i, widened to fp32
template <int WT>
inline __m256 load8(const void* w, int64_t i) {
  if constexpr (WT == kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else if constexpr (WT == kBF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i)));
  }
}

template <int WT>
inline float load1(const void* w, int64_t i) {
  if constexpr (WT == kF32) return static_cast<const float*>(w)[i];
  else if constexpr (WT == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
  else return _cvtsh_ss(static_cast<const uint16_t*>(w)[i]);
}

}  // namespace
}  // namespace glm4k
