"""The engine's resident memory under varied batch shapes, without the server: what grows, and what bounds it.

    python benchmarks/engine_rss.py                      # 60 rounds of random batches on the shipped model
    python benchmarks/engine_rss.py --exact-gemm         # oneDNN sees every row count (before the bucketing)
    python benchmarks/engine_rss.py --trim               # malloc_trim(0) after each round: what glibc gives back
    python benchmarks/engine_rss.py --ideep-cache 1 --onednn-cache 0   # both primitive caches (almost) off

Each round generates for 1-64 random token prompts of 3-300 tokens and 4-48 new tokens (ignore_eos), so steps
run every batch size the engine's scheduler can form. Per round it prints the wall time, RSS (/proc/self/statm)
and glibc's view of the heap (mallinfo2: bytes in use vs free inside the arenas); at the end the RSS after the
first sixth of the rounds against the last, and `--passes 2` repeats the same rounds (every primitive already
built: the steady-state speed). Numbers on the shipped model: docs/benchmarks.md, "Server soak and faults".
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import time


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--passes", type=int, default=1, help="run the same rounds this many times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (`glm4 serve` uses 1 on 2 cores)")
    ap.add_argument("--exact-gemm", action="store_true", help="no row bucketing: one oneDNN shape per row count")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after each round and print what it freed")
    ap.add_argument("--commit-kv", action="store_true", help="write the whole KV cache first, as `glm4 serve` does")
    ap.add_argument("--onednn-cache", type=int, default=None, help="ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    ap.add_argument("--ideep-cache", type=int, default=None, help="LRU_CACHE_CAPACITY (torch's ideep layer; >= 1)")
    a = ap.parse_args(argv)
    if a.onednn_cache is not None:  # both read when the first primitive is built
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(a.onednn_cache)
    if a.ideep_cache is not None:
        os.environ["LRU_CACHE_CAPACITY"] = str(max(1, a.ideep_cache))

    import glm4
    from glm4.quant import kernels

    if a.exact_gemm:
        kernels.gemm_rows = lambda m: m
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    llm = glm4.LLM(a.model, num_threads=a.threads)
    if a.commit_kv:
        llm.engine.runner.commit_kv_cache()
    print(f"loaded: RSS {rss_mb():.0f} MB", flush=True)
    marks = []
    for p in range(a.passes):
        rng = random.Random(a.seed)
        t_pass = time.perf_counter()
        for r in range(a.rounds):
            n = rng.randint(1, 64)
            prompts = [[rng.randrange(100, 8000) for _ in range(rng.randint(3, 300))] for _ in range(n)]
            params = glm4.SamplingParams(max_tokens=rng.randint(4, 48), temperature=1.0, ignore_eos=True, seed=r)
            t = time.perf_counter()
            llm.generate(prompts, params)
            dt, rss = time.perf_counter() - t, rss_mb()
            mi = libc.mallinfo2()
            line = (f"pass {p} round {r:3d}: {n:2d} prompts {dt:6.2f} s  RSS {rss:6.1f} MB  heap in use "
                    f"{mi.uordblks / 2**20:6.1f} MB, free {mi.fordblks / 2**20:5.1f} MB")
            if a.trim:
                libc.malloc_trim(0)
                line += f"  trim -> RSS {rss_mb():6.1f} MB"
            print(line, flush=True)
            if r == max(0, a.rounds // 6 - 1):
                marks.append(rss)
        print(f"pass {p}: {time.perf_counter() - t_pass:.1f} s; RSS after round {a.rounds // 6}: {marks[-1]:.0f} MB, "
              f"end {rss_mb():.0f} MB ({(rss_mb() / marks[-1] - 1) * 100:+.1f} %)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
