"""6-bit weights, symmetric per group of `group_size` input columns: W = (q - 32) * s, q in 0..63, one fp16 scale per
group (6.125 bits a weight at g = 128). Run by glm4's kernels only (QuantLinear bits 6); the
int4 scheme's LM head by default, as GGUF's q4 files carry a 6-bit output tensor (q6_K)."""

from __future__ import annotations

import torch

from .fast_linear import QuantizationError

__all__ = ["DIVISORS", "nearest_codes", "quantize_int6"]

GROUP_SIZES = (64, 128, 256)


# scale = -(the group's largest-magnitude weight) / d for each d here, the one with the least squared error kept: codes
# span -32..31, so the signed extreme lands on -32 exactly, and d > 32 trades a clamped tail for finer steps
DIVISORS = (31.0, 32.0, 33.0, 34.0, 36.0)


def nearest_codes(g: torch.Tensor, candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """g [..., n] float and candidate scales (each [...]) -> (q [..., n] in -32..31, s [...]): per group the scale
    whose round-to-nearest codes give the least squared error (the first candidate on ties); a scale of 0 gives
    codes 0 (an all-zero group: no large term for the zero-point sum to cancel)."""
    best_err = best_q = best_s = None
    for s in candidates:
        q = torch.round(g / torch.where(s != 0, s, torch.ones_like(s))[..., None]).clamp_(-32, 31)
        err = (q * s[..., None] - g).square_().sum(-1)
        if best_err is None:
            best_err, best_q, best_s = err, q, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better[..., None], q, best_q)
            best_s = torch.where(better, s, best_s)
    return best_q, best_s


def quantize_int6(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q uint8 [N, K] in 0..63, scales [N, K/g]) with W = (q - 32) * s, s fp16 (fp32 where fp16
    overflows): per group the scale of DIVISORS with the least squared error (never more than round-to-nearest
    at amax / 31, the first candidate)."""
    n, k = w.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise QuantizationError(f"int6: in_features {k} must be a multiple of group_size {group_size} in {GROUP_SIZES}")
    g = w.float().reshape(n, k // group_size, group_size)
    extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed; 0 for an all-zero group

    def scale(d: float) -> torch.Tensor:
        s = -extreme / d
        h = s.to(torch.float16)
        return h.float() if torch.isfinite(h).all() else s

    best_q, best_s = nearest_codes(g, (scale(d) for d in DIVISORS))
    fp16 = torch.isfinite(best_s.to(torch.float16)).all()
    return best_q.add_(32).to(torch.uint8).reshape(n, k), best_s.to(torch.float16) if fp16 else best_s
