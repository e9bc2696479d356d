// Prefill GEMM (large M), AVX2 + FMA: y [M, N] = x [M, K] @ W^T (+ bias) in fp32, W stored as fp32, bf16 or fp16.
//
// Why not torch's: on an AVX2-only AMD CPU torch's fp32 GEMM is MKL's generic AVX2 path, and a bf16 / fp16 weight
// had to be widened into an fp32 copy first (a pass writing twice the weight's bytes). Here the weight is widened
// while it is packed, a block at a time, into the panel layout the microkernel reads, so each weight byte is read
// once per call and the widened copy never leaves L2.
//
// Layout (the usual blocked GEMM): the activations are packed once per call into panels of 6 rows (zero rows past M),
// each K block of a panel kc x 6 (k-major); a thread packs 16 weight rows at a time into a kc x 16 panel, 8 panels
// a block; the 6 x 16 microkernel keeps its 12 sums in registers over kc steps of 2 loads, 6 broadcasts, 12 FMAs.
// Sums are taken in the same order whatever the thread count (threads take groups of 128 columns in turn): within
// a K block k ascending, the blocks added in order, the bias last.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "gemv.h"
#include "widen_avx2.h"

namespace glm4k {
namespace {

constexpr int kRows = 6;     // activation rows a microkernel (kRows x 16 sums: 12 registers)
constexpr int kCols = 16;    // weight rows (output columns) a panel: two registers
constexpr int kPanels = 8;   // weight panels packed per K block: 8 x 384 x 16 x 4 bytes = 192 KB, in L2
constexpr int64_t kGroupCols = kCols * kPanels;  // output columns a thread takes at a time
constexpr int64_t kBlockRows = 96;  // activation rows walked against one weight panel: 96 x 384 x 4 = 144 KB, in L2

#define GLM4_ROW(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
#define GLM4_FMA(r)                                                \
  {                                                                \
    const __m256 av = _mm256_broadcast_ss(a + kRows * k + r);      \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);                    \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);                    \
  }
#define GLM4_OUT(r)                                                                   \
  {                                                                                   \
    float* cr = c + r * ldc;                                                          \
    if (add) {                                                                        \
      c##r##0 = _mm256_add_ps(_mm256_loadu_ps(cr), c##r##0);                          \
      c##r##1 = _mm256_add_ps(_mm256_loadu_ps(cr + 8), c##r##1);                      \
    }                                                                                 \
    if (bias) {                                                                       \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(bias));                        \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(bias + 8));                    \
    }                                                                                 \
    _mm256_storeu_ps(cr, c##r##0);                                                    \
    _mm256_storeu_ps(cr + 8, c##r##1);                                                \
  }

// c [6, 16] (row stride ldc) = (add ? c : 0) + a [kc, 6] . b [kc, 16] (+ bias [16]). Named sums, not an array:
// GCC kept an array of them in memory, stored every step (half the speed).
void micro_6x16(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc, bool add,
                const float* bias) {
  GLM4_ROW(0) GLM4_ROW(1) GLM4_ROW(2) GLM4_ROW(3) GLM4_ROW(4) GLM4_ROW(5)
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kCols), b1 = _mm256_load_ps(b + k * kCols + 8);
    GLM4_FMA(0) GLM4_FMA(1) GLM4_FMA(2) GLM4_FMA(3) GLM4_FMA(4) GLM4_FMA(5)
  }
  GLM4_OUT(0) GLM4_OUT(1) GLM4_OUT(2) GLM4_OUT(3) GLM4_OUT(4) GLM4_OUT(5)
}
#undef GLM4_ROW
#undef GLM4_FMA
#undef GLM4_OUT

// 8 x 8 fp32 transpose in registers
void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

// rows n0 .. n0 + rows - 1 (rows <= 16; zero beyond) of w [., K] (WT), columns k0 .. k0 + kc, widened into
// bp [kc, 16]
template <int WT>
void pack_rows(const void* w, int64_t K, int64_t n0, int rows, int64_t k0, int64_t kc, float* bp) {
  int64_t k = 0;
  if (rows == kCols)
    for (; k + 8 <= kc; k += 8)
      for (int h = 0; h < 2; ++h) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load8<WT>(w, (n0 + 8 * h + i) * K + k0 + k);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_store_ps(bp + (k + i) * kCols + 8 * h, r[i]);
      }
  for (; k < kc; ++k)
    for (int j = 0; j < kCols; ++j) bp[k * kCols + j] = j < rows ? load1<WT>(w, (n0 + j) * K + k0 + k) : 0.f;
}

void pack_weight(const void* w, int wtype, int64_t K, int64_t n0, int rows, int64_t k0, int64_t kc, float* bp) {
  if (wtype == kBF16) pack_rows<kBF16>(w, K, n0, rows, k0, kc, bp);
  else if (wtype == kF16) pack_rows<kF16>(w, K, n0, rows, k0, kc, bp);
  else pack_rows<kF32>(w, K, n0, rows, k0, kc, bp);
}

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

}  // namespace

int64_t gemm_f32_block(int64_t K) {
  const int64_t blocks = (K + 383) / 384;
  return std::min(K, ((K + blocks - 1) / blocks + 7) / 8 * 8);
}

void gemm_f32_pack_x_avx2(const float* x, int64_t M, int64_t K, int64_t p0, int64_t p1, float* xp) {
  const int64_t P = (M + kRows - 1) / kRows, KC = gemm_f32_block(K);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    for (int64_t p = p0; p < p1; ++p) {
      float* out = xp + k0 * P * kRows + p * kRows * kc;
      for (int r = 0; r < kRows; ++r) {
        const int64_t m = p * kRows + r;
        if (m < M)
          for (int64_t k = 0; k < kc; ++k) out[k * kRows + r] = x[m * K + k0 + k];
        else
          for (int64_t k = 0; k < kc; ++k) out[k * kRows + r] = 0.f;
      }
    }
  }
}

void gemm_f32_cols_avx2(const DenseArgs& g, const float* xp, const float* bias, const RowFill* fill,
                        std::atomic<int64_t>& next) {
  const int64_t M = g.M, N = g.N, K = g.K, P = (M + kRows - 1) / kRows, KC = gemm_f32_block(K);
  std::unique_ptr<float, AlignedFree> buf(
      static_cast<float*>(std::aligned_alloc(64, sizeof(float) * KC * kCols * kPanels)));
  std::unique_ptr<float, AlignedFree> rows_buf(
      fill ? static_cast<float*>(std::aligned_alloc(64, sizeof(float) * K * kCols * kPanels)) : nullptr);
  float* bp = buf.get();
  alignas(32) float tile[kRows * kCols] = {};  // ragged edges: rows / columns past the real ones only ever finite
  alignas(32) float tail_bias[kCols];
  // column groups taken in turn by whichever thread is free: the two cores of a VM do not run at one speed, and
  // an even split left one waiting (~5 % of the GEMM's samples in OpenMP's barrier)
  for (int64_t j0; (j0 = next.fetch_add(1) * kGroupCols) < N;) {
    const int64_t j1 = std::min(N, j0 + kGroupCols);
    // the weight rows j0 .. j1: the stored ones, or (fill) written as fp32 rows into rows_buf (L2 / L3)
    const void* w = g.w;
    int wtype = g.wtype;
    int64_t row0 = 0;
    if (fill) {
      fill->fill(fill->ctx, j0, j1, rows_buf.get());
      w = rows_buf.get(), wtype = kF32, row0 = j0;
    }
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      const bool add = k0 > 0, last = k0 + kc == K;
      for (int64_t j = j0; j < j1; j += kCols)
        pack_weight(w, wtype, K, j - row0, int(std::min<int64_t>(kCols, N - j)), k0, kc,
                    bp + (j - j0) / kCols * kc * kCols);
      const float* xk = xp + k0 * P * kRows;
      for (int64_t i0 = 0; i0 < P; i0 += kBlockRows / kRows) {
        const int64_t i1 = std::min(P, i0 + kBlockRows / kRows);
        for (int64_t j = j0; j < j1; j += kCols) {
          const int cols = int(std::min<int64_t>(kCols, N - j));
          const float* b = bp + (j - j0) / kCols * kc * kCols;
          const float* bj = nullptr;
          if (last && bias) {
            if (cols == kCols) {
              bj = bias + j;
            } else {
              std::fill(tail_bias, tail_bias + kCols, 0.f);
              std::copy(bias + j, bias + j + cols, tail_bias);
              bj = tail_bias;
            }
          }
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t m0 = i * kRows;
            const int rows = int(std::min<int64_t>(kRows, M - m0));
            float* c = g.y + m0 * N + j;
            if (rows == kRows && cols == kCols) {
              micro_6x16(kc, xk + i * kRows * kc, b, c, N, add, bj);
              continue;
            }
            // a ragged edge: through a full tile, only its real rows / columns copied in and out
            if (add)
              for (int r = 0; r < rows; ++r) std::copy(c + r * N, c + r * N + cols, tile + r * kCols);
            micro_6x16(kc, xk + i * kRows * kc, b, tile, kCols, add, bj);
            for (int r = 0; r < rows; ++r) std::copy(tile + r * kCols, tile + r * kCols + cols, c + r * N);
          }
        }
      }
    }
  }
}

}  // namespace glm4k
