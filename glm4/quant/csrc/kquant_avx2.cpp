// The K-quant kernels for AVX2 + FMA (kquant.h), and the dequantization both sets use for large M. q6_K: one half super-block
// (128 weights) a step per row, as four registers of 32 codes (weights 32 t .. 32 t + 31: low nibbles OR'd with
// the high pairs shifted into bits 4-5); in-lane byte unpacks against zero put weights 16 j .. 16 j + 15 of a
// register into 128-bit lane j, so each lane's int32 sums belong to one group of 16 (the lanes16 activation order
// of gemv.h), weighed by a vector of two per-lane scales. Codes are 0..63; the - 32 goes in per group.
// q4_K: 32 bytes of nibbles hold groups 2 i (low) and 2 i + 1 (high), each unpacked into one register whose two
// lanes are one group of 32 (lanes16 order again); the mins go in per group. q5_K: the 5th bits OR'd in from qh.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <cstdint>

#include "gemv.h"
#include "kquant.h"
#include "tiles.h"
#include "vec_avx2.h"

namespace glm4k {
namespace {

// the half's codes as bytes: c[t] holds weights 32 t .. 32 t + 31 in order
inline void q6k_codes(const uint8_t* half_ql, const uint8_t* half_qh, __m256i c[4]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), pair = _mm256_set1_epi8(0x30);
  const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half_ql));
  const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half_ql + 32));
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half_qh));
  // bits 2t..2t+1 of each qh byte into bits 4-5 (16-bit shifts; the byte mask drops what crossed from a neighbour)
  c[0] = _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), pair));
  c[1] = _mm256_or_si256(_mm256_and_si256(ql1, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), pair));
  c[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4), _mm256_and_si256(qh, pair));
  c[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                         _mm256_and_si256(_mm256_srli_epi16(qh, 2), pair));
}

// the half's 8 group scales d * sc (exact in fp32)
inline __m256 q6k_scales(const uint8_t* block, int h) {
  return _mm256_mul_ps(
      _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 192 + 8 * h)))),
      _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(block + 208))));
}

// q4_K's 8 group scales d * sc (mins: dmin * m), exact in fp32
inline __m256 q4k_scales(const uint8_t* block, bool mins) {
  const __m128i sm = q4k_scale_min(block + 4);
  const __m128i v = mins ? _mm_srli_si128(sm, 8) : sm;
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)),
                       _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(block + (mins ? 2 : 0)))));
}

// q6_K rows are prefetched 4 tiles ahead, not 1: on a Zen 3 reading 36 GB/s (2 threads), the 400M model's q6_K head
// from memory (151552 x 1024, best of 8): int16 activations 24.7-25.6 -> 26.5-26.6 GB/s, int8 30.7-31.2 -> 34.0-35.0
constexpr int64_t kAheadQ6K = 4;

template <bool LO, int RB, int MT>
inline void q6k_tile(const KQuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, row_bytes = K / 256 * int64_t(210), NB = K / 256, G = K / 16;
  const __m256i zero = _mm256_setzero_si256();
  const __m256 lo_weight = _mm256_set1_ps(1.f / 65534.f);
  __m256 acc[RB][MT], corr[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps(), corr[r][m] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < NB; ++sb) {
    for (int h = 0; h < 2; ++h) {
      const int64_t k = sb * 256 + h * 128;
      for (int r = 0; r < RB; ++r) {
        const uint8_t* b = a.blocks + (n + r) * row_bytes + sb * int64_t(210);
        _mm_prefetch(reinterpret_cast<const char*>(b + 64 * h + kAheadQ6K * RB * row_bytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + 128 + 32 * h + kAheadQ6K * RB * row_bytes), _MM_HINT_T0);
        __m256i c[4];
        q6k_codes(b + 64 * h, b + 128 + 32 * h, c);
        const __m256 s8 = q6k_scales(b, h);
        for (int m = 0; m < MT; ++m) {
          const int16_t* xh = a.xq + (m0 + m) * K + k;
          const __m256 sx = _mm256_mul_ps(s8, _mm256_set1_ps(a.xscale[(m0 + m) * NB + sb]));
          for (int t = 0; t < 4; ++t) {
            const __m256i wlo = _mm256_unpacklo_epi8(c[t], zero), whi = _mm256_unpackhi_epi8(c[t], zero);
            const __m256i* xv = reinterpret_cast<const __m256i*>(xh + 32 * t);
            __m256 p = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(wlo, _mm256_loadu_si256(xv)),
                                                           _mm256_madd_epi16(whi, _mm256_loadu_si256(xv + 1))));
            if constexpr (LO) {
              const __m256i* xl = reinterpret_cast<const __m256i*>(a.xq_lo + (m0 + m) * K + k + 32 * t);
              const __m256i pl = _mm256_add_epi32(_mm256_madd_epi16(wlo, _mm256_loadu_si256(xl)),
                                                  _mm256_madd_epi16(whi, _mm256_loadu_si256(xl + 1)));
              p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl), lo_weight, p);
            }
            // lane 0: group 2 t of the half, lane 1: group 2 t + 1
            const __m256i idx = _mm256_setr_epi32(2 * t, 2 * t, 2 * t, 2 * t, 2 * t + 1, 2 * t + 1, 2 * t + 1, 2 * t + 1);
            acc[r][m] = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(sx, idx), acc[r][m]);
          }
          corr[r][m] = _mm256_fmadd_ps(s8, _mm256_loadu_ps(a.xsum + (m0 + m) * G + k / 16), corr[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n + r] = hsum(acc[r][m]) - 32.f * hsum(corr[r][m]);
}

// q6_K against int8 activations (llama.cpp's q8_K precision: x = xscale * x8 per 256 columns, in order): vpmaddubsw
// multiplies a register of 32 codes (0..63) by 32 activations with no unpacking (pair sums <= 2 * 63 * 127 fit int16)
// and vpmaddwd weighs each pair sum by its group's int8 scale, both groups of the register at once (lane 0: sc[2 t],
// lane 1: sc[2 t + 1]). The - 32 goes in as integers too: 32 * sc . (x8's sums per group), one vpmaddwd a
// super-block. Its int32 sums (<= 256 * 64 * 127 * 128 < 2^31) become fp32 once. 1.10-1.13x the int16 tile (Zen 3,
// alternated in one process: one thread in L2, two from memory; before the integer - 32).
template <int RB, int MT>
inline void q6k_tile_i8(const KQuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, row_bytes = K / 256 * int64_t(210), NB = K / 256, G = K / 16;
  __m256 acc[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < NB; ++sb) {
    for (int r = 0; r < RB; ++r) {
      const uint8_t* b = a.blocks + (n + r) * row_bytes + sb * int64_t(210);
      const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)));
      __m256i is[MT];
      for (int m = 0; m < MT; ++m) {  // - 32 sum_g sc[g] * (x8's sum over group g), 16 groups
        const __m256i* xs = reinterpret_cast<const __m256i*>(a.x8sum + (m0 + m) * G + sb * 16);
        is[m] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, _mm256_loadu_si256(xs)), 5));
      }
      for (int h = 0; h < 2; ++h) {
        const int64_t k = sb * 256 + h * 128;
        _mm_prefetch(reinterpret_cast<const char*>(b + 64 * h + kAheadQ6K * RB * row_bytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + 128 + 32 * h + kAheadQ6K * RB * row_bytes), _MM_HINT_T0);
        __m256i c[4];
        q6k_codes(b + 64 * h, b + 128 + 32 * h, c);
        // the half's 8 scales as int16, each twice in its 32-bit lane: lane i holds group i's
        const __m128i w = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 192 + 8 * h)));
        const __m256i sc2 = _mm256_set_m128i(_mm_unpackhi_epi16(w, w), _mm_unpacklo_epi16(w, w));
        for (int t = 0; t < 4; ++t) {
          const __m256i idx = _mm256_setr_epi32(2 * t, 2 * t, 2 * t, 2 * t, 2 * t + 1, 2 * t + 1, 2 * t + 1, 2 * t + 1);
          const __m256i sc = _mm256_permutevar8x32_epi32(sc2, idx);
          for (int m = 0; m < MT; ++m) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.x8 + (m0 + m) * K + k + 32 * t));
            is[m] = _mm256_add_epi32(is[m], _mm256_madd_epi16(_mm256_maddubs_epi16(c[t], xv), sc));
          }
        }
      }
      const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b + 208));
      for (int m = 0; m < MT; ++m)
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[m]), _mm256_set1_ps(d * a.xscale[(m0 + m) * NB + sb]), acc[r][m]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n + r] = hsum(acc[r][m]);
}

// bit g of each byte of qh moved to bit 4 (q5_K's 5th code bit; 16-bit shifts, the byte mask drops what crossed)
inline __m256i fifth_bit(__m256i qh, int g) {
  const __m256i v = g <= 4 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - g)) : _mm256_srl_epi16(qh, _mm_cvtsi32_si128(g - 4));
  return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

// the cache lines of the q4_K / q5_K block at b (the same block RB rows on: the next tile's)
template <bool Q5>
inline void prefetch_q45k(const uint8_t* b) {
  for (int64_t off : {0, 64, 128}) _mm_prefetch(reinterpret_cast<const char*>(b + off), _MM_HINT_T0);
  if constexpr (Q5) _mm_prefetch(reinterpret_cast<const char*>(b + 175), _MM_HINT_T0);
}

// Q5: q5_K (the 5th bits from qh), else q4_K
template <bool Q5, bool LO, int RB, int MT>
inline void q4k_tile(const KQuantArgs& a, int64_t n, int64_t m0) {
  constexpr int64_t kBytes = Q5 ? 176 : 144, kQs = Q5 ? 48 : 16;  // block size, where qs starts
  const int64_t K = a.K, row_bytes = K / 256 * kBytes, NB = K / 256, G = K / 32;
  const __m256i zero = _mm256_setzero_si256(), low4 = _mm256_set1_epi8(0x0F);
  const __m256 lo_weight = _mm256_set1_ps(1.f / 65534.f);
  __m256 acc[RB][MT], corr[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps(), corr[r][m] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < NB; ++sb) {
    const int64_t k = sb * 256;
    for (int r = 0; r < RB; ++r) {
      const uint8_t* b = a.blocks + (n + r) * row_bytes + sb * kBytes;
      prefetch_q45k<Q5>(b + RB * row_bytes);
      const __m256i qh = Q5 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)) : _mm256_setzero_si256();
      const __m256 s8 = q4k_scales(b, false), m8 = q4k_scales(b, true);
      for (int m = 0; m < MT; ++m) {
        const int16_t* xh = a.xq + (m0 + m) * K + k;
        const __m256 sx = _mm256_mul_ps(s8, _mm256_set1_ps(a.xscale[(m0 + m) * NB + sb]));
        for (int i = 0; i < 4; ++i) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kQs + 32 * i));
          __m256i regs[2] = {_mm256_and_si256(q, low4), _mm256_and_si256(_mm256_srli_epi16(q, 4), low4)};
          if constexpr (Q5)
            for (int j = 0; j < 2; ++j) regs[j] = _mm256_or_si256(regs[j], fifth_bit(qh, 2 * i + j));
          for (int j = 0; j < 2; ++j) {  // group 2 i + j: columns k + 64 i + 32 j
            const __m256i u = _mm256_unpacklo_epi8(regs[j], zero), v = _mm256_unpackhi_epi8(regs[j], zero);
            const __m256i* xv = reinterpret_cast<const __m256i*>(xh + 64 * i + 32 * j);
            __m256 p = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(u, _mm256_loadu_si256(xv)),
                                                           _mm256_madd_epi16(v, _mm256_loadu_si256(xv + 1))));
            if constexpr (LO) {
              const __m256i* xl = reinterpret_cast<const __m256i*>(a.xq_lo + (m0 + m) * K + k + 64 * i + 32 * j);
              const __m256i pl = _mm256_add_epi32(_mm256_madd_epi16(u, _mm256_loadu_si256(xl)),
                                                  _mm256_madd_epi16(v, _mm256_loadu_si256(xl + 1)));
              p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl), lo_weight, p);
            }
            acc[r][m] = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(sx, _mm256_set1_epi32(2 * i + j)), acc[r][m]);
          }
        }
        corr[r][m] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(a.xsum + (m0 + m) * G + k / 32), corr[r][m]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n + r] = hsum(acc[r][m]) - hsum(corr[r][m]);
}

// q4_K / q5_K against int8 activations (llama.cpp's q8_K precision, x = xscale * x8 per 256 columns, in order): each
// 32-byte load of nibbles is groups 2 i (low) and 2 i + 1 (high) as bytes in column order, one vpmaddubsw each
// (pair sums <= 2 * 31 * 127), weighed by the group's 6-bit scale in vpmaddwd; the mins in integers as well,
// m . (x8's sums per group of 32), one vpmaddwd of 8 groups a super-block.
template <bool Q5, int RB, int MT>
inline void q4k_tile_i8(const KQuantArgs& a, int64_t n, int64_t m0) {
  constexpr int64_t kBytes = Q5 ? 176 : 144, kQs = Q5 ? 48 : 16;
  const int64_t K = a.K, row_bytes = K / 256 * kBytes, NB = K / 256, G = K / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < NB; ++sb) {
    for (int r = 0; r < RB; ++r) {
      const uint8_t* b = a.blocks + (n + r) * row_bytes + sb * kBytes;
      prefetch_q45k<Q5>(b + RB * row_bytes);
      const __m128i sm = q4k_scale_min(b + 4);  // bytes 0..7 sc, 8..15 m
      const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));  // sc[0..7] as int16, both lanes
      const __m128i m16 = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
      const __m256i qh = Q5 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)) : _mm256_setzero_si256();
      __m256i is[MT];
      for (int m = 0; m < MT; ++m) is[m] = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kQs + 32 * i));
        __m256i regs[2] = {_mm256_and_si256(q, low4), _mm256_and_si256(_mm256_srli_epi16(q, 4), low4)};
        if constexpr (Q5)
          for (int j = 0; j < 2; ++j) regs[j] = _mm256_or_si256(regs[j], fifth_bit(qh, 2 * i + j));
        for (int j = 0; j < 2; ++j) {  // group 2 i + j: its scale as int16 in every lane
          const int g = 2 * i + j;
          const __m256i sc = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(int16_t((2 * g + 1) << 8 | 2 * g)));
          for (int m = 0; m < MT; ++m) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.x8 + (m0 + m) * K + sb * 256 + 32 * g));
            is[m] = _mm256_add_epi32(is[m], _mm256_madd_epi16(_mm256_maddubs_epi16(regs[j], xv), sc));
          }
        }
      }
      const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b)), dmin = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b + 2));
      for (int m = 0; m < MT; ++m) {
        const float xs = a.xscale[(m0 + m) * NB + sb];
        const __m128i mins = _mm_madd_epi16(m16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.x8sum + (m0 + m) * G + sb * 8)));
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[m]), _mm256_set1_ps(d * xs), acc[r][m]);
        const __m256i mins8 = _mm256_inserti128_si256(_mm256_setzero_si256(), mins, 0);  // upper lanes zero
        acc[r][m] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mins8), _mm256_set1_ps(dmin * xs), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n + r] = hsum(acc[r][m]);
}

template <bool Q5>
struct Q45KTileI8 {
  template <int RB, int MT>
  static void run(const KQuantArgs& a, int64_t n, int64_t m0) { q4k_tile_i8<Q5, RB, MT>(a, n, m0); }
};

template <bool Q5, bool LO>
struct Q45KTile {
  template <int RB, int MT>
  static void run(const KQuantArgs& a, int64_t n, int64_t m0) { q4k_tile<Q5, LO, RB, MT>(a, n, m0); }
};
template <bool LO>
using Q4KTile = Q45KTile<false, LO>;
template <bool LO>
using Q5KTile = Q45KTile<true, LO>;

template <bool LO>
struct Q6KTile {
  template <int RB, int MT>
  static void run(const KQuantArgs& a, int64_t n, int64_t m0) { q6k_tile<LO, RB, MT>(a, n, m0); }
};

struct Q6KTileI8 {
  template <int RB, int MT>
  static void run(const KQuantArgs& a, int64_t n, int64_t m0) { q6k_tile_i8<RB, MT>(a, n, m0); }
};

}  // namespace

void q6k_rows_avx2(const KQuantArgs& a, int64_t n0, int64_t n1) {
  if (a.x8) tile_rows<Q6KTileI8, 1>(a, n0, n1);
  else tile_rows_lo<Q6KTile, 1>(a, n0, n1);
}

void q4k_rows_avx2(const KQuantArgs& a, int64_t n0, int64_t n1) {
  if (a.x8) tile_rows<Q45KTileI8<false>>(a, n0, n1);
  else tile_rows_lo<Q4KTile>(a, n0, n1);
}

void q5k_rows_avx2(const KQuantArgs& a, int64_t n0, int64_t n1) {
  if (a.x8) tile_rows<Q45KTileI8<true>>(a, n0, n1);
  else tile_rows_lo<Q5KTile>(a, n0, n1);
}

// w = s * (q - 32) (q6_K), w = s * q - dmin m (q4_K, q5_K), each product and difference rounded on its own as gguf-py's
// numpy does: no FMA contraction in this function (GCC's intrinsics are vector arithmetic it would contract)
__attribute__((optimize("fp-contract=off"))) void kquant_dequant_rows_avx2(
    int type, const uint8_t* blocks, int64_t K, int64_t r0, int64_t r1, float* out_f32, uint16_t* out_bf16) {
  const int64_t bb = kquant_block_bytes(type), row_bytes = K / 256 * bb;
  const __m256 c32 = _mm256_set1_ps(32.f), low4 = _mm256_castsi256_ps(_mm256_set1_epi8(0x0F));
  for (int64_t n = r0; n < r1; ++n) {
    for (int64_t sb = 0; sb < K / 256; ++sb) {
      const uint8_t* b = blocks + n * row_bytes + sb * bb;
      alignas(32) uint8_t q[256];  // the block's codes in order
      alignas(32) float s[16], mn[8];  // group scales (and q4_K's dmin * m)
      if (type == kQ6K) {
        for (int h = 0; h < 2; ++h) {
          __m256i c[4];
          q6k_codes(b + 64 * h, b + 128 + 32 * h, c);
          for (int t = 0; t < 4; ++t) _mm256_store_si256(reinterpret_cast<__m256i*>(q + 128 * h + 32 * t), c[t]);
          _mm256_store_ps(s + 8 * h, q6k_scales(b, h));
        }
      } else {  // q4_K / q5_K
        const int64_t qs = type == kQ5K ? 48 : 16;
        const __m256i qh = type == kQ5K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)) : _mm256_setzero_si256();
        for (int i = 0; i < 4; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + qs + 32 * i));
          const __m256i lo = _mm256_castps_si256(_mm256_and_ps(_mm256_castsi256_ps(v), low4));
          const __m256i hi = _mm256_castps_si256(_mm256_and_ps(_mm256_castsi256_ps(_mm256_srli_epi16(v, 4)), low4));
          _mm256_store_si256(reinterpret_cast<__m256i*>(q + 64 * i), type == kQ5K ? _mm256_or_si256(lo, fifth_bit(qh, 2 * i)) : lo);
          _mm256_store_si256(reinterpret_cast<__m256i*>(q + 64 * i + 32),
                             type == kQ5K ? _mm256_or_si256(hi, fifth_bit(qh, 2 * i + 1)) : hi);
        }
        _mm256_store_ps(s, q4k_scales(b, false));
        _mm256_store_ps(mn, q4k_scales(b, true));
      }
      const int64_t group = kquant_group(int(type));
      for (int64_t e = 0; e < 256; e += 8) {
        const __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + e))));
        const __m256 sv = _mm256_set1_ps(s[e / group]);
        const __m256 w = type == kQ6K ? _mm256_mul_ps(sv, _mm256_sub_ps(code, c32))
                                      : _mm256_sub_ps(_mm256_mul_ps(sv, code), _mm256_set1_ps(mn[e / group]));
        const int64_t at = (n - r0) * K + sb * 256 + e;
        if (out_f32) _mm256_storeu_ps(out_f32 + at, w);
        else _mm_storeu_si128(reinterpret_cast<__m128i*>(out_bf16 + at), bf16x8(w));
      }
    }
  }
}

}  // namespace glm4k
