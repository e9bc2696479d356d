"""glm4v: GLM-4.1V-Thinking (and GLM-4.6V-Flash's `glm4v` checkpoints); glm45v: GLM-4.5V / GLM-4.6V.

    [gMASK]<sop><|system|>\\nBe brief.<|user|>\\n<|begin_of_image|><|image|><|end_of_image|>What is it?<|assistant|>\\n
    <think>The picture shows…</think><answer>A cat.</answer>

User content is a list of parts: `{"type": "text", "text"}`, `{"type": "image"}`, `{"type": "video"}` (glm4.chat.media
turns OpenAI `image_url` / `video_url` parts into the last two); an image renders as
`<|begin_of_image|><|image|><|end_of_image|>`, a video as `<|begin_of_video|><|video|><|end_of_video|>`, and
glm4.chat.media expands the single `<|image|>` / `<|video|>` to one token per vision-tower output.

GLM-4.1V (the official template, byte for byte): no tools; assistant turns are `<|assistant|>\\n{content}` (with a
tool name: `<|assistant|>{metadata}\\n{content}`); the generation prompt is `<|assistant|>\\n`. Its reply is
`<think>…</think><answer>…</answer>`: the thinking becomes reasoning, the answer content (the tags dropped).
GLM-4.5V: the GLM-4.5 format (glm45.py: XML tool calls, `<think>`, `/nothink`) with media parts in user turns.
Both keep special text in replies, so GLM-4.5V's grounding boxes `<|begin_of_box|>[[x1,y1,x2,y2]]<|end_of_box|>`
stay in the content.
"""

from __future__ import annotations

from ..events import ContentDelta, Event
from ..messages import ChatFormatError, text_of, to_openai
from .base import THINK_OPEN, ChatFormatSpec, Part, Parts, StreamParser, partial_marker
from .glm45 import Glm45

IMAGE_PLACEHOLDER = "<|begin_of_image|><|image|><|end_of_image|>"
VIDEO_PLACEHOLDER = "<|begin_of_video|><|video|><|end_of_video|>"
PLACEHOLDER_TOKENS = ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>",
                      "<|begin_of_video|>", "<|video|>", "<|end_of_video|>")
# stand-ins for a media part inside rendered user text until the parts are split (noncharacters: never in input)
IMAGE_MARK, VIDEO_MARK = "\U0010fffe", "\U0010ffff"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def vision_text(content) -> str:
    """User content -> text with IMAGE_MARK / VIDEO_MARK where its media parts are."""
    if not isinstance(content, list):
        return text_of(content)
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image" or (isinstance(part, dict) and "image" in part):
            out.append(IMAGE_MARK)
        elif kind == "video" or (isinstance(part, dict) and "video" in part):
            out.append(VIDEO_MARK)
        else:
            out.append(text_of([part]))
    return "".join(out)


def check_no_marks(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if any(c in text_of(m.get("content")) for c in (IMAGE_MARK, VIDEO_MARK)):
            raise ChatFormatError(f"message {i} contains the reserved characters U+10FFFE / U+10FFFF")


def split_marks(parts: list[Part]) -> list[Part]:
    """Text parts split at the media marks, each mark becoming its placeholder's special tokens."""
    out: list[Part] = []
    for text, special, label in parts:
        if special or (IMAGE_MARK not in text and VIDEO_MARK not in text):
            out.append((text, special, label))
            continue
        buf = ""
        for c in text:
            if c in (IMAGE_MARK, VIDEO_MARK):
                if buf:
                    out.append((buf, False, label))
                    buf = ""
                kind = "image" if c == IMAGE_MARK else "video"
                out += [(f"<|begin_of_{kind}|>", True, label), (f"<|{kind}|>", True, label),
                        (f"<|end_of_{kind}|>", True, label)]
            else:
                buf += c
        if buf:
            out.append((buf, False, label))
    return out


class ThinkAnswerParser(StreamParser):
    """`<think>reasoning</think><answer>content</answer>`: reasoning, then content with the answer tags dropped
    (a reply without the tags is content as it stands). No tool calls."""

    def _reset_segment(self) -> None:
        self.seg = ""
        self.state = "start"

    def _advance(self, seg_final: bool) -> list[Event]:
        out: list[Event] = []
        if self.state == "start":
            s = self.seg.lstrip()
            if not s and not seg_final:
                return out
            if s.startswith(THINK_OPEN):
                self.seg, self.in_think = s[len(THINK_OPEN):], True
            elif not seg_final and THINK_OPEN.startswith(s):
                return out  # maybe `<think>` still coming
            self.state = "reply"
        events, waiting = self._thinking(seg_final)
        out += events
        if waiting:
            return out
        s = self.seg
        for tag in (ANSWER_OPEN, ANSWER_CLOSE):
            s = s.replace(tag, "")
        keep = 0 if seg_final else partial_marker(s, (ANSWER_OPEN, ANSWER_CLOSE))
        if s[:len(s) - keep]:
            out.append(ContentDelta(s[:len(s) - keep]))
        self.seg = s[len(s) - keep:]
        return out


class Glm4v(ChatFormatSpec):
    name = "glm4v"
    family = "glm4v"
    aliases = ("glm-4.1v", "glm41v")
    template_file = "glm4v.jinja"
    thinks = True
    vision = True
    keeps_special_text = True

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return IMAGE_PLACEHOLDER in template and "<tool_call>" not in template and "<arg_key>" not in template

    def normalize(self, messages, tools):
        if tools:
            raise ChatFormatError("GLM-4.1V does not call tools")
        check_no_marks(messages)
        msgs = []
        for m in messages:
            m = dict(m)
            if m["role"] == "tool":
                m["role"] = "observation"
            if not isinstance(m.get("content"), list) or m["role"] != "user":
                m["content"] = text_of(m.get("content")) if m.get("content") is not None else None
            msgs.append(m)
        return msgs, tools

    def render_parts(self, msgs, tools, add_generation_prompt, kw):
        p = Parts()
        for m in msgs:
            role, content = m["role"], m.get("content")
            if role == "system":
                p.turn("system", "\n" + str(content))
            elif role == "user":
                p.turn("user", "\n" + vision_text(content))
            elif role == "assistant":
                p.turn("assistant", f"{m.get('metadata') or ''}\n{content}")
        if add_generation_prompt:
            p.open("<|assistant|>", "assistant")
            p.text("\n", "generation_prompt")
        return split_marks(p.parts)

    def stream_parser(self, tools=None, stream_arguments=True, id_factory=None, in_reasoning=False):
        return ThinkAnswerParser(None, stream_arguments, id_factory, in_reasoning)


class Glm45v(Glm45):
    name = "glm45v"
    family = "glm4v_moe"
    aliases = ("glm-4.5v", "glm4v_moe", "glm-4.6v")
    template_file = ""  # no built-in jinja twin: checkpoints ship their template
    vision = True
    keeps_special_text = True

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return IMAGE_PLACEHOLDER in template and ("<tool_call>" in template or "<arg_key>" in template)

    def normalize(self, messages, tools):
        check_no_marks(messages)
        msgs, lifted = [], None
        for m in messages:
            if m.get("role") == "user" and isinstance(m.get("content"), list):
                msgs.append(dict(m))
                continue
            one, more = to_openai([m])
            msgs += one
            if more:
                lifted = (lifted or []) + more
        return msgs, tools if tools is not None else lifted

    def render_parts(self, msgs, tools, add_generation_prompt, kw):
        flat = [{**m, "content": vision_text(m["content"])} if m["role"] == "user" else m for m in msgs]
        return split_marks(super().render_parts(flat, tools, add_generation_prompt, kw))
