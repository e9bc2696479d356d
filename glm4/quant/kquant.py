"""KQuantLinear: a GGUF K-quant weight run as the file holds it, 256 weights a block (glm4/quant/csrc/kquant.h).

    q6_K (210 bytes a block, 6.56 bits a weight): W = d * sc[g] * (q - 32), int8 sc per 16 weights, fp16 d
    q4_K (144 bytes, 4.5 bits a weight):          W = d * sc[g] * q - dmin * m[g], 6-bit sc / m per 32 weights
    q5_K (176 bytes, 5.5 bits a weight):          q4_K's, each code with a 5th bit from qh

q6_K is the output head of llama.cpp's q4_0 / q4_K_M / q5_K_M files and every weight of its q6_K files; q4_K and
q5_K are the bulk of q4_K_M and q5_K_M files. Held as QuantLinear's codes they took 10, 6 and 10 bits a weight (the
scales d * sc are exact only in fp32, one per 16 or 32 weights): on the 400M bench checkpoint glm4 read 0.31 GB a token from
llama.cpp's q6_K file where llama.cpp reads 0.21. Here the blocks stay as they are; `torch.ops.glm4.kquant_mm`
decodes them in registers for up to 16 tokens a call (activations as the other integer kernels take them: int16,
or exact), and larger M dequantizes row chunks (`kquant_dequantize_rows`, bit-equal to gguf-py's dequantize) into
a GEMM. Without glm4's kernels the GGUF loader keeps QuantLinear's codes instead.
"""

from __future__ import annotations

import torch

from . import kernels
from .fast_linear import QuantizationError
from .int6 import DIVISORS, nearest_codes
from .qlinear import StreamingLinear

__all__ = ["BLOCK_BYTES", "KQuantLinear", "quantize_q6k"]

Q4_K, Q5_K, Q6_K = 12, 13, 14  # ggml type ids
BLOCK_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210}  # per 256 weights
_QUANT_ROWS = 1024  # rows quantized at a time (from_linear): small temporaries for a 151552-row head


class KQuantLinear(StreamingLinear):
    """y = x @ W.T + bias with W in K-quant blocks (`blocks` uint8 [N, K / 256 * block bytes], the GGUF tensor's
    bytes) of ggml type `ggml_type` (12: q4_K, 13: q5_K, 14: q6_K), run as StreamingLinear says."""

    NAMES = {Q4_K: "q4_K", Q5_K: "q5_K", Q6_K: "q6_K"}
    FORMATS = {Q4_K: (4, 32), Q5_K: (5, 32), Q6_K: (6, 16)}  # (bits of a code, weights per scale): describe()

    def __init__(self, in_features: int, out_features: int, ggml_type: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if ggml_type not in BLOCK_BYTES:
            raise QuantizationError(f"K-quant blocks: ggml type {ggml_type} is not q4_K (12), q5_K (13) or q6_K (14)")
        if in_features % 256:
            raise QuantizationError(f"{self.NAMES[ggml_type]}: in_features {in_features} must be a multiple of 256")
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, ggml_type
        self.bits, self.group_size = self.FORMATS[ggml_type]
        self.register_buffer("blocks", torch.empty(out_features, in_features // 256 * BLOCK_BYTES[ggml_type],
                                                   dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear) -> KQuantLinear:
        """A float linear quantized to q6_K blocks (quantize_q6k), a row chunk at a time: the output head of
        glm4's int4 / int6 schemes, which this kernel streams faster than QuantLinear's int6 (docs/kernels.md)."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, Q6_K, bias=linear.bias is not None)
        for i in range(0, w.shape[0], _QUANT_ROWS):
            m.blocks[i:i + _QUANT_ROWS] = quantize_q6k(w[i:i + _QUANT_ROWS])
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    @classmethod
    def concat(cls, linears) -> KQuantLinear | None:
        """q / k / v as one linear (glm4.models.glm.fuse_linears): the blocks' rows stacked (one type)."""
        first = linears[0]
        key = lambda m: (m.in_features, m.ggml_type, m.bias is None)  # noqa: E731
        if any(key(m) != key(first) for m in linears):
            return None
        out = cls(first.in_features, sum(m.out_features for m in linears), first.ggml_type, bias=first.bias is not None,
                  dtype=first.bias.dtype if first.bias is not None else torch.float32)
        out.blocks = torch.cat([m.blocks for m in linears])
        if first.bias is not None:
            out.bias = torch.cat([m.bias for m in linears])
        return out

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """The weight [N, K] (or a slice of rows) in fp32 (bit-equal to gguf-py's dequantize), then cast."""
        r0, r1, _ = rows.indices(self.out_features)
        return self._dequantize_blocks(self.blocks[r0:r1]).to(dtype)

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self._dequantize_blocks(self.blocks.index_select(0, ids))

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:  # fp32 [rows, K] of contiguous block rows
        if not kernels.has_streaming_kernels():
            from .gguf_quants import dequantize

            return torch.from_numpy(dequantize(blocks.numpy(), self.ggml_type))
        w = torch.empty(blocks.shape[0], self.in_features)
        torch.ops.glm4.kquant_dequantize_rows(blocks, self.ggml_type, 0, w)
        return w

    def _stream_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.glm4.kquant_mm(x, self.blocks, self.in_features, self.ggml_type, self.activation_bits)

    def _dequantize_rows(self, row0: int, w: torch.Tensor) -> None:
        torch.ops.glm4.kquant_dequantize_rows(self.blocks, self.ggml_type, row0, w)

    def _own_gemm(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ops.kquant_dense_gemm(x, self.blocks, self.ggml_type,
                                             None if self.bias is None else self.bias.float())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.NAMES[self.ggml_type]}, "
                f"bias={self.bias is not None}")


def quantize_q6k(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] float (K a multiple of 256) -> q6_K blocks uint8 [N, K / 256 * 210] (ql[128], qh[64], sc int8[16],
    d fp16: gguf-py's Q6_K layout, glm4/quant/csrc/kquant.h). W = d * sc * (q - 32), q in 0..63, rounded to nearest;
    d = the block's largest |extreme| / 32 / 127, and each group of 16 takes the int8 scale of int6's divisors of its
    signed extreme with the least squared error (glm4/quant/int6.py)."""
    n, k = w.shape
    if k % 256:
        raise QuantizationError(f"q6_K: in_features {k} must be a multiple of 256")
    g = w.float().reshape(n, k // 256, 16, 16)  # [N, blocks, groups, 16]
    extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed, [N, B, 16]
    d = (extreme.abs().amax(-1) / 32 / 127).to(torch.float16).float()  # [N, B]: int8 scales span -128..127
    safe_d = torch.where(d > 0, d, torch.ones_like(d))[..., None]
    q, s = nearest_codes(g, (torch.round(-extreme / div / safe_d).clamp_(-128, 127) * d[..., None] for div in DIVISORS))
    sc = torch.round(s / safe_d).to(torch.int8)  # s = sc * d exactly
    q = (q + 32).to(torch.uint8).reshape(n, k // 256, 2, 128)  # two halves of 128
    # per half: ql[l] = q[l] & 15 | (q[64 + l] & 15) << 4 (l < 64); qh[l] = q[l] >> 4 | q[32 + l] >> 4 << 2 |
    # q[64 + l] >> 4 << 4 | q[96 + l] >> 4 << 6 (l < 32)
    lo, hi = q & 15, q >> 4
    ql = lo[..., :64] | (lo[..., 64:] << 4)  # [N, B, 2, 64]
    qh = hi[..., :32] | (hi[..., 32:64] << 2) | (hi[..., 64:96] << 4) | (hi[..., 96:] << 6)  # [N, B, 2, 32]
    out = torch.cat([ql.reshape(n, k // 256, 128), qh.reshape(n, k // 256, 64), sc.view(torch.uint8),
                     d.to(torch.float16).view(torch.uint8).reshape(n, k // 256, 2)], dim=-1)
    return out.reshape(n, k // 256 * 210).contiguous()
