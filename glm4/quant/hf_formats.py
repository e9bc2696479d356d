"""AWQ, GPTQ and compressed-tensors checkpoints, loaded as they are: each quantized linear becomes a QuantLinear.

QuantLinear computes W[n, k] = scales[n, k // g] * (q[n, k] - zero_point) + mins[n, k // g]. Every format below
stores W = s * (q - z) with integer codes q, a scale s and an integer zero z per (row, group); it maps exactly:

- AWQ (AutoAWQ GEMM, `quant_method: awq`, `version: gemm`, 4 bits): qweight int32 [K, N/8], each word holding
  8 codes of one row k, column 8c + AWQ_ORDER[i] in nibble i (low bits first); qzeros int32 [K/g, N/8] the same
  way; scales [K/g, N]. W[n, k] = s[k // g, n] * (q[k, n] - z[k // g, n]).
- GPTQ (AutoGPTQ / GPTQModel, `quant_method: gptq`, 4 or 8 bits, sym or not): qweight int32 [K*b/32, N], 32/b
  codes of one column along k per word (low bits first); qzeros int32 [G, N*b/32] along n; scales [G, N];
  g_idx int32 [K]. W[n, k] = s[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]) with z = stored + 1 in the v1 layout
  (`checkpoint_format: gptq`, AutoGPTQ and GPTQModel's export default; AutoGPTQ's kernels add the 1) and
  z = stored in `gptq_v2`.
- compressed-tensors `pack-quantized` (llm-compressor W4A16 / W8A16, group or channel strategy):
  weight_packed int32 [N, ceil(K*b/32)] holding q + 2^(b-1) densely, low bits first along k; weight_scale
  [N, G] (G = 1: channel); weight_zero_point for asymmetric schemes (int32 packed the same way along n, or
  int8 [N, G] from older versions); weight_shape [N, K]. W = s * (q - zp). Modules in `ignore` are plain
  `weight` tensors in the files and stay nn.Linear.

Zeros: one z for the whole tensor (symmetric) becomes `zero_point`, scales kept (fp16 as is, else fp32);
per-group zeros become mins = -s * z in fp32 with fp32 scales. Both are exact: fp16/bf16 s times an integer
below 2^9 fits fp32's 24 bits, so s*q + mins = s*(q - z) exactly (fp32 checkpoint scales: within one ulp).

Act-order (g_idx not k // g: GPTQ desc_act, compressed-tensors `weight_g_idx`): the input columns are sorted
by group at load (each group must hold exactly g columns) and `ActOrderQuantLinear` permutes activations
the same way at run time.

Which modules are quantized is read from the files (`{name}.qweight` / `{name}.weight_packed`), so
`modules_to_not_convert` / `ignore` need no pattern matching. A quantized tensor whose model target is not an
nn.Linear (glm4_moe's stacked experts: `mlp.experts.{e}.gate_proj` ...) is dequantized into that tensor in the
model dtype: MoE experts load, but run dense. Fusion: glm4.models.glm.fuse_linears leaves QuantLinears alone,
so quantized q/k/v (and glm4_moe's gate/up) stay separate matmuls; `concat_quant_linears` can join them.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
from torch import nn

from glm4.config import load_config
from glm4.weights import CheckpointError, SafetensorsFile, checkpoint_files, empty_model, load_weights

from .fast_linear import QuantizationError
from .qlinear import QuantLinear

__all__ = ["AWQ_ORDER", "ActOrderQuantLinear", "concat_quant_linears", "load_quantized_model"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a word holds column 8c + AWQ_ORDER[i]
_AWQ_INV = tuple(AWQ_ORDER.index(j) for j in range(8))
_FORMATS = {"awq": "AWQ (version gemm, 4 bits)", "gptq": "GPTQ (4 or 8 bits; checkpoint_format gptq or gptq_v2)",
            "compressed-tensors": "compressed-tensors (format pack-quantized, int weights of 4 or 8 bits, "
                                  "group or channel strategy, no activation quantization)"}


class ActOrderQuantLinear(QuantLinear):
    """A QuantLinear whose stored columns are the input columns in `in_perm` order (act-order checkpoints):
    y = x[..., in_perm] @ W_stored.T. `to_linear()` gives the weight in the original column order."""

    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(in_features, out_features, **kw)
        self.register_buffer("in_perm", torch.arange(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.in_perm))

    def to_linear(self) -> nn.Linear:
        lin = super().to_linear()
        with torch.no_grad():
            lin.weight.copy_(lin.weight[:, torch.argsort(self.in_perm)])
        return lin


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> uint8 [R, C * 32/bits]: the codes of each word, low bits first (a few MB of int32 at a
    time, so a large linear never has a 4-byte-per-weight copy here)."""
    r, c = packed.shape
    out = torch.empty(r, c * (32 // bits), dtype=torch.uint8)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    step = max(1, (1 << 18) // max(c, 1))
    for i in range(0, r, step):
        out[i:i + step] = ((packed[i:i + step].unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(-1, out.shape[1])
    return out


class _Reader:
    """Tensor name -> the safetensors file holding it; reads one tensor at a time, with shape/dtype checks."""

    def __init__(self, folder: Path, files: list[Path]):
        self.folder = folder
        self.where: dict[str, SafetensorsFile] = {}
        for path in files:
            st = SafetensorsFile(path)
            for name in st.keys():
                self.where.setdefault(name, st)

    def file(self, name: str) -> Path:
        return self.where[name].path if name in self.where else self.folder

    def get(self, name: str, shape=None, dtypes=None, what: str = "") -> torch.Tensor:
        st = self.where.get(name)
        if st is None:
            raise CheckpointError(f"missing tensor {name!r} in {self.folder} ({what})")
        dtype, have, _, _ = st.entries[name]
        if shape is not None and have != tuple(shape):
            raise CheckpointError(f"{st.path}: tensor {name!r} has shape {list(have)}, expected {list(shape)} "
                                  f"for {what}")
        if dtypes is not None and dtype not in dtypes:
            raise CheckpointError(f"{st.path}: tensor {name!r} is {dtype}; {what} needs "
                                  + " or ".join(str(d).removeprefix("torch.") for d in dtypes))
        return st.tensor(name)


_SCALES = (torch.float16, torch.bfloat16, torch.float32)


def _group(g: int, k: int, name: str, where: Path) -> int:
    g = k if g in (-1, 0) else g
    if k % g:
        raise CheckpointError(f"{where}: {name}: in_features {k} is not a multiple of group_size {g}")
    return g


# ---- per-format configs and decoders: (reader, prefix, N, K) -> (q [N, K], scales [N, G], zeros [N, G], bits, g,
#      g_idx or None) ---------------------------------------------------------------------------------------------

class _AWQ:
    marker, suffixes = "qweight", ("qweight", "qzeros", "scales", "bias")

    def __init__(self, q: dict, cfg_path: Path):
        self.bits = int(q.get("bits", q.get("w_bit", 4)))
        self.group_size = int(q.get("group_size", q.get("q_group_size", 128)))
        version = str(q.get("version", "gemm")).lower()
        if self.bits != 4 or version != "gemm":
            raise CheckpointError(f"{cfg_path}: quantization_config AWQ bits={self.bits} version={version!r} is not "
                                  f"supported; supported: {_FORMATS['awq']} (AutoAWQ's GEMM packing)")

    def decode(self, r: _Reader, p: str, n: int, k: int):
        g = _group(self.group_size, k, p, r.file(p + ".qweight"))
        what = f"AWQ 4-bit group_size {g}, a {n}x{k} linear"
        if n % 8:
            raise CheckpointError(f"{r.file(p + '.qweight')}: {p}: out_features {n} is not a multiple of 8 ({what})")
        idx = (torch.arange(n // 8)[:, None] * 8 + torch.tensor(_AWQ_INV)).reshape(-1)
        q = _unpack(r.get(p + ".qweight", (k, n // 8), (torch.int32,), what), 4)[:, idx]
        z = _unpack(r.get(p + ".qzeros", (k // g, n // 8), (torch.int32,), what), 4)[:, idx].int()
        s = r.get(p + ".scales", (k // g, n), _SCALES, what)
        return q.T, s.T, z.T, 4, g, None


class _GPTQ:
    marker, suffixes = "qweight", ("qweight", "qzeros", "scales", "g_idx", "bias")

    def __init__(self, q: dict, cfg_path: Path):
        self.bits = int(q.get("bits", 4))
        self.group_size = int(q.get("group_size", 128))
        self.format = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        pack = str(q.get("pack_dtype", "int32")).removeprefix("torch.")
        if self.bits not in (4, 8) or self.format not in ("gptq", "gptq_v2") or pack != "int32" \
                or q.get("is_marlin_format"):
            raise CheckpointError(f"{cfg_path}: quantization_config GPTQ bits={self.bits} checkpoint_format="
                                  f"{self.format!r} pack_dtype={pack!r} is not supported; supported: {_FORMATS['gptq']}, "
                                  "int32 packing")

    def decode(self, r: _Reader, p: str, n: int, k: int):
        b = self.bits
        g = _group(self.group_size, k, p, r.file(p + ".qweight"))
        what = f"GPTQ {b}-bit group_size {g}, a {n}x{k} linear"
        if (k * b) % 32 or (n * b) % 32:
            raise CheckpointError(f"{r.file(p + '.qweight')}: {p}: a {n}x{k} linear cannot be GPTQ-packed "
                                  f"({b}-bit words need in/out features that are multiples of {32 // b})")
        q = _unpack(r.get(p + ".qweight", (k * b // 32, n), (torch.int32,), what).T.contiguous(), b)
        z = _unpack(r.get(p + ".qzeros", (k // g, n * b // 32), (torch.int32,), what), b).T.int()
        if self.format == "gptq":
            z = z + 1
        s = r.get(p + ".scales", (k // g, n), _SCALES, what).T
        g_idx = r.get(p + ".g_idx", (k,), None, what) if p + ".g_idx" in r.where else None
        return q, s, z, b, g, g_idx


class _CompressedTensors:
    marker = "weight_packed"
    suffixes = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "bias")

    def __init__(self, q: dict, cfg_path: Path):
        self.bits = set()
        groups = q.get("config_groups") or {}
        for gname, scheme in groups.items():
            w = scheme.get("weights") if isinstance(scheme, dict) else None
            fmt = (scheme.get("format") if isinstance(scheme, dict) else None) or q.get("format")
            ok = (isinstance(w, dict) and fmt == "pack-quantized" and w.get("type", "int") == "int"
                  and w.get("num_bits") in (4, 8) and w.get("strategy") in ("group", "channel")
                  and not scheme.get("input_activations") and not scheme.get("output_activations"))
            if not ok:
                desc = {k: scheme.get(k) for k in ("weights", "input_activations")} \
                    if isinstance(scheme, dict) else scheme
                raise CheckpointError(f"{cfg_path}: quantization_config config_groups.{gname} {desc} (format "
                                      f"{fmt!r}) is not supported; supported: {_FORMATS['compressed-tensors']}")
            self.bits.add(int(w["num_bits"]))
        if not self.bits:
            raise CheckpointError(f"{cfg_path}: compressed-tensors quantization_config has no config_groups")

    def decode(self, r: _Reader, p: str, n: int, k: int):
        name = p + ".weight_packed"
        shape = r.get(p + ".weight_shape", (2,), None, "weight_shape").tolist() \
            if p + ".weight_shape" in r.where else [n, k]
        if shape != [n, k]:
            raise CheckpointError(f"{r.file(p + '.weight_shape')}: {p}.weight_shape is {shape}, the model expects "
                                  f"[{n}, {k}]")
        cols = r.where[name].entries[name][1][-1] if name in r.where else None
        bits = [b for b in sorted(self.bits) if math.ceil(k * b / 32) == cols]
        if not bits:
            raise CheckpointError(f"{r.file(name)}: tensor {name!r} has {cols} int32 columns, which fits none of "
                                  f"the config's num_bits {sorted(self.bits)} for in_features {k}")
        b, off = bits[0], 1 << (bits[0] - 1)
        q = _unpack(r.get(name, (n, cols), (torch.int32,), f"{b}-bit pack-quantized"), b)[:, :k]
        s = r.get(p + ".weight_scale", None, _SCALES, "weight_scale")
        if s.dim() != 2 or s.shape[0] != n or k % s.shape[1]:
            raise CheckpointError(f"{r.file(p + '.weight_scale')}: tensor {p + '.weight_scale'!r} has shape "
                                  f"{list(s.shape)}; expected [{n}, G] with G dividing {k} (group or channel)")
        g, groups = k // s.shape[1], s.shape[1]
        if p + ".weight_zero_point" in r.where:
            zn = p + ".weight_zero_point"
            raw = r.get(zn, None, None, "weight_zero_point")
            if raw.dtype == torch.int32 and tuple(raw.shape) == (math.ceil(n * b / 32), groups):
                z = _unpack(raw.T.contiguous(), b)[:, :n].T.int()  # packed along n, offset included
            elif tuple(raw.shape) == (n, groups) and not raw.is_floating_point():
                z = raw.to(torch.int32) + off
            else:
                raise CheckpointError(f"{r.file(zn)}: tensor {zn!r} is {raw.dtype} {list(raw.shape)}; expected int32 "
                                      f"[{math.ceil(n * b / 32)}, {groups}] (packed) or int8 [{n}, {groups}]")
        else:
            z = torch.full((n, groups), off, dtype=torch.int32)
        g_idx = r.get(p + ".weight_g_idx", (k,), None, "weight_g_idx") if p + ".weight_g_idx" in r.where else None
        return q, s, z, b, g, g_idx


_DECODERS = {"awq": _AWQ, "gptq": _GPTQ, "compressed-tensors": _CompressedTensors}


def _quant_linear(where: str, q, s, z, bits: int, g: int, g_idx, bias) -> QuantLinear:
    """Codes and per-group integer zeros as read -> an exact QuantLinear (see the module docstring)."""
    k = q.shape[1]
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // g):
        perm = torch.argsort(g_idx.long(), stable=True)
        if not torch.equal(g_idx.long()[perm], torch.arange(k) // g):
            raise CheckpointError(f"{where}: g_idx does not give each of the {k // g} groups exactly {g} columns; "
                                  "supported: act-order with equal groups (GPTQ desc_act)")
        q = q[:, perm]
    z0 = int(z.reshape(-1)[0])
    if torch.all(z == z0):
        scales, mins, zp = (s if s.dtype == torch.float16 else s.float()), None, z0
    else:
        scales = s.float()
        mins, zp = -(scales * z.float()), 0
    cls = QuantLinear if perm is None else ActOrderQuantLinear
    try:
        m = cls.from_codes(q, scales, mins, bits=bits, group_size=g, zero_point=zp, bias=bias)
    except QuantizationError as e:
        raise CheckpointError(f"{where}: {e}") from e
    if perm is not None:
        m.in_perm.copy_(perm)
    return m


def _dense_weight(m: QuantLinear) -> torch.Tensor:
    """The effective weight [N, K] in the original column order, fp32."""
    w = m.dequantize(torch.float32)
    return w[:, torch.argsort(m.in_perm)] if isinstance(m, ActOrderQuantLinear) else w


def _views(model: nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    f = model.checkpoint_state_dict
    sd = f(checkpoint_keys=keys) if "checkpoint_keys" in inspect.signature(f).parameters else f()
    return {k: v.detach() for k, v in sd.items()}


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Real (uninitialized) storage for every tensor still on meta; tied ones stay tied (as empty_model does)."""
    done: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for slots, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in slots.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    new = torch.empty(t.shape, dtype=t.dtype, device=device)
                    done[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                slots[name] = done[id(t)]


class _Rest:
    """The model as glm4.weights.load_weights sees it, less the quantized modules (already loaded)."""

    def __init__(self, model: nn.Module, prefixes: set[str], suffixes: tuple[str, ...]):
        self.model, self.prefixes, self.suffixes = model, prefixes, suffixes

    def _ours(self, name: str, suffixes=None) -> bool:
        p, _, leaf = name.rpartition(".")
        return p in self.prefixes and (suffixes is None or leaf in suffixes)

    def checkpoint_state_dict(self, checkpoint_keys=None) -> dict[str, torch.Tensor]:
        return {k: v for k, v in _views(self.model, checkpoint_keys or set()).items() if not self._ours(k)}

    def skip_checkpoint_key(self, name: str) -> bool:
        return self._ours(name, self.suffixes) or self.model.skip_checkpoint_key(name)

    def post_load(self) -> None:
        if hasattr(self.model, "post_load"):
            self.model.post_load()


def load_quantized_model(folder: str | Path, qcfg: dict, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", progress: bool = True) -> nn.Module:
    """Load an AWQ / GPTQ / compressed-tensors checkpoint folder; quantized linears become QuantLinear,
    everything else is read in `dtype` (also the activation dtype) onto `device`."""
    folder, device = Path(folder), torch.device(device)
    cfg_path = folder / "config.json"
    method = str(qcfg.get("quant_method", "compressed-tensors" if "config_groups" in qcfg else "")).lower()
    if method not in _DECODERS:
        raise CheckpointError(f"{cfg_path}: quantization_config quant_method {method!r} is not supported; supported: "
                              + "; ".join(_FORMATS.values()))
    try:
        decoder = _DECODERS[method](qcfg, cfg_path)
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path}: malformed {method} quantization_config ({e})") from e
    config = load_config(folder)
    files, weight_map = checkpoint_files(folder)
    r = _Reader(folder, files)
    tail = "." + decoder.marker
    prefixes = {n[:-len(tail)] for n in r.where if n.endswith(tail)}
    if not prefixes:
        raise CheckpointError(f"{folder}: config.json says {method}, but no tensor ends in {tail!r}")
    model = empty_model(config, dtype, "meta")
    targets = _views(model, set(r.where))
    dense: list[tuple[str, QuantLinear]] = []
    for p in sorted(prefixes):
        w = targets.get(p + ".weight")
        if w is None or w.dim() != 2:
            raise CheckpointError(f"{r.file(p + tail)}: unexpected tensor {p + tail!r} (no linear weight "
                                  f"{p + '.weight'!r} in {type(model).__name__})")
        n, k = w.shape
        parent, _, attr = p.rpartition(".")
        try:
            module = model.get_submodule(p)
        except AttributeError:
            module = None
        has_bias = isinstance(module, nn.Linear) and module.bias is not None
        bias = r.get(p + ".bias", (n,), None, "bias").to(dtype) if has_bias else None
        if not has_bias and p + ".bias" in r.where:
            raise CheckpointError(f"{r.file(p + '.bias')}: unexpected tensor {p + '.bias'!r} (that linear has no bias)")
        ql = _quant_linear(f"{r.file(p + tail)}: {p}", *decoder.decode(r, p, n, k), bias)
        if isinstance(module, nn.Linear):
            setattr(model.get_submodule(parent) if parent else model, attr, ql.to(device))
        else:
            dense.append((p, ql))  # e.g. one expert of glm4_moe's stacked tensors: dequantized below
    _materialize(model, device)
    if dense:
        views = _views(model, set(r.where))
        with torch.no_grad():
            for p, ql in dense:
                views[p + ".weight"].copy_(_dense_weight(ql))
    load_weights(_Rest(model, prefixes, decoder.suffixes), files, weight_map, progress=progress)
    return model.eval()


@torch.no_grad()
def concat_quant_linears(*mods: nn.Module) -> QuantLinear | None:
    """One QuantLinear whose output is the given ones' outputs concatenated (same input: q/k/v, gate/up); None
    unless all are plain QuantLinear of the same bits, group size, zero_point, scale dtype and mins/bias presence."""
    first = mods[0]
    key = lambda m: (type(m), m.in_features, m.bits, m.group_size, m.zero_point, m.scales.dtype,  # noqa: E731
                     m.mins is None, m.bias is None)
    if type(first) is not QuantLinear or any(key(m) != key(first) for m in mods):
        return None
    out = QuantLinear(first.in_features, sum(m.out_features for m in mods), bits=first.bits,
                      group_size=first.group_size, zero_point=first.zero_point, has_mins=first.mins is not None,
                      scale_dtype=first.scales.dtype, bias=first.bias is not None,
                      dtype=first.bias.dtype if first.bias is not None else torch.float32)
    for name in ("qweight", "scales", "mins", "bias"):
        if getattr(first, name) is not None:
            setattr(out, name, torch.cat([getattr(m, name) for m in mods]))
    return out.to(first.qweight.device)
