"""glm4.agent tools: schemas from Python functions, argument checking, workspace files, the offline browser,
and glm-4-9b-chat's built-in calls routed from the chat format's parser to the right tool."""

from __future__ import annotations

import enum
import json
import os
import time
from typing import Annotated, Literal

import pydantic
import pytest

from glm4.agent import (
    FunctionSchema,
    Observation,
    SimpleBrowser,
    Tool,
    ToolDefinitionError,
    ToolRegistry,
    Workspace,
    browser_tool,
)
from glm4.chat import ChatFormat


class Unit(enum.Enum):
    C = "c"
    F = "f"


class Place(pydantic.BaseModel):
    city: str
    country: str = "CN"


def get_weather(city: Annotated[str, "the city, in English"], unit: Unit = Unit.C, days: int | None = None,
                place: Place | None = None, mode: Literal["brief", "full"] = "brief") -> dict:
    """Current weather of a city.

    Second paragraph: not part of the description.

    Args:
        days: how many days ahead
        mode: ignored here, the Annotated text wins for city
    """
    return {"city": city, "unit": unit.value, "days": days, "place": place.model_dump() if place else None}


def test_schema_from_type_hints_annotated_enum_model_defaults_optional():
    fs = FunctionSchema(get_weather)
    assert fs.name == "get_weather" and fs.description == "Current weather of a city."
    p = fs.parameters
    assert p["type"] == "object" and p["required"] == ["city"]
    props = p["properties"]
    assert props["city"] == {"type": "string", "description": "the city, in English"}
    assert props["unit"]["enum"] == ["c", "f"] and props["unit"]["default"] == "c"
    assert props["days"]["anyOf"] == [{"type": "integer"}, {"type": "null"}]
    assert props["days"]["description"] == "how many days ahead" and props["days"]["default"] is None
    assert props["mode"]["enum"] == ["brief", "full"] and props["mode"]["description"].startswith("ignored here")
    place = props["place"]["anyOf"][0]  # the pydantic model inlined, not a $ref
    assert place["properties"]["city"] == {"type": "string"} and place["required"] == ["city"]
    assert "$defs" not in p and '"title"' not in json.dumps(p)  # no pydantic titles


def test_schema_keeps_a_property_named_title_and_the_demo_required_flag():
    def note(title: Annotated[str, "heading", True], body: Annotated[str, "text", False]) -> str:
        """:param title: overridden by Annotated"""
        return title + (body or "")

    p = FunctionSchema(note).parameters
    assert set(p["properties"]) == {"title", "body"}
    assert p["properties"]["title"]["description"] == "heading"
    assert p["required"] == ["title"]  # GLM-4 demo style: Annotated[type, "description", required]


class Node(pydantic.BaseModel):
    name: str
    children: list[Node] = []


def test_recursive_model_keeps_defs():
    def walk(tree: Node) -> int:
        """Count nodes."""
        return 1

    p = FunctionSchema(walk).parameters
    assert "$defs" in p and "Node" in p["$defs"]
    assert ToolRegistry([walk]).call("walk", {"tree": {"name": "a", "children": [{"name": "b"}]}}).text == "1"


def test_functions_that_cannot_be_tools_say_why():
    def star(*args: int) -> int:
        return 0

    with pytest.raises(ToolDefinitionError, match=r"\*args"):
        FunctionSchema(star)


def test_arguments_are_checked_and_typed_before_the_call():
    seen = {}

    def book(place: Place, unit: Unit, n: int = 1) -> str:
        """Book."""
        seen.update(place=place, unit=unit, n=n)
        return "ok"

    reg = ToolRegistry([book])
    assert reg.call("book", '{"place": {"city": "Paris"}, "unit": "f", "n": 2}').text == "ok"
    assert isinstance(seen["place"], Place) and seen["unit"] is Unit.F and seen["n"] == 2
    seen.clear()
    bad = [
        ('{"place": {"city": "Paris"}}', "unit: Field required"),
        ('{"place": {"city": 1}, "unit": "c"}', "place.city"),
        ('{"place": {"city": "P"}, "unit": "k"}', "unit: Input should be 'c' or 'f'"),
        ('{"place": {"city": "P"}, "unit": "c", "extra": 1}', "extra: Extra inputs are not permitted"),
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"place": "' + "x" * 300_000 + '"}', "the limit is"),
    ]
    for args, msg in bad:
        obs = reg.call("book", args)
        assert obs.error is not None and msg in obs.error, (args[:40], obs.error)
    assert seen == {}  # never called with bad arguments


def test_failures_are_observations_never_exceptions():
    def boom(x: int) -> int:
        """Fails."""
        raise RuntimeError("disk on fire")

    def slow(x: int) -> int:
        """Sleeps."""
        time.sleep(5)
        return x

    async def later(x: int) -> int:
        """Async."""
        return x * 2

    reg = ToolRegistry([boom, later])
    reg.add(slow, timeout=0.2)
    assert reg.call("boom", {"x": 1}).error == "RuntimeError: disk on fire"
    t0 = time.monotonic()
    assert "did not finish within 0.2 s" in reg.call("slow", {"x": 1}).error
    assert time.monotonic() - t0 < 2
    assert reg.call("later", {"x": 21}).text == "42"
    assert "unknown tool 'nope'" in reg.call("nope", {}).error
    assert reg.call_tool_call({"id": "c1", "type": "function",
                               "function": {"name": "later", "arguments": '{"x": 2}'}}).text == "4"
    reg.close()


def test_schema_only_tools_use_the_one_json_schema_checker():
    params = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 5}}, "required": ["q"]}
    reg = ToolRegistry([Tool("lookup", "Look up.", params, lambda q: Observation(q.upper()))])
    assert reg.call("lookup", {"q": "abc"}).text == "ABC"
    assert "too long" in reg.call("lookup", {"q": "abcdefgh"}).error
    assert "'q' is a required property" in reg.call("lookup", {}).error


def test_duplicate_names_are_refused():
    reg = ToolRegistry([get_weather])
    with pytest.raises(ValueError, match="already registered"):
        reg.add(get_weather)


# ---- workspace files


def test_file_tools_stay_inside_the_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    (tmp_path / "secret.txt").write_text("host secret")
    os.symlink(tmp_path / "secret.txt", ws.root / "link.txt")
    os.symlink(tmp_path, ws.root / "up")
    reg = ToolRegistry(ws.tools())
    for path in ["../secret.txt", "../../etc/passwd", "/etc/passwd", "link.txt", "up/secret.txt",
                 "/mnt/data/../../etc/passwd", "a/../../secret.txt"]:
        for name, extra in [("read_file", {}), ("write_file", {"content": "x"}), ("list_files", {})]:
            obs = reg.call(name, {"path": path, **extra})
            assert obs.error and "outside the workspace" in obs.error, (name, path, obs)
    assert (tmp_path / "secret.txt").read_text() == "host secret"
    assert "NUL" in reg.call("read_file", {"path": "a\x00b"}).error


def test_file_tools_read_write_list(tmp_path):
    reg = ToolRegistry(Workspace(tmp_path).tools())
    assert reg.call("write_file", {"path": "/mnt/data/notes/a.txt", "content": "héllo"}).text == \
        "wrote 6 bytes to notes/a.txt"
    assert reg.call("write_file", {"path": "notes/a.txt", "content": "!", "append": True}).ok
    assert reg.call("read_file", {"path": "notes/a.txt"}).text == "héllo!"
    assert reg.call("read_file", {"path": "notes/a.txt", "offset": 5}).text == "!"
    assert reg.call("list_files", {}).text == "notes/"
    assert reg.call("list_files", {"path": "notes"}).text == "a.txt  7 bytes"
    assert "no such file" in reg.call("read_file", {"path": "missing.txt"}).error
    assert "is a folder" in reg.call("write_file", {"path": "notes", "content": "x"}).error
    big = "x" * (11 << 20)
    assert "limit" in reg.call("write_file", {"path": "big.txt", "content": big}).error
    assert not (tmp_path / "big.txt").exists()


# ---- the offline browser


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    (d / "guide").mkdir(parents=True)
    (d / "guide" / "paged.md").write_text("# Paged attention\n\nThe KV cache is split into fixed-size blocks.\n")
    (d / "rope.txt").write_text("Rotary position embeddings rotate query and key pairs.\n")
    (d / "page.html").write_text("<html><head><title>Sampling</title><script>var x;</script></head>"
                                 "<body><p>Top-p &amp; temperature sampling.</p></body></html>")
    (d / "zh.md").write_text("# 智谱\n\n智谱AI训练了 GLM-4 模型。\n")
    (d / "image.png").write_bytes(b"\x89PNG")
    return d


def test_browser_search_mclick_open(docs):
    b = SimpleBrowser(docs)
    assert sorted(d.path for d in b.docs) == ["guide/paged.md", "page.html", "rope.txt", "zh.md"]
    obs = b.command('search("kv cache blocks")')
    assert obs.text.startswith("【0†Paged attention†guide/paged.md】") and "fixed-size blocks" in obs.text
    assert "rope.txt" not in obs.text
    assert "Top-p & temperature sampling." in b.command("search('sampling temperature')").text
    assert "var x" not in b.command("mclick([0])").text
    assert "Rotary" in b.command("open_url('rope.txt')").text
    assert "Rotary" in b.command('open_url("file:///rope.txt")').text
    assert "智谱AI" in b.command('search("智谱")').text
    assert "no internet" in b.command('open_url("https://example.com")').error
    assert "no documents match" in b.command('search("zzzz")').text
    assert b.command('search("rotary", recency_days=1)').text.startswith("【0†Rotary")


def test_browser_commands_are_parsed_never_evaluated(docs, tmp_path):
    b = SimpleBrowser(docs)
    canary = tmp_path / "canary"
    for body in [f"__import__('os').system('touch {canary}')", f"search(open('{canary}', 'w'))",
                 "search(", "mclick(ids=[0]) ; open_url('x')", "exec('1')"]:
        obs = b.command(body)
        assert obs.error, body
    assert not canary.exists()
    assert "search first" in b.command("mclick([7])").error


# ---- glm-4-9b-chat built-in calls: the chat format's parse, routed to the tool


def test_chatglm_builtin_calls_are_parsed_and_routed(docs):
    fmt = ChatFormat("chatglm")
    reg = ToolRegistry([browser_tool(docs), get_weather])
    tools = reg.specs(builtin_style=True)
    assert tools[0] == {"type": "simple_browser"}
    prompt = fmt.render([{"role": "user", "content": "hi"}], tools=tools)
    assert "## simple_browser" in prompt and "## get_weather" in prompt
    out = fmt.parse('simple_browser\nsearch("rotary embeddings")', tools)
    (call,) = out.tool_calls
    assert call["function"]["name"] == "simple_browser"
    assert json.loads(call["function"]["arguments"]) == {"query": 'search("rotary embeddings")'}
    assert "【0†Rotary" in reg.call_tool_call(call).text
    out = fmt.parse('get_weather\n{"city": "Paris", "unit": "f"}', tools)
    assert json.loads(reg.call_tool_call(out.tool_calls[0]).text)["unit"] == "f"
    # a raw body that arrives unwrapped (another stack's parser) is accepted for a built-in
    assert "【0†Rotary" in reg.call("simple_browser", 'search("rotary")').text


def test_function_style_builtins_for_other_formats(docs):
    reg = ToolRegistry([browser_tool(docs)])
    (spec,) = reg.specs()
    assert spec["function"]["name"] == "simple_browser"
    assert spec["function"]["parameters"]["required"] == ["query"]
    assert "missing" in reg.call("simple_browser", {}).error or "required" in reg.call("simple_browser", {}).error
