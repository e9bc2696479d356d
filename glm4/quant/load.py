"""The front door for every checkpoint people hold: `load_model(path)`.

- a safetensors folder (config.json + *.safetensors): glm4.weights.load_model
- the same with a `quantization_config` in config.json (AWQ, GPTQ, compressed-tensors): glm4.quant.hf_formats
- a .gguf file (or a folder holding exactly one): glm4.quant.gguf

Quantized weights stay quantized (QuantLinear); nothing is expanded to fp32 in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from glm4.weights import CheckpointError, resolve_device, resolve_dtype
from glm4.weights import load_model as load_safetensors_model

__all__ = ["find_gguf", "load_model"]


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


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               adapter: str | os.PathLike | None = None, progress: bool = True) -> nn.Module:
    """Load any supported checkpoint into an eval-mode model; `dtype` is the activation / unquantized dtype."""
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
    return load_safetensors_model(folder, dtype=dtype, device=device, adapter=adapter, progress=progress)
