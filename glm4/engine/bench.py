"""`glm4 bench --model PATH`: engine speed, side by side with HF transformers on the same checkpoint.

Measures prefill tok/s (one 512-token prompt), decode tok/s at batch 1 and 8, and 32 concurrent requests
of mixed prompt/output lengths (throughput, TTFT and inter-token latency p50/p99), plus peak memory.
transformers is optional: without it (or with --no-hf) only the engine runs. Prompts are random token
ids, so no tokenizer is needed and the prefix cache never hits. Engine and transformers repeats
alternate and the best of each is kept (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import torch

ROOFLINE_GBS = 45.0  # two-thread read bandwidth measured on these machines (issue 4)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    lo, hi = (1000, 150000) if vocab > 150000 else (0, vocab)  # the GLM vocab's ordinary (non-special) ids
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


def _workload(rng: random.Random, n: int, vocab: int, max_prompt: int, max_out: int) -> list[tuple[list[int], int]]:
    """`n` requests: prompt lengths uniform in [16, max_prompt], output lengths uniform in [16, max_out]."""
    return [(_prompts(rng, 1, rng.randint(min(16, max_prompt), max_prompt), vocab)[0],
             rng.randint(min(16, max_out), max_out)) for _ in range(n)]


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a batch-1 decode step streams: every weight except the embedding table (only a row is read) unless
    the output head is that table (tied); of stacked MoE experts [E, ...] only the top-k active ones."""
    tensors = lambda m: list(m.parameters()) + list(m.buffers())  # noqa: E731
    head = model.get_output_embeddings()
    cfg = model.config
    E, k = getattr(cfg, "n_routed_experts", 0), getattr(cfg, "num_experts_per_tok", 0)
    seen = {t.data_ptr() for t in tensors(model.get_input_embeddings())} - {t.data_ptr() for t in tensors(head)}
    total = 0
    for t in tensors(model):
        if t.data_ptr() in seen or t.dim() < 2:
            continue
        seen.add(t.data_ptr())
        frac = k / E if E and t.dim() >= 3 and t.shape[0] == E else 1.0
        total += int(t.numel() * t.element_size() * frac)
    for m in model.modules():  # oneDNN-packed weights are opaque attributes, not parameters
        packed = getattr(m, "packed", None)
        if isinstance(packed, torch.Tensor):
            total += m.in_features * m.out_features * torch.empty((), dtype=m.dtype).element_size()
    return total


# ---- the two contenders ------------------------------------------------------------------------------
# Both stay loaded and their repeats alternate, so load from other processes on a shared machine hits them
# alike; each figure is the best of its repeats.

class EngineSide:
    name = "engine"

    def __init__(self, a):
        from glm4.engine import LLM, SamplingParams

        self.SP = SamplingParams
        t0 = time.perf_counter()
        self.llm = LLM(a.model, dtype=a.dtype, linear=a.linear, quantization=a.quantization,
                       fuse_projections=not a.no_fuse, kv_cache_tokens=a.kv_cache_tokens,
                       kv_cache_dtype=a.kv_cache_dtype,
                       max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=max(64, a.requests), seed=0)
        self.eng = self.llm.engine
        self.load_s = time.perf_counter() - t0
        self.llm.generate([list(range(1, 65))], self.SP(max_tokens=2, temperature=0, ignore_eos=True))

    def prefill(self, prompt: list[int]) -> float:
        t = time.perf_counter()
        self.llm.generate([prompt], self.SP(max_tokens=1, temperature=0, ignore_eos=True))
        return time.perf_counter() - t

    def decode(self, prompts: list[list[int]], n: int) -> float:
        """tok/s over the steps after the first (which prefills every prompt at once)."""
        params = self.SP(max_tokens=n, temperature=0, ignore_eos=True)
        for p in prompts:
            self.eng.add_request(None, p, params)
        self.eng.step()
        t, steps = time.perf_counter(), 0
        while self.eng.has_unfinished_requests():
            self.eng.step()
            steps += 1
        return len(prompts) * steps / (time.perf_counter() - t)

    def concurrent(self, workload) -> dict:
        eng, stamps = self.eng, {}
        t0 = time.perf_counter()
        for p, n in workload:
            stamps[eng.add_request(None, p, self.SP(max_tokens=n, temperature=0, ignore_eos=True))] = []
        gen = 0
        while eng.has_unfinished_requests():
            for out in eng.step():
                now = time.perf_counter()
                k = len(out.outputs[0].delta_token_ids)
                gen += k
                stamps[out.request_id] += [now] * k
        wall = time.perf_counter() - t0
        ttft = [s[0] - t0 for s in stamps.values()]
        itl = [b - a_ for s in stamps.values() for a_, b in zip(s, s[1:])]
        return {"concurrent_requests": len(workload), "concurrent_wall_s": wall, "concurrent_gen_tok_s": gen / wall,
                "concurrent_total_tok_s": (gen + sum(len(p) for p, _ in workload)) / wall,
                "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
                "itl_p50_ms": 1e3 * _pct(itl, 50), "itl_p99_ms": 1e3 * _pct(itl, 99),
                "preemptions": eng.scheduler.num_preemptions}


class HFSide:
    name = "hf"

    def __init__(self, a):
        import transformers

        from glm4.weights import resolve_dtype

        t0 = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            a.model, dtype="auto" if a.dtype == "auto" else resolve_dtype(a.dtype)).eval()
        self.load_s = time.perf_counter() - t0
        pad = self.model.config.pad_token_id
        self.pad = pad if pad is not None else 0
        self.gen(torch.tensor([list(range(1, 65))]), 2)

    def gen(self, ids, n, mask=None):
        mask = torch.ones_like(ids) if mask is None else mask
        with torch.inference_mode():
            return self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=self.pad)

    def prefill(self, prompt: list[int]) -> float:
        t = time.perf_counter()
        self.gen(torch.tensor([prompt]), 1)
        return time.perf_counter() - t

    def decode(self, prompts: list[list[int]], n: int) -> float:
        """tok/s of generate(n) minus generate(1) (the prefill and first token)."""
        ids = torch.tensor(prompts)
        t = time.perf_counter()
        self.gen(ids, 1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        self.gen(ids, n)
        return len(prompts) * (n - 1) / max(time.perf_counter() - t - t1, 1e-9)

    def concurrent(self, workload) -> dict:
        # one padded batch generate: every row runs to the longest output
        T = max(len(p) for p, _ in workload)
        ids = torch.tensor([[self.pad] * (T - len(p)) + p for p, _ in workload])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p, _ in workload])
        t = time.perf_counter()
        self.gen(ids, 1, mask)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        self.gen(ids, max(n for _, n in workload), mask)
        wall = time.perf_counter() - t
        return {"ttft_s": ttft, "concurrent_wall_s": wall, "concurrent_gen_tok_s": sum(n for _, n in workload) / wall}


def run_all(a, prompts512, decode_prompts, workload) -> dict:
    eng = EngineSide(a)
    res = {"engine": {"load_s": eng.load_s, "kv_cache_tokens": eng.eng.num_kv_tokens, "describe": eng.llm.describe(),
                      "weight_bytes_per_token": weight_bytes_per_token(eng.llm.model)}}
    print(f"[engine] loaded in {eng.load_s:.1f}s\n{eng.llm.describe()}", flush=True)
    # the engine's concurrent run first, so its peak memory is measured before transformers loads
    res["engine"].update(eng.concurrent(workload))
    res["engine"]["peak_rss_mib"] = _rss_mib()
    e = res["engine"]
    print(f"[engine] {len(workload)} requests: {e['concurrent_gen_tok_s']:.1f} gen tok/s, TTFT p50 "
          f"{e['ttft_p50_s']:.2f}s p99 {e['ttft_p99_s']:.2f}s, ITL p50 {e['itl_p50_ms']:.0f}ms p99 "
          f"{e['itl_p99_ms']:.0f}ms", flush=True)
    sides = [eng]
    if not a.no_hf:
        try:
            sides.append(HFSide(a))
            res["hf"] = {"load_s": sides[1].load_s}
        except ImportError:
            print("[hf] transformers is not installed: skipping the comparison", flush=True)
    if len(sides) > 1:  # right after the engine's run, under the same machine load
        res["hf"].update(sides[1].concurrent(workload))
        res["hf"]["peak_rss_mib"] = _rss_mib()
        h = res["hf"]
        print(f"[hf] {len(workload)} requests padded: {h['concurrent_gen_tok_s']:.1f} useful gen tok/s, "
              f"TTFT {h['ttft_s']:.1f}s", flush=True)
    for side in sides:
        res.setdefault(side.name, {})["prefill_s"] = []
    for r in range(a.repeats):  # prefill, alternating
        for side in sides:
            res[side.name]["prefill_s"].append(side.prefill(prompts512[r]))
    for side in sides:
        d = res[side.name]
        d["prefill_tok_s"] = a.prompt_len / min(d["prefill_s"])
        print(f"[{side.name}] prefill {d['prefill_tok_s']:.0f} tok/s", flush=True)
    for b in a.batch:
        rates = {side.name: [] for side in sides}
        for _ in range(a.repeats):
            for side in sides:
                rates[side.name].append(side.decode(decode_prompts[:b], a.decode_tokens))
        for side in sides:
            res[side.name][f"decode_b{b}_tok_s"] = max(rates[side.name])
            print(f"[{side.name}] decode batch {b}: {max(rates[side.name]):.1f} tok/s", flush=True)
    b1 = e.get("decode_b1_tok_s")
    if b1:
        e["decode_b1_gb_s"] = b1 * e["weight_bytes_per_token"] / 1e9
        e["roofline_fraction"] = e["decode_b1_gb_s"] / ROOFLINE_GBS
    return res


def report(res: dict) -> str:
    e, h = res["engine"], res.get("hf")
    rows = [("prefill tok/s (512-token prompt)", "prefill_tok_s")]
    rows += [(f"decode tok/s, batch {b}", f"decode_b{b}_tok_s") for b in res["args"]["batch"]]
    rows += [(f"{e['concurrent_requests']} mixed requests, generated tok/s", "concurrent_gen_tok_s")]
    q = res["args"].get("quantization")
    lines = [f"model {res['args']['model']}  dtype {res['args']['dtype']}" + (f"  engine weights {q}" if q else "") +
             f"  threads {res['threads']}",
             f"{'':44} {'glm4':>10} {'HF':>10} {'ratio':>7}"]
    for name, k in rows:
        hv = h.get(k) if h else None
        ratio = f"{e[k] / hv:6.2f}x" if hv else ""
        lines.append(f"{name:44} {e[k]:10.1f} {hv if hv is not None else float('nan'):10.1f} {ratio:>7}")
    lines.append(f"TTFT p50/p99 {e['ttft_p50_s']:.2f}/{e['ttft_p99_s']:.2f} s (HF padded batch: "
                 f"{h['ttft_s']:.2f} s)" if h else f"TTFT p50/p99 {e['ttft_p50_s']:.2f}/{e['ttft_p99_s']:.2f} s")
    lines.append(f"inter-token p50/p99 {e['itl_p50_ms']:.0f}/{e['itl_p99_ms']:.0f} ms; preemptions {e['preemptions']}")
    if "decode_b1_gb_s" in e:
        lines.append(f"batch-1 decode streams {e['weight_bytes_per_token'] / 1e9:.2f} GB/token -> "
                     f"{e['decode_b1_gb_s']:.1f} GB/s = {100 * e['roofline_fraction']:.0f}% of the {ROOFLINE_GBS:.0f} GB/s roofline")
    lines.append(f"peak RSS: engine alone {e['peak_rss_mib']:.0f} MiB" +
                 (f", engine + HF loaded {h['peak_rss_mib']:.0f} MiB" if h else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="glm4 bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                    help="engine weights (auto: as stored); transformers runs this dtype (auto: the checkpoint's)")
    ap.add_argument("--linear", default="auto", choices=["auto", "packed", "torch"], help="CPU linear kernel")
    ap.add_argument("--quantization", default=None, choices=["int8", "int6", "int4"],
                    help="weight-only quantization of the engine's model (transformers runs --dtype)")
    ap.add_argument("--no-fuse", action="store_true", help="keep q/k/v and gate/up as separate matmuls")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", default="1,8", help="decode batch sizes")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512, help="longest prompt of the concurrent workload")
    ap.add_argument("--max-output", type=int, default=128, help="longest output of the concurrent workload")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-tokens", type=int, default=32768)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "bfloat16", "float16", "float32"],
                    help="engine KV cache storage")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine token budget per step")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not Path(a.model).is_dir():
        print(f"glm4 bench: checkpoint folder not found: {a.model}", file=sys.stderr)
        return 2
    try:
        a.batch = [int(x) for x in a.batch.split(",") if x]
    except ValueError:
        print(f"glm4 bench: --batch must be comma-separated integers, got {a.batch!r}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    from glm4.config import load_config

    vocab = load_config(a.model).vocab_size
    rng = random.Random(a.seed)
    prompts512 = _prompts(rng, a.repeats, a.prompt_len, vocab)
    decode_prompts = _prompts(rng, max(a.batch), 32, vocab)
    workload = _workload(rng, a.requests, vocab, a.max_prompt, a.max_output)
    res = {"args": vars(a), "threads": torch.get_num_threads(), "torch": torch.__version__}
    res.update(run_all(a, prompts512, decode_prompts, workload))
    res.setdefault("hf", None)
    text = report(res)
    res["report"] = text
    print("\n" + text)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
