"""The Ollama API: /api/chat, /api/generate (NDJSON streams by default), /api/tags, /api/show, /api/ps,
/api/version, as a thin adapter onto the chat planner's plans, the engine's requests and the reply's events
(the same ones /v1/chat/completions uses).

    client = ollama.Client(host="http://127.0.0.1:8000")
    client.chat(model="glm4", messages=[...], tools=[...], format=schema, think=True, options={"temperature": 0})

The served model answers to its name and to `NAME:latest`. Thinking goes out as `thinking`, tool calls with
their arguments as objects (a streamed call comes whole, in one chunk, once complete). The last object of a
reply has done, done_reason and the counts and durations (nanoseconds). Errors are Ollama's `{"error": "..."}`
with a 4xx status (404 for an unknown model); an error after a stream has started is its last line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from glm4.chat.events import ContentDelta, ReasoningDelta, ToolCallEnd
from glm4.chat.planner import ChatError, ChatPlan
from glm4.serve import ollama_protocol as O
from glm4.serve import serving
from glm4.serve.async_engine import abort_unfinished
from glm4.serve.completions import encode_prompt
from glm4.serve.errors import APIError, ParsedBodyRoute, aborted, validation_error
from glm4.serve.serving import ServerState
from glm4.serve.tokenization import chat_template_text

log = logging.getLogger("glm4.serve")

OLLAMA_VERSION = "0.13.0"  # the Ollama release whose API shapes these routes follow
NDJSON = "application/x-ndjson"


class OllamaRoute(ParsedBodyRoute):
    """A route whose errors take Ollama's shape: `{"error": message}` with the status."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                return _error(400, validation_error(e).message)
            except APIError as e:
                return _error(e.status, e.message, e.headers)
            except (ChatError, ValidationError, ValueError) as e:
                return _error(400, _one_line(e))

        return answer


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
    return str(e).removeprefix("Value error, ")


router = APIRouter(route_class=OllamaRoute)


def _state(request: Request) -> ServerState:
    return request.app.state.glm4


def _check_model(st: ServerState, name: str) -> None:
    if name.removesuffix(":latest") not in (st.model_name, *st.adapters, *st.aliases):
        raise APIError(404, f"model '{name}' not found")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# requests -> plans and sampling parameters


def _sampling(st: ServerState, req, plan: ChatPlan):
    """The engine's SamplingParams of a request: its options, the checkpoint's defaults, the plan's constraints."""
    o = O.read_options(req.options)
    fields = SimpleNamespace(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p,
                             presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
                             repetition_penalty=o.repeat_penalty, min_tokens=0, ignore_eos=False, stop=o.stop,
                             seed=o.seed, logit_bias=None, model=req.model.removesuffix(":latest"))
    n_prompt = len(plan.prompt_ids)
    wanted = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    max_tokens = serving.token_budget(st, n_prompt, wanted, "messages")
    kw = serving.sampling_kwargs(st, fields, max_tokens, bool(req.logprobs), req.top_logprobs or 0)
    return st.chat.sampling_params(plan, serving.sampling_params(**kw))


def _check_think(st: ServerState, req) -> dict:
    if req.think not in (None, False) and not st.chat.fmt.spec.thinks:
        raise APIError(400, f"\"{req.model}\" does not support thinking")
    return O.thinking_switches(req.think) if st.chat.fmt.spec.thinks else {}


def _plan_chat(st: ServerState, req: O.ChatRequest):
    messages = O.openai_messages(req.messages)
    serving.check_messages_fit(st, messages)
    plan = st.chat.plan(messages, tools=req.tools or None,
                        response_format=O.response_format(req.format), **_check_think(st, req))
    return plan, _sampling(st, req, plan)


def _plan_generate(st: ServerState, req: O.GenerateRequest):
    for name in ("suffix", "template"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by this server")
    if req.raw:
        if req.format or req.think or req.images:
            raise APIError(400, "format, think and images need the chat template: not available with raw")
        plan = ChatPlan(prompt_ids=encode_prompt(st.tokenizer, req.prompt or ""))
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
            [{"role": "user", "content": O.user_content(req.prompt or "", req.images)}]
        serving.check_messages_fit(st, messages, "prompt")
        plan = st.chat.plan(messages, response_format=O.response_format(req.format), **_check_think(st, req))
    if req.context:
        bad = [t for t in req.context if not 0 <= t < st.vocab_size]
        if bad:
            raise APIError(400, f"context: token id {bad[0]} is out of range (vocab size {st.vocab_size})")
        ids = plan.prompt_ids
        prefix = 2 if ids[:2] == req.context[:2] else 0  # the `[gMASK]<sop>` that opens both
        plan.prompt_ids = list(req.context) + ids[prefix:]
    return plan, _sampling(st, req, plan)


# ---------------------------------------------------------------------------------------------
# engine outputs -> Ollama objects


class _Reply:
    """One reply's state: the planner's event parser and fold, timing, and what was streamed."""

    def __init__(self, st: ServerState, plan: ChatPlan, req, endpoint: str, t0: float):
        self.st, self.plan, self.req = st, plan, req
        self.parser = st.chat.stream(plan)
        self.t0, self.t_first = t0, None  # t0: the request's arrival (durations count its planning too)
        self.n_gen, self.token_ids, self.sent_calls = 0, [], set()
        serving.count_request(st, endpoint, len(plan.prompt_ids))

    def feed(self, o) -> tuple[str, str, list[dict]]:
        """(content, thinking, finished tool calls) of one engine output's delta."""
        if self.t_first is None and o.delta_token_ids:
            self.t_first = time.monotonic()
        self.n_gen, self.token_ids = len(o.token_ids), o.token_ids
        events = self.parser.feed_events(o.delta_text)
        if o.finished:
            events += self.parser.finish_events()
        content = "".join(ev.text for ev in events if isinstance(ev, ContentDelta))
        thinking = "".join(ev.text for ev in events if isinstance(ev, ReasoningDelta))
        ended = [ev.index for ev in events if isinstance(ev, ToolCallEnd)]
        if o.finished:  # and any call the parser completed without an end event
            ended += [i for i in self.parser.calls if i not in ended]
        calls = [self.call(i) for i in ended if i in self.parser.calls and i not in self.sent_calls]
        self.sent_calls.update(ended)
        return content, thinking, calls

    def call(self, index: int) -> dict:
        c = self.parser.calls[index]
        try:
            args = json.loads(c["function"]["arguments"] or "{}")
        except ValueError:
            args = {}
        return {"id": c["id"], "function": {"index": index, "name": c["function"]["name"], "arguments": args}}

    def logprobs(self, entries) -> list[dict] | None:
        if not self.req.logprobs:
            return None
        texts = self.st.token_texts

        def one(t: int, lp: float) -> dict:
            return {"token": texts.text(t), "logprob": lp, "bytes": list(texts.bytes(t))}

        return [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e.get("top_logprobs") or []]}
                for e in entries or []]

    def stats(self, reason: str | None) -> dict:
        end = time.monotonic()
        first = self.t_first or end
        serving.observe_finished(self.st, self.t0, self.n_gen)
        ns = lambda s: int(s * 1e9)  # noqa: E731
        return {"done": True, "done_reason": serving.finish_reason(reason) or "stop",
                "total_duration": ns(end - self.t0), "load_duration": 0,
                "prompt_eval_count": len(self.plan.prompt_ids), "prompt_eval_duration": ns(first - self.t0),
                "eval_count": self.n_gen, "eval_duration": ns(end - first)}


def _message(content: str, thinking: str, calls: list[dict]) -> dict:
    m: dict = {"role": "assistant", "content": content}
    if thinking:
        m["thinking"] = thinking
    if calls:
        m["tool_calls"] = calls
    return m


def _body(kind: str, reply: _Reply, content: str, thinking: str, calls: list[dict]) -> dict:
    if kind == "chat":
        return {"model": reply.req.model, "created_at": _now(), "message": _message(content, thinking, calls)}
    d = {"model": reply.req.model, "created_at": _now(), "response": content}
    if thinking:
        d["thinking"] = thinking
    return d


async def _run(st: ServerState, req, request: Request, kind: str, planner):
    st = serving.route(st, req.model, serving.carries_media(req))
    _check_model(st, req.model)
    t0 = time.monotonic()
    plan, engine_req = await serving.plan_and_submit(st, planner, req)
    reply = _Reply(st, plan, req, "ollama_" + kind, t0)
    if req.stream:
        return StreamingResponse(_lines(st, kind, reply, engine_req), media_type=NDJSON,
                                 background=BackgroundTask(abort_unfinished, [engine_req]))
    outs = (await serving.run_until_disconnect(request, serving.collect_outputs([engine_req])))[0]
    lps = []
    for out in outs:
        reply.feed(out.outputs[0])
        lps.extend(out.outputs[0].delta_logprobs or [])
    m = reply.parser.message()  # the whole reply as the one fold makes it (content stripped)
    calls = [reply.call(i) for i in sorted(reply.parser.calls)]
    body = _body(kind, reply, m["content"] or "", m.get("reasoning_content") or "", calls)
    body.update(reply.stats(outs[-1].outputs[0].finish_reason))
    if kind == "generate":
        body["context"] = list(plan.prompt_ids) + list(reply.token_ids)
    if req.logprobs:
        body["logprobs"] = reply.logprobs(lps)
    return JSONResponse(body)


async def _lines(st: ServerState, kind: str, reply: _Reply, engine_req):
    """The NDJSON stream: an object per delta, then the final one (done); an error as a last `{"error"}` line."""
    def line(d: dict) -> str:
        return json.dumps(d, ensure_ascii=False, separators=(",", ":")) + "\n"

    try:
        finished = None
        async for _, out in serving.interleave_outputs([engine_req]):
            o = out.outputs[0]
            content, thinking, calls = reply.feed(o)
            lps = reply.logprobs(o.delta_logprobs)
            if content or thinking or calls or lps:
                d = {**_body(kind, reply, content, thinking, calls), "done": False}
                if lps:
                    d["logprobs"] = lps
                yield line(d)
            if o.finished:
                finished = o
        if finished is None:
            raise aborted()
        final = {**_body(kind, reply, "", "", []), **reply.stats(finished.finish_reason)}
        if kind == "generate":
            final["context"] = list(reply.plan.prompt_ids) + list(reply.token_ids)
        yield line(final)
    except APIError as e:
        yield line({"error": e.message})
    except Exception as e:  # engine failure mid-stream
        log.exception("ollama stream failed")
        yield line({"error": f"generation failed: {type(e).__name__}"})


def _loaded(st: ServerState, kind: str, model: str) -> JSONResponse:
    """Ollama's answer to a request with nothing to generate: the model is loaded (done_reason "load")."""
    body = {"model": model, "created_at": _now(), "done": True, "done_reason": "load"}
    body.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
    return JSONResponse(body)


# ---------------------------------------------------------------------------------------------
# routes


@router.post("/api/chat")
async def ollama_chat(req: O.ChatRequest, request: Request):
    st = _state(request)
    if not req.messages:
        _check_model(st, req.model)
        return _loaded(st, "chat", req.model)
    return await _run(st, req, request, "chat", _plan_chat)


@router.post("/api/generate")
async def ollama_generate(req: O.GenerateRequest, request: Request):
    st = _state(request)
    if not req.prompt and not req.context:
        _check_model(st, req.model)
        return _loaded(st, "generate", req.model)
    return await _run(st, req, request, "generate", _plan_generate)


@router.get("/api/version")
async def ollama_version():
    return {"version": OLLAMA_VERSION}


@router.get("/api/tags")
async def ollama_tags(request: Request):
    """The served model, then its LoRA adapters (each `NAME:latest`, its details' parent_model the base; size and
    details are the base's: an adapter runs on it)."""
    st = _state(request)
    info = _model_info(st)
    base = {"name": info["name"], "model": info["name"], "modified_at": info["modified_at"], "size": info["size"],
            "digest": info["digest"], "details": info["details"]}
    adapters = [{**base, "name": f"{a}:latest", "model": f"{a}:latest",
                 "digest": hashlib.sha256(f"{a}:{st.created}".encode()).hexdigest(),
                 "details": {**info["details"], "parent_model": info["name"]}} for a in st.adapters]
    return {"models": [base, *adapters]}


@router.get("/api/ps")
async def ollama_ps(request: Request):
    st = _state(request)
    info = _model_info(st)
    on_gpu = getattr(getattr(st.engine.engine, "device", None), "type", "cpu") == "cuda"
    forever = (datetime.now(timezone.utc) + timedelta(days=3650)).isoformat().replace("+00:00", "Z")
    return {"models": [{"name": info["name"], "model": info["name"], "size": info["size"], "digest": info["digest"],
                        "details": info["details"], "expires_at": forever,
                        "size_vram": info["size"] if on_gpu else 0, "context_length": st.max_model_len}]}


@router.post("/api/show")
async def ollama_show(req: O.ShowRequest, request: Request):
    st = _state(request)
    name = req.model or req.name
    if not name:
        raise APIError(400, "model is required")
    _check_model(st, name)
    info = _model_info(st)
    params = "\n".join(f"{k} {v}" for k, v in sorted(st.defaults.items()))
    caps = ["completion", "tools"] + (["thinking"] if st.chat.fmt.spec.thinks else [])
    return {"license": "", "modelfile": f"# served by glm4 serve\nFROM {st.model_name}\n", "parameters": params,
            "template": chat_template_text(st) or "", "details": info["details"], "model_info": info["model_info"],
            "capabilities": caps, "modified_at": info["modified_at"]}


def _model_info(st: ServerState) -> dict:
    """The served model as Ollama describes one (computed once: parameters counted from the loaded model)."""
    cached = getattr(st, "_ollama_info", None)
    if cached is not None:
        return cached
    eng = st.engine.engine
    cfg, model = getattr(eng, "config", None), getattr(eng, "model", None)
    params = list(model.parameters()) if model is not None else []
    n_params = sum(p.numel() for p in params)
    arch = str(getattr(cfg, "model_type", "glm4"))
    quant = getattr(getattr(eng, "args", None), "quantization", None)
    dtype = str(quant or getattr(eng, "dtype", "")).removeprefix("torch.").upper().replace("FLOAT", "F")
    name = st.model_name if ":" in st.model_name else f"{st.model_name}:latest"
    model_info = {"general.architecture": arch, "general.parameter_count": n_params,
                  f"{arch}.context_length": st.max_model_len}
    for key, field in (("embedding_length", "hidden_size"), ("block_count", "num_hidden_layers"),
                       ("attention.head_count", "num_attention_heads"),
                       ("attention.head_count_kv", "num_key_value_heads"), ("vocab_size", "vocab_size")):
        if isinstance(getattr(cfg, field, None), int):
            model_info[f"{arch}.{key}"] = getattr(cfg, field)
    info = {"name": name, "size": sum(p.numel() * p.element_size() for p in params),
            "digest": hashlib.sha256(f"{st.model_name}:{st.created}".encode()).hexdigest(),
            "modified_at": datetime.fromtimestamp(st.created, timezone.utc).isoformat().replace("+00:00", "Z"),
            "details": {"parent_model": "", "format": "safetensors", "family": arch, "families": [arch],
                        "parameter_size": _human(n_params), "quantization_level": dtype or "unknown"},
            "model_info": model_info}
    try:
        st._ollama_info = info
    except AttributeError:
        pass
    return info


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
