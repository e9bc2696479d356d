// The dense weight type (gemv.h's WeightType) of a tensor, for the op wrappers (ops.cpp, gemm_ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include "gemv.h"

namespace glm4k {

inline int dense_weight_type(const at::Tensor& w, const char* op) {
  switch (w.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, op, ": w must be float32, bfloat16 or float16");
  }
  return -1;
}

}  // namespace glm4k
