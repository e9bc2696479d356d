"""Tools the agent can call: Python functions, schema-only tools, and GLM-4's built-ins, behind one registry.

    reg = ToolRegistry()
    @reg.tool
    def add(a: int, b: Annotated[int, "the other term"] = 1) -> int:
        '''Add two integers.'''
        return a + b
    reg.specs()                          # OpenAI `tools` list for the chat API
    reg.call("add", '{"a": 2}')          # Observation(text="3")
    reg.call("add", '{"a": "x"}')        # Observation(error="invalid arguments for 'add': a: Input should be ...")

A call never raises: unknown tools, arguments that are not JSON, too long or off-schema, exceptions and
timeouts all come back as an Observation with `error` set, which the agent hands to the model.

Built-ins (glm-4-9b-chat's `python` and `simple_browser`) take a raw body (code, or a browser command)
rather than JSON: glm4.chat's parser reports such a call as `{"code": body}` / `{"query": body}` (the keys
of glm4.chat.tools.BUILTIN_TOOLS); a raw string body that is not a JSON object is accepted as well. With
`builtin_style=True` (the chatglm format), `specs()` lists them as `{"type": "python"}` so the template
writes its own sections for them; otherwise they are ordinary functions with one string argument.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from glm4.chat.tools import BUILTIN_TOOLS, schema_errors

from .observation import Observation
from .schema import FunctionSchema

MAX_ARGUMENT_CHARS = 200_000  # a longer arguments string is refused before parsing


@dataclass
class Tool:
    """One callable tool. `handler(**kwargs)` returns an Observation, a str, or anything JSON-serialisable."""

    name: str
    description: str
    parameters: dict
    handler: Callable[..., Any]
    validate: Callable[[dict], tuple[dict | None, str | None]] | None = None  # typed conversion (functions)
    builtin: str | None = None  # "python" / "simple_browser": the raw-body key is BUILTIN_TOOLS[builtin]
    timeout: float | None = None  # seconds; None: the registry's default
    close: Callable[[], None] | None = None  # releases what the tool holds (a kernel)

    @classmethod
    def from_function(cls, fn: Callable, name: str | None = None, description: str | None = None,
                      timeout: float | None = None) -> Tool:
        fs = FunctionSchema(fn, name, description)
        return cls(fs.name, fs.description, fs.parameters, fn, fs.validate, timeout=timeout)

    def spec(self, builtin_style: bool = False) -> dict:
        if self.builtin and builtin_style:
            return {"type": self.builtin}
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _result_observation(value: Any) -> Observation:
    if isinstance(value, Observation):
        return value
    if value is None:
        return Observation("")
    if isinstance(value, str):
        return Observation(value)
    if hasattr(value, "model_dump_json"):
        return Observation(value.model_dump_json())
    try:
        return Observation(json.dumps(value, ensure_ascii=False, default=str))
    except (TypeError, ValueError):
        return Observation(str(value))


class ToolRegistry:
    """Named tools; `call(name, arguments)` checks the arguments, runs the tool and returns an Observation."""

    def __init__(self, tools: Iterable[Callable | Tool] = (), timeout: float = 60.0,
                 max_argument_chars: int = MAX_ARGUMENT_CHARS):
        self.tools: dict[str, Tool] = {}
        self.timeout = timeout
        self.max_argument_chars = max_argument_chars
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="glm4-tool")
        for t in tools:
            self.add(t)

    def add(self, tool: Callable | Tool, name: str | None = None, description: str | None = None,
            timeout: float | None = None) -> Tool:
        if not isinstance(tool, Tool):
            tool = Tool.from_function(tool, name, description, timeout)
        if tool.name in self.tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self.tools[tool.name] = tool
        return tool

    def tool(self, fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
             timeout: float | None = None):
        """Decorator: `@reg.tool` or `@reg.tool(name=..., timeout=...)`; returns the function unchanged."""
        def register(f: Callable) -> Callable:
            self.add(f, name, description, timeout)
            return f
        return register(fn) if fn is not None else register

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def specs(self, builtin_style: bool = False) -> list[dict]:
        return [t.spec(builtin_style) for t in self.tools.values()]

    def parse_arguments(self, tool: Tool, arguments: str | dict | None) -> tuple[dict | None, str | None]:
        """Arguments as a dict, or an error message. Built-ins also take their raw body as a plain string."""
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            if len(arguments) > self.max_argument_chars:
                return None, (f"arguments for {tool.name!r} are {len(arguments)} characters long; the limit is "
                              f"{self.max_argument_chars}")
            try:
                arguments = json.loads(arguments)
            except ValueError as e:
                if tool.builtin:
                    return {BUILTIN_TOOLS[tool.builtin]: arguments}, None
                return None, f"arguments for {tool.name!r} are not valid JSON: {e}"
            if tool.builtin and not isinstance(arguments, dict):
                return {BUILTIN_TOOLS[tool.builtin]: json.dumps(arguments)}, None
        if not isinstance(arguments, dict):
            return None, f"arguments for {tool.name!r} must be a JSON object, not {type(arguments).__name__}"
        return arguments, None

    def call(self, name: str, arguments: str | dict | None = None, timeout: float | None = None) -> Observation:
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return Observation(error=f"unknown tool {name!r} (available: {known})")
        args, err = self.parse_arguments(tool, arguments)
        if err is not None:
            return Observation(error=err)
        if tool.validate is not None:
            args, err = tool.validate(args)
        else:
            errs = schema_errors(tool.parameters, args)
            err = "; ".join(errs) if errs else None
        if err is not None:
            return Observation(error=f"invalid arguments for {name!r}: {err}")
        limit = timeout if timeout is not None else tool.timeout if tool.timeout is not None else self.timeout
        return self._run(tool, args, limit)

    def call_tool_call(self, call: dict, timeout: float | None = None) -> Observation:
        """Run an OpenAI-shaped tool call `{"function": {"name", "arguments"}}`."""
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        return self.call(str(fn.get("name")), fn.get("arguments"), timeout)

    def _run(self, tool: Tool, args: dict, limit: float | None) -> Observation:
        def invoke():
            out = tool.handler(**args)
            if inspect.isawaitable(out):
                out = asyncio.run(_await(out))
            return out

        if tool.builtin == "python":  # the interpreter enforces its own wall time (and keeps its state)
            try:
                return _result_observation(invoke())
            except Exception as e:  # noqa: BLE001 - a tool's failure is an observation
                return Observation(error=f"{type(e).__name__}: {e}")
        future = self._pool.submit(invoke)
        try:
            return _result_observation(future.result(timeout=limit))
        except concurrent.futures.TimeoutError:
            return Observation(error=f"tool {tool.name!r} did not finish within {limit:g} s")
        except Exception as e:  # noqa: BLE001 - a tool's failure is an observation
            return Observation(error=f"{type(e).__name__}: {e}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for t in self.tools.values():
            if t.close is not None:
                t.close()


async def _await(aw):
    return await aw


def builtin_tool(kind: str, handler: Callable[[str], Any], description: str, body: str,
                 close: Callable[[], None] | None = None) -> Tool:
    """A GLM-4 built-in whose body is raw text (code, a browser command) under BUILTIN_TOOLS[kind]."""
    key = BUILTIN_TOOLS[kind]
    params = {"type": "object", "properties": {key: {"type": "string", "description": body}}, "required": [key]}
    return Tool(kind, description, params, lambda **kw: handler(kw[key]), builtin=kind, close=close)
