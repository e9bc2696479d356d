"""Engine with a tokenizer: text prompts, stop strings across token boundaries, streaming, LLM(path)."""

from __future__ import annotations

import base64

import pytest
import torch
from test_engine import tiny_model

from glm4.engine import LLM, SamplingParams
from glm4.reference import generate
from glm4.tokenizer import load_tokenizer
from glm4.weights import save_checkpoint

MERGES = [b"ab", b"cd", b"he", b"ll", b" w"]


def write_tokenizer(folder):
    ranks = [bytes([i]) for i in range(256)] + MERGES
    lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(ranks)]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_tok")
    model = tiny_model("glm", seed=5, vocab_size=288, eos_token_id=[261])  # 261 = first special (<|endoftext|>)
    save_checkpoint(model, folder)
    write_tokenizer(folder)
    return folder, model


def forced(ids):
    """A logits processor that makes the model emit `ids` in order (then keeps repeating the last)."""
    def fn(out_ids, logits):
        t = ids[min(len(out_ids), len(ids) - 1)]
        forced_logits = torch.full_like(logits, -1e9)
        forced_logits[t] = 0.0
        return forced_logits
    return fn


def test_text_prompt_and_token_ids_agree(ckpt):
    folder, model = ckpt
    llm = LLM(folder, linear="torch")
    tok = llm.tokenizer
    ids = tok.encode("hello abcd")
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    a, b = llm.generate(["hello abcd", ids], p)
    assert a.prompt_token_ids == ids and a.token_ids == b.token_ids
    ref = generate(model, torch.tensor([ids]), max_new_tokens=6, eos_token_ids=[])[0, len(ids):].tolist()
    assert a.token_ids == ref
    assert a.text == tok.decode(ref, skip_special_tokens=True) and a.prompt == "hello abcd"


def test_stop_string_across_token_boundaries(ckpt):
    folder, _ = ckpt
    llm = LLM(folder, linear="torch")
    tok = llm.tokenizer
    target = tok.encode("hello abcd world")
    assert tok.encode("ab") == [256] and tok.encode("cd") == [257]  # "bc" straddles the two tokens
    out = llm.generate([[5, 6]], SamplingParams(max_tokens=30, stop=["bc", "zzz"], logits_processors=[forced(target)]))[0]
    o = out.outputs[0]
    assert o.text == "hello a" and o.finish_reason == "stop" and o.stop_reason == "bc"
    assert o.token_ids == target[:target.index(257) + 1]  # generation stops at the token completing the string
    keep = llm.generate([[5, 6]], SamplingParams(max_tokens=30, stop="bc", include_stop_str_in_output=True,
                                                 logits_processors=[forced(target)]))[0]
    assert keep.text == "hello abc"
    # the earliest match wins, even when a later stop string completes on the same token
    first = llm.generate([[5, 6]], SamplingParams(max_tokens=30, stop=["d w", "o a"], logits_processors=[forced(target)]))[0]
    assert first.text == "hell" and first.outputs[0].stop_reason == "o a"


def test_stream_deltas_hold_back_possible_stop_strings(ckpt):
    folder, _ = ckpt
    llm = LLM(folder, linear="torch")
    target = llm.tokenizer.encode("hello abcd world")
    params = SamplingParams(max_tokens=30, stop=["cd w"], logits_processors=[forced(target)])
    deltas = list(llm.stream([7], params))
    assert "".join(deltas) == "hello ab" and all(deltas)
    outs = list(llm.stream_outputs([7], params))
    assert outs[-1].finished and sum(len(o.outputs[0].delta_token_ids) for o in outs) == len(outs[-1].token_ids)
    # without stop strings the deltas are the full text, and multi-byte characters never split
    target = llm.tokenizer.encode("é日本 ab")
    deltas = list(llm.stream([7], SamplingParams(max_tokens=len(target), logits_processors=[forced(target)])))
    assert "".join(deltas) == "é日本 ab" and "\ufffd" not in "".join(deltas)


def test_eos_ends_request_and_is_not_in_text(ckpt):
    folder, _ = ckpt
    llm = LLM(folder, linear="torch")
    target = llm.tokenizer.encode("he") + [261, 40]
    out = llm.generate([[9]], SamplingParams(max_tokens=10, logits_processors=[forced(target)]))[0]
    assert out.token_ids == target[:2] and out.text == "he" and out.finish_reason == "stop"
    out = llm.generate([[9]], SamplingParams(max_tokens=3, ignore_eos=True, logits_processors=[forced(target)]))[0]
    assert out.token_ids == target and out.text == "he(" and out.finish_reason == "length"


def test_checkpoint_without_tokenizer_takes_token_ids(tmp_path):
    model = tiny_model("glm", seed=6)
    save_checkpoint(model, tmp_path)
    llm = LLM(tmp_path, linear="torch")
    assert llm.tokenizer is None
    out = llm.generate([3, 4, 5], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    ref = generate(model, torch.tensor([[3, 4, 5]]), max_new_tokens=4, eos_token_ids=[])[0, 3:].tolist()
    assert len(out) == 1 and out[0].token_ids == ref and out[0].text == ""
    with pytest.raises(ValueError, match="token ids"):
        llm.generate("text", SamplingParams())


def test_missing_paths_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(tmp_path / "nope")
    import glm4.assets

    monkeypatch.setattr(glm4.assets, "DEFAULT_MODEL", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="default model"):
        LLM()


def test_tokenizer_loads(ckpt):
    tok = load_tokenizer(ckpt[0])
    assert tok.decode(tok.encode("abcd")) == "abcd"


def test_padded_vocab_rows_are_never_sampled(ckpt):
    """Embedding rows past the tokenizer's vocabulary (GLM-4 pads 151343 -> 151552) decode to nothing:
    the engine must not sample them even when the model scores them highest."""
    import copy

    folder, model = ckpt
    tok = load_tokenizer(folder)
    V = model.config.vocab_size
    assert tok.vocab_size < V
    rigged = copy.deepcopy(model)
    with torch.no_grad():
        rigged.lm_head.weight[tok.vocab_size:] = rigged.lm_head.weight[:1] * 0 + 5.0  # padded rows dominate
        rigged.lm_head.bias = None
    ids = torch.tensor([[1, 2, 3]])
    assert rigged(ids)[0, -1].argmax().item() >= tok.vocab_size  # the rigged model prefers a padded row
    llm = LLM.from_model(rigged, tokenizer=tok)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and max(out.token_ids) < tok.vocab_size
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, logit_bias={V - 1: 5.0}))
