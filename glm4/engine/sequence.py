"""Sequence (one sample being generated) and the request-level output objects. Pure Python."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto

from glm4.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


class Sequence:
    """Token ids of one sample (prompt + generated) and its place in the KV cache.

    `num_computed_tokens` counts tokens whose K/V are already in the cache; the scheduler
    feeds `token_ids[num_computed_tokens:]` (in chunks). `block_table[i]` holds tokens
    [i*block_size, (i+1)*block_size); `block_hashes[i]` is set once block i is full and computed.
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 arrival: float = 0.0):
        self.seq_id = next(_ids)
        self.request_id, self.index, self.params, self.arrival = request_id, index, params, arrival
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first schedule)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.prefix_hashes: list[int] = []  # chain hashes of full blocks of token_ids (memo; survives preemption)
        self.num_preemptions = 0
        # output side
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.output_text = ""
        self.sent_text = 0  # chars of output_text already returned as deltas
        self.sent_tokens = 0
        self.logprobs: list[dict] = []
        self.cumulative_logprob = 0.0
        # params.prompt_logprobs: one entry per prompt token, None for the first (filled during prefill)
        self.prompt_logprobs: list[dict | None] | None = [None] if params.prompt_logprobs is not None else None
        self.first_token_time: float | None = None
        self.detok = None  # IncrementalDetokenizer, set by the engine when a tokenizer exists
        self.mm = None  # glm4.engine.multimodal.MultimodalPrompt of a request with images / videos

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet (the prefill must then run the whole prompt)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_key(self, i: int, block_size: int) -> tuple:
        """What block i holds, for the prefix cache: its token ids, with media the content keys of the images
        whose placeholders fall in it (same placeholder tokens, another picture: another key), and the LoRA
        adapter the request runs on."""
        toks = tuple(self.token_ids[i * block_size:(i + 1) * block_size])
        keys = self.mm.keys_in(i * block_size, (i + 1) * block_size) if self.mm is not None else ()
        key = (toks, keys) if keys else toks
        # K/V depend on the LoRA adapter too: two adapters (or an adapter and the base) never share a block
        return ("lora", self.params.lora, key) if self.params.lora is not None else key

    def reset_for_recompute(self) -> None:
        """After preemption: forget the cache; prompt + generated tokens are prefilled again."""
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table = []
        self.block_hashes = []
        self.num_preemptions += 1


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top_logprobs": [(id, lp), ...]}
    delta_logprobs: list[dict] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    # SamplingParams.prompt_logprobs: per prompt token {"token_id", "logprob", "rank", "top_logprobs"}, None first
    prompt_logprobs: list[dict | None] | None = None

    # convenience for n == 1: outs[0].text, outs[0].token_ids
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def delta_text(self) -> str:
        return "".join(o.delta_text for o in self.outputs)
