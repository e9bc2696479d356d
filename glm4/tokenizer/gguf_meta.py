"""GGUF files without torch or numpy: the header (metadata and tensor table), the tokenizer and chat template.

    hdr = read_gguf_header("model.gguf")     # GGUFHeader: version, metadata {key: value}, tensors, data_start
    tok = gguf_tokenizer(hdr)                # the project's Tokenizer from tokenizer.ggml.* ("gpt2" BPE)
    tpl = hdr.metadata.get("tokenizer.chat_template")

Layout (little-endian, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64 KV count; KV pairs
(string key, u32 type, value; arrays are u32 element type + u64 count + elements); tensor infos (string name,
u32 n_dims, u64 dims innermost first, u32 ggml type, u64 offset into the data section); the data section starts
at the next multiple of `general.alignment` (default 32). Corrupt or truncated input raises `GGUFError` naming
the file and what is wrong.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tokenizer import GLM4_PAT_STR, HFTokenizer, TokenizerError, default_eos_ids

__all__ = ["GGML_TYPES", "GGUFError", "GGUFHeader", "GGUFTensorInfo", "find_gguf_file", "gguf_tokenizer",
           "read_gguf_header"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS

# ggml type id -> (name, elements per block, bytes per block), from ggml.h
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20), 6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24), 8: ("q8_0", 32, 34), 9: ("q8_1", 32, 40), 10: ("q2_K", 256, 84), 11: ("q3_K", 256, 110),
    12: ("q4_K", 256, 144), 13: ("q5_K", 256, 176), 14: ("q6_K", 256, 210), 15: ("q8_K", 256, 292),
    16: ("iq2_xxs", 256, 66), 17: ("iq2_xs", 256, 74), 18: ("iq3_xxs", 256, 98), 19: ("iq1_s", 256, 50),
    20: ("iq4_nl", 32, 18), 21: ("iq3_s", 256, 110), 22: ("iq2_s", 256, 82), 23: ("iq4_xs", 256, 136),
    24: ("i8", 1, 1), 25: ("i16", 1, 2), 26: ("i32", 1, 4), 27: ("i64", 1, 8), 28: ("f64", 1, 8),
    29: ("iq1_m", 256, 56), 30: ("bf16", 1, 2), 34: ("tq1_0", 256, 54), 35: ("tq2_0", 256, 66),
    39: ("mxfp4", 32, 17),
}

# GGUF metadata value types: id -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class GGUFError(TokenizerError):
    """A file that is not a readable GGUF (bad magic, unsupported version, corrupt or truncated)."""


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the innermost (contiguous) one
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int | None  # None for a ggml type this table does not know

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (numpy / torch) shape: the dims reversed."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        t = GGML_TYPES.get(self.ggml_type)
        return t[0] if t else f"ggml type {self.ggml_type}"


@dataclass(slots=True)
class GGUFHeader:
    path: Path
    version: int
    alignment: int
    data_start: int
    file_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def arch_key(self, key: str, default: Any = None) -> Any:
        """`{general.architecture}.{key}`, e.g. arch_key("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Reader:
    def __init__(self, path: Path, buf):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            self.fail(f"truncated GGUF header while reading {what} (needs bytes {start}..{start + n}, "
                      f"file has {self.size})")
        self.pos = start + n
        return start

    def scalar(self, fmt: str, what: str):
        s = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.take(s, what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def strings(self, count: int, what: str) -> list[str]:
        # the vocabulary and merges: ~150k strings each, so one tight loop
        buf, pos, size, u64 = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out = []
        try:
            for _ in range(count):
                if pos + 8 > size:
                    break
                n = u64(buf, pos)[0]
                pos += 8
                if pos + n > size:
                    break
                out.append(buf[pos:pos + n].decode("utf-8"))
                pos += n
        except UnicodeDecodeError:
            self.fail(f"{what}: element {len(out)} is not valid UTF-8")
        if len(out) < count:
            self.fail(f"truncated GGUF header while reading {what} (element {len(out)} of {count})")
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.scalar("I", what), self.scalar("Q", what)
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                start = self.take(count * struct.calcsize("<" + fmt), what)
                return list(struct.unpack_from(f"<{count}{fmt}", self.buf, start))
            if count > self.size - self.pos:  # every element takes at least one byte
                self.fail(f"{what}: array of {count} elements cannot fit in the file")
            if etype == _STRING:
                return self.strings(count, what)
            if etype == _ARRAY:
                if depth >= 8:
                    self.fail(f"{what}: arrays nested deeper than 8 levels")
                return [self.value(_ARRAY, what, depth + 1) for _ in range(count)]
            self.fail(f"{what}: unknown array element type {etype}")
        self.fail(f"{what}: unknown metadata value type {vtype}")


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table (tensor data is not read); validates every tensor's
    extent against the file size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                head = f.read(4)
                if head != GGUF_MAGIC:
                    raise GGUFError(f"{path}: not a GGUF file (magic {head!r}, expected b'GGUF')")
                raise GGUFError(f"{path}: truncated GGUF file ({size} bytes, no complete header)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e})") from None


def _parse(path: Path, buf, size: int) -> GGUFHeader:
    r = _Reader(path, buf)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        r.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    r.pos = 4
    version = r.scalar("I", "version")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in (2, 3):
            r.fail("big-endian GGUF files are not supported")
        r.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = r.scalar("Q", "tensor count"), r.scalar("Q", "metadata count")
    if n_tensors > size or n_kv > size:
        r.fail(f"corrupt header ({n_tensors} tensors, {n_kv} metadata entries in a {size}-byte file)")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        meta[key] = r.value(r.scalar("I", f"type of {key!r}"), f"metadata {key!r}")
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        r.fail(f"general.alignment must be a positive power of two, got {align!r}")
    infos = []
    for i in range(n_tensors):
        name = r.string(f"name of tensor #{i}")
        n_dims = r.scalar("I", f"dims of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            r.fail(f"tensor {name!r} has {n_dims} dims (at most {_MAX_DIMS})")
        dims = tuple(r.scalar("Q", f"dims of tensor {name!r}") for _ in range(n_dims))
        gtype = r.scalar("I", f"type of tensor {name!r}")
        offset = r.scalar("Q", f"offset of tensor {name!r}")
        infos.append((name, dims, gtype, offset))
    data_start = -(-r.pos // align) * align
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, gtype, offset in infos:
        if name in tensors:
            r.fail(f"tensor {name!r} appears twice")
        if offset % align:
            r.fail(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {align}")
        nbytes = None
        if gtype in GGML_TYPES:
            _, block, type_size = GGML_TYPES[gtype]
            n = 1
            for d in dims:
                n *= d
            if dims and dims[0] % block:
                r.fail(f"tensor {name!r}: row of {dims[0]} elements is not a multiple of the "
                       f"{GGML_TYPES[gtype][0]} block size {block}")
            nbytes = n // block * type_size
            end = data_start + offset + nbytes
            if end > size:
                r.fail(f"truncated file: tensor {name!r} ends at byte {end} but the file has {size}")
        tensors[name] = GGUFTensorInfo(name, dims, gtype, data_start + offset, nbytes)
    return GGUFHeader(path, version, align, data_start, size, meta, tensors)


def find_gguf_file(path: str | os.PathLike) -> Path | None:
    """`path` itself if it is a .gguf file, else the only *.gguf in a folder that has no config.json."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


# ---- tokenizer ---------------------------------------------------------------------------------------

# tokenizer.ggml.pre values of the GLM family -> llama.cpp's behaviour: all split with GLM-4's regex;
# "glm4"/"glm5" also look a whole piece up in the vocabulary before merging (ignore_merges, as tiktoken does)
_GLM_PRE = {"chatglm-bpe": False, "glm4": True, "glm5": True}


def gguf_tokenizer(header: GGUFHeader) -> HFTokenizer:
    """A byte-level BPE `HFTokenizer` from `tokenizer.ggml.*`: tokens in id order, merges, token types
    (CONTROL = special added tokens, USER_DEFINED = non-special added tokens such as `<think>`)."""
    m, where = header.metadata, header.path
    model = m.get("tokenizer.ggml.model")
    tokens = m.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise TokenizerError(f"{where}: no tokenizer in this GGUF (tokenizer.ggml.model / tokens missing)")
    if model != "gpt2":
        raise TokenizerError(f"{where}: tokenizer.ggml.model {model!r} is not supported (only 'gpt2' byte-level "
                             f"BPE, which GLM-4 models use)")
    pre = m.get("tokenizer.ggml.pre", "chatglm-bpe")
    if pre not in _GLM_PRE:
        raise TokenizerError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported (GLM pre-tokenizers: "
                             f"{', '.join(_GLM_PRE)})")
    types = m.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = m.get("tokenizer.ggml.merges") or []
    if len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    added = []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == TOKEN_CONTROL})
        # every token stays in the BPE vocabulary: `tokenizers` re-numbers added tokens missing from it; added
        # ones are matched (and decoded) literally before BPE sees the text
        vocab.setdefault(tok, i)  # a duplicate string (never in converter output) keeps its first id
    pairs = []
    for mg in merges:
        a, sep, b = mg.partition(" ")
        if not sep:
            raise TokenizerError(f"{where}: bad merge {mg!r} in tokenizer.ggml.merges")
        pairs.append([a, b])
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GLM4_PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": _GLM_PRE[pre], "vocab": vocab, "merges": pairs},
    }
    tok = HFTokenizer(where, json_text=json.dumps(spec, ensure_ascii=False))
    eos = default_eos_ids(tok.special_tokens)
    for key in ("eos", "eot", "eom"):
        i = m.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens) and i not in eos:
            eos.append(i)
    tok.eos_token_ids = eos
    return tok
