"""The packed layouts of AWQ, GPTQ and compressed-tensors, decoded to integer codes, scales and zeros
(glm4.quant.hf_formats turns those into QuantLinear). Every format stores W = s * (q - z) with integer codes q,
a scale s and an integer zero z per (row, group):

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
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from glm4.weights import CheckpointError, SafetensorsFile

__all__ = ["AWQ_ORDER", "DECODERS", "FORMATS", "Reader"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a word holds column 8c + AWQ_ORDER[i]
_AWQ_INV = tuple(AWQ_ORDER.index(j) for j in range(8))
FORMATS = {"awq": "AWQ (version gemm, 4 bits)", "gptq": "GPTQ (4 or 8 bits; checkpoint_format gptq or gptq_v2)",
           "compressed-tensors": "compressed-tensors (format pack-quantized, int weights of 4 or 8 bits, "
                                 "group or channel strategy, no activation quantization)"}


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


class Reader:
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
                                  f"supported; supported: {FORMATS['awq']} (AutoAWQ's GEMM packing)")

    def decode(self, r: Reader, p: str, n: int, k: int):
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
                                  f"{self.format!r} pack_dtype={pack!r} is not supported; supported: {FORMATS['gptq']}, "
                                  "int32 packing")

    def decode(self, r: Reader, p: str, n: int, k: int):
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
                                      f"{fmt!r}) is not supported; supported: {FORMATS['compressed-tensors']}")
            self.bits.add(int(w["num_bits"]))
        if not self.bits:
            raise CheckpointError(f"{cfg_path}: compressed-tensors quantization_config has no config_groups")

    def decode(self, r: Reader, p: str, n: int, k: int):
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


DECODERS = {"awq": _AWQ, "gptq": _GPTQ, "compressed-tensors": _CompressedTensors}
