"""Reference generator: prefill, then one token at a time against a contiguous KV cache.

Kept simple and exact: it is the oracle the engine is tested against. Sampling follows transformers'
order (temperature, then top-k, then top-p) so seeded runs can be compared token for token.

    out = generate(model, input_ids, max_new_tokens=32, temperature=0.0)   # [B, T + n]

CLI: `glm4 generate --model PATH --prompt-ids 1,2,3 --max-new-tokens 16` prints the ids.
"""

from __future__ import annotations

import argparse
import sys

import torch

from glm4.layers.attention import KVCache


def _pad_id(config, eos: list[int]) -> int:
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return int(pad)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        # drop the low tail whose total mass is <= 1 - top_p; the top token always survives
        sorted_scores, order = torch.sort(scores, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p)
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt [B, T] through the model, filling the cache; -> last-token logits [B, V]."""
    B, T = input_ids.shape
    last = torch.arange(B, device=input_ids.device) * T + (T - 1)
    logits = model(input_ids, positions=positions, ctx=cache, logits_indices=last)
    cache.advance(T)
    return logits


@torch.no_grad()
def decode_one_token(model, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens [B], positions [B] -> next-token logits [B, V]."""
    logits = model(tokens[:, None], positions=positions[:, None], ctx=cache)[:, -1]
    cache.advance(1)
    return logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, eos_token_ids: list[int] | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue `input_ids` [B, T] (left-padded when `attention_mask` [B, T] has zeros) -> [B, T + n].

    Each row stops at its first eos id (default: the config's eos ids); finished rows are padded with the
    config's pad id; generation ends early once every row has finished, so n <= max_new_tokens."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [B, T] tensor, got shape {list(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    if top_k < 0 or temperature < 0:
        raise ValueError("top_k and temperature must be >= 0")
    cfg = model.config
    eos = list(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    pad = _pad_id(cfg, eos)
    device = input_ids.device
    B, T = input_ids.shape
    if max_new_tokens == 0:
        return input_ids
    dtype = next(model.parameters()).dtype

    key_mask = None
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError("attention_mask must have the shape of input_ids")
        if not bool(attention_mask.any(dim=1).all()):
            raise ValueError("every row needs at least one real token")
        if not bool(attention_mask.all()):
            # [B, T + max_new]: the prompt's padding stays masked, generated slots are real
            key_mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(T, device=device).expand(B, T)

    cache = KVCache(cfg.num_hidden_layers, B, T + max_new_tokens, cfg.num_key_value_heads, cfg.head_dim,
                    dtype=dtype, device=device, key_mask=key_mask)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    logits = prefill(model, input_ids, positions, cache)
    pos = positions[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = [input_ids]
    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, top_k, generator)
        tok = tok.masked_fill(finished, pad)
        out.append(tok[:, None])
        finished |= torch.isin(tok, eos_t)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        pos = pos + 1
        logits = decode_one_token(model, tok, pos, cache)
    return torch.cat(out, dim=1)


# ---- CLI -------------------------------------------------------------------------------------------

def _parse_ids(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", ",").split(",") if x]
    except ValueError as e:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {s!r}") from e
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def encode_prompt(model_path: str, text: str):
    """Text prompt -> (ids, tokenizer) through the checkpoint's chat format (glm4.tokenizer)."""
    try:
        from glm4.chat import ChatFormat
        from glm4.tokenizer import load_tokenizer
    except ImportError as e:
        raise ValueError(f"--prompt needs glm4.tokenizer, which is unavailable ({e}); use --prompt-ids") from e
    tok = load_tokenizer(model_path)
    ids = ChatFormat.for_checkpoint(model_path).encode(tok, [{"role": "user", "content": text}])
    return ids, tok


def _one_adapter(args) -> str | None:
    """The adapter folder of `--lora [NAME=]PATH`, or of `--model ADAPTER_DIR` (args.model becomes its base)."""
    from glm4.layers.lora import adapter_base

    specs = [s.partition("=")[2] if "=" in s else s for s in args.lora or []]
    base = adapter_base(args.model)
    if base is not None:
        specs, args.model = [args.model, *specs], str(base)
    if len(specs) > 1:
        raise ValueError("glm4 generate applies one LoRA adapter; serve several with glm4 serve --lora ...")
    return specs[0] if specs else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="glm4 generate", description="Generate token ids with the reference generator.")
    p.add_argument("--model", help="checkpoint folder (config.json + safetensors) or .gguf file; default: the shipped "
                                   "model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    src.add_argument("--prompt", help="a user message, encoded with the checkpoint's tokenizer and chat format")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eos-ids", default=None, help="comma-separated stop ids (default: the config's)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="apply this PEFT LoRA adapter to --model (one); --model ADAPTER_DIR also works")
    args = p.parse_args(argv)

    from glm4.config import ConfigError
    from glm4.quant.load import load_model
    from glm4.weights import CheckpointError

    try:
        if not args.model:
            from glm4.assets import default_model

            args.model = str(default_model())
        adapter = _one_adapter(args)
        tok = None
        if args.prompt is not None:
            ids, tok = encode_prompt(args.model, args.prompt)
        else:
            ids = _parse_ids(args.prompt_ids)
        model = load_model(args.model, dtype=args.dtype, device=args.device, adapter=adapter)
        V = model.get_input_embeddings().num_embeddings
        if any(i < 0 or i >= V for i in ids):
            raise ValueError(f"prompt ids must be in [0, {V})")
        gen = torch.Generator(device=args.device).manual_seed(args.seed) if args.seed is not None else None
        eos = _parse_ids(args.eos_ids) if args.eos_ids else None
        out = generate(model, torch.tensor([ids], device=args.device), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, eos_token_ids=eos,
                       generator=gen)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"glm4 generate: error: {e}", file=sys.stderr)
        return 2
    new = out[0, len(ids):].tolist()
    if tok is not None:
        print(tok.decode(new, skip_special_tokens=True))
    else:
        print(",".join(str(i) for i in out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
