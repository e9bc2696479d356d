"""`glm4 agent "task"`: run the agent on a task with the built-in tools, showing each step as it happens.

    glm4 agent "How many lines does data.csv have?" --workspace work/ --model path/to/glm-4-9b-chat
    glm4 agent "..." --base-url http://127.0.0.1:8000/v1 --api-key KEY [--model-name NAME]
    glm4 agent --replay run.jsonl           # show a saved run's steps
    glm4 agent --suite --base-url URL       # the task suite (glm4.agent.suite) against that model
    glm4 agent --gui "Turn Wi-Fi off" --base-url URL    # the GUI agent on the simulated phone (a vision model)
On a terminal the steps are drawn live with rich (glm4.agent.view); `--plain`, or stdout not a terminal,
prints one line per step.
Tools: the workspace file tools and `python` (sandboxed; --no-python to leave it out, --unsafe to allow
running with no sandbox launcher; --sandbox bwrap|nsjail picks one), `simple_browser` over --docs DIR, the functions of --tools FILE.py (its
TOOLS list, or every public function defined there), and the tools of the MCP servers in --mcp FILE.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

from .builtins import browser_tool, python_tool
from .files import Workspace
from .loop import Agent, AgentEvent, load_events, save_events
from .models import LLMChat, OpenAIChat
from .suite import add_suite_arguments, format_report, run_suite
from .view import make_view


def load_tool_file(path: str) -> list:
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"glm4 agent: cannot load tools from {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if hasattr(mod, "TOOLS"):
        return list(mod.TOOLS)
    return [f for name, f in vars(mod).items() if inspect.isfunction(f) and not name.startswith("_")
            and f.__module__ == mod.__name__]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm4 agent", description=__doc__.split("\n\n")[0])
    p.add_argument("task", nargs="?", help="what the agent should do")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint folder (runs in process through glm4.LLM's chat API)")
    src.add_argument("--base-url", help="an OpenAI-compatible endpoint (glm4 serve, vLLM, a hosted GLM API)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model-name", default=None, help="model name at --base-url (default: the first listed)")
    p.add_argument("--builtin-style", action="store_true",
                   help="declare python / simple_browser as glm-4-9b-chat built-in tool types")
    p.add_argument("--workspace", default="agent-workspace", help="folder for file tools and /mnt/data")
    p.add_argument("--docs", help="a folder of documents for the offline simple_browser")
    p.add_argument("--tools", action="append", default=[], help="a Python file whose functions become tools")
    p.add_argument("--mcp", help='an MCP servers file: {"mcpServers": {name: {command, args} | {url}}}')
    p.add_argument("--no-python", action="store_true", help="no code interpreter")
    p.add_argument("--unsafe", action="store_true", help="run code without isolation if no sandbox launcher works")
    p.add_argument("--sandbox", choices=["bwrap", "nsjail"], default=None,
                   help="the sandbox launcher (default: bubblewrap, else nsjail)")
    p.add_argument("--plain", action="store_true", help="plain lines instead of the live view")
    p.add_argument("--max-rounds", type=int, default=10)
    p.add_argument("--no-plan", action="store_true")
    p.add_argument("--no-reflection", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--save", help="write the run's events to this jsonl file")
    p.add_argument("--replay", help="print the steps of a saved run and exit")
    p.add_argument("--suite", action="store_true", help="run the task suite against the model instead of a task")
    p.add_argument("--gui", action="store_true",
                   help="drive the simulated phone (glm4.agent.gui) with AutoGLM's actions; needs a vision model")
    add_suite_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replay:
        with make_view(sys.stdout, args.plain) as view:
            for e in load_events(args.replay):
                view.show(AgentEvent(e["kind"], e["data"], e["step"], e["time"]))
        return 0
    if not args.task and not args.suite:
        print("glm4 agent: a task is required (or --replay FILE, or --suite)", file=sys.stderr)
        return 2
    if args.base_url:
        try:
            model = OpenAIChat(args.base_url, args.api_key, args.model_name, builtin_style=args.builtin_style,
                               **({"max_tokens": args.max_tokens, "temperature": 0.0} if args.suite else {}))
        except Exception as e:  # noqa: BLE001 - an endpoint that does not answer: one line, no traceback
            print(f"glm4 agent: cannot reach {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    elif args.model:
        from glm4.engine.llm import LLM  # building the LLM is the one place the CLI touches the engine
        from glm4.engine.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0) if args.suite else None
        model = LLMChat(LLM(None if args.model == "default" else args.model), params=params,
                        builtin_style=args.builtin_style)
    else:
        print("glm4 agent: give --model PATH or --base-url URL", file=sys.stderr)
        return 2
    if args.gui:
        return run_gui(args, model)
    if args.suite:
        res = run_suite(lambda task, planner: model, planner=not args.no_plan, reflection=not args.no_reflection,
                        categories=set(args.category) if args.category else None, python=not args.no_python,
                        unsafe=args.unsafe, require_tool=args.require_tool, max_rounds=args.max_rounds,
                        memory=not args.no_memory, all_tools=args.all_tools)
        print(format_report(res))
        return 0
    tools: list = [*Workspace(args.workspace).tools()]
    if not args.no_python:
        tools.append(python_tool(args.workspace, unsafe=args.unsafe, launcher=args.sandbox))
    if args.docs:
        tools.append(browser_tool(args.docs))
    for f in args.tools:
        tools += load_tool_file(f)
    servers = None
    if args.mcp:
        from .mcp_tools import MCPServers

        servers = MCPServers.from_file(args.mcp)
        tools += servers.tools()
    agent = Agent(model, tools, planner=not args.no_plan, reflection=not args.no_reflection,
                  memory=not args.no_memory, max_rounds=args.max_rounds)
    events = []
    try:
        with make_view(sys.stdout, args.plain) as view:
            for ev in agent.stream(args.task):
                events.append(ev)
                view.show(ev)
    finally:
        agent.close()
        if servers is not None:
            servers.close()
        if args.save:
            save_events(events, args.save)
    answer = next((e for e in reversed(events) if e.kind == "answer"), None)
    return 0 if answer is not None else 1


def ask(prompt: str) -> str:
    """A line from the user; empty at the end of input (a pipe, no terminal)."""
    try:
        return input(prompt)
    except EOFError:
        return ""


def run_gui(args, model) -> int:
    """The GUI agent on the simulated phone: sensitive taps are confirmed and take-overs done at the prompt."""
    from .gui import GUIAgent, SimulatedPhone

    phone = SimulatedPhone()
    events = []
    with make_view(sys.stdout, args.plain) as view:
        def yes(prompt: str) -> bool:
            with view.paused():
                return ask(prompt).strip().lower() in ("y", "yes")

        def take_over(why: str) -> None:
            if yes(f"take over ({why}): sign in on the simulated phone? [y/N] "):
                phone.sign_in()

        agent = GUIAgent(model, phone, confirm=lambda why: yes(f"confirm: {why}? [y/N] "), take_over=take_over,
                         max_steps=args.max_rounds)
        try:
            for ev in agent.stream(args.task):
                events.append(ev)
                view.show(ev)
        finally:
            if args.save:
                save_events(events, args.save)
    return 0 if any(e.kind == "answer" for e in events) else 1


if __name__ == "__main__":
    sys.exit(main())
