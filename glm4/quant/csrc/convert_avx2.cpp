// Conversions around the AVX2 kernels: quantized weight rows widened to fp32 / bf16 for the large-M GEMM (bit-equal
// to QuantLinear.dequantize), and activations split into the integer kernels' terms. AVX2 + FMA + F16C; only called
// after ops.cpp checked the CPU has these (the whole file is compiled for that target).
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <cstdint>

#include "codes6.h"
#include "gemv.h"
#include "vec_avx2.h"

namespace glm4k {

namespace {

// (q - zp) * s, then + m, each rounded as in QuantLinear.dequantize: no FMA contraction in this function (GCC's
// intrinsics are vector arithmetic it would otherwise contract)
template <int BITS, bool BF16, bool MINS>
__attribute__((optimize("fp-contract=off"))) void dequant_rows(const DequantArgs& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, g = a.group, G = K / g;
  const __m256 zp = _mm256_set1_ps(float(a.zero_point));
  for (int64_t n = n0; n < n1; ++n) {
    float* of = BF16 ? nullptr : a.out_f32 + (n - a.r0) * K;
    uint16_t* ob = BF16 ? a.out_bf16 + (n - a.r0) * K : nullptr;
    for (int64_t gi = 0; gi < G; ++gi) {
      const __m256 s = _mm256_set1_ps(a.scales[n * G + gi]);
      const __m256 m = _mm256_set1_ps(MINS ? a.mins[n * G + gi] : 0.f);
      auto emit = [&](int64_t k, __m256i c) {  // 8 codes as int32 at column k
        __m256 w = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), zp), s);
        if constexpr (MINS) w = _mm256_add_ps(w, m);
        if constexpr (BF16) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(ob + k), bf16x8(w));
        } else {
          _mm256_storeu_ps(of + k, w);
        }
      };
      for (int64_t k = gi * g; k < (gi + 1) * g; k += BITS == 8 ? 8 : 32) {
        if constexpr (BITS == 8) {
          const int8_t* q = static_cast<const int8_t*>(a.q) + n * K + k;
          emit(k, _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
        } else {
          __m128i lo, hi;  // columns k..k+15, k+16..k+31 as bytes
          codes_block32<BITS>(a.q, n, K, k, lo, hi);
          emit(k, _mm256_cvtepu8_epi32(lo));
          emit(k + 8, _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
          emit(k + 16, _mm256_cvtepu8_epi32(hi));
          emit(k + 24, _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        }
      }
    }
  }
}

// 8 int32 in int8 range as 8 bytes (the low 64 bits)
inline __m128i bytes8(__m256i v) {
  const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_packs_epi16(v16, v16);
}

// max |x[k]| over k < B (a multiple of 8)
inline float block_amax(const float* x, int64_t B) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 mx = _mm256_setzero_ps();
  for (int64_t k = 0; k < B; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  return hmax(mx);
}

template <int BITS>
void dequant_bits(const DequantArgs& a, int64_t n0, int64_t n1) {
  if (a.out_bf16) a.mins ? dequant_rows<BITS, true, true>(a, n0, n1) : dequant_rows<BITS, true, false>(a, n0, n1);
  else a.mins ? dequant_rows<BITS, false, true>(a, n0, n1) : dequant_rows<BITS, false, false>(a, n0, n1);
}

}  // namespace

void dequant_rows_avx2(const DequantArgs& a, int64_t n0, int64_t n1) {
  if (a.bits == 4) dequant_bits<4>(a, n0, n1);
  else if (a.bits == 6) dequant_bits<6>(a, n0, n1);
  else dequant_bits<8>(a, n0, n1);
}

void act_hilo_avx2(const float* x, int64_t total, int64_t B, int order, int16_t* hi, int16_t* lo, float* scale) {
  const __m256d lim = _mm256_set1_pd(32767.0), nlim = _mm256_set1_pd(-32767.0), lo_mul = _mm256_set1_pd(65534.0);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t b0 = 0; b0 < total; b0 += B) {
    const float amax = block_amax(x + b0, B);
    const __m256d inv = _mm256_set1_pd(amax > 0.f ? 32767.0 / amax : 0.0);
    scale[b0 / B] = float(amax / 32767.0);
    for (int64_t k = 0; k < B; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + b0 + k);
      __m128i h32[2], l32[2];
      for (int half = 0; half < 2; ++half) {
        const __m256d v = _mm256_mul_pd(_mm256_cvtps_pd(half ? _mm256_extractf128_ps(xv, 1) : _mm256_castps256_ps128(xv)), inv);
        const __m256d h = _mm256_min_pd(_mm256_max_pd(_mm256_round_pd(v, kRound), nlim), lim);
        const __m256d l = _mm256_min_pd(_mm256_max_pd(_mm256_round_pd(_mm256_mul_pd(_mm256_sub_pd(v, h), lo_mul), kRound), nlim), lim);
        h32[half] = _mm256_cvtpd_epi32(h), l32[half] = _mm256_cvtpd_epi32(l);
      }
      const int64_t at = act_position(b0 + k, order);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + at), _mm_packs_epi32(h32[0], h32[1]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + at), _mm_packs_epi32(l32[0], l32[1]));
    }
  }
}

void act_int16_avx2(const float* x, int64_t total, int64_t B, int order, int16_t* v, int8_t* bytes, float* scale) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t b0 = 0; b0 < total; b0 += B) {
    const float amax = block_amax(x + b0, B);
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? float(kInt16Act) / amax : 0.f);
    scale[b0 / B] = amax / float(kInt16Act);
    for (int64_t k = 0; k < B; k += 8) {  // |round(x * inv)| <= kInt16Act (the product rounds to at most it)
      const __m256i q32 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + b0 + k), inv), kRound));
      if (v) {
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(q32, q32), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(v + act_position(b0 + k, order)), _mm256_castsi256_si128(packed));
      }
      // v = 256 a + b, b the low byte as signed; 8 columns from a multiple of 8 lie side by side in perm64
      if (bytes) {
        const __m256i b32 = _mm256_srai_epi32(_mm256_slli_epi32(q32, 24), 24);
        const __m256i a32 = _mm256_srai_epi32(_mm256_sub_epi32(q32, b32), 8);
        const int64_t c = b0 + k, at = c / 64 * 128 + perm64(c % 64);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(bytes + at), bytes8(a32));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(bytes + at + 64), bytes8(b32));
      }
    }
  }
}

void act_int8_avx2(const float* x, int64_t total, int64_t B, int8_t* v, float* scale) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t b0 = 0; b0 < total; b0 += B) {
    const float amax = block_amax(x + b0, B);
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    scale[b0 / B] = amax / 127.f;
    for (int64_t k = 0; k < B; k += 8) {  // |round(x * inv)| <= 127 (the product rounds to at most it)
      const __m256i q32 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + b0 + k), inv), kRound));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(v + b0 + k), bytes8(q32));
    }
  }
}

}  // namespace glm4k
