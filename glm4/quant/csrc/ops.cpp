// torch ops over the streaming kernels: torch.ops.glm4.dense_mm / quant_mm / isa.
// Compiled for baseline x86-64; the kernels run only where the CPU has their instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gemv.h"

namespace {

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

std::string isa() { return has_avx2() ? "avx2" : "none"; }

constexpr int64_t kRowsPerTask = 16;  // a multiple of every kernel's row block

template <class F>
void parallel_rows(int64_t N, const F& f) {
  const int64_t blocks = (N + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    f(b0 * kRowsPerTask, std::min(N, b1 * kRowsPerTask));
  });
}

at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(has_avx2(), "glm4.dense_mm needs AVX2 + FMA");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "dense_mm: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "dense_mm: x must be float32");
  glm4k::DenseArgs a{};
  switch (w.scalar_type()) {
    case at::kFloat: a.wtype = glm4k::kF32; break;
    case at::kBFloat16: a.wtype = glm4k::kBF16; break;
    case at::kHalf: a.wtype = glm4k::kF16; break;
    default: TORCH_CHECK(false, "dense_mm: w must be float32, bfloat16 or float16");
  }
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  a.x = xc.data_ptr<float>();
  a.w = wc.data_ptr();
  a.y = y.data_ptr<float>();
  a.M = x.size(0), a.N = w.size(0), a.K = x.size(1);
  parallel_rows(a.N, [&](int64_t n0, int64_t n1) { glm4k::dense_rows_avx2(a, n0, n1); });
  return y;
}

// columns per activation scale on the int16 path: the largest multiple of 32 <= 256 dividing the group
int64_t act_block(int64_t group) {
  for (int64_t b = 256; b >= 32; b -= 32)
    if (group % b == 0) return b;
  return 0;
}

at::Tensor quant_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                    const std::optional<at::Tensor>& mins, int64_t bits, int64_t group, int64_t zero_point,
                    bool int16_act) {
  TORCH_CHECK(has_avx2(), "glm4.quant_mm needs AVX2 + FMA");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "quant_mm: x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(bits == 4 || bits == 8, "quant_mm: bits must be 4 or 8");
  TORCH_CHECK(group > 0 && K % group == 0 && group % (bits == 4 ? 32 : 8) == 0, "quant_mm: bad group size");
  TORCH_CHECK(q.dim() == 2 && q.size(1) == (bits == 4 ? K / 2 : K), "quant_mm: q shape does not match K");
  TORCH_CHECK(q.scalar_type() == (bits == 4 ? at::kByte : at::kChar), "quant_mm: q dtype");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group, "quant_mm: scales shape");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, "quant_mm: scales dtype");
  if (mins) TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type(),
                        "quant_mm: mins must match scales");
  auto xc = x.contiguous(), qc = q.contiguous(), sc = scales.contiguous();
  at::Tensor mc = mins ? mins->contiguous() : at::Tensor();
  const float* xp = xc.data_ptr<float>();
  const int64_t G = K / group;
  std::vector<float> xsum(M * G);  // plain loops: torch ops on [1, K] cost more than the work
  for (int64_t i = 0; i < M * G; ++i) {
    float acc = 0.f;
    for (int64_t k = 0; k < group; ++k) acc += xp[i * group + k];
    xsum[i] = acc;
  }
  std::vector<int16_t> xq, xq_lo;
  std::vector<float> xscale;
  const int64_t B = bits == 4 && int16_act ? act_block(group) : 0;
  if (B) {  // x = sc * (hi + lo / 65534): hi = round(x / sc), lo = round((x / sc - hi) * 65534), |hi|, |lo| <= 32767
    xq.resize(M * K);
    xq_lo.resize(M * K);
    xscale.resize(M * K / B);
    for (int64_t i = 0; i < M * K / B; ++i) {
      float amax = 0.f;
      for (int64_t k = 0; k < B; ++k) amax = std::max(amax, std::fabs(xp[i * B + k]));
      const double inv = amax > 0.f ? 32767.0 / amax : 0.0;
      xscale[i] = float(amax / 32767.0);
      for (int64_t k = 0; k < B; ++k) {
        const double v = xp[i * B + k] * inv;
        const double hi = std::clamp(std::nearbyint(v), -32767.0, 32767.0);
        xq[i * B + k] = int16_t(hi);
        xq_lo[i * B + k] = int16_t(std::clamp(std::nearbyint((v - hi) * 65534.0), -32767.0, 32767.0));
      }
    }
  }
  auto y = at::empty({M, N}, x.options());
  glm4k::QuantArgs a{};
  a.x = xp;
  a.xsum = xsum.data();
  a.xq = B ? xq.data() : nullptr;
  a.xq_lo = B ? xq_lo.data() : nullptr;
  a.xscale = B ? xscale.data() : nullptr;
  a.xblock = B;
  a.q = qc.data_ptr();
  a.scales = sc.data_ptr();
  a.mins = mins ? mc.data_ptr() : nullptr;
  a.y = y.data_ptr<float>();
  a.M = M, a.N = N, a.K = K, a.group = group;
  a.bits = int(bits), a.scale_f16 = scales.scalar_type() == at::kHalf, a.zero_point = int(zero_point);
  parallel_rows(N, [&](int64_t n0, int64_t n1) { glm4k::quant_rows_avx2(a, n0, n1); });
  return y;
}

}  // namespace

TORCH_LIBRARY(glm4, m) {
  m.def("isa() -> str", &isa);
  m.def("dense_mm(Tensor x, Tensor w) -> Tensor", &dense_mm);
  m.def("quant_mm(Tensor x, Tensor q, Tensor scales, Tensor? mins, int bits, int group, int zero_point, "
        "bool int16_act=True) -> Tensor",
        &quant_mm);
}

// a Python module only so that `import glm4.quant._C` loads the library (ops register on load)
static struct PyModuleDef glm4_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&glm4_c_module); }
