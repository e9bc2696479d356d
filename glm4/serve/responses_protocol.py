"""OpenAI Responses API shapes: the request of `POST /v1/responses` (validated once, here) and the response object
the OpenAPI schema documents.

As for chat (glm4.serve.protocol): `null` = not given, a literal `extra_body` object is merged in, unknown top-level
fields are refused. Items a client passes back from an earlier output (assistant messages, `function_call`,
`reasoning`) are read for the fields that matter here and may carry others (`status`, `id`, `annotations`,
`encrypted_content`, ...), since clients are told to send output items back as they got them. Only function tools
exist here: hosted tools (web search, file search, ...) are refused by name. Accepted with no effect: `user`,
`safety_identifier`, `prompt_cache_*`, `service_tier`, `max_tool_calls` (built-in tools only), `include`
values other than `message.output_text.logprobs`, `text.verbosity`, `reasoning.summary`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from glm4.serve.protocol import FunctionDef, _null_is_absent, _Strict

EFFORTS = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
ITEM_STATUS = Literal["in_progress", "completed", "incomplete"]


class _Echo(BaseModel):
    """An item a client sends back from an earlier output: extra fields are allowed (and dropped)."""

    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- input items


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class InputImage(_Strict):
    """An image by URL (data:, or what the server's media flags allow); by file_id it is a 400 (no file store)."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


class InputFile(_Strict):
    type: Literal["input_file"]
    file_id: str | None = None
    file_data: str | None = None
    file_url: str | None = None
    filename: str | None = None


class OutputTextPart(_Echo):
    type: Literal["output_text"]
    text: str


class RefusalPart(_Echo):
    type: Literal["refusal"]
    refusal: str


InputPart = Annotated[InputText | InputImage | InputFile | OutputTextPart | RefusalPart, Field(discriminator="type")]


class MessageItem(_Echo):
    """A message: user / system / developer input (`input_text`), or an assistant turn (`output_text`)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None


class FunctionCallItem(_Echo):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(_Echo):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputPart]
    id: str | None = None


class SummaryText(_Echo):
    type: Literal["summary_text"]
    text: str


class ReasoningText(_Echo):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(_Echo):
    type: Literal["reasoning"]
    summary: list[SummaryText] = []
    content: list[ReasoningText] | None = None
    id: str | None = None


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
                      Field(discriminator="type")]


# ---------------------------------------------------------------- tools, formats, reasoning


class FunctionTool(FunctionDef):
    """The Responses tool shape: the function's fields at the top level, next to `type`."""

    type: Literal["function"]


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_\-]+$")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("text.format: json_schema needs a name and a schema")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Strict):
    effort: EFFORTS | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesStreamOptions(_Strict):
    include_obfuscation: bool | None = None


HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview", "computer",
                "code_interpreter", "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom")


# ---------------------------------------------------------------- the request


class ResponsesRequest(_Strict):
    model: str
    input: list[InputItem] | str | None = None  # (the list first: its errors are the ones worth telling)
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    store: bool | None = None
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    # accepted, no effect here
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: str | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    # extensions, as the chat endpoint takes them (vLLM names)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0, le=2**31 - 1)
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        data = _null_is_absent(data)
        if not isinstance(data, dict):
            return data
        tools = data.get("tools")
        for i, t in enumerate(tools if isinstance(tools, list) else []):
            kind = t.get("type") if isinstance(t, dict) else None
            if kind in HOSTED_TOOLS or (isinstance(kind, str) and kind.startswith(("web_search", "computer"))):
                raise ValueError(f"tools.{i}.type: the hosted tool {kind!r} is not available here; "
                                 "only function tools are")
        items = data.get("input")
        if isinstance(items, list):  # a message may leave out its `type` (OpenAI's "easy" input message)
            data["input"] = [{**x, "type": "message"} if isinstance(x, dict) and "type" not in x and "role" in x
                             else x for x in items]
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.input is None and self.previous_response_id is None:
            raise ValueError("input: give input, previous_response_id, or both")
        if isinstance(self.input, list) and not self.input and self.previous_response_id is None:
            raise ValueError("input: must not be empty")
        if self.metadata is not None:
            if len(self.metadata) > 16 or any(len(k) > 64 for k in self.metadata):
                raise ValueError("metadata: at most 16 keys of at most 64 characters")
        if self.tools:
            names = [t.name for t in self.tools]
            if len(set(names)) != len(names):
                raise ValueError("tools: function names must be unique")
        if self.background:
            raise ValueError("background: background responses are not supported")
        if self.truncation == "auto":
            raise ValueError("truncation: only 'disabled' is supported (the input is never cut)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ValueError("stop: at most 4 non-empty sequences")
        return self

    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or []) or bool(self.top_logprobs)

    @property
    def logit_bias(self) -> None:  # what serving.sampling_kwargs reads of a chat request
        return None


# ---------------------------------------------------------------- the response object (what the schema documents)


class TopLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(_Strict):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class OutputText(_Strict):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict] = []
    logprobs: list[Logprob] = []


class OutputMessage(_Strict):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ITEM_STATUS
    content: list[OutputText]


class OutputFunctionCall(_Strict):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ITEM_STATUS


class OutputReasoning(_Strict):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[SummaryText] = []
    content: list[ReasoningText] | None = None
    status: ITEM_STATUS | None = None


OutputItem = Annotated[OutputMessage | OutputFunctionCall | OutputReasoning, Field(discriminator="type")]


class InputTokensDetails(_Strict):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(_Strict):
    reasoning_tokens: int


class ResponseUsage(_Strict):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ErrorDetail(_Strict):
    code: str
    message: str


class IncompleteDetails(_Strict):
    reason: Literal["max_output_tokens", "content_filter"]


class Response(_Strict):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: ErrorDetail | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    instructions: str | None = None
    output: list[OutputItem]
    parallel_tool_calls: bool
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice
    tools: list[FunctionTool]
    text: TextConfig
    reasoning: ReasoningConfig
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] = {}
    store: bool
    background: bool = False
    truncation: Literal["disabled"] = "disabled"
    service_tier: str = "default"
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    usage: ResponseUsage | None = None


class DeletedResponse(_Strict):
    id: str
    object: Literal["response"] = "response"
    deleted: bool
