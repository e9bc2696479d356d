"""The shipped models: `default`, a tiny bilingual GLM-4 MoE (default/MODEL_CARD.md), and `vision`, a glm4v_moe
built on it that answers questions about simple pictures (vision/MODEL_CARD.md)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default"
VISION_MODEL = Path(__file__).resolve().parent / "vision"


def default_model() -> Path:
    """The folder every command uses when no --model is given."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the shipped default model is missing ({DEFAULT_MODEL}); pass a checkpoint folder")
    return DEFAULT_MODEL


def vision_model() -> Path:
    """The folder `glm4 chat --image` (and a picture sent to `glm4 serve`) uses when no --model is given."""
    if not (VISION_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the shipped vision model is missing ({VISION_MODEL}); pass a checkpoint folder")
    return VISION_MODEL
