// The large-M (prefill) GEMMs of the AVX2 set. Baseline x86-64; callers check the CPU has AVX2
// (torch.ops.glm4.isa() is not "none").
// torch.ops.glm4.quant_gemm_i8: 4- / 6-bit QuantLinears at int8 activation precision (gemm_i8_avx2.cpp).
// torch.ops.glm4.dense_gemm / quant_dense_gemm / kquant_dense_gemm: fp32 / bf16 / fp16 weights, grouped int8 /
// int6 / int4 codes or GGUF K-quant blocks, in fp32 (gemm_f32_avx2.cpp; codes dequantized 128 rows at a time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "gemv.h"
#include "weight_type.h"
#include "kquant.h"

namespace {

constexpr int64_t kPanel = 16;  // rows a task: gemm_i8_avx2.cpp's panel

// the activation block: the largest multiple of 32 up to 256 dividing the group (the int8 decode kernels' blocks)
int64_t i8_block(int64_t group) {
  for (int64_t b = 256; b >= 32; b -= 32)
    if (group % b == 0) return b;
  return 0;
}

at::Tensor quant_gemm_i8(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scales,
                         const std::optional<at::Tensor>& mins, int64_t bits, int64_t group, int64_t zero_point) {
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"),
              "glm4.quant_gemm_i8 needs AVX2 + FMA + F16C");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "quant_gemm_i8: x must be float32 [M, K]");
  TORCH_CHECK(bits == 4 || bits == 6, "quant_gemm_i8: bits must be 4 or 6");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const int64_t B = i8_block(group);
  TORCH_CHECK(group > 0 && K % group == 0 && B > 0 && (bits == 4 || K % 64 == 0), "quant_gemm_i8: bad group size");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.size(1) == (bits == 4 ? K / 2 : K / 64 * 48),
              "quant_gemm_i8: q shape / dtype does not match K");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group &&
                  (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat),
              "quant_gemm_i8: scales [N, K / group] float16 or float32");
  if (mins) TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type(),
                        "quant_gemm_i8: mins must match scales");
  const at::Tensor qc = q.contiguous(), sc = scales.contiguous();
  const at::Tensor mc = mins ? mins->contiguous() : at::Tensor();
  const int64_t G = K / group, NB = K / B;
  // x -> int8 per block (llama.cpp's q8_0 rounding, act_int8_avx2) and the group sums of what the kernel multiplies
  std::vector<int8_t> xi8(M * K);
  std::vector<float> xscale(M * NB), xsum(M * G);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    glm4k::act_int8_avx2(xp + m0 * K, (m1 - m0) * K, B, xi8.data() + m0 * K, xscale.data() + m0 * NB);
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t gi = 0; gi < G; ++gi) {
        float acc = 0.f;
        for (int64_t b0 = gi * group; b0 < (gi + 1) * group; b0 += B) {
          int32_t t = 0;
          const int8_t* v = xi8.data() + m * K + b0;
          for (int64_t k = 0; k < B; ++k) t += v[k];
          acc += xscale[m * NB + b0 / B] * float(t);
        }
        xsum[m * G + gi] = acc;
      }
  });
  auto y = at::empty({M, N}, x.options());
  glm4k::QuantArgs a{};
  a.x = xp;
  a.xi8 = xi8.data(), a.xscale = xscale.data(), a.xsum = xsum.data(), a.xblock = B;
  a.q = qc.data_ptr();
  a.scales = sc.data_ptr();
  a.mins = mins ? mc.data_ptr() : nullptr;
  a.y = y.data_ptr<float>();
  a.M = M, a.N = N, a.K = K, a.group = group;
  a.bits = int(bits), a.scale_f16 = scales.scalar_type() == at::kHalf, a.zero_point = int(zero_point);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    glm4k::gemm_i8_rows_avx2(a, p0 * kPanel, std::min(N, p1 * kPanel));
  });
  return y;
}

void check_gemm_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"),
              "glm4.", op, " needs AVX2 + FMA + F16C");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be float32 [M, K]");
  TORCH_CHECK(x.size(1) == K, op, ": x has ", x.size(1), " columns, the weight ", K);
}

// y [M, N] = x @ W^T (+ bias) by gemm_f32_avx2.cpp: W as a.w / a.wtype, or rows written by fill
at::Tensor run_f32_gemm(const at::Tensor& x_in, glm4k::DenseArgs a, const std::optional<at::Tensor>& bias_in,
                        const glm4k::RowFill* fill, const char* op) {
  if (bias_in)
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == a.N && bias_in->scalar_type() == at::kFloat, op,
                ": bias must be float32 [N]");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();
  const int64_t M = x.size(0), K = a.K, N = a.N, P = (M + 5) / 6;
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias_in ? bias.unsqueeze(0).expand({M, N}).contiguous() : y.zero_();
  std::unique_ptr<float[]> xp(new float[P * 6 * K]);  // every value written by the packing: no zeroing pass
  const float* xs = x.data_ptr<float>();
  at::parallel_for(0, P, 8, [&](int64_t p0, int64_t p1) { glm4k::gemm_f32_pack_x_avx2(xs, M, K, p0, p1, xp.get()); });
  a.x = xs, a.y = y.data_ptr<float>(), a.M = M;
  const float* b = bias_in ? bias.data_ptr<float>() : nullptr;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    glm4k::gemm_f32_cols_avx2(a, xp.get(), b, fill, next);
  });
  return y;
}

at::Tensor dense_gemm(const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w_in.dim() == 2, "dense_gemm: w must be [N, K]");
  check_gemm_x(x, w_in.size(1), "dense_gemm");
  glm4k::DenseArgs a{};
  a.wtype = glm4k::dense_weight_type(w_in, "dense_gemm");
  const at::Tensor w = w_in.contiguous();
  a.w = w.data_ptr(), a.N = w.size(0), a.K = w.size(1);
  return run_f32_gemm(x, a, bias, nullptr, "dense_gemm");
}

// W[n, k] = s[n, k/g] * (q[n, k] - zero_point) + mins[n, k/g], dequantized 128 rows at a time into the GEMM's
// panels (the rows equal dequantize_rows' bit for bit, so y equals dense_gemm on the dequantized weight)
at::Tensor quant_dense_gemm(const at::Tensor& x, const at::Tensor& q_in, const at::Tensor& scales,
                            const std::optional<at::Tensor>& mins, int64_t bits, int64_t group, int64_t zero_point,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "quant_dense_gemm: bits must be 4, 6 or 8");
  TORCH_CHECK(q_in.dim() == 2 && scales.dim() == 2 && q_in.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "quant_dense_gemm: q [N, K'] int8 (8-bit) or uint8 (4- / 6-bit), scales [N, K / group]");
  const int64_t N = q_in.size(0), K = x.dim() == 2 ? x.size(1) : 0;
  check_gemm_x(x, K, "quant_dense_gemm");
  TORCH_CHECK(group > 0 && K % group == 0 && group % glm4k::min_group(bits) == 0 && scales.size(0) == N &&
                  scales.size(1) == K / group && q_in.size(1) == glm4k::row_bytes(bits, K),
              "quant_dense_gemm: shapes of q / scales do not match K and the group");
  if (mins) TORCH_CHECK(mins->sizes() == scales.sizes(), "quant_dense_gemm: mins must match scales");
  const at::Tensor q = q_in.contiguous(), sf = scales.to(at::kFloat).contiguous();
  const at::Tensor mf = mins ? mins->to(at::kFloat).contiguous() : at::Tensor();
  const glm4k::DequantArgs d{q.data_ptr(), sf.data_ptr<float>(), mins ? mf.data_ptr<float>() : nullptr, nullptr,
                             nullptr, K, group, 0, int(bits), int(zero_point)};
  const glm4k::RowFill fill{[](const void* ctx, int64_t n0, int64_t n1, float* out) {
                              glm4k::DequantArgs r = *static_cast<const glm4k::DequantArgs*>(ctx);
                              r.out_f32 = out, r.r0 = n0;
                              glm4k::dequant_rows_avx2(r, n0, n1);
                            },
                            &d};
  glm4k::DenseArgs a{};
  a.N = N, a.K = K;
  return run_f32_gemm(x, a, bias, &fill, "quant_dense_gemm");
}

// GGUF q4_K / q5_K / q6_K blocks [N, K / 256 * block bytes], dequantized as kquant_dequantize_rows does
at::Tensor kquant_dense_gemm(const at::Tensor& x, const at::Tensor& blocks, int64_t type,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(type == glm4k::kQ4K || type == glm4k::kQ5K || type == glm4k::kQ6K,
              "kquant_dense_gemm: ggml type 12 (q4_K), 13 (q5_K) or 14 (q6_K), not ", type);
  const int64_t K = x.dim() == 2 ? x.size(1) : 0;
  check_gemm_x(x, K, "kquant_dense_gemm");
  TORCH_CHECK(K % 256 == 0 && blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.size(1) == K / 256 * glm4k::kquant_block_bytes(int(type)),
              "kquant_dense_gemm: blocks must be contiguous uint8 [N, K / 256 * block bytes], K a multiple of 256");
  struct Ctx {
    int type;
    const uint8_t* blocks;
    int64_t K;
  } c{int(type), blocks.data_ptr<uint8_t>(), K};
  const glm4k::RowFill fill{[](const void* ctx, int64_t n0, int64_t n1, float* out) {
                              const Ctx& k = *static_cast<const Ctx*>(ctx);
                              glm4k::kquant_dequant_rows_avx2(k.type, k.blocks, k.K, n0, n1, out, nullptr);
                            },
                            &c};
  glm4k::DenseArgs a{};
  a.N = blocks.size(0), a.K = K;
  return run_f32_gemm(x, a, bias, &fill, "kquant_dense_gemm");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm4, m) {
  m.def("quant_gemm_i8(Tensor x, Tensor q, Tensor scales, Tensor? mins, int bits, int group, int zero_point) -> Tensor",
        &quant_gemm_i8);
  m.def("dense_gemm(Tensor x, Tensor w, Tensor? bias) -> Tensor", &dense_gemm);
  m.def("quant_dense_gemm(Tensor x, Tensor q, Tensor scales, Tensor? mins, int bits, int group, int zero_point, "
        "Tensor? bias) -> Tensor",
        &quant_dense_gemm);
  m.def("kquant_dense_gemm(Tensor x, Tensor blocks, int type, Tensor? bias) -> Tensor", &kquant_dense_gemm);
}
