"""Prepacked oneDNN linears and the one seam that picks a CPU kernel per (kind, shape, M, dtype).

Batch-1 decode is memory-bound: a linear's speed is how many weight bytes per second its kernel streams.
Measured numbers and the reproduce command live in docs/kernels.md (benchmarks/bench_kernels.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedLinear", "QuantizationError", "has_op", "kernel_max_m", "round_up_bf16"]


class QuantizationError(ValueError):
    """A module or scheme that cannot be quantized as asked (shape, dtype, unknown scheme)."""


@functools.cache
def has_op(name: str) -> bool:
    """True if `torch.ops.<ns>.<op>` exists and runs on this build (probed once on tiny inputs)."""
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    try:
        if name == "int8":
            torch._weight_int8pack_mm(x, torch.ones(16, 64, dtype=torch.int8), torch.ones(16, dtype=torch.bfloat16))
        elif name == "int4":
            wp = torch._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 1)
            torch._weight_int4pack_mm_for_cpu(x, wp, 32, torch.ones(2, 16, 2, dtype=torch.bfloat16))
        elif name in ("mkldnn", "mkldnn_bf16"):  # oneDNN packing: fp32 everywhere, bf16 only with AVX-512/avx_ne_convert
            dt = torch.bfloat16 if name == "mkldnn_bf16" else torch.float32
            wp = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 64, dtype=dt), 1)
            torch.ops.mkldnn._linear_pointwise(x.to(dt), wp, None, "none", [], "")
        else:
            raise KeyError(name)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def round_up_bf16(t: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 values >= t (fp32): quantization scales that never shrink the covered range."""
    b = t.to(torch.bfloat16)
    up = torch.nextafter(b, torch.full_like(b, float("inf")))
    return torch.where(b.float() < t, up, b)


# Largest M (tokens in one call) for which the fused weight-only kernel beats dequantize + fp32 GEMM.
# Measured on the 2-core AVX-512 machine (docs/kernels.md): the fused kernels' time grows ~linearly in M
# (compute-bound from M ~ 8); dequantizing costs a fixed ~1 ns per weight, then oneDNN's fp32 GEMM runs
# ~2x faster per token. int8: kernel ahead up to M=128, GEMM 1.6x ahead at 512. int4: crossover ~M=96.
_KERNEL_MAX_M = {"int8": 128, "int4": 64}


def kernel_max_m(kind: str, out_features: int, in_features: int) -> int:
    """The seam: up to which M a `kind` ("int8" | "int4") module calls its fused kernel rather than
    dequantize + fp32 GEMM (0 when the kernel is missing from this torch build)."""
    if kind not in _KERNEL_MAX_M:
        raise QuantizationError(f"unknown kernel kind {kind!r}")
    return _KERNEL_MAX_M[kind] if has_op(kind) else 0


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear holding `weight` [N, K] (and `bias`) in `dtype`: how every swapped module goes back."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class WeightOnlyLinear(nn.Module):
    """Shared by the int8 / int4 modules: `dequantize(dtype)` gives the effective weight [N, K]."""

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (for export, merging or LoRA)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return plain_linear(self.dequantize(dtype), self.bias, dtype)


class PackedLinear(nn.Module):
    """nn.Linear whose weight is reordered once into oneDNN's blocked layout (fp32 or bf16).

    Same math as F.linear in the weight's dtype; activations of another dtype are cast around the call.
    The packed tensor is opaque: state_dict() stores the dense weight, load_state_dict() repacks.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32):
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16):
            raise QuantizationError(f"PackedLinear supports float32/bfloat16 weights, got {dtype}")
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.packed = None  # opaque mkldnn tensor [out, in], set by pack()
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_base(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> PackedLinear:
        dtype = dtype or linear.weight.dtype
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype)
        m.pack(linear.weight.detach())
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(dtype).clone()
        return m

    @torch.no_grad()
    def pack(self, weight: torch.Tensor) -> None:
        w = weight.to(self.dtype).contiguous()
        if has_op("mkldnn_bf16" if self.dtype == torch.bfloat16 else "mkldnn"):
            # batch_size hint 1: the decode shape; the packed layout still serves any M
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        else:
            self.packed = w  # no oneDNN in this build: plain F.linear

    def dense_weight(self) -> torch.Tensor:
        return self.packed.to_dense() if self.packed.is_mkldnn else self.packed

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective weight [N, K] (same method as the int8/int4 modules)."""
        return self.dense_weight().to(dtype or self.dtype)

    def to_linear(self) -> nn.Linear:
        """Back to a plain nn.Linear (for export or LoRA)."""
        return plain_linear(self.dense_weight(), self.bias, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.dtype)
        bias = None if self.bias is None else self.bias.to(self.dtype)  # no-op unless model.to() cast the buffer
        if self.packed.is_mkldnn:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        else:
            y = F.linear(x, self.packed, bias)
        return y.to(in_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{key}: shape {tuple(w.shape)} != {(self.out_features, self.in_features)}")
            else:
                self.pack(w)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __deepcopy__(self, memo):
        # opaque mkldnn storage cannot be deep-copied: rebuild from the dense weight
        new = PackedLinear(self.in_features, self.out_features, self.bias is not None, self.dtype)
        new.pack(self.dense_weight())
        if self.bias is not None:
            new.bias = self.bias.clone()
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"
