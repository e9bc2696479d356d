"""glm45: GLM-4.5 / GLM-4.5-Air. Thinking in `<think>`, tools in a `<tools>` system block, XML calls.

    [gMASK]<sop><|system|>\\n# Tools\\n…<tools>\\n{…}\\n</tools>…<|user|>\\nWeather?<|assistant|>
    \\n<think>reasoning</think>\\nLet me check.\\n<tool_call>get_weather\\n<arg_key>city</arg_key>\\n
    <arg_value>Paris</arg_value>\\n</tool_call><|observation|>\\n<tool_response>\\n晴\\n</tool_response><|assistant|>

An argument value is written raw when it is a string, else as JSON; reading it back, the tool's schema
decides (tools.ToolSet.xml_value). Past turns show `<think></think>` (reasoning only after the last user
turn); `enable_thinking=False` appends `/nothink` to user turns and `\\n<think></think>` to the prompt.
The parser, grammar and closing guard are shared with GLM-4.6 and later (xml.py).
"""

from __future__ import annotations

from ..lark import lark_str
from ..messages import args_dict, call_function, text_of, to_openai
from .base import ChatFormatSpec, Parts
from .xml import XmlCallParser, split_reasoning, tools_block, xml_call, xml_calls_grammar, xml_closing_suffix

TOOLS_TAIL = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)


# ---------------------------------------------------------------------------------------------
# the format
# ---------------------------------------------------------------------------------------------
class Glm45(ChatFormatSpec):
    name = "glm45"
    family = "glm4_moe"
    aliases = ("glm4_moe", "glm-4.5")
    template_file = "glm45.jinja"
    thinks = True
    sep = "\n"  # between the tags of a call

    @classmethod
    def matches_template(cls, template: str) -> bool:
        xml = "<arg_key>" in template or "<tool_call>" in template
        return xml and "tc.arguments or {}" not in template

    def normalize(self, messages, tools):
        msgs, lifted = to_openai(messages)
        return msgs, tools if tools is not None else lifted

    def render_parts(self, msgs, tools, add_generation_prompt, kw):
        p = Parts()
        no_think = kw.get("enable_thinking") is False
        if tools:
            p.open("<|system|>", "system")
            p.text(tools_block(tools, TOOLS_TAIL), "system")
            p.end("system")
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
        for i, m in enumerate(msgs):
            role = m["role"]
            if role == "user":
                content = text_of(m.get("content"))
                p.turn("user", "\n" + content + ("/nothink" if no_think and not content.endswith("/nothink") else ""))
            elif role == "assistant":
                reasoning, content = split_reasoning(m)
                body = f"\n<think>{reasoning.strip()}</think>" if i > last_user and reasoning else "\n<think></think>"
                if content.strip():
                    body += "\n" + content.strip()
                for tc in m.get("tool_calls") or []:
                    fn = call_function(tc)
                    body += "\n" + xml_call(fn["name"], args_dict(fn.get("arguments"), fn["name"]), "\n")
                p.turn("assistant", body)
            elif role == "tool":
                if i == 0 or msgs[i - 1]["role"] != "tool":
                    p.open("<|observation|>", "observation")
                p.text(f"\n<tool_response>\n{text_of(m.get('content'))}\n</tool_response>", "observation")
                p.end("observation")
            elif role == "system":
                p.turn("system", "\n" + text_of(m.get("content")))
        if add_generation_prompt:
            p.open("<|assistant|>", "assistant")
            if no_think:
                p.text("\n<think></think>", "generation_prompt")
        return p.parts

    def stream_parser(self, tools=None, stream_arguments=True, id_factory=None, in_reasoning=False):
        return XmlCallParser(tools, stream_arguments, id_factory, in_reasoning)

    def prelude(self, in_reasoning: bool) -> str:
        """How the reply reaches its calls, for the closing guard (see xml_closing_suffix)."""
        return "glm45"

    def calls_grammar(self, special, tools, parallel, in_reasoning, thinking=True):
        # `\n`, optionally `<think>...</think>\n`, then the calls
        nl = lark_str("\n")
        return xml_calls_grammar(special, tools, parallel, self.sep, f"{nl} (think {nl})?" if thinking else nl)

    def closing_suffix(self, text, tools, in_reasoning=False):
        return xml_closing_suffix(text, tools, self.sep, self.prelude(in_reasoning))
