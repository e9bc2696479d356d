"""Serving: the chat layer, constrained decoding, the OpenAI-compatible server and the terminal chat.

    from glm4.serve import chat, chat_stream
    r = chat(llm, messages, tools=TOOLS, tool_choice="required")   # content / tool_calls / finish_reason
    glm4 serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    glm4 chat --model PATH

Modules: protocol (OpenAI request/response shapes), chat (ChatLayer, chat, chat_stream), constrained
(llguidance grammars for tool calls and JSON), app (FastAPI app, engine loop, `main`), metrics
(Prometheus text), chat_cli (the terminal chat, `main`).
"""

from __future__ import annotations

import importlib

# --dtype of glm4 serve / glm4 chat
DTYPE_HELP = ("weights: auto (default: as the checkpoint stores them) | float32 | bfloat16 | float16; activations are "
              "fp32 on CPUs without bf16 arithmetic")

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
