"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API as a thin adapter over the chat path of
/v1/chat/completions — the same ChatPlanner plan, engine requests and reply events, in Anthropic's shapes.

Request -> chat messages: `system` (and `role: "system"` messages) become a system message; text blocks become
OpenAI text parts (concatenated as the planner concatenates them); an assistant turn's `thinking` blocks become its
`reasoning_content` (rendered where the template shows past thinking), `tool_use` blocks its `tool_calls`;
`tool_result` blocks become tool messages, in order (text, with "Error: " before it when `is_error`), and must
answer a `tool_use` of the assistant turn before. Consecutive turns of one role are merged, as Anthropic does.
`image` blocks of user turns (source `base64`, or `url`) become `image_url` parts, in place, for a vision checkpoint
(a text-only one answers 400 "this model does not take images"); images inside a tool_result are refused (400). `tool_choice` auto / any / tool / none = the planner's auto / required / named / none
(`disable_parallel_tool_use` = parallel_tool_calls false); `thinking` enabled / adaptive / disabled = the planner's
enable_thinking, `budget_tokens` its thinking_budget (no `thinking` = the template's default);
`output_config.format` = response_format json_schema, `output_config.effort` = reasoning_effort.

Reply events -> content blocks (`BlockWriter`, one state machine for streamed and whole replies, so both give the
same message): thinking -> `thinking` blocks with a `signature` (a SHA-256 digest of the thinking: the server keeps
no state and renders past thinking as given), content -> `text`, calls -> `tool_use` with `input_json_delta`s.
stop_reason: `tool_use` (the reply called tools), `max_tokens`, `stop_sequence` (with the sequence) or `end_turn`.
Errors on these paths use Anthropic's body, `{"type": "error", "error": {"type", "message"}}` (`error_body`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from types import SimpleNamespace

from fastapi import Request
from fastapi.responses import JSONResponse

from glm4.chat import events as E
from glm4.chat.planner import ChatError, ChatPlan
from glm4.serve import anthropic_protocol as A
from glm4.serve import serving
from glm4.serve.errors import APIError, aborted, bad_request
from glm4.serve.protocol import random_id
from glm4.serve.serving import ServerState

log = logging.getLogger("glm4.serve")

PATH = "/v1/messages"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}


def error_body(e: APIError) -> dict:
    """An APIError in Anthropic's words (the error type follows the status, as Anthropic's do)."""
    kind = ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


# ---------------------------------------------------------------------------------------------
# request -> chat messages, tools and switches


def _unsupported(where: str, what: str) -> APIError:
    return bad_request(f"{where}: {what}", where, "unsupported_content")


def _result_text(block: A.ToolResultBlock, where: str) -> str:
    content = block.content
    if isinstance(content, list):
        for k, part in enumerate(content):
            if isinstance(part, A.ImageBlock):
                raise _unsupported(f"{where}.content.{k}", "images in tool results are not supported")
        content = "".join(part.text for part in content)
    text = content or ""
    return f"Error: {text}" if block.is_error else text


def _turns(req: A.CountTokensRequest) -> list[tuple[str, list[tuple[str, object]]]]:
    """(role, [(the block's path in the request, block)]) with consecutive turns of one role merged."""
    turns: list[tuple[str, list[tuple[str, object]]]] = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            blocks = [(f"messages.{i}.content", A.TextBlock(type="text", text=m.content))]
        else:
            blocks = [(f"messages.{i}.content.{j}", b) for j, b in enumerate(m.content)]
        if turns and turns[-1][0] == m.role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((m.role, blocks))
    return turns


def chat_messages(req: A.CountTokensRequest) -> list[dict]:
    """The request's conversation as the OpenAI-shaped messages the ChatPlanner reads."""
    out: list[dict] = []
    if req.system is not None:
        system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        out.append({"role": "system", "content": system})
    called: set[str] = set()  # tool_use ids of the assistant turn before
    turns = _turns(req)
    for role, blocks in turns:
        kinds = {"system": (A.TextBlock,), "user": (A.TextBlock, A.ImageBlock, A.ToolResultBlock),
                 "assistant": (A.TextBlock, A.ToolUseBlock, A.ThinkingBlock, A.RedactedThinkingBlock)}[role]
        for where, b in blocks:
            if not isinstance(b, kinds):
                raise bad_request(f"{where}: {b.type} blocks are not allowed in {role} messages", where)
        if role == "system":
            out.append({"role": "system", "content": [{"type": "text", "text": b.text} for _, b in blocks]})
        elif role == "user":
            out += _user_messages(blocks, called)
            called = set()
        else:
            message, called = _assistant_message(blocks)
            out.append(message)
    if turns[-1][0] == "assistant":
        raise bad_request(f"messages.{len(req.messages) - 1}: the last message must not be an assistant message "
                          "(prefill is not supported by this server)", f"messages.{len(req.messages) - 1}")
    return out


def _image_part(block: A.ImageBlock, where: str) -> dict:
    """An image block as the planner's image_url part (a base64 source as a data: URL)."""
    source = block.source
    kind = source.get("type")
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise _unsupported(f"{where}.source", "an image source must be base64 (media_type, data) or url")
    return {"type": "image_url", "image_url": {"url": url}}


def _user_messages(blocks: list[tuple[str, object]], called: set[str]) -> list[dict]:
    """A user turn: its tool_result blocks as tool messages, its text and images as user messages, in order."""
    out: list[dict] = []
    for where, b in blocks:
        if isinstance(b, A.ToolResultBlock):
            if b.tool_use_id not in called:
                raise bad_request(f"{where}.tool_use_id: {b.tool_use_id!r} answers no tool_use block of the "
                                  "assistant message before it", f"{where}.tool_use_id")
            out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _result_text(b, where)})
            continue
        part = _image_part(b, where) if isinstance(b, A.ImageBlock) else {"type": "text", "text": b.text}
        if out and out[-1]["role"] == "user":
            out[-1]["content"].append(part)
        else:
            out.append({"role": "user", "content": [part]})
    return out


def _assistant_message(blocks: list[tuple[str, object]]) -> tuple[dict, set[str]]:
    text, thinking, calls = [], [], []
    for _, b in blocks:
        if isinstance(b, A.TextBlock):
            text.append(b.text)
        elif isinstance(b, A.ThinkingBlock):
            thinking.append(b.thinking)
        elif isinstance(b, A.ToolUseBlock):
            calls.append({"id": b.id, "type": "function",
                          "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
    m: dict = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        m["tool_calls"] = calls
    if thinking:
        m["reasoning_content"] = "".join(thinking)
    return m, {c["id"] for c in calls}


def chat_tools(req: A.CountTokensRequest) -> list[dict] | None:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.input_schema}} for t in req.tools] if req.tools else None


def chat_tool_choice(choice) -> tuple[object, bool]:
    """(the planner's tool_choice, parallel_tool_calls) of an Anthropic tool_choice."""
    if choice is None:
        return None, True
    parallel = not getattr(choice, "disable_parallel_tool_use", False)
    if isinstance(choice, A.ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel


def plan_request(st: ServerState, req: A.CountTokensRequest) -> ChatPlan:
    """The ChatPlan of a Messages request (its prompt ids, tools and constraints); bad input is a 400."""
    tool_choice, parallel = chat_tool_choice(req.tool_choice)
    thinking = req.thinking
    enable = None if thinking is None else thinking.type != "disabled"
    budget = thinking.budget_tokens if isinstance(thinking, A.ThinkingEnabled) else None
    out = req.output_config
    rf = {"type": "json_schema", "json_schema": {"name": "output", "schema": out.format.schema_}} \
        if out is not None and out.format is not None else None
    try:
        return st.chat.plan(chat_messages(req), tools=chat_tools(req), tool_choice=tool_choice,
                            parallel_tool_calls=parallel, response_format=rf, enable_thinking=enable,
                            reasoning_effort=out.effort if out is not None else None, thinking_budget=budget)
    except ChatError as e:
        raise bad_request(str(e), e.param, e.code) from None


def _plan_and_params(st: ServerState, req: A.MessagesRequest):
    serving.check_messages_fit(st, chat_messages(req))
    plan = plan_request(st, req)
    max_tokens = serving.token_budget(st, len(plan.prompt_ids), req.max_tokens, "messages")
    knobs = SimpleNamespace(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=None,
                            presence_penalty=None, frequency_penalty=None, repetition_penalty=None, min_tokens=None,
                            ignore_eos=None, stop=req.stop_sequences or None, seed=None, logit_bias=None,
                            model=req.model)
    kw = serving.sampling_kwargs(st, knobs, max_tokens, False, 0)
    return plan, st.chat.sampling_params(plan, serving.sampling_params(**kw))


# ---------------------------------------------------------------------------------------------
# reply events -> content blocks and stream events


def signature(thinking: str) -> str:
    return base64.b64encode(hashlib.sha256(thinking.encode("utf-8")).digest()).decode("ascii")


class BlockWriter:
    """Chat events -> Anthropic stream events (content_block_start / _delta / _stop) and the content blocks they
    fold to. A block is closed when a block of another kind starts; thinking blocks close with their signature.
    `show_thinking=False` (thinking display "omitted") sends thinking blocks empty, signature still given."""

    def __init__(self, show_thinking: bool = True):
        self.show_thinking = show_thinking
        self.blocks: list[dict] = []
        self._open: str | None = None  # the open block's kind: "text", "thinking" or ("tool", call index)
        self._thinking: list[str] = []
        self._args: dict[int, list[str]] = {}  # a call's arguments so far, by block index
        self._call_block: dict[int, int] = {}  # the parser's call index -> block index

    def feed(self, events: list[E.Event]) -> list[dict]:
        out: list[dict] = []
        for ev in events:
            if isinstance(ev, E.ReasoningDelta) and ev.text:
                self._ensure(out, "thinking", {"type": "thinking", "thinking": "", "signature": ""})
                self._thinking.append(ev.text)
                if self.show_thinking:
                    self.blocks[-1]["thinking"] += ev.text
                    out.append(self._delta({"type": "thinking_delta", "thinking": ev.text}))
            elif isinstance(ev, E.ContentDelta) and ev.text:
                self._ensure(out, "text", {"type": "text", "text": ""})
                self.blocks[-1]["text"] += ev.text
                out.append(self._delta({"type": "text_delta", "text": ev.text}))
            elif isinstance(ev, E.ToolCallStart):
                self._ensure(out, ("tool", ev.index), {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
                self._call_block[ev.index] = len(self.blocks) - 1
                self._args[len(self.blocks) - 1] = []
            elif isinstance(ev, E.ToolCallDelta) and ev.arguments and ev.index in self._call_block:
                k = self._call_block[ev.index]
                self._args[k].append(ev.arguments)
                out.append({"type": "content_block_delta", "index": k,
                            "delta": {"type": "input_json_delta", "partial_json": ev.arguments}})
            elif isinstance(ev, (E.ToolCallEnd, E.ToolCallInvalid)) and self._open == ("tool", ev.index):
                out += self.close()
        return out

    def close(self) -> list[dict]:
        """Stop the open block (at a block of another kind, a call's end, and the reply's end)."""
        if self._open is None:
            return []
        k, out = len(self.blocks) - 1, []
        if self._open == "thinking":
            sig = signature("".join(self._thinking))
            self.blocks[k]["signature"] = sig
            out.append(self._delta({"type": "signature_delta", "signature": sig}))
            self._thinking = []
        elif self._open != "text":
            self.blocks[k]["input"] = _arguments("".join(self._args[k]))
        self._open = None
        return out + [{"type": "content_block_stop", "index": k}]

    def _ensure(self, out: list[dict], kind, block: dict) -> None:
        if self._open == kind:
            return
        out += self.close()
        self.blocks.append(block)
        self._open = kind
        out.append({"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": dict(block)})

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}


def _arguments(text: str) -> dict:
    """A call's input: its JSON arguments (a call cut off mid-way keeps {}: its stream already went out)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def stop_reason(parser, engine_output, stop_sequences: list[str] | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished reply."""
    reason = parser.finish_reason(serving.finish_reason(engine_output.finish_reason))
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    stop = engine_output.stop_reason
    if isinstance(stop, str) and stop in (stop_sequences or []):
        return "stop_sequence", stop
    return "end_turn", None


# ---------------------------------------------------------------------------------------------
# the routes


async def create_message(st: ServerState, req: A.MessagesRequest, request: Request):
    st = serving.route(st, req.model, serving.carries_media(req.messages))
    serving.check_model(st, req.model)
    plan, engine_request = await serving.plan_and_submit(st, _plan_and_params, req)
    serving.count_request(st, "messages", len(plan.prompt_ids))
    mid = random_id("msg_")
    show = getattr(req.thinking, "display", None) != "omitted"
    if req.stream:
        return serving.sse_response(_stream(st, req, plan, engine_request, mid, show), [engine_request])
    t0 = time.monotonic()
    outs = (await serving.run_until_disconnect(request, serving.collect_outputs([engine_request])))[0]
    last = outs[-1].outputs[0]
    parser, writer = st.chat.stream(plan), BlockWriter(show)
    writer.feed(parser.feed_events(last.text))
    writer.feed(parser.finish_events())
    writer.close()
    reason, sequence = stop_reason(parser, last, req.stop_sequences)
    serving.observe_finished(st, t0, len(last.token_ids))
    return JSONResponse({"id": mid, "type": "message", "role": "assistant", "model": req.model,
                         "content": writer.blocks, "stop_reason": reason, "stop_sequence": sequence,
                         "usage": {"input_tokens": len(plan.prompt_ids), "output_tokens": len(last.token_ids)}})


async def count_tokens(st: ServerState, req: A.CountTokensRequest):
    st = serving.route(st, req.model, serving.carries_media(req.messages))
    serving.check_model(st, req.model)
    plan = await serving.offload(plan_request, st, req)
    return JSONResponse({"input_tokens": len(plan.prompt_ids)})


def _event(obj: dict) -> str:
    return f"event: {obj['type']}\ndata: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream(st: ServerState, req: A.MessagesRequest, plan: ChatPlan, engine_request, mid: str, show: bool):
    """message_start, ping, the content blocks' events, message_delta (stop_reason, usage), message_stop. An error
    after the start is an `error` event (the status line is gone by then), and the stream ends there."""
    t0, n_prompt, n_gen = time.monotonic(), len(plan.prompt_ids), 0
    yield _event({"type": "message_start", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": req.model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": n_prompt, "output_tokens": 0}}})
    yield _event({"type": "ping"})
    parser, writer, last = st.chat.stream(plan), BlockWriter(show), None
    try:
        async for _, out in serving.interleave_outputs([engine_request]):
            o = out.outputs[0]
            if n_gen == 0 and o.token_ids:
                st.metrics.observe("time_to_first_token_seconds", time.monotonic() - t0)
            n_gen = len(o.token_ids)
            events = parser.feed_events(o.delta_text)
            if o.finished:
                events += parser.finish_events()
                last = o
            for ev in writer.feed(events):
                yield _event(ev)
        if last is None:
            raise aborted()
    except APIError as e:
        yield _event(error_body(e))
        return
    except Exception as e:  # engine failure mid-stream
        log.exception("stream failed")
        yield _event(error_body(APIError(500, f"generation failed: {e}", "server_error")))
        return
    finally:
        serving.observe_finished(st, t0, n_gen)
    for ev in writer.close():
        yield _event(ev)
    reason, sequence = stop_reason(parser, last, req.stop_sequences)
    yield _event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                  "usage": {"input_tokens": n_prompt, "output_tokens": n_gen}})
    yield _event({"type": "message_stop"})
