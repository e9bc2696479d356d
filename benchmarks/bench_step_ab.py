"""A/B of one engine switch, alternated step by step inside one greedy generation: on these shared machines the
speed moves by +-20 % from one run to the next, never between two consecutive steps, so each configuration's mean
step is compared within the same run.

    python benchmarks/bench_step_ab.py --model CHECKPOINT [--dtype float32|bfloat16] [--quantization int4]
        --switch greedy|activations|gfni [--tokens 300] [--runs 4] [--threads 2]
    python benchmarks/bench_step_ab.py --q6k-head [--rounds 10]

--switch greedy: a greedy decode step by one call, embedding to argmax (DecodeStack.greedy), against the layers by
one call and the head, sampler and the rest in Python (the decode stack without its ends).
--switch activations: the integer kernels' activations "auto" against "int16" (on AVX-512, where the model's codes
are 4-bit, only the q6_K head differs: it takes int8 activations under auto).
--switch gfni: AVX-512's q6_K tiles with their codes assembled by shifts, against by GFNI (where the CPU has it).
--q6k-head: a 151552 x 1024 q6_K head from memory, one token: int16 and int8 activations, the codes assembled by
shifts and by GFNI (where the CPU has it), alternated call by call.

Prints each configuration's median step (or call) time and its speed against the first, per run.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _greedy(model, config: str) -> None:
    model.decode_layers_kernel.ends = config == "one call"  # without its ends the stack runs the layers only


def _activations(model, config: str) -> None:
    import torch

    torch.ops.glm4.set_activations(config)


def _gfni(model, config: str) -> None:
    import torch

    torch.ops.glm4.set_gfni(config == "GFNI")


SWITCHES = {  # name -> (configurations, the first the baseline; apply(the engine's model, configuration))
    "greedy": (["modules", "one call"], _greedy),
    "activations": (["int16", "auto"], _activations),
    "gfni": (["shifts", "GFNI"], _gfni),
}


def step_ab(llm, switch: str, tokens: int, runs: int) -> dict[str, list[float]]:
    """Mean step seconds of each configuration, per run (the first steps of a run left out)."""
    from glm4.engine import SamplingParams

    configs, apply = SWITCHES[switch]
    eng, model = llm.engine, llm.model
    if switch == "greedy" and getattr(model.decode_layers_kernel, "ends", None) is None:
        raise SystemExit("this model has no decode stack with its ends here: nothing to switch")
    out: dict[str, list[float]] = {c: [] for c in configs}
    for run in range(runs):
        eng.add_request(None, list(range(100 + run, 132 + run)),
                        SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        eng.step()  # the prompt
        per: dict[str, list[float]] = {c: [] for c in configs}
        i = 0
        while eng.has_unfinished_requests():
            c = configs[i % len(configs)]
            apply(model, c)
            t = time.perf_counter()
            eng.step()
            per[c].append(time.perf_counter() - t)
            i += 1
        for c in configs:
            out[c].append(statistics.mean(per[c][4:]))
    apply(model, configs[-1])
    return out


def q6k_head_ab(rounds: int) -> dict[str, list[float]]:
    """Seconds a call of a q6_K head from memory (median of 5 calls a round) for each activation path."""
    import torch

    from glm4.quant import kernels
    from glm4.quant.kquant import Q6_K, KQuantLinear

    V, H = 151552, 1024
    part = KQuantLinear.from_linear(torch.nn.Linear(H, 4096, bias=False))
    head = KQuantLinear(H, V, Q6_K)
    for i in range(0, V, 4096):  # 127 MB of blocks: far beyond the caches
        head.blocks[i:i + 4096] = part.blocks[:min(4096, V - i)]
    x = torch.randn(1, H)
    paths = {"int16 by shifts": (0, False), "int8 by shifts": (4, False)}
    if "gfni" in kernels.cpu_features():
        paths |= {"int16 by GFNI": (0, True), "int8 by GFNI": (4, True)}
    out: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(rounds + 1):  # the first warms up
        for p, (act_bits, gfni) in paths.items():
            torch.ops.glm4.set_gfni(gfni)
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                torch.ops.glm4.kquant_mm(x, head.blocks, H, Q6_K, act_bits)
                ts.append(time.perf_counter() - t)
            if r:
                out[p].append(statistics.median(ts))
    torch.ops.glm4.set_gfni(True)
    print(f"q6_K head {V} x {H}: {head.blocks.numel() / 1e6:.1f} MB of blocks; activations as `kquant_mm` takes them")
    return out


def report(times: dict[str, list[float]], unit: str, nbytes: int | None = None) -> None:
    names = list(times)
    for c in names:
        speed = [a / b for a, b in zip(times[names[0]], times[c])]
        rate = f"  {nbytes / statistics.median(times[c]) / 1e9:5.1f} GB/s" if nbytes else ""
        print(f"{c:16s} {1e6 * statistics.median(times[c]):8.0f} us {unit}{rate}  speed vs {names[0]}: "
              f"{statistics.median(speed):.3f} ({' '.join(f'{s:.3f}' for s in speed)})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder or GGUF file")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--switch", choices=sorted(SWITCHES))
    ap.add_argument("--tokens", type=int, default=300, help="tokens a run generates")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--q6k-head", action="store_true", help="the q6_K head's activation paths instead")
    ap.add_argument("--rounds", type=int, default=10, help="--q6k-head: alternated rounds")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from glm4.quant import kernels

    print(kernels.cpu_summary())
    if not kernels.has_streaming_kernels():
        raise SystemExit("glm4's CPU kernels are not built or do not run here")
    if a.q6k_head:
        report(q6k_head_ab(a.rounds), "a call", 151552 * 1024 // 256 * 210)
        return 0
    if not a.model or not a.switch:
        ap.error("--model and --switch (or --q6k-head)")
    from glm4.engine import LLM

    kw = {"dtype": a.dtype} | ({"quantization": a.quantization} if a.quantization else {})
    llm = LLM(a.model, num_threads=a.threads, seed=0, kv_cache_tokens=4096, **kw)
    print(f"{a.model} {kw}: {a.runs} runs of {a.tokens} tokens, configurations alternated step by step")
    report(step_ab(llm, a.switch, a.tokens, a.runs), "a step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
