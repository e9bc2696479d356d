// The AVX-512 q6_K tiles, against int16 (or exact) activations and against int8 ones (llama.cpp's precision; "auto"
// where the model's codes have at most 5 bits, as on AVX2), for the files that include this: kquant_avx512.cpp (the
// codes assembled by shifts and masks) and kquant_gfni.cpp (by GFNI's affine byte transform, where the CPU has it).
// `Codes::load(half_ql, half_qh, c)` puts the 128 codes of a half super-block in c[0] (weights 0..63) and c[1]
// (64..127) as bytes in order. Each including file is compiled for AVX-512 BW + VNNI; the templates live in its own
// anonymous namespace.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "gemv.h"
#include "kquant.h"
#include "tiles.h"
#include "vec_avx2.h"

namespace glm4k {
namespace {

// The half's codes by shifts and masks: c[0] weights 0..63, c[1] weights 64..127 (bytes, in order)
struct Q6KCodesShifts {
  static void load(const uint8_t* half_ql, const uint8_t* half_qh, __m512i c[2]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m256i pair = _mm256_set1_epi8(0x30);
    const __m512i ql = _mm512_loadu_si512(half_ql);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half_qh));
    // bits 2k..2k+1 of each qh byte into bits 4-5 (16-bit shifts; the byte mask drops what crossed from a neighbour)
    const __m256i p0 = _mm256_and_si256(_mm256_slli_epi16(qh, 4), pair), p1 = _mm256_and_si256(_mm256_slli_epi16(qh, 2), pair);
    const __m256i p2 = _mm256_and_si256(qh, pair), p3 = _mm256_and_si256(_mm256_srli_epi16(qh, 2), pair);
    c[0] = _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_inserti64x4(_mm512_castsi256_si512(p0), p1, 1));
    c[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                           _mm512_inserti64x4(_mm512_castsi256_si512(p2), p3, 1));
  }
};

template <class Codes, bool LO, int RB, int MT>
inline void q6k_tile(const KQuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, row_bytes = K / 256 * int64_t(210), NB = K / 256, G = K / 16, ahead = ahead_l2(RB * row_bytes);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i lanes_lo = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i lanes_hi = _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
  const __m512 lo_weight = _mm512_set1_ps(1.f / 65534.f);
  __m512 acc[RB][MT];
  __m256 corr[RB][MT];  // sum_g s_g * xsum_g, 8 groups a lane
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps(), corr[r][m] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < NB; ++sb) {
    for (int h = 0; h < 2; ++h) {
      const int64_t k = sb * 256 + h * 128;  // the half's first column
      for (int r = 0; r < RB; ++r) {
        const uint8_t* b = a.blocks + (n + r) * row_bytes + sb * int64_t(210);
        prefetch_l2(b + 64 * h, ahead);  // gemv.h
        prefetch_l2(b + 128 + 32 * h, ahead);
        __m512i c[2];
        Codes::load(b + 64 * h, b + 128 + 32 * h, c);
        const __m512i w[4] = {_mm512_unpacklo_epi8(c[0], zero), _mm512_unpackhi_epi8(c[0], zero),
                              _mm512_unpacklo_epi8(c[1], zero), _mm512_unpackhi_epi8(c[1], zero)};
        // the half's 8 group scales d * sc (exact in fp32)
        const __m256 s8 = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 192 + 8 * h)))),
            _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(b + 208))));
        for (int m = 0; m < MT; ++m) {
          const int16_t* xh = a.xq + (m0 + m) * K + k;
          __m512 p[2];
          for (int i = 0; i < 2; ++i) {
            __m512i ph = _mm512_dpwssd_epi32(_mm512_madd_epi16(w[2 * i], _mm512_loadu_si512(xh + 64 * i)), w[2 * i + 1],
                                             _mm512_loadu_si512(xh + 64 * i + 32));
            p[i] = _mm512_cvtepi32_ps(ph);
            if constexpr (LO) {
              const int16_t* xl = a.xq_lo + (m0 + m) * K + k;
              const __m512i pl = _mm512_dpwssd_epi32(_mm512_madd_epi16(w[2 * i], _mm512_loadu_si512(xl + 64 * i)),
                                                     w[2 * i + 1], _mm512_loadu_si512(xl + 64 * i + 32));
              p[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pl), lo_weight, p[i]);
            }
          }
          const __m256 sx = _mm256_mul_ps(s8, _mm256_set1_ps(a.xscale[(m0 + m) * NB + sb]));
          acc[r][m] = _mm512_fmadd_ps(p[0], _mm512_permutexvar_ps(lanes_lo, _mm512_castps256_ps512(sx)), acc[r][m]);
          acc[r][m] = _mm512_fmadd_ps(p[1], _mm512_permutexvar_ps(lanes_hi, _mm512_castps256_ps512(sx)), acc[r][m]);
          corr[r][m] = _mm256_fmadd_ps(s8, _mm256_loadu_ps(a.xsum + (m0 + m) * G + k / 16), corr[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) {
      a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) - 32.f * hsum(corr[r][m]);
    }
}

template <class Codes>
struct Q6KTiles {
  template <bool LO>
  struct Tile {
    template <int RB, int MT>
    static void run(const KQuantArgs& a, int64_t n, int64_t m0) { q6k_tile<Codes, LO, RB, MT>(a, n, m0); }
  };
};

// q6_K against int8 activations: vpmaddubsw multiplies a register of 64 codes (0..63, as bytes in order) by 64
// activations with no unpacking (pair sums <= 2 * 63 * 127 fit int16), and vpdpwssd weighs each pair sum by its group's int8 scale and adds it to
// int32 sums: 128-bit lane q of a register is one group of 16 weights, so its scale is one byte of the block's 16
// put in the high byte of every int16 of the lane by vpshufb and sign-extended by a shift. The - 32 goes in as
// integers, 32 * sc . (x8's sums per group) a super-block, and the int32 sums (< 2^31, as on AVX2) become fp32 once
// a super-block. Per 128 weights ~27 instructions against the int16 tile's ~43: the head of an int4 model was
// compute-bound there (a 4096-row q6_K slice in cache read 27-30 GB/s on a Zen 4, the whole head from memory 23-24).

// kQ6KPicks[2 h + i]: vpshufb's control giving the int16 lanes of 128-bit lane q the scale byte 8 h + 4 i + q as their
// high byte (0x80: a zero low byte)
struct Q6KPicks {
  alignas(64) int8_t c[4][64];
  constexpr Q6KPicks() : c{} {
    for (int p = 0; p < 4; ++p)
      for (int q = 0; q < 4; ++q)
        for (int j = 0; j < 8; ++j) c[p][16 * q + 2 * j] = int8_t(-128), c[p][16 * q + 2 * j + 1] = int8_t(4 * p + q);
  }
};
constexpr Q6KPicks kQ6KPicksTable{};
const auto& kQ6KPicks = kQ6KPicksTable.c;

template <class Codes, int RB, int MT>
inline void q6k_tile_i8(const KQuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, row_bytes = K / 256 * int64_t(210), NB = K / 256, G = K / 16, ahead = ahead_l2(RB * row_bytes);
  const __m512i picks[4] = {_mm512_load_si512(kQ6KPicks[0]), _mm512_load_si512(kQ6KPicks[1]),
                            _mm512_load_si512(kQ6KPicks[2]), _mm512_load_si512(kQ6KPicks[3])};
  __m512 acc[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < NB; ++sb) {
    for (int r = 0; r < RB; ++r) {
      const uint8_t* b = a.blocks + (n + r) * row_bytes + sb * int64_t(210);
      const __m128i sc_bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
      const __m512i sc_all = _mm512_broadcast_i32x4(sc_bytes);
      const __m256i sc16 = _mm256_cvtepi8_epi16(sc_bytes);
      __m512i is[MT];
      for (int m = 0; m < MT; ++m) {  // - 32 sum_g sc[g] * (x8's sum over group g), 16 groups
        const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.x8sum + (m0 + m) * G + sb * 16));
        is[m] = _mm512_zextsi256_si512(
            _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, xs), 5)));
      }
      for (int h = 0; h < 2; ++h) {
        const int64_t k = sb * 256 + h * 128;
        prefetch_l2(b + 64 * h, ahead);  // gemv.h
        prefetch_l2(b + 128 + 32 * h, ahead);
        __m512i c[2];
        Codes::load(b + 64 * h, b + 128 + 32 * h, c);
        for (int i = 0; i < 2; ++i) {
          const __m512i sc = _mm512_srai_epi16(_mm512_shuffle_epi8(sc_all, picks[2 * h + i]), 8);
          for (int m = 0; m < MT; ++m) {
            const __m512i xv = _mm512_loadu_si512(a.x8 + (m0 + m) * K + k + 64 * i);
            is[m] = _mm512_dpwssd_epi32(is[m], _mm512_maddubs_epi16(c[i], xv), sc);
          }
        }
      }
      const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b + 208));
      for (int m = 0; m < MT; ++m)
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[m]), _mm512_set1_ps(d * a.xscale[(m0 + m) * NB + sb]),
                                    acc[r][m]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <class Codes>
struct Q6KTileI8 {
  template <int RB, int MT>
  static void run(const KQuantArgs& a, int64_t n, int64_t m0) { q6k_tile_i8<Codes, RB, MT>(a, n, m0); }
};

// rows [n0, n1) of y: the int8 tile where the activations are int8 (a.x8), else the int16 one (two terms: exact)
template <class Codes>
void q6k_rows(const KQuantArgs& a, int64_t n0, int64_t n1) {
  if (a.x8) tile_rows<Q6KTileI8<Codes>, 1>(a, n0, n1);
  else tile_rows_lo<Q6KTiles<Codes>::template Tile, 1>(a, n0, n1);
}

}  // namespace
}  // namespace glm4k
