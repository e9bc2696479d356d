"""Chat planning: messages + tools -> prompt ids and the constraints of one request; model text -> the reply.

    planner = ChatPlanner(tok, ChatFormat.for_checkpoint(path))
    plan = planner.plan(messages, tools, tool_choice="required", enable_thinking=False)
    params = planner.sampling_params(plan, SamplingParams(max_tokens=256))
    stream = planner.stream(plan); events = stream.feed(delta_text) ...; stream.finish()
    stream.message(), stream.finish_reason(engine_reason)

`tool_choice` is honored by constrained decoding (glm4.chat.grammar): "none" offers no tools, "required" /
{"type": "function", "function": {"name": ...}} force a call of an allowed name whose arguments are valid
under its JSON schema, "auto" lets the model answer or call (for the `name\\n{json}` formats with any call
it starts kept well-formed). `response_format` json_object / json_schema force the reply to be JSON.
Thinking is controlled as vLLM and SGLang accept it: `enable_thinking`, `reasoning_effort` ("none" /
"minimal" turn thinking off) and `chat_template_kwargs` (passed to the template, winning over the
others); `thinking_budget` caps the thinking tokens, and a guard ends thinking that loops.
Vision checkpoints (`media=MediaPolicy`): image_url / video_url parts become the template's placeholders, expanded
in `plan.prompt_ids`, with the pixels in `plan.multi_modal_data` (glm4.chat.media).
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from glm4.tokenizer import TokenTexts

from .events import ContentDelta, Event, Fold, ReasoningDelta, ToolCallDelta, ToolCallStart, openai_deltas
from .grammar import ConstraintError, GrammarCompiler
from .media import MediaError, MediaPolicy, extract_media, first_media_message
from .thinking import ThinkingGuard
from .tools import SchemaError, check_schema

# template keywords a request may not set through chat_template_kwargs (the planner sets them)
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt", "documents")


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
    """What one chat request turns into: the prompt, the tools offered, and the constraints."""

    prompt_ids: list[int]
    tools: list[dict] | None = None  # tools offered to the model (None for tool_choice "none")
    tool_choice: str = "auto"  # none | auto | required | named
    grammar: str | None = None  # lark text for llguidance
    json_schema: dict | None = None  # response_format json_schema's schema (validated on output)
    json_mode: bool = False
    forced_tools: list[dict] | None = None  # the tools a required / named call may use
    in_reasoning: bool = False  # the prompt opened <think>: the reply starts as thinking
    thinking: bool | None = None  # enable_thinking as the template saw it (None: the template's default)
    template_kwargs: dict = field(default_factory=dict)
    thinking_budget: int | None = None
    multi_modal_data: dict | None = None  # the model's image / video inputs (numpy; glm4.chat.media)


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


def template_kwargs(enable_thinking: bool | None, reasoning_effort: str | None,
                    chat_template_kwargs: dict | None) -> dict:
    """The template keywords of a request, as vLLM / SGLang derive them: reasoning_effort is passed on (and
    "none" / "minimal" turn thinking off), enable_thinking sets the switch, chat_template_kwargs win."""
    kw: dict[str, Any] = {}
    if reasoning_effort is not None:
        if not isinstance(reasoning_effort, str):
            raise ChatError("reasoning_effort must be a string", "reasoning_effort")
        kw["reasoning_effort"] = reasoning_effort
        if reasoning_effort in ("none", "minimal"):
            kw["enable_thinking"] = False
    if enable_thinking is not None:
        kw["enable_thinking"] = enable_thinking
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, dict) or not all(isinstance(k, str) for k in chat_template_kwargs):
            raise ChatError("chat_template_kwargs must be an object", "chat_template_kwargs")
        bad = [k for k in chat_template_kwargs if k in RESERVED_TEMPLATE_KWARGS]
        if bad:
            raise ChatError(f"chat_template_kwargs may not set {', '.join(bad)}", "chat_template_kwargs")
        kw.update(chat_template_kwargs)
    for k in ("enable_thinking", "clear_thinking"):
        if kw.get(k) is not None and not isinstance(kw[k], bool):
            raise ChatError(f"{k} must be true or false", "chat_template_kwargs")
    return {k: v for k, v in kw.items() if v is not None}


class ChatPlanner:
    """Messages/tools -> prompt ids and SamplingParams; model text -> content, reasoning and tool calls."""

    def __init__(self, tokenizer, chat_format, constrain: bool = True, media: MediaPolicy | None = None):
        self.tok = tokenizer
        self.fmt = chat_format
        self.constrain = constrain
        self.media = media  # None: the model takes no images (vision checkpoints: glm4.chat.media)
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()
        self.token_texts = TokenTexts(tokenizer)
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
             enable_thinking: bool | None = None, *, reasoning_effort: str | None = None,
             chat_template_kwargs: dict | None = None, thinking_budget: int | None = None) -> ChatPlan:
        media, at = None, first_media_message(messages)
        if at is not None:
            if self.media is None:
                raise ChatError(f"messages[{at}]: this model does not take images or videos",
                                f"messages.{at}.content", "unsupported_content")
            try:
                messages, media = extract_media(messages, self.media)
            except MediaError as e:
                raise ChatError(str(e), getattr(e, "param", "messages"), "invalid_media") from None
        messages = self._check_messages(messages)
        tools = self._check_tools(tools)
        choice, named = self._check_tool_choice(tool_choice, tools)
        if thinking_budget is not None and (not isinstance(thinking_budget, int) or thinking_budget < 0):
            raise ChatError("thinking_budget must be a non-negative integer", "thinking_budget")
        kw = template_kwargs(enable_thinking, reasoning_effort, chat_template_kwargs)
        offered = tools if choice != "none" else None
        try:
            prompt = self.fmt.encode(self.tok, messages, tools=offered, **kw)
        except ValueError as e:  # ChatFormatError
            raise ChatError(str(e), "messages") from None
        mm = None
        if media:
            try:
                prompt, mm = media.prompt_inputs(list(prompt), self.media, self.tok.encode)
            except MediaError as e:
                raise ChatError(str(e), "messages", "invalid_media") from None
        tail = self.tok.decode(prompt[-8:])
        plan = ChatPlan(prompt_ids=list(prompt), tools=offered, tool_choice=choice, multi_modal_data=mm,
                        in_reasoning=self.fmt.starts_in_reasoning(tail), thinking=kw.get("enable_thinking"),
                        template_kwargs=kw, thinking_budget=thinking_budget)
        rf = response_format or {"type": "text"}
        if rf.get("type") == "json_schema":
            js = rf.get("json_schema") or {}
            plan.json_schema = js.get("schema") or {"type": "object"}
            try:
                check_schema(plan.json_schema, "response_format.json_schema.schema")
            except SchemaError as e:
                raise ChatError(str(e), "response_format") from None
            plan.json_mode = True
        elif rf.get("type") == "json_object":
            plan.json_mode = True
        if not self.constrain:
            return plan
        spec, special = self.fmt.spec, set(self.tok.special_tokens)
        forced = [t for t in offered or [] if named is None or t["function"]["name"] == named]
        if choice in ("required", "named"):
            plan.forced_tools = forced
            parallel = parallel_tool_calls and choice == "required"
            plan.grammar = spec.calls_grammar(special, forced, parallel, plan.in_reasoning,
                                              thinking=plan.thinking is not False)
        elif choice == "auto" and offered:
            plan.grammar = spec.auto_grammar(special, offered, parallel_tool_calls, plan.json_mode, plan.json_schema)
        if plan.grammar is None and plan.json_mode and choice not in ("required", "named"):
            plan.grammar = spec.json_answer_grammar(plan.json_schema, plan.in_reasoning)
        if plan.grammar is not None:
            try:
                self.compiler.check(plan.grammar)
            except ConstraintError as e:
                raise ChatError(f"cannot enforce this schema: {e}",
                                "response_format" if plan.json_mode and choice not in ("required", "named")
                                else "tools") from None
        return plan

    def sampling_params(self, plan: ChatPlan, params):
        """A copy of `params` that stops at the end of the assistant turn and carries this plan's constraints."""
        p = copy.copy(params)
        stops = list(p.stop_token_ids or [])
        if not p.ignore_eos:  # ignore_eos: run past the turn's end tokens too (benchmarks, tests)
            stops += [t for t in self.fmt.stop_token_ids(self.tok) if t not in stops]
        p.stop_token_ids = stops
        if plan.tools or getattr(self.fmt.spec, "keeps_special_text", False):
            p.skip_special_tokens = False  # the parser splits turns on `<|assistant|>`; 4.5V's boxes stay in content
        p.logits_processors = list(p.logits_processors or [])
        if self.vocab_guard not in p.logits_processors:
            p.logits_processors.append(self.vocab_guard)
        if self.fmt.spec.thinks and plan.thinking is not False:
            p.logits_processors.append(ThinkingGuard(
                self.token_texts.bytes, self.tok.encode("</think>", allow_special=True), plan.in_reasoning,
                budget=plan.thinking_budget))
        if plan.grammar is not None:
            # the closing guard: finish the call (forced calls) or the JSON answer before max_tokens
            closer = None
            if plan.tool_choice in ("required", "named"):
                close = self.fmt.spec.close_mode
                forced, spec, in_reasoning = plan.forced_tools or [], self.fmt.spec, plan.in_reasoning
                closer = lambda text: spec.closing_suffix(text, forced, in_reasoning)  # noqa: E731
            elif plan.tools and plan.tool_choice == "auto":
                close = "auto_json" if plan.json_mode else "auto"
            else:
                close = "json"
            p.logits_processors.append(self.compiler.processor(plan.grammar, p.max_tokens, close, closer))
        return p

    # -- response side

    def stream(self, plan: ChatPlan) -> ChatStream:
        return ChatStream(self, plan)

    def parse(self, plan: ChatPlan, text: str) -> tuple[str | None, list[dict]]:
        """Final model text -> (content, OpenAI tool_calls); the same fold a streaming client makes."""
        return self.parse_full(plan, text)[:2]

    def parse_full(self, plan: ChatPlan, text: str) -> tuple[str | None, list[dict], str | None]:
        """(content, tool_calls, reasoning) of a final model text."""
        st = self.stream(plan)
        st.feed(text)
        st.finish()
        return (*st.result(), "".join(st.fold.reasoning) or None)

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
                if any(not isinstance(p, dict) or p.get("type") not in ("text", "image", "video") for p in content):
                    raise ChatError(f"messages[{i}]: content parts must be text, image_url or video_url",
                                    f"messages.{i}.content", "unsupported_content")
                if all(p["type"] == "text" for p in content):
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
                except SchemaError as e:
                    raise ChatError(str(e), f"tools.{i}.function.parameters") from None
            if any(o["function"]["name"] == fn["name"] for o in out):
                raise ChatError(f"tools[{i}]: function names must be unique ({fn['name']!r} twice)",
                                f"tools.{i}.function.name")
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
        if name not in {t["function"]["name"] for t in tools or []}:
            raise ChatError(f"tool_choice: function {name!r} is not among tools", "tool_choice")
        return "named", name



ChatLayer = ChatPlanner  # the name glm4.serve used before


class ChatStream:
    """Model text deltas -> the reply's events, folded as a client folds them.

    `feed_events(delta)` / `finish_events()` give glm4.chat.events objects; `feed` / `finish` give the
    same as dicts: {"type": "content", "text"}, {"type": "reasoning", "text"} and {"type": "tool_call",
    "index", "arguments" delta, plus "id"/"name" on a call's first event}; `feed_openai` / `finish_openai`
    give OpenAI `delta` dicts. `message()` and `finish_reason(engine_reason)` give the final reply.

    Under a grammar every call the model starts is well-formed, so arguments stream as they come;
    without one a call is announced only once complete and valid (nothing streamed is ever withdrawn).
    """

    def __init__(self, planner: ChatPlanner, plan: ChatPlan):
        self.planner, self.plan = planner, plan
        self.parser = planner.fmt.spec.stream_parser(plan.tools, stream_arguments=plan.grammar is not None,
                                                     in_reasoning=plan.in_reasoning)
        self.fold = Fold()

    def feed_events(self, delta: str) -> list[Event]:
        return self._keep(self.parser.feed(delta))

    def finish_events(self) -> list[Event]:
        return self._keep(self.parser.finish())

    def _keep(self, events: list[Event]) -> list[Event]:
        out, withdrawn = [], False
        for ev in events:
            if ev.type == "tool_call_invalid":
                withdrawn = True
            elif ev.type == "content" and withdrawn and self.plan.grammar is not None:
                continue  # under a grammar only a cut-off call is withdrawn: its text is no answer
            out.append(ev)
        self.fold.add(out)
        return out

    # -- the dict shapes
    def feed(self, delta: str) -> list[dict]:
        return _as_dicts(self.feed_events(delta))

    def finish(self) -> list[dict]:
        return _as_dicts(self.finish_events())

    def feed_openai(self, delta: str) -> list[dict]:
        return openai_deltas(self.feed_events(delta))

    def finish_openai(self) -> list[dict]:
        return openai_deltas(self.finish_events())

    # -- the reply
    @property
    def reasoning(self) -> list[str]:
        return self.fold.reasoning

    @property
    def diagnostics(self) -> list[str]:
        return self.fold.diagnostics

    @property
    def calls(self) -> dict[int, dict]:
        return self.fold.calls

    def result(self) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of everything fed so far, as a client folding the events sees them."""
        content, calls = self.fold.result()[:2]
        return (content, calls) if calls else (content or "", [])

    def message(self) -> dict:
        return self.fold.message()

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return self.fold.finish_reason(engine_reason)


def _as_dicts(events: list[Event]) -> list[dict]:
    out = []
    for ev in events:
        if isinstance(ev, ContentDelta):
            out.append({"type": "content", "text": ev.text})
        elif isinstance(ev, ReasoningDelta):
            out.append({"type": "reasoning", "text": ev.text})
        elif isinstance(ev, ToolCallStart):
            out.append({"type": "tool_call", "index": ev.index, "id": ev.id, "name": ev.name, "arguments": ""})
        elif isinstance(ev, ToolCallDelta):
            out.append({"type": "tool_call", "index": ev.index, "arguments": ev.arguments})
    return out
