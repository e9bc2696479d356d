"""The reference generator: parity with transformers' generate, eos handling, sampling, CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy

import glm4
from glm4.reference import generate, main, sample


def _ids(B, T, seed=0):
    return torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def glm_pair(hf_checkpoint):
    folder, ref = hf_checkpoint("glm4")
    return folder, ref, glm4.load_model(folder)


def _left_pad(rows, pad=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


def test_greedy_batch_left_padded_matches_transformers_and_unbatched(glm_pair):
    _, ref, model = glm_pair
    rows = [_ids(1, n, seed=n)[0] for n in (9, 4, 6)]
    ids, mask = _left_pad(rows)
    out = generate(model, ids, max_new_tokens=16, eos_token_ids=[], attention_mask=mask)
    assert out.shape == (3, ids.shape[1] + 16)
    assert torch.equal(out, hf_greedy(ref, ids, 16, attention_mask=mask))
    for i, r in enumerate(rows):
        alone = generate(model, r[None], max_new_tokens=16, eos_token_ids=[])
        assert torch.equal(out[i, ids.shape[1]:], alone[0, len(r):])


def test_stops_per_row_on_eos_and_pads(glm_pair):
    _, ref, model = glm_pair
    ids = _ids(2, 6, seed=5)
    free = generate(model, ids, max_new_tokens=12, eos_token_ids=[])
    # make row 0's 3rd generated token a stop id that row 1 never produces
    stop = int(free[0, 6 + 2])
    assert stop not in free[1, 6:].tolist(), "pick another seed: both rows emit the stop id"
    out = generate(model, ids, max_new_tokens=12, eos_token_ids=[stop])
    assert torch.equal(out[1], free[1])
    assert torch.equal(out[0, :9], free[0, :9])
    pad = model.config.pad_token_id
    assert out[0, 9:].eq(pad).all()
    assert torch.equal(out, hf_greedy(ref, ids, 12, eos_token_id=[stop]))


def test_stops_early_when_every_row_is_done(glm_pair):
    _, _, model = glm_pair
    ids = _ids(1, 5, seed=2)
    free = generate(model, ids, max_new_tokens=10, eos_token_ids=[])
    stop = int(free[0, 5 + 3])
    first = free[0, 5:].tolist().index(stop)
    out = generate(model, ids, max_new_tokens=10, eos_token_ids=[stop])
    assert out.shape[1] == 5 + first + 1 and out[0, -1] == stop


def test_default_eos_comes_from_config(glm_pair):
    _, _, model = glm_pair
    ids = _ids(1, 5, seed=2)
    free = generate(model, ids, max_new_tokens=10, eos_token_ids=[])
    stop = int(free[0, 5 + 3])
    saved = model.config.eos_token_id
    try:
        model.config.eos_token_id = [999, stop]  # GLM-4 chat configs list several stop ids
        assert model.config.eos_token_ids == [999, stop]
        out = generate(model, ids, max_new_tokens=10)
    finally:
        model.config.eos_token_id = saved
    assert out[0, -1] == stop and out.shape[1] == 5 + free[0, 5:].tolist().index(stop) + 1


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=5),
                                dict(temperature=1.0, top_p=0.6), dict(temperature=0.9, top_k=20, top_p=0.8)])
def test_sampling_matches_transformers_with_the_same_seed(glm_pair, kw):
    _, ref, model = glm_pair
    ids = _ids(2, 6, seed=4)
    torch.manual_seed(123)
    ours = generate(model, ids, max_new_tokens=20, eos_token_ids=[], **kw)
    hf_kw = dict(temperature=kw["temperature"], top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0))
    torch.manual_seed(123)
    with torch.no_grad():
        theirs = ref.generate(ids, max_new_tokens=20, do_sample=True, eos_token_id=None, pad_token_id=0, **hf_kw)
    assert torch.equal(ours, theirs)


def test_sampling_generator_is_reproducible_and_greedy_limits(glm_pair):
    _, _, model = glm_pair
    ids = _ids(1, 5, seed=6)
    a = generate(model, ids, 16, temperature=1.0, eos_token_ids=[], generator=torch.Generator().manual_seed(1))
    b = generate(model, ids, 16, temperature=1.0, eos_token_ids=[], generator=torch.Generator().manual_seed(1))
    c = generate(model, ids, 16, temperature=1.0, eos_token_ids=[], generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, ids, 16, eos_token_ids=[])
    g = torch.Generator().manual_seed(3)
    assert torch.equal(generate(model, ids, 16, temperature=1.0, top_k=1, eos_token_ids=[], generator=g), greedy)
    assert torch.equal(generate(model, ids, 16, temperature=1.0, top_p=1e-6, eos_token_ids=[], generator=g), greedy)


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert seen == {3, 4}
    p = logits.softmax(-1)[0]  # ~[.01, .03, .09, .24, .64]: top_p 0.85 keeps {4, 3}; 0.9 adds 2
    assert p[3] + p[4] < 0.9 < p[2] + p[3] + p[4]
    seen = {int(sample(logits, 1.0, top_p=0.85, generator=g)) for _ in range(300)}
    assert seen == {3, 4}
    seen = {int(sample(logits, 1.0, top_p=0.9, generator=g)) for _ in range(300)}
    assert seen == {2, 3, 4}
    assert int(sample(logits, 0.0)) == 4


def test_input_validation(glm_pair):
    _, _, model = glm_pair
    ids = _ids(1, 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least one real token"):
        generate(model, ids, 2, attention_mask=torch.tensor([[0, 0, 0]]))
    assert torch.equal(generate(model, ids, 0), ids)


def test_cli_prints_ids(glm_pair, capsys):
    folder, ref, _ = glm_pair
    assert main(["--model", str(folder), "--prompt-ids", "5,6,7", "--max-new-tokens", "8", "--eos-ids", "999"]) == 0
    printed = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    assert printed == hf_greedy(ref, torch.tensor([[5, 6, 7]]), 8)[0].tolist()


@pytest.mark.parametrize("argv, msg", [
    (["--prompt-ids", "1,100000"], r"prompt ids must be in \[0, \d+\)"),  # no --model: the shipped model
    (["--model", "/nonexistent/x", "--prompt-ids", "1,2"], "not found"),
    (["--model", "{folder}", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["--model", "{folder}", "--prompt-ids", "1,100000"], r"prompt ids must be in \[0, 128\)"),
    (["--model", "{folder}", "--prompt-ids", "1", "--dtype", "int7"], "unsupported dtype"),
])
def test_cli_errors_are_messages_not_tracebacks(glm_pair, capsys, argv, msg):
    folder = glm_pair[0]
    argv = [a.replace("{folder}", str(folder)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("glm4 generate: error:") and __import__("re").search(msg, err)


def test_cli_dispatch(glm_pair, capsys):
    from glm4.cli import main as cli

    assert cli(["generate", "--model", str(glm_pair[0]), "--prompt-ids", "4", "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) >= 2


def test_glm4_generate_is_the_reference_generator(glm_pair):
    """`glm4.generate` is the function of glm4.reference (a module of another name: no module/function clash)."""
    import glm4.reference as mod

    assert glm4.generate is mod.generate

    model = glm_pair[2]
    ids = _ids(1, 3)
    assert torch.equal(glm4.generate(model, ids, 4, eos_token_ids=[]), mod.generate(model, ids, 4, eos_token_ids=[]))


def test_cli_text_prompt_uses_tokenizer_and_chat_format(hf_checkpoint, capsys):
    import base64

    from glm4.chat import ChatFormat
    from glm4.tokenizer import load_tokenizer

    folder, ref = hf_checkpoint("glm", vocab_size=272)  # 256 byte tokens + GLM-4's 14 special tokens
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n"
                                                    for i in range(256)))
    assert main(["--model", str(folder), "--prompt", "hi", "--max-new-tokens", "8"]) == 0
    tok = load_tokenizer(folder)
    ids = ChatFormat.for_checkpoint(folder).encode(tok, [{"role": "user", "content": "hi"}])
    assert ids[:3] == [tok.special_tokens[t] for t in ("[gMASK]", "<sop>", "<|user|>")]
    new = hf_greedy(ref, torch.tensor([ids]), 8, eos_token_id=ref.config.eos_token_id)[0, len(ids):]
    assert capsys.readouterr().out == tok.decode(new.tolist(), skip_special_tokens=True) + "\n"
