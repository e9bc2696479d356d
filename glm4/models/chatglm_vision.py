"""GLM-4V-9B: `model_type: chatglm` with a `vision_config` (the hub's remote code: `modeling_chatglm.py` + `visual.py`).

    transformer.embedding / encoder / output_layer   the glm-4-9b-chat language model (glm4/models/chatglm.py)
    transformer.vision                               the EVA2-CLIP tower (glm4/layers/eva_clip.py): 1602 vectors/image

Two ways to call it, one rule for where an image goes and which positions it takes:

- **As the remote code** (`images=`): the prompt holds the 3-token placeholder `<|begin_of_image|><|endoftext|>
  <|end_of_image|>` (one image per sequence, as the checkpoint's tokenizer writes it); the 3 embeddings are replaced
  by the image's 1602 vectors, so the output has T + 1599 rows. Positions: the tokens up to and including boi keep
  theirs (p), all 1600 patch vectors take p + 1, eoi and the text after it keep theirs (p + 2, ...).
- **Expanded** (`pixel_values=`, what the engine uses): the prompt already holds boi + 1600 filler tokens + eoi
  (`glm4.media.glm4v_9b.expand_image_placeholders`); those 1602 rows are replaced in place and `rope_index` gives
  the same positions (as [B, T, 3], all three equal, like the GLM-4.xV models) and the decoding offset `rope_deltas`
  (-1599 per image): token i of the sequence after the prompt sits at position i + delta.

forward(input_ids, images=None, positions=None, ctx=None, logits_indices=None, pixel_values=None) -> logits
"""

from __future__ import annotations

import torch

from glm4.config import ChatGLMVisionConfig
from glm4.layers.attention import Causal
from glm4.layers.eva_clip import EVA2CLIPTower
from glm4.models.chatglm import ChatGLMForConditionalGeneration
from glm4.models.glm import run_layers

TEXT, IMAGE = 0, 1  # token types, as glm4.models.glm4v writes them


class ChatGLMVisionForConditionalGeneration(ChatGLMForConditionalGeneration):
    config_class = ChatGLMVisionConfig

    def __init__(self, config: ChatGLMVisionConfig):
        super().__init__(config)
        self.transformer.vision = EVA2CLIPTower(config.vision_config, config.hidden_size, config.ffn_hidden_size)

    @property
    def num_image_tokens(self) -> int:
        return self.config.vision_config.num_image_tokens

    # ---- vision --------------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, image_grid_thw=None) -> torch.Tensor:
        """[n, C, S, S] -> [n * 1602, hidden]: each image's vectors in order (the grids are implied by the size)."""
        return self.transformer.vision(pixel_values).flatten(0, 1)

    def media_layout(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        """(pixel_values rows, prompt tokens) of one image: one [C, S, S] row, 1602 tokens (any grid is S/P square)."""
        return 1, self.num_image_tokens

    def encoder_bytes(self, grid: tuple[int, int, int]) -> int:
        """Estimated peak activation bytes of the tower on one image (the same for every image)."""
        tower = self.transformer.vision
        return tower.activation_bytes(tower.patch_embedding.proj.weight.element_size())

    def image_grid(self) -> tuple[int, int, int]:
        """The grid every image has after preprocessing: (1, S/P, S/P) patches."""
        side = self.config.vision_config.grid_side
        return 1, side, side

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T]: IMAGE over each expanded image span (boi, 1600 fillers, eoi), TEXT elsewhere."""
        out = torch.zeros_like(input_ids)
        n = self.num_image_tokens
        for b, row in enumerate(input_ids.tolist()):
            for s in (i for i, t in enumerate(row) if t == self.config.boi_token_id):
                if s + n > len(row) or row[s + n - 1] != self.config.eoi_token_id:
                    raise ValueError(f"<|begin_of_image|> at {s} is not followed by {n - 2} image tokens and "
                                     f"<|end_of_image|> (expand the prompt's images first)")
                out[b, s:s + n] = IMAGE
        return out

    def rope_index(self, input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None,
                   mm_token_type_ids: torch.Tensor | None = None, attention_mask=None):
        """Expanded prompt -> (positions [B, T, 3] (three equal axes), rope_deltas [B]); see the module docstring."""
        if video_grid_thw is not None:
            raise ValueError("GLM-4V-9B takes no videos")
        types = self.token_types(input_ids) if mm_token_type_ids is None else mm_token_type_ids
        B, T = types.shape
        n = self.num_image_tokens
        positions = torch.zeros(B, T, dtype=torch.long)
        deltas = []
        for b, row in enumerate(types.tolist()):
            cur, i = 0, 0
            while i < T:
                if row[i] == IMAGE:  # boi at cur, the patches at cur + 1, eoi at cur + 2
                    positions[b, i] = cur
                    positions[b, i + 1:i + n - 1] = cur + 1
                    positions[b, i + n - 1] = cur + 2
                    cur, i = cur + 3, i + n
                else:
                    positions[b, i] = cur
                    cur, i = cur + 1, i + 1
            deltas.append(cur - T)
        return positions[..., None].expand(B, T, 3).to(types.device), torch.tensor(deltas, device=types.device)

    def splice_images(self, input_ids: torch.Tensor, images: torch.Tensor,
                      positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The remote code's first pass: 3-token placeholders -> (embeddings [B, T + 1599, hidden], positions)."""
        B, T = input_ids.shape
        if images.shape[0] != B:
            raise ValueError(f"{images.shape[0]} images for {B} sequences: GLM-4V-9B takes one image per sequence")
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        embeds = self.transformer.embedding.word_embeddings(input_ids)
        feats = self.transformer.vision(images).to(embeds.dtype)  # [B, 1602, hidden]
        out_h, out_p = [], []
        for b, row in enumerate(input_ids.tolist()):
            boi, eoi = self.config.boi_token_id, self.config.eoi_token_id
            if row.count(boi) != 1 or row.count(eoi) != 1 or row.index(eoi) - row.index(boi) != 2:
                raise ValueError("each sequence needs exactly one <|begin_of_image|> x <|end_of_image|> placeholder "
                                 "(3 tokens) when images are given")
            s = row.index(boi)
            patch_pos = positions[b, s + 1].expand(self.num_image_tokens - 2)
            out_h.append(torch.cat((embeds[b, :s], feats[b], embeds[b, s + 3:])))
            out_p.append(torch.cat((positions[b, :s + 1], patch_pos, positions[b, s + 2:])))
        return torch.stack(out_h), torch.stack(out_p)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Expanded prompt: token embeddings [B, T, hidden] with each image's 1602 vectors over its span."""
        h = self.transformer.embedding.word_embeddings(input_ids)
        if pixel_values is None:
            return h
        where = self.token_types(input_ids) == IMAGE
        feats = self.image_features(pixel_values)
        if int(where.sum()) != feats.shape[0]:
            raise ValueError(f"{int(where.sum()) // self.num_image_tokens} image spans in input_ids but "
                             f"{pixel_values.shape[0]} images")
        return h.masked_scatter(where[..., None], feats.to(h.dtype))

    # ---- language model ------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx=None, *layer_args,
                      inputs_embeds: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """As chatglm's, also from `inputs_embeds`; positions [B, T] or [B, T, 3] (three equal axes, the engine's)."""
        h = self.transformer.embedding.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        if positions is None:
            positions = torch.arange(T, device=h.device).expand(B, T)
        elif positions.dim() == 3:
            positions = positions[..., 0]
        ctx = Causal() if ctx is None else ctx
        cs = self.rope.cos_sin(positions, h.dtype)
        h = run_layers(self.transformer.encoder.layers, h, cs, ctx, rows=rows)
        norm = self.transformer.encoder.final_layernorm
        return norm(h) if norm is not None else h

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                ctx=None, logits_indices: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw=None) -> torch.Tensor:
        if images is not None and pixel_values is not None:
            raise ValueError("give images (3-token placeholders) or pixel_values (expanded prompt), not both")
        embeds = None
        if images is not None:
            embeds, positions = self.splice_images(input_ids, images, positions)
        elif pixel_values is not None:
            embeds = self.embed(input_ids, pixel_values)
            if positions is None:
                positions, _ = self.rope_index(input_ids)
        h = self.hidden_states(input_ids, positions, ctx, inputs_embeds=embeds, rows=logits_indices)
        if logits_indices is not None:
            h = h.reshape(-1, h.shape[-1])  # [K, hidden]
        return self.transformer.output_layer(h)
