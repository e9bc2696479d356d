"""The live view of `glm4 agent`: every event kind rendered by rich (as text, and in colour on a terminal), the
plain lines for pipes and --plain, and the CLI choosing between them."""

from __future__ import annotations

import io
import json

import pytest

from glm4.agent import Agent, ScriptedModel
from glm4.agent.agent_cli import main as agent_main
from glm4.agent.loop import AgentEvent
from glm4.agent.view import PlainView, RichView, make_view

rich = pytest.importorskip("rich", reason="the live view needs rich")
from rich.console import Console  # noqa: E402

EVENTS = [
    AgentEvent("reply", {"content": "raw", "tool_calls": [], "reasoning": None}, 0),
    AgentEvent("plan", {"text": "1. read the file\n2. compute the mean"}, 0),
    AgentEvent("thought", {"text": "I will read it first."}, 1),
    AgentEvent("call", {"id": "c1", "name": "python", "arguments": json.dumps({"code": "import math\nprint(math.pi)"})}, 1),
    AgentEvent("observation", {"id": "c1", "name": "python", "text": "3.14159", "error": None, "images": 1}, 1),
    AgentEvent("call", {"id": "c2", "name": "read_file", "arguments": json.dumps({"path": "data.csv"})}, 2),
    AgentEvent("observation", {"id": "c2", "name": "read_file", "text": "Error: 'data.csv' not found",
                               "error": "not found", "images": 0}, 2),
    AgentEvent("reflection", {"text": "The file is weather.csv.", "problem": "`read_file` failed: not found"}, 2),
    AgentEvent("plan", {"text": "1. read weather.csv", "revised": True}, 2),
    AgentEvent("memory", {"text": "temps: 18, 9, 24", "observations": 3}, 3),
    AgentEvent("answer", {"text": "The mean is 17.5."}, 4),
    AgentEvent("error", {"text": "no answer within 8 rounds [sic]"}, 8),
]


def render(event, terminal=False) -> str:
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=terminal, color_system="standard" if terminal else None)
    console.print(RichView(console).render(event))
    return out.getvalue()


def test_each_event_kind_renders_with_its_content():
    texts = [render(e) for e in EVENTS[1:]]
    plan, thought, py_call, obs, call, bad_obs, reflection, revised, memory, answer, error = texts
    assert "plan" in plan.splitlines()[0] and "1. read the file" in plan and "2. compute the mean" in plan
    assert thought.strip() == "I will read it first."
    assert "step 1 → python" in py_call and "import math" in py_call and "print(math.pi)" in py_call
    assert "step 1 ← python  [1 image(s)]" in obs and "3.14159" in obs
    assert call.strip() == 'step 2 → read_file({"path": "data.csv"})'
    assert "step 2 ← read_file" in bad_obs and "not found" in bad_obs
    assert "step 2 reflection" in reflection and "problem: `read_file` failed" in reflection
    assert "weather.csv" in reflection
    assert "revised plan" in revised and "1. read weather.csv" in revised
    assert memory.strip() == "step 3 memory: temps: 18, 9, 24 (3 observations summarised)"
    assert "answer" in answer.splitlines()[0] and "The mean is 17.5." in answer
    assert error.strip() == "step 8 error: no answer within 8 rounds [sic]"  # markup in the text is shown as is


def test_colours_mark_success_and_failure_on_a_terminal():
    ok, bad = render(EVENTS[4], terminal=True), render(EVENTS[6], terminal=True)
    assert "\x1b[32m" in ok and "\x1b[31m" not in ok  # green border
    assert "\x1b[31m" in bad  # red border on an error
    assert "\x1b[33m" in render(EVENTS[7], terminal=True)  # a reflection in yellow


def test_long_observations_are_clipped_in_the_view():
    text = "\n".join(f"line {i}" for i in range(100))
    shown = render(AgentEvent("observation", {"name": "python", "text": text, "error": None, "images": 0}, 1))
    assert "line 29" in shown and "line 30" not in shown and "(70 more lines)" in shown


def test_the_live_view_prints_every_step_but_raw_replies():
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=False, color_system=None)
    with RichView(console) as view:
        for e in EVENTS:
            view.show(e)
    text = out.getvalue()
    assert "raw" not in text and "The mean is 17.5." in text and text.index("plan") < text.index("answer")


def test_plain_view_and_the_choice_of_view():
    out = io.StringIO()
    with PlainView(out) as view:
        for e in EVENTS:
            view.show(e)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("[")]  # one per event, text may wrap
    assert len(lines) == len(EVENTS) - 1 and lines[0] == "[0] plan: 1. read the file"
    assert lines[3] == '[1] observation: 3.14159' and lines[-1] == "[8] error: no answer within 8 rounds [sic]"

    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert isinstance(make_view(io.StringIO()), PlainView)  # not a terminal
    assert isinstance(make_view(Tty(), plain=True), PlainView)
    assert isinstance(make_view(Tty()), RichView)


def test_cli_plain_output_of_a_run(tmp_path, capsys):
    r = Agent(ScriptedModel(["1. write", {"tool_calls": [{"name": "write_file", "arguments": {
        "path": "a.txt", "content": "x"}}]}, "written"]), []).run("t")
    assert r.answer is None  # no write_file tool here: the error is an observation, the model answers anyway
    r.save(tmp_path / "run.jsonl")
    assert agent_main(["--replay", str(tmp_path / "run.jsonl"), "--plain"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[0] plan: 1. write" and out[1].startswith('[1] call: write_file({"path": "a.txt"')
    assert out[2].startswith("[1] observation: Error: unknown tool 'write_file'")


def test_cli_on_a_terminal_draws_the_rich_view(tmp_path):
    """`glm4 agent --replay` with stdout on a real pseudo-terminal: panels and colours, no plain lines."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    r = Agent(ScriptedModel(["1. say hi", "hi there"]), []).run("greet")
    r.save(tmp_path / "run.jsonl")
    leader, follower = os.openpty()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "80", "TERM": "xterm"}
    proc = subprocess.run([sys.executable, "-m", "glm4.cli", "agent", "--replay", str(tmp_path / "run.jsonl")],
                          stdout=follower, stderr=subprocess.PIPE, env=env, timeout=120)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    shown = b"".join(chunks).decode()
    assert proc.returncode == 0, proc.stderr
    assert "╭" in shown and "\x1b[" in shown and "hi there" in shown and "[0] plan:" not in shown
