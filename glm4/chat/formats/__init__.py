"""The chat formats, one module each, behind one registry.

    spec = get_format("glm46")          # by public name or alias ("glm4_moe" -> glm45)
    name = detect_format(template_text, model_type)

Adding a format: a new module with a `ChatFormatSpec` subclass, and its line in FORMATS below.
"""

from __future__ import annotations

from ..messages import ChatFormatError
from .base import ChatFormatSpec
from .chatglm import ChatGLM
from .glm4 import Glm4, GlmZ1
from .glm4v import Glm4v, Glm45v
from .glm45 import Glm45
from .glm46 import Glm46
from .glm47 import Glm47

# checked in this order when sniffing a checkpoint's template: newest first, the first match wins
FORMATS: dict[str, type[ChatFormatSpec]] = {
    "glm45v": Glm45v,
    "glm4v": Glm4v,
    "glm47": Glm47,
    "glm46": Glm46,
    "glm45": Glm45,
    "glmz1": GlmZ1,
    "glm4": Glm4,
    "chatglm": ChatGLM,
}
ALIASES = {alias: name for name, cls in FORMATS.items() for alias in cls.aliases}
# config.json model_type -> the format its checkpoints ship, when the template does not say
MODEL_TYPE_FORMAT = {"chatglm": "chatglm", "glm": "chatglm", "glm4": "glm4", "glm4_moe": "glm45",
                     "glm4v": "glm4v", "glm4v_moe": "glm45v"}
# GGUF general.architecture (llama.cpp's names) -> format
GGUF_ARCH_FORMAT = {"chatglm": "chatglm", "glm4": "glm4", "glm4moe": "glm45"}


def format_names() -> tuple[str, ...]:
    return tuple(FORMATS)


def get_format(name: str) -> ChatFormatSpec:
    """The format registered under `name` or one of its aliases."""
    key = ALIASES.get(name, name)
    if key not in FORMATS:
        raise ChatFormatError(f"unknown chat format {name!r}; expected one of {', '.join(FORMATS)} "
                              f"(or an alias: {', '.join(sorted(ALIASES))})")
    return FORMATS[key]()


def format_of_template(template: str | None) -> str | None:
    """The format a chat template's text is written for (its tool-call and thinking layout), or None."""
    if not template:
        return None
    return next((name for name, cls in FORMATS.items() if cls.matches_template(template)), None)


__all__ = ["ALIASES", "FORMATS", "GGUF_ARCH_FORMAT", "MODEL_TYPE_FORMAT", "ChatFormatSpec", "format_names",
           "format_of_template", "get_format"]
