"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

lm-evaluation-harness's `local-completions` model finds the server's tokenizer here (its "remote" tokenizer
backend: `/tokenizer_info` must name `eos_token`, `/tokenize` answer `tokens`), so it never downloads one.

    POST /tokenize    {"prompt": str, "add_special_tokens": true}            (`[gMASK]<sop>` first, as the
                      {"messages": [...], "tools": [...], ...}                 checkpoint's tokenizer adds them)
                      -> {"count", "max_model_len", "tokens", "token_strs"}  (the chat form: the chat prompt's ids)
    POST /detokenize  {"tokens": [ids]} -> {"prompt": str}
    GET /tokenizer_info -> {"tokenizer_class", "eos_token", "pad_token", "bos_token", "model_max_length",
                            "chat_template", ...} (the shape of tokenizer_config.json)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from glm4.chat.planner import ChatError
from glm4.serve import protocol as P
from glm4.serve import serving
from glm4.serve.completions import encode_prompt
from glm4.serve.errors import ParsedBodyRoute, bad_request
from glm4.serve.serving import ServerState, check_model, route

router = APIRouter(route_class=ParsedBodyRoute)
_ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 404)}


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[P.Message] = Field(min_length=1)
    tools: list[P.Tool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def _state(request: Request) -> ServerState:
    return request.app.state.glm4


def _chat_ids(st: ServerState, req: TokenizeChatRequest) -> list[int]:
    """The prompt ids a chat completion of these messages would run (the same planner)."""
    if not req.add_generation_prompt or req.continue_final_message:
        raise bad_request("only add_generation_prompt true (continue_final_message false) is supported",
                          "add_generation_prompt", "unsupported_parameter")
    if req.chat_template is not None:
        raise bad_request("chat_template: the checkpoint's template is used; a request may not replace it",
                          "chat_template", "unsupported_parameter")
    try:
        plan = st.chat.plan([m.model_dump(exclude_none=True) for m in req.messages],
                            tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                            chat_template_kwargs=req.chat_template_kwargs)
    except ChatError as e:
        raise bad_request(str(e), e.param, e.code) from None
    return plan.prompt_ids


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> TokenizeResponse:
    return await serving.offload(_tokenize, _state(request), req)  # CPU work: on the bounded pool


def _tokenize(st: ServerState, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
    if req.model is not None:
        st = route(st, req.model)
        check_model(st, req.model)
    if isinstance(req, TokenizeChatRequest):
        ids = _chat_ids(st, req)
    else:
        ids = encode_prompt(st.tokenizer, req.prompt) if req.add_special_tokens else \
            list(st.tokenizer.encode(req.prompt, allow_special=True))
    strs = [st.token_texts.text(t) for t in ids] if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=st.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(req: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await serving.offload(_detokenize, _state(request), req)


def _detokenize(st: ServerState, req: DetokenizeRequest) -> DetokenizeResponse:
    if req.model is not None:
        st = route(st, req.model)
        check_model(st, req.model)
    bad = [t for t in req.tokens if not 0 <= t < st.vocab_size]
    if bad:
        raise bad_request(f"tokens: token id {bad[0]} is out of range (vocab size {st.vocab_size})", "tokens")
    return DetokenizeResponse(prompt=st.tokenizer.decode(req.tokens))


@router.get("/tokenizer_info", responses={401: _ERRORS[401]})
def tokenizer_info(request: Request) -> dict:
    st = _state(request)
    tok = st.tokenizer
    pad = tok.pad_token_id
    return {"tokenizer_class": type(tok).__name__,
            "eos_token": st.token_texts.text(tok.eos_token_ids[0]) if tok.eos_token_ids else None,
            "pad_token": st.token_texts.text(pad) if pad is not None else None,
            "bos_token": None,  # GLM's tokenizer adds the `[gMASK]<sop>` prefix instead of a BOS token
            "model_max_length": st.max_model_len, "clean_up_tokenization_spaces": False,
            "chat_template": chat_template_text(st)}


def chat_template_text(st: ServerState) -> str | None:
    """The chat template the server renders with: the checkpoint's own, else the built-in one of its format."""
    from glm4.chat.template import TEMPLATE_DIR

    fmt = st.chat.fmt
    if fmt.template_source:
        return fmt.template_source
    path = TEMPLATE_DIR / f"{fmt.name}.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None
