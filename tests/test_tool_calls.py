"""Tool-call parsing: batch vs stream on every split point, malformed output, schemas, GLM-4.5 typing."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm4.chat import (
    ChatFormat,
    ContentDelta,
    Notice,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallError,
    ToolCallInvalid,
    ToolCallStart,
    collect,
    openai_delta,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "天气", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                         "metric": {"type": "boolean"}, "opts": {"type": "object"},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "q": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    {"type": "python"},
]


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def make_stream_parser(family, tools=TOOLS, stream_arguments=True, id_factory=None, prompt=None):
    return ChatFormat(family).stream_parser(tools, stream_arguments, prompt=prompt, id_factory=id_factory)


def parse_text(family, text, tools=TOOLS, id_factory=None, prompt=None):
    return ChatFormat(family).parse(text, tools, prompt=prompt, id_factory=id_factory)


def batch(family, text, tools=TOOLS, prompt=None):
    return parse_text(family, text, tools, id_factory=ids(), prompt=prompt)


def stream(family, pieces, tools=TOOLS, stream_arguments=True, prompt=None):
    p = make_stream_parser(family, tools, stream_arguments=stream_arguments, id_factory=ids(), prompt=prompt)
    events = []
    for piece in pieces:
        events += p.feed(piece)
    return events + p.finish()


def same(a, b):
    return tuple(a) == tuple(b) and a.reasoning == b.reasoning and a.diagnostics == b.diagnostics


GLM4_SAMPLES = [
    'get_weather\n{"city": "北京", "days": 3}',
    '\n北京今天晴，气温 20°C。😀',
    'get_weather\n{"city": "Paris"}\nsearch\n{"q": "a \\"quoted\\" {brace}"}',
    'get_weather\n{"city": "Paris"}<|assistant|>search\n{"q": "x"}<|observation|>ignored',
    'get_weather\n{"city": ',  # truncated
    'get_weather\n{"city": tru}',  # bad JSON
    'unknown_tool\n{"a": 1}',
    'get_weather\n',  # empty arguments
    'get_weather',
    'get_weather\nnot json',
    'now\n{}',
    'get_weather\n{"city": 5, "zzz": 1}',  # schema violations
    'python\n```python\nprint("hi")\n```',
    'cogview\nA cat on the moon',
    'Hello\nworld',
    '  \n  ',
    '',
    '<|assistant|>',
    'get_weather\n[1, 2]',
]

GLM45_SAMPLES = [
    "\n<think>用户问天气</think>\n好的<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>a</arg_value>\n</tool_call>\n"
    "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>x < y </arg_value>\n</tool_call>",
    "<tool_call>get_weather<arg_key>metric</arg_key><arg_value>true</arg_value><arg_key>opts</arg_key>"
    '<arg_value>{"u": [1, 2]}</arg_value><arg_key>tags</arg_key><arg_value>["a", "b"]</arg_value>'
    "<arg_key>city</arg_key><arg_value>3</arg_value></tool_call>",
    "<tool_call>now\n</tool_call>",
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北",  # truncated
    "<tool_call>nope\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call> after",
    "<tool_call>get_weather\ngarbage<arg_key>city</arg_key></tool_call>",
    "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>many</arg_value>\n</tool_call>",
    "\n<think>\n思考 <tool_call>not a call</tool_call>\n</think>\n\nplain answer  ",
    "a < b and <b>bold</b> <tool",
    "<think>unfinished",
    "",
]


@pytest.mark.parametrize("family,samples", [("chatglm", GLM4_SAMPLES), ("glm4", GLM4_SAMPLES),
                                            ("glm4_moe", GLM45_SAMPLES)])
def test_stream_equals_batch_on_every_split(family, samples):
    for text in samples:
        whole = batch(family, text)
        for i in range(len(text) + 1):
            assert same(collect(stream(family, [text[:i], text[i:]])), whole), (text, i)
        assert same(collect(stream(family, list(text))), whole), text  # one char at a time


def test_glm4_calls():
    content, calls = batch("chatglm", GLM4_SAMPLES[0])
    assert content is None
    assert calls == [{"id": "call_0", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 3}'}}]
    content, calls = batch("glm4", GLM4_SAMPLES[2])
    assert [c["function"]["name"] for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"q": 'a "quoted" {brace}'}
    content, calls = batch("chatglm", GLM4_SAMPLES[3])
    assert [c["function"]["name"] for c in calls] == ["get_weather", "search"] and content is None
    r = batch("chatglm", GLM4_SAMPLES[1])
    assert tuple(r) == ("北京今天晴，气温 20°C。😀", []) and r.diagnostics == []
    _, calls = batch("chatglm", GLM4_SAMPLES[12])
    assert json.loads(calls[0]["function"]["arguments"]) == {"code": '```python\nprint("hi")\n```'}
    _, calls = batch("chatglm", GLM4_SAMPLES[13])  # cogview is always accepted (as glm_server.py does)
    assert json.loads(calls[0]["function"]["arguments"]) == {"prompt": "A cat on the moon"}


@pytest.mark.parametrize("text,reason", [
    ('get_weather\n{"city": ', "truncated"), ('get_weather\n{"city": tru}', "invalid JSON"),
    ('unknown_tool\n{"a": 1}', "unknown tool"), ("get_weather\n", "empty arguments"),
    ("get_weather", "empty arguments"), ("get_weather\nnot json", "not followed by JSON"),
    ("get_weather\n[1, 2]", "not followed by JSON")])
def test_glm4_malformed_is_content_with_reason(text, reason):
    r = batch("chatglm", text)
    assert r.tool_calls == [] and r.content == text.strip()
    assert any(reason in d for d in r.diagnostics), r.diagnostics


def test_schema_errors_reported_but_call_kept():
    r = batch("glm4", 'get_weather\n{"city": 5, "zzz": 1}')
    assert len(r.tool_calls) == 1
    assert any("5 is not of type 'string'" in d for d in r.diagnostics)
    assert any("zzz" in d for d in r.diagnostics)
    r = batch("glm4_moe", GLM45_SAMPLES[7])
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {"days": "many"}
    assert any("'city' is a required property" in d for d in r.diagnostics)
    assert any("'many' is not of type 'integer'" in d for d in r.diagnostics)


def test_glm45_typed_by_schema_and_several_calls():
    r = batch("glm4_moe", GLM45_SAMPLES[0])
    assert r.content == "好的" and r.reasoning == "用户问天气" and r.diagnostics == []
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {"city": "北京", "days": 3}
    r = batch("glm4_moe", GLM45_SAMPLES[1])
    assert [json.loads(c["function"]["arguments"]) for c in r.tool_calls] == [{"city": "a"}, {"q": "x < y "}]
    assert r.content is None
    r = batch("glm4_moe", GLM45_SAMPLES[2])
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {
        "metric": True, "opts": {"u": [1, 2]}, "tags": ["a", "b"], "city": "3"}  # city is a string in the schema
    assert batch("glm4_moe", GLM45_SAMPLES[3]).tool_calls[0]["function"]["arguments"] == "{}"
    r = batch("glm4_moe", GLM45_SAMPLES[8])  # a <tool_call> ends the thinking (here: not a known tool)
    assert r.tool_calls == [] and r.content == "<tool_call>not a call</tool_call>\n\n\nplain answer"
    assert r.reasoning == "思考" and any("unknown tool 'not a call'" in d for d in r.diagnostics)


@pytest.mark.parametrize("text,reason", [(GLM45_SAMPLES[4], "truncated"), (GLM45_SAMPLES[5], "unknown tool"),
                                         (GLM45_SAMPLES[6], "malformed")])
def test_glm45_malformed_is_content_with_reason(text, reason):
    r = batch("glm4_moe", text)
    assert r.tool_calls == [] and r.content == text.strip()
    assert any(reason in d for d in r.diagnostics), r.diagnostics


@pytest.mark.parametrize("family", ["chatglm", "glm4_moe"])
def test_calls_never_streamed_as_text(family):
    text = GLM4_SAMPLES[2] if family == "chatglm" else GLM45_SAMPLES[1]
    for i in range(len(text) + 1):
        events = stream(family, [text[:i], text[i:]])
        assert not any(isinstance(e, ContentDelta) for e in events)
        starts = [e for e in events if isinstance(e, ToolCallStart)]
        assert [e.index for e in starts] == [0, 1]


def test_stream_emits_name_then_argument_deltas():
    text = GLM4_SAMPLES[0]
    p = make_stream_parser("chatglm", TOOLS, id_factory=ids())
    events = []
    for ch in text:
        events.append(p.feed(ch))
    events.append(p.finish())
    flat = [e for evs in events for e in evs]
    assert isinstance(flat[0], ToolCallStart) and flat[0].name == "get_weather"
    deltas = [e for e in flat if isinstance(e, ToolCallDelta)]
    assert len(deltas) > 5 and "".join(d.arguments for d in deltas) == '{"city": "北京", "days": 3}'
    assert isinstance(flat[-1], ToolCallEnd)
    assert openai_delta(flat[0]) == {"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                                     "function": {"name": "get_weather", "arguments": ""}}]}
    assert openai_delta(deltas[0]) == {"tool_calls": [{"index": 0, "function": {"arguments": deltas[0].arguments}}]}


@pytest.mark.parametrize("family,samples", [("chatglm", GLM4_SAMPLES), ("glm4_moe", GLM45_SAMPLES)])
def test_buffered_mode_never_withdraws(family, samples):
    for text in samples:
        for i in range(0, len(text) + 1, 3):
            events = stream(family, [text[:i], text[i:]], stream_arguments=False)
            assert not any(isinstance(e, ToolCallInvalid) for e in events)
            for k, e in enumerate(events):
                if isinstance(e, ToolCallStart):
                    assert isinstance(events[k + 1], ToolCallDelta) and isinstance(events[k + 2], ToolCallEnd)
            assert same(collect(events), batch(family, text))


def test_withdrawn_call_events():
    events = stream("chatglm", ['get_weather\n{"city": ', "tru}"])
    kinds = [type(e) for e in events]
    assert kinds[0] is ToolCallStart and ToolCallInvalid in kinds
    assert kinds.index(ContentDelta) > kinds.index(ToolCallInvalid)


def test_render_then_parse_round_trip():
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": '{"city": "北京", "days": 2}'}},
             {"id": "c2", "type": "function", "function": {"name": "search", "arguments": '{"q": "x\\ny"}'}}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    for family in ("chatglm", "glm4", "glm4_moe"):
        fmt = ChatFormat(family)
        rendered = fmt.render(msgs, tools=TOOLS, add_generation_prompt=False)
        head = fmt.render(msgs[:1], tools=TOOLS, add_generation_prompt=True)
        assert rendered.startswith(head)
        _, got = fmt.parse(rendered[len(head):], TOOLS)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == \
               [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_api_errors():
    p = make_stream_parser("glm4", TOOLS)
    with pytest.raises(ToolCallError):
        p.feed(None)
    p.finish()
    with pytest.raises(ToolCallError):
        p.feed("x")
    assert p.finish() == []
    with pytest.raises(ToolCallError):
        parse_text("glm4", b"bytes")
    # tools may be missing or junk: still no exception
    assert tuple(parse_text("glm4", 'get_weather\n{"a": 1}', None)) == ('get_weather\n{"a": 1}', [])
    assert tuple(parse_text("glm4_moe", "<tool_call>x</tool_call>", [1, "a", {"function": 3}]))[1] == []


FRAGMENTS = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<think>",
             "</think>", "<|assistant|>", "<|user|>", "get_weather", "search", "python", "\n", "{", "}", '"', "\\",
             ":", ",", " ", "city", "北京", "😀", "3", "true", "[", "]", "<", "|", "now", "{}"]
garbage = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=garbage, cuts=st.lists(st.integers(0, 400), max_size=4), family=st.sampled_from(["glm4", "glm4_moe"]))
def test_fuzzed_garbage_never_raises_and_is_split_invariant(text, cuts, family):
    whole = batch(family, text)
    assert whole.content is None or isinstance(whole.content, str)
    for c in whole.tool_calls:
        assert isinstance(json.loads(c["function"]["arguments"]), dict)
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    assert same(collect(stream(family, pieces)), whole)
    assert same(collect(stream(family, pieces, stream_arguments=False)), whole)
    assert all(isinstance(n.message, str) for n in stream(family, pieces) if isinstance(n, Notice))
