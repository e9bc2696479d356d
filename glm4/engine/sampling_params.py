"""SamplingParams: how one request is decoded. Pure Python; validated on construction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# a logits processor sees the request's generated token ids so far and the [V] logits of the next token
LogitsProcessor = Callable[[list, object], object]

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Decoding settings for one request.

    temperature 0 is greedy. top_k 0 (or -1) and top_p 1 and min_p 0 disable those filters.
    `stop` strings are matched on the decoded text (also across token boundaries) and trimmed from it;
    `stop_token_ids` and the model's EOS ids (unless `ignore_eos`) end the request with the token kept
    in `token_ids` but not in `text`. `seed` makes this request's sampling reproducible whatever else
    is in the batch. `logprobs` returns the chosen token's log-probability (from the raw model logits)
    and `top_logprobs` that many alternatives. `prompt_logprobs` (k >= 0) also returns each prompt token's
    log-probability given the tokens before it (the first has none), with its rank and the k most likely
    alternatives; such a request computes its whole prompt (no prefix cache). `logits_processors` are called as
    `fn(generated_token_ids, logits[V]) -> logits[V]` before the other filters. `lora` names one of the engine's
LoRA adapters (`EngineArgs.lora`); requests on different adapters and the base share each engine step.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    skip_special_tokens: bool = True
    lora: str | None = None  # the LoRA adapter (its served name, glm4.engine.lora) this request runs on; None: base

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.logits_processors = list(self.logits_processors or [])
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"logit_bias must map token ids to numbers: {e}") from None
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def num(name, lo=None, hi=None, lo_open=False, integer=False):
            v = getattr(self, name)
            kinds = (int,) if integer else (int, float)
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}")
            if v != v:  # NaN
                raise ValueError(f"{name} must not be NaN")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
            if hi is not None and v > hi:
                raise ValueError(f"{name} must be <= {hi}, got {v}")

        num("n", 1, integer=True)
        if self.max_tokens is not None:
            num("max_tokens", 1, integer=True)
        num("min_tokens", 0, integer=True)
        num("temperature", 0.0)
        num("top_p", 0.0, 1.0, lo_open=True)
        num("top_k", 0, integer=True)
        num("min_p", 0.0, 1.0)
        num("repetition_penalty", 0.0, lo_open=True)
        num("presence_penalty", -2.0, 2.0)
        num("frequency_penalty", -2.0, 2.0)
        num("top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if self.prompt_logprobs is not None:
            num("prompt_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if self.seed is not None:
            num("seed", integer=True)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        if self.logit_bias and any(k < 0 for k in self.logit_bias):
            raise ValueError("logit_bias keys must be non-negative token ids")
        if not all(callable(p) for p in self.logits_processors):
            raise ValueError("logits_processors must be callables fn(token_ids, logits) -> logits")
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            raise ValueError(f"lora must be an adapter name, got {self.lora!r}")
        if self.top_logprobs and not self.logprobs:
            self.logprobs = True

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids in the params must exist in the model's vocabulary."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        bad += [t for t in (self.logit_bias or {}) if t >= vocab_size]
        if bad:
            raise ValueError(f"token id(s) {sorted(set(bad))[:5]} out of range for vocab size {vocab_size}")

    def clone_for_child(self, index: int) -> SamplingParams:
        """Parameters for the index-th of n samples: one sample each, seed offset so children differ."""
        import copy

        p = copy.copy(self)
        p.n = 1
        if index > 0:  # the prompt is the same for every sample: the first one reports its logprobs
            p.prompt_logprobs = None
        if p.seed is not None:
            p.seed = p.seed + index
        return p
