"""glm4: the GLM-4 model family from scratch in PyTorch.

Public API (imported lazily so `glm4.tokenizer` stays torch-free):
    glm4.load_model(path, dtype=..., adapter=None) -> nn.Module
    glm4.generate(model, input_ids, max_new_tokens=..., temperature=...) -> LongTensor
    glm4.LLM(path), glm4.SamplingParams(...)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "glm4.quant.load",  # safetensors folders, quantized HF formats, GGUF files
    "generate": "glm4.reference",  # the reference generator (the engine's correctness oracle)
    "load_config": "glm4.config",
    "LLM": "glm4.engine.llm",
    "SamplingParams": "glm4.engine.sampling_params",
}


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        obj = getattr(mod, name)
        globals()[name] = obj
        return obj
    raise AttributeError(f"module 'glm4' has no attribute {name!r}")


__all__ = list(_LAZY)
