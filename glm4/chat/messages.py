"""Message shapes: OpenAI messages <-> what each GLM template reads, checked once on the way in.

Two shapes exist: the OpenAI one (`role` tool, assistant `tool_calls`) read by the GLM-4.5+ templates, and the
native glm-4-9b-chat / 0414 one (`role` observation, one assistant turn per call with `metadata` = tool name).
`check_messages` / `check_tools` are the one structural check below the HTTP edge; the formats convert.
"""

from __future__ import annotations

import json
from typing import Any


class ChatFormatError(ValueError):
    """Bad messages/tools for a chat format, or an unusable chat template."""


def text_of(content: Any) -> str:
    """Message content as a string: None -> "", OpenAI content parts -> their text joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                out.append(str(part.get("text", "")))
        return "".join(out)
    raise ChatFormatError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def check_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
        raise ChatFormatError("tools must be a list of dicts")
    return list(tools)


def check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatFormatError(f"message {i} must be a dict with a string 'role'")
        if m.get("tools") is not None:
            check_tools(m["tools"])
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, (list, tuple)) and all(isinstance(c, dict) for c in calls)):
            raise ChatFormatError(f"message {i}: tool_calls must be a list of dicts")
        meta = m.get("metadata")
        if meta is not None and not isinstance(meta, str):
            raise ChatFormatError(f"message {i}: metadata must be a string (the called tool's name)")
    return list(messages)


def args_str(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def args_dict(args: Any, name: str) -> dict:
    """A call's arguments as the dict the XML templates iterate (OpenAI clients send a JSON string)."""
    if isinstance(args, dict):
        return args
    if args is None or (isinstance(args, str) and not args.strip()):
        return {}
    try:
        val = json.loads(args)
    except (TypeError, ValueError):
        raise ChatFormatError(f"tool call {name!r}: arguments are not valid JSON: {args!r:.80}") from None
    if not isinstance(val, dict):
        raise ChatFormatError(f"tool call {name!r}: arguments must be a JSON object")
    return val


def call_function(tc: Any) -> dict:
    fn = tc.get("function", tc) if isinstance(tc, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatFormatError(f"bad tool call {tc!r:.80}: needs function.name")
    return fn


def to_native(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> glm-4-9b-chat native ones (role tool -> observation, one assistant turn per call)."""
    out = []
    for m in messages:
        role = m["role"]
        if role == "tool":
            out.append({"role": "observation", "content": text_of(m.get("content"))})
        elif role == "assistant" and m.get("tool_calls"):
            content = text_of(m.get("content"))
            if content:
                out.append({"role": "assistant", "content": content})
            for tc in m["tool_calls"]:
                fn = call_function(tc)
                out.append({"role": "assistant", "metadata": fn["name"], "content": args_str(fn.get("arguments"))})
        else:
            n = dict(m)
            if "content" in n:
                n["content"] = text_of(n["content"])
            out.append(n)
    return out


def reasoning_of(m: dict) -> str | None:
    """An assistant message's thinking: `reasoning_content` (OpenAI/SGLang), `reasoning` (vLLM) or `thinking`."""
    return next((m[k] for k in ("reasoning_content", "reasoning", "thinking") if isinstance(m.get(k), str)), None)


def to_openai(messages: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """Native messages -> the OpenAI shape GLM-4.5+ templates read; returns (messages, tools lifted off a message).

    Arguments become dicts (the templates iterate them) and any reasoning alias becomes `reasoning_content`."""
    out, lifted = [], None
    for m in messages:
        role = m["role"]
        if "tools" in m and role == "system":
            lifted = (lifted or []) + list(m.get("tools") or [])
            if not text_of(m.get("content")):
                continue
        if role == "observation":
            out.append({"role": "tool", "content": text_of(m.get("content"))})
        elif role == "assistant" and m.get("metadata"):
            name = m["metadata"]
            out.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": args_dict(m.get("content"), name)}}]})
        else:
            n = {k: v for k, v in m.items() if k != "tools"}
            n["content"] = text_of(m.get("content"))
            if role == "assistant":
                reasoning = reasoning_of(m)
                if reasoning is not None:
                    n["reasoning_content"] = reasoning
                if m.get("tool_calls"):
                    n["tool_calls"] = []
                    for tc in m["tool_calls"]:
                        fn = call_function(tc)
                        n["tool_calls"].append({"type": "function", "function": {
                            "name": fn["name"], "arguments": args_dict(fn.get("arguments"), fn["name"])}})
            out.append(n)
    return out, lifted
