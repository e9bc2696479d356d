// The K-quant kernels for AVX-512 VNNI (kquant.h). q6_K (its tiles in kquant_q6k_avx512.h, shared with
// kquant_gfni.cpp): one half super-block (128 weights) a step per row. Its 6-bit codes are assembled as bytes in two
// registers (weights 0..63 and 64..127 of the half, in order: low nibbles OR'd with the high pairs shifted into bits
// 4-5), then widened by in-lane byte unpacks against zero, which put weights 16 j .. 16 j + 15
// into 128-bit lane j: each lane's int32 sums belong to one group of 16, weighed by a vector of per-lane scales
// (the lanes8 activation order of gemv.h). Codes are 0..63; the - 32 goes in per group: - 32 * sum_g s_g * xsum_g.
// q4_K: 128 weights a step as one register of nibbles (groups 0 / 2 low, 1 / 3 high), unpacked the same way, two
// groups of 32 a register (the q4k128 order); the mins go in per group: - sum_g dmin m_g * xsum_g. q5_K: the same
// with each code's 5th bit OR'd in from qh.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>

#include <cstdint>

#include "gemv.h"
#include "kquant.h"
#include "kquant_q6k_avx512.h"
#include "tiles.h"
#include "vec_avx2.h"

namespace glm4k {
namespace {


// Q5: q5_K (the 5th bits from qh), else q4_K
template <bool Q5, bool LO, int RB, int MT>
inline void q4k_tile(const KQuantArgs& a, int64_t n, int64_t m0) {
  constexpr int64_t kBytes = Q5 ? 176 : 144, kQs = Q5 ? 48 : 16;  // block size, where qs starts
  const int64_t K = a.K, row_bytes = K / 256 * kBytes, NB = K / 256, G = K / 32, ahead = ahead_l2(2 * RB * row_bytes);
  const __m512i zero = _mm512_setzero_si512(), low4 = _mm512_set1_epi8(0x0F);
  // int32 lane l of a register: groups (lo: 0 / 2, hi: 1 / 3 of its 128 weights) by l / 8
  const __m512i idx[4] = {_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
                          _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
                          _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
                          _mm512_setr_epi32(5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7)};
  const __m512 lo_weight = _mm512_set1_ps(1.f / 65534.f);
  const __m512i d_dmin = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  // q5_K: per register, the 16-bit shift taking bit g (first half) / g + 2 (second) of qh to bit 4: left 4 - g
  // (registers 0, 1), right g - 4 (2, 3)
  const auto halves = [](int lo, int hi) { return _mm512_inserti64x4(_mm512_set1_epi16(short(lo)), _mm256_set1_epi16(short(hi)), 1); };
  const __m512i shift[4] = {halves(4, 2), halves(3, 1), halves(0, 2), halves(1, 3)};
  __m512 acc[RB][MT];
  __m256 corr[RB][MT];  // sum_g dmin m_g * xsum_g
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps(), corr[r][m] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < NB; ++sb) {
    const int64_t k = sb * 256;
    for (int r = 0; r < RB; ++r) {
      const uint8_t* b = a.blocks + (n + r) * row_bytes + sb * kBytes;
      prefetch_l2(b, ahead);  // gemv.h
      prefetch_l2(b + 64, ahead);
      prefetch_l2(b + 128, ahead);
      if constexpr (Q5) prefetch_l2(b + kBytes - 1, ahead);
      // lanes 0..7: d * sc, 8..15: dmin * m (d, dmin widened together, spread by one permute)
      const __m512 dd = _mm512_permutexvar_ps(
          d_dmin, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(b)))));
      const __m512 sm16 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q4k_scale_min(b + 4))), dd);
      const __m256 s8 = _mm512_castps512_ps256(sm16), m8 = _mm512_extractf32x8_ps(sm16, 1);
      const __m512i q0 = _mm512_loadu_si512(b + kQs), q1 = _mm512_loadu_si512(b + kQs + 64);
      __m512i regs[4] = {_mm512_and_si512(q0, low4), _mm512_and_si512(_mm512_srli_epi16(q0, 4), low4),
                         _mm512_and_si512(q1, low4), _mm512_and_si512(_mm512_srli_epi16(q1, 4), low4)};
      if constexpr (Q5) {  // register i holds groups g and g + 2 (g = 0, 1, 4, 5): their bits of qh into bit 4, by
                           // one per-half variable 16-bit shift (the byte mask drops what crossed from a neighbour)
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
        const __m512i qh = _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1), bit4 = _mm512_set1_epi8(0x10);
        regs[0] = _mm512_or_si512(regs[0], _mm512_and_si512(_mm512_sllv_epi16(qh, shift[0]), bit4));
        regs[1] = _mm512_or_si512(regs[1], _mm512_and_si512(_mm512_sllv_epi16(qh, shift[1]), bit4));
        regs[2] = _mm512_or_si512(regs[2], _mm512_and_si512(_mm512_srlv_epi16(qh, shift[2]), bit4));
        regs[3] = _mm512_or_si512(regs[3], _mm512_and_si512(_mm512_srlv_epi16(qh, shift[3]), bit4));
      }
      for (int m = 0; m < MT; ++m) {
        const int16_t* xh = a.xq + (m0 + m) * K + k;
        const __m512 sx = _mm512_castps256_ps512(_mm256_mul_ps(s8, _mm256_set1_ps(a.xscale[(m0 + m) * NB + sb])));
        for (int i = 0; i < 4; ++i) {
          const __m512i u = _mm512_unpacklo_epi8(regs[i], zero), v = _mm512_unpackhi_epi8(regs[i], zero);
          __m512 p = _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_madd_epi16(u, _mm512_loadu_si512(xh + 64 * i)), v,
                                                            _mm512_loadu_si512(xh + 64 * i + 32)));
          if constexpr (LO) {
            const int16_t* xl = a.xq_lo + (m0 + m) * K + k;
            const __m512i pl = _mm512_dpwssd_epi32(_mm512_madd_epi16(u, _mm512_loadu_si512(xl + 64 * i)), v,
                                                   _mm512_loadu_si512(xl + 64 * i + 32));
            p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pl), lo_weight, p);
          }
          acc[r][m] = _mm512_fmadd_ps(p, _mm512_permutexvar_ps(idx[i], sx), acc[r][m]);
        }
        corr[r][m] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(a.xsum + (m0 + m) * G + k / 32), corr[r][m]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) - hsum(corr[r][m]);
}

template <bool Q5, bool LO>
struct Q45KTile {
  template <int RB, int MT>
  static void run(const KQuantArgs& a, int64_t n, int64_t m0) { q4k_tile<Q5, LO, RB, MT>(a, n, m0); }
};
template <bool LO>
using Q4KTile = Q45KTile<false, LO>;
template <bool LO>
using Q5KTile = Q45KTile<true, LO>;

}  // namespace

void q4k_rows_avx512(const KQuantArgs& a, int64_t n0, int64_t n1) { tile_rows_lo<Q4KTile>(a, n0, n1); }

void q5k_rows_avx512(const KQuantArgs& a, int64_t n0, int64_t n1) { tile_rows_lo<Q5KTile>(a, n0, n1); }

void q6k_rows_avx512(const KQuantArgs& a, int64_t n0, int64_t n1) {
  if (gfni_kernels()) q6k_rows_gfni(a, n0, n1);  // the same tiles, the codes assembled by GFNI (kquant_gfni.cpp)
  else q6k_rows<Q6KCodesShifts>(a, n0, n1);
}

}  // namespace glm4k
