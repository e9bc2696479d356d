"""OpenAI compatibility of the server where clients differ from the strict reading: nulls for optional fields,
the legacy `functions` / `function_call`, the thinking switches of vLLM / SGLang (`chat_template_kwargs`,
`enable_thinking`, `reasoning_effort`, a literal `extra_body`), and malformed requests that must be a one-line
4xx, never a traceback or a 5xx. A real uvicorn on 127.0.0.1 and the official `openai` client."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from test_serve_util import ServerThread, make_checkpoint

from glm4.serve import protocol as P

torch.set_num_threads(1)

MODEL = "tiny-glm4"
WEATHER_FN = {"name": "get_weather", "description": "Current weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                              "unit": {"enum": ["c", "f"]}},
                             "required": ["city", "unit"], "additionalProperties": False}}
MSGS = [{"role": "user", "content": "What's the weather in Paris?"}]


def _serve(folder, name):
    from glm4.serve.app import build_state, create_app

    st = build_state(str(folder), model_name=name, max_pending=32, kv_cache_tokens=8192)
    srv = ServerThread(create_app(st)).start()
    srv.state = st
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _serve(make_checkpoint(tmp_path_factory.mktemp("compat") / "tiny"), MODEL)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def _post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


# ------------------------------------------------------------------------------------------ nulls


def _optional_fields(model) -> list[str]:
    return [name for name, f in model.model_fields.items() if not f.is_required()]


def test_every_optional_chat_field_takes_null(client):
    fields = _optional_fields(P.ChatCompletionRequest)
    assert {"n", "stream", "logprobs", "tools", "functions", "chat_template_kwargs", "max_tokens"} <= set(fields)
    for name in fields:
        limit = {"max_completion_tokens": 2} if name == "max_tokens" else {"max_tokens": 2}
        r = client.chat.completions.create(model=MODEL, messages=MSGS, **limit, extra_body={name: None})
        assert r.choices[0].message.role == "assistant" and len(r.choices) == 1, name
        assert r.usage.completion_tokens <= 2, name
    every = {name: None for name in fields if name not in ("max_tokens",)}
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, extra_body=every)
    assert len(r.choices) == 1 and r.choices[0].message.tool_calls is None


def test_every_optional_completions_field_takes_null(client):
    fields = _optional_fields(P.CompletionRequest)
    assert {"n", "stream", "logprobs", "echo", "max_tokens", "best_of"} <= set(fields)
    for name in fields:
        r = client.completions.create(model=MODEL, prompt="Once upon a time", extra_body={name: None},
                                      **({} if name == "max_tokens" else {"max_tokens": 2}))
        assert len(r.choices) == 1 and r.choices[0].logprobs is None, name
        assert r.usage.completion_tokens <= (16 if name == "max_tokens" else 2), name  # null max_tokens: 16


def test_nulls_inside_messages_and_tools(client):
    msgs = [{"role": "system", "content": "Be brief.", "name": None},
            {"role": "user", "content": "hi", "name": None},
            {"role": "assistant", "content": "hello", "tool_calls": None, "refusal": None, "name": None},
            {"role": "user", "content": "weather?"}]
    tools = [{"type": "function", "function": {**WEATHER_FN, "description": None, "strict": None}}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=2,
                                       stream_options=None, response_format=None)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ------------------------------------------------------------------------------------------ legacy functions


def test_legacy_function_call_named(client, server):
    for seed in range(2):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, functions=[WEATHER_FN],
                                           function_call={"name": "get_weather"}, max_tokens=100, seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "function_call" and c.message.tool_calls is None
        assert c.message.function_call.name == "get_weather"
        jsonschema.validate(json.loads(c.message.function_call.arguments), WEATHER_FN["parameters"])
    # the same prompt as the tools spelling of the request
    tools = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=100, seed=0,
                                           tools=[{"type": "function", "function": WEATHER_FN}],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tools.usage.prompt_tokens == r.usage.prompt_tokens
    raw = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "functions": [WEATHER_FN],
                                                 "function_call": {"name": "get_weather"}, "max_tokens": 100})
    P.ChatCompletion.model_validate(raw.json())  # the documented response shape, exactly


def test_legacy_function_call_streams(client):
    name, args, finish = None, "", None
    for ch in client.chat.completions.create(model=MODEL, messages=MSGS, functions=[WEATHER_FN], stream=True,
                                             function_call={"name": "get_weather"}, max_tokens=100, seed=3):
        d = ch.choices[0].delta
        assert d.tool_calls is None
        if d.function_call is not None:
            if d.function_call.name:
                assert name is None
                name = d.function_call.name
            args += d.function_call.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert name == "get_weather" and finish == "function_call"
    jsonschema.validate(json.loads(args), WEATHER_FN["parameters"])


def test_legacy_conversation_and_function_call_none(client):
    call = {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}
    legacy = MSGS + [{"role": "assistant", "content": None, "function_call": call},
                     {"role": "function", "name": "get_weather", "content": "18 C, sunny"}]
    modern = MSGS + [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                            "function": call}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    a = client.chat.completions.create(model=MODEL, messages=legacy, functions=[WEATHER_FN], max_tokens=2)
    b = client.chat.completions.create(model=MODEL, messages=modern, tools=[{"type": "function", "function": WEATHER_FN}],
                                       max_tokens=2)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    none = client.chat.completions.create(model=MODEL, messages=MSGS, functions=[WEATHER_FN], function_call="none",
                                          max_tokens=4)
    plain = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4)
    assert none.choices[0].message.function_call is None and none.choices[0].finish_reason != "function_call"
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # "none": no functions offered


# ------------------------------------------------------------------------------------------ thinking switches


def test_thinking_switches_reach_the_template(tmp_path):
    """GLM-4.5: every spelling of "no thinking" renders the same prompt, and a different one from the default."""
    srv = _serve(make_checkpoint(tmp_path / "moe", seed=2, model_type="glm4_moe"), "tiny-moe")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)

        def prompt_tokens(**kw) -> int:
            return c.chat.completions.create(model="tiny-moe", messages=MSGS, max_tokens=1, **kw).usage.prompt_tokens

        default = prompt_tokens()
        off = prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert off != default
        assert prompt_tokens(extra_body={"enable_thinking": False}) == off
        assert prompt_tokens(reasoning_effort="none") == off
        assert prompt_tokens(reasoning_effort="minimal") == off
        assert prompt_tokens(reasoning_effort="high") == default
        assert prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == default
        # chat_template_kwargs wins over the other spellings; unknown template kwargs pass (vLLM passes them on)
        assert prompt_tokens(reasoning_effort="none", extra_body={"chat_template_kwargs": {"enable_thinking": True,
                                                                                           "clear_thinking": False}}) == default
        # a client that sends a literal extra_body object
        r = _post(srv, "/v1/chat/completions", {"model": "tiny-moe", "messages": MSGS, "max_tokens": 1,
                                                "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == off
    finally:
        srv.stop()


def test_reasoning_goes_out_under_both_names(server):
    """A reply's thinking is sent as `reasoning_content` and as `reasoning`, whole and as deltas."""
    from glm4.chat import ChatFormat
    from glm4.chat.planner import ChatPlanner
    from glm4.serve.chat_handler import _message

    planner = ChatPlanner(server.state.chat.tok, ChatFormat("glm45"), constrain=False)
    plan = planner.plan(MSGS)
    req = P.ChatCompletionRequest(model="m", messages=MSGS)
    message, reason = _message(req, planner.stream(plan), "<think>Paris is in France.</think>Sunny.", "stop")
    assert message["reasoning_content"] == message["reasoning"] == "Paris is in France." and reason == "stop"
    assert message["content"] == "Sunny."
    parser = planner.stream(plan)
    deltas = parser.feed_openai("<think>hm</think>") + parser.finish_openai()
    assert {"reasoning_content": "hm", "reasoning": "hm"} in deltas
    assert "reasoning" not in _message(req, planner.stream(plan), "Sunny.", "stop")[0]
    P.ResponseMessage.model_validate(message)


# ------------------------------------------------------------------------------------------ malformed requests

BAD_CHAT = [  # (what the openai client is asked for, the parameter the error names)
    (dict(messages=[{"role": "user"}]), "messages.0.content"),
    (dict(messages=[{"role": "function", "content": "x"}]), "messages.0.name"),
    (dict(messages=MSGS, n=0), "n"),
    (dict(messages=MSGS, temperature="hot"), "temperature"),
    (dict(messages=MSGS, functions=[WEATHER_FN], tools=[{"type": "function", "function": WEATHER_FN}]), "functions"),
    (dict(messages=MSGS, functions=[WEATHER_FN], function_call={"name": "nope"}), "tool_choice"),
    (dict(messages=MSGS, functions=[{"name": "bad name"}]), "functions.0.name"),
    (dict(messages=MSGS, function_call="sometimes", functions=[WEATHER_FN]), "function_call"),
    (dict(messages=MSGS, functions=[WEATHER_FN], function_call="auto", tool_choice="auto"), "function_call"),
    (dict(messages=MSGS, extra_body={"chat_template_kwargs": {"enable_thinking": "maybe"}}),
     "chat_template_kwargs.enable_thinking"),
    (dict(messages=MSGS, extra_body={"chat_template_kwargs": ["enable_thinking"]}), "chat_template_kwargs"),
    (dict(messages=MSGS, extra_body={"enable_thinking": "yes please"}), "enable_thinking"),
    (dict(messages=MSGS, reasoning_effort="extreme"), "reasoning_effort"),
    (dict(messages=MSGS, extra_body={"extra_body": 5}), "extra_body"),
    (dict(messages=MSGS, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]),
     "tools.0.function.parameters"),
    (dict(messages=MSGS, tool_choice="required"), "tool_choice"),  # no tools: the chat layer says so
    (dict(messages=MSGS, tools=[{"type": "function", "function": WEATHER_FN}] * 2), "tools.1.function.name"),
    (dict(messages=MSGS, tools=[{"type": "function", "function": WEATHER_FN}],
          tool_choice={"type": "function", "function": {"name": "missing"}}), "tool_choice"),
]


@pytest.mark.parametrize("kw,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_malformed_chat_requests_are_one_line_400s(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, **kw)
    body = e.value.body
    assert body["param"] == param, body
    assert body["type"] == "invalid_request_error" and "\n" not in body["message"] and "Traceback" not in body["message"]


def test_malformed_completions_requests_are_400s(client):
    for kw in (dict(prompt=None), dict(prompt="x", n=None, best_of=3), dict(prompt="x", max_tokens=0),
               dict(prompt=[[1, 2], []]), dict(prompt="x", extra_body={"chat_template_kwargs": {}})):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, **kw)
        assert "\n" not in e.value.body["message"], e.value.body


def test_documented_response_shapes_hold(server):
    """The response models in the OpenAPI schema describe what the server sends, field for field."""
    base = {"model": MODEL, "messages": MSGS, "max_tokens": 4}
    for extra in ({}, {"logprobs": True, "top_logprobs": 2, "n": 2},
                  {"tools": [{"type": "function", "function": WEATHER_FN}], "tool_choice": "required", "max_tokens": 100}):
        r = _post(server, "/v1/chat/completions", {**base, **extra})
        assert r.status_code == 200, r.text
        P.ChatCompletion.model_validate(r.json())
    for extra in ({}, {"logprobs": 2}, {"echo": True, "n": 2}):
        r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 3, **extra})
        assert r.status_code == 200, r.text
        P.Completion.model_validate(r.json())
    P.ModelList.model_validate(httpx.get(server.url + "/v1/models").json())
