"""GLM-4 tokenizer: tiktoken BPE over `tokenizer.model`, or `tokenizers` over `tokenizer.json`.

No torch here. Special-token strings inside text are always encoded as plain text by `encode`;
only the chat format (which knows which special strings it inserted) produces special ids.
"""

from __future__ import annotations

import base64
import binascii
import codecs
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

# GLM-4's pre-tokenizer regex (cl100k-style; numbers split in runs of 1-3 digits)
GLM4_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# appended after the last rank of tokenizer.model, in this order (ids n, n+1, ...)
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

# <|endoftext|> ends documents, <|user|> ends an assistant turn, <|observation|> ends a tool call
CHAT_EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


class TokenizerError(ValueError):
    """A tokenizer folder or file is missing, corrupt, or a token is unknown."""


class Tokenizer:
    """Common interface over the tiktoken and `tokenizers` backends.

    encode(text) -> ids (special strings = plain text); encode(text, allow_special=True) also maps
    special-token strings to their ids. decode(ids, skip_special_tokens=False) -> str.
    """

    special_tokens: dict[str, int]
    eos_token_ids: list[int]
    vocab_size: int

    # -- backend hooks ---------------------------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def _token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        if not allow_special:
            return self._encode_plain(text)
        ids: list[int] = []
        for piece, is_special in self.split_special(text):
            ids.extend([self.special_tokens[piece]] if is_special else self._encode_plain(piece))
        return ids

    def split_special(self, text: str, specials: Iterable[str] | None = None) -> list[tuple[str, bool]]:
        """Split text into (piece, is_special) around occurrences of special-token strings."""
        names = sorted(self.special_tokens if specials is None else specials, key=len, reverse=True)
        out: list[tuple[str, bool]] = []
        i = start = 0
        n = len(text)
        while i < n:
            if text[i] in self._special_first_chars:
                hit = next((s for s in names if text.startswith(s, i)), None)
                if hit is not None:
                    if start < i:
                        out.append((text[start:i], False))
                    out.append((hit, True))
                    i = start = i + len(hit)
                    continue
            i += 1
        if start < n:
            out.append((text[start:], False))
        return out

    def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bytes:
        special_ids = self._special_ids
        parts = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in special_ids:
                continue
            parts.append(self._token_bytes(i))
        return b"".join(parts)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def convert_tokens_to_ids(self, tokens: str | bytes | Sequence[str | bytes]) -> int | list[int]:
        if isinstance(tokens, (str, bytes)):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(i) for i in ids]

    def _id_to_token(self, token_id: int) -> str:
        if token_id in self._special_ids:
            return self._special_ids[token_id]
        return self._token_bytes(token_id).decode("utf-8", errors="replace")

    def _token_to_id(self, token: str | bytes) -> int:
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int | None:
        return self.special_tokens.get("<|endoftext|>")

    def __len__(self) -> int:
        return self.vocab_size

    def _init_specials(self) -> None:
        self._special_ids = {v: k for k, v in self.special_tokens.items()}
        self._special_first_chars = {s[0] for s in self.special_tokens}


class TiktokenTokenizer(Tokenizer):
    """GLM-4 `tokenizer.model`: one `base64(token) rank` line per token, specials after the last rank."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_names: Sequence[str] = GLM4_SPECIAL_TOKENS,
        pat_str: str = GLM4_PAT_STR,
        eos_token_ids: Sequence[int] | None = None,
        name: str = "glm4",
    ):
        if not ranks:
            raise TokenizerError("empty rank table")
        n = max(ranks.values()) + 1
        self.special_tokens = {s: n + i for i, s in enumerate(special_names)}
        self.encoding = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self.num_ranks = n
        self.vocab_size = n + len(self.special_tokens)
        self._ranks = ranks
        self._init_specials()
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else default_eos_ids(self.special_tokens)

    def _encode_plain(self, text: str) -> list[int]:
        # disallowed_special=() makes "<|user|>" in user text ordinary bytes (no prompt injection)
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def _token_bytes(self, token_id: int) -> bytes:
        try:
            return self.encoding.decode_single_token_bytes(token_id)
        except KeyError:
            raise TokenizerError(f"token id {token_id} is out of range (vocab_size {self.vocab_size})") from None

    def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bytes:
        if not isinstance(ids, list):
            ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):  # tiktoken's errors for unknown / negative ids
            bad = next((i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)), ids)
            raise TokenizerError(f"token id {bad!r} is out of range (vocab_size {self.vocab_size})") from None

    def _token_to_id(self, token: str | bytes) -> int:
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        key = token.encode("utf-8") if isinstance(token, str) else token
        if key in self._ranks:
            return self._ranks[key]
        raise TokenizerError(f"unknown token {token!r}")


class HFTokenizer(Tokenizer):
    """`tokenizer.json` (+ `tokenizer_config.json`) through the `tokenizers` library (-hf, 0414, 4.5 layout)."""

    def __init__(self, path: str | Path, eos_token_ids: Sequence[int] | None = None, json_text: str | None = None):
        from tokenizers import Tokenizer as _HFTok

        try:  # json_text: a tokenizer.json built in memory (GGUF vocabulary); `path` then only names it in errors
            self.backend = _HFTok.from_str(json_text) if json_text is not None else _HFTok.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on parse errors
            raise TokenizerError(f"cannot read {path}: {e}") from None
        self.backend.encode_special_tokens = True  # added special tokens in text stay plain text
        added = self.backend.get_added_tokens_decoder()
        self.special_tokens = {tok.content: i for i, tok in added.items() if tok.special}
        self._added = {i: tok.content.encode("utf-8") for i, tok in added.items()}  # literal, not byte-level
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self._init_specials()
        self._byte_decoder = _bytes_to_unicode_inverse()
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else default_eos_ids(self.special_tokens)

    def _encode_plain(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id]
        tok = self.backend.id_to_token(token_id)
        if tok is None:
            raise TokenizerError(f"token id {token_id} is out of range (vocab_size {self.vocab_size})")
        try:  # byte-level BPE: each char stands for one byte
            return bytes(self._byte_decoder[c] for c in tok)
        except KeyError:
            return tok.encode("utf-8")

    def _token_to_id(self, token: str | bytes) -> int:
        if isinstance(token, bytes):
            token = "".join(_bytes_to_unicode()[b] for b in token)
        i = self.backend.token_to_id(token)
        if i is None:
            raise TokenizerError(f"unknown token {token!r}")
        return i


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to 256+k
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bytes_to_unicode_inverse() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


def default_eos_ids(special_tokens: dict[str, int]) -> list[int]:
    return [special_tokens[s] for s in CHAT_EOS_TOKENS if s in special_tokens]


def read_rank_file(path: str | Path) -> dict[bytes, int]:
    """Parse a `base64 rank` per line file; TokenizerError names the bad line."""
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    seen: set[int] = set()
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{lineno}: expected '<base64> <rank>', got {line[:60]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{path}:{lineno}: bad base64 or rank in {line[:60]!r}") from None
        if rank < 0 or rank in seen or token in ranks:
            raise TokenizerError(f"{path}:{lineno}: duplicate or negative rank/token {line[:60]!r}")
        seen.add(rank)
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    if len(ranks) != max(seen) + 1:
        raise TokenizerError(f"{path}: ranks are not contiguous 0..{max(seen)} ({len(ranks)} tokens)")
    return ranks


class IncrementalDetokenizer:
    """Streaming decode: `.add(ids) -> str` delta that never ends inside a UTF-8 character.

    The concatenated deltas plus `.flush()` equal `tok.decode(all_ids)`.
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []
        self._deltas: list[str] = []  # joined lazily: `text += delta` would be quadratic

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""

    def add(self, ids: int | Sequence[int]) -> str:
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        self.token_ids.extend(ids)
        delta = self._decoder.decode(self.tok.decode_bytes(ids, self.skip_special_tokens))
        if delta:
            self._deltas.append(delta)
        return delta

    def flush(self) -> str:
        """End of stream: an incomplete trailing character becomes U+FFFD, as in decode()."""
        delta = self._decoder.decode(b"", final=True)
        if delta:
            self._deltas.append(delta)
        return delta


class TokenTexts:
    """Token id -> its bytes and its text, cached: what logprobs report for a token and what stop / loop guards
    read (a padding id of the embedding, which no tokenizer knows, is b"")."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        b = self._bytes.get(token_id)
        if b is None:
            try:
                b = self.tok.decode_bytes([token_id])
            except ValueError:
                b = b""
            self._bytes[token_id] = b
        return b

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")
