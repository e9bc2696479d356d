"""GGUF checkpoints: header parsing, dequantization bit for bit against the `gguf` package, models loaded from
GGUF files (written here the way llama.cpp's converter writes them) against the same weights through the
safetensors path, quantized linears kept quantized, tokenizer and chat template from the metadata, bad files.

Tiny random models are built with glm4's own model classes (their safetensors loading is checked against
transformers in test_models_dense / test_moe); no transformers import here keeps this file fast.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the `gguf` package (pip install gguf) writes the test files")

from conftest import randomize_  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from glm4.chat import ChatFormat  # noqa: E402
from glm4.config import config_from_dict  # noqa: E402
from glm4.layers.moe import StackedExperts  # noqa: E402
from glm4.models import get_model_class  # noqa: E402
from glm4.quant import describe_linears, kernels  # noqa: E402
from glm4.quant.experts import StreamExperts  # noqa: E402
from glm4.quant.gguf import _quant_linear  # noqa: E402
from glm4.quant.gguf_quants import dequantize  # noqa: E402
from glm4.quant.kquant import KQuantLinear  # noqa: E402
from glm4.quant.load import load_model  # noqa: E402
from glm4.quant.qlinear import QuantEmbedding, QuantLinear  # noqa: E402
from glm4.tokenizer import GLM4_PAT_STR, GLM4_SPECIAL_TOKENS, HFTokenizer, load_tokenizer  # noqa: E402
from glm4.tokenizer.gguf_meta import GGUFError, read_gguf_header  # noqa: E402
from glm4.weights import CheckpointError, save_checkpoint  # noqa: E402
from glm4.weights import load_model as load_safetensors  # noqa: E402

# parity with the formats' own dequantization at fp32 tolerances: the kernels' exact activations
pytestmark = pytest.mark.usefixtures("exact_activations")

GGUF_ARCH = {"chatglm": "chatglm", "glm": "chatglm", "glm4": "glm4", "glm4_moe": "glm4moe"}
KQUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, rms_norm_eps=1e-5, attention_bias=True,
            rope_theta=10000.0, max_position_embeddings=256, eos_token_id=[1, 2], pad_token_id=0)
MOE = dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
           first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
           use_qk_norm=True, num_nextn_predict_layers=1)


def tiny_model(model_type: str, seed: int = 0, **over):
    if model_type == "chatglm":
        d = dict(model_type="chatglm", hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96,
                 padded_vocab_size=128, kv_channels=16, multi_query_attention=True, multi_query_group_num=2,
                 seq_length=256, rope_ratio=1.0, layernorm_epsilon=1e-5, add_qkv_bias=True, eos_token_id=[1, 2],
                 pad_token_id=0)
    else:
        d = dict(BASE, model_type=model_type, **(MOE if model_type == "glm4_moe" else {}))
    d.update(over)
    cfg = config_from_dict(d)
    torch.manual_seed(seed)
    return randomize_(get_model_class(cfg.model_type).from_config(cfg).float().eval(), seed)


# ---- writing GGUF files as llama.cpp's converter does ----------------------------------------------------------

def hf_tensors(model, fuse_qkv: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint tensors after the converter's modify_tensors: `transformer.` stripped (chatglm), experts
    stacked per layer (glm4moe), e_score_correction_bias renamed, q/k/v fused with --fuse-qkv."""
    sd = {k: v.detach().clone() for k, v in model.checkpoint_state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        parts = name.split(".")
        if ".mlp.experts." in name:
            experts.setdefault((int(parts[2]), parts[-2]), {})[int(parts[5])] = t
            continue
        out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = t
    for (layer, w), per in experts.items():
        out[f"model.layers.{layer}.mlp.experts.{w}.weight"] = torch.stack([per[e] for e in sorted(per)])
    if fuse_qkv:
        for name in [n for n in out if ".q_proj." in n]:
            qkv = [out.pop(name.replace("q_proj", x)) for x in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "query_key_value")] = torch.cat(qkv)
    return out


def random_blocks(qtype, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid random blocks of a K-quant (any bytes, finite small fp16 d / dmin) -> uint8 [rows, row_bytes]."""
    rng = np.random.default_rng(seed)
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, k // bs, ts), dtype=np.uint8)

    def f16(off, scale):
        v = (rng.uniform(0.5, 1.5, size=(rows, k // bs, 1)) * scale).astype(np.float16)
        raw[..., off:off + 2] = v.view(np.uint8)

    if qtype in (T.Q4_K, T.Q5_K):  # |W| <= d*63*31 + dmin*63
        f16(0, 4e-5 / math.sqrt(k / 256))
        f16(2, 4e-4)
    elif qtype == T.Q6_K:  # |W| <= d*127*32
        f16(208, 3e-5 / math.sqrt(k / 256))
    else:
        f16(0, 1e-2)
        if qtype in (T.Q4_1, T.Q5_1):
            f16(2, 1e-2)
    return raw.reshape(rows, -1)


def encode(t: torch.Tensor, qtype, seed: int = 0) -> np.ndarray:
    """A weight in GGUF form: float arrays for f32/f16, uint8 blocks otherwise (K-quants: random blocks)."""
    x = t.float().numpy()
    if qtype == T.F32:
        return x
    if qtype == T.F16:
        return x.astype(np.float16)
    if qtype in KQUANTS or qtype == T.IQ4_NL:
        return random_blocks(qtype, int(np.prod(x.shape[:-1])), x.shape[-1], seed).reshape(*x.shape[:-1], -1)
    return gguf.quants.quantize(x, qtype)


def write_gguf(path: Path, model, qtype=T.F32, *, fuse_qkv=False, tokenizer=None, template=None, mtp=False,
               types: dict | None = None, drop=(), extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Write `model` as a GGUF; returns the tensors the file holds, dequantized (checkpoint names, for the
    reference model). `types` overrides the type per GGUF name; 1-D tensors are always f32 (as the converter).
    `drop` / `extra`: GGUF tensors to leave out / add (bad files)."""
    cfg, mt = model.config, model.config.model_type
    arch = GGUF_ARCH[mt]
    w = gguf.GGUFWriter(str(path), arch)
    n_layers = cfg.num_hidden_layers
    n_blocks = n_layers + (1 if mtp else 0)
    w.add_block_count(n_blocks)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.rope.rotary_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    if mt == "chatglm":
        w.add_context_length(cfg.seq_length)
        w.add_feed_forward_length(cfg.ffn_hidden_size)
        w.add_layer_norm_rms_eps(cfg.layernorm_epsilon)
    else:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        if mt != "glm":
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if cfg.rope.scaling:  # the converter writes yarn and linear scaling
            s = cfg.rope.scaling
            w.add_rope_scaling_type(gguf.RopeScalingType(s["rope_type"]))
            w.add_rope_scaling_factor(s["factor"])
            if "original_max_position_embeddings" in s:
                w.add_rope_scaling_orig_ctx_len(s["original_max_position_embeddings"])
    if mt == "glm4_moe":
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_nextn_predict_layers(1 if mtp else 0)
    if tokenizer is not None:
        tokenizer(w)
    if template is not None:
        w.add_chat_template(template)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[{"chatglm": "CHATGLM", "glm4": "GLM4",
                                                      "glm4moe": "GLM4_MOE"}[arch]], n_blocks)
    tensors = hf_tensors(model, fuse_qkv)
    if mtp:  # a NextN layer the loader must skip
        tensors[f"model.layers.{n_layers}.eh_proj.weight"] = torch.randn(cfg.hidden_size, 2 * cfg.hidden_size)
        tensors[f"model.layers.{n_layers}.input_layernorm.weight"] = torch.ones(cfg.hidden_size)
    held: dict[str, torch.Tensor] = {}
    for i, (name, t) in enumerate(tensors.items()):
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        if gname in drop:
            continue
        # llama.cpp keeps 1-D tensors and the router (ffn_gate_inp) in f32 whatever the file type
        q = T.F32 if t.dim() == 1 or "ffn_gate_inp" in gname else (types or {}).get(gname, qtype)
        data = encode(t, q, seed=i)
        if q in (T.F32, T.F16):
            w.add_tensor(gname, data)
            held[name] = torch.from_numpy(data.astype(np.float32))
        elif q == T.BF16:
            data = gguf.quants.quantize(t.float().numpy(), q)
            w.add_tensor(gname, data, raw_dtype=q)
            held[name] = torch.from_numpy(gguf.quants.dequantize(data, q)).reshape(t.shape)
        else:
            w.add_tensor(gname, data, raw_dtype=q)
            held[name] = torch.from_numpy(gguf.quants.dequantize(data, q)).reshape(t.shape)
    for gname, data in (extra or {}).items():
        w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def reference(model, held: dict[str, torch.Tensor], folder: Path, fused_qkv: bool = False):
    """`model` with the weights the GGUF holds, saved and loaded back through the safetensors path."""
    sd = model.checkpoint_state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            key = name.removeprefix("transformer.").replace("e_score_correction_bias", "e_score_correction.bias")
            if ".mlp.experts." in key:
                p = key.split(".")
                t.copy_(held[f"model.layers.{p[2]}.mlp.experts.{p[-2]}.weight"][int(p[5])])
            elif fused_qkv and "_proj." in key and key.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
                fused = held[key.replace(key.split(".")[-2], "query_key_value")]
                hd, c = model.config.head_dim, model.config
                q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
                a, b = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}[key.split(".")[-2]]
                t.copy_(fused[a:b])
            elif key in held:
                t.copy_(held[key])
    save_checkpoint(model, folder)
    return load_safetensors(folder, progress=False)


IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 120], [11, 2, 33, 8, 90, 1, 0, 77]])


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).float()


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    # (torch.testing.assert_close imports torch.distributed: seconds on a small machine)
    assert a.shape == b.shape and (a - b).abs().max().item() <= atol, (a - b).abs().max().item()


def assert_matches_dequantized(got, ref) -> None:
    """Every QuantLinear holds exactly the reference linear's weight, every StreamExperts (quantized MoE experts)
    exactly the reference's stacked experts, and the logits equal the reference's within 1e-4 as the model runs
    by default (glm4's streaming kernels where this CPU has them: fp32-exact, tests/test_kernels.py)."""
    mods = dict(ref.named_modules())
    for name, m in got.named_modules():
        if isinstance(m, QuantEmbedding):  # a quantized token_embd stays so: the rows looked up equal the table's
            ids = torch.arange(m.num_embeddings - 1, -1, -1)
            assert m(ids).dtype == mods[name].weight.dtype
            assert torch.equal(m(ids), mods[name].weight[ids]), name
        elif isinstance(m, (QuantLinear, KQuantLinear)):  # the embedding's table is named <embedding>.table
            assert torch.equal(m.dequantize(), mods[name.removesuffix(".table")].weight), name
        elif isinstance(m, StreamExperts):
            for pack, stacked in ((m.gate_up, mods[name].gate_up_proj), (m.down, mods[name].down_proj)):
                assert pack.bits in (4, 6, 8) and pack.weight is None, name
                for e in range(pack.num_experts):
                    assert torch.equal(pack.weight_of(e, torch.float32), stacked[e]), (name, e)
    assert_close(logits(got), logits(ref))


# ---- dequantization --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K,
                                   T.Q6_K], ids=lambda t: t.name)
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 10, (6, 1))).astype(np.float32)
    x[0, :40] = 0  # zero blocks: d == 0, -0.0 products
    if qtype in KQUANTS:
        blocks = [random_blocks(qtype, 6, 512, seed=s) for s in range(2)]
    else:
        blocks = [gguf.quants.quantize(x, qtype)]
        if qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
            blocks.append(random_blocks(qtype, 6, 512))
    for raw in blocks:
        ours = dequantize(raw.view(np.uint8) if qtype != T.F32 else raw, int(qtype))
        ref = gguf.quants.dequantize(raw, qtype).reshape(ours.shape)
        assert ours.dtype == np.float32 and ours.shape == (6, 512)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
        if qtype in (T.F32, T.F16, T.BF16):
            continue
        # the linear the loader builds from these blocks holds the same weight, bit for bit (fp32; bf16 as rounded
        # from it): a QuantLinear, or for K-quants where glm4's kernels run their blocks as they are (KQuantLinear)
        m = _quant_linear(raw.view(np.uint8), int(qtype), torch.nn.Linear(512, 6, bias=False, device="meta"),
                          torch.float32)
        if qtype in KQUANTS and kernels.has_streaming_kernels():
            assert isinstance(m, KQuantLinear) and np.array_equal(m.blocks.numpy(), raw.view(np.uint8))
        else:
            assert isinstance(m, QuantLinear) and m.bits == (4 if qtype in (T.Q4_0, T.Q4_1, T.Q4_K) else 8)
            assert (m.mins is not None) == (qtype in (T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K))
        np.testing.assert_array_equal(m.dequantize().numpy().view(np.uint32), ref.view(np.uint32))
        assert torch.equal(m.dequantize(torch.bfloat16), torch.from_numpy(ref).to(torch.bfloat16))


# ---- header ----------------------------------------------------------------------------------------------------

def test_header_reads_every_metadata_type(tmp_path):
    p = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(p), "glm4")
    w.add_custom_alignment(64)
    vals = {"t.u8": (w.add_uint8, 200), "t.i8": (w.add_int8, -100), "t.u16": (w.add_uint16, 60000),
            "t.i16": (w.add_int16, -30000), "t.u32": (w.add_uint32, 4_000_000_000), "t.i32": (w.add_int32, -2**31),
            "t.f32": (w.add_float32, 0.5), "t.u64": (w.add_uint64, 2**63), "t.i64": (w.add_int64, -2**62),
            "t.f64": (w.add_float64, 1e-300), "t.bool": (w.add_bool, True), "t.str": (w.add_string, "你好 gguf"),
            "t.arr_i": (w.add_array, [1, -2, 3]), "t.arr_s": (w.add_array, ["a", "", "字"]),
            "t.arr_f": (w.add_array, [0.25, 1.5]), "t.nested": (w.add_array, [[1, 2], [3]])}
    for k, (fn, v) in vals.items():
        fn(k, v)
    a = np.arange(96, dtype=np.float32).reshape(3, 32)
    w.add_tensor("a", a)
    w.add_tensor("b", gguf.quants.quantize(a, T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("c", np.ones(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    hdr = read_gguf_header(p)
    assert hdr.version == 3 and hdr.alignment == 64 and hdr.data_start % 64 == 0
    assert hdr.architecture == "glm4"
    for k, (_, v) in vals.items():
        assert hdr.metadata[k] == v, k
    ref = gguf.GGUFReader(str(p))
    assert list(hdr.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        ours = hdr.tensors[t.name]
        assert ours.dims == tuple(int(x) for x in t.shape) and ours.ggml_type == int(t.tensor_type)
        assert ours.offset == t.data_offset and ours.nbytes == t.n_bytes
    assert hdr.tensors["a"].shape == (3, 32) and hdr.tensors["b"].type_name == "q8_0"


def _model_file(tmp_path, name="m.gguf", **kw):
    model = tiny_model("glm4")
    p = tmp_path / name
    write_gguf(p, model, **kw)
    return p


def test_bad_files_raise_one_clear_error(tmp_path):
    good = _model_file(tmp_path)
    raw = good.read_bytes()
    cases = {
        "notgguf.gguf": (b"PK\x03\x04" + b"\0" * 60, "not a GGUF file"),
        "tiny.gguf": (b"GGUF\x03\0", "truncated GGUF file"),
        "header.gguf": (raw[:200], "truncated GGUF header"),
        "data.gguf": (raw[:-100], "truncated file: tensor 'output.weight' ends at byte"),
        "v1.gguf": (raw[:4] + (1).to_bytes(4, "little") + raw[8:], "unsupported GGUF version 1"),
        "bigendian.gguf": (raw[:4] + (3).to_bytes(4, "big") + raw[8:], "big-endian"),
    }
    for fname, (data, msg) in cases.items():
        p = tmp_path / fname
        p.write_bytes(data)
        with pytest.raises(GGUFError, match=msg):
            read_gguf_header(p)
        with pytest.raises(CheckpointError, match=msg) as e:
            load_model(p)
        assert str(p) in str(e.value)
    # every cut inside the header and random byte damage: a GGUFError or a valid parse, never another exception
    end = read_gguf_header(good).data_start
    p = tmp_path / "cut.gguf"
    for n in range(0, end, max(1, end // 50)):
        p.write_bytes(raw[:n])
        with pytest.raises(GGUFError):
            read_gguf_header(p)
    rng = np.random.default_rng(0)
    for _ in range(50):
        damaged = bytearray(raw[:end + 64])
        for i in rng.integers(4, end, size=3):
            damaged[i] = int(rng.integers(0, 256))
        p.write_bytes(bytes(damaged))
        try:
            read_gguf_header(p)
        except GGUFError:
            pass


def test_unsupported_architecture_tensor_type_and_layout(tmp_path):
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"llama\.gguf: GGUF architecture 'llama' is not supported "
                                              r"\(supported: chatglm, glm4, glm4moe\)"):
        load_model(p)
    bare = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(bare), "glm4")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(0)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"bare\.gguf: metadata does not describe a supported glm4 model"):
        load_model(bare)
    iq = _model_file(tmp_path, "iq.gguf", types={"blk.1.ffn_down.weight": T.IQ4_NL})
    with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor 'blk\.1\.ffn_down\.weight' has type iq4_nl, which "
                                              r"glm4 does not load \(supported: .*q4_K"):
        load_model(iq)
    missing = _model_file(tmp_path, "missing.gguf", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(CheckpointError, match=r"missing\.gguf: missing tensor\(s\) 'blk\.1\.ffn_down\.weight'"):
        load_model(missing)
    extra = _model_file(tmp_path, "extra.gguf", extra={"blk.0.attn_output.bias": np.zeros(64, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blk\.0\.attn_output\.bias'"):
        load_model(extra)
    shape = _model_file(tmp_path, "shape.gguf", drop=("output_norm.weight",),
                        extra={"output_norm.weight": np.ones(32, np.float32)})
    with pytest.raises(CheckpointError, match=r"tensor 'output_norm\.weight' has shape \[32\], the model expects "
                                              r"\[64\]"):
        load_model(shape)


# ---- models ----------------------------------------------------------------------------------------------------

VARIANTS = {  # id -> (model_type, model config overrides, write options)
    "chatglm": ("chatglm", {}, {}),  # glm-4-9b-chat: fused attn_qkv
    "chatglm-hf": ("glm", {}, {}),  # glm-4-9b-chat-hf: arch chatglm with separate attn_q/k/v
    "glm4": ("glm4", {}, {}),
    "glm4-fuse-qkv": ("glm4", {}, {"fuse_qkv": True}),
    "glm4-tied-yarn": ("glm4", {"tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4}}, {}),
    "glm4moe": ("glm4_moe", {}, {"mtp": True}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_gguf_logits_equal_safetensors(tmp_path, variant):
    mt, over, kw = VARIANTS[variant]
    model = tiny_model(mt, **over)
    p = tmp_path / "m-f32.gguf"
    held = write_gguf(p, model, **kw)
    got = load_model(p, progress=False)
    assert got.config.model_type == mt and not got.training
    assert got.config.rope == model.config.rope and got.config.tie_word_embeddings == model.config.tie_word_embeddings
    ref = reference(model, held, tmp_path / "ref", fused_qkv=kw.get("fuse_qkv", False))
    assert torch.equal(logits(got), logits(ref))
    assert got.config.eos_token_ids == [] and got.config.vocab_size == 128


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("variant", ["chatglm", "glm4moe"])
def test_half_gguf_logits_equal_safetensors(tmp_path, qtype, variant):
    mt, _, kw = VARIANTS[variant]
    model = tiny_model(mt)
    held = write_gguf(tmp_path / "m.gguf", model, qtype, **kw)
    got = load_model(tmp_path / "m.gguf", dtype=torch.float32, progress=False)
    assert torch.equal(logits(got), logits(reference(model, held, tmp_path / "ref")))
    bf = load_model(tmp_path / "m.gguf", dtype="bfloat16", progress=False)
    assert bf.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.isfinite(logits(bf)).all()


def _quant_counts(model):
    return (sum(isinstance(m, (QuantLinear, KQuantLinear)) for m in model.modules()),
            sum(type(m) is torch.nn.Linear for m in model.modules()))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("variant", ["chatglm", "glm4-fuse-qkv", "glm4moe"])
def test_quantized_gguf_keeps_quantlinears(tmp_path, qtype, variant):
    mt, _, kw = VARIANTS[variant]
    model = tiny_model(mt)
    held = write_gguf(tmp_path / "m.gguf", model, qtype, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dequantized to")  # nothing quantized is expanded
        got = load_model(tmp_path / "m.gguf", progress=False)
    n_q, n_lin = _quant_counts(got)
    # chatglm: qkv, dense, h_to_4h, 4h_to_h; glm4: q, k, v (split from attn_qkv), o, gate_up, down; glm4_moe:
    # q, k, v, o + dense gate, up, down / shared-expert gate, up, down; plus the output head and the embedding
    assert n_lin == 0 and n_q == {"chatglm": 10, "glm4": 14, "glm4_moe": 16}[mt]  # + the embedding's table
    if mt == "glm4_moe":  # the routed experts: one StreamExperts of the file's codes, no stacked fp32 tensors
        assert isinstance(got.model.layers[1].mlp.experts, StreamExperts)
        assert not any(isinstance(m, StackedExperts) for m in got.modules())
    assert isinstance(got.get_input_embeddings(), QuantEmbedding)  # the lookup table stays quantized too
    ref = reference(model, held, tmp_path / "ref", fused_qkv=kw.get("fuse_qkv", False))
    assert_matches_dequantized(got, ref)
    qbytes = sum(b.numel() * b.element_size() for m in got.modules() if isinstance(m, QuantLinear)
                 for b in m.buffers())
    fp32 = sum(m.in_features * m.out_features * 4 for m in got.modules() if isinstance(m, QuantLinear))
    assert qbytes < fp32 * (0.25 if qtype in (T.Q4_0, T.Q4_1) else 0.4)  # 5-bit codes are stored in 8 bits


@pytest.mark.parametrize("attn_q", [T.Q8_0, T.Q5_0, T.Q4_0], ids=lambda t: t.name)
def test_gguf_q_k_v_fuse_into_one_quantlinear(tmp_path, attn_q):
    # the engine fuses q / k / v of a GGUF-loaded model into one QuantLinear when the three share a format: q8_0
    # everywhere, or q4_K_M's mix (attn_q q5_0, codes 0..31 about 16; attn_k / attn_v q8_0) with the 8-bit codes
    # moved to zero point 0; q4_0 against q8_0 k / v stays three linears. Logits are unchanged (to the bit where no
    # zero point moved; else within fp32 rounding: the zero-point term is summed apart from the codes).
    from glm4.models.glm import fuse_projections

    model = tiny_model("glm4")
    types = {f"blk.{i}.attn_q.weight": attn_q for i in range(model.config.num_hidden_layers)}
    held = write_gguf(tmp_path / "m.gguf", model, T.Q8_0, types=types)
    got = load_model(tmp_path / "m.gguf", progress=False)
    before = logits(got)
    fuse_projections(got)
    attn = got.model.layers[0].self_attn
    fused = attn_q != T.Q4_0
    assert (attn.qkv_proj is not None) == fused and isinstance(attn.qkv_proj if fused else attn.q_proj, QuantLinear)
    if fused:
        assert attn.qkv_proj.zero_point == 0 and attn.qkv_proj.qweight.dtype == torch.int8
        ref = reference(model, held, tmp_path / "ref")
        wq, wk, wv = (dict(ref.named_modules())[f"model.layers.0.self_attn.{n}"].weight for n in ("q_proj", "k_proj", "v_proj"))
        assert torch.equal(attn.qkv_proj.dequantize(), torch.cat([wq, wk, wv]))
    if attn_q == T.Q5_0:
        assert_close(logits(got), before)
    else:
        assert torch.equal(logits(got), before)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_kquant_gguf_matches_dequantized_weights(tmp_path, qtype):
    # K-quants need rows of 256: hidden 256, every weight K-quantized, the embedding too; the embedding stays
    # quantized and the tied output head is the same table
    model = tiny_model("glm4", hidden_size=256, intermediate_size=256, head_dim=64, tie_word_embeddings=True)
    held = write_gguf(tmp_path / "m.gguf", model, qtype)
    got = load_model(tmp_path / "m.gguf", progress=False)
    assert got.config.tie_word_embeddings
    head, emb = got.get_output_embeddings(), got.get_input_embeddings()
    assert _quant_counts(got) == (13, 0) and isinstance(emb, QuantEmbedding) and emb.table is head
    # their blocks as they are where glm4's kernels run (4.5 / 5.5 / 6.56 bits a weight), else QuantLinear codes
    assert isinstance(head, KQuantLinear if kernels.has_streaming_kernels() else QuantLinear)
    kinds = {kind: n for kind, n, _ in describe_linears(got)}
    assert kinds["embedding"] == 1 and kinds["lm_head (tied to the embedding)"] == 1 and "table" not in kinds
    ref = reference(model, held, tmp_path / "ref")
    assert_matches_dequantized(got, ref)


@pytest.mark.parametrize("tied", [False, True])
def test_dequantize_gives_back_the_embedding_and_a_tied_head(tmp_path, tied):
    # glm4.quant.dequantize (before an export) turns a quantized embedding back into an nn.Embedding holding the
    # file's table, and a head that was that same table into a linear tied to it again; logits unchanged
    from glm4.quant import dequantize as undo

    model = tiny_model("glm4", hidden_size=256, intermediate_size=256, head_dim=64, tie_word_embeddings=tied)
    held = write_gguf(tmp_path / "m.gguf", model, T.Q8_0)
    got = load_model(tmp_path / "m.gguf", progress=False)
    before = logits(got)
    undo(got)
    emb, head = got.get_input_embeddings(), got.get_output_embeddings()
    assert type(emb) is torch.nn.Embedding and torch.equal(emb.weight, held["model.embed_tokens.weight"])
    assert type(head) is torch.nn.Linear and (head.weight is emb.weight) == tied
    assert not any(isinstance(m, (QuantLinear, KQuantLinear, QuantEmbedding)) for m in got.modules())
    assert_close(logits(got), before)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1, T.Q5_0, *KQUANTS], ids=lambda t: t.name)
def test_quantized_embedding_rows(tmp_path, qtype, monkeypatch):
    # the rows of a quantized token_embd as looked up, in the model's dtype: equal to the file's dequantized table
    # with glm4's kernels (the row-gather op) and without (torch / gguf-py), repeated and unsorted ids too
    model = tiny_model("glm4", hidden_size=256, intermediate_size=256, head_dim=64)
    held = write_gguf(tmp_path / "m.gguf", model, qtype)
    table = held["model.embed_tokens.weight"]  # the file's table, dequantized by gguf-py
    ids = torch.tensor([[5, 0, 5], [model.config.vocab_size - 1, 3, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        emb = load_model(tmp_path / "m.gguf", dtype=dtype, progress=False).get_input_embeddings()
        assert isinstance(emb, QuantEmbedding) and emb(ids).shape == (2, 3, 256)
        assert torch.equal(emb(ids), table[ids].to(dtype))
        monkeypatch.setattr(kernels, "has_streaming_kernels", lambda: False)
        assert torch.equal(emb(ids), table[ids].to(dtype))
        monkeypatch.undo()


def _moe_256():  # K-quants need rows of 256: experts of 256 x 256
    return tiny_model("glm4_moe", moe_intermediate_size=256, intermediate_size=256, hidden_size=256, head_dim=64)


def test_kquant_moe_experts_stay_quantized(tmp_path, monkeypatch):
    # Q4_K_M's choice for experts: gate / up q4_K, down q6_K; everything else q8_0
    model = _moe_256()
    types = {"blk.1.ffn_gate_exps.weight": T.Q4_K, "blk.1.ffn_up_exps.weight": T.Q4_K,
             "blk.1.ffn_down_exps.weight": T.Q6_K}
    held = write_gguf(tmp_path / "m.gguf", model, T.Q8_0, types=types)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dequantized to")
        got = load_model(tmp_path / "m.gguf", progress=False)
    assert _quant_counts(got) == (16, 0)  # dense MLP, shared expert, attention, head and embedding table
    experts = got.model.layers[1].mlp.experts
    assert isinstance(experts, StreamExperts) and not any(isinstance(m, StackedExperts) for m in got.modules())
    gu, down = experts.gate_up, experts.down
    if kernels.has_streaming_kernels():  # the file's blocks as they are: 144 / 210 bytes per 256 weights
        assert (gu.ggml_type, gu.blocks.shape, gu.qweight) == (T.Q4_K, (8, 512, 144), None)
        assert (down.ggml_type, down.blocks.shape, down.qweight) == (T.Q6_K, (8, 256, 210), None)
    else:  # QuantLinear's codes
        assert (gu.bits, gu.group_size, gu.mins is not None, gu.qweight.shape) == (4, 32, True, (8, 512, 128))
        assert (down.bits, down.group_size, down.mins is None, down.qweight.shape) == (8, 16, True, (8, 256, 256))
    ref = reference(model, held, tmp_path / "ref")
    assert_matches_dequantized(got, ref)  # decode: expert_glu; the rows of every expert equal gguf-py's
    # prefill: more tokens than the one-op dispatch takes, each busy expert's rows dequantized into a GEMM (and
    # those with few tokens through the streaming kernel)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    assert_close(logits(got, ids), logits(ref, ids))
    monkeypatch.setattr(kernels, "has_streaming_kernels", lambda: False)  # no kernels: a GEMM per busy expert
    assert_close(logits(got), logits(ref))


def test_moe_experts_of_mixed_types_are_dequantized_into_stacks(tmp_path):
    # gate q4_K but up q5_K: gate|up rows cannot share one format, so the layer runs dense (with a warning)
    model = _moe_256()
    types = {"blk.1.ffn_gate_exps.weight": T.Q4_K, "blk.1.ffn_up_exps.weight": T.Q5_K,
             "blk.1.ffn_down_exps.weight": T.Q6_K}
    held = write_gguf(tmp_path / "m.gguf", model, T.Q8_0, types=types)
    with pytest.warns(UserWarning, match=r"3 quantized tensor\(s\) outside linear layers \('blk\.1\.ffn_\w+_exps"):
        got = load_model(tmp_path / "m.gguf", progress=False)
    assert _quant_counts(got) == (16, 0)
    experts = got.model.layers[1].mlp.experts
    assert isinstance(experts, StackedExperts) and experts.gate_up_proj.dtype == torch.float32
    ref = reference(model, held, tmp_path / "ref")
    assert torch.equal(experts.gate_up_proj, ref.model.layers[1].mlp.experts.gate_up_proj)
    assert torch.equal(experts.down_proj, ref.model.layers[1].mlp.experts.down_proj)
    assert_matches_dequantized(got, ref)


# ---- tokenizer and chat template -------------------------------------------------------------------------------

CORPUS = ["你好，世界！今天天气很好。", "Hello world, hello GLM-4 tokenizer 12345 and 2024.", "def f(x):\n    return x*2\n",
          "The quick brown fox jumps over the lazy dog. 我们一起学习。", "  spaces   and\ttabs\n\nnew lines"] * 20


def _glm_tokenizer_json(folder: Path) -> Path:
    """A small byte-level BPE tokenizer.json in GLM-4's -hf layout (GLM-4 regex split + byte level, specials added;
    `<think>` a non-special added token as in GLM-4.5)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GLM4_PAT_STR), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(GLM4_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, trainer)
    t.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    folder.mkdir(parents=True, exist_ok=True)
    t.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def _gguf_vocab(tok_json: Path, pad_to: int):
    """tokenizer.ggml.* as the converter's get_vocab_base + SpecialVocab write them."""
    spec = json.loads(tok_json.read_text())
    vocab = {**spec["model"]["vocab"], **{a["content"]: a["id"] for a in spec["added_tokens"]}}
    rev = {i: s for s, i in vocab.items()}
    added = {a["content"]: a["special"] for a in spec["added_tokens"]}
    tokens, types = [], []
    for i in range(pad_to):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(rev[i])
            types.append(gguf.TokenType.NORMAL if rev[i] not in added else
                         gguf.TokenType.CONTROL if added[rev[i]] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("glm4")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(vocab["<|endoftext|>"])
        w.add_eot_token_id(vocab["<|user|>"])
        w.add_unk_token_id(vocab["<|endoftext|>"])
        w.add_bos_token_id(vocab["[gMASK]"])
        w.add_add_bos_token(False)

    return add, vocab


TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_tokenizer_and_chat_template_from_gguf(tmp_path):
    tok_json = _glm_tokenizer_json(tmp_path / "hf")
    add, vocab = _gguf_vocab(tok_json, pad_to=416)
    model = tiny_model("glm4", vocab_size=416)
    p = tmp_path / "tok.gguf"
    write_gguf(p, model, tokenizer=add, template=TEMPLATE)

    ref = HFTokenizer(tok_json)
    tok = load_tokenizer(p)
    assert tok.vocab_size == 416 and len(tok.special_tokens) == len(GLM4_SPECIAL_TOKENS)
    assert tok.special_tokens == ref.special_tokens and "<think>" not in tok.special_tokens
    texts = CORPUS[:5] + ["<|user|> is plain text here", "<think>x</think>", "emoji 🙂 and ünïcödé", "123456789"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("<|user|>hi", allow_special=True)[0] == vocab["<|user|>"]
    assert tok.eos_token_ids == [vocab["<|endoftext|>"], vocab["<|user|>"], vocab["<|observation|>"]]
    assert tok.decode([410, 411]) == "[PAD410][PAD411]"

    fmt = ChatFormat.for_checkpoint(p)
    assert fmt.family == "glm4" and fmt.template_source == TEMPLATE
    ids = fmt.encode(tok, [{"role": "user", "content": "你好 <|assistant|>"}])
    assert ids[:2] == [vocab["[gMASK]"], vocab["<sop>"]] and ids[-1] == vocab["<|assistant|>"]
    assert ids.count(vocab["<|assistant|>"]) == 1  # the one in the message text stays plain text

    # the model's config takes its eos ids from the vocabulary
    assert load_model(p, progress=False).config.eos_token_ids == tok.eos_token_ids
    # a folder holding only the .gguf (and its unrelated tokenizer folder) is the GGUF checkpoint
    only = tmp_path / "only"
    only.mkdir()
    p.rename(only / "x.gguf")
    assert load_tokenizer(only).encode("hello") == ref.encode("hello")
    assert ChatFormat.for_checkpoint(only).template_source == TEMPLATE


def test_chat_family_from_architecture_without_template(tmp_path):
    p = _model_file(tmp_path)
    fmt = ChatFormat.for_checkpoint(p)
    assert fmt.family == "glm4" and fmt.template_source is None
    model = tiny_model("glm4_moe")
    write_gguf(tmp_path / "moe.gguf", model)
    assert ChatFormat.for_checkpoint(tmp_path / "moe.gguf").family == "glm4_moe"


# ---- entry points ----------------------------------------------------------------------------------------------

def test_llm_and_generate_cli_open_gguf(tmp_path, capsys):
    import glm4
    from glm4.reference import main

    tok_json = _glm_tokenizer_json(tmp_path / "hf")
    add, vocab = _gguf_vocab(tok_json, pad_to=416)
    model = tiny_model("glm4", vocab_size=416)
    folder = tmp_path / "only"
    folder.mkdir()
    p = folder / "model.gguf"
    held = write_gguf(p, model, tokenizer=add, template=TEMPLATE)
    ref = reference(model, held, tmp_path / "ref")

    assert glm4.load_model is load_model
    llm = glm4.LLM(p, kv_cache_tokens=256, max_model_len=128)
    assert llm.path == p and llm.tokenizer is not None
    prompt = [3, 17, 42, 99]
    out = llm.generate([prompt], glm4.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    want = glm4.generate(ref, torch.tensor([prompt]), max_new_tokens=6, temperature=0.0)[0, 4:].tolist()
    assert out[0].token_ids == want
    assert glm4.LLM(folder, kv_cache_tokens=256, max_model_len=128).path == p  # a folder holding one .gguf

    assert main(["--model", str(p), "--prompt-ids", "3,17,42", "--max-new-tokens", "3"]) == 0
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(p.read_bytes()[:300])
    assert main(["--model", str(bad), "--prompt-ids", "3,17", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "bad.gguf" in err and "truncated" in err and "Traceback" not in err
