"""Pieces shared by the pretrain / finetune / dpo entry points: model + tokenizer loading, export, errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
                   "preprocessor_config.json", "video_preprocessor_config.json")  # vision checkpoints' processor


def user_errors() -> tuple[type[BaseException], ...]:
    """The typed errors an entry point reports as one line instead of a traceback."""
    from glm4.config import ConfigError
    from glm4.layers.lora import AdapterError
    from glm4.train.data import DataError
    from glm4.train.recipe import RecipeError

    errs: list[type[BaseException]] = [ConfigError, DataError, AdapterError, RecipeError, FileNotFoundError]
    try:
        from glm4.weights import CheckpointError

        errs.append(CheckpointError)
    except ImportError:
        pass
    try:
        from glm4.tokenizer.tokenizer import TokenizerError

        errs.append(TokenizerError)
    except ImportError:
        pass
    return tuple(errs)


def run_main(fn, argv) -> int:
    """Call fn(argv); typed errors -> `error: ...` on stderr and exit status 2."""
    try:
        fn(argv)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def load_tok(folder: str | Path | None):
    """The tokenizer in `folder`, or None when there is none."""
    if not folder:
        return None
    p = Path(folder)
    if p.is_file():
        p = p.parent
    if not any((p / f).exists() for f in ("tokenizer.model", "tokenizer.json")):
        return None
    from glm4.tokenizer import load_tokenizer

    return load_tokenizer(p)


def load_chat_format(folder: str | Path | None, family: str = ""):
    from glm4.chat import ChatFormat

    if family:
        return ChatFormat(family)
    if folder:
        return ChatFormat.for_checkpoint(folder)
    return ChatFormat("glm4")


def load_chat_data_tools(tok_dir: str | Path, family: str = ""):
    """(tokenizer, chat format) for SFT / DPO data; a missing tokenizer is a RecipeError."""
    from glm4.train.recipe import RecipeError

    tok = load_tok(tok_dir)
    if tok is None:
        raise RecipeError(f"no tokenizer in {tok_dir} (pass --tokenizer)")
    return tok, load_chat_format(tok_dir, family)


def load_base_model(path: str, dtype: str = "float32") -> nn.Module:
    from glm4.weights import load_model

    m = load_model(path, dtype=dtype, progress=False)
    m.train()
    return m


def build_from_config(model_config, dtype: str, init_std: float, seed: int) -> nn.Module:
    """A randomly initialized model from a config.json path/folder or a mapping."""
    from glm4.config import config_from_dict, load_config
    from glm4.models import build_model
    from glm4.train.loop import init_weights
    from glm4.weights import resolve_dtype

    cfg = config_from_dict(dict(model_config)) if isinstance(model_config, dict) else load_config(model_config)
    torch.manual_seed(seed)
    model = build_model(cfg)
    init_weights(model, init_std, seed)
    return model.to(resolve_dtype(dtype))


def copy_tokenizer(src: str | Path | None, dst: Path) -> None:
    if not src:
        return
    s = Path(src)
    s = s.parent if s.is_file() else s
    for name in TOKENIZER_FILES:
        if (s / name).exists() and s.resolve() != dst.resolve():
            shutil.copy2(s / name, dst / name)


def export_full(model: nn.Module, out: Path, tokenizer_dir=None, extra: dict | None = None) -> None:
    """HF layout (config.json + model.safetensors) that glm4 and transformers load, plus tokenizer files."""
    from glm4.weights import save_checkpoint

    save_checkpoint(model, out)
    copy_tokenizer(tokenizer_dir, out)
    if extra:
        (out / "training_args.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
