"""SFT data: labels for a hand-worked GLM-4 conversation with tools and an observation, OpenAI-style input,
packing that never attends across examples, pre-tokenized streams, and `glm4 finetune` end to end."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from glm4.chat import ChatFormat
from glm4.tokenizer import load_tokenizer
from glm4.train.data import (
    DataError,
    SFTDataset,
    encode_conversation,
    pack,
    read_token_file,
    sft_labels,
    tokenize_documents,
)
from glm4.train.objectives import IGNORE

torch.set_num_threads(1)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# GLM-4 fine-tuning jsonl: tools on the first system message, the call as metadata + JSON, an observation
NATIVE = {"messages": [
    {"role": "system", "content": "", "tools": TOOLS},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
    {"role": "observation", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]}
OPENAI = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]}


@pytest.fixture(scope="module")
def byte_tok_dir(tmp_path_factory) -> Path:
    """A tiktoken rank file of the 256 single bytes (no merges): GLM-4's specials land at 256..269."""
    d = tmp_path_factory.mktemp("bytetok")
    (d / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return d


@pytest.fixture(scope="module")
def tok(byte_tok_dir):
    return load_tokenizer(byte_tok_dir)


def test_sft_labels_hand_worked_pieces():
    # prefix | user turn | assistant opener | assistant text | next opener (ends the turn) | user | ...
    segs = [([1, 2], "prefix"), ([10, 11], "user"), ([20], "generation_prompt"), ([30, 31], "assistant"),
            ([12], "assistant"), ([13], "user"), ([20], "generation_prompt"), ([32], "assistant")]
    ids, labels = sft_labels(segs, end_id=12)
    assert ids == [1, 2, 10, 11, 20, 30, 31, 12, 13, 20, 32, 12]
    X = IGNORE
    assert labels == [X, X, X, X, X, 30, 31, 12, X, X, 32, 12]
    ids, labels = sft_labels(segs[:6], end_id=12)  # ends on a user turn: the appended <|user|> is not trained
    assert ids == [1, 2, 10, 11, 20, 30, 31, 12, 13, 12]
    assert labels == [X, X, X, X, X, 30, 31, 12, X, X]


def _glm_process_batch(tok, fmt, messages):
    """GLM-4's finetune.py `process_batch` (combine=False), re-derived from its description (facts §1.3):
    each message encoded alone without the [gMASK]<sop> prefix, mask by role, append <|user|>, shift right."""
    sp = tok.special_tokens
    input_ids, loss_masks = [sp["[gMASK]"], sp["<sop>"]], [False, False]
    for m in messages:
        new = fmt.encode(tok, [m], add_generation_prompt=False)[2:]
        input_ids += new
        loss_masks += [m["role"] not in ("system", "user", "observation")] * len(new)
    input_ids.append(sp["<|user|>"])
    loss_masks = [False, *loss_masks]
    return input_ids, [t if m else IGNORE for t, m in zip(input_ids, loss_masks)]


def test_glm4_conversation_with_tools_and_observation(tok):
    fmt = ChatFormat("chatglm")
    s = encode_conversation(NATIVE, tok, fmt)
    ids, targets = s["input_ids"], s["targets"]
    sp = tok.special_tokens
    assert ids == fmt.encode(tok, NATIVE["messages"], add_generation_prompt=False) + [sp["<|user|>"]]
    # hand-worked: trained = everything after each <|assistant|> up to and including the token ending the turn
    a1, a2 = [i for i, t in enumerate(ids) if t == sp["<|assistant|>"]]
    obs = ids.index(sp["<|observation|>"])
    trained = set(range(a1 + 1, obs + 1)) | set(range(a2 + 1, len(ids)))
    labels = [IGNORE] + targets[:-1]  # back to HF alignment
    assert labels == [t if i in trained else IGNORE for i, t in enumerate(ids)]
    assert tok.decode(ids[a1 + 1: obs + 1]) == 'get_weather\n{"city": "Paris"}<|observation|>'
    assert tok.decode(ids[a2 + 1:]) == "\nIt is 21 degrees.<|user|>"
    assert targets[-1] == IGNORE and s["positions"] == list(range(len(ids)))
    masked = tok.decode([t for i, t in enumerate(ids) if i not in trained])
    assert masked.startswith("[gMASK]<sop><|system|>") and "get_weather" in masked and "Weather in Paris?" in masked
    # the same labels as GLM-4's own per-message algorithm
    assert (ids, labels) == _glm_process_batch(tok, fmt, NATIVE["messages"])


def test_openai_style_gives_the_same_example(tok):
    fmt = ChatFormat("chatglm")
    assert encode_conversation(OPENAI, tok, fmt) == encode_conversation(NATIVE, tok, fmt)


def test_bad_records_raise_data_errors(tok, tmp_path):
    fmt = ChatFormat("chatglm")
    for rec, msg in [({"msgs": []}, "messages"), ({"messages": [{"content": "x"}]}, "role"),
                     ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
                     ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant tokens")]:
        with pytest.raises(DataError, match=msg):
            encode_conversation(rec, tok, fmt)
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(NATIVE) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        SFTDataset.from_jsonl(p, tok, fmt)


def test_records_too_long_for_max_length_are_skipped(tok, tmp_path, capsys):
    """A conversation whose assistant part falls past max_length is dropped with a count, not a failed run."""
    fmt = ChatFormat("chatglm")
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in (short, long, short)) + "\n")
    ds = SFTDataset.from_jsonl(p, tok, fmt, max_length=64)
    err = capsys.readouterr().err
    assert len(ds) == 2 and "skipped 1 record(s)" in err and "(records 2)" in err
    p.write_text(json.dumps(long) + "\n")
    with pytest.raises(DataError, match="no record has assistant tokens"):
        SFTDataset.from_jsonl(p, tok, fmt, max_length=64)


def test_packing_never_crosses_examples(hf_checkpoint, tok):
    """A packed row gives every example exactly the loss it has alone (block-diagonal mask, positions reset)."""
    from glm4.train.loop import LMTask
    from glm4.train.recipe import TrainArgs
    from glm4.weights import load_model

    fmt = ChatFormat("chatglm")
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("Hi", "Hello there!"), ("2+2?", "4"), ("Name a color", "Blue, like the sky.")]]
    samples = [encode_conversation(c, tok, fmt) for c in convs]
    rows = pack(samples, seq_len=80)
    assert len(rows) == 1 and sorted(set(rows[0]["seq_ids"])) == [0, 1, 2]
    assert rows[0]["positions"].count(0) == 3  # positions restart per example
    folder, _ = hf_checkpoint("glm4", vocab_size=272)
    model = load_model(folder)
    task = LMTask(model, TrainArgs())
    with torch.no_grad():
        _, packed = task.loss(model, rows, 1.0, "cpu", 1)
        alone = sum(task.loss(model, [s], 1.0, "cpu", 1)[1]["loss_sum"] for s in samples)
    assert packed["loss_sum"] == pytest.approx(alone, rel=1e-5)
    with pytest.raises(DataError, match="does not fit"):
        pack(samples, seq_len=10)


def test_token_files(tmp_path, tok):
    a = np.arange(1000, dtype=np.uint32) * 70
    a.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", a.astype(np.int32))
    assert np.array_equal(read_token_file(tmp_path / "t.bin", "uint32"), a)
    assert np.array_equal(read_token_file(tmp_path / "t.bin", "auto", vocab_size=151552), a)
    assert np.array_equal(read_token_file(tmp_path / "t.npy"), a)
    with pytest.raises(DataError, match="multiple"):
        (tmp_path / "odd.bin").write_bytes(b"abc")
        read_token_file(tmp_path / "odd.bin", "uint16")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    eot = tok.special_tokens["<|endoftext|>"]
    assert tokenize_documents(tmp_path / "docs.jsonl", tok).tolist() == [97, 98, eot, 99, eot]


@pytest.mark.parametrize("method", ["full", "lora", "ptuning"])
def test_finetune_end_to_end(hf_checkpoint, byte_tok_dir, tmp_path, method):
    """`glm4 finetune` on a jsonl: loss falls; full exports a checkpoint transformers loads with our logits,
    lora a PEFT adapter that `load_model(adapter=)` applies, ptuning a prefix."""
    from glm4.train import finetune
    from glm4.weights import load_model

    folder, _ = hf_checkpoint("glm4", vocab_size=272, name=f"base_{method}")
    (folder / "tokenizer.model").write_bytes((byte_tok_dir / "tokenizer.model").read_bytes())
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [NATIVE, OPENAI,
                    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]))
    out = tmp_path / "out"
    argv = ["--model", str(folder), "--data", str(data), "--method", method, "--max-steps", "12", "--output", str(out),
            "--batch-size", "3", "--lr", {"full": "3e-3", "lora": "1e-2", "ptuning": "3e-1"}[method], "--no-progress", "--no-plot",
            "--pack", "--seq-len", "1024", "--chat-format", "chatglm", "--lora-dropout", "0"]
    assert finetune.main(argv) == 0
    with open(out / "logs.csv") as f:
        losses = [float(line.split(",")[1]) for line in f.readlines()[1:]]
    # P-tuning only steers attention through a prefix: it learns more slowly than weight updates
    assert losses[-1] < (0.9 if method == "ptuning" else 0.7) * losses[0], losses
    ids = torch.tensor([[256 + 5, 256 + 4, 256 + 7, 10, 72, 105, 256 + 8]])  # [gMASK]<sop><|user|>\nHi<|assistant|>
    if method == "full":
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
        with torch.no_grad():
            torch.testing.assert_close(load_model(out)(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        assert (out / "tokenizer.model").exists()
    elif method == "lora":
        assert (out / "adapter_config.json").exists()
        with torch.no_grad():
            assert not torch.allclose(load_model(folder, adapter=out)(ids), load_model(folder)(ids), atol=1e-4)
    else:
        from glm4.train.ptuning import PrefixContext, load_prefix

        m = load_model(folder)
        load_prefix(m, out)
        assert m.prefix_encoder.prefix.shape[2] == 128
        with torch.no_grad():
            assert not torch.allclose(m(ids, ctx=PrefixContext(m.prefix_encoder)), m(ids), atol=1e-4)


def test_dpo_cli_end_to_end(hf_checkpoint, byte_tok_dir, tmp_path):
    from glm4.train import dpo
    from glm4.weights import load_model

    folder, _ = hf_checkpoint("glm4", vocab_size=272, name="dpo_base")
    (folder / "tokenizer.model").write_bytes((byte_tok_dir / "tokenizer.model").read_bytes())
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."},
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": {"role": "assistant", "content": "4"},
         "rejected": "5"}]))
    out = tmp_path / "dpo"
    assert dpo.main(["--model", str(folder), "--data", str(pairs), "--output", str(out), "--max-steps", "8",
                     "--batch-size", "2", "--lr", "2e-2", "--beta", "0.5", "--no-progress", "--no-plot",
                     "--chat-format", "chatglm"]) == 0
    with open(out / "logs.csv") as f:
        losses = [float(line.split(",")[1]) for line in f.readlines()[1:]]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-5) and losses[-1] < 0.5 * losses[0], losses
    ids = torch.tensor([[261, 260, 263, 10, 72, 105, 264]])
    with torch.no_grad():
        assert not torch.allclose(load_model(folder, adapter=out)(ids), load_model(folder)(ids), atol=1e-4)
    assert dpo.main(["--model", str(folder), "--data", str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 2
