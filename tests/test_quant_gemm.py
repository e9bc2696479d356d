"""The prefill GEMM of int8 / int4 weights in bf16 (glm4.quant.set_gemm_dtype, EngineArgs.quant_gemm); its int8
activations for 4- / 6-bit codes: test_gemm_int8.py."""

from __future__ import annotations

import pytest
import torch
from test_engine import tiny_model

from glm4.engine import LLM
from glm4.quant import QuantLinear, kernels, quantize, set_gemm_dtype
from glm4.quant.experts import StreamExperts


def _qlinear(bits: int, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) / 16)
        lin.bias.copy_(torch.randn(96, generator=g) / 10)
    model = torch.nn.Sequential(lin)
    quantize(model, f"int{bits}", group_size=64)
    return model[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_gemm_is_the_bf16_product_of_the_same_weights(bits):
    """M above the streaming kernel's limit: with gemm_dtype bf16 the output is x (rounded to bf16) times the
    dequantized weight (rounded to bf16), accumulated in fp32 — not the fp32 product."""
    m = _qlinear(bits)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    w = m.dequantize(torch.float32)
    exact = x.double() @ w.double().T + m.bias.double()
    with torch.inference_mode():
        fp32 = m(x)
        set_gemm_dtype(torch.nn.Sequential(m), torch.bfloat16)
        bf16 = m(x)
    assert fp32.dtype == bf16.dtype == torch.float32
    rounded = x.bfloat16().double() @ w.bfloat16().double().T + m.bias.double()  # the bf16 GEMM's inputs, exactly
    torch.testing.assert_close(fp32.double(), exact, rtol=1e-5, atol=1e-5)
    # bf16 output rounding (oneDNN writes bf16) is the only error left against the rounded inputs
    torch.testing.assert_close(bf16.double(), rounded, rtol=2 ** -8, atol=1e-3)
    assert (bf16.double() - exact).abs().max() > 10 * (fp32.double() - exact).abs().max()  # really took bf16


def test_decode_rows_stay_fp32():
    m = _qlinear(4)
    x = torch.randn(kernels.max_m(m) or 1, 256)
    with torch.inference_mode():
        before = m(x)
        set_gemm_dtype(torch.nn.Sequential(m), torch.bfloat16)
        assert torch.equal(m(x), before)


def test_set_gemm_dtype_reaches_expert_packs_and_refuses_other_dtypes():
    model = tiny_model("glm4_moe")
    quantize(model, "int4", group_size=32)
    n = set_gemm_dtype(model, torch.bfloat16)
    packs = [m for m in model.modules() if isinstance(m, StreamExperts)]
    assert packs and all(p.gate_up.gemm_dtype == torch.bfloat16 and p.down.gemm_dtype == torch.bfloat16 for p in packs)
    assert packs[0].gate_up.expert(0).gemm_dtype == torch.bfloat16  # the per-expert QuantLinear view
    assert n == sum(isinstance(m, QuantLinear) for m in model.modules()) + 2 * len(packs)
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        set_gemm_dtype(model, torch.float16)


@pytest.mark.parametrize("choice", ["auto", "float32", "bfloat16"])
@pytest.mark.parametrize("scheme", ["int8", "int6", "int4"])
def test_engine_quant_gemm_choice(choice, scheme):
    llm = LLM.from_model(tiny_model("glm4"), quantization=scheme, quant_gemm=choice)
    bf16 = choice == "bfloat16" or (choice == "auto" and scheme != "int8" and kernels.native_bf16())
    # auto without native bf16: glm4's int8-activation GEMM for 4- / 6-bit codes (test_gemm_int8.py)
    int8 = choice == "auto" and scheme != "int8" and not kernels.native_bf16() and kernels.has_streaming_kernels()
    dtypes = {m.gemm_dtype for m in llm.model.modules() if isinstance(m, QuantLinear) and m.bits == int(scheme[3:])}
    assert dtypes == {torch.bfloat16 if bf16 else torch.int8 if int8 else torch.float32}
    assert ("dequantize + bf16 " in llm.describe()) == bf16 or not kernels.has_streaming_kernels()


def test_set_gemm_dtype_by_width():
    model = tiny_model("glm4")
    quantize(model, "int4", group_size=32, head="int8")  # int4 linears and an int8 LM head
    width = lambda b: [m for m in model.modules() if isinstance(m, QuantLinear) and m.bits == b]  # noqa: E731
    assert len(width(8)) == 1 and width(4)
    assert set_gemm_dtype(model, torch.bfloat16, bits=(4,)) == len(width(4))
    assert width(8)[0].gemm_dtype == torch.float32 and all(m.gemm_dtype == torch.bfloat16 for m in width(4))


def test_engine_rejects_unknown_quant_gemm():
    with pytest.raises(ValueError, match="quant_gemm"):
        LLM.from_model(tiny_model("glm"), quantization="int8", quant_gemm="fp8")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemm_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunked", [False, True])  # each expert's weight dequantized whole, or 16 rows at a time
def test_expert_pack_prefill_equals_its_experts_one_by_one(bits, act, gemm_dtype, chunked, monkeypatch):
    """The pack's many-tokens path (one cast, one reused dequantization buffer, one output) gives the values each
    expert's QuantLinear view gives on its own rows, bit for bit, busy experts with few tokens included."""
    model = tiny_model("glm4_moe")
    quantize(model, f"int{bits}", group_size=32)
    pack = next(m for m in model.modules() if isinstance(m, StreamExperts)).gate_up
    pack.gemm_dtype = gemm_dtype
    if chunked:
        monkeypatch.setattr(kernels, "_GEMM_WHOLE", 0)
        monkeypatch.setattr(kernels, "_GEMM_CHUNK", 16 * pack.in_features)
    counts = torch.zeros(pack.num_experts, dtype=torch.long)
    counts[:4] = torch.tensor([40, 3, 0, 25])[: pack.num_experts]  # 3: below the streaming kernel's limit
    xs = torch.randn(int(counts.sum()), pack.in_features, generator=torch.Generator().manual_seed(5)).to(act)
    with torch.inference_mode():
        y = pack(xs, counts)
        ref, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                ref.append(pack.expert(e)(xs[start:start + n]))
                start += n
    assert y.dtype == act and torch.equal(y, torch.cat(ref))
