// torch ops over the streaming kernels: torch.ops.glm4.dense_mm / quant_mm / isa.
// Compiled for baseline x86-64; the kernels run only where the CPU has their instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <vector>

#include "fused.h"
#include "gemv.h"
#include "weight_type.h"
#include "kquant.h"

namespace {

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

bool has_avx512() {  // what gemv_avx512.cpp is compiled for
  static const bool ok = has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
}

bool has_avx512_bf16() {  // what gemv_bf16.cpp is compiled for
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

std::atomic<bool> avx512_allowed{true};  // set_isa("avx2") turns the AVX-512 kernels off (tests run both)

bool has_gfni() {  // what kquant_gfni.cpp is compiled for, beside the AVX-512 set
  static const bool ok = has_avx512() && __builtin_cpu_supports("gfni");
  return ok;
}

std::atomic<bool> gfni_allowed{true};  // set_gfni(False): the AVX-512 kernels without GFNI (tests run both)

bool use_avx512() { return has_avx512() && avx512_allowed.load(std::memory_order_relaxed); }

std::string isa() { return use_avx512() ? "avx512_vnni" : has_avx2() ? "avx2" : "none"; }

// "avx2" or "avx512_vnni" (where the CPU has it): which kernels run from now on; returns the one that ran before
std::string set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "avx512_vnni", "set_isa: avx2 or avx512_vnni, not ", name);
  const std::string before = isa();
  avx512_allowed = name == "avx512_vnni";
  return before;
}


// The integer kernels take activations at int16 precision (one 16-bit integer per column and a scale per block):
// the AVX2 4- / 6-bit kernels (1.4x / 1.5x the exact ones' speed there) and the AVX-512 ones for one activation row
// (4-, 6- and 8-bit: one vpdpwssd term instead of two, 1.3x one thread); "exact" (or GLM4_ACTIVATIONS=exact) gives
// them two int16 terms, ~31 bits: fp32's result; "int8" (GLM4_ACTIVATIONS=int8) gives the AVX2 4- and 6-bit and K-quant
// kernels and AVX-512's q6_K one (kquant_ops.cpp) one 8-bit integer a column, llama.cpp's precision (Zen 3, one
// thread, int4 in L2: 1.5x the int16 kernel; q6_K 1.1x), the other kernels int16. "auto" (the default) gives int8 to
// those kernels (AVX-512: q6_K) where the codes have up to 5 bits
// (glm4's int4, GGUF q4_0 / q4_1 / q4_K / q5_K), whose own rounding swamps the activations' (the shipped model's
// int4 KL to fp32 1.7e-2 at int16 and int8 alike; int6 3.5e-3 -> 3.9e-3 at int8, so 6-bit codes keep int16).
// A linear's act_bits (the ops' argument) puts it in a coarser class: the engine passes the model's coarsest code
// bits (glm4.quant.set_activation_bits), so an int4 model's 6-bit head rounds its activations as the body does.
enum ActMode { kActInt16 = 0, kActExact = 1, kActInt8 = 2, kActAuto = 3 };
const char* const kActNames[] = {"int16", "exact", "int8", "auto"};

int act_mode_of(const std::string& e) {
  return e == "exact" ? kActExact : e == "int8" ? kActInt8 : e == "int16" ? kActInt16 : kActAuto;
}

std::atomic<int> act_mode{[] {
  const char* env = std::getenv("GLM4_ACTIVATIONS");
  return act_mode_of(env ? env : "");
}()};

bool exact_activations() { return act_mode.load(std::memory_order_relaxed) == kActExact; }
// whether the AVX2 kernels of `bits`-bit codes take int8 activations now (4 / 6: glm4's; 5: GGUF q5_K)
bool int8_activations(int bits) {
  const int mode = act_mode.load(std::memory_order_relaxed);
  return mode == kActInt8 || (mode == kActAuto && bits <= 5);
}

std::string activations() { return kActNames[act_mode.load(std::memory_order_relaxed)]; }
}  // namespace

namespace glm4k {  // for the other op files (fused_ops.cpp, kquant_ops.cpp)
bool avx512_kernels() { return use_avx512(); }
bool gfni_kernels() { return use_avx512() && has_gfni() && gfni_allowed.load(std::memory_order_relaxed); }
bool exact_kernel_activations() { return exact_activations(); }
bool int8_kernel_activations(int bits) { return int8_activations(bits); }
}  // namespace glm4k

namespace {

// whether the AVX-512 kernels may use GFNI from now on (where the CPU has it); returns whether they could before
bool set_gfni(bool allowed) { return gfni_allowed.exchange(allowed); }

// "auto", "exact", "int16" or "int8": the integer kernels' activations from now on; returns what ran before
std::string set_activations(const std::string& name) {
  TORCH_CHECK(name == "auto" || name == "exact" || name == "int16" || name == "int8",
              "set_activations: auto, exact, int16 or int8, not ", name);
  const std::string before = activations();
  act_mode = act_mode_of(name);
  return before;
}

void dense_rows(const glm4k::DenseArgs& a, int64_t n0, int64_t n1) {
  if (a.xbf16) glm4k::dense_rows_bf16dot(a, n0, n1);
  else if (a.xperm == glm4k::kPermBf16x32 || use_avx512()) glm4k::dense_rows_avx512(a, n0, n1);
  else glm4k::dense_rows_avx2(a, n0, n1);
}

void quant_rows(const glm4k::QuantArgs& a, int64_t n0, int64_t n1) {
  // AVX-512: int16 activations in blocks of 64k columns, or 8-bit codes in groups of 16k against fp32 ones;
  // int8 terms (xq8) are the AVX2 6-bit kernel's
  if (!a.xq8 && !a.xi8 && (a.xperm || (use_avx512() && (a.xq ? a.xblock % 64 == 0 : a.bits == 4 || a.group % 16 == 0))))
    glm4k::quant_rows_avx512(a, n0, n1);
  else glm4k::quant_rows_avx2(a, n0, n1);
}

constexpr int64_t kRowsPerTask = 16;  // a multiple of every kernel's row block

template <class F>
void parallel_rows(int64_t N, const F& f) {
  const int64_t blocks = (N + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    f(b0 * kRowsPerTask, std::min(N, b1 * kRowsPerTask));
  });
}

// x [..., K] -> y [..., N]: the leading dimensions are the M rows (flattened here, not in Python: ~1 us a call)
std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return sizes;
}

// bf16 weights against activations that are all bf16 values (a bf16 model's, widened by the caller), on a CPU whose
// AVX512_BF16 dot kernel runs: true, with x's values as bf16 bits in `out`
bool bf16_dot_activations(const at::Tensor& x, int wtype, std::vector<uint16_t>& out) {
  if (wtype != glm4k::kBF16 || !use_avx512() || !has_avx512_bf16() || x.size(-1) % 32) return false;
  const uint32_t* p = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  for (int64_t i = 0; i < x.numel(); ++i)
    if (p[i] & 0xFFFF) return false;  // fp32 activations: almost always the first value
  out.resize(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) out[i] = uint16_t(p[i] >> 16);
  return true;
}

at::Tensor dense_mm(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(has_avx2(), "glm4.dense_mm needs AVX2 + FMA");
  TORCH_CHECK(x_in.dim() >= 1 && w.dim() == 2 && x_in.size(-1) == w.size(1), "dense_mm: x [..., K], w [N, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "dense_mm: x must be float32");
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)});
  glm4k::DenseArgs a{};
  a.wtype = glm4k::dense_weight_type(w, "dense_mm");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  const int64_t K = x.size(1);
  std::vector<uint16_t> xbf16;
  if (bf16_dot_activations(xc, a.wtype, xbf16)) {
    a.xbf16 = xbf16.data();
  } else if (a.wtype == glm4k::kBF16 &&
             (use_avx512() ? K % 32 == 0 : K % 16 == 0 && glm4k::bf16_perm_avx2(x.size(0), K))) {
    // x in the bf16 kernel's column order
    at::Tensor xp = at::empty_like(xc);
    const float* src = xc.data_ptr<float>();
    float* dst = xp.data_ptr<float>();
    if (use_avx512())
      for (int64_t i = 0; i < xc.numel(); ++i) dst[i / 32 * 32 + glm4k::perm32_bf16(i % 32)] = src[i];
    else
      for (int64_t i = 0; i < xc.numel(); ++i) dst[i / 16 * 16 + glm4k::perm16_bf16(i % 16)] = src[i];
    xc = xp;
    a.xperm = use_avx512() ? glm4k::kPermBf16x32 : glm4k::kPermBf16x16;
  }
  a.x = xc.data_ptr<float>();
  a.w = wc.data_ptr();
  a.y = y.data_ptr<float>();
  a.M = x.size(0), a.N = w.size(0), a.K = x.size(1);
  parallel_rows(a.N, [&](int64_t n0, int64_t n1) { dense_rows(a, n0, n1); });
  return y.view(out_sizes(x_in, a.N));
}

// columns per activation scale on the integer paths: the largest multiple of `step` <= 256 dividing the group
int64_t act_block(int64_t group, int64_t step = 32) {
  for (int64_t b = 256; b >= step; b -= step)
    if (group % b == 0) return b;
  return 0;
}

// What the quantized kernels need from the activations, per row: group sums (zero point / mins term) and, on the
// 4-bit path, x as two int16 terms per block. Plain loops: torch ops on [1, K] cost more than the work.
struct ActPrep {
  std::vector<float> xsum;  // [M, G]
  std::vector<int16_t> hi, lo;  // [M, K]: x = scale * (hi + lo / 65534); lo empty at int16 precision
  std::vector<int8_t> bytes;    // [M, 2K]: the AVX2 6-bit kernel's int8 terms at int16 precision (QuantArgs.xq8)
  std::vector<int8_t> i8;       // [M, K]: the AVX2 4-bit kernel's int8 activations (QuantArgs.xi8), columns in order
  int bytes_terms = 2;          // 1: `bytes` holds the 6-bit kernel's a terms only (int8 precision)
  std::vector<float> scale;     // [M, K / B]
  int64_t B = 0;
  int order = glm4k::kOrderColumns;  // hi / lo in an AVX-512 kernel's column order (glm4k::ActOrder)

  // max_m: the most activation rows one kernel call gets (M, or the busiest expert's tokens)
  // act_bits: the bits "auto" rounds the activations for (0: the codes' own; a model's coarsest, set_activation_bits)
  ActPrep(const float* x, int64_t M, int64_t K, int64_t group, int64_t bits, bool int16_act, int64_t max_m,
          int64_t act_bits = 0)
      : xsum(M * (K / group)) {
    // the group sums of x itself, but for the int8 path below, which sums what its kernel sees instead (a serial
    // fp32 sum: ~1.3 us per 1024 columns, Zen 3)
    const auto float_sums = [&] {
      for (int64_t i = 0; i < M * (K / group); ++i) {
        float acc = 0.f;
        for (int64_t k = 0; k < group; ++k) acc += x[i * group + k];
        xsum[i] = acc;
      }
    };
    // int16 terms for the 4-bit kernels, and for the 8-bit ones where the AVX-512 kernels take them
    B = int16_act ? act_block(group) : 0;
    // AVX-512 takes them for one activation row only: from M = 2 its fp32 FMA kernels, where each widened code
    // feeds several tokens, beat the two int16 terms (LM head, M = 8, Zen 5: int8 13.5 -> 8.5 ms, int4 16.2 -> 10.1)
    if (use_avx512() && max_m > 1) B = 0;
    // 8-bit codes in groups of 16 or 32 (GGUF q8_0, q6_K, q5_*): the lanes8 kernel, one activation row at int16
    // precision (its fp32 FMA kernel otherwise: 2.1x the time for q6_K's groups of 16, one thread, in L2)
    const bool lanes = bits == 8 && int16_act && use_avx512() && max_m == 1 && !exact_activations() &&
                       (group == 16 || group == 32) && K % 64 == 0;
    if (lanes) B = K % 256 == 0 ? 256 : K % 128 == 0 ? 128 : 64;
    // 8-bit codes: AVX-512 in blocks of 64k columns; AVX2 one int16 term only (kHi), so exact activations keep its
    // fp32 FMA kernel, which two int16 terms do not beat
    if (bits == 8 && (use_avx512() ? B % 64 != 0 : exact_activations())) B = 0;
    if (!B) {
      float_sums();
      return;
    }
    // llama.cpp's precision
    if ((bits == 4 || bits == 6) && int8_activations(int(act_bits ? act_bits : bits)) && !use_avx512()) {
      if (bits == 6) B = act_block(group, 64);  // the 6-bit kernel's blocks
      i8.resize(M * K), scale.resize(M * K / B);
      glm4k::act_int8_avx2(x, M * K, B, i8.data(), scale.data());
      for (int64_t i = 0; i < M * (K / group); ++i) {  // the group sums of what the kernel sees
        float acc = 0.f;
        for (int64_t b0 = i * group; b0 < (i + 1) * group; b0 += B) {
          int32_t t = 0;
          for (int64_t k = 0; k < B; ++k) t += i8[b0 + k];
          acc += scale[b0 / B] * float(t);
        }
        xsum[i] = acc;
      }
      if (bits == 6) {  // as the a terms of QuantArgs.xq8 (perm64 order), x = scale / 256 * (256 a)
        bytes.resize(2 * M * K);
        for (int64_t c = 0; c < M * K; ++c) bytes[c / 64 * 128 + glm4k::perm64(c % 64)] = i8[c];
        for (float& s : scale) s /= 256.f;
        i8.clear(), bytes_terms = 1;
      }
      return;
    }
    float_sums();
    // 4-bit on AVX-512: the perm128 kernels for blocks of 128k columns and of 32 (GGUF q4_0 and kin); blocks of
    // 64 (and K not a multiple of 128) stay in column order, where the plain kernel is faster
    // 6-bit: the perm128 kernel for blocks of 128k columns, the plain one otherwise
    const bool perm = use_avx512() && (bits == 6 ? B % 128 == 0 : bits == 4 && (B % 128 == 0 || (B == 32 && K % 128 == 0)));
    order = lanes ? glm4k::kOrderLanes8 : perm ? glm4k::kOrderPerm128 : glm4k::kOrderColumns;
    if (!exact_activations()) {  // int16 precision: one int16 term; AVX2 6-bit: two int8 terms (QuantArgs.xq8)
      const bool bytes6 = bits == 6 && !(use_avx512() && (perm || B % 64 == 0));  // the AVX2 kernel's blocks
      if (bytes6) B = act_block(group, 64);
      scale.resize(M * K / B);
      if (bytes6) bytes.resize(2 * M * K);
      else hi.resize(M * K);
      glm4k::act_int16_avx2(x, M * K, B, order, hi.empty() ? nullptr : hi.data(), bytes.empty() ? nullptr : bytes.data(),
                            scale.data());
      return;
    }
    hi.resize(M * K), lo.resize(M * K), scale.resize(M * K / B);
    // per block: amax, scale = amax / 32767, hi / lo rounded to nearest even in double (gemv_avx2.cpp); every caller
    // checked the CPU has AVX2
    glm4k::act_hilo_avx2(x, M * K, B, order, hi.data(), lo.data(), scale.data());
  }

  // the kernel arguments for activation rows [row0, row0 + M)
  void fill(glm4k::QuantArgs& a, int64_t row0, int64_t K, int64_t group) const {
    a.xsum = xsum.data() + row0 * (K / group);
    a.xq = B && !hi.empty() ? hi.data() + row0 * K : nullptr;
    a.xq_lo = B && !lo.empty() ? lo.data() + row0 * K : nullptr;
    a.xq8 = B && !bytes.empty() ? bytes.data() + row0 * 2 * K : nullptr;
    a.xq8_terms = bytes_terms;
    a.xi8 = B && !i8.empty() ? i8.data() + row0 * K : nullptr;
    a.xscale = B ? scale.data() + row0 * (K / B) : nullptr;
    a.xblock = B;
    a.xperm = order;
  }
};

// group sizes must be multiples of this; bytes per weight row of K columns
using glm4k::min_group;
using glm4k::row_bytes;

void check_quant(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                 const std::optional<at::Tensor>& mins, int64_t bits, int64_t group) {
  const int64_t K = x.size(1), N = q.size(-2);
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "quant_mm: bits must be 4, 6 or 8");
  TORCH_CHECK(group > 0 && K % group == 0 && group % min_group(bits) == 0, "quant_mm: bad group size");
  TORCH_CHECK(q.size(-1) == row_bytes(bits, K), "quant_mm: q shape does not match K");
  TORCH_CHECK(q.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "quant_mm: q dtype");
  TORCH_CHECK(scales.dim() == q.dim() && scales.size(-2) == N && scales.size(-1) == K / group, "quant_mm: scales shape");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, "quant_mm: scales dtype");
  if (mins) TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type(),
                        "quant_mm: mins must match scales");
}

at::Tensor quant_mm(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scales,
                    const std::optional<at::Tensor>& mins, int64_t bits, int64_t group, int64_t zero_point,
                    bool int16_act, int64_t act_bits) {
  TORCH_CHECK(has_avx2(), "glm4.quant_mm needs AVX2 + FMA");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kFloat, "quant_mm: x must be float32 [..., K]");
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)});
  TORCH_CHECK(q.dim() == 2, "quant_mm: q [N, K']");
  check_quant(x, q, scales, mins, bits, group);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto xc = x.contiguous(), qc = q.contiguous(), sc = scales.contiguous();
  at::Tensor mc = mins ? mins->contiguous() : at::Tensor();
  const ActPrep prep(xc.data_ptr<float>(), M, K, group, bits, int16_act, M, act_bits);
  auto y = at::empty({M, N}, x.options());
  glm4k::QuantArgs a{};
  a.x = xc.data_ptr<float>();
  prep.fill(a, 0, K, group);
  a.q = qc.data_ptr();
  a.scales = sc.data_ptr();
  a.mins = mins ? mc.data_ptr() : nullptr;
  a.y = y.data_ptr<float>();
  a.M = M, a.N = N, a.K = K, a.group = group;
  a.bits = int(bits), a.scale_f16 = scales.scalar_type() == at::kHalf, a.zero_point = int(zero_point);
  parallel_rows(N, [&](int64_t n0, int64_t n1) { quant_rows(a, n0, n1); });
  return y.view(out_sizes(x_in, N));
}

// W rows [r0, r0 + out.size(0)) into `out` (fp32 or bf16 [rows, K]), equal to QuantLinear.dequantize (bf16: rounded
// once from that fp32 value, as .to(bf16)): the large-M path dequantizes chunks into one reused buffer for a GEMM.
void dequantize_rows(const at::Tensor& q, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
                     int64_t bits, int64_t group, int64_t zero_point, int64_t r0, at::Tensor& out) {
  TORCH_CHECK(has_avx2(), "glm4.dequantize_rows needs AVX2 + FMA");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && scales.is_contiguous(), "dequantize_rows: contiguous q [N, K']");
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "dequantize_rows: bits must be 4, 6 or 8");
  const int64_t N = q.size(0), K = out.size(1), G = K / group, r1 = r0 + out.size(0);
  TORCH_CHECK(0 <= r0 && r1 <= N && K % group == 0 && group % min_group(bits) == 0 && scales.size(1) == G &&
                  q.size(1) == row_bytes(bits, K),
              "dequantize_rows: shapes");
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) && out.is_contiguous(),
              "dequantize_rows: out [rows, K] float32 or bfloat16");
  const bool to_bf16 = out.scalar_type() == at::kBFloat16;
  at::Tensor sf = scales.to(at::kFloat).contiguous();
  at::Tensor mf = mins ? mins->to(at::kFloat).contiguous() : at::Tensor();
  glm4k::DequantArgs d{q.data_ptr(), sf.data_ptr<float>(), mins ? mf.data_ptr<float>() : nullptr,
                       to_bf16 ? nullptr : out.data_ptr<float>(),
                       to_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr,
                       K, group, r0, int(bits), int(zero_point)};
  const bool wide = use_avx512() && (bits != 8 || group % 16 == 0);
  at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
    wide ? glm4k::dequant_rows_avx512(d, a, b) : glm4k::dequant_rows_avx2(d, a, b);
  });
}

// MoE: xs [S, K] sorted by expert, counts [E]; w [E, N, K] dense (bits 0), codes [E, N, K'] with scales / mins
// [E, N, G], or (ggml_type 12 / 13 / 14) GGUF K-quant blocks [E, N, K / 256 * block bytes]. Every (busy expert,
// block of rows) is one task: the streaming kernels with M = that expert's tokens.
// one_row: xs [1, K] is every busy expert's one row (a decode step's token: expert_glu's gate / up), prepared once
at::Tensor expert_rows(const at::Tensor& xs, const at::Tensor& counts, const at::Tensor& w,
                       const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& mins, int64_t bits,
                       int64_t group, int64_t zero_point, int64_t ggml_type, int64_t act_bits, bool one_row) {
  TORCH_CHECK(has_avx2(), "glm4.expert_mm needs AVX2 + FMA");
  TORCH_CHECK(xs.dim() == 2 && xs.scalar_type() == at::kFloat, "expert_mm: xs must be float32 [S, K]");
  TORCH_CHECK(w.dim() == 3 && counts.dim() == 1 && counts.size(0) == w.size(0), "expert_mm: w [E, N, K'], counts [E]");
  const int64_t S = xs.size(0), K = xs.size(1), E = w.size(0), N = w.size(1);
  if (ggml_type) {
    TORCH_CHECK(ggml_type == glm4k::kQ4K || ggml_type == glm4k::kQ5K || ggml_type == glm4k::kQ6K,
                "expert_mm: ggml type 12 (q4_K), 13 (q5_K) or 14 (q6_K), not ", ggml_type);
    TORCH_CHECK(K % 256 == 0 && w.scalar_type() == at::kByte &&
                    w.size(2) == K / 256 * glm4k::kquant_block_bytes(int(ggml_type)),
                "expert_mm: K-quant blocks uint8 [E, N, K / 256 * block bytes] with K a multiple of 256");
  } else if (bits) {
    TORCH_CHECK(scales.has_value(), "expert_mm: quantized weights need scales");
    check_quant(xs, w, *scales, mins, bits, group);
  } else {
    TORCH_CHECK(w.size(2) == K, "expert_mm: w [E, N, K]");
  }
  auto xc = xs.contiguous(), wc = w.contiguous();
  auto cnt = counts.to(at::kLong).contiguous();
  const bool codes = bits && !ggml_type;  // K-quant blocks carry their scales
  at::Tensor sc = codes ? scales->contiguous() : at::Tensor(), mc = codes && mins ? mins->contiguous() : at::Tensor();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + cnt.data_ptr<int64_t>()[e];
  bool fits = one_row ? S == 1 : start[E] == S;  // one_row: each expert busy with that one row or idle
  for (int64_t e = 0; one_row && e < E; ++e) fits = fits && start[e + 1] - start[e] <= 1;
  TORCH_CHECK(fits, "expert_mm: counts must sum to the rows of xs");
  const auto xrow = [&](int64_t e) { return one_row ? int64_t(0) : start[e]; };  // expert e's first activation row
  // one task per (busy expert, block of rows), the blocks as long as leaves each thread 4 tasks or more: a decode
  // step's 8 busy experts go a whole matrix a call (each call starts its own prefetch, tile loop and arguments:
  // the 697M MoE's int4 experts from memory, 2 threads, Zen 4: 1.07-1.09x blocks of 16 rows)
  int64_t busy = 0;
  for (int64_t e = 0; e < E; ++e) busy += start[e + 1] > start[e];
  const int64_t share = busy * N / (4 * int64_t(at::get_num_threads()));
  const int64_t rows = std::max(kRowsPerTask, (share + kRowsPerTask - 1) / kRowsPerTask * kRowsPerTask);
  struct Task { int64_t e, n0, n1; };
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e])
      for (int64_t n0 = 0; n0 < N; n0 += rows) tasks.push_back({e, n0, std::min(N, n0 + rows)});
  auto y = at::empty({start[E], N}, xs.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto* wp = static_cast<const char*>(wc.data_ptr());
  const int64_t w_stride = N * wc.size(2) * wc.element_size();  // bytes per expert
  if (ggml_type) {
    const glm4k::KQuantActs acts(xp, S, K, int(ggml_type), int(act_bits));
    at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const Task& tk = tasks[t];
        acts.rows(reinterpret_cast<const uint8_t*>(wp) + tk.e * w_stride, xrow(tk.e), start[tk.e + 1] - start[tk.e],
                  yp + start[tk.e] * N, N, tk.n0, tk.n1);
      }
    });
    return y;
  }
  if (!bits) {
    const int wtype = glm4k::dense_weight_type(w, "expert_mm (dense experts)");
    std::vector<uint16_t> xbf16;
    const bool dot = bf16_dot_activations(xc, wtype, xbf16);  // bf16 experts: dense_mm's dot kernel
    at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const Task& tk = tasks[t];
        glm4k::DenseArgs a{xp + xrow(tk.e) * K, wp + tk.e * w_stride, yp + start[tk.e] * N,
                           start[tk.e + 1] - start[tk.e], N, K, wtype, 0, dot ? xbf16.data() + xrow(tk.e) * K : nullptr};
        dense_rows(a, tk.n0, tk.n1);
      }
    });
    return y;
  }
  int64_t busiest = 0;
  for (int64_t e = 0; e < E; ++e) busiest = std::max(busiest, start[e + 1] - start[e]);
  const ActPrep prep(xp, S, K, group, bits, true, busiest, act_bits);
  const int64_t G = K / group, s_stride = N * G * sc.element_size();
  at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = tasks[t];
      glm4k::QuantArgs a{};
      a.x = xp + xrow(tk.e) * K;
      prep.fill(a, xrow(tk.e), K, group);
      a.q = wp + tk.e * w_stride;
      a.scales = static_cast<const char*>(sc.data_ptr()) + tk.e * s_stride;
      a.mins = mc.defined() ? static_cast<const char*>(mc.data_ptr()) + tk.e * s_stride : nullptr;
      a.y = yp + start[tk.e] * N;
      a.M = start[tk.e + 1] - start[tk.e], a.N = N, a.K = K, a.group = group;
      a.bits = int(bits), a.scale_f16 = sc.scalar_type() == at::kHalf, a.zero_point = int(zero_point);
      quant_rows(a, tk.n0, tk.n1);
    }
  });
  return y;
}

at::Tensor expert_mm(const at::Tensor& xs, const at::Tensor& counts, const at::Tensor& w,
                     const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& mins, int64_t bits,
                     int64_t group, int64_t zero_point, int64_t ggml_type, int64_t act_bits) {
  return expert_rows(xs, counts, w, scales, mins, bits, group, zero_point, ggml_type, act_bits, false);
}

// out [T, H] = sum_j weights[t, j] * y[slot[t * k + j]]: the expert-sorted rows back in token order, each weighted,
// added in slot order in fp32 (as layers.moe.dispatch_experts adds them)
void combine_rows(const float* y, const int64_t* slot, const float* weights, int64_t T, int64_t k, int64_t H,
                  float* out) {
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / (k * H)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + t * H;
      std::fill(o, o + H, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float w = weights[t * k + j];
        const float* yr = y + slot[t * k + j] * H;
        for (int64_t c = 0; c < H; ++c) o[c] += yr[c] * w;
      }
    }
  });
}

// MoE for many tokens: y [S, H] fp32 in the order `order` [S] put the (token, slot) pairs (pair p = t * k + j at row
// r where order[r] = p), weights [T, k] fp32 -> out [T, H] (combine_rows)
at::Tensor moe_combine(const at::Tensor& y, const at::Tensor& order, const at::Tensor& weights) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat, "moe_combine: y must be float32 [S, H]");
  TORCH_CHECK(weights.dim() == 2 && weights.scalar_type() == at::kFloat && order.dim() == 1 &&
                  order.size(0) == y.size(0) && weights.numel() == y.size(0),
              "moe_combine: order [S] and float32 weights [T, k] with T * k = S");
  const int64_t S = y.size(0), H = y.size(1);
  auto ord = order.to(at::kLong).contiguous();
  const int64_t* op = ord.data_ptr<int64_t>();
  std::vector<int64_t> slot(S, -1);
  for (int64_t r = 0; r < S; ++r) {
    TORCH_CHECK(0 <= op[r] && op[r] < S && slot[op[r]] < 0, "moe_combine: order must be a permutation of 0..S-1");
    slot[op[r]] = r;
  }
  auto yc = y.contiguous(), wc = weights.contiguous();
  auto out = at::empty({weights.size(0), H}, y.options());
  combine_rows(yc.data_ptr<float>(), slot.data(), wc.data_ptr<float>(), weights.size(0), weights.size(1), H,
               out.data_ptr<float>());
  return out;
}

// MoE for a few tokens (decode): out [T, H] = sum_j weights[t, j] * down[e](silu(gate[e] x_t) * up[e] x_t), e =
// indices[t, j], as layers.moe.dispatch_experts computes it (pairs grouped by expert in slot order, the weighted
// terms added in slot order in fp32) in one call instead of ~15 torch ops. gate_up [E, 2I, H] gate rows first; each
// projection as expert_mm takes it (dense, codes, or K-quant blocks).
at::Tensor expert_glu(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& gu,
                      const std::optional<at::Tensor>& gu_scales, const std::optional<at::Tensor>& gu_mins,
                      int64_t gu_bits, int64_t gu_group, int64_t gu_zero_point, const at::Tensor& dn,
                      const std::optional<at::Tensor>& dn_scales, const std::optional<at::Tensor>& dn_mins,
                      int64_t dn_bits, int64_t dn_group, int64_t dn_zero_point, int64_t gu_ggml_type,
                      int64_t dn_ggml_type, int64_t act_bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "expert_glu: x must be float32 [T, H]");
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == x.size(0) && weights.sizes() == indices.sizes() &&
                  weights.scalar_type() == at::kFloat,
              "expert_glu: indices [T, k] and float32 weights [T, k]");
  const int64_t T = x.size(0), H = x.size(1), k = indices.size(1), S = T * k, E = gu.size(0);
  auto idx = indices.to(at::kLong).contiguous();
  auto wts = weights.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  auto counts = at::zeros({E}, idx.options());
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < S; ++p) {
    TORCH_CHECK(0 <= ip[p] && ip[p] < E, "expert_glu: expert index ", ip[p], " out of range [0, ", E, ")");
    ++cp[ip[p]];
  }
  std::vector<int64_t> next(E, 0), slot(S);  // slot[p]: row of pair p in the expert-sorted order (stable)
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + cp[e - 1];
  for (int64_t p = 0; p < S; ++p) slot[p] = next[ip[p]]++;
  auto xc = x.contiguous();
  // one token over distinct experts (a decode step's): its row prepared once for all of them; else a copy a pair
  const bool one_row = T == 1 && *std::max_element(cp, cp + E) <= 1;
  at::Tensor xs = one_row ? xc : at::empty({S, H}, x.options());
  for (int64_t p = 0; !one_row && p < S; ++p)
    std::memcpy(xs.data_ptr<float>() + slot[p] * H, xc.data_ptr<float>() + (p / k) * H, H * sizeof(float));
  at::Tensor h = expert_rows(xs, counts, gu, gu_scales, gu_mins, gu_bits, gu_group, gu_zero_point, gu_ggml_type,
                             act_bits, one_row);
  const int64_t I = h.size(1) / 2;
  auto act = at::empty({S, I}, x.options());
  const float* hp = h.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  for (int64_t r = 0; r < S; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const float g = hp[r * 2 * I + i];
      ap[r * I + i] = g / (1.f + std::exp(-g)) * hp[r * 2 * I + I + i];
    }
  at::Tensor y =
      expert_mm(act, counts, dn, dn_scales, dn_mins, dn_bits, dn_group, dn_zero_point, dn_ggml_type, act_bits);
  TORCH_CHECK(y.size(1) == H, "expert_glu: down must map back to the hidden size");
  auto out = at::empty({T, H}, x.options());
  combine_rows(y.data_ptr<float>(), slot.data(), wts.data_ptr<float>(), T, k, H, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(glm4, m) {
  m.def("isa() -> str", &isa);
  m.def("set_isa(str name) -> str", &set_isa);
  m.def("activations() -> str", &activations);
  m.def("set_activations(str name) -> str", &set_activations);
  m.def("set_gfni(bool allowed) -> bool", &set_gfni);
  m.def("dense_mm(Tensor x, Tensor w) -> Tensor", &dense_mm);
  m.def("quant_mm(Tensor x, Tensor q, Tensor scales, Tensor? mins, int bits, int group, int zero_point, "
        "bool int16_act=True, int act_bits=0) -> Tensor",
        &quant_mm);
  m.def("dequantize_rows(Tensor q, Tensor scales, Tensor? mins, int bits, int group, int zero_point, int r0, "
        "Tensor(a!) out) -> ()",
        &dequantize_rows);
  m.def("expert_mm(Tensor xs, Tensor counts, Tensor w, Tensor? scales, Tensor? mins, int bits, int group, "
        "int zero_point, int ggml_type=0, int act_bits=0) -> Tensor",
        &expert_mm);
  m.def("moe_combine(Tensor y, Tensor order, Tensor weights) -> Tensor", &moe_combine);
  m.def("expert_glu(Tensor x, Tensor indices, Tensor weights, Tensor gu, Tensor? gu_scales, Tensor? gu_mins, "
        "int gu_bits, int gu_group, int gu_zero_point, Tensor dn, Tensor? dn_scales, Tensor? dn_mins, int dn_bits, "
        "int dn_group, int dn_zero_point, int gu_ggml_type=0, int dn_ggml_type=0, int act_bits=0) -> Tensor",
        &expert_glu);
}

// a Python module only so that `import glm4.quant._C` loads the library (ops register on load)
static struct PyModuleDef glm4_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&glm4_c_module); }
