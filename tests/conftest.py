"""Shared fixtures: tiny random transformers reference models saved as checkpoints (CPU, no network).

    def test_x(hf_checkpoint):
        folder, ref = hf_checkpoint("glm4", max_shard_size="50KB", rope_parameters={...})

`ref` is the transformers model (fp32, eval, randomized so norms/biases matter); `folder` its
`save_pretrained` output. `tiny_config(model_type, **overrides)` gives the HF config kwargs alone.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

@contextlib.contextmanager
def kernel_activations(mode: str):
    """glm4's integer kernels with activations "exact" or "int16" inside the block (set_activations; no-op without
    the extension)."""
    from glm4.quant import kernels

    if not kernels.HAVE_EXT:
        yield
        return
    before = torch.ops.glm4.set_activations(mode)
    try:
        yield
    finally:
        torch.ops.glm4.set_activations(before)


def _isas() -> list:
    """The kernel sets to test: AVX2 wherever the kernels run, AVX-512 VNNI where the CPU has it."""
    from glm4.quant import kernels

    avx512 = kernels.HAVE_EXT and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= kernels.cpu_features()
    return ["avx2", pytest.param("avx512_vnni", marks=pytest.mark.skipif(not avx512, reason="the CPU lacks AVX-512 VNNI"))]


@pytest.fixture(params=_isas())
def isa(request):
    """Runs the test with glm4's kernels of one instruction set (ops.cpp picks per call; set_isa narrows it)."""
    before = torch.ops.glm4.set_isa(request.param)
    assert torch.ops.glm4.isa() == request.param
    yield request.param
    torch.ops.glm4.set_isa(before)


@pytest.fixture
def exact_activations():
    """glm4's integer kernels with exact activations for the test: by default they take them at int16 precision
    (the AVX2 4- / 6-bit kernels, the AVX-512 ones for one token; tested against their own bound in test_kernels.py);
    parity with a dequantized reference at fp32 tolerances is a property of the exact ones."""
    with kernel_activations("exact"):
        yield


# model_type -> (transformers config class, model class)
HF_CLASSES = {
    "glm": ("GlmConfig", "GlmForCausalLM"),
    "glm4": ("Glm4Config", "Glm4ForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
}

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, attention_bias=True,
    pad_token_id=0, eos_token_id=[1, 2], bos_token_id=None, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
TINY_MOE = dict(
    moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    use_qk_norm=True,
)


def train_tokenizer_json(folder: Path, corpus: list[str], vocab_size: int) -> Path:
    """A byte-level BPE tokenizer.json in `folder` with GLM-4's special tokens as added tokens (the -hf layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm4.tokenizer import GLM4_SPECIAL_TOKENS

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(GLM4_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(corpus, trainer)
    t.save(str(folder / "tokenizer.json"))
    return folder


def tiny_config(model_type: str = "glm", **overrides) -> dict:
    d = json.loads(json.dumps(TINY))
    if model_type == "glm4_moe":
        d.update(TINY_MOE)
    d.update(overrides)
    return d


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter so each one changes the output: matrices ~ N(0, 1/fan_in), embeddings
    ~ N(0, 1), biases ~ N(0, 0.1), norm weights ~ 1 + N(0, 0.1); also a router's correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * r)
            elif "embed" in name:
                p.copy_(r)
            elif p.dim() >= 2:
                p.copy_(r / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.1 * r)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def build_hf_model(model_type: str = "glm", seed: int = 0, **overrides):
    import transformers

    cfg_name, model_name = HF_CLASSES[model_type]
    cfg = getattr(transformers, cfg_name)(**tiny_config(model_type, **overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).float().eval()
    return randomize_(model, seed)


def save_hf(model, folder: Path, max_shard_size=None, dtype: torch.dtype | None = None) -> Path:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **kw)
    if dtype is not None:
        model.float()
    return folder


def rewrite_config(folder: Path, fn) -> dict:
    """Apply `fn(dict) -> dict | None` to folder/config.json in place; returns the new dict."""
    p = Path(folder) / "config.json"
    d = json.loads(p.read_text())
    d = fn(d) or d
    p.write_text(json.dumps(d, indent=2))
    return d


def to_chatglm(hf_folder: Path, out: Path) -> Path:
    """Rewrite a tiny `glm` checkpoint into glm-4-9b-chat's original remote-code names and config.json."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((Path(hf_folder) / "config.json").read_text())
    sd = {}
    for f in sorted(Path(hf_folder).glob("*.safetensors")):
        sd.update(load_file(f))
    rp = cfg["rope_parameters"]
    L = cfg["num_hidden_layers"]
    new = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
        # the remote code saves its rotary buffer; the loader must drop it
        "transformer.rotary_pos_emb.inv_freq": torch.ones(int(cfg["head_dim"] * rp["partial_rotary_factor"]) // 2),
    }
    for i in range(L):
        a, b = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for part in ("weight", "bias"):
            new[b + f"self_attention.query_key_value.{part}"] = torch.cat(
                [sd[a + f"self_attn.{x}_proj.{part}"] for x in "qkv"])
        new[b + "self_attention.dense.weight"] = sd[a + "self_attn.o_proj.weight"]
        new[b + "input_layernorm.weight"] = sd[a + "input_layernorm.weight"]
        new[b + "post_attention_layernorm.weight"] = sd[a + "post_attention_layernorm.weight"]
        new[b + "mlp.dense_h_to_4h.weight"] = sd[a + "mlp.gate_up_proj.weight"]
        new[b + "mlp.dense_4h_to_h.weight"] = sd[a + "mlp.down_proj.weight"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in new.items()}, out / "model.safetensors", metadata={"format": "pt"})
    chat_cfg = {
        "_name_or_path": "THUDM/glm-4-9b-chat", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"}, "model_type": "chatglm",
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": cfg["intermediate_size"],
        "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": cfg["hidden_size"],
        "kv_channels": cfg["head_dim"], "layernorm_epsilon": cfg["rms_norm_eps"], "multi_query_attention": True,
        "multi_query_group_num": cfg["num_key_value_heads"], "num_attention_heads": cfg["num_attention_heads"],
        "num_layers": L, "original_rope": True, "padded_vocab_size": cfg["vocab_size"], "post_layer_norm": True,
        "rmsnorm": True, "rope_ratio": rp["rope_theta"] / 10000.0, "seq_length": cfg["max_position_embeddings"],
        "tie_word_embeddings": False, "torch_dtype": "float32", "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"],
    }
    (out / "config.json").write_text(json.dumps(chat_cfg, indent=2))
    return out


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: (model_type="glm", max_shard_size=None, seed=0, name=None, save_dtype=None, **config
    overrides) -> (checkpoint folder, transformers reference model)."""
    counter = iter(range(1000))

    def make(model_type: str = "glm", max_shard_size=None, seed: int = 0, name: str | None = None,
             save_dtype: torch.dtype | None = None, **overrides):
        ref = build_hf_model(model_type, seed, **overrides)
        folder = tmp_path / (name or f"{model_type}_{next(counter)}")
        save_hf(ref, folder, max_shard_size, save_dtype)
        return folder, ref

    return make


def hf_greedy(ref, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None, eos_token_id=None):
    """transformers' greedy generate (no early stop unless eos ids are given)."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.no_grad():
        return ref.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                            pad_token_id=ref.config.pad_token_id, **kw)
