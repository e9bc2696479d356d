"""MCP servers as agent tools: in process, over stdio in the sandbox, and the failures a server can cause
(hanging, dying mid-call, off-schema arguments, reaching for the network)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp", reason="MCP tools need the `mcp` package (v2)")

from glm4.agent import ToolRegistry  # noqa: E402
from glm4.agent.launchers import launcher_status  # noqa: E402
from glm4.agent.mcp_tools import MCPServer, MCPServers  # noqa: E402

SERVER = Path(__file__).parent / "fixtures" / "mcp_server.py"
LAUNCHERS = [pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name} does not work here: {why}"))
             for name, (ok, why) in launcher_status().items()]


@pytest.fixture
def in_process():
    sys.path.insert(0, str(SERVER.parent))
    try:
        import mcp_server
    finally:
        sys.path.remove(str(SERVER.parent))
    srv = MCPServer("calc", mcp_server.app, timeout=2).start()
    yield srv
    srv.close()


def test_tools_are_named_server__tool_with_the_servers_schema(in_process):
    reg = ToolRegistry(in_process.tools())
    names = [s["function"]["name"] for s in reg.specs()]
    assert names == ["calc__add", "calc__hang", "calc__die", "calc__connect", "calc__whoami", "calc__listdir"]
    add = reg.specs()[0]["function"]
    assert add["description"] == "Add two integers." and add["parameters"]["required"] == ["a", "b"]
    assert reg.call("calc__add", {"a": 2, "b": 40}).text == "42"
    obs = reg.call("calc__add", {"a": "two", "b": 1})  # checked against the server's schema before sending
    assert obs.error.startswith("invalid arguments for 'calc__add': a: 'two' is not of type 'integer'")


def test_a_hanging_tool_times_out_and_the_server_goes_on(in_process):
    t0 = time.monotonic()
    obs = in_process.call("hang", {"seconds": 60})
    assert "did not answer 'hang' within 2 s" in obs.error and time.monotonic() - t0 < 6
    assert in_process.call("add", {"a": 1, "b": 1}).text == "2"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_sandboxed_stdio_server_from_a_servers_file(tmp_path, launcher):
    (tmp_path / "servers.json").write_text(json.dumps(
        {"mcpServers": {"calc": {"command": "python", "args": [str(SERVER)], "launcher": launcher}}}))
    servers = MCPServers.from_file(tmp_path / "servers.json", timeout=2)
    try:
        (srv,) = servers.servers
        assert srv.isolation.startswith({"bwrap": "bubblewrap", "nsjail": "nsjail"}[launcher] + ": no network")
        reg = ToolRegistry(servers.tools())
        assert reg.call("calc__add", {"a": 20, "b": 22}).text == "42"
        assert int(reg.call("calc__whoami", {}).text) >= 60000  # a dedicated unprivileged uid
        assert reg.call("calc__listdir", {"path": "/root"}).text.startswith("refused:")
        repo = SERVER.parents[2]  # only the server's own folder is mounted (read-only), not the project
        assert reg.call("calc__listdir", {"path": str(repo)}).text == "tests"
        assert reg.call("calc__listdir", {"path": str(SERVER.parent.parent)}).text == "fixtures"
        assert reg.call("calc__connect", {"host": "127.0.0.1", "port": 22}).text.startswith("blocked:")
        assert reg.call("calc__connect", {}).text.startswith("blocked:")
        assert "did not answer" in reg.call("calc__hang", {}).error
        obs = reg.call("calc__die", {})  # the server exits mid-call
        assert obs.error and "calc" in obs.error
        later = reg.call("calc__add", {"a": 1, "b": 2})
        assert later.error and ("not running" in later.error or "failed" in later.error or "did not answer" in later.error)
    finally:
        servers.close()


def test_a_server_that_cannot_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="did not start"):
        MCPServers({"broken": {"command": str(tmp_path / "no-such-binary"), "sandbox": False}}, timeout=3)
    (tmp_path / "bad.json").write_text('{"servers": []}')
    with pytest.raises(ValueError, match="mcpServers"):
        MCPServers.from_file(tmp_path / "bad.json")
