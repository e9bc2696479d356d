"""GLM-4V-9B's vision tower: EVA2-CLIP (the hub's remote-code `visual.py`, checkpoint names `transformer.vision.*`).

Input: `images` [n, C, S, S], S = image_size (1120), normalized with the CLIP mean / std (glm4.media.glm4v_9b).
Output: [n, (S/P/2)^2 + 2, text_hidden] = 1602 vectors per image, already divided by `scaling_factor` (8): the
language model's embeddings for `<|begin_of_image|>`, the 40 x 40 merged patches row-major, `<|end_of_image|>`.

    patch_embedding  Conv2d(C -> D, k = s = P) -> (S/P)^2 patches row-major; a learned CLS row first; then the learned
                     position table (num_positions = (S/P)^2 + 1 rows) added row for row
    transformer      blocks with the LayerNorm *after* each sublayer: x + LN(attn(x)), then h + LN(mlp(h));
                     attention non-causal over the whole image, q/k/v fused with bias; MLP fc1 -> GELU (erf) -> fc2
    conv             CLS dropped, the grid merged 2 x 2 by Conv2d(D -> text_hidden, k = s = 2)
    linear_proj      GLU projector: Linear -> LayerNorm -> GELU -> silu(gate_proj) * dense_h_to_4h -> dense_4h_to_h
    boi, eoi         learned [1, 1, text_hidden] vectors around the image; everything / scaling_factor
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm4.config import EVA2CLIPVisionConfig


class PatchEmbedding(nn.Module):
    def __init__(self, config: EVA2CLIPVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=config.patch_size,
                              stride=config.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # [n, (S/P)^2, D], patches row-major
        cls = self.cls_embedding.expand(x.shape[0], 1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight  # row i gets position i (CLS = 0)


class EVAAttention(nn.Module):
    def __init__(self, config: EVA2CLIPVisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # rows [q | k | v], heads inside
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, L, D = x.shape
        q, k, v = self.query_key_value(x).reshape(n, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [n, H, L, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # non-causal, scale 1/sqrt(hd)
        return self.dense(out.transpose(1, 2).reshape(n, L, D))


class EVAMLP(nn.Module):
    def __init__(self, config: EVA2CLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EVABlock(nn.Module):
    """Post-sublayer norms: the LayerNorm is applied to each sublayer's output before the residual add."""

    def __init__(self, config: EVA2CLIPVisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = EVAAttention(config)
        self.mlp = EVAMLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class EVATransformer(nn.Module):
    def __init__(self, config: EVA2CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EVABlock(config) for _ in range(config.num_hidden_layers))


class GLUProjector(nn.Module):
    """`linear_proj`: width text_hidden in and out, SwiGLU of width ffn_hidden inside (the LM's ffn_hidden_size)."""

    def __init__(self, hidden: int, ffn_hidden: int):
        super().__init__()
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)  # eps 1e-5, as the reference leaves it
        self.dense_h_to_4h = nn.Linear(hidden, ffn_hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, ffn_hidden, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPTower(nn.Module):
    """forward(images [n, C, S, S]) -> [n, num_image_tokens, text_hidden] (see the module docstring)."""

    def __init__(self, config: EVA2CLIPVisionConfig, text_hidden: int, ffn_hidden: int):
        super().__init__()
        self.config = config
        self.patch_embedding = PatchEmbedding(config)
        self.transformer = EVATransformer(config)
        self.linear_proj = GLUProjector(text_hidden, ffn_hidden)
        self.conv = nn.Conv2d(config.hidden_size, text_hidden, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, text_hidden))
        self.eoi = nn.Parameter(torch.zeros(1, 1, text_hidden))

    def activation_bytes(self, itemsize: int) -> int:
        """Estimated peak bytes of activations while encoding one image, weights not counted (the method of
        glm4.layers.vision's `activation_bytes`, x 1.25 likewise): N = (S/P)^2 + 1 rows; the largest of a block's
        attention (residual, qkv, its q/k/v copies, output, transposed copy, projection, norm, sum: 12 D, plus
        LayerNorm's fp32 statistics in half precision: 2 D x 4 bytes), its MLP (residual, fc1, GELU, fc2, norm,
        sum: 4 D + 2 x intermediate) and the GLU projector's per patch over the 2 x 2 merge (5 x text hidden +
        4 x ffn hidden, / 4); plus the image (fp32, its cast and the patch convolution's unfolded copy)."""
        c = self.config
        n = c.grid_side ** 2 + 1
        d, inner = c.hidden_size, c.intermediate_size
        text, ffn = self.conv.out_channels, self.linear_proj.dense_h_to_4h.out_features
        per_row = max(12 * d * itemsize + 2 * d * 4, (4 * d + 2 * inner) * itemsize, (5 * text + 4 * ffn) * itemsize // 4)
        image = c.in_channels * c.image_size ** 2 * (4 + 2 * itemsize)
        return int(1.25 * (n * per_row + image))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images must be [n, {want[0]}, {want[1]}, {want[2]}] (resized and normalized), "
                             f"got {list(images.shape)}")
        x = self.patch_embedding(images.to(self.patch_embedding.proj.weight.dtype))
        for layer in self.transformer.layers:
            x = layer(x)
        side = c.grid_side
        x = x[:, 1:].reshape(x.shape[0], side, side, -1).permute(0, 3, 1, 2)  # CLS dropped: [n, D, side, side]
        x = self.linear_proj(self.conv(x).flatten(2).transpose(1, 2))  # [n, (side/2)^2, text_hidden]
        n = x.shape[0]
        x = torch.cat((self.boi.expand(n, 1, -1).to(x.dtype), x, self.eoi.expand(n, 1, -1).to(x.dtype)), dim=1)
        return x / c.scaling_factor
