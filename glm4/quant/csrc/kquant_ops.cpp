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

KQuantActs::KQuantActs(const float* x, int64_t M, int64_t K, int type, int act_bits)
    : K_(K), group_(kquant_group(type)), exact_(exact_kernel_activations()) {
  const bool wide = avx512_kernels();
  const int bits = act_bits ? act_bits : type == kQ6K ? 6 : type == kQ5K ? 5 : 4;
  int8_ = int8_kernel_activations(bits) && (!wide || type == kQ6K);  // llama.cpp's precision (q8_K)
  rows_ = wide ? (type == kQ6K ? q6k_rows_avx512 : type == kQ5K ? q5k_rows_avx512 : q4k_rows_avx512)
               : (type == kQ6K ? q6k_rows_avx2 : type == kQ5K ? q5k_rows_avx2 : q4k_rows_avx2);
  const int order = kquant_order(type, wide);
  scale_.resize(M * K / 256), xsum_.resize(M * K / group_);
  if (int8_) {  // the sums per scale group (16 or 32 columns) of what the kernel sees, as integers
    i8_.resize(M * K), i8sum_.resize(M * K / group_);
    act_int8_avx2(x, M * K, 256, i8_.data(), scale_.data());
    for (int64_t g = 0; g < M * K / group_; ++g) {
      int32_t t = 0;
      for (int64_t j = 0; j < group_; ++j) t += i8_[g * group_ + j];
      i8sum_[g] = int16_t(t);  // |t| <= 32 * 127
    }
    return;
  }
  hi_.resize(M * K), lo_.resize(exact_ ? M * K : 0);
  for (int64_t g = 0; g < M * K / group_; ++g) {
    float s = 0.f;
    for (int64_t j = 0; j < group_; ++j) s += x[g * group_ + j];
    xsum_[g] = s;
  }
  if (exact_) act_hilo_avx2(x, M * K, 256, order, hi_.data(), lo_.data(), scale_.data());
  else act_int16_avx2(x, M * K, 256, order, hi_.data(), nullptr, scale_.data());
}

void KQuantActs::rows(const uint8_t* blocks, int64_t row0, int64_t M, float* y, int64_t N, int64_t n0,
                      int64_t n1) const {
  const KQuantArgs a{blocks, int8_ ? nullptr : hi_.data() + row0 * K_, exact_ ? lo_.data() + row0 * K_ : nullptr,
                     int8_ ? i8_.data() + row0 * K_ : nullptr, int8_ ? i8sum_.data() + row0 * (K_ / group_) : nullptr,
                     scale_.data() + row0 * (K_ / 256),
                     xsum_.data() + row0 * (K_ / group_), y, M, N, K_};
  rows_(a, n0, n1);
}
}  // namespace glm4k

namespace {

// x [..., K] fp32 -> [..., N]: activations per 256 columns at int16 precision (one term), exact (two) or, on AVX2,
// int8, as the other integer kernels take them (activations())
at::Tensor kquant_mm(const at::Tensor& x_in, const at::Tensor& blocks, int64_t K, int64_t type,
                     int64_t act_bits) {
  check_blocks(blocks, type, K, "kquant_mm");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K && x_in.scalar_type() == at::kFloat,
              "kquant_mm: x float32 [..., K]");
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0), N = blocks.size(0);
  const glm4k::KQuantActs acts(x.data_ptr<float>(), M, K, int(type), int(act_bits));
  auto y = at::empty({M, N}, x.options());
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
    acts.rows(blocks.data_ptr<uint8_t>(), 0, M, y.data_ptr<float>(), N, b0 * 16, std::min(N, b1 * 16));
  });
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
  m.def("kquant_mm(Tensor x, Tensor blocks, int K, int type, int act_bits=0) -> Tensor", &kquant_mm);
  m.def("kquant_dequantize_rows(Tensor blocks, int type, int r0, Tensor(a!) out) -> ()", &kquant_dequantize_rows);
}
