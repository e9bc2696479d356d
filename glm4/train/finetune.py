"""`glm4 finetune --model PATH --data train.jsonl --method lora|full|ptuning --max-steps N --output DIR
[--config recipe.yaml]`: supervised fine-tuning on GLM-4's fine-tuning jsonl (or OpenAI-style messages).

Loss on assistant tokens plus the token that ends each assistant turn (glm4/train/data.py). Vision checkpoints
(glm4v, glm4v_moe) read GLM-4V's jsonl with `"image": path` on user turns (glm4/train/vision_data.py); their tower
stays frozen unless --no-freeze-vision, and LoRA goes on the language model's q/k/v and/or the merger (--lora-on).
Output:
full -> an HF-layout checkpoint in DIR; lora -> a PEFT adapter in DIR (and DIR/merged with --merge);
ptuning -> ptuning_config.json + prefix.safetensors in DIR.

Python API: `run(FinetuneArgs(...))` or `run(**fields)`; `main(argv)` is the CLI over the same dataclass.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import torch

from glm4.train.loop import LMTask, count_parameters, train
from glm4.train.parallel import setup_distributed
from glm4.train.recipe import RecipeError, TrainArgs, parse_recipe

METHODS = ("lora", "full", "ptuning")


@dataclass
class FinetuneArgs(TrainArgs):
    model: str = ""  # checkpoint folder
    data: str = ""  # train.jsonl: {"messages": [...]} per line
    eval_data: str = ""
    tokenizer: str = ""  # default: the model folder
    chat_format: str = ""  # chat format family; default: the checkpoint's own
    method: str = "lora"  # lora | full | ptuning
    lr: float = 5e-4  # GLM-4's demo: 5e-4 for LoRA / P-tuning, 5e-5 for full
    max_length: int = 1024  # truncate each conversation to this many tokens
    pack: bool = False  # pack short conversations into rows of seq_len (attention never crosses them)
    seq_len: int = 0  # packed row length; 0 = max_length
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: Any = None  # list of module names, a regex, or "all-linear"; default: attention q/k/v
    merge: bool = False  # LoRA: also export the merged full model to DIR/merged
    num_virtual_tokens: int = 128  # P-tuning v2 prefix length (GLM-4's demo used 512)
    dtype: str = "float32"  # parameter dtype of the base model
    freeze_vision: bool = True  # vision models: no update to the tower (patch embedding, blocks, downsample)
    lora_on: str = "language_model"  # vision models, LoRA: language_model, merger, or language_model,merger


# LoRA scopes of a vision model, as regexes over module paths (PEFT's rule for a string target)
VISION_LORA_SCOPES = {"language_model": r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)",
                      "merger": r"model\.visual\.merger\.(proj|gate_proj|up_proj|down_proj)"}


def is_vision_model(model) -> bool:
    return hasattr(model.config, "vision_config")


def default_lora_targets(model, lora_on: str = "language_model") -> list[str] | str:
    # GLM-4's own configs: query_key_value (remote-code layout), q/k/v (HF layouts)
    if is_vision_model(model):
        scopes = [x.strip() for x in lora_on.split(",") if x.strip()]
        bad = [x for x in scopes if x not in VISION_LORA_SCOPES]
        if bad or not scopes:
            raise RecipeError(f"lora_on: expected language_model and/or merger, got {lora_on!r}")
        return "|".join(f"(?:{VISION_LORA_SCOPES[x]})" for x in scopes)
    return ["query_key_value"] if model.config.model_type == "chatglm" else ["q_proj", "k_proj", "v_proj"]


def tower_parameters(model) -> list[torch.nn.Parameter]:
    """The vision tower's parameters without the merger (what --freeze-vision keeps fixed)."""
    return [p for n, p in model.model.visual.named_parameters() if not n.startswith("merger.")]


def prepare_method(model, a: FinetuneArgs):
    """Apply LoRA / P-tuning to the model; returns the attention-context factory (None for plain)."""
    if a.method not in METHODS:
        raise RecipeError(f"method must be one of {', '.join(METHODS)}, got {a.method!r}")
    if a.method == "lora":
        from glm4.layers.lora import LoRAConfig, apply_lora

        targets = a.lora_targets or default_lora_targets(model, a.lora_on)
        apply_lora(model, LoRAConfig(a.lora_r, a.lora_alpha, a.lora_dropout, targets))
        if is_vision_model(model) and not a.freeze_vision:
            if not a.merge:
                raise RecipeError("LoRA with a trained vision tower: the tower's weights are not in the adapter; "
                                  "pass --merge (the merged model is the result) or keep --freeze-vision")
            for p in tower_parameters(model):
                p.requires_grad_(True)
    elif a.method == "ptuning":
        from glm4.train import ptuning

        if is_vision_model(model):
            raise RecipeError("P-tuning v2 is for text models; vision models train with lora or full")
        if a.parallel == "fsdp":
            raise RecipeError("P-tuning v2 runs with ddp (its prefix is read outside the sharded layers)")
        ptuning.apply_ptuning(model, a.num_virtual_tokens)
        return ptuning.ctx_factory(model)
    if is_vision_model(model) and a.freeze_vision:
        for p in tower_parameters(model):
            p.requires_grad_(False)
    return None


def export_method(model, out, a: FinetuneArgs, tok_dir) -> None:
    from glm4.train.common import copy_tokenizer, export_full

    if a.method == "full":
        export_full(model, out, tok_dir, dataclasses.asdict(a))
    elif a.method == "lora":
        from glm4.layers.lora import merge_lora, save_adapter

        save_adapter(model, out, base_model_name_or_path=a.model)
        if a.merge:
            export_full(merge_lora(model), out / "merged", tok_dir, dataclasses.asdict(a))
    else:
        from glm4.train.ptuning import save_prefix

        save_prefix(model, out)
        copy_tokenizer(tok_dir, out)


def check_vocab(samples, vocab_size: int, where: str) -> None:
    top = max(max(s["input_ids"]) for s in samples)
    if top >= vocab_size:
        raise RecipeError(f"{where}: token id {top} >= the model's vocab_size {vocab_size} (wrong tokenizer?)")


def run(args: FinetuneArgs | None = None, on_step=None, **overrides) -> list[dict]:
    from glm4.train.common import load_base_model, load_chat_data_tools

    a = dataclasses.replace(args or FinetuneArgs(), **overrides)
    if not a.model or not a.data:
        raise RecipeError("finetune needs `model` and `data`")
    d = setup_distributed(a.device)
    tok_dir = a.tokenizer or a.model
    tok, fmt = load_chat_data_tools(tok_dir, a.chat_format)
    model = load_base_model(a.model, a.dtype)
    ds, eval_ds, make_task = (vision_data if is_vision_model(model) else text_data)(a, tok, fmt, tok_dir)
    check_vocab(ds.rows, model.config.vocab_size, a.data)
    torch.manual_seed(a.seed)  # LoRA A / prefix init
    ctx = prepare_method(model, a)
    if d.main:
        n, t = count_parameters(model)
        print(f"finetune ({a.method}): {n / 1e6:.2f}M parameters, {t / 1e6:.3f}M trainable, {len(ds)} "
              f"{'packed rows' if a.pack else 'examples'}, {d.world} process(es)", file=sys.stderr)
    task = make_task(model, ctx)
    return train(model, task, ds, a, eval_ds, lambda m, out: export_method(m, out, a, tok_dir), d, on_step)


def text_data(a: FinetuneArgs, tok, fmt, tok_dir):
    """(train set, eval set or None, task factory) for a text model."""
    from glm4.train.data import SFTDataset

    packed = (a.seq_len or a.max_length) if a.pack else None
    ds = SFTDataset.from_jsonl(a.data, tok, fmt, a.max_length, a.seed, packed)
    eval_ds = SFTDataset.from_jsonl(a.eval_data, tok, fmt, a.max_length, a.seed, packed) if a.eval_data else None
    return ds, eval_ds, lambda model, ctx: LMTask(model, a, ctx, pad_id=tok.pad_token_id or 0)


def vision_data(a: FinetuneArgs, tok, fmt, tok_dir):
    """(train set, eval set or None, task factory) for a vision model: pictures read from the jsonl's paths."""
    from glm4.chat.media import MediaPolicy
    from glm4.media.image import MediaError
    from glm4.train.vision_data import ImageCache, VisionSFTDataset, VisionTask

    if a.pack:
        raise RecipeError("pack: vision conversations are not packed (each row carries its own pictures)")
    if not getattr(fmt.spec, "vision", False):
        raise RecipeError(f"chat format {fmt.name} renders no images; pass chat_format: glm4v (or glm45v)")
    try:
        policy = MediaPolicy.for_checkpoint(tok_dir, tok)
    except MediaError as e:
        raise RecipeError(str(e)) from e
    cache = ImageCache()
    ds = VisionSFTDataset.from_jsonl(a.data, tok, fmt, policy, a.max_length, a.seed, cache)
    eval_ds = VisionSFTDataset.from_jsonl(a.eval_data, tok, fmt, policy, a.max_length, a.seed, cache) \
        if a.eval_data else None
    return ds, eval_ds, lambda model, ctx: VisionTask(model, a, policy, cache, pad_id=tok.pad_token_id or 0)


def main(argv: list[str] | None = None) -> int:
    from glm4.train.common import run_main

    return run_main(lambda av: run(parse_recipe(FinetuneArgs, av, "glm4 finetune", __doc__.split("\n\n")[0])), argv)


if __name__ == "__main__":
    sys.exit(main())
