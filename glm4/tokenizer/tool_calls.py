"""Tool-call parsing for GLM-4 replies, batch and streaming, into OpenAI-shaped `tool_calls`.

Formats:
  chatglm / glm4 (glm-4-9b-chat, GLM-4-0414): the reply is `name\\n{json arguments}` (one per
      `<|assistant|>` turn; several `name\\n{...}` blocks in a row are several calls). A plain answer
      is any other text. Built-in tools `python` / `cogview` / `simple_browser` may carry a raw body.
  glm4_moe (GLM-4.5): `<think>reasoning</think>` then content and `<tool_call>name\\n<arg_key>k</arg_key>
      \\n<arg_value>v</arg_value>...</tool_call>` blocks; values are typed by the tool's JSON schema.

One incremental state machine per format; the batch parser is that machine fed the whole text, so the
stream and the batch agree on every split point by construction (and the tests check it). Events:

  ContentDelta(text)                     assistant text (whole reply content = concatenation, stripped)
  ReasoningDelta(text)                   GLM-4.5 thinking
  ToolCallStart(index, id, name)         a call begins; its name is final
  ToolCallDelta(index, arguments)        the next piece of the call's JSON arguments string
  ToolCallEnd(index, errors)             the call is complete; `errors` = JSON-schema violations (may be [])
  ToolCallInvalid(index, reason)         a started call proved malformed (bad/truncated JSON or XML); it is
                                         withdrawn and its raw text follows as ContentDelta
  Notice(message)                        text that looked like a call was kept as content (unknown tool,
                                         empty arguments)

`event.openai_delta()` gives the `choices[0].delta` dict of an OpenAI stream chunk (or None). With
`stream_arguments=False` a call is only announced once complete and valid (Start + one Delta + End), so
nothing is ever withdrawn. Malformed output never raises: it comes back as content with a reason.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

BUILTIN_TOOLS = {"python": "code", "cogview": "prompt", "simple_browser": "query"}
# glm_server.py always accepts these two built-ins even when not declared
ALWAYS_ALLOWED_BUILTINS = ("cogview", "simple_browser")
STOP_MARKERS = ("<|user|>", "<|observation|>", "<|endoftext|>", "<|system|>")
TURN_MARKER = "<|assistant|>"
_NAME_CHARS = re.compile(r"[\w.\-]*")


class ToolCallError(TypeError):
    """Misuse of the parser API (e.g. feeding a non-string)."""


# ---------------------------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContentDelta:
    text: str
    type: str = field(default="content", init=False)

    def openai_delta(self) -> dict:
        return {"content": self.text}


@dataclass(frozen=True)
class ReasoningDelta:
    text: str
    type: str = field(default="reasoning", init=False)

    def openai_delta(self) -> dict:
        return {"reasoning_content": self.text}


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str
    type: str = field(default="tool_call_start", init=False)

    def openai_delta(self) -> dict:
        return {"tool_calls": [{"index": self.index, "id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": ""}}]}


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    arguments: str
    type: str = field(default="tool_call_delta", init=False)

    def openai_delta(self) -> dict:
        return {"tool_calls": [{"index": self.index, "function": {"arguments": self.arguments}}]}


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    errors: tuple[str, ...] = ()
    type: str = field(default="tool_call_end", init=False)

    def openai_delta(self) -> None:
        return None


@dataclass(frozen=True)
class ToolCallInvalid:
    index: int
    reason: str
    type: str = field(default="tool_call_invalid", init=False)

    def openai_delta(self) -> None:
        return None


@dataclass(frozen=True)
class Notice:
    message: str
    type: str = field(default="notice", init=False)

    def openai_delta(self) -> None:
        return None


Event = ContentDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | ToolCallEnd | ToolCallInvalid | Notice


class ParsedOutput(tuple):
    """(content, tool_calls) with `.reasoning` and `.diagnostics` (reasons and schema errors) attached."""

    def __new__(cls, content, tool_calls, reasoning=None, diagnostics=()):
        self = super().__new__(cls, (content, tool_calls))
        self.reasoning = reasoning
        self.diagnostics = list(diagnostics)
        return self

    @property
    def content(self) -> str | None:
        return self[0]

    @property
    def tool_calls(self) -> list[dict]:
        return self[1]


def collect(events: Sequence[Event]) -> ParsedOutput:
    """Fold a parser's events into (content, tool_calls) exactly as a client of the stream would."""
    content, reasoning, diags = [], [], []
    calls: dict[int, dict] = {}
    for ev in events:
        if isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ToolCallStart):
            calls[ev.index] = {"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
        elif isinstance(ev, ToolCallDelta):
            calls[ev.index]["function"]["arguments"] += ev.arguments
        elif isinstance(ev, ToolCallEnd):
            diags += [f"tool call {ev.index} ({calls[ev.index]['function']['name']}): {e}" for e in ev.errors]
        elif isinstance(ev, ToolCallInvalid):
            calls.pop(ev.index, None)
            diags.append(ev.reason)
        elif isinstance(ev, Notice):
            diags.append(ev.message)
    tool_calls = [calls[i] for i in sorted(calls)]
    text = "".join(content)
    return ParsedOutput(text if text or not tool_calls else None, tool_calls,
                        "".join(reasoning) or None, diags)


# ---------------------------------------------------------------------------------------------
# tools: names, schemas, validation
# ---------------------------------------------------------------------------------------------
def _random_id() -> str:
    return "call_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str):
    """A compiled jsonschema validator (cached: check_schema is slow), or the schema's error message."""
    import jsonschema

    schema = json.loads(schema_json)
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        return cls(schema)
    except jsonschema.SchemaError as e:
        return f"tool schema is invalid: {e.message}"


class ToolSet:
    """Declared tools: name -> JSON schema of the arguments (None for built-ins)."""

    def __init__(self, tools: Sequence[dict] | None):
        self.schemas: dict[str, dict | None] = {}
        self.builtins: set[str] = set()
        for t in tools or []:
            if not isinstance(t, dict):
                continue
            fn = t.get("function") if isinstance(t.get("function"), dict) else t
            kind = t.get("type")
            if kind in BUILTIN_TOOLS and not isinstance(t.get("function"), dict):
                self.builtins.add(kind)
                self.schemas[kind] = None
            elif isinstance(fn.get("name"), str):
                params = fn.get("parameters")
                self.schemas[fn["name"]] = params if isinstance(params, dict) else None
        self._validators: dict[str, Any] = {}

    def known(self, name: str, chatglm: bool = False) -> bool:
        return name in self.schemas or (chatglm and name in ALWAYS_ALLOWED_BUILTINS)

    def raw_body_key(self, name: str) -> str | None:
        return BUILTIN_TOOLS.get(name) if (name in self.builtins or name in ALWAYS_ALLOWED_BUILTINS) else None

    def param_types(self, name: str, key: str) -> set[str] | None:
        schema = self.schemas.get(name) or {}
        props = schema.get("properties") if isinstance(schema, dict) else None
        spec = props.get(key) if isinstance(props, dict) else None
        t = spec.get("type") if isinstance(spec, dict) else None
        if isinstance(t, str):
            return {t}
        if isinstance(t, list):
            return {x for x in t if isinstance(x, str)}
        return None

    def validate(self, name: str, args: Any) -> tuple[str, ...]:
        schema = self.schemas.get(name)
        if not isinstance(args, dict):
            return ("arguments are not a JSON object",)
        if not schema:
            return ()
        v = self._validators.get(name)
        if v is None:
            try:
                key = json.dumps(schema, sort_keys=True, default=str)
            except ValueError:  # e.g. a circular schema
                return ("tool schema is not serialisable",)
            v = self._validators[name] = _validator(key)
        if isinstance(v, str):
            return (v,)
        errs = sorted(v.iter_errors(args), key=lambda e: [str(p) for p in e.path])
        return tuple(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errs)


# ---------------------------------------------------------------------------------------------
# the stream parser
# ---------------------------------------------------------------------------------------------
class Stripper:
    """Emits a text channel with leading and trailing whitespace held back (== str.strip of the total)."""

    def __init__(self, make):
        self.make, self.started, self.pending = make, False, ""

    def push(self, text: str) -> list[Event]:
        if not self.started:
            text = text.lstrip()
            if not text:
                return []
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        return [self.make(body)] if body else []


def _partial_marker(text: str, markers: Sequence[str]) -> int:
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


class StreamParser:
    """Incremental parser: `.feed(delta) -> [events]`, `.finish() -> [events]` (see module docstring)."""

    def __init__(self, tools: Sequence[dict] | None = None, stream_arguments: bool = True,
                 id_factory: Callable[[], str] | None = None):
        self.tools = ToolSet(tools)
        self.stream_arguments = stream_arguments
        self.new_id = id_factory or _random_id
        self.buf = ""  # text not yet consumed by the outer splitter
        self.seg = ""  # current turn's unconsumed text
        self.done = False  # a stop marker was seen
        self.finished = False
        self.n_calls = 0
        self._content = Stripper(ContentDelta)
        self._reasoning = Stripper(ReasoningDelta)
        self._held: dict[int, list[Event]] = {}
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
                self._reset_segment()
                if m != TURN_MARKER:
                    self.done = True
                continue
            keep = 0 if final else _partial_marker(self.buf, (TURN_MARKER, *STOP_MARKERS))
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

    def _reset_segment(self) -> None:
        raise NotImplementedError

    def _advance(self, seg_final: bool) -> list[Event]:
        raise NotImplementedError


def _json_str_chars(s: str) -> str:
    # escaping char by char concatenates to json.dumps(s)[1:-1], so streamed pieces join up exactly
    return json.dumps(s, ensure_ascii=False)[1:-1]


class Glm4StreamParser(StreamParser):
    """chatglm / glm4: `name\\n{json}` calls; anything else is content."""

    def _reset_segment(self) -> None:
        self.seg = ""
        self.state = "start"
        self.raw = ""  # text of the call in progress (restored as content if it proves malformed)

    def _advance(self, seg_final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            if self.state == "content":
                if self.seg:
                    out.append(ContentDelta(self.seg))
                    self.seg = ""
                return out
            if self.state == "start":
                res = self._decide(seg_final)
                if res is None:
                    return out
                out += res
                continue
            if self.state == "args":
                done = self._scan_json(out)
                if done:
                    continue
                if seg_final:
                    out += [ToolCallInvalid(self.call_index, f"truncated JSON arguments for {self.call_name!r}"),
                            ContentDelta(self.raw)]
                    self.state = "content"
                    continue
                return out
            if self.state == "raw":
                if self.seg:
                    out.append(ToolCallDelta(self.call_index, _json_str_chars(self.seg)))
                    self.raw += self.seg
                    self.seg = ""
                if seg_final:
                    key = self.tools.raw_body_key(self.call_name)
                    out += [ToolCallDelta(self.call_index, '"}'),
                            ToolCallEnd(self.call_index, self.tools.validate(self.call_name, {key: self.raw}))]
                    self.state = "content"
                    continue
                return out

    def _decide(self, seg_final: bool) -> list[Event] | None:
        """At the start of a (sub)turn: call, content, or wait for more text (None)."""
        s = self.seg
        rest = s.lstrip()
        lead = s[: len(s) - len(rest)]
        nl = rest.find("\n")
        line = rest if nl < 0 else rest[:nl]
        if not rest:
            if seg_final:
                self.state = "content"
                return []
            return None
        if _NAME_CHARS.fullmatch(line) is None:
            self.state = "content"
            return []
        known = self.tools.known(line, chatglm=True)
        after = rest[nl + 1:] if nl >= 0 else ""
        if nl < 0 or not after.strip():
            if not seg_final:
                return None
            self.state = "content"
            return [Notice(f"tool {line!r} called with empty arguments")] if known else []
        if after[0] == "{":
            if not known:
                self.state = "content"
                return [Notice(f"unknown tool {line!r}: kept as content")]
            out = self._start_call(line)
            self.raw = lead + line + "\n"
            self.seg = after
            self.state = "args"
            self.depth, self.in_str, self.esc, self.args = 0, False, False, ""
            return out
        key = self.tools.raw_body_key(line) if known else None
        if key is not None and not after[0].isspace():
            out = self._start_call(line) + [ToolCallDelta(self.call_index, "{" + json.dumps(key) + ': "')]
            self.raw = ""
            self.seg = after
            self.state = "raw"
            return out
        self.state = "content"
        return [Notice(f"tool {line!r} not followed by JSON arguments: kept as content")] if known else []

    def _scan_json(self, out: list[Event]) -> bool:
        """Consume self.seg into the JSON arguments; True when the top-level object closed."""
        s, i, closed = self.seg, 0, False
        depth, in_str, esc = self.depth, self.in_str, self.esc
        while i < len(s):
            c = s[i]
            i += 1
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    closed = True
                    break
        self.depth, self.in_str, self.esc = depth, in_str, esc
        piece, self.seg = s[:i], s[i:]
        if piece:
            self.args += piece
            self.raw += piece
            out.append(ToolCallDelta(self.call_index, piece))
        if not closed:
            return False
        try:
            val = json.loads(self.args)
        except ValueError as e:
            out += [ToolCallInvalid(self.call_index, f"invalid JSON arguments for {self.call_name!r}: {e}"),
                    ContentDelta(self.raw)]
            self.state = "content"
            return True
        if not isinstance(val, dict):
            out += [ToolCallInvalid(self.call_index, f"arguments for {self.call_name!r} are not an object"),
                    ContentDelta(self.raw)]
            self.state = "content"
            return True
        out.append(ToolCallEnd(self.call_index, self.tools.validate(self.call_name, val)))
        self.state = "start"  # another `name\n{...}` may follow
        return True


_XML_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
             "<arg_value>", "</arg_value>")


class Glm45StreamParser(StreamParser):
    """glm4_moe: `<think>` reasoning, content, and `<tool_call>` XML blocks typed by the schema."""

    def _reset_segment(self) -> None:
        self.seg = ""
        self.state = "text"
        self.in_think = False

    def _text_out(self, text: str) -> list[Event]:
        if not text:
            return []
        return [ReasoningDelta(text) if self.in_think else ContentDelta(text)]

    def _invalid(self, reason: str) -> list[Event]:
        self.state = "text"
        return [ToolCallInvalid(self.call_index, reason), ContentDelta(self.raw)]

    def _advance(self, seg_final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            s = self.seg
            if self.state == "text":
                lt = s.find("<")
                if lt < 0:
                    out += self._text_out(s)
                    self.seg = ""
                    return out
                out += self._text_out(s[:lt])
                s = self.seg = s[lt:]
                tag = next((t for t in _XML_TAGS if s.startswith(t)), None)
                if tag is None:
                    if not seg_final and any(t.startswith(s) for t in _XML_TAGS):
                        return out  # maybe a tag split across deltas
                    out += self._text_out("<")
                    self.seg = s[1:]
                    continue
                self.seg = s[len(tag):]
                if tag == "<think>":
                    self.in_think = True
                elif tag == "</think>":
                    self.in_think = False
                elif tag == "<tool_call>" and not self.in_think:
                    self.state, self.raw, self.name = "name", tag, ""
                else:
                    out += self._text_out(tag)
                continue
            if self.state == "name":
                ends = [i for i in (s.find("\n"), s.find("<")) if i >= 0]
                if not ends:
                    if seg_final:
                        self.raw += s
                        self.seg = ""
                        self.state = "text"
                        out += [Notice("truncated tool call"), ContentDelta(self.raw)]
                        continue
                    return out
                i = min(ends)
                name = (self.name + s[:i]).strip()
                self.raw += s[:i]
                self.seg = s[i:]
                if not self.tools.known(name):
                    self.state = "text"
                    out += [Notice(f"unknown tool {name!r}: kept as content"), ContentDelta(self.raw)]
                    continue
                out += self._start_call(name)
                self.state, self.n_args, self.key = "between", 0, None
                continue
            # inside a call: between / key / value
            if self.state in ("between", "between_kv"):
                body = s.lstrip()
                self.raw += s[: len(s) - len(body)]
                self.seg = s = body
                if not s:
                    if seg_final:
                        out += self._invalid(f"truncated tool call {self.call_name!r}")
                        continue
                    return out
                want = ("<arg_key>", "</tool_call>") if self.state == "between" else ("<arg_value>",)
                tag = next((t for t in want if s.startswith(t)), None)
                if tag is None:
                    if not seg_final and any(t.startswith(s) for t in want):
                        return out
                    out += self._invalid(f"malformed tool call {self.call_name!r}: expected {' or '.join(want)}")
                    continue
                self.raw += tag
                self.seg = s[len(tag):]
                if tag == "</tool_call>":
                    out.append(ToolCallDelta(self.call_index, "}" if self.n_args else "{}"))
                    out.append(ToolCallEnd(self.call_index, self.tools.validate(self.call_name, self.args_obj())))
                    self.state = "text"
                elif tag == "<arg_key>":
                    self.state, self.key_buf = "key", ""
                else:
                    self.state, self.val_buf = "value", ""
                    self.typed = self._is_string(self.key)
                    if self.typed:
                        out.append(ToolCallDelta(self.call_index, '"'))
                continue
            close = "</arg_key>" if self.state == "key" else "</arg_value>"
            j = s.find(close)
            if j < 0:
                keep = 0 if seg_final else _partial_marker(s, (close,))
                take = s[: len(s) - keep]
                self._collect(take, out)
                self.seg = s[len(take):]
                if seg_final:
                    out += self._invalid(f"truncated tool call {self.call_name!r}")
                    continue
                return out
            self._collect(s[:j], out)
            self.raw += close
            self.seg = s[j + len(close):]
            if self.state == "key":
                self.key = self.key_buf.strip()
                sep = "{" if self.n_args == 0 else ", "
                out.append(ToolCallDelta(self.call_index, sep + json.dumps(self.key, ensure_ascii=False) + ": "))
                self.n_args += 1
                self.state = "between_kv"
            else:
                if self.typed:
                    out.append(ToolCallDelta(self.call_index, '"'))
                    self._values.append((self.key, self.val_buf))
                else:
                    val = self._typed_value(self.key, self.val_buf)
                    self._values.append((self.key, val))
                    out.append(ToolCallDelta(self.call_index, json.dumps(val, ensure_ascii=False)))
                self.state = "between"

    def _start_call(self, name: str) -> list[Event]:
        self._values: list[tuple[str, Any]] = []
        return super()._start_call(name)

    def args_obj(self) -> dict:
        return dict(self._values)

    def _collect(self, text: str, out: list[Event]) -> None:
        if not text:
            return
        self.raw += text
        if self.state == "key":
            self.key_buf += text
            return
        self.val_buf += text
        if self.typed:
            out.append(ToolCallDelta(self.call_index, _json_str_chars(text)))

    def _is_string(self, key: str) -> bool:
        types = self.tools.param_types(self.call_name, key)
        return types is None or "string" in types

    def _typed_value(self, key: str, raw: str) -> Any:
        try:
            return json.loads(raw.strip())
        except ValueError:
            return raw  # schema validation reports the type mismatch


def make_stream_parser(family: str, tools: Sequence[dict] | None = None, stream_arguments: bool = True,
                       id_factory: Callable[[], str] | None = None) -> StreamParser:
    cls = Glm45StreamParser if family == "glm4_moe" else Glm4StreamParser
    return cls(tools, stream_arguments=stream_arguments, id_factory=id_factory)


def parse_text(family: str, text: str, tools: Sequence[dict] | None = None,
               id_factory: Callable[[], str] | None = None) -> ParsedOutput:
    """Batch parse: the stream parser fed the whole text at once."""
    if not isinstance(text, str):
        raise ToolCallError(f"parse expects str, got {type(text).__name__}")
    p = make_stream_parser(family, tools, id_factory=id_factory)
    return collect(p.feed(text) + p.finish())
