// torch ops over the K-quant kernels (kquant.h): torch.ops.glm4.kquant_mm / kquant_dequantize_rows (q4_K, q5_K,
// q6_K).
// Baseline x86-64; callers check torch.ops.glm4.isa() is not "none".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "gemv.h"
#include "kquant.h"

namespace {

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

void check_blocks(const at::Tensor& blocks, int64_t type, int64_t K, const char* op) {
  TORCH_CHECK(has_avx2(), "glm4.", op, " needs AVX2 + FMA");
  TORCH_CHECK(type == glm4k::kQ4K || type == glm4k::kQ5K || type == glm4k::kQ6K, op,
              ": ggml type 12 (q4_K), 13 (q5_K) or 14 (q6_K), not ", type);
  TORCH_CHECK(K > 0 && K % 256 == 0, op, ": in_features must be a multiple of 256, got ", K);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.size(1) == K / 256 * glm4k::kquant_block_bytes(int(type)),
              op, ": blocks must be contiguous uint8 [N, K / 256 * block bytes]");
}

}  // namespace

namespace glm4k {
int kquant_order(int type, bool avx512) {
  return !avx512 ? kOrderLanes16 : type == kQ6K ? kOrderLanes8 : kOrderQ4K128;
}
}  // namespace glm4k

namespace {

// x [..., K] fp32 -> [..., N]: activations per 256 columns at int16 precision (one term) or exact (two), as the
// other integer kernels take them (activations())
at::Tensor kquant_mm(const at::Tensor& x_in, const at::Tensor& blocks, int64_t K, int64_t type) {
  check_blocks(blocks, type, K, "kquant_mm");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K && x_in.scalar_type() == at::kFloat,
              "kquant_mm: x float32 [..., K]");
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0), N = blocks.size(0), group = glm4k::kquant_group(int(type));
  const float* xp = x.data_ptr<float>();
  const bool wide = glm4k::avx512_kernels(), exact = glm4k::exact_kernel_activations();
  const int order = glm4k::kquant_order(int(type), wide);
  std::vector<int16_t> hi(M * K), lo(exact ? M * K : 0);
  std::vector<float> scale(M * K / 256), xsum(M * K / group);
  for (int64_t g = 0; g < M * K / group; ++g) {
    float s = 0.f;
    for (int64_t j = 0; j < group; ++j) s += xp[g * group + j];
    xsum[g] = s;
  }
  if (exact) glm4k::act_hilo_avx2(xp, M * K, 256, order, hi.data(), lo.data(), scale.data());
  else glm4k::act_int16_avx2(xp, M * K, 256, order, hi.data(), nullptr, scale.data());
  auto y = at::empty({M, N}, x.options());
  const glm4k::KQuantArgs a{blocks.data_ptr<uint8_t>(), hi.data(), exact ? lo.data() : nullptr, scale.data(),
                            xsum.data(), y.data_ptr<float>(), M, N, K};
  auto rows = wide ? (type == glm4k::kQ6K ? glm4k::q6k_rows_avx512 : type == glm4k::kQ5K ? glm4k::q5k_rows_avx512
                                                                                         : glm4k::q4k_rows_avx512)
                   : (type == glm4k::kQ6K ? glm4k::q6k_rows_avx2 : type == glm4k::kQ5K ? glm4k::q5k_rows_avx2
                                                                                       : glm4k::q4k_rows_avx2);
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t b0, int64_t b1) { rows(a, b0 * 16, std::min(N, b1 * 16)); });
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

// W rows [r0, r0 + out.size(0)) into `out` (fp32 or bf16 [rows, K]): the large-M path's weight chunks
void kquant_dequantize_rows(const at::Tensor& blocks, int64_t type, int64_t r0, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "kquant_dequantize_rows: out [rows, K] float32 or bfloat16");
  const int64_t K = out.size(1), rows = out.size(0);
  check_blocks(blocks, type, K, "kquant_dequantize_rows");
  TORCH_CHECK(r0 >= 0 && r0 + rows <= blocks.size(0), "kquant_dequantize_rows: rows out of range");
  const bool f32 = out.scalar_type() == at::kFloat;
  float* of = f32 ? out.data_ptr<float>() : nullptr;
  uint16_t* ob = f32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
    glm4k::kquant_dequant_rows_avx2(int(type), blocks.data_ptr<uint8_t>(), K, r0 + i0, r0 + i1,
                                    of ? of + i0 * K : nullptr, ob ? ob + i0 * K : nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm4, m) {
  m.def("kquant_mm(Tensor x, Tensor blocks, int K, int type) -> Tensor", &kquant_mm);
  m.def("kquant_dequantize_rows(Tensor blocks, int type, int r0, Tensor(a!) out) -> ()", &kquant_dequantize_rows);
}
