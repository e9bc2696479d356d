"""`model_type: glm4` — GLM-4-0414 (GLM-4-9B/32B-0414, GLM-Z1): the glm layer plus sandwich norms."""

from __future__ import annotations

import torch
from torch import nn

from glm4.config import Glm4Config
from glm4.layers.norm import RMSNorm
from glm4.layers.rope import CosSin
from glm4.models.glm import GlmAttention, GlmForCausalLM, GlmMLP, take_rows


class Glm4DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = GlmAttention(config, layer_idx)
        self.mlp = GlmMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, cs: CosSin, ctx, rows: torch.Tensor | None = None) -> torch.Tensor:
        # each sublayer output is normalized again before the residual add
        x = take_rows(x, rows) + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cs, ctx, rows))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Glm4ForCausalLM(GlmForCausalLM):
    config_class = Glm4Config
    decoder_layer_cls = Glm4DecoderLayer
