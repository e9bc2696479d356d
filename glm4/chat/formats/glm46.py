"""glm46: GLM-4.6. The GLM-4.5 format (glm45.py); its template reads `tc.arguments or {}`, so a call
given without arguments renders (as `<tool_call>name\\n</tool_call>`) instead of failing."""

from __future__ import annotations

from .glm45 import Glm45


class Glm46(Glm45):
    name = "glm46"
    aliases = ("glm-4.6",)
    template_file = "glm46.jinja"

    @classmethod
    def matches_template(cls, template: str) -> bool:
        xml = "<arg_key>" in template or "<tool_call>" in template
        return xml and "tc.arguments or {}" in template
