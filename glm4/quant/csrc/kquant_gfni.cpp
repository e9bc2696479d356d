// The AVX-512 q6_K tiles (kquant_q6k_avx512.h) with their codes assembled by GFNI, for CPUs that
// have it (Zen 4 / 5, Ice Lake and later; not Skylake-X / Cascade Lake: kquant_avx512.cpp's shifts there). The 2-bit
// high parts of a half super-block's codes (qh: bits 2 j .. 2 j + 1 of byte l belong to weight 32 j + l) reach bits
// 4-5 of their bytes by one affine byte transform per register (vgf2p8affineqb: an 8 x 8 bit matrix per 64-bit
// lane, so the two 256-bit halves of a register take different bit pairs), and one vpternlogd ORs them under the
// masked low nibbles: 5 instructions for 128 codes against 12 by shifts and masks. A Zen 4's q6_K LM head from memory
// (151552 x 1024, 2 threads, alternated in one process): int8 activations 1.23x the int16 tile's speed by shifts,
// 1.30x by GFNI.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,gfni")
#include <immintrin.h>

#include <cstdint>

#include "kquant.h"
#include "kquant_q6k_avx512.h"
#include "tiles.h"

namespace glm4k {
namespace {

// affine matrices (gf2p8affine: bit i of a result byte = parity of matrix byte 7 - i AND the source byte): source
// bits 2 j, 2 j + 1 to bits 4, 5; the lower four 64-bit lanes take pair j0, the upper four pair j1
constexpr int64_t pair_to_bits45(int j) { return int64_t(1) << (24 + 2 * j) | int64_t(2) << (16 + 2 * j); }
inline __m512i pairs_to_bits45(int j0, int j1) {
  const int64_t a = pair_to_bits45(j0), b = pair_to_bits45(j1);
  return _mm512_setr_epi64(a, a, a, a, b, b, b, b);
}

struct Q6KCodesGfni {
  static void load(const uint8_t* half_ql, const uint8_t* half_qh, __m512i c[2]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i ql = _mm512_loadu_si512(half_ql);
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(half_qh)));
    // (ql & low4) | high pairs: ternary logic 0xEA = (A & B) | C
    c[0] = _mm512_ternarylogic_epi32(ql, low4, _mm512_gf2p8affine_epi64_epi8(qh, pairs_to_bits45(0, 1), 0), 0xEA);
    c[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), low4,
                                     _mm512_gf2p8affine_epi64_epi8(qh, pairs_to_bits45(2, 3), 0), 0xEA);
  }
};

}  // namespace

void q6k_rows_gfni(const KQuantArgs& a, int64_t n0, int64_t n1) { q6k_rows<Q6KCodesGfni>(a, n0, n1); }

}  // namespace glm4k
