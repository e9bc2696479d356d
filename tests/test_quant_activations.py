"""The integer kernels' activation paths. Activations at int8 precision (GLM4_ACTIVATIONS=int8, llama.cpp's): AVX2's
4- and 6-bit and K-quant kernels and AVX-512's q6_K one take one 8-bit integer a column and an fp32 scale per block;
every other kernel (AVX-512's others) takes int16 then. They are checked against a float64 product of the weights with the activations rounded
as the kernel rounds them, so the only error left is fp32 rounding. And AVX2's one-token tiles for groups that come
in eights (their scales and group terms eight groups at a time) in every activation mode."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_activations
from test_kernels import _kquant_blocks, needs_kernels, rel_err

from glm4.quant import QuantLinear, describe_linears, kernel_of, kernels
from glm4.quant.experts import ExpertPack, StreamExperts


def rounded_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [M, K] as the kernels see it at int8 precision, in float64: per block of `block` columns scale = amax / 127
    and v = round-half-even(x * (127 / amax)), both in fp32 as act_int8_avx2 computes them; x = scale * v."""
    xb = x.float().reshape(x.shape[0], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    v = torch.round(xb * inv)
    assert v.abs().max() <= 127
    return ((amax / 127).double() * v.double()).reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, 256), (6, 64), (6, 128), (6, 256)])
@pytest.mark.parametrize("with_mins", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 7, 16])
def test_int8_activations_4_and_6_bit(bits, group, with_mins, scale_dtype, M, isa):
    g = torch.Generator().manual_seed(bits + group + M + with_mins)
    N, K = 70, 512
    q = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = torch.rand(N, K // group, generator=g).to(scale_dtype)
    mins = torch.randn(N, K // group, generator=g).to(scale_dtype) if with_mins else None
    lin = QuantLinear.from_codes(q, scales, mins, bits=bits, group_size=group, zero_point=1 << (bits - 1))
    w = lin.dequantize(torch.float64)
    x = torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g) * 4  # uneven magnitudes across blocks
    with kernel_activations("int8"):
        assert torch.ops.glm4.activations() == "int8"
        y = kernels.quant_mm(x, lin)
        label = kernels.quant_isa(bits, group, K)
        # the MoE dispatch of quantized experts prepares the same activations: an expert's rows equal quant_mm's
        ye = torch.ops.glm4.expert_mm(x, torch.tensor([0, M]), torch.stack([lin.qweight.flip(0), lin.qweight]),
                                      torch.stack([lin.scales, lin.scales]),
                                      None if mins is None else torch.stack([lin.mins, lin.mins]), bits, group,
                                      lin.zero_point)
    assert torch.equal(ye, y)
    with kernel_activations("int16"):
        y16 = kernels.quant_mm(x, lin)
    if isa != "avx2":  # AVX-512 keeps its int16 kernels in int8 mode
        assert torch.equal(y, y16) and "int8" not in label
        return
    assert label == "AVX2 (int8 activations)"
    step = 64 if bits == 6 else 32  # the 6-bit kernel's blocks are of 64k columns
    block = next(b for b in range(256, step - 1, -step) if group % b == 0)
    ref = rounded_int8(x, block) @ w.T
    assert rel_err(y, ref) < 1e-5  # the integer sums are exact: fp32 rounding only
    assert rel_err(y, x.double() @ w.T) > 1e-4  # 8-bit activations, not the int16 kernel's


@needs_kernels
@pytest.mark.parametrize("ggml_type", [12, 13, 14], ids=["q4_K", "q5_K", "q6_K"])
@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("K", [256, 768])
def test_int8_activations_kquant(ggml_type, M, K, isa):
    gguf_quants = pytest.importorskip("gguf.quants")
    from glm4.quant import KQuantLinear

    N = 70
    lin = KQuantLinear(K, N, ggml_type)
    lin.blocks = _kquant_blocks(ggml_type, N, K, seed=K + M + 1)
    w = torch.from_numpy(gguf_quants.dequantize(lin.blocks.numpy(), ggml_type)).double()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
    with kernel_activations("int8"), torch.no_grad():
        y = lin(x)
        label = kernel_of(lin)
    with kernel_activations("int16"), torch.no_grad():
        y16 = lin(x)
    int8 = isa == "avx2" or ggml_type == 14  # AVX-512's q6_K kernel takes int8 too
    assert ("int8 activations" in label) == int8, label
    # MoE experts of these blocks say the same in describe()
    packs = [ExpertPack(blocks=torch.stack([_kquant_blocks(ggml_type, n, k, seed=e) for e in range(2)]), ggml_type=ggml_type)
             for n, k in ((512, 256), (256, 256))]
    with kernel_activations("int8"):
        (kind, _, desc), = describe_linears(torch.nn.ModuleDict({"experts": StreamExperts(*packs)}))
    assert kind == "experts" and ("int8 activations" in desc) == int8, desc
    if not int8:  # AVX-512's q4_K / q5_K take int16
        assert torch.equal(y, y16)
        return
    assert rel_err(y, rounded_int8(x, 256) @ w.T) < 1e-5  # q4_K / q5_K: the mins too
    assert rel_err(y, x.double() @ w.T) > 1e-4


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int16", "exact"])
@pytest.mark.parametrize("M", [1, 2, 5])
def test_avx512_q6_K_codes_by_gfni_equal_those_by_shifts(M, mode):
    """AVX-512's q6_K tiles (against int8, int16 or exact activations) assemble their codes with GFNI where the CPU
    has it (Zen 4 / 5, Ice Lake on) and by shifts and masks where not (Skylake-X, Cascade Lake): the same results bit
    for bit."""
    if torch.ops.glm4.isa() != "avx512_vnni" or "gfni" not in kernels.cpu_features():
        pytest.skip("needs a CPU with AVX-512 VNNI and GFNI")
    from glm4.quant import KQuantLinear

    K, N = 768, 70
    lin = KQuantLinear(K, N, 14)
    lin.blocks = _kquant_blocks(14, N, K, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
    with kernel_activations(mode), torch.no_grad():
        by_gfni = lin(x)
        assert torch.ops.glm4.set_gfni(False)
        try:
            by_shifts = lin(x)
        finally:
            torch.ops.glm4.set_gfni(True)
    assert torch.equal(by_gfni, by_shifts)


@needs_kernels
@pytest.mark.parametrize("kind", ["int4", "int6", "q4_K", "q5_K", "q6_K"])
def test_auto_activations_are_int8_up_to_5_bits(kind, isa):
    """"auto" (the default): AVX2's kernels of codes of up to 5 bits take int8 activations, the others int16 (q6_K's
    6-bit codes too, on AVX-512 as well) — the results equal those modes' bit for bit, and describe() names what
    runs."""
    from glm4.quant import KQuantLinear

    K, N = 512, 48
    if kind.startswith("q"):
        ggml_type = {"q4_K": 12, "q5_K": 13, "q6_K": 14}[kind]
        lin = KQuantLinear(K, N, ggml_type)
        lin.blocks = _kquant_blocks(ggml_type, N, K, seed=3)
        bits = lin.bits
    else:
        bits = int(kind[3:])
        g = torch.Generator().manual_seed(bits)
        lin = QuantLinear.from_codes(torch.randint(0, 1 << bits, (N, K), generator=g),
                                     torch.rand(N, K // 128, generator=g), bits=bits, group_size=128,
                                     zero_point=1 << (bits - 1))
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1))
    out = {}
    for mode in ("auto", "int8", "int16"):
        with kernel_activations(mode), torch.no_grad():
            out[mode], label = lin(x), kernel_of(lin)
            if mode == "auto":
                auto_label = label
    int8 = bits <= 5 and isa == "avx2"
    assert torch.equal(out["auto"], out["int8" if int8 else "int16"])
    assert ("(int8 activations)" in auto_label) == int8, auto_label


@needs_kernels
def test_int8_activations_are_named_and_refused_elsewhere():
    with kernel_activations("int8"):
        assert kernels.activations() == "int8"
        assert torch.ops.glm4.set_activations("int8") == "int8"
    with pytest.raises(RuntimeError, match="auto, exact, int16 or int8"):
        torch.ops.glm4.set_activations("int4")
    with kernel_activations("auto"):
        assert kernels.activations() == "auto"


@needs_kernels
@pytest.mark.parametrize("head", ["q6_K", "int6"])
def test_a_4_bit_models_6_bit_head_rounds_as_its_body(head, isa):
    """The engine tells each quantized linear its model's coarsest code width (set_activation_bits): under "auto" an
    int4 model's 6-bit head (q6_K blocks, or int6 where they do not fit) takes int8 activations on AVX2 as its body
    does (AVX-512: the q6_K head; its int6 kernel keeps int16) — bit for bit what the int8 mode gives it — and
    describe() says so; an int6 model keeps int16 throughout."""
    from test_engine import tiny_model

    from glm4.engine import LLM
    from glm4.quant import KQuantLinear, set_activation_bits

    hidden = 256 if head == "q6_K" else 192  # q6_K blocks need rows of 256k
    with kernel_activations("auto"):
        llm = LLM.from_model(tiny_model("glm4", hidden_size=hidden), quantization="int4", quant_group_size=64)
        lm_head = llm.model.lm_head
        assert isinstance(lm_head, KQuantLinear) if head == "q6_K" else (lm_head.bits, lm_head.group_size) == (6, 64)
        assert lm_head.activation_bits == 4
        assert all(m.activation_bits == 0 for m in llm.model.modules() if isinstance(m, QuantLinear) and m.bits == 4)
        x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(5)) * 3
        with torch.no_grad():
            y_auto, label = lm_head(x), kernel_of(lm_head)
            with kernel_activations("int8"):
                y8 = lm_head(x)
            lm_head.activation_bits = 0  # its own width: int16
            y_own = lm_head(x)
            with kernel_activations("int16"):
                y16 = lm_head(x)
        int8 = isa == "avx2" or head == "q6_K"  # AVX-512's int6 kernel keeps int16
        assert torch.equal(y_own, y16)
        assert torch.equal(y_auto, y8 if int8 else y16)
        assert torch.equal(y_auto, y16) == (not int8)
        assert ("(int8 activations)" in label) == int8, label
        int6 = LLM.from_model(tiny_model("glm4", hidden_size=hidden), quantization="int6")
        assert set_activation_bits(int6.model) == 6 and "(int8 activations)" not in int6.describe()


@needs_kernels
def test_a_q4_K_M_moes_q6_K_experts_round_as_the_rest(isa):
    """Expert packs take the model's coarsest width too: q4_K gate_up with q6_K down (as llama.cpp's q4_K_M writes some
    layers), under "auto" the down projection's int8 activations as the int8 mode gives them, bit for bit — in the
    one-op decode dispatch (expert_glu) and in expert_mm."""
    from glm4.quant import set_activation_bits

    E, H, inter = 4, 256, 256
    gu = ExpertPack(blocks=torch.stack([_kquant_blocks(12, 2 * inter, H, seed=e) for e in range(E)]), ggml_type=12)
    dn = ExpertPack(blocks=torch.stack([_kquant_blocks(14, H, inter, seed=10 + e) for e in range(E)]), ggml_type=14)
    experts = StreamExperts(gu, dn)
    assert set_activation_bits(torch.nn.ModuleDict({"experts": experts})) == 4
    assert (gu.activation_bits, dn.activation_bits) == (0, 4)
    g = torch.Generator().manual_seed(2)
    x, h = torch.randn(3, H, generator=g), torch.randn(5, inter, generator=g)
    indices = torch.tensor([[0, 2], [1, 2], [3, 0]])
    weights = torch.rand(3, 2, generator=g)
    counts = torch.tensor([2, 1, 1, 1])
    out = {}
    with torch.no_grad():
        for mode, bits in (("auto", 4), ("int8", 4), ("auto", 0), ("int16", 0)):
            dn.activation_bits = bits
            with kernel_activations(mode):
                out[mode, bits] = experts(x, indices, weights), dn(h, counts)
    for a, b in zip(out["auto", 4], out["int8", 4]):
        assert torch.equal(a, b)
    for a, b in zip(out["auto", 4], out["auto", 0]):  # q6_K's own width under auto: int16 (AVX2 and AVX-512)
        assert not torch.equal(a, b)
    assert torch.equal(out["auto", 0][1], out["int16", 0][1])


def test_auto_is_the_default_mode():
    """A fresh process without GLM4_ACTIVATIONS runs "auto"; GLM4_ACTIVATIONS picks another."""
    import os
    import subprocess
    import sys

    code = "from glm4.quant import kernels; print(kernels.activations() if kernels.HAVE_EXT else 'auto')"
    env = {k: v for k, v in os.environ.items() if k != "GLM4_ACTIVATIONS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "auto"
    if kernels.HAVE_EXT:
        out = subprocess.run([sys.executable, "-c", code], env={**env, "GLM4_ACTIVATIONS": "int16"},
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == "int16"


@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (6, 64), (6, 128), (6, 256), (8, 32), (8, 128)])
@pytest.mark.parametrize("mins_dtype", [None, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 5])  # 5: the fifth token takes a one-token tile at m0 = 4
@pytest.mark.parametrize("mode", ["exact", "int16", "int8"])
def test_groups_in_eights(bits, group, mins_dtype, M, mode, isa):
    g = torch.Generator().manual_seed(bits * 1000 + group + M)
    # K / group = 32, 16 or 8 groups: the eights path; 38 rows: tiles of 4 (or 2, or 1) and a remainder
    N, K = 38, max(1024, 8 * group)
    scale_dtype = mins_dtype or torch.float16
    q = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = torch.rand(N, K // group, generator=g).to(scale_dtype)
    mins = torch.randn(N, K // group, generator=g).to(mins_dtype) if mins_dtype else None
    lin = QuantLinear.from_codes(q, scales, mins, bits=bits, group_size=group, zero_point=(1 << bits) // 2 - 1)
    w = lin.dequantize(torch.float64)
    x = torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g) * 4
    with kernel_activations(mode):
        y = kernels.quant_mm(x, lin)
    ref = x.double() @ w.T
    if mode == "exact":
        assert rel_err(y, ref) < 1e-5
    elif mode == "int8" and bits < 8 and isa == "avx2":
        assert rel_err(y, rounded_int8(x, group) @ w.T) < 1e-5
    else:  # int16 (what int8 mode gives the other kernels): within int16 precision of the exact product
        step = x.abs().amax(dim=1, keepdim=True).double() / (2 * 32639)
        assert ((y.double() - ref).abs() <= step @ w.abs().sum(dim=1)[None] + 1e-6 * ref.abs().max()).all()



def test_engine_activations_argument():
    """LLM(activations=...) / --activations set the integer kernels' mode process-wide; describe() names it; a
    value outside exact / int16 / int8 is refused before anything loads."""
    from test_engine import tiny_model

    from glm4.engine import LLM, SamplingParams
    from glm4.serve.chat_cli import build_parser

    before = kernels.activations()
    try:
        llm = LLM.from_model(tiny_model("glm4"), quantization="int4", activations="int8")
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
        if kernels.HAVE_EXT:
            assert kernels.activations() == "int8"
            # the streaming kernels' label (the prefill GEMM's, "GEMM, int8 activations", is quant_gemm's)
            assert ("(int8 activations)" in llm.describe()) == (kernels.dense_isa() == "AVX2")
            LLM.from_model(tiny_model("glm4"), quantization="int4", activations="int16")
            assert kernels.activations() == "int16" and "(int8 activations)" not in llm.describe()
    finally:
        kernels.set_activations(before)
    with pytest.raises(ValueError, match="activations must be"):
        LLM.from_model(tiny_model("glm4"), quantization="int4", activations="int4")
    assert build_parser().parse_args(["--activations", "int8"]).activations == "int8"
