"""LLMEngine: requests in, incremental outputs out. Glue between scheduler, block manager, runner, tokenizer.

    engine = LLMEngine(model, tokenizer, EngineArgs(kv_cache_tokens=8192))
    engine.add_request("a", "Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step(): print(out.outputs[0].delta_text, end="")
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from glm4.engine.block_manager import BlockManager
from glm4.engine.model_runner import KV_CACHE_DTYPES, ModelRunner, available_memory, kv_bytes_per_token, kv_cache_dtype
from glm4.engine.multimodal import MultimodalPrompt
from glm4.engine.sampling_params import SamplingParams
from glm4.engine.scheduler import Scheduler
from glm4.engine.sequence import CompletionOutput, RequestOutput, Sequence

log = logging.getLogger("glm4.engine")


@dataclass
class EngineArgs:
    """Engine settings (also the keyword arguments of `glm4.LLM`).

    KV cache size: `kv_cache_tokens`, else `kv_cache_memory` (bytes or a string like "2GiB"), else
    `kv_cache_fraction` of the free memory (CPU: MemAvailable; CUDA: free device memory after loading),
    capped at what `max_num_seqs` sequences of `max_model_len` tokens could use."""

    dtype: str = "auto"  # weights as the checkpoint stores them (or float32 | bfloat16 | float16); activations: see optimize_model
    device: str = "cpu"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # tokens per step; None: 512 on CPU (decodes wait less), 4096 on CUDA
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    kv_cache_memory: int | str | None = None
    kv_cache_fraction: float = 0.2
    kv_cache_dtype: str = "auto"  # "auto": the model's; "int8": + per-token-per-head fp32 scales; "bfloat16", ...
    enable_prefix_caching: bool = True
    seed: int | None = 0
    linear: str = "auto"  # CPU linear kernel: "auto" (prepacked oneDNN for bf16 and big fp32 linears), "packed" (all), "torch" (F.linear)
    quantization: str | None = None  # weight-only "int8" | "int6" | "int4" (glm4.quant), CPU
    quant_group_size: int = 128
    # prefill GEMM of quantized weights under fp32 activations: "auto" = bfloat16 for 4- / 5- / 6-bit weights where the
    # CPU computes in bf16 (AVX512_BF16 / AMX: ~1.5x prefill), elsewhere "int8" for glm4's 4- / 6-bit codes (int8
    # activations, llama.cpp's precision: ~2x on a Zen 3); "float32" = exact to the stored weights; "bfloat16" for
    # every width (glm4.quant.set_gemm_dtype)
    quant_gemm: str = "auto"
    # activations of glm4's integer CPU kernels, process-wide (torch.ops.glm4.set_activations): None keeps what runs
    # (GLM4_ACTIVATIONS, else "auto": int8 for AVX2's kernels of up to 5-bit codes, int16 for the others); "exact",
    # "int16" or "int8" (llama.cpp's precision for AVX2's 4- / 6-bit and K-quant kernels; glm4.quant.kernels.activations)
    activations: str | None = None
    compile: bool = False  # torch.compile the dense MLPs (glm4.engine.llm.compile_model); slower on CPU, see docs/benchmarks.md
    fuse_projections: bool = True  # q/k/v and gate/up as one matmul each (glm4.models.glm.fuse_projections)
    fused_ops: bool = True  # CPU: RMSNorm, RoPE and decode attention as one op each (glm4.quant.fused)
    num_threads: int | None = None
    lora: dict[str, str] | None = None  # LoRA adapters served next to the base: {name: PEFT folder} (glm4.engine.lora)
    # vision models: MiB of estimated tower activations per encoder call (an image over it is refused at add_request);
    # None: a quarter of the memory free once the KV cache is allocated
    max_encoder_mb: float | None = None

    @classmethod
    def from_kwargs(cls, **kw) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        args = cls(**kw)
        if args.linear not in ("auto", "packed", "torch"):
            raise ValueError(f"linear must be 'auto', 'packed' or 'torch', got {args.linear!r}")
        if args.quant_gemm not in ("auto", "float32", "bfloat16", "int8"):
            raise ValueError(f"quant_gemm must be 'auto', 'float32', 'bfloat16' or 'int8', got {args.quant_gemm!r}")
        if args.activations is not None:
            from glm4.quant.kernels import ACTIVATIONS

            if args.activations not in ACTIVATIONS:
                raise ValueError(f"activations must be None or one of {', '.join(map(repr, ACTIVATIONS))}, "
                                 f"got {args.activations!r}")
        if args.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                             f"got {args.kv_cache_dtype!r}")
        if args.quantization not in (None, "int8", "int6", "int4"):
            hint = " (prepacked oneDNN linears are linear='packed')" if args.quantization == "packed" else ""
            raise ValueError(f"quantization must be None, 'int8', 'int6' or 'int4', got {args.quantization!r}{hint}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if name == "max_num_batched_tokens" and args.max_num_batched_tokens is None:
                continue
            if not isinstance(getattr(args, name), int) or getattr(args, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)!r}")
        if args.max_encoder_mb is not None and not args.max_encoder_mb > 0:
            raise ValueError(f"max_encoder_mb must be positive, got {args.max_encoder_mb!r}")
        if args.lora is not None and not (isinstance(args.lora, dict) and all(isinstance(k, str) for k in args.lora)):
            raise ValueError(f"lora must map adapter names to PEFT folders, got {args.lora!r}")
        return args


def _detokenizer(tokenizer, skip_special_tokens: bool):
    try:
        from glm4.tokenizer import IncrementalDetokenizer
    except ImportError:  # the package's __init__ may not re-export it
        from glm4.tokenizer.tokenizer import IncrementalDetokenizer
    return IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)


def parse_bytes(x: int | str) -> int:
    if isinstance(x, int):
        return x
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)\s*", str(x).lower())
    if not m:
        raise ValueError(f"cannot parse a memory size from {x!r} (e.g. 2GiB, 512MB, 1000000)")
    unit = m.group(2).rstrip("b")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    return int(float(m.group(1)) * mult[unit])


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer=None, args: EngineArgs | None = None):
        args = args or EngineArgs()
        self.args, self.model, self.tokenizer = args, model, tokenizer
        cfg = self.config = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, getattr(model, "compute_dtype", p.dtype)  # activations (see optimize_model)
        model_max = int(cfg.rope.max_position_embeddings)
        max_len = min(model_max, args.max_model_len or model_max)
        if args.max_model_len and args.max_model_len > model_max:  # said, not clamped silently
            log.warning("max_model_len %d is above the model's %d (max_position_embeddings): using %d",
                        args.max_model_len, model_max, model_max)
        self.kv_cache_dtype = kv_cache_dtype(args.kv_cache_dtype, self.dtype)
        per_tok = kv_bytes_per_token(cfg, self.kv_cache_dtype)
        bs = args.block_size
        if args.kv_cache_tokens is not None:
            tokens = int(args.kv_cache_tokens)
        else:
            budget = parse_bytes(args.kv_cache_memory) if args.kv_cache_memory is not None else \
                int(args.kv_cache_fraction * available_memory(self.device))
            tokens = min(budget // per_tok, args.max_num_seqs * max_len)
        num_blocks = tokens // bs
        if num_blocks < 1:
            raise ValueError(f"KV cache of {tokens} tokens holds no block of {bs} tokens; give more memory")
        self.num_kv_tokens = num_blocks * bs
        self.max_model_len = min(max_len, self.num_kv_tokens)  # one sequence can always fit on its own
        self.kv_cache_bytes = self.num_kv_tokens * per_tok
        self.block_manager = BlockManager(num_blocks, bs, args.enable_prefix_caching)
        budget = args.max_num_batched_tokens or (4096 if self.device.type == "cuda" else 512)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, budget)
        eos = list(cfg.eos_token_ids)
        if tokenizer is not None:
            eos += [t for t in getattr(tokenizer, "eos_token_ids", []) if t not in eos]
        self.eos_token_ids = eos
        # padded embedding rows past the tokenizer's vocabulary (151552 vs 151343) decode to nothing: never sample them
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        sample_vocab = min(self.config.vocab_size, tok_vocab) if tok_vocab else None
        self.runner = ModelRunner(model, num_blocks, bs, eos, args.seed, sample_vocab=sample_vocab,
                                  cache_dtype=self.kv_cache_dtype)
        if hasattr(model, "encoder_bytes"):  # vision: the budget glm4.engine.multimodal holds the tower to
            self.runner.max_encoder_bytes = int(args.max_encoder_mb * 2**20) if args.max_encoder_mb is not None \
                else available_memory(self.device) // 4
        self.requests: dict[str, list[Sequence]] = {}
        self.prompts: dict[str, str | None] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "preemptions": 0}
        for name, path in (args.lora or {}).items():
            self.add_lora(name, path)
        log.info(self.describe())

    # --- LoRA adapters ---------------------------------------------------------------------------
    def add_lora(self, name: str, path) -> None:
        """Load a PEFT LoRA adapter folder next to the base; requests pick it by `SamplingParams(lora=name)`.
        Raises glm4.layers.lora.AdapterError (a ValueError) naming what is wrong."""
        from glm4.engine.lora import LoRAAdapters

        with self._lock:
            if self.runner.lora is None:
                self.runner.lora = LoRAAdapters(self.model)
            self.runner.lora.add(name, path)

    @property
    def lora_names(self) -> list[str]:
        return list(self.runner.lora.names) if self.runner.lora is not None else []

    # --- requests --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer files: pass prompts as lists of token ids")
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise ValueError("a prompt must be a string or a list of token ids") from None
        if any(isinstance(t, bool) for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} out of range [0, {self.config.vocab_size})")
        return ids

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    multi_modal_data: dict | None = None) -> str:
        """Queue a request (n samples of one prompt). Raises ValueError for a bad prompt or parameters.

        `multi_modal_data` (vision models): {"pixel_values", "image_grid_thw", "pixel_values_videos",
        "video_grid_thw"} as glm4.media gives them, the prompt holding the expanded placeholders."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a glm4.SamplingParams")
        params.check_vocab(self.runner.sampler.vocab_size)
        if params.lora is not None and params.lora not in self.lora_names:
            raise ValueError(f"unknown LoRA adapter {params.lora!r}; loaded: {', '.join(self.lora_names) or 'none'}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none (use stop_token_ids)")
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds at most {self.max_model_len} "
                             f"(model limit {self.config.rope.max_position_embeddings}, KV cache {self.num_kv_tokens} "
                             "tokens); shorten it or give the KV cache more memory")
        mm = None
        if multi_modal_data:
            unknown = sorted(set(multi_modal_data) - MultimodalPrompt.INPUTS)
            if unknown:
                raise ValueError(f"unknown multi_modal_data key(s) {unknown}; expected {sorted(MultimodalPrompt.INPUTS)}")
            mm = MultimodalPrompt.build(self.model, ids, **multi_modal_data,
                                        max_encoder_bytes=self.runner.max_encoder_bytes)
        with self._lock:
            if request_id is None:
                request_id = f"req-{next(self._ids)}"
                while request_id in self.requests:
                    request_id = f"req-{next(self._ids)}"
            request_id = str(request_id)
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            now = time.perf_counter()
            seqs = []
            for i in range(params.n):
                seq = Sequence(request_id, i, ids, params if params.n == 1 else params.clone_for_child(i), now)
                seq.mm = mm
                if self.tokenizer is not None:
                    seq.detok = _detokenizer(self.tokenizer, seq.params.skip_special_tokens)
                seqs.append(seq)
                self.scheduler.add(seq)
            self.requests[request_id] = seqs
            self.prompts[request_id] = prompt if isinstance(prompt, str) else None
            self.stats["prompt_tokens"] += len(ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; its final output (finish_reason "abort") comes with the next step()."""
        with self._lock:
            seqs = self.requests.get(str(request_id))
            if seqs is None:
                return False
            for seq in seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
                    self.runner.sampler.forget(seq)
            self._pending.append(self._output(str(request_id), seqs))
            self._drop(str(request_id))
            return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # --- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced tokens or finished."""
        with self._lock:
            outputs, self._pending = self._pending, []
            batch = self.scheduler.schedule()
            if not batch:
                return outputs
            sampled, tokens, entries = self.runner.run(batch)
            self.scheduler.postprocess(batch)
            self.stats["steps"] += 1
            now = time.perf_counter()
            touched: dict[str, None] = {}
            for seq, tok, lp in zip(sampled, tokens, entries):
                self._append(seq, tok, lp, now)
                touched[seq.request_id] = None
            self.stats["generated_tokens"] += len(sampled)
            self.stats["preemptions"] = self.scheduler.num_preemptions
            for rid in touched:
                seqs = self.requests[rid]
                outputs.append(self._output(rid, seqs))
                if all(s.is_finished for s in seqs):
                    self._drop(rid)
            return outputs

    def _append(self, seq: Sequence, tok: int, lp: dict | None, now: float) -> None:
        p = seq.params
        seq.token_ids.append(tok)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp["logprob"]
        n_out = seq.num_output_tokens
        reason = None
        if tok in p.stop_token_ids:
            reason, seq.stop_reason = "stop", tok
        elif not p.ignore_eos and tok in self.eos_token_ids:
            reason = "stop"
        elif seq.detok is not None:
            old = len(seq.output_text)
            seq.output_text += seq.detok.add([tok])
            if p.stop and n_out >= p.min_tokens:
                reason = self._check_stop_strings(seq, old)
        if reason is None and (p.max_tokens is not None and n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if seq.detok is not None and not isinstance(seq.stop_reason, str):
                seq.output_text += seq.detok.flush()  # a trailing partial UTF-8 character, as decode() shows it
            seq.finish_reason = reason
            self.scheduler.finish(seq, reason)
            self.runner.sampler.forget(seq)

    @staticmethod
    def _check_stop_strings(seq: Sequence, old_len: int) -> str | None:
        # a stop string may straddle tokens: search from just before the new text
        text = seq.output_text
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, old_len - longest + 1)
        best = None
        for s in seq.params.stop:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        seq.output_text = text[:i + len(s)] if seq.params.include_stop_str_in_output else text[:i]
        seq.stop_reason = s
        return "stop"

    def _output(self, rid: str, seqs: list[Sequence]) -> RequestOutput:
        outs = []
        for seq in seqs:
            text = seq.output_text
            if not seq.is_finished and seq.params.stop:  # hold back what could still become a stop string
                hold = max(len(s) for s in seq.params.stop) - 1
                visible = text[:max(seq.sent_text, len(text) - hold)]
            else:
                visible = text
            out_ids = seq.output_token_ids
            delta_ids = out_ids[seq.sent_tokens:]
            lps = seq.logprobs if seq.params.logprobs else None
            outs.append(CompletionOutput(
                index=seq.index, text=visible, token_ids=list(out_ids), delta_text=visible[seq.sent_text:],
                delta_token_ids=delta_ids, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                logprobs=list(lps) if lps is not None else None,
                delta_logprobs=lps[seq.sent_tokens:] if lps is not None else None,
                cumulative_logprob=seq.cumulative_logprob if lps is not None else None))
            seq.sent_text, seq.sent_tokens = len(visible), len(out_ids)
        first = seqs[0]
        metrics = {"arrival": first.arrival, "first_token_time": first.first_token_time,
                   "num_preemptions": sum(s.num_preemptions for s in seqs)}
        return RequestOutput(rid, self.prompts.get(rid), first.token_ids[:first.num_prompt_tokens], outs,
                             finished=all(s.is_finished for s in seqs), num_cached_tokens=first.num_cached_tokens,
                             metrics=metrics, prompt_logprobs=first.prompt_logprobs)

    def _drop(self, rid: str) -> None:
        self.requests.pop(rid, None)
        self.prompts.pop(rid, None)

    # --- convenience ------------------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                 multi_modal_data: list[dict | None] | None = None) -> list[RequestOutput]:
        """Run `prompts` (text or token-id lists) to completion; outputs in prompt order. `multi_modal_data`: one
        entry (or None) per prompt, as add_request takes it."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        mms = multi_modal_data if multi_modal_data is not None else [None] * len(prompts)
        if len(mms) != len(prompts):
            raise ValueError(f"{len(mms)} multi_modal_data entries for {len(prompts)} prompts")
        rids: list[str] = []
        final: dict[str, RequestOutput] = {}
        try:
            for pr, pa, mm in zip(prompts, plist, mms):
                rids.append(self.add_request(None, pr, pa, multi_modal_data=mm))
            wanted = set(rids)
            while wanted - final.keys():
                for out in self.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
        except BaseException:
            for rid in set(rids) - final.keys():
                self.abort(rid)
            self._pending = [o for o in self._pending if o.request_id not in rids]
            raise
        return [final[r] for r in rids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               multi_modal_data: dict | None = None) -> Iterator[RequestOutput]:
        """Yield this request's incremental outputs (other queued requests progress too); closing the
        iterator early aborts the request."""
        rid = self.add_request(None, prompt, params, multi_modal_data=multi_modal_data)
        done = False
        try:
            while not done:
                for out in self.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.abort(rid)

    def describe(self) -> str:
        kind = "int8 + fp32 scales" if self.kv_cache_dtype == torch.int8 else str(self.kv_cache_dtype)[6:]
        return (f"KV cache: {self.num_kv_tokens} tokens ({self.kv_cache_bytes / 2**20:.1f} MiB, {kind}, "
                f"{self.block_manager.num_blocks} blocks of {self.args.block_size}); max_model_len {self.max_model_len}")
