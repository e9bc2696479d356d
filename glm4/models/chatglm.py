"""`model_type: chatglm` — glm-4-9b-chat / -1m in the original remote-code layout (`transformer.encoder...`).

Same math as `glm` (see glm4-facts §2.2): fused `query_key_value` with bias, rows split [q | k | v]; RoPE
base 10000·rope_ratio on the first half of each head with interleaved pairs; `dense_h_to_4h` SwiGLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm4.config import ChatGLMConfig
from glm4.layers.attention import Causal
from glm4.layers.norm import RMSNorm
from glm4.layers.rope import CosSin, Rope, apply_rope
from glm4.models.glm import GlmForCausalLM, run_layers, take_rows


class ChatGLMSelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(self.q_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor, cs: CosSin, ctx, rows: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.query_key_value(x)
        attend_qkv = getattr(ctx, "attend_qkv", None)
        out = attend_qkv(self.layer_idx, qkv, cs, self.n_heads) if attend_qkv else None
        if out is not None:  # the engine's decode steps: RoPE, cache write and attention in one op
            return self.dense(take_rows(out, rows))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cs)
        k = apply_rope(k.view(B, T, self.n_kv, self.head_dim), cs)
        out = ctx.attend(self.layer_idx, q, k, v.view(B, T, self.n_kv, self.head_dim))
        return self.dense(take_rows(out.reshape(B, T, self.q_size), rows))


class ChatGLMMLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.self_attention = ChatGLMSelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.mlp = ChatGLMMLP(config)

    def forward(self, x: torch.Tensor, cs: CosSin, ctx, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = take_rows(x, rows) + self.self_attention(self.input_layernorm(x), cs, ctx, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.layernorm_epsilon) if config.post_layer_norm else None


class _Transformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.embedding = _Embedding(config)
        self.encoder = _Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)


class ChatGLMForConditionalGeneration(GlmForCausalLM):
    config_class = ChatGLMConfig

    def __init__(self, config: ChatGLMConfig):
        nn.Module.__init__(self)
        self.config = config
        self.transformer = _Transformer(config)
        if config.tie_word_embeddings:
            self.transformer.output_layer.weight = self.transformer.embedding.word_embeddings.weight
        self.rope = Rope(config.rope)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx=None,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        ctx = Causal() if ctx is None else ctx
        h = self.transformer.embedding.word_embeddings(input_ids)
        cs = self.rope.cos_sin(positions, h.dtype)
        if self.decode_layers_kernel is not None:  # GlmForCausalLM's: every layer of a decode step by one call
            out = self.decode_layers_kernel(h, cs, ctx)
            if out is not None:
                return take_rows(out, rows)
        h = run_layers(self.transformer.encoder.layers, h, cs, ctx, rows=rows)
        norm = self.transformer.encoder.final_layernorm
        return norm(h) if norm is not None else h

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def skip_checkpoint_key(self, name: str) -> bool:
        # rotary tables are recomputed; a tied output layer comes from the embedding
        if name.endswith("rotary_pos_emb.inv_freq"):
            return True
        return bool(self.config.tie_word_embeddings) and name == "transformer.output_layer.weight"
