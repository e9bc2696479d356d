"""Training recipes: a settings dataclass filled from its defaults < a YAML recipe (--config) < --flags.

`parse_recipe(TrainArgs subclass, argv, prog)`; every field is a YAML key and a `--field-name` flag, its trailing
comment the flag's help.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path


class RecipeError(ValueError):
    """A recipe / flag combination that cannot run."""


@dataclass
class TrainArgs:
    """Loop settings; every field is a YAML key and a --flag."""

    output: str = "out"  # folder: final export, logs.csv, curves.png, checkpoints/
    max_steps: int = 100
    batch_size: int = 8  # global sequences (or pairs) per optimizer step, over all processes
    micro_batch_size: int = 0  # per process per forward; 0 = batch_size / world (no accumulation)
    lr: float = 3e-4
    lr_scale: typing.Any = None  # {parameter-name prefix: lr multiplier}, e.g. {"model.language_model.": 0.1}
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 0
    weight_decay: float = 0.0  # AdamW, on >= 2-D parameters only
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    precision: str = "auto"  # auto (bf16 autocast on GPUs that have it, else fp32) | bf16 | fp32
    activation_checkpointing: bool = False
    eval_every: int = 0  # steps; 0 = only at the end when eval data exists
    eval_batches: int = 4
    save_every: int = 0  # steps; 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    resume: str = ""  # "" = fresh, "auto" = latest checkpoint under output/, or a checkpoint folder
    parallel: str = "ddp"  # with several processes: ddp | fsdp (FSDP2 fully_shard)
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed
    plot: bool = True
    moe_aux_coef: float = 0.01  # Switch load-balancing loss weight (softmax-router MoE models)
    moe_z_coef: float = 0.001  # router z-loss weight


# ---------------------------------------------------------------- YAML + flags -> dataclass

def _flag_type(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and args:
        return _flag_type(args[0]) if len(args) == 1 else _json_or_str
    if tp is bool:
        return bool
    if tp in (int, float, str):
        return tp
    if origin is list:
        return _json_or_list
    return _json_or_str


def _json_or_str(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def _json_or_list(s: str):
    v = _json_or_str(s)
    return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


def _coerce(name: str, tp, v):
    """YAML/flag value -> the field's type (typed error on mismatch)."""
    if v is None:
        return v
    t = _flag_type(tp)
    try:
        if t is bool:
            if isinstance(v, str):
                if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(v)
                return v.lower() in ("1", "true", "yes")
            return bool(v)
        if t is int:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError(v)
            return int(float(v)) if isinstance(v, str) else int(v)
        if t is float:
            return float(v)
        if t is str:
            return str(v)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{name}: expected {t.__name__}, got {v!r}") from e
    return v


def _field_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` lines of the dataclass and its bases -> {name: comment} for --help."""
    import inspect
    import re

    out: dict[str, str] = {}
    for c in reversed(cls.__mro__[:-1]):
        try:
            src = inspect.getsource(c)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", src, re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def parse_recipe(cls, argv: list[str] | None, prog: str, description: str = ""):
    """defaults < YAML recipe (--config) < flags. Every dataclass field is `--field-name`."""
    hints = typing.get_type_hints(cls)
    notes = _field_comments(cls)
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Every flag is also a key of the YAML recipe (with underscores).")
    ap.add_argument("--config", help="YAML recipe; flags override its keys")
    for f in dataclasses.fields(cls):
        t = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        note = notes.get(f.name, "").replace("%", "%%")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{note} (default: {default!r})".strip())
        if t is bool:
            ap.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=t, **kw)
    ns = vars(ap.parse_args(argv))
    d: dict = {}
    cfg = ns.pop("config", None)
    if cfg:
        import yaml

        p = Path(cfg)
        if not p.exists():
            raise RecipeError(f"no such recipe: {p}")
        try:
            y = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: invalid YAML ({e})") from e
        if not isinstance(y, dict):
            raise RecipeError(f"{p}: a recipe is a mapping of field: value")
        names = {f.name for f in dataclasses.fields(cls)}
        y = {k.replace("-", "_"): v for k, v in y.items()}
        bad = sorted(set(y) - names)
        if bad:
            raise RecipeError(f"{p}: unknown recipe key(s) {bad}; see --help")
        d.update(y)
    d.update(ns)
    return cls(**{k: _coerce(k, hints[k], v) for k, v in d.items()})
