"""What every chat format provides, and the pieces formats share: labelled render parts, the reply stream parser.

A format (one module in this package) is a `ChatFormatSpec` subclass: how it renders messages (byte for
byte as its official template), how it parses a reply (content, reasoning, tool calls) incrementally,
the grammar that enforces a required / named tool call, the text that closes a call cut short, and the
tokens that end its turn.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from typing import Any

from glm4.tokenizer import CHAT_EOS_TOKENS, GLM4_SPECIAL_TOKENS

from ..events import (
    ContentDelta,
    Event,
    Notice,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallInvalid,
    ToolCallStart,
)
from ..lark import json_grammar
from ..messages import ChatFormatError
from ..tools import ToolSet

STOP_MARKERS = ("<|user|>", "<|observation|>", "<|endoftext|>", "<|system|>")
TURN_MARKER = "<|assistant|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_SPECIALS = frozenset(GLM4_SPECIAL_TOKENS)
Part = tuple[str, bool, str]  # (text, is_special, label)


class ToolCallError(TypeError):
    """Misuse of the parser API (e.g. feeding a non-string)."""


# ---------------------------------------------------------------------------------------------
# rendering: a list of labelled parts
# ---------------------------------------------------------------------------------------------
def jinja_str(d: dict, key: str) -> str:
    # `{{ d.key }}` in jinja: missing -> "", None -> "None"
    return str(d[key]) if isinstance(d, dict) and key in d else ""


class Parts:
    """Rendered text as parts labelled by the role that produced them (SFT loss masks read the labels)."""

    def __init__(self):
        self.parts: list[Part] = [("[gMASK]", True, "prefix"), ("<sop>", True, "prefix")]
        self.after_assistant = False  # the next opening token ends an assistant turn (trained)

    def open(self, token: str, role: str) -> None:
        label = "assistant" if self.after_assistant else ("generation_prompt" if role == "assistant" else role)
        self.parts.append((token, token in _SPECIALS, label))
        self.after_assistant = False

    def text(self, s: str, role: str) -> None:
        if s:
            self.parts.append((s, False, role))

    def end(self, role: str) -> None:
        self.after_assistant = role == "assistant"

    def turn(self, role: str, body: str) -> None:
        """`<|role|>` + body, one whole turn."""
        self.open(f"<|{role}|>", role)
        self.text(body, role)
        self.end(role)


# ---------------------------------------------------------------------------------------------
# parsing: the outer splitter on turn / stop markers, whitespace stripping, held calls
# ---------------------------------------------------------------------------------------------
def random_call_id() -> str:
    return "call_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


class Stripper:
    """Emits a text channel with leading and trailing whitespace held back (== str.strip of the total)."""

    def __init__(self, make):
        self.make, self.started, self.pending = make, False, ""

    def push(self, text: str) -> list:
        if not self.started:
            text = text.lstrip()
            if not text:
                return []
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        return [self.make(body)] if body else []


def partial_marker(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some marker."""
    if "<" not in text[-16:]:  # every marker starts with "<" and is shorter than 16 chars
        return 0
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


def json_str_chars(s: str) -> str:
    # escaping char by char concatenates to json.dumps(s)[1:-1], so streamed pieces join up exactly
    return json.dumps(s, ensure_ascii=False)[1:-1]


NAME_CHARS = re.compile(r"[\w.\-]*")


class StreamParser:
    """Incremental reply parser: `.feed(delta) -> [events]`, `.finish() -> [events]` (events: glm4.chat.events).

    The batch parse is this machine fed the whole text, so stream and batch agree on every split point by
    construction. `in_reasoning`: the prompt ended inside `<think>`, so the reply starts as thinking. With
    `stream_arguments=False` a call is only announced once complete and valid (Start + one Delta + End), so
    nothing is ever withdrawn. Malformed output never raises: it comes back as content with a reason."""

    def __init__(self, tools: Sequence[dict] | None = None, stream_arguments: bool = True,
                 id_factory: Callable[[], str] | None = None, in_reasoning: bool = False):
        self.tools = ToolSet(tools)
        self.stream_arguments = stream_arguments
        self.new_id = id_factory or random_call_id
        self.buf = ""  # text not yet consumed by the outer splitter
        self.seg = ""  # current turn's unconsumed text
        self.done = False  # a stop marker was seen
        self.finished = False
        self.n_calls = 0
        self._content = Stripper(ContentDelta)
        self._reasoning = Stripper(ReasoningDelta)
        self._held: dict[int, list[Event]] = {}
        self.in_think = in_reasoning
        self._reset_segment()

    # -- public ------------------------------------------------------------------------------------
    def feed(self, delta: str) -> list[Event]:
        if not isinstance(delta, str):
            raise ToolCallError(f"feed expects str, got {type(delta).__name__}")
        if self.finished:
            raise ToolCallError("feed after finish")
        self.buf += delta
        return self._post(self._split(final=False))

    def finish(self) -> list[Event]:
        if self.finished:
            return []
        self.finished = True
        return self._post(self._split(final=True))

    # -- outer: turn markers and stop markers ------------------------------------------------------
    def _split(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while not self.done:
            hits = [(self.buf.find(m), m) for m in (TURN_MARKER, *STOP_MARKERS)]
            hits = [(i, m) for i, m in hits if i >= 0]
            if hits:
                i, m = min(hits)
                self.seg += self.buf[:i]
                self.buf = self.buf[i + len(m):]
                out += self._advance(seg_final=True)
                self.in_think = False
                self._reset_segment()
                if m != TURN_MARKER:
                    self.done = True
                continue
            keep = 0 if final else partial_marker(self.buf, (TURN_MARKER, *STOP_MARKERS))
            self.seg += self.buf[: len(self.buf) - keep]
            self.buf = self.buf[len(self.buf) - keep:]
            out += self._advance(seg_final=final)
            break
        if self.done:
            self.buf = ""
        return out

    # -- post-processing: strip content, optionally hold calls until complete --------------------
    def _post(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for ev in events:
            if isinstance(ev, ContentDelta):
                out += self._content.push(ev.text)
            elif isinstance(ev, ReasoningDelta):
                out += self._reasoning.push(ev.text)
            elif self.stream_arguments:
                out.append(ev)
            elif isinstance(ev, ToolCallStart):
                self._held[ev.index] = [ev]
            elif isinstance(ev, ToolCallDelta):
                self._held[ev.index].append(ev)
            elif isinstance(ev, ToolCallEnd):
                held = self._held.pop(ev.index)
                args = "".join(e.arguments for e in held[1:])
                out += [held[0], ToolCallDelta(ev.index, args), ev]
            elif isinstance(ev, ToolCallInvalid):
                self._held.pop(ev.index, None)
                out.append(Notice(ev.reason))
            else:
                out.append(ev)
        return out

    # -- helpers for subclasses --------------------------------------------------------------------
    def _start_call(self, name: str) -> list[Event]:
        self.call_index = self.n_calls
        self.n_calls += 1
        self.call_name = name
        return [ToolCallStart(self.call_index, self.new_id(), name)]

    def _thinking(self, seg_final: bool, ends: Sequence[str] = (THINK_CLOSE,)) -> tuple[list[Event], bool]:
        """Consume reasoning text at the front of the segment: (events, still thinking and waiting for text).

        Reasoning ends at `</think>` (consumed) or at any other marker in `ends` (left for the caller,
        e.g. a `<tool_call>` written inside the thinking)."""
        out: list[Event] = []
        if not self.in_think:
            return out, False
        s = self.seg
        hits = [(s.find(m), m) for m in ends]
        hits = [(i, m) for i, m in hits if i >= 0]
        if hits:
            i, m = min(hits)
            if s[:i]:
                out.append(ReasoningDelta(s[:i]))
            self.seg = s[i + len(m):] if m == THINK_CLOSE else s[i:]
            self.in_think = False
            return out, False
        keep = 0 if seg_final else partial_marker(s, ends)
        if s[: len(s) - keep]:
            out.append(ReasoningDelta(s[: len(s) - keep]))
        self.seg = s[len(s) - keep:]
        return out, True

    def _reset_segment(self) -> None:
        raise NotImplementedError

    def _advance(self, seg_final: bool) -> list[Event]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# the format interface
# ---------------------------------------------------------------------------------------------
class ChatFormatSpec:
    """One chat format. Subclasses set the class attributes and implement the methods below."""

    name: str = ""  # the public name (registry key)
    family: str = ""  # the family name earlier glm4 versions used ("chatglm", "glm4", "glm4_moe")
    aliases: tuple[str, ...] = ()
    template_file: str = ""  # the built-in jinja twin in glm4/chat/templates (tests render it as the oracle)
    stop_tokens: tuple[str, ...] = tuple(CHAT_EOS_TOKENS)
    thinks: bool = False  # writes `<think>` reasoning
    openai_messages: bool = True  # the template reads OpenAI-shaped messages (else the native 9b-chat shape)
    close_mode: str = "xml"  # how GrammarProcessor closes a forced call cut short: "tools" (name\n{json}) | "xml"

    @classmethod
    def matches_template(cls, template: str) -> bool:
        """Whether a checkpoint's chat template text is this format's (formats registered before this one,
        newer ones, have been ruled out)."""
        return False

    # -- rendering
    def normalize(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
        """(messages, tools) -> what this format's template consumes: (messages, tools keyword)."""
        raise NotImplementedError

    def render_parts(self, msgs: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                     kw: dict[str, Any]) -> list[Part]:
        raise NotImplementedError

    # -- parsing
    def starts_in_reasoning(self, prompt: str) -> bool:
        """Whether a reply to this rendered prompt begins inside `<think>` (the prompt opened it)."""
        return self.thinks and prompt.endswith(THINK_OPEN)

    def stream_parser(self, tools: Sequence[dict] | None = None, stream_arguments: bool = True,
                      id_factory: Callable[[], str] | None = None, in_reasoning: bool = False) -> StreamParser:
        raise NotImplementedError

    # -- constrained decoding (lark text for llguidance; see glm4.chat.grammar)
    def calls_grammar(self, special: set[str], tools: list[dict], parallel: bool, in_reasoning: bool,
                      thinking: bool = True) -> str:
        """A reply that is one (or, parallel, several) calls of `tools`, arguments valid under their schemas.

        `in_reasoning`: the prompt opened `<think>`; `thinking`: the reply may think before calling."""
        raise NotImplementedError

    def json_answer_grammar(self, schema: dict | None, in_reasoning: bool) -> str:
        """A reply that is one JSON value (response_format json_object / json_schema)."""
        return json_grammar(schema if schema is not None else {"type": "object"}, prefix="\n")

    def auto_grammar(self, special: set[str], tools: list[dict], parallel: bool, json_answer: bool,
                     schema: dict | None) -> str | None:
        """Under tool_choice "auto": a plain answer or calls; None when this format leaves auto unconstrained."""
        return None

    def closing_suffix(self, text: str, tools: list[dict], in_reasoning: bool = False) -> tuple[str, bool] | None:
        """The shortest text that completes a forced-call reply begun as `text`: (suffix, every call closed)."""
        return None

    def check(self, template_kwargs: dict[str, Any]) -> None:
        for k in ("enable_thinking", "clear_thinking"):
            if template_kwargs.get(k) is not None and not isinstance(template_kwargs[k], bool):
                raise ChatFormatError(f"{k} must be true or false")
