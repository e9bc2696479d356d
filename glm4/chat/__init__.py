"""Chat: one home per chat format, and the planning of chat requests over them.

    from glm4.chat import ChatFormat, ChatPlanner
    fmt = ChatFormat("glm46")                     # or ChatFormat.for_checkpoint(path); names in FORMATS
    prompt = fmt.render(messages, tools=None, add_generation_prompt=True, enable_thinking=False)
    content, tool_calls = fmt.parse(generated_text, tools, prompt=prompt)

Layout: formats/ (one module per format behind one registry: renderer, reply parser, grammar, closing
suffix, stop tokens), messages (shapes and the structural check), events (parser events, the one fold,
the one OpenAI-delta mapping), tools (schemas, the one JSON-schema checker, XML value typing), jsonscan
(the one character-level JSON scanner), template (ChatFormat, jinja like transformers), media (image / video
content parts -> template placeholders and the vision model's numpy inputs), lark (grammar text), grammar (llguidance masks; torch), thinking (thinking budget and loop guard; torch), planner
(requests -> prompt ids and sampling constraints; replies -> messages). Everything but grammar,
thinking and planner is torch-free.
"""

from .events import (
    ContentDelta,
    Event,
    Fold,
    Notice,
    ParsedOutput,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallInvalid,
    ToolCallStart,
    collect,
    openai_delta,
    openai_deltas,
)
from .formats import ALIASES, FORMATS, ChatFormatSpec, format_names, format_of_template, get_format
from .formats.base import StreamParser, ToolCallError
from .messages import ChatFormatError
from .template import SEGMENT_ROLES, ChatFormat, builtin_template_source

__all__ = [
    "ALIASES", "FORMATS", "SEGMENT_ROLES", "ChatFormat", "ChatFormatError", "ChatFormatSpec", "ContentDelta",
    "Event", "Fold", "Notice", "ParsedOutput", "ReasoningDelta", "StreamParser", "ToolCallDelta", "ToolCallEnd",
    "ToolCallError", "ToolCallInvalid", "ToolCallStart", "builtin_template_source", "collect", "format_names",
    "format_of_template", "get_format", "openai_delta", "openai_deltas",
]
