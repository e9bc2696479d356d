"""The fused small ops (glm4.quant.fused) on vs off, same checkpoint, same process, runs interleaved.

    python benchmarks/bench_fused.py --model CHECKPOINT [--format int4|int8|bf16|fp32] [--threads 1] [--batch 1,8]

Decode tok/s at each batch size with `fused_ops=False` and `True`, medians of --reps interleaved runs, as wall-clock
rates and as tokens per CPU-second of the calling thread (`time.thread_time`; with --threads 1 that is every
cycle the step used, and it is what stays comparable on a machine shared with other work), plus the torch calls
per decode step counted by the profiler.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

FORMATS = {"fp32": dict(dtype="float32"), "bf16": dict(dtype="bfloat16"),
           "int8": dict(dtype="float32", quantization="int8"), "int4": dict(dtype="float32", quantization="int4")}


def decode(engine, batch: int, new_tokens: int, prompt_len: int = 32) -> tuple[float, float]:
    """(tok/s wall, tok per thread-CPU-second) of one decode of `batch` prompts, after their prefill step."""
    from glm4.engine import SamplingParams

    for i in range(batch):
        engine.add_request(None, list(range(100 + i, 100 + i + prompt_len)),
                           SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    engine.step()
    wall, cpu, steps = time.perf_counter(), time.thread_time(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return batch * steps / (time.perf_counter() - wall), batch * steps / (time.thread_time() - cpu)


def ops_per_step(engine, steps: int = 16) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(engine, 1, steps + 1)
    return sum(e.count for e in prof.key_averages()) / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--format", default="int4", choices=sorted(FORMATS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from glm4.engine import LLM
    from glm4.quant import kernels

    print(f"CPU: {kernels.cpu_summary()}; {args.threads} thread(s); {args.format}")
    llms = {on: LLM(args.model, num_threads=args.threads, seed=0, kv_cache_tokens=4096, max_num_seqs=16,
                    fused_ops=on, **FORMATS[args.format]) for on in (False, True)}
    for on, llm in llms.items():
        decode(llm.engine, 1, 4)  # warm-up
        print(f"fused_ops={on}: {ops_per_step(llm.engine):.0f} torch calls per batch-1 decode step")
    for b in (int(x) for x in args.batch.split(",")):
        runs: dict[bool, list[tuple[float, float]]] = {on: [] for on in llms}
        for _ in range(args.reps):
            for on, llm in llms.items():
                runs[on].append(decode(llm.engine, b, args.tokens))
        wall = {on: statistics.median(r[0] for r in rs) for on, rs in runs.items()}
        cpu = {on: statistics.median(r[1] for r in rs) for on, rs in runs.items()}
        print(f"batch {b}: wall tok/s {wall[False]:.1f} -> {wall[True]:.1f} ({wall[True] / wall[False]:.2f}x); "
              f"tok per CPU-s {cpu[False]:.1f} -> {cpu[True]:.1f} ({cpu[True] / cpu[False]:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
