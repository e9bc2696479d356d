"""Weight-only int8/int4 and prepacked linears against fp32 nn.Linear, then swapped into tiny GLM models.

Per-linear bounds come from the quantization step: every |w - w_hat| <= s/2 (int8: s per row; int4: per
row and group), so |y_q - y| <= sum_j s_ij/2 |x_j|, plus bf16 rounding where a kernel takes bf16
activations (activation, dequantized weight, output: each <= 2^-9 relative, summed <= 2^-7 |W||x|).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import kernel_activations, randomize_, tiny_config
from torch import nn

from glm4.config import config_from_dict
from glm4.models import build_model
from glm4.quant import (
    PackedLinear,
    QuantizationError,
    QuantLinear,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
    dequantize,
    kernels,
    quantize,
    quantize_weights_report,
)
from glm4.quant import int4 as int4_mod
from glm4.quant import int8 as int8_mod
from glm4.quant.fast_linear import has_op, kernel_max_m
from glm4.quant.int4 import layout_known, quantize_int4
from glm4.quant.int8 import quantize_int8
from glm4.reference import generate

BF16_TERMS = 2.0**-7  # three bf16 roundings (2^-9 each) with margin
SHAPES = [(1, 64, 128, True), (3, 96, 256, False), (5, 100, 64, True)]  # (M, N, K, bias); N=100 is not a multiple of 16


def make_linear(n: int, k: int, bias: bool, seed: int = 0, outliers: bool = True) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).requires_grad_(False)
    w = torch.randn(n, k, generator=g) / k**0.5
    if outliers:  # a few large weights per row, as real checkpoints have: they set the int8 row scale
        idx = torch.randint(0, k, (n, 2), generator=g)
        w.scatter_(1, idx, 8 / k**0.5 * torch.randn(n, 2, generator=g))
    lin.weight.copy_(w)
    if bias:
        lin.bias.copy_(0.1 * torch.randn(n, generator=g))
    return lin


def check_bound(y_q: torch.Tensor, lin: nn.Linear, x: torch.Tensor, quant_term: torch.Tensor, rounding: float) -> float:
    """Assert |y_q - lin(x)| <= quant_term + rounding * (|W| |x| + |b|) elementwise; returns max err/bound."""
    y = lin(x)
    mag = x.abs() @ lin.weight.abs().t() + (lin.bias.abs() if lin.bias is not None else 0)
    bound = quant_term * (1 + rounding) + rounding * mag + 1e-7
    err = (y_q - y).abs()
    assert y_q.shape == y.shape and y_q.dtype == y.dtype
    assert err.max() > 0  # really quantized
    assert (err <= bound).all(), f"max err/bound = {(err / bound).max():.3f}"
    return (err / bound).max().item()


# ---- int8 ------------------------------------------------------------------------------------------


def test_quantize_int8_step_bound():
    lin = make_linear(600, 128, False)  # > 256 rows: quantized in row chunks
    q, s = quantize_int8(lin.weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and s.dtype == torch.bfloat16
    err = (q.float() * s.float()[:, None] - lin.weight).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-6)).all()
    # a zero row quantizes to zeros without dividing by zero
    q0, s0 = quantize_int8(torch.zeros(2, 8))
    assert (q0 == 0).all() and torch.isfinite(s0.float()).all()


@pytest.mark.skipif(not has_op("int8"), reason="no _weight_int8pack_mm in this torch build")
@pytest.mark.parametrize("M,N,K,bias", SHAPES)
def test_int8_kernel_path_bound(M, N, K, bias):
    lin = make_linear(N, K, bias)
    m = WeightOnlyInt8Linear.from_base(lin)
    assert M <= m.max_kernel_m
    x = torch.randn(M, K)
    xb = x.bfloat16().float()  # the kernel sees bf16 activations
    quant = xb.abs().sum(-1, keepdim=True) * m.scales.float()[None, :] / 2  # [M, N]
    ratio = check_bound(m(x), lin, x, quant, BF16_TERMS)
    print(f"int8 kernel M={M} N={N} K={K}: max err/bound {ratio:.3f}")


@pytest.mark.parametrize("M,N,K,bias", SHAPES)
def test_int8_gemm_path_bound(M, N, K, bias, monkeypatch):
    monkeypatch.setattr(int8_mod, "_GEMM_ELEMS", 1024)  # many 16-row chunks
    lin = make_linear(N, K, bias)
    m = WeightOnlyInt8Linear.from_base(lin)
    m.max_kernel_m = 0  # force dequantize + fp32 GEMM (prefill path and no-kernel fallback)
    x = torch.randn(2, M, K)  # 3-D input
    quant = x.abs().sum(-1, keepdim=True) * m.scales.float() / 2
    check_bound(m(x), lin, x, quant, K * 2.0**-23)  # fp32 accumulation only


def test_int8_paths_agree_and_bf16_io():
    lin = make_linear(64, 128, True)
    m = WeightOnlyInt8Linear.from_base(lin)
    x = torch.randn(4, 128)
    y_kernel = m(x)
    m.max_kernel_m = 0
    y_gemm = m(x)
    assert (y_kernel - y_gemm).abs().max() <= BF16_TERMS * (x.abs() @ m.dequantize().abs().t()).max()
    assert m(x.bfloat16()).dtype == torch.bfloat16


# ---- int4 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_int4_step_bound(group_size):
    lin = make_linear(48, 256, False)
    q, s, z = quantize_int4(lin.weight, group_size)
    assert q.min() >= 0 and q.max() <= 15 and s.shape == (48, 256 // group_size)
    w_hat = ((q.float() - 8).reshape(48, -1, group_size) * s.float()[..., None] + z.float()[..., None])
    err = (w_hat.reshape(48, 256) - lin.weight).abs().reshape(48, -1, group_size)
    assert (err <= s.float()[..., None] / 2 * (1 + 1e-5)).all()
    # both ends of the 16-level grid are used: round-to-nearest over the full [min, max] range
    assert (q == 0).any() and (q == 15).any()


@pytest.mark.skipif(not has_op("int4"), reason="no _weight_int4pack_mm_for_cpu in this torch build")
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("M,N,K,bias", SHAPES)
def test_int4_bound(M, N, K, bias, group_size):
    lin = make_linear(N, K, bias)
    m = WeightOnlyInt4Linear.from_base(lin, group_size)
    x = torch.randn(M, K)
    scales = m.scales_and_zeros[..., 0].t()[:N].float().repeat_interleave(group_size, dim=1)  # [N, K]
    quant = x.bfloat16().float().abs() @ scales.t() / 2  # sum_j s_ij/2 |x_j|, [M, N]
    ratio = check_bound(m(x), lin, x, quant, BF16_TERMS)
    print(f"int4 g{group_size} M={M} N={N} K={K}: max err/bound {ratio:.3f}")
    # dequantize() recovers the grid values of quantize_int4 from the packed bytes
    q, s, z = quantize_int4(lin.weight, group_size)
    w_hat = ((q.float() - 8).reshape(N, -1, group_size) * s.float()[..., None] + z.float()[..., None]).reshape(N, K)
    rtol = 1e-6 if layout_known() else 2**-8  # else read through the kernel on an identity, bf16-rounded
    assert torch.allclose(m.dequantize(), w_hat, rtol=rtol, atol=0)


@pytest.mark.skipif(not layout_known(), reason="int4 packed layout of this CPU kernel is not the AVX-512 one")
@pytest.mark.parametrize("M,N,K,bias", SHAPES + [(2, 600, 64, True)])  # 600 rows: two GEMM chunks, padded
def test_int4_gemm_path_bound(M, N, K, bias, monkeypatch):
    monkeypatch.setattr(int4_mod, "_GEMM_ELEMS", 1024)  # one 64-row block per chunk
    lin = make_linear(N, K, bias)
    m = WeightOnlyInt4Linear.from_base(lin, 32)
    m.max_kernel_m = 0  # force unpack + dequantize + fp32 GEMM (prefill path)
    x = torch.randn(2, M, K)
    scales = m.scales_and_zeros[..., 0].t()[:N].float().repeat_interleave(32, dim=1)  # [N, K]
    check_bound(m(x), lin, x, x.abs() @ scales.t() / 2, K * 2.0**-23)


def test_int4_chunked_packing_equals_whole_matrix():
    lin = make_linear(2100, 64, False)  # 3 row chunks of <= 1024, last one padded to 2112
    m = WeightOnlyInt4Linear.from_base(lin, 32)
    q, s, z = quantize_int4(lin.weight, 32)
    q = torch.cat([q, torch.full((12, 64), 8, dtype=q.dtype)])
    assert torch.equal(m.weight, torch._convert_weight_to_int4pack_for_cpu(q, 1))
    assert torch.equal(m.scales_and_zeros[:, :2100], torch.stack([s, z], -1).transpose(0, 1))
    x = torch.randn(2, 64)
    w_hat = m.dequantize()
    assert ((m(x) - x @ w_hat.t()).abs() <= BF16_TERMS * (x.abs() @ w_hat.abs().t())).all()  # bf16 rounding only


def test_int4_rejects_bad_group():
    lin = make_linear(32, 96, False)
    with pytest.raises(QuantizationError):
        WeightOnlyInt4Linear.from_base(lin, 64)  # 96 % 64 != 0
    with pytest.raises(QuantizationError):
        quantize_int4(lin.weight, 48)


# ---- packed ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,N,K,bias", SHAPES)
def test_packed_fp32_is_exact_and_bf16_bounded(M, N, K, bias):
    lin = make_linear(N, K, bias)
    x = torch.randn(M, K)
    mag = x.abs() @ lin.weight.abs().t()
    p32 = PackedLinear.from_base(lin)
    assert ((p32(x) - lin(x)).abs() <= K * 2.0**-23 * mag + 1e-7).all()
    p16 = PackedLinear.from_base(lin, torch.bfloat16)
    check_bound(p16(x), lin, x, torch.zeros(()), BF16_TERMS)  # no quantization step, bf16 rounding only
    assert p16(x.bfloat16()).dtype == torch.bfloat16


def test_packed_state_dict_round_trip_and_deepcopy():
    lin = make_linear(32, 64, True)
    p = PackedLinear.from_base(lin)
    sd = p.state_dict()
    assert torch.equal(sd["weight"], lin.weight) and torch.equal(sd["bias"], lin.bias)
    p2 = PackedLinear(64, 32, True)
    p2.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(p2(x), p(x))
    assert torch.equal(copy.deepcopy(p)(x), p(x))
    assert torch.equal(p.to_linear()(x), lin(x))


def test_kernel_seam():
    assert kernel_max_m("int8", 64, 64) >= 1 or not has_op("int8")
    assert kernel_max_m("int4", 64, 64) >= 1 or not has_op("int4")
    with pytest.raises(QuantizationError):
        kernel_max_m("fp8", 64, 64)


# ---- whole models ----------------------------------------------------------------------------------


def tiny_model(model_type: str = "glm4", dtype=torch.float32, **overrides) -> nn.Module:
    d = tiny_config(model_type, **overrides)
    d["model_type"] = model_type
    model = build_model(config_from_dict(d))
    return randomize_(model).eval().to(dtype)


@pytest.mark.parametrize("scheme,group_size", [("int8", 128), ("int4", 32), ("packed", 128)])
def test_model_logits_close_and_greedy_runs(scheme, group_size):
    ref = tiny_model()
    q = quantize(copy.deepcopy(ref), scheme, group_size=group_size)
    assert nn.Linear not in {type(m) for m in q.modules()}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    rep = quantize_weights_report(ref, q, ids)
    lin_sum = sum(rep["linears"].values())
    print(f"{scheme}: logits max rel err {rep['logits_max_rel_err']:.4f}, top-1 agreement {rep['top1_agreement']:.3f}, "
          f"worst linear {max(rep['linears'].values()):.4f}, sum over linears {lin_sum:.4f}")
    assert len(rep["linears"]) == 2 * 6 + 1  # q, k, v, o, gate_up, down per layer + lm_head
    if scheme == "packed":
        assert rep["logits_max_rel_err"] <= 1e-5  # same fp32 math, only summation order differs
    else:
        # first-order propagation: each linear's relative error (bounded per linear above) reaches the
        # logits at most once through the norms/residuals, so the logits error stays below their sum
        assert 0 < rep["logits_max_rel_err"] <= lin_sum
    out_ref = generate(ref, ids[:, :6], max_new_tokens=6)
    out_q = generate(q, ids[:, :6], max_new_tokens=6)
    assert out_q.shape == out_ref.shape and torch.equal(out_q[:, :6], ids[:, :6])
    if scheme == "packed":
        assert torch.equal(out_q, out_ref)


def bits_of(m: nn.Module) -> int | None:
    """Weight bits of a quantized linear: QuantLinear (glm4's kernels) or torch's weight-only modules (fallback)."""
    if isinstance(m, QuantLinear):
        return m.bits
    return {WeightOnlyInt8Linear: 8, WeightOnlyInt4Linear: 4}.get(type(m))


@pytest.mark.parametrize("hidden", [64, 128, 192])  # not multiples of 256: q6_K blocks do not fit
def test_int4_head_auto_is_int6_and_odd_group_falls_back(hidden):
    with pytest.warns(UserWarning, match="down_proj: in_features 96") as caught:  # K = 96: not a multiple of 64
        q = quantize(tiny_model(hidden_size=hidden), "int4", group_size=64)
    assert not [w for w in caught if "lm_head" in str(w.message)]
    if kernels.has_streaming_kernels():  # glm4's kernels run 6-bit codes in groups of 128, else 64 (silently):
        assert bits_of(q.lm_head) == 6 and q.lm_head.group_size == (128 if hidden % 128 == 0 else 64)
    else:  # torch's kernels have no 6-bit format
        assert bits_of(q.lm_head) == 8
    assert bits_of(q.model.layers[0].mlp.gate_up_proj) == 4
    down = q.model.layers[0].mlp.down_proj
    if kernels.has_streaming_kernels():  # the largest smaller group that divides K
        assert bits_of(down) == 4 and down.group_size == 32
    else:  # torch's int4 kernel takes fixed groups: int8 instead
        assert bits_of(down) == 8


def test_int4_int6_head_auto_is_q6k_blocks_where_they_fit():
    # glm4's kernels and a width of 256k: the auto head is GGUF's q6_K (KQuantLinear), its blocks decoded by gguf-py
    # exactly as by glm4, nearer the float weight than int6 g128, and the model's logits near the float model's
    gguf_quants = pytest.importorskip("gguf.quants")
    from glm4.quant import KQuantLinear
    from glm4.quant.int6 import quantize_int6
    from glm4.quant.kquant import quantize_q6k

    torch.manual_seed(0)
    w = torch.randn(48, 512) * torch.rand(48, 1) * 0.05
    w[0, :300] = 0  # an all-zero group and block
    blocks = quantize_q6k(w)
    deq = torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), 14))
    assert blocks.shape == (48, 420) and torch.equal(deq[0, :256], torch.zeros(256))
    q, sc = quantize_int6(w, 128)
    int6 = ((q.float() - 32).view(48, 4, 128) * sc.float()[..., None]).view(48, 512)
    assert (deq - w).square().sum() < 0.7 * (int6 - w).square().sum()  # groups of 16: ~half the squared error
    if not kernels.has_streaming_kernels():
        return
    ref = tiny_model(hidden_size=256)
    ids = torch.randint(0, 128, (1, 8))
    for scheme in ("int4", "int6"):
        qm = quantize(copy.deepcopy(ref), scheme, group_size=64)
        assert isinstance(qm.lm_head, KQuantLinear) and qm.lm_head.ggml_type == 14
        assert torch.equal(qm.lm_head.dequantize(),
                           torch.from_numpy(gguf_quants.dequantize(quantize_q6k(ref.lm_head.weight).numpy(), 14)))
        with kernel_activations("exact"):  # the weights' error alone (activation modes: test_quant_activations.py)
            assert quantize_weights_report(ref, qm, ids)["top1_agreement"] >= 0.75
    with pytest.raises(QuantizationError, match="q6_K needs"):
        quantize(tiny_model(hidden_size=64), "int4", head="q6_K")


def test_skip_head_none_and_bad_scheme():
    q = quantize(tiny_model(), "int8", skip=("*.self_attn.o_proj",), head=None)
    assert type(q.lm_head) is nn.Linear and type(q.model.layers[1].self_attn.o_proj) is nn.Linear
    assert bits_of(q.model.layers[1].self_attn.q_proj) == 8
    m = tiny_model()
    assert quantize(m, None) is m
    with pytest.raises(QuantizationError):
        quantize(m, "fp4")
    with pytest.raises(QuantizationError):
        quantize(m, "int4", group_size=48)


def test_tied_head_gets_its_own_copy():
    ref = tiny_model(tie_word_embeddings=True)
    q = quantize(copy.deepcopy(ref), "int8")
    assert bits_of(q.lm_head) == 8 and isinstance(q.model.embed_tokens, nn.Embedding)
    ids = torch.randint(0, 128, (1, 8))
    rep = quantize_weights_report(ref, q, ids)
    assert 0 < rep["logits_max_rel_err"] <= sum(rep["linears"].values())


def test_moe_router_and_experts_untouched():
    torch.manual_seed(0)  # a near-tie in top-k routing flips an expert and the logits with it: fixed weights and ids
    ref = tiny_model("glm4_moe")
    q = quantize(copy.deepcopy(ref), "int8")
    router_types = {type(m).__name__ for n, m in q.named_modules() if n.endswith("mlp.gate")}
    assert router_types == {"Glm4MoeRouter"}
    ref_params = dict(ref.named_parameters())
    for name, p in q.named_parameters():
        if ".mlp.gate." in name or ".mlp.experts." in name:
            assert torch.equal(p, ref_params[name]), name
    ids = torch.randint(0, 128, (1, 8))
    rep = quantize_weights_report(ref, q, ids)
    assert 0 < rep["logits_max_rel_err"] <= sum(rep["linears"].values())


def test_model_float_after_quantize_still_runs():
    ids = torch.randint(0, 128, (1, 8))
    for scheme in ("int8", "int4", "packed"):
        q = quantize(tiny_model(), scheme, group_size=32)
        y = q(ids)
        q.float()  # converts floating buffers (bf16 scales) to fp32: kernels must still get bf16
        assert torch.equal(q(ids), y)


def test_bf16_model_keeps_dtype():
    ref = tiny_model(dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (1, 8))
    for scheme in ("int8", "packed"):
        q = quantize(copy.deepcopy(ref), scheme)
        assert q(ids).dtype == torch.bfloat16


def test_packed_bf16_weights_in_fp32_model():
    ref = tiny_model()
    q = quantize(copy.deepcopy(ref), "packed", dtype=torch.bfloat16)
    assert {m.dtype for m in q.modules() if isinstance(m, PackedLinear)} == {torch.bfloat16}
    ids = torch.randint(0, 128, (1, 8))
    rep = quantize_weights_report(ref, q, ids)
    assert q(ids).dtype == torch.float32
    assert 0 < rep["logits_max_rel_err"] <= sum(rep["linears"].values())


@pytest.mark.parametrize("scheme", ["int8", "int4", "packed"])
def test_quantized_state_dict_round_trip(scheme):
    q = quantize(tiny_model(), scheme, group_size=32)
    fresh = quantize(build_model(q.config), scheme, group_size=32)  # different random weights, then loaded
    fresh.load_state_dict(q.state_dict())
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(fresh.eval()(ids), q(ids))


@pytest.mark.parametrize("cls", [WeightOnlyInt8Linear, WeightOnlyInt4Linear, PackedLinear])
def test_to_linear_holds_the_effective_weight(cls):
    lin = make_linear(64, 128, True)
    m = cls.from_base(lin) if cls is not WeightOnlyInt4Linear else cls.from_base(lin, 32)
    back = m.to_linear()
    w_eff = m.dequantize()
    assert type(back) is nn.Linear and torch.equal(back.weight, w_eff) and torch.equal(back.bias, lin.bias)
    x = torch.randn(3, 128)
    rounding = 128 * 2.0**-23 if cls is PackedLinear else BF16_TERMS  # the kernels round activations to bf16
    assert ((m(x) - back(x)).abs() <= rounding * (x.abs() @ w_eff.abs().t() + lin.bias.abs()) + 1e-7).all()


@pytest.mark.parametrize("scheme", ["int8", "int4", "packed"])
def test_dequantize_restores_linears(scheme):
    q = quantize(tiny_model(), scheme, group_size=32)
    ids = torch.randint(0, 128, (1, 8))
    y_q = q(ids)
    back = dequantize(q)  # in place
    assert {type(m) for m in back.modules()} & {PackedLinear, WeightOnlyInt8Linear, WeightOnlyInt4Linear,
                                                QuantLinear} == set()
    assert isinstance(back.lm_head.weight, nn.Parameter)
    assert back(ids).shape == y_q.shape
    if scheme == "packed":
        assert torch.allclose(back(ids), y_q, rtol=0, atol=1e-5 * y_q.abs().max().item())  # fp32 summation order


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_engine_serves_quantized_model(scheme):
    from glm4.engine.llm import LLM
    from glm4.engine.sampling_params import SamplingParams

    if not hasattr(LLM, "from_model"):
        pytest.skip("engine has no LLM.from_model")
    q = quantize(tiny_model(), scheme, group_size=32)
    prompts = [[5, 7, 9, 11], [3, 4]]
    outs = LLM.from_model(q).generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))
    # continuous batching (M = 2 at decode) gives the reference generator's tokens: rows are independent
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == generate(q, torch.tensor([p]), max_new_tokens=6)[0, len(p):].tolist()


@pytest.mark.parametrize("bits,group,zps,mins", [(4, 32, (8, 8, 8), False), (4, 32, (0, 0, 0), True),
                                                 (6, 64, (32, 32, 32), False), (8, 16, (0, 16, 32), False)])
def test_quantlinear_concat_stacks_rows_exactly(bits, group, zps, mins):
    # q / k / v of one format as one QuantLinear (glm4.models.glm.fuse_linears calls it): the same weights row for
    # row, 8-bit zero points moved to 0 where the codes allow; outputs equal to the separate linears' to the bit
    # when the zero points agree, else within fp32 rounding (the zero-point term is summed apart from the codes)
    torch.manual_seed(0)
    span = {4: 16, 6: 64, 8: 32}[bits]
    parts = []
    for n, zp in zip((64, 16, 16), zps):
        q = torch.randint(0, span, (n, 128))
        s = torch.rand(n, 128 // group).half()
        parts.append(QuantLinear.from_codes(q, s, torch.rand_like(s) if mins else None, bits=bits, group_size=group,
                                            zero_point=zp, bias=torch.randn(n)))
    fused = QuantLinear.concat(parts)
    assert fused.out_features == 96 and fused.zero_point == (zps[0] if len(set(zps)) == 1 else 0)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    x = torch.randn(3, 128)
    with torch.no_grad(), kernel_activations("exact"):  # (int16 activations: within their own bound, test_kernels)
        got, separate = fused(x), torch.cat([p(x) for p in parts], dim=-1)
    exact = x.double() @ fused.dequantize(torch.float64).T + fused.bias.double()
    if len(set(zps)) == 1:
        assert torch.equal(got, separate)
    assert (got - exact).abs().max() <= 1e-5 * exact.abs().max() and (separate - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_quantlinear_concat_refuses_mixed_formats():
    q = torch.randint(0, 16, (16, 128))
    a = QuantLinear.from_codes(q, torch.rand(16, 4).half(), bits=4, group_size=32, zero_point=8)
    b = QuantLinear.from_codes(q, torch.rand(16, 1).half(), bits=4, group_size=128, zero_point=8)
    c = QuantLinear.from_codes(q, torch.rand(16, 4).half(), bits=4, group_size=32, zero_point=7)
    d = QuantLinear.from_codes(q * 16, torch.rand(16, 4).half(), bits=8, group_size=32, zero_point=0)  # codes 0..240
    e = QuantLinear.from_codes(q, torch.rand(16, 4).half(), bits=8, group_size=32, zero_point=-120)
    assert QuantLinear.concat([a, b]) is None and QuantLinear.concat([a, c]) is None  # group; 4-bit zero points
    assert QuantLinear.concat([d, e]) is None  # codes - zero point leave int8 (-128 .. 135)
