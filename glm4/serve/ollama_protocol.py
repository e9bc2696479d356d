"""Ollama API shapes (requests of /api/chat, /api/generate, /api/show; the `options` read) and their mapping
onto what the chat planner and the engine take.

As Ollama's server reads a request, unknown fields and unknown `options` are ignored; `stream` defaults to
true. Known options: temperature, top_p, top_k, min_p, num_predict (<= 0: up to the context), stop, seed,
repeat_penalty, presence_penalty, frequency_penalty; the rest (num_ctx, num_gpu, mirostat, ...) change
nothing here. `format` is "json" or a JSON schema; `think` true / false / "low" | "medium" | "high".
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 16


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Ollama's server ignores fields it does not know


class Options(_Lenient):
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    num_predict: int | None = None
    stop: list[str] | str | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)


class ToolCallFunction(_Lenient):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)  # an object in Ollama (a JSON string accepted)


class ToolCall(_Lenient):
    id: str | None = None
    function: ToolCallFunction


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


Format = Literal["", "json"] | dict[str, Any]
Think = bool | Literal["low", "medium", "high"]


class _GenerateFields(_Lenient):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Format | None = None
    options: dict[str, Any] | None = None
    think: Think | None = None
    keep_alive: float | str | None = None  # accepted: the model stays loaded for the server's life
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ChatRequest(_GenerateFields):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_GenerateFields):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[str] | None = None


class ShowRequest(_Lenient):
    model: str | None = None
    name: str | None = None  # the older spelling
    verbose: bool | None = None


# ---------------------------------------------------------------------------------------------
# Ollama -> the planner's (OpenAI-shaped) inputs


def openai_messages(messages: list[Message]) -> list[dict]:
    """Ollama messages as the planner takes them: tool calls with ids, each tool result answering a call
    (by `tool_call_id`, else by `tool_name`, else the earliest unanswered one)."""
    out, open_calls = [], []  # open_calls: (id, name) of calls not answered yet
    for k, m in enumerate(messages):
        d: dict = {"role": m.role, "content": user_content(m.content or "", m.images)}
        if m.role == "assistant":
            if m.thinking:
                d["reasoning_content"] = m.thinking
            calls = []
            for j, tc in enumerate(m.tool_calls or []):
                cid = tc.id or f"call_{k}_{j}"
                args = tc.function.arguments
                calls.append({"id": cid, "type": "function", "function": {
                    "name": tc.function.name, "arguments": args if isinstance(args, str) else json.dumps(args)}})
                open_calls.append((cid, tc.function.name))
            if calls:
                d["tool_calls"], d["content"] = calls, m.content or None
        elif m.role == "tool":
            match = [c for c in open_calls if c[0] == m.tool_call_id or (not m.tool_call_id and c[1] == m.tool_name)]
            call = (match or open_calls or [(m.tool_call_id or f"call_{k}", None)])[0]
            if call in open_calls:
                open_calls.remove(call)
            d["tool_call_id"] = call[0]
        out.append(d)
    return out


def user_content(text: str, images: list[str] | None) -> str | list[dict]:
    """A message's text, with its `images` (base64, no data: prefix) as image_url parts before it (the planner
    refuses them on a text-only checkpoint, and on a message that is not the user's)."""
    if not images:
        return text
    parts = [{"type": "image_url", "image_url": {"url": "data:image;base64," + b64}} for b64 in images]
    return [*parts, {"type": "text", "text": text}]


def response_format(fmt: Format | None) -> dict | None:
    """Ollama's `format` as the planner's response_format."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}


def thinking_switches(think: Think | None) -> dict:
    """`think` as the planner's enable_thinking / reasoning_effort."""
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"enable_thinking": think}
    return {"enable_thinking": True, "reasoning_effort": think}


def read_options(options: dict | None) -> Options:
    """The options this server acts on (others ignored); a known option of the wrong type is a ValueError."""
    o = Options.model_validate(options or {})
    stop = [o.stop] if isinstance(o.stop, str) else (o.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ValueError(f"options.stop: at most {MAX_STOP} non-empty strings")
    o.stop = stop or None
    return o
