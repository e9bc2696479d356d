"""6-bit weights, symmetric per group of `group_size` input columns, round-to-nearest: W = (q - 32) * s, q in
1..63, one fp16 scale per group (6.125 bits a weight at g = 128). Run by glm4's kernels only (QuantLinear bits 6); the
int4 scheme's LM head by default, as GGUF's q4 files carry a 6-bit output tensor (q6_K)."""

from __future__ import annotations

import torch

from .fast_linear import QuantizationError

__all__ = ["quantize_int6"]

GROUP_SIZES = (64, 128, 256)


def quantize_int6(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q uint8 [N, K] in 1..63, scales [N, K/g]) with |w - (q - 32) * s| <= s / 2.

    The scale is amax / 31 rounded *up* to fp16 (the stored dtype; fp32 where that overflows), so no code clamps."""
    n, k = w.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise QuantizationError(f"int6: in_features {k} must be a multiple of group_size {group_size} in {GROUP_SIZES}")
    g = w.float().reshape(n, k // group_size, group_size)
    amax = g.abs().amax(-1)
    s = amax / 31  # an all-zero group gets scale 0 (and code 32): no large term for the zero-point sum to cancel
    h = s.to(torch.float16)
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    scales = h if torch.isfinite(h).all() else s
    divisor = torch.where(scales > 0, scales.float(), torch.ones_like(s))
    q = torch.round(g / divisor[..., None]).clamp_(-31, 31).add_(32)
    return q.to(torch.uint8).reshape(n, k), scales
