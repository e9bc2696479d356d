"""Constrained decoding: grammars over the GLM-4 output format, enforced by llguidance token masks.

`GrammarCompiler(tok)` wraps one tokenizer (its BPE ranks and special tokens) for llguidance and
builds grammars:
- `tool_calls_grammar(tools, parallel)`: `name\\n{json args}` for an allowed name, args valid under that
  tool's schema, several calls joined by `<|assistant|>` when parallel, ended by `<|observation|>`
  (GLM-4's tool-call turn, chat template §4);
- `auto_grammar(tools, parallel)`: a plain answer (`\\n` then free text) or the calls above;
- `json_grammar(schema)`: `\\n` then one JSON value (any object for json_object);
- `xml_tool_calls_grammar(tools, parallel, thinking)`: GLM-4.5's calls, `<tool_call>name\\n` then
  `<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n` per argument (required ones first, in schema order; a string
  value raw, any other JSON-encoded under the property's schema) then `</tool_call>`, optionally after `<think>`.
`compiler.processor(grammar)` gives a fresh per-request logits processor for `SamplingParams.logits_processors`:
it consumes the tokens sampled so far and masks every token the grammar forbids to -inf.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

# JSON compiled without free whitespace: compact output, and far fewer ways for a weak model to wander
_JSON_OPTS = {"whitespace_flexible": False, "lenient": True}
ANY_OBJECT = {"type": "object"}


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


def _lark_str(s: str) -> str:
    # a lark string literal (JSON escaping is a subset lark accepts)
    return json.dumps(s, ensure_ascii=False)


def _json_rule(schema: dict | None) -> str:
    s = dict(schema) if schema else dict(ANY_OBJECT)
    s["x-guidance"] = {**_JSON_OPTS, **(s.get("x-guidance") or {})}
    return "%json " + json.dumps(s, ensure_ascii=False)


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

    # -- grammars (lark text)

    def _calls_rules(self, tools: list[dict], parallel: bool) -> list[str]:
        sep = "<|assistant|>" if "<|assistant|>" in self.special_tokens else _lark_str("\n")
        stop = "<|observation|>" if "<|observation|>" in self.special_tokens else ""
        alts, rules = [], []
        for i, tool in enumerate(tools):
            fn = tool.get("function", tool)
            alts.append(f"{_lark_str(fn['name'] + chr(10))} args_{i}")
            rules.append(f"args_{i}: {_json_rule(fn.get('parameters'))}")
        calls = f"call ({sep} call)*" if parallel else "call"
        return [f"calls: {calls} {stop}", "call: " + " | ".join(alts), *rules]

    def tool_calls_grammar(self, tools: list[dict], parallel: bool = True) -> str:
        if not tools:
            raise ConstraintError("tool calls need at least one tool")
        return "\n".join(["start: calls", *self._calls_rules(tools, parallel)])

    def auto_grammar(self, tools: list[dict], parallel: bool = True, json_answer: bool = False,
                     schema: dict | None = None) -> str:
        # a plain GLM answer starts with "\n" (then free text, or JSON in a JSON mode); a call starts with a tool name
        # an answer may be followed by calls in later `<|assistant|>` turns of the same reply
        answer = f"answer: {_lark_str(chr(10))} {_json_rule(schema)}" if json_answer else r"answer: /\n(?s:.*)/"
        sep = "<|assistant|>" if "<|assistant|>" in self.special_tokens else None
        start = f"start: calls | answer ({sep} calls)?" if sep else "start: calls | answer"
        return "\n".join([start, answer, *self._calls_rules(tools, parallel)])

    def _tag(self, s: str) -> str:
        # a marker the tokenizer has as a special token is matched as that token, otherwise as text
        return s if s in self.special_tokens else _lark_str(s)

    def xml_tool_calls_grammar(self, tools: list[dict], parallel: bool = True, thinking: bool = True) -> str:
        """GLM-4.5 (glm4_moe) tool-call reply: `\\n[<think>...</think>\\n]<tool_call>...</tool_call>[\\n<tool_call>...]`."""
        if not tools:
            raise ConstraintError("tool calls need at least one tool")
        t = self._tag
        obs = "<|observation|>" if "<|observation|>" in self.special_tokens else ""
        rules = [f"start: {_lark_str(chr(10))} {'think?' if thinking else ''} calls {obs}",
                 # reasoning: any text up to the first </think> (the lexeme includes the closing tag)
                 f"think: {t('<think>')} THINK {_lark_str(chr(10))}",
                 r"THINK: /(?s:.*)<\/think>/ & ~/(?s:.*<\/think>.+)/",
                 r"RAW: /(?s:.*)<\/arg_value>/ & ~/(?s:.*<\/arg_value>.+)/",
                 f"calls: call ({_lark_str(chr(10))} call)*" if parallel else "calls: call"]
        alts = []
        for i, tool in enumerate(tools):
            fn = tool.get("function", tool)
            alts.append(f"call_{i}")
            parts = []
            for j, (key, required, kind, spec) in enumerate(xml_arg_plan(fn.get("parameters"))):
                head = f"{t('<arg_key>')} {_lark_str(key)} {t('</arg_key>')} {_lark_str(chr(10))} {t('<arg_value>')}"
                end = f"{t('</arg_value>')} {_lark_str(chr(10))}"
                if kind == "enum":
                    value = "(" + " | ".join(_lark_str(v) for v in spec) + f") {end}"
                elif kind == "raw":
                    lo, hi = spec
                    if lo or hi is not None:  # minLength / maxLength, in characters
                        rules.append(f"RAW_{i}_{j}: /(?s:.{{{lo},{'' if hi is None else hi}}})<\\/arg_value>/ "
                                     r"& ~/(?s:.*<\/arg_value>.+)/")
                        value = f"RAW_{i}_{j} {_lark_str(chr(10))}"
                    else:
                        value = f"RAW {_lark_str(chr(10))}"
                else:
                    rules.append(f"json_{i}_{j}: {_json_rule(spec)}")
                    value = f"json_{i}_{j} {end}"
                rules.append(f"arg_{i}_{j}: {head} {value}")
                parts.append(f"arg_{i}_{j}" + ("" if required else "?"))
            if fn.get("parameters") is not None and not xml_arg_plan(fn.get("parameters")) and \
                    not _closed_object(fn.get("parameters")):
                # an open object without declared properties: any keys, raw values
                rules.append(f"any_arg_{i}: {t('<arg_key>')} /[A-Za-z_][A-Za-z0-9_.-]*/ {t('</arg_key>')} "
                             f"{_lark_str(chr(10))} {t('<arg_value>')} RAW {_lark_str(chr(10))}")
                parts.append(f"any_arg_{i}*")
            rules.append(f"call_{i}: {t('<tool_call>')} {_lark_str(fn['name'] + chr(10))} {' '.join(parts)} "
                         f"{t('</tool_call>')}")
        rules.append("call: " + " | ".join(alts))
        return "\n".join(rules)

    def json_grammar(self, schema: dict | None = None, prefix: str = "\n") -> str:
        head = f"{_lark_str(prefix)} " if prefix else ""
        return f"start: {head}value\nvalue: {_json_rule(schema)}"

    def check(self, grammar: str) -> None:
        """Raise ConstraintError when llguidance rejects the grammar (e.g. an unsupported JSON schema)."""
        err = self._llg.LLMatcher.validate_grammar(self._llg.LLMatcher.grammar_from_lark(grammar), self.lltok)
        if err and not err.startswith("WARNING"):
            raise ConstraintError(err)

    def processor(self, grammar: str, max_tokens: int | None = None, close: str | None = None,
                  tools: list[dict] | None = None) -> GrammarProcessor:
        return GrammarProcessor(self, grammar, max_tokens, close, tools)

    def mask(self, matcher) -> torch.Tensor:
        """Boolean [vocab_size] of the tokens the matcher allows next."""
        words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words.unsqueeze(1) >> self._shifts) & 1  # [W, 32], bit j of word w = token 32w+j
        return bits.flatten()[: self.vocab_size].bool()


class GrammarProcessor:
    """Logits processor `fn(generated_ids, logits[V]) -> logits[V]` for one sequence (n=1).

    With `max_tokens` and `close` ("json": the reply is one JSON value; "tools": tool-call turns; "auto" /
    "auto_json": either, decided by how the current turn starts; "xml": GLM-4.5 calls of `tools`), it also
    keeps the output parseable when the budget runs out: once the tokens left barely cover the shortest
    closing suffix of the JSON written so far (`"`, `null`, `}`/`]`..., then `<|observation|>` for a
    call), it forces that suffix, if the grammar accepts it, instead of letting the reply be cut.
    """

    SLACK = 8  # tokens of head-room: the closing suffix can grow by a few tokens per sampled token
    LATE_CALL = 32  # with this few tokens left, no further tool call is started

    def __init__(self, compiler: GrammarCompiler, grammar: str, max_tokens: int | None = None,
                 close: str | None = None, tools: list[dict] | None = None):
        self.compiler = compiler
        self.tools = tools or []
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
            found = xml_closing_suffix(text, self.tools)
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


def _closed_object(schema: dict | None) -> bool:
    return isinstance(schema, dict) and schema.get("additionalProperties") is False


def xml_arg_plan(schema: dict | None) -> list[tuple[str, bool, str, Any]]:
    """The arguments of a GLM-4.5 XML call in the order the grammar writes them: (key, required, kind, spec).

    kind is how the value is written (as glm4.tokenizer's parser reads it back): "raw" text for a property typed
    string or untyped (spec = (minLength, maxLength)), "enum" for an untyped/string enum of strings (spec = the
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
    return json.dumps(minimal_json(spec), ensure_ascii=False, separators=(",", ":"))


_XML_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\n<arg_value>(.*?)</arg_value>\n", re.S)


def xml_closing_suffix(text: str, tools: list[dict]) -> tuple[str, bool] | None:
    """The shortest text that ends a GLM-4.5 tool-call reply begun as `text` (see xml_tool_calls_grammar): the
    open reasoning, value, argument list and call are closed, missing required arguments written with small
    values. Returns (suffix, calls_complete), or None for text this does not follow."""
    # text may stop inside a tag: read the longest tail that can be a partial tag as one (else `</` in reasoning
    # would be closed as `</</think>` forever), and close the text before it, if that continues the tail
    fns = [t.get("function", t) for t in tools]
    found = _xml_close(text, fns)
    if found is not None and found[1]:
        return found  # every call closed
    for k in range(min(len(text), len("</arg_value>")), -1, -1):
        base = text[: len(text) - k]
        found = _xml_close(base, fns)
        if found is not None and (base + found[0]).startswith(text):
            return (base + found[0])[len(text):], found[1]
    return None


def _xml_close(text: str, fns: list[dict]) -> tuple[str, bool] | None:

    def rest_of_call(fn: dict, done: set[str]) -> str:
        plan = xml_arg_plan(fn.get("parameters"))
        return "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{_minimal_value(kind, spec)}</arg_value>\n"
                       for k, req, kind, spec in plan if req and k not in done) + "</tool_call>"

    def first_tool_call() -> str:
        return "<tool_call>" + fns[0]["name"] + "\n" + rest_of_call(fns[0], set())

    _, sep, seg = text.rpartition("<tool_call>")
    if not sep:  # no call yet: close the reasoning, then write the first tool's call
        if text == "":
            pre = "\n"
        elif "<think>" in text and "</think>" not in text:
            pre = "</think>\n"
        elif text.endswith("</think>"):
            pre = "\n"
        elif text == "\n" or text.endswith("</think>\n"):
            pre = ""
        else:
            return None
        return pre + first_tool_call(), False
    if "</tool_call>" in seg:
        after = seg.split("</tool_call>", 1)[1]
        if after == "":
            return "", True
        return (first_tool_call(), False) if after == "\n" else None
    if "\n" not in seg:  # the name in progress
        fn = next((f for f in fns if f["name"].startswith(seg)), None)
        return None if fn is None else (fn["name"][len(seg):] + "\n" + rest_of_call(fn, set()), False)
    name, body = seg.split("\n", 1)
    fn = next((f for f in fns if f["name"] == name), None)
    if fn is None:
        return None
    done: set[str] = set()
    pos = 0
    for m in _XML_ARG.finditer(body):
        if m.start() != pos:
            return None
        done.add(m.group(1))
        pos = m.end()
    tail = body[pos:]
    if not tail:
        return rest_of_call(fn, done), False
    m = re.fullmatch(r"<arg_key>(.*?)</arg_key>\n<arg_value>(.*)", tail, re.S)
    if m is None:
        return None
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
    return close + "</arg_value>\n" + rest_of_call(fn, done | {key}), False


_LITERALS = ("true", "false", "null")


def json_closing_suffix(text: str) -> str | None:
    """The shortest text that makes `text` (a JSON prefix, leading whitespace allowed) a complete JSON
    value, closing strings, literals and containers with `null` where a value is missing; None if
    `text` is not a JSON prefix this scanner follows."""
    stack: list[str] = []  # "{" / "["
    expect = "value"  # value | key | colon | comma | end
    in_str = esc = False
    uni = 0  # hex digits still due in a \\uXXXX escape
    str_is_key = False
    lit = ""  # a literal or number being written
    after_open = False  # just after "{" or "[": closing right away is allowed
    for ch in text:
        if in_str:
            if uni:
                if ch not in "0123456789abcdefABCDEF":
                    return None
                uni -= 1
            elif esc:
                esc = False
                if ch == "u":
                    uni = 4
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                expect = "colon" if str_is_key else "comma"
            continue
        if lit:
            if ch.isalnum() or ch in "+-.":
                lit += ch
                continue
            lit = ""
            expect = "comma"
        if ch in " \t\r\n":
            continue
        if expect in ("value", "key") and ch == '"':
            in_str, str_is_key, after_open = True, expect == "key", False
        elif expect == "value" and ch in "{[":
            stack.append(ch)
            expect, after_open = ("key" if ch == "{" else "value"), True
        elif expect == "value" and (ch.isdigit() or ch == "-" or ch in "tfn"):
            lit, after_open = ch, False
        elif ch in "}]" and stack and (expect == "comma" or after_open):
            if {"}": "{", "]": "["}[ch] != stack.pop():
                return None
            expect, after_open = ("comma" if stack else "end"), False
        elif expect == "colon" and ch == ":":
            expect = "value"
        elif expect == "comma" and ch == "," and stack:
            expect, after_open = ("key" if stack[-1] == "{" else "value"), False
        else:
            return None
    out = ""
    if in_str:
        if uni:
            out += "0" * uni
        elif esc:
            out += "\\"
        out += '"'
        expect = "colon" if str_is_key else "comma"
    elif lit:
        word = next((w for w in _LITERALS if w.startswith(lit)), None)
        if word is not None:
            out += word[len(lit):]
        elif lit[-1] in "+-.eE":
            out += "0"
        expect = "comma"
    if expect == "colon":
        out += ":null"
    elif expect == "key":
        out += "}" if after_open else '"":null}'
        stack.pop()
    elif expect == "value":
        if not stack and not text.strip():
            return out + "{}"
        out += "]" if after_open and stack and stack[-1] == "[" else "null"
        if after_open and stack and stack[-1] == "[":
            stack.pop()
    elif expect == "end":
        return out
    for c in reversed(stack):
        out += "}" if c == "{" else "]"
    return out


def check_schema(schema: dict | None, where: str) -> None:
    """Raise ConstraintError if `schema` is not a valid JSON schema."""
    if schema is None:
        return
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConstraintError(f"{where}: invalid JSON schema: {e.message}") from None
