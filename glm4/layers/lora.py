"""LoRA by module swap: `LoRALinear.from_base(linear)` wraps an nn.Linear; `merge_lora` folds it back.

Adapters are saved in PEFT's format (adapter_config.json + adapter_model.safetensors, tensors named
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`), so PEFT loads ours and we load PEFT's.
Our module paths are checkpoint names, which are also the transformers module paths.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# never adapted by "all-linear" (PEFT excludes the output head too)
_HEADS = ("lm_head", "output_layer")


class AdapterError(ValueError):
    """An adapter folder or config that cannot be applied to this model."""


@dataclass(slots=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    use_rslora: bool = False
    # PEFT's per-module overrides: {regex matching the end of a module path: rank / alpha}
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        r"""(r, alpha) of one module path, with PEFT's pattern rule: the first key matching `(.*\.)?(key)$`."""
        r = next((v for k, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({k})$", module)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", module)), self.alpha)
        return int(r), float(alpha)

    def scaling_for(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / (math.sqrt(r) if self.use_rslora else r)


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(dropout(x))); A [r, in] Kaiming-uniform, B [out, r] zeros (PEFT's init)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise AdapterError(f"LoRA rank must be positive, got {r}")
        self.base_layer = base_layer
        dev, dt = base_layer.weight.device, base_layer.weight.dtype
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=dev, dtype=dt)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def from_base(cls, linear: nn.Linear, r: int = 8, alpha: float = 32.0, dropout: float = 0.0,
                  use_rslora: bool = False) -> LoRALinear:
        return cls(linear, r, alpha, dropout, use_rslora)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # models that read .weight directly keep working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # [out, in]

    def merge(self) -> nn.Linear:
        """The base Linear with the update folded in (W + scaling * B @ A)."""
        lin = self.base_layer
        with torch.no_grad():
            lin.weight.copy_((lin.weight.float() + self.delta_weight()).to(lin.weight.dtype))
        return lin


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            return name.rsplit(".", 1)[-1] not in _HEADS
        return re.fullmatch(targets, name) is not None  # PEFT: a string is a regex over the full name
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig, freeze: bool = True) -> list[str]:
    """Swap every targeted nn.Linear for a LoRALinear; freeze everything else. Returns the module paths."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, cfg.targets)]
    if not names:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise AdapterError(f"LoRA targets {cfg.targets!r} match no nn.Linear in the model; linear names: {linears}")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for n in names:
        _set_module(model, n, LoRALinear.from_base(model.get_submodule(n), *cfg.rank_alpha(n), cfg.dropout,
                                                   cfg.use_rslora))
    model._lora_config = cfg  # remembered for save_adapter
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain nn.Linear (in place); parameter names are the base's again."""
    for n, m in lora_modules(model).items():
        _set_module(model, n, m.merge())
    if hasattr(model, "_lora_config"):
        del model._lora_config
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors under PEFT's names."""
    out = {}
    for n, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        out[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, folder: str | Path, cfg: LoRAConfig | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) into `folder`."""
    from safetensors.torch import save_file

    cfg = cfg or getattr(model, "_lora_config", None)
    mods = lora_modules(model)
    if cfg is None or not mods:
        raise AdapterError("model has no LoRA modules to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # target_modules: the exact leaf names that were adapted (a list matches by suffix in PEFT too)
    targets = cfg.targets if isinstance(cfg.targets, str) and cfg.targets != "all-linear" else \
        sorted({n.rsplit(".", 1)[-1] for n in mods})
    conf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": cfg.use_rslora, "use_dora": False,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    (folder / CONFIG_NAME).write_text(json.dumps(conf, indent=2) + "\n")
    save_file(adapter_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


def read_adapter_config(folder: str | Path) -> LoRAConfig:
    p = Path(folder) / CONFIG_NAME
    if not p.exists():
        raise AdapterError(f"no {CONFIG_NAME} in {folder}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{p}: invalid JSON ({e})") from e
    if d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{p}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
    for k in ("use_dora", "fan_in_fan_out"):
        if d.get(k):
            raise AdapterError(f"{p}: {k}=true is not supported")
    patterns = {k: d.get(k) or {} for k in ("rank_pattern", "alpha_pattern")}
    if not all(isinstance(v, dict) for v in patterns.values()):
        raise AdapterError(f"{p}: rank_pattern/alpha_pattern must be objects")
    if d.get("bias", "none") != "none":
        raise AdapterError(f"{p}: bias={d['bias']!r} is not supported (only 'none')")
    if d.get("target_parameters"):
        raise AdapterError(f"{p}: target_parameters {d['target_parameters']} (LoRA on MoE expert weights) is not "
                           "supported; adapt the linears (target_modules) only")
    targets = d.get("target_modules")
    if not targets:
        raise AdapterError(f"{p}: target_modules is empty")
    return LoRAConfig(r=int(d["r"]), alpha=float(d.get("lora_alpha", 8)), dropout=0.0,
                      targets=targets if isinstance(targets, str) else list(targets),
                      use_rslora=bool(d.get("use_rslora", False)), **patterns)


def adapter_base(folder: str | Path) -> Path | None:
    """None unless `folder` is a PEFT adapter (adapter_config.json, no config.json); then the local base checkpoint
    its `base_model_name_or_path` names (as given, else relative to the adapter folder). AdapterError when that
    base is not a local folder: the message says how to name the base (`--model BASE --lora NAME=PATH`)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() or (folder / "config.json").exists():
        return None
    try:
        base = json.loads((folder / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise AdapterError(f"{folder / CONFIG_NAME}: cannot read ({e})") from e
    for cand in ([Path(base), folder / base] if isinstance(base, str) and base else []):
        if (cand / "config.json").is_file() or any(cand.glob("*.gguf")):
            return cand
    merged = folder / "merged"
    alt = (f", or load the merged model --model {merged}" if (merged / "config.json").is_file()
           else ", or export a merged model with `glm4 finetune ... --merge`")
    raise AdapterError(f"{folder} is a LoRA adapter whose base model {base!r} is not a local checkpoint folder; "
                       f"run with --model BASE --lora {folder.resolve().name}={folder}{alt}")


def load_adapter(model: nn.Module, folder: str | Path, merge: bool = False) -> nn.Module:
    """Apply a PEFT-format LoRA adapter from `folder` to `model` (in place). `merge=True` folds it in."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    wpath = folder / WEIGHTS_NAME
    if not wpath.exists():
        if (folder / "adapter_model.bin").exists():
            raise AdapterError(f"{folder}: adapter_model.bin (pickle) is not supported; save with safetensors")
        raise AdapterError(f"no {WEIGHTS_NAME} in {folder}")
    sd = load_file(str(wpath))
    names = apply_lora(model, cfg, freeze=False)
    mods = lora_modules(model)
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    # PEFT writes no adapter name in saved keys; tolerate ".default" from older tools
    sd = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in sd.items()}
    missing, extra = expected - set(sd), set(sd) - expected
    if missing or extra:
        bad = sorted(missing)[:3] or sorted(extra)[:3]
        raise AdapterError(f"{wpath}: adapter tensors do not match the model's targets "
                           f"({len(missing)} missing, {len(extra)} unexpected, e.g. {bad})")
    with torch.no_grad():
        for n, m in mods.items():
            for ab, lin in (("A", m.lora_A), ("B", m.lora_B)):
                t = sd[f"{PEFT_PREFIX}{n}.lora_{ab}.weight"]
                if t.shape != lin.weight.shape:
                    raise AdapterError(f"{wpath}: {n}.lora_{ab} has shape {tuple(t.shape)}, "
                                       f"model expects {tuple(lin.weight.shape)}")
                lin.weight.copy_(t.to(lin.weight.dtype))
    return merge_lora(model) if merge else model
