"""glm4.quant.fused: the fused RMSNorm / RoPE / decode-attention ops against the torch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_engine import GREEDY, make_prompts, reference, tiny_model

from glm4.engine import LLM, SamplingParams
from glm4.layers.norm import RMSNorm
from glm4.layers.rope import CosSin, apply_rope_torch
from glm4.quant import fused

pytestmark = pytest.mark.skipif(not fused.have_fused_ops(),
                                reason="glm4.quant._C not built or the CPU lacks AVX2+FMA")

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 1024, 100, 5])  # tails past the last 8
def test_rms_norm_equals_torch(dtype, D):
    g = torch.Generator().manual_seed(D)
    norm = RMSNorm(D, eps=1e-5)
    norm.weight.data = 1 + 0.1 * torch.randn(D, generator=g)
    norm = norm.to(dtype)
    x = (3 * torch.randn(4, 3, 2 * D, generator=g)).to(dtype)[..., :D]  # rows not contiguous with each other
    with torch.inference_mode():
        want, got = norm(x), fused.FusedRMSNorm.from_norm(norm)(x)
    assert got.dtype == dtype and got.shape == want.shape
    # the sum of squares runs in another order than torch's reduction: equal within fp32 rounding (bf16: one ulp)
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=0)
    torch.testing.assert_close(got, want, **tol)


def test_fused_norm_falls_back_when_autograd_needs_it():
    norm = fused.FusedRMSNorm.from_norm(RMSNorm(8))
    x = torch.randn(2, 8, requires_grad=True)
    norm(x).sum().backward()  # the op has no backward: torch's code ran
    assert x.grad is not None and norm.weight.grad is not None


def _tables(B, T, R, interleaved, dtype, g):
    ang = 5 * torch.randn(B, T, R // 2, generator=g)
    expand = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat((t, t), -1))
    return CosSin(expand(ang.cos()).to(dtype)[:, :, None], expand(ang.sin()).to(dtype)[:, :, None], R, interleaved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("R,D", [(32, 64), (64, 64), (64, 128), (6, 10), (8, 8)])  # vector and scalar paths
def test_rope_equals_apply_rope_to_the_bit(dtype, interleaved, R, D):
    g = torch.Generator().manual_seed(R * 7 + D)
    B, T, H = 2, 5, 3
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(dtype)
    x = qkv[..., H * D:2 * H * D].reshape(B, T, H, D)  # a strided view, as the fused qkv projection gives
    cs = _tables(B, T, R, interleaved, dtype, g)
    want, got = apply_rope_torch(x, cs), fused.rope(x, cs)
    assert torch.equal(got, want)


def _gather_sdpa(q, k, v, tables, lens, block_size):
    out = []
    for b in range(q.shape[0]):
        n, Hkv = int(lens[b]), k.shape[1]
        pos = torch.arange(n)
        slots = tables[b, pos // block_size] * block_size + pos % block_size
        ks, vs = (t.index_select(0, slots).transpose(0, 1).double() for t in (k, v))
        qg = q[b].double().view(Hkv, -1, q.shape[-1])
        out.append(F.scaled_dot_product_attention(qg, ks, vs).reshape(q.shape[1:]))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])  # last: kv_cache_dtype="bfloat16"
@pytest.mark.parametrize("Hq,Hkv,D", [(16, 2, 64), (12, 1, 128), (4, 2, 48), (20, 2, 8)])  # G = 8, 12, 2, 10
@pytest.mark.parametrize("block_size", [16, 1, 5])
def test_decode_attention_matches_float64(dtype, cache_dtype, Hq, Hkv, D, block_size):
    g = torch.Generator().manual_seed(Hq + D + block_size)
    blocks, B = 1200 // block_size, 4
    k, v = (torch.randn(blocks * block_size, Hkv, D, generator=g).to(cache_dtype) for _ in range(2))
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    lens = torch.tensor([1, 7, 200, 1100])  # 1100: value rows in several of the kernel's tiles at every D
    tables = torch.stack([torch.randperm(blocks, generator=g)[:(1100 + block_size - 1) // block_size]
                          for _ in range(B)])  # blocks in any order, as a paged cache hands them out
    got = fused.decode_attention(q, k, v, tables, lens, block_size)
    want = _gather_sdpa(q, k, v, tables, lens, block_size)  # the cache's values, exactly (bf16 widens exactly)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=4e-3)  # bf16: output rounding
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("isa", ["avx2", "avx512_vnni"])
@pytest.mark.parametrize("T", [1, 15, 33, 300])  # tails past a task's 16 queries and a score step's 32 keys
@pytest.mark.parametrize("ctx", [0, 7, 500])  # a fresh prompt, chunks after cached context
@pytest.mark.parametrize("Hq,Hkv,D", [(16, 2, 64), (12, 1, 128), (4, 2, 48), (6, 6, 16)])  # G = 8, 12, 2, 1
def test_prefill_attention_matches_float64(isa, T, ctx, Hq, Hkv, D):
    """A prompt chunk's causal attention (queries at the last T of ctx + T positions) against
    scaled_dot_product_attention in float64 with the offset-causal mask, with each kernel set the CPU has (AVX-512
    takes D % 64 == 0, AVX2 the rest); torch's own fp32 SDPA is as far from float64."""
    from glm4.quant import kernels

    if isa == "avx512_vnni" and not {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= kernels.cpu_features():
        pytest.skip("the CPU lacks AVX-512 VNNI")
    g = torch.Generator().manual_seed(T + ctx + Hq + D)
    S = ctx + T
    q, k, v = torch.randn(T, Hq, D, generator=g), torch.randn(S, Hkv, D, generator=g), torch.randn(S, Hkv, D, generator=g)
    heads = lambda t: t.transpose(0, 1)[None]  # noqa: E731  [T, H, D] -> [1, H, T, D]
    mask = torch.arange(S)[None, :] <= torch.arange(ctx, S)[:, None]  # [T, S]: query i sees keys 0 .. ctx + i
    want = F.scaled_dot_product_attention(heads(q.double()), heads(k.double()), heads(v.double()), attn_mask=mask,
                                          enable_gqa=True)[0].transpose(0, 1)
    before = torch.ops.glm4.set_isa(isa)
    try:
        got = fused.prefill_attention(q, k, v)
    finally:
        torch.ops.glm4.set_isa(before)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)
    assert fused.prefill_attention(q.bfloat16(), k, v) is None  # fp32 only: the caller runs SDPA


def test_decode_attention_refuses_bad_tables_and_lengths():
    k = v = torch.zeros(10, 1, 8)
    q = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="block id out of range"):
        fused.decode_attention(q, k, v, torch.tensor([[0, 2]]), torch.tensor([8]), 4)  # block 2 = slots 8..11
    with pytest.raises(RuntimeError, match="lens"):
        fused.decode_attention(q, k, v, torch.tensor([[0, 1]]), torch.tensor([9]), 4)


def _qkv_case(dtype, Hq, Hkv, D, R, interleaved, block_size, g, cache_dtype=None):
    """A decode step of 3 sequences: the fused projection's output, RoPE tables, a paged cache and its metadata."""
    blocks, lens = 120 // block_size, torch.tensor([1, 9, 100])
    N = len(lens)
    k, v = (torch.randn(blocks * block_size, Hkv, D, generator=g).to(cache_dtype or dtype) for _ in range(2))
    tables = torch.stack([torch.randperm(blocks, generator=g)[:(100 + block_size - 1) // block_size] for _ in range(N)])
    pos = lens - 1  # the new token's position: its slot is where the cache stores it
    slots = tables[torch.arange(N), pos // block_size] * block_size + pos % block_size
    qkv = torch.randn(1, N, (Hq + 2 * Hkv) * D, generator=g).to(dtype)
    cs = _tables(1, N, R, interleaved, dtype, g)
    return qkv, cs, k, v, slots, tables, lens


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("Hq,Hkv,D,R", [(16, 2, 64, 32), (12, 1, 128, 128), (4, 2, 48, 6), (2, 2, 8, 8)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_decode_qkv_attention_equals_the_separate_ops(dtype, cache_dtype, interleaved, Hq, Hkv, D, R, block_size):
    """One op = split, RoPE of q and k, the cache write (index_copy_ of k / v as the cache's dtype: PagedKVCache.write)
    and decode_attention: the same output and the same cache, to the bit."""
    g = torch.Generator().manual_seed(Hq * D + R + block_size)
    qkv, cs, k, v, slots, tables, lens = _qkv_case(dtype, Hq, Hkv, D, R, interleaved, block_size, g, cache_dtype)
    N = qkv.shape[1]
    q, kn, vn = qkv[0].split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q = fused.rope(q.reshape(1, N, Hq, D), cs)[0]
    kn = fused.rope(kn.reshape(1, N, Hkv, D), cs)[0]
    k_want, v_want = k.clone(), v.clone()
    k_want.index_copy_(0, slots, kn.to(cache_dtype))
    v_want.index_copy_(0, slots, vn.reshape(N, Hkv, D).to(cache_dtype))
    want = fused.decode_attention(q, k_want, v_want, tables, lens, block_size).reshape(1, N, Hq * D)
    got = fused.decode_qkv_attention(qkv, cs, k, v, slots, tables, lens, block_size, Hq)
    assert torch.equal(k, k_want) and torch.equal(v, v_want)
    assert got.shape == want.shape and torch.equal(got, want)


def test_decode_qkv_attention_declines_what_it_does_not_take_and_refuses_bad_slots():
    g = torch.Generator().manual_seed(3)
    qkv, cs, k, v, slots, tables, lens = _qkv_case(torch.float32, 4, 2, 16, 8, False, 4, g)
    no_rope = CosSin(cs.cos[..., :0], cs.sin[..., :0], 0, False)
    assert fused.decode_qkv_attention(qkv, no_rope, k, v, slots, tables, lens, 4, 4) is None
    assert fused.decode_qkv_attention(qkv.double(), cs, k, v, slots, tables, lens, 4, 4) is None
    assert fused.decode_qkv_attention(qkv, cs, k.half(), v.half(), slots, tables, lens, 4, 4) is None  # fp16 cache
    with pytest.raises(RuntimeError, match="slot"):
        fused.decode_qkv_attention(qkv, cs, k, v, slots + k.shape[0], tables, lens, 4, 4)


def _recording(kernel, longest: list[int], lens_at: int):
    def run(*args):
        longest.append(int(args[lens_at].max()))
        return kernel(*args)
    return run


def _recording_prompts(kernel, chunks: list[tuple[int, int]]):
    def run(q, k, v):
        chunks.append((q.shape[0], k.shape[0]))  # (queries, keys): keys > queries after cached context
        return kernel(q, k, v)
    return run


@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("N", [1, 3, 16, 17])  # 17: past dense_max_m, F.linear
def test_router_logits_match_float64(wdtype, N):
    """A MoE router's logits by glm4's dense kernel for few tokens (the weight read as stored: bf16 widened exactly)
    are fp32 sums of the products F.linear sums; with autograd on they fall back to F.linear."""
    g = torch.Generator().manual_seed(N)
    x, w = torch.randn(N, 1024, generator=g), torch.randn(64, 1024, generator=g).to(wdtype)
    ref = x.double() @ w.double().T
    with torch.no_grad():
        y = fused.router_logits(x, w)
    assert y.dtype == torch.float32 and y.shape == (N, 64)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    wg = w.float().requires_grad_()
    assert fused.router_logits(x, wg).grad_fn is not None  # F.linear, differentiable


ROUTES = {  # (E, top_k, route()'s keywords): GLM-4.5's sigmoid with groups and bias, softmax, no normalization
    "sigmoid-groups": (64, 8, dict(scoring_func="sigmoid", n_group=8, topk_group=3, routed_scaling_factor=2.5)),
    "sigmoid": (64, 8, dict(scoring_func="sigmoid")),
    "sigmoid-one-per-group": (8, 2, dict(scoring_func="sigmoid", n_group=8, topk_group=4)),
    "softmax": (16, 2, dict(scoring_func="softmax")),
    "softmax-unnormalized": (60, 6, dict(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=0.5)),
}


@pytest.mark.parametrize("name", ROUTES)
@pytest.mark.parametrize("N", [1, 5])
def test_moe_route_equals_route(name, N):
    """The router's choice by one op: the same experts in the same order as glm4.layers.moe.route, and the same
    weights within fp32 rounding (exp and the normalizing sum in another order: a few ulp)."""
    from glm4.layers.moe import route

    E, k, kw = ROUTES[name]
    g = torch.Generator().manual_seed(E + N)
    logits = 2 * torch.randn(N, E, generator=g)
    bias = 0.1 * torch.randn(E, generator=g) if kw["scoring_func"] == "sigmoid" else None
    with torch.no_grad():
        want_i, want_w = route(logits, k, correction_bias=bias, **kw)
        got_i, got_w = fused.moe_route(logits, k, correction_bias=bias, **kw)
    assert got_i.dtype == torch.int64 and got_w.dtype == torch.float32
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w, want_w, rtol=4e-7, atol=0)
    if kw.get("n_group", 1) > 1:  # the chosen experts lie in at most topk_group groups
        assert all(len(set(row)) <= kw["topk_group"] for row in (got_i // (E // kw["n_group"])).tolist())


def test_moe_route_falls_back_to_route_under_autograd():
    logits = torch.randn(3, 16, requires_grad=True)
    _, w = fused.moe_route(logits, 2, scoring_func="softmax")
    w.sum().backward()  # the op has no backward: route() ran
    assert logits.grad is not None


@pytest.mark.parametrize("model_type", ["glm", "glm4", "glm4_moe"])
def test_engine_with_fused_ops_equals_reference(model_type):
    """Greedy tokens equal the reference generator's with the fused ops on (and off), with decode contexts from
    2 to 540 keys (value rows in several of the kernel's tiles); with the ops on, the long prompt's decodes run the
    fused kernel too (no length cap)."""
    prompts = make_prompts([1, 5, 33, 508, 532])
    refs = reference(tiny_model(model_type, max_position_embeddings=1024), prompts)
    for on in (False, True):
        llm = LLM.from_model(tiny_model(model_type, max_position_embeddings=1024), linear="torch", fused_ops=on)
        assert any(isinstance(m, fused.FusedRMSNorm) for m in llm.model.modules()) == on
        assert ("fused ops: rms_norm, rope, decode_attention" in llm.describe()) == on
        assert ("prefill_attention" in llm.describe()) == on
        assert ("router_logits" in llm.describe()) == (on and model_type == "glm4_moe")  # few tokens: glm4's dense_mm
        assert ("moe_route" in llm.describe()) == (on and model_type == "glm4_moe")
        longest, qkv_longest, prompt_lens = [], [], []
        if on:  # decode-only steps take the one-op qkv path (model_type glm: no q/k norm), mixed steps the other
            runner = llm.engine.runner
            runner.decode_kernel = _recording(runner.decode_kernel, longest, 4)  # (q, k, v, tables, lens, block_size)
            runner.qkv_kernel = _recording(runner.qkv_kernel, qkv_longest, 6)  # (qkv, cs, k, v, slots, tables, lens, ...)
            runner.prefill_kernel = _recording_prompts(runner.prefill_kernel, prompt_lens)
        outs = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == refs
        if on:
            assert max(longest + qkv_longest) > 532  # the long prompt's decodes too (glm4_moe: no one-op path)
            assert {5, 33} <= {t for t, s in prompt_lens if s == t}  # fresh prompts (and a long one's first chunk)
            assert any(s > t for t, s in prompt_lens)  # a long prompt's later chunks, over their cached context


@pytest.mark.parametrize("kind", ["glm", "glm4", "chatglm"])
def test_engine_decode_steps_take_the_one_op_attention(kind, hf_checkpoint, tmp_path):
    """Decode-only steps run RoPE, the cache write and attention from the fused q/k/v projection as one op
    (decode_qkv_attention): the engine's tokens and log-probabilities equal, to the bit, those of the same engine
    running the separate ops, which equal the reference generator's tokens."""
    if kind == "chatglm":
        from conftest import to_chatglm

        import glm4

        folder, _ = hf_checkpoint("glm")
        model = lambda: glm4.load_model(to_chatglm(folder, tmp_path / "chatglm"))  # noqa: E731
    else:
        model = lambda: tiny_model(kind)  # noqa: E731
    prompts = make_prompts([1, 5, 33, 70])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
    runs = []
    for one_op in (True, False):
        llm = LLM.from_model(model(), fused_ops=True)
        calls = []
        if one_op:
            llm.engine.runner.qkv_kernel = _recording(llm.engine.runner.qkv_kernel, calls, 6)
        else:
            llm.engine.runner.qkv_kernel = None
        outs = llm.generate(prompts, params)
        runs.append([(o.outputs[0].token_ids, [e["logprob"] for e in o.outputs[0].logprobs]) for o in outs])
        assert bool(calls) == one_op
    assert runs[0] == runs[1]
    assert [ids for ids, _ in runs[0]] == reference(model(), prompts, new=12)


def test_engine_bf16_cache_under_fp32_activations_runs_the_fused_kernels():
    """kv_cache_dtype="bfloat16" with fp32 activations (half the cache's bytes): decodes run the fused kernels on
    the bf16 cache, tokens equal to the unfused engine's on the same cache (gather + SDPA), log-probabilities
    within float rounding of them."""
    prompts = make_prompts([1, 5, 33, 70])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
    runs = []
    for on in (True, False):
        llm = LLM.from_model(tiny_model("glm4"), fused_ops=on, kv_cache_dtype="bfloat16")
        assert llm.engine.runner.cache.dtype == torch.bfloat16 and llm.engine.runner.dtype == torch.float32
        calls = []
        if on:
            llm.engine.runner.qkv_kernel = _recording(llm.engine.runner.qkv_kernel, calls, 6)
        else:
            assert llm.engine.runner.decode_kernel is None
        outs = llm.generate(prompts, params)
        runs.append([(o.outputs[0].token_ids, [e["logprob"] for e in o.outputs[0].logprobs]) for o in outs])
        assert bool(calls) == on
    assert [ids for ids, _ in runs[0]] == [ids for ids, _ in runs[1]]
    for (_, a), (_, b) in zip(*runs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)


@pytest.mark.parametrize("V", [1, 7, 8, 31, 32, 33, 100, 151552])  # tails past the last 32 / 8
def test_argmax_equals_torch(V):
    """The sampler's greedy pick (kernels.argmax, the op on fp32 CPU rows) against torch.argmax: ties (the first
    maximum), all -inf rows, NaN (counted as the maximum, the first one), +inf, rows with a stride."""
    from glm4.quant import kernels

    g = torch.Generator().manual_seed(V)
    cases = [torch.randn(3, V, generator=g), torch.randint(-3, 3, (3, V), generator=g).float(),
             torch.full((3, V), float("-inf")), torch.randn(3, V + 5, generator=g)[:, :V]]
    nan = torch.randn(3, V, generator=g)
    nan[1, V // 2] = nan[2, V - 1] = float("nan")
    nan[0, V // 3] = float("inf")
    cases.append(nan)
    for x in cases:
        assert torch.equal(kernels.argmax(x), x.argmax(dim=-1)), x
