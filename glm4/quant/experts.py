"""StreamExperts: MoE experts run by glm4's streaming kernels, their weights as stored (bf16 / fp16 / fp32),
quantized (QuantLinear's formula, stacked over experts) or in a GGUF file's K-quant blocks (KQuantLinear's, stacked).
Swapped in for layers.moe.StackedExperts.

Decode sends a handful of tokens to each busy expert, so each expert's weights are streamed once by one op
(torch.ops.glm4.expert_mm: every busy expert x block of rows is a task), and the whole dispatch around it (grouping
the pairs by expert, SwiGLU, the weighted sum) is one op too (torch.ops.glm4.expert_glu). Prefill (many tokens per
expert) runs one GEMM per busy expert on its widened / dequantized weight, and torch.ops.glm4.moe_combine puts the
rows back in token order, weighted and summed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from glm4.layers.moe import StackedExperts, dispatch_experts

from . import kernels
from .fast_linear import QuantizationError
from .kquant import BLOCK_BYTES as KQUANT_BLOCK_BYTES
from .kquant import KQuantLinear
from .qlinear import QuantLinear

__all__ = ["ExpertPack", "StreamExperts"]


class ExpertPack(nn.Module):
    """One projection of E experts: `weight` [E, N, K] in its storage dtype, (bits 4 / 6 / 8) `qweight` [E, N, K']
    with `scales` / `mins` [E, N, K/g] read as in QuantLinear, or (ggml_type 12 / 13 / 14) `blocks` [E, N, K/256 *
    block bytes] read as in KQuantLinear (bits and group_size then say what the blocks hold: 4 / 5 / 6, 32 / 16)."""

    gemm_dtype = torch.float32  # quantized packs: the prefill GEMM's dtype for fp32 activations (QuantLinear's)
    activation_bits = 0  # as StreamingLinear's (glm4.quant.set_activation_bits)

    def __init__(self, weight: torch.Tensor | None = None, *, bits: int = 0, group_size: int = 0, zero_point: int = 0,
                 qweight: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                 mins: torch.Tensor | None = None, blocks: torch.Tensor | None = None, ggml_type: int = 0):
        super().__init__()
        self.bits, self.group_size, self.zero_point, self.ggml_type = bits, group_size, zero_point, ggml_type
        self.register_buffer("weight", weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.register_buffer("blocks", blocks)
        self.num_experts, self.out_features = self.stored.shape[0], self.stored.shape[1]
        if ggml_type:
            self.in_features = blocks.shape[2] // KQUANT_BLOCK_BYTES[ggml_type] * 256
            self.bits, self.group_size = KQuantLinear.FORMATS[ggml_type]
        else:
            self.in_features = self.stored.shape[2] if bits == 0 else scales.shape[2] * group_size

    @property
    def stored(self) -> torch.Tensor:
        """The tensor the kernels stream: weight, qweight or blocks."""
        return self.weight if self.weight is not None else self.qweight if self.qweight is not None else self.blocks

    @classmethod
    def stack(cls, linears: list[QuantLinear]) -> ExpertPack:
        """E QuantLinears of one format (same bits, group, zero point, scale dtype) -> one pack."""
        f = linears[0]
        fmt = lambda m: (m.bits, m.group_size, m.zero_point, m.scales.dtype, m.mins is None, m.bias is None)  # noqa: E731
        if any(fmt(m) != fmt(f) for m in linears) or f.bias is not None:
            raise QuantizationError("stacked experts need one quantized format and no bias")
        return cls(bits=f.bits, group_size=f.group_size, zero_point=f.zero_point,
                   qweight=torch.stack([m.qweight for m in linears]), scales=torch.stack([m.scales for m in linears]),
                   mins=None if f.mins is None else torch.stack([m.mins for m in linears]))

    def expert(self, e: int) -> QuantLinear | KQuantLinear:
        """Expert e as a QuantLinear (or KQuantLinear) sharing this pack's storage."""
        if self.ggml_type:
            m = KQuantLinear(self.in_features, self.out_features, self.ggml_type)
            m.blocks, m.gemm_dtype = self.blocks[e], self.gemm_dtype
            return m
        m = QuantLinear(self.in_features, self.out_features, bits=self.bits, group_size=self.group_size,
                        zero_point=self.zero_point, has_mins=self.mins is not None, scale_dtype=self.scales.dtype)
        m.qweight, m.scales = self.qweight[e], self.scales[e]
        m.gemm_dtype = self.gemm_dtype
        if self.mins is not None:
            m.mins = self.mins[e]
        return m

    def weight_of(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[e].to(dtype) if self.bits == 0 else self.expert(e).dequantize(dtype)

    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [S, K] sorted by expert, counts [E] -> [S, N] in xs's dtype."""
        c = counts.tolist()
        if kernels.has_streaming_kernels() and xs.device.type == "cpu" and max(c, default=0) <= kernels.dense_max_m():
            y = kernels.ops.expert_mm(xs.float().contiguous(), counts, self.stored, self.scales, self.mins, self.bits,
                                      self.group_size, self.zero_point, self.ggml_type, self.activation_bits)
            return y.to(xs.dtype)
        if self.bits and kernels.has_streaming_kernels() and xs.device.type == "cpu":
            return self._dequant_experts_mm(xs, c)
        out, start = [], 0  # many tokens per expert (prefill): each busy expert as its own linear
        for e, n in enumerate(c):
            if n:
                out.append(self._expert_mm(e, xs[start:start + n]))
                start += n
        return torch.cat(out) if out else xs.new_zeros(0, self.out_features)

    def _dequant_experts_mm(self, xs: torch.Tensor, c: list[int]) -> torch.Tensor:
        """Many tokens per expert (prefill), quantized: QuantLinear's (KQuantLinear's) arithmetic without a module per
        expert. The activations are cast to the GEMM's dtype once, each busy expert's weight is dequantized into one
        reused buffer (glm4's op) for one GEMM written into one output; experts with few tokens stream their codes.
        gemm_dtype int8 (4- / 6-bit codes, set_gemm_dtype): each busy expert's codes against int8 activations; fp32
        where kernels.own_gemm(): glm4's GEMM, the codes dequantized into it a few rows at a time (no buffer)."""
        int8 = self.gemm_dtype == torch.int8 and kernels.int8_gemm()
        gemm_dtype = torch.bfloat16 if self.gemm_dtype == torch.bfloat16 else torch.float32  # int8's fallback: fp32
        x = xs.float() if int8 else xs if xs.dtype == torch.bfloat16 and kernels.native_bf16() else xs.to(gemm_dtype)
        y = xs.new_empty(xs.shape[0], self.out_features)
        own = x.dtype == torch.float32 and kernels.own_gemm()
        rows = kernels.gemm_chunk_rows(self.out_features, self.in_features)
        buf = None if own else x.new_empty(rows, self.in_features)  # fp32 or bf16: the op rounds as .to(bf16) rounds
        start = 0
        for e, n in enumerate(c):
            if not n:
                continue
            xe, ye = x[start:start + n], y[start:start + n]
            mm, fill = self._expert_kernels(e)
            if n <= kernels.max_m(self):
                ye.copy_(mm(xs[start:start + n].float()))
            elif int8:
                ye.copy_(kernels.ops.quant_gemm_i8(xe, *self._expert_args(e)))
            elif own:
                ye.copy_(kernels.ops.kquant_dense_gemm(xe, self.blocks[e], self.ggml_type, None) if self.ggml_type
                         else kernels.ops.quant_dense_gemm(xe, *self._expert_args(e), None))
            else:
                ye.copy_(kernels.dequant_gemm(xe, self.out_features, fill, buf))
            start += n
        return y

    def _expert_kernels(self, e: int):
        """(mm(x), fill(row0, w)) of quantized expert e: its streaming kernel (fp32 x [n, K] -> [n, N]) and its
        dequantization into w (glm4's ops)."""
        if self.ggml_type:
            b, t = self.blocks[e], self.ggml_type
            return (lambda x: kernels.ops.kquant_mm(x, b, self.in_features, t, self.activation_bits),
                    functools.partial(kernels.ops.kquant_dequantize_rows, b, t))
        args = self._expert_args(e)
        return (lambda x: kernels.ops.quant_mm(x, *args, True, self.activation_bits),
                functools.partial(kernels.ops.dequantize_rows, *args))

    def _expert_args(self, e: int) -> tuple:
        """(codes, scales, mins, bits, group, zero point) of expert e, as glm4's ops take them."""
        return (self.qweight[e], self.scales[e], None if self.mins is None else self.mins[e], self.bits,
                self.group_size, self.zero_point)

    def _expert_mm(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, K] through expert e: a QuantLinear view of its codes (streaming kernel for few tokens, else
        dequantize + GEMM a chunk at a time), or its dense weight (streaming kernel, else the large-M GEMM)."""
        if self.bits:
            return self.expert(e)(x)
        if kernels.has_streaming_kernels() and x.device.type == "cpu" and x.shape[0] <= kernels.dense_max_m():
            return kernels.dense_mm(x.float(), self.weight[e]).to(x.dtype)
        return kernels.gemm(x, self.weight[e])

    def extra_repr(self) -> str:
        kind = (f"{str(self.weight.dtype).removeprefix('torch.')}" if self.bits == 0 else
                f"{KQuantLinear.NAMES[self.ggml_type]} blocks" if self.ggml_type else
                f"int{self.bits} g{self.group_size}{' +mins' if self.mins is not None else ''}")
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, {kind}"


def _moe_combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """dispatch_experts' weighted sum back in token order as one op (prefill): the same sums, in slot order."""
    return kernels.ops.moe_combine(y.float(), order, weights.float())


class StreamExperts(nn.Module):
    """E SwiGLU experts: gate_up [E, 2I, H] (gate rows first) and down [E, H, I] as ExpertPacks."""

    def __init__(self, gate_up: ExpertPack, down: ExpertPack):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.num_experts, self.hidden_size = gate_up.num_experts, down.out_features

    @classmethod
    @torch.no_grad()
    def from_stacked(cls, experts: StackedExperts, scheme: str | None = None, group_size: int = 128) -> StreamExperts:
        """scheme None: the stacked weights as they are (no copy); "int8" / "int6" / "int4": quantized by glm4's quantizers."""
        packs = []
        for w in (experts.gate_up_proj.detach(), experts.down_proj.detach()):
            if scheme is None:
                packs.append(ExpertPack(w.contiguous()))
                continue
            from glm4.quant import quant_linear  # the package's quantizer (its __init__ imports this module)

            E, N, K = w.shape
            flat = nn.Linear(K, E * N, bias=False, device="meta")
            flat.weight = nn.Parameter(w.reshape(E * N, K), requires_grad=False)  # row-wise schemes: one call
            small = (64, 32) if scheme == "int4" else (64,)
            g = group_size if K % group_size == 0 else next((s for s in small if K % s == 0), 0)
            q = quant_linear(flat, {"int4": 4, "int6": 6}.get(scheme, 8) if g else 8, g)
            packs.append(ExpertPack(bits=q.bits, group_size=q.group_size, zero_point=q.zero_point,
                                    qweight=q.qweight.view(E, N, -1), scales=q.scales.view(E, N, -1),
                                    mins=None if q.mins is None else q.mins.view(E, N, -1)))
        return cls(*packs)

    @classmethod
    @torch.no_grad()
    def from_quant_linears(cls, gate: list[QuantLinear], up: list[QuantLinear],
                           down: list[QuantLinear]) -> StreamExperts:
        """Per-expert QuantLinears (checkpoints that quantize experts one by one) -> gate|up concatenated along N
        (exact: rows are independent) and down. QuantizationError unless each projection has one format over
        the experts and gate and up share it."""
        g, u = ExpertPack.stack(gate), ExpertPack.stack(up)
        fmt = lambda p: (p.bits, p.group_size, p.zero_point, p.scales.dtype, p.mins is None)  # noqa: E731
        if fmt(g) != fmt(u) or g.in_features != u.in_features:
            raise QuantizationError("gate and up experts need one quantized format")
        cat = lambda a, b: None if a is None else torch.cat([a, b], dim=1)  # noqa: E731
        gate_up = ExpertPack(bits=g.bits, group_size=g.group_size, zero_point=g.zero_point, qweight=cat(g.qweight,
                             u.qweight), scales=cat(g.scales, u.scales), mins=cat(g.mins, u.mins))
        return cls(gate_up, ExpertPack.stack(down))

    @torch.no_grad()
    def to_stacked(self) -> StackedExperts:
        """Back to StackedExperts holding the effective weights (export, training)."""
        dtype = self.gate_up.weight.dtype if self.gate_up.bits == 0 else torch.float32
        m = StackedExperts(self.num_experts, self.hidden_size, self.down.in_features).to(dtype)
        for e in range(self.num_experts):
            m.gate_up_proj[e] = self.gate_up.weight_of(e, dtype)
            m.down_proj[e] = self.down.weight_of(e, dtype)
        return m

    @property
    def activation_bits(self) -> int:
        """The width the decode dispatch rounds activations for: the model's coarsest (set_activation_bits), or 0."""
        return self.gate_up.activation_bits or self.down.activation_bits

    def _mm(self, xs: torch.Tensor, counts: torch.Tensor, which: str) -> torch.Tensor:
        return (self.gate_up if which == "gate_up" else self.down)(xs, counts)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= kernels.dense_max_m() and x.device.type == "cpu":  # decode: the whole dispatch in one op
            gu, dn = self.gate_up, self.down
            y = kernels.ops.expert_glu(x.float(), indices, weights.float(), gu.stored, gu.scales, gu.mins, gu.bits,
                                       gu.group_size, gu.zero_point, dn.stored, dn.scales, dn.mins, dn.bits,
                                       dn.group_size, dn.zero_point, gu.ggml_type, dn.ggml_type, self.activation_bits)
            return y.to(x.dtype)
        combine = _moe_combine if kernels.has_streaming_kernels() and x.device.type == "cpu" else None
        return dispatch_experts(x, indices, weights, self._mm, self.num_experts, self.hidden_size, combine)
