"""glm4.quant.decode_stack: a decode step through every layer by one C++ call equals the modules' step bit for bit."""

from __future__ import annotations

import pytest
import torch
from test_engine import make_prompts, reference, tiny_model
from test_kernels import _kquant_blocks

from glm4.engine import LLM, SamplingParams
from glm4.quant import decode_stack, fused
from glm4.quant.kquant import Q4_K, Q6_K, KQuantLinear

pytestmark = pytest.mark.skipif(not fused.have_fused_ops(), reason="glm4's fused CPU ops are not built / not on this CPU")

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=True)
PROMPTS = make_prompts([1, 6, 40, 17])

# MoE variants: GLM-4.5's sigmoid routing with groups and a correction bias; softmax routing; no shared experts
MOE = dict(use_qk_norm=False)
VARIANTS = {
    "glm": ("glm", {}),
    "glm4_moe-qk-norm": ("glm4_moe", {}),  # tiny_config's MoE: GLM-4.5's per-head q / k norms
    "glm4": ("glm4", {}),
    "glm4_moe": ("glm4_moe", MOE),
    "glm4_moe-softmax": ("glm4_moe", dict(MOE, scoring_func="softmax", n_group=1, topk_group=1)),
    "glm4_moe-no-shared": ("glm4_moe", dict(MOE, n_shared_experts=0, first_k_dense_replace=0, norm_topk_prob=False)),
}


def _counting(llm) -> list[int]:
    """Wrap the model's decode_layers_kernel; the list gets one entry per step it ran (the tokens of that step)."""
    runs = []
    kernel = llm.model.decode_layers_kernel

    def counted(h, cs, ctx):
        out = kernel(h, cs, ctx)
        if out is not None:
            runs.append(h.shape[0] * h.shape[1])
        return out

    llm.model.decode_layers_kernel = counted
    return runs


def _generate(llm, prompts=PROMPTS, params=PARAMS):
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].token_ids, [e["logprob"] for e in o.outputs[0].logprobs]) for o in outs]


def _on_and_off(make_llm, prompts=PROMPTS):
    """(tokens and log-probabilities with the stack, without it, the stack's step sizes)."""
    llm = make_llm()
    runs = _counting(llm)
    on = _generate(llm, prompts)
    llm = make_llm()
    decode_stack.drop_decode_stack(llm.model)
    return on, _generate(llm, prompts), runs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4"])
def test_decode_steps_through_the_stack_equal_the_modules_to_the_bit(variant, weights):
    """Tokens and log-probabilities of a batch of four prompts (decode steps of 1-4 tokens, mixed with prefill
    steps, which the modules run): with the stack equal to the bit those of the modules, whose tokens equal the
    reference generator's for float weights."""
    model_type, overrides = VARIANTS[variant]
    kw = {"dtype": weights} if weights in ("float32", "bfloat16") else {"quantization": weights}
    make = lambda: LLM.from_model(tiny_model(model_type, **overrides), **kw)  # noqa: E731
    on, off, runs = _on_and_off(make)
    assert on == off
    assert runs and max(runs) == 4 and min(runs) >= 1  # decode steps of the batch took the stack
    if weights == "float32":
        assert [ids for ids, _ in on] == reference(tiny_model(model_type, **overrides), PROMPTS, new=10)


GREEDY_PLAIN = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)  # no logprobs: the one-call step


def _counting_greedy(llm) -> list[int]:
    """Wrap the stack's whole-step call; the list gets the tokens of each step it took."""
    runs, runner = [], llm.model.decode_layers_kernel
    greedy = runner.greedy

    def counted(input_ids, positions, rope, ctx, vocab):
        out = greedy(input_ids, positions, rope, ctx, vocab)
        if out is not None:
            runs.append(input_ids.numel())
        return out

    runner.greedy = counted
    return runs


def _greedy_on_and_off(make_llm, prompts=PROMPTS):
    """(greedy tokens by the one-call step, by the modules and the sampler, the one-call step's sizes)."""
    llm = make_llm()
    runs = _counting_greedy(llm)
    on = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY_PLAIN)]
    llm = make_llm()
    decode_stack.drop_decode_stack(llm.model)
    return on, [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY_PLAIN)], runs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4"])
def test_greedy_decode_steps_run_whole_in_one_call(variant, weights):
    """Greedy requests without logprobs: a decode-only step runs embedding to argmax in one call (DecodeStack.greedy),
    whose tokens equal the modules' and the sampler's; a request that wants logprobs (or samples) keeps the sampler."""
    model_type, overrides = VARIANTS[variant]
    kw = {"dtype": weights} if weights in ("float32", "bfloat16") else {"quantization": weights}
    make = lambda: LLM.from_model(tiny_model(model_type, **overrides), **kw)  # noqa: E731
    on, off, runs = _greedy_on_and_off(make)
    assert on == off
    assert runs and max(runs) == 4 and min(runs) >= 1
    llm = make()
    runs = _counting_greedy(llm)
    llm.generate(PROMPTS[:2], [GREEDY_PLAIN, PARAMS])  # one of the batch wants logprobs
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.8, seed=1))
    assert runs == []


def _quantized_table(kind: str, weight: torch.Tensor):
    from glm4.quant.qlinear import QuantLinear

    if kind == "q6_K":
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        return KQuantLinear.from_linear(linear)
    g = torch.Generator().manual_seed(3)
    V, H = weight.shape
    bits = 8 if kind == "int8" else 4
    codes = torch.randint(-128, 128, (V, H), generator=g) if bits == 8 else torch.randint(0, 16, (V, H), generator=g)
    scales = 0.01 + 0.01 * torch.rand(V, H // 32, generator=g)
    mins = None if bits == 8 else -0.08 * torch.rand(V, H // 32, generator=g)
    return QuantLinear.from_codes(codes, scales, mins, bits=bits, group_size=32)


@pytest.mark.parametrize("kind", ["q6_K", "int8", "int4-tied"])
def test_quantized_token_tables_in_the_one_call_step(kind):
    """A token table kept quantized (QuantEmbedding: a GGUF file's token_embd as GGUF blocks or glm4's codes, the
    head tied to it or not): the one-call step looks the rows up as the module does, tokens equal to the modules'."""
    from glm4.quant.qlinear import QuantEmbedding

    def make():
        model = tiny_model("glm", hidden_size=256, intermediate_size=256, num_attention_heads=4, head_dim=64)
        table = _quantized_table(kind.removesuffix("-tied"), model.model.embed_tokens.weight.detach())
        model.model.embed_tokens = QuantEmbedding(table)
        if kind.endswith("-tied"):
            model.lm_head = table
        return LLM.from_model(model)

    llm = make()
    assert type(llm.model.get_input_embeddings()) is QuantEmbedding
    assert (llm.model.get_output_embeddings() is llm.model.get_input_embeddings().table) == kind.endswith("-tied")
    on, off, runs = _greedy_on_and_off(make)
    assert on == off and runs and max(runs) == 4


def test_k_quant_projections_run_in_the_stack():
    """GGUF K-quant blocks (KQuantLinear) as the body's projections, q6_K as the attention's and q4_K as the MLP's
    down (so the q6_K ones take the q4_K's activation width: int8 under auto on AVX2): the stack equals the modules
    to the bit."""
    def make():
        model = tiny_model("glm", hidden_size=256, intermediate_size=256, num_attention_heads=4, head_dim=64)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.fuse()
            layer.self_attn.qkv_proj = KQuantLinear.from_linear(layer.self_attn.qkv_proj)  # q6_K
            down = KQuantLinear(256, 256, Q4_K)
            down.blocks.copy_(_kquant_blocks(Q4_K, 256, 256, seed=i))
            layer.mlp.down_proj = down
        return LLM.from_model(model)

    llm = make()
    kquant = [m for m in llm.model.model.layers.modules() if type(m) is KQuantLinear]
    assert {m.ggml_type for m in kquant} == {Q4_K, Q6_K}
    assert all(m.activation_bits == (4 if m.ggml_type == Q6_K else 0) for m in kquant)  # set_activation_bits
    on, off, runs = _on_and_off(make)
    assert on == off and runs


@pytest.mark.parametrize("variant", ["glm", "glm4_moe", "glm4_moe-qk-norm"])
def test_separate_projections_run_in_the_stack(variant):
    """q / k / v and a MoE model's gate / up left apart (projections of different formats do not fuse: a q4_K_M
    file's q4_K q / k with a q6_K v): the stack runs them as the modules do, equal to the bit."""
    model_type, overrides = VARIANTS[variant]
    make = lambda: LLM.from_model(tiny_model(model_type, **overrides), fuse_projections=False)  # noqa: E731
    model = make().model
    assert all(layer.self_attn.qkv_proj is None for layer in model.model.layers)
    if model_type == "glm4_moe":
        assert model.model.layers[0].mlp.gate_up_proj is None and model.model.layers[1].mlp.shared_experts.gate_proj
    on, off, runs = _on_and_off(make)
    assert on == off and runs


def test_the_stack_declines_what_it_does_not_run():
    """Without the fused ops, no stack (the modules run); LoRA adapters drop it (they wrap the linears it holds); a
    projection the stack does not know keeps the module path for the whole model."""
    assert LLM.from_model(tiny_model("glm"), fused_ops=False).model.decode_layers_kernel is None
    llm = LLM.from_model(tiny_model("glm"))
    assert llm.model.decode_layers_kernel is not None
    assert "decode_stack" in llm.describe()
    from glm4.engine.lora import LoRAAdapters

    LoRAAdapters(llm.model)
    assert llm.model.decode_layers_kernel is None
    model = LLM.from_model(tiny_model("glm")).model
    model.model.layers[1].mlp.down_proj = torch.nn.Identity()
    assert decode_stack.use_decode_stack(model) is False and model.decode_layers_kernel is None


def test_chatglm_decodes_through_the_stack(hf_checkpoint, tmp_path):
    """glm-4-9b-chat's original layout (fused query_key_value with bias, interleaved RoPE): the stack equals the
    modules to the bit, fp32 and int4."""
    from conftest import to_chatglm

    import glm4

    folder, _ = hf_checkpoint("glm")
    path = to_chatglm(folder, tmp_path / "chatglm")
    for kw in ({}, {"quantization": "int4"}):
        make = lambda kw=kw: LLM.from_model(glm4.load_model(path), **kw)  # noqa: E731
        assert type(make().model).__name__ == "ChatGLMForConditionalGeneration"
        on, off, runs = _on_and_off(make)
        assert on == off and runs and max(runs) == 4
        on, off, runs = _greedy_on_and_off(make)  # embedding to argmax in one call
        assert on == off and runs and max(runs) == 4


@pytest.mark.parametrize("variant", ["glm4", "glm4_moe", "glm4_moe-qk-norm"])
@pytest.mark.parametrize("weights", ["bfloat16", "int4"])
def test_bf16_activations_through_the_stack_equal_the_modules(variant, weights, monkeypatch):
    """Where the CPU computes in bf16 (AVX512_BF16) a bf16 checkpoint's activations are bf16; forced here on any CPU:
    the stack's step (its kernels read fp32 activations and round their outputs to bf16, as the modules do) equals
    the modules' to the bit."""
    import glm4.engine.llm as llm_module

    monkeypatch.setattr(llm_module, "compute_dtype", lambda storage, device: storage)
    model_type, overrides = VARIANTS[variant]
    kw = {"dtype": "bfloat16"} if weights == "bfloat16" else {"quantization": weights}
    make = lambda: LLM.from_model(tiny_model(model_type, **overrides).to(torch.bfloat16), **kw)  # noqa: E731
    assert make().engine.runner.dtype == torch.bfloat16
    on, off, runs = _on_and_off(make)
    assert on == off and runs
    on, off, runs = _greedy_on_and_off(make)  # bf16 rows looked up, bf16 logits widened for the argmax
    assert on == off and runs
