"""glm4's CPU kernels (glm4/quant/csrc) against float64 references, the modules that use them, and the dispatch."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kernel_activations
from torch import nn

from glm4.quant import FloatLinear, QuantLinear, cast_for_compute, describe_linears, kernels, quantize
from glm4.quant.fast_linear import QuantizationError
from glm4.quant.qlinear import pack_int4, pack_int6, unpack_int4, unpack_int6

needs_kernels = pytest.mark.skipif(not kernels.has_streaming_kernels(),
                                   reason="glm4.quant._C not built or the CPU lacks AVX2+FMA")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def test_extension_is_built_where_it_can_be():
    """pip install builds the kernels on x86-64 with a C++ compiler; a silent fallback would hide a broken build."""
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None:
        pytest.skip("no x86-64 C++ toolchain here: the pure-torch paths run")
    assert kernels.HAVE_EXT, "glm4.quant._C failed to build or import (see pip install -v output)"
    assert ("avx2" in kernels.cpu_features()) == kernels.has_streaming_kernels()


def test_cpu_features_and_summary():
    feats = kernels.cpu_features()
    assert feats <= set(kernels.FEATURES)
    assert {"avx512_bf16", "amx_bf16"} & feats or not kernels.native_bf16()
    assert "(" in kernels.cpu_summary()


@needs_kernels
def test_glm4_isa_avx2_runs_as_an_avx2_only_cpu():
    """GLM4_ISA=avx2 narrows every choice to what an AVX2-only CPU gets: the AVX2 kernels, no bf16 compute, the
    features reported as such (and said to be narrowed)."""
    code = ("from glm4.quant import kernels as k; import torch; "
            "print(sorted(k.cpu_features()), k.native_bf16(), torch.ops.glm4.isa(), k.cpu_summary())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GLM4_ISA": "avx2"}, capture_output=True,
                         text=True, check=True).stdout
    have = kernels._cpu_flags()  # the CPU's own
    assert out.startswith(str(sorted(kernels.AVX2_ONLY & have)) + " False avx2 ")
    assert ("narrowed by GLM4_ISA=avx2" in out) == (have != kernels.AVX2_ONLY & have)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("N,K", [(37, 64), (130, 72), (16, 70)])  # odd rows, K with a tail past the last 8
def test_dense_mm_matches_float64(dtype, M, N, K, isa):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).to(dtype)
    y = kernels.dense_mm(x, w)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel_err(y, x.double() @ w.double().T) < 1e-5


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("K", [64, 1024])
def test_dense_mm_of_bf16_activations(M, K, isa):
    # a bf16 model's activations (bf16 values, widened to fp32 by the caller) against bf16 weights take AVX512_BF16's
    # dot product where the CPU has it (gemv_bf16.cpp): within fp32 rounding of float64 all the same. It flushes
    # denormals, which shows which kernel ran: a denormal activation against weights of 1 gives 0 there only.
    g = torch.Generator().manual_seed(M * 10 + K)
    x, w = torch.randn(M, K, generator=g).bfloat16().float(), torch.randn(70, K, generator=g).bfloat16()
    assert rel_err(kernels.dense_mm(x, w), x.double() @ w.double().T) < 1e-5
    tiny = torch.zeros(M, K)
    tiny[:, 0] = torch.tensor(1e-39).bfloat16().float()  # a bf16 denormal
    y = kernels.dense_mm(tiny, torch.ones(3, K, dtype=torch.bfloat16))
    dot = isa == "avx512_vnni" and "avx512_bf16" in kernels.cpu_features()
    assert bool((y == 0).all()) == dot and (dot or torch.equal(y, tiny[:, :1].expand(M, 3)))
    # bf16 MoE experts (expert_mm: the M rows to expert 1 of 2) take the same kernel
    counts = torch.tensor([0, M])
    ye = torch.ops.glm4.expert_mm(x, counts, torch.stack([w.flip(0), w]), None, None, 0, 0, 0)
    assert rel_err(ye, x.double() @ w.double().T) < 1e-5
    ye = torch.ops.glm4.expert_mm(tiny, counts, torch.ones(2, 3, K, dtype=torch.bfloat16), None, None, 0, 0, 0)
    assert bool((ye == 0).all()) == dot


@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, 192), (6, 64), (6, 128), (6, 384), (6, 896),
                                        (8, 8), (8, 16), (8, 32), (8, 64), (8, 96), (8, 192)])  # kernels split by group: ops.cpp
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_mins", [False, True])
@pytest.mark.parametrize("M", [1, 3, 4, 7])
@pytest.mark.parametrize("K", [192, 384])  # 4-bit on AVX-512: activations in column order, or perm128 (K = 128k)
def test_quant_mm_matches_dequantized_float64(bits, group, scale_dtype, with_mins, M, K, isa):
    if bits == 6:  # AVX-512: g128 in the perm128 order, g64 / g192 / g384 in column order, g896 (blocks of 224)
        K = 896 if group == 896 else K  # the AVX2 kernel
    if bits < 8:  # 4- / 6-bit g128 on AVX-512 with K = 384: the perm128 kernels (one token at int16 precision: bytes)
        group = group if K % group == 0 else K
    g = torch.Generator().manual_seed(bits * 100 + group + M)
    N = 70
    q = torch.randint(0, 1 << min(bits, 8), (N, K), generator=g)
    scales = torch.rand(N, K // group, generator=g).to(scale_dtype)
    mins = torch.randn(N, K // group, generator=g).to(scale_dtype) if with_mins else None
    lin = QuantLinear.from_codes(q, scales, mins, bits=bits, group_size=group, zero_point=3)
    w = (q.double() - 3).view(N, -1, group) * scales.double()[..., None]
    if with_mins:
        w = w + mins.double()[..., None]
    assert torch.equal(lin.dequantize(torch.float64), w.view(N, K))
    x = torch.randn(M, K, generator=g)
    ref = x.double() @ w.view(N, K).T
    with kernel_activations("exact"):
        assert torch.ops.glm4.activations() == "exact"
        assert rel_err(kernels.quant_mm(x, lin), ref) < 1e-5
        if bits < 8:  # both 4- / 6-bit kernels: two int16 terms (exact) and fp32 activations
            fp32_act = torch.ops.glm4.quant_mm(x, lin.qweight, lin.scales, lin.mins, bits, group, 3, False)
            assert rel_err(fp32_act, ref) < 1e-5
    with kernel_activations("int16"):
        assert torch.ops.glm4.activations() == "int16"
        # which kernels take them (ops.cpp): AVX2's 4- / 6-bit ones and its 8-bit ones in activation blocks of 32k
        # columns (groups of 32k); AVX-512's for one token, 8-bit codes only in
        # activation blocks of 64k columns (the largest multiple of 32 <= 256 dividing the group) or in groups of
        # 16 / 32 (the lanes8 kernel, K a multiple of 64); the rest: fp32 FMA
        block = next((b for b in range(256, 31, -32) if group % b == 0), 0)
        lanes8 = bits == 8 and group in (16, 32) and K % 64 == 0
        int16 = (bits < 8 or block > 0) if isa == "avx2" else M == 1 and (bits < 8 or block % 64 == 0 or lanes8)
        y = kernels.quant_mm(x, lin)
    if not int16:
        assert rel_err(y, ref) < 1e-5
        return
    # each activation within half a step of 1 / 32639 of its block's largest, so within amax(row) / 65278: y[m, n] is
    # off by at most sum_k |w[n, k]| * that (plus fp32 rounding); the kernel is an int16 one (not exact) in fact
    step = x.abs().amax(dim=1, keepdim=True).double() / (2 * 32639)
    bound = step @ w.view(N, K).abs().sum(dim=1)[None]
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-6 * ref.abs().max()).all()
    assert rel_err(y, ref) > 1e-7


@needs_kernels
@pytest.mark.parametrize("bits,group,K", [(4, 32, 128), (4, 32, 96), (4, 64, 128), (4, 128, 256), (6, 64, 128),
                                          (6, 896, 896), (8, 8, 64), (8, 16, 64), (8, 16, 48), (8, 32, 128),
                                          (8, 96, 192), (8, 128, 256)])
@pytest.mark.parametrize("mode,against", [("int16", "exact"), ("int8", "int16"), ("auto", "int16")])
def test_quant_isa_names_the_kernel_that_runs(bits, group, K, mode, against, isa):
    # describe() says which kernels take int16 (int8) activations for one token (kernels.quant_isa); they are exactly
    # the ones whose result in that mode moves off the exact (int16) one: ops.cpp's dispatch, not a copy of it, decides
    g = torch.Generator().manual_seed(K + group)
    lin = QuantLinear.from_codes(torch.randint(0, 1 << bits, (32, K), generator=g), torch.rand(32, K // group, generator=g),
                                 bits=bits, group_size=group, zero_point=1)
    x = torch.randn(1, K, generator=g)
    with kernel_activations(against):
        before = kernels.quant_mm(x, lin)
    with kernel_activations(mode):
        label = kernels.quant_isa(bits, group, K)
        moved = not torch.equal(kernels.quant_mm(x, lin), before)
    assert label.startswith("AVX2") or isa == "avx512_vnni"
    assert (f"{'int8' if mode == 'auto' else mode} activations" in label) == moved, label
    if mode == "auto":  # int8 for AVX2's 4-bit codes only
        assert moved == (bits == 4 and isa == "avx2")


@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (6, 64), (6, 384), (8, 8), (8, 16), (8, 96)])
@pytest.mark.parametrize("with_mins", [False, True])
@pytest.mark.parametrize("r0,rows", [(0, 70), (16, 37), (69, 1)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_rows_equals_dequantize_bit_for_bit(bits, group, with_mins, r0, rows, out_dtype, isa):
    """The large-M path widens row chunks with glm4's op into one buffer: the same fp32 values as dequantize(),
    and for bf16 activations those values rounded as .to(bfloat16) rounds them."""
    g = torch.Generator().manual_seed(bits * 10 + group + r0)
    N, K = 70, 384
    q = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = torch.rand(N, K // group, generator=g).half()
    mins = torch.randn(N, K // group, generator=g).half() if with_mins else None
    lin = QuantLinear.from_codes(q, scales, mins, bits=bits, group_size=group, zero_point=1 << (bits - 1))
    out = torch.full((rows, K), float("nan"), dtype=out_dtype)
    torch.ops.glm4.dequantize_rows(lin.qweight, lin.scales, lin.mins, bits, group, lin.zero_point, r0, out)
    assert torch.equal(out, lin.dequantize(torch.float32, slice(r0, r0 + rows)).to(out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_matches_float64(dtype):
    """The large-M GEMM (oneDNN on AVX-512 CPUs, else torch's) on the plain weight."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(40, 96, generator=g).to(dtype), torch.randn(72, 96, generator=g).to(dtype)
    y = kernels.gemm(x, w)
    assert y.dtype == dtype and y.shape == (40, 72)
    assert rel_err(y, x.double() @ w.double().T) < (1e-5 if dtype == torch.float32 else 1e-2)


@needs_kernels
@pytest.mark.parametrize("wtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 16, 8), (7, 33, 70), (13, 50, 1000), (40, 130, 72), (100, 37, 2049)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_gemm_matches_float64(wtype, M, N, K, with_bias):
    """glm4's large-M GEMM (AVX2; it runs on any CPU with the kernels): ragged rows (M not a multiple of 6), columns
    (N not of 16), K with a tail past the last 8 and K over several blocks (1000, 2049)."""
    g = torch.Generator().manual_seed(M * 7 + N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).to(wtype)
    b = torch.randn(N, generator=g) if with_bias else None
    y = kernels.ops.dense_gemm(x, w, b)
    ref = x.double() @ w.double().T + (b.double() if with_bias else 0)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel_err(y, ref) < 1e-5


@needs_kernels
def test_dense_gemm_rows_and_columns_do_not_depend_on_the_rest():
    """Each output is summed in one order whatever surrounds it: the ragged edges (through a tile) equal the same
    rows / columns computed as full tiles, the thread count changes nothing, and the bias is added after the sum
    (as y + bias would)."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(12, 900, generator=g), torch.randn(48, 900, generator=g).bfloat16(), torch.randn(48, generator=g)
    full = kernels.ops.dense_gemm(x, w, None)
    assert torch.equal(kernels.ops.dense_gemm(x[:9], w, None), full[:9])
    assert torch.equal(kernels.ops.dense_gemm(x, w[:20], None), full[:, :20])
    assert torch.equal(kernels.ops.dense_gemm(x, w, b), full + b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.ops.dense_gemm(x, w, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full)


@needs_kernels
def test_dense_gemm_rejects_what_it_cannot_run():
    x = torch.randn(8, 64)
    with pytest.raises(RuntimeError, match="w must be float32, bfloat16 or float16"):
        kernels.ops.dense_gemm(x, torch.zeros(16, 64, dtype=torch.int8), None)
    with pytest.raises(RuntimeError, match=r"w must be \[N, K\]"):
        kernels.ops.dense_gemm(x, torch.zeros(16), None)
    with pytest.raises(RuntimeError, match=r"bias must be float32 \[N\]"):
        kernels.ops.dense_gemm(x, torch.zeros(16, 64), torch.zeros(8))
    with pytest.raises(RuntimeError, match="x must be float32"):
        kernels.ops.dense_gemm(x.double(), torch.zeros(16, 64), None)
    with pytest.raises(RuntimeError, match="x has 64 columns, the weight 128"):
        kernels.ops.dense_gemm(x, torch.zeros(16, 128), None)
    with pytest.raises(RuntimeError, match="shapes of q / scales do not match K"):
        kernels.ops.quant_dense_gemm(x, torch.zeros(16, 128, dtype=torch.int8), torch.ones(16, 1), None, 8, 128, 0, None)
    with pytest.raises(RuntimeError, match="ggml type 12"):
        kernels.ops.kquant_dense_gemm(torch.randn(8, 256), torch.zeros(16, 144, dtype=torch.uint8), 8, None)


@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (6, 64), (8, 8), (8, 96)])
@pytest.mark.parametrize("with_mins", [False, True])
@pytest.mark.parametrize("M,N", [(5, 70), (40, 300)])  # N: rows dequantized 128 at a time, the last ragged
def test_quant_dense_gemm_equals_dense_gemm_on_the_dequantized_weight(bits, group, with_mins, M, N, monkeypatch):
    """The codes dequantized into glm4's GEMM a few rows at a time give the GEMM of dequantize() bit for bit, and
    a QuantLinear's large M (glm4's GEMM where kernels.own_gemm) runs it with its bias."""
    g = torch.Generator().manual_seed(bits * 10 + group + N)
    K = 384
    q = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = torch.rand(N, K // group, generator=g).half()
    mins = torch.randn(N, K // group, generator=g).half() if with_mins else None
    lin = QuantLinear.from_codes(q, scales, mins, bits=bits, group_size=group, zero_point=1 << (bits - 1))
    lin.bias = torch.randn(N, generator=g)
    x = torch.randn(M, K, generator=g)
    want = kernels.ops.dense_gemm(x, lin.dequantize(torch.float32), lin.bias)
    got = kernels.ops.quant_dense_gemm(x, lin.qweight, lin.scales, lin.mins, bits, group, lin.zero_point, lin.bias)
    assert torch.equal(got, want)
    monkeypatch.setattr(kernels, "own_gemm", lambda: True)
    lin.gemm_dtype = torch.float32
    if M > kernels.max_m(lin):
        assert torch.equal(lin(x), want)
        lin.bias = lin.bias.bfloat16()  # a bf16 checkpoint's bias: widened for the GEMM, as y + bias.float() did
        assert torch.equal(lin(x), kernels.ops.dense_gemm(x, lin.dequantize(torch.float32), lin.bias.float()))


@needs_kernels
@pytest.mark.parametrize("ggml_type", [12, 13, 14])
def test_kquant_dense_gemm_equals_dense_gemm_on_the_dequantized_weight(ggml_type, monkeypatch):
    from glm4.quant import KQuantLinear

    N, K, M = 200, 512, 40
    lin = KQuantLinear(K, N, ggml_type, bias=True)
    lin.blocks = _kquant_blocks(ggml_type, N, K, seed=ggml_type)
    lin.bias = torch.randn(N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(ggml_type))
    want = kernels.ops.dense_gemm(x, lin.dequantize(), lin.bias)
    assert torch.equal(kernels.ops.kquant_dense_gemm(x, lin.blocks, ggml_type, lin.bias), want)
    monkeypatch.setattr(kernels, "own_gemm", lambda: True)
    with torch.no_grad():
        assert torch.equal(lin(x), want)


def test_gemm_kernel_names_glm4s_where_it_runs(monkeypatch):
    """On AVX2-only AMD CPUs fp32 large-M linears run glm4's GEMM (kernels.own_gemm), and say so."""
    mine = "avx512f" not in kernels.cpu_features() and kernels.cpu_vendor() == "AuthenticAMD"
    assert kernels.own_gemm() == (mine and kernels.has_streaming_kernels())
    assert (kernels.gemm_kernel(torch.float32) == "glm4 AVX2 GEMM") == kernels.own_gemm()
    if kernels.has_streaming_kernels():
        monkeypatch.setattr(kernels, "own_gemm", lambda: True)
        x, w = torch.randn(30, 64), torch.randn(20, 64).bfloat16()
        assert torch.equal(kernels.gemm(x, w), kernels.ops.dense_gemm(x, w, None))


@pytest.mark.parametrize("M", [100, 511, 512, 700])
def test_gemm_takes_torchs_from_the_m_this_cpu_runs_it_faster(M, monkeypatch):
    """Where the large-M GEMM is oneDNN's (without glm4's own: kernels.own_gemm), an AVX2-only AMD CPU (Zen 3) takes
    torch's (MKL) from M = 512 in fp32: the output is one library's or the other's to the bit, as the rule says."""
    monkeypatch.setattr(kernels, "own_gemm", lambda: False)
    if not kernels._onednn_gemm(torch.float32):
        pytest.skip("torch's GEMM at every M on this CPU")
    g = torch.Generator().manual_seed(M)
    x, w = torch.randn(M, 1024, generator=g), torch.randn(256, 1024, generator=g)
    by_torch = torch.nn.functional.linear(x, w)
    padded = torch.constant_pad_nd(x, (0, 0, 0, kernels.gemm_rows(M) - M))  # the row counts gemm runs oneDNN on
    by_onednn = torch.ops.mkldnn._linear_pointwise(padded, w, None, "none", [], "")[:M]
    if torch.equal(by_torch, by_onednn):
        pytest.skip("the two libraries agree to the bit on this input")
    from_m = kernels._torch_gemm_from(torch.float32)
    assert from_m == (512 if "avx512f" not in kernels.cpu_features() and kernels.cpu_vendor() == "AuthenticAMD" else 0)
    assert torch.equal(kernels.gemm(x, w), by_torch if 0 < from_m <= M else by_onednn)
    assert ("torch's from M=512" in kernels.gemm_kernel(torch.float32)) == (from_m == 512)


@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 32), (6, 64), (8, 96)])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunked", [False, True])
def test_quant_linear_large_m_equals_its_dequantized_weight(bits, group, act, chunked, monkeypatch):
    """Above max_m the weight is widened into a GEMM, whole or (chunked: 64 rows, the last 44) a chunk at a time;
    bf16 activations stay bf16 where the CPU computes in bf16 (the chunk rounded to bf16), else the GEMM is fp32."""
    if chunked:
        monkeypatch.setattr(kernels, "_GEMM_WHOLE", 0)
        monkeypatch.setattr(kernels, "_GEMM_CHUNK", 64 * 384)
    g = torch.Generator().manual_seed(bits + group)
    N, K, M = 300, 384, kernels.max_m(None) + 9
    q = torch.randint(0, 1 << bits, (N, K), generator=g)
    lin = QuantLinear.from_codes(q, torch.rand(N, K // group, generator=g).half(), None, bits=bits, group_size=group,
                                 zero_point=1 << (bits - 1))
    x = torch.randn(M, K, generator=g).to(act)
    y = lin(x)
    assert y.dtype == act
    w = lin.dequantize(torch.float32)
    if act == torch.bfloat16 and kernels.native_bf16():
        w = w.bfloat16()
    assert rel_err(y, x.double() @ w.double().T) < (1e-5 if act == torch.float32 else 1e-2)


def test_int4_packing_is_the_q4_0_nibble_order():
    q = torch.arange(64).remainder(16).reshape(1, 64)
    packed = pack_int4(q)
    assert packed.shape == (1, 32)
    assert packed[0, 0].item() == (q[0, 0] | q[0, 16] << 4).item()  # byte j: column j low, column j+16 high
    assert packed[0, 16].item() == (q[0, 32] | q[0, 48] << 4).item()
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))


def test_int6_packing_keeps_the_int4_nibbles_and_one_word_of_pairs_per_block():
    q = torch.randint(0, 64, (3, 256), generator=torch.Generator().manual_seed(6))
    packed = pack_int6(q)
    assert packed.shape == (3, 192) and packed.dtype == torch.uint8
    units = packed.reshape(3, 4, 48)  # 48 bytes per 64 columns
    assert torch.equal(units[:, :, :32].reshape(3, 128), pack_int4(q & 15))  # the nibbles: the q4_0 order
    j, u = 1, 5  # block j's byte u: the high pairs of columns 32 j + u, + 8, + 16, + 24 of its 64 columns
    byte = units[0, 2, 32 + 8 * j + u].item()
    assert [(byte >> s) & 3 for s in (0, 2, 4, 6)] == [q[0, 128 + 32 * j + u + d].item() >> 4 for d in (0, 8, 16, 24)]
    assert torch.equal(unpack_int6(packed), q.to(torch.uint8))
    with pytest.raises(QuantizationError, match="multiple of 64"):
        pack_int6(q[:, :96])


@pytest.mark.usefixtures("exact_activations")  # against the dequantized weight at fp32 tolerance
@needs_kernels
@pytest.mark.parametrize("group", [64, 128, 256])
def test_int6_quantizer_is_symmetric_and_no_worse_than_round_to_nearest(group):
    torch.manual_seed(6)
    base = nn.Linear(512, 40, bias=True)
    base.weight.data[3, :group] = 0  # an all-zero group: scale 0, code 32 (scale 1 would leave 32 * sum(x) to cancel)
    model = nn.Sequential(base)
    quantize(model, "int6", group_size=group, head=None)
    m = model[0]
    assert isinstance(m, QuantLinear) and (m.bits, m.group_size, m.zero_point, m.mins) == (6, group, 32, None)
    assert m.scales.dtype == torch.float16 and m.qweight.shape == (40, 384)
    codes = unpack_int6(m.qweight)
    assert m.scales[3, 0] == 0 and (codes[3, :group] == 32).all()
    w = base.weight.detach().view(40, -1, group)
    err = (m.dequantize().view(40, -1, group) - w).square().sum(-1)
    s = (w.abs().amax(-1) / 31).half().float()  # round to nearest at amax / 31, the first of the scales tried
    rtn = (torch.round(w / torch.where(s > 0, s, 1)[..., None]).clamp(-31, 31) * s[..., None] - w).square().sum(-1)
    assert (err <= rtn + 1e-12).all() and err.sum() < rtn.sum()
    x = torch.randn(2, 512)
    assert rel_err(m(x), x.double() @ m.dequantize(torch.float64).T + base.bias.detach().double()) < 1e-5


@needs_kernels
@pytest.mark.parametrize("scheme", ["int4", "int6"])
def test_an_all_zero_row_gives_exactly_zero(scheme, isa):
    """An all-zero group gets scale 0 (its codes the zero point): the zero-point term of the kernels' sums is then 0,
    not a large product cancelling the codes' sum to ~1e-6."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(256, 24, bias=False))
    model[0].weight.data[5] = 0
    quantize(model, scheme, group_size=128, head=None)
    m = model[0]
    assert (m.scales[5] == 0).all()
    for M in (1, 3, 40):
        y = m(torch.randn(M, 256) * 10)
        assert (y[:, 5] == 0).all() and (y[:, 4] != 0).all()


@pytest.mark.parametrize("M", [1, 5, 40])  # 40: above the streaming kernel's M, the GEMM path
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
# torch's GEMM on the weight widened whole or 16 rows at a time, or glm4's (widening as it packs, the bias in it)
@pytest.mark.parametrize("gemm", ["torch", "torch-chunks", "glm4"])
def test_float_linear_equals_its_stored_weight(M, storage, gemm, monkeypatch):
    if gemm == "glm4" and not kernels.has_streaming_kernels():
        pytest.skip("glm4's GEMM needs the kernels")
    monkeypatch.setattr(kernels, "own_gemm", lambda: gemm == "glm4")
    if gemm == "torch-chunks":
        monkeypatch.setattr(kernels, "_GEMM_WHOLE", 0)
        monkeypatch.setattr(kernels, "_GEMM_CHUNK", 16 * 96)
    torch.manual_seed(0)
    base = nn.Linear(96, 80)
    lin = FloatLinear.from_base(base, storage)
    assert lin.weight.dtype == storage
    x = torch.randn(2, M, 96)
    ref = x.double() @ base.weight.detach().to(storage).double().T + base.bias.detach().double()
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (2, M, 80)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.usefixtures("exact_activations")  # against the dequantized weight at fp32 tolerance
@pytest.mark.parametrize("scheme,group", [("int8", 128), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("M", [1, 40])
def test_quantize_swaps_in_quant_linear_when_kernels_exist(scheme, group, M):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32, bias=False))
    fp32 = [m.weight.detach().clone() for m in model]
    quantize(model, scheme, group_size=group, head=None)
    if not kernels.has_streaming_kernels():
        assert not any(isinstance(m, QuantLinear) for m in model)
        return
    assert all(isinstance(m, QuantLinear) for m in model)
    x = torch.randn(M, 128)
    for m in model:  # layer by layer: each against its own dequantized weight
        ref = x.double() @ m.dequantize(torch.float64).T + (m.bias.double() if m.bias is not None else 0)
        y = m(x)
        assert rel_err(y, ref) < 1e-5
        x = y
    for m, w in zip(model, fp32):  # round to nearest: half a step per weight at most
        step = (m.scales.float().repeat_interleave(m.group_size, 1))
        assert ((m.dequantize() - w).abs() <= step * 0.5 + 1e-6).all()


_PEAK_SCRIPT = """
import resource, sys, torch
torch.set_num_threads(1)
from torch import nn
from glm4.quant import quantize
model = nn.Sequential(nn.Linear(1024, 65536, bias=False))  # 256 MiB of fp32, like a small LM head
model[0].weight.data.normal_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
quantize(model, sys.argv[1], group_size=128, head=None)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / (1024 * 65536))
"""


@needs_kernels
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_a_big_linear_adds_less_than_its_fp32_size(scheme):
    """Quantizing works a row chunk at a time and allocates the codes once: the peak above the fp32 weight stays
    under its size (a whole-matrix pass, with an int32 copy of the codes, adds 2-4x)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big blocks mmapped and unmapped when freed: RSS is
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, scheme],  # what is live, not what malloc kept
                         capture_output=True, text=True, check=True, env=env)
    extra_per_weight = float(out.stdout.strip().splitlines()[-1])  # bytes of peak RSS added per weight
    assert extra_per_weight < 4.0, extra_per_weight


def test_cast_for_compute_keeps_storage_and_widens_the_rest():
    torch.manual_seed(2)
    emb = nn.Embedding(10, 32)
    model = nn.Sequential(emb, nn.LayerNorm(32), nn.Linear(32, 8)).to(torch.bfloat16)
    quantize(model, "float")
    cast_for_compute(model, torch.float32)
    assert model[0].weight.dtype == torch.bfloat16 and model[2].weight.dtype == torch.bfloat16  # storage kept
    assert model[1].weight.dtype == torch.float32
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.float32
    ref = nn.Sequential(nn.Embedding(10, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    ref[0].weight.data, ref[2].weight.data = emb.weight.float(), model[2].weight.float()
    ref[1].weight.data, ref[1].bias.data, ref[2].bias.data = model[1].weight, model[1].bias, model[2].bias.float()
    assert rel_err(out, ref(torch.tensor([[1, 2, 3]]))) < 1e-5
    kinds = {kind for kind, _, _ in describe_linears(model)}
    assert kinds == {"2"}


@pytest.mark.parametrize("group", [16, 32])
def test_stream_experts_of_gguf_8bit_groups_take_int16_activations_for_one_token(group, isa):
    # q8_0 / q6_K-as-codes experts (8-bit codes in groups of 32 / 16): one decoded token (one token per busy
    # expert) takes the lanes8 kernel on AVX-512 at int16 precision; the result stays within that precision of the
    # float64 dispatch, and exact activations give fp32's
    from glm4.layers.moe import expert_glu
    from glm4.quant.experts import ExpertPack, StreamExperts

    g = torch.Generator().manual_seed(group)
    hidden, inter, E = 128, 64, 4

    def pack(n, k):
        return ExpertPack.stack([QuantLinear.from_codes(torch.randint(-128, 128, (n, k), generator=g),
                                                        torch.rand(n, k // group, generator=g) * 1e-2, bits=8,
                                                        group_size=group, zero_point=3) for _ in range(E)])

    s = StreamExperts(pack(2 * inter, hidden), pack(hidden, inter))
    gu = torch.stack([s.gate_up.weight_of(e, torch.float64) for e in range(E)])
    dn = torch.stack([s.down.weight_of(e, torch.float64) for e in range(E)])
    x, idx, w = torch.randn(1, hidden, generator=g), torch.tensor([[0, 2]]), torch.tensor([[0.7, 0.3]])
    ref = expert_glu(x.double(), idx, w.double(), gu, dn, impl="segments")
    with kernel_activations("exact"):
        exact = s(x, idx, w)
    assert rel_err(exact, ref) < 1e-5
    with kernel_activations("int16"):
        y = s(x, idx, w)
    assert rel_err(y, ref) < 1e-3  # two linears at int16 activations (~1e-4 each)
    # AVX2's 8-bit kernels take int16 activations in blocks of 32k columns, fp32 ones in groups of 16
    assert (not torch.equal(y, exact)) == (isa == "avx512_vnni" or group % 32 == 0)


@pytest.mark.usefixtures("exact_activations")  # against the dequantized weight at fp32 tolerance
@pytest.mark.parametrize("scheme", [None, "int8", "int6", "int4"])
@pytest.mark.parametrize("tokens", [3, 200])  # 200: more tokens per expert than the streaming kernel takes
@pytest.mark.parametrize("own_gemm", [False, True])  # the large-M GEMM: torch's, or glm4's (any CPU with the kernels)
def test_stream_experts_equal_stacked_experts_on_their_weights(scheme, tokens, own_gemm, isa, monkeypatch):
    from glm4.layers.moe import StackedExperts, expert_glu
    from glm4.quant.experts import StreamExperts

    monkeypatch.setattr(kernels, "own_gemm", lambda: own_gemm)

    torch.manual_seed(3)
    hidden, inter, group = (128, 128, 128) if scheme == "int6" else (64, 96, 32)  # int6: groups of 64k columns
    stacked = StackedExperts(8, hidden, inter).to(torch.bfloat16 if scheme is None else torch.float32)
    s = StreamExperts.from_stacked(stacked, scheme, group_size=group)
    if scheme is None:
        assert s.gate_up.weight.data_ptr() == stacked.gate_up_proj.data_ptr()  # streamed as stored, no copy
    else:
        assert s.gate_up.bits == int(scheme[3:]) and s.down.bits == int(scheme[3:]) and s.gate_up.weight is None
    gu = torch.stack([s.gate_up.weight_of(e, torch.float64) for e in range(8)])
    dn = torch.stack([s.down.weight_of(e, torch.float64) for e in range(8)])
    x, idx, w = torch.randn(tokens, hidden), torch.randint(0, 8, (tokens, 2)), torch.rand(tokens, 2)
    ref = expert_glu(x.double(), idx, w.double(), gu, dn, impl="segments")
    assert rel_err(s(x, idx, w), ref) < 1e-5
    back = s.to_stacked()
    assert torch.equal(back.gate_up_proj.double(), gu) and torch.equal(back.down_proj.double(), dn)


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_expert_glu_op_is_the_python_dispatch_in_one_call(scheme, isa):
    """Decode (a few tokens) runs the whole MoE dispatch as torch.ops.glm4.expert_glu: the same sums as
    layers.moe.dispatch_experts over the same packs (up to the exp of SiLU), and an expert index out of range is
    an error, not a read outside the weights."""
    from glm4.layers.moe import StackedExperts, dispatch_experts
    from glm4.quant.experts import StreamExperts

    if not kernels.has_streaming_kernels():
        pytest.skip("glm4's CPU kernels are not built here")
    torch.manual_seed(4)
    stacked = StackedExperts(8, 64, 96).to(torch.bfloat16 if scheme is None else torch.float32)
    s = StreamExperts.from_stacked(stacked, scheme, group_size=32)
    for tokens in (1, 5, kernels.dense_max_m()):
        x, w = torch.randn(tokens, 64), torch.rand(tokens, 3)
        idx = torch.stack([torch.randperm(8)[:3] for _ in range(tokens)])
        ref = dispatch_experts(x, idx, w, s._mm, 8, 64)
        with torch.profiler.profile() as prof:
            y = s(x, idx, w)
        assert [e.key for e in prof.key_averages()].count("glm4::expert_glu") == 1
        assert rel_err(y, ref) < 1e-6
    gu, dn = s.gate_up, s.down
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.glm4.expert_glu(x, idx + 8, w, gu.qweight if gu.bits else gu.weight, gu.scales, gu.mins, gu.bits,
                                  gu.group_size, gu.zero_point, dn.qweight if dn.bits else dn.weight, dn.scales,
                                  dn.mins, dn.bits, dn.group_size, dn.zero_point)


@pytest.mark.parametrize("scheme", [None, "int8", "int4", "q4_K"])
def test_expert_glu_prepares_one_tokens_row_once(scheme, isa):
    """One token over distinct experts (a decode step) hands every busy expert the same prepared row (no copy a
    pair): its output equals, bit for bit, that token's in a call of two tokens over disjoint experts (a row a
    pair, each expert one row as well); and the kernels' row blocks (a whole expert a call here) leave every row's
    sums as they were."""
    from glm4.layers.moe import StackedExperts
    from glm4.quant.experts import ExpertPack, StreamExperts

    if not kernels.has_streaming_kernels():
        pytest.skip("glm4's CPU kernels are not built here")
    torch.manual_seed(6)
    if scheme == "q4_K":
        E, H, inter = 8, 256, 256
        gu = ExpertPack(blocks=torch.stack([_kquant_blocks(12, 2 * inter, H, seed=e) for e in range(E)]), ggml_type=12)
        dn = ExpertPack(blocks=torch.stack([_kquant_blocks(12, H, inter, seed=20 + e) for e in range(E)]), ggml_type=12)
        s = StreamExperts(gu, dn)
    else:
        H = 64
        stacked = StackedExperts(8, H, 96).to(torch.bfloat16 if scheme is None else torch.float32)
        s = StreamExperts.from_stacked(stacked, scheme, group_size=32)
    x, w = torch.randn(2, H), torch.rand(2, 4)
    idx = torch.tensor([[5, 0, 3, 6], [1, 7, 2, 4]])
    with torch.no_grad():
        both, one = s(x, idx, w), s(x[:1], idx[:1], w[:1])
    assert torch.equal(one[0], both[0])


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_prefill_combine_equals_the_python_dispatch_bit_for_bit(scheme, dtype):
    """Many tokens: StreamExperts puts the expert-sorted rows back, weighted and summed, with one op
    (torch.ops.glm4.moe_combine): the same values as layers.moe.dispatch_experts over the same packs, to the bit."""
    from glm4.layers.moe import StackedExperts, dispatch_experts
    from glm4.quant.experts import StreamExperts

    if not kernels.has_streaming_kernels():
        pytest.skip("glm4's CPU kernels are not built here")
    torch.manual_seed(5)
    stacked = StackedExperts(8, 64, 96).to(torch.bfloat16 if scheme is None else torch.float32)
    s = StreamExperts.from_stacked(stacked, scheme, group_size=32)
    x, w = torch.randn(300, 64).to(dtype), torch.rand(300, 3)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(300)])
    with torch.profiler.profile() as prof:
        y = s(x, idx, w)
    assert [e.key for e in prof.key_averages()].count("glm4::moe_combine") == 1
    assert y.dtype == dtype and torch.equal(y, dispatch_experts(x, idx, w, s._mm, 8, 64))
    with pytest.raises(RuntimeError, match="permutation"):
        torch.ops.glm4.moe_combine(torch.zeros(4, 64), torch.tensor([0, 1, 1, 2]), torch.ones(2, 2))


def test_quantized_moe_engine_equals_reference_on_the_same_model():
    """quantization="int4" also quantizes the stacked experts; the engine's greedy tokens equal the reference
    generator run on that same quantized model. The prefill GEMM stays fp32 (quant_gemm): "auto" takes bf16 for 4-bit
    weights on CPUs with native bf16, and the engine's batched prefill crosses into that GEMM where the reference's
    one-prompt-at-a-time prefill does not (logprobs ~4e-3 apart: enough to flip a near tie on a random model). For
    the same reason the streaming kernels take int16 activations here, not the default's int8 for 4-bit codes (the
    9-token prompt alone streams, batched it takes the fp32 GEMM)."""
    from test_engine import GREEDY, make_prompts, reference, tiny_model

    from glm4.engine.llm import LLM
    from glm4.quant.experts import StreamExperts

    with kernel_activations("int16"):
        llm = LLM.from_model(tiny_model("glm4_moe", seed=2), quantization="int4", quant_group_size=32,
                             quant_gemm="float32")
        experts = [m for m in llm.model.modules() if isinstance(m, StreamExperts)]
        assert experts if kernels.has_streaming_kernels() else not experts
        prompts = make_prompts([3, 9, 17], seed=4)
        outs = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == reference(llm.model, prompts)


DEFAULT_MODEL = Path(__file__).parent.parent / "glm4" / "assets" / "default"


@needs_kernels
@pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").exists(), reason="default model not built yet")
@pytest.mark.parametrize("scheme", ["int4", "int6"])
def test_int16_activations_move_the_default_model_far_less_than_its_quantized_weights(scheme, isa):
    """The integer kernels at int16 precision (the default) against the exact ones, on the shipped model: each
    log-probability moves by under 1 % of what quantizing the weights moved it, and the KL divergence from the fp32
    model stays within 1 % of the exact kernels' (measured: 1/400 - 1/1000, and equal to three digits). AVX2 takes
    int16 activations for <= 16 tokens a call (the whole text a forward), AVX-512 for one (a forward per token)."""
    from glm4.tokenizer import load_tokenizer
    from glm4.weights import load_model

    tok = load_tokenizer(DEFAULT_MODEL)
    fp32 = load_model(DEFAULT_MODEL, dtype=torch.float32).eval()
    model = quantize(load_model(DEFAULT_MODEL, dtype=torch.float32).eval(), scheme)
    for text in ("The capital of France is Paris, and", "从前有一座山，山里有座庙，庙里", "def add(a, b):\n    return a +"):
        ids = torch.tensor([tok.encode(text)[:16]])
        calls = [ids] if isa == "avx2" else [ids[:, i:i + 1] for i in range(ids.shape[1])]
        run = lambda m, calls=calls: torch.cat([m(c).log_softmax(-1) for c in calls], dim=1)  # noqa: E731
        lp = {}
        with torch.no_grad():
            lp["fp32"] = run(fp32)
            for mode in ("exact", "int16"):
                with kernel_activations(mode):
                    lp[mode] = run(model)
        p = lp["fp32"].exp()
        kl = {mode: (p * (lp["fp32"] - lp[mode])).sum(-1).mean().item() for mode in ("exact", "int16")}
        moved = (lp["int16"] - lp["exact"]).abs().max().item()
        assert 0 < moved < 0.01 * (lp["exact"] - lp["fp32"]).abs().max().item()  # 0: the int16 kernels ran
        assert abs(kl["int16"] - kl["exact"]) < 0.01 * kl["exact"]


def _kquant_blocks(ggml_type: int, rows: int, k: int, seed: int) -> torch.Tensor:
    """Random valid q4_K / q5_K / q6_K blocks (any codes and scale bytes, small fp16 d / dmin) -> uint8 [rows, k / 256 * B]."""
    g = torch.Generator().manual_seed(seed)
    size = {12: 144, 13: 176, 14: 210}[ggml_type]
    raw = torch.randint(0, 256, (rows, k // 256, size), dtype=torch.uint8, generator=g)
    for off, scale in ([(208, 3e-5)] if ggml_type == 14 else [(0, 4e-5), (2, 4e-4)]):
        d = (torch.rand(rows, k // 256, 1, generator=g) + 0.5) * scale / (k / 256) ** 0.5
        raw[..., off:off + 2] = d.half().view(torch.uint8)
    return raw.reshape(rows, -1)


@needs_kernels
@pytest.mark.parametrize("ggml_type", [12, 13, 14], ids=["q4_K", "q5_K", "q6_K"])
@pytest.mark.parametrize("M", [1, 2, 5, 16, 40])
@pytest.mark.parametrize("K", [256, 768])
def test_kquant_mm_matches_dequantized_float64(ggml_type, M, K, isa):
    # GGUF q4_K / q5_K / q6_K run from their blocks (KQuantLinear / torch.ops.glm4.kquant_mm): exact activations within fp32
    # rounding of the float64 product with gguf-py's dequantized weight, int16 ones within their bound; M > 16
    # takes the dequantize + GEMM path (bf16 dequantization rounded from the fp32 weight, as .to(bfloat16))
    gguf_quants = pytest.importorskip("gguf.quants")

    from glm4.quant import KQuantLinear

    N = 70
    lin = KQuantLinear(K, N, ggml_type, bias=True)
    lin.blocks = _kquant_blocks(ggml_type, N, K, seed=K + M)
    lin.bias = torch.randn(N)
    w = torch.from_numpy(gguf_quants.dequantize(lin.blocks.numpy(), ggml_type))
    assert torch.equal(lin.dequantize(), w)
    assert torch.equal(lin.dequantize(torch.bfloat16, slice(3, 50)), w[3:50].to(torch.bfloat16))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    ref = x.double() @ w.double().T + lin.bias.double()
    with kernel_activations("exact"), torch.no_grad():
        assert rel_err(lin(x), ref) < 1e-5
    with kernel_activations("int16"), torch.no_grad():
        y = lin(x)
    if M > kernels.max_m(lin):
        assert rel_err(y, ref) < 1e-5
        return
    step = x.abs().amax(dim=1, keepdim=True).double() / (2 * 32639)
    bound = step @ w.double().abs().sum(dim=1)[None]
    assert ((y.double() - ref).abs() <= bound + 1e-6 * ref.abs().max()).all()
    assert rel_err(y, ref) > 1e-7  # the int16 kernel ran, not an exact one


@needs_kernels
@pytest.mark.parametrize("gu_type,dn_type", [(12, 14), (13, 13), (14, 12)], ids=["q4_K-q6_K", "q5_K", "q6_K-q4_K"])
@pytest.mark.parametrize("tokens", [1, 5, 40])  # 40: more tokens than the one-op dispatch takes (prefill)
def test_stream_experts_of_kquant_blocks(gu_type, dn_type, tokens, isa):
    # GGUF MoE experts of K-quant types run from their blocks: decode through expert_glu (expert_mm's K-quant
    # branch, each busy expert's rows by the kquant_mm kernels with that expert's tokens), prefill a GEMM per busy
    # expert on its dequantized rows (the streaming kernel for an expert with few tokens). Exact activations:
    # within fp32 rounding of the float64 dispatch on gguf-py's weights; int16 ones within their precision.
    from glm4.layers.moe import expert_glu
    from glm4.quant.experts import ExpertPack, StreamExperts

    gguf_quants = pytest.importorskip("gguf.quants")
    E, H, inter = 4, 256, 256
    gu = ExpertPack(blocks=torch.stack([_kquant_blocks(gu_type, 2 * inter, H, seed=e) for e in range(E)]),
                    ggml_type=gu_type)
    dn = ExpertPack(blocks=torch.stack([_kquant_blocks(dn_type, H, inter, seed=10 + e) for e in range(E)]),
                    ggml_type=dn_type)
    s = StreamExperts(gu, dn)
    assert (gu.in_features, gu.out_features, dn.in_features, dn.out_features) == (H, 2 * inter, inter, H)
    w_gu = torch.stack([torch.from_numpy(gguf_quants.dequantize(b.numpy(), gu_type)) for b in gu.blocks]).double()
    w_dn = torch.stack([torch.from_numpy(gguf_quants.dequantize(b.numpy(), dn_type)) for b in dn.blocks]).double()
    assert torch.equal(torch.stack([gu.weight_of(e, torch.float64) for e in range(E)]), w_gu)
    g = torch.Generator().manual_seed(tokens)
    x, w = torch.randn(tokens, H, generator=g), torch.rand(tokens, 2, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    ref = expert_glu(x.double(), idx, w.double(), w_gu, w_dn, impl="segments")
    with kernel_activations("exact"), torch.no_grad():
        assert rel_err(s(x, idx, w), ref) < 1e-5
    with kernel_activations("int16"), torch.no_grad():
        assert rel_err(s(x, idx, w), ref) < 1e-3  # two linears at int16 activations (an expert with <= 16 tokens)
    # expert_mm's K-quant rows are kquant_mm's of each busy expert, to the bit
    xs, counts = torch.randn(5, H, generator=g), torch.tensor([2, 0, 3, 0])
    y = torch.ops.glm4.expert_mm(xs, counts, gu.blocks, None, None, 0, 0, 0, gu_type)
    assert torch.equal(y[:2], torch.ops.glm4.kquant_mm(xs[:2], gu.blocks[0], H, gu_type))
    assert torch.equal(y[2:], torch.ops.glm4.kquant_mm(xs[2:], gu.blocks[2], H, gu_type))
    with pytest.raises(RuntimeError, match="K-quant blocks"):
        torch.ops.glm4.expert_mm(xs, counts, gu.blocks[:, :, :100], None, None, 0, 0, 0, gu_type)


@needs_kernels
@pytest.mark.parametrize("ggml_type", [12, 13, 14], ids=["q4_K", "q5_K", "q6_K"])
def test_kquant_concat_fallback_and_bad_shapes(ggml_type, monkeypatch):
    from glm4.quant import KQuantLinear, QuantizationError

    parts = []
    for n, seed in ((64, 1), (16, 2), (16, 3)):
        m = KQuantLinear(512, n, ggml_type)
        m.blocks = _kquant_blocks(ggml_type, n, 512, seed)
        parts.append(m)
    fused = KQuantLinear.concat(parts)
    x = torch.randn(1, 512)
    with torch.no_grad():
        assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert KQuantLinear.concat([parts[0], KQuantLinear(256, 8, ggml_type)]) is None
    other = next(t for t in (12, 13, 14) if t != ggml_type)
    assert KQuantLinear.concat([parts[0], KQuantLinear(512, 8, other)]) is None
    with torch.no_grad(), kernel_activations("exact"):  # without glm4's kernels: gguf-py's dequantize + F.linear
        y = fused(torch.randn(3, 512, generator=torch.Generator().manual_seed(0)))
        w = fused.dequantize()
        monkeypatch.setattr(kernels, "has_streaming_kernels", lambda: False)
        assert torch.equal(fused.dequantize(), w)
        assert rel_err(fused(torch.randn(3, 512, generator=torch.Generator().manual_seed(0))), y) < 1e-5
    with pytest.raises(QuantizationError, match="multiple of 256"):
        KQuantLinear(320, 8, ggml_type)
    with pytest.raises(QuantizationError, match="not q4_K"):
        KQuantLinear(256, 8, 2)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="multiple of 256"):
        torch.ops.glm4.kquant_mm(torch.randn(1, 320), torch.zeros(8, 210, dtype=torch.uint8), 320, ggml_type)
