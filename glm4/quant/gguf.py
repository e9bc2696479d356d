"""GGUF checkpoints of the GLM architectures, loaded as they are: `load_gguf_model(path, dtype, device)`.

llama.cpp's converter (`convert_hf_to_gguf.py`, conversion/chatglm.py and glm.py) writes the HF tensors under
its own names without permuting anything for these architectures (llama.cpp rotates GLM q/k with the same pair
layout the checkpoint uses: NORM = interleaved for chatglm / glm4, NEOX halves for glm4moe), so loading is a
renaming plus three re-layouts:

    general.architecture  ->  model_type (glm4.models)
    chatglm                   chatglm when q/k/v come fused (`attn_qkv`, glm-4-9b-chat), else glm (the -hf twin)
    glm4                      glm4      (GLM-4-0414; `attn_qkv` from `--fuse-qkv` is split into q/k/v rows)
    glm4moe                   glm4_moe  (GLM-4.5; experts stacked [E, ...] as ffn_{gate,up,down}_exps)

    blk.{i}.attn_norm -> input_layernorm            attn_q/k/v, attn_qkv -> self_attn.{q,k,v}_proj (rows q|k|v)
    attn_output -> self_attn.o_proj                 attn_q_norm / attn_k_norm -> self_attn.q_norm / k_norm
    ffn_up (2*I rows, gate first) -> mlp.gate_up_proj (glm, glm4), mlp.dense_h_to_4h (chatglm)
    glm4:  post_attention_norm -> post_self_attn_layernorm, ffn_norm -> post_attention_layernorm,
           post_ffw_norm -> post_mlp_layernorm
    glm4moe: post_attention_norm -> post_attention_layernorm, ffn_gate_inp -> mlp.gate, exp_probs_b -> the
           router's e_score_correction_bias, ffn_{gate,up}_exps -> mlp.experts.gate_up_proj[:, :I | I:],
           ffn_down_exps -> mlp.experts.down_proj, ffn_*_shexp -> mlp.shared_experts.*
    MTP layers (blk.{i >= block_count - nextn_predict_layers}) and rope_freqs are skipped; no `output` = tied.

Quantized linear weights (q8_0, q4_0, q4_1, q4_K, q5_K, q6_K) become `QuantLinear` modules holding the file's
codes and scales (glm4/quant/gguf_quants.py): never expanded to fp32. A quantized token embedding stays as the
file holds it too (`QuantEmbedding`: the looked-up rows are dequantized), and a tied output projection is the
same quantized table. Quantized MoE experts stay quantized too: a glm4moe layer whose ffn_{gate,up,down}_exps are
quantized (gate and up of one type; down may differ, as in Q4_K_M) gets a `StreamExperts` (glm4/quant/experts.py)
holding the file's codes, [E, 2I, H] gate|up and [E, H, I] down (K-quant types in their blocks, as KQuantLinear
holds them), in place of its StackedExperts; experts that mix types or float and quantized tensors are dequantized
into the stacked tensors (with a warning). f32 / f16 / bf16 tensors are copied into the requested dtype. The file
is read, not mapped (_TensorBytes). The config comes from the metadata (glm4/quant/gguf_config.py).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from glm4.tokenizer.gguf_meta import GGUFError, GGUFHeader, read_gguf_header
from glm4.weights import CheckpointError, materialize_, meta_model, resolve_device, resolve_dtype

from . import kernels
from .experts import ExpertPack, StreamExperts
from .gguf_config import ARCHITECTURES, _fail, gguf_config
from .gguf_quants import FLOAT_TYPES, QUANT_TYPES, SUPPORTED, codes, dequantize
from .kquant import BLOCK_BYTES as KQUANT_BLOCKS
from .kquant import KQuantLinear
from .qlinear import QuantEmbedding, QuantLinear

__all__ = ["ARCHITECTURES", "gguf_config", "load_gguf_model"]

_CHUNK_ELEMS = 1 << 22  # dequantize at most this many weights at a time (a 16 MB fp32 buffer)

_GLM_BLOCK = {  # GGUF block-tensor suffix -> checkpoint suffix (glm, glm4, glm4_moe)
    "attn_norm.weight": "input_layernorm.weight", "attn_output.weight": "self_attn.o_proj.weight",
    **{f"attn_{x}.{p}": f"self_attn.{x}_proj.{p}" for x in "qkv" for p in ("weight", "bias")},
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_BLOCK = {
    "chatglm": {"attn_norm.weight": "input_layernorm.weight", "attn_qkv.weight": "self_attention.query_key_value.weight",
                "attn_qkv.bias": "self_attention.query_key_value.bias", "attn_output.weight": "self_attention.dense.weight",
                "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_up.weight": "mlp.dense_h_to_4h.weight",
                "ffn_down.weight": "mlp.dense_4h_to_h.weight"},
    "glm": {**_GLM_BLOCK, "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_up.weight": "mlp.gate_up_proj.weight",
            "ffn_down.weight": "mlp.down_proj.weight"},
    "glm4": {**_GLM_BLOCK, "post_attention_norm.weight": "post_self_attn_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight", "post_ffw_norm.weight": "post_mlp_layernorm.weight",
             "ffn_up.weight": "mlp.gate_up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"},
    "glm4_moe": {**_GLM_BLOCK, "post_attention_norm.weight": "post_attention_layernorm.weight",
                 **{f"ffn_{x}.weight": f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")},
                 **{f"ffn_{x}_shexp.weight": f"mlp.shared_experts.{x}_proj.weight" for x in ("gate", "up", "down")},
                 "ffn_gate_inp.weight": "mlp.gate.weight", "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
                 "ffn_gate_up_exps.weight": "mlp.experts.gate_up_proj", "ffn_down_exps.weight": "mlp.experts.down_proj"},
}
_GLOBAL = {  # (non-block tensors, block prefix)
    "chatglm": ({"token_embd.weight": "transformer.embedding.word_embeddings.weight",
                 "output_norm.weight": "transformer.encoder.final_layernorm.weight",
                 "output.weight": "transformer.output_layer.weight"}, "transformer.encoder.layers."),
    "glm": ({"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}, "model.layers."),
}
_BLK = re.compile(r"blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class _Entry:
    gguf: str  # GGUF tensor name
    target: str  # checkpoint name (glm4.models parameter / buffer)
    rows: tuple[int, int] | None = None  # a row range of the GGUF tensor (fused q|k|v split)
    dst: tuple | None = None  # an index into the target (stacked gate|up halves, q/k/v biases into a fused one)


def _plan(hdr: GGUFHeader, config) -> list[_Entry]:
    """One entry per (GGUF tensor, checkpoint target) pair; unexpected GGUF tensors raise CheckpointError."""
    mt = config.model_type
    glob, prefix = _GLOBAL["chatglm" if mt == "chatglm" else "glm"]
    block = _BLOCK[mt]
    L, hd = config.num_hidden_layers, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    qkv_rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    out: list[_Entry] = []
    for name in hdr.tensors:
        if name == "rope_freqs.weight":
            continue
        if name in glob:
            out.append(_Entry(name, glob[name]))
            continue
        m = _BLK.match(name)
        if m is None:
            _fail(hdr.path, f"unexpected tensor {name!r} for architecture {hdr.architecture}")
        i, suffix = int(m.group(1)), m.group(2)
        if i >= L:
            continue  # MTP / NextN layers
        p = f"{prefix}{i}."
        kind, _, part = suffix.partition(".")
        if mt == "chatglm" and kind in ("attn_q", "attn_k", "attn_v") and part == "bias":  # legacy split biases
            a, b = qkv_rows[kind[-1]]
            out.append(_Entry(name, p + block["attn_qkv.bias"], dst=(slice(a, b),)))
        elif mt != "chatglm" and kind == "attn_qkv":
            out += [_Entry(name, p + f"self_attn.{x}_proj.{part}", rows=r) for x, r in qkv_rows.items()]
        elif mt == "glm4_moe" and kind in ("ffn_gate_exps", "ffn_up_exps") and part == "weight":
            inter = config.moe_intermediate_size
            half = slice(0, inter) if kind == "ffn_gate_exps" else slice(inter, 2 * inter)
            out.append(_Entry(name, p + "mlp.experts.gate_up_proj", dst=(slice(None), half)))
        elif suffix in block:
            out.append(_Entry(name, p + block[suffix]))
        else:
            _fail(hdr.path, f"unexpected tensor {name!r} for architecture {hdr.architecture} (read as {mt})")
    return out


def _gguf_name_for(target: str, config) -> str:
    """The GGUF tensor expected to provide checkpoint name `target` (for error messages)."""
    mt = config.model_type
    glob, prefix = _GLOBAL["chatglm" if mt == "chatglm" else "glm"]
    rev = {v: k for k, v in glob.items()}
    if target in rev:
        return rev[target]
    m = re.match(re.escape(prefix) + r"(\d+)\.(.+)$", target)
    if m:
        brev = {v: k for k, v in _BLOCK[mt].items()}
        return f"blk.{m.group(1)}.{brev.get(m.group(2), m.group(2))}"
    return target


class _TensorBytes:
    """A GGUF file's tensor bytes, read on demand (os.preadv) into arrays this process owns. Not a memory map: the
    mapped file's pages counted in the process's RSS beside the weights kept from them (loading the 400M bench
    checkpoint's q4_K_M file, 0.26 GiB, peaked at 775 MiB mapped, 516 read; 221 MiB of either is torch itself)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, os.open(path, os.O_RDONLY)

    def rows(self, info, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor's bytes as [rows, row_bytes] (a row range of it); a 1-D float tensor is a column."""
        shape = info.shape
        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else (shape[0] if info.ggml_type in FLOAT_TYPES else 1)
        row_bytes = info.nbytes // n_rows
        r0, r1 = rows or (0, n_rows)
        out = np.empty((r1 - r0, row_bytes), dtype=np.uint8)
        view, pos = memoryview(out).cast("B"), info.offset + r0 * row_bytes
        while view.nbytes:  # Linux reads at most ~2 GiB a call
            n = os.preadv(self.fd, [view], pos)
            if n <= 0:
                _fail(self.path, f"truncated file: tensor {info.name!r} ends past the end of the file")
            view, pos = view[n:], pos + n
        return out

    def __enter__(self) -> _TensorBytes:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _float_tensor(raw: np.ndarray, gtype: int) -> torch.Tensor:
    if gtype == 30:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw.view(np.float32 if gtype == 0 else np.float16))


def _quant_linear(raw: np.ndarray, gtype: int, linear: nn.Linear, dtype: torch.dtype) -> QuantLinear | KQuantLinear:
    """A QuantLinear holding the GGUF codes / scales of a [out, in] quantized weight (bias filled later); q4_K and
    q6_K stay in their blocks (KQuantLinear: 4.5 / 6.56 bits a weight, not 6 / 10) where glm4's kernels run."""
    if gtype in KQUANT_BLOCKS and kernels.has_streaming_kernels() and linear.in_features % 256 == 0:
        m = KQuantLinear(linear.in_features, linear.out_features, gtype, bias=linear.bias is not None, dtype=dtype)
        m.blocks = _owned(raw)
        return m
    c = codes(raw, gtype)
    sdt = torch.float16 if c.scales.dtype == np.float16 else torch.float32
    with torch.device("meta"):
        m = QuantLinear(linear.in_features, linear.out_features, bits=c.bits, group_size=c.group,
                        zero_point=c.zero_point, has_mins=c.mins is not None, scale_dtype=sdt)
    qw = c.packed if c.bits == 4 else c.q.astype(np.int8, copy=False)  # 8-bit codes here are all within 0..127
    m.qweight, m.scales = _owned(qw), _owned(c.scales)
    if c.mins is not None:
        m.mins = _owned(c.mins)
    if linear.bias is not None:
        m.bias = torch.empty(linear.out_features, dtype=dtype)
    return m


def _owned(x: np.ndarray) -> torch.Tensor:
    # the array itself where it is contiguous (the file's bytes as read, or codes made from them), else a copy
    return torch.from_numpy(np.ascontiguousarray(x))


def _streamed_experts(plan: list[_Entry], hdr: GGUFHeader) -> dict[str, tuple[list[_Entry], list[_Entry]]]:
    """{experts module: (gate|up entries, gate first; down entries)} for each glm4_moe layer whose expert tensors
    are all quantized, gate and up of one type (so one format: rows concatenate exactly)."""
    layers: dict[str, tuple[list[_Entry], list[_Entry]]] = {}
    for e in plan:
        if e.target.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            module, _, kind = e.target.rpartition(".")
            layers.setdefault(module, ([], []))[kind == "down_proj"].append(e)

    def one_type(es: list[_Entry]) -> bool:
        types = {hdr.tensors[e.gguf].ggml_type for e in es}
        return len(types) == 1 and types <= QUANT_TYPES.keys()

    return {m: (sorted(gu, key=lambda e: e.dst[1].start if e.dst else 0), down)
            for m, (gu, down) in layers.items() if gu and down and one_type(gu) and one_type(down)}


def _expert_pack(file: _TensorBytes, hdr: GGUFHeader, entries: list[_Entry], num_experts: int) -> ExpertPack:
    """The experts' codes of 3-D tensors [E, R_i, K] of one quantized type, each expert's rows of every entry
    concatenated (gate then up), as one ExpertPack: K-quant blocks as the file holds them where glm4's kernels run
    them, else QuantLinear's codes decoded one expert at a time (no whole-tensor temporaries)."""
    gtype, K = hdr.tensors[entries[0].gguf].ggml_type, hdr.tensors[entries[0].gguf].shape[-1]
    raws = [file.rows(hdr.tensors[e.gguf]) for e in entries]
    raws = [r.reshape(num_experts, -1, r.shape[1]) for r in raws]
    if gtype in KQUANT_BLOCKS and kernels.has_streaming_kernels() and K % 256 == 0:  # the blocks as they are
        return ExpertPack(blocks=torch.from_numpy(np.concatenate(raws, axis=1)), ggml_type=gtype)
    out: list[torch.Tensor] = []
    for x in range(num_experts):
        c = codes(np.concatenate([r[x] for r in raws]), gtype)
        parts = [c.packed if c.bits == 4 else c.q.astype(np.int8, copy=False), c.scales]  # 8-bit codes < 128
        ts = [torch.from_numpy(np.ascontiguousarray(a)) for a in parts + ([c.mins] if c.mins is not None else [])]
        out = out or [t.new_empty(num_experts, *t.shape) for t in ts]
        for o, t in zip(out, ts):
            o[x] = t
    return ExpertPack(bits=c.bits, group_size=c.group, zero_point=c.zero_point, qweight=out[0], scales=out[1],
                      mins=out[2] if len(out) > 2 else None)


def _copy_dequantized(target: torch.Tensor, raw: np.ndarray, gtype: int) -> None:
    """target = the dequantized raw rows, a bounded number of rows at a time (1-D, 2-D or stacked 3-D targets,
    views allowed): never the whole tensor in fp32 at once."""
    views = list(target) if target.dim() == 3 else [target.view(1, -1) if target.dim() == 1 else target]
    start = 0
    for v in views:  # [R, K]
        step = max(1, _CHUNK_ELEMS // v.shape[1])
        for r in range(0, v.shape[0], step):
            k = min(step, v.shape[0] - r)
            v[r:r + k].copy_(torch.from_numpy(dequantize(raw[start + r:start + r + k], gtype)))
        start += v.shape[0]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", progress: bool = True) -> nn.Module:
    """Load a GGUF file of a GLM architecture into an eval-mode model; `dtype` is the activation dtype and that
    of every unquantized tensor. CheckpointError names the file, the tensor and what is supported."""
    path, dtype, device = Path(path), resolve_dtype(dtype), resolve_device(device)
    try:
        hdr = read_gguf_header(path)
    except GGUFError as e:
        raise CheckpointError(str(e)) from None
    config = gguf_config(hdr)
    plan = _plan(hdr, config)
    for e in plan:
        info = hdr.tensors[e.gguf]
        if info.ggml_type not in SUPPORTED:
            _fail(path, f"tensor {e.gguf!r} has type {info.type_name}, which glm4 does not load (supported: "
                  f"{', '.join(SUPPORTED.values())})")

    model = meta_model(config, dtype)
    fused = {e.target for e in plan if e.target.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    sd = model.checkpoint_state_dict(checkpoint_keys=fused) if config.model_type == "glm4_moe" \
        else model.checkpoint_state_dict()
    head = "lm_head" if config.model_type != "chatglm" else "transformer.output_layer"
    modules = dict(model.named_modules())

    # which entries become QuantLinears: a quantized GGUF tensor that is a whole nn.Linear weight
    quant: list[_Entry] = []
    covered: dict[str, int] = {}
    for e in plan:
        info = hdr.tensors[e.gguf]
        if e.target not in sd:
            _fail(path, f"tensor {e.gguf!r} maps to {e.target!r}, which {type(model).__name__} does not have")
        tgt = sd[e.target] if e.dst is None else sd[e.target][e.dst]
        rows = (e.rows[1] - e.rows[0],) + info.shape[1:] if e.rows else info.shape
        if tuple(tgt.shape) != tuple(rows):
            _fail(path, f"tensor {e.gguf!r} has shape {list(rows)}, the model expects {list(tgt.shape)} for "
                  f"{e.target!r}")
        covered[e.target] = covered.get(e.target, 0) + tgt.numel()
        lin = modules.get(e.target.removesuffix(".weight"))
        if info.ggml_type in QUANT_TYPES and e.dst is None and type(lin) is nn.Linear and e.target.endswith(".weight"):
            quant.append(e)
    missing = [k for k, t in sd.items() if covered.get(k, 0) != t.numel()]
    if missing:
        shown = ", ".join(repr(_gguf_name_for(k, config)) for k in missing[:6])
        _fail(path, f"missing tensor(s) {shown}{f' and {len(missing) - 6} more' if len(missing) > 6 else ''}")
    emb_info = hdr.tensors["token_embd.weight"]
    emb_target = _GLOBAL["chatglm" if config.model_type == "chatglm" else "glm"][0]["token_embd.weight"]
    quant_emb = emb_info.ggml_type in QUANT_TYPES  # the table stays quantized (QuantEmbedding), a tied head shares it

    streamed = _streamed_experts(plan, hdr)  # quantized MoE experts: a StreamExperts of the file's codes
    swapped = {e.target for e in quant} | {e.target for es in streamed.values() for part in es for e in part}
    if quant_emb:
        swapped |= {emb_target, head + ".weight"} if config.tie_word_embeddings else {emb_target}
    dense = [e.gguf for e in plan if hdr.tensors[e.gguf].ggml_type in QUANT_TYPES and e.target not in swapped]
    if dense:
        warnings.warn(f"{path.name}: {len(dense)} quantized tensor(s) outside linear layers ({dense[0]!r}, ...) are "
                      f"dequantized to {str(dtype).removeprefix('torch.')} (MoE experts whose gate and up differ "
                      f"in type, or mix float and quantized tensors, run as stacked dense tensors)", stacklevel=3)

    with _TensorBytes(path) as file, torch.no_grad():
        for e in _progress(quant, progress, f"Quantized linears of {path.name}"):
            name = e.target.removesuffix(".weight")
            info = hdr.tensors[e.gguf]
            ql = _quant_linear(file.rows(info, e.rows), info.ggml_type, modules[name], dtype)
            _swap(model, name, ql.to(device))
        if quant_emb:
            with torch.device("meta"):
                shape = nn.Linear(config.hidden_size, emb_info.shape[0], bias=False)
            table = _quant_linear(file.rows(emb_info), emb_info.ggml_type, shape, dtype).to(device)
            _swap(model, emb_target.removesuffix(".weight"), QuantEmbedding(table, dtype))
            if config.tie_word_embeddings:
                _swap(model, head, table)
        for name, (gate_up, down) in _progress(list(streamed.items()), progress, f"MoE experts of {path.name}"):
            packs = [_expert_pack(file, hdr, es, config.n_routed_experts) for es in (gate_up, down)]
            _swap(model, name, StreamExperts(*packs).to(device))
        materialize_(model, device)
        real = dict(model.named_parameters()) | dict(model.named_buffers())
        for e in _progress(plan, progress, f"Tensors of {path.name}"):
            if e.target in swapped:
                continue
            info = hdr.tensors[e.gguf]
            tgt = real[e.target] if e.dst is None else real[e.target][e.dst]
            raw = file.rows(info, e.rows)
            if info.ggml_type in FLOAT_TYPES:
                tgt.copy_(_float_tensor(raw, info.ggml_type).reshape(tgt.shape))
            else:
                _copy_dequantized(tgt, raw, info.ggml_type)
    if hasattr(model, "post_load"):
        model.post_load()
    return model.eval()


def _progress(items: list, enabled: bool, desc: str):
    if not enabled or not items:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="tensor", disable=None, leave=False)
