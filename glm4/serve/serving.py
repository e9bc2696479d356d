"""What the chat and completions handlers share: the server's state, sampling parameters from a request, the
context budget, waiting for engine requests (all of them, or interleaved as they come) with a client that may
disconnect, server-sent events, token texts for logprobs, and the usage / latency bookkeeping.

A server may hold companion models next to its own (`glm4 serve` without --model: the shipped text model with the
shipped vision model beside it): `route(st, model, media)` picks the state that serves a request — the companion
its `model` names, or, for a request with pictures the served model cannot see, the companion that can.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from glm4.serve.async_engine import AsyncEngine, EngineRequest, abort_unfinished
from glm4.serve.errors import APIError, aborted, bad_request, client_gone
from glm4.serve.metrics import Metrics
from glm4.tokenizer import TokenTexts

log = logging.getLogger("glm4.serve")


@dataclass
class ServerState:
    engine: AsyncEngine
    chat: Any  # the chat layer: used by the handlers of chat-shaped APIs (chat_handler, responses)
    tokenizer: Any
    model_name: str
    max_model_len: int
    vocab_size: int  # the tokenizer's: ids a request may name
    api_key: str | None = None
    model_vocab_size: int = 0  # rows of the model's logits (padded past the tokenizer's, e.g. 151552)
    vocab_guard: Callable | None = None  # logits processor masking the padding rows (no text)
    defaults: dict = field(default_factory=dict)  # generation_config.json sampling defaults
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    adapters: list[str] = field(default_factory=list)  # LoRA adapters a request's `model` may name (glm4.engine.lora)
    companions: dict[str, ServerState] = field(default_factory=dict)  # other models served beside this one, by name
    aliases: list[str] = field(default_factory=list)  # other names routed here (a companion: its primary's name)
    token_texts: TokenTexts = field(init=False)
    max_token_bytes: int = field(default=0, init=False)  # see serving.max_token_bytes()

    def __post_init__(self):
        self.token_texts = TokenTexts(self.tokenizer)


# ---------------------------------------------------------------------------------------------
# CPU work off the event loop

CPU_WORKERS = 2  # threads for tokenizing / template rendering / grammar compiling at once (--cpu-workers)
_cpu_limiter: anyio.CapacityLimiter | None = None


def set_cpu_workers(n: int) -> None:
    """Bound the threads `offload` runs CPU work on (a pure-Python tokenizer holds the GIL: more threads would only
    starve the event loop, which answers /health and writes every stream)."""
    global CPU_WORKERS, _cpu_limiter
    CPU_WORKERS, _cpu_limiter = max(1, int(n)), None


async def offload(fn: Callable, *args):
    """`fn(*args)` on the bounded CPU pool, so that tokenizing a big prompt never stalls the event loop."""
    global _cpu_limiter
    if _cpu_limiter is None:
        _cpu_limiter = anyio.CapacityLimiter(CPU_WORKERS)
    return await anyio.to_thread.run_sync(lambda: fn(*args), limiter=_cpu_limiter)


async def plan_and_submit(st: ServerState, planner: Callable, *args):
    """One request of one completion: reserve its place first (a full server sheds load before any work), run
    `planner(st, *args) -> (plan, params)` off the event loop (tokenizing, grammar checks, matcher construction),
    then submit. The place is given back when planning fails. Returns (plan, engine request)."""
    st.engine.reserve(1)
    try:
        plan, params = await offload(planner, st, *args)
    except BaseException:
        st.engine.unreserve(1)
        raise
    return plan, st.engine.submit(plan.prompt_ids, params, reserved=True, multi_modal_data=plan.multi_modal_data)


def max_token_bytes(st: ServerState) -> int:
    """The most bytes one token stands for (special-token strings included): a text of B bytes is at least
    ceil(B / this) tokens. Computed once per server."""
    n = st.max_token_bytes
    if not n:
        tok = st.tokenizer
        n = max((len(s.encode("utf-8")) for s in tok.special_tokens), default=1)
        ranks = getattr(tok, "_ranks", None)
        if ranks:  # tiktoken: the byte strings are the keys
            n = max(n, max(len(b) for b in ranks))
        else:
            n = max(n, max(len(st.token_texts.tok.decode_bytes([i])) for i in range(tok.vocab_size)))
        st.max_token_bytes = n
    return n


def check_text_fits(st: ServerState, text: str, max_tokens: int, what: str, param: str | None = None) -> None:
    """Reject (400 context_length_exceeded) before tokenizing a text that cannot fit: it is at least
    ceil(bytes / max_token_bytes) tokens, so if even that many leave no room the real count cannot either."""
    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    at_least = -(-n_bytes // max_token_bytes(st))
    if at_least >= st.max_model_len or at_least + max_tokens > st.max_model_len:
        raise APIError(400, f"This model's maximum context length is {st.max_model_len} tokens. However, the "
                       f"{what} alone is at least {at_least} tokens ({n_bytes} bytes). Please reduce the length of "
                       "the prompt.", "invalid_request_error",
                       param or ("messages" if what == "messages" else "prompt"), "context_length_exceeded")


def check_messages_fit(st: ServerState, messages: list, param: str = "messages") -> None:
    """`check_text_fits` for a chat, before its template is rendered and tokenized: refused when the prompt alone
    cannot fit (a prompt that fits but leaves too little room for max_tokens is bounded in size, and the exact
    count after tokenizing says it with the real numbers). Only a final user turn of text
    counts (a string, or text parts, which the planner joins as they are): whatever a format does with the history
    (drops past reasoning, strips whitespace, cuts what precedes a `</think>`), that turn's text after its last
    `</think>`, stripped, is in the prompt, so its bytes bound the prompt's tokens from below. Other turns may
    render shorter than their bytes: not counted."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return
    content = last.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if isinstance(content, str):
        check_text_fits(st, content.split("</think>")[-1].strip(), 1, "last user message", param)


# ---------------------------------------------------------------------------------------------
# request -> engine parameters


MEDIA_PART_TYPES = frozenset({"image_url", "video_url", "image", "video", "input_image"})


def carries_media(body) -> bool:
    """Whether request content (pydantic models, dicts, lists) holds a picture or video in any served API's shape:
    OpenAI image_url / video_url parts, Responses input_image, Anthropic image blocks, Ollama `images`. Walks the
    objects in place (no copy of a 2 MiB prompt on the event loop); strings are never entered."""
    if hasattr(body, "__pydantic_fields__"):
        body = {**body.__dict__, **(getattr(body, "__pydantic_extra__", None) or {})}
    if isinstance(body, dict):
        if body.get("type") in MEDIA_PART_TYPES or body.get("images"):
            return True
        return any(carries_media(v) for v in body.values() if not isinstance(v, (str, bytes, int, float)))
    if isinstance(body, (list, tuple)):
        return any(carries_media(v) for v in body if not isinstance(v, (str, bytes, int, float)))
    return False


def route(st: ServerState, model: str | None, media: bool = False) -> ServerState:
    """The state serving a request: the companion its `model` names; for a request carrying pictures or video that
    this model cannot see, the companion that can; else `st` itself."""
    if not st.companions:
        return st
    name = model.removesuffix(":latest") if isinstance(model, str) else model
    if name in st.companions:
        return st.companions[name]
    if media and st.chat.media is None:
        return next((c for c in st.companions.values() if c.chat.media is not None), st)
    return st


def served_names(st: ServerState) -> list[str]:
    """Every name /v1/models lists: the model, its adapters, then the companions and theirs."""
    return [st.model_name, *st.adapters] + [n for c in st.companions.values() for n in (c.model_name, *c.adapters)]


def check_model(st: ServerState, name: str) -> str | None:
    """404 unless `name` is the served model or one of its LoRA adapters; returns the adapter name (None: base)."""
    if name != st.model_name and name not in st.adapters and name not in st.aliases:
        raise APIError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model", "model_not_found")
    return adapter_of(st, name)


def adapter_of(st: ServerState, model: str | None) -> str | None:
    """The LoRA adapter a request's `model` names, None for the base (the name is checked by check_model)."""
    return model if model in st.adapters else None


def sampling_params(**kw):
    """SamplingParams, with what it rejects as a 400."""
    from glm4.engine.sampling_params import SamplingParams

    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e)) from None


def sampling_kwargs(st: ServerState, req, max_tokens: int, logprobs: bool, top_logprobs: int) -> dict:
    """SamplingParams keywords from the fields chat and completions requests share (checkpoint defaults for
    temperature / top_p / top_k when the request leaves them out)."""
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
        logits_processors=[st.vocab_guard] if st.vocab_guard and st.model_vocab_size > st.vocab_size else [],
        lora=adapter_of(st, getattr(req, "model", None)),
    )
    bad = [t for t in (kw["logit_bias"] or {}) if t >= st.vocab_size]
    if bad:
        raise bad_request(f"logit_bias: token id {bad[0]} is out of range (vocab size {st.vocab_size})", "logit_bias")
    return kw


def seeded(kw: dict, i: int) -> dict:
    """The keywords of the i-th of n choices: seed + i, so that seeded choices differ from each other."""
    return {**kw, "seed": None if kw.get("seed") is None else kw["seed"] + i}


def token_budget(st: ServerState, n_prompt: int, max_tokens: int | None, what: str) -> int:
    """max_tokens to use; 400 with the numbers when the prompt (+ requested tokens) exceed the context."""
    limit = st.max_model_len
    if n_prompt >= limit or (max_tokens is not None and n_prompt + max_tokens > limit):
        asked = n_prompt + (max_tokens or 0)
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{asked} tokens ({n_prompt} in the {what}, {max_tokens or 0} in the completion). "
                       "Please reduce the length of the prompt or completion.",
                       "invalid_request_error", "messages" if what == "messages" else "prompt",
                       "context_length_exceeded")
    return max_tokens if max_tokens is not None else limit - n_prompt


# ---------------------------------------------------------------------------------------------
# engine outputs -> response


def finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason in OpenAI's words (an `abort` the client never sees becomes stop)."""
    return reason if reason in (None, "stop", "length") else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def count_request(st: ServerState, endpoint: str, prompt_tokens: int) -> None:
    st.metrics.inc("requests_total", endpoint=endpoint)
    st.metrics.inc("prompt_tokens_total", prompt_tokens)


def observe_finished(st: ServerState, t0: float, n_generated: int) -> None:
    """A finished reply's latency (its tokens are counted by the engine bridge as they come, aborted ones too)."""
    st.metrics.observe("request_latency_seconds", time.monotonic() - t0)


async def _cancel_on_disconnect(request: Request, task: asyncio.Task) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.2)


async def run_until_disconnect(request: Request, coro):
    """Await `coro`, cancelling it (and so aborting its engine requests) if the client disconnects."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, task))
    try:
        return await task
    except asyncio.CancelledError:
        raise client_gone() from None
    finally:
        watcher.cancel()


async def collect_outputs(requests: list[EngineRequest]) -> list[list]:
    """Every request's outputs; all requests are aborted if unfinished on error or cancellation."""
    async def one(r):
        outs = [o async for o in r]
        if not outs or not outs[-1].finished:  # dropped by the engine loop (shutdown)
            raise aborted()
        return outs

    try:
        return await asyncio.gather(*[one(r) for r in requests])
    finally:
        abort_unfinished(requests)


async def interleave_outputs(requests: list[EngineRequest]) -> AsyncIterator[tuple[int, object]]:
    """Several requests' outputs as (request index, RequestOutput) in arrival order."""
    if len(requests) == 1:  # the common n=1 case: no pump task, no extra queue hop per token
        try:
            async for o in requests[0]:
                yield 0, o
        finally:
            requests[0].close()
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, r):
        try:
            async for o in r:
                await q.put((i, o))
        except BaseException as e:  # surfaced to the consumer below
            await q.put((i, e))
        finally:
            await q.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
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
        abort_unfinished(requests)


def sse_event(obj) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_response(events: AsyncIterator[str], requests: list[EngineRequest]) -> StreamingResponse:
    """A text/event-stream response; the engine requests are aborted if unfinished when the response ends."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(abort_unfinished, requests))


async def sse_body(chunks: AsyncIterator[str], closing: Callable[[], list[str]]) -> AsyncIterator[str]:
    """`chunks`, then `closing()` (the usage chunk) and [DONE]. An error after the response has started is told
    in-band as an error event (the status line is gone by then); the stream still ends with [DONE]."""
    try:
        async for c in chunks:
            yield c
    except APIError as e:
        yield sse_event(e.body())
    except Exception as e:  # engine failure mid-stream
        log.exception("stream failed")
        yield sse_event(APIError(500, f"generation failed: {e}", "server_error").body())
    for c in closing():
        yield c
    yield SSE_DONE
