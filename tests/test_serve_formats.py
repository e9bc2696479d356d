"""The openai client against a real server on a checkpoint of each chat format (issue 12): the format found from
the checkpoint's own official template, a forced tool call through the format's grammar and parser, whole and
streamed, and the thinking budget that ends a thinking format's reasoning so the call can come."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
from test_serve_util import ServerThread, make_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
# enums and booleans keep a random model's arguments short (a free string can run to max_tokens)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Beijing"]},
                                                    "metric": {"type": "boolean"}},
                   "required": ["city", "metric"]}}}
MSGS = [{"role": "user", "content": "Weather in Paris?"}]
FORMATS = [  # (format, model_type, official template in tests/fixtures or None for the built-in)
    ("chatglm", "glm4", "glm-4-9b-chat.jinja"),
    ("glm4", "glm4", None),
    ("glmz1", "glm4", "GLM-Z1-0414.jinja"),
    ("glm45", "glm4_moe", None),
    ("glm46", "glm4_moe", "GLM-4.6.jinja"),
    ("glm47", "glm4_moe", "GLM-4.7.jinja"),
]


@pytest.fixture(scope="module", params=FORMATS, ids=[f[0] for f in FORMATS])
def served(request, tmp_path_factory):
    from glm4.serve.app import build_state, create_app

    name, model_type, template = request.param
    folder = make_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", model_type=model_type)
    if template:
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": (FIXTURES / template).read_text()}))
    st = build_state(str(folder), model_name="m", kv_cache_tokens=4096)
    srv = ServerThread(create_app(st)).start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    yield name, st, client
    srv.stop()


def test_format_found_and_forced_call_whole_and_streamed(served):
    name, st, client = served
    assert st.chat.fmt.name == name
    thinks = st.chat.fmt.spec.thinks
    kw = dict(model="m", messages=MSGS, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
              max_tokens=200, temperature=0,
              extra_body={"thinking_budget": 4} if thinks else None)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert r.usage.prompt_tokens == len(st.chat.plan(MSGS, tools=[WEATHER], tool_choice="required",
                                                     parallel_tool_calls=False).prompt_ids)
    assert choice.finish_reason == "tool_calls", (name, choice)
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    calls: dict[int, dict] = {}
    reason = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        c = chunk.choices[0]
        for tc in c.delta.tool_calls or []:
            got = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            got["name"] += tc.function.name or ""
            got["arguments"] += tc.function.arguments or ""
        reason = c.finish_reason or reason
    assert reason == "tool_calls"
    assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}


def _history(**reasoning) -> list[dict]:
    """A user question, the assistant's call (with its past thinking, if given) and the tool's answer: the
    assistant turn comes after the last user message, where the thinking templates render past thinking."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "metric": true}'}}
    return [*MSGS, {"role": "assistant", "content": "", "tool_calls": [call], **reasoning},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]


def test_assistant_reasoning_in_history_is_rendered(served):
    """`reasoning_content` (or vLLM's `reasoning`) on an input assistant message reaches the template: the prompt
    is the planner's render of it, and a thinking format's prompt grows by the thought; on the official GLM-4.6
    template the planner's render is the template's, byte for byte."""
    name, st, client = served
    thought = "The user wants Paris weather, so I call the tool."

    def prompt_tokens(messages):
        r = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], max_tokens=1)
        return r.usage.prompt_tokens

    plain, with_thought = _history(), _history(reasoning_content=thought)
    n_plain, n_thought = prompt_tokens(plain), prompt_tokens(with_thought)
    assert n_thought == len(st.chat.plan(with_thought, tools=[WEATHER]).prompt_ids)
    assert n_plain == len(st.chat.plan(plain, tools=[WEATHER]).prompt_ids)
    assert prompt_tokens(_history(reasoning=thought)) == n_thought
    if st.chat.fmt.family == "glm4_moe":  # GLM-4.5 / 4.6 / 4.7 show the thinking of turns after the last user
        assert n_thought > n_plain
        assert thought in st.tokenizer.decode(st.chat.plan(with_thought, tools=[WEATHER]).prompt_ids)
    if name == "glm46":
        ctu = pytest.importorskip("transformers.utils.chat_template_utils")
        native = json.loads(json.dumps(with_thought))  # transformers' convention: a call's arguments as an object
        native[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "metric": True}
        (official,), _ = ctu.render_jinja_template([native], tools=[WEATHER], add_generation_prompt=True,
                                                   chat_template=(FIXTURES / "GLM-4.6.jinja").read_text())
        assert st.tokenizer.decode(st.chat.plan(with_thought, tools=[WEATHER]).prompt_ids) == official
