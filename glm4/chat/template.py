"""ChatFormat: render messages to a prompt string / token ids, parse replies, for any registered format.

    fmt = ChatFormat("glm46")                      # or ChatFormat.for_checkpoint(path)
    prompt = fmt.render(messages, tools=None, add_generation_prompt=True, enable_thinking=False)
    ids = fmt.encode(tok, messages, tools)         # injection-safe: only the template makes special tokens
    content, tool_calls = fmt.parse(text, tools)   # .reasoning, .diagnostics attached

The built-in renderers (glm4.chat.formats) are plain Python, golden-tested byte for byte against the
official templates rendered the way transformers' `apply_chat_template` renders them. A checkpoint
folder with its own template renders through a sandboxed jinja environment configured like transformers'.
Template keyword arguments (`enable_thinking`, `clear_thinking`, `reasoning_effort`, any other
`chat_template_kwargs`) pass through to the template; a value of None counts as not given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from glm4.tokenizer import Tokenizer
from glm4.tokenizer.gguf_meta import GGUFError, find_gguf_file, read_gguf_header

from .events import ParsedOutput, collect
from .formats import GGUF_ARCH_FORMAT, MODEL_TYPE_FORMAT, ChatFormatSpec, format_of_template, get_format
from .formats.base import StreamParser, ToolCallError
from .messages import ChatFormatError, check_messages, check_tools

TEMPLATE_DIR = Path(__file__).parent / "templates"
SEGMENT_ROLES = ("prefix", "system", "user", "assistant", "observation", "generation_prompt")


def normalize(fmt: str | ChatFormatSpec, messages: Any, tools: Any) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) -> what the format's template consumes: (messages, tools keyword)."""
    spec = get_format(fmt) if isinstance(fmt, str) else fmt
    messages, tools = check_messages(messages), check_tools(tools)
    try:
        return spec.normalize(messages, tools)
    except (KeyError, TypeError, AttributeError) as e:  # a shape the checks above let through
        raise ChatFormatError(f"malformed messages for {spec.name}: {e!r}") from None


# ---------------------------------------------------------------------------------------------
# jinja templates from checkpoints (transformers-compatible sandbox)
# ---------------------------------------------------------------------------------------------
def _jinja_env():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant spans for transformers; here a no-op block
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class _Namespace(jinja2.utils.Namespace):
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")
            super().__setitem__(name, value)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # like transformers: no HTML escaping, key order kept, non-ASCII kept
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


def compile_template(source: str):
    import jinja2

    try:
        return _jinja_env().from_string(source)
    except jinja2.TemplateError as e:
        raise ChatFormatError(f"chat template does not compile: {e}") from None


def builtin_template_source(name: str) -> str:
    """The jinja twin of a built-in format (the official template where one is public)."""
    return (TEMPLATE_DIR / get_format(name).template_file).read_text(encoding="utf-8")


def _read_checkpoint_template(folder: Path) -> str | None:
    p = folder / "chat_template.jinja"
    if p.is_file():
        return p.read_text(encoding="utf-8")
    p = folder / "tokenizer_config.json"
    if p.is_file():
        try:
            tpl = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            raise ChatFormatError(f"{p} is not a valid JSON object") from None
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if isinstance(tpl, str):
            return tpl
    return None


def _format_of_config(folder: Path) -> str:
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            mt = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            raise ChatFormatError(f"{cfg} is not a valid JSON object") from None
        if mt in MODEL_TYPE_FORMAT:
            return MODEL_TYPE_FORMAT[mt]
        raise ChatFormatError(f"{cfg}: no chat format for model_type {mt!r} (known: {sorted(MODEL_TYPE_FORMAT)})")
    raise ChatFormatError(f"no config.json in {folder} to tell the chat format")


# private-use sentinels stand in for special-token strings inside message text while a jinja template
# renders, so that only the template's own special strings become special ids
_SENTINEL_BASE = 0xF0000


def _escape(obj: Any, table: dict[str, str], key: str | None = None) -> Any:
    if isinstance(obj, str):
        if key == "role":
            return obj
        if any(_SENTINEL_BASE <= ord(c) < _SENTINEL_BASE + 256 for c in obj):
            raise ChatFormatError("message text contains reserved private-use characters U+F0000..U+F00FF")
        for s, sub in table.items():
            obj = obj.replace(s, sub)
        return obj
    if isinstance(obj, dict):
        return {k: _escape(v, table, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_escape(v, table) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# ChatFormat
# ---------------------------------------------------------------------------------------------
def _kwargs(template_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in template_kwargs.items() if v is not None}


class ChatFormat:
    """Render and parse one chat format (glm4.chat.formats), with a checkpoint's own template if it has one.

    render(messages, tools=None, add_generation_prompt=True, **template_kwargs) -> str
    encode(tok, messages, ...) -> ids  (only the template's own special strings become special ids)
    encode_segments(tok, messages, ...) -> [(ids, label)], labels in SEGMENT_ROLES: "assistant" marks what
        an SFT loss trains on (everything the model writes after the `<|assistant|>` that opens its turn,
        plus the token that ends the turn); "generation_prompt" marks the opening `<|assistant|>`.
    parse(text, tools, prompt=None) -> ParsedOutput (unpacks as (content, tool_calls))
    stream_parser(tools, prompt=None) -> StreamParser with .feed(delta) / .finish() -> list of events
    `prompt`: the rendered prompt the reply continues (a prompt ending inside `<think>` starts in reasoning).
    """

    def __init__(self, name: str, template: str | None = None):
        self.spec = get_format(name)
        self.template_source = template
        self._template = compile_template(template) if template is not None else None

    @property
    def name(self) -> str:
        """The public format name (chatglm, glm4, glmz1, glm45, glm46, ...)."""
        return self.spec.name

    @property
    def family(self) -> str:
        """The family name earlier versions used: chatglm, glm4 or glm4_moe."""
        return self.spec.family

    @classmethod
    def for_checkpoint(cls, folder: str | os.PathLike, name: str | None = None) -> ChatFormat:
        """The checkpoint's own chat template (chat_template.jinja / tokenizer_config.json, or a GGUF file's
        tokenizer.chat_template), else the built-in; the format from the template's text, else the config."""
        folder = Path(folder)
        gguf = find_gguf_file(folder)
        if gguf is not None:
            try:
                hdr = read_gguf_header(gguf)
            except GGUFError as e:
                raise ChatFormatError(str(e)) from None
            template = hdr.metadata.get("tokenizer.chat_template")
            template = template if isinstance(template, str) and template else None
            fmt = name or format_of_template(template) or GGUF_ARCH_FORMAT.get(hdr.architecture or "")
            if fmt is None:
                raise ChatFormatError(f"{gguf}: no chat format for GGUF architecture {hdr.architecture!r} "
                                      f"(known: {sorted(GGUF_ARCH_FORMAT)})")
            return cls(fmt, template)
        if not folder.is_dir():
            raise ChatFormatError(f"checkpoint folder not found: {folder}")
        template = _read_checkpoint_template(folder)
        return cls(name or format_of_template(template) or _format_of_config(folder), template)

    def __repr__(self) -> str:
        return f"ChatFormat({self.name!r}{', checkpoint template' if self._template is not None else ''})"

    # -- rendering -------------------------------------------------------------------------------
    def _normalize(self, messages, tools, kw):
        self.spec.check(kw)
        return normalize(self.spec, messages, tools)

    def _parts(self, msgs, tools_kw, add_generation_prompt, kw):
        try:
            return self.spec.render_parts(msgs, tools_kw, add_generation_prompt, kw)
        except (KeyError, TypeError, AttributeError) as e:
            raise ChatFormatError(f"malformed message or tool for {self.name}: {e!r}") from None

    def _jinja(self, msgs, tools_kw, add_generation_prompt, kw) -> str:
        import jinja2

        try:
            return self._template.render(**{**kw, "messages": msgs, "tools": tools_kw, "documents": None,
                                            "add_generation_prompt": add_generation_prompt})
        except (jinja2.TemplateError, TypeError, AttributeError, KeyError, ValueError) as e:
            raise ChatFormatError(f"chat template failed to render: {e}") from None

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        kw = _kwargs(template_kwargs)
        msgs, tools_kw = self._normalize(messages, tools, kw)
        if self._template is not None:
            return self._jinja(msgs, tools_kw, add_generation_prompt, kw)
        return "".join(t for t, _, _ in self._parts(msgs, tools_kw, add_generation_prompt, kw))

    def encode(self, tok: Tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        kw = _kwargs(template_kwargs)
        msgs, tools_kw = self._normalize(messages, tools, kw)
        if self._template is None:
            parts = self._parts(msgs, tools_kw, add_generation_prompt, kw)
            return [i for ids, _ in self._encode_parts(tok, parts) for i in ids]
        table, back = self._sentinels(tok)
        text = self._jinja(_escape(msgs, table), _escape(tools_kw, table), add_generation_prompt, kw)
        ids: list[int] = []
        for piece, is_special in self._unescape_split(tok, text, back):
            ids.extend([tok.special_tokens[piece]] if is_special else tok.encode(piece))
        return ids

    @staticmethod
    def _sentinels(tok: Tokenizer) -> tuple[dict[str, str], dict[str, str]]:
        # jinja: special strings in message text hide behind sentinels while the template renders
        specials = list(tok.special_tokens)
        if len(specials) > 256:
            raise ChatFormatError("too many special tokens for the sentinel table")
        table = {s: chr(_SENTINEL_BASE + k) for k, s in enumerate(specials)}
        return table, {v: k for k, v in table.items()}

    @staticmethod
    def _unescape_split(tok: Tokenizer, text: str, back: dict[str, str]) -> list[tuple[str, bool]]:
        out = []
        for piece, is_special in tok.split_special(text):
            if not is_special:
                for c, s in back.items():
                    piece = piece.replace(c, s)
            out.append((piece, is_special))
        return out

    def _jinja_parts(self, tok, msgs, tools_kw, add_generation_prompt, kw):
        """Label a checkpoint template's output by rendering growing prefixes of the conversation."""
        table, back = self._sentinels(tok)
        emsgs, etools = _escape(msgs, table), _escape(tools_kw, table)
        steps = [(k, False) for k in range(len(msgs) + 1)] + ([(len(msgs), True)] if add_generation_prompt else [])
        parts, prev, after_assistant = [], "", False
        for k, gen in steps:
            cur = self._jinja(emsgs[:k], etools, gen, kw)
            if not cur.startswith(prev):
                raise ChatFormatError("encode_segments: this checkpoint's template is not prefix-stable for these "
                                      f"messages (message {k - 1} changes what came before it)")
            delta, prev = cur[len(prev):], cur
            role = None if k == 0 else "generation_prompt" if gen else msgs[k - 1]["role"]
            role = {"tool": "observation"}.get(role, role)
            if role is not None and role not in SEGMENT_ROLES:
                role = "system"
            opened = False
            for piece, is_special in self._unescape_split(tok, delta, back):
                if role is None:
                    label = "prefix" if is_special and piece in ("[gMASK]", "<sop>") else "system"
                elif is_special and not opened:
                    opened = True
                    label = "assistant" if after_assistant else ("generation_prompt" if role == "assistant" else role)
                else:
                    label = role
                parts.append((piece, is_special, label))
            if role is not None and delta:
                after_assistant = role == "assistant"
        return parts

    @staticmethod
    def _encode_parts(tok: Tokenizer, parts) -> list[tuple[list[int], str]]:
        # adjacent plain-text parts of one label are encoded as one string, as a whole-string encode would
        out: list[tuple[list[int], str]] = []
        buf, buf_role = "", None
        for text, is_special, role in parts:
            if not is_special or text not in tok.special_tokens:
                if buf and role != buf_role:
                    out.append((tok.encode(buf), buf_role))
                    buf = ""
                buf, buf_role = buf + text, role
                continue
            if buf:
                out.append((tok.encode(buf), buf_role))
                buf = ""
            out.append(([tok.special_tokens[text]], role))
        if buf:
            out.append((tok.encode(buf), buf_role))
        return out

    def encode_segments(self, tok: Tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                        add_generation_prompt: bool = False, close_final_turn: bool = True,
                        **template_kwargs: Any) -> list[tuple[list[int], str]]:
        """Consecutive token pieces labelled by the role that produced them (for SFT loss masks).

        Concatenated, the ids equal `encode(...)`; when the conversation ends with an assistant turn and
        `close_final_turn`, one more ("assistant") piece holds the token that ends it: `<|observation|>`
        after a tool call, else `<|user|>`, as the model must emit to stop.
        """
        kw = _kwargs(template_kwargs)
        msgs, tools_kw = self._normalize(messages, tools, kw)
        parts = self._parts(msgs, tools_kw, add_generation_prompt, kw)
        if self._template is not None:
            rendered = self._jinja(msgs, tools_kw, add_generation_prompt, kw)
            if rendered != "".join(t for t, _, _ in parts):  # not the built-in format: label by prefixes
                parts = self._jinja_parts(tok, msgs, tools_kw, add_generation_prompt, kw)
        segs = [(ids, role) for ids, role in self._encode_parts(tok, parts) if ids]
        if close_final_turn and not add_generation_prompt and msgs and msgs[-1]["role"] == "assistant":
            last = msgs[-1]
            is_call = bool(last.get("metadata") or last.get("tool_calls"))
            end = "<|observation|>" if is_call else "<|user|>"
            if end in tok.special_tokens:
                segs.append(([tok.special_tokens[end]], "assistant"))
        return segs

    # -- stopping and parsing --------------------------------------------------------------------
    def stop_token_ids(self, tok: Tokenizer) -> list[int]:
        return [tok.special_tokens[s] for s in self.spec.stop_tokens if s in tok.special_tokens]

    eos_token_ids = stop_token_ids

    def starts_in_reasoning(self, prompt: str | None) -> bool:
        return bool(prompt) and self.spec.starts_in_reasoning(prompt)

    def stream_parser(self, tools: Sequence[dict] | None = None, stream_arguments: bool = True,
                      prompt: str | None = None, id_factory=None) -> StreamParser:
        return self.spec.stream_parser(tools, stream_arguments, id_factory, self.starts_in_reasoning(prompt))

    def parse(self, text: str, tools: Sequence[dict] | None = None, prompt: str | None = None,
              id_factory=None) -> ParsedOutput:
        """Batch parse: the stream parser fed the whole text at once."""
        if not isinstance(text, str):
            raise ToolCallError(f"parse expects str, got {type(text).__name__}")
        p = self.stream_parser(tools, prompt=prompt, id_factory=id_factory)
        return collect(p.feed(text) + p.finish())
