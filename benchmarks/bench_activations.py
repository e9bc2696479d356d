"""Exact vs int16 activations in glm4's integer kernels, alternated in one process, one token a call, weights cold.

    python benchmarks/bench_activations.py                    # 2 threads, the 697M MoE's decode shapes, int4 g128
    python benchmarks/bench_activations.py --threads 1 --scheme int8 --isa avx2

Decode streams each weight from memory once per token, so every call here reads weights that are out of cache:
per round, `--layers` MoE layers (expert_glu: 8 of 64 experts, gate_up [512, 1024] and down [1024, 256]) and 24 sets
of the attention / shared-expert linears ([1280, 1024], [1024, 1024], [512, 1024], [1024, 256]). The two modes
alternate round by round (torch.ops.glm4.set_activations), so the machine's drift hits both alike; medians of
microseconds per MoE layer and per set of four linears.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from glm4.quant import kernels, quantize
from glm4.quant.experts import ExpertPack

EXPERTS, HIDDEN, INTER, TOP_K = 64, 1024, 256, 8
LINEARS = ((1280, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER))  # [out, in]


def quant_linear(n: int, k: int, scheme: str):
    lin = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
    quantize(lin, scheme, group_size=128, head=None)
    m = lin[0]
    m.scales = m.scales.half()  # one scale dtype for every expert of a pack (quantize keeps fp32 where fp16 underflows)
    m.mins = None if m.mins is None else m.mins.half()
    return m


def measure(threads: int = 2, scheme: str = "int4", layers: int = 7, rounds: int = 15, isa: str | None = None) -> dict:
    torch.set_num_threads(threads)
    if isa:
        torch.ops.glm4.set_isa(isa)
    moe = [(ExpertPack.stack([quant_linear(2 * INTER, HIDDEN, scheme) for _ in range(EXPERTS)]),
            ExpertPack.stack([quant_linear(HIDDEN, INTER, scheme) for _ in range(EXPERTS)])) for _ in range(layers)]
    sets = [[quant_linear(n, k, scheme) for n, k in LINEARS] for _ in range(24)]
    g = torch.Generator().manual_seed(0)
    routes = [(torch.randperm(EXPERTS, generator=g)[:TOP_K].view(1, TOP_K), torch.rand(1, TOP_K, generator=g))
              for _ in range(97)]
    x, xi = torch.randn(1, HIDDEN, generator=g), torch.randn(1, INTER, generator=g)
    step = [0]

    def moe_layers():
        for gu, dn in moe:
            step[0] += 1
            idx, w = routes[step[0] % len(routes)]
            kernels.ops.expert_glu(x, idx, w, gu.qweight, gu.scales, gu.mins, gu.bits, gu.group_size, gu.zero_point,
                                   dn.qweight, dn.scales, dn.mins, dn.bits, dn.group_size, dn.zero_point)

    def linears():
        for ms in sets:
            for m in ms:
                kernels.quant_mm(xi if m.in_features == INTER else x, m)

    times: dict[tuple[str, str], list[float]] = {}
    before = torch.ops.glm4.activations()
    try:
        for _ in range(rounds):
            for mode in ("exact", "int16"):
                torch.ops.glm4.set_activations(mode)
                for name, f, per in (("MoE layer", moe_layers, layers), ("4 linears", linears, len(sets))):
                    f()
                    t = time.perf_counter()
                    f()
                    f()
                    times.setdefault((name, mode), []).append((time.perf_counter() - t) / 2 / per * 1e6)
    finally:
        torch.ops.glm4.set_activations(before)
    return {f"{name} {mode}": statistics.median(v) for (name, mode), v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scheme", default="int4", choices=["int4", "int6", "int8"])
    ap.add_argument("--layers", type=int, default=7, help="MoE layers per round (7 x 3.2 MB of experts: out of L3)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--isa", default=None, choices=["avx2", "avx512_vnni"], help="narrow the kernel set")
    a = ap.parse_args(argv)
    if not kernels.has_streaming_kernels():
        raise SystemExit("glm4's kernels are not built here (pip install -e .) or the CPU lacks AVX2")
    res = measure(a.threads, a.scheme, a.layers, a.rounds, a.isa)
    print(f"{kernels.cpu_summary()}, {a.threads} threads, {a.scheme} g128, kernels {torch.ops.glm4.isa()}")
    for name in ("MoE layer", "4 linears"):
        e, i = res[f"{name} exact"], res[f"{name} int16"]
        print(f"{name:10s} exact {e:7.1f} us   int16 {i:7.1f} us   exact / int16 {e / i:.2f}")


if __name__ == "__main__":
    main()
