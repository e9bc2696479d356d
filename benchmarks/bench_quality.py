"""Quality per weight format (issue 11, item 5): held-out perplexity and greedy agreement of the shipped default model
(glm4/assets/default, 6.5M-parameter glm4_moe, stored in bf16) in each format glm4 runs, against the fp32 reference.

    python benchmarks/bench_quality.py --json runs/quality.json                              # glm4 formats only
    python benchmarks/bench_quality.py --json runs/quality.json \\
        --llama-python /work/peer/venv/bin/python \\
        --converter /work/peer/src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py  # + GGUF files

Formats:
- through glm4 (`glm4.LLM()` keyword arguments): fp32 (`dtype="float32"`, the reference: the bf16 weights widened),
  bf16 storage with the activation dtype this CPU picks (`dtype="auto"`: fp32 without AVX512_BF16 / AMX), bf16
  activations (`dtype="bfloat16", linear="torch"`: torch's own bf16 arithmetic), weight-only `quantization="int8"`,
  `"int6"` at group 128 and `"int4"` at group 128 and 32 (fp32 activations; int4's LM head is int6 in groups of 128,
  or 64 where 128 does not divide the width; linears whose in_features the group does not divide take a smaller
  group: listed per row). The int8 KV cache is measured by benchmarks/bench_kv_int8.py.
- GGUF files of the same checkpoint, loaded by `glm4.LLM(path.gguf)`: llama.cpp's converter (glm4moe architecture)
  writes f32, bf16, f16 and q8_0; `llama_model_quantize` (llama.cpp's defaults) makes q4_0, q4_1, q5_0, q5_1, q4_K_M,
  q5_K_M, q6_K from the bf16 file (exact: the weights are bf16). The tensor types each file really holds are read
  back with the `gguf` package (llama.cpp stores tensors whose rows are not a multiple of 256 in other types than
  the K-quant asked for; this model's hidden size is 192). The converter needs a `tokenizer.json`: one is built in a
  copy of the checkpoint folder from `tokenizer.model` (ranks -> byte-level BPE vocabulary + merges; checked to
  encode the held-out text exactly as glm4's tiktoken tokenizer does). The converter always writes
  `expert_gating_func = sigmoid` for glm4moe; this model routes by softmax, so the files' metadata is set to softmax.
- llama.cpp's own perplexity on the same files and windows (skipped with --no-llama-ppl; llama-cpp-python's low-level
  API, logits of every position, llama.cpp's default f16 KV cache). llama.cpp runs a copy of each file with two
  additions (`llama_copy`): a zero `exp_probs_b` router bias (llama.cpp requires one for glm4moe; glm4 rejects it on
  a softmax router) and one all-zero shared expert: llama.cpp's glm4moe graph adds a shared-expert FFN to every MoE
  layer, and with `expert_shared_count` 0 that FFN has no weights and returns silu(x), so the unmodified file runs a
  different model (perplexity 207.7 / 767.8 / 1196.5 instead of 218.7 / 785.1 / 1101.4 on the first 1,024 tokens).

Measurements (all formats on the same token ids, those of glm4's tokenizer for the default model):
- Perplexity: the model card's held-out sets (Persuasion, 三国演义 111-120, news 5 %) framed as in training
  (bench_kv_int8.frame), the first --ppl-max-tokens (default 8,192) tokens of each, windows of 512 tokens; each window
  runs through the engine's model as bench_kv_int8.window_logprobs does (paged KV cache of the engine's dtype, chunks
  of 128). Per format vs fp32 also: teacher-forced argmax agreement and mean KL(fp32 || format).
- Greedy: bench_kv_int8's 24 prompts (card prompts + held-out chapter openings), 64 tokens each with ignore_eos,
  `llm.generate`; agreement with fp32 as bench_kv_int8.agreement counts it.

llama.cpp is optional: without llama_cpp or the converter the GGUF part is skipped with a message. No speed is
measured. Run it niced with one thread on shared machines: `nice -n 10 python benchmarks/bench_quality.py --threads 1`.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# glm4 formats: name -> glm4.LLM keyword arguments ("bf16": as `glm4.LLM()` runs it on this CPU)
GLM4_FORMATS = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="auto"),
    "bf16-torch": dict(dtype="bfloat16", linear="torch"),
    "int8": dict(dtype="float32", quantization="int8"),
    "int6-g128": dict(dtype="float32", quantization="int6", quant_group_size=128),
    "int4-g128": dict(dtype="float32", quantization="int4", quant_group_size=128),
    "int4-g32": dict(dtype="float32", quantization="int4", quant_group_size=32),
    # the prefill GEMM of quantized weights in another dtype than quant_gemm="auto" picks (auto: bf16 for int4 and
    # int6 on a CPU with native bf16, elsewhere int8 activations; fp32 for int8 weights)
    "int8-gemm-bf16": dict(dtype="float32", quantization="int8", quant_gemm="bfloat16"),
    "int4-g128-gemm-fp32": dict(dtype="float32", quantization="int4", quant_group_size=128, quant_gemm="float32"),
    "int6-g128-gemm-fp32": dict(dtype="float32", quantization="int6", quant_group_size=128, quant_gemm="float32"),
    "int4-g128-gemm-int8": dict(dtype="float32", quantization="int4", quant_group_size=128, quant_gemm="int8"),
    "int6-g128-gemm-int8": dict(dtype="float32", quantization="int6", quant_group_size=128, quant_gemm="int8"),
}
REFERENCE = "fp32"
# GGUF files: name -> converter --outtype, or the llama_ftype llama_model_quantize makes from the bf16 file
GGUF_FORMATS = {
    "f32": dict(convert="f32"), "bf16": dict(convert="bf16"), "f16": dict(convert="f16"), "q8_0": dict(convert="q8_0"),
    "q6_K": dict(quantize=18), "q5_1": dict(quantize=9), "q5_0": dict(quantize=8), "q5_K_M": dict(quantize=17),
    "q4_1": dict(quantize=3), "q4_0": dict(quantize=2), "q4_K_M": dict(quantize=15),
}
QUANTIZE_FROM = "bf16"
GATING_SOFTMAX = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX (2 = sigmoid)


# ---- the checkpoint copy the converter reads ---------------------------------------------------------------------

def tokenizer_json(folder: Path) -> dict:
    """A `tokenizers` byte-level BPE equal to the folder's GLM-4 `tokenizer.model` (base64 bytes + rank per line):
    vocabulary = ranks, one merge per multi-byte token, found as tiktoken would reach it (rank-ordered merging over
    the lower ranks ends in exactly two parts), GLM-4's pre-tokenizer regex, the special tokens at their ids."""
    sys.path.insert(0, str(ROOT / "recipes" / "default"))
    from train_tokenizer import PAT_STR, bytes_to_unicode

    ranks = [base64.b64decode(line.split()[0]) for line in (folder / "tokenizer.model").read_text().splitlines()
             if line.strip()]
    b2u = bytes_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    rank_of: dict[bytes, int] = {}
    merges = []
    for r, t in enumerate(ranks):
        if len(t) > 1:
            parts = [t[i:i + 1] for i in range(len(t))]
            while len(parts) > 2:
                best, at = None, -1
                for i in range(len(parts) - 1):
                    x = rank_of.get(parts[i] + parts[i + 1])
                    if x is not None and (best is None or x < best):
                        best, at = x, i
                if best is None:
                    raise ValueError(f"rank {r} ({t!r}) is not reachable by rank-ordered merging")
                parts[at:at + 2] = [parts[at] + parts[at + 1]]
            merges.append([text(parts[0]), text(parts[1])])
        rank_of[t] = r
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = [{"id": int(i), "content": a["content"], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, a in sorted(cfg["added_tokens_decoder"].items(),
                                                                       key=lambda kv: int(kv[0]))]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {text(t): i for i, t in enumerate(ranks)}, "merges": merges}}


def prepare_hf(src: Path, dst: Path) -> Path:
    """A copy of checkpoint folder `src` the converter accepts: tokenizer.json + an HF-style tokenizer_config.json
    (chat template kept)."""
    if (dst / "tokenizer.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    hf_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.get("model_max_length", 1024),
              "padding_side": "left", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "clean_up_tokenization_spaces": False, "added_tokens_decoder": cfg["added_tokens_decoder"]}
    if cfg.get("chat_template"):
        hf_cfg["chat_template"] = cfg["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(hf_cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer_json(src), ensure_ascii=False), encoding="utf-8")
    return dst


# ---- GGUF files ---------------------------------------------------------------------------------------------------

def set_gating(path: Path, value: int) -> int:
    """Rewrite `<arch>.expert_gating_func` of a GGUF file in place (a uint32); returns the old value."""
    import gguf

    r = gguf.GGUFReader(str(path), "r+")
    key = f"{r.fields['general.architecture'].contents()}.expert_gating_func"
    f = r.fields[key]
    old = int(f.parts[f.data[0]][0])
    f.parts[f.data[0]][0] = value
    r.data.flush()
    return old


def make_gguf(fmt: str, hf: Path, out: Path, llama_python: str, converter: Path | None, gating: int | None) -> Path:
    """The cached GGUF of `fmt` made from checkpoint copy `hf`: converted by llama.cpp's converter (through
    bench_llamacpp's wrapper) or quantized from the QUANTIZE_FROM file by llama_model_quantize (bench_llamacpp's
    worker); `gating` rewrites the expert gating function the converter wrote."""
    from bench_llamacpp import _CONVERT, MissingPeer, run_worker

    dst = out / f"default-{fmt}.gguf"
    if dst.exists():
        return dst
    tmp = dst.with_suffix(".tmp")
    spec = GGUF_FORMATS[fmt]
    if "convert" in spec:
        if converter is None:
            raise MissingPeer(f"{dst} is not cached and no converter was given (--converter or LLAMA_CPP_CONVERTER)")
        log = out / f"convert-{fmt}.log"
        with open(log, "w") as f:
            rc = subprocess.run([llama_python, "-c", _CONVERT, str(converter), str(hf), "--outtype", spec["convert"],
                                 "--outfile", str(tmp)], stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"the converter failed ({rc}) on {fmt}; its output is in {log}")
        if gating is not None:
            set_gating(tmp, gating)
    else:
        src = make_gguf(QUANTIZE_FROM, hf, out, llama_python, converter, gating)
        run_worker("quantize", dict(src=str(src), dst=str(tmp), ftype=spec["quantize"], threads=1), llama_python)
    tmp.rename(dst)
    print(f"  made {dst.name} ({dst.stat().st_size / 2**20:.1f} MiB)", flush=True)
    return dst


def llama_copy(src: Path, dst: Path) -> Path:
    """`src` as llama.cpp needs it to run this model as trained: the same tensors and metadata, plus per MoE layer a
    zero `exp_probs_b` router bias (a required tensor for glm4moe in llama.cpp; adding zero before a softmax top-k
    changes nothing) and one all-zero shared expert (`expert_shared_count` 1: llama.cpp's glm4moe graph always adds
    a shared-expert FFN, and with none in the file that FFN is silu(x), not 0). glm4 itself rejects both extras on a
    softmax router, hence two files."""
    import gguf
    import numpy as np

    if dst.exists():
        return dst
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    meta = lambda k: r.fields[f"{arch}.{k}"].contents()  # noqa: E731
    tmp = dst.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    for field in r.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        val = 1 if field.name == f"{arch}.expert_shared_count" else field.contents()
        w.add_key_value(field.name, val, vtype, sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    n_exp, ff, hidden = meta("expert_count"), meta("expert_feed_forward_length"), meta("embedding_length")
    extra = []
    for t in r.tensors:
        if t.name.endswith(".ffn_gate_inp.weight"):
            blk = t.name.removesuffix(".ffn_gate_inp.weight")
            extra += [(f"{blk}.exp_probs_b.bias", np.zeros(n_exp, np.float32)),
                      (f"{blk}.ffn_gate_shexp.weight", np.zeros((ff, hidden), np.float32)),
                      (f"{blk}.ffn_up_shexp.weight", np.zeros((ff, hidden), np.float32)),
                      (f"{blk}.ffn_down_shexp.weight", np.zeros((hidden, ff), np.float32))]
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    for name, a in extra:
        w.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data)
    for _, a in extra:
        w.write_tensor_data(a)
    w.close()
    tmp.rename(dst)
    return dst


_LINEAR_TENSORS = ("attn_q.", "attn_k.", "attn_v.", "attn_qkv.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.",
                   "ffn_gate_exps.", "ffn_up_exps.", "ffn_down_exps.", "ffn_gate_shexp.", "ffn_up_shexp.",
                   "ffn_down_shexp.")


def gguf_types(path: Path) -> dict:
    """What a GGUF file holds: the type(s) of each kind of weight tensor (over all layers) and the bits per weight
    of the linears (attention, MLP, experts, output; not the token embedding, router or norms)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kinds: dict[str, set] = {}
    n_bytes = n_elem = 0
    for t in r.tensors:
        name = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        if not name.endswith(".weight") or len(t.shape) < 2:
            continue
        kind = name.removesuffix(".weight")
        kinds.setdefault(kind, set()).add(t.tensor_type.name.lower())
        if name.startswith(_LINEAR_TENSORS) or name == "output.weight":
            n_bytes, n_elem = n_bytes + int(t.n_bytes), n_elem + int(t.n_elements)
    return {"types": {k: sorted(v) for k, v in kinds.items()}, "linear_bits_per_weight": 8 * n_bytes / n_elem,
            "linear_weights": n_elem, "file_bytes": path.stat().st_size}


def types_summary(types: dict) -> str:
    """'attn_q q5_0, ffn_down_exps q5_0+q8_0, ...' with equal kinds grouped."""
    by: dict[str, list[str]] = {}
    for kind, ts in types.items():
        if kind == "ffn_gate_inp":
            continue
        by.setdefault("+".join(ts), []).append(kind)
    return "; ".join(f"{t}: {', '.join(ks)}" for t, ks in by.items())


# ---- glm4 side ----------------------------------------------------------------------------------------------------

def linear_storage(model) -> dict:
    """The linears as glm4 holds them in memory (after the engine's swaps): bits per weight over attention, MLP,
    experts and LM head (codes + scales + mins; biases, embedding, router and norms excluded), and which
    storage each kind of linear got (int4 group fallbacks show here)."""
    import torch
    from torch import nn

    from glm4.layers.moe import StackedExperts
    from glm4.quant import FloatLinear, KQuantLinear, QuantLinear
    from glm4.quant.experts import ExpertPack

    bits = weights = 0
    kinds: dict[str, set] = {}

    def add(name: str, n: int, nbytes: int, desc: str) -> None:
        nonlocal bits, weights
        bits, weights = bits + 8 * nbytes, weights + n
        parts = name.split(".")
        kind = ".".join(p for p in parts if not p.isdigit() and p not in ("model", "layers", "self_attn", "mlp"))
        kinds.setdefault(desc, set()).add(kind)

    nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            add(name, m.in_features * m.out_features, nb(m.qweight, m.scales, m.mins),
                f"int{m.bits} g{m.group_size}" if m.group_size != m.in_features else f"int{m.bits}/channel")
        elif isinstance(m, KQuantLinear):
            add(name, m.in_features * m.out_features, nb(m.blocks), f"{m.NAMES[m.ggml_type]} blocks")
        elif isinstance(m, ExpertPack):
            n = m.num_experts * m.out_features * m.in_features
            if m.ggml_type:
                add(name, n, nb(m.blocks), f"{KQuantLinear.NAMES[m.ggml_type]} blocks")
            elif m.bits:
                add(name, n, nb(m.qweight, m.scales, m.mins),
                    f"int{m.bits} g{m.group_size}" if m.group_size != m.in_features else f"int{m.bits}/channel")
            else:
                add(name, n, nb(m.weight), str(m.weight.dtype).removeprefix("torch."))
        elif isinstance(m, StackedExperts):
            for p in ("gate_up_proj", "down_proj"):
                w = getattr(m, p)
                add(f"{name}.{p}", w.numel(), nb(w), str(w.dtype).removeprefix("torch."))
        elif isinstance(m, (FloatLinear, nn.Linear)) and isinstance(getattr(m, "weight", None), torch.Tensor):
            add(name, m.weight.numel(), nb(m.weight), str(m.weight.dtype).removeprefix("torch."))
    return {"bits_per_weight": bits / weights, "weights": weights,
            "storage": {d: sorted(k) for d, k in sorted(kinds.items())}}


def load_llm(path, kwargs: dict, threads: int):
    """glm4.LLM(path, **kwargs) with a small KV cache; returns (llm, the warnings it raised)."""
    import glm4

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = glm4.LLM(path, kv_cache_tokens=8192, seed=0, num_threads=threads, **kwargs)
    return llm, sorted({str(w.message) for w in caught})


def ppl_windows(tokens: list[int], seq_len: int, max_tokens: int) -> list[list[int]]:
    """bench_kv_int8's windows: seq_len inputs + the next token as the last target, over the first max_tokens."""
    if max_tokens:
        tokens = tokens[:max_tokens + 1]
    return [tokens[i:i + seq_len + 1] for i in range(0, len(tokens) - 1, seq_len) if len(tokens[i:i + seq_len + 1]) > 1]


def perplexities(llms: list, ref: int, windows: list[list[int]], chunk: int) -> tuple[list[dict], list[int]]:
    """Per model: held-out perplexity over `windows` (bench_kv_int8.window_logprobs through the engine's model and a
    paged cache of its dtype) and, against model `ref`, teacher-forced argmax agreement and mean KL(ref || model);
    also the reference's argmax at every position."""
    import torch
    from bench_kv_int8 import window_logprobs

    from glm4.layers.paged_attention import PagedKVCache

    seq_len = max(len(w) for w in windows) - 1
    caches = []
    for llm in llms:
        m = llm.engine.model
        caches.append(PagedKVCache(m.config.num_hidden_layers, -(-seq_len // 16), 16, m.config.num_key_value_heads,
                                   m.config.head_dim, llm.engine.runner.cache.dtype))
    st = [{"nll": 0.0, "agree": 0, "kl": 0.0} for _ in llms]
    n, ref_argmax = 0, []
    for w in windows:
        w = torch.tensor(w)
        ref_lp = window_logprobs(llms[ref].engine.model, caches[ref], w[:-1], chunk)
        ref_arg = ref_lp.argmax(-1)
        ref_argmax += ref_arg.tolist()
        for j, llm in enumerate(llms):
            lp = ref_lp if j == ref else window_logprobs(llm.engine.model, caches[j], w[:-1], chunk)
            st[j]["nll"] -= float(lp.gather(1, w[1:, None]).sum())
            st[j]["agree"] += int((lp.argmax(-1) == ref_arg).sum())
            st[j]["kl"] += float((ref_lp.exp() * (ref_lp - lp)).sum())
        n += w.shape[0] - 1
    ref_ppl = math.exp(st[ref]["nll"] / n)
    out = []
    for s in st:
        ppl = math.exp(s["nll"] / n)
        out.append({"tokens": n, "ppl": ppl, "ppl_delta_pct": 100 * (ppl / ref_ppl - 1),
                    "argmax_agreement": s["agree"] / n, "mean_kl": s["kl"] / n})
    return out, ref_argmax


# ---- llama.cpp's own perplexity (runs under --llama-python) -------------------------------------------------------

def llama_ppl(gguf: str, windows_file: str, threads: int = 1, verbose: bool = False) -> dict:
    """llama.cpp's perplexity on the windows of `windows_file` ({set: [[tokens]]}, as ppl_windows makes them): each
    window decoded from an empty KV cache as one batch with logits for every position (llama.cpp's default context
    settings otherwise: f16 KV cache). Returns per set the perplexity and every position's argmax."""
    import llama_cpp as L
    import numpy as np
    from bench_llamacpp import _quiet_llama

    _quiet_llama(verbose)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(gguf.encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    sets = json.loads(Path(windows_file).read_text())
    seq = max(len(w) for ws in sets.values() for w in ws) - 1
    cp = L.llama_context_default_params()
    cp.n_ctx = -(-seq // 256) * 256
    cp.n_batch = cp.n_ubatch = cp.n_ctx
    cp.n_seq_max, cp.n_threads, cp.n_threads_batch = 1, threads, threads
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    batch = L.llama_batch_init(cp.n_ctx, 0, 1)
    res = {"n_ctx": cp.n_ctx, "system_info": L.llama_print_system_info().decode().strip(), "sets": {}}
    for name, windows in sets.items():
        nll, n, argmax = 0.0, 0, []
        for w in windows:
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            T = len(w) - 1
            for i in range(T):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = w[i], i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = T
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(T * n_vocab,)).reshape(T, n_vocab)
            logits = logits.astype(np.float64)
            mx = logits.max(-1, keepdims=True)
            lse = (mx[:, 0] + np.log(np.exp(logits - mx).sum(-1)))
            nll -= float((logits[np.arange(T), w[1:]] - lse).sum())
            argmax += logits.argmax(-1).tolist()
            n += T
        res["sets"][name] = {"tokens": n, "ppl": math.exp(nll / n), "argmax": argmax}
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return res


WORKERS = {"llama_ppl": llama_ppl}


def run_worker(kind: str, kwargs: dict, python: str) -> dict:
    """WORKERS[kind](**kwargs) in a fresh `python` process (llama-cpp-python's interpreter); the last stdout line."""
    p = subprocess.run([python, str(Path(__file__).resolve()), "--worker", kind, json.dumps(kwargs)],
                       capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines or not lines[-1].startswith("{"):
        err = "\n".join((p.stderr or "").strip().splitlines()[-20:])
        raise RuntimeError(f"{kind} worker failed (exit {p.returncode}); stderr:\n{err}")
    return json.loads(lines[-1])


# ---- the run ------------------------------------------------------------------------------------------------------

SET_LABELS = {"en_persuasion": "Persuasion", "zh_sanguo_111_120": "三国演义 111-120", "zh_news_5pct": "news 5 %"}


def report(res: dict) -> str:
    sets = list(res["sets"])
    scored = ", ".join(f"{SET_LABELS.get(s, s)} {n}" for s, n in res["sets"].items())
    lines = [f"CPU: {res['cpu']}", f"perplexity: first {res['args']['ppl_max_tokens']} tokens of each set "
             f"({scored} scored), windows of "
             f"{res['args']['seq_len']}; greedy: {res['greedy_prompts']} prompts x {res['args']['max_tokens']} tokens; "
             f"reference {REFERENCE}", ""]
    head = (f"{'format':36} {'bits/w':>6} {'act':>5} " + " ".join(f"{SET_LABELS.get(s, s):>17}" for s in sets)
            + f" {'argmax':>7} {'KL':>8} {'greedy pos':>10} {'full':>5}" + ("  llama.cpp ppl" if res["llama_ppl"] else ""))
    lines.append(head)
    for r in res["rows"]:
        cells = [f"{r['ppl'][s]['ppl']:8.2f} {r['ppl'][s]['ppl_delta_pct']:+7.2f}%" for s in sets]
        agree = sum(r["ppl"][s]["argmax_agreement"] for s in sets) / max(len(sets), 1)
        kl = sum(r["ppl"][s]["mean_kl"] for s in sets) / max(len(sets), 1)
        g = r["greedy"]
        line = (f"{r['name']:36} {r['bits_per_weight']:6.2f} {r['activations']:>5} " + " ".join(cells)
                + f" {100 * agree:6.2f}% {kl:8.1e} {100 * g['position_agreement']:9.1f}% "
                f"{g['identical_continuations']:>2}/{g['prompts']}")
        if r.get("llama_cpp"):
            line += "  " + " / ".join(f"{r['llama_cpp'][s]['ppl']:.2f}" for s in sets)
        lines.append(line)
    lines.append("")
    for r in res["rows"]:
        what = r.get("types_summary") or "; ".join(f"{d}: {', '.join(k)}" for d, k in r["storage"].items())
        lines.append(f"{r['name']:36} {what}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data/default", type=Path,
                    help="held-out text: <dir>/corpus/valid_*.jsonl, else the three packages fetched here "
                         "(bench_kv_int8.heldout)")
    ap.add_argument("--out", default=Path(tempfile.gettempdir()) / "glm4-quality", type=Path,
                    help="work folder: checkpoint copies for the converter and the GGUF files (cached)")
    ap.add_argument("--formats", default=",".join(GLM4_FORMATS), help="glm4 formats, comma-separated")
    ap.add_argument("--gguf-formats", default=",".join(GGUF_FORMATS), help="GGUF files, comma-separated ('' = none)")
    ap.add_argument("--llama-python", default=None,
                    help="interpreter that imports llama_cpp (default: $LLAMA_CPP_PYTHON, else this one)")
    ap.add_argument("--converter", default=None,
                    help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERTER)")
    ap.add_argument("--no-llama-ppl", action="store_true", help="skip llama.cpp's own perplexity on the GGUF files")
    ap.add_argument("--max-tokens", default=64, type=int, help="greedy continuation length")
    ap.add_argument("--seq-len", default=512, type=int, help="perplexity window")
    ap.add_argument("--chunk", default=128, type=int, help="tokens per forward within a window")
    ap.add_argument("--ppl-max-tokens", default=8192, type=int, help="tokens scored per held-out set (0 = all)")
    ap.add_argument("--threads", default=1, type=int)
    ap.add_argument("--json", default=None, type=Path)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "KWARGS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.data_dir = args.data_dir.resolve()  # the fetch steps run in sub-folders of it
    if args.worker:  # inside a llama.cpp measurement process
        kind, kwargs = args.worker
        print(json.dumps(WORKERS[kind](**json.loads(kwargs))), flush=True)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from bench_kv_int8 import agreement, frame, heldout, prompts

    try:  # the llama.cpp peer's helpers (conversion wrapper, quantize worker, interpreter lookup, CPU flags)
        import bench_llamacpp as peer
    except ImportError as e:
        peer = None
        print(f"bench_quality: benchmarks/bench_llamacpp.py unavailable ({e}): skipping the GGUF formats", flush=True)

    import glm4
    from glm4.assets import default_model
    from glm4.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    fmts = [f for f in args.formats.split(",") if f]
    gfmts = [f for f in args.gguf_formats.split(",") if f]
    unknown = [f for f in fmts if f not in GLM4_FORMATS] + [f for f in gfmts if f not in GGUF_FORMATS]
    if unknown or REFERENCE not in fmts:
        print(f"bench_quality: unknown format(s) {unknown} or no {REFERENCE!r} reference; glm4: {', '.join(GLM4_FORMATS)};"
              f" GGUF: {', '.join(GGUF_FORMATS)}", file=sys.stderr)
        return 2
    src = Path(default_model())
    tok = load_tokenizer(src)
    try:
        docs = heldout(args.data_dir)
    except Exception as e:  # no network: the card's prompts alone, no perplexity
        print(f"held-out text unavailable ({type(e).__name__}: {e}); greedy on the card's prompts only", flush=True)
        docs = {}
    windows = {s: ppl_windows(frame(tok, d), args.seq_len, args.ppl_max_tokens) for s, d in docs.items()}

    # which models: glm4's formats, then the GGUF files glm4 loads
    entries = [dict(name=f"glm4 {f}", kind="glm4", path=None, kwargs=GLM4_FORMATS[f]) for f in fmts]
    ggufs: dict[str, Path] = {}
    llama_python = None
    if gfmts and peer is not None:
        llama_python = peer.find_llama_python(args.llama_python)
        converter = peer.find_converter(args.converter)
        if llama_python is None:
            print("bench_quality: llama_cpp is not importable (pass --llama-python or set LLAMA_CPP_PYTHON to an "
                  "interpreter with llama-cpp-python; see docs/benchmarks.md): skipping the GGUF formats", flush=True)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            try:
                hf = prepare_hf(src, args.out / "hf")
                ggufs = {f: make_gguf(f, hf, args.out, llama_python, converter, GATING_SOFTMAX) for f in gfmts}
            except peer.MissingPeer as e:
                print(f"bench_quality: {e}: skipping the GGUF formats", flush=True)
                ggufs = {}
    entries += [dict(name=f"GGUF {f}", kind="gguf", path=str(p), kwargs={}) for f, p in ggufs.items()]

    rows, llms = [], []
    for e in entries:
        llm, warned = load_llm(e["path"] or src, e["kwargs"], args.threads)
        llms.append(llm)
        row = {"name": e["name"], "kind": e["kind"], "path": e["path"], "args": e["kwargs"],
               "activations": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
                   llm.model.compute_dtype, str(llm.model.compute_dtype)),
               "kv_cache_dtype": str(llm.engine.runner.cache.dtype).removeprefix("torch."),
               "describe": llm.describe(), "warnings": warned}
        mem = linear_storage(llm.model)
        row["storage"], row["glm4_bits_per_weight"] = mem["storage"], mem["bits_per_weight"]
        if e["kind"] == "gguf":
            g = gguf_types(Path(e["path"]))
            row.update(types=g["types"], types_summary=types_summary(g["types"]), file_bytes=g["file_bytes"],
                       bits_per_weight=g["linear_bits_per_weight"])
        else:
            row["bits_per_weight"] = mem["bits_per_weight"]
        rows.append(row)
        print(f"loaded {e['name']}: {row['bits_per_weight']:.2f} bits/weight, activations {row['activations']}"
              + (f"; {len(warned)} warning(s)" if warned else ""), flush=True)
    ref = fmts.index(REFERENCE)

    tok_check = None
    gguf_llm = next((llm for e, llm in zip(entries, llms) if e["kind"] == "gguf"), None)
    if gguf_llm is not None and docs:  # the GGUF's own tokenizer against glm4's on the held-out documents
        all_docs = [d for ds in docs.values() for d in ds if d.strip()]
        same = sum(list(gguf_llm.tokenizer.encode(d)) == list(tok.encode(d)) for d in all_docs)
        tok_check = {"documents": len(all_docs), "identical_ids": same}
        print(f"GGUF tokenizer vs glm4's: identical ids on {same}/{len(all_docs)} held-out documents", flush=True)

    ps = prompts(tok, docs)
    params = glm4.SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    outs = [[o.token_ids for o in llm.generate(ps, params)] for llm in llms]
    for row, out in zip(rows, outs):
        g = row["greedy"] = agreement(outs[ref], out)
        print(f"greedy {row['name']}: {100 * g['position_agreement']:.1f}% positions, "
              f"{g['identical_continuations']}/{g['prompts']} identical", flush=True)

    ref_argmax = {}
    for row in rows:
        row["ppl"] = {}
    for s, ws in windows.items():
        stats, ref_argmax[s] = perplexities(llms, ref, ws, args.chunk)
        for row, st in zip(rows, stats):
            row["ppl"][s] = st
        print(f"{s} ({stats[0]['tokens']} tokens): " + ", ".join(f"{r['name']} {st['ppl']:.2f}"
                                                                for r, st in zip(rows, stats)), flush=True)
    del llms
    gc.collect()

    llama_done = False
    if ggufs and windows and not args.no_llama_ppl:
        wfile = args.out / "windows.json"
        wfile.write_text(json.dumps(windows))
        for row, (f, p) in zip([r for r in rows if r["kind"] == "gguf"], ggufs.items()):
            try:
                lp = llama_copy(p, p.with_name(p.stem + "-llamacpp.gguf"))
                r = run_worker("llama_ppl", dict(gguf=str(lp), windows_file=str(wfile), threads=args.threads),
                               llama_python)
            except RuntimeError as e:
                print(f"llama.cpp perplexity on {f} failed: {e}", flush=True)
                continue
            row["llama_cpp"] = {}
            for s, st in r["sets"].items():
                agree = sum(a == b for a, b in zip(st["argmax"], ref_argmax[s])) / len(ref_argmax[s])
                row["llama_cpp"][s] = {"tokens": st["tokens"], "ppl": st["ppl"], "argmax_agreement_vs_glm4_fp32": agree}
            row["llama_cpp_file"] = str(lp)
            row["llama_system_info"] = r["system_info"]
            llama_done = True
            print(f"llama.cpp {f}: " + ", ".join(f"{s} {v['ppl']:.2f} (argmax = glm4 fp32 "
                                                 f"{100 * v['argmax_agreement_vs_glm4_fp32']:.2f}%)"
                                                 for s, v in row["llama_cpp"].items()), flush=True)

    cpu = peer.cpu_summary(peer.cpu_info()) if peer is not None else platform.processor()
    res = {"cpu": cpu, "torch": torch.__version__,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"},
           "sets": {s: sum(len(w) - 1 for w in ws) for s, ws in windows.items()}, "greedy_prompts": len(ps),
           "gguf_tokenizer_check": tok_check, "llama_ppl": llama_done, "rows": rows,
           "wall_s": round(time.perf_counter() - t0, 1)}
    text = report(res)
    res["report"] = text
    print("\n" + text, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
