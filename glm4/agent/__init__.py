"""Agents: tools from Python functions, GLM-4's built-ins, and a sandboxed code interpreter.

    from glm4.agent import CodeInterpreter, ToolRegistry, Workspace, python_tool, browser_tool
    with CodeInterpreter(workspace="work") as py:      # a Jupyter kernel in bubblewrap (see sandbox.py)
        py.run("import math; math.pi")                 # Observation(text='3.141592653589793\\n')

    reg = ToolRegistry([get_weather, *Workspace("work").tools(), python_tool("work"), browser_tool("docs")])
    reg.specs()                                        # OpenAI `tools` for the chat API
    reg.call_tool_call(reply.tool_calls[0])            # Observation; never raises

Layout: schema (functions -> JSON Schema, typed validation), tools (Tool, ToolRegistry), observation,
files (workspace file tools), browser (offline simple_browser), sandbox (bubblewrap command, rlimits,
seccomp), interpreter (the kernel), builtins (`python` / `simple_browser` registry entries).
The agent talks to a model only through the chat API (glm4.LLM.chat or an OpenAI-compatible endpoint);
it imports no model internals.
"""

from .browser import SimpleBrowser
from .builtins import LazyInterpreter, browser_tool, python_tool
from .files import PathOutsideWorkspace, Workspace
from .interpreter import CodeInterpreter
from .observation import Observation
from .sandbox import Limits, SandboxUnavailable, bwrap_works
from .schema import FunctionSchema, ToolDefinitionError
from .tools import Tool, ToolRegistry, builtin_tool

__all__ = [
    "CodeInterpreter", "FunctionSchema", "LazyInterpreter", "Limits", "Observation", "PathOutsideWorkspace",
    "SandboxUnavailable", "SimpleBrowser", "Tool", "ToolDefinitionError", "ToolRegistry", "Workspace",
    "browser_tool", "builtin_tool", "bwrap_works", "python_tool",
]
