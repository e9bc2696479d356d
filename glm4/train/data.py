"""Training data: token streams for pretraining, GLM-4 fine-tuning conversations for SFT, pairs for DPO.

Every dataset exposes `global_batch(step) -> list[sample]`, a pure function of (seed, step): resuming
at step s or splitting the batch over N processes sees exactly the same samples. Samples are the dicts
of `objectives.py` (input_ids, targets shifted, positions, optional n_a / seq_ids).

SFT labels follow GLM-4's own `finetune.py` (`process_batch`, combine=False): tokens of assistant messages
are trained, system / user / observation are masked; a final <|user|> is appended and the mask is shifted
right by one, so an assistant's role token is not a target but the token that ends the turn (the next role
token, or the appended <|user|>) is. `ChatFormat.encode_segments` already labels pieces that way.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

from glm4.train.objectives import IGNORE, SpecialIds, make_sample

USER_ID = 151336  # <|user|>, GLM-4's "EOS for chat"
TRAINED_ROLES = ("assistant",)


class DataError(ValueError):
    """Training data that cannot be read or encoded (names the file and line)."""


class NothingToTrain(DataError):
    """A conversation with no trained token left after truncation to max_length: skipped, and counted."""


# ---------------------------------------------------------------- index arithmetic shared by all datasets

def epoch_index(g: int, n: int, seed: int) -> int:
    """Global sample number g -> row index: a fresh permutation of n rows per epoch (seeded)."""
    epoch, i = divmod(g, n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return int(perm[i])


def sample_rng(seed: int, g: int) -> random.Random:
    """Per-sample RNG for stochastic objectives: independent of resume and of the process count."""
    return random.Random(seed * 1_000_003 + g)


# ---------------------------------------------------------------- pretraining streams

def read_token_file(path: str | Path, dtype: str = "auto", vocab_size: int | None = None) -> np.ndarray:
    """A .npy (any int dtype) or raw .bin (uint16 / uint32 ids) -> 1-D memory-mapped array."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = np.load(p, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"{p}: expected a 1-D integer array, got {arr.dtype} {arr.shape}")
        return arr
    if dtype == "auto":
        dtype = "uint16" if vocab_size is not None and vocab_size <= 65536 else "uint32"
    if dtype not in ("uint16", "uint32", "int32", "int64"):
        raise DataError(f"token dtype {dtype!r} unsupported (uint16, uint32, int32, int64)")
    if p.stat().st_size % np.dtype(dtype).itemsize:
        raise DataError(f"{p}: size {p.stat().st_size} is not a multiple of {dtype}")
    return np.memmap(p, dtype=dtype, mode="r")


def iter_documents(path: str | Path):
    """Text documents of a .txt (the whole file, or blocks split on form feeds) or .jsonl ({"text": ...})."""
    p = Path(path)
    if p.suffix == ".jsonl":
        with p.open(encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{ln}: invalid JSON ({e})") from e
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{p}:{ln}: expected an object with a string 'text'")
                yield rec["text"]
    else:
        yield from (d for d in p.read_text(encoding="utf-8").split("\f") if d.strip())


def tokenize_documents(path: str | Path, tok, eos_id: int | None = None) -> np.ndarray:
    """Encode every document and join them with the end-of-document id (<|endoftext|>)."""
    if eos_id is None:
        eos_id = _eos_id(tok)
    ids: list[int] = []
    for doc in iter_documents(path):
        ids += tok.encode(doc)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int64)


def _eos_id(tok) -> int:
    sp = getattr(tok, "special_tokens", {}) or {}
    if "<|endoftext|>" in sp:
        return int(sp["<|endoftext|>"])
    eos = getattr(tok, "eos_token_ids", None)
    if eos:
        return int(eos[0])
    raise DataError("tokenizer has no <|endoftext|> / eos token to separate documents")


def load_tokens(path: str | Path, tok=None, dtype: str = "auto", vocab_size: int | None = None) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such data file: {p}")
    if p.suffix in (".npy", ".bin"):
        return read_token_file(p, dtype, vocab_size)
    if tok is None:
        raise DataError(f"{p}: text data needs a tokenizer (--tokenizer, or a --model folder with one)")
    return tokenize_documents(p, tok)


class TokenStreamDataset:
    """Contiguous chunks of seq_len+1 tokens (stride seq_len) from one token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, objective: dict[str, float], special: SpecialIds,
                 seed: int = 0, ratio: float = 0.15):
        self.tokens, self.seq_len, self.objective, self.special = tokens, seq_len, objective, special
        self.seed, self.ratio = seed, ratio
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"only {len(tokens)} tokens: fewer than one sequence of {seq_len + 1}")

    def __len__(self) -> int:
        return self.n

    def sample(self, g: int) -> dict:
        i = epoch_index(g, self.n, self.seed)
        chunk = self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1].astype(np.int64).tolist()
        return make_sample(chunk, self.objective, self.special, sample_rng(self.seed, g), self.ratio)

    def global_batch(self, step: int, size: int) -> list[dict]:
        return [self.sample(step * size + k) for k in range(size)]


# ---------------------------------------------------------------- conversations (SFT)

def normalize_messages(record: dict) -> tuple[list[dict], list | None]:
    """A jsonl record -> (messages, tools). GLM-4's format keeps `tools` on the first system message (the chat
    format reads them there); OpenAI-style records may carry a top-level `tools`, role "tool" and assistant
    `tool_calls` (the chat format maps them to observation / metadata turns)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise DataError("expected {\"messages\": [...]} with at least one message")
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"message {i} is not an object with a string 'role'")
        if m["role"] not in ("system", "user", "assistant", "observation", "tool"):
            raise DataError(f"message {i}: unknown role {m['role']!r}")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError("'tools' must be a list")
    return record["messages"], tools


def sft_labels(segments: list[tuple[list[int], str | None]], end_id: int = USER_ID) -> tuple[list[int], list[int]]:
    """[(ids, label)] pieces from `ChatFormat.encode_segments(..., close_final_turn=False)` -> (input_ids, labels),
    labels aligned with input_ids (labels[i] = input_ids[i] where trained, else -100), as GLM-4's process_batch.

    The format labels tokens by what they are trained as: an assistant's content and the role token that
    ends its turn are "assistant"; its own `<|assistant|>` opener is "generation_prompt". GLM-4 appends
    <|user|> after every conversation, a target when the conversation ends in an assistant turn."""
    ids, labels = [], []
    for piece, role in segments:
        ids += list(piece)
        labels += list(piece) if role in TRAINED_ROLES else [IGNORE] * len(piece)
    ends_in_assistant = bool(segments) and segments[-1][1] in TRAINED_ROLES
    ids.append(end_id)
    labels.append(end_id if ends_in_assistant else IGNORE)
    return ids, labels


def sft_sample(input_ids: list[int], labels: list[int]) -> dict:
    """HF-aligned labels -> a shifted-target sample."""
    return {"input_ids": list(input_ids), "targets": list(labels[1:]) + [IGNORE],
            "positions": list(range(len(input_ids)))}


def encode_conversation(record: dict, tok, fmt, max_length: int | None = None) -> dict:
    from glm4.chat import ChatFormatError

    messages, tools = normalize_messages(record)
    try:
        segments = fmt.encode_segments(tok, messages, tools=tools, add_generation_prompt=False,
                                       close_final_turn=False)
    except ChatFormatError as e:
        raise DataError(f"{e} (a recipe's `chat_format: chatglm|glm4|glm4_moe` picks a built-in format)") from e
    ids, labels = sft_labels(segments, _role_id(tok, "<|user|>", USER_ID))
    if max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels):
        raise NothingToTrain("no assistant tokens to train on (after truncation to max_length)")
    return sft_sample(ids, labels)


def _role_id(tok, name: str, default: int) -> int:
    sp = getattr(tok, "special_tokens", {}) or {}
    return int(sp.get(name, default))


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such data file: {p}")
    recs = []
    with p.open(encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{ln}: invalid JSON ({e})") from e
    if not recs:
        raise DataError(f"{p}: no records")
    return recs


def encode_records(path, encode) -> list:
    """`encode` every record of a jsonl file; a DataError names the file and the record number. Records with
    nothing to train on after truncation (a prompt longer than max_length) are skipped with a count on stderr,
    unless every record is."""
    out, skipped = [], []
    for i, rec in enumerate(read_jsonl(path), 1):
        try:
            out.append(encode(rec))
        except NothingToTrain:
            skipped.append(i)
        except DataError as e:
            raise DataError(f"{path}: record {i}: {e}") from e
    if skipped and not out:
        raise DataError(f"{path}: no record has assistant tokens to train on within max_length")
    if skipped:
        import sys

        more = ", ..." if len(skipped) > 5 else ""
        print(f"{path}: skipped {len(skipped)} record(s) with no assistant tokens left after truncation to "
              f"max_length (records {', '.join(map(str, skipped[:5]))}{more})", file=sys.stderr)
    return out


def pack(samples: list[dict], seq_len: int) -> list[dict]:
    """Greedy first-fit packing into rows of <= seq_len tokens. Each row carries `seq_ids` so the attention
    mask is block-diagonal causal (never crosses examples) and positions restart at 0 per example."""
    rows: list[list[dict]] = []
    room: list[int] = []
    for s in sorted(samples, key=lambda s: -len(s["input_ids"])):
        n = len(s["input_ids"])
        if n > seq_len:
            raise DataError(f"example of {n} tokens does not fit a packed row of {seq_len}; raise --seq-len or truncate")
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(s)
                room[r] -= n
                break
        else:
            rows.append([s])
            room.append(seq_len - n)
    out = []
    for row in rows:
        ids, tgt, pos, sid = [], [], [], []
        for k, s in enumerate(row):
            ids += s["input_ids"]
            tgt += s["targets"]
            pos += s["positions"]
            sid += [k] * len(s["input_ids"])
        out.append({"input_ids": ids, "targets": tgt, "positions": pos, "seq_ids": sid})
    return out


class SFTDataset:
    """Encoded conversations (optionally packed), sampled by `epoch_index`."""

    def __init__(self, samples: list[dict], seed: int = 0, packed_len: int | None = None):
        if not samples:
            raise DataError("no training examples")
        self.rows = pack(samples, packed_len) if packed_len else samples
        self.seed = seed

    @classmethod
    def from_jsonl(cls, path, tok, fmt, max_length: int | None = None, seed: int = 0,
                   packed_len: int | None = None) -> SFTDataset:
        samples = encode_records(path, lambda rec: encode_conversation(rec, tok, fmt, max_length))
        return cls(samples, seed, packed_len)

    def __len__(self) -> int:
        return len(self.rows)

    def global_batch(self, step: int, size: int) -> list[dict]:
        return [self.rows[epoch_index(step * size + k, len(self.rows), self.seed)] for k in range(size)]


# ---------------------------------------------------------------- preference pairs (DPO)

def encode_pair(record: dict, tok, fmt, max_length: int | None = None) -> tuple[dict, dict]:
    """{"prompt": [messages] | str, "chosen": msg | str | [msgs], "rejected": ...} -> (chosen, rejected) samples
    whose targets cover only the response (the prompt is shared and masked)."""
    if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
        raise DataError("a DPO record needs 'prompt', 'chosen' and 'rejected'")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    out = []
    for key in ("chosen", "rejected"):
        resp = record[key]
        if isinstance(resp, str):
            resp = [{"role": "assistant", "content": resp}]
        elif isinstance(resp, dict):
            resp = [resp]
        rec = {"messages": list(prompt) + list(resp)}
        if "tools" in record:
            rec["tools"] = record["tools"]
        out.append(encode_conversation(rec, tok, fmt, max_length))
    return out[0], out[1]


class PairDataset:
    def __init__(self, pairs: list[tuple[dict, dict]], seed: int = 0):
        if not pairs:
            raise DataError("no preference pairs")
        self.pairs, self.seed = pairs, seed

    @classmethod
    def from_jsonl(cls, path, tok, fmt, max_length: int | None = None, seed: int = 0) -> PairDataset:
        return cls(encode_records(path, lambda rec: encode_pair(rec, tok, fmt, max_length)), seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def global_batch(self, step: int, size: int) -> list[tuple[dict, dict]]:
        return [self.pairs[epoch_index(step * size + k, len(self.pairs), self.seed)] for k in range(size)]


# ---------------------------------------------------------------- `python -m glm4.train.data`: pre-tokenize

def main(argv: list[str] | None = None) -> int:
    """Pre-tokenize text / jsonl documents into a flat .bin (uint16 or uint32) or .npy for `glm4 pretrain`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m glm4.train.data", description=main.__doc__)
    ap.add_argument("--tokenizer", required=True, help="folder with the tokenizer")
    ap.add_argument("--output", required=True, help="out.bin or out.npy")
    ap.add_argument("inputs", nargs="+", help=".txt (documents split on form feeds) or .jsonl with 'text'")
    a = ap.parse_args(argv)
    from glm4.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(a.tokenizer)
        arr = np.concatenate([tokenize_documents(p, tok) for p in a.inputs])
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    if a.output.endswith(".npy"):
        np.save(a.output, arr.astype(dt))
    else:
        arr.astype(dt).tofile(a.output)
    print(f"{len(arr)} tokens ({np.dtype(dt).name}) -> {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
