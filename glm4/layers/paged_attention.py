"""Paged attention context for the engine: a packed batch of prefill chunks and decodes.

The batch is flattened to one row, q [1, N, Hq, D], k/v [1, N, Hkv, D], where sequence i owns
tokens [cu[i], cu[i+1]) at positions [ctx_i, ctx_i + q_len_i). `attend` writes k/v into the paged
cache at `slot_mapping` (slot = block_id * block_size + offset), then attends:

- decodes (q_len 1) together: their keys are gathered from the cache, padded to the longest
  context and masked; the G = Hq / Hkv query heads of a KV head ride as G query rows, so GQA
  costs no repeat of K/V;
- each prefill chunk on its own: over its own k/v with a causal mask when it starts at 0, else
  over its gathered context with an offset-causal mask, built per block of queries so that a
  long context never materializes a [q_len, context] mask at once.

Index tensors are built once per step (`PagedAttention.build`) and shared by all layers.

int8 cache (`PagedKVCache(..., dtype=torch.int8)`, `EngineArgs.kv_cache_dtype="int8"`): each written token's
K and V are quantized per KV head, symmetrically, `scale = amax(|x|) / 127` over head_dim, `x ~ round(x / scale)`
(|error| <= scale / 2), scales kept in fp32 beside the int8 blocks; every read dequantizes what it gathers.
Every attention read sees the dequantized K/V, a first prefill's own keys included, so a token's output does not
depend on how it was scheduled (whole prefill, chunks, decode, prefix-cache hit or recompute after preemption).
A float cache narrower than the activations (`kv_cache_dtype="bfloat16"` under fp32 activations) is read the same
way: its values, rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KV_SCALE_DTYPE = torch.float32  # per-token-per-head scales of an int8 cache: 4 bytes per head_dim int8 values


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (int8 [..., D], fp32 scale [..., 1]): symmetric, scale = amax(|x|) / 127 over the last
    dim, so every element dequantizes within scale / 2 of x. An all-zero row gets scale 0 (and dequantizes to 0)."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127
    q = (xf / torch.where(scale > 0, scale, 1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale.to(KV_SCALE_DTYPE)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D] * scale [..., 1] -> [..., D] in `dtype` (multiplied in fp32, then cast once)."""
    return q.to(torch.float32).mul_(scale).to(dtype)


class PagedKVCache:
    """K and V for every layer: [L, num_blocks * block_size + 1, Hkv, D] each (slot-major).

    `dtype` is the storage dtype: a float dtype stores K/V as they come; `torch.int8` stores them quantized
    (`quantize_kv`) with fp32 scales `k_scale`/`v_scale` [L, slots, Hkv, 1] beside them, and reads dequantize.

    The extra last slot stays zero: padded positions of a decode batch read it, so masked-out keys
    are never uninitialized memory (0 * NaN would leak through the softmax). The rest is left
    uninitialized (`empty`), so untouched pages cost no memory."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.null_slot = num_blocks * block_size
        self.dtype = dtype
        self.quantized = dtype == torch.int8
        if dtype.is_complex or not (dtype.is_floating_point or self.quantized):
            raise ValueError(f"a KV cache stores a float dtype or torch.int8, not {dtype}")
        shape = (num_layers, self.null_slot + 1, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, self.null_slot].zero_()
        self.v[:, self.null_slot].zero_()
        self.k_scale = self.v_scale = None
        if self.quantized:
            sshape = (num_layers, self.null_slot + 1, num_kv_heads, 1)
            self.k_scale = torch.empty(sshape, dtype=KV_SCALE_DTYPE, device=device)
            self.v_scale = torch.empty(sshape, dtype=KV_SCALE_DTYPE, device=device)
            self.k_scale[:, self.null_slot].zero_()
            self.v_scale[:, self.null_slot].zero_()
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Cache bytes one token takes over all layers: K and V, plus their scales for an int8 cache."""
        per_head = head_dim * torch.empty((), dtype=dtype).element_size()
        if dtype == torch.int8:
            per_head += torch.empty((), dtype=KV_SCALE_DTYPE).element_size()
        return 2 * num_layers * num_kv_heads * per_head

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the cache tensors (the null slot included)."""
        ts = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.quantized else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [N, Hkv, D] at `slots` [N] of a layer. Returns k/v as a read of those slots gives them back, in
        k's dtype (dequantized for an int8 cache, rounded to the cache's dtype for a narrower float one)."""
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        if not self.quantized:
            kc.index_copy_(0, slots, k.to(kc.dtype))
            vc.index_copy_(0, slots, v.to(vc.dtype))
            if kc.dtype == k.dtype:
                return k, v
            return k.to(kc.dtype).to(k.dtype), v.to(vc.dtype).to(v.dtype)
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        kc.index_copy_(0, slots, kq)
        vc.index_copy_(0, slots, vq)
        self.k_scale[layer_idx].index_copy_(0, slots, ks)
        self.v_scale[layer_idx].index_copy_(0, slots, vs)
        return dequantize_kv(kq, ks, k.dtype), dequantize_kv(vq, vs, v.dtype)

    def gather(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [len(slots), Hkv, D] of a layer at `slots` (1-D), in `dtype`."""
        k = self.k[layer_idx].index_select(0, slots)
        v = self.v[layer_idx].index_select(0, slots)
        if not self.quantized:
            return k.to(dtype), v.to(dtype)
        return (dequantize_kv(k, self.k_scale[layer_idx].index_select(0, slots), dtype),
                dequantize_kv(v, self.v_scale[layer_idx].index_select(0, slots), dtype))


@dataclass
class _Prefill:
    start: int  # first packed token of the chunk
    end: int
    ctx: int  # tokens already in the cache before this chunk
    slots: torch.Tensor | None  # [ctx + q_len] cache slots of the whole context (None when ctx == 0)


MASK_ELEMENTS = 1 << 22  # largest [queries, keys] mask built at once for a chunk after cached context


class PagedAttention:
    """The attention context the engine passes to a model (see glm4/layers/attention.py)."""

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, decode_idx: torch.Tensor | None,
                 decode_slots: torch.Tensor | None, decode_mask: torch.Tensor | None, prefills: list[_Prefill],
                 num_tokens: int):
        self.cache = cache
        self.slot_mapping = slot_mapping  # [N]
        self.decode_idx = decode_idx  # [Bd] packed positions of the decode tokens (None if they are 0..Bd-1)
        self.decode_slots = decode_slots  # [Bd, Lmax]
        self.decode_mask = decode_mask  # [Bd, 1, 1, Lmax] bool or None when all contexts are equally long
        self.prefills = prefills
        self.num_tokens = num_tokens
        self.num_decodes = 0 if decode_slots is None else decode_slots.shape[0]
        self.decode_kernel = None  # fused decode attention over the paged cache (glm4.quant.fused), or None
        self.decode_tables: torch.Tensor | None = None  # [Bd, blocks] int64 block tables of the decodes (kernel)
        self.decode_lens: torch.Tensor | None = None  # [Bd] int64 keys of each decode (kernel)
        self.qkv_kernel = None  # decode-only steps: RoPE, cache write and attention in one op (see attend_qkv)
        self.prefill_kernel = None  # prompt chunks (fresh or after cached context): attention by one op, or None (SDPA)

    @classmethod
    def build(cls, cache: PagedKVCache, block_tables: list[list[int]], ctx_lens: list[int], q_lens: list[int],
              device: torch.device | str = "cpu", decode_kernel=None, qkv_kernel=None, prefill_kernel=None
              ) -> PagedAttention:
        """Metadata for a packed batch: sequence i has `ctx_lens[i]` cached tokens and feeds `q_lens[i]` new ones.
        `decode_kernel(q [Bd, Hq, D], k, v [slots, Hkv, D], block_tables [Bd, blocks], lens [Bd], block_size)
        -> [Bd, Hq, D]` attends decodes straight from the cache, instead of gather + SDPA (glm4.quant.fused's is
        faster at every context length); the caller passes one only for a float cache it reads (the activations'
        dtype, or bf16 under fp32 activations). `qkv_kernel` (glm4.quant.fused.decode_qkv_attention) serves
        `attend_qkv` on decode-only steps that run `decode_kernel`.
        `prefill_kernel(q [T, Hq, D], k, v [S, Hkv, D]) -> [T, Hq, D] or None` attends prompt chunks, the queries
        at the last T of S positions (glm4.quant.fused.prefill_attention; None from it: SDPA)."""
        bs = cache.block_size
        B = len(block_tables)
        maxb = max(len(t) for t in block_tables)
        padded = [t + [0] * (maxb - len(t)) for t in block_tables]
        fused = decode_kernel is not None and not cache.quantized
        if fused and all(q == 1 for q in q_lens):
            # decode-only step for the kernel: the metadata in plain Python, three small tensors
            out = cls(cache, torch.tensor([t[c // bs] * bs + c % bs for t, c in zip(block_tables, ctx_lens)],
                                          device=device), None, None, None, [], B)
            out.num_decodes, out.positions = B, torch.tensor(ctx_lens)
            out.decode_kernel, out.decode_tables = decode_kernel, torch.tensor(padded, device=device)
            out.decode_lens = torch.tensor([c + 1 for c in ctx_lens], device=device)
            out.qkv_kernel = qkv_kernel
            return out
        bt = torch.tensor(padded, dtype=torch.long)  # [B, maxb]
        all_slots = (bt[:, :, None] * bs + torch.arange(bs)).view(B, maxb * bs)  # slot of every position
        ctx_t, q_t = torch.tensor(ctx_lens), torch.tensor(q_lens)
        starts = torch.cumsum(q_t, 0) - q_t
        N = int(q_t.sum())
        rows = torch.repeat_interleave(torch.arange(B), q_t, output_size=N)  # [N] sequence of each token
        cols = torch.arange(N) - starts[rows] + ctx_t[rows]  # [N] position of each token
        slot_mapping = all_slots[rows, cols]
        dec_rows, prefills = [], []
        for i, (ctx, q) in enumerate(zip(ctx_lens, q_lens)):
            if q == 1:
                dec_rows.append(i)
                continue
            start = int(starts[i])
            slots = all_slots[i, :ctx + q].to(device) if ctx else None
            prefills.append(_Prefill(start, start + q, ctx, slots))
        decode_idx = decode_slots = decode_mask = None
        if dec_rows:
            dec_lens = [ctx_lens[i] + 1 for i in dec_rows]
            lmax = max(dec_lens)
            rows_t = torch.tensor(dec_rows)
            if not fused:  # gather + SDPA: every decode's slots, padded to the longest and masked
                decode_slots = all_slots[rows_t, :lmax]
                if min(dec_lens) != lmax:
                    valid = torch.arange(lmax)[None, :] < torch.tensor(dec_lens)[:, None]  # [Bd, lmax]
                    decode_slots = torch.where(valid, decode_slots, cache.null_slot)
                    decode_mask = valid[:, None, None, :].to(device)
                decode_slots = decode_slots.to(device)
            if dec_rows != list(range(len(dec_rows))):  # decodes are not the first Bd packed tokens
                decode_idx = starts[rows_t].to(device)
        out = cls(cache, slot_mapping.to(device), decode_idx, decode_slots, decode_mask, prefills, N)
        out.prefill_kernel = prefill_kernel
        out.positions = cols  # [N] position of each packed token (CPU)
        if dec_rows and fused:  # the kernel walks the block tables
            out.num_decodes = len(dec_rows)
            out.decode_kernel, out.decode_tables = decode_kernel, bt[rows_t].to(device)
            out.decode_lens = torch.tensor(dec_lens, device=device)
        return out

    def attend_qkv(self, layer_idx: int, qkv: torch.Tensor, cs, n_heads: int) -> torch.Tensor | None:
        """qkv [1, N, (Hq + 2 Hkv) D] (a fused projection's output, before RoPE) -> attention output [1, N, Hq D] by
        one op on decode-only steps with the fused kernels; None otherwise (the caller splits, rotates, `attend`s)."""
        if self.qkv_kernel is None:
            return None
        return self.qkv_kernel(qkv, cs, self.cache.k[layer_idx], self.cache.v[layer_idx], self.slot_mapping,
                               self.decode_tables, self.decode_lens, self.cache.block_size, n_heads)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [1, N, Hq, D], k/v [1, N, Hkv, D] -> [1, N, Hq, D]
        q = q[0]
        k, v = self.cache.write(layer_idx, self.slot_mapping, k[0], v[0])  # as reads will see them
        N, Hq, D = q.shape
        Hkv = k.shape[1]
        if self.num_decodes == N:  # decode-only step: no scatter needed
            return self._decode(layer_idx, q, Hkv).unsqueeze(0)
        out = torch.empty_like(q)
        if self.num_decodes:
            idx = self.decode_idx if self.decode_idx is not None else slice(0, self.num_decodes)
            out[idx] = self._decode(layer_idx, q[idx], Hkv)
        # 4-D [1, H, T, D] operands: with 3-D ones SDPA on CPU leaves its flash kernel for the ~3x slower math path
        for p in self.prefills:
            qi = q[p.start:p.end].transpose(0, 1)[None]  # [1, Hq, T, D]
            if p.ctx == 0 and self.prefill_kernel is not None:
                o = self.prefill_kernel(q[p.start:p.end], k[p.start:p.end], v[p.start:p.end])
                if o is not None:
                    out[p.start:p.end] = o
                    continue
            if p.ctx == 0:
                ki, vi = k[p.start:p.end].transpose(0, 1)[None], v[p.start:p.end].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qi, ki.to(q.dtype), vi.to(q.dtype), is_causal=True,
                                                   enable_gqa=Hq != Hkv)
                out[p.start:p.end] = o[0].transpose(0, 1)
                continue
            ki, vi = self.cache.gather(layer_idx, p.slots, q.dtype)  # [S, Hkv, D]
            if self.prefill_kernel is not None:  # the chunk's queries over its context and itself, offset-causal
                o = self.prefill_kernel(q[p.start:p.end], ki, vi)
                if o is not None:
                    out[p.start:p.end] = o
                    continue
            ki, vi = ki.transpose(0, 1)[None], vi.transpose(0, 1)[None]  # [1, Hkv, S, D]
            T = p.end - p.start
            qb = max(1, min(T, MASK_ELEMENTS // (p.ctx + T)))  # queries per block
            for i0 in range(0, T, qb):
                i1 = min(T, i0 + qb)
                S = p.ctx + i1  # keys visible to this block's last query
                pos = torch.arange(p.ctx + i0, p.ctx + i1, device=q.device)[:, None]
                mask = torch.arange(S, device=q.device)[None, :] <= pos  # [i1 - i0, S] offset-causal
                o = F.scaled_dot_product_attention(qi[:, :, i0:i1], ki[:, :, :S], vi[:, :, :S], attn_mask=mask,
                                                   enable_gqa=Hq != Hkv)
                out[p.start + i0:p.start + i1] = o[0].transpose(0, 1)
        return out.unsqueeze(0)

    def _decode(self, layer_idx: int, q: torch.Tensor, Hkv: int) -> torch.Tensor:
        # q [Bd, Hq, D] -> [Bd, Hq, D]; keys gathered [Bd, L, Hkv, D]
        if self.decode_kernel is not None:
            return self.decode_kernel(q, self.cache.k[layer_idx], self.cache.v[layer_idx], self.decode_tables,
                                      self.decode_lens, self.cache.block_size)
        Bd, Hq, D = q.shape
        L = self.decode_slots.shape[1]
        ks, vs = self.cache.gather(layer_idx, self.decode_slots.reshape(-1), q.dtype)
        ks = ks.view(Bd, L, Hkv, D).transpose(1, 2)  # [Bd, Hkv, L, D]
        vs = vs.view(Bd, L, Hkv, D).transpose(1, 2)
        qg = q.view(Bd, Hkv, Hq // Hkv, D)  # query head h uses KV head h // G
        o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=self.decode_mask)
        return o.reshape(Bd, Hq, D)
