"""The Python chat API over glm4.LLM: `chat(llm, messages, tools, tool_choice)` and `chat_stream(...)`.

    from glm4.engine.chat import chat, chat_stream
    r = chat(llm, [{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, tool_choice="required")
    r.content, r.tool_calls, r.reasoning, r.finish_reason
    for ev in chat_stream(llm, messages): ...   # {"type": "content", "text"} / {"type": "tool_call", ...} / {"type": "done", ...}
    chat(llm, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}},
                                            {"type": "text", "text": "What is it?"}]}])   # vision checkpoints

The planning (prompt, constraints, parsing) lives in glm4.chat; its names are re-exported here for the
code that imported them from this module (ChatLayer is glm4.chat.planner.ChatPlanner).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm4.chat import ChatFormat
from glm4.chat.media import MediaPolicy
from glm4.chat.planner import (  # noqa: F401  (re-exported)
    ChatError,
    ChatLayer,
    ChatPlan,
    ChatPlanner,
    ChatStream,
    VocabGuard,
    new_call_id,
    usage_dict,
)

# ---------------------------------------------------------------------------------------------
# the Python API over glm4.LLM


@dataclass
class ChatResult:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    text: str = ""  # the raw model text
    reasoning: str | None = None  # the thinking, when the model wrote any

    def message(self) -> dict:
        """The assistant message to append to the conversation."""
        m: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        if self.reasoning:
            m["reasoning_content"] = m["reasoning"] = self.reasoning
        return m


def chat_layer_for(llm, folder: str | Path | None = None) -> tuple[ChatPlanner, Any, Path | None]:
    """The (cached) ChatPlanner of an LLM, its tokenizer, and its checkpoint folder."""
    layer = getattr(llm, "_glm4_chat_layer", None)
    tok = getattr(llm, "tokenizer", None)
    path = getattr(llm, "path", None) or folder
    path = Path(path) if path is not None else None
    if layer is None:
        if tok is None:
            raise ChatError("this checkpoint has no tokenizer: chat needs tokenizer.model or tokenizer.json")
        fmt = ChatFormat.for_checkpoint(path) if path is not None else ChatFormat("glm4")
        layer = ChatPlanner(tok, fmt, media=media_policy(llm, tok, path))
        try:
            llm._glm4_chat_layer = layer
        except AttributeError:
            pass
    return layer, tok, path


def media_policy(llm, tok, folder: Path | None, **limits) -> MediaPolicy | None:
    """The image/video policy of a vision checkpoint (its processor settings, `limits` over the defaults; local
    files anywhere for the Python API unless `allowed_local_path` says otherwise), None for a text-only one."""
    model = getattr(getattr(llm, "engine", None), "model", None)
    if model is None or not hasattr(model, "rope_index"):
        return None
    limits = {"allowed_local_path": "/", **limits}
    if hasattr(model, "image_grid"):  # GLM-4V-9B: square images behind its 3-token placeholder
        vc = model.config.vision_config
        return MediaPolicy.for_glm4v_9b(tok, vc.image_size, vc.num_image_tokens, vc.patch_size, **limits)
    return MediaPolicy.for_checkpoint(folder, tok, **limits)


def _default_params(params):
    from glm4.engine.sampling_params import SamplingParams

    return params if params is not None else SamplingParams(max_tokens=512, temperature=0.8, top_p=0.8)


def chat_stream(llm, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = "auto",
                params=None, *, parallel_tool_calls: bool = True, response_format: dict | None = None,
                **thinking: Any) -> Iterator[dict]:
    """Yield chat events as the model writes; the last is {"type": "done", "result": ChatResult}.
    `thinking`: enable_thinking, reasoning_effort, chat_template_kwargs, thinking_budget (ChatPlanner.plan).
    Closing the iterator early aborts the generation."""
    layer, _, _ = chat_layer_for(llm)
    plan = layer.plan(messages, tools, tool_choice, parallel_tool_calls, response_format, **thinking)
    p = layer.sampling_params(plan, _default_params(params))
    if getattr(p, "n", 1) != 1:
        raise ChatError("chat generates one reply; use n=1", "n")
    stream = layer.stream(plan)
    last = None
    for out in llm.engine.stream(plan.prompt_ids, p, multi_modal_data=plan.multi_modal_data):
        last = out
        o = out.outputs[0]
        events = stream.feed(o.delta_text)
        if o.finished:
            events += stream.finish()
        yield from events
    o = last.outputs[0]
    content, calls = stream.result()
    reason = stream.finish_reason(o.finish_reason)
    usage = usage_dict(len(plan.prompt_ids), len(o.token_ids))
    yield {"type": "done", "result": ChatResult(content, calls, reason, usage, o.text, "".join(stream.reasoning) or None)}


def chat(llm, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = "auto", params=None, *,
         parallel_tool_calls: bool = True, response_format: dict | None = None, **thinking: Any) -> ChatResult:
    """One assistant reply: content and/or tool calls (see glm4.chat.planner for tool_choice and thinking)."""
    result = None
    for ev in chat_stream(llm, messages, tools, tool_choice, params, parallel_tool_calls=parallel_tool_calls,
                          response_format=response_format, **thinking):
        if ev["type"] == "done":
            result = ev["result"]
    return result
