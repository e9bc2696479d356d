"""Rotary position embeddings from a `RopeSpec`: partial rotary, GPT-J (interleaved) or NeoX (half-split)
pairs, linear / dynamic-NTK / YaRN scaling computed as transformers' `modeling_rope_utils` does, and GLM
2-D positions.

Usage: `rope = Rope(spec)`; once per forward `cs = rope.cos_sin(positions, dtype)`; per layer
`q, k = apply_rope(q, cs), apply_rope(k, cs)` with q/k [B, T, H, D]; dims >= rotary_dim pass through.

2-D positions [B, T, 2] (GLM blank infilling): the rotary dims split into two halves, each its own RoPE of
rotary_dim/2 dims (ChatGLM-6B style, full frequency range in each); the first half turns by
positions[..., 0], the second by positions[..., 1].

3-D M-RoPE (GLM-4.xV, `spec.mrope_section` set): positions [B, T, 3] = (temporal, height, width); the
rotary_dim/2 frequencies split into three consecutive groups of `mrope_section` sizes, group i turning by
positions[..., i]; then laid out over the pairs as usual. [B, T] positions mean t = h = w (plain text).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from glm4.config import RopeSpec


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(theta: float, dim: int, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor")
    if factor is None:
        factor = max_pos / orig
    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(rot):  # the dim index whose wavelength makes `rot` turns over `orig` positions
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 = keep the original (extrapolated) frequency, 0 = interpolate by `factor`
    return inter * (1 - keep) + extra * keep, float(attention_factor)


def _dynamic_inv_freq(theta: float, dim: int, factor: float, max_pos: int, seq_len: int) -> torch.Tensor:
    # transformers grows the base once the sequence passes max_position_embeddings; tensor math in fp32 as there
    sl = torch.maximum(torch.tensor(seq_len, dtype=torch.int64), torch.tensor(max_pos, dtype=torch.int64))
    base = theta * ((factor * sl / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(spec: RopeSpec, rotary_dim: int | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """fp32 inverse frequencies [rotary_dim/2] and the cos/sin scale (YaRN's attention factor, else 1)."""
    dim = rotary_dim or spec.rotary_dim
    s = spec.scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "linear":
        return _default_inv_freq(spec.theta, dim) / s["factor"], 1.0
    if kind == "yarn":
        return _yarn(spec.theta, dim, s, spec.max_position_embeddings)
    if kind == "dynamic" and seq_len is not None and seq_len > spec.max_position_embeddings:
        return _dynamic_inv_freq(spec.theta, dim, s["factor"], spec.max_position_embeddings, seq_len), 1.0
    return _default_inv_freq(spec.theta, dim), 1.0


@dataclass
class CosSin:
    """Per-forward rotation tables, already laid out like the rotated dims: cos/sin [B, T, 1, rotary_dim]
    (for 2-D positions a pair of [B, T, 1, rotary_dim/2] tables, one per half)."""

    cos: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    sin: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    rotary_dim: int
    interleaved: bool
    two_d: bool = False
    rotate: Callable[[torch.Tensor, CosSin], torch.Tensor] | None = None  # a fused apply_rope (Rope.rotate)


_TABLE_POSITIONS = 1 << 16  # the most positions Rope keeps tables of (64 rotary dims: 2 x 16 MiB in fp32)


def _expand(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # [B, T, R/2] (one angle per pair) -> [B, T, 1, R] matching the pair layout, broadcast over heads
    t = t.repeat_interleave(2, dim=-1) if interleaved else torch.cat((t, t), dim=-1)
    return t[:, :, None]


class Rope:
    """cos/sin tables from a `RopeSpec`; holds no parameters (safe to build on the meta device)."""

    def __init__(self, spec: RopeSpec):
        self.spec = spec
        self.rotate = None  # set by the engine to a fused apply_rope (glm4.quant.fused.rope); tables carry it
        self._cache: dict[tuple, tuple[torch.Tensor, float]] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (dim, dtype) -> cos, sin [n, dim]

    def _inv_freq(self, dim: int, device: torch.device, seq_len: int) -> tuple[torch.Tensor, float]:
        dynamic = (self.spec.scaling or {}).get("rope_type") == "dynamic" and seq_len > self.spec.max_position_embeddings
        key = (dim, str(device), seq_len if dynamic else None)
        if key not in self._cache:
            inv, scale = rope_inv_freq(self.spec, dim, seq_len if dynamic else None)
            if dynamic:  # one entry per length would grow without bound
                self._cache = {k: v for k, v in self._cache.items() if k[2] is None}
            self._cache[key] = (inv.to(device), scale)
        return self._cache[key]

    def _table(self, pos: torch.Tensor, dim: int, dtype: torch.dtype, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not seq_len and pos.device.type == "cpu" and pos.numel():  # not dynamic: rows of one table of positions
            rows = self._rows(pos, dim, dtype)
            if rows is not None:
                return rows
        return self._compute(pos, dim, dtype, seq_len)

    def _rows(self, pos: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The tables' rows for `pos` from ones computed once for positions 0..n-1 (`_grown`): two lookups instead
        of ~10 ops a step (~150 us of a decode step, Zen 3); each row is what _compute gives for that position alone
        (cos and sin are elementwise)."""
        lo, hi = torch.aminmax(pos)
        table = self._grown(dim, dtype, int(lo), int(hi) + 1)
        if table is None:
            return None
        flat = pos.reshape(-1)
        shape = (*pos.shape, 1, table[0].shape[1])
        return table[0].index_select(0, flat).view(shape), table[1].index_select(0, flat).view(shape)

    def _grown(self, dim: int, dtype: torch.dtype, lo: int, need: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos / sin [n, dim] for positions 0..n-1, n >= need a power of two (grown as needed, up to
        _TABLE_POSITIONS); None for positions outside that."""
        if lo < 0 or need > _TABLE_POSITIONS:
            return None
        key = (dim, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < need:
            n = max(256, 1 << (need - 1).bit_length())
            cos, sin = self._compute(torch.arange(n)[None], dim, dtype, 0)  # [1, n, 1, dim]
            table = self._tables[key] = (cos[0, :, 0], sin[0, :, 0])
        return table

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos / sin [n, rotary_dim] whose rows `cos_sin` reads for plain [B, T] CPU `positions` (row p: position
        p, every one of `positions` below n), for a caller that looks the rows up itself (the decode stack); None
        where cos_sin computes its tables otherwise (2-D or M-RoPE positions, dynamic NTK, no rotary dims)."""
        if (self.spec.mrope_section is not None or (self.spec.scaling or {}).get("rope_type") == "dynamic"
                or positions.dim() != 2 or positions.device.type != "cpu" or not positions.numel()
                or not self.spec.rotary_dim):
            return None
        lo, hi = torch.aminmax(positions)
        return self._grown(self.spec.rotary_dim, dtype, int(lo), int(hi) + 1)

    def _compute(self, pos: torch.Tensor, dim: int, dtype: torch.dtype, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv, scale = self._inv_freq(dim, pos.device, seq_len)
        freqs = pos[..., None].float() * inv  # [B, T, dim/2]
        il = self.spec.interleaved
        return _expand((freqs.cos() * scale).to(dtype), il), _expand((freqs.sin() * scale).to(dtype), il)

    def _mrope_table(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # pos [B, T, 3] -> each frequency turns by the axis its mrope_section group names
        inv, _ = self._inv_freq(self.spec.rotary_dim, pos.device, 0)
        axis = torch.repeat_interleave(torch.arange(3, device=pos.device),
                                       torch.tensor(self.spec.mrope_section, device=pos.device))  # [R/2]
        freqs = pos.float().index_select(-1, axis) * inv  # [B, T, R/2]
        il = self.spec.interleaved
        return _expand(freqs.cos().to(dtype), il), _expand(freqs.sin().to(dtype), il)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> CosSin:
        """positions [B, T] (or [B, T, 2], or [B, T, 3] for M-RoPE) -> tables cast to `dtype` (the activations'
        dtype, as transformers)."""
        if self.spec.mrope_section is not None:
            if positions.dim() == 2:
                positions = positions[..., None].expand(*positions.shape, 3)
            cos, sin = self._mrope_table(positions, dtype)
            return CosSin(cos, sin, self.spec.rotary_dim, self.spec.interleaved, rotate=self.rotate)
        # dynamic NTK: transformers scales by the largest position in the call (+1); only then a host sync
        dynamic = (self.spec.scaling or {}).get("rope_type") == "dynamic"
        seq_len = int(positions.max()) + 1 if dynamic and positions.numel() else 0
        R = self.spec.rotary_dim
        if positions.dim() == 3:
            a = self._table(positions[..., 0], R // 2, dtype, seq_len)
            b = self._table(positions[..., 1], R // 2, dtype, seq_len)
            return CosSin((a[0], b[0]), (a[1], b[1]), R, self.spec.interleaved, two_d=True)
        cos, sin = self._table(positions, R, dtype, seq_len)
        return CosSin(cos, sin, R, self.spec.interleaved, rotate=self.rotate)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # x [B, T, H, R], cos/sin [B, T, 1, R] -> x * cos + rotate(x) * sin
    if interleaved:  # pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])
        rot = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:  # pairs (x[i], x[i + R/2]) -> (-x[i + R/2], x[i])
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


def apply_rope(x: torch.Tensor, cs: CosSin) -> torch.Tensor:
    """x [B, T, H, D] -> same shape, the first `rotary_dim` dims of each head rotated."""
    if cs.rotate is not None:
        return cs.rotate(x, cs)
    return apply_rope_torch(x, cs)


def apply_rope_torch(x: torch.Tensor, cs: CosSin) -> torch.Tensor:
    """apply_rope in torch ops (what a fused rotation falls back to)."""
    R = cs.rotary_dim
    if R == 0:
        return x
    x_rot, x_pass = x[..., :R], x[..., R:]
    if cs.two_d:
        h = R // 2
        x_rot = torch.cat((_rotate(x_rot[..., :h], cs.cos[0], cs.sin[0], cs.interleaved),
                           _rotate(x_rot[..., h:], cs.cos[1], cs.sin[1], cs.interleaved)), dim=-1)
    else:
        x_rot = _rotate(x_rot, cs.cos, cs.sin, cs.interleaved)
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot
