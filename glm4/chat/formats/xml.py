"""What the XML-call formats share (GLM-4.5, 4.6, 4.7): the reply parser, the grammar for required / named
tool_choice, and the closing guard's suffix. `sep` is what the template writes between a call's tags:
"\\n" for GLM-4.5 / 4.6, "" for GLM-4.7.

    <tool_call>get_weather{sep}<arg_key>city</arg_key>{sep}<arg_value>Paris</arg_value>{sep}</tool_call>
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..events import ContentDelta, Event, Notice, ReasoningDelta, ToolCallDelta, ToolCallEnd, ToolCallInvalid
from ..jsonscan import json_closing_suffix
from ..lark import TOJSON_OPTS, json_rule, lark_str, tag
from ..messages import text_of
from ..tools import tool_function
from .base import THINK_CLOSE, THINK_OPEN, StreamParser, json_str_chars, partial_marker

TOOLS_HEAD = (
    "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
XML_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
            "<arg_value>", "</arg_value>")


def tools_block(tools: list[dict], tail: str) -> str:
    return TOOLS_HEAD + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools) + tail


def xml_call(name: str, args: dict, sep: str) -> str:
    """One call as the templates write it; `sep` is "\\n" (4.5 / 4.6) or "" (4.7)."""
    body = "<tool_call>" + name + sep
    for k, v in args.items():
        val = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        body += f"<arg_key>{k}</arg_key>{sep}<arg_value>{val}</arg_value>{sep}"
    return body + "</tool_call>"


def split_reasoning(m: dict) -> tuple[str, str]:
    """(reasoning, content) of an assistant message as the templates read it: `reasoning_content`, else the
    text before `</think>` in the content."""
    content = text_of(m.get("content"))
    if isinstance(m.get("reasoning_content"), str):
        return m["reasoning_content"], content
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, content.split("</think>")[-1].lstrip("\n")
    return "", content


# ---------------------------------------------------------------------------------------------
# the reply parser
# ---------------------------------------------------------------------------------------------
class XmlCallParser(StreamParser):
    """`<think>` reasoning, content, and `<tool_call>` blocks with or without newlines between the tags.

    A `<tool_call>` written inside the reasoning ends the reasoning and is parsed as a call."""

    def _reset_segment(self) -> None:
        self.seg = ""
        self.state = "text"
        self.think_cut = False

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
                found = next((t for t in XML_TAGS if s.startswith(t)), None)
                if found is None:
                    if not seg_final and any(t.startswith(s) for t in XML_TAGS):
                        return out  # maybe a tag split across deltas
                    out += self._text_out("<")
                    self.seg = s[1:]
                    continue
                self.seg = s[len(found):]
                if found == THINK_OPEN and not self.in_think:
                    self.in_think = True
                elif found == THINK_CLOSE and (self.in_think or self.think_cut):
                    self.in_think = self.think_cut = False  # (a late `</think>` closes what a call cut short)
                elif found == "<tool_call>":
                    self.think_cut = self.in_think  # a call ends the thinking it was written in
                    self.in_think = False
                    self.state, self.raw = "name", found
                else:
                    out += self._text_out(found)
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
                name = s[:i].strip()
                self.raw += s[:i]
                self.seg = s[i:]
                if not self.tools.known(name):
                    self.state = "text"
                    out += [Notice(f"unknown tool {name!r}: kept as content"), ContentDelta(self.raw)]
                    continue
                out += self._start_call(name)
                self.state, self.n_args, self.key = "between", 0, None
                continue
            if self.state in ("between", "between_kv"):  # inside a call, between tags
                body = s.lstrip()
                self.raw += s[: len(s) - len(body)]
                self.seg = s = body
                if not s:
                    if seg_final:
                        out += self._invalid(f"truncated tool call {self.call_name!r}")
                        continue
                    return out
                want = ("<arg_key>", "</tool_call>") if self.state == "between" else ("<arg_value>",)
                found = next((t for t in want if s.startswith(t)), None)
                if found is None:
                    if not seg_final and any(t.startswith(s) for t in want):
                        return out
                    out += self._invalid(f"malformed tool call {self.call_name!r}: expected {' or '.join(want)}")
                    continue
                self.raw += found
                self.seg = s[len(found):]
                if found == "</tool_call>":
                    out.append(ToolCallDelta(self.call_index, "}" if self.n_args else "{}"))
                    out.append(ToolCallEnd(self.call_index, self.tools.validate(self.call_name, dict(self.values))))
                    self.state = "text"
                elif found == "<arg_key>":
                    self.state, self.key_buf = "key", ""
                else:
                    self.state, self.val_buf = "value", ""
                    self.verbatim = self.tools.is_text(self.call_name, self.key)
                    if self.verbatim:
                        out.append(ToolCallDelta(self.call_index, '"'))
                continue
            close = "</arg_key>" if self.state == "key" else "</arg_value>"
            j = s.find(close)
            if j < 0:
                keep = 0 if seg_final else partial_marker(s, (close,))
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
                if self.verbatim:  # streamed as it came
                    out.append(ToolCallDelta(self.call_index, '"'))
                    self.values.append((self.key, self.val_buf))
                else:
                    val, notice = self.tools.xml_value(self.call_name, self.key, self.val_buf)
                    self.values.append((self.key, val))
                    out.append(ToolCallDelta(self.call_index, json.dumps(val, ensure_ascii=False)))
                    if notice:
                        out.append(Notice(notice))
                self.state = "between"

    def _start_call(self, name: str) -> list[Event]:
        self.values: list[tuple[str, Any]] = []
        return super()._start_call(name)

    def _collect(self, text: str, out: list[Event]) -> None:
        if not text:
            return
        self.raw += text
        if self.state == "key":
            self.key_buf += text
            return
        self.val_buf += text
        if self.verbatim:
            out.append(ToolCallDelta(self.call_index, json_str_chars(text)))


# ---------------------------------------------------------------------------------------------
# grammar for required / named tool_choice, and the closing guard's suffix
# ---------------------------------------------------------------------------------------------
def _closed_object(schema: dict | None) -> bool:
    return isinstance(schema, dict) and schema.get("additionalProperties") is False


def xml_arg_plan(schema: dict | None) -> list[tuple[str, bool, str, Any]]:
    """The arguments of an XML call in the order the grammar writes them: (key, required, kind, spec).

    kind is how the value is written (as the parser reads it back): "raw" text for a property typed string
    or untyped (spec = (minLength, maxLength)), "enum" for an untyped/string enum of strings (spec = the
    values), else "json" (spec = the property's schema)."""
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        return []
    props = schema["properties"]
    required = [k for k in schema.get("required") or [] if k in props]
    order = required + [k for k in props if k not in required]
    plan = []
    for key in order:
        spec = props[key] if isinstance(props[key], dict) else {}
        t = spec.get("type")
        types = {t} if isinstance(t, str) else set(t) if isinstance(t, list) else None
        enum = spec.get("enum", [spec["const"]] if "const" in spec else None)
        if types is None or "string" in types:
            if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
                plan.append((key, key in required, "enum", list(enum)))
            else:
                lo, hi = spec.get("minLength", 0), spec.get("maxLength")
                ok = isinstance(lo, int) and (hi is None or isinstance(hi, int))
                plan.append((key, key in required, "raw", (lo, hi) if ok else (0, None)))
        else:
            plan.append((key, key in required, "json", spec))
    return plan


def xml_calls_grammar(special: set[str], tools: list[dict], parallel: bool, sep: str, start: str) -> str:
    """XML calls of `tools`: `<tool_call>name{sep}` then `<arg_key>k</arg_key>{sep}<arg_value>v</arg_value>{sep}`
    per argument (required ones first, in schema order; a string value raw, any other JSON-encoded under the
    property's schema) then `</tool_call>`; `start` is the lark of what comes before the calls."""
    if not tools:
        raise ValueError("tool calls need at least one tool")
    t = lambda s: tag(special, s)  # noqa: E731
    s = f" {lark_str(sep)}" if sep else ""
    obs = "<|observation|>" if "<|observation|>" in special else ""
    rules = [f"start: {start} calls {obs}",
             f"think: {t('<think>')} THINK",
             r"THINK: /(?s:.*)<\/think>/ & ~/(?s:.*<\/think>.+)/",  # any text up to the first </think>
             r"RAW: /(?s:.*)<\/arg_value>/ & ~/(?s:.*<\/arg_value>.+)/",
             (f"calls: call ({s} call)*" if sep else "calls: call+") if parallel else "calls: call"]
    alts = []
    for i, tool in enumerate(tools):
        fn = tool_function(tool)
        alts.append(f"call_{i}")
        parts = []
        for j, (key, required, kind, spec) in enumerate(xml_arg_plan(fn.get("parameters"))):
            head = f"{t('<arg_key>')} {lark_str(key)} {t('</arg_key>')}{s} {t('<arg_value>')}"
            end = f"{t('</arg_value>')}{s}"
            if kind == "enum":
                value = "(" + " | ".join(lark_str(v) for v in spec) + f") {end}"
            elif kind == "raw":
                lo, hi = spec
                if lo or hi is not None:  # minLength / maxLength, in characters
                    rules.append(f"RAW_{i}_{j}: /(?s:.{{{lo},{'' if hi is None else hi}}})<\\/arg_value>/ "
                                 r"& ~/(?s:.*<\/arg_value>.+)/")
                    value = f"RAW_{i}_{j}{s}"
                else:
                    value = f"RAW{s}"
            else:
                rules.append(f"json_{i}_{j}: {json_rule(spec, TOJSON_OPTS)}")  # as tojson writes it
                value = f"json_{i}_{j} {end}"
            rules.append(f"arg_{i}_{j}: {head} {value}")
            parts.append(f"arg_{i}_{j}" + ("" if required else "?"))
        if fn.get("parameters") is not None and not xml_arg_plan(fn.get("parameters")) and \
                not _closed_object(fn.get("parameters")):
            # an open object without declared properties: any keys, raw values
            rules.append(f"any_arg_{i}: {t('<arg_key>')} /[A-Za-z_][A-Za-z0-9_.-]*/ {t('</arg_key>')}{s} "
                         f"{t('<arg_value>')} RAW{s}")
            parts.append(f"any_arg_{i}*")
        rules.append(f"call_{i}: {t('<tool_call>')} {lark_str(fn['name'] + sep)} {' '.join(parts)} "
                     f"{t('</tool_call>')}")
    rules.append("call: " + " | ".join(alts))
    return "\n".join(rules)


def minimal_json(schema: dict | None) -> Any:
    """A small value meant to satisfy `schema` (the closing guard checks it against the grammar anyway)."""
    s = schema if isinstance(schema, dict) else {}
    if "const" in s:
        return s["const"]
    if isinstance(s.get("enum"), list) and s["enum"]:
        return s["enum"][0]
    t = s.get("type")
    t = next((x for x in t if x != "null"), t[0] if t else None) if isinstance(t, list) else t
    if t in ("integer", "number"):
        lo = s.get("minimum", s.get("exclusiveMinimum", 0) + (1 if "exclusiveMinimum" in s else 0))
        return max(0, lo) if "maximum" not in s else min(max(0, lo), s["maximum"])
    if t == "boolean":
        return False
    if t == "string":
        return "a" * int(s.get("minLength", 0) or 0)
    if t == "array":
        return [minimal_json(s.get("items"))] * int(s.get("minItems", 0) or 0)
    if t == "object" or "properties" in s:
        props = s.get("properties") or {}
        return {k: minimal_json(props.get(k)) for k in s.get("required") or []}
    return None


def _minimal_value(kind: str, spec: Any) -> str:
    # the shortest value text of an xml_arg_plan entry
    if kind == "enum":
        return spec[0]
    if kind == "raw":
        return "a" * spec[0]
    return json.dumps(minimal_json(spec), ensure_ascii=False)


def xml_closing_suffix(text: str, tools: list[dict], sep: str = "\n", prelude: str = "glm45"
                       ) -> tuple[str, bool] | None:
    """The shortest text that ends an XML tool-call reply begun as `text` (see xml_calls_grammar): the open
    reasoning, value, argument list and call are closed, missing required arguments written with small
    values. Returns (suffix, calls_complete), or None for text this does not follow. `prelude` says what
    precedes the calls: "glm45" (`\\n`, optional `<think>...</think>\\n`), "think" (the prompt opened
    `<think>`: text up to `</think>`) or "none"."""
    # text may stop inside a tag: read the longest tail that can be a partial tag as one (else `</` in reasoning
    # would be closed as `</</think>` forever), and close the text before it, if that continues the tail
    fns = [tool_function(t) for t in tools]
    found = _xml_close(text, fns, sep, prelude)
    if found is not None and found[1]:
        return found  # every call closed
    for k in range(min(len(text), len("</arg_value>")), -1, -1):
        base = text[: len(text) - k]
        found = _xml_close(base, fns, sep, prelude)
        if found is not None and (base + found[0]).startswith(text):
            return (base + found[0])[len(text):], found[1]
    return None


def _before_calls(text: str, prelude: str) -> str | None:
    """What closes the text before the first call (reasoning, the leading newline), or None."""
    if prelude == "glm45":
        if text == "":
            return "\n"
        if "<think>" in text and "</think>" not in text:
            return "</think>\n"
        if text.endswith("</think>"):
            return "\n"
        return "" if text == "\n" or text.endswith("</think>\n") else None
    if prelude == "think":
        return "</think>" if "</think>" not in text else ("" if text.endswith("</think>") else None)
    return "" if text == "" else None


def _xml_close(text: str, fns: list[dict], sep: str, prelude: str) -> tuple[str, bool] | None:
    arg = re.compile(f"<arg_key>(.*?)</arg_key>{sep}<arg_value>(.*?)</arg_value>{sep}", re.S)

    def rest_of_call(fn: dict, done: set[str]) -> str:
        plan = xml_arg_plan(fn.get("parameters"))
        return "".join(f"<arg_key>{k}</arg_key>{sep}<arg_value>{_minimal_value(kind, spec)}</arg_value>{sep}"
                       for k, req, kind, spec in plan if req and k not in done) + "</tool_call>"

    def first_tool_call() -> str:
        return "<tool_call>" + fns[0]["name"] + sep + rest_of_call(fns[0], set())

    head, found, seg = text.rpartition("<tool_call>")
    if not found:  # no call yet: close the reasoning, then write the first tool's call
        pre = _before_calls(text, prelude)
        return None if pre is None else (pre + first_tool_call(), False)
    if "</tool_call>" in seg:
        after = seg.split("</tool_call>", 1)[1]
        if after == "":
            return "", True
        return (first_tool_call(), False) if after == sep else None
    cut = [i for i in (seg.find("\n"), seg.find("<")) if i >= 0]
    if not cut:  # the name in progress
        fn = next((f for f in fns if f["name"].startswith(seg)), None)
        return None if fn is None else (fn["name"][len(seg):] + sep + rest_of_call(fn, set()), False)
    name, body = seg[: min(cut)], seg[min(cut):]
    if sep and body.startswith(sep):
        body = body[len(sep):]
    elif sep:
        return None
    fn = next((f for f in fns if f["name"] == name), None)
    if fn is None:
        return None
    done: set[str] = set()
    pos = 0
    for m in arg.finditer(body):
        if m.start() != pos:
            return None
        done.add(m.group(1))
        pos = m.end()
    tail = body[pos:]
    if not tail:
        return rest_of_call(fn, done), False
    m = re.fullmatch(f"<arg_key>(.*?)</arg_key>{sep}<arg_value>(.*)", tail, re.S)
    if m is None:
        return None  # e.g. a tag in progress: xml_closing_suffix closes the text before it
    key, value = m.group(1), m.group(2)
    entry = next((e for e in xml_arg_plan(fn.get("parameters")) if e[0] == key), None)
    if entry is None:
        close = ""
    elif entry[2] == "enum":
        close = next((v[len(value):] for v in entry[3] if v.startswith(value)), None)
    elif entry[2] == "raw":
        close = "a" * max(0, entry[3][0] - len(value))
    elif not value.strip():
        close = _minimal_value("json", entry[3])
    else:
        close = json_closing_suffix(value)
    if close is None:
        return None
    return close + f"</arg_value>{sep}" + rest_of_call(fn, done | {key}), False
