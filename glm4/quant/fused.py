"""Fused small ops for inference on CPU: one glm4 op where a decode step made a dozen torch calls per layer.

A batch-1 decode of a small model spends a fifth of its step outside the linears (the 400M bench checkpoint,
int4, one thread: RMSNorm 0.33 ms, RoPE 0.33 ms, attention 0.45 ms of an 11 ms step — ~2,000 torch calls),
which the weight-streaming kernels cannot win back. `use_fused_ops(model)` (glm4.engine's optimize_model, on
by default: `EngineArgs.fused_ops`) swaps in, where glm4's kernels run (glm4.quant.kernels.has_streaming_kernels):

- every RMSNorm -> FusedRMSNorm (torch.ops.glm4.rms_norm; fp32 / bf16, the reference's rounding order);
- the model's Rope -> tables that carry `rope` (torch.ops.glm4.rope: equal to apply_rope to the bit);
- and `decode_attention` for glm4.layers.paged_attention (the engine's runner passes it to PagedAttention.build):
  decodes attend straight from the paged cache at every context length, no gather, no mask, no SDPA (1.4-8x
  gather + SDPA's time from 256 to 8,192 keys, 2 threads, Zen 5); `decode_qkv_attention` does a
  decode-only step's RoPE, cache write and attention from the fused q/k/v projection in one call (~20 torch calls
  and their Python a layer otherwise: ~3 us apiece, which a small model's batch-1 step feels);
- and `prefill_attention` for prompt chunks (fp32; a fresh prompt or one after cached context): causal attention
  by one op, the keys transposed once, 4 query rows x 2 vectors of keys a step (torch's CPU flash kernel calls
  MKL's sgemm, which takes a generic path on AMD: 1.45x / 1.75x its speed with the AVX2 / AVX-512 set, 512
  tokens, one thread, Zen 5);
- a MoE router's logits for few tokens by glm4's dense kernel (`router_logits`; MKL's sgemv there, on AMD, took
  33 us of a decode step's ~170 us MoE layer for the 697M MoE's 64 x 1024 router), and its choice of experts by
  one op (`moe_route`: route()'s ~10 torch ops took ~29 us of such a layer on a Zen 4).

Anything the ops do not take (autograd, other dtypes or devices, 2-D positions, an int8 KV cache) runs the
torch code as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm4.layers.moe import route
from glm4.layers.norm import RMSNorm
from glm4.layers.rope import CosSin, apply_rope_torch
from glm4.models.glm4_moe import Glm4MoeRouter

from . import kernels

__all__ = ["FusedRMSNorm", "decode_attention", "decode_qkv_attention", "describe_fused", "have_fused_ops",
           "moe_route", "prefill_attention", "reads_cache", "rope", "router_logits", "use_fused_ops"]

_DTYPES = (torch.float32, torch.bfloat16)


def have_fused_ops() -> bool:
    """The fused ops exist and run on this CPU (they need AVX2 + FMA, as the streaming kernels)."""
    return kernels.has_streaming_kernels() and hasattr(torch.ops.glm4, "rms_norm")


def reads_cache(activations: torch.dtype, cache: torch.dtype) -> bool:
    """The decode ops read a float KV cache in the activations' dtype, or bf16 under fp32 activations."""
    return cache == activations or (activations, cache) == (torch.float32, torch.bfloat16)


def _cache_takes(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return k.dtype == v.dtype and reads_cache(x.dtype, k.dtype)


def _takes(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """The ops take CPU fp32 / bf16 tensors of one dtype, and have no backward."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)):
        return False
    dtype = x.dtype
    if dtype not in _DTYPES or x.device.type != "cpu":
        return False
    for o in others:
        if o.dtype != dtype:
            return False
    return True


class FusedRMSNorm(RMSNorm):
    """RMSNorm by one op; shares the weight Parameter of the norm it replaces (checkpoint names unchanged)."""

    @classmethod
    def from_norm(cls, norm: RMSNorm) -> FusedRMSNorm:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight, new.eps = norm.weight, norm.eps
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if _takes(x, weight):
            return kernels.ops.rms_norm(x, weight, self.eps)
        return super().forward(x)


def rope(x: torch.Tensor, cs: CosSin) -> torch.Tensor:
    """apply_rope by one op (x [B, T, H, D], tables [B, T, 1, R] of x's dtype)."""
    if cs.two_d or cs.rotary_dim == 0 or x.dim() != 4 or not _takes(x, cs.cos, cs.sin):
        return apply_rope_torch(x, cs)
    return kernels.ops.rope(x, cs.cos, cs.sin, cs.interleaved)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                     lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """q [Bd, Hq, D] over k/v [S, Hkv, D] (one layer of the paged cache): row b attends its first lens[b]
    positions, position l at slot block_table[b, l // block_size] * block_size + l % block_size -> [Bd, Hq, D]."""
    return kernels.ops.decode_attention(q, k, v, block_table, lens, block_size)


def decode_qkv_attention(qkv: torch.Tensor, cs: CosSin, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                         block_table: torch.Tensor, lens: torch.Tensor, block_size: int, n_heads: int
                         ) -> torch.Tensor | None:
    """A decode step's attention from the fused q/k/v projection in one op: qkv [B, T, (Hq + 2 Hkv) D] -> [B, T, Hq D]
    (RoPE of q and k, k / v stored at `slots` of the layer's cache k / v [S, Hkv, D], then `decode_attention`); the
    values of the separate ops. None where the op does not take the inputs (the caller runs the separate ops)."""
    if cs.two_d or cs.rotary_dim == 0 or not _takes(qkv, cs.cos, cs.sin) or not _cache_takes(qkv, k, v):
        return None
    return kernels.ops.decode_qkv_attention(qkv, cs.cos, cs.sin, cs.interleaved, k, v, slots, block_table, lens,
                                            block_size, n_heads)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Causal attention of a prompt chunk: q [T, Hq, D] at the last T of the S positions of k / v [S, Hkv, D] (a
    fresh prompt: S = T; a chunk after cached context: the gathered context and the chunk) -> [T, Hq, D] (scale
    1/sqrt(D)), as scaled_dot_product_attention with the offset-causal mask gives it (fp32 sums in another order;
    1.45x / 1.75x its speed with the AVX2 / AVX-512 set at T = 512, D = 64, one thread). None where the op does not
    take the inputs (fp32 only): the caller runs SDPA."""
    if q.dtype != torch.float32 or q.device.type != "cpu" or q.shape[-1] % 16:
        return None
    return kernels.ops.prefill_attention(q, k.float(), v.float())


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A MoE router's fp32 logits x [N, H] @ weight [E, H]^T: up to dense_max_m tokens by glm4's dense kernel (the
    weight read as stored, fp32 accumulation; MKL's sgemv takes a generic path on AMD: 33 us a call for the 697M
    MoE's 64 x 1024 router, a sixth of its experts' time), else F.linear on the fp32 weight."""
    if x.dim() == 2 and x.shape[0] <= kernels.dense_max_m() and x.dtype == torch.float32 and _takes(x) and not (
            torch.is_grad_enabled() and weight.requires_grad):
        return kernels.ops.dense_mm(x.contiguous(), weight.contiguous())
    return F.linear(x, weight.float())


def moe_route(logits: torch.Tensor, top_k: int, *, scoring_func: str = "sigmoid",
              correction_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
              norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """glm4.layers.moe.route by one op (torch.ops.glm4.moe_route) for fp32 logits on the CPU outside autograd (the
    indices equal, the weights within a few ulp of route()'s); route() itself otherwise."""
    if logits.dtype == torch.float32 and logits.dim() == 2 and _takes(logits) and scoring_func in ("sigmoid", "softmax"):
        return kernels.ops.moe_route(logits, correction_bias, top_k, n_group, topk_group, scoring_func == "sigmoid",
                                     norm_topk_prob, routed_scaling_factor)
    return route(logits, top_k, scoring_func=scoring_func, correction_bias=correction_bias, n_group=n_group,
                 topk_group=topk_group, norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor)


def use_fused_ops(model: nn.Module) -> int:
    """Swap the fused ops into `model` in place (see the module doc) and set `model.decode_attention_kernel`
    (read by the engine's runner) where its head_dim allows; returns how many norms were swapped. Does nothing
    where the ops do not run."""
    if not have_fused_ops():
        return 0
    head_dim = getattr(getattr(model, "config", None), "head_dim", None)
    if isinstance(head_dim, int) and head_dim % 8 == 0:
        model.decode_attention_kernel = decode_attention
        model.decode_qkv_kernel = decode_qkv_attention
    if isinstance(head_dim, int) and head_dim % 16 == 0:
        model.prefill_attention_kernel = prefill_attention
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is RMSNorm:
                setattr(parent, name, FusedRMSNorm.from_norm(child))
                n += 1
    for m in model.modules():
        r = getattr(m, "rope", None)
        if r is not None and hasattr(r, "rotate"):
            r.rotate = rope
        if isinstance(m, Glm4MoeRouter):
            m.matmul, m.route = router_logits, moe_route
    return n


def describe_fused(model: nn.Module) -> str:
    """Which fused ops `model` runs ("" for none), for describe() / `glm4 serve --verbose`."""
    ops = []
    if any(isinstance(m, FusedRMSNorm) for m in model.modules()):
        ops.append("rms_norm")
    if any(getattr(getattr(m, "rope", None), "rotate", None) is rope for m in model.modules()):
        ops.append("rope")
    if getattr(model, "decode_attention_kernel", None) is not None:
        ops.append("decode_attention")
    if getattr(model, "prefill_attention_kernel", None) is not None:
        ops.append("prefill_attention (fp32 prompt chunks)")
    if any(isinstance(m, Glm4MoeRouter) and m.matmul is router_logits for m in model.modules()):
        ops.append("router_logits (<= 16 tokens)")
    if any(isinstance(m, Glm4MoeRouter) and m.route is moe_route for m in model.modules()):
        ops.append("moe_route")
    if getattr(model, "decode_layers_kernel", None) is not None:
        ops.append("decode_stack (decode steps of <= 16 tokens: every layer by one call)")
    return ", ".join(ops)
