// Shared between the op wrappers (ops.cpp, baseline x86-64) and the kernels (one file per instruction set).
#pragma once
#include <xmmintrin.h>  // _mm_prefetch (SSE: baseline x86-64)

#include <atomic>
#include <cstdint>

namespace glm4k {

enum WeightType { kF32 = 0, kBF16 = 1, kF16 = 2 };

// y [M, N] = x [M, K] @ w [N, K]^T, w dense in fp32 / bf16 / fp16, all row-major and contiguous
struct DenseArgs {
  const float* x;
  const void* w;
  float* y;
  int64_t M, N, K;
  int wtype;
  int xperm;  // bf16: x permuted within each 32 columns (kPermBf16x32, AVX-512) or 16 (kPermBf16x16, AVX2), else 0
  const uint16_t* xbf16;  // bf16 weights and activations on AVX512_BF16: x [M, K] as bf16 (gemv_bf16.cpp), else null
};

// y [M, N] = x [M, K] @ W^T with W[n, k] = s[n, k/g] * (q[n, k] - zero_point) + mins[n, k/g]
struct QuantArgs {
  const float* x;
  const float* xsum;  // [M, K/g]: sum of x over each group (the zero-point / mins term)
  const int16_t* xq;     // 4-bit path: x [M, K] = xscale * (xq + xq_lo / 65534) per block of xblock columns
  const int16_t* xq_lo;  // nullptr: xq alone, the AVX2 4-bit kernel at int16 precision (x = xscale * xq)
  const int8_t* xq8;     // AVX2 6-bit kernel at int16 precision: [M, K / 64, 2, 64]: xq = 256 a + b, a then b, perm64
  int xq8_terms;         // 2, or 1 at int8 precision (a only, xscale / 256: b unread)
  const int8_t* xi8;     // AVX2 4-bit kernel at int8 precision: x [M, K] = xscale * xi8 per block, columns in order
  const float* xscale;  // [M, K/xblock]
  int64_t xblock;     // divides group
  int xperm;          // AVX-512 int16 activations: kOrderPerm128 (4- / 6-bit: xq / xq_lo permuted within each
                      // 128 columns, perm128 below) or kOrderLanes8 (8-bit codes in groups of 16 / 32)
  const void* q;      // int8 [N, K], uint8 [N, K/2] (4-bit, q4_0 nibble order) or [N, K/64*48] (6-bit, codes6.h)
  const void* scales;  // [N, K/g] fp16 or fp32
  const void* mins;    // same, or nullptr
  float* y;
  int64_t M, N, K, group;
  int bits, scale_f16, zero_point;
};

// The 4-bit AVX-512 kernel unpacks 128 codes (64 bytes, four q4_0 blocks, one per 128-bit lane) with in-lane
// byte unpacks, which yield the columns as int16 in the order r * 32 + j * 8 + t <- column 32 j + 8 r + t
// (r: which unpack, j: lane, t: 0..7); the activations are laid out the same way once per call instead.
inline int64_t perm128(int64_t c) { return (c % 32) / 8 * 32 + c / 32 * 8 + c % 8; }

// The 8-bit AVX-512 kernel for groups of 16 or 32 columns (GGUF q8_0, q6_K, q5_*) widens 64 codes with in-lane byte
// unpacks, which put columns 16 j .. 16 j + 7 (low unpack) and 16 j + 8 .. 16 j + 15 (high) into 128-bit lane j:
// each lane's int32 sums then belong to one group of 16 (or one half of a group of 32), weighed by one scale.
inline int64_t lanes8(int64_t c) { return (c % 16) / 8 * 32 + c / 16 * 8 + c % 8; }

// The same for 256-bit registers (the AVX2 q6_K kernel): 32 codes a step, columns 16 j .. 16 j + 7 and
// 16 j + 8 .. 16 j + 15 of 128-bit lane j, j = 0, 1.
inline int64_t lanes16(int64_t c) { return (c % 16) / 8 * 16 + c / 16 * 8 + c % 8; }

// The AVX-512 q4_K kernel (kquant.h) reads 128 weights as one 64-byte register of codes: its low nibbles hold groups
// 0 and 2 (of 32), its high nibbles groups 1 and 3. In-lane unpacks put a group's columns 0..15 into 128-bit lane
// 2 (group / 2) and 16..31 into the next, the low unpack taking the first 8 of a lane's 16, the high the last 8;
// per 128 columns the activations are the low nibbles' two unpacks, then the high nibbles'.
inline int64_t q4k128(int64_t c) {
  const int64_t group = c / 32, w = c % 32;
  return group % 2 * 64 + (w % 16) / 8 * 32 + (group / 2 * 2 + w / 16) * 8 + c % 8;
}

// the activation orders (QuantArgs.xperm): columns as they are, perm128 per 128 columns, lanes8 per 64 columns,
// lanes16 per 32, q4k128 per 128
enum ActOrder { kOrderColumns = 0, kOrderPerm128 = 1, kOrderLanes8 = 2, kOrderLanes16 = 3, kOrderQ4K128 = 4 };

// where column c lands in `order` (8 consecutive columns from a multiple of 8 stay together in every order)
inline int64_t act_position(int64_t c, int order) {
  return order == kOrderPerm128 ? c / 128 * 128 + perm128(c % 128)
         : order == kOrderLanes8 ? c / 64 * 64 + lanes8(c % 64)
         : order == kOrderLanes16 ? c / 32 * 32 + lanes16(c % 32)
         : order == kOrderQ4K128 ? c / 128 * 128 + q4k128(c % 128) : c;
}

// The AVX2 6-bit kernel unpacks 64 codes (one 48-byte block) as two registers of 32 bytes: columns 0..15 and
// 32..47, then 16..31 and 48..63, the order its int8 activations are laid out in.
inline int64_t perm64(int64_t c) { return (c / 16 == 1 ? 32 : c / 16 == 2 ? 16 : c / 16 * 16) + c % 16; }

// The largest activation magnitude of the int16-precision kernels: 127 * 257, so that 256 a + b splits it into
// int8 a in [-127, 127] and b in [-128, 127]
constexpr int kInt16Act = 32639;

// The bf16 AVX-512 kernel widens 32 weights (one 64-byte load) with in-lane 16-bit unpacks under zero, which
// yield fp32 lanes in the order u * 16 + j * 4 + t <- column 8 j + 4 u + t (u: low / high unpack, j: lane, t: 0..3).
inline int64_t perm32_bf16(int64_t c) { return (c % 8) / 4 * 16 + c / 8 * 4 + c % 4; }
// The bf16 AVX2 kernel widens 16 weights (one 32-byte load) as the even columns (each 32-bit lane shifted left by
// 16) and the odd ones (the lane's high half masked): fp32 lanes 0..7 <- columns 0, 2, .., 14; 8..15 <- 1, .., 15.
inline int64_t perm16_bf16(int64_t c) { return c % 2 * 8 + c / 2; }
enum BF16Order { kPermBf16x32 = 1, kPermBf16x16 = 2 };

// AVX2 reads bf16 weights against permuted activations one row at a time (gemv_avx2.cpp, bf16_perm_row): for one token,
// and for more while 4 tokens' activations fit in L1 (K <= 1024: 16 KiB); past that, tiles of 2 rows share each
// activation load (unpermuted; the 400M's down projection, K = 3072, 8 tokens, 2 threads: 0.70 ms against 0.91-1.42)
inline bool bf16_perm_avx2(int64_t M, int64_t K) { return M == 1 || K <= 1024; }

// How far ahead the AVX-512 kernels prefetch weight rows, and into which cache: into L2 (`_MM_HINT_T1`) at least
// kAheadL2 bytes ahead, or one tile where a tile is longer. On a Zen 4 (AMD EPYC family 25 model 17, 2 threads), the
// int8 LM head from memory read 14-17 GB/s (medians) prefetched into L1 one tile (4 KB) ahead, 26-36 GB/s into L2
// 16 KB ahead (into L1 16 KB ahead: 15-16; into L2 8 KB ahead: 24-29): L1 has few miss buffers, L2 enough for a stream.
// One exception: a dense one-token tile of one row (fp32 / bf16 / fp16 weights) reads one sequential
// stream a thread and spends ~1 instruction per 64 bytes, and the hardware's stream prefetcher feeds it better
// alone (Zen 4, 2 threads, the LM head from memory, alternated in one process, median GB/s: fp32 31.9 / 37.8 with
// the L2 prefetch, 34.8 / 49.0 without; bf16 against bf16 activations 30.9 / 37.3 / 30.9 against 32.3 / 41.2 /
// 32.2). Tiles of several rows (several streams) and the slower integer ones need it (int8 26.0 against 15.1
// without, int6 g128 30.6 against 10.8, q6_K one row 30.1 against 24.3).
constexpr int64_t kAheadL2 = 16384;
inline int64_t ahead_l2(int64_t tile_bytes) { return tile_bytes > kAheadL2 ? tile_bytes : kAheadL2; }
// the line at p + ahead into L2
inline void prefetch_l2(const void* p, int64_t ahead) { _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T1); }
// whether a dense tile of RB rows x MT tokens prefetches (all but one row against one token: see above)
constexpr bool dense_prefetch(int RB, int MT) { return RB * MT > 1; }

// the smallest group of `bits`-bit codes the kernels take, and the bytes of a row of K codes
inline int64_t min_group(int64_t bits) { return bits == 4 ? 32 : bits == 6 ? 64 : 8; }
inline int64_t row_bytes(int64_t bits, int64_t K) { return bits == 4 ? K / 2 : bits == 6 ? K / 64 * 48 : K; }

// Rows [r0, r1) of W[n, k] = s[n, k/g] * (q[n, k] - zero_point) + mins[n, k/g] into out (fp32 or bf16, one of the
// two set) at row n - r0: the large-M path's weight, equal to QuantLinear.dequantize bit for bit.
struct DequantArgs {
  const void* q;       // as QuantArgs.q
  const float* scales;  // [N, K/g] (fp32 here: fp16 scales widen exactly)
  const float* mins;    // same, or nullptr
  float* out_f32;
  uint16_t* out_bf16;  // rounded to nearest even from the fp32 value, as .to(torch.bfloat16)
  int64_t K, group, r0;
  int bits, zero_point;
};

void dequant_rows_avx2(const DequantArgs& a, int64_t n0, int64_t n1);
// the same 16 columns a step; 8-bit codes in groups of 16k columns
void dequant_rows_avx512(const DequantArgs& a, int64_t n0, int64_t n1);

// x [total] in blocks of B (a multiple of 32) -> x = scale[b] * (hi + lo / 65534) per block, scale = amax / 32767,
// hi / lo rounded to nearest even in double precision, in the ActOrder `order`
void act_hilo_avx2(const float* x, int64_t total, int64_t B, int order, int16_t* hi, int16_t* lo, float* scale);

// x [total] in blocks of B -> x ~ scale[b] * v per block, scale = amax / kInt16Act, v rounded to nearest even (fp32):
// into v (int16, in the ActOrder `order`) and / or bytes (the AVX2 6-bit kernel's a / b terms, QuantArgs.xq8);
// either may be null
void act_int16_avx2(const float* x, int64_t total, int64_t B, int order, int16_t* v, int8_t* bytes, float* scale);

// x [total] in blocks of B -> x ~ scale[b] * v per block, scale = amax / 127, v int8 rounded to nearest even (fp32),
// columns in order (llama.cpp's q8_0 / q8_K precision)
void act_int8_avx2(const float* x, int64_t total, int64_t B, int8_t* v, float* scale);

// rows [n0, n1) of y; quant_rows_avx512 needs xq (int16 activations) with xblock a multiple of 64, or 8-bit
// codes in groups of 16k columns (fp32 activations)
void dense_rows_avx2(const DenseArgs& a, int64_t n0, int64_t n1);
void quant_rows_avx2(const QuantArgs& a, int64_t n0, int64_t n1);
// rows [n0, n1) of the large-M (prefill) GEMM: 4- / 6-bit codes against int8 activations (a.xi8 [M, K], a.xscale
// per block of a.xblock columns, a.xsum the group sums of the rounded activations); gemm_i8_avx2.cpp
void gemm_i8_rows_avx2(const QuantArgs& a, int64_t n0, int64_t n1);
// Writes weight rows [n0, n1) as fp32 into out [n1 - n0, K] (a dequantization), ctx its arguments
struct RowFill {
  void (*fill)(const void* ctx, int64_t n0, int64_t n1, float* out);
  const void* ctx;
};

// The large-M fp32 GEMM (gemm_f32_avx2.cpp): x [M, K] is packed once per call into panels of 6 rows
// (gemm_f32_pack_x_avx2 writes panels [p0, p1) of xp, round_up(M, 6) * K floats), then every thread runs
// gemm_f32_cols_avx2, which takes groups of 128 columns of y in turn (group next++, from 0) until none is left,
// the weight (a.w / a.wtype, or fill's rows) widened a block at a time; bias [N] or null. gemm_f32_block: the K
// block, the same for both.
int64_t gemm_f32_block(int64_t K);
void gemm_f32_pack_x_avx2(const float* x, int64_t M, int64_t K, int64_t p0, int64_t p1, float* xp);
void gemm_f32_cols_avx2(const DenseArgs& a, const float* xp, const float* bias, const RowFill* fill,
                        std::atomic<int64_t>& next);
void dense_rows_avx512(const DenseArgs& a, int64_t n0, int64_t n1);
void dense_rows_bf16dot(const DenseArgs& a, int64_t n0, int64_t n1);  // a.xbf16 set: AVX512_BF16's dot product
void quant_rows_avx512(const QuantArgs& a, int64_t n0, int64_t n1);

// sum_g (mins[n, g] - zero_point * s[n, g]) * xsum[m, g]: the zero-point / mins term of y[m, n]
float group_correction_avx2(const QuantArgs& a, int64_t n, int64_t m);

}  // namespace glm4k
