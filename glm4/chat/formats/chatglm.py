"""chatglm: glm-4-9b-chat (and its -hf twin). Calls are whole assistant turns `name\\n{json arguments}`.

    [gMASK]<sop><|system|>\\n你是一个名为 ChatGLM 的人工智能助手。…# 可用工具\\n## get_weather\\n\\n{…}\\n在调用…
    <|user|>\\n天气?<|assistant|>get_weather\\n{"city": "北京"}<|observation|>\\n晴<|assistant|>

Tools ride on a system message (`"tools"` key), results are `<|observation|>` turns, and several
`name\\n{...}` turns in a row (each after `<|assistant|>`) are several calls. Built-in tools `python`,
`cogview`, `simple_browser` may carry a raw body instead of JSON.

GLM-4V-9B (the same format): a user message's image part (`{"type": "image"}`, from glm4.chat.media) renders as its
tokenizer writes it, `<|user|>\n<|begin_of_image|><|endoftext|><|end_of_image|>{text}` — the image first whatever
the part order, one image per conversation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from ..events import ContentDelta, Event, Notice, ToolCallDelta, ToolCallEnd, ToolCallInvalid
from ..jsonscan import JsonScanner
from ..lark import json_rule, lark_str
from ..messages import ChatFormatError, text_of, to_native
from ..tools import tool_function
from .base import NAME_CHARS, THINK_OPEN, ChatFormatSpec, Parts, StreamParser, jinja_str, json_str_chars

# the glm-4-9b-chat tools header and built-in tool sections, exactly as its template renders them
HEADER = (
    '\n'
    '你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n'
    '\n'
    '# 可用工具'
)
BUILTIN_TOOL_TEXT = {
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
TOOL_USAGE_ZH = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def function_section(fn: dict) -> str:
    """`## name` + the function as indented JSON + the usage line (glm-4-9b-chat and 0414 alike)."""
    return f"\n## {jinja_str(fn, 'name')}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}{TOOL_USAGE_ZH}"


class JsonCallParser(StreamParser):
    """`name\\n{json}` calls (one per `<|assistant|>` turn, or several in a row); anything else is content.

    A turn may open with `<think>...</think>` (GLM-Z1), or the prompt may have opened it (`in_reasoning`)."""

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
                events, waiting = self._thinking(seg_final)
                out += events
                if waiting:
                    return out
                res = self._decide(seg_final)
                if res is None:
                    return out
                out += res
                continue
            if self.state == "args":
                if self._scan_json(out):
                    continue
                if seg_final:
                    out += [ToolCallInvalid(self.call_index, f"truncated JSON arguments for {self.call_name!r}"),
                            ContentDelta(self.raw)]
                    self.state = "content"
                    continue
                return out
            if self.state == "raw":
                if self.seg:
                    out.append(ToolCallDelta(self.call_index, json_str_chars(self.seg)))
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
        if rest.startswith(THINK_OPEN):
            self.seg, self.in_think = rest[len(THINK_OPEN):], True
            return []
        if not rest or (not seg_final and THINK_OPEN.startswith(rest)):
            if seg_final:
                self.state = "content"
                return []
            return None  # nothing yet, or maybe `<think>` split across deltas
        if not self.tools:
            self.state = "content"  # no tools offered: whatever this is, it is the answer
            return []
        lead = s[: len(s) - len(rest)]
        nl = rest.find("\n")
        line = rest if nl < 0 else rest[:nl]
        if NAME_CHARS.fullmatch(line) is None:
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
            self.scanner, self.args = JsonScanner(), ""
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
        """Consume self.seg into the JSON arguments; True when the arguments ended (closed or malformed)."""
        n = self.scanner.feed(self.seg)
        piece, self.seg = self.seg[:n], self.seg[n:]
        if piece:
            self.raw += piece
            self.args += piece
            out.append(ToolCallDelta(self.call_index, piece))
        if not (self.scanner.done or self.scanner.error):
            return False
        try:
            val = json.loads(self.args if self.scanner.done else self.args + self.seg)
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


def json_calls_rules(special: set[str], tools: list[dict], parallel: bool) -> list[str]:
    """`name\\n{json args}` for an allowed name, several joined by `<|assistant|>`, ended by `<|observation|>`."""
    sep = "<|assistant|>" if "<|assistant|>" in special else lark_str("\n")
    stop = "<|observation|>" if "<|observation|>" in special else ""
    alts, rules = [], []
    for i, tool in enumerate(tools):
        fn = tool_function(tool)
        alts.append(f"{lark_str(fn['name'] + chr(10))} args_{i}")
        rules.append(f"args_{i}: {json_rule(fn.get('parameters'))}")
    calls = f"call ({sep} call)*" if parallel else "call"
    return [f"calls: {calls} {stop}", "call: " + " | ".join(alts), *rules]


def json_auto_grammar(special: set[str], tools: list[dict], parallel: bool, json_answer: bool,
                      schema: dict | None) -> str:
    """A plain answer (`\\n` then free text, or JSON in a JSON mode) or calls (which start with a tool name);
    an answer may be followed by calls in later `<|assistant|>` turns of the same reply."""
    answer = f"answer: {lark_str(chr(10))} {json_rule(schema)}" if json_answer else r"answer: /\n(?s:.*)/"
    sep = "<|assistant|>" if "<|assistant|>" in special else None
    start = f"start: calls | answer ({sep} calls)?" if sep else "start: calls | answer"
    return "\n".join([start, answer, *json_calls_rules(special, tools, parallel)])


# GLM-4V-9B (a chatglm checkpoint with a vision tower): its tokenizer puts an image as these 3 tokens at the start of
# the user message, after `<|user|>{metadata}\n`; one image per conversation (glm4.media.glm4v_9b expands them)
GLM4V_9B_IMAGE = ("<|begin_of_image|>", "<|endoftext|>", "<|end_of_image|>")
_IMAGE_MARK = "\U0010fffe"  # stands for the image inside rendered text until the parts are split (never in input)


def _image_prefix(messages: list[dict]) -> list[dict]:
    """User messages with an image part (`{"type": "image"}`, glm4.chat.media) -> text with the image mark first."""
    out, seen = [], 0
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str) and _IMAGE_MARK in content:
            raise ChatFormatError(f"message {i} contains the reserved character U+10FFFE")
        parts = [c for c in content if isinstance(c, dict)] if isinstance(content, list) else []
        images = [c for c in parts if c.get("type") == "image" or "image" in c]
        if any(c.get("type") == "video" or "video" in c for c in parts):
            raise ChatFormatError(f"message {i}: this format takes no videos")
        if images:
            seen += len(images)
            if seen > 1:
                raise ChatFormatError("GLM-4V-9B takes one image per conversation")
            if m.get("role") != "user":
                raise ChatFormatError(f"message {i}: images go in user messages")
            m = {**m, "content": _IMAGE_MARK + text_of(content)}
        out.append(m)
    return out


def _split_image_mark(parts: list) -> list:
    out = []
    for text, special, label in parts:
        if special or _IMAGE_MARK not in text:
            out.append((text, special, label))
            continue
        before, after = text.split(_IMAGE_MARK, 1)
        out += ([(before, False, label)] if before else []) + [(t, True, label) for t in GLM4V_9B_IMAGE] + \
            ([(after, False, label)] if after else [])
    return out


class ChatGLM(ChatFormatSpec):
    name = "chatglm"
    family = "chatglm"
    aliases = ("glm", "glm-4-9b-chat")
    template_file = "chatglm.jinja"
    openai_messages = False
    close_mode = "tools"

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return re.search(r"""item\[['"]tools['"]\]|item\.tools""", template) is not None

    def normalize(self, messages, tools):
        messages = _image_prefix(messages)
        msgs = to_native(messages)
        if tools:  # glm-4-9b-chat reads tools off a message, not from the tools keyword
            msgs = [{"role": "system", "content": "", "tools": tools}] + msgs
        return msgs, None

    def render_parts(self, msgs, tools, add_generation_prompt, kw):
        p = Parts()
        for item in msgs:
            if "tools" in item:
                p.open("<|system|>", "system")
                body = HEADER
                for tool in item["tools"] or []:
                    kind = tool.get("type")
                    if kind == "function":
                        body += function_section(tool["function"])
                    elif kind in BUILTIN_TOOL_TEXT:
                        body += BUILTIN_TOOL_TEXT[kind]
                p.text(body, "system")
                p.end("system")
            if item.get("content"):
                meta = item.get("metadata")
                p.turn(item["role"], f"{'' if meta is None else meta}\n{item['content']}")
        if add_generation_prompt:
            p.open("<|assistant|>", "assistant")
        return _split_image_mark(p.parts)

    def stream_parser(self, tools=None, stream_arguments=True, id_factory: Callable[[], str] | None = None,
                      in_reasoning=False) -> StreamParser:
        return JsonCallParser(tools, stream_arguments, id_factory, in_reasoning)

    def calls_grammar(self, special, tools, parallel, in_reasoning, thinking=True):
        return "\n".join(["start: calls", *json_calls_rules(special, tools, parallel)])

    def auto_grammar(self, special, tools, parallel, json_answer, schema):
        return json_auto_grammar(special, tools, parallel, json_answer, schema)
