// 6-bit codes (QuantLinear bits 6): each 64 columns of a row are 48 bytes. Bytes 0..31: the low nibbles of two
// 32-column blocks in the q4_0 order (block j's byte t: column 32 j + t low, 32 j + 16 + t high), as the 4-bit
// kernels read them. Bytes 32..47: the high bit pairs, 8 bytes per block (block j's byte u at 32 + 8 j: columns
// 32 j + u, + 8, + 16, + 24 at bits 0-1, 2-3, 4-5, 6-7), so one 64-bit lane serves one block. (And 32 columns of
// either 4- or 6-bit codes as bytes: codes_block32.) Included by the
// kernel files after their target pragma: each compiles this for its own instruction set (AVX2 at least).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace glm4k {
namespace {

// block j (0, 1) of the 48 bytes at p as bytes: lo = columns 32 j + 0..15, hi = columns 32 j + 16..31
inline void codes6_block32(const uint8_t* p, int j, __m128i& lo, __m128i& hi) {
  const __m128i mask = _mm_set1_epi8(0x0F), pair = _mm_set1_epi8(0x30);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j));
  const __m128i pairs = _mm_castpd_si128(_mm_loaddup_pd(reinterpret_cast<const double*>(p + 32 + 8 * j)));
  // each pair moved to bits 4-5: columns t < 8 from bits 0-1 (lo) / 4-5 (hi), t >= 8 from 2-3 / 6-7
  lo = _mm_or_si128(_mm_and_si128(bytes, mask),
                    _mm_and_si128(_mm_sllv_epi64(pairs, _mm_set_epi64x(2, 4)), pair));
  hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                    _mm_and_si128(_mm_srlv_epi64(pairs, _mm_set_epi64x(2, 0)), pair));
}

// the 64 columns of the 48 bytes at p as bytes in 256-bit registers: lanes block 0 | block 1, lo = each block's
// columns 0..15, hi = 16..31 (gemv.h's perm64 order), the pairs moved to bits 4-5 (each block's 8 pair bytes in both
// halves of its lane: t < 8 and t >= 8)
inline void codes6_unpack64(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), pair = _mm256_set1_epi8(0x30);
  const __m256i nib = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i pairs = _mm256_permute4x64_epi64(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32))), 0x50);
  lo = _mm256_or_si256(_mm256_and_si256(nib, nibble),
                       _mm256_and_si256(_mm256_sllv_epi64(pairs, _mm256_setr_epi64x(4, 2, 4, 2)), pair));
  hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(nib, 4), nibble),
                       _mm256_and_si256(_mm256_srlv_epi64(pairs, _mm256_setr_epi64x(0, 2, 0, 2)), pair));
}

// columns k..k+31 (k a multiple of 32) of weight row n of a K-column 4- or 6-bit matrix q as bytes: lo = columns
// k..k+15, hi = k+16..k+31. 4-bit: one q4_0 block (byte t holds column t low, t + 16 high); 6-bit: as above
template <int BITS>
inline void codes_block32(const void* q, int64_t n, int64_t K, int64_t k, __m128i& lo, __m128i& hi) {
  if constexpr (BITS == 6) {
    codes6_block32(static_cast<const uint8_t*>(q) + (n * K + k) / 64 * 48, int(k % 64 / 32), lo, hi);
  } else {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(q) + (n * K + k) / 2));
    lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  }
}

}  // namespace
}  // namespace glm4k
