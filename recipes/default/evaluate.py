"""Evaluate a default-model checkpoint: held-out perplexity, BFCL live_simple tool calls, greedy samples.

    python recipes/default/evaluate.py --model glm4/assets/default --data-dir data/default --out runs/default/eval.json

- perplexity on the held-out token files of train_tokenizer.py (Persuasion; 三国 chapters 111-120; 5 % of the
  news), in windows of --seq-len, plus bits per character (comparable across tokenizers);
- BFCL `live_simple` (never trained on): the chat prompt with the tools, greedy decoding, then the chat format's
  tool-call parser. format_valid = the reply is a GLM-4 call `name\n{JSON object}` (any name, as BFCL scores
  the name apart); declared_tool = it parses as >= 1 call of an offered tool (the parser keeps calls of unknown
  names as content); correct_function = the first call names the ground-truth function; args_exact = every ground-truth argument
  has an acceptable value and no unknown argument is given (BFCL's possible-answer lists);
- HSK translation on the held-out pairs of build_sft.py (chrF, character n-grams, both directions);
- greedy samples, chat and plain continuation, in Chinese and English.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

HELDOUT = {"en": "valid_en_persuasion", "zh_classical": "valid_zh_sanguo", "zh_news": "valid_zh_news"}
CHAT_SAMPLES = ["你好", "你是谁？", "介绍一下你自己。", "今天天气怎么样？", "Hello!", "What is your favorite book?",
                "把这句话翻译成英文：我喜欢喝茶。", "Translate into Chinese: Where is the train station?"]
TEXT_SAMPLES = ["话说天下大势，", "一九九八年新年", "床前明月光，", "It is a truth universally acknowledged",
                "Call me Ishmael.", "Elizabeth looked at"]
TOOL_SAMPLES = [
    ("北京明天天气怎么样？", [{"type": "function", "function": {
        "name": "get_weather", "description": "查询指定城市的天气", "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "城市名称"}, "date": {"type": "string", "description": "日期"}},
            "required": ["city"]}}}]),
    ("What is 12 times 7?", [{"type": "function", "function": {
        "name": "calculate", "description": "Evaluate a math expression", "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "the expression"}}, "required": ["expression"]}}}]),
]


def load(model_dir: Path, dtype: str = "float32"):
    from glm4.tokenizer import ChatFormat, load_tokenizer
    from glm4.weights import load_model

    model = load_model(model_dir, dtype=dtype).eval()
    tok = load_tokenizer(model_dir)
    tpl = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    return model, tok, ChatFormat("chatglm", tpl)  # glm-4-9b-chat's format (see MODEL_CARD.md)


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, chars: int, max_tokens: int = 0) -> dict:
    total = len(tokens) - 1
    if max_tokens:
        tokens = tokens[:max_tokens]
    nll, n = 0.0, 0
    for i in range(0, len(tokens) - 1, seq_len):
        chunk = torch.from_numpy(tokens[i: i + seq_len + 1].astype(np.int64))[None]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).float()
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        n += chunk.shape[1] - 1
    frac = n / max(total, 1)  # share of the set scored, to scale its character count
    return {"tokens": n, "loss": nll / n, "ppl": math.exp(nll / n),
            "bits_per_char": nll / math.log(2) / (chars * frac)}


@torch.no_grad()
def greedy(model, ids: list[int], eos: list[int], max_new_tokens: int) -> list[int]:
    from glm4.reference import generate

    out = generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=eos)
    new = out[0, len(ids):].tolist()
    for k, t in enumerate(new):
        if t in eos:
            return new[: k + 1]
    return new


_ENGINES: dict[int, object] = {}


def greedy_many(model, prompts: list[list[int]], eos: list[int], max_new_tokens: int) -> list[list[int]]:
    """greedy() of every prompt, batched through the engine (its greedy tokens equal the reference generator's,
    tests/test_engine.py); prompts too long for the model's context go through the reference generator."""
    from glm4.engine import LLM, SamplingParams

    llm = _ENGINES.get(id(model))
    if llm is None:
        llm = _ENGINES[id(model)] = LLM.from_model(model, kv_cache_tokens=65536, fuse_projections=False,
                                                    linear="torch")
    limit = llm.engine.max_model_len - max_new_tokens
    short = [i for i, p in enumerate(prompts) if len(p) <= limit]
    out: list[list[int] | None] = [None] * len(prompts)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0, stop_token_ids=list(eos))
    for i, o in zip(short, llm.generate([prompts[i] for i in short], params)):
        out[i] = list(o.outputs[0].token_ids)
    for i, p in enumerate(prompts):
        if out[i] is None:
            out[i] = greedy(model, p, eos, max_new_tokens)
    return out


def _tools(functions: list[dict]) -> list[dict]:
    from build_sft import as_tools  # same schema conversion as the training data

    return as_tools(functions)


def _value_ok(v, allowed: list) -> bool:
    for a in allowed:
        if a == "":
            continue
        if v == a or (isinstance(a, (int, float)) and isinstance(v, (int, float)) and float(v) == float(a)):
            return True
        if isinstance(a, str) and isinstance(v, str) and a.strip().lower() == v.strip().lower():
            return True
    return False


def args_exact(args: dict, possible: dict) -> bool:
    if set(args) - set(possible):
        return False
    for k, allowed in possible.items():
        if k in args:
            if not _value_ok(args[k], allowed):
                return False
        elif "" not in allowed:
            return False
    return True


def call_syntax(text: str) -> bool:
    """The reply is a GLM-4 tool call `name\n{JSON object}`, whatever the name (BFCL scores the name separately)."""
    head, sep, body = text.strip().partition("\n")
    if not sep or not head.strip() or any(c.isspace() for c in head.strip()):
        return False
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def bfcl_live_simple(model, tok, fmt, bfcl: Path, limit: int, max_new_tokens: int) -> dict:
    rows = [json.loads(x) for x in (bfcl / "BFCL_v4_live_simple.json").read_text(encoding="utf-8").splitlines() if x]
    answers = {}
    for x in (bfcl / "possible_answer/BFCL_v4_live_simple.json").read_text(encoding="utf-8").splitlines():
        if x:
            r = json.loads(x)
            answers[r["id"]] = r["ground_truth"]
    if limit:
        rows = rows[:limit]
    n = valid = declared = correct_fn = exact = 0
    examples = []
    t0 = time.time()
    prompts, all_tools = [], []
    for r in rows:
        tools = _tools(r["function"])
        msgs = [{"role": "system", "content": "", "tools": tools}]
        msgs += [{"role": m["role"], "content": m["content"]} for m in r["question"][0]]
        prompts.append(fmt.encode(tok, msgs))
        all_tools.append(tools)
    replies = greedy_many(model, prompts, tok.eos_token_ids, max_new_tokens)
    for r, tools, new in zip(rows, all_tools, replies):
        text = tok.decode([t for t in new if t not in tok.eos_token_ids])
        try:
            _, calls = fmt.parse(text, tools)
        except Exception:  # noqa: BLE001 - a reply the parser rejects counts as invalid format
            calls = None
        (gt_name, gt_args), = answers[r["id"]][0].items()
        ok = False
        name = None
        if calls:
            try:
                parsed = [json.loads(c["function"]["arguments"]) for c in calls]
                ok = all(isinstance(a, dict) for a in parsed)
            except (ValueError, KeyError, TypeError):
                ok = False
            name = calls[0]["function"]["name"]
        n += 1
        declared += ok
        valid += ok or call_syntax(text)
        correct_fn += ok and name == gt_name
        exact += ok and name == gt_name and args_exact(parsed[0], gt_args)
        if len(examples) < 8:
            examples.append({"id": r["id"], "question": r["question"][0][-1]["content"], "expected": gt_name,
                             "reply": text})
    return {"n": n, "format_valid": valid / n, "declared_tool": declared / n, "correct_function": correct_fn / n,
            "args_exact": exact / n,
            "seconds": round(time.time() - t0, 1), "examples": examples}


def chrf(hyp: str, ref: str, n_max: int = 6, beta: float = 2.0) -> float:
    """Character n-gram F-score (chrF, spaces removed), 0-100."""
    hyp, ref = hyp.replace(" ", ""), ref.replace(" ", "")
    ps, rs = [], []
    for n in range(1, n_max + 1):
        h = Counter(hyp[i: i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i: i + n] for i in range(len(ref) - n + 1))
        if not h or not r:
            continue
        m = sum((h & r).values())
        ps.append(m / sum(h.values()))
        rs.append(m / sum(r.values()))
    if not ps:
        return 0.0
    p, r = sum(ps) / len(ps), sum(rs) / len(rs)
    return 0.0 if p + r == 0 else 100 * (1 + beta**2) * p * r / (beta**2 * p + r)


def translation(model, tok, fmt, sft_valid: Path, limit: int) -> dict:
    rows = [json.loads(x) for x in sft_valid.read_text(encoding="utf-8").splitlines() if x]
    out = {}
    for direction in ("hsk_zh2en", "hsk_en2zh"):
        sel = [r for r in rows if r["source"] == direction][:limit]
        scores, examples = [], []
        replies = greedy_many(model, [fmt.encode(tok, [r["messages"][0]]) for r in sel], tok.eos_token_ids, 48)
        for r, new in zip(sel, replies):
            user, ref = r["messages"][0], r["messages"][1]["content"]
            hyp = tok.decode([t for t in new if t not in tok.eos_token_ids]).strip()
            scores.append(chrf(hyp, ref))
            if len(examples) < 4:
                examples.append({"prompt": user["content"], "reference": ref, "output": hyp})
        out[direction] = {"n": len(sel), "chrF": sum(scores) / max(len(scores), 1), "examples": examples}
    return out


def samples(model, tok, fmt, max_new_tokens: int) -> dict:
    out = {"chat": [], "text": [], "tools": []}
    eos = tok.eos_token_ids
    replies = greedy_many(model, [fmt.encode(tok, [{"role": "user", "content": p}]) for p in CHAT_SAMPLES], eos,
                          max_new_tokens)
    for p, new in zip(CHAT_SAMPLES, replies):
        out["chat"].append({"prompt": p, "output": tok.decode([t for t in new if t not in eos])})
    prefix = [tok.special_tokens["[gMASK]"], tok.special_tokens["<sop>"]]
    replies = greedy_many(model, [prefix + tok.encode(p) for p in TEXT_SAMPLES], eos, max_new_tokens)
    for p, new in zip(TEXT_SAMPLES, replies):
        out["text"].append({"prompt": p, "output": tok.decode([t for t in new if t not in eos])})
    tool_prompts = [fmt.encode(tok, [{"role": "system", "content": "", "tools": tools}, {"role": "user", "content": p}])
                    for p, tools in TOOL_SAMPLES]
    for (p, tools), new in zip(TOOL_SAMPLES, greedy_many(model, tool_prompts, eos, max_new_tokens)):
        text = tok.decode([t for t in new if t not in eos])
        out["tools"].append({"prompt": p, "output": text, "parsed": fmt.parse(text, tools)[1]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="glm4/assets/default", type=Path)
    ap.add_argument("--data-dir", default="data/default", type=Path)
    ap.add_argument("--out", default="runs/default/eval.json", type=Path)
    ap.add_argument("--seq-len", default=512, type=int)
    ap.add_argument("--ppl-max-tokens", default=0, type=int, help="cap per held-out set (0 = all)")
    ap.add_argument("--bfcl-limit", default=0, type=int, help="first N live_simple cases (0 = all 258)")
    ap.add_argument("--translation-limit", default=50, type=int)
    ap.add_argument("--skip", default="", help="comma list of: ppl,bfcl,translation,samples")
    ap.add_argument("--threads", default=0, type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    skip = set(filter(None, args.skip.split(",")))
    try:
        model, tok, fmt = load(args.model)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: cannot load {args.model}: {e}", file=sys.stderr)
        return 1
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report["model"] = str(args.model)
    t0 = time.time()
    if "ppl" not in skip:
        tok_report = json.loads((args.data_dir / "tokenizer/report.json").read_text())
        report["perplexity"] = {}
        for lang, split in HELDOUT.items():
            toks = np.fromfile(args.data_dir / "tokens" / f"{split}.bin", dtype=np.uint16)
            report["perplexity"][lang] = perplexity(model, toks, args.seq_len, tok_report["chars"][split],
                                                    args.ppl_max_tokens)
            print(lang, report["perplexity"][lang], flush=True)
    if "bfcl" not in skip:
        report["bfcl_live_simple"] = bfcl_live_simple(model, tok, fmt, args.data_dir / "raw/whl/bfcl_eval/data",
                                                      args.bfcl_limit, 96)
        print({k: v for k, v in report["bfcl_live_simple"].items() if k != "examples"}, flush=True)
    if "translation" not in skip:
        report["translation"] = translation(model, tok, fmt, args.data_dir / "sft/valid.jsonl", args.translation_limit)
        print({k: v["chrF"] for k, v in report["translation"].items()}, flush=True)
    if "samples" not in skip:
        report["samples"] = samples(model, tok, fmt, 48)
    report["eval_seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    print(json.dumps(report.get("samples", {}), ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
