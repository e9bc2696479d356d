"""Chat formats of the GLM-4 families: render messages to the prompt string / token ids, parse replies.

Families: "chatglm" (glm-4-9b-chat and its -hf twin), "glm4" (GLM-4-0414), "glm4_moe" (GLM-4.5/4.6).
The built-in renderers are plain Python, golden-tested byte for byte against the jinja templates in
`templates/` rendered the way transformers' `apply_chat_template` renders them. A checkpoint folder with
its own template renders through a sandboxed jinja environment configured like transformers'.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .gguf_meta import GGUFError, find_gguf_file, read_gguf_header
from .tokenizer import CHAT_EOS_TOKENS, GLM4_SPECIAL_TOKENS, Tokenizer
from .tool_calls import ParsedOutput, StreamParser, make_stream_parser, parse_text

FAMILIES = ("chatglm", "glm4", "glm4_moe")
# config.json model_type -> chat family
MODEL_TYPE_FAMILY = {"chatglm": "chatglm", "glm": "chatglm", "glm4": "glm4", "glm4_moe": "glm4_moe"}
# GGUF general.architecture (llama.cpp's names) -> chat family
GGUF_ARCH_FAMILY = {"chatglm": "chatglm", "glm4": "glm4", "glm4moe": "glm4_moe"}
TEMPLATE_DIR = Path(__file__).parent / "templates"
SEGMENT_ROLES = ("prefix", "system", "user", "assistant", "observation", "generation_prompt")


class ChatFormatError(ValueError):
    """Bad messages/tools for a chat format, or an unusable chat template."""


# the glm-4-9b-chat tools header and built-in tool sections, exactly as its template renders them
_CHATGLM_HEADER = (
    '\n'
    '你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n'
    '\n'
    '# 可用工具'
)
_CHATGLM_BUILTIN_TOOLS = {
    'python': (
        '\n'
        '## python\n'
        '\n'
        '当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n'
        '`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n'
        '`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。'
    ),
    'simple_browser': (
        '\n'
        '## simple_browser\n'
        '\n'
        '你可以使用 `simple_browser` 工具。该工具支持以下函数：\n'
        '`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` 参数控制搜索内容的时效性。\n'
        '`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n'
        '`open_url(url: str)`：打开指定的 URL。\n'
        '\n'
        '使用 `【{引用 id}†{引用文本}】` 来引用内容。\n'
        '\n'
        '操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n'
        ' 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n'
        '如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。'
    ),
    'cogview': (
        '\n'
        '## cogview\n'
        '\n'
        '如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` 发送图像描述，规则：\n'
        '- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n'
        '- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n'
        '- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n'
        '- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。'
    ),
}


_TOOL_USAGE_ZH = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
_GLM45_TOOLS_HEAD = (
    "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_GLM45_TOOLS_TAIL = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)
_SPECIALS = frozenset(GLM4_SPECIAL_TOKENS)


# ---------------------------------------------------------------------------------------------
# message normalisation (OpenAI <-> native)
# ---------------------------------------------------------------------------------------------
def _text(content: Any) -> str:
    """Message content as a string: None -> "", OpenAI content parts -> their text joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                out.append(str(part.get("text", "")))
        return "".join(out)
    raise ChatFormatError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatFormatError(f"message {i} must be a dict with a string 'role'")
        if m.get("tools") is not None:
            _check_tools(m["tools"])
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, (list, tuple)) and all(isinstance(c, dict) for c in calls)):
            raise ChatFormatError(f"message {i}: tool_calls must be a list of dicts")
        meta = m.get("metadata")
        if meta is not None and not isinstance(meta, str):
            raise ChatFormatError(f"message {i}: metadata must be a string (the called tool's name)")
    return list(messages)


def _check_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
        raise ChatFormatError("tools must be a list of dicts")
    return list(tools)


def _args_str(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _args_dict(args: Any, name: str) -> dict:
    if isinstance(args, dict):
        return args
    if args is None or (isinstance(args, str) and not args.strip()):
        return {}
    try:
        val = json.loads(args)
    except (TypeError, ValueError):
        raise ChatFormatError(f"tool call {name!r}: arguments are not valid JSON: {args!r:.80}") from None
    if not isinstance(val, dict):
        raise ChatFormatError(f"tool call {name!r}: arguments must be a JSON object")
    return val


def _call_fn(tc: Any) -> dict:
    fn = tc.get("function", tc) if isinstance(tc, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatFormatError(f"bad tool call {tc!r:.80}: needs function.name")
    return fn


def to_native(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> glm-4-9b-chat native ones (role tool -> observation, one assistant turn per call)."""
    out = []
    for m in messages:
        role = m["role"]
        if role == "tool":
            out.append({"role": "observation", "content": _text(m.get("content"))})
        elif role == "assistant" and m.get("tool_calls"):
            content = _text(m.get("content"))
            if content:
                out.append({"role": "assistant", "content": content})
            for tc in m["tool_calls"]:
                fn = _call_fn(tc)
                out.append({"role": "assistant", "metadata": fn["name"], "content": _args_str(fn.get("arguments"))})
        else:
            n = dict(m)
            if "content" in n:
                n["content"] = _text(n["content"])
            out.append(n)
    return out


def to_openai(messages: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """Native messages -> the OpenAI shape GLM-4.5 templates read; returns (messages, tools lifted off a message)."""
    out, lifted = [], None
    for m in messages:
        role = m["role"]
        if "tools" in m and role == "system":
            lifted = (lifted or []) + list(m.get("tools") or [])
            if not _text(m.get("content")):
                continue
        if role == "observation":
            out.append({"role": "tool", "content": _text(m.get("content"))})
        elif role == "assistant" and m.get("metadata"):
            name = m["metadata"]
            out.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": _args_dict(m.get("content"), name)}}]})
        else:
            n = {k: v for k, v in m.items() if k != "tools"}
            n["content"] = _text(m.get("content"))
            if role == "assistant" and m.get("tool_calls"):
                n["tool_calls"] = []
                for tc in m["tool_calls"]:
                    fn = _call_fn(tc)
                    n["tool_calls"].append({"type": "function", "function": {
                        "name": fn["name"], "arguments": _args_dict(fn.get("arguments"), fn["name"])}})
            out.append(n)
    return out, lifted


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    # transformers copies `thinking` / `reasoning` into `reasoning_content` before rendering
    out = []
    for m in messages:
        r = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        out.append({"thinking": r, **m, "reasoning_content": r} if r is not None else m)
    return out


def normalize(family: str, messages: Any, tools: Any) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) -> what the family's template consumes: (messages, tools keyword)."""
    messages, tools = _check_messages(messages), _check_tools(tools)
    try:
        return _normalize(family, messages, tools)
    except (KeyError, TypeError, AttributeError) as e:  # a shape the checks above let through
        raise ChatFormatError(f"malformed messages for {family}: {e!r}") from None


def _normalize(family: str, messages: list[dict], tools: list[dict] | None):
    if family == "chatglm":
        msgs = to_native(messages)
        if tools:  # glm-4-9b-chat reads tools off a message, not from the tools keyword
            msgs = [{"role": "system", "content": "", "tools": tools}] + msgs
        return msgs, None
    if family == "glm4":
        msgs = []
        for m in to_native(messages):
            if "tools" in m:
                if tools is None:
                    tools = list(m.get("tools") or [])
                m = {k: v for k, v in m.items() if k != "tools"}
                if not m.get("content"):
                    continue
            msgs.append(m)
        return msgs, tools
    msgs, lifted = to_openai(messages)
    return _alias_reasoning(msgs), tools if tools is not None else lifted


# ---------------------------------------------------------------------------------------------
# built-in renderers: a list of parts (text, is_special, role)
# ---------------------------------------------------------------------------------------------
def _jinja_str(d: dict, key: str) -> str:
    # `{{ d.key }}` in jinja: missing -> "", None -> "None"
    return str(d[key]) if isinstance(d, dict) and key in d else ""


class _Parts:
    def __init__(self):
        self.parts: list[tuple[str, bool, str]] = []
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


def _render_chatglm(msgs: list[dict], add_generation_prompt: bool, **_: Any) -> list[tuple[str, bool, str]]:
    p = _Parts()
    p.parts += [("[gMASK]", True, "prefix"), ("<sop>", True, "prefix")]
    for item in msgs:
        if "tools" in item:
            p.open("<|system|>", "system")
            body = _CHATGLM_HEADER
            for tool in item["tools"] or []:
                kind = tool.get("type")
                if kind == "function":
                    fn = tool["function"]
                    body += f"\n## {_jinja_str(fn, 'name')}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}{_TOOL_USAGE_ZH}"
                elif kind in _CHATGLM_BUILTIN_TOOLS:
                    body += _CHATGLM_BUILTIN_TOOLS[kind]
            p.text(body, "system")
            p.end("system")
        if item.get("content"):
            role = item["role"]
            meta = item.get("metadata")
            p.turn(role, f"{'' if meta is None else meta}\n{item['content']}")
    if add_generation_prompt:
        p.open("<|assistant|>", "assistant")
    return p.parts


def _render_glm4(msgs: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None,
                 **_: Any) -> list[tuple[str, bool, str]]:
    p = _Parts()
    p.parts += [("[gMASK]", True, "prefix"), ("<sop>", True, "prefix")]
    if tools:
        p.open("<|system|>", "system")
        body = "\n# 可用工具"
        for tool in tools:
            fn = tool["function"] if tool.get("function") else tool
            body += f"\n## {_jinja_str(fn, 'name')}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}{_TOOL_USAGE_ZH}"
        p.text(body, "system")
        p.end("system")
    for m in msgs:
        if m["role"] == "system":
            p.turn("system", "\n" + str(m.get("content", "")))
    for m in msgs:
        role = m["role"]
        if role not in ("user", "assistant", "observation"):
            continue
        visible = str(m.get("content", "")).split("</think>")[-1].strip()
        meta = m.get("metadata") or ""
        p.turn(role, f"{meta}\n{visible}")
    if add_generation_prompt:
        p.open("<|assistant|>", "assistant")
    return p.parts


def _render_glm4_moe(msgs: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None,
                     enable_thinking: bool | None = None, **_: Any) -> list[tuple[str, bool, str]]:
    p = _Parts()
    p.parts += [("[gMASK]", True, "prefix"), ("<sop>", True, "prefix")]
    no_think = enable_thinking is not None and not enable_thinking
    if tools:
        p.open("<|system|>", "system")
        body = _GLM45_TOOLS_HEAD + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools) + _GLM45_TOOLS_TAIL
        p.text(body, "system")
        p.end("system")
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "user":
            content = _text(m.get("content"))
            p.turn("user", "\n" + content + ("/nothink" if no_think and not content.endswith("/nothink") else ""))
        elif role == "assistant":
            content = _text(m.get("content"))
            reasoning = ""
            if isinstance(m.get("reasoning_content"), str):
                reasoning = m["reasoning_content"]
            elif "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            body = f"\n<think>{reasoning.strip()}</think>" if i > last_user and reasoning else "\n<think></think>"
            if content.strip():
                body += "\n" + content.strip()
            for tc in m.get("tool_calls") or []:
                fn = _call_fn(tc)
                body += "\n<tool_call>" + fn["name"] + "\n"
                for k, v in _args_dict(fn.get("arguments"), fn["name"]).items():
                    val = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                    body += f"<arg_key>{k}</arg_key>\n<arg_value>{val}</arg_value>\n"
                body += "</tool_call>"
            p.turn("assistant", body)
        elif role == "tool":
            content = _text(m.get("content"))
            if i == 0 or msgs[i - 1]["role"] != "tool":
                p.open("<|observation|>", "observation")
            p.text(f"\n<tool_response>\n{content}\n</tool_response>", "observation")
            p.end("observation")
        elif role == "system":
            p.turn("system", "\n" + _text(m.get("content")))
    if add_generation_prompt:
        p.open("<|assistant|>", "assistant")
        if no_think:
            p.text("\n<think></think>", "generation_prompt")
    return p.parts


_RENDERERS = {"chatglm": _render_chatglm, "glm4": _render_glm4, "glm4_moe": _render_glm4_moe}


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


def builtin_template_source(family: str) -> str:
    return (TEMPLATE_DIR / f"{family}.jinja").read_text(encoding="utf-8")


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


def _family_of_template(template: str | None) -> str | None:
    """The tool-call format is the template's, not the architecture's (our shipped MoE speaks glm-4-9b-chat)."""
    if not template:
        return None
    if "<tool_call>" in template or "<arg_key>" in template:
        return "glm4_moe"
    if re.search(r"""item\[['"]tools['"]\]|item\.tools""", template):
        return "chatglm"
    return None


def _family_of(folder: Path) -> str:
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            mt = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            raise ChatFormatError(f"{cfg} is not a valid JSON object") from None
        if mt in MODEL_TYPE_FAMILY:
            return MODEL_TYPE_FAMILY[mt]
        raise ChatFormatError(f"{cfg}: no chat format for model_type {mt!r} (known: {sorted(MODEL_TYPE_FAMILY)})")
    raise ChatFormatError(f"no config.json in {folder} to tell the chat family")


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
class ChatFormat:
    """Render and parse one family's chat format.

    render(messages, tools=None, add_generation_prompt=True, enable_thinking=None) -> str
    encode(tok, messages, ...) -> ids  (only the template's own special strings become special ids)
    encode_segments(tok, messages, ...) -> [(ids, label)], labels in SEGMENT_ROLES: "assistant" marks what
        an SFT loss trains on (everything the model writes after the `<|assistant|>` that opens its turn,
        plus the token that ends the turn); "generation_prompt" marks the opening `<|assistant|>`.
    parse(text, tools) -> ParsedOutput (unpacks as (content, tool_calls))
    stream_parser(tools) -> StreamParser with .feed(delta) / .finish() -> list of events (see tool_calls.py)
    """

    def __init__(self, family: str, template: str | None = None):
        if family not in FAMILIES:
            raise ChatFormatError(f"unknown chat family {family!r}; expected one of {FAMILIES}")
        self.family = family
        self.template_source = template
        self._template = compile_template(template) if template is not None else None

    @classmethod
    def for_checkpoint(cls, folder: str | os.PathLike, family: str | None = None) -> ChatFormat:
        """The checkpoint's own chat template (chat_template.jinja / tokenizer_config.json, or a GGUF file's
        tokenizer.chat_template), else the built-in."""
        folder = Path(folder)
        gguf = find_gguf_file(folder)
        if gguf is not None:
            try:
                hdr = read_gguf_header(gguf)
            except GGUFError as e:
                raise ChatFormatError(str(e)) from None
            template = hdr.metadata.get("tokenizer.chat_template")
            template = template if isinstance(template, str) and template else None
            fam = family or _family_of_template(template) or GGUF_ARCH_FAMILY.get(hdr.architecture or "")
            if fam is None:
                raise ChatFormatError(f"{gguf}: no chat format for GGUF architecture {hdr.architecture!r} "
                                      f"(known: {sorted(GGUF_ARCH_FAMILY)})")
            return cls(fam, template)
        if not folder.is_dir():
            raise ChatFormatError(f"checkpoint folder not found: {folder}")
        template = _read_checkpoint_template(folder)
        return cls(family or _family_of_template(template) or _family_of(folder), template)

    def __repr__(self) -> str:
        return f"ChatFormat({self.family!r}{', checkpoint template' if self._template is not None else ''})"

    # -- rendering -------------------------------------------------------------------------------
    def _parts(self, msgs, tools_kw, add_generation_prompt, enable_thinking):
        try:
            return _RENDERERS[self.family](msgs, add_generation_prompt, tools=tools_kw, enable_thinking=enable_thinking)
        except (KeyError, TypeError, AttributeError) as e:
            raise ChatFormatError(f"malformed message or tool for {self.family}: {e!r}") from None

    def _jinja(self, msgs, tools_kw, add_generation_prompt, enable_thinking) -> str:
        import jinja2

        kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        try:
            return self._template.render(messages=msgs, tools=tools_kw, documents=None,
                                         add_generation_prompt=add_generation_prompt, **kw)
        except (jinja2.TemplateError, TypeError, AttributeError, KeyError, ValueError) as e:
            raise ChatFormatError(f"chat template failed to render: {e}") from None

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> str:
        msgs, tools_kw = normalize(self.family, messages, tools)
        if self._template is not None:
            return self._jinja(msgs, tools_kw, add_generation_prompt, enable_thinking)
        return "".join(t for t, _, _ in self._parts(msgs, tools_kw, add_generation_prompt, enable_thinking))

    def encode(self, tok: Tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> list[int]:
        msgs, tools_kw = normalize(self.family, messages, tools)
        if self._template is None:
            parts = self._parts(msgs, tools_kw, add_generation_prompt, enable_thinking)
            return [i for ids, _ in self._encode_parts(tok, parts) for i in ids]
        table, back = self._sentinels(tok)
        text = self._jinja(_escape(msgs, table), _escape(tools_kw, table), add_generation_prompt, enable_thinking)
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

    def _jinja_parts(self, tok, msgs, tools_kw, add_generation_prompt, enable_thinking):
        """Label a checkpoint template's output by rendering growing prefixes of the conversation."""
        table, back = self._sentinels(tok)
        emsgs, etools = _escape(msgs, table), _escape(tools_kw, table)
        steps = [(k, False) for k in range(len(msgs) + 1)] + ([(len(msgs), True)] if add_generation_prompt else [])
        parts, prev, after_assistant = [], "", False
        for k, gen in steps:
            cur = self._jinja(emsgs[:k], etools, gen, enable_thinking)
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
                        add_generation_prompt: bool = False, enable_thinking: bool | None = None,
                        close_final_turn: bool = True) -> list[tuple[list[int], str]]:
        """Consecutive token pieces labelled by the role that produced them (for SFT loss masks).

        Concatenated, the ids equal `encode(...)`; when the conversation ends with an assistant turn and
        `close_final_turn`, one more ("assistant") piece holds the token that ends it: `<|observation|>`
        after a tool call, else `<|user|>`, as the model must emit to stop.
        """
        msgs, tools_kw = normalize(self.family, messages, tools)
        parts = self._parts(msgs, tools_kw, add_generation_prompt, enable_thinking)
        if self._template is not None:
            rendered = self._jinja(msgs, tools_kw, add_generation_prompt, enable_thinking)
            if rendered != "".join(t for t, _, _ in parts):  # not the built-in format: label by prefixes
                parts = self._jinja_parts(tok, msgs, tools_kw, add_generation_prompt, enable_thinking)
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
        return [tok.special_tokens[s] for s in CHAT_EOS_TOKENS if s in tok.special_tokens]

    eos_token_ids = stop_token_ids

    def parse(self, text: str, tools: Sequence[dict] | None = None) -> ParsedOutput:
        return parse_text(self.family, text, tools)

    def stream_parser(self, tools: Sequence[dict] | None = None, stream_arguments: bool = True) -> StreamParser:
        return make_stream_parser(self.family, tools, stream_arguments=stream_arguments)
