"""The FastAPI app of `glm4 serve`: its routes over one shared engine, and the state built from a checkpoint.

    st = build_state("path/to/checkpoint", api_key="sk-...")   # LLM + chat layer + AsyncEngine
    app = create_app(st)                                       # serve it with uvicorn (see serve_cli.main)

Routes: GET /health (no key), /v1/models, /v1/models/{id}, /metrics; POST /v1/chat/completions
(chat_handler), /v1/completions (completions); POST /v1/responses, GET / DELETE /v1/responses/{id} (responses);
/v1/messages and /v1/messages/count_tokens (anthropic: Anthropic's Messages API, its errors in Anthropic's shape);
vLLM's /tokenize, /detokenize, /tokenizer_info (tokenization); Ollama's /api/* (ollama, errors in Ollama's shape).
GET / is a chat page in the browser (webui: glm4/serve/web/, a client of /v1/chat/completions).
The app's lifespan starts the engine thread and, on shutdown, lets it finish what is in flight.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from glm4.serve import anthropic, ollama, tokenization, webui
from glm4.serve import anthropic_protocol as AP
from glm4.serve import protocol as P
from glm4.serve import responses_protocol as RP
from glm4.serve.async_engine import AsyncEngine
from glm4.serve.chat_handler import create_chat_completion, load_chat
from glm4.serve.completions import create_completion
from glm4.serve.errors import BODY_TIMEOUT_S, MAX_BODY_BYTES, GateMiddleware, ParsedBodyRoute, install_error_handlers
from glm4.serve.metrics import Metrics
from glm4.serve.responses import DEFAULT_STORE_SIZE, ResponseStore, create_response, delete_response, retrieve_response
from glm4.serve.serving import ServerState, check_model, route, served_names


def create_app(st: ServerState, drain_timeout: float = 30.0, responses_store_size: int = DEFAULT_STORE_SIZE,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        for s in (st, *st.companions.values()):
            s.engine.start()
        yield
        # uvicorn has stopped accepting and waited for open responses; let the engines finish anything left
        for s in (st, *st.companions.values()):
            await asyncio.get_running_loop().run_in_executor(None, s.engine.stop, drain_timeout)

    app = FastAPI(title="glm4 OpenAI- and Anthropic-compatible server", version="0.1.0", lifespan=lifespan)
    app.router.route_class = ParsedBodyRoute  # the body the gate parsed goes to the route as it is
    app.state.glm4 = st
    _describe_metrics(st)
    # path prefix -> its API's error body (else OpenAI's): also for the key / body-size gate and unknown routes
    shapes = {anthropic.PATH: anthropic.error_body, "/api/": lambda e: {"error": e.message}}
    install_error_handlers(app, st.metrics, shapes)

    err = {"model": P.ErrorResponse}
    errors = {400: err, 401: err, 404: err, 429: err}

    @app.get("/health", responses={503: err})
    async def health():
        if not st.engine.alive:
            return JSONResponse({"status": "error"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models", response_model=P.ModelList, responses={401: err})
    async def models():
        return P.ModelList(data=[P.ModelCard(id=name, created=st.created, max_model_len=route(st, name).max_model_len)
                                 for name in served_names(st)])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses={401: err, 404: err})
    async def model(model_id: str):
        check_model(route(st, model_id), model_id)
        return P.ModelCard(id=model_id, created=st.created, max_model_len=route(st, model_id).max_model_len)

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: err})
    async def metrics():
        return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", response_model=P.ChatCompletion, responses=errors)
    async def chat(req: P.ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(st, req, request)

    @app.post("/v1/completions", response_model=P.Completion, responses=errors)
    async def complete(req: P.CompletionRequest, request: Request) -> Response:
        return await create_completion(st, req, request)

    store = ResponseStore(responses_store_size)

    @app.post("/v1/responses", response_model=RP.Response, responses=errors)
    async def responses_create(req: RP.ResponsesRequest, request: Request) -> Response:
        return await create_response(st, store, req, request)

    @app.get("/v1/responses/{response_id}", response_model=RP.Response, responses={401: err, 404: err})
    async def responses_get(response_id: str) -> Response:
        return retrieve_response(store, response_id)

    @app.delete("/v1/responses/{response_id}", response_model=RP.DeletedResponse, responses={401: err, 404: err})
    async def responses_delete(response_id: str) -> Response:
        return delete_response(store, response_id)

    app.include_router(tokenization.router)
    app.include_router(ollama.router)

    a_err = {"model": AP.AnthropicErrorResponse}
    a_errors = {400: a_err, 401: a_err, 404: a_err, 429: a_err}

    @app.post(anthropic.PATH, response_model=AP.MessageResponse, responses=a_errors)
    async def messages(req: AP.MessagesRequest, request: Request) -> Response:
        return await anthropic.create_message(st, req, request)

    @app.post(anthropic.PATH + "/count_tokens", response_model=AP.TokenCount, responses=a_errors)
    async def messages_count_tokens(req: AP.CountTokensRequest) -> Response:
        return await anthropic.count_tokens(st, req)

    app.include_router(webui.router)  # the chat page at / (its files under /web/), open without the key
    app.add_middleware(GateMiddleware, api_key=st.api_key, shapes=shapes, max_body=max_body_bytes,
                       body_timeout=body_timeout, metrics=st.metrics, public=webui.is_page)
    return app


def _describe_metrics(st: ServerState) -> None:
    m = st.metrics
    m.describe("requests_total", "counter", "requests accepted, by endpoint")
    m.describe("prompt_tokens_total", "counter", "prompt tokens processed")
    m.describe("generation_tokens_total", "counter", "tokens generated (aborted and cut requests' too)")
    m.describe("request_errors_total", "counter", "requests that ended with an error status (499: client gone)")
    m.describe("responses_total", "counter", "every request once, by the status it ended with (499: client gone)")
    m.describe("requests_aborted_total", "counter", "engine requests aborted because their client went away")
    m.describe("requests_cut_total", "counter", "engine requests ended by shutdown before they finished")
    m.describe("queue_wait_seconds", "histogram", "submit to first output of each engine request (queue + prefill)")
    m.gauge_fn("requests_in_flight", lambda: st.engine.num_pending)
    m.gauge_fn("queue_depth", lambda: _engine_stat(st, "waiting"))
    m.gauge_fn("requests_running", lambda: _engine_stat(st, "running"))
    m.gauge_fn("kv_cache_usage_ratio", lambda: _kv_usage(st)[2])
    m.gauge_fn("kv_blocks_used", lambda: _kv_usage(st)[0])
    m.gauge_fn("kv_blocks_total", lambda: _kv_usage(st)[1])


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
    """Sampling defaults from the checkpoint's generation_config.json (temperature, top_p, top_k)."""
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
                max_pending: int = 256, verbose: bool = False, media: dict | None = None,
                companion: str | Path | None = None, metrics: Metrics | None = None, **engine_args) -> ServerState:
    """Load a checkpoint into an LLM and wrap its engine, tokenizer and chat layer for serving.
    `verbose`: print what runs where (CPU, dtypes, each linear kind's kernel, KV cache). `media`: a vision
    checkpoint's request limits (glm4.chat.media.MediaPolicy fields; local files and remote URLs off unless given).
    `companion`: a second checkpoint served beside it (its own engine; serving.route sends it the requests that
    name it, and those with pictures when this model takes none), e.g. the shipped vision model."""
    from glm4.engine.llm import LLM

    llm = LLM(model, **engine_args)
    if verbose:
        print(llm.describe(), flush=True)
    chat = load_chat(llm, model)
    if chat.layer.media is not None:
        from glm4.engine.chat import media_policy

        chat.layer.media = media_policy(llm, chat.tokenizer, chat.folder,
                                        **{"allowed_local_path": None, "allow_remote": False, **(media or {})})
    eng = getattr(llm, "engine", llm)
    if hasattr(eng, "runner"):  # a server lives long enough to touch every KV block: take the memory now
        eng.runner.commit_kv_cache()
    max_len = int(getattr(llm, "max_model_len", 0) or getattr(eng, "max_model_len", 0)
                  or getattr(getattr(eng, "config", None), "max_model_len", 0) or 8192)
    vocab = int(chat.tokenizer.vocab_size)
    model_vocab = int(getattr(getattr(eng, "config", None), "vocab_size", 0) or vocab)
    metrics = metrics or Metrics()
    folder = Path(chat.folder) if chat.folder else None
    name = model_name or (folder.name if folder else "glm4")
    adapters = list(getattr(eng, "lora_names", []))
    if name in adapters:
        raise ValueError(f"LoRA adapter name {name!r} is the served model's name; rename the adapter (--lora NAME=PATH)")
    st = ServerState(engine=AsyncEngine(eng, max_pending, metrics), chat=chat.layer, tokenizer=chat.tokenizer,
                     model_name=name, adapters=adapters, max_model_len=max_len,
                     vocab_size=vocab, api_key=api_key, model_vocab_size=model_vocab, vocab_guard=chat.vocab_guard,
                     defaults=_generation_defaults(folder), metrics=metrics)
    if companion is not None:
        other = build_state(str(companion), api_key, None, max_pending, verbose, media, metrics=metrics,
                            **{k: v for k, v in engine_args.items() if k != "lora"})
        if other.model_name in (name, *adapters):
            raise ValueError(f"the companion model's name {other.model_name!r} is already served")
        other.aliases = [name]  # a request naming this model but carrying pictures is served there
        st.companions = {other.model_name: other}
    return st

