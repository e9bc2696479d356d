"""Training checkpoints: model and optimizer (torch.distributed.checkpoint, so FSDP shards save and load as they
are), scheduler, each rank's RNG and the step (= the data position); resuming reproduces the loss curve. A
checkpoint counts once its DONE file, written last, exists."""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from glm4.train.parallel import Dist
from glm4.train.recipe import RecipeError, TrainArgs


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


def prune_checkpoints(output: Path, keep: int) -> None:
    done = sorted(p for p in (output / "checkpoints").glob("step_*") if (p / "DONE").exists())
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
