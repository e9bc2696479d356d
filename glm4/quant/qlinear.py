"""QuantLinear: one weight-only quantized linear for every grouped integer format glm4 runs.

    W[n, k] = scales[n, k // g] * (q[n, k] - zero_point) + mins[n, k // g]      (mins optional)

Our own int8 (per channel: g = K) and int4 (g = 32..256, asymmetric), GGUF q8_0 / q4_0 / q4_1 / K-quants,
AWQ, GPTQ and compressed-tensors all map onto it exactly at load time; the CPU kernels (glm4.quant.kernels)
run it without ever expanding the weight to fp32 in memory.

Storage:
    bits 8: qweight int8 [N, K] (codes shifted into int8 range; zero_point adjusted to match)
    bits 6: qweight uint8 [N, K/64*48]; each 64 columns of a row are 48 bytes: their low nibbles as bits 4 packs
            them (32 bytes), then per 32-column block j 8 bytes, byte u = h[u] | h[u + 8] << 2 | h[u + 16] << 4 |
            h[u + 24] << 6 with h = q[32 j:] >> 4 (one 64-bit word per block: an AVX-512 kernel lane's layout)
    bits 4: qweight uint8 [N, K/2]; each 32-column block of a row is 16 bytes, byte j = q[j] | q[j + 16] << 4
            (GGUF q4_0's nibble order, so q4_0 repacks by copy)
    scales, mins: [N, K/g] float16 or float32 (float32 where the source's scale products are not fp16-exact)
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .fast_linear import QuantizationError, plain_linear

__all__ = ["QuantEmbedding", "QuantLinear", "StreamingLinear", "pack_int4", "pack_int6", "unpack_int4",
           "unpack_int6"]

BITS = (4, 6, 8)
MIN_GROUP = {4: 32, 6: 64, 8: 8}  # group sizes are multiples of this (the kernels' column steps)

_CODE_ROWS = 1024  # rows of codes converted and packed at a time (from_codes)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] codes 0..15 (K a multiple of 32) -> uint8 [N, K/2] in the q4_0 nibble order."""
    n, k = q.shape
    if k % 32:
        raise QuantizationError(f"int4: in_features {k} must be a multiple of 32")
    b = q.to(torch.uint8).reshape(n, k // 32, 2, 16)  # [N, K/32, lo|hi, 16]
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, K/2] -> uint8 codes [N, K]."""
    n, k2 = packed.shape
    b = packed.reshape(n, k2 // 16, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(n, k2 * 2)


def pack_int6(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] codes 0..63 (K a multiple of 64) -> uint8 [N, K/64*48] (module docstring)."""
    n, k = q.shape
    if k % 64:
        raise QuantizationError(f"int6: in_features {k} must be a multiple of 64")
    b = q.to(torch.uint8).reshape(n, k // 64, 64)
    nibbles = pack_int4((b & 15).reshape(n, k)).reshape(n, k // 64, 32)
    h = (b >> 4).reshape(n, k // 64, 2, 4, 8)  # [.., j, i, u]: column 32 j + 8 i + u
    pairs = h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)  # [.., j, u]
    return torch.cat([nibbles, pairs.reshape(n, k // 64, 16)], dim=2).reshape(n, k // 64 * 48)


def unpack_int6(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int6: uint8 [N, K/64*48] -> uint8 codes [N, K]."""
    n, units = packed.shape[0], packed.shape[1] // 48
    b = packed.reshape(n, units, 48)
    low = unpack_int4(b[:, :, :32].reshape(n, units * 32)).reshape(n, units, 64)
    pairs = b[:, :, 32:].reshape(n, units, 2, 1, 8)  # [.., j, 1, u]
    high = torch.cat([(pairs >> s) & 3 for s in (0, 2, 4, 6)], dim=3).reshape(n, units, 64)
    return (low | (high << 4)).reshape(n, units * 64)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored codes [N, K] (uint8 for 4 / 6 bits, int8 for 8)."""
    return unpack_int4(qweight) if bits == 4 else unpack_int6(qweight) if bits == 6 else qweight


class StreamingLinear(nn.Module):
    """What every weight-only quantized linear run by glm4's kernels shares: y = x @ W.T + bias, small M through
    the streaming kernel of this CPU (`_stream_mm`), large M (prefill) dequantizing kernels.gemm_chunk_rows rows at a
    time (`_dequantize_rows`, the values of `dequantize()`) into a GEMM in `gemm_dtype` (fp32; bf16 activations stay
    bf16 where the CPU computes in bf16; `set_gemm_dtype` makes fp32 activations take the bf16 GEMM too), or, with
    gemm_dtype int8 (4- / 6-bit QuantLinears), glm4's GEMM of the codes against int8 activations (`_int8_mm`).
    Subclasses hold in_features, out_features, bias and their storage."""

    gemm_dtype = torch.float32  # of the large-M GEMM for fp32 activations (glm4.quant.set_gemm_dtype)
    activation_bits = 0  # the code width the kernels round activations for; 0: its own (glm4.quant.set_activation_bits)

    def _stream_mm(self, x: torch.Tensor) -> torch.Tensor:  # fp32 [..., K] -> fp32 [..., N]
        raise NotImplementedError

    def _dequantize_rows(self, row0: int, w: torch.Tensor) -> None:  # W's rows row0.. into w (fp32 / bf16), glm4's op
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        raise NotImplementedError

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:  # W's rows `ids` (int64 [n]) in fp32 [n, K], as dequantize()
        raise NotImplementedError

    def to_linear(self) -> nn.Linear:
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return plain_linear(self.dequantize(dtype), self.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step makes ~30 of these calls: no torch call that is not needed (each costs ~0.5-1 us)
        in_dtype = x.dtype
        if x.numel() <= kernels.max_m(self) * self.in_features:  # [..., K] -> [..., N] fp32
            y = self._stream_mm(x if in_dtype == torch.float32 else x.float())
        elif self.gemm_dtype == torch.int8 and kernels.int8_gemm():  # int8 activations against the codes
            y = self._int8_mm(x.reshape(-1, self.in_features).float()).reshape(*x.shape[:-1], self.out_features)
        elif self.gemm_dtype != torch.bfloat16 and x.device.type == "cpu" and kernels.own_gemm():
            y = self._own_gemm(x.reshape(-1, self.in_features).float()).reshape(*x.shape[:-1], self.out_features)
            return y if in_dtype == torch.float32 else y.to(in_dtype)  # the bias added in the GEMM
        else:  # bf16 activations stay bf16 where the CPU computes in bf16 (the GEMM runs ~2x faster than fp32)
            shape = x.shape
            x = x.reshape(-1, self.in_features)
            gemm_dtype = torch.bfloat16 if self.gemm_dtype == torch.bfloat16 else torch.float32  # int8's fallback: fp32
            x = x if x.dtype == torch.bfloat16 and kernels.native_bf16() else x.to(gemm_dtype)
            y = self._dequant_mm(x).reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.float()
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def _int8_mm(self, x: torch.Tensor) -> torch.Tensor:  # fp32 [M, K] -> [M, N]: set_gemm_dtype(int8) only
        raise NotImplementedError

    def _own_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 [M, K] -> [M, N] + bias by glm4's GEMM (kernels.own_gemm), the rows dequantized into it a few at a
        time: equal to kernels.gemm on dequantize() bit for bit."""
        raise NotImplementedError

    def _dequant_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] fp32 or bf16 -> [M, N] in x's dtype, a chunk of dequantized rows (fp32, rounded to x's dtype) at
        a time into one reused buffer."""
        rows = kernels.gemm_chunk_rows(self.out_features, self.in_features)
        fill = self._dequantize_rows if kernels.has_streaming_kernels() else (
            lambda i, w: w.copy_(self.dequantize(torch.float32, slice(i, i + w.shape[0]))))
        return kernels.dequant_gemm(x, self.out_features, fill, x.new_empty(rows, self.in_features))


class QuantLinear(StreamingLinear):
    """y = x @ W.T + bias, W as in the module docstring, run as StreamingLinear says."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, zero_point: int = 0,
                 has_mins: bool = False, scale_dtype: torch.dtype = torch.float16, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if bits not in BITS:
            raise QuantizationError(f"QuantLinear: bits must be one of {BITS}, got {bits}")
        if group_size <= 0 or in_features % group_size or group_size % MIN_GROUP[bits]:
            raise QuantizationError(f"QuantLinear: group_size {group_size} must divide in_features {in_features} "
                                    f"and be a multiple of {MIN_GROUP[bits]}")
        if scale_dtype not in (torch.float16, torch.float32):
            raise QuantizationError(f"QuantLinear: scales must be float16 or float32, got {scale_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.zero_point = bits, group_size, int(zero_point)
        groups = in_features // group_size
        # allocated, not written: every maker fills it (from_codes, the loaders, load_state_dict), and untouched
        # pages cost no memory while a big head's codes are being made
        row_bytes = {4: in_features // 2, 6: in_features // 64 * 48, 8: in_features}[bits]
        self.register_buffer("qweight", torch.empty(out_features, row_bytes,
                                                    dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype))
        self.register_buffer("mins", torch.zeros(out_features, groups, dtype=scale_dtype) if has_mins else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None, *, bits: int,
                   group_size: int, zero_point: int = 0, bias: torch.Tensor | None = None) -> QuantLinear:
        """Build from integer codes q [N, K] (any int dtype), scales [N, K/g] (and mins) as the formula reads.

        8-bit codes outside int8 (e.g. 0..255) are shifted by 128 with zero_point following, so W is unchanged;
        int8 codes are kept as given (no copy)."""
        n, k = q.shape
        if scales.shape != (n, k // group_size) or (mins is not None and mins.shape != scales.shape):
            raise QuantizationError(f"QuantLinear: scales {tuple(scales.shape)} / mins "
                                    f"{None if mins is None else tuple(mins.shape)} do not fit q {tuple(q.shape)} "
                                    f"with group_size {group_size}")
        sdtype = torch.float16 if scales.dtype == torch.float16 and (mins is None or mins.dtype == torch.float16) \
            else torch.float32
        m = cls(k, n, bits=bits, group_size=group_size, zero_point=zero_point, has_mins=mins is not None,
                scale_dtype=sdtype, bias=bias is not None, dtype=bias.dtype if bias is not None else torch.float32)
        lo, hi = int(q.min()), int(q.max())
        shift = 128 if bits == 8 and hi > 127 else 0
        if bits < 8 and (lo < 0 or hi >= 1 << bits):
            raise QuantizationError(f"QuantLinear: {bits}-bit codes must be in 0..{(1 << bits) - 1}, got {lo}..{hi}")
        if bits == 8 and (lo - shift < -128 or hi - shift > 127):
            raise QuantizationError(f"QuantLinear: 8-bit codes span {lo}..{hi}, more than 256 values")
        m.zero_point -= shift
        if bits == 8 and q.dtype == torch.int8:
            m.qweight = q.contiguous()  # already the stored form: no copy
        else:
            for i in range(0, n, _CODE_ROWS):  # a row chunk at a time: no int32 copy of a whole LM head
                c = q[i:i + _CODE_ROWS].to(torch.int32)
                m.qweight[i:i + _CODE_ROWS] = (pack_int4(c) if bits == 4 else pack_int6(c) if bits == 6
                                               else (c - shift).to(torch.int8))
        m.scales = scales.to(sdtype).contiguous()
        if mins is not None:
            m.mins = mins.to(sdtype).contiguous()
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @classmethod
    @torch.no_grad()
    def concat(cls, linears) -> QuantLinear | None:
        """One QuantLinear computing the linears' outputs side by side (rows stacked, same input): None unless they
        share the input width, bits, group size, scale dtype and whether they have mins and bias. 8-bit zero points
        may differ (GGUF q4_K_M files hold attn_q as q5_0, codes 0..31 about 16, and attn_k / attn_v as q8_0):
        codes are shifted to zero point 0 where they stay within int8, W unchanged."""
        first = linears[0]
        key = lambda m: (m.in_features, m.bits, m.group_size, m.scales.dtype, m.mins is None, m.bias is None)
        if any(key(m) != key(first) for m in linears):
            return None
        zero_point = first.zero_point
        if any(m.zero_point != zero_point for m in linears):
            if first.bits != 8:
                return None
            lo = min(int(m.qweight.min()) - m.zero_point for m in linears)
            hi = max(int(m.qweight.max()) - m.zero_point for m in linears)
            if lo < -128 or hi > 127:
                return None
            zero_point = 0
        out = cls(first.in_features, sum(m.out_features for m in linears), bits=first.bits,
                  group_size=first.group_size, zero_point=zero_point, has_mins=first.mins is not None,
                  scale_dtype=first.scales.dtype, bias=first.bias is not None,
                  dtype=first.bias.dtype if first.bias is not None else torch.float32)
        out.qweight = torch.cat([m.qweight if m.zero_point == zero_point
                                 else (m.qweight.to(torch.int16) - (m.zero_point - zero_point)).to(torch.int8)
                                 for m in linears])
        out.scales = torch.cat([m.scales for m in linears])
        if first.mins is not None:
            out.mins = torch.cat([m.mins for m in linears])
        if first.bias is not None:
            out.bias = torch.cat([m.bias for m in linears])
        return out

    def codes(self) -> torch.Tensor:
        """int32 [N, K]: q - zero_point."""
        return unpack_codes(self.qweight, self.bits).to(torch.int32) - self.zero_point

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """The effective weight [N, K] (or a slice of rows), computed in fp32 (fp64 if asked) then cast."""
        q = unpack_codes(self.qweight[rows], self.bits)
        n, g = q.shape[0], self.group_size
        acc = torch.promote_types(dtype, torch.float32)
        w = q.to(acc).sub_(self.zero_point).view(n, -1, g).mul_(self.scales[rows].to(acc)[..., None])
        if self.mins is not None:
            w.add_(self.mins[rows].to(acc)[..., None])
        return w.view(n, self.in_features).to(dtype)

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if not kernels.has_streaming_kernels():
            return self.dequantize(rows=ids)
        w = torch.empty(ids.numel(), self.in_features)
        torch.ops.glm4.dequantize_rows(self.qweight.index_select(0, ids), self.scales.index_select(0, ids),
                                       None if self.mins is None else self.mins.index_select(0, ids), self.bits,
                                       self.group_size, self.zero_point, 0, w)
        return w

    def _stream_mm(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quant_mm(x, self)

    def _dequantize_rows(self, row0: int, w: torch.Tensor) -> None:
        torch.ops.glm4.dequantize_rows(self.qweight, self.scales, self.mins, self.bits, self.group_size,
                                       self.zero_point, row0, w)

    def _own_gemm(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ops.quant_dense_gemm(x, self.qweight, self.scales, self.mins, self.bits, self.group_size,
                                            self.zero_point, None if self.bias is None else self.bias.float())

    def _int8_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.glm4.quant_gemm_i8(x, self.qweight, self.scales, self.mins, self.bits, self.group_size,
                                            self.zero_point)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, zero_point={self.zero_point}, mins={self.mins is not None}, "
                f"scales={str(self.scales.dtype).removeprefix('torch.')}, bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """A token embedding whose table stays quantized (a GGUF file's token_embd: 0.62 GB as fp32 on the 400M bench
    checkpoint, 2.5 GB on GLM-4-9B / GLM-4.5-Air, ~0.1-0.35 GB as the file holds it): the rows a step looks up are
    dequantized as they are read (StreamingLinear.lookup), in `compute_dtype`. `table` [V, H] is a StreamingLinear,
    so a tied output head is the same module."""

    def __init__(self, table: StreamingLinear, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table, self.compute_dtype = table, compute_dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.lookup(ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, compute={str(self.compute_dtype).removeprefix('torch.')}"
