"""The llama.cpp peer for the CPU benchmarks (issue 11): the same GLM-shaped checkpoint converted to GGUF and run by
llama.cpp (through llama-cpp-python's low-level API), format by format, with the machine's read bandwidth measured in
the same run. glm4 itself is measured by the same script with --glm4 (the `measure_glm4` hook), interleaved with
llama.cpp round by round, so both see the same machine.

llama.cpp is an optional dependency that never runs in the test suite: without llama_cpp, or without the converter
for a GGUF not yet cached, this prints what is missing and exits 0. Set it up once, outside the repo (docs/benchmarks.md,
"llama.cpp peer"): llama-cpp-python 0.3.36 built from its sdist with CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF"
in its own venv together with torch, transformers and the sdist's vendor/llama.cpp/gguf-py; the converter is the
sdist's vendor/llama.cpp/convert_hf_to_gguf.py.

    python benchmarks/bench_llamacpp.py --llama-python /work/peer/venv/bin/python \
        --converter /work/peer/src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
        --out /tmp/glm-400m-peer --json /tmp/llamacpp.json                  # llama.cpp only
    python benchmarks/bench_llamacpp.py ... --glm4 --rounds 2                # glm4 vs llama.cpp, interleaved
    python benchmarks/bench_llamacpp.py ... --glm4 --glm4-gguf             # + glm4 on llama.cpp's own GGUF files
    python benchmarks/bench_llamacpp.py ... --moe --out /tmp/glm-moe-peer    # the MoE checkpoint

Every step runs in a fresh process (peak RSS is per engine and format): llama.cpp's under --llama-python; the
checkpoint build, glm4 and the bandwidth probe under this interpreter (the repo's venv). Decode tok/s counts the steps after the first
(which prefills the 32-token prompts), as `glm4 bench` does; prefill tok/s is one 512-token prompt to its first token.
Each figure is the median of --reps repeats, then the median over --rounds; with several rounds a "by round" line
gives the range of glm4 ÷ llama.cpp taken round by round (each round's two runs are minutes apart).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# llama.cpp GGUF type -> how it is made, and the glm4 format class it is compared with
FORMATS = {
    "f32": dict(convert="f32", glm4="fp32"),
    "f16": dict(convert="f16", glm4="bf16"),
    "q8_0": dict(convert="q8_0", glm4="int8"),
    "q6_K": dict(quantize=18, glm4="int6"),  # LLAMA_FTYPE_MOSTLY_Q6_K
    "q4_0": dict(quantize=2, glm4="int4"),  # LLAMA_FTYPE_MOSTLY_Q4_0, from the f32 file
    "q4_K_M": dict(quantize=15, glm4="int4"),  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    "q5_K_M": dict(quantize=17, glm4="int6"),  # LLAMA_FTYPE_MOSTLY_Q5_K_M (--formats q5_K_M; not in the default list)
}
# glm4 format class -> glm4.LLM keyword arguments (override per class with --glm4-args)
GLM4_CLASSES = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(dtype="float32", quantization="int8"),
    "int6": dict(dtype="float32", quantization="int6"),
    "int4": dict(dtype="float32", quantization="int4"),
}
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni",
             "avx_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")



# ---- the machine --------------------------------------------------------------------------------------------------

def cpu_info() -> dict:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS}}


def cpu_summary(info: dict) -> str:
    have = [f for f, v in info["flags"].items() if v]
    lack = [f for f, v in info["flags"].items() if not v]
    narrowed = [f"{k}={os.environ[k]}" for k in ("GLM4_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    return (f"{info['model']} ({info['cores']} cores); has {' '.join(have) or '-'}; lacks {' '.join(lack) or '-'}"
            + (f"; run narrowed by {' '.join(narrowed)}" if narrowed else ""))


def measure_roofline(threads: int = 2, gib: float = 1.0, seconds: float = 3.0) -> dict:
    """Sustained read bandwidth: torch.sum over a `gib` GiB fp32 tensor with `threads` threads, median GB/s."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()  # fault the pages in
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        t = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return {"gb_s": statistics.median(rates), "max_gb_s": max(rates), "samples": len(rates), "threads": threads,
            "gib": gib}


# ---- the checkpoint and its tokenizer -----------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """The byte-level BPE alphabet: byte b -> its printable stand-in (GPT-2's bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in keep else next(extra)) for b in range(256)]


def write_glm4_tokenizer(folder: Path, vocab_size: int = 151552) -> None:
    """A GLM-4-shaped tokenizer.json + tokenizer_config.json: byte-level BPE with the GLM-4 split regex, 151329
    ordinary tokens (the 256 bytes, then byte pairs, then triples, each with its merge) and the special tokens at
    their GLM-4 ids; the rest of the padded vocab stays unused. Only its shape is GLM-4's: the converter needs a
    tokenizer, the benchmark feeds token ids."""
    sys.path.insert(0, str(HERE.parent))  # glm4.tokenizer is torch-free: no install needed
    from glm4.tokenizer import GLM4_PAT_STR, GLM4_SPECIAL_TOKENS

    n_regular = min(151329, vocab_size - len(GLM4_SPECIAL_TOKENS))
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    merges: list[list[str]] = []
    pairs = ((a, b) for a in chars for b in chars)
    triples = ((a + b, c) for a in chars for b in chars for c in chars)
    for left, right in itertools.chain(pairs, triples):
        if len(vocab) >= n_regular:
            break
        vocab[left + right] = len(vocab)
        merges.append([left, right])
    added = [{"id": n_regular + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(GLM4_SPECIAL_TOKENS)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": GLM4_PAT_STR}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": merges}}
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    decoder = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, "padding_side": "left",
           "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": decoder}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def prepare_checkpoint(folder: str, moe: bool) -> dict:
    """bench_engine's ~400M GLM checkpoint (or its MoE sibling), plus a tokenizer the GGUF converter accepts."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(HERE))
        from bench_engine import build

        build(folder, moe=moe)
    if not (folder / "tokenizer.json").exists():
        write_glm4_tokenizer(folder, json.loads((folder / "config.json").read_text())["vocab_size"])
    return {"path": str(folder)}


# ---- GGUF files ---------------------------------------------------------------------------------------------------

# Runs the converter in the llama.cpp interpreter. A synthesized tokenizer's pre-tokenizer hash is in no list of the
# converter's, so an unknown one is taken as GLM-4's ("glm4"); a real GLM-4 tokenizer is still recognized as usual.
_CONVERT = """
import runpy, sys
conv = sys.argv[1]
sys.path[:0] = [conv.rsplit('/', 1)[0], conv.rsplit('/', 1)[0] + '/gguf-py']
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "glm4"
base.TextModel.get_vocab_base_pre = pre
sys.argv = sys.argv[1:]
runpy.run_path(conv, run_name="__main__")
"""


def gguf_path(out: Path, fmt: str) -> Path:
    return out / f"model-{fmt}.gguf"


def make_gguf(fmt: str, checkpoint: Path, out: Path, llama_python: str, converter: Path | None, threads: int) -> Path:
    """The cached GGUF of `fmt`, converted (f32, f16, q8_0) or quantized from the f32 file (q6_K, q4_0, q4_K_M)."""
    dst = gguf_path(out, fmt)
    if dst.exists():
        return dst
    tmp = dst.with_suffix(".tmp")
    spec = FORMATS[fmt]
    if "convert" in spec:
        if converter is None:
            raise MissingPeer(f"{dst} is not cached and no converter was given (--converter or LLAMA_CPP_CONVERTER: "
                              "vendor/llama.cpp/convert_hf_to_gguf.py of the llama-cpp-python sdist)")
        print(f"converting {checkpoint} -> {dst.name}", flush=True)
        t = time.perf_counter()
        log = out / f"convert-{fmt}.log"
        with open(log, "w") as f:
            rc = subprocess.run([llama_python, "-c", _CONVERT, str(converter), str(checkpoint), "--outtype",
                                 spec["convert"], "--outfile", str(tmp)], stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"the converter failed ({rc}); its output is in {log}")
        print(f"  {time.perf_counter() - t:.0f}s", flush=True)
    else:
        src = make_gguf("f32", checkpoint, out, llama_python, converter, threads)
        print(f"quantizing {src.name} -> {dst.name}", flush=True)
        run_worker("quantize", dict(src=str(src), dst=str(tmp), ftype=spec["quantize"], threads=threads),
                   llama_python)
    tmp.rename(dst)
    return dst


def quantize(src: str, dst: str, ftype: int, threads: int) -> dict:
    """llama.cpp's own quantizer (llama_model_quantize), default parameters (e.g. its q6_K output tensor)."""
    import ctypes

    import llama_cpp as L

    _quiet_llama()
    qp = L.llama_model_quantize_default_params()
    qp.ftype, qp.nthread = ftype, threads
    t = time.perf_counter()
    rc = L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(qp))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, ftype {ftype}) returned {rc}")
    return {"seconds": time.perf_counter() - t}


def gguf_bytes(path: str) -> dict:
    """Tensor bytes of a GGUF file by type, and the bytes a batch-1 decode step reads: every tensor but the token
    embedding (one row is read), of stacked MoE experts only the used fraction."""
    import gguf

    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    field = lambda k: r.fields[k].contents() if k in r.fields else None
    n_exp, n_used = field(f"{arch}.expert_count"), field(f"{arch}.expert_used_count")
    total, per_token, by_type = 0, 0.0, {}
    for t in r.tensors:
        n = int(t.n_bytes)
        total += n
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + n
        if t.name == "token_embd.weight":
            continue
        per_token += n * (n_used / n_exp if n_exp and "_exps" in t.name else 1.0)
    types = {t.name: t.tensor_type.name for t in r.tensors if t.name in ("token_embd.weight", "output.weight")}
    return {"arch": arch, "tensor_bytes": total, "bytes_per_token": int(per_token), "bytes_by_type": by_type,
            "types": types}


# ---- llama.cpp ----------------------------------------------------------------------------------------------------

def _quiet_llama(verbose: bool = False) -> None:
    from llama_cpp import _logger

    _logger.set_verbose(verbose)


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into the child's
    ru_maxrss across exec, which would charge the orchestrator's memory to every worker."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompts(seed: int, n: int, length: int) -> list[list[int]]:
    """Random ordinary GLM token ids (the same ones for both engines)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1000, 150000) for _ in range(length)] for _ in range(n)]


def measure_llamacpp(gguf_path: str, threads: int = 2, batches: tuple[int, ...] = (1, 8), decode_tokens: int = 64,
                     decode_prompt: int = 32, prefill_tokens: int = 512, reps: int = 3, seed: int = 0,
                     verbose: bool = False) -> dict:
    """llama.cpp on one GGUF file: decode tok/s at each batch (B sequences of one llama_batch per step, greedy
    sampling by llama.cpp's sampler) and prefill tok/s of one `prefill_tokens` prompt; medians of `reps`."""
    import llama_cpp as L

    _quiet_llama(verbose)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    t = time.perf_counter()
    model = L.llama_model_load_from_file(gguf_path.encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    res = {"load_s": time.perf_counter() - t, "system_info": L.llama_print_system_info().decode().strip(),
           "n_params": L.llama_model_n_params(model), "model_size": L.llama_model_size(model)}
    greedy = L.llama_sampler_init_greedy()

    def context(n_seq: int, n_ctx_seq: int):
        cp = L.llama_context_default_params()
        cp.n_ctx = n_seq * (-(-n_ctx_seq // 256) * 256)
        cp.n_seq_max, cp.n_threads, cp.n_threads_batch = n_seq, threads, threads
        cp.n_batch = max(cp.n_batch, cp.n_ctx)  # a long decode prompt is one llama_decode call
        cp.no_perf = False  # llama.cpp's own timings, a cross-check of ours
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        return ctx

    def fill(batch, seqs: list[list[int]], start: int) -> list[int]:
        """One llama_batch: sequence s's tokens at positions start.., logits for its last token only (returned:
        those tokens' indices in the batch)."""
        i, last = 0, []
        for s, toks in enumerate(seqs):
            for j, tok in enumerate(toks):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + j, 1
                batch.seq_id[i][0], batch.logits[i] = s, j == len(toks) - 1
                i += 1
            last.append(i - 1)
        batch.n_tokens = i
        return last

    def perf(ctx) -> dict:
        d = L.llama_perf_context(ctx)
        return {"prompt_tokens": d.n_p_eval, "prompt_ms": d.t_p_eval_ms, "eval_tokens": d.n_eval, "eval_ms": d.t_eval_ms}

    def decode(ctx, batch) -> None:
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def sample(ctx, rows: list[int]) -> list[int]:
        return [L.llama_sampler_sample(greedy, ctx, i) for i in rows]  # rows: batch indices with logits

    def decode_rate(ctx, batch, b: int, n_tokens: int, rep: int) -> float:
        """B sequences: prefill their prompts (one step, untimed), then n_tokens - 1 timed single-token steps."""
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        rows = fill(batch, _prompts(seed + 1000 * rep + b, b, decode_prompt), 0)
        decode(ctx, batch)
        nxt = sample(ctx, rows)
        t = time.perf_counter()
        for step in range(n_tokens - 1):
            rows = fill(batch, [[tok] for tok in nxt], decode_prompt + step)
            decode(ctx, batch)
            nxt = sample(ctx, rows)
        return b * (n_tokens - 1) / (time.perf_counter() - t)

    for b in batches:
        ctx = context(b, decode_prompt + decode_tokens + 8)
        batch = L.llama_batch_init(b * decode_prompt, 0, 1)
        decode_rate(ctx, batch, b, 3, -1)  # warm-up: first touch of the weights, graph allocation
        rates = [decode_rate(ctx, batch, b, decode_tokens, r) for r in range(reps)]
        res[f"decode_b{b}_tok_s"], res[f"decode_b{b}_samples"] = statistics.median(rates), rates
        res[f"llama_perf_b{b}"] = perf(ctx)
        L.llama_batch_free(batch)
        L.llama_free(ctx)

    if prefill_tokens:
        ctx = context(1, prefill_tokens + 8)
        batch = L.llama_batch_init(prefill_tokens, 0, 1)
        times = []
        for r in range(reps + 1):  # the first one warms up
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            rows = fill(batch, _prompts(seed + 7 + r, 1, prefill_tokens), 0)
            t = time.perf_counter()
            decode(ctx, batch)
            sample(ctx, rows)
            times.append(time.perf_counter() - t)
        res["prefill_tok_s"] = prefill_tokens / statistics.median(times[1:])
        res["prefill_samples"] = [prefill_tokens / x for x in times[1:]]
        res["llama_perf_prefill"] = perf(ctx)
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    L.llama_sampler_free(greedy)
    res["peak_rss_mib"] = peak_rss_mib()  # before GGUFReader's own
    L.llama_model_free(model)
    try:
        res.update(gguf_bytes(gguf_path))
    except ImportError:  # the gguf package (the sdist's gguf-py) is not installed
        res["bytes_per_token"] = None
    return res


# ---- glm4 (the hook) ----------------------------------------------------------------------------------------------
# ==== HOOK: glm4's side of the comparison. Same prompts, same counting as measure_llamacpp; the engine's own steps
# (add_request / step), as `glm4 bench` drives them. Change the engine arguments per class in GLM4_CLASSES or with
# --glm4-args '{"bf16": {"linear": "torch"}}'.

def measure_glm4(checkpoint: str, fmt_class: str, threads: int = 2, batches: tuple[int, ...] = (1, 8),
                 decode_tokens: int = 64, decode_prompt: int = 32, prefill_tokens: int = 512, reps: int = 3,
                 seed: int = 0, engine_args: dict | None = None) -> dict:
    import torch

    torch.set_num_threads(threads)
    from glm4.engine import LLM, SamplingParams

    kw = dict(GLM4_CLASSES[fmt_class], num_threads=threads, seed=0, kv_cache_tokens=16384, max_num_seqs=16)
    kw.update(engine_args or {})
    t = time.perf_counter()
    llm = LLM(checkpoint, **kw)
    res = {"load_s": time.perf_counter() - t, "engine_args": kw}
    eng = llm.engine
    res["describe"] = llm.describe() if hasattr(llm, "describe") else eng.describe()  # which kernel runs what
    try:
        from glm4.engine.bench import weight_bytes_per_token

        res["bytes_per_token"] = weight_bytes_per_token(llm.model)
    except ImportError:
        res["bytes_per_token"] = None
    sp = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def decode_rate(b: int, n_tokens: int, rep: int) -> float:
        for p in _prompts(seed + 1000 * rep + b, b, decode_prompt):
            eng.add_request(None, p, sp(n_tokens))
        first = eng.stats["generated_tokens"] + b
        while eng.stats["generated_tokens"] < first:  # prefills every prompt (in chunks when long), first tokens
            eng.step()
        t, steps = time.perf_counter(), 0
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
        return b * steps / (time.perf_counter() - t)

    for b in batches:
        decode_rate(b, 3, -1)
        rates = [decode_rate(b, decode_tokens, r) for r in range(reps)]
        res[f"decode_b{b}_tok_s"], res[f"decode_b{b}_samples"] = statistics.median(rates), rates
    if prefill_tokens:
        times = []
        for r in range(reps + 1):
            t = time.perf_counter()
            llm.generate([_prompts(seed + 7 + r, 1, prefill_tokens)[0]], sp(1))
            times.append(time.perf_counter() - t)
        res["prefill_tok_s"] = prefill_tokens / statistics.median(times[1:])
        res["prefill_samples"] = [prefill_tokens / x for x in times[1:]]
    res["peak_rss_mib"] = peak_rss_mib()
    res["weight_bytes"] = _tensor_bytes(llm.model)
    return res


def _tensor_bytes(model) -> int:
    """Bytes of every parameter and buffer (each storage once), plus oneDNN-packed weights held as attributes."""
    import torch

    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        packed = getattr(m, "packed", None)
        if isinstance(packed, torch.Tensor) and (packed.is_mkldnn or packed.data_ptr() not in seen):
            total += m.in_features * m.out_features * torch.empty((), dtype=m.dtype).element_size()
    return total

# ==== end of the hook


# ---- one process per measurement ----------------------------------------------------------------------------------

WORKERS = {"llamacpp": measure_llamacpp, "glm4": measure_glm4, "roofline": measure_roofline, "quantize": quantize,
           "prepare": prepare_checkpoint}


class MissingPeer(Exception):
    """llama.cpp (or its converter) is not installed: the benchmark is skipped, not failed."""


def run_worker(kind: str, kwargs: dict, python: str = sys.executable, verbose: bool = False) -> dict:
    """Run WORKERS[kind](**kwargs) in a fresh `python` process; its result is the last stdout line. Its stderr
    (llama.cpp's loader warnings, ...) is shown with --verbose or when it fails."""
    p = subprocess.run([python, str(Path(__file__).resolve()), "--worker", kind, json.dumps(kwargs)],
                       stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE, text=True)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines or not lines[-1].startswith("{"):
        err = "\n".join((p.stderr or "").strip().splitlines()[-20:])
        raise RuntimeError(f"{kind} worker failed (exit {p.returncode}); stdout ended {lines[-5:]}; stderr:\n{err}")
    for line in lines[:-1]:  # what it printed besides its result
        print(f"  {line}", flush=True)
    return json.loads(lines[-1])


def llama_available(python: str) -> str | None:
    """None if `python` imports llama_cpp, else why not."""
    try:
        p = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                           text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python}: {e}"
    return None if p.returncode == 0 else f"{python} cannot import llama_cpp"


def find_llama_python(arg: str | None) -> str | None:
    for cand in (arg, os.environ.get("LLAMA_CPP_PYTHON"), sys.executable):
        if cand and llama_available(cand) is None:
            return cand
    return None


def find_converter(arg: str | None) -> Path | None:
    for cand in (arg, os.environ.get("LLAMA_CPP_CONVERTER")):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


# ---- the run ------------------------------------------------------------------------------------------------------

def _med(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], roofline_gb_s: float | None, weight_bytes: int | None) -> dict:
    """Median over rounds of each metric, plus GB/s streamed at batch 1 and its share of the roofline."""
    keys = [k for k in runs[0] if k.endswith("_tok_s")]
    s = {k: _med([r.get(k) for r in runs]) for k in keys}
    s["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    bpt = runs[0].get("bytes_per_token")
    s["bytes_per_token"] = bpt
    if bpt and s.get("decode_b1_tok_s"):
        s["decode_b1_gb_s"] = s["decode_b1_tok_s"] * bpt / 1e9
        if roofline_gb_s:
            s["roofline_pct"] = 100 * s["decode_b1_gb_s"] / roofline_gb_s
    if weight_bytes:
        s["rss_over_weights"] = s["peak_rss_mib"] * 2**20 / weight_bytes
    return s


def _cell(v: float | None, spec: str, width: int) -> str:
    return f"{format(v, spec) if v is not None else '-':>{width}}"


def report(res: dict) -> str:
    a = res["args"]
    cols = [(f"dec b{b}", f"decode_b{b}_tok_s") for b in a["batches"]]
    cols += [(f"prefill{a['prefill_tokens']}", "prefill_tok_s")] if a["prefill_tokens"] else []
    roof = res.get("roofline_gb_s")
    lines = [f"CPU: {cpu_summary(res['cpu'])}",
             f"read roofline: {roof:.1f} GB/s ({a['threads']} threads; per round "
             f"{', '.join(f'{r:.1f}' for r in res['roofline_rounds'])})" if roof else "read roofline: not measured",
             f"checkpoint {res['checkpoint']}; decode {a['decode_tokens']} tokens after {a['decode_prompt']}-token "
             f"prompts; {a['threads']} threads; tok/s, median of {a['reps']} reps x {a['rounds']} rounds",
             "",
             f"{'format':8} {'engine':10} " + " ".join(f"{name:>10}" for name, _ in cols) +
             f" {'GB/tok':>7} {'% roof':>7} {'RSS/wt':>7}  notes"]
    span = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"  # noqa: E731
    for fmt, row in res["rows"].items():
        for side in ("glm4", "llama.cpp", "glm4 gguf"):
            s = row.get(side)
            if not s:
                continue
            bpt = s.get("bytes_per_token")
            if side == "glm4":
                name, note = row["glm4_class"], " ".join(f"{k}={v}" for k, v in s["engine_args"].items()
                                                         if k in ("dtype", "quantization", "linear"))
            elif side == "glm4 gguf":
                name, note = fmt, "glm4 on llama.cpp's file"
            else:
                name, note = fmt, " ".join(f"{k.split('.')[0]}={v}" for k, v in s.get("types", {}).items())
            lines.append(f"{name:8} {side:10} " + " ".join(_cell(s.get(k), ".1f", 10) for _, k in cols) +
                         f" {_cell(bpt and bpt / 1e9, '.3f', 7)} {_cell(s.get('roofline_pct'), '.0f', 6)}%"
                         f" {_cell(s.get('rss_over_weights'), '.2f', 7)}  {note}")
        for side, label, suffix in (("glm4", "glm4/llama", ""), ("glm4 gguf", "gguf/llama", "_gguf")):
            if side not in row:
                continue
            lines.append(f"{'':8} {label:10} " + " ".join(_cell(row["ratio" + suffix].get(k), ".2f", 10)
                                                          for _, k in cols))
            per_round = row.get("round_ratios" + suffix, {})
            if a["rounds"] > 1 and per_round:
                lines.append(f"{'':8} {'by round':10} " + " ".join(f"{span(per_round.get(k, [])):>10}"
                                                                   for _, k in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/glm-400m-peer", help="work folder: checkpoint (hf/) and GGUF files")
    ap.add_argument("--model", default=None, help="checkpoint folder (default OUT/hf; built when missing)")
    ap.add_argument("--moe", action="store_true", help="bench_engine's MoE checkpoint instead of the dense one")
    ap.add_argument("--formats", default="f32,f16,q8_0,q6_K,q4_0,q4_K_M", help=f"of {', '.join(FORMATS)}")
    ap.add_argument("--llama-python", default=None,
                    help="interpreter that imports llama_cpp (default: $LLAMA_CPP_PYTHON, else this one)")
    ap.add_argument("--converter", default=None,
                    help="the sdist's vendor/llama.cpp/convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERTER)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,8", help="decode batch sizes")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-prompt", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=512, help="0 skips prefill")
    ap.add_argument("--reps", type=int, default=3, help="repeats per measurement (median)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over all formats (median)")
    ap.add_argument("--roofline-gib", type=float, default=1.0, help="0 skips the bandwidth probe")
    ap.add_argument("--roofline-seconds", type=float, default=3.0)
    ap.add_argument("--glm4", action="store_true", help="also measure glm4 (measure_glm4), interleaved per format")
    ap.add_argument("--glm4-gguf", action="store_true",
                    help="also measure glm4 on each GGUF file llama.cpp runs (glm4.LLM(file.gguf): the same bytes)")
    ap.add_argument("--glm4-args", default="{}", help='JSON per class, e.g. \'{"bf16": {"linear": "torch"}}\'')
    ap.add_argument("--convert-only", action="store_true", help="build the checkpoint and GGUF files, measure nothing")
    ap.add_argument("--verbose", action="store_true", help="llama.cpp's own log")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "KWARGS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:  # inside one measurement process
        kind, kwargs = a.worker
        print(json.dumps(WORKERS[kind](**json.loads(kwargs))), flush=True)
        return 0

    fmts = [f for f in a.formats.split(",") if f]
    unknown = [f for f in fmts if f not in FORMATS]
    if unknown:
        print(f"bench_llamacpp: unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    batches = [int(b) for b in a.batch.split(",") if b]
    llama_python = find_llama_python(a.llama_python)
    if llama_python is None:
        print("bench_llamacpp: llama_cpp is not importable (pass --llama-python or set LLAMA_CPP_PYTHON to an "
              "interpreter with llama-cpp-python 0.3.36; see docs/benchmarks.md): skipping the llama.cpp peer")
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(run_worker("prepare", dict(folder=a.model or str(out / "hf"), moe=a.moe), verbose=True)["path"])
    converter = find_converter(a.converter)
    try:
        ggufs = {f: make_gguf(f, checkpoint, out, llama_python, converter, a.threads) for f in fmts}
    except MissingPeer as e:
        print(f"bench_llamacpp: {e}: skipping the llama.cpp peer")
        return 0
    for f, p in ggufs.items():
        print(f"  {f:7} {p} ({p.stat().st_size / 2**20:.0f} MiB)")
    if a.convert_only:
        return 0

    glm4_args = json.loads(a.glm4_args)
    if a.glm4 and subprocess.run([sys.executable, "-c", "import glm4"], capture_output=True).returncode != 0:
        print(f"bench_llamacpp: {sys.executable} cannot import glm4 (run this script from the repo's venv): "
              "measuring llama.cpp only")
        a.glm4 = False
    common = dict(threads=a.threads, batches=batches, decode_tokens=a.decode_tokens, decode_prompt=a.decode_prompt,
                  prefill_tokens=a.prefill_tokens, reps=a.reps)
    runs: dict[tuple[str, str], list[dict]] = {}
    roofs: list[float] = []
    for rnd in range(a.rounds):
        if a.roofline_gib:
            roof = run_worker("roofline", dict(threads=a.threads, gib=a.roofline_gib, seconds=a.roofline_seconds))
            roofs.append(roof["gb_s"])
            print(f"[round {rnd + 1}] read bandwidth {roof['gb_s']:.1f} GB/s", flush=True)
        done_classes = set()
        for f in fmts:
            cls = FORMATS[f]["glm4"]
            if a.glm4 and cls not in done_classes:  # glm4's class right before llama.cpp's format(s) of it
                done_classes.add(cls)
                r = run_worker("glm4", dict(common, checkpoint=str(checkpoint), fmt_class=cls,
                                            engine_args=glm4_args.get(cls)), verbose=a.verbose)
                runs.setdefault(("glm4", cls), []).append(r)
                print(f"[round {rnd + 1}] glm4 {cls}: " + _brief(r, batches), flush=True)
            r = run_worker("llamacpp", dict(common, gguf_path=str(ggufs[f]), verbose=a.verbose), llama_python,
                           a.verbose)
            runs.setdefault(("llama.cpp", f), []).append(r)
            print(f"[round {rnd + 1}] llama.cpp {f}: " + _brief(r, batches), flush=True)
            if a.glm4_gguf:  # glm4 on llama.cpp's own file, right after it (fp32 activations for quantized files)
                args = GLM4_CLASSES["fp32" if cls.startswith("int") else cls]
                r = run_worker("glm4", dict(common, checkpoint=str(ggufs[f]), fmt_class=cls,
                                            engine_args=dict(args, quantization=None)), verbose=a.verbose)
                runs.setdefault(("glm4 gguf", f), []).append(r)
                print(f"[round {rnd + 1}] glm4 on {f}.gguf: " + _brief(r, batches), flush=True)

    roof = _med(roofs)
    rows: dict[str, dict] = {}
    for f in fmts:
        lr = runs[("llama.cpp", f)]
        row = {"glm4_class": FORMATS[f]["glm4"],
               "llama.cpp": summarize(lr, roof, lr[0].get("tensor_bytes")) | {"types": lr[0].get("types", {})}}
        for side, key, suffix in (("glm4", ("glm4", row["glm4_class"]), ""), ("glm4 gguf", ("glm4 gguf", f), "_gguf")):
            if key in runs:  # glm4's class of the format, and glm4 on llama.cpp's own file
                gr = runs[key]
                row[side] = summarize(gr, roof, gr[0].get("weight_bytes")) | {k: gr[0].get(k) for k in
                                                                             ("describe", "engine_args")}
                g, ll = row[side], row["llama.cpp"]
                row["ratio" + suffix] = {k: g[k] / ll[k] for k in g if k.endswith("_tok_s") and g[k] and ll.get(k)}
                # the same ratio round by round (each round's glm4 run against that round's llama.cpp run, minutes
                # apart): the machine's bandwidth drifts between rounds, and the spread of these shows by how much
                row["round_ratios" + suffix] = {k: [gi[k] / li[k] for gi, li in zip(gr, lr) if gi.get(k) and li.get(k)]
                                                for k in row["ratio" + suffix]}
        rows[f] = row
    res = {"cpu": cpu_info(), "roofline_gb_s": roof, "roofline_rounds": roofs, "checkpoint": str(checkpoint),
           "args": dict(common, rounds=a.rounds, formats=fmts, glm4=a.glm4, glm4_gguf=a.glm4_gguf,
                        glm4_args=glm4_args),
           "llama_system_info": runs[("llama.cpp", fmts[0])][0].get("system_info"),
           "rows": rows, "runs": {f"{k[0]} {k[1]}": v for k, v in runs.items()}}
    text = report(res)
    res["report"] = text
    print("\n" + text)
    print(f"\nllama.cpp: {res['llama_system_info']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {a.json}")
    return 0


def _brief(r: dict, batches: list[int]) -> str:
    parts = [f"decode b{b} {r[f'decode_b{b}_tok_s']:.1f}" for b in batches] if batches else []
    if "prefill_tok_s" in r:
        parts.append(f"prefill {r['prefill_tok_s']:.0f}")
    return ", ".join(parts) + f" tok/s; peak RSS {r['peak_rss_mib']:.0f} MiB"


if __name__ == "__main__":
    sys.exit(main())
