"""Ollama's API on `glm4 serve`, driven by the official `ollama` Python client: every reply equals what the
OpenAI route gives for the same request (one chat path), streamed or whole, with tools, formats, thinking,
options; tags / show / ps / version; bad input answered `{"error": ...}` with a 4xx."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import ollama
import openai
import pytest
import torch
from test_serve_util import ServerThread, make_checkpoint

torch.set_num_threads(1)

KEY = "sk-ollama-test"
MODEL = "tiny-glm4"
# written as the ollama client's Tool model serializes a tool (its keywords, in its key order; it drops others,
# e.g. maxLength), so that both routes render the same prompt
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                  "unit": {"type": "string", "enum": ["c", "f"]}}}}}
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What's the weather in Paris?"}]
GREEDY = {"temperature": 0, "num_predict": 12}


def _serve(folder, name: str, key: str | None = None) -> ServerThread:
    from glm4.serve.app import build_state, create_app

    st = build_state(str(folder), model_name=name, api_key=key, kv_cache_tokens=8192, max_num_seqs=16)
    srv = ServerThread(create_app(st)).start()
    srv.state = st
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _serve(make_checkpoint(tmp_path_factory.mktemp("ollama") / "tiny"), MODEL, KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def _ollama_call(call) -> tuple[str, dict]:
    return call.function.name, dict(call.function.arguments)


def _openai_call(call) -> tuple[str, dict]:
    return call.function.name, json.loads(call.function.arguments)


# ------------------------------------------------------------------------------------------ chat and generate


def test_chat_equals_openai_chat(client, oai):
    r = client.chat(model=MODEL, messages=MSGS, options={**GREEDY, "num_ctx": 4096, "mirostat": 0}, stream=False)
    o = oai.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=12)
    assert r.message.role == "assistant" and r.message.content == o.choices[0].message.content
    assert r.done and r.done_reason == o.choices[0].finish_reason
    assert r.prompt_eval_count == o.usage.prompt_tokens and r.eval_count == o.usage.completion_tokens
    assert r.total_duration >= r.eval_duration > 0 and r.load_duration == 0
    tagged = client.chat(model=MODEL + ":latest", messages=MSGS, options=GREEDY, stream=False)
    assert tagged.message.content == r.message.content


def test_chat_stream_is_the_default_and_folds_to_the_whole(client, server):
    whole = client.chat(model=MODEL, messages=MSGS, options=GREEDY, stream=False)
    parts = list(client.chat(model=MODEL, messages=MSGS, options=GREEDY, stream=True))
    assert len(parts) >= 2 and [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts).strip() == whole.message.content
    last = parts[-1]
    assert last.done_reason == whole.done_reason and last.eval_count == whole.eval_count
    r = _post(server, "/api/chat", {"model": MODEL, "messages": MSGS, "options": GREEDY})  # no "stream": NDJSON
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[-1]["done"] is True and "".join(x["message"]["content"] for x in lines).strip() == whole.message.content


def test_options_seed_stop_and_sampling(client, oai):
    opts = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7, "num_predict": 10, "repeat_penalty": 1.1}
    a = client.chat(model=MODEL, messages=MSGS, options=opts, stream=False)
    b = client.chat(model=MODEL, messages=MSGS, options=opts, stream=False)
    o = oai.chat.completions.create(model=MODEL, messages=MSGS, temperature=0.9, top_p=0.9, seed=7, max_tokens=10,
                                    extra_body={"top_k": 40, "repetition_penalty": 1.1})
    assert a.message.content == b.message.content == o.choices[0].message.content
    full = client.chat(model=MODEL, messages=MSGS, options={"temperature": 0, "num_predict": 30}, stream=False)
    text = full.message.content
    stop = text[len(text) // 2:len(text) // 2 + 2].strip() or text[-1]
    cut = client.chat(model=MODEL, messages=MSGS, options={"temperature": 0, "num_predict": 30, "stop": [stop]},
                      stream=False)
    assert stop not in cut.message.content and text.startswith(cut.message.content.rstrip())


def test_generate_equals_chat_and_raw_equals_completions(client, oai):
    g = client.generate(model=MODEL, prompt="Weather in Paris?", system="You are terse.", options=GREEDY, stream=False)
    c = client.chat(model=MODEL, messages=[{"role": "system", "content": "You are terse."},
                                           {"role": "user", "content": "Weather in Paris?"}], options=GREEDY,
                    stream=False)
    assert g.response == c.message.content and g.prompt_eval_count == c.prompt_eval_count
    assert len(g.context) == g.prompt_eval_count + g.eval_count
    streamed = "".join(p.response for p in client.generate(model=MODEL, prompt="Weather in Paris?",
                                                           system="You are terse.", options=GREEDY, stream=True))
    assert streamed.strip() == g.response
    raw = client.generate(model=MODEL, prompt="Once upon a time", raw=True, options=GREEDY, stream=False)
    o = oai.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=12)
    assert raw.response == o.choices[0].text.strip() and raw.prompt_eval_count == o.usage.prompt_tokens
    follow = client.generate(model=MODEL, prompt="And then?", context=g.context, options=GREEDY, stream=False)
    assert follow.prompt_eval_count > len(g.context)


def test_empty_request_loads(client):
    r = client.chat(model=MODEL, messages=[], stream=False)
    assert r.done and r.done_reason == "load"
    assert client.generate(model=MODEL, prompt="", keep_alive="5m").done_reason == "load"


# ------------------------------------------------------------------------------------------ tools and formats


def test_tool_calls_have_object_arguments(client, oai, server, monkeypatch):
    """Ollama has no tool_choice and a random model seldom calls under "auto": the planner is made to force a
    call (as tool_choice "required" does) so that the call's way out is what is tested, against OpenAI's."""
    st = server.state
    plan = st.chat.plan
    for seed in range(2):
        o = oai.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER], tool_choice="required",
                                        temperature=1.0, seed=seed, max_tokens=120)
        monkeypatch.setattr(st.chat, "plan", lambda *a, **kw: plan(*a, **{**kw, "tool_choice": "required"}))
        r = client.chat(model=MODEL, messages=MSGS, tools=[WEATHER], stream=False,
                        options={"temperature": 1.0, "seed": seed, "num_predict": 120})
        parts = list(client.chat(model=MODEL, messages=MSGS, tools=[WEATHER],
                                 options={"temperature": 1.0, "seed": seed, "num_predict": 120}, stream=True))
        monkeypatch.setattr(st.chat, "plan", plan)
        want = [_openai_call(c) for c in o.choices[0].message.tool_calls]
        assert want and o.choices[0].finish_reason == "tool_calls" and r.done_reason == "stop"
        assert [_ollama_call(c) for c in r.message.tool_calls] == want
        for _, args in want:
            jsonschema.validate(args, WEATHER["function"]["parameters"])
        streamed = [_ollama_call(c) for p in parts for c in (p.message.tool_calls or [])]
        assert streamed == want  # each call whole, once


def test_tool_history_round_trip(client, server):
    """Ollama's tool history (object arguments, `tool_name` results) renders the prompt OpenAI's shape renders."""
    history = MSGS + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 C, sunny"}]
    r = client.chat(model=MODEL, messages=history, tools=[WEATHER], options={"num_predict": 4}, stream=False)
    oai_history = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    tok = _post(server, "/tokenize", {"messages": oai_history, "tools": [WEATHER]}).json()
    assert r.prompt_eval_count == tok["count"]


def test_format_json_schema_and_json(client, oai):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    for seed in range(2):
        opts = {"temperature": 1.0, "seed": seed, "num_predict": 60}
        r = client.chat(model=MODEL, messages=MSGS, format=schema, options=opts, stream=False)
        jsonschema.validate(json.loads(r.message.content), schema)
        o = oai.chat.completions.create(model=MODEL, messages=MSGS, temperature=1.0, seed=seed, max_tokens=60,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "format", "schema": schema}})
        assert r.message.content == o.choices[0].message.content
    g = client.generate(model=MODEL, prompt="Give me JSON", format="json", options={"num_predict": 60, "seed": 1},
                        stream=False)
    assert isinstance(json.loads(g.response), dict)


def test_logprobs(client, oai):
    r = client.chat(model=MODEL, messages=MSGS, options={"temperature": 0, "num_predict": 5}, logprobs=True,
                    top_logprobs=2, stream=False)
    o = oai.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=5, logprobs=True,
                                    top_logprobs=2)
    assert [(x.token, x.logprob) for x in r.logprobs] == [(x.token, x.logprob) for x in o.choices[0].logprobs.content]
    assert all(len(x.top_logprobs) == 2 for x in r.logprobs)


# ------------------------------------------------------------------------------------------ thinking


def test_think_on_a_glm4_moe_checkpoint(tmp_path):
    """`think` reaches the template as enable_thinking (GLM-4.5 closes an empty `<think></think>` when off)."""
    srv = _serve(make_checkpoint(tmp_path / "moe", seed=2, model_type="glm4_moe"), "tiny-moe")
    try:
        c = ollama.Client(host=srv.url, timeout=60)
        o = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert "thinking" in c.show("tiny-moe").capabilities
        for think in (True, False):
            r = c.chat(model="tiny-moe", messages=MSGS, think=think, options=GREEDY, stream=False)
            w = o.chat.completions.create(model="tiny-moe", messages=MSGS, temperature=0, max_tokens=12,
                                          extra_body={"enable_thinking": think})
            assert r.prompt_eval_count == w.usage.prompt_tokens
            assert r.message.content == w.choices[0].message.content
            assert r.message.thinking == getattr(w.choices[0].message, "reasoning_content", None)
        on = c.chat(model="tiny-moe", messages=MSGS, think=True, options=GREEDY, stream=False)
        off = c.chat(model="tiny-moe", messages=MSGS, think=False, options=GREEDY, stream=False)
        assert off.prompt_eval_count > on.prompt_eval_count  # the closed `<think></think>`
    finally:
        srv.stop()


def test_thinking_streams_as_thinking(tmp_path):
    """A GLM-Z1 template opens `<think>` in the prompt: the reply starts as thinking, sent as `thinking`."""
    from glm4.chat.template import TEMPLATE_DIR

    folder = make_checkpoint(tmp_path / "z1", seed=4)
    shutil.copy(TEMPLATE_DIR / "glmz1.jinja", folder / "chat_template.jinja")
    srv = _serve(folder, "tiny-z1")
    try:
        c = ollama.Client(host=srv.url, timeout=60)
        o = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat(model="tiny-z1", messages=MSGS, think=True, options=GREEDY, stream=False)
        w = o.chat.completions.create(model="tiny-z1", messages=MSGS, temperature=0, max_tokens=12)
        assert r.message.thinking and r.message.thinking == w.choices[0].message.reasoning_content
        parts = list(c.chat(model="tiny-z1", messages=MSGS, think=True, options=GREEDY, stream=True))
        assert "".join(p.message.thinking or "" for p in parts).strip() == r.message.thinking
    finally:
        srv.stop()


def test_think_on_a_model_without_thinking_is_400(server):
    r = _post(server, "/api/chat", {"model": MODEL, "messages": MSGS, "think": True, "stream": False})
    assert r.status_code == 400 and "does not support thinking" in r.json()["error"]


# ------------------------------------------------------------------------------------------ models


def test_tags_show_ps_version(client, server):
    tags = client.list()
    assert [m.model for m in tags.models] == [MODEL + ":latest"] and tags.models[0].size > 0
    assert tags.models[0].details.family == "glm4"
    show = client.show(MODEL)
    assert set(show.capabilities) >= {"completion", "tools"} and "<|assistant|>" in show.template
    assert show.modelinfo["general.architecture"] == "glm4"
    assert show.modelinfo["general.parameter_count"] == sum(p.numel() for p in server.state.engine.engine.model.parameters())
    ps = client.ps()
    assert ps.models[0].context_length == server.state.max_model_len and ps.models[0].size_vram == 0
    v = httpx.get(server.url + "/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert isinstance(v["version"], str) and v["version"].count(".") == 2


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("path,body,status", [
    ("/api/chat", {"model": "nope", "messages": MSGS}, 404),
    ("/api/generate", {"model": "nope", "prompt": "hi"}, 404),
    ("/api/show", {"model": "nope"}, 404),
    ("/api/show", {}, 400),
    ("/api/chat", {"messages": MSGS}, 400),
    ("/api/chat", {"model": MODEL, "messages": "hi"}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/api/chat", {"model": MODEL, "messages": MSGS, "options": {"temperature": "hot"}}, 400),
    ("/api/chat", {"model": MODEL, "messages": MSGS, "options": {"top_p": 0}}, 400),
    ("/api/chat", {"model": MODEL, "messages": MSGS, "format": "yaml"}, 400),
    ("/api/chat", {"model": MODEL, "messages": MSGS, "format": {"type": "object", "properties": 3}}, 400),
    ("/api/chat", {"model": MODEL, "messages": MSGS, "tools": [{"type": "function", "function": {}}]}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x " * 5000}]}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "suffix": "end"}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "images": ["aGk="]}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "images": ["aGk="], "raw": True}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "context": [-1]}, 400),
    ("/api/chat", [1, 2], 400),
])
def test_bad_input_is_ollama_4xx(server, path, body, status):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error"} and isinstance(err["error"], str) and err["error"] and "\n" not in err["error"]


def test_malformed_json_and_client_error(server, client):
    r = httpx.post(server.url + "/api/chat", content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                                                                          "content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=MSGS)
    assert e.value.status_code == 404 and "not found" in e.value.error
