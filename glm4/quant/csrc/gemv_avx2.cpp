// Weight-streaming kernels for small M (decode), AVX2 + FMA + F16C: any x86-64 CPU since Haswell / Zen 1.
// Only called after ops.cpp checked the CPU has these (the whole file is compiled for that target).
// Weights are read once per call and widened to fp32 in registers; activations and accumulation are fp32.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "codes6.h"
#include "gemv.h"
#include "tiles.h"
#include "vec_avx2.h"
#include "widen_avx2.h"

namespace glm4k {
namespace {

// Rows are short (a K = 1024 int8 row is 16 cache lines), so the hardware prefetcher, which ramps up per stream,
// falls behind at every new block of rows: each kernel prefetches the block after the current one, at the column
// it is reading (`ahead` bytes further in the row-major weight).
inline void prefetch(const void* p, int64_t ahead) { _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T0); }

constexpr int kBytes[3] = {4, 2, 2};  // per weight, by WeightType

// y[m, n..n+RB) for m in [0, MT): RB weight rows share each activation load, MT activation rows share each weight.
// A one-row, one-token tile keeps two accumulators (even / odd steps of 8 columns): with one, each FMA waits for the
// last (4 cycles on Zen 3), 8 B / cycle a thread for fp32 (one thread, in L2: 22.5 GB/s).
// fp32 rows of up to this many columns (the MoE experts' down projections) are read one a tile and prefetched at
// least 16 KiB ahead (dense_tile, dense_rows_avx2)
constexpr int64_t kShortF32Row = 512;

template <int WT, int RB, int MT>
inline void dense_tile(const DenseArgs& a, int64_t n, int64_t m0) {
  constexpr int U = RB * MT == 1 ? 2 : 1;  // accumulators per output
  const int64_t K = a.K;
  // two tiles ahead (Zen 3, the 400M model's fp32 linears from memory, three tries: 16.0 / 17.1 / 14.0 -> 17.0 /
  // 18.0 / 16.9 GB/s), and at least 16 KiB for fp32 rows of up to 512 columns (MoE experts' down projections,
  // K = 256), which had read 8 KiB ahead, 4 rows a tile (fp32, 8192 x 256 from memory, 2 threads, alternated:
  // 15.9-17.1 -> 23.8-25.0 GB/s with one row a tile and 16 KiB)
  const int64_t ahead = std::max<int64_t>(2 * RB * K * kBytes[WT], WT == kF32 && K <= kShortF32Row ? 16384 : 0);
  __m256 acc[RB][MT][U];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm256_setzero_ps();
  const float* x = a.x + m0 * K;
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) {
      const int64_t ku = k + 8 * u;
      __m256 xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(x + m * K + ku);
      for (int r = 0; r < RB; ++r) {
        if ((ku * kBytes[WT]) % 64 == 0)
          prefetch(static_cast<const char*>(a.w) + ((n + r) * K + ku) * kBytes[WT], ahead);
        __m256 wv = load8<WT>(a.w, (n + r) * K + ku);
        for (int m = 0; m < MT; ++m) acc[r][m][u] = _mm256_fmadd_ps(wv, xv[m], acc[r][m][u]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) {
      if constexpr (U == 2) acc[r][m][0] = _mm256_add_ps(acc[r][m][0], acc[r][m][1]);
      float s = hsum(acc[r][m][0]);
      for (int64_t kk = k; kk < K; ++kk) s += load1<WT>(a.w, (n + r) * K + kk) * x[m * K + kk];
      a.y[(m0 + m) * a.N + n + r] = s;
    }
}

// bf16 weights against x in the perm16_bf16 order (K a multiple of 16): a bf16 is the high half of its fp32, so a
// shift widens the even columns and a mask the odd ones (no cross-lane zero-extend and shift per 8 weights, both on
// Zen 3's two shuffle / shift pipes: LM head from memory, 2 threads, 13.3 -> 18.1 GB/s). One weight row against MT
// tokens: 2 MT sums and the two widened halves stay in AVX2's 16 registers (2 rows would need 16 sums alone), the
// activations are read by the FMAs.
template <int MT>
inline void bf16_perm_row(const DenseArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K;
  __m256 acc[MT][2];  // even / odd columns: two FMA chains, not one of two FMAs per 32 bytes (8 cycles on Zen 3)
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const float* x = a.x + m0 * K;
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
  const __m256i high = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += 16) {
    if (k % 32 == 0) prefetch(w + k, K * 4);  // the bytes in flight of fp32's two tiles ahead
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
    const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
    for (int m = 0; m < MT; ++m) {
      acc[m][0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
    }
  }
  for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

// More than 4 tokens: blocks of 8 weight rows, each block walked once per 4 tokens, so that those tokens' activations
// (16 KiB at K = 1024) stay in L1 over the block and the rows come back from L1 / L2; row by row, tokens 0-3 and 4-7
// evicted each other (the activations read from L2 at every row)
inline void bf16_perm_rows(const DenseArgs& a, int64_t n0, int64_t n1) {
  constexpr int64_t kBlock = 8;
  for (int64_t n = n0; n < n1; n += kBlock) {
    const int64_t nb = std::min(n1, n + kBlock);
    for (int64_t m0 = 0; m0 < a.M; m0 += 4)
      for (int64_t r = n; r < nb; ++r) switch (a.M - m0 >= 4 ? 4 : a.M - m0) {
          case 1: bf16_perm_row<1>(a, r, m0); break;
          case 2: bf16_perm_row<2>(a, r, m0); break;
          case 3: bf16_perm_row<3>(a, r, m0); break;
          default: bf16_perm_row<4>(a, r, m0); break;
        }
  }
}

template <int WT>
struct DenseTile {
  template <int RB, int MT>
  static void run(const DenseArgs& a, int64_t n, int64_t m0) {
    if (WT == kBF16 && a.xperm == kPermBf16x16)
      for (int r = 0; r < RB; ++r) bf16_perm_row<MT>(a, n + r, m0);
    else
      dense_tile<WT, RB, MT>(a, n, m0);
  }
};

inline float load_scale(const void* s, int f16, int64_t i) {
  return f16 ? _cvtsh_ss(static_cast<const uint16_t*>(s)[i]) : static_cast<const float*>(s)[i];
}

// 8 scales (or mins) of one row from group gi, as fp32
inline __m256 load_scales8(const void* s, int f16, int64_t i) {
  return f16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(s) + i)))
             : _mm256_loadu_ps(static_cast<const float*>(s) + i);
}

// (mins - zero_point * s) of weight row element i (group term's factor; the scale s already loaded)
inline float group_shift(const QuantArgs& a, int64_t i, float s) {
  return (a.mins ? load_scale(a.mins, a.scale_f16, i) : 0.f) - float(a.zero_point) * s;
}

// sum_g (mins[n, g] - zero_point * s[n, g]) * xsum[m, g] for one weight row n and activation row m
inline float group_correction(const QuantArgs& a, int64_t n, const float* xs) {
  const int64_t G = a.K / a.group;
  if (!a.mins && a.zero_point == 0) return 0.f;
  const __m256 zp = _mm256_set1_ps(float(a.zero_point));
  __m256 acc = _mm256_setzero_ps();
  int64_t gi = 0;
  for (; gi + 8 <= G; gi += 8) {
    const __m256 sv = load_scales8(a.scales, a.scale_f16, n * G + gi);
    const __m256 mv = a.mins ? load_scales8(a.mins, a.scale_f16, n * G + gi) : _mm256_setzero_ps();
    acc = _mm256_fmadd_ps(_mm256_fnmadd_ps(zp, sv, mv), _mm256_loadu_ps(xs + gi), acc);
  }
  float c = hsum(acc);
  for (; gi < G; ++gi) {
    c += group_shift(a, n * G + gi, load_scale(a.scales, a.scale_f16, n * G + gi)) * xs[gi];
  }
  return c;
}

// 8 codes of a weight row at column k as fp32: int8 codes, or 4-bit codes in the q4_0 nibble order
// (per 32-column block, byte j holds column j in its low nibble and column j + 16 in its high nibble).
template <int BITS>
inline void load_codes32(const QuantArgs& a, int64_t n, int64_t k, __m256 out[4]) {
  if constexpr (BITS == 8) {
    const int8_t* q = static_cast<const int8_t*>(a.q) + n * a.K + k;
    for (int j = 0; j < 4; ++j)
      out[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j))));
  } else {
    __m128i lo, hi;
    codes_block32<4>(a.q, n, a.K, k, lo, hi);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
}

template <int BITS>
inline __m256 load_codes8(const QuantArgs& a, int64_t n, int64_t k) {
  // 8-bit only (groups of 8 or 16 columns, e.g. q6_K)
  const int8_t* q = static_cast<const int8_t*>(a.q) + n * a.K + k;
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// y[m, n] = sum_g s[n,g] * sum_{k in g} q[n,k] x[m,k]  +  sum_g (mins[n,g] - zp * s[n,g]) * xsum[m,g]
// Per group: codes (as fp32) accumulate against x in p (registers), then acc += s * p.
template <int BITS, int RB, int MT>
inline void quant_tile(const QuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, g = a.group, G = K / g;
  __m256 acc[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  const float* x = a.x + m0 * K;
  const float* xs = a.xsum + m0 * G;
  const bool wide = g % 32 == 0;
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256 p[RB][MT];
    for (int r = 0; r < RB; ++r)
      for (int m = 0; m < MT; ++m) p[r][m] = _mm256_setzero_ps();
    const int64_t k0 = gi * g, k1 = k0 + g;
    if constexpr (BITS == 6) {  // groups of 64k columns: 32 columns a step, one block of codes6.h
      for (int64_t k = k0; k < k1; k += 32) {
        for (int r = 0; r < RB; ++r) {
          const uint8_t* q = static_cast<const uint8_t*>(a.q) + ((n + r) * K + k) / 64 * 48;
          if (k % 64 == 0) prefetch(q, RB * K / 64 * 48);
          __m128i lo, hi;
          codes6_block32(q, int(k % 64 / 32), lo, hi);
          for (int j = 0; j < 4; ++j) {
            const __m128i part = j < 2 ? lo : hi;
            const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(j % 2 ? _mm_srli_si128(part, 8) : part));
            for (int m = 0; m < MT; ++m) p[r][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k + 8 * j), p[r][m]);
          }
        }
      }
    } else if (wide) {
      for (int64_t k = k0; k < k1; k += 32) {
        for (int r = 0; r < RB; ++r) {
          if (BITS == 8 || k % 128 == 0) prefetch(static_cast<const char*>(a.q) + (n + r) * K * BITS / 8 + k * BITS / 8,
                                                  RB * K * BITS / 8);
          __m256 w[4];
          load_codes32<BITS>(a, n + r, k, w);
          for (int j = 0; j < 4; ++j)
            for (int m = 0; m < MT; ++m)
              p[r][m] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + m * K + k + 8 * j), p[r][m]);
        }
      }
    } else {
      for (int64_t k = k0; k < k1; k += 8)
        for (int r = 0; r < RB; ++r) {
          __m256 w = load_codes8<BITS>(a, n + r, k);
          for (int m = 0; m < MT; ++m) p[r][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k), p[r][m]);
        }
    }
    for (int r = 0; r < RB; ++r) {
      const __m256 sv = _mm256_set1_ps(load_scale(a.scales, a.scale_f16, (n + r) * G + gi));
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_fmadd_ps(p[r][m], sv, acc[r][m]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m)
      a.y[(m0 + m) * a.N + n + r] = hsum(acc[r][m]) + group_correction(a, n + r, xs + m * G);
}

// Integer activations, per block of xblock columns (ops.cpp ActPrep): _mm256_madd_epi16 / _mm256_maddubs_epi16
// multiply codes by activations and add pairs exactly, fewer instructions than widening each code to fp32.
//  - kHiLo (exact): x = xscale * (hi + lo / 65534), |hi|, |lo| <= 32767: two int16 terms carry ~31 bits, so the
//    result matches fp32 arithmetic. 32 columns a step; int32 sums < 64 * 32767 * 256 < 2^31 (blocks <= 256).
//  - kHi (4- and 8-bit, int16 precision): x = xscale * v, |v| <= 32639, one int16 term: half the multiplies; each
//    activation off by at most xscale / 2, i.e. 1 / 65278 of its block's largest. 8-bit codes (|q| <= 128) widen to
//    int16: a lane's sum over a block of 256 is at most 32 * 128 * 32639 < 2^28. Per 32 codes 2 widening loads,
//    2 vpmaddwd and 2 adds against 4 widenings, 4 conversions and 4 FMAs in fp32 (Zen 3, one thread, one row a
//    tile, 8 MiB of codes in L3: 5.9 -> 12.2-13.6 G codes/s).
//  - kInt8Pair (6-bit, int16 precision): the same v as two int8 terms, v = 256 a + b (|a| <= 127, -128 <= b <= 127),
//    64 columns a step (one 48-byte block of codes6.h unpacked in 256-bit registers), in the perm64 column order
//    (gemv.h); 63 * 32639 * 256 < 2^31. The same integer sums as kHi would give.
//  - kInt8One (6-bit, int8 precision): kInt8Pair's a terms alone, x = xscale * 256 a (|a| <= 127): half its
//    vpmaddubsw.
//  - kI8 (4-bit, int8 precision, llama.cpp's): x = xscale * v, |v| <= 127, columns in order. One 16-byte load
//    broadcast to both lanes, one 64-bit shift by 0 / 4 and a mask give 32 codes as bytes in column order, and one
//    vpmaddubsw multiplies them by 32 activations: per 32 codes 4 instructions against kHi's 7. Its int16 pair sums
//    (<= 2 * 15 * 127) add up over 128 columns (<= 15240) before one vpmaddwd widens them (Zen 3, int4 g128,
//    alternated with the session's starting kHi: one thread in L2 1.47-1.49x, two threads from memory 1.27x).
enum ActKind { kHiLo, kHi, kInt8Pair, kI8, kInt8One };

// The 4-bit kernels prefetch 4 tiles of rows ahead, not 1 (Zen 3, two threads from memory, alternated: kHi 1.03 ->
// 1.08-1.11x, kI8 1.09-1.16 -> 1.27x the session's starting kernel)
constexpr int64_t kAhead4 = 4;

// sum over columns [b0, b0 + B) of codes * integer activations, as fp32, for RB rows x MT tokens (kHiLo, kHi)
template <int BITS, int KIND, int RB, int MT>
inline void block_dot_i16(const QuantArgs& a, int64_t n, int64_t b0, const int16_t* xh, const int16_t* xl,
                          __m256 out[RB][MT]) {
  const int64_t K = a.K;
  const __m256i nibble16 = _mm256_set1_epi16(0x0F);
  __m256i ph[RB][MT], pl[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) ph[r][m] = pl[r][m] = _mm256_setzero_si256();
  // the 4-bit rows at b0, found once a block: per 32 codes and row, a signed (n K + k) / 2 cost ~4 scalar
  // instructions of a half core's issue slots (one thread in L2, int4 g128, medians of four runs: 11.9-13.7 ->
  // 12.6-16.0 G codes/s, with the block index below counted rather than divided)
  const uint8_t* q4[RB];
  for (int r = 0; r < RB; ++r) q4[r] = static_cast<const uint8_t*>(a.q) + (n + r) * (K / 2) + b0 / 2;
  for (int64_t k = b0; k < b0 + a.xblock; k += 32) {
    for (int r = 0; r < RB; ++r) {
      __m256i wlo, whi;  // columns k..k+15, k+16..k+31
      if constexpr (BITS == 6) {
        const uint8_t* q = static_cast<const uint8_t*>(a.q) + ((n + r) * K + k) / 64 * 48;
        if (k % 64 == 0) prefetch(q, RB * K / 64 * 48);
        __m128i lo, hi;
        codes6_block32(q, int(k % 64 / 32), lo, hi);
        wlo = _mm256_cvtepu8_epi16(lo), whi = _mm256_cvtepu8_epi16(hi);
      } else if constexpr (BITS == 8) {  // int8 codes widened to int16, 16 columns a register
        const int8_t* q = static_cast<const int8_t*>(a.q) + (n + r) * K + k;
        if (k % 64 == 0) prefetch(q, RB * K);
        wlo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        whi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
      } else {
        const uint8_t* q = q4[r] + uint64_t(k - b0) / 2;
        if (k % 128 == 0) prefetch(q, kAhead4 * RB * K / 2);
        // the 16 bytes widened once: each int16 holds one byte, its low nibble column k + j, its high k + 16 + j
        const __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        wlo = _mm256_and_si256(w16, nibble16), whi = _mm256_srli_epi16(w16, 4);
      }
      for (int m = 0; m < MT; ++m) {
        const __m256i* h = reinterpret_cast<const __m256i*>(xh + m * K + k);
        ph[r][m] = _mm256_add_epi32(ph[r][m], _mm256_madd_epi16(wlo, _mm256_loadu_si256(h)));
        ph[r][m] = _mm256_add_epi32(ph[r][m], _mm256_madd_epi16(whi, _mm256_loadu_si256(h + 1)));
        if constexpr (KIND == kHiLo) {
          const __m256i* l = reinterpret_cast<const __m256i*>(xl + m * K + k);
          pl[r][m] = _mm256_add_epi32(pl[r][m], _mm256_madd_epi16(wlo, _mm256_loadu_si256(l)));
          pl[r][m] = _mm256_add_epi32(pl[r][m], _mm256_madd_epi16(whi, _mm256_loadu_si256(l + 1)));
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) {
      out[r][m] = _mm256_cvtepi32_ps(ph[r][m]);
      if constexpr (KIND == kHiLo)
        out[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl[r][m]), _mm256_set1_ps(1.f / 65534.f), out[r][m]);
    }
}

// 64 columns' codes (codes6_unpack64's lo / hi) against their int8 terms xv (per 64 columns a's 64 bytes then b's, in
// the perm64 order), as 8 int32 sums: 256 (codes . a) + codes . b, or TWO false (kInt8One) 256 (codes . a). Each
// int16 sum of two vpmaddubsw is at most 2 * 2 * 63 * 128 < 32767: exact.
template <bool TWO>
inline __m256i bytes6_dot64(__m256i lo, __m256i hi, const __m256i* xv) {
  const __m256i sa = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xv)),
                                      _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xv + 1)));
  if constexpr (!TWO) return _mm256_madd_epi16(sa, _mm256_set1_epi16(256));
  const __m256i sb = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xv + 2)),
                                      _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xv + 3)));
  return _mm256_add_epi32(_mm256_madd_epi16(sa, _mm256_set1_epi16(256)), _mm256_madd_epi16(sb, _mm256_set1_epi16(1)));
}

// the same for 6-bit codes against two int8 terms (kInt8Pair): x8 holds, per 64 columns, a's 64 bytes then b's, each
// in the perm64 order, which is the order the 256-bit unpack yields the codes in; TWO false: a's terms only (kInt8One)
template <int RB, int MT, bool TWO>
inline void block_dot_bytes6(const QuantArgs& a, int64_t n, int64_t b0, const int8_t* x8, __m256 out[RB][MT]) {
  const int64_t K = a.K;
  __m256i p[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) p[r][m] = _mm256_setzero_si256();
  for (int64_t k = b0; k < b0 + a.xblock; k += 64) {
    for (int r = 0; r < RB; ++r) {
      const uint8_t* q = static_cast<const uint8_t*>(a.q) + ((n + r) * K + k) / 64 * 48;
      prefetch(q, RB * K / 64 * 48);
      __m256i lo, hi;
      codes6_unpack64(q, lo, hi);
      for (int m = 0; m < MT; ++m) {
        const __m256i* xv = reinterpret_cast<const __m256i*>(x8 + m * 2 * K + k * 2);
        p[r][m] = _mm256_add_epi32(p[r][m], bytes6_dot64<TWO>(lo, hi, xv));
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = _mm256_cvtepi32_ps(p[r][m]);
}

// the same for 4-bit codes against int8 activations (kI8), STEPS steps of 32 columns per int16 sum (4: blocks of
// 128k columns, 1 otherwise); compile-time steps keep the sums in registers
template <int RB, int MT, int STEPS>
inline void block_dot_i8(const QuantArgs& a, int64_t n, int64_t b0, const int8_t* x8, __m256 out[RB][MT]) {
  const int64_t K = a.K;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), shift = _mm256_setr_epi64x(0, 0, 4, 4);
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = _mm256_setzero_ps();
  const uint8_t* q4[RB];
  for (int r = 0; r < RB; ++r) q4[r] = static_cast<const uint8_t*>(a.q) + (n + r) * (K / 2) + b0 / 2;
  for (int64_t c0 = 0; c0 < a.xblock; c0 += 32 * STEPS) {
    __m256i p16[RB][MT];
    for (int r = 0; r < RB; ++r)
      for (int m = 0; m < MT; ++m) p16[r][m] = _mm256_setzero_si256();
    for (int st = 0; st < STEPS; ++st) {
      const int64_t c = c0 + 32 * st;
      __m256i xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x8 + m * K + b0 + c));
      for (int r = 0; r < RB; ++r) {
        const uint8_t* q = q4[r] + c / 2;
        if (c % 128 == 0) prefetch(q, kAhead4 * RB * K / 2);
        // lane 0: the low nibbles (columns c..c+15), lane 1: the high ones (c+16..c+31)
        const __m256i u = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        const __m256i w = _mm256_and_si256(_mm256_srlv_epi64(u, shift), low4);
        for (int m = 0; m < MT; ++m) p16[r][m] = _mm256_add_epi16(p16[r][m], _mm256_maddubs_epi16(w, xv[m]));
      }
    }
    for (int r = 0; r < RB; ++r)  // exact in fp32: a block's sum stays below 256 * 15 * 127 < 2^24
      for (int m = 0; m < MT; ++m)
        out[r][m] = _mm256_add_ps(out[r][m], _mm256_cvtepi32_ps(_mm256_madd_epi16(p16[r][m], ones)));
  }
}

// 8 groups from gi of rows n.. n + RB - 1, one token (activation scales xscale, group sums xsum, each [G] from gi's
// row): ss[r] = s[n + r, gi + j] * xscale[gi + j] in lane j, and acc[r] += (mins - zero_point * s) * xsum (the group
// terms) where the codes are shifted
template <int RB>
inline void scales8(const QuantArgs& a, int64_t n, int64_t G, int64_t gi, const float* xscale, const float* xsum,
                    __m256 ss[RB], __m256 acc[RB]) {
  const __m256 xsc = _mm256_loadu_ps(xscale + gi), zp = _mm256_set1_ps(float(a.zero_point));
  for (int r = 0; r < RB; ++r) {
    const __m256 sv = load_scales8(a.scales, a.scale_f16, (n + r) * G + gi);
    ss[r] = _mm256_mul_ps(sv, xsc);
    if (a.mins || a.zero_point) {
      const __m256 mn = a.mins ? load_scales8(a.mins, a.scale_f16, (n + r) * G + gi) : _mm256_setzero_ps();
      acc[r] = _mm256_fmadd_ps(_mm256_fnmadd_ps(zp, sv, mn), _mm256_loadu_ps(xsum + gi), acc[r]);
    }
  }
}

// One group of 32 STEPS columns of RB rows of 4-bit codes against int8 activations (kI8): its integer sums as fp32
// (exact: below 128 * 15 * 127 < 2^24), the row pointers and x moved past it; pair sums <= 4 * 2 * 15 * 127: int16
template <int RB, int STEPS>
inline void q4_i8_group(const uint8_t* (&q)[RB], const int8_t*& x, int64_t ahead, bool fetch, __m256 out[RB]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), shift = _mm256_setr_epi64x(0, 0, 4, 4);
  __m256i p16[RB];
  for (int r = 0; r < RB; ++r) p16[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
  for (int st = 0; st < STEPS; ++st) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * st));
    for (int r = 0; r < RB; ++r) {  // lane 0: the low nibbles (columns 0..15 of the step), lane 1: the high ones
      const __m256i u = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + 16 * st)));
      p16[r] = _mm256_add_epi16(p16[r], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srlv_epi64(u, shift), low4), xv));
    }
  }
  for (int r = 0; r < RB; ++r) {
    if (fetch) prefetch(q[r], ahead);
    out[r] = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16[r], ones));
    q[r] += 16 * STEPS;
  }
  x += 32 * STEPS;
}

// One token, 4-bit codes against int8 activations (kI8), groups of 32 STEPS columns (128: glm4's int4 g128; 32: GGUF
// q4_0 and kin), each group one activation block: RB rows walked by a pointer each, per 8 groups one vector of scales
// times activation scales per row (and one FMA of the group terms), each group's sums weighed by its lane. The
// general tile (q_tile_int through block_dot_i8) made GCC spill its sums and reload its row pointers in the inner
// loop (Zen 3, one thread, int4 g128 in L2: 3.2 -> 2.6-2.7 cycles per 32 codes and row; two threads from memory
// 1.15-1.2x; g32 1.45x).
template <int RB, int STEPS>
inline void q4_i8_token_tile(const QuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, G = K / (32 * STEPS), ahead = kAhead4 * RB * K / 2;
  const uint8_t* q[RB];
  for (int r = 0; r < RB; ++r) q[r] = static_cast<const uint8_t*>(a.q) + (n + r) * (K / 2);
  const int8_t* x = a.xi8 + m0 * K;
  const float* xscale = a.xscale + m0 * G;
  const float* xsum = a.xsum + m0 * G;
  __m256 acc[RB];  // the group terms go in too: every lane ends in the one sum
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
  int64_t gi = 0;
  for (; gi + 8 <= G; gi += 8) {
    __m256 ss[RB];
    scales8<RB>(a, n, G, gi, xscale, xsum, ss, acc);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m256 v[RB];
      q4_i8_group<RB, STEPS>(q, x, ahead, STEPS == 4 || j % 4 == 0, v);
      const __m256i lane = _mm256_set1_epi32(j);
      for (int r = 0; r < RB; ++r) acc[r] = _mm256_fmadd_ps(v[r], _mm256_permutevar8x32_ps(ss[r], lane), acc[r]);
    }
  }
  float tail[RB] = {};  // the last G % 8 groups' terms, one group at a time
  for (; gi < G; ++gi) {
    __m256 v[RB];
    q4_i8_group<RB, STEPS>(q, x, ahead, STEPS == 4 || gi % 4 == 0, v);
    for (int r = 0; r < RB; ++r) {
      const float sc = load_scale(a.scales, a.scale_f16, (n + r) * G + gi);
      acc[r] = _mm256_fmadd_ps(v[r], _mm256_set1_ps(sc * xscale[gi]), acc[r]);
      if (a.mins || a.zero_point) tail[r] += group_shift(a, (n + r) * G + gi, sc) * xsum[gi];
    }
  }
  for (int r = 0; r < RB; ++r) a.y[m0 * a.N + n + r] = hsum(acc[r]) + tail[r];
}

// One group of 64 STEPS columns of RB rows of 6-bit codes against int8 terms (kInt8Pair, TWO; kInt8One): its integer
// sums as fp32, the row pointers and x moved past it. The same sums, in the same order, as block_dot_bytes6.
template <int RB, int STEPS, bool TWO>
inline void q6_bytes_group(const uint8_t* (&q)[RB], const int8_t*& x, int64_t ahead, __m256 out[RB]) {
  __m256i p[RB];
  for (int r = 0; r < RB; ++r) p[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
  for (int st = 0; st < STEPS; ++st)
    for (int r = 0; r < RB; ++r) {
      const uint8_t* qr = q[r] + 48 * st;
      prefetch(qr, ahead);
      __m256i lo, hi;
      codes6_unpack64(qr, lo, hi);
      p[r] = _mm256_add_epi32(p[r], bytes6_dot64<TWO>(lo, hi, reinterpret_cast<const __m256i*>(x + 128 * st)));
    }
  for (int r = 0; r < RB; ++r) {
    out[r] = _mm256_cvtepi32_ps(p[r]);
    q[r] += 48 * STEPS;
  }
  x += 128 * STEPS;
}

// One token, 6-bit codes against int8 terms, groups of 64 STEPS columns, each one activation block, in eights: as
// q4_i8_token_tile, RB rows walked by a pointer each, prefetched kAhead6 rows ahead. Run one row a tile: from memory
// the fewer streams a thread read faster (Zen 3, two threads, the 400M's LM head, alternated: q_tile_int8g's 4 rows
// 17.1-23.2 GB/s, one row here 21.6-25.0; the same speed in L3), and the general tile recomputed each row's address
// per 64 columns with a signed division and kept its sums on the stack.
constexpr int64_t kAhead6 = 4;

// whether a token's 6-bit rows take q6_bytes_token_tile: groups of 64 / 128 / 256 columns in eights, each group
// one activation block
inline bool q6_eights(const QuantArgs& a) {
  return a.xblock == a.group && (a.group == 64 || a.group == 128 || a.group == 256) && (a.K / a.group) % 8 == 0;
}

// whether one token's 6-bit rows run one row a tile (q6_bytes_token_tile). Shorter rows keep the general tile's 4
// (an MoE expert's K = 256 down projection, 2 groups; two threads from memory, alternated: 4 rows 14.9-15.8 GB/s,
// this tile's one row 11.7-11.9, 4 rows 13.6-14.9)
inline bool q6_token_rows(const QuantArgs& a) { return a.M == 1 && q6_eights(a); }

template <int RB, int STEPS, bool TWO>
inline void q6_bytes_token_tile(const QuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, G = K / (64 * STEPS), ahead = kAhead6 * K / 64 * 48;
  const uint8_t* q[RB];
  for (int r = 0; r < RB; ++r) q[r] = static_cast<const uint8_t*>(a.q) + (n + r) * K / 64 * 48;
  const int8_t* x = a.xq8 + m0 * 2 * K;
  __m256 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g8 = 0; g8 < G; g8 += 8) {
    __m256 ss[RB];
    scales8<RB>(a, n, G, g8, a.xscale + m0 * G, a.xsum + m0 * G, ss, acc);
    for (int j = 0; j < 8; ++j) {
      __m256 v[RB];
      q6_bytes_group<RB, STEPS, TWO>(q, x, ahead, v);
      const __m256i lane = _mm256_set1_epi32(j);
      for (int r = 0; r < RB; ++r) acc[r] = _mm256_fmadd_ps(v[r], _mm256_permutevar8x32_ps(ss[r], lane), acc[r]);
    }
  }
  for (int r = 0; r < RB; ++r) a.y[m0 * a.N + n + r] = hsum(acc[r]);
}

template <int BITS, int KIND, int RB, int MT>
inline void block_dot(const QuantArgs& a, int64_t n, int64_t b0, int64_t m0, __m256 p[RB][MT]) {
  const int64_t K = a.K;
  if constexpr (KIND == kInt8Pair || KIND == kInt8One) block_dot_bytes6<RB, MT, KIND == kInt8Pair>(a, n, b0, a.xq8 + m0 * 2 * K, p);
  else if constexpr (KIND == kI8) {
    if (a.xblock % 128 == 0) block_dot_i8<RB, MT, 4>(a, n, b0, a.xi8 + m0 * K, p);
    else block_dot_i8<RB, MT, 1>(a, n, b0, a.xi8 + m0 * K, p);
  } else {
    block_dot_i16<BITS, KIND, RB, MT>(a, n, b0, a.xq + m0 * K, KIND == kHiLo ? a.xq_lo + m0 * K : nullptr, p);
  }
}

// q_tile_int for one token where each group is one activation block and the groups come in eights (int4 g128,
// GGUF q4_0 and kin): per 8 groups one vector load of each row's scales (and mins), one product with the 8
// activation scales and one FMA of the group terms, instead of per group a scalar scale load, conversion and
// product and a scalar group term (per 128 codes these were as many instructions as the dot product itself)
template <int BITS, int KIND, int RB>
inline void q_tile_int8g(const QuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, g = a.group, G = K / g;
  __m256 acc[RB];  // the group terms go in too: every lane ends in the one sum
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g8 = 0; g8 < G; g8 += 8) {
    __m256 ss[RB];
    scales8<RB>(a, n, G, g8, a.xscale + m0 * G, a.xsum + m0 * G, ss, acc);
    for (int j = 0; j < 8; ++j) {
      __m256 p[RB][1];
      block_dot<BITS, KIND, RB, 1>(a, n, (g8 + j) * g, m0, p);
      const __m256i lane = _mm256_set1_epi32(j);
      for (int r = 0; r < RB; ++r) acc[r] = _mm256_fmadd_ps(p[r][0], _mm256_permutevar8x32_ps(ss[r], lane), acc[r]);
    }
  }
  for (int r = 0; r < RB; ++r) a.y[m0 * a.N + n + r] = hsum(acc[r]);
}

// y[m, n] = sum_blocks s[n, g] * xscale[m, block] * (block's integer sum)  +  sum_g (mins - zp * s) * xsum[m, g]
template <int BITS, int KIND, int RB, int MT>
inline void q_tile_int(const QuantArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, g = a.group, G = K / g, B = a.xblock, NB = K / B;
  if constexpr (MT == 1 && KIND == kI8)
    if (B == g && (g == 128 || g == 32))
      return g == 128 ? q4_i8_token_tile<RB, 4>(a, n, m0) : q4_i8_token_tile<RB, 1>(a, n, m0);
  if constexpr (MT == 1 && (KIND == kInt8Pair || KIND == kInt8One))
    if (q6_eights(a)) {
      constexpr bool two = KIND == kInt8Pair;
      return g == 64 ? q6_bytes_token_tile<RB, 1, two>(a, n, m0)
             : g == 128 ? q6_bytes_token_tile<RB, 2, two>(a, n, m0) : q6_bytes_token_tile<RB, 4, two>(a, n, m0);
    }
  if constexpr (MT == 1)
    if (B == g && G % 8 == 0) return q_tile_int8g<BITS, KIND, RB>(a, n, m0);
  __m256 acc[RB][MT];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  const float* xsc = a.xscale + m0 * NB;
  const float* xs = a.xsum + m0 * G;
  const bool shifted = a.mins || a.zero_point;
  float corr[RB][MT] = {};  // sum_g (mins - zero_point * s) * xsum, the group terms, here rather than a pass per row
  for (int64_t gi = 0; gi < G; ++gi) {
    float s[RB];
    for (int r = 0; r < RB; ++r) s[r] = load_scale(a.scales, a.scale_f16, (n + r) * G + gi);
    if (shifted)
      for (int r = 0; r < RB; ++r) {
        const float c = group_shift(a, (n + r) * G + gi, s[r]);
        for (int m = 0; m < MT; ++m) corr[r][m] += c * xs[m * G + gi];
      }
    for (int64_t b0 = gi * g, bi = gi * (g / B); b0 < (gi + 1) * g; b0 += B, ++bi) {  // bi: the block b0 / B
      __m256 p[RB][MT];
      block_dot<BITS, KIND, RB, MT>(a, n, b0, m0, p);
      for (int r = 0; r < RB; ++r)
        for (int m = 0; m < MT; ++m)
          acc[r][m] = _mm256_fmadd_ps(p[r][m], _mm256_set1_ps(s[r] * xsc[m * NB + bi]), acc[r][m]);
    }
  }
  if constexpr (RB == 4 && MT == 1) {  // one token: the 4 rows' sums land side by side, reduced together
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][0], acc[1][0]), _mm256_hadd_ps(acc[2][0], acc[3][0]));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    _mm_storeu_ps(a.y + m0 * a.N + n, _mm_add_ps(sums, _mm_setr_ps(corr[0][0], corr[1][0], corr[2][0], corr[3][0])));
    return;
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n + r] = hsum(acc[r][m]) + corr[r][m];
}

template <int BITS>
struct QuantTile {
  template <int RB, int MT>
  static void run(const QuantArgs& a, int64_t n, int64_t m0) { quant_tile<BITS, RB, MT>(a, n, m0); }
};

template <int BITS, int KIND>
struct IntTile {
  template <int RB, int MT>
  static void run(const QuantArgs& a, int64_t n, int64_t m0) { q_tile_int<BITS, KIND, RB, MT>(a, n, m0); }
};

}  // namespace

void dense_rows_avx2(const DenseArgs& a, int64_t n0, int64_t n1) {
  switch (a.wtype) {
    // fp32: 4 rows a tile (each activation load feeds 4 rows), 1 for the 2-byte types (their widening is the work)
    // (Zen 3 reading 36 GB/s, 2 threads, the 400M model's fp32 linears from memory, two tries: 27.8 / 29.5 -> 31.2 /
    // 33.6 GB/s; bf16 at 4 rows 29.7 / 30.2 -> 25.9 / 27.9)
    case kF32:  // short rows one a tile (one stream a thread: see dense_tile)
      if (a.K <= kShortF32Row) tile_rows<DenseTile<kF32>, 1>(a, n0, n1);
      else tile_rows<DenseTile<kF32>, 4>(a, n0, n1);
      break;
    case kBF16:
      if (a.xperm == kPermBf16x16 && a.M > 4) bf16_perm_rows(a, n0, n1);
      else tile_rows<DenseTile<kBF16>, 1>(a, n0, n1);
      break;
    default: tile_rows<DenseTile<kF16>, 1>(a, n0, n1); break;
  }
}

float group_correction_avx2(const QuantArgs& a, int64_t n, int64_t m) {
  return group_correction(a, n, a.xsum + m * (a.K / a.group));
}

// One token: 4 rows a tile (each activation load, or its int16 terms, feeds 4 rows: the 4-bit kernels are
// compute-bound on Zen 3), but 1 for 8-bit codes against int16 activations, which outrun the memory there and read
// it faster as one stream a thread (Zen 3, the 400M model's int8 linears from memory: 10.6 -> 13.5-15.9 GB/s), and 1
// for 6-bit codes against int8 terms in eights of groups (q6_token_rows)
void quant_rows_avx2(const QuantArgs& a, int64_t n0, int64_t n1) {
  if (a.bits == 4 && a.xi8) tile_rows<IntTile<4, kI8>, 2>(a, n0, n1);  // 2 rows a tile (4: 0.56x, harness at -O2)
  else if (a.bits == 4 && a.xq && a.xq_lo) tile_rows<IntTile<4, kHiLo>>(a, n0, n1);
  else if (a.bits == 4 && a.xq) tile_rows<IntTile<4, kHi>>(a, n0, n1);
  else if (a.bits == 4) tile_rows<QuantTile<4>>(a, n0, n1);
  else if (a.bits == 6 && a.xq8 && q6_token_rows(a)) {
    if (a.xq8_terms == 1) tile_rows<IntTile<6, kInt8One>, 1>(a, n0, n1);
    else tile_rows<IntTile<6, kInt8Pair>, 1>(a, n0, n1);
  } else if (a.bits == 6 && a.xq8 && a.xq8_terms == 1) tile_rows<IntTile<6, kInt8One>>(a, n0, n1);
  else if (a.bits == 6 && a.xq8) tile_rows<IntTile<6, kInt8Pair>>(a, n0, n1);
  else if (a.bits == 6 && a.xq) tile_rows<IntTile<6, kHiLo>>(a, n0, n1);
  else if (a.bits == 6) tile_rows<QuantTile<6>>(a, n0, n1);
  else if (a.xq) tile_rows<IntTile<8, kHi>, 1>(a, n0, n1);
  else tile_rows<QuantTile<8>>(a, n0, n1);
}

}  // namespace glm4k
