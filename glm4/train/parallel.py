"""Processes: torchrun's process group, DDP / FSDP2 wrapping, gradient-sync control, the unsharded model for export."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from glm4.train.recipe import RecipeError, TrainArgs


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


def all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over processes (on the process device: NCCL reduces only CUDA tensors); returns a CPU tensor."""
    if d.world > 1:
        t = t.to(d.device)
        dist.all_reduce(t)
    return t.cpu()


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers":
            return m
    return None


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
def no_sync(model: nn.Module, sync: bool):
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


def gather_plain(model: nn.Module, base: nn.Module, d: Dist) -> nn.Module:
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
