"""Guards on thinking, applied in the token loop as a logits processor (`SamplingParams.logits_processors`).

`ThinkingGuard` follows the reply's text as tokens are sampled, knows whether it is inside `<think>`,
and forces `</think>` (token by token) when
- the thinking has used `budget` tokens (`thinking_budget`), or
- the thinking has fallen into a loop: its last tokens are one block of `period` tokens repeated at
  least `repeats` times (a runaway repetition a sampler's penalties did not stop).
After `</think>` it does nothing more. It sees only token ids and a token -> bytes function, so it works
with any tokenizer, whether `</think>` is one special token or several ordinary ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def repeated_tail(ids: list[int], repeats: int, max_period: int, min_span: int) -> int | None:
    """The period p of the shortest block that the tail of `ids` repeats `repeats` times in a row (and
    that covers at least `min_span` tokens), else None."""
    n = len(ids)
    for p in range(1, max_period + 1):
        span = p * repeats
        if span > n:
            break
        if span < min_span:
            continue
        tail = ids[n - span:]
        if all(tail[i] == tail[i % p] for i in range(p, span)):
            return p
    return None


def _ends_mid_character(text: bytes) -> bool:
    """True when `text` ends inside a UTF-8 character (a lead byte whose continuation bytes have not all come)."""
    for back in range(1, min(4, len(text)) + 1):
        b = text[-back]
        if b & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
            need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
            return need > back
    return False


class ThinkingGuard:
    """Logits processor `fn(generated_ids, logits[V]) -> logits[V]` ending thinking by budget or on a loop."""

    def __init__(self, token_bytes: Callable[[int], bytes], close_ids: list[int], in_reasoning: bool,
                 budget: int | None = None, repeats: int | None = 8, max_period: int = 64, min_span: int = 64):
        if budget is not None and budget < 0:
            raise ValueError("thinking_budget must be >= 0")
        self.token_bytes = token_bytes
        self.close_ids = list(close_ids)  # the tokens of "</think>"
        self.budget = budget
        self.repeats, self.max_period, self.min_span = repeats, max_period, min_span
        self.in_think = in_reasoning
        self.done = False  # thinking closed: nothing more to do
        self.text = b""  # text since the last state change (a few bytes of look-behind for the tags)
        self.think_ids: list[int] = []  # the tokens of the open thinking
        self.consumed = 0
        self.forcing: list[int] = []  # the rest of a forced "</think>"
        self.reason: str | None = None  # why thinking was cut ("budget" / "repetition"), for diagnostics

    def _advance(self, new: list[int]) -> None:
        for t in new:
            if self.forcing and t == self.forcing[0]:
                self.forcing.pop(0)
            self.text = (self.text + self.token_bytes(t))[-64:]
            if self.in_think:
                self.think_ids.append(t)
                if THINK_CLOSE.encode() in self.text:
                    self.in_think, self.done, self.forcing = False, True, []
            elif THINK_OPEN.encode() in self.text and not self.done:
                self.in_think, self.text, self.think_ids = True, b"", []

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self._advance(list(token_ids[self.consumed:]))
        self.consumed = len(token_ids)
        if self.done or not self.in_think:
            return logits
        if not self.forcing:
            if _ends_mid_character(self.text):  # a token split a UTF-8 character: let it finish (a grammar would
                return logits                   # allow nothing else, and "</think>" could not follow)
            if self.budget is not None and len(self.think_ids) >= self.budget:
                self.reason = "budget"
            elif self.repeats and repeated_tail(self.think_ids, self.repeats, self.max_period, self.min_span):
                self.reason = "repetition"
            else:
                return logits
            self.forcing = list(self.close_ids)
        forced = self.forcing[0]
        if forced >= logits.shape[-1]:
            return logits
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[forced] = True
        return logits.masked_fill(~keep, float("-inf"))
