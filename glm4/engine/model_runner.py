"""The engine's device side: owns the model, the paged KV cache and the sampler; runs one scheduled batch."""

from __future__ import annotations

import os

import torch

from glm4.engine.multimodal import mrope_positions, multimodal_embeddings
from glm4.engine.sampler import Sampler
from glm4.engine.scheduler import ScheduledBatch
from glm4.engine.sequence import Sequence
from glm4.layers.paged_attention import PagedAttention, PagedKVCache
from glm4.quant.fused import reads_cache


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV cache on `device` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


KV_CACHE_DTYPES = ("auto", "int8", "bfloat16", "float16", "float32")


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`EngineArgs.kv_cache_dtype` -> the cache's storage dtype: "auto" = the model's (activation) dtype, "int8" =
    quantized with per-token-per-head scales, a float dtype's name = that dtype."""
    if name == "auto":
        return model_dtype
    if name in KV_CACHE_DTYPES:
        return getattr(torch, name)
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {name!r}")


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV cache bytes per token for a cache stored in `dtype` (int8: the int8 values plus their fp32 scales)."""
    return PagedKVCache.bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, eos_token_ids: list[int],
                 seed: int | None = None, sample_vocab: int | None = None, cache_dtype: torch.dtype | None = None):
        self.model = model
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, getattr(model, "compute_dtype", p.dtype)  # activations (see optimize_model)
        self.block_size = block_size
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                  cfg.head_dim, cache_dtype or self.dtype, self.device)
        self.sampler = Sampler(sample_vocab or cfg.vocab_size, eos_token_ids, seed)
        self.lora = None  # glm4.engine.lora.LoRAAdapters when the engine serves adapters (LLMEngine.add_lora)
        # fused decode attention (glm4.quant.fused, set by optimize_model) reads the cache as it is stored
        reads = reads_cache(self.dtype, self.cache.dtype)
        self.decode_kernel = getattr(model, "decode_attention_kernel", None) if reads else None
        self.qkv_kernel = getattr(model, "decode_qkv_kernel", None) if self.decode_kernel is not None else None
        self.prefill_kernel = getattr(model, "prefill_attention_kernel", None)  # prompt chunks' attention (fp32)
        self.max_encoder_bytes: int | None = None  # vision models: activations per tower call (LLMEngine sets it)

    def commit_kv_cache(self) -> None:
        """Write every page of the KV cache once (zeros; CPU). The cache is allocated `empty` so that a short
        script pays only for the blocks it uses, but the block manager hands out the least recently freed block
        first, so a long-running server reaches every block sooner or later and its RSS would creep up by the
        whole cache (96 MiB for the shipped model) over minutes or hours; committed at start it is counted from
        the first moment and stays flat."""
        if self.device.type != "cpu":
            return
        for t in (self.cache.k, self.cache.v, self.cache.k_scale, self.cache.v_scale):
            if t is not None:
                t.zero_()

    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], list[int], list[dict | None]]:
        """`_run`, with each sequence's LoRA adapter set for its rows of the step when adapters are loaded."""
        if self.lora is None:
            return self._run(batch)
        slots = [None if seq.params.lora is None else self.lora.slot(seq.params.lora) for seq in batch.seqs]
        with self.lora.step(slots, batch.num_tokens):
            return self._run(batch)

    @torch.inference_mode()
    def _run(self, batch: ScheduledBatch) -> tuple[list[Sequence], list[int], list[dict | None]]:
        """Forward the scheduled tokens; sample for sequences whose chunk reaches their last token; record
        the prompt logprobs of the chunk's tokens for sequences that ask for them.
        Returns (sampled sequences, their new token ids, logprob entries)."""
        ids: list[int] = []
        ctx_lens, q_lens, tables, last, sampled, spans = [], [], [], [], [], []
        prompt_rows: list[tuple[Sequence, int, int]] = []  # (seq, its first flat row, rows): prompt positions scored
        for seq, n in zip(batch.seqs, batch.num_tokens):
            c = seq.num_computed_tokens
            if seq.needs_prompt_logprobs:
                # position j's logits score token j + 1; record those not yet scored and still in the prompt
                lo, hi = len(seq.prompt_logprobs) - 1, min(c + n, seq.num_prompt_tokens - 1)
                if lo >= c and hi > lo:
                    prompt_rows.append((seq, len(ids) + lo - c, hi - lo))
            ids.extend(seq.token_ids[c:c + n])
            spans.append((seq, c, n))
            ctx_lens.append(c)
            q_lens.append(n)
            tables.append(seq.block_table)
            if c + n == seq.num_tokens:
                last.append(len(ids) - 1)
                sampled.append(seq)
        ctx = PagedAttention.build(self.cache, tables, ctx_lens, q_lens, self.device, decode_kernel=self.decode_kernel,
                                   qkv_kernel=self.qkv_kernel, prefill_kernel=self.prefill_kernel)
        input_ids = torch.tensor(ids, dtype=torch.long).to(self.device)[None]  # [1, N]
        positions = ctx.positions.to(self.device)[None]  # [1, N]
        if any(seq.mm is not None for seq in batch.seqs):  # (prompt logprobs are not scored for media requests)
            return self._run_multimodal(input_ids, spans, ctx, last, sampled)
        extra = [r for _, first, k in prompt_rows for r in range(first, first + k)]
        greedy = getattr(self.model, "greedy_tokens", None)  # the text models' (GlmForCausalLM)
        if (greedy is not None and len(last) == len(ids) and not extra and self.lora is None
                and self.sampler.plain_greedy(sampled)):
            tokens = greedy(input_ids, positions, ctx, self.sampler.vocab_size)
            if tokens is not None:  # a greedy decode step by one call, embedding to argmax (glm4.quant.decode_stack)
                return sampled, tokens.tolist(), [None] * len(sampled)
        if not sampled and not extra:  # only partial prefill chunks
            self._fill_cache(input_ids, positions, ctx)
            return [], [], []
        logits = self._logits(input_ids, positions, ctx, last + extra)  # [K + E, V]
        if extra:
            self._prompt_logprobs(logits[len(last):], prompt_rows)
        if not sampled:
            return [], [], []
        tokens, entries = self.sampler(logits[:len(last)], sampled)
        return sampled, tokens, entries

    def _fill_cache(self, input_ids, positions, ctx, **kw) -> None:
        """A step with nothing to sample: the layers fill the cache; no LM head, and the last layer's output
        projection and MLP on one row (every row with LoRA adapters loaded, see _logits)."""
        rows = torch.tensor([input_ids.shape[1] - 1], device=self.device) if self.lora is None else None
        self.model.hidden_states(input_ids, positions, ctx, rows=rows, **kw)

    def _logits(self, input_ids, positions, ctx, rows: list[int], **kw) -> torch.Tensor:
        """Logits [len(rows), V] of those flat rows. The last decoder layer keeps just them (`hidden_states(rows=)`),
        or every row with LoRA adapters loaded, whose per-row adapter slots cover the whole step (glm4.engine.lora)."""
        idx = torch.tensor(rows, device=self.device)
        keep = idx if self.lora is None else None
        h = self.model.hidden_states(input_ids, positions, ctx, rows=keep, **kw)
        h = h.reshape(-1, h.shape[-1])  # [len(rows), H], or every row's
        return self.model.get_output_embeddings()(h if keep is not None else h[idx])

    def _run_multimodal(self, input_ids, spans, ctx, last, sampled):
        """A step holding a request with images / videos (glm4.engine.multimodal): M-RoPE positions, media rows
        placed into the token embeddings, then the language model."""
        positions = mrope_positions(spans).to(self.device)  # [1, N, 3]
        embeds = multimodal_embeddings(self.model, input_ids, spans, self.max_encoder_bytes)
        if not sampled:
            self._fill_cache(input_ids, positions, ctx, inputs_embeds=embeds)
            return [], [], []
        logits = self._logits(input_ids, positions, ctx, last, inputs_embeds=embeds)
        tokens, entries = self.sampler(logits, sampled)
        return sampled, tokens, entries

    def _prompt_logprobs(self, logits: torch.Tensor, prompt_rows: list[tuple[Sequence, int, int]]) -> None:
        """Append each scored position's entry for the prompt token after it; `logits` [E, V]: the rows in order."""
        row = 0
        for seq, _, k in prompt_rows:
            start = len(seq.prompt_logprobs)  # the first token scored now
            next_ids = seq.token_ids[start:start + k]
            seq.prompt_logprobs.extend(self.sampler.prompt_entries(logits[row:row + k], next_ids,
                                                                   seq.params.prompt_logprobs))
            row += k
