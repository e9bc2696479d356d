"""The agent's view of a model: `complete(messages, tools, tool_choice) -> Reply`, over the chat API only.

    LLMChat(glm4.LLM(path))                               # in process: llm.chat(...)
    OpenAIChat(base_url="http://127.0.0.1:8000/v1")       # `glm4 serve`, vLLM, hosted GLM APIs (openai client)
    ScriptedModel(["plan...", {"tool_calls": [...]}, "the answer"])   # plays given replies (tests, replays)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Reply:
    content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI shape: {"id", "type", "function": {...}}
    reasoning: str | None = None

    def message(self) -> dict:
        m: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m

    def to_dict(self) -> dict:
        return {"content": self.content, "tool_calls": self.tool_calls, "reasoning": self.reasoning}


class ChatModel(Protocol):
    builtin_style: bool  # True for glm-4-9b-chat: python / simple_browser are declared as built-in tool types

    def complete(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = "auto") -> Reply:
        ...


class LLMChat:
    """An in-process glm4.LLM through its chat API (`llm.chat`), nothing deeper."""

    def __init__(self, llm, params=None, builtin_style: bool = False, **chat_kwargs: Any):
        self.llm, self.params, self.builtin_style, self.kwargs = llm, params, builtin_style, chat_kwargs

    def complete(self, messages, tools=None, tool_choice="auto") -> Reply:
        r = self.llm.chat(messages, tools=tools or None, tool_choice=tool_choice if tools else "none",
                          params=self.params, **self.kwargs)
        return Reply(r.content, list(r.tool_calls or []), getattr(r, "reasoning", None))


class OpenAIChat:
    """Any OpenAI-compatible endpoint through the official `openai` client."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                 builtin_style: bool = False, client=None, **create_kwargs: Any):
        if client is None:
            import openai

            client = openai.OpenAI(base_url=base_url, api_key=api_key or "none")
        self.client, self.builtin_style, self.kwargs = client, builtin_style, create_kwargs
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        return self.client.models.list().data[0].id

    def complete(self, messages, tools=None, tool_choice="auto") -> Reply:
        kw = dict(self.kwargs)
        if tools:
            kw.update(tools=tools, tool_choice=tool_choice)
        r = self.client.chat.completions.create(model=self.model, messages=messages, **kw)
        msg = r.choices[0].message
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                               "arguments": c.function.arguments}}
                 for c in (msg.tool_calls or [])]
        reasoning = getattr(msg, "reasoning_content", None) or getattr(msg, "reasoning", None)
        return Reply(msg.content, calls, reasoning)


ScriptStep = str | dict | Reply | Callable[[list[dict], list[dict] | None, Any], "str | dict | Reply"]


class ScriptedModel:
    """Plays given replies in order: a str is content, a dict is `{"content", "tool_calls"}` (tool calls may
    be given as `{"name", "arguments"}` with arguments as a dict), a callable gets (messages, tools,
    tool_choice). It records every request, so tests can check what the agent sent."""

    builtin_style = False

    def __init__(self, replies: Sequence[ScriptStep]):
        self.replies = list(replies)
        self.requests: list[dict] = []

    @classmethod
    def from_events(cls, events: Sequence[dict]) -> ScriptedModel:
        """The model replies recorded in a run's events (see Agent.save / load_events): a replay."""
        return cls([Reply(**e["data"]) for e in events if e["kind"] == "reply"])

    def complete(self, messages, tools=None, tool_choice="auto") -> Reply:
        self.requests.append({"messages": json.loads(json.dumps(messages, default=str)), "tools": tools,
                              "tool_choice": tool_choice})
        if not self.replies:
            raise RuntimeError("the scripted model has no reply left")
        step = self.replies.pop(0)
        if callable(step) and not isinstance(step, Reply):
            step = step(messages, tools, tool_choice)
        return as_reply(step, len(self.requests))


def as_reply(step: str | dict | Reply, n: int = 0) -> Reply:
    if isinstance(step, Reply):
        return step
    if isinstance(step, str):
        return Reply(step)
    calls = []
    for i, c in enumerate(step.get("tool_calls") or []):
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        calls.append({"id": c.get("id", f"call_{n}_{i}"), "type": "function",
                      "function": {"name": fn["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return Reply(step.get("content"), calls, step.get("reasoning"))
