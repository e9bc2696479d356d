"""Continuous batching: which sequences run this step and how many of their tokens. Pure Python.

Every step gets a token budget. Running sequences go first: decodes (one token each), then
unfinished prompts (their next chunk); then waiting sequences join while budget, sequence slots and
KV blocks last (FCFS: a waiting request never jumps an earlier one). When a running sequence needs
a block and none is free, the latest-arrived running sequence is preempted (and dropped from this
step's batch if it was in it): its blocks are freed and it is recomputed later from its tokens
(prompt + generated so far), mostly from the prefix cache when its blocks survived.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from glm4.engine.block_manager import BlockManager
from glm4.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens of each sequence fed this step (token_ids[computed:computed+n])

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        picked: dict[Sequence, int] = {}  # insertion-ordered: the batch
        preempted = False
        # decodes first (one token each, latency-critical), then unfinished prompts' next chunks
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in order:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.can_append(seq, n):
                victim = max(self.running, key=lambda s: (s.arrival, s.seq_id))  # latest arrival loses
                budget += picked.pop(victim, 0)
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.bm.append_slots(seq, n)
                picked[seq] = n
                budget -= n
        # no new admissions in a step that had to preempt: blocks are scarce
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = [] if seq.needs_prompt_logprobs else self.bm.find_cached_prefix(seq)  # logits of every token
            n = min(seq.num_tokens - len(cached) * self.bm.block_size, budget)
            if not self.bm.can_allocate(seq, cached, n):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, cached)
            self.bm.append_slots(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            picked[seq] = n
            budget -= n
        return ScheduledBatch(list(picked), list(picked.values()))

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch) -> None:
        """After the forward pass: advance the computed counts and publish newly full blocks."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.bm.commit(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (running or waiting) and return its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if seq.block_table:
            self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
