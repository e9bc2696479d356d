"""Next-token selection for a batch of sequences with per-request SamplingParams.

Order: raw logprobs (if asked) -> logit_bias, logits_processors, penalties, min_tokens -> greedy argmax,
or temperature, top-k, top-p, min-p and a draw. A draw is argmax(probs / E) with E ~ Exp(1) noise
(same law as multinomial, no host sync); a seeded request draws its noise from its own generator,
so its samples do not depend on the rest of the batch.
"""

from __future__ import annotations

import torch

from glm4.engine.sequence import Sequence
from glm4.quant.kernels import argmax


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int | None = None):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.gen = torch.Generator()
        self.gen.manual_seed(seed if seed is not None else torch.seed())
        self.seq_gens: dict[int, torch.Generator] = {}  # seq_id -> generator, for seeded requests

    def forget(self, seq: Sequence) -> None:
        self.seq_gens.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator:
        g = self.seq_gens.get(seq.seq_id)
        if g is None:
            g = self.seq_gens[seq.seq_id] = torch.Generator()
            g.manual_seed(seq.params.seed)
        return g

    def plain_greedy(self, seqs: list[Sequence]) -> bool:
        """Every sequence takes the argmax of its raw logits (what __call__ then does): greedy, no logprobs, nothing
        that edits the logits. The runner may then take the tokens from the model's one-call step."""
        for s in seqs:
            p = s.params
            if (not p.greedy or p.logprobs or p.logit_bias or p.logits_processors or p.needs_penalties
                    or s.num_output_tokens < p.min_tokens):
                return False
        return True

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict | None]]:
        """logits [K, V] (any float dtype, any device) for `seqs` -> chosen ids and per-token logprob entries."""
        logits = logits.float().cpu()
        if logits.shape[-1] > self.vocab_size:
            logits = logits[:, :self.vocab_size]
        want_lp = [i for i, s in enumerate(seqs) if s.params.logprobs]
        raw_lp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None

        for i, seq in enumerate(seqs):
            p = seq.params
            if p.logit_bias or p.logits_processors or p.needs_penalties or seq.num_output_tokens < p.min_tokens:
                logits[i] = self._process(logits[i], seq)

        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            tokens = argmax(logits)
        else:
            tokens = torch.empty(len(seqs), dtype=torch.long)
            g_rows = [i for i, gr in enumerate(greedy) if gr]
            s_rows = [i for i, gr in enumerate(greedy) if not gr]
            if g_rows:
                tokens[g_rows] = argmax(logits[g_rows])
            tokens[s_rows] = self._sample(logits[s_rows], [seqs[i] for i in s_rows])

        ids = tokens.tolist()
        entries: list[dict | None] = [None] * len(seqs)
        for j, i in enumerate(want_lp):
            lp = raw_lp[j]
            entry = {"token_id": ids[i], "logprob": float(lp[ids[i]])}
            n = seqs[i].params.top_logprobs
            if n:
                v, ix = lp.topk(n)
                entry["top_logprobs"] = list(zip(ix.tolist(), v.tolist()))
            entries[i] = entry
        return ids, entries

    def prompt_entries(self, logits: torch.Tensor, next_ids: list[int], top_n: int, rows: int = 64) -> list[dict]:
        """Prompt logprobs: logits [k, V] of k prompt positions and the k tokens that follow them -> one entry per
        token {"token_id", "logprob", "rank" (1 = most likely), "top_logprobs": [(id, lp), ...] (top_n of them)},
        from the raw logits as for generated tokens (`rows` positions at a time: [rows, V] floats in memory)."""
        out = []
        for r0 in range(0, len(next_ids), rows):
            lp = torch.log_softmax(logits[r0:r0 + rows, :self.vocab_size].float().cpu(), dim=-1)  # [r, V]
            ids = torch.tensor(next_ids[r0:r0 + rows])
            chosen = lp.gather(1, ids.clamp(max=lp.shape[-1] - 1)[:, None])  # [r, 1]
            chosen[ids >= lp.shape[-1]] = float("-inf")  # an id past the sampled vocabulary (a padding row)
            ranks = (lp > chosen).sum(dim=-1) + 1
            top = lp.topk(top_n, dim=-1) if top_n else None
            for j, (t, v, rank) in enumerate(zip(ids.tolist(), chosen[:, 0].tolist(), ranks.tolist())):
                top_j = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else []
                out.append({"token_id": t, "logprob": v, "rank": rank, "top_logprobs": top_j})
        return out

    def _process(self, row: torch.Tensor, seq: Sequence) -> torch.Tensor:
        p = seq.params
        if p.logits_processors:
            out_ids = seq.output_token_ids
            for fn in p.logits_processors:
                row = fn(out_ids, row)
                if not isinstance(row, torch.Tensor) or row.shape != (self.vocab_size,):
                    raise ValueError(f"a logits processor must return a tensor of shape [{self.vocab_size}]")
                row = row.float()
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias))
            row = row.index_add(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype))
        if p.needs_penalties:
            row = apply_penalties(row, seq.token_ids[:seq.num_prompt_tokens], seq.output_token_ids, p.repetition_penalty,
                                  p.presence_penalty, p.frequency_penalty)
        if seq.num_output_tokens < p.min_tokens:  # no ending before min_tokens
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            banned = [t for t in banned if t < self.vocab_size]
            if banned:
                row = row.clone()
                row[banned] = float("-inf")
        return row

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        # logits [S, V] of the sampled (non-greedy) rows
        temp = torch.tensor([s.params.temperature for s in seqs]).unsqueeze(1)
        logits = logits / temp
        top_k = [s.params.top_k for s in seqs]
        if any(top_k):
            kmax = min(max(top_k), logits.shape[-1])
            vals = logits.topk(kmax, dim=-1).values  # [S, kmax]
            kth = torch.tensor([min(k, kmax) - 1 if k else kmax - 1 for k in top_k])
            thresh = vals.gather(1, kth[:, None])
            thresh[torch.tensor([k == 0 for k in top_k])] = float("-inf")
            logits = logits.masked_fill(logits < thresh, float("-inf"))
        top_p = [s.params.top_p for s in seqs]
        if any(p < 1.0 for p in top_p):
            sorted_l, order = logits.sort(dim=-1, descending=True)
            probs = sorted_l.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
            drop = before > torch.tensor(top_p)[:, None]  # the top token always survives
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_l)
        probs = logits.softmax(dim=-1)
        min_p = [s.params.min_p for s in seqs]
        if any(min_p):
            mp = torch.tensor(min_p)[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < mp, 0.0)
        noise = torch.empty_like(probs)
        unseeded = [j for j, s in enumerate(seqs) if s.params.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[-1]).exponential_(generator=self.gen)
        for j, s in enumerate(seqs):
            if s.params.seed is not None:
                noise[j].exponential_(generator=self._generator(s))
        return argmax(probs / noise)


def apply_penalties(row: torch.Tensor, prompt_ids: list[int], output_ids: list[int], repetition: float,
                    presence: float, frequency: float) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition divides positive (multiplies negative) logits of every token seen
    in prompt or output; presence/frequency subtract from tokens seen in the output, per occurrence for
    frequency."""
    row = row.clone()
    V = row.shape[0]
    if repetition != 1.0:
        seen = torch.zeros(V, dtype=torch.bool)
        ids = [t for t in prompt_ids + output_ids if t < V]
        if ids:
            seen[torch.tensor(ids)] = True
            row = torch.where(seen, torch.where(row > 0, row / repetition, row * repetition), row)
    if (presence or frequency) and output_ids:
        counts = torch.bincount(torch.tensor([t for t in output_ids if t < V], dtype=torch.long), minlength=V)
        counts = counts[:V].to(row.dtype)
        row = row - frequency * counts - presence * (counts > 0).to(row.dtype)
    return row
