// GGUF K-quants run as the file holds them (256 weights a block), where glm4's grouped formats would cost more
// bytes: the scales are d * sc products exact only in fp32, one per 16 or 32 weights.
//
// q6_K, 210 bytes: ql[128] (low nibbles), qh[64] (high bit pairs), sc[16] (int8 scale per 16 weights), d (fp16):
// w[e] = d * sc[e / 16] * (q[e] - 32). In each half of 128 weights (ql + 64 h, qh + 32 h), for l < 32:
// q[l] = ql[l] & 15 | (qh[l] & 3) << 4, q[32 + l] = ql[32 + l] & 15 | (qh[l] >> 2 & 3) << 4,
// q[64 + l] = ql[l] >> 4 | (qh[l] >> 4 & 3) << 4, q[96 + l] = ql[32 + l] >> 4 | (qh[l] >> 6) << 4.
// 6.56 bits a weight (as 8-bit codes with fp32 scales: 10).
//
// q4_K, 144 bytes: d, dmin (fp16), 12 bytes of 6-bit scales sc[8] / mins m[8] (gguf_quants._k_scale_min), qs[128]:
// w[32 j + l] = d * sc[j] * q - dmin * m[j], q = qs[32 (j / 2) + l] >> 4 (j % 2) & 15. 4.5 bits a weight (as
// QuantLinear's 4-bit codes with fp32 scales and mins per 32: 6).
//
// q5_K, 176 bytes: q4_K's d, dmin and scale bytes, then qh[32], qs[128]: the code of weight 32 j + l gains bit j of
// qh[l] as its 5th bit. 5.5 bits a weight (as 8-bit codes with fp32 scales and mins per 32: 10).
//
// All as gguf-py's dequantize computes them.
#pragma once
#include <emmintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace glm4k {

constexpr int kQ4K = 12, kQ5K = 13, kQ6K = 14;  // ggml type ids

inline int64_t kquant_block_bytes(int type) { return type == kQ6K ? 210 : type == kQ5K ? 176 : 144; }
inline int64_t kquant_group(int type) { return type == kQ6K ? 16 : 32; }  // weights per scale

struct KQuantArgs {
  const uint8_t* blocks;  // [N, K / 256 * block bytes]
  const int16_t* xq;      // [M, K]: x = xscale * (xq + xq_lo / 65534) per 256 columns, in the kernel's ActOrder
  const int16_t* xq_lo;   // nullptr: int16 precision (x = xscale * xq)
  const int8_t* x8;       // AVX2 at int8 precision: x = xscale * x8 per 256 columns, in order (xq unused)
  const int16_t* x8sum;   // [M, K / group]: the sums of x8 per scale group (q6_K's - 32, q4_K's mins, in integers)
  const float* xscale;    // [M, K / 256]
  const float* xsum;      // [M, K / group]: sum of x per group (q6_K's - 32, q4_K's mins)
  float* y;               // [M, N]
  int64_t M, N, K;
};

bool avx512_kernels();            // ops.cpp: the AVX-512 set runs (the CPU has it and set_isa allows it)
bool gfni_kernels();              // ops.cpp: the AVX-512 set runs and the CPU has GFNI (unless set_gfni(False))
bool exact_kernel_activations();  // ops.cpp: activations() is "exact"
bool int8_kernel_activations(int bits);  // ops.cpp: the mode gives `bits`-bit codes int8 (AVX2; AVX-512's q6_K)

// The activation order a kernel reads (gemv.h ActOrder): AVX-512 q6_K lanes8, q4_K / q5_K q4k128; AVX2 lanes16
int kquant_order(int type, bool avx512);

// rows [n0, n1) of y
void q6k_rows_avx512(const KQuantArgs& a, int64_t n0, int64_t n1);
void q6k_rows_gfni(const KQuantArgs& a, int64_t n0, int64_t n1);  // kquant_gfni.cpp: q6k_rows_avx512 by GFNI
void q4k_rows_avx512(const KQuantArgs& a, int64_t n0, int64_t n1);
void q5k_rows_avx512(const KQuantArgs& a, int64_t n0, int64_t n1);
void q6k_rows_avx2(const KQuantArgs& a, int64_t n0, int64_t n1);
void q4k_rows_avx2(const KQuantArgs& a, int64_t n0, int64_t n1);
void q5k_rows_avx2(const KQuantArgs& a, int64_t n0, int64_t n1);

// The activations of M rows as the K-quant kernels of one type read them (int16 per 256 columns in the kernel's
// order, the exact low terms when activations() is "exact", int8 on AVX2 when it is "int8", the sums per
// scale group), computed once for every weight they meet: kquant_mm's one weight, or every busy expert of
// expert_mm (rows row0.. of them).
class KQuantActs {
 public:
  // act_bits: the bits "auto" rounds the activations for (0: the type's own; a model's coarsest: set_activation_bits)
  KQuantActs(const float* x, int64_t M, int64_t K, int type, int act_bits = 0);
  // y rows [n0, n1) of M activation rows from row0 against `blocks` [N, K / 256 * block bytes]; y [M, N]
  void rows(const uint8_t* blocks, int64_t row0, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) const;

 private:
  int64_t K_, group_;
  bool exact_, int8_;
  void (*rows_)(const KQuantArgs&, int64_t, int64_t);
  std::vector<int16_t> hi_, lo_;
  std::vector<int8_t> i8_;
  std::vector<int16_t> i8sum_;
  std::vector<float> scale_, xsum_;
};

// rows [r0, r1) of W into out_f32 or out_bf16 ([r1 - r0, K]; bf16 rounded to nearest even from the fp32 value),
// equal to gguf-py's dequantize bit for bit
void kquant_dequant_rows_avx2(int type, const uint8_t* blocks, int64_t K, int64_t r0, int64_t r1, float* out_f32,
                              uint16_t* out_bf16);

// q4_K's 12 scale bytes -> bytes 0..7 sc[0..7], bytes 8..15 m[0..7], in 32-bit words: no bytes written to memory
// and read back as a vector (store forwarding stalls: 2.8x the time of a q4_K step when they were)
inline __m128i q4k_scale_min(const uint8_t* s) {
  uint32_t w[3];
  std::memcpy(w, s, 12);
  const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
  const uint32_t sc_lo = w[0] & low6, m_lo = w[1] & low6;
  const uint32_t sc_hi = (w[2] & low4) | (((w[0] >> 6) & low2) << 4);
  const uint32_t m_hi = ((w[2] >> 4) & low4) | (((w[1] >> 6) & low2) << 4);
  return _mm_setr_epi32(int(sc_lo), int(sc_hi), int(m_lo), int(m_hi));
}

}  // namespace glm4k
