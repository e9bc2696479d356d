"""The OpenAI Responses API of `glm4 serve` (POST /v1/responses, GET / DELETE /v1/responses/{id}) on a real uvicorn
(127.0.0.1), a tiny random GLM-4 checkpoint, the official `openai` client and the OpenAI Agents SDK's default
(Responses) model. At temperature 0 a response says exactly what /v1/chat/completions says for the same
conversation: the two are one chat path."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel, Field, TypeAdapter
from test_serve_util import MAX_POS, ServerThread, engine_idle, fuzz_openapi, make_checkpoint, openai_error

from glm4.serve import responses_protocol as RP

torch.set_num_threads(1)

KEY = "sk-test-key"
MODEL = "tiny-glm4"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False}, "strict": True}
CLOCK = {"type": "function", "name": "get_time", "description": "Current time in a zone",
         "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet", "pst"]}},
                        "required": ["zone"], "additionalProperties": False}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
QUESTION = "What's the weather in Paris? 巴黎天气如何？"
EVENTS = TypeAdapter(ResponseStreamEvent)
FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"


def _serve(folder: Path, name: str, api_key: str | None = None, **kw) -> ServerThread:
    from glm4.serve.app import build_state, create_app

    st = build_state(str(folder), api_key=api_key, model_name=name, max_pending=32, kv_cache_tokens=8192)
    srv = ServerThread(create_app(st, **kw)).start()
    srv.state = st
    return srv


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("responses") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    srv = _serve(ckpt, MODEL, api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)




def _chat(client, messages, **kw):
    """The same conversation through /v1/chat/completions: (message, usage)."""
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)
    return r.choices[0], r.usage


def _calls(r) -> list:
    return [x for x in r.output if x.type == "function_call"]


def _check_call(call, allowed=None):
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    assert call.name in (allowed or SCHEMAS)
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def _documented(server, r) -> None:
    """The body validates against the server's documented response model and the openai client's own type."""
    RP.Response.model_validate(r.model_dump(exclude_unset=True))
    openai.types.responses.Response.model_validate(r.model_dump(exclude_unset=True))


# ------------------------------------------------------------------------------------------ one turn


def test_string_input_says_what_chat_says(client, server):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    choice, usage = _chat(client, [{"role": "user", "content": QUESTION}], max_tokens=12)
    assert r.output_text == (choice.message.content or "")
    assert r.usage.input_tokens == usage.prompt_tokens and r.usage.output_tokens == usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if choice.finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.completed_at is None
    else:
        assert r.status == "completed" and r.incomplete_details is None and r.completed_at >= r.created_at
    messages = [x for x in r.output if x.type == "message"]
    assert len(messages) == (1 if r.output_text else 0)
    if messages:
        m = messages[0]
        assert m.role == "assistant" and m.id.startswith("msg_") and m.content[0].type == "output_text"
        assert m.status == r.status
    _documented(server, r)


def test_instructions_are_a_system_message(client):
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": QUESTION}],
                                instructions="You are terse.", max_output_tokens=10, temperature=0)
    choice, usage = _chat(client, [{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": QUESTION}], max_tokens=10)
    assert r.instructions == "You are terse." and r.usage.input_tokens == usage.prompt_tokens
    assert r.output_text == (choice.message.content or "")
    # a developer message given as typed input_text parts is the same prompt
    typed = client.responses.create(model=MODEL, max_output_tokens=10, temperature=0, input=[
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are terse."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    assert typed.usage.input_tokens == r.usage.input_tokens and typed.output_text == r.output_text


def test_sampling_settings_and_metadata_are_echoed(client):
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=3, temperature=0.5, top_p=0.9,
                                metadata={"run": "42"}, store=False, extra_body={"seed": 7, "top_k": 5})
    assert (r.temperature, r.top_p, r.max_output_tokens, r.metadata, r.store) == (0.5, 0.9, 3, {"run": "42"}, False)
    again = client.responses.create(model=MODEL, input="hi", max_output_tokens=3, temperature=0.5, top_p=0.9,
                                    extra_body={"seed": 7, "top_k": 5})
    assert again.output_text == r.output_text and r.usage.output_tokens <= 3


# ------------------------------------------------------------------------------------------ state


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=MODEL, input="Hi there", instructions="Answer in French.",
                                    max_output_tokens=8, temperature=0)
    second = client.responses.create(model=MODEL, input="And tomorrow?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    assert second.previous_response_id == first.id
    # instructions are not carried over; the first answer is
    choice, usage = _chat(client, [{"role": "user", "content": "Hi there"},
                                   {"role": "assistant", "content": first.output_text},
                                   {"role": "user", "content": "And tomorrow?"}], max_tokens=8)
    assert second.usage.input_tokens == usage.prompt_tokens and second.output_text == (choice.message.content or "")
    # the same conversation sent whole (stateless): the first response's output items passed back as input
    stateless = client.responses.create(model=MODEL, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "Hi there"}, *[x.model_dump(exclude_none=True) for x in first.output],
        {"role": "user", "content": "And tomorrow?"}])
    assert stateless.usage.input_tokens == second.usage.input_tokens
    assert stateless.output_text == second.output_text


def test_retrieve_and_delete(client, server):
    r = client.responses.create(model=MODEL, input="Remember me", max_output_tokens=4, metadata={"k": "v"})
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    assert client.responses.delete(r.id) is None
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert r.id in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id=r.id, max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_not_found"
    unstored = client.responses.create(model=MODEL, input="Forget me", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    for path in (f"/v1/responses/{r.id}", "/v1/responses/resp_nope"):
        for method in ("GET", "DELETE"):
            res = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {KEY}"})
            assert res.status_code == 404
            openai_error(res)
    assert httpx.get(server.url + "/v1/responses/resp_nope").status_code == 401  # the key guards it too


def test_store_is_a_bounded_lru():
    from glm4.serve.responses import ResponseStore

    store = ResponseStore(2)
    for name in ("a", "b"):
        store.put({"id": name}, [])
    assert store.get("a") is not None  # a is now the most recent
    store.put({"id": "c"}, [])
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None and len(store) == 2
    assert store.delete("a") and not store.delete("a")
    off = ResponseStore(0)
    off.put({"id": "x"}, [])
    assert off.get("x") is None


def test_store_size_flag(ckpt):
    srv = _serve(ckpt, MODEL, responses_store_size=1)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        a = c.responses.create(model=MODEL, input="one", max_output_tokens=2)
        b = c.responses.create(model=MODEL, input="two", max_output_tokens=2)
        assert c.responses.retrieve(b.id).id == b.id
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(a.id)
    finally:
        srv.stop()
    from glm4.serve.serve_cli import main

    with pytest.raises(SystemExit):
        main(["--responses-store-size", "many"])


# ------------------------------------------------------------------------------------------ tools


@pytest.mark.parametrize("seed", [0, 1])
def test_required_function_call_then_its_output(client, seed):
    r = client.responses.create(model=MODEL, input=QUESTION, tools=TOOLS, tool_choice="required",
                                max_output_tokens=120, temperature=1.0, extra_body={"seed": seed})
    assert r.status == "completed" and _calls(r)
    for call in _calls(r):
        _check_call(call)
    assert r.tools[0].name == "get_weather" and r.tool_choice == "required"
    # the function's result continues the conversation, statefully ...
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "18 C, sunny"} for c in _calls(r)]
    nxt = client.responses.create(model=MODEL, previous_response_id=r.id, input=outputs, tools=TOOLS,
                                  max_output_tokens=10, temperature=0)
    assert nxt.status in ("completed", "incomplete")
    # ... exactly as the chat API reads the same conversation
    calls = [{"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in _calls(r)]
    msgs = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": r.output_text or None,
                                                    "tool_calls": calls},
            *[{"role": "tool", "tool_call_id": c.call_id, "content": "18 C, sunny"} for c in _calls(r)]]
    choice, usage = _chat(client, msgs, tools=CHAT_TOOLS, max_tokens=10)
    assert nxt.usage.input_tokens == usage.prompt_tokens
    assert nxt.output_text == (choice.message.content or "")
    # a call cut off by max_output_tokens stays an `incomplete` item (the chat API withdraws it)
    made = [(c.name, c.arguments) for c in _calls(nxt) if c.status == "completed"]
    assert made == [(t.function.name, t.function.arguments) for t in choice.message.tool_calls or []]
    assert all(c.status == "incomplete" and nxt.status == "incomplete" for c in _calls(nxt) if (c.name, c.arguments)
               not in made)
    # ... and statelessly, the items passed back by hand
    whole = client.responses.create(model=MODEL, tools=TOOLS, max_output_tokens=10, temperature=0, input=[
        {"role": "user", "content": QUESTION}, *[x.model_dump(exclude_none=True) for x in r.output], *outputs])
    assert whole.usage.input_tokens == nxt.usage.input_tokens and whole.output_text == nxt.output_text


def test_named_tool_choice_single_call(client):
    for seed in range(2):
        r = client.responses.create(model=MODEL, input=QUESTION, tools=TOOLS, parallel_tool_calls=False,
                                    tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=100,
                                    extra_body={"seed": seed})
        assert len(_calls(r)) == 1 and r.parallel_tool_calls is False
        _check_call(_calls(r)[0], allowed={"get_time"})
        assert r.tool_choice.type == "function" and r.tool_choice.name == "get_time"


def test_tool_choice_none_offers_no_tools(client):
    with_tools = client.responses.create(model=MODEL, input=QUESTION, tools=TOOLS, max_output_tokens=1)
    none = client.responses.create(model=MODEL, input=QUESTION, tools=TOOLS, tool_choice="none", max_output_tokens=4)
    assert not _calls(none) and none.usage.input_tokens < with_tools.usage.input_tokens


# ------------------------------------------------------------------------------------------ structured output


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=150)


def test_json_schema_format(client):
    for seed in range(2):
        r = client.responses.parse(model=MODEL, input=QUESTION, text_format=Person, max_output_tokens=80,
                                   extra_body={"seed": seed})
        assert r.status == "completed" and isinstance(r.output_parsed, Person)
        jsonschema.validate(json.loads(r.output_text), Person.model_json_schema())
        assert r.text.format.type == "json_schema"
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=30,
                                text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(r.output_text), dict)


# ------------------------------------------------------------------------------------------ streaming


def _check_sequence(events: list) -> None:
    """Numbering, framing and nesting of a Responses event stream, as the client's stream state checks it."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].type in ("response.completed", "response.incomplete")
    open_items: dict[int, str] = {}
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert e.output_index == len(open_items) and not any(v == "open" for v in open_items.values())
            open_items[e.output_index] = "open"
        elif e.type == "response.output_item.done":
            assert open_items[e.output_index] == "open"
            open_items[e.output_index] = "done"
        else:
            assert open_items[e.output_index] == "open", e.type
    assert all(v == "done" for v in open_items.values())
    assert len(events[-1].response.output) == len(open_items)


def _same(a, b) -> None:
    """Two responses with the same output and usage (ids and times aside)."""
    def item(x) -> dict:  # the client's parsed response adds parsed_arguments / parsed
        d = {k: v for k, v in x.model_dump().items() if k not in ("id", "call_id", "parsed_arguments")}
        if "content" in d and d["content"] is not None:
            d["content"] = [{k: v for k, v in part.items() if k != "parsed"} for part in d["content"]]
        return d

    def shape(r):
        return r.status, [item(x) for x in r.output], r.usage.model_dump(), r.output_text

    assert shape(a) == shape(b)


def test_stream_events_match_the_response(client):
    kw = dict(model=MODEL, input=QUESTION, max_output_tokens=16, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    for e in events:  # every event is one of the client's own types, validated strictly
        EVENTS.validate_python(e.model_dump(exclude_unset=True))
    _check_sequence(events)
    _same(events[-1].response, whole)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    # a streamed response is stored like any other
    assert client.responses.retrieve(events[-1].response.id).output_text == whole.output_text


def test_stream_helper_tool_call_and_json(client):
    kw = dict(model=MODEL, input=QUESTION, tools=TOOLS, tool_choice="required", max_output_tokens=120,
              temperature=0)
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    _same(final, whole)
    args = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            args[e.item_id] = args.get(e.item_id, "") + e.delta
        if e.type == "response.function_call_arguments.done":
            assert args[e.item_id] == e.arguments
    assert sorted(args.values()) == sorted(c.arguments for c in _calls(final))
    for call in _calls(final):
        _check_call(call)
    with client.responses.stream(model=MODEL, input=QUESTION, text_format=Person, max_output_tokens=80,
                                 temperature=0) as stream:
        parsed = stream.get_final_response()
    assert isinstance(parsed.output_parsed, Person)


def test_logprobs_on_output_text(client, server):
    kw = dict(model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0, top_logprobs=2,
              include=["message.output_text.logprobs"])
    r = client.responses.create(**kw)
    part = r.output[0].content[0]
    specials = server.state.tokenizer.special_tokens
    text = b"".join(bytes(t.bytes) for t in part.logprobs if t.token not in specials)
    assert part.logprobs and text.decode("utf-8", errors="replace").strip() == part.text.strip()
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in part.logprobs)
    streamed = [t for e in client.responses.create(**kw, stream=True) if e.type == "response.output_text.delta"
                for t in e.logprobs]
    assert [t.token for t in streamed] == [t.token for t in part.logprobs]


def test_disconnect_aborts_the_stream(server, monkeypatch):
    import time

    st = server.state
    step = st.engine.engine.step
    monkeypatch.setattr(st.engine.engine, "step", lambda: (time.sleep(0.01), step())[1])
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": 400, "ignore_eos": True, "stream": True}
    aborted = st.metrics.counter("requests_aborted_total")
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        for _ in range(12):
            next(lines)
        assert st.engine.num_pending == 1
    deadline = time.monotonic() + 10
    while st.engine.num_pending and time.monotonic() < deadline:
        time.sleep(0.05)
    bm = st.engine.engine.block_manager
    assert st.engine.num_pending == 0 and bm.num_free_blocks == bm.num_blocks
    assert st.metrics.counter("requests_aborted_total") == aborted + 1


# ------------------------------------------------------------------------------------------ bad input

BAD = [  # (body, the parameter the error names)
    ({"input": "x"}, "model"),
    ({"model": MODEL}, None),
    ({"model": MODEL, "input": []}, None),
    ({"model": MODEL, "input": 5}, "input"),
    ({"model": MODEL, "input": [{"role": "wizard", "content": "x"}]}, "input.0.role"),
    ({"model": MODEL, "input": [{"type": "message", "role": "user", "content": [{"type": "input_image",
                                                                                   "image_url": "http://x/y.png"}]}]},
     "input"),  # a text-only checkpoint: "this model does not take images"
    ({"model": MODEL, "input": [{"type": "message", "role": "user", "content": [{"type": "input_image",
                                                                                   "file_id": "file_1"}]}]},
     "input.0.content.0"),
    ({"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{nope"}]},
     "input"),
    ({"model": MODEL, "input": [{"type": "teleport"}]}, None),
    ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools.0.name"),
    ({"model": MODEL, "input": "x", "tools": [WEATHER, WEATHER]}, None),
    ({"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": 7}}]},
     "tools.0.parameters"),
    ({"model": MODEL, "input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"model": MODEL, "input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema"}}}, None),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"model": MODEL, "input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"model": MODEL, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": MODEL, "input": "x", "max_output_tokens": MAX_POS}, "input"),
    ({"model": MODEL, "input": "word " * (MAX_POS + 10)}, "input"),
    ({"model": MODEL, "input": "x", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "input": "x", "background": True}, None),
    ({"model": MODEL, "input": "x", "truncation": "auto"}, None),
    ({"model": MODEL, "input": "x", "conversation": "conv_1"}, "conversation"),
    ({"model": MODEL, "input": "x", "metadata": {str(i): "v" for i in range(17)}}, None),
    ({"model": MODEL, "input": "x", "stream_options": {"include_obfuscation": False}}, None),
]


def test_malformed_bodies_are_4xx_in_openais_shape(server):
    h = {"Authorization": f"Bearer {KEY}"}
    for body, param in BAD:
        r = httpx.post(server.url + "/v1/responses", json=body, headers=h, timeout=30)
        assert r.status_code == 400, (body, r.status_code, r.text)
        e = openai_error(r)
        assert e["type"] == "invalid_request_error"
        if param is not None:
            assert e["param"] == param, (body, e)
    r = httpx.post(server.url + "/v1/responses", json={"model": "gpt-4o", "input": "x"}, headers=h)
    assert r.status_code == 404 and openai_error(r)["code"] == "model_not_found"
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(server.url + "/v1/responses", content=raw, headers={**h, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500
        openai_error(r)


def test_schemathesis_finds_no_5xx_on_the_responses_routes(ckpt):
    """Fuzz POST /v1/responses and GET / DELETE /v1/responses/{id} from the OpenAPI schema (valid and invalid
    bodies) on a 64-token server: never a 5xx, and nothing left in the engine afterwards."""
    from glm4.serve.app import build_state, create_app

    def served_model(body, n):
        if n % 4:  # mostly the served model, and some input, so that generation runs
            body["model"] = MODEL
            if "previous_response_id" not in body:
                body.setdefault("input", "Hi")

    st = build_state(str(ckpt), model_name=MODEL, max_pending=16, kv_cache_tokens=2048, max_model_len=64)
    srv = ServerThread(create_app(st, drain_timeout=10)).start()
    try:
        failures, calls, ok = fuzz_openapi(srv.url, keep=lambda path: path.startswith("/v1/responses"),
                                           prepare=served_model)
        assert not failures, failures[:3]
        assert calls[("POST", "/v1/responses")] >= 50 and ok[True] >= 5
        assert {("GET", "/v1/responses/{response_id}"), ("DELETE", "/v1/responses/{response_id}")} <= set(calls)
        assert engine_idle(st)  # nothing pending, no KV block leaked
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ thinking formats


def test_reasoning_items_from_a_thinking_format(tmp_path):
    """A glm4_moe checkpoint (GLM-4.5's format): reasoning.effort reaches the template ("none" = thinking off); the
    model's thinking comes back as a `reasoning` item before its call, streamed as reasoning_text events, counted as
    reasoning tokens, and rendered as that turn's thinking when the call's output continues the conversation."""
    folder = make_checkpoint(tmp_path / "moe", seed=2, model_type="glm4_moe")
    srv = _serve(folder, "tiny-moe")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        on = c.responses.create(model="tiny-moe", input=QUESTION, max_output_tokens=1, reasoning={"effort": "high"})
        off = c.responses.create(model="tiny-moe", input=QUESTION, max_output_tokens=1, reasoning={"effort": "none"})
        assert on.usage.input_tokens != off.usage.input_tokens and on.reasoning.effort == "high"
        r = c.responses.create(model="tiny-moe", input=QUESTION, tools=TOOLS, parallel_tool_calls=False,
                               tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=150,
                               reasoning={"effort": "none"}, extra_body={"seed": 1})
        assert r.status == "completed" and [x.type for x in r.output] == ["function_call"]
        _check_call(r.output[0], allowed={"get_time"})
        # thinking on: a reasoning item, then the call
        kw = dict(model="tiny-moe", input=QUESTION, tools=TOOLS, tool_choice="required", max_output_tokens=150,
                  temperature=1.0, extra_body={"seed": 1})
        r = c.responses.create(**kw)
        assert r.status == "completed" and [x.type for x in r.output] == ["reasoning", "function_call"]
        thought = r.output[0].content[0].text
        assert thought and r.output[0].summary == [] and r.output[0].id.startswith("rs_")
        assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
        _check_call(r.output[1])
        events = list(c.responses.create(**kw, stream=True))
        _check_sequence(events)
        _same(events[-1].response, r)
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
        # the call's output continues the conversation; the turn's thinking is in the prompt, as chat renders it
        call = r.output[1]
        nxt = c.responses.create(model="tiny-moe", previous_response_id=r.id, tools=TOOLS, max_output_tokens=2,
                                 input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}])
        msgs = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": None, "reasoning_content": thought, "tool_calls": [
                    {"id": call.call_id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "12:00"}]
        planner = srv.state.chat  # (the chat API takes no reasoning_content in messages: plan them directly)
        with_thought = len(planner.plan(msgs, tools=CHAT_TOOLS).prompt_ids)
        without = len(planner.plan([{k: v for k, v in m.items() if k != "reasoning_content"} for m in msgs],
                                   tools=CHAT_TOOLS).prompt_ids)
        assert nxt.usage.input_tokens == with_thought > without
    finally:
        srv.stop()
    # GLM-4.7's template opens `<think>` in the prompt: the reply starts as thinking, cut by thinking_budget
    shutil.copy(FIXTURES / "GLM-4.7.jinja", folder / "chat_template.jinja")
    srv = _serve(folder, "tiny-47")
    try:
        assert srv.state.chat.fmt.name == "glm47"
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model="tiny-47", input=QUESTION, max_output_tokens=40, temperature=0,
                  extra_body={"thinking_budget": 8})
        r = c.responses.create(**kw)
        assert [x.type for x in r.output] == ["reasoning", "message"]
        close = srv.state.tokenizer.encode("</think>", allow_special=True)
        assert r.usage.output_tokens_details.reasoning_tokens == 8 + len(close)  # the budget, then `</think>`
        chat = c.chat.completions.create(model="tiny-47", messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=40, temperature=0, extra_body={"thinking_budget": 8})
        assert chat.choices[0].message.model_extra["reasoning_content"] == r.output[0].content[0].text
        assert (chat.choices[0].message.content or "") == r.output_text
    finally:
        srv.stop()


def test_builder_events_are_the_clients_types(server):
    """The builder over GLM-4.5's reply parser: thinking, text and a call, fed in pieces, give OpenAI's event
    sequence (each event valid as the client's own type) and the same reply the chat API's fold gives."""
    from glm4.chat import ChatFormat
    from glm4.chat.planner import ChatPlanner
    from glm4.serve.responses_output import ResponseBuilder

    planner = ChatPlanner(server.state.chat.tok, ChatFormat("glm45"), constrain=False)
    plan = planner.plan([{"role": "user", "content": QUESTION}], tools=CHAT_TOOLS)
    text = ("\n<think>Paris is in France.</think>\nLet me check.\n<tool_call>get_time\n<arg_key>zone</arg_key>\n"
            "<arg_value>utc</arg_value>\n</tool_call>")
    base = {"id": "resp_x", "object": "response", "created_at": 1, "model": MODEL, "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": TOOLS, "text": {"format": {"type": "text"}}, "reasoning": {},
            "metadata": {}, "store": True, "usage": None, "error": None, "incomplete_details": None}
    builder, parser = ResponseBuilder(base, plan.in_reasoning), planner.stream(plan)
    events = builder.start()
    for i in range(0, len(text), 5):
        events += builder.feed(parser.feed_events(text[i:i + 5]), 1)
    events += builder.feed(parser.finish_events()) + builder.finish("stop", 10, len(range(0, len(text), 5)))
    parsed = [EVENTS.validate_python(e) for e in events]
    _check_sequence(parsed)
    r = parsed[-1].response
    assert [x.type for x in r.output] == ["reasoning", "message", "function_call"]
    message = parser.message()
    assert r.output[0].content[0].text == message["reasoning_content"] == "Paris is in France."
    assert r.output_text == message["content"] and message["content"].strip() == "Let me check."
    call = message["tool_calls"][0]
    assert (r.output[2].call_id, r.output[2].name, json.loads(r.output[2].arguments)) == (
        call["id"], "get_time", {"zone": "utc"}) and r.status == "completed"
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    kinds = [e.type for e in parsed]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and "response.reasoning_text.done" in kinds


def test_reasoning_input_items_reach_the_template(tmp_path):
    """A reasoning item passed back before a call is rendered as that turn's thinking (GLM-4.5 keeps the thinking
    of the turns after the last user message)."""
    from glm4.chat import ChatFormat
    from glm4.chat.planner import ChatPlanner
    from glm4.serve.responses import items_to_messages

    folder = make_checkpoint(tmp_path / "moe", seed=2, model_type="glm4_moe")
    from glm4.tokenizer import load_tokenizer

    planner = ChatPlanner(load_tokenizer(folder), ChatFormat("glm45"), constrain=False)
    call = {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": '{"zone": "utc"}'}
    items = [{"type": "message", "role": "user", "content": "time?"},
             {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Check the clock."}]},
             call, {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}]
    msgs = items_to_messages(items)
    assert msgs[1] == {"role": "assistant", "content": None, "reasoning_content": "Check the clock.",
                       "tool_calls": [{"id": "call_1", "type": "function",
                                       "function": {"name": "get_time", "arguments": '{"zone": "utc"}'}}]}
    prompt = planner.tok.decode(planner.plan(msgs, tools=[{"type": "function", "function": CLOCK}]).prompt_ids)
    assert "<think>Check the clock.</think>" in prompt
    # text after calls starts a new assistant turn; a user message ends one
    again = items_to_messages([call, {"type": "message", "role": "assistant", "content": "Noon."}])
    assert [m.get("content") for m in again] == [None, "Noon."]


# ------------------------------------------------------------------------------------------ the Agents SDK


def test_agents_sdk_default_model_calls_a_tool(server):
    """The OpenAI Agents SDK's default model path (OpenAIResponsesModel -> /v1/responses): the agent calls the
    function tool, gets its result back in a function_call_output, and ends with a structured answer. (The tool
    is offered once: offered again, a random model under tool_choice "auto" keeps calling it until max_turns.)"""
    import agents  # openai-agents (the dev extra)
    from agents.models.openai_responses import OpenAIResponsesModel

    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool(is_enabled=lambda ctx, agent: not seen)
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        seen.append(city)
        return "18 C, sunny"

    class Answer(BaseModel):
        summary: str = Field(max_length=20)

    def agent():
        model = OpenAIResponsesModel(model=MODEL, openai_client=openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60))
        return agents.Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather],
                            model=model, output_type=Answer, model_settings=agents.ModelSettings(
                                tool_choice="required", max_tokens=120, temperature=0))

    result = agents.Runner.run_sync(agent(), "What's the weather in Paris?", max_turns=4)
    assert seen and isinstance(result.final_output, Answer)
    kinds = [i.type for i in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]

    async def streamed():  # the same run over the streamed Responses API
        run = agents.Runner.run_streamed(agent(), "What's the weather in Paris?", max_turns=4)
        events = [e async for e in run.stream_events()]
        return run, events

    seen.clear()
    run, events = asyncio.run(streamed())
    assert seen and run.final_output == result.final_output
    assert any(e.type == "raw_response_event" and e.data.type == "response.function_call_arguments.delta"
               for e in events)
