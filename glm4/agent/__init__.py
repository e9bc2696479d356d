"""Agents: tools from Python functions, GLM-4's built-ins, and a sandboxed code interpreter.

    from glm4.agent import CodeInterpreter, ToolRegistry, Workspace, python_tool, browser_tool
    with CodeInterpreter(workspace="work") as py:      # a Jupyter kernel in bubblewrap, else nsjail (launchers.py)
        py.run("import math; math.pi")                 # Observation(text='3.141592653589793\\n')

    reg = ToolRegistry([get_weather, *Workspace("work").tools(), python_tool("work"), browser_tool("docs")])
    reg.specs()                                        # OpenAI `tools` for the chat API
    reg.call_tool_call(reply.tool_calls[0])            # Observation; never raises

    agent = Agent(LLMChat(glm4.LLM(path)), tools=[get_weather, python_tool("work")])   # or OpenAIChat(base_url=...)
    agent.run("task").answer                           # plan -> tool calls -> reflection on failure -> answer

Layout: schema (functions -> JSON Schema, typed validation), tools (Tool, ToolRegistry), observation,
files (workspace file tools), browser (offline simple_browser), sandbox (the bubblewrap command, rlimits,
seccomp), nsjail (the same sandbox through nsjail), launchers (bubblewrap, else nsjail, else refuse), interpreter (the kernel), builtins (`python` / `simple_browser` registry entries), models (the
chat API: LLMChat, OpenAIChat, ScriptedModel), loop (Agent: planner, executor, reflection, memory, events),
mcp_tools (MCP servers as tools, stdio ones sandboxed), suite (the task suite), view (the live rich view),
agent_cli (`glm4 agent`), chat_agent (`glm4 chat --agent`), gui/ (the AutoGLM GUI agent and a simulated phone).
The agent talks to a model only through the chat API (glm4.LLM.chat or an OpenAI-compatible endpoint);
it imports no model internals.
"""

from .browser import SimpleBrowser
from .builtins import LazyInterpreter, browser_tool, python_tool
from .files import PathOutsideWorkspace, Workspace
from .interpreter import CodeInterpreter
from .launchers import choose_launcher, launcher_status, open_sandbox
from .loop import Agent, AgentEvent, AgentResult, load_events, save_events
from .models import LLMChat, OpenAIChat, Reply, ScriptedModel
from .nsjail import nsjail_works
from .observation import Observation
from .sandbox import Limits, SandboxUnavailable, bwrap_works
from .schema import FunctionSchema, ToolDefinitionError
from .tools import Tool, ToolRegistry, builtin_tool

__all__ = [
    "Agent", "AgentEvent", "AgentResult", "LLMChat", "OpenAIChat", "Reply", "ScriptedModel", "load_events",
    "save_events", "CodeInterpreter", "FunctionSchema", "LazyInterpreter", "Limits", "Observation", "PathOutsideWorkspace",
    "SandboxUnavailable", "SimpleBrowser", "Tool", "ToolDefinitionError", "ToolRegistry", "Workspace",
    "browser_tool", "builtin_tool", "bwrap_works", "choose_launcher", "launcher_status", "nsjail_works",
    "open_sandbox", "python_tool",
]
