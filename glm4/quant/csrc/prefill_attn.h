// Causal attention of a prompt chunk (a fresh prompt, or one after ctx cached positions), fp32, for the prefill:
// out [T, Hq, D] = softmax(q k^T / sqrt(D) + offset-causal mask) v, the G = Hq / Hkv query heads of a KV head sharing
// its keys. Included by prefill_attn_avx2.cpp / prefill_attn_avx512.cpp after their target pragma, each with its own
// vector type (Vec below: W lanes; load, store, set1, fmadd, max, exp, reductions), so each instantiation is
// compiled for its own set. A row's values do not depend on where its chunk starts: its keys are indexed from 0
// and the ones it must not see weigh exactly 0 (finite inputs).
// One task = one query head x kQB query positions: scores row by row against the keys transposed once per call
// (tiles of 2W keys [D, 2W]: QR queries x 2W keys per step, one key load feeding QR FMAs), a softmax per row over
// its visible keys (Cephes' expf), then the value rows (chunks of CH W dims [S, CH W]) weighed into QR query rows at
// a time, CH vectors of dims in registers. QR (Vec::QR) is 6 for AVX2 (12 sums of its 16 registers; 4 had left the
// loads at half the FMAs), 4 for AVX-512; a row's sums are the same whichever QR groups it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fused.h"

namespace glm4k {
namespace {

constexpr int64_t kQB = kPrefillQueryBlock;  // query positions per task

template <class Vec>
void prefill_attention_tasks(const PrefillAttnArgs& a, const float* kt, int64_t t0, int64_t t1) {
  using V = typename Vec::T;
  constexpr int W = Vec::W, CH = Vec::CH, QR = Vec::QR;
  static_assert(kQB % QR == 0, "a task's rows in whole steps");
  const int64_t T = a.T, Hq = a.Hq, D = a.D, G = a.Hq / a.Hkv, Tp = a.Tp, S = a.ctx + T, nb = (T + kQB - 1) / kQB;
  std::vector<float> s(size_t(kQB * Tp)), qs(size_t(kQB * D));
  for (int64_t t = t0; t < t1; ++t) {
    // tasks ordered cheap / dear in turn (block 0, last, 1, second last...), so that contiguous ranges balance
    const int64_t h = t % Hq, k = t / Hq, blk = k % 2 == 0 ? k / 2 : nb - 1 - k / 2;
    // keys [0, L) cover the block
    const int64_t i0 = blk * kQB, i1 = std::min(T, i0 + kQB), R = i1 - i0, L = a.ctx + i1;
    const int64_t kvh = h / G, Lp = (L + W - 1) / W * W;
    const float* ktk = kt + kvh * D * Tp;
    const float* vtk = a.vt + kvh * D * S;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < D; ++d) qs[r * D + d] = a.q[((i0 + r) * Hq + h) * D + d] * a.scale;
    for (int64_t r = R; r < kQB; ++r) std::memset(&qs[r * D], 0, size_t(D) * sizeof(float));
    for (int64_t r0 = 0; r0 < R; r0 += QR) {  // scores: QR rows x 2W keys a step (Tp is a multiple of 2W)
      for (int64_t j = 0; j < Lp; j += 2 * W) {
        V acc[QR][2];
        for (int r = 0; r < QR; ++r) acc[r][0] = acc[r][1] = Vec::zero();
        for (int64_t d = 0; d < D; ++d) {
          const V k0 = Vec::load(ktk + j * D + d * 2 * W), k1 = Vec::load(ktk + j * D + d * 2 * W + W);
          for (int r = 0; r < QR; ++r) {
            const V qv = Vec::set1(qs[(r0 + r) * D + d]);
            acc[r][0] = Vec::fmadd(qv, k0, acc[r][0]), acc[r][1] = Vec::fmadd(qv, k1, acc[r][1]);
          }
        }
        for (int r = 0; r < QR; ++r) Vec::store(&s[(r0 + r) * Tp + j], acc[r][0]), Vec::store(&s[(r0 + r) * Tp + j + W], acc[r][1]);
      }
    }
    for (int64_t r = 0; r < R; ++r) {  // softmax over keys [0, ctx + i0 + r], zero beyond (to Lp)
      float* row = &s[r * Tp];
      const int64_t n = a.ctx + i0 + r + 1;
      V mv = Vec::set1(-INFINITY);
      int64_t j = 0;
      for (; j + W <= n; j += W) mv = Vec::max(mv, Vec::load(row + j));
      float m = Vec::reduce_max(mv);
      for (int64_t jj = j; jj < n; ++jj) m = std::max(m, row[jj]);
      const V vm = Vec::set1(m);
      V sum = Vec::zero();
      for (j = 0; j + W <= n; j += W) {
        const V e = Vec::exp(Vec::sub(Vec::load(row + j), vm));
        Vec::store(row + j, e);
        sum = Vec::add(sum, e);
      }
      for (; j < Lp; j += W) {  // the vector holding key n - 1, then the keys this query must not see (weight 0)
        Vec::store(row + j, Vec::exp(Vec::sub(Vec::load(row + j), vm)));
        for (int64_t jj = std::max(j, n); jj < j + W; ++jj) row[jj] = 0.0f;
        sum = Vec::add(sum, Vec::load(row + j));
      }
      const V inv = Vec::set1(1.0f / Vec::reduce_add(sum));
      for (j = 0; j < Lp; j += W) Vec::store(row + j, Vec::mul(Vec::load(row + j), inv));
    }
    for (int64_t r0 = 0; r0 < R; r0 += QR) {  // out rows: sum_j p[r, j] v[j], CH vectors of dims at a time
      const int rows = int(std::min<int64_t>(QR, R - r0));
      const int64_t n = a.ctx + i0 + r0 + rows;  // keys any of these rows sees
      for (int64_t d0 = 0; d0 < D; d0 += CH * W) {
        V acc[QR][CH];
        for (int r = 0; r < QR; ++r)
          for (int c = 0; c < CH; ++c) acc[r][c] = Vec::zero();
        for (int64_t j = 0; j < n; ++j) {
          const float* vr = vtk + (d0 / (CH * W) * S + j) * (CH * W);
          V vv[CH];
          for (int c = 0; c < CH; ++c) vv[c] = Vec::load(vr + c * W);
          for (int r = 0; r < QR; ++r) {
            const V p = Vec::set1(s[(r0 + r) * Tp + j]);  // 0 past a row's own position (and for rows >= R)
            for (int c = 0; c < CH; ++c) acc[r][c] = Vec::fmadd(p, vv[c], acc[r][c]);
          }
        }
        // all QR rows through a tile, then the real ones out: a store loop bounded by `rows` made GCC keep acc in
        // memory, 8 stores an iteration of the loop above (1.6x the op's time)
        alignas(64) float tile[QR][CH * W];
        for (int r = 0; r < QR; ++r)
          for (int c = 0; c < CH; ++c) Vec::store(&tile[r][c * W], acc[r][c]);
        for (int r = 0; r < rows; ++r)
          std::memcpy(a.out + ((i0 + r0 + r) * Hq + h) * D + d0, tile[r], sizeof(tile[r]));
      }
    }
  }
}

}  // namespace
}  // namespace glm4k
