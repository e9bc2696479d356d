// How every streaming kernel walks rows [n0, n1) of y: in tiles of RB weight rows x MT activation rows, one call of
// Tile::run<RB, MT>(a, n, m0) each. One token: RB1 rows a tile, 4 where each activation load (or its int16 terms)
// feeding 4 rows pays, 1 where one sequential stream of weights per thread pays more (the dense kernels, q6_K and
// AVX2's 8-bit codes against int16 activations: 4 rows read at once are 4 streams of memory a thread); more tokens:
// 2 rows x up to 4 tokens (each widened weight feeds 4 tokens). Tile types live in each kernel file's anonymous
// namespace, so every instantiation is that file's own, compiled for its instruction set.
#pragma once
#include <cstdint>

namespace glm4k {

template <class Tile, int RB, class Args>
inline void tile_tokens(const Args& a, int64_t n) {
  for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
    switch (a.M - m0 >= 4 ? 4 : a.M - m0) {
      case 1: Tile::template run<RB, 1>(a, n, m0); break;
      case 2: Tile::template run<RB, 2>(a, n, m0); break;
      case 3: Tile::template run<RB, 3>(a, n, m0); break;
      default: Tile::template run<RB, 4>(a, n, m0); break;
    }
  }
}

template <class Tile, int RB1 = 4, class Args>
void tile_rows(const Args& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (a.M == 1) {
    for (; n + RB1 <= n1; n += RB1) Tile::template run<RB1, 1>(a, n, 0);
  } else {
    for (; n + 2 <= n1; n += 2) tile_tokens<Tile, 2>(a, n);
  }
  for (; n < n1; ++n) tile_tokens<Tile, 1>(a, n);
}

// rows [n0, n1) by Tile<true> (activations as two int16 terms: exact) or Tile<false> (one), as a.xq_lo says
template <template <bool> class Tile, int RB1 = 4, class Args>
void tile_rows_lo(const Args& a, int64_t n0, int64_t n1) {
  if (a.xq_lo) tile_rows<Tile<true>, RB1>(a, n0, n1);
  else tile_rows<Tile<false>, RB1>(a, n0, n1);
}

}  // namespace glm4k
