"""The chat layer shared by the server and the terminal chat: messages + tools -> prompt, constraints, replies.

    from glm4.engine.chat import chat, chat_stream
    r = chat(llm, [{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, tool_choice="required")
    r.content, r.tool_calls, r.finish_reason
    for ev in chat_stream(llm, messages): ...   # {"type": "content", "text"} / {"type": "tool_call", ...} / {"type": "done", ...}

`tool_choice` is honored by constrained decoding (glm4.engine.constrained): "none" offers no tools,
"required" / {"type": "function", "function": {"name": ...}} force a call of an allowed name whose
arguments are valid under its JSON schema, "auto" lets the model answer or call, with any call it
starts kept well-formed. `response_format` json_object / json_schema force the reply to be JSON.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm4.engine.constrained import ConstraintError, GrammarCompiler, check_schema
from glm4.tokenizer.tool_calls import Stripper

# families whose tool calls are `name\n{json}` turns (the grammar in constrained.py); GLM-4.5 (glm4_moe) uses
# XML calls, enforced for required / named (auto is parsed and validated, not constrained)
JSON_CALL_FAMILIES = ("chatglm", "glm4")
XML_CALL_FAMILIES = ("glm4_moe",)


class ChatError(ValueError):
    """Bad chat input (messages, tools, tool_choice, response_format): a 400 for the server."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ChatPlan:
    """What one chat request turns into: the prompt, the tools offered, and the constraint (lark grammar)."""

    prompt_ids: list[int]
    tools: list[dict] | None = None  # tools offered to the model (None for tool_choice "none")
    tool_choice: str = "auto"  # none | auto | required | named
    grammar: str | None = None
    json_schema: dict | None = None  # response_format json_schema's schema (validated on output)
    json_mode: bool = False
    forced_tools: list[dict] | None = None  # the tools a required / named call may use
    xml_calls: bool = False  # the grammar is GLM-4.5's XML call format


def _schemas(tools: list[dict] | None) -> dict[str, dict | None]:
    return {t["function"]["name"]: t["function"].get("parameters") for t in tools or []}


class VocabGuard:
    """Logits processor masking ids past the tokenizer's vocabulary (the embedding's padding rows, e.g.
    151343..151551 in GLM-4): a model can sample them, but they have no text."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, token_ids, logits):
        if logits.shape[-1] > self.vocab_size:
            logits = logits.clone()
            logits[..., self.vocab_size:] = float("-inf")
        return logits


class ChatLayer:
    """Messages/tools -> prompt ids and SamplingParams; model text -> content and tool calls."""

    def __init__(self, tokenizer, chat_format, constrain: bool = True):
        self.tok = tokenizer
        self.fmt = chat_format
        self.constrain = constrain
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._token_bytes: dict[int, bytes] = {}
        self.vocab_guard = VocabGuard(int(tokenizer.vocab_size))

    @property
    def compiler(self) -> GrammarCompiler:
        with self._lock:  # built once (about a second for a 150k vocabulary)
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.tok)
            return self._compiler

    # -- request side

    def plan(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = "auto",
             parallel_tool_calls: bool = True, response_format: dict | None = None,
             enable_thinking: bool | None = None) -> ChatPlan:
        """`enable_thinking` (GLM-4.5 hybrid thinking): False asks for no `<think>` reasoning; None is the default."""
        messages = self._check_messages(messages)
        tools = self._check_tools(tools)
        choice, named = self._check_tool_choice(tool_choice, tools)
        offered = tools if choice != "none" else None
        try:
            kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
            prompt = self.fmt.encode(self.tok, messages, tools=offered, **kw)
        except ValueError as e:  # ChatFormatError
            raise ChatError(str(e), "messages") from None
        plan = ChatPlan(prompt_ids=list(prompt), tools=offered, tool_choice=choice)
        rf = response_format or {"type": "text"}
        if rf.get("type") == "json_schema":
            js = rf.get("json_schema") or {}
            plan.json_schema = js.get("schema") or {"type": "object"}
            try:
                check_schema(plan.json_schema, "response_format.json_schema.schema")
            except ConstraintError as e:
                raise ChatError(str(e), "response_format") from None
            plan.json_mode = True
        elif rf.get("type") == "json_object":
            plan.json_mode = True
        if not self.constrain:
            return plan
        family = getattr(self.fmt, "family", "chatglm")
        forced = [t for t in offered or [] if named is None or t["function"]["name"] == named]
        if choice in ("required", "named"):
            parallel = parallel_tool_calls and choice == "required"
            plan.forced_tools = forced
            if family in XML_CALL_FAMILIES:
                plan.xml_calls = True
                plan.grammar = self.compiler.xml_tool_calls_grammar(forced, parallel, thinking=enable_thinking is not False)
            elif family in JSON_CALL_FAMILIES:
                plan.grammar = self.compiler.tool_calls_grammar(forced, parallel)
            else:
                raise ChatError(f"tool_choice {choice!r} is not enforced for the {family} chat format yet",
                                "tool_choice", "unsupported_value")
        elif choice == "auto" and offered and family in JSON_CALL_FAMILIES:
            plan.grammar = self.compiler.auto_grammar(offered, parallel_tool_calls, plan.json_mode, plan.json_schema)
        elif plan.json_mode:
            plan.grammar = self.compiler.json_grammar(plan.json_schema if plan.json_schema is not None
                                                      else {"type": "object"}, prefix="\n")
        if plan.grammar is not None:
            try:
                self.compiler.check(plan.grammar)
            except ConstraintError as e:
                raise ChatError(f"cannot enforce this schema: {e}",
                                "response_format" if plan.json_mode and choice not in ("required", "named")
                                else "tools") from None
        return plan

    def sampling_params(self, plan: ChatPlan, params):
        """A copy of `params` that stops at the end of the assistant turn and carries this plan's constraint."""
        p = copy.copy(params)
        stops = list(p.stop_token_ids or [])
        if not p.ignore_eos:  # ignore_eos: run past the turn's end tokens too (benchmarks, tests)
            stops += [t for t in self._turn_end_ids() if t not in stops]
        p.stop_token_ids = stops
        if plan.tools:  # the tool parser splits turns on the `<|assistant|>` markers in the text
            p.skip_special_tokens = False
        p.logits_processors = list(p.logits_processors or [])
        if self.vocab_guard not in p.logits_processors:
            p.logits_processors.append(self.vocab_guard)
        if plan.grammar is not None:
            # the closing guard: finish the call's JSON (forced calls) or the JSON answer before max_tokens
            if plan.tool_choice in ("required", "named"):
                close = "xml" if plan.xml_calls else "tools"
            elif plan.tools and plan.tool_choice == "auto":
                close = "auto_json" if plan.json_mode else "auto"
            else:
                close = "json"
            p.logits_processors.append(self.compiler.processor(plan.grammar, p.max_tokens, close, plan.forced_tools))
        return p

    def _turn_end_ids(self) -> list[int]:
        f = getattr(self.fmt, "stop_token_ids", None)
        return list(f(self.tok)) if callable(f) else list(self.tok.eos_token_ids)

    # -- response side

    def parse(self, plan: ChatPlan, text: str) -> tuple[str | None, list[dict]]:
        """Final model text -> (content, OpenAI tool_calls); the same fold a streaming client makes."""
        return self.parse_full(plan, text)[:2]

    def parse_full(self, plan: ChatPlan, text: str) -> tuple[str | None, list[dict], str | None]:
        """(content, tool_calls, reasoning) of a final model text."""
        st = self.stream(plan)
        st.feed(text)
        st.finish()
        return (*st.result(), "".join(st.reasoning) or None)

    def stream(self, plan: ChatPlan) -> ChatStream:
        return ChatStream(self, plan)

    # -- tokens

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        b = self._token_bytes.get(token_id)
        if b is None:
            try:
                b = self.tok.decode_bytes([token_id])
            except ValueError:  # a padding row of the embedding: no text
                b = b""
            self._token_bytes[token_id] = b
        return b

    def token_logprob(self, entry: dict) -> dict:
        tid = entry["token_id"]
        return {"token": self.token_text(tid), "logprob": entry["logprob"], "bytes": list(self.token_bytes(tid)),
                "top_logprobs": [{"token": self.token_text(t), "logprob": lp, "bytes": list(self.token_bytes(t))}
                                 for t, lp in entry.get("top_logprobs") or []]}

    def encode_completion_prompt(self, text: str) -> list[int]:
        """A raw /v1/completions prompt: special-token strings allowed; `[gMASK]<sop>` prepended as GLM's tokenizer does."""
        ids = list(self.tok.encode(text, allow_special=True))
        sp = self.tok.special_tokens
        prefix = [sp[s] for s in ("[gMASK]", "<sop>") if s in sp]
        if len(prefix) == 2 and ids[:1] != prefix[:1]:
            ids = prefix + ids
        return ids

    # -- validation

    @staticmethod
    def _check_messages(messages: Any) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise ChatError("messages must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
                raise ChatError(f"messages[{i}]: role must be system, developer, user, assistant or tool",
                                f"messages.{i}.role")
            m = dict(m)
            if m["role"] == "developer":
                m["role"] = "system"
            content = m.get("content")
            if isinstance(content, list):
                if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                    raise ChatError(f"messages[{i}]: only text content parts are supported by this model",
                                    f"messages.{i}.content", "unsupported_content")
                m["content"] = "".join(str(p.get("text", "")) for p in content)
            elif content is not None and not isinstance(content, str):
                raise ChatError(f"messages[{i}]: content must be a string or a list of text parts",
                                f"messages.{i}.content")
            if m["role"] == "assistant":
                for j, tc in enumerate(m.get("tool_calls") or []):
                    try:
                        args = tc["function"]["arguments"]
                        if not isinstance(args, dict):
                            json.loads(args or "{}")
                    except (KeyError, TypeError, ValueError):
                        raise ChatError(f"messages[{i}].tool_calls[{j}]: function.arguments must be a JSON string",
                                        f"messages.{i}.tool_calls.{j}.function.arguments") from None
                if m.get("content") is None and not m.get("tool_calls"):
                    raise ChatError(f"messages[{i}]: an assistant message needs content or tool_calls",
                                    f"messages.{i}.content")
            out.append(m)
        if out[-1]["role"] == "assistant":
            raise ChatError("the last message must not be an assistant message (prefill is not supported)",
                            f"messages.{len(out) - 1}.role")
        return out

    @staticmethod
    def _check_tools(tools: Any) -> list[dict] | None:
        if tools is None:
            return None
        if not isinstance(tools, list):
            raise ChatError("tools must be a list", "tools")
        out = []
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ChatError(f"tools[{i}]: needs function.name", f"tools.{i}.function.name")
            params = fn.get("parameters")
            if params is not None:
                if not isinstance(params, dict):
                    raise ChatError(f"tools[{i}]: function.parameters must be a JSON schema object",
                                    f"tools.{i}.function.parameters")
                try:
                    check_schema(params, f"tools[{i}].function.parameters")
                except ConstraintError as e:
                    raise ChatError(str(e), f"tools.{i}.function.parameters") from None
            out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
        return out or None

    @staticmethod
    def _check_tool_choice(tool_choice: Any, tools: list[dict] | None) -> tuple[str, str | None]:
        if tool_choice is None:
            return ("auto" if tools else "none"), None
        if isinstance(tool_choice, str):
            if tool_choice not in ("none", "auto", "required"):
                raise ChatError("tool_choice must be none, auto, required or a named function", "tool_choice")
            if tool_choice == "required" and not tools:
                raise ChatError("tool_choice 'required' needs tools", "tool_choice")
            return (tool_choice if tools else "none"), None
        name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
        if not isinstance(name, str):
            raise ChatError("tool_choice: expected {'type': 'function', 'function': {'name': ...}}", "tool_choice")
        if name not in _schemas(tools):
            raise ChatError(f"tool_choice: function {name!r} is not among tools", "tool_choice")
        return "named", name


class ChatStream:
    """Model text deltas -> chat events: {"type": "content", "text"}, {"type": "reasoning", "text"} (GLM-4.5
    thinking) and {"type": "tool_call", "index", "arguments" delta, plus "id"/"name" on a call's first event}.

    Under a grammar every call the model starts is well-formed, so arguments stream as they come;
    without one a call is announced only once complete and valid (nothing streamed is ever withdrawn).
    """

    def __init__(self, layer: ChatLayer, plan: ChatPlan):
        self.layer, self.plan = layer, plan
        self.parser = (layer.fmt.stream_parser(plan.tools, stream_arguments=plan.grammar is not None)
                       if plan.tools else None)
        self._stripper = Stripper(lambda text: {"type": "content", "text": text})  # content == text.strip()
        self.calls: dict[int, dict] = {}  # OpenAI tool calls by index (arguments accumulated)
        self.content: list[str] = []
        self.reasoning: list[str] = []  # GLM-4.5 thinking
        self.diagnostics: list[str] = []

    def feed(self, delta: str) -> list[dict]:
        if self.parser is None:
            out = self._stripper.push(delta)
            self.content += [e["text"] for e in out]
            return out
        return self._translate(self.parser.feed(delta))

    def finish(self) -> list[dict]:
        if self.parser is None:
            return []  # held trailing whitespace is dropped: content == text.strip(), as the tool parser does
        return self._translate(self.parser.finish())

    def _translate(self, events) -> list[dict]:
        out = []
        withdrawn = False
        for ev in events:
            kind = getattr(ev, "type", "")
            if kind == "content":
                if withdrawn and self.plan.grammar is not None:
                    continue  # under a grammar only a cut-off call is withdrawn: its text is no answer
                out += self._stripper.push(ev.text)
            elif kind == "reasoning":
                self.reasoning.append(ev.text)
                out.append({"type": "reasoning", "text": ev.text})
            elif kind == "tool_call_start":
                self.calls[ev.index] = {"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
                out.append({"type": "tool_call", "index": ev.index, "id": ev.id, "name": ev.name, "arguments": ""})
            elif kind == "tool_call_delta":
                if ev.index in self.calls:
                    self.calls[ev.index]["function"]["arguments"] += ev.arguments
                out.append({"type": "tool_call", "index": ev.index, "arguments": ev.arguments})
            elif kind == "tool_call_end" and ev.errors:
                self.diagnostics += list(ev.errors)
            elif kind == "tool_call_invalid":
                self.calls.pop(ev.index, None)
                withdrawn = True
                self.diagnostics.append(ev.reason)
            elif kind == "notice":
                self.diagnostics.append(ev.message)
        for ev in out:
            if ev["type"] == "content":
                self.content.append(ev["text"])
        return out

    def result(self) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of everything fed so far, as a client folding the events sees them."""
        content = "".join(self.content)
        calls = [self.calls[i] for i in sorted(self.calls)]
        return (content or None, calls) if calls else (content, [])


# ---------------------------------------------------------------------------------------------
# the Python API over glm4.LLM


@dataclass
class ChatResult:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    text: str = ""  # the raw model text
    reasoning: str | None = None  # GLM-4.5 thinking, when the model wrote any

    def message(self) -> dict:
        """The assistant message to append to the conversation."""
        m: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        if self.reasoning:
            m["reasoning_content"] = self.reasoning
        return m


def chat_layer_for(llm, folder: str | Path | None = None) -> tuple[ChatLayer, Any, Path | None]:
    """The (cached) ChatLayer of an LLM, its tokenizer, and its checkpoint folder."""
    layer = getattr(llm, "_glm4_chat_layer", None)
    tok = getattr(llm, "tokenizer", None)
    path = getattr(llm, "path", None) or folder
    path = Path(path) if path is not None else None
    if layer is None:
        if tok is None:
            raise ChatError("this checkpoint has no tokenizer: chat needs tokenizer.model or tokenizer.json")
        from glm4.tokenizer import ChatFormat

        fmt = ChatFormat.for_checkpoint(path) if path is not None else ChatFormat("glm4")
        layer = ChatLayer(tok, fmt)
        try:
            llm._glm4_chat_layer = layer
        except AttributeError:
            pass
    return layer, tok, path


def _default_params(params):
    from glm4.engine.sampling_params import SamplingParams

    return params if params is not None else SamplingParams(max_tokens=512, temperature=0.8, top_p=0.8)


def chat_stream(llm, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = "auto",
                params=None, *, parallel_tool_calls: bool = True, response_format: dict | None = None
                ) -> Iterator[dict]:
    """Yield chat events as the model writes; the last is {"type": "done", "result": ChatResult}.
    Closing the iterator early aborts the generation."""
    layer, _, _ = chat_layer_for(llm)
    plan = layer.plan(messages, tools, tool_choice, parallel_tool_calls, response_format)
    p = layer.sampling_params(plan, _default_params(params))
    if getattr(p, "n", 1) != 1:
        raise ChatError("chat generates one reply; use n=1", "n")
    stream = layer.stream(plan)
    last = None
    for out in llm.engine.stream(plan.prompt_ids, p):
        last = out
        o = out.outputs[0]
        events = stream.feed(o.delta_text)
        if o.finished:
            events += stream.finish()
        yield from events
    o = last.outputs[0]
    content, calls = stream.result()
    reason = o.finish_reason
    if calls and reason == "stop":
        reason = "tool_calls"
    usage = usage_dict(len(plan.prompt_ids), len(o.token_ids))
    yield {"type": "done", "result": ChatResult(content, calls, reason, usage, o.text, "".join(stream.reasoning) or None)}


def chat(llm, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = "auto", params=None, *,
         parallel_tool_calls: bool = True, response_format: dict | None = None) -> ChatResult:
    """One assistant reply: content and/or tool calls (see the module docstring for tool_choice)."""
    result = None
    for ev in chat_stream(llm, messages, tools, tool_choice, params, parallel_tool_calls=parallel_tool_calls,
                          response_format=response_format):
        if ev["type"] == "done":
            result = ev["result"]
    return result
