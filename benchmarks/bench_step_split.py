"""Where a batch-1 decode step's time goes: the decoder layers (one DecodeStack call with glm4's kernels), the output
head, the token embedding, the RoPE rows, and everything else (the engine's Python and torch calls around them:
scheduling, the step's tensors, sampling), per step, as the engine runs it. And the cost of a step's weight stream
to that Python: one embedding lookup timed right after streaming `--stream-mib` of bf16 weights (which leaves
L2 / L3 holding weights) and again at once (caches warm).

    python benchmarks/bench_step_split.py --model CHECKPOINT [--dtype float32|bfloat16] [--quantization int4]
        [--tokens 128] [--reps 4] [--threads 2] [--stream-mib 48]

Prints µs per step for each part (median over --reps runs of --tokens tokens) and the two lookup times. The timers
wrap the decode stack, so a greedy step runs the layers by one call and the rest in Python, as before the whole
step went into one call (DecodeStack.greedy: `bench_step_ab.py --switch greedy` compares the two).
"""

from __future__ import annotations

import argparse
import statistics
import time


class Timers:
    """Wraps callables on objects (instance attributes): seconds spent in each, by name."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    def wrap(self, obj, attr: str, name: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t

        setattr(obj, attr, timed)


def step_split(llm, tokens: int, reps: int) -> dict[str, float]:
    """Median µs per decode step of each part over `reps` runs of one greedy sequence of `tokens` tokens."""
    from glm4.engine import SamplingParams

    eng, model = llm.engine, llm.model
    if model.decode_layers_kernel is None:
        raise SystemExit("this model runs its layers module by module (no decode stack): nothing to split")
    timers = Timers()
    timers.wrap(model, "decode_layers_kernel", "layers")
    timers.wrap(model.get_output_embeddings(), "forward", "head")
    timers.wrap(model.get_input_embeddings(), "forward", "embedding")
    timers.wrap(model.rope, "cos_sin", "rope rows")
    timers.wrap(eng, "step", "step")
    runs: dict[str, list[float]] = {}
    for rep in range(reps + 1):  # the first warms up
        eng.add_request(None, [100 + rep, 200, 300, 400], SamplingParams(max_tokens=tokens + 1, temperature=0,
                                                                        ignore_eos=True))
        eng.step()  # the prompt
        timers.spent.clear()
        steps = 0
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
        if rep:
            per = {k: 1e6 * v / steps for k, v in timers.spent.items()}
            per["rest"] = per["step"] - sum(v for k, v in per.items() if k != "step")
            for k, v in per.items():
                runs.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in runs.items()}


def cold_lookup(stream_mib: int, reps: int = 100) -> tuple[float, float]:
    """µs of an embedding lookup right after streaming `stream_mib` MiB of bf16 weights, and of the next one."""
    import torch

    from glm4.quant import kernels

    emb = torch.nn.Embedding(151552, 1024)
    rows = stream_mib * 2**20 // 2048
    weights = [torch.randn(rows, 1024).to(torch.bfloat16) for _ in range(3)]
    x, ids = torch.randn(1, 1024), torch.tensor([[7]])
    xb = x.to(torch.bfloat16)  # torch's matmul takes one dtype (without glm4's kernels)
    stream = (lambda w: kernels.dense_mm(x, w)) if kernels.has_streaming_kernels() else (lambda w: xb @ w.T)
    after, warm = [], []
    for i in range(reps):
        stream(weights[i % 3])
        for out in (after, warm):
            t = time.perf_counter()
            emb(ids)
            out.append(1e6 * (time.perf_counter() - t))
    return statistics.median(after), statistics.median(warm)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantization", default=None, choices=["int8", "int6", "int4"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stream-mib", type=int, default=48, help="0 skips the lookup after a weight stream")
    a = ap.parse_args(argv)

    import torch

    from glm4.engine import LLM
    from glm4.quant import kernels

    torch.set_num_threads(a.threads)
    llm = LLM(a.model, dtype=a.dtype, quantization=a.quantization, num_threads=a.threads, seed=0,
              kv_cache_tokens=4096, max_num_seqs=4)
    split = step_split(llm, a.tokens, a.reps)
    print(f"CPU: {kernels.cpu_summary()}; {a.threads} threads; {a.model} {a.dtype} {a.quantization or ''}")
    print(f"batch-1 decode step, µs (median of {a.reps} x {a.tokens} tokens): {1e6 / split['step']:.1f} tok/s")
    for name in ("layers", "head", "embedding", "rope rows", "rest", "step"):
        print(f"  {name:<10} {split[name]:8.0f}  {100 * split[name] / split['step']:5.1f} %")
    if a.stream_mib:
        after, warm = cold_lookup(a.stream_mib)
        print(f"embedding lookup after streaming {a.stream_mib} MiB of weights: {after:.1f} µs; at once again: "
              f"{warm:.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
