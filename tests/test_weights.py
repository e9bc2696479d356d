"""Checkpoint loading/saving: layouts, dtypes, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch
from conftest import build_hf_model, rewrite_config, to_chatglm
from safetensors.torch import load_file, save_file

import glm4
import glm4.weights as W
from glm4.config import ConfigError
from glm4.weights import CheckpointError, SafetensorsFile, load_model, save_checkpoint


def _rewrite_tensors(path, fn):
    sd = load_file(path)
    sd = fn(sd) or sd
    save_file(sd, path, metadata={"format": "pt"})


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_missing_tensor_is_named(hf_checkpoint):
    folder, _ = hf_checkpoint("glm")
    _rewrite_tensors(folder / "model.safetensors", lambda sd: [sd.pop("model.layers.1.mlp.down_proj.weight")] and None)
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(folder)


def test_unexpected_tensor_is_named(hf_checkpoint):
    folder, _ = hf_checkpoint("glm")
    _rewrite_tensors(folder / "model.safetensors",
                     lambda sd: sd.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_model(folder)


def test_misshaped_tensor_is_named(hf_checkpoint):
    folder, _ = hf_checkpoint("glm4")
    _rewrite_tensors(folder / "model.safetensors", lambda sd: sd.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \[63\].*expects \[64\]"):
        load_model(folder)


def test_truncated_file_names_the_tensor(hf_checkpoint):
    folder, _ = hf_checkpoint("glm")
    path = folder / "model.safetensors"
    st = SafetensorsFile(path)
    last = max(st.entries, key=lambda k: st.entries[k][3])  # the tensor stored at the end of the file
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"truncated.*'{last}'"):
        load_model(folder)


@pytest.mark.parametrize("damage", ["length", "json", "entry", "empty"])
def test_corrupt_header_names_the_file(hf_checkpoint, damage):
    folder, _ = hf_checkpoint("glm")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if damage == "length":
        data[:8] = (1 << 40).to_bytes(8, "little")
    elif damage == "json":
        data[8:12] = b"\xff\xfe{["
    elif damage == "entry":
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["dtype"] = "F99"
        raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(raw) == n
        data[8:8 + n] = raw
    else:
        data = bytearray(b"\x01\x02")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_model(folder)


def test_sharded_errors(hf_checkpoint):
    folder, ref = hf_checkpoint("glm", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    # a tensor the index promises but its shard lacks
    victim = "model.layers.0.self_attn.o_proj.weight"
    shard = index["weight_map"][victim]
    _rewrite_tensors(folder / shard, lambda sd: [sd.pop(victim)] and None)
    with pytest.raises(CheckpointError, match=rf"'{victim}'.*listed in the index under '{shard}'"):
        load_model(folder)
    # a shard file gone
    (folder / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{shards[-1]}'.*missing"):
        load_model(folder)


def test_duplicate_tensor_across_shards(hf_checkpoint):
    folder, _ = hf_checkpoint("glm", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    first = load_file(folder / shards[0])
    name = next(iter(first))
    _rewrite_tensors(folder / shards[1], lambda sd: sd.update({name: first[name]}))
    with pytest.raises(CheckpointError, match=rf"'{name}' appears in both"):
        load_model(folder)


def test_folder_errors(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    folder, _ = hf_checkpoint("glm")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no model.safetensors.*bin checkpoints are not supported"):
        load_model(folder)


def test_config_errors_surface_through_load_model(hf_checkpoint):
    folder, _ = hf_checkpoint("glm")
    rewrite_config(folder, lambda d: d.update(model_type="llama"))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        load_model(folder)
    rewrite_config(folder, lambda d: [d.update(model_type="glm4"), d.pop("hidden_size")] and None)
    with pytest.raises(ConfigError, match="missing required field.*hidden_size"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(folder)


@pytest.mark.parametrize("kind", ["glm", "glm4", "chatglm"])
def test_save_checkpoint_round_trip(hf_checkpoint, tmp_path, kind):
    folder, ref = hf_checkpoint("glm" if kind == "chatglm" else kind)
    if kind == "chatglm":
        folder = to_chatglm(folder, tmp_path / "chat")
    model = load_model(folder)
    out = save_checkpoint(model, tmp_path / "saved")
    again = load_model(out)
    assert type(again) is type(model)
    assert torch.equal(_logits(again, IDS), _logits(model, IDS))
    if kind != "chatglm":
        # what we write (config.json in the 4.x style + our safetensors writer) loads in transformers too
        import transformers

        hf = getattr(transformers, type(ref).__name__).from_pretrained(out).eval()
        assert (_logits(hf, IDS) - _logits(model, IDS)).abs().max().item() <= 1e-4


def test_bf16_checkpoint_into_fp32_chunked(hf_checkpoint, monkeypatch):
    folder, ref = hf_checkpoint("glm4", save_dtype=torch.bfloat16)
    sd = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    monkeypatch.setattr(W, "_CHUNK", 64)  # many chunks per tensor
    model = load_model(folder, dtype="fp32")
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, sd[name].float()), name
    model16 = load_model(folder, dtype=torch.bfloat16)  # same dtype: bytes read straight into parameters
    for name, p in model16.named_parameters():
        assert torch.equal(p, sd[name]), name


def test_read_into_non_contiguous_target(hf_checkpoint):
    folder, ref = hf_checkpoint("glm")
    st = SafetensorsFile(folder / "model.safetensors")
    name = "model.layers.0.mlp.gate_up_proj.weight"
    shape = st.entries[name][1]
    target = torch.empty(shape[::-1]).t()
    assert not target.is_contiguous()
    with open(st.path, "rb") as f:
        st.read_into(f, name, target)
    assert torch.equal(target, ref.state_dict()[name])


def test_dtype_argument():
    assert W.resolve_dtype("bf16") is torch.bfloat16 and W.resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unsupported dtype"):
        W.resolve_dtype("int3")


def test_missing_adapter_is_a_clear_error(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("glm")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_model(folder, adapter=tmp_path)


def test_public_api_names():
    from glm4.quant.load import load_model as front_door

    assert glm4.load_model is front_door  # safetensors, GGUF, AWQ/GPTQ/compressed-tensors
    model = build_hf_model("glm")
    assert callable(glm4.generate) and model is not None


@pytest.mark.slow
def test_load_peak_rss_within_1_3x_of_weights():
    # ~220 MB fp32 checkpoint, loaded in fresh subprocesses as fp32 and bf16 (benchmarks/bench_load.py)
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_load.py"
    spec = importlib.util.spec_from_file_location("bench_load", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--limit", "1.3"]) == 0


def test_device_argument():
    assert W.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="invalid device"):
        W.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            W.resolve_device("cuda")


def test_adapter_is_applied_by_load_model(hf_checkpoint, tmp_path):
    from glm4.layers.lora import LoRAConfig, apply_lora, lora_modules, save_adapter

    folder, _ = hf_checkpoint("glm")
    model = load_model(folder)
    base = _logits(model, IDS)
    cfg = LoRAConfig(r=4, alpha=8.0, dropout=0.3, targets=["q_proj", "v_proj"])  # dropout must be off at load
    apply_lora(model, cfg)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.5)  # zero-init B would make the adapter a no-op
    tuned = _logits(model.eval(), IDS)
    save_adapter(model, tmp_path / "adapter", cfg)
    again = load_model(folder, adapter=tmp_path / "adapter")
    assert not torch.allclose(tuned, base)
    assert (_logits(again, IDS) - tuned).abs().max().item() <= 1e-5


_MALLOC_SCRIPT = """
import resource, torch
from glm4.weights import memory_returned_when_freed

def faults_of_a_fresh_16mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(4 << 20, dtype=torch.float32).fill_(1.0)  # 16 MiB, every page touched
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with memory_returned_when_freed():
    inside = [faults_of_a_fresh_16mb_tensor() for _ in range(3)]
print(min(inside))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_memory_returned_when_freed_while_loading():
    """While loading, every freed 16 MiB block goes back to the OS: each new one faults its pages in again."""
    out = subprocess.run([sys.executable, "-c", _MALLOC_SCRIPT], capture_output=True, text=True, check=True)
    inside = int(out.stdout)
    assert inside >= 8, out.stdout  # one fault per page at least: 4,096 with 4 KiB pages, 8 with 2 MiB ones


def test_memory_returned_when_freed_leaves_glibc_thresholds_where_its_own_settle(monkeypatch):
    """Afterwards (an error inside included) mmap 32 MiB and heap trim 64 MiB: with the trim threshold left at
    glibc's 128 KiB default every prefill's freed buffers went back to the OS and were faulted in again (whether
    a block is reused depends on where the heap can grow, so the calls are checked, not page faults)."""
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(W, "_glibc", lambda: FakeLibc())
    with pytest.raises(RuntimeError, match="inside"), W.memory_returned_when_freed():
        assert calls == [(W._M_MMAP_THRESHOLD, 1 << 20)]
        raise RuntimeError("inside")
    assert calls[1:] == [(W._M_MMAP_THRESHOLD, 32 << 20), (W._M_TRIM_THRESHOLD, 64 << 20)]
    assert (W._M_TRIM_THRESHOLD, W._M_MMAP_THRESHOLD) == (-1, -3)  # malloc.h's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
