"""Decode attention at long contexts: glm4's fused kernel (torch.ops.glm4.decode_attention) against gather + SDPA
(what the engine ran above 512 keys before), one sequence, per layer call, cache-hot and cold (after reading
256 MiB, as a decode step's weight streaming leaves the cache), fp32 or a bf16 cache under fp32 activations.

    python benchmarks/bench_decode_attention.py [--heads 16,2,64] [--keys 512,2048,4096,8192] [--threads 2]
        [--cache-dtype float32|bfloat16]

Prints µs per call (median) and the GB/s of keys and values read; the outputs of the two are compared (max |diff|).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="16,2,64", help="query heads, KV heads, head dim (32,2,128: GLM-4-9B)")
    ap.add_argument("--keys", default="512,2048,4096,8192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from glm4.quant import fused, kernels

    if not fused.have_fused_ops():
        print("glm4's fused ops do not run here (no AVX2 + FMA, or the extension is not built)")
        return 1
    torch.set_num_threads(a.threads)
    Hq, Hkv, D = (int(x) for x in a.heads.split(","))
    bs, slots = 16, 16384
    cache_dtype = getattr(torch, a.cache_dtype)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(slots, Hkv, D, generator=g).to(cache_dtype) for _ in range(2))
    flush = torch.ones(64 << 20)  # 256 MiB read between cold calls
    print(kernels.cpu_summary())
    print(f"heads {Hq} / {Hkv} x {D}, cache {a.cache_dtype}, {a.threads} threads; us per call, median of {a.reps}")
    print(f"{'keys':>6} {'fused hot':>10} {'fused cold':>11} {'GB/s cold':>10} {'gather+SDPA hot':>16} {'cold':>8} {'max diff':>9}")
    for L in (int(x) for x in a.keys.split(",")):
        q = torch.randn(1, Hq, D, generator=g)
        nb = (L + bs - 1) // bs
        table = torch.randperm(slots // bs, generator=g)[:nb].unsqueeze(0)  # blocks scattered, as a paged cache
        lens = torch.tensor([L])
        pos = torch.arange(L)
        rows = table[0, pos // bs] * bs + pos % bs

        def kernel(q=q, table=table, lens=lens):
            return fused.decode_attention(q, k, v, table, lens, bs)

        def sdpa(q=q, rows=rows, L=L):
            ks, vs = (t.index_select(0, rows).float().view(1, L, Hkv, D).transpose(1, 2) for t in (k, v))
            return F.scaled_dot_product_attention(q.view(1, Hkv, Hq // Hkv, D), ks, vs).reshape(1, Hq, D)

        res = {}
        for name, f in (("fused", kernel), ("sdpa", sdpa)):
            hot, cold = [], []
            for _ in range(a.reps):
                flush.sum()
                t = time.perf_counter()
                f()
                cold.append(time.perf_counter() - t)
                t = time.perf_counter()
                f()
                hot.append(time.perf_counter() - t)
            res[name] = statistics.median(hot) * 1e6, statistics.median(cold) * 1e6
        diff = (kernel() - sdpa()).abs().max().item()
        kv_bytes = 2 * L * Hkv * D * k.element_size()
        print(f"{L:>6} {res['fused'][0]:>10.1f} {res['fused'][1]:>11.1f} {kv_bytes / res['fused'][1] / 1e3:>10.1f} "
              f"{res['sdpa'][0]:>16.1f} {res['sdpa'][1]:>8.1f} {diff:>9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
