"""AWQ, GPTQ and compressed-tensors checkpoints load as they are (glm4.quant.hf_formats).

The packed tensors are written by the real libraries running on CPU: AutoAWQ's `WQLinear_GEMM.from_linear`
(checked against its `dequantize_gemm`), AutoGPTQ's `QuantLinear.pack` (checked against the dequantization
of its own torch forward), compressed-tensors' `PackedQuantizationCompressor` and, for dense models, the
whole apply -> calibrate -> `ModelCompressor.compress_model` -> `save_pretrained` -> `update_config` path that
llm-compressor runs. Each test skips when its library is missing.

GPTQModel (the only writer of the `gptq_v2` layout) cannot be installed beside torch 2.13 (it requires
torch >= 2.14.1 and native packages), so the v2 checkpoints here are AutoGPTQ's v1 tensors put through a
*test-only restatement* of GPTQModel's documented v1 -> v2 conversion (every packed zero + 1).

Each quantized weight is fake-quantized first (codes q, fp16/bf16 scales, integer zeros), so the exact
dequantized value s * (q - z) is known in fp32: the loaded QuantLinear must give it bit for bit, the library's
own dequantization must equal it rounded to the library's dtype, and the logits must match a dense checkpoint
holding those weights (glm4.weights) within 1e-4 in fp32.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_hf_model, save_hf, to_chatglm
from safetensors.torch import load_file, save_file
from torch import nn

from glm4.layers.moe import StackedExperts
from glm4.quant.experts import StreamExperts
from glm4.quant.hf_formats import ActOrderQuantLinear, concat_quant_linears
from glm4.quant.load import load_model
from glm4.quant.qlinear import QuantLinear
from glm4.weights import CheckpointError
from glm4.weights import load_model as load_dense

# parity with the formats' own dequantization at fp32 tolerances: the kernels' exact activations
pytestmark = pytest.mark.usefixtures("exact_activations")


def _lib(top: str, module: str):
    """Import `module` of package `top` without running top/__init__.py, which pulls in the library's GPU-era
    model code (AutoAWQ: `datasets`; AutoGPTQ: transformers 4.x APIs). Skips when the package is absent."""
    if top not in sys.modules:
        spec = importlib.util.find_spec(top)
        if spec is None:
            pytest.skip(f"{top} is not installed (it is in the dev extra: pip install -e '.[dev]')")
        pkg = types.ModuleType(top)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[top] = pkg
    return importlib.import_module(module)


def _ct():
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (dev extra)")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return types.SimpleNamespace(ModelCompressor=ModelCompressor, Packed=PackedQuantizationCompressor,
                                 Args=QuantizationArgs, Config=QuantizationConfig, Scheme=QuantizationScheme)


# ---- tiny checkpoints ------------------------------------------------------------------------------------

def _read_sd(folder: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _write(folder: Path, sd: dict, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _hf_folder(tmp_path: Path, model_type: str) -> Path:
    if model_type == "chatglm":
        return to_chatglm(save_hf(build_hf_model("glm"), tmp_path / "hf"), tmp_path / "chatglm")
    return save_hf(build_hf_model(model_type), tmp_path / "hf")


def _quantizable(name: str, t: torch.Tensor) -> bool:
    """Every linear weight but the embedding, the LM head and the MoE router (what AWQ/GPTQ/llm-compressor touch)."""
    return (t.dim() == 2 and name.endswith(".weight") and "embed" not in name and "layernorm" not in name
            and not name.startswith(("lm_head", "transformer.output_layer")) and not name.endswith("mlp.gate.weight"))


def _fake_quant(w: torch.Tensor, bits: int, g: int, sym: bool, gidx: torch.Tensor, scale_dtype=torch.float16,
                zmin: int = 0):
    """Min-max codes for w [N, K] with column k in group gidx[k]: q [N, K], scales [N, G] (scale_dtype),
    integer zeros [N, G], and the exact fp32 value s * (q - z) the packers start from."""
    n, k = w.shape
    maxq = (1 << bits) - 1
    G = int(gidx.max()) + 1
    s, z = torch.empty(n, G), torch.empty(n, G, dtype=torch.int32)
    for j in range(G):
        cols = w[:, gidx == j]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            sc, zz = torch.maximum(-lo, hi) * 2 / maxq, torch.full((n,), (maxq + 1) // 2)
        else:
            sc = ((hi - lo) / maxq).clamp(min=1e-4)
            zz = (-lo / sc).round().clamp(zmin, maxq)
        s[:, j] = sc.clamp(min=1e-4).to(scale_dtype).float()
        z[:, j] = zz.int()
    q = (w / s[:, gidx] + z[:, gidx]).round().clamp(0, maxq).int()
    return q, s.to(scale_dtype), z, (q - z[:, gidx]).float() * s[:, gidx]


def _make(tmp_path: Path, model_type: str, pack, qcfg: dict, *, bits: int, group: int, sym: bool,
          act_order: bool = False, scale_dtype=torch.float16, zmin: int = 0):
    """Fake-quantize every quantizable weight of a tiny model, pack it with `pack`, write the quantized and the
    dense-reference folders. Returns (quantized folder, dense folder, {prefix: (exact W fp32, library's W)})."""
    hf = _hf_folder(tmp_path, model_type)
    config = json.loads((hf / "config.json").read_text())
    dense = _read_sd(hf)
    quant, expect = {}, {}
    gen = torch.Generator().manual_seed(1)
    for name in sorted(dense):
        if not _quantizable(name, dense[name]):
            continue
        p = name.removesuffix(".weight")
        n, k = dense[name].shape
        g = k if group == -1 else group
        gidx = torch.arange(k) // g
        if act_order:
            gidx = gidx[torch.randperm(k, generator=gen)]  # column perm[j] lands in group j // g, as desc_act does
        q, s, z, w = _fake_quant(dense[name].float(), bits, g, sym, gidx, scale_dtype, zmin)
        dense[name] = w
        bias = dense.get(p + ".bias")
        if bias is not None:
            dense[p + ".bias"] = bias = bias.half().float()  # the packers store fp16 biases
        tensors, lib_w = pack(w, q, s, z, gidx, bias, bits, group)
        quant.update({f"{p}.{k2}": v for k2, v in tensors.items()})
        expect[p] = (w, lib_w)
    for name, t in dense.items():
        if name.removesuffix(".weight") not in expect and name.removesuffix(".bias") not in expect:
            quant[name] = t
    qfolder = _write(tmp_path / "quant", quant, {**config, "quantization_config": qcfg})
    dfolder = _write(tmp_path / "dense", dense, config)
    return qfolder, dfolder, expect


def _expert_weight(mods: dict, views: dict, p: str) -> torch.Tensor:
    """MoE expert `p` (`...mlp.experts.{e}.{gate,up,down}_proj`): from its StreamExperts' quantized packs, or the
    stacked tensors it was dequantized into."""
    name, e, proj = re.fullmatch(r"(.+\.experts)\.(\d+)\.(\w+)", p).groups()
    experts = mods[name]
    if not isinstance(experts, StreamExperts):
        return views[p + ".weight"]
    pack = experts.down if proj == "down_proj" else experts.gate_up
    assert pack.bits in (4, 8) and pack.weight is None, p
    w, inter = pack.weight_of(int(e), torch.float32), experts.down.in_features
    return w if proj == "down_proj" else w[:inter] if proj == "gate_proj" else w[inter:]


def _check(qfolder: Path, dfolder: Path, expect: dict, n_quant_linears: int | None = None, dense_experts=False):
    """Loaded QuantLinears and MoE experts (StreamExperts, or stacked dense tensors where `dense_experts`, with a
    warning) give the exact weights; the library's dequantization equals them in its dtype; logits equal the dense
    reference within 1e-4 as the model runs by default (glm4's streaming kernels where this CPU has them:
    fp32-exact, tests/test_kernels.py)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dequantized to")
        if dense_experts:
            with pytest.warns(UserWarning, match=r"MoE experts of mixed formats or act-order run as stacked dense"):
                model = load_model(qfolder, progress=False)
        else:
            model = load_model(qfolder, progress=False)
    mods = dict(model.named_modules())
    views = model.checkpoint_state_dict()
    n_ql = 0
    for p, (w, lib_w) in expect.items():
        m = mods.get(p)
        if m is None:  # a MoE expert
            got = _expert_weight(mods, views, p)
        else:
            assert isinstance(m, QuantLinear), f"{p} is {type(m).__name__}"
            got, n_ql = m.to_linear().weight, n_ql + 1
        assert torch.equal(got, w), p
        assert torch.equal(got.to(lib_w.dtype), lib_w), p
    assert n_ql == sum(isinstance(m, QuantLinear) for m in mods.values())
    if n_quant_linears is not None:
        assert n_ql == n_quant_linears
    kinds = {type(m) for m in mods.values()}
    assert StreamExperts not in kinds if dense_experts else StackedExperts not in kinds  # quantized experts stay so
    for head in ("lm_head", "transformer.output_layer"):
        if head in mods:
            assert type(mods[head]) is nn.Linear
    ref = load_dense(dfolder, progress=False)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), atol=1e-4, rtol=0)
    return model


# ---- AWQ (AutoAWQ GEMM) -------------------------------------------------------------------------------------

def _awq_pack(w, q, s, z, gidx, bias, bits, group):
    gemm = _lib("awq", "awq.modules.linear.gemm")
    pu = importlib.import_module("awq.utils.packing_utils")
    n, k = w.shape
    lin = nn.Linear(k, n, bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    m = gemm.WQLinear_GEMM.from_linear(lin, bits, group, scales=s.float().T.contiguous(), zeros=z.T.contiguous())
    iw, iz = pu.reverse_awq_order(*pu.unpack_awq(m.qweight, m.qzeros, bits), bits)
    assert torch.equal((iw & 15).T.int(), q)  # the packer saw the codes we meant
    tensors = {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales}
    if bias is not None:
        tensors["bias"] = m.bias
    return tensors, pu.dequantize_gemm(m.qweight, m.qzeros, m.scales, bits, group).T


AWQ_CFG = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True,
           "modules_to_not_convert": None}


@pytest.mark.parametrize("model_type", ["glm4", "glm4_moe"])
def test_awq_gemm(tmp_path, model_type):
    q, d, expect = _make(tmp_path, model_type, _awq_pack, AWQ_CFG, bits=4, group=32, sym=False)
    model = _check(q, d, expect, n_quant_linears=12 if model_type == "glm4" else 14)
    if model_type == "glm4":  # fusion: q/k/v as one QuantLinear gives the three outputs concatenated
        attn = model.model.layers[0].self_attn
        fused = concat_quant_linears(attn.q_proj, attn.k_proj, attn.v_proj)
        assert isinstance(fused, QuantLinear)
        x = torch.randn(3, 64)
        torch.testing.assert_close(fused(x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1),
                                   atol=1e-5, rtol=0)
    else:  # experts: one StreamExperts of the stacked codes; the dense layer and the shared experts QuantLinear
        experts = model.model.layers[1].mlp.experts
        assert isinstance(experts, StreamExperts) and experts.gate_up.qweight.shape == (8, 64, 32)
        assert (experts.gate_up.bits, experts.gate_up.group_size, experts.down.group_size) == (4, 32, 32)
        assert isinstance(model.model.layers[1].mlp.shared_experts.up_proj, QuantLinear)


# ---- GPTQ (AutoGPTQ packing; v2 by restated conversion) -------------------------------------------------------

def _gptq_pack(v2: bool):
    def pack(w, q, s, z, gidx, bias, bits, group):
        ql = _lib("auto_gptq", "auto_gptq.nn_modules.qlinear.qlinear_cuda")
        n, k = w.shape
        lin = nn.Linear(k, n, bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        m = ql.QuantLinear(bits, group, k, n, bias is not None, weight_dtype=torch.float16)
        m.pack(lin, s.float(), z.clone(), g_idx=gidx.int())
        m.scales = m.scales.half()  # exact: the scales are fp16 values; real checkpoints store fp16
        tensors = {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales, "g_idx": m.g_idx}
        if bias is not None:
            tensors["bias"] = m.bias.half()
        m.bias = None
        with torch.no_grad():  # AutoGPTQ's own dequantization: its torch forward on the identity
            lib_w = m(torch.eye(k, dtype=torch.float16)).T
        if v2:  # TEST-ONLY restatement of GPTQModel's convert_gptq_v1_to_v2_format: each packed zero + 1
            tensors["qzeros"] = m.qzeros + (0x11111111 if bits == 4 else 0x01010101)
        return tensors, lib_w
    return pack


@pytest.mark.parametrize("model_type,bits,sym,act_order,fmt,group", [
    ("glm4", 4, True, False, "gptq", 32),
    ("glm", 4, False, True, "gptq", 32),
    ("glm", 8, True, True, "gptq_v2", 32),
    ("chatglm", 8, False, False, "gptq_v2", -1),
    ("glm4_moe", 4, False, True, "gptq", 32),
    ("glm4_moe", 8, True, False, "gptq_v2", 32),
    ("glm4_moe", 4, False, False, "gptq", -1),
])
def test_gptq(tmp_path, model_type, bits, sym, act_order, fmt, group):
    cfg = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": sym,
           "checkpoint_format": fmt, "pack_dtype": "int32", "true_sequential": True, "damp_percent": 0.01}
    # zeros >= 1: AutoGPTQ's v1 packing stores zero - 1 and cannot hold a zero of 0
    q, d, expect = _make(tmp_path, model_type, _gptq_pack(fmt == "gptq_v2"), cfg, bits=bits, group=group, sym=sym,
                         act_order=act_order, zmin=1)
    # act-order experts permute their inputs one by one: stacked dense (with a warning)
    model = _check(q, d, expect, dense_experts=act_order and model_type == "glm4_moe")
    kinds = {type(m) for m in model.modules() if isinstance(m, QuantLinear)}
    assert (ActOrderQuantLinear in kinds) == act_order  # (a single-group linear needs no permutation)


# ---- compressed-tensors pack-quantized ---------------------------------------------------------------------

def _ct_scheme(ct, bits, sym, group):
    strategy = "channel" if group == -1 else "group"
    return ct.Scheme(targets=["Linear"], weights=ct.Args(num_bits=bits, symmetric=sym, strategy=strategy,
                                                         group_size=None if group == -1 else group))


def _ct_config(ct, scheme) -> dict:
    """config.json's quantization_config as compressed-tensors writes it (ModelCompressor.update_config)."""
    comp = ct.ModelCompressor(quantization_config=ct.Config(
        config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed",
        ignore=["lm_head"]))
    tmp = Path(tempfile.mkdtemp())
    try:
        comp.update_config(str(tmp))
        return json.loads((tmp / "config.json").read_text())["quantization_config"]
    finally:
        shutil.rmtree(tmp)


def _ct_pack(ct, scheme):
    def pack(w, q, s, z, gidx, bias, bits, group):
        off = 1 << (bits - 1)
        sd = {"weight": w, "weight_scale": s, "weight_zero_point": (z - off).to(torch.int8)}
        out = ct.Packed.compress(sd, scheme)
        lib_w = ct.Packed.decompress(out, scheme)["weight"]  # in the scale dtype (bf16)
        return {k: v for k, v in out.items() if k != "weight"} | ({"bias": bias.half()} if bias is not None else {}), \
            lib_w
    return pack


@pytest.mark.parametrize("bits,sym,group", [(4, False, 32), (8, True, -1)])
def test_compressed_tensors_moe(tmp_path, bits, sym, group):
    ct = _ct()
    scheme = _ct_scheme(ct, bits, sym, group)
    q, d, expect = _make(tmp_path, "glm4_moe", _ct_pack(ct, scheme), _ct_config(ct, scheme), bits=bits,
                         group=group, sym=sym, scale_dtype=torch.bfloat16)
    _check(q, d, expect, n_quant_linears=14)


@pytest.mark.parametrize("bits,sym,group", [(4, True, 32), (8, False, -1), (4, False, 32)])
def test_compressed_tensors_llm_compressor_lifecycle(tmp_path, bits, sym, group):
    """A bf16 glm model through compressed-tensors' own apply / compress / save path, as llm-compressor runs it
    (min-max qparams stand in for its observers); lm_head in `ignore` stays dense."""
    ct = _ct()
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    hf = build_hf_model("glm").to(torch.bfloat16)
    scheme = _ct_scheme(ct, bits, sym, group)
    apply_quantization_config(hf, ct.Config(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for mod in hf.modules():
        if getattr(mod, "quantization_scheme", None) is not None:
            w = mod.weight.data
            wg = w.view(w.shape[0], -1, w.shape[1] if group == -1 else group)
            scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), mod.quantization_scheme.weights)
            mod.weight_scale.data.copy_(scale)
            mod.weight_zero_point.data.copy_(zp)
    comp = ct.ModelCompressor.from_pretrained_model(hf)  # the format is the library's choice
    comp.compress_model(hf)
    qfolder = tmp_path / "quant"
    hf.save_pretrained(qfolder, max_shard_size="20KB")  # sharded, with an index
    comp.update_config(str(qfolder))
    qcfg = json.loads((qfolder / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized" and qcfg["quant_method"] == "compressed-tensors"

    sd = _read_sd(qfolder)
    dense, expect = {}, {}
    for name, t in sd.items():
        p, _, leaf = name.rpartition(".")
        if leaf == "weight_packed":  # the library's dequantization, in fp32 (exact) and in the scale dtype
            part = {k: sd[f"{p}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
                    if f"{p}.{k}" in sd}
            lib_w = ct.Packed.decompress(part, scheme)["weight"]
            w = ct.Packed.decompress({**part, "weight_scale": part["weight_scale"].float()}, scheme)["weight"]
            dense[p + ".weight"], expect[p] = w, (w, lib_w)
        elif not leaf.startswith("weight_") or leaf == "weight":
            dense[name] = t
    assert (qfolder / "model.safetensors.index.json").exists()
    config = {k: v for k, v in json.loads((qfolder / "config.json").read_text()).items() if k != "quantization_config"}
    model = _check(qfolder, _write(tmp_path / "dense", dense, config), expect, n_quant_linears=12)
    half = load_model(qfolder, dtype=torch.bfloat16, progress=False)  # bf16 activations and unquantized tensors
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        out, ref = half(ids), model(ids)
    assert out.dtype == torch.bfloat16 and half.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.fixture
def ct_folder(tmp_path):
    ct = _ct()
    scheme = _ct_scheme(ct, 4, False, 32)
    q, _, _ = _make(tmp_path, "glm", _ct_pack(ct, scheme), _ct_config(ct, scheme), bits=4, group=32, sym=False,
                    scale_dtype=torch.bfloat16)
    return q


def _set_qcfg(folder: Path, qcfg: dict) -> None:
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    cfg["quantization_config"] = qcfg
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("qcfg,match", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, r"bits=3 .*not supported; supported: GPTQ \(4 or 8 bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, r"'marlin' .*not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, r"version='gemv' is not supported"),
    ({"quant_method": "awq", "bits": 8, "group_size": 32, "version": "gemm"}, r"AWQ bits=8 .*supported: AWQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, r"quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}},
     r"config_groups.group_0 .*'float-quantized'.*supported: compressed-tensors \(format pack-quantized"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 2, "type": "int", "strategy": "group", "group_size": 32}}}},
     r"num_bits': 2.*not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32}, r"says gptq, but no tensor ends in '.qweight'"),
])
def test_bad_config(ct_folder, qcfg, match):
    _set_qcfg(ct_folder, qcfg)
    with pytest.raises(CheckpointError, match=r"config\.json|quant") as e:
        load_model(ct_folder, progress=False)
    assert "\n" not in str(e.value)
    assert re.search(match, str(e.value)), str(e.value)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.update({"model.layers.0.mlp.down_proj.weight_packed":
                           sd["model.layers.0.mlp.down_proj.weight_packed"][:, :5].contiguous()}),
     r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight_packed' has 5 int32 columns"),
    (lambda sd: sd.update({"model.layers.1.self_attn.o_proj.weight_scale":
                           sd["model.layers.1.self_attn.o_proj.weight_scale"][:, :1].contiguous()}),
     r"'model\.layers\.1\.self_attn\.o_proj\.weight_zero_point' is torch.int32 \[8, 2\]; expected int32 \[8, 1\]"),
    (lambda sd: sd.pop("model.layers.1.self_attn.q_proj.weight_scale"),
     r"missing tensor 'model\.layers\.1\.self_attn\.q_proj\.weight_scale'"),
    (lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight_shape": torch.tensor([32, 32])}),
     r"k_proj\.weight_shape is \[32, 32\], the model expects \[32, 64\]"),
])
def test_bad_tensors(ct_folder, edit, match):
    sd = _read_sd(ct_folder)
    edit(sd)
    save_file(sd, ct_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(ct_folder, progress=False)
    assert "\n" not in str(e.value)


def test_gptq_bad_shapes_name_file_and_tensor(tmp_path):
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    q, _, _ = _make(tmp_path, "glm", _gptq_pack(False), cfg, bits=4, group=32, sym=True, zmin=1)
    sd = _read_sd(q)
    name = "model.layers.0.self_attn.o_proj.qzeros"
    sd[name] = sd[name][:1].contiguous()
    save_file(sd, q / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj"
                                              r"\.qzeros' has shape \[1, 8\], expected \[2, 8\] for GPTQ 4-bit"):
        load_model(q, progress=False)
