"""`model_type: glm4v_moe` — GLM-4.5V, GLM-4.6V (transformers' Glm4vMoeForConditionalGeneration names).

The glm4v model (glm4/models/glm4v.py: the same vision tower, placeholders, M-RoPE positions and rope_deltas) with
the glm4_moe decoder layers as its language model: sigmoid-routed experts plus a shared expert, the first
`first_k_dense_replace` layers dense, M-RoPE over NeoX halves. Experts are stored one by one in the checkpoint
(`model.language_model.layers.{i}.mlp.experts.{e}.gate_proj.weight`) and load as views into the stacked tensors;
MTP layers (`layers.{num_hidden_layers}` on) are dropped. The router weight stays fp32, as transformers keeps it.

forward(...) as glm4v, plus return_router_logits=False -> (logits, [router logits fp32 [B*T, E] per MoE layer]).
"""

from __future__ import annotations

import torch

from glm4.config import Glm4vMoeConfig
from glm4.models.glm4_moe import Glm4MoeDecoderLayer, is_mtp_or_empty_shared, unstacked_expert_views
from glm4.models.glm4v import Glm4vForConditionalGeneration


class Glm4vMoeForConditionalGeneration(Glm4vForConditionalGeneration):
    config_class = Glm4vMoeConfig
    decoder_layer_cls = Glm4MoeDecoderLayer
    keep_in_fp32 = ("e_score_correction_bias", "mlp.gate.weight")  # read by glm4.weights.meta_model

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_grid_thw=None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw=None,
                mm_token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None, ctx=None,
                logits_indices: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                return_router_logits: bool = False):
        router_logits: list | None = [] if return_router_logits else None
        rows = None if return_router_logits else logits_indices  # router logits asked for: of every row
        h = self._hidden(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                         mm_token_type_ids, positions, ctx, attention_mask, router_logits, rows=rows)
        if logits_indices is not None:
            h = h.reshape(-1, h.shape[-1])  # [K, hidden]
            if rows is None:
                h = h[logits_indices]
        logits = self.lm_head(h)
        return (logits, router_logits) if return_router_logits else logits

    def checkpoint_state_dict(self, checkpoint_keys=None) -> dict[str, torch.Tensor]:
        return unstacked_expert_views(self, self.config.text_config.moe_intermediate_size, checkpoint_keys)

    def skip_checkpoint_key(self, name: str) -> bool:
        return super().skip_checkpoint_key(name) or is_mtp_or_empty_shared(name, self.config.text_config)
