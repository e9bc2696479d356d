"""The agent loop with a scripted model (this tests the loop, not a model), then the same loop over the real
chat API: glm4.LLM in process, and `glm4 serve` on 127.0.0.1 through the official openai client."""

from __future__ import annotations

import json
from typing import Annotated

import pytest

from glm4.agent import Agent, ScriptedModel, ToolRegistry, load_events
from glm4.agent.agent_cli import main as agent_main


def add(a: int, b: Annotated[int, "the other term"]) -> int:
    """Add two integers."""
    return a + b


def lookup(key: str) -> str:
    """Look a key up."""
    return {"alpha": "42"}.get(key, "")


def call(name, **args):
    return {"tool_calls": [{"name": name, "arguments": args}]}


def kinds(events):
    return [e.kind for e in events if e.kind != "reply"]


def test_plan_call_observe_answer():
    model = ScriptedModel(["1. add the numbers\n2. answer", call("add", a=2, b=3), "The sum is 5."])
    r = Agent(model, [add]).run("What is 2 + 3?")
    assert kinds(r.events) == ["plan", "call", "observation", "answer"]
    assert r.answer == "The sum is 5." and r.rounds == 3
    plan_req, first, second = model.requests
    assert plan_req["tools"] is None and plan_req["tool_choice"] == "none"
    assert "Your plan:\n1. add the numbers" in first["messages"][0]["content"]
    assert [t["function"]["name"] for t in first["tools"]] == ["add", "finish", "note"]
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_2_0", "content": "5"}
    assert second["messages"][-2]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}


def test_finish_tool_and_switches_off():
    model = ScriptedModel([call("finish", answer="done")])
    r = Agent(model, [add], planner=False, memory=False).run("x")
    assert kinds(r.events) == ["call", "observation", "answer"] and r.answer == "done"
    assert [t["function"]["name"] for t in model.requests[0]["tools"]] == ["add", "finish"]
    assert len(model.requests) == 1  # no planner call


def test_reflection_after_a_failed_call_then_recovery():
    model = ScriptedModel([
        call("add", a="two", b=3),  # off-schema: an error observation, not a crash
        "I passed a word where an integer was needed. I will pass 2.",
        call("add", a=2, b=3),
        "5",
    ])
    r = Agent(model, [add], planner=False).run("2 + 3?")
    assert kinds(r.events) == ["call", "observation", "reflection", "call", "observation", "answer"]
    obs = next(e for e in r.events if e.kind == "observation")
    assert "invalid arguments for 'add': a: Input should be a valid integer" in obs.data["error"]
    refl = next(e for e in r.events if e.kind == "reflection")
    assert "Input should be a valid integer" in refl.data["problem"]
    reflect_req = model.requests[1]
    assert reflect_req["tools"] is None and "did not work" in reflect_req["messages"][-1]["content"]
    assert r.answer == "5"


def test_reflection_on_empty_observation_revises_the_plan_and_is_bounded():
    model = ScriptedModel(["1. look up beta", call("lookup", key="beta"),
                           "beta does not exist. Revised plan:\n1. look up alpha", call("lookup", key="gamma"),
                           "still nothing", call("lookup", key="delta"), "no third reflection: answer", ])
    r = Agent(model, [lookup], max_reflections=2).run("find the value")
    assert kinds(r.events) == ["plan", "call", "observation", "reflection", "plan", "call", "observation",
                               "reflection", "call", "observation", "answer"]
    assert r.events[-1].data["text"] == "no third reflection: answer"
    assert "Your plan:\n1. look up alpha" in model.requests[3]["messages"][0]["content"]


def test_reflection_off_means_no_critique_call():
    model = ScriptedModel([call("add", a="x", b=1), "gave up"])
    r = Agent(model, [add], planner=False, reflection=False).run("x")
    assert kinds(r.events) == ["call", "observation", "answer"]


def test_a_failed_check_triggers_reflection():
    model = ScriptedModel(["4", "I added wrong.", call("add", a=2, b=3), call("finish", answer="5")])
    r = Agent(model, [add], planner=False, check=lambda a: a.strip() == "5").run("2 + 3?")
    assert kinds(r.events) == ["reflection", "call", "observation", "call", "observation", "answer"]
    reflection = next(e for e in r.events if e.kind == "reflection")
    assert reflection.data["problem"] == "the answer '4' failed the task's check"
    assert r.answer == "5"


def test_max_rounds_and_model_failure_end_with_an_error_event():
    r = Agent(ScriptedModel([call("add", a=1, b=1)] * 3), [add], planner=False, max_rounds=3).run("loop")
    assert r.answer is None and r.events[-1].kind == "error" and "3 rounds" in r.events[-1].data["text"]

    def broken(messages, tools, choice):
        raise ConnectionError("endpoint down")

    r = Agent(ScriptedModel([broken]), [add], planner=False).run("x")
    assert r.events[-1].kind == "error" and "endpoint down" in r.events[-1].data["text"]
    r = Agent(ScriptedModel(["1. plan", call("add", a="x", b=1), broken]), [add]).run("x")  # fails in reflection
    assert kinds(r.events) == ["plan", "call", "observation", "error"]
    assert r.events[-1].data["text"] == "the model call failed: ConnectionError: endpoint down"


def test_scratchpad_and_summary_memory():
    big = "x" * 3000
    reg = ToolRegistry([lookup])
    reg.add(lambda: big, name="dump", description="Dump.")
    model = ScriptedModel([call("dump"), call("note", text="alpha is the key"), call("lookup", key="alpha"),
                           "summary: one dump of x", "the answer"])
    r = Agent(model, reg, planner=False, context_chars=2500, observation_chars=4000).run("x")
    assert kinds(r.events) == ["call", "observation", "call", "observation", "call", "observation", "memory",
                               "answer"]
    memory = next(e for e in r.events if e.kind == "memory")
    assert memory.data == {"text": "summary: one dump of x", "observations": 1}
    summary_req, last = model.requests[-2:]
    assert "[dump] " + "x" * 2000 in summary_req["messages"][0]["content"] and summary_req["tools"] is None
    assert "Your scratchpad:\n- alpha is the key\n- summary of earlier observations: summary: one dump of x" in \
        last["messages"][0]["content"]
    assert [m["content"] for m in last["messages"] if m["role"] == "tool"] == [
        "(summarised in the scratchpad)", "noted (1 notes)", "42"]


def test_observations_are_truncated():
    reg = ToolRegistry()
    reg.add(lambda: "a" * 10_000 + "END", name="dump", description="Dump.")
    r = Agent(ScriptedModel([call("dump"), "ok"]), reg, planner=False, observation_chars=500).run("x")
    obs = next(e for e in r.events if e.kind == "observation").data["text"]
    assert len(obs) < 600 and obs.endswith("END") and "characters cut" in obs


def test_save_and_replay(tmp_path):
    script = ["1. add", call("add", a=20, b=22), "42"]
    r = Agent(ScriptedModel(script), [add]).run("20 + 22?")
    r.save(tmp_path / "run.jsonl")
    events = load_events(tmp_path / "run.jsonl")
    assert [e["kind"] for e in events] == [e.kind for e in r.events]
    again = Agent(ScriptedModel.from_events(events), [add]).run("20 + 22?")
    assert [(e.kind, e.data) for e in again.events] == [(e.kind, e.data) for e in r.events]
    assert agent_main(["--replay", str(tmp_path / "run.jsonl")]) == 0


def test_task_suite_scripted_without_python():
    from glm4.agent.suite import TASKS, run_suite

    assert len(TASKS) >= 30 and {t.category for t in TASKS} == {"arithmetic", "data", "files", "browse", "plan",
                                                                 "recover"}
    lines = []
    res = run_suite(python=False, log=lines.append)
    assert res and all(ok == n for ok, n in res.values()), "\n".join(lines)
    # without reflection the scripted critiques are taken as answers: the recovery tasks fail, the rest pass
    res = run_suite(python=False, reflection=False, categories={"recover", "files"}, log=lines.append)
    assert res["recover"][0] == 0 and res["files"] == (5, 6)


@pytest.mark.slow
def test_task_suite_scripted_with_the_sandboxed_interpreter():
    from glm4.agent.launchers import choose_launcher
    from glm4.agent.suite import TASKS, run_suite

    if choose_launcher()[0] is None:
        pytest.skip(choose_launcher()[1])
    lines = []
    res = run_suite(log=lines.append)
    assert sum(n for _, n in res.values()) == len(TASKS)
    assert all(ok == n for ok, n in res.values()), "\n".join(lines)


def test_cli_needs_a_model_source(capsys):
    assert agent_main(["do it"]) == 2
    assert "--model PATH or --base-url URL" in capsys.readouterr().err


# ---- the real chat API: a tiny random checkpoint, tool_choice forcing the first call


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from test_serve_util import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("agent") / "tiny")


def pick(unit: Annotated[str, "c or f"]) -> str:
    """Pick a unit."""
    return f"picked {unit}"


def _first_call_ran(events):
    call_ev = next(e for e in events if e.kind == "call")
    obs = next(e for e in events if e.kind == "observation")
    assert call_ev.data["name"] in ("pick", "finish", "note")
    if call_ev.data["name"] == "pick":
        assert obs.data["error"] is None and obs.data["text"].startswith("picked ")
    json.loads(call_ev.data["arguments"])


def test_agent_over_glm4_llm_in_process(tiny_ckpt):
    from glm4.agent import LLMChat
    from glm4.engine.llm import LLM
    from glm4.engine.sampling_params import SamplingParams

    model = LLMChat(LLM(str(tiny_ckpt)), params=SamplingParams(max_tokens=40, temperature=0.0))
    r = Agent(model, [pick], planner=False, require_tool=True, max_rounds=2).run("Pick a unit.")
    _first_call_ran(r.events)


def test_agent_over_glm4_serve_with_the_openai_client(tiny_ckpt):
    from test_serve_util import ServerThread

    from glm4.agent import OpenAIChat
    from glm4.serve.app import build_state, create_app

    srv = ServerThread(create_app(build_state(str(tiny_ckpt), model_name="tiny", kv_cache_tokens=4096))).start()
    try:
        model = OpenAIChat(srv.url + "/v1", max_tokens=40, temperature=0.0)
        assert model.model == "tiny"
        r = Agent(model, [pick], planner=True, require_tool=True, max_rounds=2).run("Pick a unit.")
        assert not any(e.kind == "error" and "model call failed" in e.data["text"] for e in r.events), r.events
        _first_call_ran(r.events)
    finally:
        srv.stop()
