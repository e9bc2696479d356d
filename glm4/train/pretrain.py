"""`glm4 pretrain --config recipe.yaml [--flag value ...]`: causal LM and/or GLM blank infilling.

Data: a text file (.txt, documents split on form feeds), a .jsonl of {"text": ...}, or pre-tokenized ids
(.npy, or a flat .bin of uint16/uint32; `python -m glm4.train.data` writes one). The model is either a
checkpoint folder (`model`, continued pretraining) or a fresh random init from `model_config` (a
config.json path, or the mapping inline in the recipe). The result is exported in the HF layout.

Python API: `run(PretrainArgs(...))` or `run(**fields)`; `main(argv)` is the CLI over the same dataclass.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glm4.train.loop import LMTask, count_parameters, train
from glm4.train.parallel import setup_distributed
from glm4.train.recipe import RecipeError, TrainArgs, parse_recipe


@dataclass
class PretrainArgs(TrainArgs):
    model: str = ""  # checkpoint folder to continue from
    model_config: Any = None  # config.json (path) or mapping: train from scratch
    tokenizer: str = ""  # folder; default: the model folder, or the folder of model_config
    data: str = ""  # .txt | .jsonl | .npy | .bin
    eval_data: str = ""
    eval_fraction: float = 0.0  # hold out this tail of the token stream for eval when eval_data is unset
    token_dtype: str = "auto"  # for .bin: uint16 | uint32 | auto (by vocab size)
    seq_len: int = 512
    objective: Any = "causal"  # causal | blank | gmask | {causal: 0.7, gmask: 0.2, blank: 0.1}
    mask_ratio: float = 0.15  # blank infilling: share of tokens in [MASK] spans
    special_ids: Any = None  # {mask, gmask, sop, eop, pad} ids when the tokenizer has none (tiny vocabularies)
    init_std: float = 0.02
    dtype: str = "float32"  # parameter dtype (bf16 autocast is `precision`)


def run(args: PretrainArgs | None = None, on_step=None, **overrides) -> list[dict]:
    from glm4.train.common import build_from_config, export_full, load_base_model, load_tok
    from glm4.train.data import TokenStreamDataset, load_tokens
    from glm4.train.objectives import SpecialIds, parse_objective

    a = dataclasses.replace(args or PretrainArgs(), **overrides)
    if not a.data:
        raise RecipeError("pretrain needs `data`")
    if bool(a.model) == (a.model_config is not None):
        raise RecipeError("give exactly one of `model` (a checkpoint to continue) or `model_config` (from scratch)")
    d = setup_distributed(a.device)
    tok_dir = a.tokenizer or a.model or (Path(a.model_config).parent if isinstance(a.model_config, str) else "")
    tok = load_tok(tok_dir)
    model = load_base_model(a.model, a.dtype) if a.model else build_from_config(a.model_config, a.dtype, a.init_std, a.seed)
    V = model.config.vocab_size
    mix = parse_objective(a.objective)
    special = SpecialIds.from_tokenizer(tok) if tok is not None else SpecialIds()
    if a.special_ids:
        try:
            special = dataclasses.replace(special, **{k: int(v) for k, v in dict(a.special_ids).items()})
        except (TypeError, ValueError) as e:
            raise RecipeError(f"special_ids: expected a mapping of mask/gmask/sop/eop/pad to ids ({e})") from e
    if any(k != "causal" for k in mix):
        bad = {k: v for k, v in dataclasses.asdict(special).items() if v >= V}
        if bad:
            raise RecipeError(f"blank infilling needs [MASK]/[gMASK]/<sop>/<eop> ids inside the vocab ({V}); got {bad}")
    tokens = load_tokens(a.data, tok, a.token_dtype, V)
    if len(tokens) and int(np.max(tokens)) >= V:
        hint = f" (read as {tokens.dtype}: is token_dtype right?)" if str(a.data).endswith(".bin") else ""
        raise RecipeError(f"{a.data}: token id {int(np.max(tokens))} >= vocab_size {V}{hint}")
    eval_tokens = load_tokens(a.eval_data, tok, a.token_dtype, V) if a.eval_data else None
    if eval_tokens is None and a.eval_fraction > 0:
        cut = int(len(tokens) * (1 - a.eval_fraction))
        tokens, eval_tokens = tokens[:cut], tokens[cut:]
    ds = TokenStreamDataset(tokens, a.seq_len, mix, special, a.seed, a.mask_ratio)
    eval_ds = TokenStreamDataset(eval_tokens, a.seq_len, mix, special, a.seed + 1, a.mask_ratio) \
        if eval_tokens is not None else None
    if d.main:
        n, _ = count_parameters(model)
        print(f"pretrain: {n / 1e6:.2f}M parameters, {len(tokens)} tokens = {len(ds)} sequences of {a.seq_len}, "
              f"objective {mix}, {d.world} process(es)", file=sys.stderr)
    task = LMTask(model, a, pad_id=special.pad if special.pad < V else 0)
    export = lambda m, out: export_full(m, out, tok_dir, dataclasses.asdict(a))
    return train(model, task, ds, a, eval_ds, export, d, on_step)


def main(argv: list[str] | None = None) -> int:
    from glm4.train.common import run_main

    return run_main(lambda av: run(parse_recipe(PretrainArgs, av, "glm4 pretrain", __doc__.split("\n\n")[0])), argv)


if __name__ == "__main__":
    sys.exit(main())
