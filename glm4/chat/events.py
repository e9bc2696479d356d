"""What a reply parser emits, the one fold of those events, and the one mapping onto OpenAI deltas.

  ContentDelta(text)                     assistant text (whole reply content = concatenation, stripped)
  ReasoningDelta(text)                   thinking (`<think>...</think>`)
  ToolCallStart(index, id, name)         a call begins; its name is final
  ToolCallDelta(index, arguments)        the next piece of the call's JSON arguments string
  ToolCallEnd(index, errors)             the call is complete; `errors` = JSON-schema violations (may be [])
  ToolCallInvalid(index, reason)         a started call proved malformed: withdrawn, its raw text follows as content
  Notice(message)                        text that looked like a call was kept as content, or a value was coerced

`Fold` accumulates events the way a client of the stream does (content, reasoning, calls by index,
diagnostics); `collect(events)` is that fold's result. `openai_delta(event)` is the `choices[0].delta`
of an OpenAI chunk: thinking goes out as both `reasoning_content` (OpenAI-compatible servers, SGLang)
and `reasoning` (vLLM's newer name), so clients of either read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ContentDelta:
    text: str
    type: str = field(default="content", init=False)


@dataclass(frozen=True)
class ReasoningDelta:
    text: str
    type: str = field(default="reasoning", init=False)


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str
    type: str = field(default="tool_call_start", init=False)


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    arguments: str
    type: str = field(default="tool_call_delta", init=False)


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    errors: tuple[str, ...] = ()
    type: str = field(default="tool_call_end", init=False)


@dataclass(frozen=True)
class ToolCallInvalid:
    index: int
    reason: str
    type: str = field(default="tool_call_invalid", init=False)


@dataclass(frozen=True)
class Notice:
    message: str
    type: str = field(default="notice", init=False)


Event = ContentDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | ToolCallEnd | ToolCallInvalid | Notice


def openai_delta(ev: Event) -> dict | None:
    """The OpenAI `delta` dict of one event, or None for events a client does not see."""
    if isinstance(ev, ContentDelta):
        return {"content": ev.text} if ev.text else None
    if isinstance(ev, ReasoningDelta):
        return {"reasoning_content": ev.text, "reasoning": ev.text} if ev.text else None
    if isinstance(ev, ToolCallStart):
        return {"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                "function": {"name": ev.name, "arguments": ""}}]}
    if isinstance(ev, ToolCallDelta):
        return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]}
    return None


def openai_deltas(events: Iterable[Event]) -> list[dict]:
    """Every client-visible event as an OpenAI `delta` dict, in order."""
    return [d for d in map(openai_delta, events) if d is not None]


class ParsedOutput(tuple):
    """(content, tool_calls) with `.reasoning` and `.diagnostics` (reasons and schema errors) attached."""

    def __new__(cls, content, tool_calls, reasoning=None, diagnostics=()):
        self = super().__new__(cls, (content, tool_calls))
        self.reasoning = reasoning
        self.diagnostics = list(diagnostics)
        return self

    @property
    def content(self) -> str | None:
        return self[0]

    @property
    def tool_calls(self) -> list[dict]:
        return self[1]


class Fold:
    """The reply so far, folded from events exactly as a client of the stream folds them."""

    def __init__(self):
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict] = {}  # OpenAI tool calls by index, arguments accumulated
        self.diagnostics: list[str] = []

    def add(self, events: Iterable[Event]) -> None:
        for ev in events:
            if isinstance(ev, ContentDelta):
                self.content.append(ev.text)
            elif isinstance(ev, ReasoningDelta):
                self.reasoning.append(ev.text)
            elif isinstance(ev, ToolCallStart):
                self.calls[ev.index] = {"id": ev.id, "type": "function",
                                        "function": {"name": ev.name, "arguments": ""}}
            elif isinstance(ev, ToolCallDelta):
                if ev.index in self.calls:
                    self.calls[ev.index]["function"]["arguments"] += ev.arguments
            elif isinstance(ev, ToolCallEnd):
                name = self.calls[ev.index]["function"]["name"] if ev.index in self.calls else "?"
                self.diagnostics += [f"tool call {ev.index} ({name}): {e}" for e in ev.errors]
            elif isinstance(ev, ToolCallInvalid):
                self.calls.pop(ev.index, None)
                self.diagnostics.append(ev.reason)
            elif isinstance(ev, Notice):
                self.diagnostics.append(ev.message)

    @property
    def tool_calls(self) -> list[dict]:
        return [self.calls[i] for i in sorted(self.calls)]

    def result(self) -> ParsedOutput:
        calls = self.tool_calls
        text = "".join(self.content)
        return ParsedOutput(text if text or not calls else None, calls, "".join(self.reasoning) or None,
                            self.diagnostics)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """The OpenAI finish_reason: a reply that stopped after calling tools finished with "tool_calls"."""
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason

    def message(self) -> dict:
        """The OpenAI assistant message (thinking under both `reasoning_content` and `reasoning`)."""
        content, calls = self.result()[:2]
        m: dict = {"role": "assistant", "content": content, "tool_calls": calls or None}
        reasoning = "".join(self.reasoning)
        if reasoning:
            m["reasoning_content"] = m["reasoning"] = reasoning
        return m


def collect(events: Iterable[Event]) -> ParsedOutput:
    """Fold a parser's events into (content, tool_calls) exactly as a client of the stream would."""
    fold = Fold()
    fold.add(events)
    return fold.result()
