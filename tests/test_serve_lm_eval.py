"""lm-evaluation-harness against `glm4 serve`, offline: /v1/completions scores prompts (echo + logprobs,
max_tokens 0, vLLM's prompt_logprobs), vLLM's /tokenize, /detokenize, /tokenizer_info let lm-eval's
`local-completions` model tokenize through the server (no hub), and its numbers equal a dense forward of the
served model. Tasks: tests/fixtures/lm_eval (a multiple-choice and a loglikelihood_rolling task)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from test_serve_util import MAX_POS, ServerThread, make_checkpoint

torch.set_num_threads(1)

MODEL = "tiny-glm4"
TASKS = Path(__file__).parent / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from glm4.serve.app import build_state, create_app

    ckpt = make_checkpoint(tmp_path_factory.mktemp("lmeval") / "tiny", seed=1)
    st = build_state(str(ckpt), model_name=MODEL, kv_cache_tokens=8192, max_num_seqs=16)
    srv = ServerThread(create_app(st)).start()
    srv.state = st
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def dense(server, ids: list[int]) -> torch.Tensor:
    """[T, V] log-probabilities of the served model over the sampled vocabulary, from one dense forward."""
    eng = server.state.engine.engine
    with torch.inference_mode():
        logits = eng.model(torch.tensor([ids]))[0, :, :eng.runner.sampler.vocab_size].float()
    return torch.log_softmax(logits, dim=-1)


def scored(server, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1."""
    lp = dense(server, ids)
    return lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def _tokenize(server, text: str, special: bool = False) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": special})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# ------------------------------------------------------------------------------------------ the endpoints


def test_echo_logprobs_score_the_prompt(client, server):
    ids = _tokenize(server, "The quick brown fox jumps over the lazy dog", special=True)
    want = scored(server, ids)
    for max_tokens in (1, 0):
        r = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=2, max_tokens=max_tokens,
                                      temperature=0)
        c = r.choices[0]
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), torch.tensor(want), atol=1e-4, rtol=0)
        for t in range(1, len(ids)):  # the top alternatives: 2 of them, the best first and at least the token's
            top = lp.top_logprobs[t]
            assert len(top) <= 2 and max(top.values()) >= lp.token_logprobs[t] - 1e-6
        assert lp.tokens[:len(ids)] == [server.state.token_texts.text(t) for t in ids]
        assert lp.text_offset[1] == len(lp.tokens[0])
        echo = server.state.tokenizer.decode(ids)
        assert c.text.startswith(echo) and (max_tokens or c.text == echo)
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
        if max_tokens == 0:
            assert c.finish_reason == "length"


def test_vllm_prompt_logprobs(client, server):
    ids = _tokenize(server, "Numbers grow quickly when you keep doubling them", special=True)
    lp = dense(server, ids)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 3})
    plp = r.choices[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(ids) and r.choices[0].logprobs is None
    for t in range(1, len(ids)):
        d = plp[t]
        own = d[str(ids[t])]
        assert abs(own["logprob"] - float(lp[t - 1, ids[t]])) < 1e-4
        assert own["decoded_token"] == server.state.token_texts.text(ids[t])
        assert abs(float(lp[t - 1].sort(descending=True).values[own["rank"] - 1] - lp[t - 1, ids[t]])) < 1e-4
        best = str(int(lp[t - 1].argmax()))
        assert d[best]["rank"] == 1 and 3 <= len(d) <= 4


def test_echo_logprobs_stream_matches_whole(client, server):
    ids = _tokenize(server, "A small dog waited by the door", special=True)
    whole = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=3, temperature=0)
    text, tokens, lps = "", [], []
    for ch in client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=3, temperature=0,
                                        stream=True):
        for c in ch.choices:
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
    assert text == whole.choices[0].text and tokens == whole.choices[0].logprobs.tokens
    assert lps == whole.choices[0].logprobs.token_logprobs


def test_completion_scoring_bad_input(server):
    url = server.url + "/v1/completions"
    for body, param in (({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "hi", "prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),
                        ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
                        ({"prompt": "hi", "max_tokens": -1}, "max_tokens")):
        r = httpx.post(url, json={"model": MODEL, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenize_detokenize_tokenizer_info(client, server):
    st = server.state
    text = "Hello <|user|> world"
    plain, special = _tokenize(server, text), _tokenize(server, text, special=True)
    assert plain == st.tokenizer.encode(text, allow_special=True) and st.tokenizer.special_tokens["<|user|>"] in plain
    assert special[:2] == [st.tokenizer.special_tokens["[gMASK]"], st.tokenizer.special_tokens["<sop>"]]
    assert special[2:] == plain
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert r["count"] == len(special) and r["max_model_len"] == st.max_model_len
    assert "".join(r["token_strs"][2:]) == text
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    done = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    assert chat["count"] == done.usage.prompt_tokens
    back = httpx.post(server.url + "/detokenize", json={"tokens": plain}).json()
    assert back == {"prompt": text}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == st.max_model_len
    assert "<|assistant|>" in info["chat_template"]
    for path, body, status in (("/detokenize", {"tokens": [10**9]}, 400), ("/tokenize", {"prompt": 3}, 400),
                               ("/tokenize", {"prompt": "x", "model": "nope"}, 404), ("/tokenize", [], 400),
                               ("/tokenize", {"messages": msgs, "add_generation_prompt": False}, 400)):
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == status and r.json()["error"]["message"], (path, body, r.text)


# ------------------------------------------------------------------------------------------ lm-eval


def _task(name: str, tmp_path: Path) -> dict:
    cfg = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
    kw = cfg["dataset_kwargs"]
    kw["data_files"] = {split: str(TASKS / f) for split, f in kw["data_files"].items()}
    kw["cache_dir"] = str(tmp_path / "datasets")
    return cfg


def test_lm_eval_local_completions_matches_the_model(server, tmp_path, monkeypatch):
    """lm-eval's `local-completions` (its tokenizer found through /tokenizer_info and /tokenize) runs a
    multiple-choice and a perplexity task; every loglikelihood it reports equals the served model's own."""
    pytest.importorskip("lm_eval")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import RemoteTokenizer

    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=MODEL, max_length=MAX_POS,
                             num_concurrent=1, max_retries=1)
    assert isinstance(lm.tokenizer, RemoteTokenizer)  # auto-detected: no tokenizer download
    out = lm_eval.simple_evaluate(model=lm, tasks=[_task("tiny_mc", tmp_path), _task("tiny_ppl", tmp_path)],
                                  task_manager=TaskManager(include_defaults=False), log_samples=True,
                                  bootstrap_iters=0)
    mc, ppl = out["samples"]["glm4_tiny_mc"], out["samples"]["glm4_tiny_ppl"]
    assert len(mc) == 4 and len(ppl) == 3
    correct, worst = 0, 0.0
    for s in mc:
        lls = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ll, greedy = resp[0]
            ctx, cont = lm._encode_pair(context, continuation)
            ref = scored(server, ctx + cont)[len(ctx) - 1:]
            assert abs(ll - sum(ref)) < 1e-4, (context, continuation, ll, sum(ref))
            worst = max(worst, abs(ll - sum(ref)))
            lls.append(ll)
        correct += int(max(range(len(lls)), key=lls.__getitem__) == s["target"])
    assert out["results"]["glm4_tiny_mc"]["acc,none"] == pytest.approx(correct / len(mc))
    eos = lm.tokenizer.eos_token_id
    total_ll, words = 0.0, 0
    for s in ppl:
        ll = s["resps"][0][0]
        text = s["doc"]["text"]
        ref = sum(scored(server, [eos] + lm.tok_encode(text)))  # one window: the text fits max_length
        assert abs(ll - ref) < 1e-4, (text, ll, ref)
        worst = max(worst, abs(ll - ref))
        total_ll, words = total_ll + ll, words + len(text.split())
    word_ppl = out["results"]["glm4_tiny_ppl"]["word_perplexity,none"]
    assert word_ppl == pytest.approx(math.exp(-total_ll / words), rel=1e-6)
    print(json.dumps({"mc": out["results"]["glm4_tiny_mc"], "ppl": out["results"]["glm4_tiny_ppl"],
                      "max |lm-eval - dense| loglikelihood": worst}, default=str))
