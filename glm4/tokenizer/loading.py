"""The front door: a tokenizer from a checkpoint folder (`tokenizer.model` in GLM-4's tiktoken format, or
`tokenizer.json`) or from a GGUF file's vocabulary, with the eos ids and extra specials its configs declare."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .gguf_meta import find_gguf_file, gguf_tokenizer, read_gguf_header
from .tokenizer import GLM4_SPECIAL_TOKENS, HFTokenizer, TiktokenTokenizer, Tokenizer, TokenizerError, read_rank_file


def read_eos_token_ids(folder: str | Path) -> list[int] | None:
    """eos_token_id from generation_config.json, else config.json (int or list)."""
    for name in ("generation_config.json", "config.json"):
        p = Path(folder) / name
        if not p.is_file():
            continue
        try:
            eos = json.loads(p.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            raise TokenizerError(f"{p} is not a valid JSON object") from None
        if isinstance(eos, int):
            return [eos]
        if isinstance(eos, list) and eos and all(isinstance(e, int) for e in eos):
            return list(eos)
    return None


def extra_special_tokens(folder: Path, first_id: int) -> tuple[str, ...]:
    """Specials a `tokenizer_config.json` declares after GLM-4's fixed list (ids first_id, first_id + 1, ...), e.g. a
    small vision checkpoint's `<|image|>` / `<|video|>`; the ids must follow on without a gap."""
    p = folder / "tokenizer_config.json"
    if not p.is_file():
        return ()
    try:
        added = json.loads(p.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        later = sorted((int(k), v["content"]) for k, v in added.items() if int(k) >= first_id)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        raise TokenizerError(f"{p}: added_tokens_decoder is not a mapping of id -> {{content: ...}}") from None
    if [i for i, _ in later] != list(range(first_id, first_id + len(later))):
        raise TokenizerError(f"{p}: added tokens after id {first_id - 1} must have consecutive ids from {first_id}")
    return tuple(name for _, name in later)


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.model` (GLM-4 tiktoken format) or `tokenizer.json` from a checkpoint folder, or the
    vocabulary of a GGUF file (its path, or a folder whose only model file is one)."""
    folder = Path(folder)
    gguf = find_gguf_file(folder)
    if gguf is not None and not any((folder / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        return gguf_tokenizer(read_gguf_header(gguf))
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder not found: {folder}")
    eos = read_eos_token_ids(folder)
    if (folder / "tokenizer.model").is_file():
        ranks = read_rank_file(folder / "tokenizer.model")
        extra = extra_special_tokens(folder, len(ranks) + len(GLM4_SPECIAL_TOKENS))
        tok: Tokenizer = TiktokenTokenizer(ranks, GLM4_SPECIAL_TOKENS + extra, eos_token_ids=eos)
    elif (folder / "tokenizer.json").is_file():
        tok = HFTokenizer(folder / "tokenizer.json", eos_token_ids=eos)
    else:
        raise TokenizerError(f"no tokenizer.model or tokenizer.json in {folder}")
    bad = [e for e in tok.eos_token_ids if not 0 <= e < tok.vocab_size]
    if bad:
        raise TokenizerError(f"eos_token_id {bad} outside the vocabulary ({tok.vocab_size}) in {folder}")
    return tok
