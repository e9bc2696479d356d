"""Anthropic Messages API shapes: the requests of POST /v1/messages and /v1/messages/count_tokens, validated once
here at the HTTP edge (pydantic), and the documented responses.

Names, block types and ranges follow Anthropic's API. Unknown fields are refused; fields Anthropic's clients send
that change nothing here are accepted (`cache_control` anywhere, `citations`, `metadata`, `service_tier`,
`container`, `context_management`, `diagnostics`, `inference_geo`, `speed`, `user_profile_id`, `workspace_id`, and
a custom tool's `strict`, `input_examples`, `defer_loading`, `eager_input_streaming`, `allowed_callers`). `null` =
not given. Server tools (`web_search_...`, `bash_...`) are refused: only custom tools run here. What a request means
for the model (images, tool_result ids, prefill) is checked by the adapter (glm4.serve.anthropic), also a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_SEQUENCES = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Ignored = dict[str, Any] | None  # accepted, no effect (cache_control and the like)


# ---------------------------------------------------------------- content blocks


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: Ignored = None
    citations: list[Any] | None = None


class ImageBlock(_Strict):
    """An image: source {"type": "base64", "media_type", "data"} or {"type": "url", "url"} (glm4.serve.anthropic)."""

    type: Literal["image"]
    source: dict[str, Any]
    cache_control: Ignored = None
    transformations: Ignored = None


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: Ignored = None
    caller: Ignored = None
    toolset_name: str | None = None


ResultPart = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None
    cache_control: Ignored = None
    toolset_name: str | None = None


class ThinkingBlock(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Strict):
    """Thinking a client cannot read: nothing to render, so it is left out of the prompt."""

    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


class MessageParam(_Strict):
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


# ---------------------------------------------------------------- tools, tool_choice, thinking, output


class CustomTool(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_\-]+$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: Ignored = None
    strict: bool | None = None
    input_examples: list[dict[str, Any]] | None = None
    defer_loading: bool | None = None
    eager_input_streaming: bool | None = None
    allowed_callers: list[str] | None = None


class ToolChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class ThinkingEnabled(_Strict):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1, le=2**31 - 1)  # no 1024 minimum here: small models, small budgets
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(_Strict):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(_Strict):
    type: Literal["disabled"]


Thinking = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")]


class JSONOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OutputConfig(_Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # passed to the template
    format: JSONOutputFormat | None = None  # the reply's text is JSON valid under the schema


# ---------------------------------------------------------------- requests


def _drop_nulls(data: Any) -> Any:
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _no_server_tools(data: Any) -> None:
    tools = data.get("tools") if isinstance(data, dict) else None
    for i, t in enumerate(tools if isinstance(tools, list) else []):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(f"tools.{i}: tool type {kind!r} is not supported here; only custom tools "
                             "(name, description, input_schema) are")


class CountTokensRequest(_Strict):
    """What the prompt is made of: POST /v1/messages/count_tokens takes exactly this."""

    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[CustomTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # accepted, no effect here
    cache_control: Ignored = None
    context_management: Ignored = None
    diagnostics: Ignored = None
    speed: Literal["standard", "fast"] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        _no_server_tools(data)
        return _drop_nulls(data)

    @model_validator(mode="after")
    def _unique_tools(self):
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: tool names must be unique")
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=2**31 - 1)
    stream: bool = False
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, Any] | None = None
    # accepted, no effect here
    service_tier: Literal["auto", "standard_only"] | None = None
    container: str | dict[str, Any] | None = None
    inference_geo: str | None = None

    @model_validator(mode="after")
    def _check_sampling(self):
        if any(not s for s in self.stop_sequences or []):
            raise ValueError("stop_sequences: sequences must be non-empty strings")
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise ValueError("thinking.budget_tokens: must be less than max_tokens")
        return self


# ---------------------------------------------------------------- responses (what the OpenAPI schema documents)


class MessageUsage(_Strict):
    input_tokens: int
    output_tokens: int


class ResponseText(_Strict):
    type: Literal["text"]
    text: str


class ResponseThinking(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ResponseToolUse(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


ResponseBlock = Annotated[ResponseText | ResponseThinking | ResponseToolUse, Field(discriminator="type")]


class MessageResponse(_Strict):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ResponseBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: MessageUsage


class TokenCount(_Strict):
    input_tokens: int


class AnthropicError(_Strict):
    type: str
    message: str


class AnthropicErrorResponse(_Strict):
    type: Literal["error"] = "error"
    error: AnthropicError
