"""Model registry: `get_model_class(key)` / `model_class(config)`; each model_type lives in its own file, imported
lazily. The key is the config's `model_type`, or its `architecture` where one model_type covers two layouts
(`chatglm` with a `vision_config` is GLM-4V-9B: key `chatglm_vision`)."""

from __future__ import annotations

import importlib

from glm4.config import ConfigError

# model_type -> (module, class name)
MODELS: dict[str, tuple[str, str]] = {
    "chatglm": ("glm4.models.chatglm", "ChatGLMForConditionalGeneration"),
    "chatglm_vision": ("glm4.models.chatglm_vision", "ChatGLMVisionForConditionalGeneration"),
    "glm": ("glm4.models.glm", "GlmForCausalLM"),
    "glm4": ("glm4.models.glm4", "Glm4ForCausalLM"),
    "glm4_moe": ("glm4.models.glm4_moe", "Glm4MoeForCausalLM"),
    "glm4v": ("glm4.models.glm4v", "Glm4vForConditionalGeneration"),
    "glm4v_moe": ("glm4.models.glm4v_moe", "Glm4vMoeForConditionalGeneration"),
}


def get_model_class(model_type: str):
    if model_type not in MODELS:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(MODELS)}")
    module, name = MODELS[model_type]
    return getattr(importlib.import_module(module), name)


def model_class(config):
    """The model class for a parsed config (see the module docstring for the key)."""
    return get_model_class(getattr(config, "architecture", None) or config.model_type)


def build_model(config):
    """An un-initialized-weights model for a config (random init; the loader builds on meta instead)."""
    return model_class(config).from_config(config)
