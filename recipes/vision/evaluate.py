"""Exact-answer accuracy of a vision checkpoint on the easy-vqa test set, in English and Chinese, through chat.

    python recipes/vision/evaluate.py --model glm4/assets/vision --data-dir data/vision --out runs/vision/eval.json

Each test question is one user turn (the picture, then the question) rendered by the checkpoint's chat format; the
engine generates greedily (at most 8 tokens, batched) and the chat format's parser gives the reply's content; a
question counts as right when the content, stripped, equals the answer string. The majority-answer baseline
(always "yes" / "是") is reported beside it. `--check-chat N` also asks the first N questions one at a time through
`LLM.chat` and counts the replies that differ from the batched path: the same prompt and picture, but bf16
activations (on CPUs with bf16 arithmetic) round differently in a batch of 256 than alone, so a near tie can flip.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path


def load_questions(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if limit:
        by_lang = collections.defaultdict(list)
        for r in rows:
            by_lang[r["lang"]].append(r)
        rows = [r for v in by_lang.values() for r in v[:limit]]
    return rows


def answer_all(llm, fmt, rows: list[dict], batch: int = 256) -> list[str]:
    """Greedy replies' content for every row, through the chat format (rendered and parsed) and the engine."""
    from glm4.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8)
    out: list[str] = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [fmt.encode(llm.tokenizer, [{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": r["question"]}]}],
                              add_generation_prompt=True) for r in chunk]
        res = llm.generate(prompts, params, [{"image": r["image"]} for r in chunk])
        out += [(fmt.parse(o.outputs[0].text).content or "").strip() for o in res]
    return out


def chat_reply(llm, row: dict) -> str:
    from glm4.engine.sampling_params import SamplingParams

    r = llm.chat([{"role": "user", "content": [{"type": "image", "image": row["image"]},
                                               {"type": "text", "text": row["question"]}]}],
                 params=SamplingParams(temperature=0.0, max_tokens=8))
    return (r.content or "").strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="glm4/assets/vision")
    ap.add_argument("--data-dir", default="data/vision")
    ap.add_argument("--out", default="runs/vision/eval.json")
    ap.add_argument("--limit", type=int, default=None, help="first N questions per language (default: all)")
    ap.add_argument("--check-chat", type=int, default=20)
    a = ap.parse_args(argv)
    from glm4.chat import ChatFormat
    from glm4.engine.llm import LLM

    rows = load_questions(Path(a.data_dir) / "test.jsonl", a.limit)
    llm = LLM(a.model, max_num_seqs=256)
    fmt = ChatFormat.for_checkpoint(a.model)
    t0 = time.perf_counter()
    replies = answer_all(llm, fmt, rows)
    secs = time.perf_counter() - t0
    result: dict = {"model": a.model, "seconds": round(secs, 1)}
    for lang in ("en", "zh"):
        pairs = [(r, y) for r, y in zip(rows, replies) if r["lang"] == lang]
        answers = collections.Counter(r["answer"] for r, _ in pairs)
        majority, n_major = answers.most_common(1)[0]
        wrong = collections.Counter((r["answer"], y) for r, y in pairs if y != r["answer"])
        result[lang] = {"questions": len(pairs), "accuracy": sum(y == r["answer"] for r, y in pairs) / len(pairs),
                        "majority_answer": majority, "majority_baseline": n_major / len(pairs),
                        "top_confusions": [f"{a!r} -> {b!r}: {n}" for (a, b), n in wrong.most_common(8)]}
    n = min(a.check_chat, len(rows))
    result["chat_path_mismatches"] = sum(chat_reply(llm, r) != y for r, y in zip(rows[:n], replies[:n]))
    result["chat_path_checked"] = n
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
