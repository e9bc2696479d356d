"""`glm4 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared engine.

One background thread owns the LLMEngine: it applies queued add/abort commands between steps and
hands every RequestOutput to the asyncio queue of the HTTP request that owns it. Requests over the
queue bound get 429 + Retry-After; a client that disconnects has its engine requests aborted (KV
blocks freed); shutdown stops accepting, drains the in-flight requests, then stops the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm4.engine.chat import ChatError, ChatLayer, ChatPlan, usage_dict
from glm4.serve import DTYPE_HELP
from glm4.serve import protocol as P
from glm4.serve.metrics import Metrics
from glm4.weights import CheckpointError

log = logging.getLogger("glm4.serve")

# ---------------------------------------------------------------------------------------------
# the engine loop


class _Abort:
    """Put on a request's queue when the engine could not take it or dropped it."""

    def __init__(self, error: Exception | None = None):
        self.error = error


class AsyncEngine:
    """Runs `engine.step()` in one thread; `generate()` is an async iterator of RequestOutputs."""

    def __init__(self, engine, max_pending: int = 256, metrics: Metrics | None = None):
        self.engine = engine
        self.max_pending = max_pending
        self.metrics = metrics
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._owners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # request id -> sink
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.num_pending = 0  # engine requests admitted and not finished (guarded by _lock)
        self.error: BaseException | None = None

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="glm4-engine", daemon=True)
            self._thread.start()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Finish what is in flight (up to drain_timeout seconds), then stop the thread."""
        deadline = time.monotonic() + drain_timeout
        while self.num_pending and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            left = list(self._owners)
        for rid in left:
            self._cmds.put(("abort", rid))
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # -- request side (asyncio thread)
    def reserve(self, k: int) -> None:
        """Admit k engine requests or raise a 429 APIError."""
        with self._lock:
            if self._stopping or self.error is not None:
                raise P.APIError(503, "the server is shutting down" if self._stopping else
                                 f"the engine stopped: {self.error}", "server_error", None, "unavailable")
            if self.num_pending + k > self.max_pending:
                raise P.APIError(429, f"the server is at capacity ({self.max_pending} requests in flight); "
                                 "retry shortly", "rate_limit_error", None, "rate_limit_exceeded",
                                 headers={"Retry-After": "1"})
            self.num_pending += k

    def unreserve(self, k: int) -> None:
        with self._lock:
            self.num_pending = max(0, self.num_pending - k)

    def generate(self, prompt_ids: list[int], params, reserved: bool = False) -> EngineStream:
        """Submit one engine request now; iterate the returned stream for its RequestOutputs."""
        if not reserved:
            self.reserve(1)
        rid = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._owners[rid] = (asyncio.get_running_loop(), q)
        self._cmds.put(("add", rid, prompt_ids, params))
        self._wake.set()
        return EngineStream(self, rid, q)

    def abort(self, rid: str) -> None:
        self._cmds.put(("abort", rid))
        self._wake.set()

    # -- engine thread
    def _deliver(self, rid: str, item, last: bool) -> None:
        self._deliver_many([(rid, item, last)])

    def _deliver_many(self, items: list[tuple[str, object, bool]]) -> None:
        """Hand outputs to their requests' queues: one wake-up of each event loop per engine step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for rid, item, last in items:
                sink = self._owners.pop(rid, None) if last else self._owners.get(rid)
                if sink is None:
                    continue
                if last:
                    self.num_pending = max(0, self.num_pending - 1)
                by_loop.setdefault(sink[0], []).append((sink[1], item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:  # the requests' event loop is gone
                pass

    def _apply(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, prompt_ids, params = cmd
            with self._lock:
                if rid not in self._owners:  # aborted before it reached the engine
                    return
            try:
                self.engine.add_request(rid, prompt_ids, params)
            except Exception as e:  # bad params that slipped past validation: an error for that request only
                self._count("engine_rejections_total")
                self._deliver(rid, _Abort(P.bad_request(f"request rejected by the engine: {e}")), last=True)
        else:
            rid = cmd[1]
            with self._lock:
                owned = rid in self._owners
            if owned:
                try:
                    self.engine.abort(rid)
                except Exception:  # already finished inside the engine
                    log.debug("abort of %s failed", rid, exc_info=True)
                self._count("requests_aborted_total")
                self._deliver(rid, _Abort(), last=True)

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name)

    def _run(self) -> None:
        try:
            while True:
                while True:
                    try:
                        self._apply(self._cmds.get_nowait())
                    except queue.Empty:
                        break
                with self._lock:
                    busy = bool(self._owners)
                if not busy:
                    if self._stopping:
                        return
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # a failed step: fail what was in flight, keep serving
                    log.exception("engine step failed")
                    self._count("engine_step_failures_total")
                    self._fail_all(e)
                    continue
                self._deliver_many([(out.request_id, out, out.finished) for out in outs])
                if not outs:
                    time.sleep(0.001)
        except BaseException as e:  # the loop itself died: fail every open request, /health turns 503
            log.exception("engine loop crashed")
            self.error = e
            self._fail_all(e)

    def _fail_all(self, e: BaseException) -> None:
        with self._lock:
            rids = list(self._owners)
        for rid in rids:
            try:
                self.engine.abort(rid)
            except Exception:
                log.debug("abort of %s failed", rid, exc_info=True)
            self._deliver(rid, _Abort(P.APIError(500, f"engine failure: {e}", "server_error")), last=True)


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in puts:
        q.put_nowait(item)


class EngineStream:
    """Async iterator of one engine request's outputs. `close()` (also on cancellation) aborts the
    request, which frees its KV blocks; it is synchronous so it works inside a cancelled task too."""

    def __init__(self, engine: AsyncEngine, rid: str, q: asyncio.Queue):
        self.engine, self.rid, self.q = engine, rid, q
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self.q.get()
        except BaseException:  # cancelled: the client went away
            self.close()
            raise
        if isinstance(item, _Abort):
            self.done = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        if item.finished:
            self.done = True
        return item

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.rid)


def _event_stream(events, gens) -> StreamingResponse:
    """Server-sent events; the generations are closed (aborted in the engine) when the response ends."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(_close_all, gens))


def _close_all(streams) -> None:
    for s in streams:
        s.close()


# ---------------------------------------------------------------------------------------------
# server state


@dataclass
class ServerState:
    engine: AsyncEngine
    chat: ChatLayer
    tokenizer: object
    model_name: str
    max_model_len: int
    vocab_size: int  # the tokenizer's: ids a request may name
    api_key: str | None = None
    model_vocab_size: int = 0  # rows of the model's logits (padded past the tokenizer's, e.g. 151552)
    defaults: dict = field(default_factory=dict)  # generation_config.json sampling defaults
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))


def _sampling_params(**kw):
    from glm4.engine.sampling_params import SamplingParams

    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        raise P.bad_request(str(e)) from None


def _common_sampling(st: ServerState, req, max_tokens: int, logprobs: bool, top_logprobs: int) -> dict:
    d = st.defaults
    kw = dict(
        max_tokens=max_tokens,
        temperature=req.temperature if req.temperature is not None else d.get("temperature", 1.0),
        top_p=req.top_p if req.top_p is not None else d.get("top_p", 1.0),
        top_k=req.top_k if req.top_k is not None else d.get("top_k", 0),
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        min_tokens=req.min_tokens or 0,
        ignore_eos=bool(req.ignore_eos),
        stop=req.stop,
        seed=req.seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()} or None,
        logits_processors=[st.chat.vocab_guard] if st.model_vocab_size > st.vocab_size else [],
    )
    bad = [t for t in (kw["logit_bias"] or {}) if t >= st.vocab_size]
    if bad:
        raise P.bad_request(f"logit_bias: token id {bad[0]} is out of range (vocab size {st.vocab_size})", "logit_bias")
    return kw


def _check_model(st: ServerState, name: str) -> None:
    if name != st.model_name:
        raise P.APIError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model",
                         "model_not_found")


def _budget(st: ServerState, n_prompt: int, max_tokens: int | None, what: str) -> int:
    """max_tokens to use; 400 with the numbers when the prompt (+ requested tokens) exceed the context."""
    limit = st.max_model_len
    if n_prompt >= limit or (max_tokens is not None and n_prompt + max_tokens > limit):
        asked = n_prompt + (max_tokens or 0)
        raise P.APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                         f"{asked} tokens ({n_prompt} in the {what}, {max_tokens or 0} in the completion). "
                         "Please reduce the length of the prompt or completion.",
                         "invalid_request_error", "messages" if what == "messages" else "prompt",
                         "context_length_exceeded")
    return max_tokens if max_tokens is not None else limit - n_prompt


def _finish_reason(reason: str | None) -> str | None:
    if reason in (None, "stop", "length"):
        return reason
    return "stop"


async def _cancel_on_disconnect(request: Request, task: asyncio.Task) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.2)


async def _run_until_disconnect(request: Request, coro):
    """Await `coro`, cancelling it (and so aborting its engine requests) if the client disconnects."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, task))
    try:
        return await task
    except asyncio.CancelledError:
        raise P.APIError(499, "client disconnected", "invalid_request_error") from None
    finally:
        watcher.cancel()


def _aborted() -> P.APIError:
    return P.APIError(503, "the request was aborted by the server", "server_error", None, "aborted")


async def _collect_all(streams: list[EngineStream]) -> list[list]:
    """Every stream's outputs; all streams are closed (aborted if unfinished) on error or cancellation."""
    async def one(s):
        outs = [o async for o in s]
        if not outs or not outs[-1].finished:  # dropped by the engine loop (shutdown)
            raise _aborted()
        return outs

    try:
        return await asyncio.gather(*[one(s) for s in streams])
    finally:
        _close_all(streams)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _merge(gens: list[EngineStream]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several engine streams as (index, output) in arrival order."""
    if len(gens) == 1:  # the common n=1 case: no pump task, no extra queue hop per token
        try:
            async for o in gens[0]:
                yield 0, o
        finally:
            gens[0].close()
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, g):
        try:
            async for o in g:
                await q.put((i, o))
        except BaseException as e:  # surfaced to the consumer below
            await q.put((i, e))
        finally:
            await q.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    left = len(tasks)
    try:
        while left:
            i, o = await q.get()
            if o is done:
                left -= 1
            elif isinstance(o, BaseException):
                raise o
            else:
                yield i, o
    finally:
        for t in tasks:
            t.cancel()
        _close_all(gens)


# ---------------------------------------------------------------------------------------------
# chat completions


def _chat_logprobs(st: ServerState, entries: list[dict] | None) -> dict | None:
    if entries is None:
        return None
    return {"content": [st.chat.token_logprob(e) for e in entries], "refusal": None}


def _prepare_chat(st: ServerState, req: P.ChatCompletionRequest, rf: dict | None) -> tuple[ChatPlan, list]:
    """The request's ChatPlan and one SamplingParams per choice (each with its own grammar matcher)."""
    try:
        plan = st.chat.plan(
            [m.model_dump(exclude_none=True) for m in req.messages],
            tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
            tool_choice=req.tool_choice.model_dump() if isinstance(req.tool_choice, P.BaseModel) else req.tool_choice,
            parallel_tool_calls=req.parallel_tool_calls is not False, response_format=rf,
            enable_thinking=False if req.reasoning_effort in ("none", "minimal") else None)
        max_tokens = _budget(st, len(plan.prompt_ids), req.max_completion_tokens or req.max_tokens, "messages")
        kw = _common_sampling(st, req, max_tokens, bool(req.logprobs), req.top_logprobs or 0)
        params = [st.chat.sampling_params(plan, _sampling_params(**{**kw, "seed": None if req.seed is None else req.seed + i}))
                  for i in range(req.n)]
    except ChatError as e:
        raise P.bad_request(str(e), e.param, e.code) from None
    return plan, params


async def chat_completions(st: ServerState, req: P.ChatCompletionRequest, request: Request):
    _check_model(st, req.model)
    if req.response_format is not None and req.response_format.type == "json_schema":
        rf = {"type": "json_schema", "json_schema": req.response_format.json_schema.model_dump(by_alias=True)}
    else:
        rf = req.response_format.model_dump() if req.response_format else None
    st.engine.reserve(req.n)  # before the work below: a full server sheds load cheaply
    try:  # tokenizing, grammar checks and matcher construction run off the event loop
        plan, params = await run_in_threadpool(_prepare_chat, st, req, rf)
    except BaseException:
        st.engine.unreserve(req.n)
        raise
    n_prompt = len(plan.prompt_ids)
    gens = [st.engine.generate(plan.prompt_ids, p, reserved=True) for p in params]
    rid = P.random_id("chatcmpl-")
    st.metrics.inc("requests_total", endpoint="chat")
    st.metrics.inc("prompt_tokens_total", n_prompt * req.n)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _event_stream(_chat_stream(st, req, plan, gens, rid, include_usage), gens)
    t0 = time.monotonic()
    results = await _run_until_disconnect(request, _collect_all(gens))
    choices, n_gen = [], 0
    for i, outs in enumerate(results):
        last = outs[-1].outputs[0]
        n_gen += len(last.token_ids)
        content, tool_calls, reasoning = st.chat.parse_full(plan, last.text)
        reason = _finish_reason(last.finish_reason)
        if tool_calls and reason == "stop":
            reason = "tool_calls"
        message = {"role": "assistant", "content": content, "refusal": None, "tool_calls": tool_calls or None}
        if reasoning:
            message["reasoning_content"] = reasoning
        choices.append({"index": i, "message": message,
                        "logprobs": _chat_logprobs(st, last.logprobs) if req.logprobs else None,
                        "finish_reason": reason})
    _observe(st, t0, n_gen)
    body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": st.model_name,
            "choices": choices, "usage": usage_dict(n_prompt, n_gen), "system_fingerprint": None}
    return JSONResponse(body)


def _observe(st: ServerState, t0: float, n_gen: int) -> None:
    st.metrics.inc("generation_tokens_total", n_gen)
    st.metrics.observe("request_latency_seconds", time.monotonic() - t0)


async def _chat_stream(st: ServerState, req: P.ChatCompletionRequest, plan: ChatPlan, gens, rid: str,
                       include_usage: bool) -> AsyncIterator[str]:
    created, model = int(time.time()), st.model_name
    t0 = time.monotonic()
    first_token = None

    def chunk(choices, usage=None):
        d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
        if include_usage:
            d["usage"] = usage
        return _sse(d)

    streams = [st.chat.stream(plan) for _ in gens]
    finished = [False] * len(gens)
    n_gen = [0] * len(gens)
    tool_seen = [False] * len(gens)
    for i in range(len(gens)):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    try:
        async for i, out in _merge(gens):
            o = out.outputs[0]
            if first_token is None and o.delta_token_ids:
                first_token = time.monotonic()
                st.metrics.observe("time_to_first_token_seconds", first_token - t0)
            n_gen[i] = len(o.token_ids)
            events = streams[i].feed(o.delta_text)
            if o.finished:
                events += streams[i].finish()
            lp = _chat_logprobs(st, o.delta_logprobs) if req.logprobs else None
            for delta in _events_to_deltas(events, tool_seen, i):
                yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}])
                lp = None
            if lp is not None and lp["content"]:
                yield chunk([{"index": i, "delta": {}, "logprobs": lp, "finish_reason": None}])
            if o.finished:
                finished[i] = True
                reason = _finish_reason(o.finish_reason)
                if tool_seen[i] and reason == "stop":
                    reason = "tool_calls"
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if not all(finished):
            yield _sse(_aborted().body())
    except P.APIError as e:
        yield _sse(e.body())
    except Exception as e:  # engine failure mid-stream: tell the client in-band, then end the stream
        log.exception("stream failed")
        yield _sse(P.APIError(500, f"generation failed: {e}", "server_error").body())
    if include_usage:
        yield chunk([], usage_dict(len(plan.prompt_ids), sum(n_gen)))
    yield "data: [DONE]\n\n"
    _observe(st, t0, sum(n_gen))


def _events_to_deltas(events: list[dict], tool_seen: list[bool], i: int) -> list[dict]:
    deltas = []
    for ev in events:
        if ev["type"] == "content":
            if ev["text"]:
                deltas.append({"content": ev["text"]})
        elif ev["type"] == "reasoning":
            deltas.append({"reasoning_content": ev["text"]})
        elif ev["type"] == "tool_call":
            tool_seen[i] = True
            tc = {"index": ev["index"]}
            if ev.get("id"):
                tc.update(id=ev["id"], type="function", function={"name": ev["name"], "arguments": ev.get("arguments", "")})
            else:
                tc["function"] = {"arguments": ev.get("arguments", "")}
            deltas.append({"tool_calls": [tc]})
    return deltas


# ---------------------------------------------------------------------------------------------
# completions


def _prompts(st: ServerState, req: P.CompletionRequest) -> list[tuple[list[int], str]]:
    p = req.prompt
    items: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((st.chat.encode_completion_prompt(item), item))
        else:
            bad = [t for t in item if not 0 <= t < st.vocab_size]
            if bad:
                raise P.bad_request(f"prompt: token id {bad[0]} is out of range (vocab size {st.vocab_size})",
                                    "prompt")
            out.append((list(item), None))
    return out


def _completion_logprobs(st: ServerState, entries: list[dict] | None, offset: int) -> tuple[dict, int]:
    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries or []:
        tok = st.chat.token_text(e["token_id"])
        lp["tokens"].append(tok)
        lp["token_logprobs"].append(e["logprob"])
        lp["top_logprobs"].append({st.chat.token_text(t): v for t, v in e.get("top_logprobs") or []})
        lp["text_offset"].append(offset)
        offset += len(tok)
    return lp, offset


async def completions(st: ServerState, req: P.CompletionRequest, request: Request):
    _check_model(st, req.model)
    if req.suffix:
        raise P.bad_request("suffix is not supported", "suffix", "unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise P.bad_request("best_of other than n is not supported", "best_of", "unsupported_parameter")
    if req.echo and req.logprobs is not None:
        raise P.bad_request("echo together with logprobs is not supported (no prompt logprobs)", "echo",
                            "unsupported_parameter")
    prompts = _prompts(st, req)
    max_tokens = req.max_tokens
    jobs = []  # (choice index, prompt ids, prompt text, params)
    for pi, (ids, text) in enumerate(prompts):
        mt = _budget(st, len(ids), max_tokens, "prompt")
        kw = _common_sampling(st, req, mt, req.logprobs is not None, req.logprobs or 0)
        for j in range(req.n):
            kw_j = {**kw, "seed": None if req.seed is None else req.seed + j, "skip_special_tokens": True}
            jobs.append((pi * req.n + j, ids, text, _sampling_params(**kw_j)))
    st.engine.reserve(len(jobs))
    gens = [st.engine.generate(ids, p, reserved=True) for _, ids, _, p in jobs]
    n_prompt = sum(len(ids) for ids, _ in prompts)  # each prompt once, as OpenAI counts n > 1
    rid = P.random_id("cmpl-")
    st.metrics.inc("requests_total", endpoint="completions")
    st.metrics.inc("prompt_tokens_total", n_prompt)

    def echo_text(k):
        _, ids, text, _ = jobs[k]
        return (text if text is not None else st.tokenizer.decode(ids)) if req.echo else ""

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _event_stream(_completion_stream(st, req, jobs, gens, rid, include_usage, n_prompt, echo_text), gens)
    t0 = time.monotonic()
    results = await _run_until_disconnect(request, _collect_all(gens))
    choices, n_gen = [], 0
    for k, outs in enumerate(results):
        last = outs[-1].outputs[0]
        n_gen += len(last.token_ids)
        prefix = echo_text(k)
        lp = _completion_logprobs(st, last.logprobs, len(prefix))[0] if req.logprobs is not None else None
        choices.append({"index": jobs[k][0], "text": prefix + last.text, "logprobs": lp,
                        "finish_reason": _finish_reason(last.finish_reason)})
    _observe(st, t0, n_gen)
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": st.model_name,
                         "choices": choices, "usage": usage_dict(n_prompt, n_gen), "system_fingerprint": None})


async def _completion_stream(st, req, jobs, gens, rid, include_usage, n_prompt, echo_text):
    created = int(time.time())
    t0 = time.monotonic()
    offsets = [0] * len(jobs)
    finished = [False] * len(jobs)
    n_gen = [0] * len(jobs)

    def chunk(choices, usage=None):
        d = {"id": rid, "object": "text_completion", "created": created, "model": st.model_name,
             "system_fingerprint": None, "choices": choices}
        if include_usage:
            d["usage"] = usage
        return _sse(d)

    for k in range(len(jobs)):
        if req.echo:
            yield chunk([{"index": jobs[k][0], "text": echo_text(k), "logprobs": None, "finish_reason": None}])
    try:
        async for k, out in _merge(gens):
            o = out.outputs[0]
            n_gen[k] = len(o.token_ids)
            lp = None
            if req.logprobs is not None:
                lp, offsets[k] = _completion_logprobs(st, o.delta_logprobs, offsets[k])
            if o.delta_text or lp:
                yield chunk([{"index": jobs[k][0], "text": o.delta_text, "logprobs": lp, "finish_reason": None}])
            if o.finished:
                finished[k] = True
                yield chunk([{"index": jobs[k][0], "text": "", "logprobs": None,
                              "finish_reason": _finish_reason(o.finish_reason)}])
        if not all(finished):
            yield _sse(_aborted().body())
    except P.APIError as e:
        yield _sse(e.body())
    except Exception as e:
        log.exception("stream failed")
        yield _sse(P.APIError(500, f"generation failed: {e}", "server_error").body())
    if include_usage:
        yield chunk([], usage_dict(n_prompt, sum(n_gen)))
    yield "data: [DONE]\n\n"
    _observe(st, t0, sum(n_gen))


# ---------------------------------------------------------------------------------------------
# the app


def _error_response(e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "image_url"}


def _clean_loc(loc) -> list[str]:
    # pydantic adds union members ("str", "list[...]") and discriminator tags ("user") to the path
    out = []
    for x in loc:
        x = str(x)
        if x == "body" or "[" in x or x in ("str", "int", "float", "bool", "dict", "list"):
            continue
        if x in _ROLE_TAGS and out and out[-1].isdigit():
            continue
        out.append(x)
    return out


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) for the first validation error, in OpenAI's words where it has them."""
    errs = exc.errors()
    if not errs:
        return "invalid request", None, "invalid_value"
    e = errs[0]
    loc = _clean_loc(e.get("loc", ()))
    param = ".".join(loc) or None
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    kind = e.get("type")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None, "invalid_json"
    if kind == "missing":
        return f"missing required parameter: {param}", param, "missing_required_parameter"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {loc[-1] if loc else param}", param, "unknown_parameter"
    if param is None and ":" in msg and msg.split(":", 1)[0].replace("_", "").replace(".", "").isalnum():
        param = msg.split(":", 1)[0]  # our model validators name the parameter first
        return msg, param, "invalid_value"
    return (f"{param}: {msg}" if param else msg), param, "invalid_value"


MAX_BODY_BYTES = 32 * 2**20


class _GateMiddleware:
    """Bearer-token check for every route but /health, and a request-size cap (pure ASGI, so streaming
    and disconnect detection stay intact)."""

    def __init__(self, app, api_key: str | None, max_body: int = MAX_BODY_BYTES):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        size = headers.get(b"content-length", b"0")
        if size.isdigit() and int(size) > self.max_body:
            err = P.APIError(413, f"request body over {self.max_body} bytes", "invalid_request_error", None,
                             "request_too_large")
            return await _error_response(err)(scope, receive, send)
        if not self.api_key or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get(b"api-key", b"").decode("latin-1")
        if not hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode("utf-8")):
            err = P.APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                             "invalid_request_error", None, "invalid_api_key")
            return await _error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(st: ServerState, drain_timeout: float = 30.0) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        st.engine.start()
        yield
        # uvicorn has stopped accepting and waited for open responses; let the engine finish anything left
        await asyncio.get_running_loop().run_in_executor(None, st.engine.stop, drain_timeout)

    app = FastAPI(title="glm4 OpenAI-compatible server", version="0.1.0", lifespan=lifespan)
    app.state.glm4 = st
    m = st.metrics
    m.describe("requests_total", "counter", "requests accepted, by endpoint")
    m.describe("prompt_tokens_total", "counter", "prompt tokens processed")
    m.describe("generation_tokens_total", "counter", "tokens generated")
    m.describe("request_errors_total", "counter", "requests answered with an error, by status")
    m.gauge_fn("requests_in_flight", lambda: st.engine.num_pending)
    m.gauge_fn("queue_depth", lambda: _engine_stat(st, "waiting"))
    m.gauge_fn("requests_running", lambda: _engine_stat(st, "running"))
    m.gauge_fn("kv_cache_usage_ratio", lambda: _kv_usage(st)[2])
    m.gauge_fn("kv_blocks_used", lambda: _kv_usage(st)[0])
    m.gauge_fn("kv_blocks_total", lambda: _kv_usage(st)[1])

    @app.exception_handler(P.APIError)
    async def _api_error(request, exc: P.APIError):
        m.inc("request_errors_total", status=str(exc.status))
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        msg, param, code = _validation_message(exc)
        m.inc("request_errors_total", status="400")
        return _error_response(P.APIError(400, msg, "invalid_request_error", param, code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        m.inc("request_errors_total", status=str(exc.status_code))
        msg = {404: f"Unknown route: {request.method} {request.url.path}",
               405: f"Method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error_response(P.APIError(exc.status_code, msg, "invalid_request_error",
                                          headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error")
        m.inc("request_errors_total", status="500")
        return _error_response(P.APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    err = {"model": P.ErrorResponse}
    errors = {400: err, 401: err, 404: err, 429: err}

    @app.get("/health", responses={503: err})
    async def health():
        if not st.engine.alive:
            return JSONResponse({"status": "error"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models", response_model=P.ModelList, responses={401: err})
    async def models():
        return P.ModelList(data=[P.ModelCard(id=st.model_name, created=st.created, max_model_len=st.max_model_len)])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses={401: err, 404: err})
    async def model(model_id: str):
        _check_model(st, model_id)
        return P.ModelCard(id=st.model_name, created=st.created, max_model_len=st.max_model_len)

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: err})
    async def metrics():
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", response_model=P.ChatCompletion, responses=errors)
    async def chat(req: P.ChatCompletionRequest, request: Request) -> Response:
        return await chat_completions(st, req, request)

    @app.post("/v1/completions", response_model=P.Completion, responses=errors)
    async def complete(req: P.CompletionRequest, request: Request) -> Response:
        return await completions(st, req, request)

    app.add_middleware(_GateMiddleware, api_key=st.api_key)
    return app


def _engine_stat(st: ServerState, which: str) -> float:
    sched = getattr(st.engine.engine, "scheduler", None)
    q = getattr(sched, which, None)
    return float(len(q)) if q is not None else float("nan")


def _kv_usage(st: ServerState) -> tuple[float, float, float]:
    """(blocks used, blocks total, usage ratio) from the engine's block manager."""
    eng = st.engine.engine
    bm = getattr(eng, "block_manager", None) or getattr(getattr(eng, "scheduler", None), "block_manager", None)
    if bm is None:
        return float("nan"), float("nan"), float("nan")
    total = float(getattr(bm, "num_blocks", 0) or len(getattr(bm, "blocks", [])))
    free = float(bm.num_free_blocks() if callable(getattr(bm, "num_free_blocks", None)) else bm.num_free_blocks)
    used = total - free
    return used, total, (used / total if total else 0.0)


# ---------------------------------------------------------------------------------------------
# building from a checkpoint


def _generation_defaults(folder: Path | None) -> dict:
    if folder is None or not (folder / "generation_config.json").is_file():
        return {}
    try:
        g = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    for k in ("temperature", "top_p", "top_k"):
        if isinstance(g.get(k), (int, float)) and k not in out:
            out[k] = g[k]
    return out


def build_state(model: str | None = None, api_key: str | None = None, model_name: str | None = None,
                max_pending: int = 256, verbose: bool = False, **engine_args) -> ServerState:
    """Load a checkpoint into an LLM and wrap its engine, tokenizer and chat format for serving.
    `verbose`: print what runs where (CPU, dtypes, each linear kind's kernel, KV cache)."""
    from glm4.engine.chat import chat_layer_for
    from glm4.engine.llm import LLM

    llm = LLM(model, **engine_args)
    if verbose:
        print(llm.describe(), flush=True)
    layer, tok, folder = chat_layer_for(llm, model)
    _ = layer.compiler  # build the constrained-decoding tables now (about 1 s for a 150k vocabulary), not on a request
    eng = getattr(llm, "engine", llm)
    max_len = int(getattr(llm, "max_model_len", 0) or getattr(eng, "max_model_len", 0)
                  or getattr(getattr(eng, "config", None), "max_model_len", 0) or 8192)
    vocab = int(tok.vocab_size)
    model_vocab = int(getattr(getattr(eng, "config", None), "vocab_size", 0) or vocab)
    metrics = Metrics()
    name = model_name or (Path(folder).name if folder else "glm4")
    return ServerState(engine=AsyncEngine(eng, max_pending, metrics), chat=layer, tokenizer=tok, model_name=name,
                       max_model_len=max_len, vocab_size=vocab, api_key=api_key, model_vocab_size=model_vocab,
                       defaults=_generation_defaults(Path(folder) if folder else None), metrics=metrics)


SMALL_MODEL_BYTES = 256 * 2**20


def serve_threads(model: str | None, threads: str | int | None, cpus: int | None = None) -> int | None:
    """torch threads for `glm4 serve`: an explicit count, or "auto" — on a machine of <= 4 cores a small model
    (decode costs ~ms, so HTTP and streaming per token weigh as much) leaves one core to the event loop; a big
    model keeps torch's default (its matmuls need every core). None = torch's default."""
    if threads is None or threads == "auto":
        cpus = cpus or os.cpu_count() or 1
        if cpus > 4 or cpus < 2:
            return None
        if model is None:
            from glm4.assets import default_model

            model = default_model()
        weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) if Path(model).is_dir() else 0
        return cpus - 1 if 0 < weights < SMALL_MODEL_BYTES else None
    try:
        n = int(threads)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"--threads must be a positive integer or 'auto', got {threads!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="glm4 serve", description="OpenAI-compatible server for a GLM-4 checkpoint")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--served-model-name", default=None, help="model id clients use (default: folder name)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("GLM4_API_KEY"), help="require 'Authorization: Bearer KEY'")
    ap.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help=DTYPE_HELP)
    ap.add_argument("--quantization", default=None, choices=["int8", "int4"], help="weight-only quantization at load")
    ap.add_argument("--kv-cache-dtype", default=None, choices=["auto", "int8", "bfloat16", "float16", "float32"],
                    help="KV cache storage: auto = the model's dtype; int8 = per-token-per-head int8 + fp32 scales "
                         "(about half the bytes of bf16, a quarter of fp32)")
    ap.add_argument("--verbose", action="store_true", help="print the CPU, dtypes and each linear kind's kernel")
    ap.add_argument("--threads", default="auto",
                    help="torch CPU threads; auto: on <= 4 cores a small model (< 256 MB of weights) leaves one core "
                         "to the HTTP side (1.7x requests/s at one client for the default model on 2 cores)")
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on exit")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        threads = serve_threads(args.model, args.threads)
    except ValueError as e:
        print(f"glm4 serve: {e}")
        return 2
    engine_args = {k: v for k, v in (("max_model_len", args.max_model_len), ("device", args.device),
                                     ("dtype", args.dtype), ("num_threads", threads),
                                     ("kv_cache_dtype", args.kv_cache_dtype), ("quantization", args.quantization))
                   if v is not None}
    try:
        st = build_state(args.model, api_key=args.api_key, model_name=args.served_model_name,
                         max_pending=args.max_queue, verbose=args.verbose, **engine_args)
    except (OSError, ValueError, CheckpointError) as e:
        print(f"glm4 serve: {e}")
        return 2
    import uvicorn

    app = create_app(st, drain_timeout=args.drain_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout)
    server = uvicorn.Server(config)
    server.capture_signals = lambda: _drain_on_signals(server)
    server.run()
    return 0


@contextlib.contextmanager
def _drain_on_signals(server):
    """SIGINT/SIGTERM start uvicorn's graceful shutdown; unlike uvicorn's own handler the signal is not
    re-raised afterwards, so a drained server exits 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
