"""POST /v1/completions: raw prompts (text or token ids, one or many) x n choices, whole or as server-sent events.

`echo` + `logprobs` scores the prompt too (the engine's prompt logprobs; the first token's is null), as
lm-evaluation-harness's loglikelihood requests need; `max_tokens` 0 with `echo` only scores; `prompt_logprobs`
is vLLM's per-token {id: {logprob, rank, decoded_token}} list.
"""

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
    """(prompt ids, prompt text or None for token ids) of each prompt of the request. A text too long to fit
    however it tokenizes is rejected before it is tokenized. CPU work: run it with `serving.offload`."""
    p = req.prompt
    items: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    for item in items:
        if isinstance(item, str):
            serving.check_text_fits(st, item, max(req.max_tokens, 1), "prompt")
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
    """The legacy logprobs object of some tokens whose text starts at `offset`; and the offset after them.
    An entry whose logprob is None (the prompt's first token) has null logprob and top_logprobs."""
    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    texts = st.token_texts
    for e in entries or []:
        tok = texts.text(e["token_id"])
        lp["tokens"].append(tok)
        lp["token_logprobs"].append(_finite(e["logprob"]))
        lp["top_logprobs"].append(None if e["logprob"] is None else
                                  {texts.text(t): _finite(v) for t, v in e.get("top_logprobs") or []})
        lp["text_offset"].append(offset)
        offset += len(tok)
    return lp, offset


def _finite(lp: float | None) -> float | None:
    return None if lp is None else max(lp, -9999.0)  # -inf is no JSON number (vLLM's floor)


def _prompt_entries(ids: list[int], scored: list[dict | None] | None) -> list[dict]:
    """The prompt's tokens as logprob entries (the engine's prompt logprobs; the first token's is None)."""
    scored = scored or [None]
    return [{"token_id": ids[0], "logprob": None}] + [e for e in scored[1:] if e is not None]


def _vllm_prompt_logprobs(st: ServerState, scored: list[dict | None] | None) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token {token id: {logprob, rank, decoded_token}} (the token itself,
    then the top alternatives), None for the first."""
    out: list[dict | None] = [None]
    for e in (scored or [None])[1:]:
        d = {str(e["token_id"]): {"logprob": _finite(e["logprob"]), "rank": e["rank"],
                                  "decoded_token": st.token_texts.text(e["token_id"])}}
        for rank, (t, v) in enumerate(e.get("top_logprobs") or [], 1):
            d.setdefault(str(t), {"logprob": _finite(v), "rank": rank, "decoded_token": st.token_texts.text(t)})
        out.append(d)
    return out


def _check_supported(req: P.CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported", "best_of", "unsupported_parameter")


async def create_completion(st: ServerState, req: P.CompletionRequest, request: Request):
    st = serving.route(st, req.model)
    serving.check_model(st, req.model)
    _check_supported(req)
    prompts = await serving.offload(_prompts, st, req)
    echo_only = req.max_tokens == 0  # score (and echo) the prompt: one token is generated and dropped
    prompt_top = req.prompt_logprobs if req.prompt_logprobs is not None else req.logprobs
    choices = []  # (choice index, prompt ids, prompt text, params): prompt-major, n choices per prompt
    for pi, (ids, text) in enumerate(prompts):
        max_tokens = serving.token_budget(st, len(ids), max(req.max_tokens, 1), "prompt")
        kw = serving.sampling_kwargs(st, req, max_tokens, req.logprobs is not None, req.logprobs or 0)
        for j in range(req.n):
            params = serving.sampling_params(**serving.seeded(kw, j), skip_special_tokens=True,
                                             prompt_logprobs=prompt_top if req.scores_prompt else None)
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
        generated, gen_text = ([], "") if echo_only else (last.logprobs or [], last.text)
        n_gen += 0 if echo_only else len(last.token_ids)
        choice = {"index": choices[k][0], "text": echo_text(k) + gen_text, "logprobs": None,
                  "finish_reason": "length" if echo_only else serving.finish_reason(last.finish_reason)}
        if req.logprobs is not None:
            echoed = _prompt_entries(choices[k][1], outs[-1].prompt_logprobs) if req.echo else []
            choice["logprobs"] = _logprobs(st, echoed + generated, 0)[0]
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _vllm_prompt_logprobs(st, outs[-1].prompt_logprobs)
        body.append(choice)
    serving.observe_finished(st, t0, n_gen)
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                         "choices": body, "usage": serving.usage(n_prompt, n_gen), "system_fingerprint": None})


def _completion_events(st: ServerState, req: P.CompletionRequest, choices, requests, rid: str, n_prompt: int,
                       echo_text):
    """The server-sent events of a streamed completion: the echoed prompt, one text delta per engine output, a
    finish_reason chunk per choice, the usage chunk when asked."""
    created, t0 = int(time.time()), time.monotonic()
    echo_only = req.max_tokens == 0
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n_gen = [0] * len(choices)

    def chunk(choice_list, usage_=None):
        d = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
             "system_fingerprint": None, "choices": choice_list}
        if include_usage:
            d["usage"] = usage_
        return serving.sse_event(d)

    async def chunks():
        offsets = [0] * len(choices)
        finished = [False] * len(choices)
        scored = req.echo and req.logprobs is not None  # the echo chunk carries the prompt's logprobs: sent with
        echoed = [not req.echo] * len(choices)          # the first output, when the engine has scored the prompt
        for k in range(len(choices)):
            if req.echo and not scored:
                echoed[k] = True
                yield chunk([{"index": choices[k][0], "text": echo_text(k), "logprobs": None, "finish_reason": None}])
        async for k, out in serving.interleave_outputs(requests):
            o = out.outputs[0]
            if not echoed[k]:
                echoed[k] = True
                lp, offsets[k] = _logprobs(st, _prompt_entries(choices[k][1], out.prompt_logprobs), 0)
                yield chunk([{"index": choices[k][0], "text": echo_text(k), "logprobs": lp, "finish_reason": None}])
            if echo_only:  # the one generated token is not part of the reply
                if o.finished:
                    finished[k] = True
                    yield chunk([{"index": choices[k][0], "text": "", "logprobs": None, "finish_reason": "length"}])
                continue
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
