"""The prefill GEMM of 4- / 6-bit codes against int8 activations (torch.ops.glm4.quant_gemm_i8, gemm_i8_avx2.cpp;
gemm_dtype int8 through glm4.quant.set_gemm_dtype and EngineArgs.quant_gemm). Checked against a float64 product of
the dequantized weights with the activations rounded as the kernel rounds them: fp32 rounding is the only error."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_activations
from test_engine import tiny_model
from test_kernels import needs_kernels, rel_err
from test_quant_activations import rounded_int8

from glm4.engine import LLM
from glm4.quant import QuantLinear, describe_linears, kernels, quantize, set_gemm_dtype
from glm4.quant.experts import StreamExperts


def _block(group: int) -> int:  # the activation block: the largest multiple of 32 up to 256 dividing the group
    return next(b for b in range(256, 31, -32) if group % b == 0)


def _codes_linear(bits, group, N, K, *, mins, scale_dtype, seed) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = (torch.rand(N, K // group, generator=g) * 0.02 + 1e-3).to(scale_dtype)
    m = (torch.rand(N, K // group, generator=g) - 0.5).to(scale_dtype) * 0.1 if mins else None
    return QuantLinear.from_codes(q, scales, m, bits=bits, group_size=group, zero_point=1 << (bits - 1))


@needs_kernels
@pytest.mark.parametrize("bits,group,M,N,K", [
    (4, 128, 37, 45, 1024),   # rows not a multiple of the 16-row panel, odd M (a one-token tail)
    (4, 32, 64, 64, 256),     # GGUF q4_0's groups: one block of 32 a group
    (4, 96, 3, 17, 384),      # blocks of 96
    (4, 2048, 9, 16, 4096),   # 8 blocks of 256 a group, columns in 4 chunks of 1024
    (6, 64, 5, 33, 512),
    (6, 128, 130, 50, 1280),  # a chunk of 1024 columns and one of 256
    (6, 192, 4, 16, 2304),    # chunks of 960 (five blocks of 192)
])
@pytest.mark.parametrize("mins", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_int8_gemm_is_the_product_with_rounded_activations(bits, group, M, N, K, mins, scale_dtype):
    lin = _codes_linear(bits, group, N, K, mins=mins, scale_dtype=scale_dtype, seed=bits * group + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * torch.rand(1, K) * 4  # uneven blocks
    y = torch.ops.glm4.quant_gemm_i8(x, lin.qweight, lin.scales, lin.mins, bits, group, lin.zero_point)
    w = lin.dequantize(torch.float64)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert rel_err(y, rounded_int8(x, _block(group)) @ w.T) < 1e-5  # integer sums exact: fp32 rounding only
    assert rel_err(y, x.double() @ w.T) > 1e-4  # really 8-bit activations


@needs_kernels
def test_int8_gemm_refuses_what_it_does_not_run():
    lin = _codes_linear(4, 32, 16, 64, mins=False, scale_dtype=torch.float16, seed=0)
    x = torch.randn(20, 64)
    with pytest.raises(RuntimeError, match="bits must be 4 or 6"):
        torch.ops.glm4.quant_gemm_i8(x, lin.qweight, lin.scales, None, 8, 32, 0)
    with pytest.raises(RuntimeError, match="does not match K"):
        torch.ops.glm4.quant_gemm_i8(x[:, :32], lin.qweight, lin.scales, None, 4, 32, 8)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.glm4.quant_gemm_i8(x.double(), lin.qweight, lin.scales, None, 4, 32, 8)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 6])
def test_quant_linear_prefill_takes_int8_gemm_and_exact_mode_keeps_fp32(bits):
    lin = torch.nn.Linear(256, 96, bias=True)
    model = torch.nn.Sequential(lin)
    quantize(model, f"int{bits}", group_size=64)
    m = model[0]
    x = torch.randn(2, 40, 256)  # [batch, tokens, K]: M = 80 rows, above the streaming kernel's limit
    with torch.inference_mode():
        fp32 = m(x)
        assert set_gemm_dtype(model, torch.int8) == 1 and m.gemm_dtype == torch.int8
        y = m(x)
        with kernel_activations("exact"):  # exact activations keep every kernel at fp32's result
            assert torch.equal(m(x), fp32)
            assert "dequantize + " in describe_linears(model)[0][2]
    ref = rounded_int8(x.reshape(80, 256), 64) @ m.dequantize(torch.float64).T + m.bias.double()
    assert y.shape == (2, 40, 96) and rel_err(y.reshape(80, 96), ref) < 1e-5
    assert "glm4 AVX2 GEMM, int8 activations above" in describe_linears(model)[0][2]


@needs_kernels
def test_set_gemm_dtype_int8_takes_4_and_6_bit_codes_only():
    model = tiny_model("glm4")
    quantize(model, "int4", group_size=32, head="int8")  # int4 linears and an int8 LM head
    width = lambda b: [m for m in model.modules() if isinstance(m, QuantLinear) and m.bits == b]  # noqa: E731
    assert set_gemm_dtype(model, torch.int8) == len(width(4))
    assert width(8)[0].gemm_dtype == torch.float32 and all(m.gemm_dtype == torch.int8 for m in width(4))


@needs_kernels
@pytest.mark.parametrize("bits", [4, 6])
def test_expert_pack_int8_prefill_equals_its_experts_one_by_one(bits):
    model = tiny_model("glm4_moe")
    quantize(model, f"int{bits}", group_size=64)
    set_gemm_dtype(model, torch.int8)
    pack = next(m for m in model.modules() if isinstance(m, StreamExperts)).gate_up
    assert pack.gemm_dtype == torch.int8
    counts = torch.zeros(pack.num_experts, dtype=torch.long)
    counts[:4] = torch.tensor([40, 3, 0, 25])[: pack.num_experts]  # 3: below the streaming kernel's limit
    xs = torch.randn(int(counts.sum()), pack.in_features, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        y = pack(xs, counts)
        ref, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                ref.append(pack.expert(e)(xs[start:start + n]))
                start += n
    assert torch.equal(y, torch.cat(ref))
    w0 = pack.expert(0).dequantize(torch.float64)
    assert rel_err(y[:40], rounded_int8(xs[:40], 64) @ w0.T) < 1e-5  # expert 0's 40 tokens: the int8 GEMM
    assert "int8-activation GEMM per busy expert" in next(d for k, _, d in describe_linears(model) if k == "experts")


@needs_kernels
@pytest.mark.parametrize("choice", ["auto", "int8"])
def test_engine_int8_quant_gemm(choice):
    llm = LLM.from_model(tiny_model("glm4"), quantization="int4", quant_gemm=choice)
    int8 = choice == "int8" or not kernels.native_bf16()  # auto: bf16 where the CPU computes in it
    dtypes = {m.gemm_dtype for m in llm.model.modules() if isinstance(m, QuantLinear) and m.bits == 4}
    assert dtypes == {torch.int8 if int8 else torch.bfloat16}
    assert ("int8 activations above" in llm.describe()) == int8
