"""`model_type: glm` — the -hf checkpoints (glm-4-9b-chat-hf, -1m-hf), transformers' GlmForCausalLM names.

Also the shared pieces of the family: `GlmAttention` (separate q/k/v, optional q/k RMSNorm, partial RoPE of
either pair layout from `config.rope`), `GlmMLP` (fused gate_up SwiGLU) and `GlmForCausalLM`, whose
`decoder_layer_cls` / hooks the glm4 and glm4_moe files override.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm4.config import GlmConfig
from glm4.layers.attention import Causal
from glm4.layers.norm import RMSNorm
from glm4.layers.rope import CosSin, Rope, apply_rope


def fuse_linears(*linears: nn.Module) -> nn.Module | None:
    """One linear whose output is the linears' outputs concatenated (same input): an nn.Linear for plain ones, or
    what their common type's `concat(linears)` makes (quantized linears of one format, e.g. a GGUF file's q / k / v);
    None otherwise (LoRA-wrapped or mixed modules stay as they are)."""
    kind = type(linears[0])
    if kind is not nn.Linear:
        concat = getattr(kind, "concat", None)
        return concat(linears) if concat is not None and all(type(m) is kind for m in linears) else None
    if not all(type(m) is nn.Linear for m in linears):
        return None
    first = linears[0]
    bias = first.bias is not None
    out = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=bias,
                    device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in linears]))
        if bias:
            out.bias.copy_(torch.cat([m.bias for m in linears]))
    return out.requires_grad_(first.weight.requires_grad)


def take_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x [..., C] -> [1, len(rows), C]: the flat rows (over every leading dim) a caller wants; x itself for None."""
    return x if rows is None else x.reshape(-1, x.shape[-1])[rows][None]


def run_layers(layers: nn.ModuleList, h: torch.Tensor, cs: CosSin, ctx, layer_args: tuple = (),
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """h [B, T, hidden] through every decoder layer. `rows` (flat indices into the B * T rows): only those rows'
    outputs are wanted (the engine's sampled and scored positions), so the last layer keeps just them after its
    attention, whose K / V every row still writes, and runs its output projection and MLP on them alone; the result
    is then [1, len(rows), hidden]. A 512-token prompt to its first token skips most of one layer's matmuls (llama.cpp
    skips the last layer's FFN rows the same way)."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        h = layer(h, cs, ctx, *layer_args, rows=rows) if i == last and rows is not None else layer(h, cs, ctx, *layer_args)
    return h


def fuse_projections(model: nn.Module) -> nn.Module:
    """Inference-time fusion, in place: every module with a `fuse()` (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    for m in list(model.modules()):
        if hasattr(m, "fuse") and callable(m.fuse):
            m.fuse()
    return model


class GlmAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse(): one matmul for q, k, v at inference
        self.use_qk_norm = bool(getattr(config, "use_qk_norm", False))
        if self.use_qk_norm:  # Glm4Moe: RMSNorm over each head before RoPE
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def fuse(self) -> None:
        """Inference: replace q/k/v_proj by one `qkv_proj` (rows q, k, v; one weight stream per token).
        Parameter names then no longer match the checkpoint: not for training or saving."""
        if self.qkv_proj is not None:
            return  # already fused
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        if self.qkv_proj is not None:
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cs: CosSin, ctx, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden], or [1, len(rows), hidden]: the output projection of those rows only."""
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            attend_qkv = None if self.use_qk_norm else getattr(ctx, "attend_qkv", None)
            out = attend_qkv(self.layer_idx, qkv, cs, self.n_heads) if attend_qkv else None
            if out is not None:  # the engine's decode steps: RoPE, cache write and attention in one op
                return self.o_proj(take_rows(out, rows))
            q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim],
                                dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.reshape(B, T, self.n_kv, self.head_dim)
        v = v.reshape(B, T, self.n_kv, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cs), apply_rope(k, cs)
        out = ctx.attend(self.layer_idx, q, k, v)  # [B, T, Hq, D]
        return self.o_proj(take_rows(out.reshape(B, T, self.n_heads * self.head_dim), rows))


class GlmMLP(nn.Module):
    def __init__(self, config, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class GlmDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = GlmAttention(config, layer_idx)
        self.mlp = GlmMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cs: CosSin, ctx, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = take_rows(x, rows) + self.self_attn(self.input_layernorm(x), cs, ctx, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class GlmModel(nn.Module):
    def __init__(self, config, layer_cls):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class GlmForCausalLM(nn.Module):
    """forward(input_ids [B, T], positions=None, ctx=None, logits_indices=None) -> logits [B, T, V] (or [K, V]).

    Loader hooks (see glm4/weights.py): `checkpoint_state_dict()` maps checkpoint names to tensors that share
    storage with the parameters; `skip_checkpoint_key(name)` drops checkpoint tensors we do not use."""

    config_class = GlmConfig
    decoder_layer_cls = GlmDecoderLayer
    # (h [B, T, H] embedded, cs, ctx) -> final-norm hidden states or None: every layer of a decode step by one call,
    # set by glm4.quant.decode_stack (the engine's fused ops); None runs the layers
    decode_layers_kernel = None

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = GlmModel(config, type(self).decoder_layer_cls)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = Rope(config.rope)

    @classmethod
    def from_config(cls, config):
        return cls(config)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx=None,
                      *layer_args, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> final-norm hidden states [B, T, hidden]; `layer_args` go to every decoder layer (MoE: router
        logits). `rows` (flat indices): only those rows' states, [1, len(rows), hidden] (`run_layers`)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        ctx = Causal() if ctx is None else ctx
        h = self.model.embed_tokens(input_ids)
        cs = self.rope.cos_sin(positions, h.dtype)
        if self.decode_layers_kernel is not None and all(a is None for a in layer_args):
            out = self.decode_layers_kernel(h, cs, ctx)
            if out is not None:
                return take_rows(out, rows)
        return self.model.norm(run_layers(self.model.layers, h, cs, ctx, layer_args, rows))

    def greedy_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx, vocab: int) -> torch.Tensor | None:
        """A decode-only step [1, N] -> the argmax of each row's first `vocab` logits, int64 [N], by the decode stack's
        one call (embedding to argmax: `decode_layers_kernel.greedy`); None where no such call takes the step."""
        greedy = getattr(self.decode_layers_kernel, "greedy", None)
        return None if greedy is None else greedy(input_ids, positions, self.rope, ctx, vocab)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx=None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, positions, ctx, rows=logits_indices)
        if logits_indices is not None:
            h = h.reshape(-1, h.shape[-1])  # [K, hidden]
        return self.get_output_embeddings()(h)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    # ---- checkpoint hooks -------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Checkpoint name -> tensor sharing storage with the parameter (identity names here)."""
        return {name: p for name, p in self.named_parameters()}  # a tied lm_head is deduplicated away

    def skip_checkpoint_key(self, name: str) -> bool:
        if name.endswith("rotary_emb.inv_freq"):
            return True
        return bool(self.config.tie_word_embeddings) and name == "lm_head.weight"
