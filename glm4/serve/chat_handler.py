"""POST /v1/chat/completions: messages -> the chat layer's plan (prompt ids, grammar) -> n engine requests ->
the chat layer's events -> OpenAI messages, or deltas as server-sent events.

It talks to the chat layer (`glm4.chat.planner`, loaded for a checkpoint by `glm4.engine.chat`; the Responses
API in responses.py uses the same plans and events): planning a request, and the reply's parser, whose events
become OpenAI deltas in one place
(`glm4.chat.events.openai_delta`: thinking as `reasoning_content` and as `reasoning`). A request that used the
legacy `functions` gets the legacy `function_call` (one call, finish_reason "function_call").
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from fastapi import Request
from fastapi.responses import JSONResponse

from glm4.chat.planner import ChatError, ChatPlan
from glm4.engine.chat import chat_layer_for
from glm4.serve import protocol as P
from glm4.serve import serving
from glm4.serve.errors import aborted, bad_request
from glm4.serve.serving import ServerState


class ChatSetup(NamedTuple):
    layer: Any  # the chat layer (ServerState.chat)
    tokenizer: Any
    folder: Any  # the checkpoint folder, or None
    vocab_guard: Any  # logits processor masking ids past the tokenizer's vocabulary


def load_chat(llm, model: str | None) -> ChatSetup:
    """The chat layer of a loaded LLM, with its constrained-decoding tables built now (about 1 s for a 150k
    vocabulary), not on the first request."""
    layer, tok, folder = chat_layer_for(llm, model)
    _ = layer.compiler
    return ChatSetup(layer, tok, folder, layer.vocab_guard)


# ---------------------------------------------------------------------------------------------
# request -> plan


def _plan(st: ServerState, req: P.ChatCompletionRequest) -> tuple[ChatPlan, list]:
    """The request's ChatPlan and one SamplingParams per choice (each with its own grammar matcher)."""
    rf = req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    serving.check_messages_fit(st, messages)
    try:
        plan = st.chat.plan(
            messages,
            tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
            tool_choice=req.tool_choice.model_dump() if isinstance(req.tool_choice, P.NamedToolChoice) else req.tool_choice,
            parallel_tool_calls=req.parallel_tool_calls is not False, response_format=rf,
            enable_thinking=req.enable_thinking, reasoning_effort=req.reasoning_effort,
            chat_template_kwargs=req.chat_template_kwargs, thinking_budget=req.thinking_budget)
        max_tokens = serving.token_budget(st, len(plan.prompt_ids), req.max_completion_tokens or req.max_tokens,
                                          "messages")
        kw = serving.sampling_kwargs(st, req, max_tokens, bool(req.logprobs), req.top_logprobs or 0)
        params = [st.chat.sampling_params(plan, serving.sampling_params(**serving.seeded(kw, i))) for i in range(req.n)]
    except ChatError as e:
        raise bad_request(str(e), e.param, e.code) from None
    return plan, params


async def create_chat_completion(st: ServerState, req: P.ChatCompletionRequest, request: Request):
    st = serving.route(st, req.model, serving.carries_media(req.messages))
    serving.check_model(st, req.model)
    st.engine.reserve(req.n)  # before the work below: a full server sheds load cheaply
    try:  # tokenizing, grammar checks and matcher construction run off the event loop
        plan, params = await serving.offload(_plan, st, req)
    except BaseException:
        st.engine.unreserve(req.n)
        raise
    requests = [st.engine.submit(plan.prompt_ids, p, reserved=True, multi_modal_data=plan.multi_modal_data)
                for p in params]
    n_prompt = len(plan.prompt_ids)
    serving.count_request(st, "chat", n_prompt * req.n)
    rid = P.random_id("chatcmpl-")
    if req.stream:
        return serving.sse_response(_chat_events(st, req, plan, requests, rid), requests)
    t0 = time.monotonic()
    results = await serving.run_until_disconnect(request, serving.collect_outputs(requests))
    choices, n_gen = [], 0
    for i, outs in enumerate(results):
        last = outs[-1].outputs[0]
        n_gen += len(last.token_ids)
        message, reason = _message(req, st.chat.stream(plan), last.text, serving.finish_reason(last.finish_reason))
        choices.append({"index": i, "message": message,
                        "logprobs": _logprobs(st, last.logprobs) if req.logprobs else None, "finish_reason": reason})
    serving.observe_finished(st, t0, n_gen)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                         "choices": choices, "usage": serving.usage(n_prompt, n_gen), "system_fingerprint": None})


# ---------------------------------------------------------------------------------------------
# chat layer output -> OpenAI shapes


def _message(req: P.ChatCompletionRequest, parser, text: str, reason: str | None) -> tuple[dict, str | None]:
    """The assistant message of a whole reply, and its finish_reason (a reply that calls tools stops for them)."""
    parser.feed_events(text)
    parser.finish_events()
    message = {**parser.message(), "refusal": None}
    if req.uses_legacy_functions:
        calls = message.pop("tool_calls")
        message["tool_calls"], message["function_call"] = None, calls[0]["function"] if calls else None
    return message, _legacy_reason(parser.finish_reason(reason), req.uses_legacy_functions)


def _legacy_reason(reason: str | None, legacy: bool) -> str | None:
    return "function_call" if legacy and reason == "tool_calls" else reason


def _legacy_delta(delta: dict) -> dict:
    """An OpenAI delta in the legacy functions shape: the call's function as `function_call`."""
    if "tool_calls" not in delta:
        return delta
    function = delta["tool_calls"][0]["function"]
    return {"function_call": function if function.get("name") else {"arguments": function["arguments"]}}


def _logprobs(st: ServerState, entries: list[dict] | None) -> dict | None:
    if entries is None:
        return None
    texts = st.token_texts

    def one(tid: int, lp: float) -> dict:
        return {"token": texts.text(tid), "logprob": lp, "bytes": list(texts.bytes(tid))}

    return {"content": [{**one(e["token_id"], e["logprob"]),
                         "top_logprobs": [one(t, lp) for t, lp in e.get("top_logprobs") or []]} for e in entries],
            "refusal": None}


def _chat_events(st: ServerState, req: P.ChatCompletionRequest, plan: ChatPlan, requests, rid: str):
    """The server-sent events of a streamed chat completion: a role chunk per choice, a chunk per delta, a
    finish_reason chunk per choice, the usage chunk when asked."""
    created, t0 = int(time.time()), time.monotonic()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    legacy = req.uses_legacy_functions
    n_gen = [0] * len(requests)

    def chunk(choices, usage_=None):
        d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
             "system_fingerprint": None, "choices": choices}
        if include_usage:
            d["usage"] = usage_
        return serving.sse_event(d)

    async def chunks():
        parsers = [st.chat.stream(plan) for _ in requests]  # model text -> chat events, one per choice
        finished = [False] * len(requests)
        first_token = None
        for i in range(len(requests)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for i, out in serving.interleave_outputs(requests):
            o = out.outputs[0]
            if first_token is None and o.delta_token_ids:
                first_token = time.monotonic()
                st.metrics.observe("time_to_first_token_seconds", first_token - t0)
            n_gen[i] = len(o.token_ids)
            deltas = parsers[i].feed_openai(o.delta_text)
            if o.finished:
                deltas += parsers[i].finish_openai()
            lp = _logprobs(st, o.delta_logprobs) if req.logprobs else None
            for delta in deltas:
                yield chunk([{"index": i, "delta": _legacy_delta(delta) if legacy else delta, "logprobs": lp,
                              "finish_reason": None}])
                lp = None
            if lp is not None and lp["content"]:
                yield chunk([{"index": i, "delta": {}, "logprobs": lp, "finish_reason": None}])
            if o.finished:
                finished[i] = True
                reason = _legacy_reason(parsers[i].finish_reason(serving.finish_reason(o.finish_reason)), legacy)
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if not all(finished):
            raise aborted()

    def closing() -> list[str]:
        serving.observe_finished(st, t0, sum(n_gen))
        return [chunk([], serving.usage(len(plan.prompt_ids), sum(n_gen)))] if include_usage else []

    return serving.sse_body(chunks(), closing)
