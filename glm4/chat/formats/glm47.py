"""glm47: GLM-4.7 (and GLM-4.7-Flash). The GLM-4.5 XML calls without newlines, thinking on by default.

    [gMASK]<sop><|system|>\\n# Tools\\n…</tools>…<|user|>Weather?<|assistant|><think>reasoning</think>
    Let me check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>
    <tool_call>now</tool_call><|observation|><tool_response>晴</tool_response><tool_response>12:00</tool_response>

No newline after any role token; a call without arguments is `<tool_call>name</tool_call>`. The generation
prompt ends in `<think>` (the reply starts thinking) or, with `enable_thinking=False`, in `</think>`.
Assistant turns show their thinking only after the last user turn, unless `clear_thinking=False`
("preserved thinking") keeps it on every turn; otherwise a turn opens with a bare `</think>`.
"""

from __future__ import annotations

from ..lark import json_grammar, json_rule
from ..messages import args_dict, call_function, text_of, to_openai
from .base import ChatFormatSpec, Parts
from .xml import XmlCallParser, split_reasoning, tools_block, xml_call, xml_calls_grammar, xml_closing_suffix

TOOLS_TAIL = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
)
THINK_TEXT = r"THINK: /(?s:.*)<\/think>/ & ~/(?s:.*<\/think>.+)/"  # the rest of an opened thinking


class Glm47(ChatFormatSpec):
    name = "glm47"
    family = "glm4_moe"
    aliases = ("glm-4.7",)
    template_file = "glm47.jinja"
    thinks = True
    sep = ""  # between the tags of a call

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return "clear_thinking" in template and "<arg_key>" in template

    def normalize(self, messages, tools):
        msgs, lifted = to_openai(messages)
        return msgs, tools if tools is not None else lifted

    def render_parts(self, msgs, tools, add_generation_prompt, kw):
        p = Parts()
        keep_thinking = "clear_thinking" in kw and not kw["clear_thinking"]
        if tools:
            p.open("<|system|>", "system")
            p.text(tools_block(tools, TOOLS_TAIL), "system")
            p.end("system")
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
        for i, m in enumerate(msgs):
            role = m["role"]
            if role in ("user", "system"):
                p.turn(role, text_of(m.get("content")))
            elif role == "assistant":
                reasoning, content = split_reasoning(m)
                body = f"<think>{reasoning.strip()}</think>" if (keep_thinking or i > last_user) and reasoning \
                    else "</think>"
                body += content.strip()
                for tc in m.get("tool_calls") or []:
                    fn = call_function(tc)
                    body += xml_call(fn["name"], args_dict(fn.get("arguments"), fn["name"]), self.sep)
                p.turn("assistant", body)
            elif role == "tool":
                if i == 0 or msgs[i - 1]["role"] != "tool":
                    p.open("<|observation|>", "observation")
                p.text(f"<tool_response>{text_of(m.get('content'))}</tool_response>", "observation")
                p.end("observation")
        if add_generation_prompt:
            p.open("<|assistant|>", "assistant")
            p.text("</think>" if kw.get("enable_thinking") is False else "<think>", "generation_prompt")
        return p.parts

    def stream_parser(self, tools=None, stream_arguments=True, id_factory=None, in_reasoning=False):
        return XmlCallParser(tools, stream_arguments, id_factory, in_reasoning)

    def calls_grammar(self, special, tools, parallel, in_reasoning, thinking=True):
        return xml_calls_grammar(special, tools, parallel, self.sep, "THINK" if in_reasoning else "")

    def json_answer_grammar(self, schema, in_reasoning):
        if not in_reasoning:
            return json_grammar(schema if schema is not None else {"type": "object"}, prefix="")
        return "\n".join(["start: THINK value", THINK_TEXT, f"value: {json_rule(schema)}"])

    def closing_suffix(self, text, tools, in_reasoning=False):
        return xml_closing_suffix(text, tools, self.sep, "think" if in_reasoning else "none")
