// Weight-streaming kernels for small M on AVX-512 (F, BW, VL, DQ, VNNI): Zen 4 / Zen 5, Ice Lake and later.
// Same contracts as gemv_avx2.cpp; only called after ops.cpp checked the CPU has these.
// Dense weights: 16 fp32 lanes per FMA. Integer weights: codes widened to int16 and multiplied against the int16
// activations (x = xscale * (hi + lo / 65534) per block, see gemv_avx2.cpp) by vpdpwssd, which multiplies 32 pairs
// and adds them into 16 int32 lanes in one instruction: 64 weights cost ~6 instructions instead of ~28 with AVX2.
// GCC 12 warns of an uninitialized variable inside its own avx512fintrin.h (the cast intrinsics): not ours
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>

#include <cstdint>

#include "codes6.h"
#include "gemv.h"
#include "tiles.h"

namespace glm4k {
namespace {

constexpr int kBytes[3] = {4, 2, 2};  // per weight, by WeightType

// 16 weights at element offset i, widened to fp32
template <int WT>
inline __m512 load16(const void* w, int64_t i) {
  if constexpr (WT == kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  } else if constexpr (WT == kBF16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i)));
  }
}

// the same 16 lanes, only the first `n` loaded (the row's tail; the rest are zero)
template <int WT>
inline __m512 load16_tail(const void* w, int64_t i, int n) {
  const __mmask16 mk = __mmask16((1u << n) - 1);
  if constexpr (WT == kF32) {
    return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(w) + i);
  } else {
    __m256i h = _mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(w) + i);
    if constexpr (WT == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

// y[m, n..n+RB) for m in [0, MT): RB weight rows share each activation load, MT activation rows share each weight.
// A one-row, one-token tile keeps two accumulators (even / odd steps of 16 columns), two FMA chains instead of one
// (as the AVX2 kernel, where one chain held one thread to 8 B / cycle).
template <int WT, int RB, int MT>
inline void dense_tile(const DenseArgs& a, int64_t n, int64_t m0) {
  constexpr int U = RB * MT == 1 ? 2 : 1;  // accumulators per output
  const int64_t K = a.K;
  __m512 acc[RB][MT][U];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm512_setzero_ps();
  const float* x = a.x + m0 * K;
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) {
      const int64_t ku = k + 16 * u;
      __m512 xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = _mm512_loadu_ps(x + m * K + ku);
      for (int r = 0; r < RB; ++r) {
        if (dense_prefetch(RB, MT) && (ku * kBytes[WT]) % 64 == 0)
          prefetch_l2(static_cast<const char*>(a.w) + ((n + r) * K + ku) * kBytes[WT], ahead_l2(RB * K * kBytes[WT]));
        __m512 wv = load16<WT>(a.w, (n + r) * K + ku);
        for (int m = 0; m < MT; ++m) acc[r][m][u] = _mm512_fmadd_ps(wv, xv[m], acc[r][m][u]);
      }
    }
  }
  for (; k < K; k += 16) {  // U = 2: a last full step of 16 columns; then the last K % 16 columns, masked
    const int t = K - k >= 16 ? 16 : int(K - k);
    const __mmask16 mk = __mmask16((1u << t) - 1);
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * K + k);
      for (int r = 0; r < RB; ++r)
        acc[r][m][0] = _mm512_fmadd_ps(load16_tail<WT>(a.w, (n + r) * K + k, t), xv, acc[r][m][0]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) {
      if constexpr (U == 2) acc[r][m][0] = _mm512_add_ps(acc[r][m][0], acc[r][m][1]);
      a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m][0]);
    }
}

// bf16 weights against x in the perm32_bf16 order (K a multiple of 32): a bf16 is the high half of its fp32, so
// unpacking under zero widens 16 weights in one in-lane instruction (vs a cross-lane zero-extend and a shift).
template <int RB, int MT>
inline void bf16_perm_tile(const DenseArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K;
  __m512 acc[RB][MT][2];  // low / high unpacks: two FMA chains, not one of two FMAs per 64 bytes
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
  const float* x = a.x + m0 * K;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 32) {
    __m512 xlo[MT], xhi[MT];
    for (int m = 0; m < MT; ++m) xlo[m] = _mm512_loadu_ps(x + m * K + k), xhi[m] = _mm512_loadu_ps(x + m * K + k + 16);
    for (int r = 0; r < RB; ++r) {
      const uint16_t* w = static_cast<const uint16_t*>(a.w) + (n + r) * K + k;
      if constexpr (dense_prefetch(RB, MT)) prefetch_l2(w, ahead_l2(RB * K * 2));
      const __m512i wv = _mm512_loadu_si512(w);
      const __m512 wlo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, wv));
      const __m512 whi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, wv));
      for (int m = 0; m < MT; ++m) {
        acc[r][m][0] = _mm512_fmadd_ps(wlo, xlo[m], acc[r][m][0]);
        acc[r][m][1] = _mm512_fmadd_ps(whi, xhi[m], acc[r][m][1]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m)
      a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]));
}

template <int WT>
struct DenseTile {
  template <int RB, int MT>
  static void run(const DenseArgs& a, int64_t n, int64_t m0) { dense_tile<WT, RB, MT>(a, n, m0); }
};

struct Bf16PermTile {
  template <int RB, int MT>
  static void run(const DenseArgs& a, int64_t n, int64_t m0) { bf16_perm_tile<RB, MT>(a, n, m0); }
};

// (sum v0, sum v1, sum v2, sum v3): four horizontal sums in ~9 instructions instead of ~24
inline __m128 reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  auto half = [](__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); };
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(half(v0), half(v1)), _mm256_hadd_ps(half(v2), half(v3)));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

inline float load_scale(const void* s, int f16, int64_t i) {
  return f16 ? _cvtsh_ss(static_cast<const uint16_t*>(s)[i]) : static_cast<const float*>(s)[i];
}

// 64 codes of weight row n from column k (a multiple of 64) as int16, in column order: w[0] columns k..k+31,
// w[1] k+32..k+63. 4-bit codes are in the q4_0 nibble order per 32-column block (byte j: column j low, j + 16 high).
template <int BITS>
inline void load_codes64(const QuantArgs& a, int64_t n, int64_t k, __m512i w[2]) {
  if constexpr (BITS == 8) {
    const int8_t* q = static_cast<const int8_t*>(a.q) + n * a.K + k;
    w[0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    w[1] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
  } else if constexpr (BITS == 6) {  // the two blocks of one 48-byte unit (codes6.h)
    const uint8_t* q = static_cast<const uint8_t*>(a.q) + (n * a.K + k) / 64 * 48;
    for (int i = 0; i < 2; ++i) {
      __m128i lo, hi;
      codes6_block32(q, i, lo, hi);
      w[i] = _mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo));
    }
  } else {
    const uint8_t* q = static_cast<const uint8_t*>(a.q) + (n * a.K + k) / 2;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));  // two 32-column blocks
    const __m256i lo = _mm256_and_si256(bytes, mask), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    w[0] = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(lo, hi, 0x20));  // block 0: lo nibbles, then hi
    w[1] = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(lo, hi, 0x31));  // block 1
  }
}

// 128 4-bit codes of weight row n from column k (a multiple of 128) as int16 in the perm128 order (gemv.h): the
// 64 bytes are four q4_0 blocks, one per 128-bit lane, and in-lane unpacks against zero widen them.
inline void load_codes128_perm(const QuantArgs& a, int64_t n, int64_t k, __m512i w[4]) {
  const uint8_t* q = static_cast<const uint8_t*>(a.q) + (n * a.K + k) / 2;
  const __m512i mask = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  const __m512i bytes = _mm512_loadu_si512(q);
  const __m512i lo = _mm512_and_si512(bytes, mask), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask);
  w[0] = _mm512_unpacklo_epi8(lo, zero);  // columns 32 j + 0..7 of lane j
  w[1] = _mm512_unpackhi_epi8(lo, zero);  // 32 j + 8..15
  w[2] = _mm512_unpacklo_epi8(hi, zero);  // 32 j + 16..23
  w[3] = _mm512_unpackhi_epi8(hi, zero);  // 32 j + 24..31
}

// The same for 6-bit codes (codes6.h, two 48-byte units): the nibbles as above, each lane's high bit pairs (one
// 64-bit word per block, duplicated across the lane's two halves) shifted into bits 4-5 of the bytes they belong to.
inline void load_codes128_perm6(const QuantArgs& a, int64_t n, int64_t k, __m512i w[4]) {
  const uint8_t* q = static_cast<const uint8_t*>(a.q) + (n * a.K + k) / 64 * 48;
  const __m512i mask = _mm512_set1_epi8(0x0F), pair = _mm512_set1_epi8(0x30), zero = _mm512_setzero_si512();
  const __m512i bytes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 48)), 1);
  const __m256i words = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 80)), 1);  // one per block
  const __m512i pairs = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3), _mm512_castsi256_si512(words));
  const __m512i lo = _mm512_or_si512(_mm512_and_si512(bytes, mask),
                                     _mm512_and_si512(_mm512_sllv_epi64(pairs, _mm512_setr_epi64(4, 2, 4, 2, 4, 2, 4, 2)), pair));
  const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask),
                                     _mm512_and_si512(_mm512_srlv_epi64(pairs, _mm512_setr_epi64(0, 2, 0, 2, 0, 2, 0, 2)), pair));
  w[0] = _mm512_unpacklo_epi8(lo, zero);
  w[1] = _mm512_unpackhi_epi8(lo, zero);
  w[2] = _mm512_unpacklo_epi8(hi, zero);
  w[3] = _mm512_unpackhi_epi8(hi, zero);
}

// y[m, n] = sum_blocks s[n, g] * xscale[m, b] * sum_{k in b} q[n, k] (hi[m, k] + lo[m, k] / 65534) + corrections.
// Int32 sums stay exact: |q| <= 128, |hi|, |lo| <= 32767 and blocks of <= 256 columns keep them below 2^31.
// 4-bit codes against activation blocks of 32 or 64 columns (GGUF q4_0 and other g32 / g64 formats): in the
// perm128 layout each 128-bit lane is one 32-column block, so the int32 sums of a 128-column step keep every block
// in its own lanes and one vector of per-lane scales (weight scale x activation scale) weighs them.
template <bool LO, int RB, int MT>
inline void q4_lanes_tile(const QuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, g = a.group, G = K / g, B = a.xblock, NB = K / B;
  __m512 acc[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const int16_t* xh = a.xq + m0 * K;
  const int16_t* xl = LO ? a.xq_lo + m0 * K : nullptr;
  const float* xsc = a.xscale + m0 * NB;
  const __m512 lo_weight = _mm512_set1_ps(1.f / 65534.f);
  const __m512i lane_of = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t k = 0; k < K; k += 128) {
    __m512i ph[RB][MT], pl[RB][MT];
    for (int r = 0; r < RB; ++r) {
      prefetch_l2(static_cast<const char*>(a.q) + ((n + r) * K + k) / 2, ahead_l2(RB * K / 2));
      __m512i w[4];
      load_codes128_perm(a, n + r, k, w);
      for (int m = 0; m < MT; ++m) {
        const int16_t* h = xh + m * K + k;
        const int16_t* l = LO ? xl + m * K + k : nullptr;
        ph[r][m] = _mm512_madd_epi16(w[0], _mm512_loadu_si512(h));
        if constexpr (LO) pl[r][m] = _mm512_madd_epi16(w[0], _mm512_loadu_si512(l));
        for (int j = 1; j < 4; ++j) {
          ph[r][m] = _mm512_dpwssd_epi32(ph[r][m], w[j], _mm512_loadu_si512(h + 32 * j));
          if constexpr (LO) pl[r][m] = _mm512_dpwssd_epi32(pl[r][m], w[j], _mm512_loadu_si512(l + 32 * j));
        }
      }
    }
    for (int r = 0; r < RB; ++r) {
      __m128 ws;  // the weight scales of the 4 lanes (fp32 ones loaded as a vector: four scalar stores read back
                  // as one vector stall store forwarding, 3.3x the time of a q4_K tensor's step)
      if (g == 32 && a.scale_f16) {
        ws = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a.scales) +
                                                                           (n + r) * G + k / 32)));
      } else if (g == 32) {
        ws = _mm_loadu_ps(static_cast<const float*>(a.scales) + (n + r) * G + k / 32);
      } else {
        float w4[4];
        for (int j = 0; j < 4; ++j) w4[j] = load_scale(a.scales, a.scale_f16, (n + r) * G + (k + 32 * j) / g);
        ws = _mm_loadu_ps(w4);
      }
      for (int m = 0; m < MT; ++m) {
        __m128 xs4;  // the activation scales of the 4 lanes
        if (B == 32) {
          xs4 = _mm_loadu_ps(xsc + m * NB + k / 32);
        } else {
          float v[4];
          for (int j = 0; j < 4; ++j) v[j] = xsc[m * NB + (k + 32 * j) / B];
          xs4 = _mm_loadu_ps(v);
        }
        const __m512 sv = _mm512_permutexvar_ps(lane_of, _mm512_castps128_ps512(_mm_mul_ps(ws, xs4)));
        __m512 p = _mm512_cvtepi32_ps(ph[r][m]);
        if constexpr (LO) p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pl[r][m]), lo_weight, p);
        acc[r][m] = _mm512_fmadd_ps(p, sv, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m)
      a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + group_correction_avx2(a, n + r, m0 + m);
}

// 8-bit codes in groups of 16 or 32 against int16 activations in the lanes8 order (gemv.h), 64 columns a step: the
// in-lane byte unpacks put each group of 16 columns (or half a group of 32) into one 128-bit lane, so one vector of
// per-lane weight scales weighs a step's int32 sums (the fp32 FMA kernel widens every code to fp32 and pays a scale
// broadcast per group: ~2x the instructions). Unpacking under zero puts a code in an int16's high byte; an
// arithmetic shift sign-extends it. |code| <= 128, |v| <= 32639, 4 products per lane a step: far below 2^31.
template <int RB, int MT>
inline void q8_lanes_tile(const QuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, g = a.group, G = K / g, B = a.xblock, NB = K / B;
  __m512 acc[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const int16_t* xh = a.xq + m0 * K;
  const float* xsc = a.xscale + m0 * NB;
  const __m512i zero = _mm512_setzero_si512();
  // int32 lane l holds columns of 128-bit lane l / 4, i.e. group l / 4 of the step (16 columns) or l / 8 (32)
  const __m512i lane_of = g == 16 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                  : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const int8_t* q0 = static_cast<const int8_t*>(a.q);
  for (int64_t k = 0; k < K; k += 64) {
    __m512i ph[RB][MT];
    for (int r = 0; r < RB; ++r) {
      const int8_t* q = q0 + (n + r) * K + k;
      prefetch_l2(q, ahead_l2(RB * K));
      const __m512i v = _mm512_loadu_si512(q);
      const __m512i wlo = _mm512_srai_epi16(_mm512_unpacklo_epi8(zero, v), 8);
      const __m512i whi = _mm512_srai_epi16(_mm512_unpackhi_epi8(zero, v), 8);
      for (int m = 0; m < MT; ++m) {
        const int16_t* h = xh + m * K + k;
        ph[r][m] = _mm512_dpwssd_epi32(_mm512_madd_epi16(wlo, _mm512_loadu_si512(h)), whi, _mm512_loadu_si512(h + 32));
      }
    }
    for (int r = 0; r < RB; ++r) {
      __m128 ws;  // the step's 4 (groups of 16) or 2 (groups of 32) weight scales
      const int64_t at = (n + r) * G + k / g;
      if (g == 16) {
        ws = a.scale_f16 ? _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a.scales) + at)))
                         : _mm_loadu_ps(static_cast<const float*>(a.scales) + at);
      } else {
        ws = a.scale_f16 ? _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(static_cast<const uint16_t*>(a.scales) + at)))
                         : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(static_cast<const float*>(a.scales) + at)));
      }
      const __m512 sv = _mm512_permutexvar_ps(lane_of, _mm512_castps128_ps512(ws));
      for (int m = 0; m < MT; ++m) {
        const __m512 s = _mm512_mul_ps(sv, _mm512_set1_ps(xsc[m * NB + k / B]));
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ph[r][m]), s, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m)
      a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + group_correction_avx2(a, n + r, m0 + m);
}

// MODE: kPlain (columns in order, 64 per step), kPerm (4-bit, perm128 order, blocks of 128k columns), kLanes
// (4-bit, perm128 order, blocks of 32 or 64: q4_lanes_tile), kLanes8 (8-bit, groups of 16 / 32: q8_lanes_tile)
enum { kPlain, kPerm, kLanes, kLanes8 };

template <int BITS, int MODE, bool LO, int RB, int MT>
inline void int16_tile(const QuantArgs& a, int64_t n, int64_t m0) {
  if constexpr (MODE == kLanes) {
    q4_lanes_tile<LO, RB, MT>(a, n, m0);
    return;
  } else if constexpr (MODE == kLanes8) {
    q8_lanes_tile<RB, MT>(a, n, m0);  // int16 precision only (ActPrep)
    return;
  }
  const int64_t K = a.K, g = a.group, G = K / g, B = a.xblock, NB = K / B;
  __m512 acc[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const int16_t* xh = a.xq + m0 * K;
  const int16_t* xl = LO ? a.xq_lo + m0 * K : nullptr;
  const float* xsc = a.xscale + m0 * NB;
  const float* xs = a.xsum + m0 * G;
  const __m512 lo_weight = _mm512_set1_ps(1.f / 65534.f);
  const bool shifted = a.mins || a.zero_point;
  float corr[RB][MT] = {};  // sum_g (mins - zero_point * s) * xsum, the group terms, here rather than a pass per row
  for (int64_t gi = 0; gi < G; ++gi) {
    float s[RB];
    for (int r = 0; r < RB; ++r) s[r] = load_scale(a.scales, a.scale_f16, (n + r) * G + gi);
    if (shifted)
      for (int r = 0; r < RB; ++r) {
        const float c = (a.mins ? load_scale(a.mins, a.scale_f16, (n + r) * G + gi) : 0.f) - float(a.zero_point) * s[r];
        for (int m = 0; m < MT; ++m) corr[r][m] += c * xs[m * G + gi];
      }
    for (int64_t b0 = gi * g; b0 < (gi + 1) * g; b0 += B) {
      __m512i ph[RB][MT], pl[RB][MT];
      for (int r = 0; r < RB; ++r)
        for (int m = 0; m < MT; ++m) ph[r][m] = pl[r][m] = _mm512_setzero_si512();
      if constexpr (MODE == kPerm) {  // 4- or 6-bit, activations in the perm128 order
        for (int64_t k = b0; k < b0 + B; k += 128) {
          for (int r = 0; r < RB; ++r) {
            const char* p = static_cast<const char*>(a.q) + ((n + r) * K + k) * BITS / 8;
            prefetch_l2(p, ahead_l2(RB * K * BITS / 8));
            if constexpr (BITS == 6) prefetch_l2(p + 64, ahead_l2(RB * K * BITS / 8));  // 96 bytes a step: 2 lines
            __m512i w[4];
            if constexpr (BITS == 6) load_codes128_perm6(a, n + r, k, w);
            else load_codes128_perm(a, n + r, k, w);
            for (int m = 0; m < MT; ++m) {
              const int16_t* h = xh + m * K + k;
              const int16_t* l = LO ? xl + m * K + k : nullptr;
              for (int j = 0; j < 4; ++j) {
                ph[r][m] = _mm512_dpwssd_epi32(ph[r][m], w[j], _mm512_loadu_si512(h + 32 * j));
                if constexpr (LO) pl[r][m] = _mm512_dpwssd_epi32(pl[r][m], w[j], _mm512_loadu_si512(l + 32 * j));
              }
            }
          }
        }
      } else for (int64_t k = b0; k < b0 + B; k += 64) {
        for (int r = 0; r < RB; ++r) {
          if (BITS != 4 || k % 128 == 0)  // one cache line ahead per line read
            prefetch_l2(static_cast<const char*>(a.q) + ((n + r) * K + k) * BITS / 8, ahead_l2(RB * K * BITS / 8));
          __m512i w[2];
          load_codes64<BITS>(a, n + r, k, w);
          for (int m = 0; m < MT; ++m) {
            const int16_t* h = xh + m * K + k;
            const int16_t* l = LO ? xl + m * K + k : nullptr;
            ph[r][m] = _mm512_dpwssd_epi32(ph[r][m], w[0], _mm512_loadu_si512(h));
            ph[r][m] = _mm512_dpwssd_epi32(ph[r][m], w[1], _mm512_loadu_si512(h + 32));
            if constexpr (LO) {
              pl[r][m] = _mm512_dpwssd_epi32(pl[r][m], w[0], _mm512_loadu_si512(l));
              pl[r][m] = _mm512_dpwssd_epi32(pl[r][m], w[1], _mm512_loadu_si512(l + 32));
            }
          }
        }
      }
      const int64_t bi = b0 / B;
      for (int r = 0; r < RB; ++r)
        for (int m = 0; m < MT; ++m) {
          __m512 p = _mm512_cvtepi32_ps(ph[r][m]);
          if constexpr (LO) p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pl[r][m]), lo_weight, p);
          acc[r][m] = _mm512_fmadd_ps(p, _mm512_set1_ps(s[r] * xsc[m * NB + bi]), acc[r][m]);
        }
    }
  }
  if constexpr (RB == 4 && MT == 1) {  // one token: the 4 rows' sums land side by side, reduced together
    const __m128 c = _mm_setr_ps(corr[0][0], corr[1][0], corr[2][0], corr[3][0]);
    _mm_storeu_ps(a.y + m0 * a.N + n, _mm_add_ps(reduce4(acc[0][0], acc[1][0], acc[2][0], acc[3][0]), c));
    return;
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + corr[r][m];
}

template <int BITS, int MODE>
struct Int16 {
  template <bool LO>
  struct Tile {
    template <int RB, int MT>
    static void run(const QuantArgs& a, int64_t n, int64_t m0) { int16_tile<BITS, MODE, LO, RB, MT>(a, n, m0); }
  };
};

// int16 activations as two terms (exact: xq_lo set) or one (int16 precision)
template <int BITS, int MODE>
void int16_rows(const QuantArgs& a, int64_t n0, int64_t n1) {
  tile_rows_lo<Int16<BITS, MODE>::template Tile>(a, n0, n1);
}

// Integer codes against fp32 activations, for M >= 2 (one widened weight feeds several tokens): per group, codes
// widened to fp32 16 at a time accumulate against x in p, then acc += s * p. 8-bit: groups of 16k columns; 4-bit:
// each 32-column block's low nibbles are its first 16 columns and its high nibbles the next 16 (q4_0 order).
template <int BITS, int RB, int MT>
inline void fma_tile(const QuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, g = a.group, G = K / g;
  constexpr int STEP = BITS == 8 ? 16 : 32;
  __m512 acc[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const float* x = a.x + m0 * K;
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t gi = 0; gi < G; ++gi) {
    __m512 p[RB][MT];
    for (int r = 0; r < RB; ++r)
      for (int m = 0; m < MT; ++m) p[r][m] = _mm512_setzero_ps();
    for (int64_t k = gi * g; k < (gi + 1) * g; k += STEP) {
      for (int r = 0; r < RB; ++r) {
        if constexpr (BITS == 8) {
          const int8_t* q = static_cast<const int8_t*>(a.q) + (n + r) * K + k;
          if (k % 64 == 0) prefetch_l2(q, ahead_l2(RB * K));
          const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
          for (int m = 0; m < MT; ++m) p[r][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), p[r][m]);
        } else if constexpr (BITS == 6) {
          const uint8_t* q = static_cast<const uint8_t*>(a.q) + ((n + r) * K + k) / 64 * 48;
          if (k % 64 == 0) prefetch_l2(q, ahead_l2(RB * K / 64 * 48));
          __m128i lo, hi;
          codes6_block32(q, int(k % 64 / 32), lo, hi);
          const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
          const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
          for (int m = 0; m < MT; ++m) {
            p[r][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), p[r][m]);
            p[r][m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k + 16), p[r][m]);
          }
        } else {
          const uint8_t* q = static_cast<const uint8_t*>(a.q) + ((n + r) * K + k) / 2;
          if (k % 128 == 0) prefetch_l2(q, ahead_l2(RB * K / 2));
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
          const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
          const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
          for (int m = 0; m < MT; ++m) {
            p[r][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), p[r][m]);
            p[r][m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k + 16), p[r][m]);
          }
        }
      }
    }
    for (int r = 0; r < RB; ++r) {
      const __m512 sv = _mm512_set1_ps(load_scale(a.scales, a.scale_f16, (n + r) * G + gi));
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_fmadd_ps(p[r][m], sv, acc[r][m]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m)
      a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + group_correction_avx2(a, n + r, m0 + m);
}

template <int BITS>
struct FmaTile {
  template <int RB, int MT>
  static void run(const QuantArgs& a, int64_t n, int64_t m0) { fma_tile<BITS, RB, MT>(a, n, m0); }
};

}  // namespace

void dense_rows_avx512(const DenseArgs& a, int64_t n0, int64_t n1) {
  switch (a.wtype) {
    case kF32: tile_rows<DenseTile<kF32>, 1>(a, n0, n1); break;
    case kBF16:
      if (a.xperm) tile_rows<Bf16PermTile, 1>(a, n0, n1);
      else tile_rows<DenseTile<kBF16>, 1>(a, n0, n1);
      break;
    default: tile_rows<DenseTile<kF16>, 1>(a, n0, n1); break;
  }
}

void quant_rows_avx512(const QuantArgs& a, int64_t n0, int64_t n1) {
  if (a.bits == 4 && a.xperm == kOrderPerm128 && a.xblock % 128 == 0) int16_rows<4, kPerm>(a, n0, n1);
  else if (a.bits == 4 && a.xperm == kOrderPerm128) int16_rows<4, kLanes>(a, n0, n1);
  else if (a.bits == 4 && a.xq) int16_rows<4, kPlain>(a, n0, n1);
  else if (a.bits == 4) tile_rows<FmaTile<4>>(a, n0, n1);
  else if (a.bits == 6 && a.xperm == kOrderPerm128) int16_rows<6, kPerm>(a, n0, n1);
  else if (a.bits == 6 && a.xq) int16_rows<6, kPlain>(a, n0, n1);
  else if (a.bits == 6) tile_rows<FmaTile<6>>(a, n0, n1);
  else if (a.xperm == kOrderLanes8) tile_rows<Int16<8, kLanes8>::Tile<false>>(a, n0, n1);  // one term (ops.cpp)
  else if (a.xq) int16_rows<8, kPlain>(a, n0, n1);
  else tile_rows<FmaTile<8>>(a, n0, n1);
}

}  // namespace glm4k
