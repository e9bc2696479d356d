"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, hash-based prefix caching. Pure Python.

A block is full once `block_size` tokens of a sequence have K/V computed in it; its hash chains the
previous block's hash with its token ids (and the content keys of images placed in it: `Sequence.block_key`),
so equal hashes mean equal prefixes (the keys are compared too, against collisions). Freed blocks keep their hash and stay findable until the slot is reused
(least recently freed first), which is what makes a repeated system prompt nearly free.
"""

from __future__ import annotations

from collections import OrderedDict

from glm4.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")  # token_ids: the block's key (Sequence.block_key)

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple | None = None


def block_hash(prev_hash: int | None, key: tuple) -> int:
    return hash((prev_hash, key))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # ref 0, LRU first
        self.cached: dict[int, int] = {}  # hash -> block id
        self.hits = self.queries = 0  # prefix-cache statistics, in tokens

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache ---------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`, in full blocks. At least the last
        token is always left to compute, since the model must produce its logits."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hashes = self.prefix_hashes(seq, (seq.num_tokens - 1) // bs)
        out = []
        for i, h in enumerate(hashes):
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != seq.block_key(i, bs):
                break
            out.append(bid)
        return out

    def prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chain hashes of `seq`'s first `num_blocks` full blocks, memoized on the sequence (its tokens
        only ever grow, so a waiting request is not rehashed every step)."""
        memo, bs = seq.prefix_hashes, self.block_size
        h = memo[-1] if memo else None
        for i in range(len(memo), num_blocks):
            h = block_hash(h, seq.block_key(i, bs))
            memo.append(h)
        return memo[:num_blocks]

    def can_allocate(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Can a waiting `seq` start with the `cached` prefix blocks plus `num_new_tokens` computed now?"""
        reused_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        fresh = self.blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return reused_free + fresh <= len(self.free)

    def allocate(self, seq: Sequence, cached: list[int]) -> None:
        """Attach the cached prefix blocks to a sequence that holds no blocks yet."""
        assert not seq.block_table, "allocate() on a sequence that already holds blocks"
        for bid in cached:
            b = self.blocks[bid]
            if b.ref_count == 0:
                del self.free[bid]
            b.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(b.hash)
        n = len(cached) * self.block_size
        seq.num_computed_tokens = n
        self.queries += seq.num_tokens
        self.hits += n
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = n

    # --- growth ----------------------------------------------------------------------------------
    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self.free)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` enough blocks to hold `num_new_tokens` more computed tokens."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self.free):
            raise RuntimeError("out of KV blocks: call can_append() first")
        for _ in range(need):
            seq.block_table.append(self._take_fresh())

    def _take_fresh(self) -> int:
        bid, _ = self.free.popitem(last=False)  # least recently freed
        b = self.blocks[bid]
        if b.hash is not None:
            if self.cached.get(b.hash) == bid:
                del self.cached[b.hash]
            b.hash, b.token_ids = None, None
        b.ref_count = 1
        return bid

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full (all tokens computed) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        if full <= len(seq.block_hashes):
            return
        hashes = self.prefix_hashes(seq, full)
        for i in range(len(seq.block_hashes), full):
            h = hashes[i]
            seq.block_hashes.append(h)
            b = self.blocks[seq.block_table[i]]
            if b.hash is None:
                b.hash, b.token_ids = h, seq.block_key(i, bs)
                self.cached.setdefault(h, b.block_id)

    def free_seq(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks at ref 0 go to the free list, tail blocks first so a shared
        prefix outlives the suffixes that hang off it."""
        for bid in reversed(seq.block_table):
            b = self.blocks[bid]
            b.ref_count -= 1
            assert b.ref_count >= 0, f"block {bid} freed twice"
            if b.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> None:
        for bid in self.free:
            b = self.blocks[bid]
            b.hash, b.token_ids = None, None
        self.cached = {k: v for k, v in self.cached.items() if self.blocks[v].hash == k}
