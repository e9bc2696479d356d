"""The CPU kernels behind the swapped linears, and the one place that picks them.

`glm4.quant._C` (glm4/quant/csrc/, built by `pip install -e .`) holds streaming GEMV/small-M kernels for
fp32, bf16/fp16-storage and grouped int8/int4 weights, compiled for AVX2+FMA+F16C and AVX-512 and chosen at
run time by what the CPU has. Without it (no compiler at install time) every path falls back to torch.
"""

from __future__ import annotations

import torch

try:  # built by setup.py; optional
    from glm4.quant import _C  # noqa: F401
    HAVE_EXT = True
except ImportError:
    HAVE_EXT = False

__all__ = ["HAVE_EXT", "max_m", "quant_mm"]


def max_m(module) -> int:
    """Largest M (rows per call) for which `module` runs the streaming kernel rather than dequantize + GEMM."""
    return 0


def quant_mm(x: torch.Tensor, module) -> torch.Tensor:
    """x [M, K] fp32 -> [M, N] fp32 through the streaming kernel for a QuantLinear."""
    raise NotImplementedError
