"""OpenAI API shapes: requests, validated once here at the HTTP edge (pydantic), and the documented responses.

Names, defaults and ranges follow OpenAI's Chat Completions / Completions / Models APIs. Pydantic checks the
shape of a request; what it means for the model (roles, tool schemas, tool_choice naming an offered tool,
text-only content) is the chat layer's check, also a 400. As OpenAI reads a request: `null` = not given
(`"n": null` is n = 1); unknown fields are refused, a few that change nothing here accepted (`user`, `store`,
`metadata`, `service_tier`, `prompt_cache_*`, `safety_identifier`, `verbosity`); the legacy `functions` /
`function_call` (`role: "function"` messages, assistant `function_call`) map onto tools / tool_choice, and the
reply carries the legacy `function_call`. Extensions as vLLM / SGLang take them: `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `min_tokens`, `chat_template_kwargs`, `enable_thinking`, `reasoning_effort`
"none" / "minimal" (= enable_thinking false), `thinking_budget` (tokens, then `</think>` is forced); also inside a
literal `extra_body` object. The chat layer (glm4.chat.planner) combines the thinking switches.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16
MAX_STOP = 4


def random_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # requests: unknown fields are refused; responses: documented exactly


# ---------------------------------------------------------------- errors


class ErrorInfo(_Strict):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Strict):
    error: ErrorInfo


# ---------------------------------------------------------------- messages


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):  # vLLM's extension: a video by data: URI, local path or URL
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # legacy: mapped onto tool_calls
    refusal: str | None = None
    reasoning_content: str | None = None  # past thinking, rendered where the chat template shows it
    reasoning: str | None = Field(None, exclude=True)  # the same under vLLM's newer name (reasoning_content wins)

    @model_validator(mode="after")
    def _one_reasoning(self):
        if self.reasoning_content is None:
            self.reasoning_content = self.reasoning
        return self


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


class FunctionMessage(_Strict):
    """Legacy: a function's result; mapped onto a tool message answering the call before it."""

    role: Literal["function"]
    name: str
    content: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
                    Field(discriminator="role")]


# ---------------------------------------------------------------- tools and formats


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_\-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is 'json_schema'")
        return self


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


# ---------------------------------------------------------------- requests


def _null_is_absent(data: Any) -> Any:
    """A request body with its null fields left out, and the fields of a literal `extra_body` object merged
    in (the body's own fields win)."""
    if not isinstance(data, dict):
        return data
    body = {k: v for k, v in data.items() if v is not None}
    extra = body.pop("extra_body", None)
    if extra is None:
        return body
    if not isinstance(extra, dict):
        raise ValueError("extra_body: must be an object")
    return {**{k: v for k, v in extra.items() if v is not None}, **body}


def _legacy_messages(messages: list) -> list:
    """Assistant `function_call`s become tool calls; each `function` message answers the call before it."""
    out, call_id = [], None
    for k, m in enumerate(messages):
        if isinstance(m, AssistantMessage) and m.function_call is not None:
            if m.tool_calls:
                raise ValueError(f"messages.{k}: give tool_calls or the legacy function_call, not both")
            call_id = f"call_{k}"
            m = m.model_copy(update={"function_call": None,
                                     "tool_calls": [ToolCall(id=call_id, function=m.function_call)]})
        elif isinstance(m, FunctionMessage):
            m = ToolMessage(role="tool", content=m.content or "", tool_call_id=call_id or f"call_{k}")
        out.append(m)
    return out


class _SamplingFields(_Strict):
    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM names)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0, le=2**31 - 1)
    ignore_eos: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _null_is_absent(data)

    @model_validator(mode="after")
    def _check_common(self):
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} sequences are allowed")
        if any(not s for s in stop):
            raise ValueError("stop: sequences must be non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        for k, v in (self.logit_bias or {}).items():
            if not k.lstrip("-").isdigit() or int(k) < 0:
                raise ValueError(f"logit_bias: keys must be token ids, got {k!r}")
            if not -100.0 <= v <= 100.0:
                raise ValueError(f"logit_bias: values must be in [-100, 100], got {v}")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None  # legacy tools
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # legacy tool_choice
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    enable_thinking: bool | None = None  # SGLang / DashScope spelling of chat_template_kwargs.enable_thinking
    chat_template_kwargs: dict[str, Any] | None = None  # passed to the chat template (vLLM, SGLang)
    thinking_budget: int | None = Field(None, ge=1)  # tokens of thinking, then `</think>` is forced
    modalities: list[Literal["text"]] | None = None  # "audio" is refused
    # accepted, no effect here
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: logprobs must be true when top_logprobs is set")
        if self.functions is not None or self.function_call is not None:
            self._map_legacy_functions()
        self.messages = _legacy_messages(self.messages)
        thinking = (self.chat_template_kwargs or {}).get("enable_thinking")
        if thinking is not None and not isinstance(thinking, bool):
            raise ValueError("chat_template_kwargs.enable_thinking: must be true or false")
        return self

    def _map_legacy_functions(self) -> None:
        if self.tools is not None:
            raise ValueError("functions: give tools or the legacy functions, not both")
        if self.function_call is not None and self.tool_choice is not None:
            raise ValueError("function_call: give tool_choice or the legacy function_call, not both")
        self.tools = [Tool(type="function", function=f) for f in self.functions or []] or None
        fc = self.function_call
        self.tool_choice = NamedToolChoice(type="function", function=fc) if isinstance(fc, NamedFunction) else fc
        self.parallel_tool_calls = False  # a legacy reply carries one function_call
        self.functions = self.functions or []  # marks the request as legacy (see uses_legacy_functions)

    @property
    def uses_legacy_functions(self) -> bool:
        """The request spoke the legacy functions API: the reply carries `function_call`, not `tool_calls`."""
        return self.functions is not None


class CompletionRequest(_SamplingFields):
    """`echo` with `logprobs` also scores the prompt (its first token has none), as lm-eval's loglikelihood
    requests need; `max_tokens` 0 with `echo` scores the prompt and generates nothing; `prompt_logprobs`
    (vLLM) gives each prompt token's logprob, rank and that many alternatives by token id."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0, le=2**31 - 1)
    logprobs: int | None = Field(None, ge=0, le=5)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _check_completion(self):
        p = self.prompt
        if isinstance(p, list) and len(p) == 0:
            raise ValueError("prompt: must not be empty")
        if isinstance(p, list) and any(isinstance(x, list) and len(x) == 0 for x in p):
            raise ValueError("prompt: token lists must not be empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be at least 1 (0 only together with echo)")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs: not available when stream is true")
        return self

    @property
    def scores_prompt(self) -> bool:
        """The prompt's token logprobs are needed (echoed logprobs or prompt_logprobs)."""
        return self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)


# ---------------------------------------------------------------- responses (what the OpenAPI schema documents)


class Usage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Strict):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ResponseMessage(_Strict):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # only for a request that used the legacy functions
    reasoning_content: str | None = None  # the model's thinking (DeepSeek / older vLLM name)
    reasoning: str | None = None  # the same thinking (newer vLLM name)


FinishReason = Literal["stop", "length", "tool_calls", "function_call", "content_filter"]


class ChatChoice(_Strict):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(_Strict):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(_Strict):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(_Strict):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(_Strict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM: by token id, None for the first


class Completion(_Strict):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Strict):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm4"
    max_model_len: int | None = None


class ModelList(_Strict):
    object: Literal["list"] = "list"
    data: list[ModelCard]
