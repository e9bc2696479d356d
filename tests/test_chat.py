"""The chat layer (`chat`, `chat_stream`, ChatLayer), constrained decoding, and the terminal chat,
over a tiny random GLM-4 checkpoint with a real tokenizer.model."""

from __future__ import annotations

import io
import json

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serve_util import make_checkpoint

from glm4.engine.chat import ChatError, chat, chat_layer_for, chat_stream
from glm4.engine.constrained import json_closing_suffix

torch.set_num_threads(1)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSGS = [{"role": "user", "content": "Weather in Beijing? 北京天气？"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    import glm4

    return glm4.LLM(make_checkpoint(tmp_path_factory.mktemp("chat") / "tiny", seed=1), kv_cache_tokens=4096)


def params(**kw):
    import glm4

    return glm4.SamplingParams(**{"max_tokens": 60, "temperature": 1.0, "seed": 0, **kw})


# ------------------------------------------------------------------------------------------ chat()


def test_chat_plain_reply(llm):
    r = chat(llm, MSGS, params=params(max_tokens=8))
    assert isinstance(r.content, str) and not r.tool_calls and r.finish_reason in ("stop", "length")
    layer, tok, _ = chat_layer_for(llm)
    assert r.usage["prompt_tokens"] == len(layer.fmt.encode(tok, MSGS)) and r.usage["completion_tokens"] <= 8
    assert r.message() == {"role": "assistant", "content": r.content}


@pytest.mark.parametrize("seed", range(4))
def test_chat_required_and_named_tool_calls_are_valid(llm, seed):
    r = chat(llm, MSGS, tools=TOOLS, tool_choice="required", params=params(seed=seed))
    assert r.finish_reason == "tool_calls" and r.tool_calls and r.content is None
    for c in r.tool_calls:
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
    named = chat(llm, MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                 params=params(seed=seed), parallel_tool_calls=False)
    assert [c["function"]["name"] for c in named.tool_calls] == ["add"]
    args = json.loads(named.tool_calls[0]["function"]["arguments"])
    assert isinstance(args["a"], int) and isinstance(args["b"], int)


def test_llm_chat_method_is_the_chat_layer(llm):
    """`llm.chat(...)` (the issue's API) gives exactly what the shared chat layer gives, seed for seed."""
    a = llm.chat(MSGS, tools=TOOLS, tool_choice="required", params=params(seed=3))
    b = chat(llm, MSGS, tools=TOOLS, tool_choice="required", params=params(seed=3))
    assert a.tool_calls and [c["function"] for c in a.tool_calls] == [c["function"] for c in b.tool_calls]
    events = list(llm.chat_stream(MSGS, params=params(seed=3, max_tokens=8)))
    assert events[-1]["type"] == "done"


def test_chat_stream_folds_to_chat(llm):
    events = list(chat_stream(llm, MSGS, tools=TOOLS, tool_choice="required", params=params(seed=7)))
    done = events[-1]
    assert done["type"] == "done"
    calls: dict[int, dict] = {}
    for ev in events[:-1]:
        assert ev["type"] == "tool_call"
        if "id" in ev:
            calls[ev["index"]] = {"id": ev["id"], "type": "function", "function": {"name": ev["name"], "arguments": ""}}
        else:
            calls[ev["index"]]["function"]["arguments"] += ev["arguments"]
    assert [calls[i] for i in sorted(calls)] == done["result"].tool_calls
    again = chat(llm, MSGS, tools=TOOLS, tool_choice="required", params=params(seed=7))
    assert [c["function"] for c in again.tool_calls] == [c["function"] for c in done["result"].tool_calls]


def test_chat_json_modes(llm):
    for seed in range(3):
        r = chat(llm, MSGS, params=params(seed=seed, max_tokens=16), response_format={"type": "json_object"})
        assert isinstance(json.loads(r.content), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    r = chat(llm, MSGS, params=params(max_tokens=40), response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    jsonschema.validate(json.loads(r.content), schema)


def test_chat_auto_tools_with_json_mode(llm):
    """tools + response_format json_object under "auto": a valid call, or content that parses as JSON."""
    for seed in range(8):
        r = chat(llm, MSGS, tools=TOOLS, params=params(seed=seed, max_tokens=40),
                 response_format={"type": "json_object"})
        if r.tool_calls:
            assert r.finish_reason == "tool_calls"
            for c in r.tool_calls:
                jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
        else:
            assert isinstance(json.loads(r.content), dict)


def test_auto_grammar_allows_answer_then_call(llm):
    """Under "auto" a reply may say something, then call in a later `<|assistant|>` turn (GLM-4's format)."""
    layer, tok, _ = chat_layer_for(llm)
    plan = layer.plan(MSGS, TOOLS, "auto")
    text = 'Let me check.<|assistant|>add\n{"a":1,"b":2}'
    ids = layer.compiler.lltok.tokenize_str("\nLet me check.") + [tok.special_tokens["<|assistant|>"]]
    ids += layer.compiler.lltok.tokenize_str('add\n{"a":1,"b":2}')
    proc = layer.compiler.processor(plan.grammar)
    assert proc.matcher.validate_tokens(ids) == len(ids)
    content, calls = layer.parse(plan, "\n" + text)
    assert content == "Let me check." and [c["function"]["arguments"] for c in calls] == ['{"a":1,"b":2}']
    bad = layer.compiler.lltok.tokenize_str('nope\n{"a":1}')
    assert layer.compiler.processor(plan.grammar).matcher.validate_tokens(bad) < len(bad)  # unknown tool


def test_chat_families(llm):
    """The chatglm format (glm-4-9b-chat) is enforced by the same grammar; GLM-4.5's XML calls under "auto" are
    parsed and validated (required / named are enforced: test_glm45_xml_calls_are_enforced)."""
    from glm4.chat import ChatFormat
    from glm4.engine.chat import ChatLayer

    layer0, tok, _ = chat_layer_for(llm)
    layer = ChatLayer(tok, ChatFormat("chatglm"))
    layer._compiler = layer0.compiler
    plan = layer.plan(MSGS, TOOLS, "required")
    assert tok.decode(plan.prompt_ids).startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM")
    for seed in range(2):
        out = llm.generate([plan.prompt_ids], layer.sampling_params(plan, params(seed=seed)))[0]
        content, calls = layer.parse(plan, out.text)
        assert calls and out.outputs[0].token_ids[-1] == tok.special_tokens["<|observation|>"]
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
    moe = ChatLayer(tok, ChatFormat("glm4_moe"))
    plan = moe.plan(MSGS, TOOLS, "auto")
    assert plan.grammar is None  # parsed and validated, not constrained
    text = ("\n<think>The user wants weather.</think>\nChecking.<tool_call>get_weather\n<arg_key>city</arg_key>\n"
            "<arg_value>Beijing</arg_value>\n<arg_key>unit</arg_key>\n<arg_value>c</arg_value>\n</tool_call>")
    content, calls, reasoning = moe.parse_full(plan, text)
    assert reasoning == "The user wants weather." and content == "Checking."
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Beijing", "unit": "c"}


def _moe_layer(llm):
    from glm4.chat import ChatFormat
    from glm4.engine.chat import ChatLayer

    layer0, tok, _ = chat_layer_for(llm)
    moe = ChatLayer(tok, ChatFormat("glm4_moe"))
    moe._compiler = layer0.compiler
    return moe, tok


XML_TOOLS = TOOLS + [{"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                                     "text": {"type": "string", "minLength": 2}, "flag": {"type": "boolean"}},
    "required": ["text", "tags"]}}}]
XML_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in XML_TOOLS}


@pytest.mark.parametrize("thinking", [None, False])
def test_glm45_xml_calls_are_enforced(llm, thinking):
    """GLM-4.5's `<tool_call>name\n<arg_key>..</arg_key>\n<arg_value>..</arg_value>\n</tool_call>` calls under
    required / named: a random tiny model writes valid calls (the closing guard finishes them within max_tokens;
    a minimal call is 51-54 tokens of this test tokenizer)."""
    moe, tok = _moe_layer(llm)
    obs = tok.special_tokens["<|observation|>"]
    for seed in range(4):
        for choice, max_tokens in (("required", 120), ({"type": "function", "function": {"name": "note"}}, 80),
                                   ({"type": "function", "function": {"name": "get_weather"}}, 64)):
            plan = moe.plan(MSGS, XML_TOOLS, choice, parallel_tool_calls=True, enable_thinking=thinking)
            assert plan.grammar and moe.fmt.spec.close_mode == "xml"
            out = llm.generate([plan.prompt_ids], moe.sampling_params(plan, params(seed=seed, max_tokens=max_tokens)))[0]
            ids = out.outputs[0].token_ids
            assert ids[-1] == obs and len(ids) <= max_tokens, out.text
            content, calls, reasoning = moe.parse_full(plan, out.text)
            assert calls and not content, out.text
            if thinking is False:
                assert reasoning is None and out.text.startswith("\n<tool_call>")
            for c in calls:
                name = c["function"]["name"]
                assert isinstance(choice, str) or name == choice["function"]["name"]
                jsonschema.validate(json.loads(c["function"]["arguments"]), XML_SCHEMAS[name])


def test_glm45_xml_grammar_accepts_the_template_and_rejects_others(llm):
    """What the GLM-4.5 template renders for a call is what the grammar accepts; wrong names, keys, types don't."""
    moe, tok = _moe_layer(llm)
    plan = moe.plan(MSGS, XML_TOOLS, "required")
    call = {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "note", "arguments": {"text": "hi <b>", "tags": ["x"]}}},
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": -2}}}]}
    rendered = moe.fmt.render([*MSGS, call])
    body = rendered.split("<|assistant|>")[1].replace("\n<think></think>", "", 1)
    obs = tok.special_tokens["<|observation|>"]

    def accepts(text: str) -> bool:  # every token of text allowed, then <|observation|> ends the reply
        ids = moe.compiler.lltok.tokenize_str(text)
        m = moe.compiler.processor(plan.grammar).matcher
        if m.validate_tokens(ids) != len(ids):
            return False
        m.consume_tokens(ids + [obs])
        return m.is_stopped() and not m.is_error()

    assert accepts(body) and accepts("\n<think>a </thin <b> x</think>\n" + body.lstrip("\n"))
    content, calls = moe.parse(plan, body)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"text": "hi <b>", "tags": ["x"]}, {"a": 1, "b": -2}]
    for bad in (body.replace("<tool_call>note", "<tool_call>nope"), body.replace("<arg_key>a<", "<arg_key>c<"),
                body.replace("<arg_value>-2<", "<arg_value>two<"), body.replace("<arg_value>hi <b><", "<arg_value>h<"),
                "\nsome text" + body):
        assert not accepts(bad), bad
    single = moe.plan(MSGS, XML_TOOLS, "required", parallel_tool_calls=False)
    ids = moe.compiler.lltok.tokenize_str(body)
    assert moe.compiler.processor(single.grammar).matcher.validate_tokens(ids) < len(ids)  # one call only


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="ab<>/ 中\n\"", max_size=8), st.integers(-50, 50), st.booleans(), st.booleans())
def test_xml_closing_suffix_completes_every_prefix(text, a, think, second):
    """Every prefix of a GLM-4.5 call reply is closed by xml_closing_suffix into a reply whose calls are valid
    (None only where the prefix stops inside a tag, which the grammar forces to completion)."""
    from glm4.chat import ChatFormat
    from glm4.engine.constrained import xml_closing_suffix

    msg = {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "note", "arguments": {"text": text + "xy", "tags": [text]}}}]}
    if second:
        msg["tool_calls"].append({"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": 3}}})
    full = ChatFormat("glm4_moe").render([*MSGS, msg]).split("<|assistant|>")[1].replace("\n<think></think>", "", 1)
    full = ("\n<think>" + text + "</think>" if think else "") + full
    parser_fmt = ChatFormat("glm4_moe")
    for k in range(len(full) + 1):
        found = xml_closing_suffix(full[:k], XML_TOOLS)
        if found is None:
            continue
        suffix, complete = found
        assert complete == (full[:k].rstrip().endswith("</tool_call>") and suffix == "")
        parsed = parser_fmt.parse(full[:k] + suffix, XML_TOOLS)
        assert parsed.tool_calls, full[:k] + suffix
        for c in parsed.tool_calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), XML_SCHEMAS[c["function"]["name"]])


@pytest.mark.parametrize("bad, param", [
    ([], "messages"),
    ([{"role": "robot", "content": "x"}], "messages.0.role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages.0.content"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages.1.role"),
])
def test_chat_rejects_bad_messages(llm, bad, param):
    with pytest.raises(ChatError) as e:
        chat(llm, bad, params=params())
    assert e.value.param == param


def test_chat_rejects_bad_tools(llm):
    with pytest.raises(ChatError, match="not among tools"):
        chat(llm, MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ChatError, match="invalid JSON schema"):
        chat(llm, MSGS, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}])
    with pytest.raises(ChatError, match="needs tools"):
        chat(llm, MSGS, tool_choice="required")


# ------------------------------------------------------------------------------------------ constrained


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(json_values, st.booleans())
def test_json_closing_suffix_completes_every_prefix(value, compact):
    text = json.dumps(value, separators=(",", ":") if compact else None, ensure_ascii=False)
    for k in range(len(text) + 1):
        suffix = json_closing_suffix(text[:k])
        assert suffix is not None, text[:k]
        json.loads(text[:k] + suffix)  # parses
    assert json_closing_suffix(text) == ""
    assert json_closing_suffix(text + "]") is None  # not a JSON prefix


def test_grammar_processor_masks_to_valid_calls(llm):
    """Driven by pure noise logits, the tool-call grammar still ends in a valid call for a listed tool."""
    layer, tok, _ = chat_layer_for(llm)
    c = layer.compiler
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        proc = c.processor(layer.fmt.spec.calls_grammar(set(c.special_tokens), TOOLS, True, False))
        ids: list[int] = []
        while len(ids) < 200:
            logits = proc(ids, torch.randn(llm.engine.config.vocab_size, generator=g) * 3)
            t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
            ids.append(t)
            if t in tok.eos_token_ids:
                break
        assert ids[-1] == tok.special_tokens["<|observation|>"]
        content, calls = layer.fmt.parse(tok.decode(ids[:-1]), TOOLS)
        assert calls, tok.decode(ids)
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


# ------------------------------------------------------------------------------------------ terminal chat


def _script(lines, prompts=None):
    it = iter(lines)

    def read(prompt):
        if prompts is not None:
            prompts.append(prompt)
        try:
            x = next(it)
        except StopIteration:
            raise EOFError from None
        if isinstance(x, BaseException):
            raise x
        return x
    return read


def test_cli_commands_multiline_and_tools(llm, tmp_path):
    from glm4.serve.chat_cli import ChatSession, Repl

    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS), encoding="utf-8")
    out = io.StringIO()
    session = ChatSession(llm, params=params(max_tokens=6))
    lines = ["/system 你是一个助手", "hello there", '"""', "第一行", "second line", '"""', "a \\", "b",
             f"/tools {tools_file}", "/tools", "/tools missing.json", "/bogus", "/reset", "/help", "你好", "/exit"]
    assert Repl(session, _script(lines), out).run() == 0
    text = out.getvalue()
    assert "(system prompt set" in text and "(tools: get_weather, add)" in text and "cannot read missing.json" in text
    assert "unknown command '/bogus'" in text and "/reset (new conversation)" in text
    assert session.system == "你是一个助手" and session.tools == TOOLS
    # after /reset only the last exchange is left ("你好" plus its reply, maybe a tool call)
    assert session.messages[0] == {"role": "user", "content": "你好"}


def test_cli_multiline_messages_reach_the_model(llm):
    from glm4.serve.chat_cli import ChatSession, Repl

    session = ChatSession(llm, params=params(max_tokens=3))
    Repl(session, _script(['"""', "第一行", "second", '"""', "a \\", "b"]), io.StringIO()).run()
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["第一行\nsecond", "a \nb"]


def test_cli_ctrl_c_stops_generation_and_keeps_going(llm):
    from glm4.serve.chat_cli import ChatSession, Repl

    class Out(io.StringIO):
        """Ctrl-C arrives while the first reply is being printed."""
        replying = interrupted = False

        def write(self, s):
            if self.replying and not self.interrupted and s:
                self.interrupted = True
                raise KeyboardInterrupt
            self.replying = s == "glm> "
            return super().write(s)

    session = ChatSession(llm, params=params(max_tokens=200, ignore_eos=True))
    out = Out()
    lines = [KeyboardInterrupt(), "tell me a long story", "and another"]
    assert Repl(session, _script(lines), out).run() == 0
    text = out.getvalue()
    assert "(input cleared" in text and "[stopped]" in text
    assert not llm.engine.has_unfinished_requests()  # the interrupted request was aborted
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["tell me a long story", "and another"]


def test_cli_tool_call_asks_for_result(llm, tmp_path):
    from glm4.serve.chat_cli import ChatSession, Repl

    session = ChatSession(llm, tools=TOOLS, params=params(max_tokens=60))
    session.reply = _forced(session)
    out, prompts = io.StringIO(), []
    Repl(session, _script(["weather?", '{"temp": 21}'], prompts), out).run()
    assert "  -> get_weather({" in out.getvalue() or "  -> add({" in out.getvalue()
    assert prompts[1].startswith("  result of ")
    roles = [m["role"] for m in session.messages]
    assert roles[:3] == ["user", "assistant", "tool"] and session.messages[1]["tool_calls"]


def _forced(session):
    """Make the session's first reply a forced tool call (a random model rarely chooses one itself)."""
    from glm4.engine.chat import chat_stream

    orig, state = session.reply, {"n": 0}

    def reply():
        state["n"] += 1
        if state["n"] > 1:
            yield from orig()
            return
        for ev in chat_stream(session.llm, session.conversation(), tools=session.tools, tool_choice="required",
                              params=session.params):
            if ev["type"] == "done":
                session.messages.append(ev["result"].message())
            yield ev
    return reply


def test_cli_main_runs_a_session(llm, monkeypatch, capsys):
    from glm4.serve import chat_cli

    monkeypatch.setattr("builtins.input", _script(["hi", "/exit"]))
    assert chat_cli.main(["--model", str(llm.path), "--max-tokens", "4"]) == 0
    assert "glm> " in capsys.readouterr().out
    assert chat_cli.main(["--model", str(llm.path / "missing")]) == 2
    assert chat_cli.main(["--model", str(llm.path), "--tools", str(llm.path / "config.json")]) == 2


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_cli_real_sigint_during_generation(llm, inherited):
    """A real SIGINT while a reply streams stops it between tokens; the chat goes on; the handler the process
    had before is back afterwards — also when SIGINT was ignored (`nohup ... &`)."""
    import signal

    from glm4.serve.chat_cli import ChatSession, Repl

    outer = signal.getsignal(signal.SIGINT)  # what pytest started with: restored below whatever it is
    before = signal.default_int_handler if inherited == "default" else signal.SIG_IGN
    signal.signal(signal.SIGINT, before)

    class Out(io.StringIO):
        replying = sent = False

        def write(self, s):
            if self.replying and not self.sent and s:
                self.sent = True
                signal.raise_signal(signal.SIGINT)  # handled as a flag: no exception here
            self.replying = self.replying or s == "glm> "
            return super().write(s)

    try:
        session = ChatSession(llm, params=params(max_tokens=300, ignore_eos=True))
        out = Out()
        assert Repl(session, _script(["go on and on", "next"]), out).run() == 0
        assert "[stopped]" in out.getvalue()
        assert session.messages[1]["role"] == "assistant" and len(session.messages) >= 3
        assert not llm.engine.has_unfinished_requests()
        assert signal.getsignal(signal.SIGINT) is before  # restored
    finally:
        signal.signal(signal.SIGINT, outer)


def test_constraints_with_a_tokenizer_json(tmp_path):
    """The -hf / 0414 layout (tokenizer.json through `tokenizers`) drives the same grammars."""
    from conftest import train_tokenizer_json

    from glm4.chat import ChatFormat
    from glm4.engine.chat import ChatLayer
    from glm4.tokenizer import load_tokenizer

    train_tokenizer_json(tmp_path, ['{"city": "Paris", "unit": "c"}', "get_weather add 北京天气", "hello world"] * 50, 500)
    tok = load_tokenizer(tmp_path)
    layer = ChatLayer(tok, ChatFormat("glm4"))
    plan = layer.plan(MSGS, TOOLS, "required")
    g = torch.Generator().manual_seed(1)
    proc = layer.compiler.processor(plan.grammar, max_tokens=80, close="tools")
    ids: list[int] = []
    while len(ids) < 80:
        logits = proc(ids, torch.randn(tok.vocab_size + 16, generator=g))
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
        if ids[-1] in tok.eos_token_ids:
            break
    assert ids[-1] == tok.special_tokens["<|observation|>"]
    content, calls = layer.parse(plan, tok.decode(ids[:-1]))
    for c in calls:
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
    assert calls
