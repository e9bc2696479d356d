"""Serving: the OpenAI-, Anthropic- and Ollama-compatible server and the terminal chat, over the engine and the chat
layer.

    glm4 serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY]
               [--allowed-local-media-path DIR] [--allow-remote-media] [--limit-mm-per-prompt image=N,video=M]
    glm4 chat --model PATH [--image cat.png]
    from glm4.serve import chat, chat_stream       # the chat layer's Python API, re-exported
    r = chat(llm, messages, tools=TOOLS, tool_choice="required")   # content / tool_calls / finish_reason

The server, one module per job (a request flows top to bottom):
    serve_cli     `glm4 serve`: arguments, torch threads, SIGINT/SIGTERM drain (`main`)
    app           FastAPI app and routes (`create_app`), state from a checkpoint (`build_state`)
    errors        APIError, validation errors in OpenAI's words, API key / body size gate, per-API error shapes
    protocol      OpenAI request shapes (validated once, here) and the documented response shapes
    chat_handler  /v1/chat/completions: chat layer plans (images of vision models included) -> engine requests
                  -> reply events -> OpenAI shapes
    anthropic     /v1/messages[/count_tokens]: the same plans and events -> Anthropic's shapes
                  (anthropic_protocol: its request and response shapes)
    ollama        Ollama's /api/* (ollama_protocol: its request shapes): the same plans and events, Ollama's shapes
    responses     /v1/responses (+ responses_protocol, responses_output): the Responses API onto the same plans
                  and events; a bounded in-memory store for previous_response_id and GET / DELETE
    completions   /v1/completions (echo + logprobs and prompt_logprobs score the prompt)
    tokenization  vLLM's /tokenize, /detokenize, /tokenizer_info (what lm-eval's local-completions reads)
    serving       what the handlers share: ServerState, sampling params, context budget, waiting for
                  engine requests, server-sent events, usage
    async_engine  the engine thread <-> asyncio bridge (AsyncEngine, EngineRequest)
    metrics       Prometheus text
    webui         the chat page at GET / (web/: index.html, app.js, api.js, markdown.js, style.css), a client of
                  /v1/chat/completions; open without the API key (the page asks for it on 401)
chat_cli is the terminal chat (`main`).
"""

from __future__ import annotations

import importlib

# --dtype of glm4 serve / glm4 chat
DTYPE_HELP = ("weights: auto (default: as the checkpoint stores them) | float32 | bfloat16 | float16; activations are "
              "fp32 on CPUs without bf16 arithmetic")
LORA_HELP = ("a PEFT LoRA adapter folder served next to the base (repeatable); a bare PATH is named after its folder. "
             "--model ADAPTER_DIR alone loads the base its adapter_config.json names")

_LAZY = {
    "chat": "glm4.engine.chat",
    "chat_stream": "glm4.engine.chat",
    "ChatLayer": "glm4.engine.chat",
    "ChatResult": "glm4.engine.chat",
    "ChatError": "glm4.engine.chat",
    "create_app": "glm4.serve.app",
    "build_state": "glm4.serve.app",
}


def __getattr__(name: str):
    if name in _LAZY:
        obj = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = obj
        return obj
    raise AttributeError(f"module 'glm4.serve' has no attribute {name!r}")


__all__ = list(_LAZY)
