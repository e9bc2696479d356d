"""FloatLinear: a linear whose weight is stored in fp32, bf16 or fp16 and computed in fp32 on any AVX2 CPU.

Decode is memory-bound, so bf16 / fp16 *storage* streams half the bytes of fp32 while the arithmetic stays
fp32 (the weight is widened in registers by the streaming kernel): exact to the stored weight, and fast on
CPUs that only emulate bf16 arithmetic. CastEmbedding does the same for the token embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .fast_linear import QuantizationError, plain_linear

__all__ = ["CastEmbedding", "FloatLinear"]

STORAGE = (torch.float32, torch.bfloat16, torch.float16)


class FloatLinear(nn.Module):
    """y = x @ weight.T + bias. M <= kernels.dense_max_m(): the streaming kernel (fp32 accumulation); larger M:
    glm4's GEMM where kernels.own_gemm() (fp32 x; the weight widened as it is packed, the bias added in it), else
    F.linear in the activation dtype, the weight widened a chunk at a time when its storage differs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in STORAGE:
            raise QuantizationError(f"FloatLinear stores float32, bfloat16 or float16 weights, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_base(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> FloatLinear:
        """`dtype`: storage (None keeps the linear's own; no copy then)."""
        dtype = dtype or linear.weight.dtype
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype)
        w = linear.weight.detach()
        m.weight = nn.Parameter(w if w.dtype == dtype and w.is_contiguous() else w.to(dtype).contiguous(),
                                requires_grad=False)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float()
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.detach().to(dtype or self.weight.dtype)

    def to_linear(self) -> nn.Linear:
        return plain_linear(self.weight, self.bias, self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if x.numel() <= kernels.dense_max_m() * self.in_features and x.device.type == "cpu":  # [..., K] -> [..., N]
            y = kernels.dense_mm(x if in_dtype == torch.float32 else x.float(), self.weight)
        elif in_dtype == torch.float32 and x.device.type == "cpu" and kernels.own_gemm():  # bias added in the GEMM
            return kernels.ops.dense_gemm(x.reshape(-1, self.in_features), self.weight, self.bias).reshape(
                *x.shape[:-1], self.out_features)
        else:
            shape = x.shape
            x = x.reshape(-1, self.in_features)
            y = kernels.gemm(x, self.weight) if self.weight.dtype == in_dtype else self._widened_mm(x)
            y = y.reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def _widened_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype, the weight widened to it (bf16 storage, fp32 x) as kernels.dequant_gemm
        does: whole, or kernels.gemm_chunk_rows rows at a time."""
        rows = kernels.gemm_chunk_rows(self.out_features, self.in_features)
        return kernels.dequant_gemm(x, self.out_features, lambda i, w: w.copy_(self.weight[i:i + w.shape[0]]),
                                    x.new_empty(rows, self.in_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"storage={str(self.weight.dtype).removeprefix('torch.')}, bias={self.bias is not None}")


class CastEmbedding(nn.Module):
    """nn.Embedding whose table stays in its storage dtype while the rows it returns are in `compute_dtype`."""

    def __init__(self, embedding: nn.Embedding, compute_dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self.compute_dtype = compute_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, storage={str(self.weight.dtype).removeprefix('torch.')}"
                f", compute={str(self.compute_dtype).removeprefix('torch.')}")
