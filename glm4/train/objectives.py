"""Training objectives: causal LM and GLM autoregressive blank infilling (arXiv 2103.10360).

Every objective turns a list of token ids into one *sample*, a dict of plain lists:
  input_ids [T], targets [T] (already shifted: targets[t] is what logits[t] must predict; -100 = ignored),
  positions [T] or [T, 2] (GLM 2-D positions), and for blank infilling `n_a`, the length of the
  bidirectional Part A (the attention mask is built from it by `collate`).

Blank infilling layout (one sample):
  Part A  = the text with each sampled span replaced by one [MASK]        positions (i, 0)
  Part B  = for each span (shuffled): <sop> s_1 .. s_l                      positions (p_mask, 1..l+1)
            whose targets are          s_1 .. s_l <eop>
  Part A attends to all of Part A; Part B attends to all of Part A and causally within Part B.
The [gMASK] variant masks one span at the end of the document (50-100 % of it) for generation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


@dataclass(slots=True)
class SpecialIds:
    """Token ids the GLM objectives need (GLM-4 tokenizer defaults)."""

    mask: int = 151330  # [MASK]
    gmask: int = 151331  # [gMASK]
    sop: int = 151333  # <sop>
    eop: int = 151334  # <eop>
    pad: int = 151329  # <|endoftext|>

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        sp = getattr(tok, "special_tokens", {}) or {}
        d = cls()
        names = {"mask": "[MASK]", "gmask": "[gMASK]", "sop": "<sop>", "eop": "<eop>", "pad": "<|endoftext|>"}
        return cls(**{k: int(sp.get(v, getattr(d, k))) for k, v in names.items()})


def causal_sample(tokens: list[int], two_d: bool = False) -> dict:
    """Next-token prediction over `tokens` (length T+1) -> a sample of length T."""
    n = len(tokens) - 1
    pos = [[i, 0] for i in range(n)] if two_d else list(range(n))
    return {"input_ids": list(tokens[:-1]), "targets": list(tokens[1:]), "positions": pos}


def sample_span_lengths(n: int, rng: random.Random, ratio: float = 0.15, lam: float = 3.0) -> list[int]:
    """Poisson(lam) span lengths (>= 1) drawn until they cover >= ratio of n tokens, kept placeable
    (spans need one unmasked token between them)."""
    target = max(1, int(round(ratio * n)))
    lengths: list[int] = []
    while sum(lengths) < target:
        ln = max(1, _poisson(lam, rng))
        # every span needs a separating gap: sum(lengths) + len(lengths) - 1 <= n
        if sum(lengths) + ln + len(lengths) > n:
            ln = n - sum(lengths) - len(lengths)
            if ln < 1:
                break
        lengths.append(ln)
    return lengths


def _poisson(lam: float, rng: random.Random) -> int:
    # Knuth's method; lam is small (3)
    import math

    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def place_spans(n: int, lengths: list[int], rng: random.Random) -> list[tuple[int, int]]:
    """Random non-overlapping, non-adjacent [start, end) spans of the given lengths in order."""
    m = len(lengths)
    free = n - sum(lengths) - (m - 1)  # tokens left once the mandatory gaps are reserved
    if free < 0:
        raise ValueError(f"spans of total length {sum(lengths)} do not fit in {n} tokens")
    # m sorted offsets in [0, free]: the number of extra unmasked tokens before each span
    offs = sorted(rng.randint(0, free) for _ in range(m))
    spans, used = [], 0
    for i, (off, ln) in enumerate(zip(offs, lengths)):
        s = off + used + i  # off free tokens, earlier spans, and one gap per earlier span before it
        spans.append((s, s + ln))
        used += ln
    return spans


def blank_sample(tokens: list[int], spans: list[tuple[int, int]], ids: SpecialIds, rng: random.Random | None,
                 mask_token: int | None = None, prefix: list[int] | None = None) -> dict:
    """Build the GLM sample for explicit `spans` ([start, end) into `tokens`, sorted, disjoint).

    Part B order is shuffled with `rng` (None keeps the text order). `prefix` (e.g. none, or
    [gMASK, sop]-style tokens) is prepended to Part A unmasked."""
    mask_token = ids.mask if mask_token is None else mask_token
    part_a = list(prefix or [])
    mask_pos = []
    cur = 0
    for s, e in spans:
        part_a += tokens[cur:s]
        mask_pos.append(len(part_a))
        part_a.append(mask_token)
        cur = e
    part_a += tokens[cur:]
    n_a = len(part_a)
    order = list(range(len(spans)))
    if rng is not None:
        rng.shuffle(order)
    inp, tgt = list(part_a), [IGNORE] * n_a
    pos = [[i, 0] for i in range(n_a)]
    for j in order:
        s, e = spans[j]
        span = tokens[s:e]
        inp += [ids.sop] + span
        tgt += span + [ids.eop]
        pos += [[mask_pos[j], k + 1] for k in range(len(span) + 1)]
    return {"input_ids": inp, "targets": tgt, "positions": pos, "n_a": n_a}


def blank_infilling_sample(tokens: list[int], ids: SpecialIds, rng: random.Random, ratio: float = 0.15,
                           lam: float = 3.0) -> dict:
    """[MASK] objective: Poisson(lam) spans covering ~ratio of the tokens."""
    lengths = sample_span_lengths(len(tokens), rng, ratio, lam)
    spans = place_spans(len(tokens), lengths, rng)
    return blank_sample(tokens, spans, ids, rng)


def gmask_sample(tokens: list[int], ids: SpecialIds, rng: random.Random) -> dict:
    """[gMASK] document-level objective: one span at the end, 50-100 % of the text, for generation."""
    n = len(tokens)
    ln = max(1, min(n - 1, int(round(rng.uniform(0.5, 1.0) * n)))) if n > 1 else 1
    return blank_sample(tokens, [(n - ln, n)], ids, None, mask_token=ids.gmask)


def blank_mask(n_a: int, T: int) -> torch.Tensor:
    """Boolean [T, T] (True = may attend): Part A (first n_a) bidirectional, Part B causal plus all of A."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    return (j < n_a) | (j <= i)


OBJECTIVES = ("causal", "blank", "gmask")


def parse_objective(spec) -> dict[str, float]:
    """"causal" | "blank" | "gmask" | {"causal": 0.5, "blank": 0.3, ...} | "causal:0.5,blank:0.5" -> weights."""
    if isinstance(spec, str):
        parts = [p for p in spec.split(",") if p.strip()]
        spec = {}
        for p in parts:
            name, _, w = p.partition(":")
            spec[name.strip()] = float(w) if w else 1.0
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"objective must be a name or a {{name: weight}} mix, got {spec!r}")
    bad = [k for k in spec if k not in OBJECTIVES]
    if bad:
        raise ValueError(f"unknown objective(s) {bad}; choose from {', '.join(OBJECTIVES)}")
    total = sum(float(v) for v in spec.values())
    if total <= 0 or any(float(v) < 0 for v in spec.values()):
        raise ValueError(f"objective weights must be >= 0 and sum > 0, got {spec}")
    return {k: float(v) / total for k, v in spec.items()}


def make_sample(tokens: list[int], mix: dict[str, float], ids: SpecialIds, rng: random.Random,
                ratio: float = 0.15) -> dict:
    """Draw an objective from `mix` and build its sample from `tokens` (len T+1 for causal)."""
    names = list(mix)
    name = names[0] if len(names) == 1 else rng.choices(names, weights=[mix[k] for k in names])[0]
    two_d = any(k != "causal" for k in mix)  # a mixed recipe feeds 2-D positions to every sample
    if name == "causal":
        return causal_sample(tokens, two_d)
    body = tokens[:-1]  # same token budget as a causal sample
    if name == "blank":
        return blank_infilling_sample(body, ids, rng, ratio)
    return gmask_sample(body, ids, rng)


def collate(samples: list[dict], pad_id: int = 0, length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad samples to one length -> batch tensors. Adds `attn_mask` [B,1,T,T] when any sample needs one
    (blank infilling `n_a`, or packed `seq_ids`); padded query rows see only themselves (no NaN)."""
    T = length or max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    two_d = np.ndim(samples[0]["positions"]) == 2  # [T, 2] GLM blank infilling, [T, 3] M-RoPE (an array)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T, len(samples[0]["positions"][0])) if two_d else (B, T), dtype=torch.long)
    need_mask = any("n_a" in s or "seq_ids" in s for s in samples)
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool) if need_mask else None
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        if n > T:
            raise ValueError(f"sample of length {n} exceeds batch length {T}")
        ids[b, :n] = torch.tensor(s["input_ids"])
        tgt[b, :n] = torch.tensor(s["targets"])
        pos[b, :n] = torch.as_tensor(np.asarray(s["positions"]))
        if mask is not None:
            if "n_a" in s:
                m = blank_mask(s["n_a"], n)
            elif "seq_ids" in s:
                sid = torch.tensor(s["seq_ids"])
                m = (sid[:, None] == sid[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
            else:
                m = torch.ones(n, n, dtype=torch.bool).tril()
            mask[b, 0, :n, :n] = m
            idx = torch.arange(n, T)
            mask[b, 0, idx, idx] = True
    out = {"input_ids": ids, "targets": tgt, "positions": pos}
    if mask is not None:
        out["attn_mask"] = mask
    return out
