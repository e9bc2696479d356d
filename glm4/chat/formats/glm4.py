"""glm4: GLM-4-9B/32B-0414, and GLM-Z1 (its thinking sibling, registered as `glmz1`).

    [gMASK]<sop><|system|>\\n# 可用工具\\n## get_weather\\n\\n{…}\\n在调用…<|system|>\\nBe brief.
    <|user|>\\n天气?<|assistant|>get_weather\\n{"city": "北京"}<|observation|>\\n晴<|assistant|>

Calls as glm-4-9b-chat (`name\\n{json}` turns, see chatglm.py) but tools come as the template's `tools`
keyword, system messages are hoisted to the front, and past assistant turns show only the text after
their last `</think>`. GLM-Z1 puts the ChatGLM identity line above the tools and opens `<think>` in the
generation prompt, so its reply starts inside the thinking.
"""

from __future__ import annotations

from ..messages import to_native
from .base import THINK_OPEN, ChatFormatSpec, Parts
from .chatglm import JsonCallParser, function_section, json_auto_grammar, json_calls_rules

THINK_TEXT = r"THINK: /(?s:.*)<\/think>/ & ~/(?s:.*<\/think>.+)/"  # any text up to the first </think>


class Glm4(ChatFormatSpec):
    name = "glm4"
    family = "glm4"
    aliases = ("glm4-0414",)
    template_file = "glm4.jinja"
    openai_messages = False
    close_mode = "tools"
    tools_header = "\n# 可用工具"
    generation_suffix = ""  # after the generation prompt's `<|assistant|>`

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return "# 可用工具" in template and "tool.function" in template and THINK_OPEN not in template

    def normalize(self, messages, tools):
        msgs = []
        for m in to_native(messages):
            if "tools" in m:  # a glm-4-9b-chat style tools message: lift its tools to the keyword
                if tools is None:
                    tools = list(m.get("tools") or [])
                m = {k: v for k, v in m.items() if k != "tools"}
                if not m.get("content"):
                    continue
            msgs.append(m)
        return msgs, tools

    def render_parts(self, msgs, tools, add_generation_prompt, kw):
        p = Parts()
        if tools:
            p.open("<|system|>", "system")
            p.text(self.tools_header + "".join(function_section(t["function"] if t.get("function") else t)
                                               for t in tools), "system")
            p.end("system")
        for m in msgs:
            if m["role"] == "system":
                p.turn("system", "\n" + str(m.get("content", "")))
        for m in msgs:
            role = m["role"]
            if role not in ("user", "assistant", "observation"):
                continue
            visible = str(m.get("content", "")).split("</think>")[-1].strip()
            p.turn(role, f"{m.get('metadata') or ''}\n{visible}")
        if add_generation_prompt:
            p.open("<|assistant|>", "assistant")
            p.text(self.generation_suffix, "generation_prompt")
        return p.parts

    def stream_parser(self, tools=None, stream_arguments=True, id_factory=None, in_reasoning=False):
        return JsonCallParser(tools, stream_arguments, id_factory, in_reasoning)

    def calls_grammar(self, special, tools, parallel, in_reasoning, thinking=True):
        if in_reasoning:  # the prompt opened <think>: the reply closes it, then calls
            return "\n".join(["start: THINK calls", THINK_TEXT, *json_calls_rules(special, tools, parallel)])
        return "\n".join(["start: calls", *json_calls_rules(special, tools, parallel)])

    def auto_grammar(self, special, tools, parallel, json_answer, schema):
        if self.thinks:
            return None  # a thinking reply is parsed and validated, not constrained, under "auto"
        return json_auto_grammar(special, tools, parallel, json_answer, schema)


class GlmZ1(Glm4):
    name = "glmz1"
    aliases = ("glm-z1", "z1")
    template_file = "glmz1.jinja"
    thinks = True
    tools_header = ("\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
                    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
    generation_suffix = "\n<think>"

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return "# 可用工具" in template and "tool.function" in template and THINK_OPEN in template
