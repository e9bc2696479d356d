// prefill_attn.h for AVX2 + FMA: 8 lanes, 6 query rows x 2 vectors of dims (16) in registers.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "prefill_attn.h"
#include "vec_avx2.h"

namespace glm4k {
namespace {

struct Vec8 {
  using T = __m256;
  static constexpr int W = 8, CH = 2, QR = 6;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static float reduce_max(T v) { return hmax(v); }
  static float reduce_add(T v) { return hsum(v); }
  static T exp(T x) { return exp8(x); }  // x <= 0 (scores minus their row's max)
};

}  // namespace

void prefill_attention_avx2(const PrefillAttnArgs& a, const float* kt, int64_t t0, int64_t t1) {
  prefill_attention_tasks<Vec8>(a, kt, t0, t1);
}

}  // namespace glm4k
