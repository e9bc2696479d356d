"""Engine end to end against the reference generator (glm4.generate) on tiny random models."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import randomize_, tiny_config

from glm4.config import config_from_dict
from glm4.engine import LLM, SamplingParams
from glm4.models import get_model_class
from glm4.reference import generate

LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17, 20, 31, 32, 33, 40, 47, 64, 70]
NEW = 10


def tiny_model(model_type: str = "glm", seed: int = 0, **overrides):
    cfg = config_from_dict({**tiny_config(model_type, **overrides), "model_type": model_type})
    return randomize_(get_model_class(model_type).from_config(cfg).eval(), seed)


def make_prompts(lengths=LENGTHS, vocab=128, seed=1, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompts, new=NEW):
    return [generate(model, torch.tensor([p]), max_new_tokens=new, eos_token_ids=[])[0, len(p):].tolist()
            for p in prompts]


@pytest.fixture(scope="module")
def glm():
    model = tiny_model("glm")
    prompts = make_prompts()
    return model, prompts, reference(model, prompts)


GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


def assert_all_blocks_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


@pytest.mark.parametrize("engine_args", [
    {},
    {"enable_prefix_caching": False},
    {"max_num_batched_tokens": 7},  # every prompt is prefilled in chunks, mixed with decodes
    {"kv_cache_tokens": 96, "block_size": 4},  # forces preemption by recompute
    {"max_num_seqs": 3, "block_size": 1},
], ids=["default", "no-prefix-cache", "tiny-chunks", "preemption", "3-seqs-block1"])
def test_batched_greedy_equals_reference(glm, engine_args):
    model, prompts, refs = glm
    llm = LLM.from_model(model, linear="torch", **engine_args)
    outs = llm.generate(prompts, GREEDY)
    for p, o, r in zip(prompts, outs, refs):
        assert o.prompt_token_ids == p
        assert o.token_ids == r, f"prompt of {len(p)} tokens"
        assert o.finished and o.outputs[0].finish_reason == "length"
    if "kv_cache_tokens" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    if "max_num_batched_tokens" in engine_args:
        assert llm.engine.stats["steps"] >= sum(len(p) for p in prompts) // 7
    assert_all_blocks_free(llm)


def test_prefix_cache_shares_blocks_and_matches_reference():
    model = tiny_model("glm", seed=3)
    system = make_prompts([37], seed=5)[0]
    prompts = make_prompts([1, 4, 9, 16, 23], seed=6, prefix=system)
    refs = reference(model, prompts)
    llm = LLM.from_model(model, linear="torch", block_size=8)
    first = llm.generate(prompts[:1], GREEDY)[0]
    assert first.num_cached_tokens == 0
    outs = llm.generate(prompts[1:], GREEDY)  # all start with the cached 37-token system prompt
    assert [first.token_ids] + [o.token_ids for o in outs] == refs
    assert all(o.num_cached_tokens == 32 for o in outs)  # 4 full blocks of 8
    again = llm.generate(prompts[:1], GREEDY)[0]  # fully cached except the last token
    assert again.token_ids == refs[0] and again.num_cached_tokens == 32
    assert_all_blocks_free(llm)


def test_chunked_prefill_with_prefix_cache_and_preemption_together(glm):
    model, prompts, refs = glm
    llm = LLM.from_model(model, linear="torch", kv_cache_tokens=100, block_size=4, max_num_batched_tokens=9)
    outs = llm.generate(prompts + prompts[::-1], GREEDY)
    assert [o.token_ids for o in outs] == refs + refs[::-1]
    assert_all_blocks_free(llm)


def test_packed_linears_match_reference(glm):
    model, prompts, refs = glm
    llm = LLM.from_model(tiny_model("glm"), linear="packed")
    assert type(llm.model.lm_head).__name__ == "PackedLinear"
    outs = llm.generate(prompts[:6], GREEDY)
    assert [o.token_ids for o in outs] == refs[:6]


def test_int8_engine_equals_reference_on_the_same_quantized_model(glm):
    model, prompts, _ = glm
    llm = LLM.from_model(tiny_model("glm"), quantization="int8")
    from glm4.quant import kernels

    expected = "QuantLinear" if kernels.has_streaming_kernels() else "WeightOnlyInt8Linear"
    assert type(llm.model.model.layers[0].mlp.down_proj).__name__ == expected
    outs = llm.generate(prompts[:5], GREEDY)
    assert [o.token_ids for o in outs] == reference(llm.model, prompts[:5])
    with pytest.raises(ValueError, match="quantization"):
        LLM.from_model(model, quantization="int3")
    with pytest.raises(ValueError, match="linear='packed'"):  # one name for one thing: packing is a linear kernel
        LLM.from_model(model, quantization="packed")


def test_moe_model_equals_reference():
    model = tiny_model("glm4_moe", seed=2)
    prompts = make_prompts([3, 9, 17, 30], seed=4)
    refs = reference(model, prompts)
    llm = LLM.from_model(model, linear="torch", max_num_batched_tokens=11)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == refs
    assert_all_blocks_free(llm)


def test_glm4_sandwich_model_equals_reference():
    model = tiny_model("glm4", seed=4)
    prompts = make_prompts([2, 12, 25], seed=7)
    llm = LLM.from_model(model, linear="torch")
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == reference(model, prompts)


def test_abort_and_finish_return_every_block(glm):
    model, prompts, _ = glm
    llm = LLM.from_model(model, linear="torch", block_size=4, max_num_batched_tokens=16)
    eng = llm.engine
    ids = [eng.add_request(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
           for i, p in enumerate(prompts)]
    for _ in range(6):
        eng.step()
    used = eng.block_manager.num_blocks - eng.block_manager.num_free_blocks
    assert used > 0
    assert eng.abort(ids[0]) and eng.abort(ids[-1]) and not eng.abort("nope")
    finals = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[ids[0]].outputs[0].finish_reason == "abort"
    assert finals[ids[-1]].outputs[0].finish_reason == "abort"
    assert all(finals[r].outputs[0].finish_reason == "length" for r in ids[1:-1])
    assert_all_blocks_free(llm)


def test_seeded_sampling_reproducible_regardless_of_batch(glm):
    model, prompts, _ = glm
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    llm = LLM.from_model(model, linear="torch")
    alone = llm.generate([prompts[5]], p)[0].token_ids
    other = SamplingParams(max_tokens=12, temperature=0.8, seed=None)
    batch = llm.generate([prompts[1], prompts[5], prompts[9]], [other, p, other])
    assert batch[1].token_ids == alone
    llm2 = LLM.from_model(model, linear="torch", seed=99, max_num_batched_tokens=5)
    assert llm2.generate([prompts[9], prompts[5]], [other, p])[1].token_ids == alone
    unseeded = {tuple(o.token_ids) for o in llm.generate([prompts[5]] * 6, SamplingParams(max_tokens=8, temperature=1.0))}
    assert len(unseeded) > 1


def test_n_samples_and_logprobs(glm):
    model, prompts, refs = glm
    llm = LLM.from_model(model, linear="torch")
    out = llm.generate([prompts[3]], SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2] and all(len(o.token_ids) == 5 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    g = llm.generate([prompts[3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=True,
                                                  top_logprobs=3))[0].outputs[0]
    assert g.token_ids == refs[3][:4]
    # the first generated token's logprob is the reference model's log-softmax at the prompt's end
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompts[3]]))[0, -1].float(), -1)
    first = g.logprobs[0]
    assert first["token_id"] == refs[3][0]
    assert first["logprob"] == pytest.approx(float(lp[refs[3][0]]), abs=1e-4)
    assert [t for t, _ in first["top_logprobs"]] == lp.topk(3).indices.tolist()
    assert g.cumulative_logprob == pytest.approx(sum(e["logprob"] for e in g.logprobs))


def test_eos_and_stop_token_ids(glm):
    model, prompts, refs = glm
    llm = LLM.from_model(model, linear="torch")
    r = refs[4]
    stop_tok = r[3]
    out = llm.generate([prompts[4]], SamplingParams(max_tokens=NEW, temperature=0, stop_token_ids=[stop_tok]))[0]
    k = r.index(stop_tok)
    assert out.token_ids == r[:k + 1] and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_tok
    # the model's eos ids end a request unless ignore_eos
    eos_model = tiny_model("glm", eos_token_id=[r[2]])
    out = LLM.from_model(eos_model, linear="torch").generate([prompts[4]], SamplingParams(max_tokens=NEW, temperature=0))[0]
    assert out.token_ids == r[:r.index(r[2]) + 1] and out.finish_reason == "stop"


def test_bad_requests_raise_clear_errors(glm):
    model, prompts, _ = glm
    llm = LLM.from_model(model, linear="torch", max_model_len=40)
    with pytest.raises(ValueError, match="context holds at most 40"):
        llm.generate([prompts[0], prompts[-1]], GREEDY)  # the valid first prompt is withdrawn too
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["hello"], GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[5, 1000]], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([[5, 6]], SamplingParams(stop=["x"]))
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM.from_model(model, kv_cach_tokens=5)
    assert_all_blocks_free(llm)
    # max_model_len caps generation: finish_reason "length" at the context limit
    out = llm.generate([prompts[10]], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert len(prompts[10]) + len(out.token_ids) == 40 and out.finish_reason == "length"


def test_kv_cache_sizing_reports_tokens():
    model = tiny_model("glm")
    llm = LLM.from_model(model, kv_cache_memory="64KiB", block_size=16)
    eng = llm.engine
    per_tok = 2 * 2 * 2 * 16 * 4  # k+v, layers, kv heads, head_dim, fp32
    assert eng.num_kv_tokens == (64 * 1024 // per_tok) // 16 * 16
    assert str(eng.num_kv_tokens) in eng.describe()
    assert eng.max_model_len == min(eng.num_kv_tokens, 256)
    with pytest.raises(ValueError, match="no block"):
        LLM.from_model(model, kv_cache_tokens=3, block_size=4)


def test_requests_joining_mid_flight_equal_reference(glm):
    model, prompts, refs = glm
    llm = LLM.from_model(model, linear="torch", max_num_batched_tokens=24, block_size=4)
    eng = llm.engine
    finals, pending = {}, list(enumerate(prompts))
    step = 0
    while pending or eng.has_unfinished_requests():
        if pending and step % 2 == 0:  # a new request every other step, while others decode
            i, p = pending.pop(0)
            eng.add_request(f"q{i}", p, GREEDY)
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out.token_ids
        step += 1
    assert [finals[f"q{i}"] for i in range(len(prompts))] == refs
    assert_all_blocks_free(llm)


def test_closing_a_stream_aborts_its_request(glm):
    model, prompts, _ = glm
    llm = LLM.from_model(model, linear="torch")
    it = llm.stream_outputs(prompts[2], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    first = next(it)
    assert len(first.outputs[0].delta_token_ids) == 1 and not first.finished
    it.close()
    assert llm.engine.num_unfinished_requests == 0
    outs = llm.engine.step()  # the abort's final output is delivered once
    assert len(outs) == 1 and outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert_all_blocks_free(llm)
    # a request aborted while still waiting never ran
    eng = llm.engine
    eng.add_request("w", prompts[3], GREEDY)
    assert eng.abort("w") and eng.step()[0].token_ids == []
    assert_all_blocks_free(llm)


def test_long_prompt_with_yarn_rope_in_small_chunks():
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5}
    model = tiny_model("glm", seed=8, max_position_embeddings=1024, rope_parameters=rope)
    prompts = make_prompts([900, 333], seed=9)
    refs = reference(model, prompts, new=6)
    llm = LLM.from_model(model, linear="torch", max_num_batched_tokens=128)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == refs
    assert llm.engine.max_model_len == 1024


@pytest.mark.parametrize("model_type, overrides", [
    ("glm", {}), ("glm4", {}), ("glm4_moe", {"n_shared_experts": 1, "first_k_dense_replace": 1}),
    ("glm4_moe", {"use_qk_norm": True, "attention_bias": True})])
def test_fused_projections_equal_separate(model_type, overrides):
    """The engine's q/k/v -> qkv_proj and gate/up -> gate_up_proj fusion computes the same logits."""
    import copy

    from glm4.models.glm import fuse_projections

    model = tiny_model(model_type, seed=3, **overrides)
    fused = fuse_projections(copy.deepcopy(model))
    names = {n for n, _ in fused.named_modules()}
    assert any(n.endswith("qkv_proj") for n in names) and not any(n.endswith(".q_proj") for n in names)
    if model_type == "glm4_moe":
        assert not any(n.endswith(".gate_proj") for n in names)  # dense layers and shared experts
    ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = model(ids), fused(ids)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    fuse_projections(fused)  # a second call changes nothing
    assert {n for n, _ in fused.named_modules()} == names
    with torch.inference_mode():
        assert torch.equal(fused(ids), b)


def test_compile_falls_back_to_eager(monkeypatch):
    """EngineArgs.compile: a module whose compiled form fails runs eagerly, with a warning, and the engine's
    output is unchanged."""
    import glm4.engine.llm as llm_mod

    model, prompts = tiny_model("glm"), make_prompts()[:4]
    refs = reference(model, prompts)

    def broken_compile(module, **_):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(llm_mod.torch, "compile", broken_compile)
    llm = LLM.from_model(model, linear="torch", compile=True)
    wrapped = [m for m in llm.engine.runner.model.modules() if isinstance(m, llm_mod._CompiledOrEager)]
    assert len(wrapped) == model.config.num_hidden_layers
    with pytest.warns(UserWarning, match="no compiler here"):
        outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert all(m.failed for m in wrapped)


@pytest.mark.slow
def test_compile_real():
    """torch.compile'd dense MLPs (inductor, needs a C++ compiler) give the reference tokens."""
    model, prompts = tiny_model("glm"), make_prompts()[:4]
    refs = reference(model, prompts)
    llm = LLM.from_model(model, linear="torch", compile=True)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_auto_linear_packs_bf16_and_only_big_fp32_linears(monkeypatch):
    """linear="auto": with glm4's CPU kernels every linear streams its stored weight (FloatLinear); without them every
    bf16 linear is prepacked and fp32 ones only from PACK_MIN_PARAMS_FP32 weights (F.linear is faster below);
    "packed" packs all; greedy output unchanged either way (both are exact)."""
    import glm4.engine.llm as llm_mod
    from glm4.quant import FloatLinear, kernels
    from glm4.quant.fast_linear import PackedLinear

    def kinds(llm):
        return {type(m).__name__ for m in llm.engine.runner.model.modules()
                if isinstance(m, (torch.nn.Linear, PackedLinear, FloatLinear))}

    model, prompts = tiny_model("glm"), make_prompts()[:3]
    refs = reference(model, prompts)
    assert kinds(LLM.from_model(tiny_model("glm"), linear="packed")) == {"PackedLinear"}
    if kernels.has_streaming_kernels():
        assert kinds(LLM.from_model(tiny_model("glm"))) == {"FloatLinear"}
        llm = LLM.from_model(tiny_model("glm").to(torch.bfloat16))
        assert kinds(llm) == {"FloatLinear"} and llm.engine.runner.model.lm_head.weight.dtype == torch.bfloat16
        llm = LLM.from_model(model)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == refs
        return
    assert kinds(LLM.from_model(tiny_model("glm"))) == {"Linear"}  # tiny fp32: nothing reaches the threshold
    assert kinds(LLM.from_model(tiny_model("glm").to(torch.bfloat16))) == {"PackedLinear"}
    monkeypatch.setattr(llm_mod, "PACK_MIN_PARAMS_FP32", 64 * 64 + 1)  # only linears above 64x64 weights
    llm = LLM.from_model(model)
    big = {n for n, m in llm.engine.runner.model.named_modules() if isinstance(m, PackedLinear)}
    small = {n for n, m in llm.engine.runner.model.named_modules() if type(m) is torch.nn.Linear}
    assert big and small and "lm_head" in big
    assert all(m.weight.numel() <= 64 * 64 for n, m in llm.engine.runner.model.named_modules() if n in small)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == refs


def test_max_model_len_above_the_model_warns_and_uses_the_model_limit(caplog):
    model = tiny_model("glm")
    limit = int(model.config.rope.max_position_embeddings)
    with caplog.at_level("WARNING", logger="glm4.engine"):
        llm = LLM.from_model(model, max_model_len=limit * 4, kv_cache_tokens=limit * 8)
    assert llm.engine.max_model_len == limit
    assert any("above the model's" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not __import__("glm4.quant.kernels", fromlist=["x"]).has_streaming_kernels(),
                    reason="glm4's CPU kernels are not built here")
def test_quantizing_a_bf16_checkpoint_as_float32_loads_no_fp32_copy(tmp_path, monkeypatch):
    """dtype float32 + quantization: the bf16 checkpoint is loaded as stored and quantized from it — the same codes
    and the same tokens as quantizing an fp32 load — with the unquantized rest computed in fp32 afterwards."""
    import glm4.quant.load as loader
    from glm4.quant import QuantLinear
    from glm4.weights import load_model, save_checkpoint

    save_checkpoint(tiny_model("glm", seed=3).to(torch.bfloat16), tmp_path)
    loaded, real = [], loader.load_model
    monkeypatch.setattr(loader, "load_model", lambda path, dtype, **kw: loaded.append(dtype) or real(path, dtype, **kw))
    direct = LLM(tmp_path, dtype="float32", quantization="int8", kv_cache_tokens=1024)
    assert loaded == [torch.bfloat16]  # as stored: no fp32 copy of the model
    via_fp32 = LLM.from_model(load_model(tmp_path, dtype=torch.float32), quantization="int8", kv_cache_tokens=1024)
    a, b = direct.model, via_fp32.model
    assert a.compute_dtype == torch.float32  # (the embedding table may stay bf16: rows are widened as looked up)
    assert {p.dtype for n, p in a.named_parameters() if "norm" in n} == {torch.float32}
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QuantLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QuantLinear)}
    assert qa.keys() == qb.keys() and qa
    for n in qa:
        assert torch.equal(qa[n].qweight, qb[n].qweight) and torch.equal(qa[n].scales, qb[n].scales), n
    prompts = [[1, 5, 9, 2], [7, 7, 3]]
    assert [o.token_ids for o in direct.generate(prompts, GREEDY)] == [o.token_ids for o in via_fp32.generate(prompts, GREEDY)]


@pytest.mark.skipif(not __import__("glm4.quant.kernels", fromlist=["x"]).has_streaming_kernels(),
                    reason="glm4's CPU kernels are not built here")
@pytest.mark.parametrize("model_type,scheme,tied", [("glm", "int4", False), ("glm4", "int8", True),
                                                    ("glm4_moe", "int4", False)])
def test_quantizing_at_load_layer_by_layer_equals_quantizing_the_loaded_model(tmp_path, monkeypatch, model_type,
                                                                             scheme, tied):
    """glm4.LLM quantizes each layer (and the untied head) as soon as its weights are read: the same modules, codes
    and tokens as quantizing the whole loaded model, with every layer handed over once."""
    import glm4.weights as W
    from glm4.quant import QuantLinear, StreamExperts
    from glm4.weights import load_model, save_checkpoint

    save_checkpoint(tiny_model(model_type, seed=5, tie_word_embeddings=tied), tmp_path)
    units, real = [], W.load_weights

    def recording(model, *args, on_layer_loaded=None, **kw):
        hook = on_layer_loaded and (lambda m, name: units.append(name) or on_layer_loaded(m, name))
        return real(model, *args, on_layer_loaded=hook, **kw)

    monkeypatch.setattr(W, "load_weights", recording)
    kw = dict(dtype="float32", quantization=scheme, quant_group_size=32, kv_cache_tokens=1024)
    streamed = LLM(tmp_path, **kw)
    layers = [f"model.layers.{i}" for i in range(streamed.model.config.num_hidden_layers)]
    assert sorted(units) == sorted(layers + ([] if tied else ["lm_head"]))
    whole = LLM.from_model(load_model(tmp_path, dtype=torch.float32), **{k: v for k, v in kw.items() if k != "dtype"})
    swapped = (QuantLinear, StreamExperts)
    a = {n: m for n, m in streamed.model.named_modules() if isinstance(m, swapped)}
    b = {n: m for n, m in whole.model.named_modules() if isinstance(m, swapped)}
    assert a.keys() == b.keys() and any(isinstance(m, StreamExperts) for m in a.values()) == (model_type == "glm4_moe")
    for n in a:
        for (k, x), (_, y) in zip(a[n].state_dict().items(), b[n].state_dict().items()):
            assert torch.equal(x, y), (n, k)
    prompts = [[1, 5, 9, 2], [7, 7, 3]]
    assert [o.token_ids for o in streamed.generate(prompts, GREEDY)] == [o.token_ids for o in whole.generate(prompts, GREEDY)]


_PEAK_SCRIPT = """
import sys
import torch
from glm4.engine import LLM

def rss(field):  # bytes, from /proc/self/status
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) * 1024

torch.set_num_threads(1)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) reset to the current RSS
before = rss("VmRSS:")
llm = LLM(sys.argv[1], dtype="float32", quantization="int4", kv_cache_tokens=256, max_num_seqs=2)
print(rss("VmHWM:") - before)
"""


@pytest.mark.skipif(not __import__("glm4.quant.kernels", fromlist=["x"]).has_streaming_kernels(),
                    reason="glm4's CPU kernels are not built here")
def test_quantizing_at_load_never_holds_the_float_model(tmp_path):
    """The peak RSS that glm4.LLM adds loading a 180 MB fp32 checkpoint as int4 (a fresh process) stays under half
    the checkpoint: the float weights of about one layer are in memory at a time (loading all of them first, then
    quantizing, took 1.0-1.3x the checkpoint)."""
    import subprocess
    import sys

    from glm4.weights import save_checkpoint

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the peak RSS")
    model = tiny_model("glm", hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=1,
                       head_dim=64, num_hidden_layers=12, vocab_size=512)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert fp32_bytes > 150e6
    save_checkpoint(model, tmp_path)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True)
    added = int(out.stdout.split()[-1])
    assert added < 0.5 * fp32_bytes, f"peak +{added / 1e6:.0f} MB for a {fp32_bytes / 1e6:.0f} MB checkpoint"
