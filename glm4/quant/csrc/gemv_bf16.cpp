// bf16 weights against bf16 activations on AVX512_BF16 (Zen 4 / Zen 5, Cooper Lake, Sapphire Rapids and later):
// vdpbf16ps multiplies 32 bf16 pairs and adds each pair into one of 16 fp32 lanes, one instruction per 32 weights
// and token where widening the weights to fp32 takes two unpacks and two FMAs (gemv_avx512.cpp). The products are
// exact (8-bit mantissas: 16 bits of fp32's 24) and the sums round as fp32 FMAs round, in another order; denormal
// inputs and results are flushed to zero. ops.cpp calls it only for activations that are bf16 values (a bf16
// model's) on a CPU with AVX512_BF16.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include <immintrin.h>

#include <cstdint>

#include "gemv.h"
#include "tiles.h"

namespace glm4k {
namespace {

template <int RB, int MT>
inline void bf16_dot_tile(const DenseArgs& a, int64_t n, int64_t m0) {
  // one row and one token: two accumulators (even / odd steps of 32 columns), two vdpbf16ps chains instead of one
  constexpr int U = RB * MT == 1 ? 2 : 1;
  const int64_t K = a.K;
  __m512 acc[RB][MT][2];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
  const uint16_t* x = a.xbf16 + m0 * K;
  auto step = [&](int64_t k, int u) {
    __m512bh xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < RB; ++r) {
      const uint16_t* w = static_cast<const uint16_t*>(a.w) + (n + r) * K + k;
      if constexpr (dense_prefetch(RB, MT)) prefetch_l2(w, ahead_l2(RB * K * 2));  // gemv.h
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w);
      for (int m = 0; m < MT; ++m) acc[r][m][u] = _mm512_dpbf16_ps(acc[r][m][u], wv, xv[m]);
    }
  };
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    step(k, 0);
    if constexpr (U == 2) step(k + 32, 1);
  }
  if (k < K) step(k, 0);  // U = 2 and K an odd multiple of 32
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MT; ++m)
      a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]));
}

struct Bf16DotTile {
  template <int RB, int MT>
  static void run(const DenseArgs& a, int64_t n, int64_t m0) { bf16_dot_tile<RB, MT>(a, n, m0); }
};

}  // namespace

void dense_rows_bf16dot(const DenseArgs& a, int64_t n0, int64_t n1) { tile_rows<Bf16DotTile, 1>(a, n0, n1); }

}  // namespace glm4k
