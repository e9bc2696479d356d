"""What each inference-time module swap of `glm4.LLM` buys: q/k/v + gate/up fusion, the `linear="auto"` packing
threshold, torch.compile; plus the per-shape F.linear vs prepacked oneDNN timings behind the threshold.

    python benchmarks/bench_swaps.py                          # the shipped default model
    python benchmarks/bench_swaps.py --model /tmp/glm-400m --tokens 32
    python benchmarks/bench_swaps.py --shapes-only

Results: docs/benchmarks.md, "Inference-time swaps".
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

CONFIGS = [{"fuse_projections": False, "linear": "packed"}, {"linear": "packed"}, {}, {"linear": "torch"},
           {"linear": "torch", "compile": True}]
SHAPES = [(1024, 192), (8192, 192), (1280, 1024), (3072, 1024), (6144, 1024), (151552, 1024)]


def engine_rates(model: str | None, kw: dict, tokens: int, repeats: int) -> tuple[float, float, float]:
    import glm4

    p = glm4.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    llm = glm4.LLM(model, **kw)
    llm.generate([[5, 6, 7]] * 8, p)  # warm-up (and compilation)
    warm = time.perf_counter() - t0
    b1, b8 = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate([[5, 6, 7]], p)
        b1.append(tokens / (time.perf_counter() - t))
        t = time.perf_counter()
        llm.generate([[5, 6, 7]] * 8, p)
        b8.append(8 * tokens / (time.perf_counter() - t))
    return warm, max(b1), max(b8)


def linear_us(n: int, k: int, m: int, dtype: torch.dtype) -> tuple[float, float]:
    from glm4.quant.fast_linear import PackedLinear

    lin = torch.nn.Linear(k, n, bias=False).to(dtype)
    packed = PackedLinear.from_base(lin)
    x = torch.randn(1, m, k, dtype=dtype)
    out = []
    for f in (lambda: F.linear(x, lin.weight), lambda: packed(x)):
        for _ in range(3):
            f()
        reps = min(2000, max(3, int(2e8 / (n * k * x.element_size()))))
        t = time.perf_counter()
        for _ in range(reps):
            f()
        out.append((time.perf_counter() - t) / reps * 1e6)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes-only", action="store_true")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="torch.compile failed")
    if not a.shapes_only:
        for kw in CONFIGS:
            warm, b1, b8 = engine_rates(a.model, kw, a.tokens, a.repeats)
            print(f"{kw!s:55} load+warm-up {warm:5.1f} s  decode b1 {b1:7.1f} tok/s  b8 {b8:7.1f} tok/s", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in SHAPES:
            cells = [f"M={m}: " + " / ".join(f"{v:.0f}" for v in linear_us(n, k, m, dtype)) for m in (1, 8)]
            print(f"{str(dtype)[6:]:8} {n}x{k}: F.linear / packed us  " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
