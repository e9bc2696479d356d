"""A decode step through all decoder layers by one call: `torch.classes.glm4.DecodeStack` (csrc/decode_stack.cpp).

With glm4's kernels swapped in, a decode step's arithmetic runs in ~70 glm4 ops, but the Python around them (module
calls, the MoE router's dozen torch ops a layer, ~750 torch calls a step) cost the 697M MoE ~2 ms of a 9 ms batch-1
step on a Zen 3, and the 400M dense model ~1 ms of 8. `use_decode_stack(model)` (the engine's optimize_model, with
the fused ops) reads every layer's tensors into one C++ object that runs the same ops with the same arguments in the
same order, so a step's hidden states equal the modules' bit for bit; `model.decode_layers_kernel` then serves the
engine's decode-only steps of up to 16 tokens (GlmForCausalLM.hidden_states), and anything else (prefill, other
dtypes, an int8 KV cache, router logits asked for) runs the modules as before. Where the stack also reads the token
table and the output head, a greedy decode-only step runs whole in one call, embedding to argmax
(`GlmForCausalLM.greedy_tokens`, `DecodeStackRunner.greedy`): the ~0.8 ms a batch-1 step spent in Python and torch
around the layers (embedding, RoPE rows, the head's module call, the sampler) ran with caches the weights had just
swept (docs/kernels.md, "Where a batch-1 step goes").

Models: `chatglm`, `glm`, `glm4` and `glm4_moe` (dense and MoE layers, shared experts, GLM-4.5's q/k norms), fp32
or bf16 activations (bf16: where the CPU computes in bf16, or `optimize_model(compute=torch.bfloat16)`), projections
fused (qkv_proj, gate_up_proj) and held as FloatLinear / QuantLinear / KQuantLinear, norms FusedRMSNorm, experts
StreamExperts. Anything else (vision models, LoRA-wrapped linears, act-order GPTQ) keeps the module path:
`use_decode_stack` returns False. A module swapped in later (LoRA adapters) must drop the stack
(`drop_decode_stack`).
"""

from __future__ import annotations

import torch
from torch import nn

from glm4.models.chatglm import ChatGLMForConditionalGeneration, ChatGLMMLP, ChatGLMSelfAttention, GLMBlock
from glm4.models.glm import GlmAttention, GlmDecoderLayer, GlmForCausalLM, GlmMLP
from glm4.models.glm4 import Glm4DecoderLayer, Glm4ForCausalLM
from glm4.models.glm4_moe import Glm4MoeDecoderLayer, Glm4MoeForCausalLM, Glm4MoeMLP, Glm4MoeMoE, Glm4MoeRouter

from . import fused, kernels
from .experts import StreamExperts
from .float_linear import CastEmbedding, FloatLinear
from .kquant import KQuantLinear
from .qlinear import QuantEmbedding, QuantLinear

__all__ = ["DecodeStackRunner", "drop_decode_stack", "use_decode_stack"]

_MODELS = (GlmForCausalLM, Glm4ForCausalLM, Glm4MoeForCausalLM, ChatGLMForConditionalGeneration)
_LAYERS = (GlmDecoderLayer, Glm4DecoderLayer, Glm4MoeDecoderLayer)


class Unsupported(Exception):
    """A module the stack does not run (the model keeps its module path)."""


def _norm(m: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """A norm's weight and eps; its weight in the activations' dtype (else FusedRMSNorm runs torch's RMSNorm)."""
    if type(m) is not fused.FusedRMSNorm or m.weight.dtype != dtype:
        raise Unsupported(type(m).__name__)
    return m.weight.detach(), float(m.eps)


def _add_linear(stack, m: nn.Module | None) -> int:
    """The projection's tensors into `stack` as its module's small-M path reads them; returns its id."""
    if type(m) not in (FloatLinear, QuantLinear, KQuantLinear):
        raise Unsupported("unfused projection" if m is None else type(m).__name__)
    bias = None if m.bias is None else m.bias.detach().float()
    if type(m) is FloatLinear and m.weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return stack.add_linear(0, m.weight.detach(), None, None, bias, [0, 0, 0, m.in_features, 0, 0])
    if type(m) is QuantLinear:
        return stack.add_linear(1, m.qweight, m.scales, m.mins, bias,
                                [m.bits, m.group_size, m.zero_point, m.in_features, 0, m.activation_bits])
    if type(m) is KQuantLinear:
        return stack.add_linear(2, m.blocks, None, None, bias, [0, 0, 0, m.in_features, m.ggml_type, m.activation_bits])
    raise Unsupported(f"{type(m).__name__} of {m.weight.dtype}")


def _add_moe(stack, moe: Glm4MoeMoE) -> None:
    router, experts = moe.gate, moe.experts
    if (type(router) is not Glm4MoeRouter or router.matmul is not fused.router_logits
            or router.route is not fused.moe_route or type(experts) is not StreamExperts):
        raise Unsupported("MoE router / experts")
    kw = router.kw
    bias = router.e_score_correction_bias
    gu, dn = experts.gate_up, experts.down
    stack.set_moe(router.weight.detach().contiguous(), None if bias is None else bias.float(),
                  [router.top_k, kw["n_group"], kw["topk_group"], int(kw["scoring_func"] == "sigmoid"),
                   int(kw["norm_topk_prob"])], float(kw["routed_scaling_factor"]),
                  gu.stored, gu.scales, gu.mins, dn.stored, dn.scales, dn.mins,
                  [gu.bits, gu.group_size, gu.zero_point, dn.bits, dn.group_size, dn.zero_point, gu.ggml_type,
                   dn.ggml_type, experts.activation_bits])


def _parts(layer: nn.Module) -> tuple[list[nn.Module], nn.Module, nn.Module | None, Glm4MoeMoE | None]:
    """(norms: input, post-attention [, glm4's post-self-attn, post-mlp], attention, dense MLP or shared experts or
    None, routed experts or None) of a decoder layer the stack runs."""
    kind = type(layer)
    if kind is GLMBlock:
        return [layer.input_layernorm, layer.post_attention_layernorm], layer.self_attention, layer.mlp, None
    if kind not in _LAYERS:
        raise Unsupported(kind.__name__)
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if kind is Glm4DecoderLayer:
        norms += [layer.post_self_attn_layernorm, layer.post_mlp_layernorm]
    if kind is Glm4MoeDecoderLayer and layer.is_moe:
        if type(layer.mlp) is not Glm4MoeMoE:
            raise Unsupported(type(layer.mlp).__name__)
        return norms, layer.self_attn, layer.mlp.shared_experts, layer.mlp
    return norms, layer.self_attn, layer.mlp, None


def _add_layer(stack, layer: nn.Module, dtype: torch.dtype) -> None:
    norms, attn, dense, moe = _parts(layer)
    weights, eps = zip(*(_norm(n, dtype) for n in norms))
    qkv = q = k = v = gate_up = down = gate = up = -1
    if type(attn) is ChatGLMSelfAttention:
        qkv, o = _add_linear(stack, attn.query_key_value), _add_linear(stack, attn.dense)
    elif type(attn) is GlmAttention and attn.qkv_proj is not None:
        qkv, o = _add_linear(stack, attn.qkv_proj), _add_linear(stack, attn.o_proj)
    elif type(attn) is GlmAttention:  # projections of different formats (a q4_K_M file's q6_K v) stay apart
        q, k, v = (_add_linear(stack, getattr(attn, f"{n}_proj")) for n in "qkv")
        o = _add_linear(stack, attn.o_proj)
    else:
        raise Unsupported(type(attn).__name__)
    if type(dense) is ChatGLMMLP:
        gate_up, down = _add_linear(stack, dense.dense_h_to_4h), _add_linear(stack, dense.dense_4h_to_h)
    elif type(dense) is GlmMLP or (type(dense) is Glm4MoeMLP and dense.gate_up_proj is not None):
        gate_up, down = _add_linear(stack, dense.gate_up_proj), _add_linear(stack, dense.down_proj)
    elif type(dense) is Glm4MoeMLP:
        gate, up, down = (_add_linear(stack, getattr(dense, f"{n}_proj")) for n in ("gate", "up", "down"))
    elif dense is not None:
        raise Unsupported(type(dense).__name__)
    stack.add_layer(list(weights), list(eps), [qkv, o, attn.n_heads, gate_up, down, q, k, v, gate, up])
    if getattr(attn, "use_qk_norm", False):
        stack.set_qk_norm(*_norm(attn.q_norm, dtype), *_norm(attn.k_norm, dtype))
    if moe is not None:
        _add_moe(stack, moe)


def _add_ends(stack, model: nn.Module, dtype: torch.dtype) -> bool:
    """The token table and the output head into `stack` (`greedy` then runs a whole step); False where either is a
    module the stack does not read."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    try:
        head_id = _add_linear(stack, head)
        if type(emb) in (nn.Embedding, CastEmbedding) and getattr(emb, "compute_dtype", emb.weight.dtype) == dtype:
            w = emb.weight.detach()
            emb_id = stack.add_linear(0, w, None, None, None, [0, 0, 0, w.shape[1], 0, 0])
        elif type(emb) is QuantEmbedding and emb.compute_dtype == dtype:
            emb_id = head_id if emb.table is head else _add_linear(stack, emb.table)
        else:
            return False
    except Unsupported:
        return False
    stack.set_ends(emb_id, head_id, dtype == torch.bfloat16)
    return True


def _layers_and_final_norm(model: nn.Module) -> tuple[nn.ModuleList, nn.Module | None]:
    if type(model) is ChatGLMForConditionalGeneration:
        return model.transformer.encoder.layers, model.transformer.encoder.final_layernorm
    return model.model.layers, model.model.norm


class DecodeStackRunner:
    """model.decode_layers_kernel: (h [B, T, H] embedded, cs, ctx) -> final-norm hidden states, or None where the
    stack does not take the step (the model runs its layers)."""

    def __init__(self, stack, dtype: torch.dtype, ends: bool = False):
        self.stack, self.dtype, self.ends = stack, dtype, ends

    def __call__(self, h: torch.Tensor, cs, ctx) -> torch.Tensor | None:
        if getattr(ctx, "qkv_kernel", None) is not fused.decode_qkv_attention:  # decode-only steps, fused kernels
            return None
        if (h.dtype != self.dtype or h.dim() != 3 or h.shape[0] * h.shape[1] > kernels.dense_max_m() or cs.two_d
                or cs.rotary_dim == 0 or cs.cos.dtype != h.dtype or torch.is_grad_enabled()):
            return None
        cache = ctx.cache
        if not fused.reads_cache(h.dtype, cache.k.dtype) or cache.k.dtype != cache.v.dtype:
            return None
        return self.stack.run(h, cs.cos, cs.sin, cs.interleaved, cache.k, cache.v, ctx.slot_mapping,
                              ctx.decode_tables, ctx.decode_lens, cache.block_size)

    def greedy(self, input_ids: torch.Tensor, positions: torch.Tensor, rope, ctx, vocab: int) -> torch.Tensor | None:
        """A decode-only step [1, N] to its greedy tokens int64 [N] (argmax over the first `vocab` logits) by one call:
        embedding, RoPE rows, layers, head and argmax (DecodeStack.greedy); None where it does not take the step."""
        if not self.ends or getattr(ctx, "qkv_kernel", None) is not fused.decode_qkv_attention:
            return None
        if input_ids.dim() != 2 or input_ids.numel() > kernels.dense_max_m() or torch.is_grad_enabled():
            return None
        cache = ctx.cache
        tables = rope.table(positions, self.dtype)
        if tables is None or not fused.reads_cache(self.dtype, cache.k.dtype) or cache.k.dtype != cache.v.dtype:
            return None
        return self.stack.greedy(input_ids.reshape(-1), positions.reshape(-1), *tables, rope.spec.interleaved,
                                 cache.k, cache.v, ctx.slot_mapping, ctx.decode_tables, ctx.decode_lens,
                                 cache.block_size, vocab)


def use_decode_stack(model: nn.Module) -> bool:
    """Build the model's DecodeStack and set `model.decode_layers_kernel` (see the module doc); False (and nothing
    set) where the model or one of its modules is not one the stack runs, or glm4's fused ops do not run here."""
    drop_decode_stack(model)
    if type(model) not in _MODELS or not fused.have_fused_ops():
        return False
    try:
        stack = torch.classes.glm4.DecodeStack()
    except RuntimeError:  # an extension built before the class existed
        return False
    dtype = getattr(model, "compute_dtype", torch.float32)  # the activations' (glm4.engine's optimize_model)
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    layers, norm = _layers_and_final_norm(model)
    try:
        for layer in layers:
            _add_layer(stack, layer, dtype)
        w, eps = _norm(norm, dtype) if norm is not None else (None, 0.0)
    except Unsupported:
        return False
    stack.set_final_norm(w, eps)
    model.decode_layers_kernel = DecodeStackRunner(stack, dtype, _add_ends(stack, model, dtype))
    return True


def drop_decode_stack(model: nn.Module) -> None:
    """Back to the module path (after swapping modules the stack holds the old tensors of)."""
    if isinstance(model, GlmForCausalLM):
        model.decode_layers_kernel = None
