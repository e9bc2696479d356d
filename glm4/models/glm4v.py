"""`model_type: glm4v` — GLM-4.1V-Thinking, GLM-4.6V-Flash (transformers' Glm4vForConditionalGeneration names).

    model.visual          the vision tower (glm4/layers/vision.py): patches -> one embedding per 2x2 block
    model.language_model  glm4 decoder layers (sandwich norms) with 3-D M-RoPE (interleaved pairs)
    lm_head

Prompt layout (what `glm4.media.prompt` builds): an image is `<|begin_of_image|>` + n x `<|image|>` +
`<|end_of_image|>` with n = t*h*w/4 of its grid; a video is `<|begin_of_video|>`, then per temporal patch
`<|begin_of_image|>` + n x `<|image|>` + `<|end_of_image|>{seconds}`, then `<|end_of_video|>`. The tower's outputs
replace the `<|image|>` embeddings in order (images at token type 1, video frames at type 2).

Positions (`rope_index`): text counts up; an image span starting at s gets (t, h, w) = (s, s + row, s + col) over
its merged grid, and the text after it resumes at s + max(h, w)/2. `rope_deltas` = (last position + 1) - length:
decoding token k of the reply (0-based index i in the whole sequence) sits at i + delta on all three axes, so
after prefill the model is called like a text model with positions [B, T] = arange + delta.

forward(input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
        mm_token_type_ids=None, positions=None, ctx=None, logits_indices=None, attention_mask=None) -> logits
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from glm4.config import Glm4vConfig
from glm4.layers.attention import Causal
from glm4.layers.rope import Rope
from glm4.layers.vision import VisionTower
from glm4.models.glm import GlmModel, run_layers
from glm4.models.glm4 import Glm4DecoderLayer

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values, as transformers' processor writes them


def token_types(input_ids: torch.Tensor, config: Glm4vConfig) -> torch.Tensor:
    """[B, T] -> [B, T]: IMAGE for `<|image|>` outside a video span, VIDEO inside one, TEXT elsewhere."""
    opened = (input_ids == config.video_start_token_id).cumsum(-1)
    closed = (input_ids == config.video_end_token_id).cumsum(-1)
    is_image = input_ids == config.image_token_id
    out = torch.zeros_like(input_ids)
    out[is_image & (opened > closed)] = VIDEO
    out[is_image & (opened <= closed)] = IMAGE
    return out


def rope_index(types: torch.Tensor, image_grid_thw, video_grid_thw, merge: int,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token types [B, T] and the grids -> (positions [B, T, 3], rope_deltas [B]). Grids are consumed in order over
    the whole batch; a video's frames are separate t = 1 spans (its timestamps are text between them)."""
    images = iter([tuple(g) for g in _grids(image_grid_thw)])
    frames = iter([(1, h, w) for t, h, w in _grids(video_grid_thw) for _ in range(t)])
    B, T = types.shape
    positions = torch.zeros(B, T, 3, dtype=torch.long, device=types.device)
    deltas = []
    for b in range(B):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(T, dtype=torch.bool, device=types.device)
        row = types[b][keep].tolist()
        parts, cur = [], 0
        for kind, run in itertools.groupby(row):
            n = len(list(run))
            if kind == TEXT:
                parts.append(torch.arange(cur, cur + n).unsqueeze(-1).expand(n, 3))
                cur += n
                continue
            try:
                t, h, w = next(images if kind == IMAGE else frames)
            except StopIteration:
                raise ValueError(f"more {'image' if kind == IMAGE else 'video'} spans in input_ids than grids") from None
            ht, wt = h // merge, w // merge
            if n != t * ht * wt:
                raise ValueError(f"an {'image' if kind == IMAGE else 'video frame'} span has {n} placeholder tokens, "
                                 f"its grid ({t}, {h}, {w}) needs {t * ht * wt}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(ht), torch.arange(wt), indexing="ij")
            parts.append(torch.stack([tt, hh, ww], -1).reshape(-1, 3) + cur)
            cur += max(ht, wt)
        pos = torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.long)
        positions[b, keep] = pos.to(types.device)
        deltas.append((int(pos.max()) + 1 if len(pos) else 0) - len(row))
    return positions, torch.tensor(deltas, device=types.device)


def _grids(grid_thw) -> list[list[int]]:
    if grid_thw is None:
        return []
    return [[int(v) for v in g] for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]


class Glm4vModel(nn.Module):
    """The checkpoint's `model.*`: `visual` and `language_model` (embed_tokens, layers, norm)."""

    def __init__(self, config: Glm4vConfig, layer_cls):
        super().__init__()
        self.visual = VisionTower(config.vision_config)
        self.language_model = GlmModel(config.text_config, layer_cls)


class Glm4vForConditionalGeneration(nn.Module):
    config_class = Glm4vConfig
    decoder_layer_cls = Glm4DecoderLayer

    def __init__(self, config: Glm4vConfig):
        super().__init__()
        self.config = config
        text = config.text_config
        self.model = Glm4vModel(config, type(self).decoder_layer_cls)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        self.rope = Rope(text.rope)

    @classmethod
    def from_config(cls, config):
        return cls(config)

    # ---- vision --------------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, image_grid_thw) -> torch.Tensor:
        """[N_patches, C*T*P*P] -> [N_patches / merge^2, hidden]: one embedding per `<|image|>` token, in order."""
        return self.model.visual(pixel_values, image_grid_thw)

    def media_layout(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        """(pixel_values rows, `<|image|>` tokens) of one image or video of this (t, h, w) grid."""
        t, h, w = grid
        return t * h * w, t * h * w // self.config.vision_config.spatial_merge_size ** 2

    def encoder_bytes(self, grid: tuple[int, int, int]) -> int:
        """Estimated peak activation bytes of the tower on one image / video of this grid (the engine's budget)."""
        return self.model.visual.activation_bytes(grid, self.model.visual.patch_embed.proj.weight.element_size())

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        return token_types(input_ids, self.config)

    def rope_index(self, input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None,
                   mm_token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        """(positions [B, T, 3], rope_deltas [B]) for a prompt; see the module docstring."""
        types = self.token_types(input_ids) if mm_token_type_ids is None else mm_token_type_ids
        return rope_index(types, image_grid_thw, video_grid_thw, self.config.vision_config.spatial_merge_size,
                          attention_mask)

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, mm_token_type_ids=None) -> torch.Tensor:
        """Token embeddings [B, T, hidden] with the tower's outputs at the image / video placeholder positions."""
        h = self.model.language_model.embed_tokens(input_ids)
        if pixel_values is None and pixel_values_videos is None:
            return h
        types = self.token_types(input_ids) if mm_token_type_ids is None else mm_token_type_ids
        for kind, pixels, grid, name in ((IMAGE, pixel_values, image_grid_thw, "image"),
                                         (VIDEO, pixel_values_videos, video_grid_thw, "video")):
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{name} pixels given without their {name}_grid_thw")
            feats = self.image_features(pixels, grid)
            where = types == kind
            if int(where.sum()) != feats.shape[0]:
                raise ValueError(f"{int(where.sum())} {name} placeholder tokens in input_ids but the {name} grids "
                                 f"give {feats.shape[0]} embeddings")
            h = h.masked_scatter(where[..., None], feats.to(h.dtype))
        return h

    # ---- language model ------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx=None, *layer_args,
                      inputs_embeds: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]; positions [B, T] (text, or decoding: arange + rope_deltas) or
        [B, T, 3]. `rows` (flat indices): only those rows' states, [1, len(rows), hidden] (glm.run_layers)."""
        lm = self.model.language_model
        h = lm.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        if positions is None:
            positions = torch.arange(T, device=h.device).expand(B, T)
        ctx = Causal() if ctx is None else ctx
        cs = self.rope.cos_sin(positions, h.dtype)
        return lm.norm(run_layers(lm.layers, h, cs, ctx, layer_args, rows))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_grid_thw=None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw=None,
                mm_token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None, ctx=None,
                logits_indices: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self._hidden(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                         mm_token_type_ids, positions, ctx, attention_mask, rows=logits_indices)
        if logits_indices is not None:
            h = h.reshape(-1, h.shape[-1])  # [K, hidden]
        return self.lm_head(h)

    def _hidden(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                mm_token_type_ids, positions, ctx, attention_mask, *layer_args, rows=None) -> torch.Tensor:
        has_media = image_grid_thw is not None or video_grid_thw is not None
        if positions is None and has_media:
            positions, _ = self.rope_index(input_ids, image_grid_thw, video_grid_thw, mm_token_type_ids, attention_mask)
        if ctx is None and attention_mask is not None:
            ctx = Causal(key_mask=attention_mask)
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                            mm_token_type_ids)
        return self.hidden_states(input_ids, positions, ctx, *layer_args, inputs_embeds=embeds, rows=rows)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    # ---- checkpoint hooks -------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters()}  # the hub's names; a tied lm_head deduplicated

    def skip_checkpoint_key(self, name: str) -> bool:
        if name.endswith("inv_freq"):  # rotary buffers of older exports
            return True
        return bool(self.config.tie_word_embeddings) and name == "lm_head.weight"
