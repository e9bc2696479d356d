"""The training loop shared by pretrain / finetune / dpo.

One optimizer step = one *global batch* of `batch_size` samples, a pure function of the step
(`dataset.global_batch(step, batch_size)`). Every process builds the same global batch and takes its
slice; the loss is normalized by the global number of target tokens (or pairs), so 1 process, N
processes and any gradient accumulation give the same update. Checkpoints hold model, optimizer,
scheduler, per-rank RNG and the step (= the data position); resuming reproduces the same loss curve.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from glm4.layers.attention import Causal
from glm4.train.losses import IGNORE, cross_entropy, moe_aux
from glm4.train.objectives import collate


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


# ---------------------------------------------------------------- recipes: YAML + flags -> dataclass

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


# ---------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """torchrun sets RANK/WORLD_SIZE: join the process group (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local, dev)


def _all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over processes (on the process device: NCCL reduces only CUDA tensors); returns a CPU tensor."""
    if d.world > 1:
        t = t.to(d.device)
        dist.all_reduce(t)
    return t.cpu()


# ---------------------------------------------------------------- tasks: how a batch becomes a loss

def model_kwargs(batch: dict, device, ctx_factory=None) -> dict:
    mask = batch.get("attn_mask")
    mask = mask.to(device) if mask is not None else None
    ctx = ctx_factory(mask, batch["input_ids"].shape[0]) if ctx_factory else (Causal(mask=mask) if mask is not None else None)
    return {"positions": batch["positions"].to(device), "ctx": ctx}


def wants_router_logits(model: nn.Module) -> bool:
    c = getattr(model, "config", None)
    c = getattr(c, "text_config", c)  # a vision model's language half
    return getattr(c, "model_type", "") in ("glm4_moe", "glm4v_moe_text") and getattr(c, "scoring_func", "") == "softmax" \
        and getattr(c, "num_hidden_layers", 0) > getattr(c, "first_k_dense_replace", 0)


class LMTask:
    """Cross-entropy on shifted targets (+ MoE balance / z losses). Samples are objectives.py dicts."""

    target_logits_only = False  # True: pass `logits_indices` (models that take it) and score those rows only

    def __init__(self, base_model: nn.Module, args: TrainArgs, ctx_factory=None, pad_id: int = 0):
        self.ctx_factory, self.pad_id = ctx_factory, pad_id
        self.moe = wants_router_logits(base_model) and (args.moe_aux_coef > 0 or args.moe_z_coef > 0)
        self.top_k = getattr(getattr(base_model.config, "text_config", base_model.config), "num_experts_per_tok", 1)
        self.args = args

    def normalizer(self, samples: list[dict]) -> float:
        return float(max(1, sum(sum(t != IGNORE for t in s["targets"]) for s in samples)))

    def n_tokens(self, samples: list[dict]) -> int:
        return sum(len(s["input_ids"]) for s in samples)

    def model_inputs(self, samples: list[dict], batch: dict, device) -> dict:
        """The model's keyword inputs besides the ids (vision tasks add the pictures)."""
        return model_kwargs(batch, device, self.ctx_factory)

    def loss(self, model: nn.Module, samples: list[dict], norm: float, device, world: int):
        """-> (loss to backprop, already scaled for the global batch and DDP's mean; stats dict of local sums)."""
        b = collate(samples, self.pad_id)
        ids, tgt = b["input_ids"].to(device), b["targets"].to(device)
        kw = self.model_inputs(samples, b, device)
        if self.target_logits_only:  # the output head only at target rows (vision SFT: most rows are prompt/image)
            keep = (tgt.reshape(-1) != IGNORE).nonzero().squeeze(1)
            kw["logits_indices"], tgt = keep, tgt.reshape(-1)[keep]
        stats = {}
        if self.moe:
            logits, router = model(ids, return_router_logits=True, **kw)
        else:
            logits, router = model(ids, **kw), None
        ce = cross_entropy(logits, tgt, "sum")
        total = ce
        ntgt = float((tgt != IGNORE).sum())
        if router:
            aux, bal, z, counts = moe_aux(router, self.top_k, self.args.moe_aux_coef, self.args.moe_z_coef)
            total = total + aux * ntgt  # per-token weight, so the aux share matches the CE normalization
            stats.update(balance=float(bal) * ntgt, z=float(z) * ntgt, counts=counts)
        stats["loss_sum"] = float(ce.detach())
        return total * (world / norm), stats


# ---------------------------------------------------------------- model preparation

def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers":
            return m
    return None


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder layer in backward (non-reentrant; keeps parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    if layers is None:
        raise RecipeError("activation checkpointing: the model has no `layers` ModuleList")
    for layer in layers:
        fwd = layer.forward
        layer.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(fwd)
    return len(layers)


def init_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """GPT-style init for training from scratch: N(0, std) matrices, zero biases, unit norm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def _autocast(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext
    raise RecipeError(f"precision must be auto, bf16 or fp32, got {precision!r}")


def make_optimizer(model: nn.Module, a: TrainArgs):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise RecipeError("no trainable parameters")
    scales = a.lr_scale or {}
    if not isinstance(scales, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in scales.values()):
        raise RecipeError(f"lr_scale: expected {{parameter-name prefix: multiplier >= 0}}, got {scales!r}")

    def scale(name: str) -> float:  # the longest matching prefix wins; DDP's "module." is not part of the name
        hits = [k for k in scales if name.removeprefix("module.").startswith(k)]
        return float(scales[max(hits, key=len)]) if hits else 1.0

    groups: dict[tuple[bool, float], list] = {}
    for n, p in params:
        groups.setdefault((p.ndim >= 2, scale(n)), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": a.weight_decay if decay else 0.0, "lr": a.lr * s}
                             for (decay, s), ps in sorted(groups.items(), key=lambda g: (g[0][1] != 1.0, not g[0][0]))],
                            lr=a.lr, betas=(a.beta1, a.beta2), eps=a.adam_eps)  # logs show the first group's lr

    def lr_lambda(step: int) -> float:
        if a.warmup_steps and step < a.warmup_steps:
            return (step + 1) / a.warmup_steps
        span = max(1, a.max_steps - a.warmup_steps)
        t = min(1.0, (step - a.warmup_steps) / span)
        return a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def wrap_parallel(model: nn.Module, a: TrainArgs, d: Dist) -> nn.Module:
    if d.world == 1:
        return model
    if a.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if a.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model) or []:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise RecipeError(f"parallel must be ddp or fsdp, got {a.parallel!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def _no_sync(model: nn.Module, sync: bool):
    if sync:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _state_options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA / P-tuning checkpoints hold only the trained tensors; the frozen base comes from the model path
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def save_training_checkpoint(path: Path, model, opt, sched, step: int, history: list[dict], a: TrainArgs,
                             d: Dist, trainable_only: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path.mkdir(parents=True, exist_ok=True)
    msd, osd = get_state_dict(model, opt, options=_state_options(trainable_only))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "state"))
    torch.save(_rng_state(), path / f"rng_rank{d.rank}.pt")
    if d.main:
        torch.save({"step": step, "scheduler": sched.state_dict(), "history": history, "world": d.world,
                    "args": dataclasses.asdict(a), "samples_seen": step * a.batch_size}, path / "trainer_state.pt")
        (path / "DONE").write_text(str(step))  # written last: a checkpoint without it is incomplete
    if d.world > 1:
        dist.barrier()


def load_training_checkpoint(path: Path, model, opt, sched, d: Dist, trainable_only: bool) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / "DONE").exists():
        raise RecipeError(f"{path} is not a complete checkpoint")
    ts = torch.load(path / "trainer_state.pt", weights_only=False)
    if ts.get("world", 1) != d.world:
        raise RecipeError(f"{path} was written by {ts['world']} process(es); resume with the same number")
    msd, osd = get_state_dict(model, opt, options=_state_options(trainable_only))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_options(trainable_only))
    sched.load_state_dict(ts["scheduler"])
    _set_rng_state(torch.load(path / f"rng_rank{d.rank}.pt", weights_only=False))
    return ts


def latest_checkpoint(output: Path) -> Path | None:
    root = output / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / "DONE").exists()) if root.exists() else []
    return done[-1] if done else None


def _prune(output: Path, keep: int) -> None:
    done = sorted(p for p in (output / "checkpoints").glob("step_*") if (p / "DONE").exists())
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- logging

CSV_FIELDS = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "eval_loss", "eval_ppl",
              "balance_loss", "z_loss"]


class Logger:
    def __init__(self, output: Path, a: TrainArgs, enabled: bool):
        self.enabled, self.output = enabled, output
        self.tb = None
        if enabled and a.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def start(self, history: list[dict]) -> None:
        """(Re)write the CSVs with the rows so far (a resume drops rows past its checkpoint)."""
        if not self.enabled:
            return
        with open(self.output / "logs.csv", "w", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore").writeheader()
        (self.output / "experts.csv").unlink(missing_ok=True)
        for row in history:
            self.append(row)

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.output / "logs.csv", "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore").writerow(row)
        if "expert_counts" in row:
            path = self.output / "experts.csv"
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "layer"] + [f"e{i}" for i in range(len(row["expert_counts"][0]))])
                for li, counts in enumerate(row["expert_counts"]):
                    w.writerow([row["step"], li] + list(counts))

    def scalars(self, row: dict) -> None:
        if self.tb is None:
            return
        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_ppl", "balance_loss", "z_loss"):
            if row.get(k) is not None:
                self.tb.add_scalar(k, row[k], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(history: list[dict], path: Path) -> None:
    """PNG of train/eval loss and learning rate (and expert load when MoE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = [r for r in history if "expert_counts" in r]
    fig, axes = plt.subplots(1, 3 if experts else 2, figsize=(15 if experts else 10, 4))
    steps = [r["step"] for r in history]
    axes[0].plot(steps, [r["loss"] for r in history], label="train")
    ev = [r for r in history if r.get("eval_loss") is not None]
    if ev:
        axes[0].plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in history])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate")
    if experts:
        c = np.array([np.sum(r["expert_counts"], axis=0) for r in experts], dtype=float)
        c /= c.sum(1, keepdims=True)
        for e in range(c.shape[1]):
            axes[2].plot([r["step"] for r in experts], c[:, e])
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("share of routed tokens per expert")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the loop

def evaluate(model, task, data, a: TrainArgs, d: Dist, autocast) -> dict:
    model.eval()
    loss_sum, n = 0.0, 0.0
    per_rank = a.batch_size // d.world
    with torch.no_grad():
        for i in range(a.eval_batches):
            samples = data.global_batch(i, a.batch_size)
            mine = samples[d.rank * per_rank:(d.rank + 1) * per_rank]
            with autocast():
                _, st = task.loss(model, mine, 1.0, d.device, 1)
            loss_sum += st["loss_sum"]
            n += task.normalizer(mine)
    t = _all_reduce(torch.tensor([loss_sum, n], dtype=torch.float64), d)
    model.train()
    loss = float(t[0] / max(t[1], 1.0))
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def train(model: nn.Module, task, train_data, a: TrainArgs, eval_data=None, export=None, dist_info: Dist | None = None,
          on_step=None) -> list[dict]:
    """Run the loop on an already-built (and LoRA/P-tuning-prepared) model. `export(plain_model, output)` is
    called on rank 0 at the end. `on_step(step, row)` runs after every step (tests use it to interrupt).
    Returns the history rows (one per step)."""
    d = dist_info or setup_distributed(a.device)
    out = Path(a.output)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    if a.batch_size % d.world:
        raise RecipeError(f"batch_size {a.batch_size} is not divisible by {d.world} processes")
    per_rank = a.batch_size // d.world
    mb = a.micro_batch_size or per_rank
    if per_rank % mb:
        raise RecipeError(f"per-process batch {per_rank} is not a multiple of micro_batch_size {mb}")
    torch.manual_seed(a.seed)
    base = model.to(d.device)
    full_model = all(p.requires_grad for p in base.parameters())
    if a.activation_checkpointing:
        enable_activation_checkpointing(base)
    model = wrap_parallel(base, a, d)
    opt, sched = make_optimizer(model, a)
    autocast = _autocast(a.precision, d.device)
    history: list[dict] = []
    start = 0
    ckpt = None
    if a.resume:
        ckpt = latest_checkpoint(out) if a.resume == "auto" else Path(a.resume)
        if ckpt is None and a.resume != "auto":
            raise RecipeError(f"no checkpoint at {a.resume}")
    if ckpt is not None:
        ts = load_training_checkpoint(ckpt, model, opt, sched, d, not full_model)
        start, history = ts["step"], ts["history"]
        if d.main:
            print(f"resumed from {ckpt} at step {start}", file=sys.stderr)
    log = Logger(out, a, d.main)
    log.start(history)
    bar = None
    if d.main and a.progress:
        from tqdm import tqdm

        bar = tqdm(total=a.max_steps, initial=start, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    model.train()
    try:
        for step in range(start, a.max_steps):
            ts0 = time.perf_counter()
            samples = train_data.global_batch(step, a.batch_size)
            norm = task.normalizer(samples)
            mine = samples[d.rank * per_rank:(d.rank + 1) * per_rank]
            micro = [mine[i:i + mb] for i in range(0, per_rank, mb)]
            loss_sum = bal = z = 0.0
            counts = None
            for i, m in enumerate(micro):
                with _no_sync(model, i == len(micro) - 1):
                    with autocast():
                        loss, st = task.loss(model, m, norm, d.device, d.world)
                    loss.backward()
                loss_sum += st["loss_sum"]
                bal += st.get("balance", 0.0)
                z += st.get("z", 0.0)
                if "counts" in st:
                    counts = st["counts"].cpu() if counts is None else counts + st["counts"].cpu()
            gn = _clip(model, a.grad_clip)
            lr = sched.get_last_lr()[0]  # the rate this step used
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            red = _all_reduce(torch.tensor([loss_sum, bal, z], dtype=torch.float64), d)
            if counts is not None:
                counts = _all_reduce(counts, d)
            ntok = task.n_tokens(samples)
            dt = time.perf_counter() - ts0
            row = {"step": step + 1, "loss": float(red[0]) / norm, "lr": lr, "grad_norm": gn,
                   "tokens": ntok, "tokens_per_s": ntok / max(dt, 1e-9), "elapsed_s": time.perf_counter() - t0}
            if counts is not None:
                row.update(balance_loss=float(red[1]) / norm, z_loss=float(red[2]) / norm,
                           expert_counts=counts.tolist())
            last = step + 1 == a.max_steps
            if eval_data is not None and ((a.eval_every and (step + 1) % a.eval_every == 0) or last):
                row.update(evaluate(model, task, eval_data, a, d, autocast))
            history.append(row)
            if d.main:
                log.scalars(row)
                log.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if a.save_every and (step + 1) % a.save_every == 0 and not last:
                save_training_checkpoint(out / "checkpoints" / f"step_{step + 1:07d}", model, opt, sched, step + 1,
                                         history, a, d, not full_model)
                if d.main:
                    _prune(out, a.keep_checkpoints)
            if on_step is not None:
                on_step(step + 1, row)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    if d.main and a.plot and history:
        plot_curves(history, out / "curves.png")
    if export is not None:
        plain = _gather_plain(model, base, d)
        if d.main:
            export(plain, out)
        if d.world > 1:
            dist.barrier()
    return history


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    gn = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(gn, "full_tensor"):  # DTensor under FSDP2
        gn = gn.full_tensor()
    return float(gn)


def _gather_plain(model: nn.Module, base: nn.Module, d: Dist) -> nn.Module:
    """The unsharded module for export (FSDP2: a full state dict loaded into a fresh copy on rank 0)."""
    if not (d.world > 1 and hasattr(model, "reshard")):
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    plain = base_template(base)
    plain.load_state_dict(sd)
    return plain


def base_template(base: nn.Module) -> nn.Module:
    """A fresh unsharded model of the same class and config, LoRA-wrapped like `base` (FSDP2 export)."""
    m = type(base).from_config(base.config)
    if getattr(base, "_lora_config", None) is not None:
        from glm4.layers.lora import apply_lora

        apply_lora(m, base._lora_config)
    return m


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)
