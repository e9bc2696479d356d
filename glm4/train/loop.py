"""The training loop shared by pretrain / finetune / dpo (recipes: recipe.py; processes: parallel.py; checkpoints:
checkpoints.py; logs and curves: logs.py).

One optimizer step = one *global batch* of `batch_size` samples, a pure function of the step
(`dataset.global_batch(step, batch_size)`). Every process builds the same global batch and takes its
slice; the loss is normalized by the global number of target tokens (or pairs), so 1 process, N
processes and any gradient accumulation give the same update. Checkpoints hold model, optimizer,
scheduler, per-rank RNG and the step (= the data position); resuming reproduces the same loss curve.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from glm4.layers.attention import Causal
from glm4.train.checkpoints import (
    latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
)
from glm4.train.logs import Logger, plot_curves
from glm4.train.losses import IGNORE, cross_entropy, moe_aux
from glm4.train.objectives import collate
from glm4.train.parallel import (
    Dist,
    all_reduce,
    decoder_layers,
    gather_plain,
    no_sync,
    setup_distributed,
    wrap_parallel,
)
from glm4.train.recipe import RecipeError, TrainArgs

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
    t = all_reduce(torch.tensor([loss_sum, n], dtype=torch.float64), d)
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
                with no_sync(model, i == len(micro) - 1):
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
            red = all_reduce(torch.tensor([loss_sum, bal, z], dtype=torch.float64), d)
            if counts is not None:
                counts = all_reduce(counts, d)
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
                    prune_checkpoints(out, a.keep_checkpoints)
            if on_step is not None:
                on_step(step + 1, row)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    if d.main and a.plot and history:
        plot_curves(history, out / "curves.png")
    if export is not None:
        plain = gather_plain(model, base, d)
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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)
