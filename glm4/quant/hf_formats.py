"""AWQ, GPTQ and compressed-tensors checkpoints, loaded as they are: each quantized linear becomes a QuantLinear.

QuantLinear computes W[n, k] = scales[n, k // g] * (q[n, k] - zero_point) + mins[n, k // g]. Every format
(AWQ GEMM, GPTQ v1 / v2, compressed-tensors pack-quantized; layouts in glm4/quant/hf_decoders.py) stores
W = s * (q - z) with integer codes q, a scale s and an integer zero z per (row, group); it maps exactly.

Zeros: one z for the whole tensor (symmetric) becomes `zero_point`, scales kept (fp16 as is, else fp32);
per-group zeros become mins = -s * z in fp32 with fp32 scales. Both are exact: fp16/bf16 s times an integer
below 2^9 fits fp32's 24 bits, so s*q + mins = s*(q - z) exactly (fp32 checkpoint scales: within one ulp).

Act-order (g_idx not k // g: GPTQ desc_act, compressed-tensors `weight_g_idx`): the input columns are sorted
by group at load (each group must hold exactly g columns) and `ActOrderQuantLinear` permutes activations
the same way at run time.

Which modules are quantized is read from the files (`{name}.qweight` / `{name}.weight_packed`), so
`modules_to_not_convert` / `ignore` need no pattern matching. Fusion: glm4.models.glm.fuse_linears leaves
QuantLinears alone, so quantized q/k/v (and glm4_moe's gate/up) stay separate matmuls; `concat_quant_linears`
can join them.

MoE experts (glm4_moe, `mlp.experts.{e}.gate_proj` ...) stay quantized: a layer whose experts all come as plain
QuantLinears, gate|up and down each of one format, gets a `StreamExperts` (glm4/quant/experts.py: gate|up codes
concatenated along N, stacked [E, 2I, H]; down [E, H, I]) in place of its StackedExperts, never allocated in
fp32. Otherwise (act-order experts, mixed formats) they are dequantized into the stacked tensors in the model
dtype, with a warning.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from glm4.config import load_config
from glm4.layers.moe import StackedExperts
from glm4.weights import CheckpointError, checkpoint_files, load_weights, materialize_, meta_model

from .experts import StreamExperts
from .fast_linear import QuantizationError
from .hf_decoders import AWQ_ORDER, DECODERS, FORMATS, Reader
from .qlinear import QuantLinear

__all__ = ["AWQ_ORDER", "ActOrderQuantLinear", "concat_quant_linears", "load_quantized_model"]

_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")  # glm4_moe, one by one


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


def _stream_experts(model: nn.Module, dense: dict[str, QuantLinear], device: torch.device) -> set[str]:
    """Each StackedExperts whose E experts all came quantized (plain QuantLinear, not act-order), gate|up and
    down each in one format, becomes a StreamExperts of the stacked codes; its entries leave `dense`."""
    layers: dict[str, dict[tuple[int, str], str]] = {}
    for p in dense:
        if m := _EXPERT.match(p):
            layers.setdefault(m.group(1), {})[int(m.group(2)), m.group(3)] = p
    done = set()
    for name, got in layers.items():
        mod, qls = model.get_submodule(name), {k: dense[p] for k, p in got.items()}
        n = getattr(mod, "num_experts", 0)
        if not isinstance(mod, StackedExperts) or len(got) != 3 * n or any(type(m) is not QuantLinear
                                                                           for m in qls.values()):
            continue
        try:
            new = StreamExperts.from_quant_linears(*([qls[e, x] for e in range(n)]
                                                     for x in ("gate_proj", "up_proj", "down_proj")))
        except (KeyError, QuantizationError):  # an expert missing, or experts of different formats
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new.to(device))
        for p in got.values():
            del dense[p]
        done.add(name)
    return done


def _views(model: nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    f = model.checkpoint_state_dict
    sd = f(checkpoint_keys=keys) if "checkpoint_keys" in inspect.signature(f).parameters else f()
    return {k: v.detach() for k, v in sd.items()}


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
    if method not in DECODERS:
        raise CheckpointError(f"{cfg_path}: quantization_config quant_method {method!r} is not supported; supported: "
                              + "; ".join(FORMATS.values()))
    try:
        decoder = DECODERS[method](qcfg, cfg_path)
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path}: malformed {method} quantization_config ({e})") from e
    config = load_config(folder)
    files, weight_map = checkpoint_files(folder)
    r = Reader(folder, files)
    tail = "." + decoder.marker
    prefixes = {n[:-len(tail)] for n in r.where if n.endswith(tail)}
    if not prefixes:
        raise CheckpointError(f"{folder}: config.json says {method}, but no tensor ends in {tail!r}")
    model = meta_model(config, dtype)
    targets = _views(model, set(r.where))
    dense: dict[str, QuantLinear] = {}
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
            dense[p] = ql  # one expert of glm4_moe's stacked tensors: stacked quantized below, or dequantized
    streamed = _stream_experts(model, dense, device)
    materialize_(model, device)
    if dense:
        warnings.warn(f"{folder.name}: {len(dense)} quantized tensor(s) outside linear layers ({next(iter(dense))!r}, "
                      f"...) are dequantized to {str(dtype).removeprefix('torch.')} (MoE experts of mixed formats or "
                      "act-order run as stacked dense tensors)", stacklevel=3)
        views = _views(model, set(r.where))
        with torch.no_grad():
            for p, ql in dense.items():
                views[p + ".weight"].copy_(_dense_weight(ql))
    packs = {f"{name}.{x}" for name in streamed for x in ("gate_up", "down")}  # their buffers are loaded
    load_weights(_Rest(model, prefixes | packs, decoder.suffixes), files, weight_map, progress=progress)
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
