"""The OpenAI-compatible server on a real uvicorn (127.0.0.1, background thread), a tiny random GLM-4
checkpoint with a real tokenizer.model, and the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import torch
from test_serve_util import (
    MAX_POS,
    ServerThread,
    engine_idle,
    fuzz_openapi,
    make_checkpoint,
    openai_error,
    wait_healthy,
)

torch.set_num_threads(1)

KEY = "sk-test-key"
MODEL = "tiny-glm4"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet", "pst"]},
                                                    "hour24": {"type": "boolean"}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What's the weather in Paris? 巴黎天气如何？"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    from glm4.serve.app import build_state, create_app

    st = build_state(str(ckpt), api_key=KEY, model_name=MODEL, max_pending=64, kv_cache_tokens=16384,
                     max_num_seqs=48)
    srv = ServerThread(create_app(st)).start()
    srv.state = st
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)




def _auth():
    return {"Authorization": f"Bearer {KEY}"}


# ------------------------------------------------------------------------------------------ basics


def test_health_and_api_key(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    for path in ("/v1/models", "/metrics", "/v1/chat/completions"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and openai_error(r)["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=2)


def _generated_text(server, logprobs) -> str:
    """The text of the generated tokens (special tokens skipped, as the server does), from their bytes."""
    specials = server.state.tokenizer.special_tokens
    return b"".join(bytes(t.bytes) for t in logprobs if t.token not in specials).decode("utf-8", errors="replace")


def test_chat_usage_matches_tokenizer(client, server):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0.7, seed=3,
                                       logprobs=True, top_logprobs=3)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and c.message.role == "assistant"
    layer = server.state.chat
    assert r.usage.prompt_tokens == len(layer.fmt.encode(layer.tok, MSGS))
    assert r.usage.completion_tokens == len(c.logprobs.content) <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert c.finish_reason in ("stop", "length")
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in c.logprobs.content)
    assert c.message.content == _generated_text(server, c.logprobs.content).strip()


def test_chat_stream_matches_non_stream(client):
    kw = dict(model=MODEL, messages=MSGS, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content


def test_chat_n_seed_and_stop(client):
    kw = dict(model=MODEL, messages=MSGS, max_tokens=10, temperature=1.0, seed=11, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # the n samples differ
    assert a.usage.completion_tokens <= 30
    assert a.usage.prompt_tokens == client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1).usage.prompt_tokens
    kw = dict(model=MODEL, messages=MSGS, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    text = client.chat.completions.create(**kw).choices[0].message.content
    assert len(text) >= 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.chat.completions.create(**kw, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.find(stop)].strip()


def test_penalties_and_accepted_extras(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=5, presence_penalty=1.5,
                                       frequency_penalty=1.0, top_p=0.9, temperature=0.8, seed=1, logit_bias={"5": -100},
                                       user="u1", store=False, metadata={"k": "v"}, reasoning_effort="none",
                                       modalities=["text"], prompt_cache_key="abc", safety_identifier="s")
    assert r.usage.completion_tokens <= 5
    dev = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert dev.choices[0].message.role == "assistant"


# ------------------------------------------------------------------------------------------ completions


def test_completions(client, server):
    from glm4.serve.completions import encode_prompt

    tok = server.state.tokenizer
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, logprobs=2, seed=0)
    c = r.choices[0]
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(encode_prompt(tok, "Once upon a time"))
    assert r.usage.completion_tokens == len(c.logprobs.tokens) and len(c.logprobs.top_logprobs[0]) == 2
    assert c.logprobs.text_offset[0] == 0
    e = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, echo=True, seed=0)
    assert e.choices[0].text.startswith("Once upon a time")
    ids = encode_prompt(tok, "hello")
    t = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    s = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    assert t.choices[0].text == s.choices[0].text and t.usage.prompt_tokens == len(ids)
    m = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=3)
    assert sorted(c.index for c in m.choices) == [0, 1, 2, 3]
    chunks = list(client.completions.create(model=MODEL, prompt="hi", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 or chunks[-2].choices[0].finish_reason == "stop"
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


# ------------------------------------------------------------------------------------------ tools and JSON


def _check_call(call, allowed=None):
    assert call.type == "function" and call.id.startswith("call_")
    name = call.function.name
    assert name in (allowed or SCHEMAS)
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tool_choice_required_yields_valid_calls(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, seed=seed, temperature=1.0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        _check_call(call)


def test_tool_choice_named_and_single(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=120, seed=seed, parallel_tool_calls=False)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        _check_call(calls[0], allowed={"get_time"})


def test_tool_choice_auto_and_none(client, server):
    for seed in range(8):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="auto",
                                           max_tokens=40, seed=seed)
        m = r.choices[0].message
        if m.tool_calls:  # a call the model starts under "auto" is kept well-formed, and finished in budget
            assert r.choices[0].finish_reason == "tool_calls"
            for call in m.tool_calls:
                _check_call(call)
        else:
            assert isinstance(m.content, str)
    with_tools = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, max_tokens=1)
    none = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens < with_tools.usage.prompt_tokens  # tools not offered


def test_tool_call_stream(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required",
                                                 max_tokens=120, seed=5, stream=True, n=2))
    calls: dict[tuple[int, int], dict] = {}  # (choice, call index) -> call
    finish = {}
    for ch in chunks:
        for choice in ch.choices:
            for tc in choice.delta.tool_calls or []:
                key = (choice.index, tc.index)
                if tc.id:
                    assert key not in calls and tc.function.name
                    calls[key] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
                else:
                    calls[key]["arguments"] += tc.function.arguments
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"} and {k[0] for k in calls} == {0, 1}
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_tool_round_trip_messages(client):
    """A conversation with an assistant tool call and its tool result is accepted and answered."""
    msgs = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("max_tokens", [12, 40])
def test_json_object_mode_parses(client, max_tokens):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, response_format={"type": "json_object"},
                                           max_tokens=max_tokens, seed=seed)
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema_mode_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=80, seed=seed, response_format={
            "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


# ------------------------------------------------------------------------------------------ concurrency


def _parse_sse(body: str) -> list:
    events = [line[len("data: "):] for line in body.split("\n\n") if line.strip()]
    assert events[-1] == "[DONE]", body[-200:]
    return [json.loads(e) for e in events[:-1]]


def test_32_parallel_streams(server):
    async def one(ac, i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me about number {i}"}],
                "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}, "seed": i}
        t0 = time.perf_counter()
        async with ac.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text = "".join([x async for x in r.aiter_text()])
        return _parse_sse(text), time.perf_counter() - t0

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=_auth(), timeout=120) as ac:
            return await asyncio.gather(*[one(ac, i) for i in range(32)])

    results = asyncio.run(main())
    for events, _ in results:
        assert len({e["id"] for e in events}) == 1
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert sum(1 for e in events if e["choices"] and e["choices"][0]["finish_reason"]) == 1
        assert events[-1]["choices"] == [] and 1 <= events[-1]["usage"]["completion_tokens"] <= 12


# ------------------------------------------------------------------------------------------ errors

BAD_BODIES = [
    {},  # nothing
    {"model": MODEL},  # no messages
    {"messages": [{"role": "user", "content": "x"}]},  # no model
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": "hello"},
    {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
    {"model": MODEL, "messages": [{"content": "x"}]},
    {"model": MODEL, "messages": [{"role": "user"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
    {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
    {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
    {"model": MODEL, "messages": [{"role": "assistant", "content": "prefill"}]},
    {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},  # no tool_call_id
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 1.5},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 1000},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},  # over the context
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "presence_penalty": 9},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [""]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": True},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},  # without logprobs
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 1}},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 500}},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "frobnicate": 1},  # unknown parameter
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}], "tools": TOOLS},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "has space"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}],
     "function_call": {"name": "g"}},  # legacy: a function not among functions
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"enable_thinking": "no"}},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "extra_body": "thinking"},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},  # no tools
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "has space"}}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, WEATHER]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
     "tool_choice": {"type": "function", "function": {"name": "missing"}}},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "sometimes"},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 12}}}}}]},  # invalid JSON schema
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
    {"model": MODEL, "messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}, {"role": "user", "content": "x"}]},
]
BAD_COMPLETIONS = [
    {"model": MODEL},
    {"model": MODEL, "prompt": []},
    {"model": MODEL, "prompt": [[]]},
    {"model": MODEL, "prompt": [1, 2, 99999999]},
    {"model": MODEL, "prompt": [-1]},
    {"model": MODEL, "prompt": {"text": "x"}},
    {"model": MODEL, "prompt": "x", "logprobs": 9},
    {"model": MODEL, "prompt": "x", "suffix": "y"},
    {"model": MODEL, "prompt": "x", "best_of": 3, "n": 1},
    {"model": MODEL, "prompt": "x", "max_tokens": 0},  # 0 only with echo (scoring the prompt)
    {"model": MODEL, "prompt": "x", "prompt_logprobs": 1, "stream": True},
    {"model": MODEL, "prompt": "x " * 2000},  # over the context
]


def test_malformed_requests_are_4xx_json(server):
    h = _auth()
    cases = [("POST", "/v1/chat/completions", {"json": b}) for b in BAD_BODIES]
    cases += [("POST", "/v1/completions", {"json": b}) for b in BAD_COMPLETIONS]
    cases += [
        ("POST", "/v1/chat/completions", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/chat/completions", {"content": b"[1, 2]", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/chat/completions", {"content": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/chat/completions", {"content": b"model=x", "headers": {"Content-Type": "text/plain"}}),
        ("GET", "/v1/chat/completions", {}),
        ("POST", "/v1/nothing", {"json": {}}),
        ("DELETE", "/v1/models", {}),
    ]
    assert len(cases) >= 25
    for method, path, kw in cases:
        headers = {**h, **kw.pop("headers", {})}
        r = httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)
        assert 400 <= r.status_code < 500, (path, kw, r.status_code, r.text)
        openai_error(r)


def test_context_overflow_reports_numbers(client):
    long = [{"role": "user", "content": "word " * (MAX_POS + 50)}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=4)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and str(MAX_POS) in body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=MAX_POS)
    assert "in the completion" in e.value.body["message"]


# ------------------------------------------------------------------------------------------ load, disconnect


def test_queue_full_answers_429(server):
    st = server.state
    old = st.engine.max_pending
    st.engine.max_pending = 1
    try:
        body = {"model": MODEL, "messages": MSGS, "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
            lines = r.iter_lines()  # (kept: a dropped iterator would close the response)
            next(lines)  # the first chunk: the request is admitted
            r2 = httpx.post(server.url + "/v1/chat/completions", headers=_auth(), timeout=30,
                            json={"model": MODEL, "messages": MSGS, "max_tokens": 2})
            assert r2.status_code == 429 and r2.headers["retry-after"] == "1"
            assert openai_error(r2)["type"] == "rate_limit_error"
    finally:
        st.engine.max_pending = old
    assert engine_idle(st)


def test_disconnect_frees_kv_blocks(server, monkeypatch):
    st = server.state
    assert engine_idle(st)
    # the tiny model decodes 400 tokens in well under the client's 0.5 s on a fast CPU: pace the engine at >= 10 ms
    # a step so that both requests are still running when their clients leave
    step = st.engine.engine.step
    monkeypatch.setattr(st.engine.engine, "step", lambda: (time.sleep(0.01), step())[1])
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        bm = st.engine.engine.block_manager
        assert bm.num_free_blocks < bm.num_blocks  # the stream holds KV blocks now
    # the client closed the connection mid-stream: the request is aborted and its blocks freed
    assert engine_idle(st)
    # a non-streaming request whose client gives up is aborted too: all its n engine requests, before they finish
    aborted = st.metrics.counter("requests_aborted_total")
    body = json.dumps({"model": MODEL, "messages": MSGS, "max_tokens": MAX_POS - 200, "ignore_eos": True, "n": 8})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + body.encode())
        deadline = time.monotonic() + 20
        while st.engine.num_pending == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert st.engine.num_pending == 8
    assert engine_idle(st)
    assert st.metrics.counter("requests_aborted_total") == aborted + 8


def test_metrics(client, server):
    client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    text = httpx.get(server.url + "/metrics", headers=_auth()).text
    for name in ("glm4_requests_total", "glm4_prompt_tokens_total", "glm4_generation_tokens_total",
                 "glm4_queue_depth", "glm4_kv_cache_usage_ratio", "glm4_request_latency_seconds_bucket",
                 "glm4_time_to_first_token_seconds_count", "glm4_requests_in_flight"):
        assert name in text, name
    n = float(next(line.split()[-1] for line in text.splitlines() if line.startswith('glm4_requests_total{endpoint="chat"}')))
    assert n >= 1


# ------------------------------------------------------------------------------------------ shutdown, schemathesis


@pytest.fixture(scope="module")
def small_server(ckpt):
    """A second server (no API key) with a 64-token context, for fuzzing and shutdown."""
    from glm4.serve.app import build_state, create_app

    st = build_state(str(ckpt), model_name=MODEL, max_pending=16, kv_cache_tokens=2048, max_model_len=64)
    srv = ServerThread(create_app(st, drain_timeout=10)).start()
    srv.state = st
    yield srv
    srv.stop()


def test_schemathesis_finds_no_5xx(small_server):
    def served_model(body, n):
        if "model" in body and n % 4:  # mostly the served model, so that generation runs too
            body["model"] = MODEL

    failures, calls, ok = fuzz_openapi(small_server.url, prepare=served_model)
    assert not failures, failures[:3]
    assert calls[("POST", "/v1/chat/completions")] >= 25 and calls[("POST", "/v1/completions")] >= 25
    for route in ("/api/chat", "/api/generate", "/api/show", "/tokenize", "/detokenize"):  # the Ollama and vLLM routes
        assert calls[("POST", route)] >= 25, route
    assert ok[True] >= 10  # some fuzzed requests were valid and generated


def test_graceful_shutdown_drains(ckpt):
    from glm4.serve.app import build_state, create_app

    st = build_state(str(ckpt), model_name=MODEL, kv_cache_tokens=2048)
    srv = ServerThread(create_app(st)).start()
    out = {}

    def consume():
        body = {"model": MODEL, "messages": MSGS, "max_tokens": 60, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            out["events"] = _parse_sse("".join(r.iter_text()))

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.monotonic() + 20
    while st.engine.num_pending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.stop()  # like SIGTERM: stop accepting, finish the open stream, then stop the engine
    t.join(timeout=30)
    assert out["events"][-1]["usage"]["completion_tokens"] == 60
    assert not srv.thread.is_alive() and not st.engine.alive


# the server started the way `nohup glm4 serve ... &` starts it: SIGINT ignored before glm4 runs
SIGINT_IGNORED = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); from glm4.cli import main; "
                  "sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_cli_serve_signal_drains(ckpt, sig):
    """`glm4 serve` as a process: serves with its API key, and on SIGTERM or SIGINT finishes the open stream,
    then exits 0 — SIGINT too when the process inherited it ignored (a server started in the background)."""
    import os
    import signal
    import subprocess
    import sys

    from test_serve_util import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "glm4.cli"] if sig == "SIGTERM" else ["-c", SIGINT_IGNORED]
    proc = subprocess.Popen([sys.executable, *launcher, "serve", "--model", str(ckpt), "--port", str(port),
                             "--api-key", KEY, "--served-model-name", MODEL, "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        body = {"model": MODEL, "messages": MSGS, "max_tokens": 80, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(getattr(signal, sig))
            events = _parse_sse("\n".join(lines) + "\n")
        assert events[-1]["usage"]["completion_tokens"] == 80
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------ GLM-4.5 XML calls


def test_glm45_checkpoint_serves_enforced_xml_tool_calls(tmp_path):
    """A glm4_moe checkpoint speaks GLM-4.5's XML tool-call format: required / named calls (streamed and not) are
    valid OpenAI tool_calls even from a random tiny model; reasoning_effort "none" turns thinking off."""
    from glm4.serve.app import build_state, create_app

    folder = make_checkpoint(tmp_path / "moe", seed=2, model_type="glm4_moe")
    st = build_state(str(folder), model_name="tiny-moe", kv_cache_tokens=8192)
    assert st.chat.fmt.family == "glm4_moe"
    srv = ServerThread(create_app(st)).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        for seed in range(2):
            r = c.chat.completions.create(model="tiny-moe", messages=MSGS, tools=TOOLS, tool_choice="required",
                                          max_tokens=150, seed=seed, temperature=1.0)
            assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls
            for call in r.choices[0].message.tool_calls:
                _check_call(call)
        r = c.chat.completions.create(model="tiny-moe", messages=MSGS, tools=TOOLS, max_tokens=150, seed=1,
                                      tool_choice={"type": "function", "function": {"name": "get_time"}},
                                      parallel_tool_calls=False, reasoning_effort="none")
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "get_time"
        _check_call(calls[0], allowed={"get_time"})
        names, args = [], ""
        for ch in c.chat.completions.create(model="tiny-moe", messages=MSGS, tools=TOOLS, tool_choice="required",
                                            max_tokens=150, seed=4, stream=True, parallel_tool_calls=False):
            for choice in ch.choices:
                for tc in choice.delta.tool_calls or []:
                    if tc.id:
                        names.append(tc.function.name)
                    args += tc.function.arguments or ""
        assert len(names) == 1
        jsonschema.validate(json.loads(args), SCHEMAS[names[0]])
    finally:
        srv.stop()


def test_serve_threads_policy(ckpt, tmp_path):
    """`glm4 serve --threads auto`: on <= 4 cores a small model leaves a core to HTTP; big models, big machines
    and explicit counts are left alone; a bad value is a clear error."""
    from glm4.serve.serve_cli import SMALL_MODEL_BYTES, serve_threads

    assert serve_threads(str(ckpt), "auto", cpus=2) == 1
    assert serve_threads(str(ckpt), "auto", cpus=4) == 3
    assert serve_threads(str(ckpt), "auto", cpus=16) is None and serve_threads(str(ckpt), "auto", cpus=1) is None
    assert serve_threads(None, "auto", cpus=2) == 1  # the shipped default model is small
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:
        f.truncate(SMALL_MODEL_BYTES + 1)  # sparse: only the size matters
    assert serve_threads(str(big), "auto", cpus=2) is None
    assert serve_threads(str(ckpt), "2", cpus=2) == 2
    for bad in ("0", "many"):
        with pytest.raises(ValueError, match="--threads"):
            serve_threads(str(ckpt), bad)
