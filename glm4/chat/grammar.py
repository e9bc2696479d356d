"""Constrained decoding: lark grammars (written by the chat formats) enforced by llguidance token masks.

`GrammarCompiler(tok)` wraps one tokenizer (its BPE ranks and special tokens) for llguidance;
`compiler.processor(grammar, max_tokens, close, closer)` gives a fresh per-request logits processor for
`SamplingParams.logits_processors`: it consumes the tokens sampled so far and masks every token the
grammar forbids to -inf. The grammars themselves come from the formats (`spec.calls_grammar`,
`spec.auto_grammar`) and glm4.chat.lark.json_grammar.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .jsonscan import json_closing_suffix


class ConstraintError(ValueError):
    """A grammar or schema that cannot be enforced (bad JSON schema, unsupported construct)."""


def _tokenizer_ranks(tok) -> dict[bytes, int]:
    # a TiktokenTokenizer (tokenizer.model): its tiktoken encoding's BPE ranks
    enc = getattr(tok, "encoding", None)
    ranks = getattr(enc, "_mergeable_ranks", None)
    if not isinstance(ranks, dict) or not ranks:
        raise ConstraintError(f"constrained decoding cannot read the BPE ranks of {type(tok).__name__}")
    return ranks


def _pattern(tok) -> str:
    from glm4.tokenizer import GLM4_PAT_STR

    return getattr(getattr(tok, "encoding", None), "_pat_str", None) or GLM4_PAT_STR


class GrammarCompiler:
    """llguidance view of one tokenizer; builds grammars and per-request logits processors."""

    def __init__(self, tok, ranks: dict[bytes, int] | None = None, special_tokens: dict[str, int] | None = None,
                 eos_token_ids: list[int] | None = None, pattern: str | None = None):
        import llguidance

        self._llg = llguidance
        special = dict(special_tokens if special_tokens is not None else tok.special_tokens)
        eos = list(eos_token_ids if eos_token_ids is not None else tok.eos_token_ids)
        self.special_tokens, self.eos_token_ids = special, eos
        backend = getattr(tok, "backend", None)
        if ranks is None and backend is not None and hasattr(backend, "to_str"):
            # a `tokenizers` tokenizer.json: llguidance reads it directly
            self.vocab_size = int(tok.vocab_size)
            self.lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=eos)
        else:
            ranks = ranks if ranks is not None else _tokenizer_ranks(tok)
            self.vocab_size = max([*ranks.values(), *special.values()]) + 1
            self.lltok = llguidance.LLTokenizer.from_tiktoken(
                encoder=ranks, special_tokens=special, pattern=pattern or _pattern(tok), eos_token=eos,
                n_vocab=self.vocab_size)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def check(self, grammar: str) -> None:
        """Raise ConstraintError when llguidance rejects the grammar (e.g. an unsupported JSON schema)."""
        err = self._llg.LLMatcher.validate_grammar(self._llg.LLMatcher.grammar_from_lark(grammar), self.lltok)
        if err and not err.startswith("WARNING"):
            raise ConstraintError(err)

    def processor(self, grammar: str, max_tokens: int | None = None, close: str | None = None,
                  closer: Callable[[str], tuple[str, bool] | None] | None = None) -> GrammarProcessor:
        return GrammarProcessor(self, grammar, max_tokens, close, closer)

    def mask(self, matcher) -> torch.Tensor:
        """Boolean [vocab_size] of the tokens the matcher allows next."""
        words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words.unsqueeze(1) >> self._shifts) & 1  # [W, 32], bit j of word w = token 32w+j
        return bits.flatten()[: self.vocab_size].bool()


class GrammarProcessor:
    """Logits processor `fn(generated_ids, logits[V]) -> logits[V]` for one sequence (n=1).

    With `max_tokens` and `close` ("json": the reply is one JSON value; "tools": `name\\n{json}` call turns;
    "auto" / "auto_json": either, decided by how the current turn starts; "xml": XML calls, closed by
    `closer(text) -> (suffix, calls_complete)`, the format's closing_suffix), it also
    keeps the output parseable when the budget runs out: once the tokens left barely cover the shortest
    closing suffix of the JSON written so far (`"`, `null`, `}`/`]`..., then `<|observation|>` for a
    call), it forces that suffix, if the grammar accepts it, instead of letting the reply be cut.
    """

    SLACK = 8  # tokens of head-room: the closing suffix can grow by a few tokens per sampled token
    LATE_CALL = 32  # with this few tokens left, no further tool call is started

    def __init__(self, compiler: GrammarCompiler, grammar: str, max_tokens: int | None = None,
                 close: str | None = None, closer: Callable[[str], tuple[str, bool] | None] | None = None):
        self.compiler = compiler
        self.closer = closer
        self.matcher = compiler._llg.LLMatcher(compiler.lltok, compiler._llg.LLMatcher.grammar_from_lark(grammar),
                                               log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(self.matcher.get_error())
        self.consumed = 0
        self.max_tokens = max_tokens
        self.close = close
        self.text = b""  # bytes generated so far (for the closing guard)

    @property
    def failed(self) -> bool:
        return self.matcher.is_error()

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        new = list(token_ids[self.consumed:])
        self.consumed = len(token_ids)
        if new:
            self.matcher.consume_tokens(new)
            if self.close:
                self.text += self.compiler.lltok.decode_bytes(new)
        V = logits.shape[-1]
        keep = torch.zeros(V, dtype=torch.bool, device=logits.device)
        if self.matcher.is_error() or self.matcher.is_stopped():
            # grammar complete (or broken, which tokens from this mask cannot cause): only EOS may follow
            keep[[t for t in self.compiler.eos_token_ids if t < V]] = True
            return logits.masked_fill(~keep, float("-inf"))
        forced = self._closing_token(len(token_ids))
        if forced is not None and forced < V:
            keep[forced] = True
        else:
            allowed = self.compiler.mask(self.matcher).to(logits.device)
            n = min(V, allowed.shape[0])
            keep[:n] = allowed[:n]
            late = self.max_tokens is not None and self.max_tokens - len(token_ids) <= self.LATE_CALL
            turn = self.compiler.special_tokens.get("<|assistant|>")
            if late and self.close in ("tools", "auto", "auto_json") and turn is not None and turn < V and keep[turn]:
                keep[turn] = False  # too late for another call to fit: end the reply instead
                if not keep.any():
                    keep[turn] = True
        return logits.masked_fill(~keep, float("-inf"))

    def _closing_token(self, n_generated: int) -> int | None:
        if not self.close or self.max_tokens is None:
            return None
        left = self.max_tokens - n_generated
        if left > 64:
            return None
        text = self.text.decode("utf-8", errors="replace")
        end: list[int] = []
        obs = self.compiler.special_tokens.get("<|observation|>")
        if self.close == "xml":
            found = self.closer(text) if self.closer is not None else None
            if found is None:
                return None
            suffix, complete = found
            end = [obs] if obs is not None else []
            if complete:  # every call closed: with little budget left, end the reply rather than start another
                return end[0] if end and left <= self.LATE_CALL else None
            return self._force(suffix, end, left)
        seg = text.rsplit("<|assistant|>", 1)[-1]  # the current turn
        mode = self.close
        if mode in ("auto", "auto_json"):  # an answer starts with "\n", a call with its tool's name
            if seg.startswith("\n"):
                if mode == "auto":
                    return None  # free text needs no closing
                mode, text = "json", seg[1:]
            else:
                mode = "tools"
        if mode == "tools":  # the JSON arguments of the call in progress: after "name\n"
            if "\n" not in seg:
                return None
            text = seg.split("\n", 1)[1]
            end = [self.compiler.special_tokens["<|observation|>"]] if "<|observation|>" in self.compiler.special_tokens else []
        suffix = json_closing_suffix(text)
        if suffix is None or not (suffix or end):
            return None
        return self._force(suffix, end, left)

    def _force(self, suffix: str, end: list[int], left: int) -> int | None:
        # the first token of suffix + end when the budget left barely covers it and the grammar accepts it
        ids = (self.compiler.lltok.tokenize_str(suffix) if suffix else []) + end
        if left > len(ids) + 1 + self.SLACK:
            return None
        core = ids[:-1] if end and ids[-1] in self.compiler.eos_token_ids else ids  # llguidance never "consumes" EOS
        if core and self.matcher.validate_tokens(core) != len(core):
            return None  # the schema wants more than a plain close (e.g. a required key): let it be
        return ids[0]
