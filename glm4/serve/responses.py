"""POST /v1/responses (OpenAI's Responses API), GET / DELETE /v1/responses/{id}: a thin adapter onto the chat path.

    input items + instructions + the stored conversation of previous_response_id
        -> chat messages -> the chat layer's plan (same ChatPlanner as /v1/chat/completions) -> one engine request
        -> the chat layer's reply events -> output items (responses_output.ResponseBuilder), whole or as events

Mapping: `instructions` -> a system message (not carried to the next response, as OpenAI does); message items ->
messages (`input_text` / `output_text` parts joined; a user message's `input_image` parts with an `image_url` become
image_url parts for a vision checkpoint (a text-only one answers 400 "this model does not take images"); images by
`file_id` and `input_file` parts are a 400: this server keeps no files);
`function_call` items -> the assistant turn's tool_calls, `function_call_output` -> a tool message, `reasoning`
items -> the assistant turn's reasoning_content (what thinking templates render for history). Function tools,
`tool_choice` and `parallel_tool_calls` as chat takes them; `text.format` -> response_format; `reasoning.effort`
-> reasoning_effort ("none" / "minimal" turn thinking off); `max_output_tokens` -> max_tokens.

Responses are kept (unless `store: false`) in a bounded in-memory LRU (`ResponseStore`, `glm4 serve
--responses-store-size`): a response's conversation, for `previous_response_id`, and its body, for GET.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import NamedTuple

from fastapi import Request
from fastapi.responses import JSONResponse

from glm4.chat.planner import ChatError, ChatPlan
from glm4.serve import responses_protocol as RP
from glm4.serve import serving
from glm4.serve.errors import APIError, aborted, bad_request
from glm4.serve.protocol import random_id
from glm4.serve.responses_output import ResponseBuilder
from glm4.serve.serving import ServerState

log = logging.getLogger("glm4.serve")

DEFAULT_STORE_SIZE = 1024


# ---------------------------------------------------------------------------------------------
# the store


class Stored(NamedTuple):
    body: dict  # the response object, as answered
    conversation: list[dict]  # chat messages up to and including this response's output (no instructions)


class ResponseStore:
    """The last `max_size` stored responses, least recently used dropped first (0: nothing is kept)."""

    def __init__(self, max_size: int = DEFAULT_STORE_SIZE):
        self.max_size = max_size
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, body: dict, conversation: list[dict]) -> None:
        if self.max_size <= 0:
            return
        self._items[body["id"]] = Stored(body, conversation)
        self._items.move_to_end(body["id"])
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        hit = self._items.get(response_id)
        if hit is not None:
            self._items.move_to_end(response_id)
        return hit

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)


def not_found(response_id: str, param: str | None = None, code: str | None = None) -> APIError:
    what = "Previous response" if param == "previous_response_id" else "Response"
    return APIError(404, f"{what} with id '{response_id}' not found.", "invalid_request_error", param, code)


def retrieve_response(store: ResponseStore, response_id: str) -> JSONResponse:
    hit = store.get(response_id)
    if hit is None:
        raise not_found(response_id)
    return JSONResponse(hit.body)


def delete_response(store: ResponseStore, response_id: str) -> JSONResponse:
    if not store.delete(response_id):
        raise not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


# ---------------------------------------------------------------------------------------------
# items -> chat messages


def _text(content, where: str) -> str:
    """A message's or a tool output's content as one string; non-text parts are refused."""
    if isinstance(content, str):
        return content
    return "".join(_part_text(part, f"{where}.{j}") for j, part in enumerate(content))


def _part_text(part: dict, where: str) -> str:
    kind = part["type"]
    if kind in ("input_text", "output_text"):
        return part["text"]
    if kind == "refusal":
        return part["refusal"]
    raise bad_request(f"{where}: {kind} parts are not supported here (text, and images in user messages)", where,
                      "unsupported_content")


def _user_content(content, where: str) -> str | list[dict]:
    """A user message's content: one string, or text and image_url parts in order when it has images."""
    if isinstance(content, str) or not any(part["type"] == "input_image" for part in content):
        return _text(content, where)
    out = []
    for j, part in enumerate(content):
        if part["type"] != "input_image":
            out.append({"type": "text", "text": _part_text(part, f"{where}.{j}")})
        elif part.get("image_url"):
            out.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise bad_request(f"{where}.{j}: images by file_id are not supported by this server (send image_url)",
                              f"{where}.{j}", "unsupported_content")
    return out


def items_to_messages(items: list[dict], param: str = "input") -> list[dict]:
    """Responses items (input items, or a stored response's output) -> chat messages. Reasoning, assistant text
    and function calls that follow each other are one assistant turn; text after calls starts a new one."""
    out: list[dict] = []
    turn: dict | None = None  # the assistant message being assembled

    def assistant(fresh: bool = False) -> dict:
        nonlocal turn
        if turn is None or (fresh and (turn["content"] is not None or turn.get("tool_calls"))):
            turn = {"role": "assistant", "content": None}
            out.append(turn)
        return turn

    for i, it in enumerate(items):
        kind = it["type"]
        if kind == "message" and it["role"] == "assistant":
            assistant(fresh=True)["content"] = _text(it["content"], f"{param}.{i}.content")
        elif kind == "message":
            turn = None
            read = _user_content if it["role"] == "user" else _text
            out.append({"role": it["role"], "content": read(it["content"], f"{param}.{i}.content")})
        elif kind == "reasoning":
            thought = "".join(p["text"] for p in it.get("content") or it.get("summary") or [])
            if thought:  # (an encrypted reasoning item from elsewhere carries no text: nothing to render)
                t = assistant(fresh=True)
                t["reasoning_content"] = t.get("reasoning_content", "") + thought
        elif kind == "function_call" and it.get("status") == "incomplete":
            continue  # a call cut off by max_output_tokens (in a stored output): never made
        elif kind == "function_call":
            assistant().setdefault("tool_calls", []).append(
                {"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}})
        elif kind == "function_call_output":
            turn = None
            out.append({"role": "tool", "tool_call_id": it["call_id"],
                        "content": _text(it["output"], f"{param}.{i}.output")})
    for m in out:  # a turn that only thought (cut off by max_output_tokens) said nothing
        if m["role"] == "assistant" and m["content"] is None and not m.get("tool_calls"):
            m["content"] = ""
    return out


def _conversation(store: ResponseStore, req: RP.ResponsesRequest) -> list[dict]:
    """The conversation so far: the previous response's, then this request's input (instructions left out)."""
    history: list[dict] = []
    if req.previous_response_id is not None:
        prev = store.get(req.previous_response_id)
        if prev is None:
            raise not_found(req.previous_response_id, "previous_response_id", "previous_response_not_found")
        history = prev.conversation
    if isinstance(req.input, str):
        return history + [{"role": "user", "content": req.input}]
    items = [x.model_dump(by_alias=True, exclude_none=True) for x in req.input or []]
    return history + items_to_messages(items)


# ---------------------------------------------------------------------------------------------
# request -> plan


_PARAMS = {"messages": "input", "response_format": "text.format", "reasoning_effort": "reasoning.effort"}


def _param(param: str | None) -> str | None:
    """A chat layer's parameter name in the Responses request's words (message indices do not map: `input`)."""
    if param is None:
        return None
    if param.startswith("tools."):  # a Responses tool is flat: tools.0.parameters, not tools.0.function.parameters
        return param.replace(".function.", ".", 1)
    return _PARAMS.get(param.split(".")[0], param)


def _response_format(req: RP.ResponsesRequest) -> dict | None:
    fmt = req.text.format if req.text else None
    if fmt is None:
        return None
    if fmt.type == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}}
    return {"type": fmt.type}


def _plan(st: ServerState, req: RP.ResponsesRequest, messages: list[dict]) -> tuple[ChatPlan, object]:
    tc = req.tool_choice
    serving.check_messages_fit(st, messages, "input")
    try:
        plan = st.chat.plan(
            messages,
            tools=[{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                   for t in req.tools] if req.tools else None,
            tool_choice={"type": "function", "function": {"name": tc.name}} if isinstance(tc, RP.NamedFunctionChoice)
            else tc,
            parallel_tool_calls=req.parallel_tool_calls is not False, response_format=_response_format(req),
            enable_thinking=req.enable_thinking, reasoning_effort=req.reasoning.effort if req.reasoning else None,
            chat_template_kwargs=req.chat_template_kwargs, thinking_budget=req.thinking_budget)
    except ChatError as e:
        raise bad_request(str(e), _param(e.param), e.code) from None
    try:
        max_tokens = serving.token_budget(st, len(plan.prompt_ids), req.max_output_tokens, "input")
    except APIError as e:  # context_length_exceeded: name the Responses parameter
        e.param = "input"
        raise
    kw = serving.sampling_kwargs(st, req, max_tokens, req.logprobs, req.top_logprobs or 0)
    return plan, st.chat.sampling_params(plan, serving.sampling_params(**kw))


def _base(st: ServerState, req: RP.ResponsesRequest, rid: str) -> dict:
    """The response object's fields known before generation: the request's settings, echoed."""
    tc = req.tool_choice
    text = req.text.model_dump(by_alias=True, exclude_none=True) if req.text else {}
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "completed_at": None,
        "status": "in_progress", "error": None, "incomplete_details": None, "model": req.model,
        "instructions": req.instructions, "output": [], "parallel_tool_calls": req.parallel_tool_calls is not False,
        "tool_choice": tc.model_dump() if isinstance(tc, RP.NamedFunctionChoice) else (tc or "auto"),
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "text": {"format": {"type": "text"}, **text},
        "reasoning": req.reasoning.model_dump(exclude_none=True) if req.reasoning else {},
        "temperature": req.temperature if req.temperature is not None else st.defaults.get("temperature", 1.0),
        "top_p": req.top_p if req.top_p is not None else st.defaults.get("top_p", 1.0),
        "top_logprobs": req.top_logprobs, "max_output_tokens": req.max_output_tokens,
        "previous_response_id": req.previous_response_id, "metadata": req.metadata or {},
        "store": req.store is not False, "background": False, "truncation": "disabled", "service_tier": "default",
        "user": req.user, "safety_identifier": req.safety_identifier, "prompt_cache_key": req.prompt_cache_key,
        "usage": None,
    }


# ---------------------------------------------------------------------------------------------
# the handler


class _Run:
    """One response being generated: the chat layer's parser and the output builder, fed step by step."""

    def __init__(self, st: ServerState, req: RP.ResponsesRequest, plan: ChatPlan, conversation: list[dict]):
        self.st, self.req, self.plan, self.conversation = st, req, plan, conversation
        self.parser = st.chat.stream(plan)
        self.builder = ResponseBuilder(_base(st, req, random_id("resp_")), plan.in_reasoning, req.logprobs)
        self.t0 = time.monotonic()
        self.first_token: float | None = None
        self.n_generated = 0

    def step(self, out) -> list[dict]:
        """The stream events of one RequestOutput (the finishing ones with the last)."""
        o = out.outputs[0]
        if self.first_token is None and o.delta_token_ids:
            self.first_token = time.monotonic()
            self.st.metrics.observe("time_to_first_token_seconds", self.first_token - self.t0)
        self.n_generated = len(o.token_ids)
        events = self.parser.feed_events(o.delta_text)
        if o.finished:
            events += self.parser.finish_events()
        lp = _logprobs(self.st, o.delta_logprobs) if self.req.logprobs else None
        sent = self.builder.feed(events, len(o.delta_token_ids), lp)
        if o.finished:
            sent += self.builder.finish(serving.finish_reason(o.finish_reason), len(self.plan.prompt_ids),
                                        self.n_generated, getattr(out, "num_cached_tokens", 0) or 0)
        return sent

    def done(self, store: ResponseStore) -> dict:
        """The finished response: counted, and kept when asked to."""
        serving.observe_finished(self.st, self.t0, self.n_generated)
        body = self.builder.response
        if self.req.store is not False:
            said = items_to_messages(body["output"]) or [{"role": "assistant", "content": ""}]  # an empty reply
            store.put(body, self.conversation + said)
        return body


def _logprobs(st: ServerState, entries: list[dict] | None) -> list[dict]:
    texts = st.token_texts

    def one(tid: int, lp: float) -> dict:
        return {"token": texts.text(tid), "logprob": lp, "bytes": list(texts.bytes(tid))}

    return [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(t, v) for t, v in e.get("top_logprobs") or []]}
            for e in entries or []]


async def create_response(st: ServerState, store: ResponseStore, req: RP.ResponsesRequest, request: Request):
    st = serving.route(st, req.model, serving.carries_media(req.input))
    serving.check_model(st, req.model)
    conversation = _conversation(store, req)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    plan, engine_request = await serving.plan_and_submit(st, _plan, req, messages)
    serving.count_request(st, "responses", len(plan.prompt_ids))
    run = _Run(st, req, plan, conversation)
    if req.stream:
        return serving.sse_response(_stream(run, engine_request, store), [engine_request])
    outs = (await serving.run_until_disconnect(request, serving.collect_outputs([engine_request])))[0]
    run.builder.start()
    for out in outs:
        run.step(out)
    return JSONResponse(run.done(store))


def _sse(ev: dict) -> str:
    return f"event: {ev['type']}\n{serving.sse_event(ev)}"


async def _stream(run: _Run, engine_request, store: ResponseStore):
    """The server-sent events of a streamed response (no [DONE]: the Responses stream ends with its last event).
    An error after the start is told in-band: an `error` event, then response.failed."""
    for ev in run.builder.start():
        yield _sse(ev)
    try:
        finished = False
        async for _, out in serving.interleave_outputs([engine_request]):
            for ev in run.step(out):
                yield _sse(ev)
            finished = out.finished
        if not finished:
            raise aborted()
    except APIError as e:
        for ev in run.builder.fail(e.code or e.type, e.message, e.param):
            yield _sse(ev)
        return
    except Exception as e:  # engine failure mid-stream
        log.exception("stream failed")
        for ev in run.builder.fail("server_error", f"generation failed: {e}"):
            yield _sse(ev)
        return
    run.done(store)
