// GGUF q6_K, run as the file holds it: per 256 weights 210 bytes, ql[128] (low nibbles), qh[64] (high bit pairs),
// sc[16] (int8 scale per 16 weights), d (fp16): w[e] = d * sc[e / 16] * (q[e] - 32). In each half of 128 weights
// (ql + 64 h, qh + 32 h), for l < 32: q[l] = ql[l] & 15 | (qh[l] & 3) << 4, q[32 + l] = ql[32 + l] & 15 |
// (qh[l] >> 2 & 3) << 4, q[64 + l] = ql[l] >> 4 | (qh[l] >> 4 & 3) << 4, q[96 + l] = ql[32 + l] >> 4 |
// (qh[l] >> 6) << 4 (gguf-py's dequantize). 6.56 bits a weight, as llama.cpp streams it; as 8-bit codes with fp32
// scales per 16 it was 10.
#pragma once
#include <cstdint>

namespace glm4k {

constexpr int64_t kQ6KBlockBytes = 210;

struct Q6KArgs {
  const uint8_t* blocks;  // [N, K / 256 * 210]
  const int16_t* xq;      // [M, K]: x = xscale * (xq + xq_lo / 65534) per 256 columns, in the kernel's ActOrder
  const int16_t* xq_lo;   // nullptr: int16 precision (x = xscale * xq)
  const float* xscale;    // [M, K / 256]
  const float* xsum;      // [M, K / 16]: sum of x per 16 columns (the - 32 term)
  float* y;               // [M, N]
  int64_t M, N, K;
};

bool avx512_kernels();            // ops.cpp: the AVX-512 set runs (the CPU has it and set_isa allows it)
bool exact_kernel_activations();  // ops.cpp: activations() is "exact"

// rows [n0, n1) of y; AVX-512: xq in the lanes8 order (gemv.h), AVX2: lanes16
void q6k_rows_avx512(const Q6KArgs& a, int64_t n0, int64_t n1);
void q6k_rows_avx2(const Q6KArgs& a, int64_t n0, int64_t n1);

// rows [r0, r1) of W into out_f32 or out_bf16 ([r1 - r0, K]; bf16 rounded to nearest even from the fp32 value),
// equal to gguf-py's dequantize bit for bit
void q6k_dequant_rows_avx2(const uint8_t* blocks, int64_t K, int64_t r0, int64_t r1, float* out_f32,
                           uint16_t* out_bf16);

}  // namespace glm4k
