"""Checkpoint loading and saving: safetensors (single file or sharded + index json) straight into the
requested dtype/device, one tensor at a time, with no full-precision copy of the model in between.

How a model plugs in (the only contract between a model file and this loader):

- `Model.from_config(config)` builds the module. The loader builds it on the meta device, casts it to the
  requested dtype (parameters whose name contains an entry of the class attribute `keep_in_fp32`, a tuple of
  substrings, stay float32, e.g. a router's `e_score_correction_bias`), then allocates uninitialized storage
  on `device` (tied parameters stay tied).
- `model.checkpoint_state_dict() -> {checkpoint_name: tensor}`: every tensor the checkpoint must provide,
  under the checkpoint's own names, each a tensor *sharing storage with the model's parameters* (a parameter,
  or a view of one). The loader writes each checkpoint tensor into its view, so a model that stacks experts
  returns `{"...mlp.experts.3.gate_proj.weight": stacked_gate_up[3, :I], ...}` and needs nothing else.
  The same dict, read back, is what `save_checkpoint` exports. If the method takes a `checkpoint_keys`
  argument, the loader passes the set of tensor names found in the files (to pick between layouts).
- `model.skip_checkpoint_key(name) -> bool`: checkpoint tensors to ignore (rotary `inv_freq` buffers, MTP
  layers `model.layers.{num_hidden_layers}.*`, a tied `lm_head.weight`).
- optional `model.post_load()`: called after all tensors are in (e.g. to rebuild non-persistent buffers,
  which are left uninitialized).

Any checkpoint tensor neither in `checkpoint_state_dict()` nor skipped is unexpected; any key of it not
found in the files is missing; both, and a shape mismatch, a corrupt or truncated file, raise
`CheckpointError` naming the tensor and file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import json
import math
import os
import platform
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from glm4.config import ConfigError, load_config
from glm4.models import model_class


class CheckpointError(RuntimeError):
    """A checkpoint folder or file that cannot be loaded into the model it describes."""


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16,
}
_CHUNK = 8 << 20  # bytes per read when converting dtype or device, bounds the transient buffer
_MAX_HEADER = 100 << 20


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


# ---- safetensors reading ---------------------------------------------------------------------------

class SafetensorsFile:
    """Header of one .safetensors file, validated against the file size; tensors are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{self.path}: corrupt safetensors header (length {n}, file {size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e})") from e
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not an object)")
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = _DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r} ({err!r})") from err
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes, expected {nbytes} for "
                                      f"{e['dtype']}{list(shape)}")
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                      f"{self.data_start + end} but the file has {size}")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def read_into(self, f, name: str, target: torch.Tensor) -> None:
        """Copy tensor `name` into `target` (same shape; any dtype/device), converting chunk by chunk."""
        src, shape, begin, end = self.entries[name]
        if tuple(target.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(shape)}, the model expects "
                                  f"{list(target.shape)}")
        if end == begin:
            return
        f.seek(self.data_start + begin)
        with torch.no_grad():
            if target.device.type == "cpu" and target.dtype == src and target.is_contiguous():
                # same dtype on CPU: read the bytes straight into the parameter's memory
                buf = target.reshape(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(buf)) != end - begin:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
                return
            flat = target.reshape(-1) if target.is_contiguous() else torch.empty(shape, dtype=target.dtype).reshape(-1)
            step = max(1, _CHUNK // src.itemsize)
            buf = bytearray(min(step, flat.numel()) * src.itemsize)  # one staging buffer, reused per chunk
            for i in range(0, flat.numel(), step):
                k = min(step, flat.numel() - i)
                view = memoryview(buf)[:k * src.itemsize]
                if f.readinto(view) != len(view):
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
                flat[i:i + k].copy_(torch.frombuffer(view, dtype=src))
            if not target.is_contiguous():
                target.copy_(flat.view(shape))

    def tensor(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        src, shape, _, _ = self.entries[name]
        out = torch.empty(shape, dtype=dtype or src, device=device)
        with open(self.path, "rb") as f:
            self.read_into(f, name, out)
        return out


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one file (small files: adapters, test fixtures)."""
    st = SafetensorsFile(path)
    return {k: st.tensor(k, device) for k in st.keys()}


def checkpoint_files(folder: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, when sharded, the index's weight_map."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e})") from e
        files = []
        for fname in sorted(set(weight_map.values())):
            p = folder / fname
            if not p.exists():
                raise CheckpointError(f"{index} lists shard {fname!r}, which is missing from {folder}")
            files.append(p)
        return files, weight_map
    single = folder / "model.safetensors"
    if single.exists():
        return [single], None
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files, None
    hint = " (PyTorch .bin checkpoints are not supported; convert to safetensors)" if any(folder.glob("*.bin")) else ""
    raise CheckpointError(f"no model.safetensors or safetensors shards in {folder}{hint}")


# ---- model loading ---------------------------------------------------------------------------------

class _SkipMetaInit(TorchFunctionMode):
    """Random init is wasted work on meta tensors; skipping it also spares the ~70 MB of imports (sympy via
    torch._decomp) that the first meta `normal_` pulls in."""

    _OPS = {"normal_", "uniform_", "trunc_normal_", "fill_", "zero_", "exponential_", "random_", "bernoulli_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self._OPS:
            t = args[0] if args else kwargs.get("tensor")  # nn.init passes the tensor by keyword
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def empty_model(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """The model for `config` with uninitialized storage in `dtype` on `device` (never materialized in fp32)."""
    return materialize_(meta_model(config, dtype), device)


def meta_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model for `config` on the meta device in `dtype` (`keep_in_fp32` tensors in float32): modules can be
    swapped before any storage exists (quantized checkpoints), then `materialize_` allocates the rest."""
    cls = model_class(config)
    with torch.device("meta"), _SkipMetaInit():
        model = cls.from_config(config)
    model.to(dtype)
    keep = tuple(getattr(model, "keep_in_fp32", ()))
    if keep:
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if any(k in name for k in keep):
                t.data = t.data.float()
    return model


def materialize_(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Uninitialized real storage for every tensor still on meta, slot by slot (not `to_empty`: empty_like from
    meta touches every page in torch 2.13); shared (tied) tensors stay shared. In place; returns the model."""
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
    return model


def layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's repeated blocks (the children of its outermost nn.ModuleLists: decoder layers,
    vision blocks) and of its output projection: the units `load_weights` reports as each is complete."""
    names: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and not any(name.startswith(u + ".") for u in names):
            names += [f"{name}.{child}" for child, _ in m.named_children()]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names += [name for name, m in model.named_modules() if head is not None and m is head][:1]
    return names


def load_weights(model: nn.Module, files: list[Path], weight_map: dict[str, str] | None = None,
                 progress: bool = True, on_layer_loaded: Callable[[nn.Module, str], None] | None = None) -> None:
    """Fill `model` from safetensors `files` through its `checkpoint_state_dict()` / `skip_checkpoint_key` hooks.

    `on_layer_loaded(model, name)` is called as soon as every checkpoint tensor of a layer or of the output
    projection (`layer_names`; a tied one has none of its own) has been read, in the order they complete; it may
    replace that unit's modules (quantizing at load: the float weights of one layer at a time are ever in memory,
    not the whole model's). No reference to a read tensor is kept here once it is read."""
    headers = {path: SafetensorsFile(path) for path in files}  # validates every header before any read
    with torch.no_grad():
        if "checkpoint_keys" in inspect.signature(model.checkpoint_state_dict).parameters:
            keys = {k for st in headers.values() for k in st.keys()}
            sd = model.checkpoint_state_dict(checkpoint_keys=keys)
        else:
            sd = model.checkpoint_state_dict()
        targets = {k: v.detach() for k, v in sd.items()}
        del sd
    expected = list(targets)
    layer_of: dict[str, str] = {}
    left: dict[str, int] = {}  # tensors of each layer not read yet
    if on_layer_loaded is not None:
        units = set(layer_names(model))
        for name in expected:  # its unit: the first dotted prefix that names one (the outermost)
            parts = name.split(".")
            layer = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in units), None)
            if layer is not None:
                layer_of[name] = layer
                left[layer] = left.get(layer, 0) + 1
    skip = getattr(model, "skip_checkpoint_key", lambda name: False)
    seen: dict[str, Path] = {}
    for path in _progress(files, progress):
        st = headers[path]
        with open(path, "rb") as f:
            for name in st.keys():
                if skip(name):
                    continue
                if name in seen:
                    raise CheckpointError(f"tensor {name!r} appears in both {seen[name]} and {path}")
                if name not in targets:
                    raise CheckpointError(f"{path}: unexpected tensor {name!r} (not a parameter of "
                                          f"{type(model).__name__})")
                st.read_into(f, name, targets.pop(name))
                seen[name] = path
                layer = layer_of.get(name)
                if layer is not None:
                    left[layer] -= 1
                    if not left[layer]:
                        on_layer_loaded(model, layer)
    missing = [k for k in expected if k not in seen]
    if missing:
        where = ""
        if weight_map is not None:
            listed = [k for k in missing if k in weight_map]
            if listed:
                where = f" ({listed[0]!r} is listed in the index under {weight_map[listed[0]]!r} but not in that file)"
        shown = ", ".join(repr(k) for k in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"missing tensor(s) {shown} in {files[0].parent if files else 'the checkpoint'}{where}")
    if hasattr(model, "post_load"):
        model.post_load()


def _progress(files: list[Path], enabled: bool):
    if not enabled or len(files) < 1:
        return files
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is not worth failing for
        return files
    return tqdm(files, desc=f"Loading {files[0].parent.name}", unit="shard", disable=None, leave=False)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@contextlib.contextmanager
def memory_returned_when_freed() -> Iterator[None]:
    """While loading (glibc only): every allocation of 1 MiB or more gets its own mapping, unmapped when freed.
    glibc otherwise raises its mmap threshold to the largest block freed (up to 32 MiB), so once a layer's float
    weights are freed the codes quantized from them come from the heap, between the holes those weights leave,
    and the heap does not shrink: quantizing the 400M checkpoint at load peaked anywhere from 1.80 to 2.34 GB
    run to run, 1.74-1.75 GB with the threshold fixed. Afterwards the thresholds are where glibc's own settle
    (mmap 32 MiB, heap trim 64 MiB: a fixed mmap threshold stops the trim threshold from following it, and at
    glibc's default 128 KiB every prefill's freed buffers were handed back and faulted in again, MoE int6 prefill
    1,600 -> 1,150 tok/s), so later prefill buffers are reused from the heap as before."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


@functools.cache
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               adapter: str | os.PathLike | None = None, progress: bool = True,
               on_layer_loaded: Callable[[nn.Module, str], None] | None = None) -> nn.Module:
    """Load a checkpoint folder (config.json + safetensors) into an eval-mode model of `dtype` on `device`.

    `adapter`: a LoRA adapter folder (PEFT format) applied on top (glm4.layers.lora). `on_layer_loaded`: see
    `load_weights` (not with an adapter, which is applied to the float weights)."""
    if adapter is not None and on_layer_loaded is not None:
        raise ValueError("on_layer_loaded would change the layers an adapter is applied to; pass one or the other")
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    config = load_config(folder)  # ConfigError names the bad field or model_type
    files, weight_map = checkpoint_files(folder)
    model = empty_model(config, dtype, device)
    load_weights(model, files, weight_map, progress=progress, on_layer_loaded=on_layer_loaded)
    if adapter is not None:
        from glm4.layers.lora import AdapterError, load_adapter

        try:
            load_adapter(model, adapter)
        except AdapterError as e:
            raise CheckpointError(f"cannot load adapter {adapter}: {e}") from e
    return model.eval()  # after the adapter: its new modules (dropout) start in training mode


# ---- saving ----------------------------------------------------------------------------------------

def iter_checkpoint_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    with torch.no_grad():
        for name, t in model.checkpoint_state_dict().items():
            yield name, t.detach()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (views allowed, each copied to CPU one at a time) as a safetensors file."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise ValueError(f"cannot save tensor {name!r} of dtype {t.dtype}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def save_checkpoint(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write `config.json` and `model.safetensors` (checkpoint names) loadable by `load_model`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    d = {k: v for k, v in config.to_dict().items() if v is not None}
    d["model_type"] = config.model_type
    dt = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        next(model.parameters()).dtype)
    if dt:
        d["torch_dtype"] = dt
    (folder / "config.json").write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    save_safetensors(dict(iter_checkpoint_tensors(model)), folder / "model.safetensors")
    return folder


__all__ = ["CheckpointError", "ConfigError", "SafetensorsFile", "checkpoint_files", "empty_model", "layer_names", "load_model",
           "memory_returned_when_freed",
           "load_safetensors", "load_weights", "resolve_device", "resolve_dtype", "save_checkpoint", "save_safetensors"]
