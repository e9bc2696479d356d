"""`glm4 chat --agent`: the terminal chat with the agent's tools. In process, a scripted model's tool calls
run through the real registry (files, the sandboxed python when a launcher works); as a real subprocess,
`glm4 chat --agent` over a tiny checkpoint lists the tools and chats."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from glm4.agent.chat_agent import agent_registry, run_chat
from glm4.agent.launchers import choose_launcher
from glm4.serve import chat_cli
from glm4.serve.chat_cli import ChatSession

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:  # the shape of chat_stream's final result that the Repl reads
    content: str | None
    tool_calls: list = field(default_factory=list)
    finish_reason: str = "stop"

    def message(self) -> dict:
        m = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m


class ScriptedSession(ChatSession):
    """A ChatSession whose replies are played from a script; a callable step sees the conversation."""

    def __init__(self, script):
        super().__init__(llm=None)
        self.script, self.seen_tools = list(script), []

    def reply(self):
        self.seen_tools.append([t["function"]["name"] for t in self.tools or []])
        step = self.script.pop(0)
        step = step(self.messages) if callable(step) else step
        if isinstance(step, str):
            yield {"type": "content", "text": step}
            result = Result(step)
        else:
            name, args = step
            call = {"id": f"call_{len(self.script)}", "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)}}
            yield {"type": "tool_call", "index": 0, "id": call["id"], "name": name}
            yield {"type": "tool_call", "index": 0, "arguments": call["function"]["arguments"]}
            result = Result(None, [call])
        self.messages.append(result.message())
        yield {"type": "done", "result": result}


def lines(items):
    it = iter(items)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_tool_calls_run_and_the_model_continues(tmp_path):
    (tmp_path / "n.txt").write_text("21")
    session = ScriptedSession([
        ("read_file", {"path": "n.txt"}),
        ("write_file", {"path": "double.txt", "content": "42"}),
        ("read_file", {"path": "../../etc/passwd"}),  # refused: an error result, the chat goes on
        lambda msgs: f"Done: {msgs[-5]['content']} doubled is in double.txt.",
        "bye",
    ])
    registry = agent_registry(str(tmp_path), python=False)
    out = io.StringIO()
    assert run_chat(chat_cli, session, registry, lines(["double the number in n.txt", "thanks"]), out) == 0
    text = out.getvalue()
    assert '-> read_file({"path": "n.txt"})' in text and "  <- 21" in text
    assert (tmp_path / "double.txt").read_text() == "42"
    assert "outside the workspace" in text
    assert "Done: 21 doubled is in double.txt." in text and "glm> bye" in text
    assert session.seen_tools[0] == ["read_file", "write_file", "list_files"]
    tool_msgs = [m for m in session.messages if m["role"] == "tool"]
    assert [m["content"] for m in tool_msgs][:2] == ["21", "wrote 2 bytes to double.txt"]
    assert tool_msgs[2]["content"].startswith("Error:")


def test_a_model_that_keeps_calling_is_stopped(tmp_path):
    session = ScriptedSession([("list_files", {})] * 4)
    out = io.StringIO()
    from glm4.agent.chat_agent import tool_runner
    from glm4.serve.chat_cli import Repl

    session.tools = agent_registry(str(tmp_path), python=False).specs()
    Repl(session, lines(["loop"]), out, run_tool=tool_runner(agent_registry(str(tmp_path), python=False)),
         max_tool_rounds=3).run()
    assert out.getvalue().count("-> list_files") == 4 and "(stopped after 3 rounds of tool calls)" in out.getvalue()


@pytest.mark.skipif(choose_launcher()[0] is None, reason=f"no sandbox launcher: {choose_launcher()[1]}")
def test_python_runs_sandboxed_from_the_chat(tmp_path):
    pytest.importorskip("ipykernel")
    session = ScriptedSession([("python", {"code": "x = 6 * 7\nprint(x, open('/mnt/data/in.txt').read())"}),
                               ("python", {"code": "import os; print(os.getuid() != 0, x)"}),
                               lambda msgs: "The answer is " + msgs[-3]["content"].split()[0]])
    (tmp_path / "in.txt").write_text("from the host")
    registry = agent_registry(str(tmp_path))
    out = io.StringIO()
    try:
        run_chat(chat_cli, session, registry, lines(["compute"]), out)
    finally:
        registry.close()
    text = out.getvalue()
    assert "<- 42 from the host" in text and "<- True 42" in text and "The answer is 42" in text
    assert "python" in session.seen_tools[0]


# ---- the real command


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_serve_util import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("chat-agent") / "tiny", seed=1)


def glm4_cli(args, stdin, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "glm4.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_glm4_chat_agent_as_a_subprocess(tiny, tmp_path):
    (tmp_path / "my_tools.py").write_text(
        "def shout(text: str) -> str:\n    \"\"\"Say it loudly.\"\"\"\n    return text.upper()\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n")
    r = glm4_cli(["chat", "--agent", "--model", str(tiny), "--no-python", "--max-tokens", "4", "--temperature", "0",
                  "--workspace", str(tmp_path / "ws"), "--tools", str(tmp_path / "my_tools.py"),
                  "--docs", str(tmp_path / "docs")], "/tools\nhello\n/exit\n", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "(tools: read_file, write_file, list_files, simple_browser, shout)" in r.stdout
    assert "glm> " in r.stdout
    bad = glm4_cli(["chat", "--agent", "--model", str(tiny), "--tools", str(tmp_path / "t.json")], "", tmp_path)
    assert bad.returncode == 2 and "--tools takes a Python file" in bad.stderr
