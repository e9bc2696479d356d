"""`model_type: glm4_moe` — GLM-4.5 / 4.5-Air / 4.6 (transformers' Glm4MoeForCausalLM names).

Plain pre-norm layers with `GlmAttention` (optional q/k RMSNorm, NeoX half-split partial RoPE from
`config.rope`); layers < `first_k_dense_replace` have a dense SwiGLU, the others a routed MoE with
stacked experts plus optional shared experts. `scoring_func` "softmax" gives GLM-4's publicly described
MoE (softmax top-k, no correction bias). MTP layers (`model.layers.{num_hidden_layers}.*` on) are dropped.

Checkpoints name experts one by one (`mlp.experts.{e}.{gate,up,down}_proj.weight`, what the hub files and
transformers 5.x `save_pretrained` hold); they load as views into the stacked tensors. The fused layout
(`mlp.experts.gate_up_proj` [E, 2I, H], transformers' in-memory names) maps 1:1 when the loader passes the
files' tensor names to `checkpoint_state_dict(checkpoint_keys=...)`.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from glm4.config import ConfigError, Glm4MoeConfig
from glm4.layers.moe import StackedExperts, route
from glm4.layers.norm import RMSNorm
from glm4.layers.rope import CosSin
from glm4.models.glm import GlmAttention, GlmForCausalLM, fuse_linears, take_rows

_LAYER = re.compile(r"model\.(?:language_model\.)?layers\.(\d+)\.")  # glm4v_moe nests the LM
_FUSED = re.compile(r"(model\.(?:language_model\.)?layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def unstacked_expert_views(model: nn.Module, moe_intermediate_size: int, checkpoint_keys=None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under its checkpoint name, stacked experts as per-expert views (unless the files
    hold that layer fused: `checkpoint_keys` names it)."""
    fused = {n for n in checkpoint_keys or () if _FUSED.match(n)}
    out: dict[str, torch.Tensor] = {}
    inter = moe_intermediate_size
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        m = _FUSED.match(name)
        if m is None or name in fused:
            out[name] = t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "gate_up_proj":  # [E, 2I, H]: gate rows first, then up
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, inter:]
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
    return out


def is_mtp_or_empty_shared(name: str, config) -> bool:
    """Checkpoint tensors a glm4_moe language model drops: MTP layers (`layers.{num_hidden_layers}` on) and the
    0-row shared experts transformers saves when n_shared_experts is 0."""
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= config.num_hidden_layers:
        return True
    return config.n_shared_experts == 0 and ".mlp.shared_experts." in name


class Glm4MoeMLP(nn.Module):
    """Dense SwiGLU with the checkpoint's separate gate/up/down names (dense layers, shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """Inference: gate_proj and up_proj as one `gate_up_proj` (not for training or saving)."""
        if self.gate_up_proj is not None:
            return  # already fused
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        if self.gate_up_proj is not None:
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Glm4MoeRouter(nn.Module):
    """`mlp.gate`: weight [E, H]; `e_score_correction_bias` [E] (sigmoid only) stays fp32 whatever the model dtype."""

    def __init__(self, config: Glm4MoeConfig):
        super().__init__()
        c = config
        if c.num_experts_per_tok > c.topk_group * (c.n_routed_experts // c.n_group):
            raise ConfigError(f"glm4_moe: num_experts_per_tok={c.num_experts_per_tok} exceeds the experts of "
                              f"topk_group={c.topk_group} of n_group={c.n_group} groups")
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        if c.scoring_func == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.kw = dict(scoring_func=c.scoring_func, n_group=c.n_group, topk_group=c.topk_group,
                       norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor)
        self.top_k = c.num_experts_per_tok
        self.matmul = None  # (x fp32 [N, H], weight) -> fp32 logits: set by glm4.quant.fused to a kernel for few tokens
        self.route = route  # (logits, top_k, correction_bias=, **kw) -> (indices, weights): glm4.quant.fused's op

    def _apply(self, fn, recurse=True):
        # .to(bf16) must not round the bias: it separates experts by margins finer than bf16 resolution
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (router logits fp32 [N, E], indices [N, k], weights fp32 [N, k])."""
        logits = F.linear(x.float(), self.weight.float()) if self.matmul is None else self.matmul(x.float(), self.weight)
        idx, w = self.route(logits, self.top_k, correction_bias=self.e_score_correction_bias, **self.kw)
        return logits, idx, w


class Glm4MoeMoE(nn.Module):
    def __init__(self, config: Glm4MoeConfig):
        super().__init__()
        c = config
        self.gate = Glm4MoeRouter(c)
        self.experts = StackedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (Glm4MoeMLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)
                               if c.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (out [B, T, H], router logits [B*T, E])."""
        flat = x.reshape(-1, x.shape[-1])
        logits, idx, w = self.gate(flat)
        out = self.experts(flat, idx, w).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, logits


class Glm4MoeDecoderLayer(nn.Module):
    def __init__(self, config: Glm4MoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = GlmAttention(config, layer_idx)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        self.mlp = Glm4MoeMoE(config) if self.is_moe else Glm4MoeMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cs: CosSin, ctx, router_logits: list | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        x = take_rows(x, rows) + self.self_attn(self.input_layernorm(x), cs, ctx, rows)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h)
        h, logits = self.mlp(h)
        if router_logits is not None:
            router_logits.append(logits)
        return x + h


class Glm4MoeForCausalLM(GlmForCausalLM):
    """forward(input_ids [B, T], positions=None, ctx=None, logits_indices=None, return_router_logits=False)
    -> logits, or (logits, [router logits fp32 [B*T, E] per MoE layer]) for a load-balancing loss."""

    config_class = Glm4MoeConfig
    decoder_layer_cls = Glm4MoeDecoderLayer
    keep_in_fp32 = ("e_score_correction_bias",)  # read by glm4.weights.empty_model

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx=None,
                      router_logits: list | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        return super().hidden_states(input_ids, positions, ctx, router_logits, rows=rows)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx=None,
                logits_indices: torch.Tensor | None = None, return_router_logits: bool = False):
        router_logits: list | None = [] if return_router_logits else None
        # router logits asked for: every row's, so every row runs the last layer
        rows = None if return_router_logits else logits_indices
        h = self.hidden_states(input_ids, positions, ctx, router_logits, rows=rows)
        if logits_indices is not None:
            h = h.reshape(-1, h.shape[-1])  # [K, hidden]
            if rows is None:
                h = h[logits_indices]
        logits = self.get_output_embeddings()(h)
        return (logits, router_logits) if return_router_logits else logits

    # ---- checkpoint hooks -------------------------------------------------------------------------
    def checkpoint_state_dict(self, checkpoint_keys=None) -> dict[str, torch.Tensor]:
        """Checkpoint names -> views sharing storage with our parameters; stacked experts appear one by one
        (`mlp.experts.{e}.gate_proj.weight` = gate_up_proj[e, :I], ...), the layout transformers saves.

        `checkpoint_keys`: the names found in the files, when the loader passes them; a layer whose experts are
        stored fused (`mlp.experts.gate_up_proj` [E, 2I, H], transformers' in-memory names) then maps 1:1."""
        return unstacked_expert_views(self, self.config.moe_intermediate_size, checkpoint_keys)

    def skip_checkpoint_key(self, name: str) -> bool:
        return super().skip_checkpoint_key(name) or is_mtp_or_empty_shared(name, self.config)
