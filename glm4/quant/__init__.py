"""Weight-only quantization and fast CPU linears, swapped into a built model (module swap, STYLE rule 7).

    model = quantize(model, "int8")      # or "int6" / "int4" (group_size=32/64/128), "float" (fp32/bf16/fp16
                                         # storage), "packed" (oneDNN fp32/bf16), None
    model = dequantize(model)            # back to nn.Linear (export)

Every nn.Linear is replaced by `X.from_base(linear)`; embeddings, norms and MoE routers are left alone.
With glm4's CPU kernels (glm4.quant.kernels) int8 / int4 become QuantLinear, run by them; without, torch's
weight-only kernels (WeightOnlyInt8Linear / WeightOnlyInt4Linear).
"""

from __future__ import annotations

import fnmatch
import warnings

import torch
from torch import nn

from glm4.layers.moe import StackedExperts

from . import kernels
from .experts import ExpertPack, StreamExperts
from .fast_linear import PackedLinear, QuantizationError, has_op
from .float_linear import CastEmbedding, FloatLinear
from .int4 import WeightOnlyInt4Linear, quantize_int4
from .int6 import GROUP_SIZES as INT6_GROUPS
from .int6 import quantize_int6
from .int8 import WeightOnlyInt8Linear, quantize_int8
from .kquant import KQuantLinear
from .qlinear import QuantEmbedding, QuantLinear, StreamingLinear

__all__ = ["HEAD_NAMES", "SCHEMES", "CastEmbedding", "FloatLinear", "KQuantLinear", "PackedLinear", "QuantEmbedding",
           "QuantLinear", "StreamExperts",
           "QuantizationError", "WeightOnlyInt4Linear", "WeightOnlyInt8Linear", "dequantize", "quantize",
           "quantize_weights_report", "set_activation_bits", "set_gemm_dtype", "warn_fallbacks"]

_SWAPPED = (PackedLinear, WeightOnlyInt8Linear, WeightOnlyInt4Linear, QuantLinear, KQuantLinear, FloatLinear,
            StreamExperts)

SCHEMES = ("int8", "int6", "int4", "float", "packed")
SCHEME_BITS = {"int8": 8, "int6": 6, "int4": 4}
_QUANT_ROWS = 1024  # rows quantized at a time: the temporaries of a 151552-row LM head stay small


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Scales as fp16 where every value survives the trip exactly (half the bytes), else fp32."""
    h = t.to(torch.float16)
    return h if torch.equal(h.float(), t.float()) else t.float()


def quant_linear(linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
    """Our int8 (per channel, symmetric, round-to-nearest), int6 (per group, symmetric, least-squares scale) or int4
    (per group, asymmetric, round-to-nearest) as a QuantLinear, quantized a row chunk at a time (no full-size
    temporaries of a 151552-row head)."""
    w = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    q = torch.empty(w.shape, dtype=torch.int8 if bits == 8 else torch.uint8)
    scales, zeros = [], []
    for i in range(0, w.shape[0], _QUANT_ROWS):
        rows = w[i:i + _QUANT_ROWS]
        qi, si, *zi = (quantize_int8(rows) if bits == 8 else quantize_int6(rows, group_size) if bits == 6
                       else quantize_int4(rows, group_size))  # int4 also gives zeros: W = (q - 8) s + z
        q[i:i + _QUANT_ROWS] = qi
        scales.append(si), zeros.extend(zi)
    if bits == 8:
        return QuantLinear.from_codes(q, _compact(torch.cat(scales)[:, None]), bits=8, group_size=w.shape[1],
                                      bias=bias)
    if bits == 6:
        return QuantLinear.from_codes(q, torch.cat(scales), bits=6, group_size=group_size, zero_point=32, bias=bias)
    return QuantLinear.from_codes(q, _compact(torch.cat(scales)), _compact(torch.cat(zeros)), bits=4,
                                  group_size=group_size, zero_point=8, bias=bias)


HEAD_NAMES = ("lm_head", "output_layer")  # glm/glm4/glm4_moe, chatglm (transformer.output_layer)
HEAD_INT6_GROUP = 128  # the 6-bit head where q6_K blocks do not fit: 6.125 bits a weight; 64 where 128 does not fit
HEAD_SCHEMES = (*SCHEMES, "q6_K")  # q6_K: GGUF's 6-bit blocks (KQuantLinear), for the output head only


def _swap(linear: nn.Linear, scheme: str, group_size: int, name: str, dtype: torch.dtype | None,
          fallbacks: list[str]) -> nn.Module:
    """The swapped module for one linear; where the scheme does not fit it as asked, what it got instead is appended
    to `fallbacks` (quantize warns once for all of them)."""
    if scheme == "q6_K":
        return KQuantLinear.from_linear(linear)
    if scheme == "float":
        return FloatLinear.from_base(linear, dtype)
    if scheme == "packed":
        return PackedLinear.from_base(linear, dtype)
    if kernels.has_streaming_kernels():
        bits = SCHEME_BITS[scheme]
        if bits < 8 and linear.in_features % group_size:
            groups = INT6_GROUPS if bits == 6 else (32, 64, 128)
            smaller = [g for g in reversed(groups) if g < group_size and linear.in_features % g == 0]
            fallbacks.append(f"{name}: in_features {linear.in_features} not a multiple of group_size {group_size}; "
                             + (f"group_size {smaller[0]}" if smaller else "int8"))
            return quant_linear(linear, bits, smaller[0]) if smaller else quant_linear(linear, 8, 0)
        return quant_linear(linear, bits, group_size)
    if scheme in ("int8", "int6"):  # torch's kernels have no 6-bit format: int8 keeps the accuracy
        return WeightOnlyInt8Linear.from_base(linear)
    if linear.in_features % group_size or not has_op("int4"):
        why = (f"in_features {linear.in_features} not a multiple of group_size {group_size}" if has_op("int4")
               else "this torch build lacks the CPU int4 kernel")
        fallbacks.append(f"{name}: {why}; int8")
        return WeightOnlyInt8Linear.from_base(linear)
    return WeightOnlyInt4Linear.from_base(linear, group_size)


@torch.no_grad()
def quantize(model: nn.Module, scheme: str | None, *, group_size: int = 128, skip: tuple[str, ...] = (),
             head: str | None = "auto", dtype: torch.dtype | None = None, min_params: int = 0,
             within: str | None = None, fallbacks: list[str] | None = None) -> nn.Module:
    """Swap every nn.Linear of `model` in place and return it.

    scheme: "int8" (per-channel symmetric), "int4" (asymmetric, `group_size` columns per scale), "float"
        (FloatLinear: weight stored in `dtype`, fp32 arithmetic), "packed" (prepacked oneDNN weight in the
        linear's own dtype, exact), or None (no-op).
    skip: fnmatch patterns on qualified module names left as nn.Linear (e.g. ("*.mlp.gate_up_proj",)).
    head: scheme for the output projection (lm_head / output_layer): "auto" = 6 bits when scheme is int4 or int6
        (4-bit logits cost most accuracy for least size; GGUF's q4 and q6_K files keep theirs in q6_K): q6_K blocks
        where glm4's kernels run and in_features is a multiple of 256 (6.56 bits a weight, groups of 16: 1.8 % rms
        error against int6 g128's 2.5 %, and a shorter decode step: docs/kernels.md), else int6 in groups of 128;
        else the same scheme; "q6_K" asks for those blocks; None keeps it nn.Linear.
    dtype: weight dtype for "float" / "packed" (None = each linear's own; torch.bfloat16 halves the bytes of an fp32
        model at ~0.3 % error per matmul).
    min_params: linears with fewer weights stay nn.Linear (where the swapped kernel's per-call cost outweighs
        its streaming gain, see glm4.engine.llm.optimize_model).
    within: only the modules under this qualified name (one layer as the loader reads it, see
        glm4.weights.load_weights); choices are made on the full names, as for the whole model.
    fallbacks: a list to collect "linear: what it got" for the linears quantized otherwise than asked (group sizes
        that do not divide them) instead of one warning here (`warn_fallbacks` says them once).
    A tied output projection gets its own quantized copy; the embedding stays as it is.
    """
    if scheme is None:
        return model
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; choose from {SCHEMES} or None")
    auto_head, head_group = head == "auto", group_size
    if auto_head:
        head, head_group = ("q6_K" if kernels.has_streaming_kernels() else "int6", HEAD_INT6_GROUP) \
            if scheme in ("int4", "int6") else (scheme, group_size)
    if head is not None and head not in HEAD_SCHEMES:
        raise QuantizationError(f"unknown head scheme {head!r}; choose from {HEAD_SCHEMES}, 'auto' or None")
    if scheme == "int4" and group_size not in (32, 64, 128, 256):
        raise QuantizationError(f"int4 group_size must be 32, 64, 128 or 256, got {group_size}")
    if scheme == "int6" and group_size not in INT6_GROUPS:
        raise QuantizationError(f"int6 group_size must be one of {INT6_GROUPS}, got {group_size}")
    root = model.get_submodule(within) if within else model
    prefix = f"{within}." if within else ""
    targets = [(prefix + name if name else within, m) for name, m in root.named_modules() if type(m) is nn.Linear]
    targets.reverse()
    collect = fallbacks is not None
    fallbacks = fallbacks if collect else []
    while targets:  # popped as we go: each replaced weight is freed at once, not when the whole model is done
        name, linear = targets.pop()
        if any(fnmatch.fnmatchcase(name, pat) for pat in skip) or linear.weight.numel() < min_params:
            continue
        is_head = name.rsplit(".", 1)[-1] in HEAD_NAMES
        s = head if is_head else scheme
        if s is None:
            continue
        g = head_group if is_head else group_size
        if s == "q6_K" and (linear.in_features % 256 or not kernels.has_streaming_kernels()):
            if not auto_head:
                raise QuantizationError(f"{name}: q6_K needs glm4's kernels and in_features a multiple of 256, "
                                        f"got {linear.in_features}")
            s = "int6"  # auto's choice, not the user's: int6 in groups of 128 (or what fits, below)
        if is_head and auto_head and s == "int6" and linear.in_features % g:
            # auto's choice, not the user's: a smaller group that fits, else int8, without a warning
            g = next((x for x in reversed(INT6_GROUPS) if x < g and linear.in_features % x == 0), 0)
            s = "int6" if g else "int8"
        if linear.weight.device.type != "cpu":
            raise QuantizationError(f"{name}: CPU kernels only, weight is on {linear.weight.device}")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _swap(linear, s, g, name, dtype, fallbacks))
    if not collect:
        warn_fallbacks(scheme, fallbacks, stacklevel=4)
    if scheme in ("int8", "int6", "int4", "float") and kernels.has_streaming_kernels():
        # MoE experts: streamed as stored ("float") or quantized like the linears; else torch's grouped matmul
        packs = [(prefix + n if n else within, m) for n, m in root.named_modules() if isinstance(m, StackedExperts)]
        packs.reverse()
        while packs:
            name, m = packs.pop()
            if any(fnmatch.fnmatchcase(name, pat) for pat in skip) or m.gate_up_proj.device.type != "cpu":
                continue
            if scheme == "float" and dtype is not None:
                m = m.to(dtype)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                    StreamExperts.from_stacked(m, None if scheme == "float" else scheme, group_size))
    return model


def warn_fallbacks(scheme: str, fallbacks: list[str], stacklevel: int = 2) -> None:
    """One warning for the linears quantized otherwise than asked (a 92-layer model would print hundreds)."""
    if fallbacks:
        shown = "; ".join(fallbacks[:4]) + (f"; and {len(fallbacks) - 4} more" if len(fallbacks) > 4 else "")
        warnings.warn(f"{scheme}: {len(fallbacks)} linear(s) quantized otherwise than asked: {shown}",
                      stacklevel=stacklevel)


@torch.no_grad()
def dequantize(model: nn.Module) -> nn.Module:
    """Undo quantize(): every swapped module back to an nn.Linear with its effective weight (in place), a quantized
    embedding (a GGUF file's) back to an nn.Embedding, a head tied to it tied again. Needed before exporting a
    checkpoint: swapped modules hold buffers, not the `weight` parameter."""
    modules = list(model.named_modules(remove_duplicate=False))  # a tied head is its embedding's table too
    tables = {f"{name}.table" for name, m in modules if isinstance(m, QuantEmbedding)}
    tied = False
    for name, m in modules:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(m, QuantEmbedding):
            table = m.table.dequantize(m.compute_dtype)
            setattr(parent, attr, nn.Embedding.from_pretrained(table, freeze=False))
            tied = tied or m.table is getattr(model, "get_output_embeddings", lambda: None)()
        elif isinstance(m, _SWAPPED) and name not in tables:
            back = m.to_stacked() if isinstance(m, StreamExperts) else m.to_linear()
            setattr(parent, attr, back)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


@torch.no_grad()
def quantize_weights_report(model_fp32: nn.Module, model_q: nn.Module, inputs: torch.Tensor) -> dict:
    """Errors of `model_q` against `model_fp32` on `inputs` (token ids [B, T]).

    Returns {"logits_max_rel_err": max|Δlogits| / max|logits|, "top1_agreement": fraction of positions
    with the same argmax, "linears": {name: max|Δy| / max|y|} for each swapped linear, fed the fp32
    model's own input to that linear}.
    """
    captured: dict[str, torch.Tensor] = {}
    q_modules = dict(model_q.named_modules())
    def capture(name):
        def hook(mod, args, out):  # must return None: a returned value would replace the output
            captured.setdefault(name, args[0])
        return hook

    hooks = [m.register_forward_hook(capture(name)) for name, m in model_fp32.named_modules()
             if type(m) is nn.Linear and name in q_modules and type(q_modules[name]) is not nn.Linear]
    try:
        ref = model_fp32(inputs).float()
    finally:
        for h in hooks:
            h.remove()
    out = model_q(inputs).float()
    fp32_modules = dict(model_fp32.named_modules())
    linears = {}
    for name, x in captured.items():
        y = fp32_modules[name](x).float()
        linears[name] = ((q_modules[name](x).float() - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
    return {
        "logits_max_rel_err": ((out - ref).abs().max() / ref.abs().max()).item(),
        "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "linears": linears,
    }


@torch.no_grad()
def cast_for_compute(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Activations in `dtype` while swapped modules (linears, StreamExperts) keep their storage: embeddings become
    CastEmbedding (table as stored, rows returned in `dtype`; a QuantEmbedding's rows too); every other floating
    parameter and buffer is cast (norms, biases; StackedExperts too: torch's grouped matmul needs one dtype). In
    place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantEmbedding):
            m.compute_dtype = dtype
        if isinstance(m, nn.Embedding) and m.weight.dtype != dtype:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, CastEmbedding(m, dtype))
    kept = {id(sub) for m in model.modules() if isinstance(m, (*_SWAPPED, CastEmbedding)) for sub in m.modules()}
    for m in model.modules():
        if id(m) in kept:
            continue
        for pname, prm in list(m.named_parameters(recurse=False)):
            if prm.is_floating_point() and prm.dtype != dtype and prm.dtype != torch.float32:
                setattr(m, pname, nn.Parameter(prm.detach().to(dtype), requires_grad=False))
        for bname, buf in list(m.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype and buf.dtype != torch.float32:
                setattr(m, bname, buf.to(dtype))
    return model


def set_gemm_dtype(model: nn.Module, dtype: torch.dtype, bits: tuple[int, ...] = (4, 6, 8)) -> int:
    """The dtype of the large-M (prefill) GEMM of the quantized linears and expert packs of `model` whose width is
    in `bits`, under fp32 activations: bfloat16 rounds the activations and the dequantized weights to bf16 for that
    GEMM (fp32 accumulation, the output widened back), ~1.5x the fp32 GEMM's prefill where the CPU has native bf16.
    Measured on the shipped model (docs/benchmarks.md): with 4-bit weights it changes nothing their own error does
    not swamp (KL to fp32 1.5e-2 either way); with 8-bit weights it adds ~27 % to their KL (5.6e-4 -> 7.1e-4).
    int8 (4- and 6-bit codes of QuantLinears and expert packs; the others keep their GEMM): glm4's GEMM of the
    codes against int8 activations, one 8-bit integer a column per block of up to 256 (llama.cpp's precision for
    its quantized prefill), ~2x the fp32 GEMM on a Zen 3 (gemm_i8_avx2.cpp).
    Decode (the streaming kernels) is unchanged. Returns how many modules were set."""
    if dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ValueError(f"the quantized GEMM runs in float32, bfloat16 or int8, not {dtype}")
    n = 0
    for m in model.modules():
        if (isinstance(m, StreamingLinear) or (isinstance(m, ExpertPack) and m.bits)) and m.bits in bits:
            if dtype == torch.int8 and not _int8_gemm_runs(m):
                continue
            m.gemm_dtype = dtype
            n += 1
    return n


def set_activation_bits(model: nn.Module) -> int:
    """Tell each quantized linear and expert pack of `model` its coarsest code width (QuantLinear / KQuantLinear /
    ExpertPack bits), where that is below its own: under activations "auto" an AVX2 kernel rounds its activations
    to int8 for codes of up to 5 bits, and with this a 6-bit linear of a 4-bit model does too (an int4 model's q6_K /
    int6 head, a q4_K_M file's q6_K tensors and experts: llama.cpp's q8_K precision for every tensor of a q4 file),
    where the body's error swamps the rounding; a model of 6- or 8-bit codes keeps int16 throughout. Returns the
    coarsest width (0: no quantized linear)."""
    coded = [m for m in model.modules() if isinstance(m, (StreamingLinear, ExpertPack)) and getattr(m, "bits", 0)]
    coarsest = min((m.bits for m in coded), default=0)
    for m in coded:
        m.activation_bits = coarsest if coarsest < m.bits else 0
    return coarsest


def _int8_gemm_runs(m: nn.Module) -> bool:
    """Whether glm4's int8 GEMM runs module m's large-M path: 4- / 6-bit codes of its own layout, on this CPU."""
    own = isinstance(m, QuantLinear) or (isinstance(m, ExpertPack) and not m.ggml_type)
    return own and m.bits in (4, 6) and kernels.has_streaming_kernels()


def _kquant_isa(bits: int, ggml_type: int) -> str:
    """The K-quant kernels' instruction set and activations (every M they run), for blocks of `ggml_type` rounding
    activations for `bits`-bit codes."""
    isa = {"AVX-512": "AVX-512 VNNI"}.get(kernels.dense_isa(), kernels.dense_isa())
    mode = ("exact" if kernels.activations() == "exact" else "int8" if kernels.int8_activations(bits, ggml_type)
            else "int16")
    return isa + (f" ({mode} activations)" if mode != "exact" else "")


def kernel_of(m: nn.Module) -> str:
    """Which kernel runs module `m` (a linear or a swapped linear), in words."""
    dt = lambda t: str(t.dtype).removeprefix("torch.")  # noqa: E731
    if isinstance(m, FloatLinear):
        return (f"{dt(m.weight)} weights: glm4 {kernels.dense_isa()} stream, fp32 accumulate (M<={kernels.dense_max_m()}); "
                f"{kernels.gemm_kernel(torch.float32 if kernels.own_gemm() else m.weight.dtype)} above"
                if kernels.has_streaming_kernels()
                else f"{dt(m.weight)} weights: F.linear")
    if isinstance(m, KQuantLinear):
        fmt = f"{m.extra_repr().split(', ')[2]} blocks ({m.blocks.shape[1] * 8 / m.in_features:.2f} bits/weight)"
        isa = _kquant_isa(m.activation_bits or m.bits, m.ggml_type)
        return (f"{fmt}: glm4 {isa} kquant_mm (M<={kernels.max_m(m)}); "
                f"dequantize + {kernels.gemm_kernel(torch.float32)} above" if kernels.max_m(m)
                else f"{fmt}: dequantize + fp32 GEMM")
    if isinstance(m, QuantLinear):
        group = "per-channel" if m.group_size == m.in_features else f"g{m.group_size}"
        fmt = f"int{m.bits} {group}{' +mins' if m.mins is not None else ''} {dt(m.scales)} scales"
        int8 = m.gemm_dtype == torch.int8 and kernels.int8_gemm()
        gemm = ("glm4 AVX2 GEMM, int8 activations" if int8 else "dequantize + " + (
            f"bf16 {kernels.gemm_kernel(torch.bfloat16)}" if m.gemm_dtype == torch.bfloat16 else
            kernels.gemm_kernel(torch.float32) + (" (bf16 for bf16 activations)" if kernels.native_bf16() else "")))
        isa = kernels.quant_isa(m.bits, m.group_size, m.in_features, m.activation_bits)
        return (f"{fmt}: glm4 {isa} stream (M<={kernels.max_m(m)}); {gemm} above"
                if kernels.max_m(m) else f"{fmt}: dequantize + fp32 GEMM")
    if isinstance(m, PackedLinear):
        return f"{str(m.dtype).removeprefix('torch.')} weights: oneDNN prepacked" + (
            "" if m.packed.is_mkldnn else " (unavailable here: F.linear)")
    if isinstance(m, WeightOnlyInt8Linear):
        return "int8 per-channel: torch _weight_int8pack_mm (bf16 activations)"
    if isinstance(m, WeightOnlyInt4Linear):
        return f"int4 g{m.group_size}: torch _weight_int4pack_mm_for_cpu (bf16 activations)"
    return f"{dt(m.weight)} weights: F.linear"


def _gemm_words(pack: ExpertPack) -> str:
    dtype = pack.gemm_dtype if pack.bits else torch.float32
    if dtype == torch.int8 and not kernels.int8_gemm():
        dtype = torch.float32
    return {torch.bfloat16: "bf16 GEMM", torch.int8: "glm4 int8-activation GEMM"}.get(dtype, "GEMM")


def describe_linears(model: nn.Module) -> list[tuple[str, int, str]]:
    """[(kind, count, kernel)] per kind of linear (last name component: qkv_proj, down_proj, lm_head, ...)."""
    seen: dict[tuple[str, str], int] = {}
    head = getattr(model, "get_output_embeddings", lambda: None)()
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            key = ("embedding", f"{kernel_of(m.table).split(':')[0]} table: rows dequantized as looked up")
        elif isinstance(m, StreamingLinear) and name.endswith(".table"):  # a QuantEmbedding's
            if m is not head:
                continue
            key = ("lm_head (tied to the embedding)", kernel_of(m))
        elif isinstance(m, StreamExperts):
            gu, dn = m.gate_up, m.down
            act = gu.activation_bits or gu.bits
            isa = (_kquant_isa(act, gu.ggml_type) if gu.ggml_type
                   else kernels.quant_isa(gu.bits, gu.group_size, gu.in_features, act) if gu.bits
                   else kernels.dense_isa())
            if dn.ggml_type and gu.ggml_type and _kquant_isa(act, dn.ggml_type) != isa:  # a q6_K down of q4_K experts
                isa += f" (down {_kquant_isa(act, dn.ggml_type)})"
            fmt, dn_fmt = (p.extra_repr().split(", ", 3)[-1] for p in (gu, dn))
            fmt += f" (down {dn_fmt})" if dn_fmt != fmt else ""
            key = ("experts", f"{fmt}: glm4 {isa} expert_glu, the dispatch "
                              f"in one op (<= {kernels.dense_max_m()} tokens a call); a "
                              f"{_gemm_words(gu)} per busy expert above")
        elif isinstance(m, StackedExperts):
            key = ("experts", f"{str(m.gate_up_proj.dtype).removeprefix('torch.')}: torch grouped matmul")
        elif isinstance(m, (nn.Linear, *_SWAPPED)):
            key = (name.removesuffix(".base_layer").rsplit(".", 1)[-1], kernel_of(m))  # LoRA-wrapped: its own name
        else:
            continue
        seen[key] = seen.get(key, 0) + 1
    return [(kind, n, desc) for (kind, desc), n in seen.items()]
