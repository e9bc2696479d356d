"""Multi-LoRA serving cost: a mixed batch of 3 adapters + the base, against the same requests on the base alone.

    python benchmarks/bench_lora.py                       # the shipped default model, CPU
    python benchmarks/bench_lora.py --model PATH --device cuda --requests 64 --json runs/lora.json
    python benchmarks/bench_lora.py --random-hidden 2048 --threads 1  # a wider random model: LoRA's share shrinks

Three LoRA adapters (rank --rank, every attention projection and the dense MLPs' gate/up/down: the engine's fused
qkv_proj and gate_up_proj take them as stacked blocks) are written in PEFT's layout with glm4's trainer tools,
B random so that the updates are real work. The same --requests prompts (random token ids, --prompt-len tokens,
--max-tokens greedy tokens each, ignore_eos) then run through `glm4.LLM.generate` three ways:

- base:          an engine without adapters, every request on the base;
- base+wrappers: an engine with the 3 adapters loaded, every request still on the base (the wrappers' cost alone);
- mixed:         the same engine, request i on [base, a1, a2, a3][i % 4]: all four share every step (one forward
                 per step; glm4.engine.lora adds each adapter's update on its own rows).

Reported per run: wall seconds, generated tokens/s, engine steps; and mixed / base throughput. The runs are
interleaved --repeats times after a warm-up; each one's best is kept (2 shared CPU cores: the minimum is the signal; on a
loaded machine --threads 1 avoids OpenMP's oversubscription stalls, which hit the many small LoRA ops hardest).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"]


def write_adapters(model_path: Path, out: Path, rank: int, n: int = 3) -> dict[str, str]:
    from glm4.layers.lora import LoRAConfig, apply_lora, lora_modules, save_adapter
    from glm4.weights import load_model

    paths = {}
    for i in range(n):
        model = load_model(model_path, progress=False)
        names = {m.rsplit(".", 1)[-1] for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
        apply_lora(model, LoRAConfig(r=rank, alpha=2 * rank, dropout=0.0, targets=[t for t in TARGETS if t in names]))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.weight.copy_(0.02 * torch.randn(m.lora_B.weight.shape, generator=g))
        paths[f"a{i + 1}"] = str(save_adapter(model, out / f"a{i + 1}", base_model_name_or_path=str(model_path)))
    return paths


def random_checkpoint(out: Path, hidden: int, layers: int = 4) -> Path:
    """A random dense glm4 checkpoint (no tokenizer: token-id prompts), GLM-4-9B's proportions scaled down."""
    from glm4.config import config_from_dict
    from glm4.models import build_model
    from glm4.weights import save_checkpoint

    heads = hidden // 128
    cfg = config_from_dict(dict(model_type="glm4", vocab_size=32768, hidden_size=hidden, intermediate_size=hidden * 3,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 8),
                                head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5, attention_bias=True,
                                eos_token_id=[0], pad_token_id=0))
    torch.manual_seed(0)
    model = build_model(cfg).float().eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02)
    return save_checkpoint(model, out)


def run_once(llm, prompts, params) -> dict:
    steps0 = llm.engine.stats["steps"]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    gen = sum(len(o.token_ids) for o in outs)
    return {"seconds": round(dt, 3), "generated_tokens": gen, "tokens_per_s": round(gen / dt, 1),
            "steps": llm.engine.stats["steps"] - steps0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--random-hidden", type=int, default=None,
                    help="instead of --model: a random 4-layer glm4 of this width (e.g. 2048), no tokenizer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from glm4.engine import LLM

    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    if a.random_hidden:
        a.model = str(random_checkpoint(tmp / f"random-{a.random_hidden}", a.random_hidden))
    elif a.model is None:
        from glm4.assets import default_model

        a.model = str(default_model())
    adapters = write_adapters(Path(a.model), tmp, a.rank)
    kw = dict(device=a.device, kv_cache_tokens=a.requests * (a.prompt_len + a.max_tokens + 16),
              max_num_seqs=a.requests)
    base = LLM(a.model, **kw)
    vocab = min(base.engine.config.vocab_size, getattr(base.tokenizer, "vocab_size", 10**9))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (a.prompt_len,), generator=g).tolist() for _ in range(a.requests)]
    multi = LLM(a.model, lora=adapters, **kw)
    from glm4.engine import SamplingParams

    def params(names):
        return [SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True, lora=n) for n in names]

    runs = {"base": (base, params([None] * a.requests)), "base+wrappers": (multi, params([None] * a.requests)),
            "mixed": (multi, params([[None, *adapters][i % 4] for i in range(a.requests)]))}
    for llm, ps in runs.values():  # warm-up
        llm.generate(prompts[:4], ps[:4])
    results: dict[str, dict] = {}
    for _ in range(a.repeats):  # interleaved, so that a burst of load on the machine hits every run alike
        for name, (llm, ps) in runs.items():
            r = run_once(llm, prompts, ps)
            if name not in results or r["seconds"] < results[name]["seconds"]:
                results[name] = r
    ratio = results["mixed"]["tokens_per_s"] / results["base"]["tokens_per_s"]
    setup = {"model": a.model, "device": a.device, "threads": torch.get_num_threads(), "requests": a.requests,
             "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "rank": a.rank, "adapters": len(adapters),
             "adapted_linears_per_adapter": sum(1 for m in multi.model.modules()
                                                if type(m).__name__ == "MultiLoRALinear")}
    print(json.dumps(setup))
    print(f"{'run':<15} {'seconds':>8} {'tok/s':>8} {'steps':>6}")
    for name, r in results.items():
        print(f"{name:<15} {r['seconds']:>8.2f} {r['tokens_per_s']:>8.1f} {r['steps']:>6}")
    print(f"mixed (3 adapters + base) / base throughput: {ratio:.2f}; / base+wrappers: "
          f"{results['mixed']['tokens_per_s'] / results['base+wrappers']['tokens_per_s']:.2f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"setup": setup, "results": results, "mixed_over_base": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
