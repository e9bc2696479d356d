"""SamplingParams.prompt_logprobs: each prompt token's logprob, rank and top alternatives from the engine (paged
attention, chunked prefill, prefix cache, batching) equal a dense forward of the same model."""

from __future__ import annotations

import pytest
import torch
from test_serve_util import make_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from glm4.engine.llm import LLM

    folder = make_checkpoint(tmp_path_factory.mktemp("plp") / "tiny", seed=3)
    # a 24-token step budget: prompts of 40+ tokens are prefilled in several chunks
    return LLM(str(folder), kv_cache_tokens=4096, max_num_batched_tokens=24, block_size=8)


def dense_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one dense forward (no KV cache), over the sampled vocabulary."""
    vocab = llm.engine.runner.sampler.vocab_size
    with torch.inference_mode():
        logits = llm.model(torch.tensor([ids]))[0, :, :vocab].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], lp


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 4000, (length + 7 * i,), generator=g).tolist() for i in range(n)]


def check(llm, ids: list[int], entries, top_n: int) -> None:
    want, lp = dense_logprobs(llm, ids)
    assert entries[0] is None and len(entries) == len(ids)
    got = torch.tensor([e["logprob"] for e in entries[1:]])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for t, e in enumerate(entries[1:], 1):
        assert e["token_id"] == ids[t]
        row = lp[t - 1]  # the rank-th largest dense logprob is the token's own
        assert abs(float(row.sort(descending=True).values[e["rank"] - 1] - row[ids[t]])) < 1e-4
        assert len(e["top_logprobs"]) == top_n
        if top_n:
            assert e["top_logprobs"][0][0] == int(row.argmax())


def test_prompt_logprobs_match_dense_forward_in_a_mixed_batch(llm):
    from glm4.engine.sampling_params import SamplingParams

    prompts = _prompts(3, 41, seed=0)
    params = [SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=k) for k in (0, 2, 5)]
    plain = SamplingParams(max_tokens=3, temperature=0)  # batched alongside: no prompt logprobs, same text
    outs = llm.generate(prompts + [prompts[1]], params + [plain])
    for ids, p, out in zip(prompts, params, outs):
        check(llm, ids, out.prompt_logprobs, p.prompt_logprobs)
    assert outs[3].prompt_logprobs is None and outs[3].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_cached_prefix_is_still_scored(llm):
    """A prompt whose first blocks sit in the prefix cache is prefilled whole when it asks for prompt logprobs."""
    from glm4.engine.sampling_params import SamplingParams

    prefix = _prompts(1, 48, seed=1)[0]
    llm.generate([prefix + [77, 78]], SamplingParams(max_tokens=1))  # caches the prefix's blocks
    bm = llm.engine.block_manager
    hits = bm.hits
    ids = prefix + [91, 92, 93]
    out = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))[0]
    check(llm, ids, out.prompt_logprobs, 1)
    assert bm.hits == hits and out.num_cached_tokens == 0
    again = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0))[0]  # without: served from the cache
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == out.outputs[0].token_ids


def test_n_samples_score_the_prompt_once(llm):
    from glm4.engine.sampling_params import SamplingParams

    ids = _prompts(1, 30, seed=2)[0]
    out = llm.generate([ids], SamplingParams(n=3, max_tokens=2, temperature=1.0, seed=5, prompt_logprobs=0))[0]
    check(llm, ids, out.prompt_logprobs, 0)
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 2 for o in out.outputs)


def test_prompt_logprobs_validation():
    from glm4.engine.sampling_params import SamplingParams

    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(n=2, prompt_logprobs=3).clone_for_child(1).prompt_logprobs is None
