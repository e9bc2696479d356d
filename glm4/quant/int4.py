"""Weight-only int4, asymmetric per group of `group_size` input columns, round-to-nearest.

Torch's CPU int4 kernel dequantizes w = (q - 8) * scale + zero, q in [0, 15], with
scales_and_zeros [K / group_size, N, 2] (bf16) and q packed two per byte in a CPU-specific layout:
with AVX-512, per block of 64 rows, bytes [N/64, K, 32] with byte (b, k, d) = q[64b+d, k] | q[64b+32+d, k] << 4.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .fast_linear import QuantizationError, WeightOnlyLinear, has_op, kernel_max_m, round_up_bf16

__all__ = ["WeightOnlyInt4Linear", "quantize_int4"]

GROUP_SIZES = (32, 64, 128, 256)
_BLOCK_N = 64  # rows per packed block (AVX-512 layout); out_features is padded to a multiple of it
_QUANT_ROWS = 16 * _BLOCK_N  # rows quantized and packed at a time
_GEMM_ELEMS = 1 << 21  # weights dequantized per GEMM on the large-M path: an 8 MB fp32 chunk, few parallel regions


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """Kernel-packed uint8 [R, K/2] (R a multiple of 64) -> q uint8 [R, K], inverting the AVX-512 layout."""
    r, k = packed.shape[0], packed.shape[1] * 2
    b = packed.reshape(r // _BLOCK_N, k, _BLOCK_N // 2)  # [R/64, K, 32]
    return torch.cat([b & 15, b >> 4], dim=2).transpose(1, 2).reshape(r, k)


@functools.cache
def layout_known() -> bool:
    """True if this CPU's kernel packs in the layout _unpack inverts (probed once on random values)."""
    if not has_op("int4"):
        return False
    q = torch.randint(0, 16, (2 * _BLOCK_N, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    return torch.equal(_unpack(torch._convert_weight_to_int4pack_for_cpu(q, 1)).int(), q)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int32 [N, K] in [0, 15], scales bf16 [N, K/g], zeros bf16 [N, K/g]).

    The bf16 zero is rounded first, then the scale is rounded *up* so the grid z + (q - 8) * s,
    q = 0..15, covers [min, max] of each group: every |w - w_hat| <= s / 2, no clamping error.
    """
    n, k = w.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise QuantizationError(f"int4: in_features {k} must be a multiple of group_size {group_size} in {GROUP_SIZES}")
    g = w.float().reshape(n, k // group_size, group_size)  # [N, K/g, g]
    lo, hi = g.amin(-1), g.amax(-1)
    zeros = (lo + (hi - lo) * (8 / 15)).to(torch.bfloat16)
    z = zeros.float()
    s = torch.maximum((z - lo) / 8, (hi - z) / 7)
    # a group of one bf16-exact value (all zeros, say): scale 0 and q = 8, so W = z exactly and the zero-point term
    # of the kernels' sums is 0 (a scale of 1 left 8 * sum(x) to cancel against the codes' sum: ~1e-6 off, not 0)
    scales = round_up_bf16(s)
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(s))
    q = torch.where(scales[..., None] > 0, torch.round((g - z[..., None]) / safe[..., None]), 0) + 8
    return q.clamp_(0, 15).to(torch.int32).reshape(n, k), scales, zeros


class WeightOnlyInt4Linear(WeightOnlyLinear):
    """y = x @ w_hat.T + bias via torch._weight_int4pack_mm_for_cpu with bf16 activations.

    For M > max_kernel_m (prefill) it unpacks and dequantizes into an fp32 GEMM instead (~2x faster at M=512).
    out_features is padded to a multiple of 64 (whole packed blocks); the padding rows are zero.
    The packed layout is specific to the CPU kernel build: state_dict() round-trips on the same
    torch/CPU kind only; export through dequantize().
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 dtype=torch.float32):
        super().__init__()
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise QuantizationError(
                f"int4: in_features {in_features} must be a multiple of group_size {group_size} in {GROUP_SIZES}")
        if not has_op("int4"):
            raise QuantizationError("int4: this torch build lacks _weight_int4pack_mm_for_cpu")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_pad = -(-out_features // _BLOCK_N) * _BLOCK_N
        self.register_buffer("weight", torch.zeros(n_pad, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, n_pad, 2,
                                                             dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        # above this M: unpack + dequantize + fp32 GEMM (needs the known packed layout)
        self.max_kernel_m = kernel_max_m("int4", out_features, in_features) if layout_known() else 1 << 62

    @classmethod
    @torch.no_grad()
    def from_base(cls, linear: nn.Linear, group_size: int = 128) -> WeightOnlyInt4Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, linear.weight.dtype)
        w, n, n_pad = linear.weight.detach(), m.out_features, m.weight.shape[0]
        packed, sz = [], []
        # row chunks (whole 64-row blocks pack independently) bound the fp32/int32 temporaries
        for r0 in range(0, n_pad, _QUANT_ROWS):
            r1 = min(r0 + _QUANT_ROWS, n_pad)
            q, scales, zeros = quantize_int4(w[r0:min(r1, n)], group_size)
            pad = r1 - min(r1, n)
            if pad:  # zero rows: q = 8 with zero = 0 dequantizes to exactly 0
                q = torch.cat([q, torch.full((pad, q.shape[1]), 8, dtype=q.dtype)])
                scales = torch.cat([scales, torch.ones(pad, scales.shape[1], dtype=scales.dtype)])
                zeros = torch.cat([zeros, torch.zeros(pad, zeros.shape[1], dtype=zeros.dtype)])
            packed.append(torch._convert_weight_to_int4pack_for_cpu(q, 1))
            sz.append(torch.stack([scales, zeros], dim=-1))  # [R, K/g, 2]
        m.weight = torch.cat(packed)
        m.scales_and_zeros = torch.cat(sz).transpose(0, 1).contiguous()  # [K/g, N, 2]
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    @torch.no_grad()
    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The effective weight [N, K] the kernel multiplies by."""
        if not layout_known():  # read it through the kernel on an identity (bf16-rounded)
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            w_t = torch._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, self.scales_and_zeros)
            return w_t[:, : self.out_features].t().to(dtype).contiguous()
        n = self.weight.shape[0]
        q = _unpack(self.weight).float().reshape(n, -1, self.group_size)  # [N, K/g, g]
        sz = self.scales_and_zeros.float().transpose(0, 1).contiguous()  # [N, K/g, 2]
        w = q.sub_(8).mul_(sz[..., :1]).add_(sz[..., 1:])
        return w.reshape(n, self.in_features)[: self.out_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, in_dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)  # [M, K]
        if x.shape[0] <= self.max_kernel_m:
            # fp32 activations hit a slow path: bf16 around the kernel
            y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.weight, self.group_size,
                                                  self.scales_and_zeros.to(torch.bfloat16))  # no-op unless .float()
        else:
            y = self._dequant_mm(x.float())
        y = y[:, : self.out_features].to(in_dtype)
        if self.bias is not None:
            y = y + self.bias.to(in_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _dequant_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] fp32 -> [M, N_pad] fp32: unpack + dequantize ~_GEMM_ELEMS weights at a time into a transposed
        fp32 buffer [K, R] (the packed bytes are k-major per 64-row block), then one GEMM per chunk."""
        n_pad, k, g = self.weight.shape[0], self.in_features, self.group_size
        rows = max(1, _GEMM_ELEMS // (k * _BLOCK_N)) * _BLOCK_N
        y = x.new_empty(x.shape[0], n_pad)
        buf = x.new_empty(k, rows)
        for r0 in range(0, n_pad, rows):
            r = min(rows, n_pad - r0)
            b = self.weight[r0:r0 + r].view(r // _BLOCK_N, k, _BLOCK_N // 2).transpose(0, 1)  # [K, R/64, 32]
            w = buf[:, :r].view(k, r // _BLOCK_N, _BLOCK_N)
            w[..., : _BLOCK_N // 2] = b & 15
            w[..., _BLOCK_N // 2:] = b >> 4
            sz = self.scales_and_zeros[:, r0:r0 + r].float()  # [K/g, R, 2]
            scale = sz[..., 0].contiguous()  # contiguous: a strided broadcast operand makes mul_ ~10x slower
            shift = (sz[..., 1] - 8 * scale).contiguous()  # w = q * s + (z - 8 s)
            buf[:, :r].view(k // g, g, r).mul_(scale[:, None]).add_(shift[:, None])
            y[:, r0:r0 + r] = x @ buf[:, :r]
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
