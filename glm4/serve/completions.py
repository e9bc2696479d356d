"""POST /v1/completions: raw prompts (text or token ids, one or many) x n choices, whole or as server-sent events."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse

from glm4.serve import protocol as P
from glm4.serve import serving
from glm4.serve.errors import aborted, bad_request
from glm4.serve.serving import ServerState


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A raw prompt: special-token strings allowed; `[gMASK]<sop>` prepended as GLM's tokenizer does."""
    ids = list(tokenizer.encode(text, allow_special=True))
    sp = tokenizer.special_tokens
    prefix = [sp[s] for s in ("[gMASK]", "<sop>") if s in sp]
    if len(prefix) == 2 and ids[:1] != prefix[:1]:
        ids = prefix + ids
    return ids


def _prompts(st: ServerState, req: P.CompletionRequest) -> list[tuple[list[int], str | None]]:
    """(prompt ids, prompt text or None for token ids) of each prompt of the request."""
    p = req.prompt
    items: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((encode_prompt(st.tokenizer, item), item))
        else:
            bad = [t for t in item if not 0 <= t < st.vocab_size]
            if bad:
                raise bad_request(f"prompt: token id {bad[0]} is out of range (vocab size {st.vocab_size})", "prompt")
            out.append((list(item), None))
    return out


def _logprobs(st: ServerState, entries: list[dict] | None, offset: int) -> tuple[dict, int]:
    """The legacy logprobs object of some tokens whose text starts at `offset`; and the offset after them."""
    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    texts = st.token_texts
    for e in entries or []:
        tok = texts.text(e["token_id"])
        lp["tokens"].append(tok)
        lp["token_logprobs"].append(e["logprob"])
        lp["top_logprobs"].append({texts.text(t): v for t, v in e.get("top_logprobs") or []})
        lp["text_offset"].append(offset)
        offset += len(tok)
    return lp, offset


def _check_supported(req: P.CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported", "best_of", "unsupported_parameter")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported (no prompt logprobs)", "echo",
                          "unsupported_parameter")


async def create_completion(st: ServerState, req: P.CompletionRequest, request: Request):
    serving.check_model(st, req.model)
    _check_supported(req)
    prompts = _prompts(st, req)
    choices = []  # (choice index, prompt ids, prompt text, params): prompt-major, n choices per prompt
    for pi, (ids, text) in enumerate(prompts):
        max_tokens = serving.token_budget(st, len(ids), req.max_tokens, "prompt")
        kw = serving.sampling_kwargs(st, req, max_tokens, req.logprobs is not None, req.logprobs or 0)
        for j in range(req.n):
            params = serving.sampling_params(**serving.seeded(kw, j), skip_special_tokens=True)
            choices.append((pi * req.n + j, ids, text, params))
    st.engine.reserve(len(choices))
    requests = [st.engine.submit(ids, p, reserved=True) for _, ids, _, p in choices]
    n_prompt = sum(len(ids) for ids, _ in prompts)  # each prompt once, as OpenAI counts n > 1
    serving.count_request(st, "completions", n_prompt)
    rid = P.random_id("cmpl-")

    def echo_text(k: int) -> str:
        _, ids, text, _ = choices[k]
        return (text if text is not None else st.tokenizer.decode(ids)) if req.echo else ""

    if req.stream:
        return serving.sse_response(_completion_events(st, req, choices, requests, rid, n_prompt, echo_text), requests)
    t0 = time.monotonic()
    results = await serving.run_until_disconnect(request, serving.collect_outputs(requests))
    body, n_gen = [], 0
    for k, outs in enumerate(results):
        last = outs[-1].outputs[0]
        n_gen += len(last.token_ids)
        prefix = echo_text(k)
        lp = _logprobs(st, last.logprobs, len(prefix))[0] if req.logprobs is not None else None
        body.append({"index": choices[k][0], "text": prefix + last.text, "logprobs": lp,
                     "finish_reason": serving.finish_reason(last.finish_reason)})
    serving.observe_finished(st, t0, n_gen)
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": st.model_name,
                         "choices": body, "usage": serving.usage(n_prompt, n_gen), "system_fingerprint": None})


def _completion_events(st: ServerState, req: P.CompletionRequest, choices, requests, rid: str, n_prompt: int,
                       echo_text):
    """The server-sent events of a streamed completion: one text delta per engine output, a finish_reason
    chunk per choice, the usage chunk when asked."""
    created, t0 = int(time.time()), time.monotonic()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n_gen = [0] * len(choices)

    def chunk(choice_list, usage_=None):
        d = {"id": rid, "object": "text_completion", "created": created, "model": st.model_name,
             "system_fingerprint": None, "choices": choice_list}
        if include_usage:
            d["usage"] = usage_
        return serving.sse_event(d)

    async def chunks():
        offsets = [0] * len(choices)
        finished = [False] * len(choices)
        for k in range(len(choices)):
            if req.echo:
                yield chunk([{"index": choices[k][0], "text": echo_text(k), "logprobs": None, "finish_reason": None}])
        async for k, out in serving.interleave_outputs(requests):
            o = out.outputs[0]
            n_gen[k] = len(o.token_ids)
            lp = None
            if req.logprobs is not None:
                lp, offsets[k] = _logprobs(st, o.delta_logprobs, offsets[k])
            if o.delta_text or lp:
                yield chunk([{"index": choices[k][0], "text": o.delta_text, "logprobs": lp, "finish_reason": None}])
            if o.finished:
                finished[k] = True
                yield chunk([{"index": choices[k][0], "text": "", "logprobs": None,
                              "finish_reason": serving.finish_reason(o.finish_reason)}])
        if not all(finished):
            raise aborted()

    def closing() -> list[str]:
        serving.observe_finished(st, t0, sum(n_gen))
        return [chunk([], serving.usage(n_prompt, sum(n_gen)))] if include_usage else []

    return serving.sse_body(chunks(), closing)
