// torch ops over the fused per-layer kernels (fused.h): torch.ops.glm4.rms_norm / rope / decode_attention, and
// the sampler's argmax.
// Compiled for baseline x86-64; glm4.quant.fused calls them only where torch.ops.glm4.isa() is not "none".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "fused.h"

namespace {

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

int act_type(const at::Tensor& t, const char* op) {
  if (t.scalar_type() == at::kFloat) return glm4k::kActF32;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, op, ": float32 or bfloat16 activations, not ", t.scalar_type());
  return glm4k::kActBF16;
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": dtypes differ (", a.scalar_type(), ", ", b.scalar_type(), ")");
}

// x [..., D] (rows of D contiguous values), w [D] -> y [..., D] contiguous
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(has_avx2(), "glm4.rms_norm needs AVX2 + FMA");
  const int64_t D = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.is_contiguous(), "rms_norm: w [D] contiguous");
  check_same(x, w, "rms_norm");
  auto x2 = x.reshape({-1, D});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  auto y = at::empty(x.sizes(), x.options());
  glm4k::NormArgs a{x2.data_ptr(), w.data_ptr(), y.data_ptr(), D, x2.stride(0), float(eps), act_type(x, "rms_norm")};
  const int64_t rows = x2.size(0);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    glm4k::rms_norm_rows_avx2(a, r0, r1);
  });
  return y;
}

// x [B, T, H, D] (last dim contiguous), cos/sin [B, T, 1, R] -> [B, T, H, D] contiguous
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  TORCH_CHECK(has_avx2(), "glm4.rope needs AVX2 + FMA");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && cos.sizes() == sin.sizes(), "rope: x [B, T, H, D], cos/sin [B, T, 1, R]");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), R = cos.size(3);
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == T && R <= D && R % 2 == 0, "rope: tables do not match x");
  check_same(x, cos, "rope");
  check_same(x, sin, "rope");
  auto xc = x.stride(3) == 1 && x.stride(0) == T * x.stride(1) ? x : x.contiguous();
  auto c = cos.contiguous(), s = sin.contiguous();
  auto y = at::empty({B, T, H, D}, x.options());
  glm4k::RopeArgs a{xc.data_ptr(), c.data_ptr(), s.data_ptr(), y.data_ptr(), H, D, R, xc.stride(1), xc.stride(2), R,
                    int(interleaved), act_type(x, "rope")};
  at::parallel_for(0, B * T, std::max<int64_t>(1, 4096 / (H * D)), [&](int64_t t0, int64_t t1) {
    glm4k::rope_rows_avx2(a, t0, t1);
  });
  return y;
}

// q [B, Hq, D], k/v [S, Hkv, D] (one layer of the cache), block_table [B, maxb] int64, lens [B] int64 -> [B, Hq, D]
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& block_table, const at::Tensor& lens, int64_t block_size) {
  TORCH_CHECK(has_avx2(), "glm4.decode_attention needs AVX2 + FMA");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.size(2) == k.size(2),
              "decode_attention: q [B, Hq, D], k/v [S, Hkv, D]");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "decode_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(q.size(2) % 8 == 0, "decode_attention: head_dim must be a multiple of 8");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == q.size(0) && block_table.scalar_type() == at::kLong &&
                  lens.dim() == 1 && lens.size(0) == q.size(0) && lens.scalar_type() == at::kLong,
              "decode_attention: block_table [B, blocks] and lens [B], int64");
  TORCH_CHECK(block_size >= 1, "decode_attention: block_size >= 1");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "decode_attention: k/v contiguous");
  check_same(k, v, "decode_attention");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() || (q.scalar_type() == at::kFloat && k.scalar_type() == at::kBFloat16),
              "decode_attention: the cache in the activations' dtype, or bfloat16 under float32 ones (not ",
              k.scalar_type(), " under ", q.scalar_type(), ")");
  auto qc = q.contiguous(), tc = block_table.contiguous(), lc = lens.contiguous();
  const int64_t B = q.size(0), blocks = tc.size(1), S = k.size(0);
  const int64_t* lp = lc.data_ptr<int64_t>();
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {  // a bad block id would read outside the cache
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= blocks * block_size, "decode_attention: lens[", b, "] = ", lp[b],
                " outside [1, ", blocks * block_size, "]");
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tp[b * blocks + i] >= 0 && (tp[b * blocks + i] + 1) * block_size <= S,
                  "decode_attention: block id out of range");
  }
  auto out = at::empty(q.sizes(), q.options());
  glm4k::DecodeArgs a{qc.data_ptr(), k.data_ptr(), v.data_ptr(), tp, lp, out.data_ptr(),
                      q.size(1), k.size(1), q.size(2), blocks, block_size, float(1.0 / std::sqrt(double(q.size(2)))),
                      act_type(q, "decode_attention"), act_type(k, "decode_attention")};
  at::parallel_for(0, B * k.size(1), 1, [&](int64_t u0, int64_t u1) { glm4k::decode_attention_avx2(a, u0, u1); });
  return out;
}

// A decode step's attention from the fused q/k/v projection, in one call: qkv [..., (Hq + 2 Hkv) D] (N tokens, one
// per sequence), cos/sin [B, T, 1, R] (B T = N) -> [..., Hq D]. q and k rotated as `rope` rotates them, k and v stored
// at slots[t] of the layer's cache k/v [S, Hkv, D] (as index_copy_), then `decode_attention` over block_table / lens
// (which count the new token): the same kernels in the same order as the separate ops, so the same values.
at::Tensor decode_qkv_attention(const at::Tensor& qkv_in, const at::Tensor& cos, const at::Tensor& sin,
                                bool interleaved, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                                const at::Tensor& block_table, const at::Tensor& lens, int64_t block_size,
                                int64_t n_heads) {
  TORCH_CHECK(has_avx2(), "glm4.decode_qkv_attention needs AVX2 + FMA");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous(),
              "decode_qkv_attention: k/v [S, Hkv, D] contiguous");
  const int64_t S = k.size(0), Hkv = k.size(1), D = k.size(2), Hq = n_heads;
  TORCH_CHECK(qkv_in.dim() >= 1 && qkv_in.size(-1) == (Hq + 2 * Hkv) * D,
              "decode_qkv_attention: qkv [..., (n_heads + 2 Hkv) D]");
  const at::Tensor qkv = qkv_in.reshape({-1, qkv_in.size(-1)});
  const int64_t N = qkv.size(0);
  TORCH_CHECK(qkv.stride(1) == 1, "decode_qkv_attention: qkv rows contiguous");
  TORCH_CHECK(cos.dim() == 4 && cos.sizes() == sin.sizes() && cos.size(0) * cos.size(1) == N && cos.size(2) == 1,
              "decode_qkv_attention: cos/sin [B, T, 1, R], B T = tokens");
  const int64_t R = cos.size(3);
  TORCH_CHECK(R <= D && R % 2 == 0, "decode_qkv_attention: rotary dims");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == N && slots.scalar_type() == at::kLong,
              "decode_qkv_attention: slots [N] int64");
  check_same(qkv, cos, "decode_qkv_attention");
  check_same(qkv, sin, "decode_qkv_attention");
  check_same(k, v, "decode_qkv_attention");
  const bool narrow = k.scalar_type() != qkv.scalar_type();  // a bf16 cache under fp32 activations
  TORCH_CHECK(!narrow || (qkv.scalar_type() == at::kFloat && k.scalar_type() == at::kBFloat16),
              "decode_qkv_attention: the cache in the activations' dtype, or bfloat16 under float32 ones");
  auto sc = slots.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t t = 0; t < N; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "decode_qkv_attention: slot ", sp[t], " outside the cache [0, ", S, ")");
  auto c = cos.contiguous(), s = sin.contiguous();
  const int dtype = act_type(qkv, "decode_qkv_attention");
  const int64_t esize = qkv.element_size(), row = qkv.stride(0);
  const char* base = static_cast<const char*>(qkv.data_ptr());
  auto q = at::empty({N, Hq, D}, qkv.options());
  auto kr = at::empty({N, Hkv, D}, qkv.options());
  glm4k::RopeArgs qa{base, c.data_ptr(), s.data_ptr(), q.data_ptr(), Hq, D, R, row, D, R, int(interleaved), dtype};
  glm4k::RopeArgs ka{base + Hq * D * esize, c.data_ptr(), s.data_ptr(), kr.data_ptr(), Hkv, D, R, row, D, R,
                     int(interleaved), dtype};
  glm4k::rope_rows_avx2(qa, 0, N);
  glm4k::rope_rows_avx2(ka, 0, N);
  // the new k / v rows as the cache stores them: a bf16 cache gets them rounded as .to(bfloat16) does (the rows of
  // v then from a copy, else straight from qkv)
  const at::Tensor kw = narrow ? kr.to(k.scalar_type()) : kr;
  const at::Tensor vw =
      narrow ? qkv.narrow(1, (Hq + Hkv) * D, Hkv * D).to(k.scalar_type()).contiguous() : at::Tensor();
  const char* vsrc = narrow ? static_cast<const char*>(vw.data_ptr()) : base + (Hq + Hkv) * D * esize;
  const int64_t vstride = narrow ? Hkv * D * k.element_size() : row * esize;  // bytes from one token's v to the next
  const int64_t kv_bytes = Hkv * D * k.element_size();
  char* kc = static_cast<char*>(k.data_ptr());
  char* vc = static_cast<char*>(v.data_ptr());
  for (int64_t t = 0; t < N; ++t) {
    std::memcpy(kc + sp[t] * kv_bytes, static_cast<const char*>(kw.data_ptr()) + t * kv_bytes, kv_bytes);
    std::memcpy(vc + sp[t] * kv_bytes, vsrc + t * vstride, kv_bytes);
  }
  auto out = decode_attention(q, k, v, block_table, lens, block_size);
  auto sizes = qkv_in.sizes().vec();
  sizes.back() = Hq * D;
  return out.view(sizes);
}

// x [R, V] float32 (rows of V contiguous values, any row stride) -> int64 [R]: torch.argmax(x, dim=-1)
at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(has_avx2(), "glm4.argmax needs AVX2 + FMA");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0, "argmax: x float32 [R, V], V > 0");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const float* p = xc.data_ptr<float>();
  const int64_t rows = xc.size(0), V = xc.size(1), stride = xc.stride(0);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) o[r] = glm4k::argmax_avx2(p + r * stride, V);
  });
  return out;
}

}  // namespace

// q [T, Hq, D], k / v [S, Hkv, D] fp32 (a prompt chunk at positions S - T .. S - 1 after S - T cached ones; a fresh
// prompt: S = T) -> causal attention out [T, Hq, D], scale 1/sqrt(D): the prefill's, as scaled_dot_product_attention
// with the offset-causal mask (is_causal=True for a fresh prompt) computes it (fp32 sums in another order). AVX-512
// where the kernels run it (D % 64 == 0), else AVX2 (D % 16 == 0).
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(has_avx2(), "glm4.prefill_attention needs AVX2 + FMA");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.size(0) <= k.size(0) &&
                  q.size(2) == k.size(2),
              "prefill_attention: q [T, Hq, D], k / v [S, Hkv, D], S >= T");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "prefill_attention: float32 q, k, v");
  const int64_t T = q.size(0), S = k.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && D % 16 == 0, "prefill_attention: Hq a multiple of Hkv, D of 16");
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto out = at::empty({T, Hq, D}, q.options());
  const bool wide = glm4k::avx512_kernels() && D % 64 == 0;
  const int64_t Tp = (S + 31) / 32 * 32;  // the kernels' score steps: 2 vectors of keys
  const int64_t kw = wide ? 32 : 16, vw = wide ? 64 : 16;  // a score step's keys, an output step's dims (fused.h)
  std::vector<float> kt(size_t(Hkv * D * Tp), 0.0f);  // [Hkv, Tp / kw, D, kw]
  std::vector<float> vt(size_t(Hkv * D * S));         // [Hkv, D / vw, S, vw]
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  for (int64_t t = 0; t < S; ++t)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t d = 0; d < D; ++d) {
        kt[size_t(h * D * Tp + (t / kw * D + d) * kw + t % kw)] = kp[(t * Hkv + h) * D + d];
        vt[size_t(((h * (D / vw) + d / vw) * S + t) * vw + d % vw)] = vp[(t * Hkv + h) * D + d];
      }
  const glm4k::PrefillAttnArgs a{qc.data_ptr<float>(), vt.data(), out.data_ptr<float>(), T, Hq, Hkv, D, Tp,
                                 float(1.0 / std::sqrt(double(D))), S - T};
  const int64_t tasks = Hq * ((T + glm4k::kPrefillQueryBlock - 1) / glm4k::kPrefillQueryBlock);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    wide ? glm4k::prefill_attention_avx512(a, kt.data(), t0, t1) : glm4k::prefill_attention_avx2(a, kt.data(), t0, t1);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(glm4, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor", &rope);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor block_table, Tensor lens, int block_size) -> Tensor",
        &decode_attention);
  m.def("decode_qkv_attention(Tensor qkv, Tensor cos, Tensor sin, bool interleaved, Tensor(a!) k, Tensor(b!) v, "
        "Tensor slots, Tensor block_table, Tensor lens, int block_size, int n_heads) -> Tensor",
        &decode_qkv_attention);
  m.def("argmax(Tensor x) -> Tensor", &argmax);
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v) -> Tensor", &prefill_attention);
}
