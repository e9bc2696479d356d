"""MCP servers as agent tools (the `mcp` package, v2): stdio servers (sandboxed by default) and streamable HTTP.

    servers = MCPServers.from_file("servers.json")    # {"mcpServers": {"calc": {"command": "python", "args": [...]},
    reg = ToolRegistry(servers.tools())                #                 "web": {"url": "http://127.0.0.1:9000/mcp"}}}
    reg.call("calc__add", {"a": 1, "b": 2})            # tools are named server__tool
    servers.close()

Each server gets one client session, held open by a task on a private asyncio loop in a background
thread; calls from the (synchronous) agent are sent to that loop and waited for with a timeout, so a server
that hangs gives a timeout observation and one that dies gives an error observation, never a stuck agent.
A stdio server is launched through the sandbox (bubblewrap, else nsjail: no network, an empty private
workspace, rlimits, the seccomp filter; `"launcher": "nsjail"` picks one) unless its entry says `"sandbox": false`; a Python server (`command`
"python"/"python3") runs on this environment's Python mounted read-only, and the folders of the files in its
`args` are mounted read-only at their own paths.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import sys
import tempfile
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from .launchers import open_sandbox
from .observation import Observation
from .sandbox import Limits, Sandbox, SandboxUnavailable, python_mounts
from .tools import Tool

PYTHON_NAMES = {"python", "python3", sys.executable}
RUN_SCRIPT = (  # in the sandbox: this environment's site folders, then the server as __main__
    "import runpy, site, sys; [site.addsitedir(p) for p in sys.argv[1].split(':') if p]; del sys.argv[:2]\n"
    "if sys.argv[0] == '-m':\n    del sys.argv[0]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "else:\n    runpy.run_path(sys.argv[0], run_name='__main__')"
)


class MCPServer:
    """One MCP server: `start()`, `tools()` (registry Tools named server__tool), `call(tool, args)`, `close()`."""

    def __init__(self, name: str, config: dict | Any, timeout: float = 30.0, limits: Limits | None = None):
        self.name, self.config, self.timeout = name, config, timeout
        self.limits = limits or Limits(cpu_seconds=300, memory_bytes=2 << 30)
        self.client = None
        self.sandbox: Sandbox | None = None
        self._tmp: Path | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"mcp-{name}")
        self._stop: asyncio.Event | None = None
        self._session_task = None
        self.isolation = "in process" if not isinstance(config, dict) else "none"

    # ---- lifecycle

    def start(self) -> MCPServer:
        self._thread.start()
        target = self._target()
        ready = asyncio.run_coroutine_threadsafe(self._open(target), self._loop)
        try:
            ready.result(timeout=self.timeout + 30)
        except Exception as e:
            self.close()
            while isinstance(getattr(e, "exceptions", None), tuple) and e.exceptions:  # anyio's task groups wrap it
                e = e.exceptions[0]
            raise RuntimeError(f"MCP server {self.name!r} did not start: {type(e).__name__}: {e}") from None
        return self

    def _target(self):
        from mcp import StdioServerParameters

        cfg = self.config
        if not isinstance(cfg, dict):
            return cfg  # an in-process server object (tests) or a Transport
        if "url" in cfg:
            self.isolation = "remote (streamable HTTP)"
            return cfg["url"]
        command, args = cfg["command"], [str(a) for a in cfg.get("args", [])]
        cwd = Path(cfg.get("cwd") or ".")
        env = {str(k): str(v) for k, v in (cfg.get("env") or {}).items()}
        if not cfg.get("sandbox", True):
            self.isolation = "none (sandbox: false in the servers file)"
            return StdioServerParameters(command=command, args=args, env=env or None, cwd=cfg.get("cwd"))
        self._tmp = Path(tempfile.mkdtemp(prefix=f"glm4-mcp-{self.name}-"))
        try:
            self.sandbox = open_sandbox(self._tmp / "ws", self.limits, launcher=cfg.get("launcher"))
        except SandboxUnavailable as e:
            raise RuntimeError(f"{e}; set \"sandbox\": false for {self.name!r} to run it unsandboxed") from None
        _, python, home, sites = python_mounts()
        inside_env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", **env}
        if command in PYTHON_NAMES:
            if home is not None:
                inside_env.update(PYTHONHOME=home, LD_LIBRARY_PATH=home + "/lib")
            argv = [python, "-S", "-s", "-c", RUN_SCRIPT, ":".join(sites), *args]
        else:
            argv = [command, *args]
        # files named in args: absolute paths (the sandbox starts in its own /mnt/data), folders mounted read-only
        files = {a: (cwd / a).resolve() for a in args if not a.startswith("-") and (cwd / a).exists()}
        argv = [str(files[a]) if a in files else a for a in argv]
        binds = {str(p.parent): str(p.parent) for p in files.values()}
        full = self.sandbox.spawn_argv(argv, env=inside_env, ro_binds=binds)
        self.isolation = self.sandbox.describe()
        return StdioServerParameters(command=full[0], args=full[1:])

    async def _open(self, target) -> None:
        from mcp import Client

        opened = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()

        async def hold():  # the session lives in one task: anyio scopes must close where they opened
            try:
                # the library's own read timeout a little later than the wait in call(): ours answers, always
                async with Client(target, read_timeout_seconds=self.timeout + 2) as client:
                    self.client = client
                    self._tools = (await client.list_tools()).tools
                    opened.set_result(None)
                    await self._stop.wait()
            except BaseException as e:  # noqa: BLE001 - reported to start(), or ends a dead session
                if not opened.done():
                    opened.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            finally:
                self.client = None

        self._session_task = asyncio.ensure_future(hold())
        await opened

    def close(self) -> None:
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
            if self._session_task is not None:
                try:
                    asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(self._session_task), 10),
                                                     self._loop).result(timeout=15)
                except Exception:  # noqa: BLE001 - a server that will not shut down is killed with the sandbox
                    pass
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if self.sandbox is not None:
            self.sandbox.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # ---- tools

    def tools(self) -> list[Tool]:
        out = []
        for t in self._tools:
            schema = t.input_schema if isinstance(t.input_schema, dict) else {"type": "object"}
            out.append(Tool(f"{self.name}__{t.name}", t.description or "", schema,
                            handler=lambda _tool=t.name, **kw: self.call(_tool, kw), timeout=self.timeout + 5))
        return out

    def call(self, tool: str, arguments: dict) -> Observation:
        if self.client is None:
            return Observation(error=f"MCP server {self.name!r} is not running (it exited or was closed)")
        fut = asyncio.run_coroutine_threadsafe(self.client.call_tool(tool, arguments), self._loop)
        try:
            result = fut.result(timeout=self.timeout)
        except FutureTimeout:
            fut.cancel()
            return Observation(error=f"MCP server {self.name!r} did not answer {tool!r} within {self.timeout:g} s")
        except Exception as e:  # noqa: BLE001 - a dead server, a protocol error: an observation
            return Observation(error=f"MCP server {self.name!r} failed on {tool!r}: {type(e).__name__}: {e}")
        return result_observation(result)


def result_observation(result) -> Observation:
    texts, images = [], []
    for block in result.content or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            texts.append(block.text)
        elif kind == "image" and getattr(block, "mime_type", "") == "image/png":
            images.append(base64.b64decode(block.data))
        else:
            texts.append(json.dumps(block.model_dump(mode="json", exclude_none=True), ensure_ascii=False))
    if not texts and result.structured_content is not None:
        texts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    text = "\n".join(texts)
    if result.is_error:
        return Observation(error=text or "the tool reported an error", images=images)
    return Observation(text, images=images)


class MCPServers:
    """The servers of a servers file (`{"mcpServers": {name: {command, args, env, sandbox} | {url}}}`)."""

    def __init__(self, servers: dict[str, dict | Any], timeout: float = 30.0):
        self.servers = [MCPServer(name, cfg, timeout) for name, cfg in servers.items()]
        started = []
        try:
            for s in self.servers:
                started.append(s.start())
        except Exception:
            for s in started:
                s.close()
            raise

    @classmethod
    def from_file(cls, path: str | os.PathLike, timeout: float = 30.0) -> MCPServers:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        servers = data.get("mcpServers", data.get("servers"))
        if not isinstance(servers, dict):
            raise ValueError(f"{path}: expected {{\"mcpServers\": {{name: {{...}}}}}}")
        return cls(servers, timeout)

    def tools(self) -> list[Tool]:
        return [t for s in self.servers for t in s.tools()]

    def close(self) -> None:
        for s in self.servers:
            s.close()
