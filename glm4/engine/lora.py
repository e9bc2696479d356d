"""Several LoRA adapters served over one base model, batched together: `LoRAAdapters` + `MultiLoRALinear`.

    adapters = LoRAAdapters(model)            # after optimize_model: wraps whatever linears it finds
    adapters.add("sql", "runs/sql-lora")      # PEFT folder: adapter_config.json + adapter_model.safetensors
    with adapters.step([None, 0, 0, 1], [5, 1, 1, 1]):   # per sequence: adapter slot (None: base), its rows
        logits = model(...)                   # ONE forward for the base and every adapter in the step

Every adapted linear becomes a `MultiLoRALinear`: its base module (nn.Linear, FloatLinear, QuantLinear, ...) and,
per adapter that targets it, A [r, in] and B [out, r] with the adapter's scaling folded into B. For a step's flat
token rows x [N, in] it computes y = base(x), then for each adapter present in the step, on that adapter's row
subset only: y[rows] += (x[rows] @ A^T) @ B^T (index_select / index_add_; a step on one adapter alone skips the
gathers). Rows of base requests get nothing added.

Fused projections: the engine runs q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`
(glm4.models.glm.fuse_projections), while PEFT adapters name q_proj, k_proj, v_proj (gate_proj, up_proj).
The adapter's parts are stacked: A = [A_q; A_k; A_v] ([r_q + r_k + r_v, in]) and B block-diagonal, B_q in q's
output rows and rank columns, and so on; a part the adapter does not target is zero. One matmul pair then gives
exactly the per-projection updates. Names the model holds as they are (gate_up_proj of GLM-4, query_key_value of
ChatGLM) map one to one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from glm4.layers.lora import PEFT_PREFIX, WEIGHTS_NAME, AdapterError, read_adapter_config

# PEFT module name -> the engine's fused linear holding it as a block of output rows
FUSED_INTO = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def parse_lora_specs(specs: list[str] | None) -> dict[str, str]:
    """`--lora NAME=PATH` values -> {name: path}; a bare PATH is named after its folder."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got {spec!r}")
        if name in out:
            raise ValueError(f"--lora: adapter name {name!r} given twice")
        out[name] = path
    return out


def model_and_adapters(model: str | None, specs: list[str] | None) -> tuple[str | None, dict[str, str]]:
    """`--model M --lora NAME=PATH ...` -> (base checkpoint, {adapter name: folder}). `--model ADAPTER_DIR` (a PEFT
    folder without config.json) stands for its local base plus that adapter, named after its folder. Raises
    ValueError (AdapterError) with a one-line message."""
    from glm4.layers.lora import adapter_base

    lora = parse_lora_specs(specs)
    base = adapter_base(model) if model is not None else None
    if base is None:
        return model, lora
    name = Path(model).resolve().name
    if name in lora:
        raise AdapterError(f"--lora {name}=... has the name of the --model adapter folder; rename one")
    return str(base), {name: str(model), **lora}


class MultiLoRALinear(nn.Module):
    """A linear plus the LoRA updates of every loaded adapter that targets it, applied per row group of a step."""

    def __init__(self, base_layer: nn.Module, adapters: LoRAAdapters):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._adapters = [adapters]  # in a list: the registry is not a submodule (no recursion, no state_dict)
        # slot -> (A^T [in, r], (B*scaling)^T [r, out]), contiguous: two plain GEMMs per adapter and step
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight (dtype / device probes) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        groups = self._adapters[0].groups
        if not groups or not self.lora:
            return y
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])  # [N, in], [N, out]
        if y2.shape[0] != self._adapters[0].num_rows:
            raise RuntimeError(f"LoRA step set for {self._adapters[0].num_rows} rows, the linear got {y2.shape[0]}")
        for slot, rows in groups:
            ab = self.lora.get(slot)
            if ab is None:  # this adapter does not adapt this linear
                continue
            a_t, b_t = ab
            if rows is None:  # every row of the step is on this adapter
                y2.add_(((x2.to(a_t.dtype) @ a_t) @ b_t).to(y2.dtype))
            else:
                xs = x2.index_select(0, rows).to(a_t.dtype)  # [n_i, in]
                y2.index_add_(0, rows, ((xs @ a_t) @ b_t).to(y2.dtype))
        return y2.view(y.shape)

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.lora)}"


class LoRAAdapters:
    """The adapters loaded next to one model (slot i = `names[i]`) and the row groups of the current step."""

    def __init__(self, model: nn.Module):
        from glm4.quant.decode_stack import drop_decode_stack

        drop_decode_stack(model)  # its linears are about to be wrapped: the stack would run them unadapted
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, getattr(model, "compute_dtype", p.dtype)
        self.names: list[str] = []
        self.paths: dict[str, Path] = {}
        self.groups: list[tuple[int, torch.Tensor | None]] | None = None  # (slot, row ids or None = all rows)
        self.num_rows = 0

    def slot(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown LoRA adapter {name!r}; loaded: {', '.join(self.names) or 'none'}") from None

    # --- loading -----------------------------------------------------------------------------------
    def add(self, name: str, path: str | Path) -> int:
        """Load a PEFT adapter folder under `name`; returns its slot. Raises AdapterError naming what is wrong."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise AdapterError(f"bad adapter name {name!r}")
        if name in self.names:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        folder = Path(path)
        cfg = read_adapter_config(folder)
        wpath = folder / WEIGHTS_NAME
        if not wpath.exists():
            raise AdapterError(f"no {WEIGHTS_NAME} in {folder}")
        from glm4.weights import CheckpointError, load_safetensors

        try:
            tensors = load_safetensors(wpath)
        except CheckpointError as e:
            raise AdapterError(str(e)) from e
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise AdapterError(f"{wpath}: unsupported tensor {key!r} (only LoRA A/B weights of linears)")
            module, ab = key[len(PEFT_PREFIX):-len(".lora_A.weight")], key[-len("A.weight")]
            pairs.setdefault(module, {})[ab] = t
        if not pairs:
            raise AdapterError(f"{wpath}: no LoRA tensors")
        slot = len(self.names)
        updates = self._stack(slot, pairs, cfg.scaling_for, wpath)  # validates everything before touching the model
        for target, (a, b) in updates.items():
            self._wrapped(target).lora[slot] = (a, b)
        self.names.append(name)
        self.paths[name] = folder
        return slot

    def _stack(self, slot: int, pairs: dict, scaling_for, wpath: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{engine linear name: (A^T [in, R], (B*scaling)^T [R, out])}, fused parts stacked as the module docstring
        says."""
        parts: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}  # target -> (row0, rows, A, B)
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{wpath}: {module} has lora_{'A' if 'A' in ab else 'B'} only")
            target, row0, rows, lin = self._locate(module, wpath)
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[1] != lin.in_features \
                    or b.shape[0] != rows:
                raise AdapterError(f"{wpath}: {module} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}; the "
                                   f"model expects [r, {lin.in_features}] / [{rows}, r] (adapter for another model?)")
            parts.setdefault(target, []).append((row0, rows, a, b.float() * scaling_for(module)))
        out = {}
        for target, ps in parts.items():
            lin = self._linear(target)
            r_total = sum(a.shape[0] for _, _, a, _ in ps)
            A = torch.cat([a.float() for _, _, a, _ in ps])  # [R, in]
            B = torch.zeros(lin.out_features, r_total)  # [out, R], block-diagonal over the fused parts
            col = 0
            for row0, rows, a, b in ps:
                B[row0:row0 + rows, col:col + a.shape[0]] = b.float()
                col += a.shape[0]
            out[target] = (A.T.contiguous().to(self.device, self.dtype), B.T.contiguous().to(self.device, self.dtype))
        return out

    def _linear(self, name: str) -> nn.Module:
        m = self.model.get_submodule(name)
        return m.base_layer if isinstance(m, MultiLoRALinear) else m

    def _locate(self, module: str, wpath: Path) -> tuple[str, int, int, nn.Module]:
        """PEFT module path -> (engine linear name, first output row, rows, that linear)."""
        try:
            lin = self._linear(module)
            target, row0, rows = module, 0, None
        except AttributeError:
            parent_name, _, leaf = module.rpartition(".")
            fused = FUSED_INTO.get(leaf)
            try:
                parent = self.model.get_submodule(parent_name)
                lin = self._linear(f"{parent_name}.{fused}") if fused else None
            except AttributeError:
                lin = None
            if lin is None:
                raise AdapterError(f"{wpath}: the adapter targets {module!r}, which this model does not have "
                                   "(adapter for another model?)") from None
            target = f"{parent_name}.{fused}"
            row0, rows = _part_rows(parent, fused, leaf, lin.out_features)
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        if not (hasattr(lin, "in_features") and hasattr(lin, "out_features")) or ".visual." in f".{module}" \
                or lin is head:
            raise AdapterError(f"{wpath}: {module!r} is not a language-model linear; the engine serves LoRA on "
                               "the language model's decoder linears only")
        return target, row0, lin.out_features if rows is None else rows, lin

    def _wrapped(self, name: str) -> MultiLoRALinear:
        m = self.model.get_submodule(name)
        if isinstance(m, MultiLoRALinear):
            return m
        wrapped = MultiLoRALinear(m, self)
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapped)
        return wrapped

    # --- one step ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, slots: list[int | None], num_rows: list[int]):
        """Within: the forward of a step whose sequences hold `num_rows[i]` consecutive flat rows each, on
        adapter slot `slots[i]` (None: the base model)."""
        total = sum(num_rows)
        by_slot: dict[int, list[int]] = {}
        row = 0
        for s, n in zip(slots, num_rows):
            if s is not None:
                by_slot.setdefault(s, []).extend(range(row, row + n))
            row += n
        groups = [(s, None if len(rows) == total else torch.tensor(rows, dtype=torch.long, device=self.device))
                  for s, rows in by_slot.items()]
        self.groups, self.num_rows = groups, total
        try:
            yield
        finally:
            self.groups, self.num_rows = None, 0


def _part_rows(parent: nn.Module, fused: str, leaf: str, out_features: int) -> tuple[int, int]:
    """(first row, rows) of PEFT projection `leaf` inside the engine's fused `fused` linear of `parent`."""
    if fused == "qkv_proj":
        q, kv = parent.n_heads * parent.head_dim, parent.n_kv * parent.head_dim
        return {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv)}[leaf]
    half = out_features // 2  # gate rows first, then up (GlmMLP / Glm4MoeMLP chunk(2) order)
    return (0, half) if leaf == "gate_proj" else (half, half)

