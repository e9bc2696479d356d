// The small per-layer ops of a decode step, fused (fused_avx2.cpp), so that a step is not ~2,000 torch calls.
// Shared between the op wrappers (fused_ops.cpp, baseline x86-64) and the kernels (AVX2 + FMA + F16C).
#pragma once
#include <cstdint>

namespace glm4k {

enum ActType { kActF32 = 0, kActBF16 = 1 };  // x, weights and outputs of one call share this dtype

// rows [r0, r1) of y [R, D] = w * (x * rsqrt(mean(x^2) + eps)), the variance in fp32; bf16: normalized in fp32,
// rounded to bf16, times the bf16 weight, rounded again (the order of transformers' GlmRMSNorm)
struct NormArgs {
  const void* x;
  const void* w;
  void* y;
  int64_t D, x_stride;  // y is contiguous
  float eps;
  int dtype;
};
void rms_norm_rows_avx2(const NormArgs& a, int64_t r0, int64_t r1);

// rows [r0, r1) of y [T, H, D] = x rotated on its first R dims: x * cos + rotate(x) * sin, each product and the
// sum rounded to the dtype as torch's elementwise ops round them; dims >= R copied
struct RopeArgs {
  const void* x;
  const void* cos;  // [T, R]: one angle per rotated dim, laid out like the dims (pairs repeated)
  const void* sin;
  void* y;
  int64_t H, D, R, x_tstride, x_hstride, cs_stride;  // y is contiguous [T, H, D]
  int interleaved;  // pairs (2i, 2i + 1), else (i, i + R / 2)
  int dtype;
};
void rope_rows_avx2(const RopeArgs& a, int64_t t0, int64_t t1);

// units [u0, u1) (u = b * Hkv + kv_head) of out [B, Hq, D] = softmax(q k^T / sqrt(D)) v over the first lens[b]
// positions of sequence b, position l at cache slot block_table[b][l / block_size] * block_size + l % block_size;
// the G = Hq / Hkv query heads of a KV head share its keys; fp32 scores and accumulation. The cache is in the
// activations' dtype, or bf16 under fp32 activations (kv_dtype).
struct DecodeArgs {
  const void* q;  // [B, Hq, D] contiguous
  const void* k;  // [S, Hkv, D] contiguous (one layer of the paged cache), kv_dtype
  const void* v;
  const int64_t* block_table;  // [B, bt_stride]
  const int64_t* lens;         // [B]
  void* out;                   // [B, Hq, D]
  int64_t Hq, Hkv, D, bt_stride, block_size;
  float scale;
  int dtype, kv_dtype;
};
void decode_attention_avx2(const DecodeArgs& a, int64_t u0, int64_t u1);

// tasks [t0, t1) (t: one query head x 16 query positions, prefill_attn.h) of out [T, Hq, D] = causal
// softmax(q k^T * scale) v over a prompt chunk of T positions after ctx cached ones (S = ctx + T keys), fp32; q / out
// contiguous [T, Hq, D]; kt: the keys in tiles of 2W (the kernel's score step: 16 for AVX2, 32 for AVX-512)
// transposed, [Hkv, Tp / 2W, D, 2W], zero from key S to Tp (a multiple of 32); vt: the values in chunks of CH W dims
// (the kernel's output step: 16 / 64), [Hkv, D / (CH W), S, CH W]. Each tile a contiguous stream: the strided reads
// of [Hkv, D, Tp] keys and [S, Hkv, D] values took 1.34x the time (AVX2, 512 positions, one thread, Zen 3). AVX-512
// needs D % 64 == 0, AVX2 D % 16 == 0.
struct PrefillAttnArgs {
  const float* q;
  const float* vt;
  float* out;
  int64_t T, Hq, Hkv, D, Tp;
  float scale;
  int64_t ctx;  // cached positions before the T queries: query i at position ctx + i sees keys [0, ctx + i]
};
// whether the AVX-512 kernels run now (the CPU has them and set_isa allows them; ops.cpp)
bool avx512_kernels();

// query positions per task of the prefill attention (tasks: Hq x ceil(T / it)); a multiple of every set's rows per
// step (AVX2 6, AVX-512 4)
constexpr int64_t kPrefillQueryBlock = 24;
void prefill_attention_avx2(const PrefillAttnArgs& a, const float* kt, int64_t t0, int64_t t1);
void prefill_attention_avx512(const PrefillAttnArgs& a, const float* kt, int64_t t0, int64_t t1);

// the index of the first maximum of x[0, n) (n >= 1), as torch.argmax: a NaN counts as the maximum (the first NaN)
int64_t argmax_avx2(const float* x, int64_t n);

}  // namespace glm4k
