"""`glm4 dpo --model PATH --data pairs.jsonl --output DIR [--config recipe.yaml]`: direct preference
optimization against a frozen reference (the starting model).

pairs.jsonl: {"prompt": [messages] | "text", "chosen": message | "text", "rejected": ...} per line
(`tools` optional). Log-probs cover the response tokens (and the token that ends the turn) only.
With `method: lora` the reference is the base model with the adapters switched off (no second copy).

Python API: `run(DPOArgs(...))` or `run(**fields)`; `main(argv)` is the CLI over the same dataclass.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glm4.train.loop import count_parameters, model_kwargs, train
from glm4.train.losses import dpo_loss, sequence_logprobs
from glm4.train.objectives import collate
from glm4.train.parallel import setup_distributed
from glm4.train.recipe import RecipeError, TrainArgs, parse_recipe


@dataclass
class DPOArgs(TrainArgs):
    model: str = ""
    data: str = ""  # pairs.jsonl
    eval_data: str = ""
    tokenizer: str = ""
    chat_format: str = ""
    method: str = "lora"  # lora | full
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO
    lr: float = 5e-6
    max_length: int = 1024
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: Any = None
    merge: bool = False
    dtype: str = "float32"


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Run a LoRA model as its base: every LoRALinear's scaling set to 0 for the duration."""
    from glm4.layers.lora import lora_modules

    mods = lora_modules(model)
    saved = {n: m.scaling for n, m in mods.items()}
    for m in mods.values():
        m.scaling = 0.0
    try:
        yield
    finally:
        for n, m in mods.items():
            m.scaling = saved[n]


class DPOTask:
    """Samples are (chosen, rejected) pairs of SFT samples; normalized by the global number of pairs."""

    def __init__(self, model: nn.Module, a: DPOArgs, reference: nn.Module | None, pad_id: int = 0):
        self.ref, self.a, self.pad_id = reference, a, pad_id
        self.base = model  # unwrapped, for the adapters-off reference

    def normalizer(self, pairs) -> float:
        return float(max(1, len(pairs)))

    def n_tokens(self, pairs) -> int:
        return sum(len(c["input_ids"]) + len(r["input_ids"]) for c, r in pairs)

    def logprobs(self, model, pairs, device) -> torch.Tensor:
        b = collate([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id)
        logits = model(b["input_ids"].to(device), **model_kwargs(b, device))
        return sequence_logprobs(logits, b["targets"].to(device))  # [2n]: chosen then rejected

    def loss(self, model, pairs, norm, device, world):
        n = len(pairs)
        pol = self.logprobs(model, pairs, device)
        with torch.no_grad():
            if self.ref is not None:
                ref = self.logprobs(self.ref, pairs, device)
            else:
                with adapters_off(self.base):
                    ref = self.logprobs(self.base, pairs, device)
        loss, rc, rr = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], self.a.beta, self.a.label_smoothing)
        total = loss * n
        return total * (world / norm), {"loss_sum": float(total.detach()), "reward_acc": float((rc > rr).sum())}


def run(args: DPOArgs | None = None, on_step=None, **overrides) -> list[dict]:
    from glm4.train.common import export_full, load_base_model, load_chat_data_tools
    from glm4.train.data import PairDataset

    a = dataclasses.replace(args or DPOArgs(), **overrides)
    if not a.model or not a.data:
        raise RecipeError("dpo needs `model` and `data`")
    if a.method not in ("lora", "full"):
        raise RecipeError(f"dpo method must be lora or full, got {a.method!r}")
    d = setup_distributed(a.device)
    tok_dir = a.tokenizer or a.model
    tok, fmt = load_chat_data_tools(tok_dir, a.chat_format)
    ds = PairDataset.from_jsonl(a.data, tok, fmt, a.max_length, a.seed)
    eval_ds = PairDataset.from_jsonl(a.eval_data, tok, fmt, a.max_length, a.seed) if a.eval_data else None
    model = load_base_model(a.model, a.dtype)
    from glm4.train.finetune import check_vocab

    check_vocab([s for pair in ds.pairs for s in pair], model.config.vocab_size, a.data)
    ref = None
    if a.method == "lora":
        from glm4.layers.lora import LoRAConfig, apply_lora
        from glm4.train.finetune import default_lora_targets

        torch.manual_seed(a.seed)
        apply_lora(model, LoRAConfig(a.lora_r, a.lora_alpha, a.lora_dropout, a.lora_targets or default_lora_targets(model)))
    else:
        ref = copy.deepcopy(model).eval().requires_grad_(False).to(d.device)
    if d.main:
        n, t = count_parameters(model)
        print(f"dpo ({a.method}): {n / 1e6:.2f}M parameters, {t / 1e6:.3f}M trainable, {len(ds)} pairs", file=sys.stderr)
    task = DPOTask(model, a, ref, pad_id=tok.pad_token_id or 0)

    def export(m, out):
        if a.method == "full":
            export_full(m, out, tok_dir, dataclasses.asdict(a))
            return
        from glm4.layers.lora import merge_lora, save_adapter

        save_adapter(m, out, base_model_name_or_path=a.model)
        if a.merge:
            export_full(merge_lora(m), out / "merged", tok_dir, dataclasses.asdict(a))

    return train(model, task, ds, a, eval_ds, export, d, on_step)


def main(argv: list[str] | None = None) -> int:
    from glm4.train.common import run_main

    return run_main(lambda av: run(parse_recipe(DPOArgs, av, "glm4 dpo", __doc__.split("\n\n")[0])), argv)


if __name__ == "__main__":
    sys.exit(main())

