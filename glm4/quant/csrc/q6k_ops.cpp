// torch ops over the q6_K kernels (q6k.h): torch.ops.glm4.q6k_mm / q6k_dequantize_rows. Baseline x86-64; callers
// check torch.ops.glm4.isa() is not "none".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "gemv.h"
#include "q6k.h"

namespace {

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

void check_blocks(const at::Tensor& blocks, int64_t K, const char* op) {
  TORCH_CHECK(has_avx2(), "glm4.", op, " needs AVX2 + FMA");
  TORCH_CHECK(K > 0 && K % 256 == 0, op, ": in_features must be a multiple of 256, got ", K);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.size(1) == K / 256 * glm4k::kQ6KBlockBytes,
              op, ": blocks must be contiguous uint8 [N, K / 256 * 210]");
}

// x [..., K] fp32 -> [..., N]: activations per 256 columns at int16 precision (one term) or exact (two), as the
// other integer kernels take them (activations())
at::Tensor q6k_mm(const at::Tensor& x_in, const at::Tensor& blocks, int64_t K) {
  check_blocks(blocks, K, "q6k_mm");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K && x_in.scalar_type() == at::kFloat, "q6k_mm: x float32 [..., K]");
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0), N = blocks.size(0);
  const float* xp = x.data_ptr<float>();
  const bool wide = glm4k::avx512_kernels(), exact = glm4k::exact_kernel_activations();
  const int order = wide ? glm4k::kOrderLanes8 : glm4k::kOrderLanes16;
  std::vector<int16_t> hi(M * K), lo(exact ? M * K : 0);
  std::vector<float> scale(M * K / 256), xsum(M * K / 16);
  for (int64_t g = 0; g < M * K / 16; ++g) {
    float s = 0.f;
    for (int64_t j = 0; j < 16; ++j) s += xp[g * 16 + j];
    xsum[g] = s;
  }
  if (exact) glm4k::act_hilo_avx2(xp, M * K, 256, order, hi.data(), lo.data(), scale.data());
  else glm4k::act_int16_avx2(xp, M * K, 256, order, hi.data(), nullptr, scale.data());
  auto y = at::empty({M, N}, x.options());
  const glm4k::Q6KArgs a{blocks.data_ptr<uint8_t>(), hi.data(), exact ? lo.data() : nullptr, scale.data(),
                         xsum.data(), y.data_ptr<float>(), M, N, K};
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 16, n1 = std::min(N, b1 * 16);
    if (wide) glm4k::q6k_rows_avx512(a, n0, n1);
    else glm4k::q6k_rows_avx2(a, n0, n1);
  });
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

// W rows [r0, r0 + out.size(0)) into `out` (fp32 or bf16 [rows, K]): the large-M path's weight chunks
void q6k_dequantize_rows(const at::Tensor& blocks, int64_t r0, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "q6k_dequantize_rows: out [rows, K] float32 or bfloat16");
  const int64_t K = out.size(1), rows = out.size(0);
  check_blocks(blocks, K, "q6k_dequantize_rows");
  TORCH_CHECK(r0 >= 0 && r0 + rows <= blocks.size(0), "q6k_dequantize_rows: rows out of range");
  const bool f32 = out.scalar_type() == at::kFloat;
  float* of = f32 ? out.data_ptr<float>() : nullptr;
  uint16_t* ob = f32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
    glm4k::q6k_dequant_rows_avx2(blocks.data_ptr<uint8_t>(), K, r0 + i0, r0 + i1,
                                 of ? of + i0 * K : nullptr, ob ? ob + i0 * K : nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm4, m) {
  m.def("q6k_mm(Tensor x, Tensor blocks, int K) -> Tensor", &q6k_mm);
  m.def("q6k_dequantize_rows(Tensor blocks, int r0, Tensor(a!) out) -> ()", &q6k_dequantize_rows);
}
