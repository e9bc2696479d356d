"""The front door for every checkpoint people hold: `load_model(path)`.

- a safetensors folder (config.json + *.safetensors): glm4.weights.load_model
- the same with a `quantization_config` in config.json (AWQ, GPTQ, compressed-tensors): glm4.quant.hf_formats
- a .gguf file (or a folder holding exactly one): glm4.quant.gguf

Quantized weights stay quantized (QuantLinear); nothing is expanded to fp32 in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from glm4.weights import CheckpointError, resolve_device, resolve_dtype
from glm4.weights import load_model as load_safetensors_model

__all__ = ["checkpoint_dtype", "find_gguf", "load_model"]

_CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only *.gguf in a folder without config.json."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            raise CheckpointError(f"{p}: {len(ggufs)} .gguf files; pass the one to load: "
                                  + ", ".join(g.name for g in ggufs))
    return None


def _quantization_config(folder: Path) -> dict | None:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_safetensors_model reports it with its own message
    q = cfg.get("quantization_config") or cfg.get("compression_config")
    return q if isinstance(q, dict) else None


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype the checkpoint stores its float weights in (what `dtype="auto"` loads): config.json's `torch_dtype`
    (`dtype` in transformers 5); for GGUF, F16 / BF16 when most linear weights are, else float32."""
    gguf = find_gguf(path)
    if gguf is not None:
        from glm4.tokenizer.gguf_meta import read_gguf_header

        types = [t.ggml_type for t in read_gguf_header(gguf).tensors.values() if len(t.dims) == 2]
        f16, bf16 = types.count(1), types.count(30)  # ggml type ids of F16 and BF16
        return torch.float16 if f16 * 2 > len(types) else torch.bfloat16 if bf16 * 2 > len(types) else torch.float32
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    return _CONFIG_DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), torch.float32)


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               adapter: str | os.PathLike | None = None, progress: bool = True,
               on_layer_loaded: Callable[[nn.Module, str], None] | None = None) -> nn.Module:
    """Load any supported checkpoint into an eval-mode model. `dtype`: of the unquantized weights, or "auto" for the
    checkpoint's own (glm4.LLM then picks the activation dtype for the CPU, see glm4.engine.llm.compute_dtype).
    `on_layer_loaded(model, layer_name)`: called as each layer of a float safetensors checkpoint is read
    (glm4.weights.load_weights; glm4.LLM quantizes there); GGUF and quantized checkpoints load quantized already."""
    if isinstance(dtype, str) and dtype.lower() == "auto":
        dtype = checkpoint_dtype(path)
    gguf = find_gguf(path)
    if gguf is not None:
        if adapter is not None:
            raise CheckpointError("adapters are not supported on GGUF checkpoints; merge the adapter first")
        from glm4.quant.gguf import load_gguf_model

        return load_gguf_model(gguf, dtype=resolve_dtype(dtype), device=resolve_device(device), progress=progress)
    folder = Path(path)
    qcfg = _quantization_config(folder) if folder.is_dir() else None
    if qcfg is not None:
        if adapter is not None:
            raise CheckpointError("adapters are not supported on quantized checkpoints; merge the adapter first")
        from glm4.quant.hf_formats import load_quantized_model

        return load_quantized_model(folder, qcfg, dtype=resolve_dtype(dtype), device=resolve_device(device),
                                    progress=progress)
    return load_safetensors_model(folder, dtype=dtype, device=device, adapter=adapter, progress=progress,
                                  on_layer_loaded=on_layer_loaded)
