// Quantized weight rows widened to fp32 / bf16 for the large-M GEMM on AVX-512 (F, BW, VL, DQ): the contract and
// the rounding of dequant_rows_avx2 (convert_avx2.cpp), 16 columns a step. Only called after ops.cpp checked the CPU.
// GCC 12 warns of an uninitialized variable inside its own avx512fintrin.h (the cast intrinsics): not ours
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>

#include <cstdint>

#include "codes6.h"
#include "gemv.h"

namespace glm4k {
namespace {

// (q - zp) * s, then + m, each rounded as in QuantLinear.dequantize: no FMA contraction in this function (GCC's
// intrinsics are vector arithmetic it would otherwise contract)
template <int BITS, bool BF16, bool MINS>
__attribute__((optimize("fp-contract=off"))) void dequant_rows(const DequantArgs& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, g = a.group, G = K / g;
  const __m512 zp = _mm512_set1_ps(float(a.zero_point));
  const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  for (int64_t n = n0; n < n1; ++n) {
    float* of = BF16 ? nullptr : a.out_f32 + (n - a.r0) * K;
    uint16_t* ob = BF16 ? a.out_bf16 + (n - a.r0) * K : nullptr;
    for (int64_t gi = 0; gi < G; ++gi) {
      const __m512 s = _mm512_set1_ps(a.scales[n * G + gi]);
      const __m512 m = _mm512_set1_ps(MINS ? a.mins[n * G + gi] : 0.f);
      auto emit = [&](int64_t k, __m512i c) {  // 16 codes as int32 at column k
        __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), zp), s);
        if constexpr (MINS) w = _mm512_add_ps(w, m);
        if constexpr (BF16) {  // (u + 0x7FFF + ((u >> 16) & 1)) >> 16, narrowed to the low halves
          const __m512i u = _mm512_castps_si512(w);
          const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
          const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, round), odd), 16);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ob + k), _mm512_cvtepi32_epi16(r));
        } else {
          _mm512_storeu_ps(of + k, w);
        }
      };
      for (int64_t k = gi * g; k < (gi + 1) * g; k += BITS == 8 ? 16 : 32) {
        if constexpr (BITS == 8) {
          const int8_t* q = static_cast<const int8_t*>(a.q) + n * K + k;
          emit(k, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
        } else {
          __m128i lo, hi;  // columns k..k+15, k+16..k+31 as bytes
          codes_block32<BITS>(a.q, n, K, k, lo, hi);
          emit(k, _mm512_cvtepu8_epi32(lo));
          emit(k + 16, _mm512_cvtepu8_epi32(hi));
        }
      }
    }
  }
}

template <int BITS>
void dequant_bits(const DequantArgs& a, int64_t n0, int64_t n1) {
  if (a.out_bf16) a.mins ? dequant_rows<BITS, true, true>(a, n0, n1) : dequant_rows<BITS, true, false>(a, n0, n1);
  else a.mins ? dequant_rows<BITS, false, true>(a, n0, n1) : dequant_rows<BITS, false, false>(a, n0, n1);
}

}  // namespace

void dequant_rows_avx512(const DequantArgs& a, int64_t n0, int64_t n1) {
  if (a.bits == 4) dequant_bits<4>(a, n0, n1);
  else if (a.bits == 6) dequant_bits<6>(a, n0, n1);
  else dequant_bits<8>(a, n0, n1);
}

}  // namespace glm4k
