"""GB/s streamed by each CPU linear kernel on GLM-4 shapes, kernels interleaved, best of N.

    python benchmarks/bench_kernels.py                      # M = 1, 8, 32 on the four GLM shapes
    python benchmarks/bench_kernels.py --m 1 8 32 128 512 --shapes qkv --write /tmp/kernels.md
    python benchmarks/bench_kernels.py --model /path/to/checkpoint   # greedy decode tokens/s per scheme
    python benchmarks/bench_kernels.py --sequence                    # a 400M model's linears from memory, per format

GB/s = bytes of the kernel's weight storage / time of one call (the weight is streamed once per call).
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from glm4.quant import PackedLinear, WeightOnlyInt4Linear, WeightOnlyInt8Linear

SHAPES = {  # name: (out_features N, in_features K)
    "qkv": (4608, 4096),
    "gate_up": (27392, 4096),
    "down": (4096, 13696),
    "lm_head": (151552, 1024),
}
KERNELS = ("F.linear fp32", "F.linear bf16", "packed fp32", "packed bf16", "int8", "int8 gemm", "int4 g32",
           "int4 g128", "int4 g128 gemm", "glm4 fp32", "glm4 bf16", "glm4 int8", "glm4 int6 g128", "glm4 int4 g32", "glm4 int4 g128")


@dataclass
class BenchArgs:
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    m: list[int] = field(default_factory=lambda: [1, 8, 32])
    kernels: list[str] = field(default_factory=lambda: list(KERNELS))
    repeat: int = 10
    write: str | None = None
    model: str | None = None
    schemes: list[str] = field(default_factory=lambda: ["none", "packed", "int8", "int4"])
    new_tokens: int = 32


def build(kernel: str, lin: nn.Linear) -> tuple[nn.Module, torch.dtype, int]:
    """(module, activation dtype, weight bytes streamed per call)."""
    n, k = lin.out_features, lin.in_features
    if kernel == "F.linear fp32":
        return lin, torch.float32, 4 * n * k
    if kernel == "F.linear bf16":
        return copy.deepcopy(lin).to(torch.bfloat16), torch.bfloat16, 2 * n * k
    if kernel.startswith("packed"):
        dt = torch.float32 if kernel.endswith("fp32") else torch.bfloat16
        return PackedLinear.from_base(lin, dt), dt, dt.itemsize * n * k
    if kernel.startswith("glm4"):  # glm4's own kernels (glm4/quant/csrc), fp32 activations
        from glm4.quant import FloatLinear, quant_linear

        kind = kernel.split()[1]
        if kind in ("fp32", "bf16", "fp16"):
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
            return FloatLinear.from_base(lin, dt), torch.float32, dt.itemsize * n * k
        m = quant_linear(lin, 8, 0) if kind == "int8" else quant_linear(lin, int(kind[3:]), int(kernel.split()[2][1:]))
        nbytes = sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.mins) if t is not None)
        return m, torch.float32, nbytes
    if kernel.startswith("int8"):
        m = WeightOnlyInt8Linear.from_base(lin)
        gemm = kernel.endswith("gemm")  # dequantize + fp32 GEMM path, fed fp32 as the model would
        m.max_kernel_m = 0 if gemm else 1 << 30
        return m, torch.float32 if gemm else torch.bfloat16, n * k + 2 * n
    if kernel.startswith("int4"):
        g = int(kernel.split()[1][1:])
        m = WeightOnlyInt4Linear.from_base(lin, g)
        gemm = kernel.endswith("gemm")  # unpack + dequantize + fp32 GEMM path, fed fp32 as the model would
        m.max_kernel_m = 0 if gemm else 1 << 30
        return m, torch.float32 if gemm else torch.bfloat16, n * k // 2 + 4 * n * k // g
    raise KeyError(kernel)


def bench_shape(name: str, args: BenchArgs) -> dict[tuple[str, int], float]:
    n, k = SHAPES[name]
    lin = nn.Linear(k, n, bias=False).requires_grad_(False)  # kaiming-uniform init: uniform rows, no outliers
    mods = {kern: build(kern, lin) for kern in args.kernels}
    xs = {m: torch.randn(m, k) for m in args.m}
    best: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for _ in range(args.repeat):  # interleave kernels so machine noise hits all of them alike
            for m in args.m:
                for kern, (mod, dt, _) in mods.items():
                    x = xs[m].to(dt)
                    if (kern, m) not in best:
                        mod(x)  # warm-up
                    t0 = time.perf_counter()
                    mod(x)
                    dt_s = time.perf_counter() - t0
                    best[(kern, m)] = min(best.get((kern, m), float("inf")), dt_s)
    gbs = {key: mods[key[0]][2] / t / 1e9 for key, t in best.items()}
    with torch.inference_mode():  # accuracy at M=8 against the fp32 weights: max|y - y_ref| / max|y_ref|
        x = torch.randn(8, k)
        ref = lin(x)
        for kern, (mod, dt, _) in mods.items():
            gbs[(kern, "err")] = ((mod(x.to(dt)).float() - ref).abs().max() / ref.abs().max()).item()
    del mods, lin
    gc.collect()
    return gbs


def table(results: dict[str, dict[tuple[str, int], float]], args: BenchArgs) -> str:
    cols = [(s, m) for s in results for m in args.m]
    head = "| kernel | " + " | ".join(f"{s} M={m}" for s, m in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for kern in args.kernels:
        lines.append(f"| {kern} | " + " | ".join(f"{results[s][(kern, m)]:.3g}" for s, m in cols) + " |")
    err = ["", "| kernel | " + " | ".join(f"{s} rel err" for s in results) + " |", "|" + "---|" * (len(results) + 1)]
    for kern in args.kernels:
        err.append(f"| {kern} | " + " | ".join(f"{results[s][(kern, 'err')]:.2g}" for s in results) + " |")
    return "\n".join(lines + err)


def bench_model(args: BenchArgs) -> str:
    """Greedy decode tokens/s of a checkpoint per scheme (reference generator, batch 1, 16-token prompt)."""
    from glm4.quant import quantize
    from glm4.reference import generate
    from glm4.weights import load_model

    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    lines = ["| scheme | decode tok/s | logits max rel err vs fp32 | same greedy tokens |", "|---|---|---|---|"]
    ref_out = ref_logits = None
    for scheme in args.schemes:
        model = load_model(args.model, progress=False).eval()
        t0 = time.perf_counter()
        quantize(model, None if scheme == "none" else scheme)
        t_q = time.perf_counter() - t0
        with torch.inference_mode():
            logits = model(ids).float()
            generate(model, ids, max_new_tokens=2)  # warm-up
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                out = generate(model, ids, max_new_tokens=args.new_tokens)
                best = min(best, time.perf_counter() - t0)
        if ref_out is None:
            ref_out, ref_logits = out, logits
        err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        same = int((out == ref_out).all(-1).sum())
        lines.append(f"| {scheme} | {args.new_tokens / best:.2f} | {err:.2g} | {'yes' if same else 'no'} |")
        print(lines[-1], f"(quantize {t_q:.1f}s)", flush=True)
        del model
        gc.collect()
    return "\n".join(lines)


# the ~400M GLM checkpoint of bench_llamacpp.py: its linears in decode order, 8 layers then the LM head
SEQUENCE = [("qkv", 1280, 1024), ("o", 1024, 1024), ("gate_up", 6144, 1024), ("down", 1024, 3072)]
SEQUENCE_FORMATS = ("fp32", "bf16", "int8", "int6", "int4")


def bench_sequence(formats: list[str], repeat: int = 6) -> str:
    """One token through every linear of the 400M model in turn (each a fresh matrix: weights come from memory, as
    in a decode step), glm4's kernels per format: time and GB/s, in all and per linear kind (best of `repeat`)."""
    from glm4.quant import FloatLinear, quant_linear

    def make(fmt: str, lin: nn.Linear) -> nn.Module:
        if fmt in ("fp32", "bf16"):
            return FloatLinear.from_base(lin, torch.float32 if fmt == "fp32" else torch.bfloat16)
        return quant_linear(lin, 8, 0) if fmt == "int8" else quant_linear(lin, int(fmt[3:]), 128)

    lines = ["| format | MB | ms a token | GB/s | " + " | ".join(f"{n} GB/s" for n, _, _ in SEQUENCE) + " | head GB/s |",
             "|---" * (len(SEQUENCE) + 5) + "|"]
    with torch.inference_mode():
        for fmt in formats:
            mods = [(n, make(fmt, nn.Linear(k, o, bias=False))) for _ in range(8) for n, o, k in SEQUENCE]
            mods.append(("head", make(fmt, nn.Linear(1024, 151552, bias=False))))
            xs = {k: torch.randn(1, k) for k in (1024, 3072)}
            nbytes: dict[str, int] = {}
            for n, m in mods:
                nbytes[n] = nbytes.get(n, 0) + sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
            best, best_per = float("inf"), {}
            for _ in range(repeat):
                per: dict[str, float] = {}
                t_all = time.perf_counter()
                for n, m in mods:
                    t = time.perf_counter()
                    m(xs[m.in_features])
                    per[n] = per.get(n, 0.0) + time.perf_counter() - t
                t_all = time.perf_counter() - t_all
                if t_all < best:
                    best, best_per = t_all, per
            total = sum(nbytes.values())
            lines.append(f"| {fmt} | {total / 1e6:.1f} | {best * 1e3:.2f} | {total / best / 1e9:.1f} | "
                         + " | ".join(f"{nbytes[n] / best_per[n] / 1e9:.1f}" for n in nbytes) + " |")
            print(lines[-1], flush=True)
            del mods
            gc.collect()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchArgs()
    p.add_argument("--shapes", nargs="+", default=d.shapes, choices=list(SHAPES))
    p.add_argument("--m", nargs="+", type=int, default=d.m)
    p.add_argument("--kernels", nargs="+", default=d.kernels, choices=list(KERNELS))
    p.add_argument("--repeat", type=int, default=d.repeat)
    p.add_argument("--write", default=None, help="also write the markdown table to this file")
    p.add_argument("--model", default=None, help="checkpoint folder: benchmark whole-model decode per scheme instead")
    p.add_argument("--schemes", nargs="+", default=d.schemes, choices=["none", "packed", "int8", "int4"])
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--sequence", nargs="*", default=None, choices=SEQUENCE_FORMATS,
                   help="the 400M model's linears from memory, one token, per format (all when none named)")
    ns = vars(p.parse_args(argv))
    sequence = ns.pop("sequence")
    args = BenchArgs(**ns)
    torch.manual_seed(0)
    if sequence is not None:
        print(bench_sequence(sequence or list(SEQUENCE_FORMATS)))
        return
    if args.model:
        print(bench_model(args))
        return
    results = {}
    for s in args.shapes:
        t0 = time.time()
        results[s] = bench_shape(s, args)
        print(f"# {s} {SHAPES[s]} done in {time.time() - t0:.0f}s", flush=True)
    md = table(results, args)
    env = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    print(f"GB/s of weight storage streamed per call (best of {args.repeat}); {env}\n\n{md}")
    if args.write:
        with open(args.write, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
