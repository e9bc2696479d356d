"""GLM-4's built-in tools as registry entries: `python` (the sandboxed interpreter) and `simple_browser`.

    reg = ToolRegistry([*Workspace(ws).tools(), python_tool(ws), browser_tool("docs/")])

`python_tool` starts its kernel on the first call (an agent that never runs code pays nothing) and keeps
it for the session; the registry's close() shuts it down.
"""

from __future__ import annotations

from pathlib import Path

from .browser import SimpleBrowser
from .interpreter import CodeInterpreter
from .observation import Observation
from .sandbox import WORKSPACE_MOUNT, Limits
from .tools import Tool, builtin_tool


class LazyInterpreter:
    """A CodeInterpreter made on first use; its start failure becomes the observation."""

    def __init__(self, workspace: str | Path, timeout: float = 60.0, limits: Limits | None = None,
                 unsafe: bool = False, launcher: str | None = None):
        self.workspace, self.timeout, self.limits, self.unsafe = workspace, timeout, limits, unsafe
        self.launcher = launcher
        self.interpreter: CodeInterpreter | None = None

    def run(self, code: str) -> Observation:
        if self.interpreter is None:
            self.interpreter = CodeInterpreter(self.workspace, timeout=self.timeout, limits=self.limits,
                                               unsafe=self.unsafe, launcher=self.launcher)
        return self.interpreter.run(code)

    def close(self) -> None:
        if self.interpreter is not None:
            self.interpreter.close()
            self.interpreter = None


def python_tool(workspace: str | Path, timeout: float = 60.0, limits: Limits | None = None,
                unsafe: bool = False, launcher: str | None = None) -> Tool:
    py = LazyInterpreter(workspace, timeout, limits, unsafe, launcher)
    desc = (f"Run Python code in a stateful Jupyter notebook and get its output, errors and figures. The cell "
            f"times out after {timeout:g} s. Files in {WORKSPACE_MOUNT} persist. There is no internet access.")
    return builtin_tool("python", py.run, desc, "the Python code to run", close=py.close)


def browser_tool(folder: str | Path) -> Tool:
    b = SimpleBrowser(folder)
    desc = ("Search and read a local collection of documents (offline). The query is one command: "
            'search("words") lists numbered results, mclick([ids]) opens results by number, '
            'open_url("path") opens a document by its path.')
    return builtin_tool("simple_browser", b.command, desc, 'search("..."), mclick([...]) or open_url("...")')
