// Prefill GEMM (large M), AVX2: 4- / 6-bit codes against int8 activations, llama.cpp's precision for its quantized
// prefill. y [M, N] = x̂ [M, K] @ W^T where x̂ = xscale * xi8 per block of xblock columns and W as in QuantArgs.
//
// Why not the streaming kernels: they read each weight row along K against a few tokens (dot-product layout), so a
// block's integer sum is a horizontal one per (row, token). Here 16 rows are repacked once per chunk of columns into
// a panel where each 32-byte register holds 4 consecutive codes of 8 rows; one broadcast of a token's 4 activations
// and one vpmaddubsw give all 8 rows' products, the sums land one row a lane, and a block's scale is one vector of
// the rows' scales times the token's. Per 4 columns, 8 rows and 2 tokens: 2 loads of codes, 2 broadcasts and 4
// vpmaddubsw; the int16 sums add up over 32 columns (4-bit) before one vpmaddwd widens them.
//
// Measured on a Zen 3 (2 threads, 512 x 1024 x 6144, int4 g128): 237-272 G int-ops/s against 157 GFLOPS of oneDNN's
// fp32 GEMM on the same shape; vpmaddwd-based int16 activations reached 132-178, no better than fp32 there.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "codes6.h"
#include "gemv.h"

namespace glm4k {
namespace {

constexpr int kPanelRows = 16;     // two registers of 8 rows
constexpr int64_t kChunkCols = 1024;  // columns repacked at a time: a 16 KB panel, with the tokens' 2 x 1 KB, in L1

// rows n0 .. n0 + 15 (those below `rows` real, the rest zero codes), columns k0 .. k0 + kc, into wp: for each 4
// columns c, register v (rows 8 v .. 8 v + 7) is 32 bytes at wp + (c / 4 * 2 + v) * 32, row r's 4 codes at 4 r.
// Per 32 columns and 8 rows: 8 rows of 32 bytes (8 dwords of 4 codes) transposed as an 8 x 8 dword matrix.
template <int BITS>
void repack_panel(const QuantArgs& a, int64_t n0, int rows, int64_t k0, int64_t kc, uint8_t* wp) {
  for (int v = 0; v < 2; ++v)
    for (int64_t k = k0; k < k0 + kc; k += 32) {
      __m256i R[8];
      for (int r = 0; r < 8; ++r) {
        if (8 * v + r >= rows) {
          R[r] = _mm256_setzero_si256();
          continue;
        }
        __m128i lo, hi;
        codes_block32<BITS>(a.q, n0 + 8 * v + r, a.K, k, lo, hi);
        R[r] = _mm256_set_m128i(hi, lo);  // dword d: columns 4 d .. 4 d + 3
      }
      __m256i t[8], u[8];
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_epi32(R[2 * i], R[2 * i + 1]);      // d0 d0' d1 d1' | d4 d4' d5 d5'
        t[2 * i + 1] = _mm256_unpackhi_epi32(R[2 * i], R[2 * i + 1]);  // d2 d2' d3 d3' | d6 d6' d7 d7'
      }
      for (int h = 0; h < 2; ++h) {  // rows 4 h .. 4 h + 3
        u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);      // d0 | d4
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);      // d1 | d5
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);  // d2 | d6
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);  // d3 | d7
      }
      uint8_t* out = wp + ((k - k0) / 4 * 2 + v) * 32;
      for (int d = 0; d < 4; ++d) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d * 64), _mm256_permute2x128_si256(u[d], u[4 + d], 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (d + 4) * 64), _mm256_permute2x128_si256(u[d], u[4 + d], 0x31));
      }
    }
}

inline float scale_at(const void* s, int f16, int64_t i) {
  return f16 ? _cvtsh_ss(static_cast<const uint16_t*>(s)[i]) : static_cast<const float*>(s)[i];
}

// MT tokens from m0 against the panel's columns k0 .. k0 + kc, added into ybuf [M, 16]. S16: steps of 4 columns whose
// vpmaddubsw pair sums add up in int16 (4-bit: 8 steps, 8 * 2 * 15 * 127 < 32767; 6-bit: 2, 2 * 2 * 63 * 127).
// ws [blocks of the chunk, 16]: the rows' scales of each block's group; wc [G, 16]: mins - zero_point * scales.
template <int MT, int S16>
void panel_tokens(const QuantArgs& a, const uint8_t* wp, int64_t k0, int64_t kc, const float* ws, const float* wc,
                  bool shifted, float* ybuf, int64_t m0) {
  const int64_t K = a.K, B = a.xblock, NB = K / B, G = K / a.group;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[2][MT];
  for (int v = 0; v < 2; ++v)
    for (int m = 0; m < MT; ++m) acc[v][m] = _mm256_loadu_ps(ybuf + (m0 + m) * kPanelRows + 8 * v);
  const uint8_t* w = wp;
  for (int64_t b0 = k0; b0 < k0 + kc; b0 += B) {
    const int64_t bi = b0 / B;
    __m256i p[2][MT];
    for (int v = 0; v < 2; ++v)
      for (int m = 0; m < MT; ++m) p[v][m] = _mm256_setzero_si256();
    for (int64_t k = b0; k < b0 + B; k += 4 * S16) {
      __m256i p16[2][MT];
      for (int v = 0; v < 2; ++v)
        for (int m = 0; m < MT; ++m) p16[v][m] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int s = 0; s < S16; ++s, w += 64) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
        for (int m = 0; m < MT; ++m) {
          int32_t x4;
          __builtin_memcpy(&x4, a.xi8 + (m0 + m) * K + k + 4 * s, 4);
          const __m256i xb = _mm256_set1_epi32(x4);
          p16[0][m] = _mm256_add_epi16(p16[0][m], _mm256_maddubs_epi16(w0, xb));
          p16[1][m] = _mm256_add_epi16(p16[1][m], _mm256_maddubs_epi16(w1, xb));
        }
      }
      for (int v = 0; v < 2; ++v)
        for (int m = 0; m < MT; ++m) p[v][m] = _mm256_add_epi32(p[v][m], _mm256_madd_epi16(p16[v][m], ones));
    }
    const bool group_start = b0 % a.group == 0;
    const int64_t gi = b0 / a.group;
    for (int v = 0; v < 2; ++v) {
      const __m256 sv = _mm256_loadu_ps(ws + (b0 - k0) / B * kPanelRows + 8 * v);
      for (int m = 0; m < MT; ++m) {
        // exact in fp32: a block's sum is below 256 * 63 * 127 < 2^24
        acc[v][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[v][m]),
                                    _mm256_mul_ps(sv, _mm256_set1_ps(a.xscale[(m0 + m) * NB + bi])), acc[v][m]);
        if (shifted && group_start)
          acc[v][m] = _mm256_fmadd_ps(_mm256_loadu_ps(wc + gi * kPanelRows + 8 * v),
                                      _mm256_set1_ps(a.xsum[(m0 + m) * G + gi]), acc[v][m]);
      }
    }
  }
  for (int v = 0; v < 2; ++v)
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(ybuf + (m0 + m) * kPanelRows + 8 * v, acc[v][m]);
}

template <int BITS>
void gemm_i8_rows(const QuantArgs& a, int64_t n0, int64_t n1) {
  constexpr int S16 = BITS == 4 ? 8 : 2;
  const int64_t K = a.K, B = a.xblock, G = K / a.group, M = a.M;
  const int64_t chunk = std::max<int64_t>(B, kChunkCols / B * B);
  std::vector<uint8_t> wp(chunk * kPanelRows);
  std::vector<float> ws(chunk / B * kPanelRows), wc(G * kPanelRows), ybuf(M * kPanelRows);
  const bool shifted = a.mins || a.zero_point;
  for (int64_t n = n0; n < n1; n += kPanelRows) {
    const int rows = int(std::min<int64_t>(kPanelRows, n1 - n));
    std::fill(ybuf.begin(), ybuf.end(), 0.f);
    if (shifted)
      for (int64_t gi = 0; gi < G; ++gi)
        for (int r = 0; r < kPanelRows; ++r)
          wc[gi * kPanelRows + r] = r < rows ? (a.mins ? scale_at(a.mins, a.scale_f16, (n + r) * G + gi) : 0.f) -
                                                   float(a.zero_point) * scale_at(a.scales, a.scale_f16, (n + r) * G + gi)
                                             : 0.f;
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
      const int64_t kc = std::min(chunk, K - k0);
      repack_panel<BITS>(a, n, rows, k0, kc, wp.data());
      for (int64_t b0 = k0; b0 < k0 + kc; b0 += B)
        for (int r = 0; r < kPanelRows; ++r)
          ws[(b0 - k0) / B * kPanelRows + r] = r < rows ? scale_at(a.scales, a.scale_f16, (n + r) * G + b0 / a.group) : 0.f;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) panel_tokens<2, S16>(a, wp.data(), k0, kc, ws.data(), wc.data(), shifted, ybuf.data(), m);
      if (m < M) panel_tokens<1, S16>(a, wp.data(), k0, kc, ws.data(), wc.data(), shifted, ybuf.data(), m);
    }
    for (int64_t m = 0; m < M; ++m)
      std::copy(ybuf.data() + m * kPanelRows, ybuf.data() + m * kPanelRows + rows, a.y + m * a.N + n);
  }
}

}  // namespace

void gemm_i8_rows_avx2(const QuantArgs& a, int64_t n0, int64_t n1) {
  if (a.bits == 4) gemm_i8_rows<4>(a, n0, n1);
  else gemm_i8_rows<6>(a, n0, n1);
}

}  // namespace glm4k
