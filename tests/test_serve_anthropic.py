"""The Anthropic Messages API of `glm4 serve` (POST /v1/messages, /v1/messages/count_tokens) on a real uvicorn
(127.0.0.1, background thread), driven by the official `anthropic` SDK. It is an adapter over the chat path of
/v1/chat/completions, so the OpenAI route of the same server is the oracle: the same conversation gives the same
prompt (token counts) and, at temperature 0, the same reply."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import anthropic
import httpx
import jsonschema
import pytest
import torch
from test_serve_util import MAX_POS, ServerThread, engine_idle, fuzz_openapi, make_checkpoint

torch.set_num_threads(1)

KEY = "sk-anthropic-test"
MODEL = "tiny-glm4"
MOE = "tiny-moe"
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                             "unit": {"enum": ["c", "f"]}},
                            "required": ["city", "unit"], "additionalProperties": False}}
CLOCK = {"name": "get_time", "description": "Current time in a zone",
         "input_schema": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet", "pst"]},
                                                           "hour24": {"type": "boolean"}},
                          "required": ["zone"], "additionalProperties": False}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                  "parameters": t["input_schema"]}} for t in TOOLS]
USER = [{"role": "user", "content": "What's the weather in Paris? 巴黎天气如何？"}]
T0 = {"temperature": 0.0}  # (this SDK version has no temperature argument: it goes in the body as extra_body)
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error"}


def _serve(folder: Path, name: str, **kw) -> ServerThread:
    from glm4.serve.app import build_state, create_app

    st = build_state(str(folder), model_name=name, **kw)
    srv = ServerThread(create_app(st)).start()
    srv.state = st
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _serve(make_checkpoint(tmp_path_factory.mktemp("anthropic") / "tiny"), MODEL, api_key=KEY, max_pending=16,
                 kv_cache_tokens=8192, max_num_seqs=16)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    """A glm4_moe checkpoint with GLM-4.7's own template: with thinking on, the prompt opens `<think>`, so even a
    random model's reply starts as thinking (ended by the budget)."""
    folder = make_checkpoint(tmp_path_factory.mktemp("anthropic") / "moe47", seed=2, model_type="glm4_moe")
    shutil.copy(TEMPLATES / "GLM-4.7.jinja", folder / "chat_template.jinja")
    srv = _serve(folder, MOE, kv_cache_tokens=8192)
    assert srv.state.chat.fmt.name == "glm47"
    yield srv
    srv.stop()


def _openai(server, body: dict) -> dict:
    """The same request through /v1/chat/completions (the oracle)."""
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": server.state.model_name, **body},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _text(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def _error(r: httpx.Response) -> dict:
    """Anthropic's error body, checked exactly."""
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    assert body["error"]["type"] == ERROR_TYPES[r.status_code], (r.status_code, body)
    return body["error"]


def _sse(server, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """(event name, data) of a streamed /v1/messages response, read raw."""
    events, name = [], None
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60,
                      headers=headers or {"x-api-key": KEY, "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
    return events


def _check_sequence(events: list[tuple[str, dict]]) -> list[dict]:
    """Anthropic's event grammar: message_start ping (block_start delta* block_stop)* message_delta message_stop,
    every event named after its type, blocks numbered 0.. in order, deltas of the block's kind (a thinking block's
    signature last). Returns the content the events fold to."""
    assert all(name == data["type"] for name, data in events)
    names = [n for n, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"], names
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    delta_kinds = {"text": {"text_delta"}, "tool_use": {"input_json_delta"},
                   "thinking": {"thinking_delta", "signature_delta"}}
    blocks, args, open_, last_delta = [], {}, None, None
    for name, d in events[2:-2]:
        if name == "content_block_start":
            assert open_ is None and d["index"] == len(blocks)
            blocks.append(dict(d["content_block"]))
            open_, last_delta = d["index"], None
        elif name == "content_block_delta":
            assert d["index"] == open_ and d["delta"]["type"] in delta_kinds[blocks[open_]["type"]]
            assert last_delta != "signature_delta"  # the signature closes a thinking block
            last_delta, delta, block = d["delta"]["type"], d["delta"], blocks[open_]
            if last_delta == "text_delta":
                block["text"] += delta["text"]
            elif last_delta == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif last_delta == "signature_delta":
                block["signature"] = delta["signature"]
            else:
                args[open_] = args.get(open_, "") + delta["partial_json"]
        else:
            assert name == "content_block_stop" and d["index"] == open_, (name, d)
            if blocks[open_]["type"] == "thinking":
                assert last_delta == "signature_delta"
            open_ = None
    assert open_ is None
    for k, text in args.items():
        blocks[k]["input"] = json.loads(text)
    return blocks


def _without_ids(blocks: list[dict]) -> list[dict]:
    """Content blocks with the tool_use ids left out (each reply draws new ones)."""
    return [{k: v for k, v in b.items() if k != "id" or b["type"] != "tool_use"} for b in blocks]


# ------------------------------------------------------------------------------------------ basics


def test_message_and_system_match_chat_completions(client, server):
    r = client.messages.create(model=MODEL, max_tokens=12, system="You are terse.", messages=USER, extra_body=T0)
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL and r.id.startswith("msg_")
    assert all(b.type == "text" for b in r.content) and r.stop_sequence is None
    o = _openai(server, {"messages": [{"role": "system", "content": "You are terse."}, *USER], "max_tokens": 12,
                         "temperature": 0})
    assert r.usage.input_tokens == o["usage"]["prompt_tokens"]
    assert r.usage.output_tokens == o["usage"]["completion_tokens"] > 0
    assert _text(r) == (o["choices"][0]["message"]["content"] or "")
    assert r.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[o["choices"][0]["finish_reason"]]
    # count_tokens is the prompt of the same request; system as text blocks is the same system prompt
    blocks = [{"type": "text", "text": "You are "},
              {"type": "text", "text": "terse.", "cache_control": {"type": "ephemeral"}}]
    assert client.messages.count_tokens(model=MODEL, system=blocks, messages=USER).input_tokens == r.usage.input_tokens
    assert client.messages.count_tokens(model=MODEL, messages=USER).input_tokens < r.usage.input_tokens
    # consecutive user turns are one turn; `metadata`, top_p / top_k and the version header are accepted
    split = [{"role": "user", "content": "What's the weather in Paris? "},
             {"role": "user", "content": "巴黎天气如何？"}]
    r2 = client.messages.create(model=MODEL, max_tokens=3, messages=split, metadata={"user_id": "u1"},
                                extra_body={"top_p": 0.9, "top_k": 5})
    assert r2.usage.input_tokens == client.messages.count_tokens(model=MODEL, messages=USER).input_tokens


def test_stop_sequences(client):
    full = _text(client.messages.create(model=MODEL, max_tokens=24, messages=USER, extra_body=T0))
    pieces = ((k, full[k:k + 3]) for k in range(2, len(full) - 3))
    k = next((k for k, p in pieces if full.find(p) == k and p.strip() == p), None)
    assert k is not None, full  # a 3-character piece that first occurs at k
    stop = full[k:k + 3]
    r = client.messages.create(model=MODEL, max_tokens=24, messages=USER, stop_sequences=[stop, "never-here"],
                               extra_body=T0)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert full.startswith(_text(r)) and stop not in _text(r)


# ------------------------------------------------------------------------------------------ tools


def test_tool_use_round_trip_renders_as_chat_completions(client, server):
    """tool_use / tool_result turns are the OpenAI tool_calls / tool messages of the same conversation."""
    args = {"city": "Paris", "unit": "c"}
    convo = [*USER,
             {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                               {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                                "input": args}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 C, sunny"},
                                          {"type": "text", "text": "And in Rome?"}]}]
    oa = [*USER,
          {"role": "assistant", "content": "Let me check.", "tool_calls": [
              {"id": "toolu_01", "type": "function",
               "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
          {"role": "tool", "tool_call_id": "toolu_01", "content": "18 C, sunny"},
          {"role": "user", "content": "And in Rome?"}]
    r = client.messages.create(model=MODEL, max_tokens=10, messages=convo, tools=TOOLS, extra_body=T0)
    o = _openai(server, {"messages": oa, "tools": OPENAI_TOOLS, "max_tokens": 10, "temperature": 0})
    assert r.usage.input_tokens == o["usage"]["prompt_tokens"]
    assert _text(r) == (o["choices"][0]["message"]["content"] or "")
    # a failed tool: content as text blocks, is_error -> "Error: ..." in the tool message
    failed = copy.deepcopy(convo)
    failed[2]["content"][0] = {"type": "tool_result", "tool_use_id": "toolu_01", "is_error": True,
                               "content": [{"type": "text", "text": "city "}, {"type": "text", "text": "unknown"}]}
    oa[2]["content"] = "Error: city unknown"
    n = client.messages.count_tokens(model=MODEL, messages=failed, tools=TOOLS).input_tokens
    assert n == _openai(server, {"messages": oa, "tools": OPENAI_TOOLS, "max_tokens": 1})["usage"]["prompt_tokens"]


def test_tool_choice_any_and_tool_force_valid_calls(client):
    for _ in range(2):
        r = client.messages.create(model=MODEL, max_tokens=120, messages=USER, tools=TOOLS,
                                   tool_choice={"type": "any"}, extra_body={"temperature": 1.0})
        uses = [b for b in r.content if b.type == "tool_use"]
        assert r.stop_reason == "tool_use" and uses
        for u in uses:
            assert u.id and u.name in SCHEMAS
            jsonschema.validate(u.input, SCHEMAS[u.name])
    r = client.messages.create(model=MODEL, max_tokens=120, messages=USER, tools=TOOLS,
                               tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True})
    uses = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_time"
    jsonschema.validate(uses[0].input, SCHEMAS["get_time"])
    r = client.messages.create(model=MODEL, max_tokens=20, messages=USER, tools=TOOLS, tool_choice={"type": "none"})
    assert r.stop_reason != "tool_use" and all(b.type == "text" for b in r.content)
    offered = client.messages.count_tokens(model=MODEL, messages=USER, tools=TOOLS).input_tokens
    assert r.usage.input_tokens < offered  # "none": the tools are not offered


# ------------------------------------------------------------------------------------------ streaming


def test_stream_event_sequence_and_sdk_accumulation(client, server):
    body = {"model": MODEL, "max_tokens": 120, "messages": USER, "tools": TOOLS, "tool_choice": {"type": "any"},
            "temperature": 0.0, "stream": True}
    events = _sse(server, body)
    blocks = _check_sequence(events)
    whole = client.messages.create(model=MODEL, max_tokens=120, messages=USER, tools=TOOLS,
                                   tool_choice={"type": "any"}, extra_body=T0)
    assert _without_ids([b.model_dump(exclude_none=True) for b in whole.content]) == _without_ids(blocks)
    end = events[-2][1]
    assert end["delta"] == {"stop_reason": "tool_use", "stop_sequence": None} == {
        "stop_reason": whole.stop_reason, "stop_sequence": whole.stop_sequence}
    assert end["usage"]["output_tokens"] == whole.usage.output_tokens
    assert events[0][1]["message"]["usage"]["input_tokens"] == whole.usage.input_tokens
    assert any(d["delta"]["type"] == "input_json_delta" for n, d in events if n == "content_block_delta")
    # the SDK's stream helper folds the events into the same message as the non-streamed one
    for kw in ({"tools": TOOLS, "tool_choice": {"type": "any"}}, {"system": "Be brief."}):
        with client.messages.stream(model=MODEL, max_tokens=40, messages=USER, extra_body=T0, **kw) as s:
            kinds = [ev.type for ev in s]
            final = s.get_final_message()
        whole = client.messages.create(model=MODEL, max_tokens=40, messages=USER, extra_body=T0, **kw)
        assert "message_start" in kinds and "message_stop" in kinds
        keep = {"stop_reason", "stop_sequence", "usage", "model", "role", "type"}
        assert final.model_dump(include=keep, exclude_none=True) == whole.model_dump(include=keep, exclude_none=True)
        assert _without_ids(final.model_dump(exclude_none=True)["content"]) == _without_ids(
            whole.model_dump(exclude_none=True)["content"])


# ------------------------------------------------------------------------------------------ thinking


def _signature(thinking: str) -> str:
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def test_thinking_blocks(thinking_server):
    c = anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0, timeout=60)
    on = {"type": "enabled", "budget_tokens": 8}
    r = c.messages.create(model=MOE, max_tokens=30, messages=USER, thinking=on, extra_body=T0)
    think = r.content[0]
    assert think.type == "thinking" and think.thinking and think.signature == _signature(think.thinking)
    assert all(b.type != "thinking" for b in r.content[1:])
    # budget_tokens is the thinking budget: greedy thinking with twice the budget goes on from the same start
    longer = c.messages.create(model=MOE, max_tokens=40, messages=USER, extra_body=T0,
                               thinking={"type": "enabled", "budget_tokens": 16}).content[0]
    assert len(longer.thinking) > len(think.thinking) and longer.thinking[:8] == think.thinking[:8]
    o = _openai(thinking_server, {"messages": USER, "max_tokens": 30, "temperature": 0, "thinking_budget": 8,
                                  "enable_thinking": True})
    assert think.thinking == o["choices"][0]["message"]["reasoning_content"]
    assert _text(r) == (o["choices"][0]["message"]["content"] or "")
    # streamed: thinking_delta events, then one signature_delta; the SDK folds them into the same message
    events = _sse(thinking_server, {"model": MOE, "max_tokens": 30, "messages": USER, "thinking": on,
                                    "temperature": 0.0, "stream": True})
    assert _check_sequence(events)[0] == {"type": "thinking", "thinking": think.thinking, "signature": think.signature}
    with c.messages.stream(model=MOE, max_tokens=30, messages=USER, thinking=on, extra_body=T0) as s:
        final = s.get_final_message()
    keep = {"content", "stop_reason", "usage"}
    assert final.model_dump(include=keep, exclude_none=True) == r.model_dump(include=keep, exclude_none=True)
    # display "omitted": the block is empty, the signature still given
    hidden = c.messages.create(model=MOE, max_tokens=30, messages=USER, extra_body=T0,
                               thinking={**on, "display": "omitted"})
    assert hidden.content[0].thinking == "" and hidden.content[0].signature == think.signature
    # disabled: no thinking; the reply is the chat route's with enable_thinking false
    off = c.messages.create(model=MOE, max_tokens=12, messages=USER, thinking={"type": "disabled"}, extra_body=T0)
    assert off.content and all(b.type == "text" for b in off.content)
    o = _openai(thinking_server, {"messages": USER, "max_tokens": 12, "enable_thinking": False, "temperature": 0})
    assert _text(off) == o["choices"][0]["message"]["content"] and "reasoning_content" not in o["choices"][0]["message"]
    assert off.usage.input_tokens == o["usage"]["prompt_tokens"]


def test_thinking_prompt_side_on_glm45(tmp_path):
    """A plain glm4_moe checkpoint renders GLM-4.5: thinking on / off / adaptive are the chat route's switches,
    and an assistant turn's thinking block is its reasoning_content in the prompt."""
    srv = _serve(make_checkpoint(tmp_path / "moe", seed=2, model_type="glm4_moe"), MOE, kv_cache_tokens=4096)
    try:
        assert srv.state.chat.fmt.name == "glm45"
        c = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)

        def count(**kw) -> int:
            return c.messages.count_tokens(model=MOE, **kw).input_tokens

        def chat_count(**kw) -> int:
            return _openai(srv, {"max_tokens": 1, **kw})["usage"]["prompt_tokens"]

        assert count(messages=USER, thinking={"type": "disabled"}) == chat_count(messages=USER, enable_thinking=False)
        assert count(messages=USER, thinking={"type": "adaptive"}) == chat_count(messages=USER, enable_thinking=True)
        assert count(messages=USER, thinking={"type": "disabled"}) != count(messages=USER)
        args = {"zone": "utc"}
        convo = [*USER, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "The user wants the time first.", "signature": "x"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "tool_use", "id": "toolu_9", "name": "get_time", "input": args}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "12:00"}]}]
        oa = [*USER, {"role": "assistant", "content": None, "reasoning_content": "The user wants the time first.",
                      "tool_calls": [{"id": "toolu_9", "type": "function",
                                      "function": {"name": "get_time", "arguments": json.dumps(args)}}]},
              {"role": "tool", "tool_call_id": "toolu_9", "content": "12:00"}]
        with_thinking = count(messages=convo, tools=TOOLS)
        # (the OpenAI route takes no reasoning_content on input messages: the planner itself is the oracle here)
        plan = srv.state.chat.plan(oa, tools=OPENAI_TOOLS)
        assert with_thinking == len(plan.prompt_ids)
        assert "The user wants the time first." in srv.state.tokenizer.decode(plan.prompt_ids)
        del convo[1]["content"][0]
        assert count(messages=convo, tools=TOOLS) < with_thinking  # the thinking was rendered
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ auth and errors


def test_api_key_as_x_api_key_and_bearer(server, client):
    # the fixture's client sends x-api-key (as every Anthropic client does); Authorization: Bearer works too
    assert client.messages.count_tokens(model=MODEL, messages=USER).input_tokens > 0
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0, timeout=60)
    assert bearer.messages.count_tokens(model=MODEL, messages=USER).input_tokens > 0
    for bad in (anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0),
                anthropic.Anthropic(base_url=server.url, auth_token="wrong", max_retries=0)):
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model=MODEL, max_tokens=2, messages=USER)
        assert e.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": USER})
    assert r.status_code == 401 and "x-api-key" in _error(r)["message"]
    # the OpenAI routes keep OpenAI's error shape, and take x-api-key too
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
BAD_BODIES = [
    {},
    {"model": MODEL, "messages": USER},  # max_tokens is required
    {"model": MODEL, "max_tokens": 0, "messages": USER},
    {"model": MODEL, "max_tokens": 4, "messages": []},
    {"model": MODEL, "max_tokens": 4, "messages": "hi"},
    {"model": MODEL, "max_tokens": 4, "messages": [{"role": "tool", "content": "x"}]},
    {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": 5}]},
    {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
    {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [IMAGE]}]},
    {"model": MODEL, "max_tokens": 4, "messages": [*USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "get_time", "input": {}}]}, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [IMAGE]}]}], "tools": TOOLS},
    {"model": MODEL, "max_tokens": 4, "messages": [*USER, {"role": "assistant", "content": "ok"}, {
        "role": "user", "content": [{"type": "tool_result", "tool_use_id": "t_unknown", "content": "x"}]}]},
    {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t1", "name": "get_time", "input": {}}]}]},
    {"model": MODEL, "max_tokens": 4, "messages": [*USER, {"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": "x"}]}, *USER]},
    {"model": MODEL, "max_tokens": 4, "messages": [*USER, {"role": "assistant", "content": "The answer is"}]},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "tools": [{"name": "a b", "input_schema": {"type": "object"}}]},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "tools": [{"name": "f"}]},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "ws"}]},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "tools": [WEATHER, WEATHER]},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "tools": [{"name": "f", "input_schema": {"type": 5}}]},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "no"}},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "tool_choice": {"type": "any"}},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "tools": TOOLS, "tool_choice": {"type": "sometimes"}},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "tools": TOOLS, "tool_choice": "auto"},
    {"model": MODEL, "max_tokens": 8, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 8}},
    {"model": MODEL, "max_tokens": 8, "messages": USER, "thinking": {"type": "enabled"}},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "temperature": 1.5},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "top_k": -1},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "stop_sequences": [""]},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "stop_sequences": "\n"},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "frequency_penalty": 1.0},  # not an Anthropic field
    {"model": MODEL, "max_tokens": 4, "messages": USER, "stream": [1]},
    {"model": MODEL, "max_tokens": 4, "messages": USER, "output_config": {"format": {"type": "json_schema"}}},
    {"model": "nope", "max_tokens": 4, "messages": USER},
    {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "word " * (MAX_POS + 50)}]},
    {"model": MODEL, "max_tokens": MAX_POS, "messages": USER},
]


def test_malformed_requests_get_anthropic_errors(server):
    h = {"x-api-key": KEY}
    cases = [("POST", "/v1/messages", {"json": b}) for b in BAD_BODIES]
    cases += [("POST", "/v1/messages/count_tokens", {"json": b}) for b in (
        {"model": MODEL, "messages": USER, "max_tokens": 4}, {"model": MODEL}, {"model": "nope", "messages": USER},
        {"model": MODEL, "messages": [{"role": "user", "content": [IMAGE]}]})]
    cases += [
        ("POST", "/v1/messages", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/messages", {"content": b"[1, 2]", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/messages", {"content": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}),
        ("GET", "/v1/messages", {}),
        ("POST", "/v1/messages/batches", {"json": {}}),
    ]
    statuses = []
    for method, path, kw in cases:
        headers = {**h, **kw.pop("headers", {})}
        r = httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)
        assert 400 <= r.status_code < 500, (path, kw, r.status_code, r.text)
        _error(r)
        statuses.append(r.status_code)
    assert {400, 404, 405} <= set(statuses)
    # the SDK raises its typed errors, with the message
    c = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="this model does not take images"):
        c.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, IMAGE]}])
    with pytest.raises(anthropic.NotFoundError):
        c.messages.create(model="claude-x", max_tokens=4, messages=USER)


# ------------------------------------------------------------------------------------------ disconnects


def test_queue_full_is_a_rate_limit_error(server):
    st = server.state
    old = st.engine.max_pending
    st.engine.max_pending = 1
    try:
        body = {"model": MODEL, "messages": USER, "max_tokens": 300, "temperature": 0.0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # message_start: the request is admitted
            r2 = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY}, timeout=30,
                            json={"model": MODEL, "messages": USER, "max_tokens": 2})
            assert r2.status_code == 429 and r2.headers["retry-after"] == "1"
            _error(r2)
    finally:
        st.engine.max_pending = old
    assert engine_idle(st)


def test_dropped_requests_free_kv_blocks(server, monkeypatch):
    st = server.state
    assert engine_idle(st)
    step = st.engine.engine.step  # paced at >= 10 ms a step, so the requests still run when their clients leave
    monkeypatch.setattr(st.engine.engine, "step", lambda: (time.sleep(0.01), step())[1])
    aborted = st.metrics.counter("requests_aborted_total")
    body = {"model": MODEL, "messages": USER, "max_tokens": 400, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(12):
            next(lines)
        bm = st.engine.engine.block_manager
        assert bm.num_free_blocks < bm.num_blocks  # the stream holds KV blocks now
    assert engine_idle(st)  # the client closed the stream: the request is aborted, its blocks freed
    assert st.metrics.counter("requests_aborted_total") == aborted + 1
    body = json.dumps({"model": MODEL, "messages": USER, "max_tokens": MAX_POS - 200, "temperature": 0.0})
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + body.encode())
        deadline = time.monotonic() + 20
        while st.engine.num_pending == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert st.engine.num_pending == 1
        time.sleep(0.1)
    assert engine_idle(st)
    assert st.metrics.counter("requests_aborted_total") == aborted + 2


# ------------------------------------------------------------------------------------------ fuzzing


def test_schemathesis_finds_no_5xx_on_messages(tmp_path):
    def served_model(body, n):
        if "model" in body and n % 4:
            body["model"] = MODEL  # mostly the served model and a budget that fits the 64-token
            if isinstance(body.get("max_tokens"), int):  # context, so that planning and generation run
                body["max_tokens"] = 1 + body["max_tokens"] % 8

    def anthropic_shape(r):
        if r.status_code < 400:
            return None
        body = r.json()
        if body.get("type") != "error" or set(body.get("error") or {}) != {"type", "message"}:
            return "not Anthropic's error shape"
        return None

    srv = _serve(make_checkpoint(tmp_path / "fuzz"), MODEL, max_pending=16, kv_cache_tokens=2048, max_model_len=64)
    try:
        failures, calls, ok = fuzz_openapi(srv.url, keep=lambda path: path.startswith("/v1/messages"),
                                           prepare=served_model, check=anthropic_shape)
        assert {path for _, path in calls} == {"/v1/messages", "/v1/messages/count_tokens"}
        assert not failures, failures[:3]
        assert min(calls.values()) >= 25 and ok[True] >= 5
    finally:
        srv.stop()
