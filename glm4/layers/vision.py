"""The GLM-4.1V / 4.5V / 4.6V vision tower (transformers' `Glm4vVisionModel`, the checkpoints' `model.visual.*`).

Input: `pixel_values` [N, C*T*P*P] (one row per patch, C x temporal_patch x patch x patch, patches block-major over
the 2x2 merge blocks, the order `glm4.media.image` packs them in) and `grid_thw` [n, 3] (t, h, w in patches per
image or video). Output: [sum(t*h*w) / merge^2, out_hidden_size], the language model's image-token embeddings.

    patch_embed      Conv3d(C -> D, kernel = stride = (T, P, P)) applied to each row, then RMSNorm
    embeddings       the learned (image_size/P)^2 position table, resampled bicubically to each h x w grid
    blocks           pre-RMSNorm ViT blocks; attention is non-causal within one frame (t = 1 slice) only,
                     rotary over (row, col): head_dim/4 frequencies per axis, NeoX halves
    post_layernorm   RMSNorm; downsample = Conv2d(D -> out, k = s = merge) over each 2x2 block
    merger           Linear -> LayerNorm -> GELU -> SwiGLU(out -> intermediate -> out)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm4.config import Glm4vVisionConfig
from glm4.layers.norm import RMSNorm


def patch_coords(grid_thw: list[tuple[int, int, int]], merge: int, device=None) -> torch.Tensor:
    """(row, col) of every patch [N, 2] in packing order: per frame, merge x merge blocks row-major, each block's
    patches row-major (transformers' `get_vision_position_ids`)."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        rc = torch.stack([rows.reshape(block).transpose(1, 2).flatten(), cols.reshape(block).transpose(1, 2).flatten()], -1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: list[tuple[int, int]]) -> torch.Tensor:
        """x [N, D]; cos/sin [N, head_dim] fp32; frames: (count, length) runs of equal-length frames in order."""
        N = x.shape[0]
        q, k, v = self.qkv(x).reshape(N, 3, self.num_heads, self.head_dim).unbind(1)  # each [N, H, hd]
        c, s = cos[:, None], sin[:, None]
        q = (q.float() * c + _rotate_half(q.float()) * s).to(v.dtype)  # rotary in fp32, as the reference
        k = (k.float() * c + _rotate_half(k.float()) * s).to(v.dtype)
        outs, start = [], 0
        for count, length in frames:  # frames of one image/video share a length: one batched call per run
            end = start + count * length
            qs, ks, vs = (t[start:end].reshape(count, length, self.num_heads, self.head_dim).transpose(1, 2)
                          for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(end - start, -1))
            start = end
        return self.proj(torch.cat(outs) if len(outs) > 1 else outs[0])


class VisionMLP(nn.Module):
    """SwiGLU with separate gate/up/down (the blocks' is `out_hidden_size` wide, the merger's `intermediate_size`)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config.hidden_size, config.out_hidden_size)

    def forward(self, x, cos, sin, frames):
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        self.shape = (config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=self.shape[1:], stride=self.shape[1:])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # each row is exactly one kernel window: the conv is one matmul per patch
        x = pixels.reshape(-1, *self.shape).to(self.proj.weight.dtype)
        return self.proj(x).reshape(x.shape[0], -1)


class PositionTable(nn.Module):
    """`embeddings.position_embedding`: a side x side learned table, sampled bicubically at each patch centre."""

    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        self.side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(self.side * self.side, config.hidden_size)

    def forward(self, coords: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """coords [N, 2] (row, col), sizes [N, 2] (h, w of each patch's grid) -> [N, D] in the table's dtype."""
        table = self.position_embedding.weight
        grid2d = table.float().reshape(self.side, self.side, -1).permute(2, 0, 1)[None]  # [1, D, side, side]
        norm = (coords.float() + 0.5) / sizes.float() * 2 - 1  # patch centres in [-1, 1]
        at = norm.flip(-1)[None, :, None, :]  # grid_sample wants (x = col, y = row): [1, N, 1, 2]
        out = F.grid_sample(grid2d, at, mode="bicubic", align_corners=False, padding_mode="border")
        return out[0, :, :, 0].transpose(0, 1).to(table.dtype)


class PatchMerger(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionTower(nn.Module):
    """forward(pixel_values [N, C*T*P*P], grid_thw [n, 3]) -> [N / merge^2, out_hidden_size]."""

    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        self.config = config
        self.merge = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config)
        self.post_conv_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.embeddings = PositionTable(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.post_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.downsample = nn.Conv2d(config.hidden_size, config.out_hidden_size, kernel_size=self.merge, stride=self.merge)
        self.merger = PatchMerger(config.out_hidden_size, config.intermediate_size)

    def rotary(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords [N, 2] -> cos, sin [N, head_dim] fp32: (row angles, col angles) concatenated, then duplicated."""
        half = self.config.hidden_size // self.config.num_heads // 2  # each axis gets head_dim/4 frequencies
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=coords.device) / half))
        ang = (coords.float()[..., None] * inv).flatten(1)  # [N, head_dim/2]: row angles, then col angles
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos(), ang.sin()

    def activation_bytes(self, grid: tuple[int, int, int], itemsize: int) -> int:
        """Estimated peak bytes of activations while encoding one image / video of this grid, weights not counted.

        Counted per patch (N = t*h*w) from the tensors alive at the widest point, then x 1.25 for allocator rounding
        and kernel workspaces (checked against measured peaks in tests/test_encoder_budget.py): the fp32 pixel row
        held throughout, plus the largest of: the embedding (the row cast to the weights' dtype, the patch
        embedding, its norm, the position rows in fp32); a block's attention (residual, norm, qkv, per-frame q/k/v
        copies, output, concat, projection, sum: 11 D, plus 9 D x 4 bytes in fp32 for the rotated q/k and the
        RMSNorm's working copies); its MLP (residual, norm, gate, up, silu, product, down, sum: 4 D + 4 O); the
        merger's per patch ((5 O + 4 intermediate) / merge^2). Attention adds nothing quadratic: the tower calls
        scaled_dot_product_attention without a mask, which runs the flash kernels on CPU and CUDA (measured: 8000
        tokens x 4 heads fp32 -> +6 MB RSS, where a score matrix would be 977 MB)."""
        t, h, w = grid
        c, n = self.config, t * h * w
        d, out, inner = c.hidden_size, c.out_hidden_size, c.intermediate_size
        row = c.in_channels * c.temporal_patch_size * c.patch_size ** 2
        embed = (row * itemsize if itemsize != 4 else 0) + 2 * d * itemsize + 2 * d * 4
        attn = 11 * d * itemsize + 9 * d * 4
        mlp = (4 * d + 4 * out) * itemsize
        merger = (5 * out + 4 * inner) * itemsize // self.merge ** 2
        return int(1.25 * n * (row * 4 + max(embed, attn, mlp, merger)))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        grids = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
        m = self.merge
        for t, h, w in grids:
            if t < 1 or h % m or w % m:
                raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of the merge size {m}")
        if pixel_values.shape[0] != sum(t * h * w for t, h, w in grids):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, the grids {grids} need "
                             f"{sum(t * h * w for t, h, w in grids)}")
        dev = pixel_values.device
        coords = patch_coords(grids, m, dev)
        sizes = torch.tensor([(h, w) for t, h, w in grids], device=dev).repeat_interleave(
            torch.tensor([t * h * w for t, h, w in grids], device=dev), dim=0)  # each patch's grid (h, w)
        frames = [(t, h * w) for t, h, w in grids]
        x = self.post_conv_layernorm(self.patch_embed(pixel_values))
        x = x + self.embeddings(coords, sizes).to(x.dtype)
        cos, sin = self.rotary(coords)
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        x = self.post_layernorm(x)
        x = x.reshape(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2)  # one merge block per row: [N/m^2, D, m, m]
        x = self.downsample(x).reshape(-1, self.config.out_hidden_size)
        return self.merger(x)
