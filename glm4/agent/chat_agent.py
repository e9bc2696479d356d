"""`glm4 chat --agent`: the terminal chat (glm4.serve.chat_cli) with the agent's tools, run as the model calls them.

    glm4 chat --agent [--model PATH] [--workspace DIR] [--docs DIR] [--tools tools.py] [--mcp servers.json]
                      [--no-python] [--unsafe] [--sandbox bwrap|nsjail] [any glm4 chat option]

The tools: the workspace file tools, `python` (the sandboxed interpreter; its kernel starts on the first
call), `simple_browser` over --docs, the functions of --tools FILE.py, the tools of the --mcp servers. Each
call runs through the ToolRegistry (arguments checked against the schema, a timeout, errors as the result)
and its result goes back to the model, which continues; `/tools` lists them. chat_cli's Repl takes a
`run_tool` hook; glm4/cli.py (which ranks above both) composes them: it routes `glm4 chat --agent` to this
module's main with the terminal chat module (glm4.serve.chat_cli) as `chat`, so the agent, which talks to
models only through the chat API, imports nothing of the server or the engine.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import TextIO

from .agent_cli import load_tool_file
from .builtins import browser_tool, python_tool
from .files import Workspace
from .tools import ToolRegistry

OBSERVATION_CHARS = 4000  # what the model reads of one result (head and tail kept)


def add_agent_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--agent", action="store_true", help="run tool calls with the agent's tools")
    ap.add_argument("--workspace", default="agent-workspace", help="folder for the file tools and /mnt/data")
    ap.add_argument("--docs", help="a folder of documents for the offline simple_browser")
    ap.add_argument("--mcp", help='an MCP servers file: {"mcpServers": {name: {command, args} | {url}}}')
    ap.add_argument("--no-python", action="store_true", help="no code interpreter")
    ap.add_argument("--unsafe", action="store_true", help="run code without isolation if no sandbox works")
    ap.add_argument("--sandbox", choices=["bwrap", "nsjail"], default=None, help="the launcher (default: the first that works)")


def agent_registry(workspace: str, *, python: bool = True, unsafe: bool = False, launcher: str | None = None,
                   docs: str | None = None, tool_files: list[str] = (), mcp=None, timeout: float = 60.0) -> ToolRegistry:
    """The agent's tools for a chat: workspace files, python, simple_browser, Python files, MCP tools."""
    tools: list = [*Workspace(workspace).tools()]
    if python:
        tools.append(python_tool(workspace, timeout=timeout, unsafe=unsafe, launcher=launcher))
    if docs:
        tools.append(browser_tool(docs))
    for f in tool_files:
        tools += load_tool_file(f)
    if mcp is not None:
        tools += mcp.tools()
    return ToolRegistry(tools, timeout=timeout)


def tool_runner(registry: ToolRegistry, chars: int = OBSERVATION_CHARS):
    """The chat's run_tool hook: an OpenAI tool call -> the observation text the model reads."""
    return lambda call: registry.call_tool_call(call).render(chars)


def run_chat(chat: ModuleType, session, registry: ToolRegistry, read, out: TextIO) -> int:
    """The chat loop (`chat.Repl`) with the registry's tools declared to the model and their calls run by it."""
    session.tools = registry.specs() or None
    return chat.Repl(session, read, out, run_tool=tool_runner(registry)).run()


def main(argv: list[str] | None, chat: ModuleType) -> int:
    """`glm4 chat --agent ...`; `chat` is the terminal chat module (build_parser, build_session, Repl)."""
    ap = chat.build_parser("glm4 chat --agent")
    add_agent_arguments(ap)
    args = ap.parse_args(argv)

    tool_files = [args.tools] if args.tools else []
    if any(not f.endswith(".py") for f in tool_files):
        print("glm4 chat --agent: --tools takes a Python file whose functions become tools", file=sys.stderr)
        return 2
    servers = registry = None
    try:
        if args.mcp:
            from .mcp_tools import MCPServers

            servers = MCPServers.from_file(args.mcp)
        registry = agent_registry(args.workspace, python=not args.no_python, unsafe=args.unsafe,
                                  launcher=args.sandbox, docs=args.docs, tool_files=tool_files, mcp=servers)
        args.tools = None
        session = chat.build_session(args)
    except (OSError, ValueError, TypeError, RuntimeError) as e:  # RuntimeError: a CheckpointError, an MCP start
        print(f"glm4 chat --agent: {e}", file=sys.stderr)
        if registry is not None:
            registry.close()
        if servers is not None:
            servers.close()
        return 2
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    try:
        return run_chat(chat, session, registry, input, sys.stdout)
    finally:
        registry.close()
        if servers is not None:
            servers.close()
